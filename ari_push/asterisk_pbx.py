"""The PBX port over ARI: what the call flow and the call manager ask of Asterisk.

Every ARI call ari-push makes for a call is here, each a declared operation of ``ari.py``
(checked against the running Asterisk's /ari/api-docs by a contract test). ARI errors become
``PbxError`` (``gone`` for a 404: the channel or object no longer exists).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ari_push.ari import AriClient, AriError
from ari_push.call_events import ChannelInfo, channel_info
from ari_push.channels import DIALED, clean_caller_id, contact_object_id
from ari_push.pbx import ContactDetails, ContactSnapshot, LegRequest, PbxError

#: the contact fields read before a delete and written back by a restore (Asterisk 22's own)
RESTORED_FIELDS = frozenset({
    "uri", "expiration_time", "path", "user_agent", "endpoint", "reg_server", "via_addr", "via_port", "call_id",
    "qualify_frequency", "qualify_timeout", "qualify_2xx_only", "authenticate_qualify", "outbound_proxy",
    "prune_on_boot",
})


class AsteriskPbx:
    def __init__(self, ari: AriClient, app: str) -> None:
        self.ari = ari
        self.app = app

    async def _call(self, operation: str, path: Mapping[str, str] | None = None,
                    query: Mapping[str, str] | None = None, body: Mapping[str, Any] | None = None) -> Any:
        try:
            return await self.ari.call(operation, path, query=query, body=body)
        except AriError as exc:
            raise PbxError(operation, f"{exc.status or 'no answer'} {exc.message}".strip(),
                           gone=exc.status == 404) from None

    # ---------------------------------------------------------------- the call port

    async def ring(self, channel_id: str) -> None:
        await self._call("ring", {"channelId": channel_id})

    async def early_media(self, channel_id: str, moh_class: str) -> None:
        await self._call("progress", {"channelId": channel_id})
        await self._call("moh_start", {"channelId": channel_id}, query={"mohClass": moh_class})

    async def stop_early_media(self, channel_id: str) -> None:
        await self._call("moh_stop", {"channelId": channel_id})

    async def originate(self, leg: LegRequest) -> None:
        body: dict[str, Any] = {
            "endpoint": f"PJSIP/{leg.endpoint}/{leg.contact_uri}",
            "app": self.app,
            "appArgs": f"{DIALED},{leg.caller_channel}",
            "callerId": f'"{clean_caller_id(leg.caller_name)}" <{clean_caller_id(leg.caller_number)}>',
            "timeout": int(leg.ring_timeout),
            # The app can tell this call's INVITEs apart (the same call id as in the push), e.g.
            # to refuse an INVITE retransmitted to a socket it has reopened on the same port.
            "variables": {"ARI_PUSH_CALL_ID": leg.call_id, "PJSIP_HEADER(add,X-Ari-Push-Call-Id)": leg.call_id},
        }
        if leg.linked:
            body["originator"] = leg.caller_channel
        await self._call("originate", {"channelId": leg.leg_id}, body=body)

    async def answer(self, channel_id: str) -> None:
        await self._call("answer", {"channelId": channel_id})

    async def bridge(self, bridge_id: str, name: str, channel_ids: Sequence[str]) -> None:
        await self._call("create_bridge", {"bridgeId": bridge_id}, query={"type": "mixing", "name": name})
        await self._call("add_channel", {"bridgeId": bridge_id}, query={"channel": ",".join(channel_ids)})

    async def destroy_bridge(self, bridge_id: str) -> None:
        await self._call("destroy_bridge", {"bridgeId": bridge_id})

    async def hangup(self, channel_id: str, reason: str = "normal") -> None:
        await self._call("hangup", {"channelId": channel_id}, query={"reason": reason})

    async def continue_in_dialplan(self, channel_id: str, status: str, context: str = "") -> None:
        await self._call("set_variable", {"channelId": channel_id},
                         query={"variable": "PUSH_STATUS", "value": status})
        query = {"context": context, "extension": "s", "priority": "1"} if context else {}
        await self._call("continue", {"channelId": channel_id}, query=query)

    async def contacts(self, aor: str) -> list[str] | None:
        try:
            attrs = await self._call("get_config", {"configClass": "res_pjsip", "objectType": "aor", "id": aor})
        except PbxError as exc:
            if exc.gone:
                return None
            raise
        uris: list[str] = []
        for attr in attrs or []:
            if attr.get("attribute") == "contact" and attr.get("value"):
                uris += [u.strip() for u in str(attr["value"]).split(",") if u.strip()]
        return uris

    async def delete_contact(self, aor: str, contact_uri: str) -> ContactSnapshot | None:
        # Through ARI's dynamic config, which emits the proper ContactStatus events; a raw astdb
        # delete would leave Asterisk blind to the next REGISTER of the same URI (measured).
        path = _contact_path(aor, contact_uri)
        try:
            attrs = await self._call("get_config", path)
            await self._call("delete_config", path)
        except PbxError as exc:
            if exc.gone:
                return None
            raise
        fields = tuple((str(a.get("attribute", "")), str(a.get("value", ""))) for a in attrs or []
                       if a.get("attribute") in RESTORED_FIELDS)
        expires = _unix_time(next((v for k, v in fields if k == "expiration_time"), ""))
        return ContactSnapshot(aor, contact_uri, expires or 0.0, fields)

    async def contact_details(self, aor: str, contact_uri: str) -> ContactDetails:
        """The User-Agent and expiration Asterisk stored with a registered contact, in one read
        (AMI's ContactStatus carries neither)."""
        attrs = await self._call("get_config", _contact_path(aor, contact_uri))
        values = {str(a.get("attribute", "")): str(a.get("value", "")) for a in attrs or []}
        return ContactDetails(values.get("user_agent", ""), _unix_time(values.get("expiration_time", "")))

    async def restore_contact(self, snapshot: ContactSnapshot) -> None:
        # PUT of the same object id with the fields read before the delete: Asterisk stores it
        # as it was (expiration, path, user agent, via) and emits ContactStatus Created (measured).
        await self._call("put_config", _contact_path(snapshot.aor, snapshot.uri),
                         body={"fields": [{"attribute": k, "value": v} for k, v in snapshot.fields]})

    # ---------------------------------------------------------------- the session

    async def system_id(self) -> str:
        info = await self._call("asterisk_info")
        return str((info.get("system") or {}).get("entity_id", ""))

    async def channels(self) -> list[ChannelInfo]:
        return [channel_info(c) for c in await self._call("list_channels") or []]

    async def exists(self, channel_id: str) -> bool:
        try:
            await self._call("get_channel", {"channelId": channel_id})
        except PbxError as exc:
            if exc.gone:
                return False
            raise
        return True

    async def app_channel_ids(self) -> set[str]:
        app = await self._call("get_application", {"applicationName": self.app})
        return {str(c) for c in (app or {}).get("channel_ids", [])}

    async def bridge_of(self, channel_id: str) -> tuple[str, list[str]] | None:
        for bridge in await self._call("list_bridges") or []:
            if channel_id in bridge.get("channels", []):
                return str(bridge["id"]), [str(c) for c in bridge["channels"]]
        return None

    async def watch_channel(self, channel_id: str) -> None:
        await self._call("subscribe", {"applicationName": self.app}, query={"eventSource": f"channel:{channel_id}"})


def _contact_path(aor: str, contact_uri: str) -> dict[str, str]:
    """The path parameters of a registered contact's dynamic-config object."""
    return {"configClass": "res_pjsip", "objectType": "contact", "id": contact_object_id(aor, contact_uri)}


def _unix_time(value: str) -> float | None:
    """Asterisk's ``expiration_time`` (whole Unix seconds), None when absent or not a number."""
    return float(value) if value.isdigit() else None
