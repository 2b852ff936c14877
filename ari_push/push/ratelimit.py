"""Per-device push rate limit: a flood of calls to one extension must not become a push storm.

A token bucket per device id: ``burst`` pushes at once, then one every ``60 / rate_per_minute``
seconds. ``LocalRateLimiter`` keeps the buckets in process (one daemon, or the embedded store);
``RedisRateLimiter`` keeps them in Redis so that every daemon sharing that Redis spends from the
same bucket (a Lua script on the server's clock, so the daemons' clocks do not matter). When
Redis does not answer within ``timeout`` the Redis limiter falls back to its own local buckets:
a Redis outage must neither delay a call's push by seconds nor lift the limit.

The call flow takes the token of a CALL push in the same Redis round trip that reads the
callee's bindings (push/plan.py, same bucket, same Lua function) and hands the verdict to the
dispatcher; ``acquire`` serves pushes made outside a call. The dispatcher applies the limit to
CALL pushes only (docs/security.md, "push spam"): the
follow-ups of a call that was pushed (cancel, answered-elsewhere, missed-call) always go out,
since a phone left ringing after the caller hung up is worse than one push too many; the
follow-ups of a call whose push was limited are skipped, since the phone never rang.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

import redis.asyncio as aioredis

from ari_push.redis_keys import Keys
from ari_push.settings import PushSettings

log = logging.getLogger(__name__)


class RateLimiter(Protocol):
    async def acquire(self, key: str) -> bool:
        """Take one push from ``key``'s bucket: True if allowed, False if over the limit."""
        ...


class LocalRateLimiter:
    """Token buckets in this process. ``clock`` is monotonic seconds (injectable for tests).

    Memory stays bounded: a bucket that has refilled completely is the same as no bucket, so
    such buckets are dropped whenever the table grows past ``prune_at`` entries."""

    def __init__(self, rate_per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 prune_at: int = 10_000) -> None:
        if rate_per_minute <= 0 or burst < 1:
            raise ValueError("rate_per_minute must be > 0 and burst >= 1")
        self.rate = rate_per_minute / 60.0  # tokens per second
        self.burst = float(burst)
        self._clock = clock
        self._prune_at = prune_at
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def try_acquire(self, key: str) -> bool:
        now = self._clock()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._prune_at:
            self._prune(now)
        return allowed

    async def acquire(self, key: str) -> bool:
        return self.try_acquire(key)

    def tokens(self, key: str) -> float:
        """Pushes ``key`` could send right now (for tests and admin output)."""
        tokens, at = self._buckets.get(key, (self.burst, self._clock()))
        return min(self.burst, tokens + max(0.0, self._clock() - at) * self.rate)

    def _prune(self, now: float) -> None:
        refill = self.burst / self.rate
        for key in [k for k, (_, at) in self._buckets.items() if now - at >= refill]:
            del self._buckets[key]
        if len(self._buckets) > self._prune_at:  # all active: drop the oldest half
            for key in list(self._buckets)[: len(self._buckets) // 2]:
                del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


# One token bucket, as a Lua function shared with the call's push plan (push/plan.py), so both
# spend from the same bucket in the same way: key = HASH t (last update) / v (tokens), rate in
# tokens per second. The server's TIME: daemons on different hosts share one clock.
TAKE_FUNCTION = """
local function take_token(key, rate, burst)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local state = redis.call('HMGET', key, 't', 'v')
  local tokens = burst
  if state[1] then
    tokens = math.min(burst, tonumber(state[2]) + math.max(0, now - tonumber(state[1])) * rate)
  end
  local allowed = 0
  if tokens >= 1 then
    tokens = tokens - 1
    allowed = 1
  end
  redis.call('HSET', key, 't', string.format('%.6f', now), 'v', string.format('%.6f', tokens))
  redis.call('PEXPIRE', key, math.ceil((burst - tokens) / rate * 1000) + 1000)
  return allowed
end
"""

# KEYS[1] the bucket; ARGV[1] tokens per second; ARGV[2] burst. Returns 1 (allowed) or 0.
_TAKE = TAKE_FUNCTION + "return take_token(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))\n"


class RedisRateLimiter:
    """Buckets shared by every daemon on one Redis: ``<prefix>ratelimit:<device id>`` (a HASH
    that expires once the bucket is full again). Falls back to a local bucket per key when
    Redis fails or is slower than ``timeout`` seconds; logs once per outage."""

    def __init__(self, client: aioredis.Redis, key_prefix: str, rate_per_minute: float, burst: int, *,
                 timeout: float = 0.25, fallback: LocalRateLimiter | None = None) -> None:
        self.redis = client
        self.keys = Keys(key_prefix)
        self.rate = rate_per_minute / 60.0
        self.burst = burst
        self.timeout = timeout
        self.fallback = fallback or LocalRateLimiter(rate_per_minute, burst)
        self._take = client.register_script(_TAKE)
        self._degraded = False

    def key(self, device_id: str) -> str:
        return self.keys.ratelimit(device_id)

    async def acquire(self, key: str) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                allowed = await self._take(keys=[self.key(key)], args=[repr(self.rate), self.burst])
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            if not self._degraded:
                self._degraded = True
                log.warning("push rate limit: Redis unavailable (%s); limiting per daemon until it is back",
                            type(exc).__name__)
            return self.fallback.try_acquire(key)
        if self._degraded:
            self._degraded = False
            log.info("push rate limit: shared through Redis again")
        return bool(allowed == 1)


def build_rate_limiter(settings: PushSettings, redis: aioredis.Redis | None = None,
                       key_prefix: str = "ari-push:") -> RateLimiter | None:
    """The limiter ``[push]`` asks for: none when ``rate_per_minute`` is 0, shared through Redis
    when the daemon has a Redis client, else in process. The daemon passes the result to
    ``PushDispatcher(..., rate_limiter=...)``."""
    if settings.rate_per_minute <= 0:
        return None
    if redis is not None:
        return RedisRateLimiter(redis, key_prefix, settings.rate_per_minute, settings.burst)
    return LocalRateLimiter(settings.rate_per_minute, settings.burst)
