"""Call traces: what happened to one call, as a timeline relative to the caller's INVITE.

The shapes every part shares (docs/operations.md, "Call traces"): a ``TraceEvent`` is one step
(the call taken over, the ringback, one push with its provider, outcome and latency, one
re-REGISTER, one leg and its fate, the bridge, a hang-up, the final status); a ``CallTrace`` is
one call's events with what identifies it (AOR, caller, start, the node that owns it now, the
final status). A ``TraceStore`` reads them back (the CLI, the web console); the stores and the
recorder that feeds them from the call flow live in trace_store.py and trace_recorder.py.

Everything here is frozen and does no I/O; ``to_json``/``from_json`` are exact inverses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

#: every kind of event a trace holds
TRACE_KINDS = frozenset({"call_start", "ringback", "push", "register", "leg", "bridge", "hangup", "status", "note"})

#: the ``status`` filter value of ``TraceStore.find`` selecting calls not ended (owner alive)
IN_FLIGHT = "in_flight"
#: the ``status`` filter value selecting calls not ended whose owning daemon is gone
ABANDONED = "abandoned"

DetailValue = str | int | float | bool | None


class TraceFormatError(ValueError):
    """A stored or received trace is not in the shape ``CallTrace.from_json`` reads."""


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One step of a call. ``t_ms``: milliseconds since the caller's INVITE reached the daemon's
    PBX (the caller channel's creation, which StasisStart and the FreeSWITCH take-over carry as
    the channel's age); ``device``: a binding's device id when the step is about one device.

    ``detail`` by kind: push: provider, kind (call/cancel/missed-call...), outcome, latency_ms,
    retries, token (masked), reason; register: uri_change "new"|"same"; leg: fate
    ("originated"|"ringing"|"answered"|"refused"|"replaced"|"cancelled"|"failed"), cause;
    hangup: side "caller"|"callee", cause; status: status (the PUSH_STATUS value); call_start:
    node, resumed; note: text."""

    t_ms: float
    kind: str
    device: str | None = None
    detail: Mapping[str, DetailValue] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"t_ms": round(self.t_ms, 3), "kind": self.kind, "device": self.device, "detail": dict(self.detail)}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> TraceEvent:
        if not isinstance(data, Mapping):
            raise TraceFormatError(f"an event must be an object, not {type(data).__name__}")
        t_ms, kind, device, detail = data.get("t_ms"), data.get("kind"), data.get("device"), data.get("detail", {})
        if isinstance(t_ms, bool) or not isinstance(t_ms, (int, float)):
            raise TraceFormatError("event t_ms must be a number")
        if not isinstance(kind, str) or kind not in TRACE_KINDS:
            raise TraceFormatError(f"unknown event kind {str(kind)[:40]!r}")
        if device is not None and not isinstance(device, str):
            raise TraceFormatError("event device must be a string or null")
        if not isinstance(detail, Mapping) or not all(
                isinstance(k, str) and (v is None or isinstance(v, (str, int, float, bool)))
                for k, v in detail.items()):
            raise TraceFormatError("event detail must map names to strings, numbers, booleans or null")
        return cls(float(t_ms), kind, device, dict(detail))


@dataclass(frozen=True)
class CallTrace:
    """One call's timeline. ``call_id``: the caller channel's id (Asterisk) or uuid
    (FreeSWITCH), as everywhere in the daemon; ``started_at``: the epoch time of ``t_ms`` = 0;
    ``node``: the daemon that owns the call now (a take-over changes it; the trace stays one);
    ``status``: the final PUSH_STATUS, None while the call is in flight. ``events`` are ordered
    by ``t_ms``. ``dropped``: events not kept because the call had ``traces.max_events``.
    ``abandoned_at``: for a call not ended, the epoch time its node was deemed gone (its
    heartbeat in the store lapsed, trace_store.py) with no other node taking the call over;
    set by the store on read, None while the owner is alive."""

    call_id: str
    aor: str
    caller: str
    started_at: float
    node: str
    status: str | None
    ended_at: float | None
    events: tuple[TraceEvent, ...]
    dropped: int = 0
    abandoned_at: float | None = None

    @property
    def in_flight(self) -> bool:
        """Not ended, and its owning daemon alive."""
        return self.status is None and self.abandoned_at is None

    @property
    def abandoned(self) -> bool:
        """Not ended, and its owning daemon gone with no take-over."""
        return self.status is None and self.abandoned_at is not None

    def providers(self) -> frozenset[str]:
        """The providers this call pushed through."""
        return frozenset(str(e.detail["provider"]) for e in self.events
                         if e.kind == "push" and e.detail.get("provider"))

    def to_json(self) -> dict[str, object]:
        return {
            "call_id": self.call_id, "aor": self.aor, "caller": self.caller, "started_at": self.started_at,
            "node": self.node, "status": self.status, "ended_at": self.ended_at, "in_flight": self.in_flight,
            "abandoned": self.abandoned, "abandoned_at": self.abandoned_at,
            "providers": sorted(self.providers()), "dropped": self.dropped,
            "events": [e.to_json() for e in self.events],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> CallTrace:
        """The inverse of ``to_json`` (derived keys, ``in_flight``, ``abandoned`` and ``providers``,
        are ignored); raises TraceFormatError on anything else."""
        if not isinstance(data, Mapping):
            raise TraceFormatError(f"a trace must be an object, not {type(data).__name__}")

        def text(name: str) -> str:
            value = data.get(name)
            if not isinstance(value, str):
                raise TraceFormatError(f"trace {name} must be a string")
            return value

        def number(name: str, optional: bool = False) -> float | None:
            value = data.get(name)
            if value is None and optional:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TraceFormatError(f"trace {name} must be a number")
            return float(value)

        status = data.get("status")
        if status is not None and not isinstance(status, str):
            raise TraceFormatError("trace status must be a string or null")
        events = data.get("events", [])
        if not isinstance(events, list):
            raise TraceFormatError("trace events must be a list")
        dropped = data.get("dropped", 0)
        if isinstance(dropped, bool) or not isinstance(dropped, int):
            raise TraceFormatError("trace dropped must be an integer")
        started = number("started_at")
        assert started is not None
        return cls(call_id=text("call_id"), aor=text("aor"), caller=text("caller"), started_at=started,
                   node=text("node"), status=status, ended_at=number("ended_at", optional=True),
                   events=tuple(sorted((TraceEvent.from_json(e) for e in events), key=lambda e: e.t_ms)),
                   dropped=dropped, abandoned_at=number("abandoned_at", optional=True))


class TraceStore(Protocol):
    """Reads traces back. The Redis store sees every daemon's calls; the in-process one, its own."""

    async def get(self, call_id: str) -> CallTrace | None: ...

    async def find(self, *, aor: str | None = None, caller: str | None = None, status: str | None = None,
                   provider: str | None = None, limit: int = 50) -> list[CallTrace]:
        """Newest first; ``status=IN_FLIGHT`` ("in_flight") selects the calls not ended whose
        daemon is alive, ``status=ABANDONED`` ("abandoned") those whose daemon is gone."""
        ...

    async def in_flight(self) -> list[CallTrace]:
        """The calls not ended whose daemon is alive (abandoned ones are not in flight)."""
        ...

    def updates(self) -> AsyncIterator[str]:
        """Call ids as their trace changes (cluster-wide with Redis: pub/sub), for live pages."""
        ...

    async def count(self) -> int: ...
