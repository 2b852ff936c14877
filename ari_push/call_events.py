"""The typed events a call reacts to, made once at the edge from the PBX's own messages.

ARI JSON becomes one of these frozen dataclasses in ``from_ari`` (the Asterisk adapter's edge);
the call flow never sees a dict. Registrations and the signal gap come from ``wakeups``;
``Shutdown`` from the daemon's drain. Every field a handler needs is here and typed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ari_push.channels import ChannelRole, channel_age, role_of, stasis_args
from ari_push.wakeups import Gap, Registration


@dataclass(frozen=True, slots=True)
class ChannelInfo:
    """What ari-push reads of a channel: identity, state, caller and how it entered Stasis."""

    id: str
    state: str = ""
    caller_number: str = ""
    caller_name: str = ""
    age: float = 0.0  # seconds since the PBX created it
    app_name: str = ""  # the dialplan application it is in (Stasis, StasisBroadcast, AppDial2...)
    args: str = ""  # its Stasis arguments, comma-separated

    @property
    def role(self) -> ChannelRole:
        return role_of(self.state, self.app_name, self.args)


@dataclass(frozen=True, slots=True)
class StasisStart:
    """A channel entered ari-push's app: a new caller, or a leg ari-push originated that answered."""

    channel: ChannelInfo
    args: tuple[str, ...]
    pbx_id: str = ""

    @property
    def channel_id(self) -> str:
        return self.channel.id


@dataclass(frozen=True, slots=True)
class StasisEnd:
    channel_id: str


@dataclass(frozen=True, slots=True)
class ChannelStateChange:
    channel_id: str
    state: str


@dataclass(frozen=True, slots=True)
class ChannelHangupRequest:
    channel_id: str


@dataclass(frozen=True, slots=True)
class ChannelDestroyed:
    channel_id: str
    cause: int = 0
    cause_txt: str = ""


@dataclass(frozen=True, slots=True)
class ChannelLeftBridge:
    channel_id: str


@dataclass(frozen=True, slots=True)
class CallBroadcast:
    """StasisBroadcast offers a call to every daemon of the family (cluster claims)."""

    channel_id: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The daemon is stopping: a waiting call continues in the dialplan with SHUTDOWN."""


ChannelEvent = (StasisStart | StasisEnd | ChannelStateChange | ChannelHangupRequest | ChannelDestroyed
                | ChannelLeftBridge)
PbxEvent = ChannelEvent | CallBroadcast
CallEvent = ChannelEvent | Registration | Gap | Shutdown

#: events after which a channel is gone, or going
HANGUPS = (StasisEnd, ChannelHangupRequest, ChannelDestroyed)


def channel_info(raw: dict[str, Any]) -> ChannelInfo:
    caller = raw.get("caller") or {}
    plan = raw.get("dialplan") or {}
    return ChannelInfo(
        id=str(raw.get("id", "")),
        state=str(raw.get("state", "")),
        caller_number=str(caller.get("number", "")),
        caller_name=str(caller.get("name", "")),
        age=channel_age(raw),
        app_name=str(plan.get("app_name", "")),
        args=stasis_args(raw),
    )


# The ARI event types ``from_ari`` turns into events: the application's event filter
# (``AriClient``) asks Asterisk for these only. Measured on Asterisk 22: an answered call sends
# the app 48 events, 29 of them ChannelVarset; 12 are of these types.
ARI_EVENT_TYPES = ("StasisStart", "StasisEnd", "ChannelStateChange", "ChannelHangupRequest",
                   "ChannelDestroyed", "ChannelLeftBridge", "CallBroadcast")


def from_ari(raw: dict[str, Any]) -> PbxEvent | None:
    """One ARI websocket message -> a typed event, or None for the types ari-push ignores."""
    kind = raw.get("type")
    found = raw.get("channel")
    channel: dict[str, Any] = found if isinstance(found, dict) else {}
    cid = str(channel.get("id", ""))
    if not cid:
        return None
    if kind == "StasisStart":
        return StasisStart(channel_info(channel), tuple(str(a) for a in raw.get("args") or ()),
                           str(raw.get("asterisk_id", "")))
    if kind == "StasisEnd":
        return StasisEnd(cid)
    if kind == "ChannelStateChange":
        return ChannelStateChange(cid, str(channel.get("state", "")))
    if kind == "ChannelHangupRequest":
        return ChannelHangupRequest(cid)
    if kind == "ChannelDestroyed":
        try:
            cause = int(raw.get("cause") or 0)
        except (TypeError, ValueError):
            cause = 0
        return ChannelDestroyed(cid, cause, str(raw.get("cause_txt", "")))
    if kind == "ChannelLeftBridge":
        return ChannelLeftBridge(cid)
    if kind == "CallBroadcast":
        return CallBroadcast(cid)
    return None
