"""The PBX port: the few things the call flow asks of a PBX, and nothing else.

The flow (call_flow.py) is written against this protocol only; ``asterisk_pbx.AsteriskPbx``
implements it over ARI, an in-memory PBX implements it in the unit tests, and a FreeSWITCH
adapter over the Event Socket can implement it too. Every method raises ``PbxError`` when the
PBX refuses or does not answer; ``gone`` says the channel or object no longer exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ari_push.call_events import ChannelInfo


class PbxError(RuntimeError):
    def __init__(self, operation: str, message: str, gone: bool = False) -> None:
        super().__init__(f"{operation}: {message}")
        self.operation = operation
        self.gone = gone


@dataclass(frozen=True, slots=True)
class ContactDetails:
    """What one read of a registered contact tells beside its URI: the User-Agent it registered
    with ('' when none) and when it expires (Unix time; None when the PBX did not say)."""

    user_agent: str = ""
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class ContactSnapshot:
    """A registered contact as the PBX stored it, enough to put it back unchanged (its
    expiration, path, user agent...). ``fields`` are the PBX's own and opaque to the flow."""

    aor: str
    uri: str
    expires_at: float = 0.0  # Unix time; 0 when unknown
    fields: tuple[tuple[str, str], ...] = ()

    @property
    def transport(self) -> str:
        """``udp``, ``tcp``, ``tls``, ``ws``, ``wss`` (from the URI's transport parameter)."""
        for param in self.uri.split(";")[1:]:
            key, _, value = param.partition("=")
            if key.strip().lower() == "transport":
                return value.strip().lower()
        return "tls" if self.uri.lower().startswith("sips:") else "udp"


@dataclass(frozen=True, slots=True)
class LegRequest:
    """A call to one exact contact of the callee, on behalf of the waiting caller."""

    leg_id: str  # chosen by ari-push, so events of the leg can be routed before the PBX answers
    caller_channel: str
    endpoint: str  # the PBX endpoint (the device's, else the AOR) whose settings the leg uses
    contact_uri: str
    caller_name: str
    caller_number: str
    call_id: str  # the same id as in the push; sent as X-Ari-Push-Call-Id
    ring_timeout: float
    linked: bool = True  # the caller's channel is the leg's originator (False: it may be gone)


class PbxPort(Protocol):
    async def ring(self, channel_id: str) -> None:
        """Ringback to the caller (SIP 180)."""
        ...

    async def early_media(self, channel_id: str, moh_class: str) -> None:
        """183 Session Progress and music on hold while the phone wakes."""
        ...

    async def stop_early_media(self, channel_id: str) -> None: ...

    async def originate(self, leg: LegRequest) -> None:
        """Start ringing one contact. Its events come with ``leg.leg_id``; when it answers it
        enters ari-push's app (StasisStart with the arguments ``dialed,<caller channel>``)."""
        ...

    async def answer(self, channel_id: str) -> None: ...

    async def bridge(self, bridge_id: str, name: str, channel_ids: Sequence[str]) -> None:
        """Create a mixing bridge and put the channels in it."""
        ...

    async def destroy_bridge(self, bridge_id: str) -> None: ...

    async def hangup(self, channel_id: str, reason: str = "normal") -> None:
        """Hang up a channel. ``reason``: ``normal`` (Q.850 16), ``busy``, ``answered_elsewhere``
        (an unanswered leg is CANCELled with ``Reason: SIP;cause=200;text="Call completed
        elsewhere"``), ..."""
        ...

    async def continue_in_dialplan(self, channel_id: str, status: str, context: str = "") -> None:
        """Set PUSH_STATUS and let the caller's channel go on in the dialplan (the next
        priority, or ``context``,s,1)."""
        ...

    async def contacts(self, aor: str) -> list[str] | None:
        """The AOR's registered contact URIs; None when the PBX has no such AOR."""
        ...

    async def delete_contact(self, aor: str, contact_uri: str) -> ContactSnapshot | None:
        """Drop one registered contact, so that its next REGISTER is reported as new; returns
        what was dropped (None when it was not there)."""
        ...

    async def restore_contact(self, snapshot: ContactSnapshot) -> None:
        """Put a dropped contact back as it was (an awake phone that did not re-register)."""
        ...


class PbxSession(Protocol):
    """What the call manager needs to find its calls again after a reconnect."""

    async def system_id(self) -> str:
        """The PBX's own id (Asterisk's entity id): part of every call id."""
        ...

    async def channels(self) -> list[ChannelInfo]: ...

    async def exists(self, channel_id: str) -> bool:
        """Whether the channel is there now, asked of the PBX itself: a listing can lag behind
        (FreeSWITCH's ``show channels`` is a database table written after the events)."""
        ...

    async def app_channel_ids(self) -> set[str]:
        """Channels currently in ari-push's app."""
        ...

    async def bridge_of(self, channel_id: str) -> tuple[str, list[str]] | None:
        """The bridge a channel is in and its channels, or None."""
        ...

    async def watch_channel(self, channel_id: str) -> None:
        """Deliver this channel's events to ari-push (a bridge ari-push adopts)."""
        ...


class Pbx(PbxPort, PbxSession, Protocol):
    """A whole adapter: the call port plus the session operations."""
