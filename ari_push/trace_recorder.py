"""Feeds call traces from the call flow and the dispatcher, adding nothing to a call's path.

``Tracer`` (one per daemon) opens a ``TraceRecorder`` per call; the flow calls its synchronous
``add(kind, device, **detail)`` at its existing points, which stamps ``t_ms`` from the monotonic
clock and hands the event to the store's ``submit`` (no await, no I/O: trace_store.py). Pushes
are seen by the dispatcher, which reports each final result with its latency and retries to
``Tracer.on_push``; the tracer finds the call by the push's call id. A call's recorder stays
reachable ``LATE_WINDOW`` seconds after the call ended, for its cancel and missed-call pushes
and its end notice.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import redis.asyncio as aioredis

from ari_push.metrics import Metrics
from ari_push.model import Binding, PushMessage, PushResult, mask_token
from ari_push.settings import ClusterSettings, TraceSettings
from ari_push.trace_store import MemoryTraceStore, RedisTraceStore, TraceStart, TraceWrite
from ari_push.traces import TRACE_KINDS, DetailValue, TraceEvent

#: kinds always kept, even past ``traces.max_events`` (how the call ended)
ESSENTIAL = frozenset({"call_start", "bridge", "hangup", "status"})
#: events kept for the essential kinds past the cap
RESERVE = 8
#: s after its end a call's recorder still takes events (follow-up pushes, end notices)
LATE_WINDOW = 300.0
#: calls ended recently whose recorders are kept for late events (oldest go first)
MAX_LATE = 2000


class TraceSink(Protocol):
    def submit(self, write: TraceWrite) -> None: ...


class TraceRecorder:
    """One call's events. Synchronous and cheap: an event is a frozen object handed to the sink."""

    def __init__(self, call_id: str, sink: TraceSink | None, started: float, max_events: int = 200,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.call_id = call_id
        self.sink = sink
        self.started = started  # monotonic time of t_ms = 0
        self.max_events = max_events
        self._clock = clock
        self.count = 0
        self.closed_at: float | None = None

    @property
    def enabled(self) -> bool:
        return self.sink is not None

    def now_ms(self) -> float:
        """Milliseconds since the INVITE, to the microsecond (as stored and shown everywhere)."""
        return round((self._clock() - self.started) * 1000.0, 3)

    def add(self, kind: str, device: str | None = None, /, **detail: DetailValue) -> None:
        if self.sink is None:
            return
        if kind not in TRACE_KINDS:
            raise ValueError(f"unknown trace event kind {kind!r}")
        self.count += 1
        if self.count > self.max_events - RESERVE and kind not in ESSENTIAL:
            self.sink.submit(TraceWrite(self.call_id, dropped=1))
            return
        self.sink.submit(TraceWrite(self.call_id, events=(TraceEvent(self.now_ms(), kind, device or None, detail),)))

    def close(self, status: str) -> None:
        """The final status: the trace leaves the in-flight list (later pushes still append)."""
        if self.sink is None or self.closed_at is not None:
            return
        self.closed_at = self._clock()
        event = TraceEvent(self.now_ms(), "status", None, {"status": status})
        self.sink.submit(TraceWrite(self.call_id, events=(event,), status=status, ended_at=time.time()))


#: a recorder that records nothing (traces off, or a flow built without a tracer)
NO_TRACE = TraceRecorder("", None, 0.0)


class Tracer:
    """One per daemon: opens each call's recorder and routes the dispatcher's push results to it."""

    def __init__(self, sink: TraceSink | None, node: str, max_events: int = 200,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sink = sink
        self.node = node
        self.max_events = max_events
        self._clock = clock
        self._by_push_id: OrderedDict[str, TraceRecorder] = OrderedDict()  # push call id -> recorder

    def open(self, call_id: str, push_call_id: str, aor: str, caller: str, age: float = 0.0,
             resumed: bool = False) -> TraceRecorder:
        """A call starts (``resumed``: taken over or resumed after a restart: the same trace)."""
        if self.sink is None:
            return NO_TRACE
        now = self._clock()
        rec = TraceRecorder(call_id, self.sink, now - age, self.max_events, self._clock)
        self.sink.submit(TraceWrite(call_id, start=TraceStart(aor, caller, time.time() - age, self.node)))
        rec.add("call_start", node=self.node, resumed=resumed, push_call_id=push_call_id)
        self._by_push_id[push_call_id] = rec
        self._prune(now)
        return rec

    def _prune(self, now: float) -> None:
        while self._by_push_id:
            rec = next(iter(self._by_push_id.values()))
            late = rec.closed_at is not None and now - rec.closed_at > LATE_WINDOW
            if not late and len(self._by_push_id) <= MAX_LATE + 10_000:
                break
            self._by_push_id.popitem(last=False)

    def recorder_for(self, push_call_id: str) -> TraceRecorder | None:
        return self._by_push_id.get(push_call_id)

    def on_push(self, binding: Binding, message: PushMessage, provider: str, result: PushResult,
                latency_ms: float, attempts: int) -> None:
        """The dispatcher's report of one push's final result (see PushDispatcher.observer)."""
        rec = self._by_push_id.get(message.call_id)
        if rec is None:
            return
        rec.add("push", binding.device_id, provider=provider, kind=message.kind.value, outcome=result.outcome.value,
                latency_ms=round(latency_ms, 3), retries=max(0, attempts - 1),
                token=mask_token(binding.push.provider, binding.push.token),
                status=result.status, reason=result.reason[:200] or None)


def build_traces(settings: TraceSettings, client: aioredis.Redis | None, prefix: str, node: str,
                 metrics: Metrics, cluster: ClusterSettings | None = None,
                 ) -> tuple[MemoryTraceStore | RedisTraceStore | None, Tracer]:
    """The trace store the daemon's settings name (Redis when there is one, else in process;
    None when ``[traces] enabled = false``) and the tracer that feeds it. The Redis store keeps
    ``node`` alive with the cluster's ``heartbeat`` and ``node_ttl``: past it, this daemon's
    calls not ended read as abandoned."""
    if not settings.enabled:
        return None, Tracer(None, node)
    store: MemoryTraceStore | RedisTraceStore
    if client is None:
        store = MemoryTraceStore(settings.keep, settings.max_calls, settings.max_events)
    else:
        liveness = cluster or ClusterSettings()
        store = RedisTraceStore(client, prefix, settings.keep, settings.max_calls, settings.max_events,
                                on_dropped=lambda reason, n: metrics.trace_writes_dropped.labels(reason).inc(n),
                                node=node, heartbeat=liveness.heartbeat, node_ttl=liveness.node_ttl)
    return store, Tracer(store, node, settings.max_events)
