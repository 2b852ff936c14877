"""Riding through a Redis blink: a bounded read-through cache of bindings and a write-back queue.

``BindingCache`` holds, per AOR, the bindings this daemon has read from the store or captured
itself recently (at most ``max_aors`` AORs, least recently used dropped first). It is used only
when the store cannot be read: ``CachedStore.bindings_for`` and ``CachedPushPlanner.call_push``
answer from it then, so a call placed while Redis restarts is pushed at once.

How stale it may be, and why that is safe:
- An entry is served for at most ``max_age`` seconds after it was read or captured
  (``[redis] cache_max_age``, 15 minutes by default); older ones are treated as absent.
- Every successful read replaces the AOR's entry (a read with no bindings drops it), every
  capture and every forget through this daemon updates it, and a binding is only replaced by
  one at least as new (``last_seen``). What the cache can miss is a change made by another
  process (the tokens CLI, another daemon) since the last read: a device forgotten there may
  get one more call push, a token refreshed elsewhere is pushed with the previous token. Both
  are harmless for one call: a dead token is refused by the push service (and dropped once the
  store is back), and a device that registers wakes the call whatever token was pushed. A
  device only another daemon has seen is missing: a call planned from the cache does not push
  it (it still rings if awake). The cache never invents a device, and the next read from the
  store replaces the entry.

``CachedStore`` also queues the bindings captured while the store is down (at most
``max_pending``, newest kept) and writes them when it answers again (``flush``, called by the
Redis monitor every second): a registration captured during an outage is not lost (Asterisk
reports an unchanged re-REGISTER with no event, so the phone would not send it again).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ari_push.bindings import BindingStore, StoreUnavailable
from ari_push.model import Binding, PushKind
from ari_push.push.ledger import MemoryLedger
from ari_push.push.plan import PlannedPush, PushPlanner

log = logging.getLogger("ari_push.binding_cache")

MAX_AGE = 900.0
MAX_AORS = 20_000
MAX_PENDING = 10_000


@dataclass(frozen=True, slots=True)
class CachedEntry:
    bindings: tuple[Binding, ...]
    at: float  # when this daemon last read or captured them (its clock)


class BindingCache:
    def __init__(self, max_age: float = MAX_AGE, max_aors: int = MAX_AORS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age = max_age
        self.max_aors = max_aors
        self.clock = clock
        self._entries: OrderedDict[str, CachedEntry] = OrderedDict()
        self.served = 0  # calls answered from the cache

    def __len__(self) -> int:
        return len(self._entries)

    def read(self, aor: str, bindings: Sequence[Binding]) -> None:
        """The store answered for ``aor``: its answer replaces what was cached."""
        if not bindings:
            self._entries.pop(aor, None)
            return
        self._set(aor, tuple(sorted(bindings, key=lambda b: b.first_seen)))

    def captured(self, binding: Binding) -> None:
        """This daemon captured (or stored) ``binding``: merge it in, the newest ``last_seen`` wins."""
        entry = self._entries.get(binding.aor)
        devices = {b.device_id: b for b in (entry.bindings if entry else ())}
        old = devices.get(binding.device_id)
        if old is not None and old.last_seen > binding.last_seen:
            return
        devices[binding.device_id] = binding
        self._set(binding.aor, tuple(sorted(devices.values(), key=lambda b: b.first_seen)))

    def forget(self, aor: str, device_id: str | None = None) -> None:
        entry = self._entries.get(aor)
        if entry is None:
            return
        if device_id is None:
            del self._entries[aor]
            return
        left = tuple(b for b in entry.bindings if b.device_id != device_id)
        if left:
            self._entries[aor] = CachedEntry(left, entry.at)
        else:
            del self._entries[aor]

    def get(self, aor: str) -> CachedEntry | None:
        """The AOR's bindings if read or captured within ``max_age``, else None."""
        entry = self._entries.get(aor)
        if entry is None:
            return None
        if self.clock() - entry.at > self.max_age:
            del self._entries[aor]
            return None
        self._entries.move_to_end(aor)  # recently used
        return entry

    def age(self, entry: CachedEntry) -> float:
        return self.clock() - entry.at

    def _set(self, aor: str, bindings: tuple[Binding, ...]) -> None:
        self._entries[aor] = CachedEntry(bindings, self.clock())
        self._entries.move_to_end(aor)
        while len(self._entries) > self.max_aors:
            self._entries.popitem(last=False)


class CachedStore:
    """A BindingStore in front of the real one: read-through cache, write-back queue."""

    def __init__(self, inner: BindingStore, cache: BindingCache, max_pending: int = MAX_PENDING,
                 max_devices: int = 0) -> None:
        self.inner = inner
        self.cache = cache
        self.max_pending = max_pending
        self.max_devices = max_devices  # the per-AOR cap the queued bindings are written back under
        self.pending: OrderedDict[tuple[str, str], Binding] = OrderedDict()
        self.written_back = 0
        self.dropped = 0

    async def upsert(self, binding: Binding) -> Binding:
        self.cache.captured(binding)
        try:
            stored = await self.inner.upsert(binding)
        except StoreUnavailable:
            self._queue(binding)
            raise
        self.cache.captured(stored)
        return stored

    async def upsert_capped(self, binding: Binding, max_devices: int) -> tuple[Binding, list[str]]:
        self.cache.captured(binding)
        try:
            stored, evicted = await self.inner.upsert_capped(binding, max_devices)
        except StoreUnavailable:
            self._queue(binding)
            raise
        self.cache.captured(stored)
        for device_id in evicted:
            self.cache.forget(binding.aor, device_id)
        return stored, evicted

    def _queue(self, binding: Binding) -> None:
        key = (binding.aor, binding.device_id)
        old = self.pending.get(key)
        if old is None or old.last_seen <= binding.last_seen:
            self.pending[key] = binding
            self.pending.move_to_end(key)
        while len(self.pending) > self.max_pending:
            self.pending.popitem(last=False)
            self.dropped += 1

    async def flush(self) -> int:
        """Write the queued bindings (oldest first); stop at the first failure. Returns how many
        were written. ``upsert`` is order-tolerant, so a binding written meanwhile by another
        daemon with a newer ``last_seen`` is kept."""
        written = 0
        while self.pending:
            key, binding = next(iter(self.pending.items()))
            stored, evicted = await self.inner.upsert_capped(binding, self.max_devices)  # StoreUnavailable: later
            for device_id in evicted:
                self.cache.forget(binding.aor, device_id)
            if self.pending.get(key) is binding:
                del self.pending[key]
            self.cache.captured(stored)
            written += 1
        if written:
            self.written_back += written
            log.info("wrote %d binding(s) captured while the store was down", written)
        return written

    async def bindings_for(self, aor: str) -> list[Binding]:
        try:
            found = await self.inner.bindings_for(aor)
        except StoreUnavailable:
            entry = self.cache.get(aor)
            if entry is None:
                raise
            return list(entry.bindings)
        self.cache.read(aor, found)
        return found

    async def aors(self) -> list[str]:
        return await self.inner.aors()

    async def forget(self, aor: str, device_id: str | None = None) -> int:
        self.cache.forget(aor, device_id)
        for key in [k for k in self.pending if k[0] == aor and (device_id is None or k[1] == device_id)]:
            del self.pending[key]
        return await self.inner.forget(aor, device_id)

    async def forget_if_stale(self, aor: str, device_id: str, dead_since: float) -> bool:
        gone = await self.inner.forget_if_stale(aor, device_id, dead_since)
        if gone:
            self.cache.forget(aor, device_id)
        return gone

    async def sweep(self, older_than: float) -> int:
        return await self.inner.sweep(older_than)


class CachedPushPlanner:
    """The call's push plan from the store, or from the cache when the store cannot be read.

    From the cache, the ledger is this daemon's own (one push per call, device and kind within
    this daemon; another daemon cannot take the call over while the store is down) and the rate
    limit is not applied (a call pushed once during an outage is worth more than the limit)."""

    def __init__(self, inner: PushPlanner, cache: BindingCache, ledger: MemoryLedger | None = None) -> None:
        self.inner = inner
        self.cache = cache
        self.ledger = ledger or MemoryLedger()

    async def call_push(self, aor: str, call_id: str) -> list[PlannedPush]:
        try:
            plans = await self.inner.call_push(aor, call_id)
        except StoreUnavailable as exc:
            entry = self.cache.get(aor)
            if entry is None:
                raise
            self.cache.served += 1
            log.warning("call %s: the store cannot be read (%s); pushing the %d device(s) of %s this daemon "
                        "read or captured %.0fs ago", call_id, exc, len(entry.bindings), aor, self.cache.age(entry))
            return [PlannedPush(b, self.ledger.first_now(call_id, b.device_id, PushKind.CALL.value))
                    for b in entry.bindings]
        self.cache.read(aor, [p.binding for p in plans])
        for p in plans:  # a push the store's ledger counted is not sent again from the cache
            self.ledger.first_now(call_id, p.binding.device_id, PushKind.CALL.value)
        return plans

    async def follow_up(self, call_id: str, bindings: Sequence[Binding], kind: PushKind) -> list[PlannedPush]:
        return await self.inner.follow_up(call_id, bindings, kind)
