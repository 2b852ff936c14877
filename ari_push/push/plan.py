"""What a call pushes, decided in one store round trip: the push comes first on the critical path.

For a CALL push the flow needs three facts per device of the callee: its binding, whether this
(call, device, kind) was pushed before (the ledger, shared by every daemon: a taken-over call
must not push twice), and whether the device's rate limit allows it. With Redis all three come
from one Lua script (one round trip, ~0.2 ms on loopback), so the push request leaves right
after it; with the embedded store they are read in process.

Follow-ups (cancel, answered elsewhere, missed call) are not rate limited (a phone left ringing
is worse than one push too many) and are off the critical path: one pipelined round trip of
ledger entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis

from ari_push.bindings import MemoryStore, StoreUnavailable, from_json
from ari_push.model import Binding, PushKind
from ari_push.push.ledger import LEDGER_TTL, MemoryLedger
from ari_push.push.ratelimit import TAKE_FUNCTION, LocalRateLimiter
from ari_push.redis_keys import Keys
from ari_push.settings import PushSettings


@dataclass(frozen=True, slots=True)
class PlannedPush:
    """One device of the callee. ``first``: no daemon has sent this push of this call yet;
    ``allowed``: its rate limit lets it go (always True for follow-ups and repeats)."""

    binding: Binding
    first: bool = True
    allowed: bool = True


class PushPlanner(Protocol):
    async def call_push(self, aor: str, call_id: str) -> list[PlannedPush]:
        """The AOR's devices with their ledger and rate-limit verdicts for the CALL push.
        Raises StoreUnavailable when the store cannot be read."""
        ...

    async def follow_up(self, call_id: str, bindings: Sequence[Binding], kind: PushKind) -> list[PlannedPush]:
        """Ledger verdicts for a follow-up push of ``kind`` to ``bindings`` (never raises)."""
        ...


# KEYS[1] the AOR's bindings HASH. ARGV[1] "<prefix>pushed:<call id>:", ARGV[2] the kind, ARGV[3] the
# ledger TTL, ARGV[4] "<prefix>ratelimit:", ARGV[5] tokens per second (0: no limit), ARGV[6] burst.
# Returns a flat list: binding JSON, first (0/1), allowed (0/1) per device. The ledger and bucket
# keys are built here from the device ids (standalone Redis and Sentinel; Redis Cluster is not
# supported, docs/storage.md).
_CALL_PUSH = TAKE_FUNCTION + """
local raw = redis.call('HGETALL', KEYS[1])
local rate = tonumber(ARGV[5])
local out = {}
for i = 1, #raw, 2 do
  local dev = raw[i]
  local first = 0
  if redis.call('SET', ARGV[1] .. dev .. ':' .. ARGV[2], '1', 'NX', 'EX', tonumber(ARGV[3])) then
    first = 1
  end
  local allowed = 1
  if first == 1 and rate > 0 then
    allowed = take_token(ARGV[4] .. dev, rate, tonumber(ARGV[6]))
  end
  out[#out + 1] = raw[i + 1]
  out[#out + 1] = first
  out[#out + 1] = allowed
end
return out
"""


class RedisPushPlanner:
    def __init__(self, client: aioredis.Redis, keys: Keys, push: PushSettings, ledger_ttl: int = LEDGER_TTL) -> None:
        self.redis = client
        self.keys = keys
        self.rate = push.rate_per_minute / 60.0 if push.rate_per_minute > 0 else 0.0
        self.burst = push.burst
        self.ttl = ledger_ttl
        self._call_push = client.register_script(_CALL_PUSH)

    async def call_push(self, aor: str, call_id: str) -> list[PlannedPush]:
        ledger_prefix = self.keys.pushed(call_id, "", "")[:-1]  # "<prefix>pushed:<call id>:"
        bucket_prefix = self.keys.ratelimit("")
        try:
            flat = await self._call_push(
                keys=[self.keys.bindings(aor)],
                args=[ledger_prefix, PushKind.CALL.value, self.ttl, bucket_prefix, repr(self.rate), self.burst])
        except (aioredis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from None
        plans = [PlannedPush(from_json(flat[i]), bool(int(flat[i + 1])), bool(int(flat[i + 2])))
                 for i in range(0, len(flat), 3)]
        return sorted(plans, key=lambda p: p.binding.first_seen)

    async def follow_up(self, call_id: str, bindings: Sequence[Binding], kind: PushKind) -> list[PlannedPush]:
        if not bindings:
            return []
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for b in bindings:
                    pipe.set(self.keys.pushed(call_id, b.device_id, kind.value), "1", nx=True, ex=self.ttl)
                replies = await pipe.execute()
        except (aioredis.RedisError, OSError):
            replies = [True] * len(bindings)  # Redis down: a duplicate beats a phone left ringing
        return [PlannedPush(b, bool(r)) for b, r in zip(bindings, replies, strict=True)]


class MemoryPushPlanner:
    """The same decisions in process, for the embedded store (one daemon)."""

    def __init__(self, store: MemoryStore, push: PushSettings, ledger: MemoryLedger | None = None) -> None:
        self.store = store
        self.ledger = ledger or MemoryLedger()
        self.limiter = LocalRateLimiter(push.rate_per_minute, push.burst) if push.rate_per_minute > 0 else None

    async def call_push(self, aor: str, call_id: str) -> list[PlannedPush]:
        plans = []
        for b in await self.store.bindings_for(aor):
            first = self.ledger.first_now(call_id, b.device_id, PushKind.CALL.value)
            allowed = not first or self.limiter is None or self.limiter.try_acquire(b.device_id)
            plans.append(PlannedPush(b, first, allowed))
        return plans

    async def follow_up(self, call_id: str, bindings: Sequence[Binding], kind: PushKind) -> list[PlannedPush]:
        return [PlannedPush(b, self.ledger.first_now(call_id, b.device_id, kind.value)) for b in bindings]
