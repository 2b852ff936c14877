"""Where call traces are kept: in process (embedded store) or in Redis (every daemon of a cluster).

Both take writes the same way, ``submit(TraceWrite)``, which is synchronous and never waits:
the in-process store applies it at once (a dict operation); the Redis store puts it in a bounded
buffer that its writer task (``run``, owned by the daemon's TaskGroup) sends ``FLUSH_DELAY``
later, a batch per round trip, one Lua call per call id, pipelined. Nothing on a call's path
awaits Redis for a trace, and a Redis outage never costs the call: a batch Redis did not take
stays in the buffer and goes out when Redis is back (retried with capped jittered backoff), so
the calls of the outage have their traces afterwards; only what the bounded buffer cannot hold
is dropped and counted (``ari_push_trace_writes_dropped{reason}``).

Owner liveness: the writer of each daemon (``node``) keeps ``<prefix>traces:nodes`` up to date,
its node scored with the Redis time until which it counts as alive (now + ``node_ttl``), every
``heartbeat`` s, the first time before its first write (the same timing as the cluster's heartbeat, docs/clustering.md;
the cluster's own ZSET names Stasis apps, which daemons of a lease share, so it cannot say which
daemon owns a call, and exist only in cluster modes). A reader marks a trace not ended whose
node's time is past as abandoned (``CallTrace.abandoned_at``); a node never seen beating is not
judged. A take-over names the new node and the trace is in flight again. A clean stop marks the
node gone at once (its calls were ended by the drain).

Bounds (docs/operations.md, "Call traces"): each trace lives ``traces.keep`` seconds after its
last write; at most ``traces.max_calls`` traces (the oldest go first, their keys deleted with
them); at most ``traces.max_events`` events per call (the rest are counted in ``dropped``); the
AOR and caller indexes hold at most ``INDEX_CAP`` calls each and expire with the traces.

Redis layout (``<prefix>`` is ``[redis] key_prefix``):

* ``<prefix>trace:<call id>``: HASH aor, caller, started_at, node, status, ended_at, dropped
* ``<prefix>trace:<call id>:ev``: LIST of event JSON, in the order written
* ``<prefix>traces:all`` / ``traces:live``: ZSET of call ids by started_at (all / not ended)
* ``<prefix>traces:aor:<aor>`` / ``traces:caller:<number>``: ZSET, the same, per AOR / caller
* ``<prefix>traces:nodes``: ZSET of node ids by the Redis time (ms) until which each is alive
* channel ``<prefix>traces:updates``: each changed call id, for live pages
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis

from ari_push.backoff import Backoff
from ari_push.traces import ABANDONED, IN_FLIGHT, CallTrace, TraceEvent, TraceFormatError

log = logging.getLogger("ari_push.traces")

INDEX_CAP = 1000  # calls kept in one AOR's or one caller's index
FLUSH_DELAY = 0.05  # s: a call's first events (start, ringback, push) go out together, after the push
MAX_PENDING = 20_000  # writes buffered while Redis is slow; more are dropped and counted
FIND_SCAN = 4  # find() with a status/provider filter reads up to limit * FIND_SCAN candidates


@dataclass(frozen=True, slots=True)
class TraceStart:
    aor: str
    caller: str
    started_at: float
    node: str


@dataclass(frozen=True, slots=True)
class TraceWrite:
    """One change to one call's trace: its opening, events, its end (any of them)."""

    call_id: str
    start: TraceStart | None = None
    events: tuple[TraceEvent, ...] = ()
    status: str | None = None
    ended_at: float | None = None
    dropped: int = 0  # events the recorder did not send (past traces.max_events)


Dropped = Callable[[str, int], None]  # (reason, how many writes)


def _matches(trace: CallTrace, status: str | None, provider: str | None) -> bool:
    if status == IN_FLIGHT:
        if not trace.in_flight:
            return False
    elif status == ABANDONED:
        if not trace.abandoned:
            return False
    elif status is not None and trace.status != status:
        return False
    return provider is None or provider in trace.providers()


# ---------------------------------------------------------------- in process


@dataclass
class _Rec:
    aor: str
    caller: str
    started_at: float
    node: str
    touched: float
    status: str | None = None
    ended_at: float | None = None
    events: list[TraceEvent] = field(default_factory=list)
    dropped: int = 0

    def trace(self, call_id: str) -> CallTrace:
        return CallTrace(call_id, self.aor, self.caller, self.started_at, self.node, self.status, self.ended_at,
                         tuple(sorted(self.events, key=lambda e: e.t_ms)), self.dropped)


class MemoryTraceStore:
    """Traces of this daemon's calls, in its own memory (the embedded store): the same bounds."""

    def __init__(self, keep: float = 86400.0, max_calls: int = 10_000, max_events: int = 200, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.keep = keep
        self.max_calls = max_calls
        self.max_events = max_events
        self._clock = clock
        self._recs: OrderedDict[str, _Rec] = OrderedDict()  # oldest first
        self._next_sweep = 0.0
        self._subscribers: set[asyncio.Queue[str]] = set()

    def submit(self, write: TraceWrite) -> None:
        now = self._clock()
        rec = self._recs.get(write.call_id)
        if write.start is not None:
            s = write.start
            if rec is None:
                rec = self._recs[write.call_id] = _Rec(s.aor, s.caller, s.started_at, s.node, now)
            else:
                rec.node = s.node
        if rec is None:
            return  # events of a trace already gone (evicted): nothing to add them to
        rec.touched = now
        for event in write.events:
            if len(rec.events) < self.max_events:
                rec.events.append(event)
            else:
                rec.dropped += 1
        rec.dropped += write.dropped
        if write.status is not None:
            rec.status, rec.ended_at = write.status, write.ended_at
        self._prune(now)
        for queue in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(write.call_id)

    def _prune(self, now: float, sweep: bool = False) -> None:
        while len(self._recs) > self.max_calls:
            self._recs.popitem(last=False)
        if not sweep and now < self._next_sweep:
            return  # the expiry sweep reads every trace: at most every few seconds on the write path
        self._next_sweep = now + min(10.0, self.keep / 10)
        stale = [cid for cid, rec in self._recs.items() if rec.touched < now - self.keep]
        for cid in stale:
            del self._recs[cid]

    async def get(self, call_id: str) -> CallTrace | None:
        self._prune(self._clock(), sweep=True)
        rec = self._recs.get(call_id)
        return rec.trace(call_id) if rec is not None else None

    async def find(self, *, aor: str | None = None, caller: str | None = None, status: str | None = None,
                   provider: str | None = None, limit: int = 50) -> list[CallTrace]:
        self._prune(self._clock(), sweep=True)
        out: list[CallTrace] = []
        recs = sorted(self._recs.items(), key=lambda item: item[1].started_at, reverse=True)
        for cid, rec in recs:
            if len(out) >= limit:
                break
            if (aor is not None and rec.aor != aor) or (caller is not None and rec.caller != caller):
                continue
            trace = rec.trace(cid)
            if _matches(trace, status, provider):
                out.append(trace)
        return out

    async def in_flight(self) -> list[CallTrace]:
        return await self.find(status=IN_FLIGHT, limit=self.max_calls)

    async def updates(self) -> AsyncIterator[str]:
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=1000)
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

    async def count(self) -> int:
        self._prune(self._clock(), sweep=True)
        return len(self._recs)

    async def run(self, stop: asyncio.Event) -> None:
        """Nothing to write out; kept so both stores run the same way."""
        await stop.wait()


# ---------------------------------------------------------------- Redis

# ARGV: 1 prefix, 2 call id, 3 now, 4 keep (s), 5 max calls, 6 max events, 7 index cap,
# 8 aor, 9 caller, 10 started_at, 11 node ("" when no start), 12 status, 13 ended_at ("" when
# not ended), 14 events dropped by the recorder, 15.. event JSON. Returns 1. Keys are built
# here from the prefix (as push/plan.py: standalone Redis and Sentinel; Redis Cluster is not
# supported, docs/storage.md).
_WRITE = """
local p, id, now, keep = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local maxc, maxe, icap = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local hk = p .. 'trace:' .. id
local ek = hk .. ':ev'
local all, live = p .. 'traces:all', p .. 'traces:live'
local function index(key, score)
  redis.call('ZADD', key, score, id)
  local n = redis.call('ZCARD', key)
  if n > icap then redis.call('ZREMRANGEBYRANK', key, 0, n - icap - 1) end
  redis.call('EXPIRE', key, keep)
end
if ARGV[11] ~= '' then
  if redis.call('HSETNX', hk, 'started_at', ARGV[10]) == 1 then
    redis.call('HSET', hk, 'aor', ARGV[8], 'caller', ARGV[9])
    local started = tonumber(ARGV[10])
    redis.call('ZADD', all, started, id)
    redis.call('ZADD', live, started, id)
    redis.call('ZREMRANGEBYSCORE', all, '-inf', now - keep)
    redis.call('ZREMRANGEBYSCORE', live, '-inf', now - keep)
    local n = redis.call('ZCARD', all)
    if n > maxc then
      local old = redis.call('ZRANGE', all, 0, n - maxc - 1)
      for _, o in ipairs(old) do
        redis.call('DEL', p .. 'trace:' .. o, p .. 'trace:' .. o .. ':ev')
        redis.call('ZREM', live, o)
      end
      redis.call('ZREMRANGEBYRANK', all, 0, n - maxc - 1)
    end
    redis.call('EXPIRE', all, keep)
    redis.call('EXPIRE', live, keep)
    if ARGV[8] ~= '' then index(p .. 'traces:aor:' .. ARGV[8], started) end
    if ARGV[9] ~= '' then index(p .. 'traces:caller:' .. ARGV[9], started) end
  end
  redis.call('HSET', hk, 'node', ARGV[11])
elseif redis.call('EXISTS', hk) == 0 then
  return 0
end
if ARGV[14] ~= '0' then redis.call('HINCRBY', hk, 'dropped', tonumber(ARGV[14])) end
if #ARGV >= 15 then
  local len = redis.call('LLEN', ek)
  local room = maxe - len
  local n = #ARGV - 14
  local last = 14 + math.min(n, math.max(room, 0))
  if last >= 15 then redis.call('RPUSH', ek, unpack(ARGV, 15, last)) end
  if n > room then redis.call('HINCRBY', hk, 'dropped', n - math.max(room, 0)) end
  redis.call('EXPIRE', ek, keep)
end
if ARGV[12] ~= '' then
  redis.call('HSET', hk, 'status', ARGV[12], 'ended_at', ARGV[13])
  redis.call('ZREM', live, id)
end
redis.call('EXPIRE', hk, keep)
return 1
"""

# The writer's heartbeat: its node alive until Redis' now + ttl; nodes gone for ``keep`` leave.
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) / 1000))
return now
"""


class RedisTraceStore:
    """Traces in Redis, shared by every daemon of a cluster: one trace per call id, whichever
    daemon writes to it (a take-over appends to the same trace and names the new node)."""

    def __init__(self, client: aioredis.Redis, prefix: str, keep: float = 86400.0, max_calls: int = 10_000,
                 max_events: int = 200, *, on_dropped: Dropped = lambda _reason, _n: None,
                 flush_delay: float = FLUSH_DELAY, max_pending: int = MAX_PENDING, index_cap: int = INDEX_CAP,
                 node: str = "", heartbeat: float = 1.0, node_ttl: float = 3.0, retry_cap: float = 5.0) -> None:
        self.redis = client
        self.prefix = prefix
        self.keep = keep
        self.max_calls = max_calls
        self.max_events = max_events
        self.on_dropped = on_dropped
        self.flush_delay = flush_delay
        self.max_pending = max_pending
        self.index_cap = index_cap
        self.dropped = 0  # writes lost (buffer full, refused, or still held at stop), also reported to on_dropped
        self.node = node  # this daemon's node id, kept alive in traces:nodes by the writer ("": a reader only)
        self.heartbeat = heartbeat
        self.node_ttl = node_ttl
        self.held = 0  # writes of the current Redis outage kept in the buffer (0 when Redis answers)
        self._pending: deque[TraceWrite] = deque()
        self._wake = asyncio.Event()
        self._write = client.register_script(_WRITE)
        self._beat = client.register_script(_BEAT)
        self._retry = Backoff(base=min(0.5, retry_cap), cap=retry_cap)
        self._next_beat = 0.0
        self.channel = f"{prefix}traces:updates"
        self.nodes_key = f"{prefix}traces:nodes"
        self._publish_refused = False

    # ------------------------------------------------------------ writing

    def submit(self, write: TraceWrite) -> None:
        """Never waits: the write goes out with the next batch, or is dropped and counted."""
        if len(self._pending) >= self.max_pending:
            self._drop("overflow", 1)
            return
        self._pending.append(write)
        self._wake.set()

    def _drop(self, reason: str, n: int) -> None:
        self.dropped += n
        self.on_dropped(reason, n)

    async def run(self, stop: asyncio.Event) -> None:
        """The writer: owned by the daemon's TaskGroup. Flushes each batch, beats every
        ``heartbeat`` s, waits (capped, jittered) while Redis does not answer; on stop, flushes
        what is left (at most 2 s), counts what could not go out, and marks its node gone."""
        while not stop.is_set():
            waiter = asyncio.ensure_future(self._wake.wait())
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait((waiter, stopper), return_when=asyncio.FIRST_COMPLETED,
                                   timeout=self.heartbeat if self.node else None)
            finally:
                waiter.cancel()
                stopper.cancel()
            if stop.is_set():
                break
            if self._wake.is_set():
                await asyncio.sleep(self.flush_delay)
            if not await self.flush():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._retry.next()):
                        await stop.wait()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                if await self.flush() and self.node:
                    with contextlib.suppress(aioredis.RedisError, OSError):  # gone from now on, not at its ttl
                        await self._beat(keys=[self.nodes_key], args=[self.node, 0, int(self.keep * 1000)])
        if self._pending:
            log.warning("%d trace writes not written at stop (Redis did not answer)", len(self._pending))
            self._drop("stopped", len(self._pending))
            self._pending.clear()

    async def flush(self) -> bool:
        """Send every buffered write (and the heartbeat when due): one pipelined round trip.
        Never raises; False when Redis did not answer, the writes then stay buffered."""
        self._wake.clear()
        beat = bool(self.node) and time.monotonic() >= self._next_beat  # the first goes with the first writes
        if not self._pending and not beat:
            return True
        batch = list(self._pending)
        self._pending.clear()
        merged = _merge(batch)
        now = time.time()
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                if beat:  # before the writes: a trace never names a node never seen alive
                    await self._beat(keys=[self.nodes_key], client=pipe,
                                     args=[self.node, int(self.node_ttl * 1000), int(self.keep * 1000)])
                for w in merged:
                    await self._write(args=self._args(w, now), client=pipe)  # queued: one round trip
                for call_id in dict.fromkeys(w.call_id for w in merged):
                    pipe.publish(self.channel, call_id)
                replies = await pipe.execute(raise_on_error=False)
        except (aioredis.RedisError, OSError) as exc:
            self._hold(batch, exc)
            return False
        except asyncio.CancelledError:
            self._pending.extendleft(reversed(batch))  # counted by run() if it cannot write them
            raise
        if beat:
            self._next_beat = time.monotonic() + self.heartbeat
            if isinstance(replies[0], Exception):
                log.debug("trace heartbeat refused: %s", replies[0])
            replies = replies[1:]
        self._retry.reset()
        if self.held:
            log.warning("redis answers again: %d held trace writes written", self.held)
            self.held = 0
        failed = [r for r in replies[:len(merged)] if isinstance(r, Exception)]
        if failed:  # a script refused (e.g. an ACL without the trace keys): those writes are lost
            self._drop("redis", len(failed))
            log.debug("trace writes refused (%d): %s", len(failed), failed[0])
        refused = next((r for r in replies[len(merged):] if isinstance(r, Exception)), None)
        if refused is not None and not self._publish_refused:
            self._publish_refused = True  # an ACL without the updates channel: traces are kept, live pages poll
            log.warning("trace updates cannot be published on %s (%s); traces are still written", self.channel,
                        refused)
        return True

    def _hold(self, batch: list[TraceWrite], exc: BaseException) -> None:
        """Redis did not answer: the batch goes back to the buffer's front, in order; what the
        bound cannot hold (the newest writes) is dropped and counted."""
        if not self.held:
            log.warning("trace writes held while redis does not answer (%s: %s)", type(exc).__name__, exc)
        self._pending.extendleft(reversed(batch))
        self.held = len(self._pending)
        self._wake.set()  # the writer tries again after its backoff
        over = len(self._pending) - self.max_pending
        if over > 0:
            for _ in range(over):
                self._pending.pop()
            self._drop("overflow", over)

    def _args(self, w: TraceWrite, now: float) -> list[Any]:
        s = w.start
        return [self.prefix, w.call_id, repr(now), int(self.keep), self.max_calls, self.max_events, self.index_cap,
                s.aor if s else "", s.caller if s else "", repr(s.started_at) if s else "", s.node if s else "",
                w.status or "", repr(w.ended_at) if w.ended_at is not None else "", w.dropped,
                *(json.dumps(e.to_json(), separators=(",", ":")) for e in w.events)]

    # ------------------------------------------------------------ reading

    def _key(self, call_id: str) -> str:
        return f"{self.prefix}trace:{call_id}"

    async def _load(self, call_ids: Iterable[str]) -> list[CallTrace]:
        ids = list(call_ids)
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.zrange(self.nodes_key, 0, -1, withscores=True)
            for cid in ids:
                pipe.hgetall(self._key(cid))
                pipe.lrange(self._key(cid) + ":ev", 0, -1)
            replies = await pipe.execute()
        secs, micros = replies[0]
        now_ms = int(secs) * 1000 + int(micros) // 1000
        alive_until = {(n.decode() if isinstance(n, bytes) else str(n)): float(score) for n, score in replies[1]}
        out = []
        for i, cid in enumerate(ids):
            trace = _from_redis(cid, replies[2 + 2 * i], replies[3 + 2 * i])
            if trace is None:
                continue
            until = alive_until.get(trace.node)
            if trace.status is None and until is not None and until <= now_ms:
                # its node is gone: abandoned since its last heartbeat lapsed (a node never seen
                # beating, e.g. a reader-only store's, is not judged)
                trace = replace(trace, abandoned_at=until / 1000)
            out.append(trace)
        return out

    async def get(self, call_id: str) -> CallTrace | None:
        found = await self._load([call_id])
        return found[0] if found else None

    async def find(self, *, aor: str | None = None, caller: str | None = None, status: str | None = None,
                   provider: str | None = None, limit: int = 50) -> list[CallTrace]:
        if aor is not None:
            key = f"{self.prefix}traces:aor:{aor}"
        elif caller is not None:
            key = f"{self.prefix}traces:caller:{caller}"
        elif status in (IN_FLIGHT, ABANDONED):
            key = f"{self.prefix}traces:live"
        else:
            key = f"{self.prefix}traces:all"
        filtered = status is not None or provider is not None or (aor is not None and caller is not None)
        scan = limit * FIND_SCAN if filtered else limit
        ids = [i.decode() if isinstance(i, bytes) else str(i)
               for i in await self.redis.zrevrange(key, 0, max(0, scan - 1))]
        out = []
        for trace in await self._load(ids):
            if caller is not None and trace.caller != caller:
                continue
            if _matches(trace, status, provider):
                out.append(trace)
        return out[:limit]

    async def in_flight(self) -> list[CallTrace]:
        ids = [i.decode() if isinstance(i, bytes) else str(i)
               for i in await self.redis.zrevrange(f"{self.prefix}traces:live", 0, -1)]
        return [t for t in await self._load(ids) if t.in_flight]

    async def updates(self) -> AsyncIterator[str]:
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(self.channel)
        try:
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    data = message.get("data")
                    yield data.decode() if isinstance(data, bytes) else str(data)
        finally:
            # No UNSUBSCRIBE: with Redis gone it retries (through Sentinel, for long) and holds the
            # daemon's stop. Closing the connection unsubscribes it just as well, and waits for nothing.
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def count(self) -> int:
        return int(await self.redis.zcard(f"{self.prefix}traces:all"))


def _merge(batch: list[TraceWrite]) -> list[TraceWrite]:
    """Consecutive writes to one call become one (one Lua call per call per batch)."""
    out: dict[str, TraceWrite] = {}
    order: list[str] = []
    for w in batch:
        prev = out.get(w.call_id)
        if prev is None:
            out[w.call_id] = w
            order.append(w.call_id)
            continue
        out[w.call_id] = replace(prev, start=prev.start or w.start, events=prev.events + w.events,
                                 status=w.status if w.status is not None else prev.status,
                                 ended_at=w.ended_at if w.ended_at is not None else prev.ended_at,
                                 dropped=prev.dropped + w.dropped)
    return [out[cid] for cid in order]


def _text(raw: dict[Any, Any], name: str) -> str:
    value = raw.get(name.encode(), raw.get(name))
    return value.decode() if isinstance(value, bytes) else str(value or "")


def _from_redis(call_id: str, meta: dict[Any, Any], events: list[Any]) -> CallTrace | None:
    if not meta or not _text(meta, "started_at"):
        return None
    try:
        status = _text(meta, "status") or None
        ended = _text(meta, "ended_at")
        evs = tuple(sorted((TraceEvent.from_json(json.loads(e)) for e in events), key=lambda e: e.t_ms))
        return CallTrace(call_id, _text(meta, "aor"), _text(meta, "caller"), float(_text(meta, "started_at")),
                         _text(meta, "node"), status, float(ended) if ended else None, evs,
                         int(_text(meta, "dropped") or 0))
    except (ValueError, TraceFormatError) as exc:
        log.warning("trace %s is unreadable: %s", call_id, exc)
        return None
