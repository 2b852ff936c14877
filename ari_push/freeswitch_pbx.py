"""The PBX port over the FreeSWITCH event socket: the call flow's operations as ESL commands, and
FreeSWITCH's channel events as the flow's typed events (docs/freeswitch.md, "Call take-over").

The dialplan hands a call over with ``ring_ready`` + ``park`` and the channel variables
``ari_push=1`` and ``push_target``; its ``CHANNEL_PARK`` is the caller's ``StasisStart``. Legs are
originated with ``bgapi originate`` to ``sofia/<profile>/<contact-uri>`` and park when they
answer, which is their ``StasisStart`` (``dialed,<caller>``, as on Asterisk). Control is by UUID.
Every failure is a ``PbxError`` (``gone`` when FreeSWITCH has no such channel).
"""

from __future__ import annotations

import json
import logging
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Protocol

from ari_push.call_events import (
    ChannelDestroyed,
    ChannelEvent,
    ChannelInfo,
    ChannelLeftBridge,
    ChannelStateChange,
    StasisStart,
)
from ari_push.channels import DIALED, clean_caller_id
from ari_push.esl import EslError
from ari_push.esl_frames import EslEvent, EslMessage
from ari_push.fs_capture import sofia_contact_uri, user_id
from ari_push.pbx import ContactSnapshot, LegRequest, PbxError

log = logging.getLogger("ari_push.freeswitch_pbx")

#: what the adapter subscribes to, beside the registration events of the capture
CALL_EVENTS = ("CHANNEL_PARK", "CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA", "CHANNEL_ANSWER",
               "CHANNEL_HANGUP", "CHANNEL_UNBRIDGE", "BACKGROUND_JOB")

#: FreeSWITCH cause names -> Q.850 codes (the flow tells a decline by 17/21)
Q850 = {
    "UNALLOCATED_NUMBER": 1, "NORMAL_CLEARING": 16, "USER_BUSY": 17, "NO_USER_RESPONSE": 18, "NO_ANSWER": 19,
    "SUBSCRIBER_ABSENT": 20, "CALL_REJECTED": 21, "DESTINATION_OUT_OF_ORDER": 27, "INVALID_NUMBER_FORMAT": 28,
    "NORMAL_UNSPECIFIED": 31, "NORMAL_CIRCUIT_CONGESTION": 34, "NORMAL_TEMPORARY_FAILURE": 41,
    "RECOVERY_ON_TIMER_EXPIRE": 102, "ORIGINATOR_CANCEL": 487, "USER_NOT_REGISTERED": 606,
}
#: the port's hang-up reasons (Asterisk's names) -> FreeSWITCH causes
HANGUP_CAUSES = {"normal": "NORMAL_CLEARING", "busy": "USER_BUSY", "congestion": "NORMAL_CIRCUIT_CONGESTION",
                 "no_answer": "NO_ANSWER", "noanswer": "NO_ANSWER"}
_UNSAFE_URI = re.compile(r"[\s,{}'&^\[\]]")
_UNSAFE_VALUE = re.compile(r"[,{}'\"^\[\]\r\n]")


class EslSender(Protocol):
    async def api(self, command: str) -> str: ...

    async def send(self, command: str, headers: tuple[tuple[str, str], ...] = ()) -> EslMessage: ...


def _value(text: str) -> str:
    """A channel variable value safe inside ``{...}`` of a dial string."""
    return _UNSAFE_VALUE.sub("", text)[:80]


class FreeswitchEvents:
    """ESL channel events -> the call flow's events. Keeps just enough state to report each
    caller once (a caller that comes back to park after a bridge is not a new call)."""

    def __init__(self, owner: str = "") -> None:
        self.owner = owner  # clustered: this daemon's member name; legs of other members are theirs
        self.taken: set[str] = set()  # callers reported as StasisStart
        self.contexts: dict[str, str] = {}  # caller -> its dialplan context (for the hand-back)

    def translate(self, ev: EslEvent) -> ChannelEvent | None:
        name, cid = ev.name, ev.uuid
        if not cid:
            if name == "BACKGROUND_JOB":
                return self._job(ev)
            return None
        if name == "CHANNEL_PARK":
            if ev.get("variable_ari_push_leg") == "1":
                if self.owner and ev.get("variable_ari_push_owner") != self.owner:
                    return None  # another daemon's leg (every daemon sees every park)
                caller = ev.get("variable_ari_push_caller")
                return StasisStart(self._info(ev, "Up"), (DIALED, caller)) if caller else None
            target = ev.get("variable_push_target")
            if ev.get("variable_ari_push") != "1" or not target or cid in self.taken:
                return None
            self.taken.add(cid)
            self.contexts[cid] = ev.get("Caller-Context")
            args = (target, f"timeout={ev.get('variable_push_timeout')}") if ev.get("variable_push_timeout") \
                else (target,)
            # Core-UUID, FreeSWITCH's own id, is in every event: the call id is the same in every
            # daemon from the first event on, before a reconnect's reconcile has read it
            return StasisStart(self._info(ev, "Ring", args=",".join(args)), args, ev.get("Core-UUID"))
        if name in ("CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA"):
            return ChannelStateChange(cid, "Ringing")
        if name == "CHANNEL_ANSWER":
            return ChannelStateChange(cid, "Up")
        if name == "CHANNEL_UNBRIDGE":
            return ChannelLeftBridge(cid)
        if name == "CHANNEL_HANGUP":
            self.taken.discard(cid)
            self.contexts.pop(cid, None)
            cause = ev.get("Hangup-Cause")
            return ChannelDestroyed(cid, Q850.get(cause, 0), cause)
        if name == "BACKGROUND_JOB":
            return self._job(ev)
        return None

    @staticmethod
    def _job(ev: EslEvent) -> ChannelEvent | None:
        """A failed originate (``-ERR USER_BUSY``) of a leg: the leg is gone, with its cause."""
        leg = ev.get("Job-UUID")
        if not leg.startswith("ap-") or not ev.body.startswith("-ERR"):
            return None
        cause = ev.body.removeprefix("-ERR").strip().split()[0] if ev.body.strip() != "-ERR" else ""
        return ChannelDestroyed(leg, Q850.get(cause, 0), cause)

    @staticmethod
    def _info(ev: EslEvent, state: str, args: str = "") -> ChannelInfo:
        try:
            created = int(ev.get("Caller-Channel-Created-Time") or 0) / 1e6
        except ValueError:
            created = 0.0
        age = min(max(0.0, time.time() - created), 3600.0) if created else 0.0
        return ChannelInfo(id=ev.uuid, state=state, caller_number=ev.get("Caller-Caller-ID-Number"),
                           caller_name=ev.get("Caller-Caller-ID-Name"), age=age,
                           app_name="Stasis" if args else "park", args=args)


class FreeswitchPbx:
    """``pbx.Pbx`` over ESL. ``events`` is the translator fed by the same connection."""

    def __init__(self, esl: EslSender, profile: str, continue_extension: str = "push-done",
                 events: FreeswitchEvents | None = None, owner: str = "") -> None:
        self.esl = esl
        self.profile = profile
        self.continue_extension = continue_extension
        #: clustered (fs_cluster.py): this daemon's member name, kept in ``ari_push_owner`` of its
        #: callers and legs; "" for a single daemon, which owns every ari-push channel
        self.owner = owner
        self.events = events or FreeswitchEvents(owner)
        self.bridges: dict[str, list[str]] = {}

    async def _api(self, operation: str, command: str) -> str:
        try:
            out = await self.esl.api(command)
        except EslError as exc:
            text = str(exc)
            raise PbxError(operation, text, gone="No such channel" in text or "no such" in text.lower()) from None
        return out.strip()

    async def _execute(self, operation: str, channel_id: str, app: str, arg: str = "") -> None:
        headers = [("call-command", "execute"), ("execute-app-name", app)]
        if arg:
            headers.append(("execute-app-arg", arg))
        try:
            reply = await self.esl.send(f"sendmsg {channel_id}", tuple(headers))
        except EslError as exc:
            raise PbxError(operation, str(exc)) from None
        if not reply.ok:
            raise PbxError(operation, reply.reply_text, gone="no such" in reply.reply_text.lower()
                           or "invalid session" in reply.reply_text.lower())

    # ---------------------------------------------------------------- the call port

    async def ring(self, channel_id: str) -> None:
        await self._execute("ring", channel_id, "ring_ready")

    async def early_media(self, channel_id: str, moh_class: str) -> None:
        """183 and ``moh_class`` as the stream to play (``local_stream://moh``, a file, a tone_stream)."""
        await self._execute("progress", channel_id, "pre_answer")
        await self._execute("moh_start", channel_id, "playback", moh_class)

    async def stop_early_media(self, channel_id: str) -> None:
        await self._api("moh_stop", f"uuid_break {channel_id} all")

    async def originate(self, leg: LegRequest) -> None:
        if not leg.contact_uri or _UNSAFE_URI.search(leg.contact_uri):
            raise PbxError("originate", "contact URI not usable in a dial string")
        variables = ",".join([
            f"origination_uuid={leg.leg_id}", "ari_push_leg=1", f"ari_push_caller={leg.caller_channel}",
            f"ari_push_call_id={leg.call_id}", f"sip_h_X-Ari-Push-Call-Id={leg.call_id}",
            f"origination_caller_id_number={_value(clean_caller_id(leg.caller_number)) or 'unknown'}",
            f"origination_caller_id_name='{_value(clean_caller_id(leg.caller_name))}'",
            f"originate_timeout={max(1, int(leg.ring_timeout))}", "ignore_early_media=true",
        ] + ([f"ari_push_owner={_value(self.owner)}"] if self.owner else []))
        command = f"bgapi originate {{{variables}}}sofia/{self.profile}/{leg.contact_uri} &park()"
        try:
            reply = await self.esl.send(command, (("Job-UUID", leg.leg_id),))
        except EslError as exc:
            raise PbxError("originate", str(exc)) from None
        if not reply.ok:
            raise PbxError("originate", reply.reply_text)

    async def answer(self, channel_id: str) -> None:
        out = await self._api("answer", f"uuid_answer {channel_id}")
        if out.startswith("-ERR") and "no such" in out.lower():
            raise PbxError("answer", out, gone=True)

    async def bridge(self, bridge_id: str, name: str, channel_ids: Sequence[str]) -> None:
        """``uuid_bridge`` of two channels. The caller is answered first: FreeSWITCH refuses to
        bridge a ringing, unanswered channel (it swaps the legs and hangs the caller up)."""
        if len(channel_ids) != 2:
            raise PbxError("create_bridge", f"FreeSWITCH bridges two channels, not {len(channel_ids)}")
        await self.answer(channel_ids[0])
        out = await self._api("add_channel", f"uuid_bridge {channel_ids[0]} {channel_ids[1]}")
        if not out.startswith("+OK"):
            raise PbxError("add_channel", out, gone="no such" in out.lower())
        self.bridges[bridge_id] = list(channel_ids)

    async def destroy_bridge(self, bridge_id: str) -> None:
        self.bridges.pop(bridge_id, None)  # no bridge object in FreeSWITCH: it goes with its channels

    async def hangup(self, channel_id: str, reason: str = "normal") -> None:
        out = await self._api("hangup", f"uuid_kill {channel_id} {HANGUP_CAUSES.get(reason, 'NORMAL_CLEARING')}")
        if out.startswith("-ERR"):
            raise PbxError("hangup", out, gone="no such channel" in out.lower())

    async def continue_in_dialplan(self, channel_id: str, status: str, context: str = "") -> None:
        """``push_status`` set, then the caller goes to the hand-back extension of its own context
        (or ``context``): ``park`` ends a dialplan, so there is no "next priority" to go on with."""
        out = await self._api("set_variable", f"uuid_setvar {channel_id} push_status {_value(status)}")
        if out.startswith("-ERR"):
            raise PbxError("set_variable", out, gone="no such channel" in out.lower())
        where = context or self.events.contexts.get(channel_id) or "default"
        out = await self._api("continue", f"uuid_transfer {channel_id} {self.continue_extension} XML {where}")
        if out.startswith("-ERR"):
            raise PbxError("continue", out, gone="no such channel" in out.lower())

    async def contacts(self, aor: str) -> list[str] | None:
        """The user's live contact URIs on the profile, the newest per Call-ID; None when the
        directory has no such user.

        With ``multiple-registrations=contact`` a phone that wakes on a new address leaves its old
        contacts registered until they expire (measured: N + 1 after N wakes). A UA keeps its
        Call-ID across REGISTERs, so only its newest contact is live: ringing the others would send
        INVITEs to dead addresses at every call (and take RTP ports for nothing). FreeSWITCH shows
        the time left in whole seconds, so contacts of one Call-ID registered within the same second
        are all kept."""
        text = await self._api("get_config", f"sofia xmlstatus profile {self.profile} reg")
        try:
            found = live_contacts(text, aor)
        except ValueError as exc:
            raise PbxError("get_config", str(exc)) from None
        if found:
            return found
        domain = await self._api("get_config", "global_getvar domain")
        exists = await self._api("get_config", f"user_exists id {aor} {domain}")
        return [] if exists == "true" else None

    async def delete_contact(self, aor: str, contact_uri: str) -> ContactSnapshot | None:
        """Nothing to do: FreeSWITCH reports every REGISTER, an unchanged contact URI included
        (measured; docs/freeswitch.md), so the wake is seen without dropping the contact; and
        with nothing dropped there is nothing to put back."""
        return None

    async def restore_contact(self, snapshot: ContactSnapshot) -> None:
        """Never called: ``delete_contact`` drops nothing."""

    # ---------------------------------------------------------------- the session

    async def system_id(self) -> str:
        return await self._api("asterisk_info", "global_getvar core_uuid")

    async def channels(self) -> list[ChannelInfo]:
        """``show channels`` reads a table FreeSWITCH writes after the events: measured, a caller
        parked 2-7 ms ago was missing from it in 13 of 15 tries, and a channel that hung up was
        still there. Rows whose channel is gone are dropped; a missing one is asked by
        ``exists`` before anything is concluded from its absence (``CallManager.reconcile``)."""
        text = await self._api("list_channels", "show channels as json")
        try:
            rows = json.loads(text).get("rows") or []
        except ValueError:
            raise PbxError("list_channels", "unreadable answer") from None
        out = []
        for row in rows:
            cid = str(row.get("uuid", ""))
            state = "Up" if row.get("callstate") in ("ACTIVE", "HELD") else "Ring"
            args = ""
            # The application column names the last one run (``ring_ready`` sent by ari-push, not
            # ``park``), so the channel's variables say what it is: a leg, or a caller handed to
            # ari-push and not handed back yet (no ``push_status``).
            app = str(row.get("application", ""))
            try:
                leg_caller = await self._var(cid, "ari_push_caller")
                if leg_caller:
                    args = f"{DIALED},{leg_caller}"
                elif await self._var(cid, "ari_push") == "1" and not await self._var(cid, "push_status"):
                    target = await self._var(cid, "push_target")
                    if target:
                        args, app = target, "Stasis"
            except PbxError as exc:
                if exc.gone:  # the table still lists a channel that hung up: it is not there
                    continue
                raise
            try:
                age = min(max(0.0, time.time() - float(row.get("created_epoch") or 0)), 3600.0)
            except ValueError:
                age = 0.0
            out.append(ChannelInfo(id=cid, state=state, caller_number=str(row.get("cid_num", "")),
                                   caller_name=str(row.get("cid_name", "")), age=age, app_name=app, args=args))
        return out

    async def exists(self, channel_id: str) -> bool:
        return await self._api("exists", f"uuid_exists {channel_id}") == "true"

    async def _var(self, channel_id: str, name: str) -> str:
        out = await self._api("get_variable", f"uuid_getvar {channel_id} {name}")
        return "" if out in ("_undef_", "") or out.startswith("-ERR") else out

    async def app_channel_ids(self) -> set[str]:
        """ari-push's channels (callers, legs); clustered, only those this daemon owns."""
        out = set()
        for c in await self.channels():
            try:
                if not (c.args or await self._var(c.id, "ari_push_leg") == "1"):
                    continue
                if not self.owner or await self.owner_of(c.id) == self.owner:
                    out.add(c.id)
            except PbxError as exc:
                if not exc.gone:  # gone since it was listed: not ours any more
                    raise
        return out

    async def owner_of(self, channel_id: str) -> str:
        """The member that owns a channel (``ari_push_owner``), "" when none claimed it."""
        return await self._var(channel_id, "ari_push_owner")

    async def set_owner(self, channel_id: str, owner: str) -> None:
        out = await self._api("set_variable", f"uuid_setvar {channel_id} ari_push_owner {_value(owner)}")
        if out.startswith("-ERR"):
            raise PbxError("set_variable", out, gone="no such channel" in out.lower())

    async def bridge_of(self, channel_id: str) -> tuple[str, list[str]] | None:
        other = await self._var(channel_id, "bridge_uuid") or await self._var(channel_id, "signal_bond")
        return (f"fs-{channel_id}", [channel_id, other]) if other else None

    async def watch_channel(self, channel_id: str) -> None:
        """Nothing to do: the connection receives every channel's events."""


def live_contacts(xmlstatus: str, aor: str) -> list[str]:
    """From ``sofia xmlstatus profile <p> reg``: the contact URIs of ``aor``, the newest per Call-ID
    (the most time left; ties, registered within the same second, all kept). ValueError on
    unreadable XML."""
    try:
        root = ET.fromstring(xmlstatus)  # noqa: S314 - from the configured FreeSWITCH, authenticated
    except ET.ParseError:
        raise ValueError(f"sofia xmlstatus answered with broken XML: {xmlstatus[:60]!r}") from None
    newest: dict[str, tuple[int, list[str]]] = {}
    for reg in root.findall("./registrations/registration"):
        if user_id(reg.findtext("user", "")) != aor:
            continue
        uri = sofia_contact_uri(reg.findtext("contact", ""))
        if not uri:
            continue
        left = re.search(r"expsecs\((\d+)\)", reg.findtext("status", ""), re.IGNORECASE)
        key = reg.findtext("call-id", "") or uri
        ttl = int(left.group(1)) if left else 0
        if key not in newest or ttl > newest[key][0]:
            newest[key] = (ttl, [uri])
        elif ttl == newest[key][0]:
            newest[key][1].append(uri)
    return [uri for _, uris in newest.values() for uri in uris]
