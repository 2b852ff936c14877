"""The push ledger: exactly one push per (call, device, kind), whichever daemon sends it.

A call taken over by another daemon (clustering) keeps its call id, so the ledger stops the
new daemon from pushing the same device again for the same reason. Single-node daemons use
it too: a call resumed after an ARI reconnect must not push twice.
"""

from __future__ import annotations

from typing import Protocol

import redis.asyncio as aioredis

from ari_push.redis_keys import Keys

LEDGER_TTL = 3600  # s: a call lasts minutes; a ledger entry older than an hour protects nothing


class PushLedger(Protocol):
    async def first(self, call_id: str, device_id: str, kind: str) -> bool:
        """True for the first sender of this (call, device, kind); False for every later one."""
        ...


class MemoryLedger:
    """The ledger of one process (the embedded store). Bounded: the oldest entries go first."""

    def __init__(self, limit: int = 100_000) -> None:
        self._seen: dict[tuple[str, str, str], None] = {}  # insertion-ordered
        self._limit = limit

    def first_now(self, call_id: str, device_id: str, kind: str) -> bool:
        key = (call_id, device_id, kind)
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > self._limit:
            for old in list(self._seen)[: self._limit // 2]:
                del self._seen[old]
        return True

    async def first(self, call_id: str, device_id: str, kind: str) -> bool:
        return self.first_now(call_id, device_id, kind)


class RedisLedger:
    """``<prefix>pushed:<call>:<device>:<kind>`` set NX with a TTL, shared by every daemon."""

    def __init__(self, client: aioredis.Redis, keys: Keys, ttl: int = LEDGER_TTL) -> None:
        self.redis = client
        self.keys = keys
        self.ttl = ttl

    async def first(self, call_id: str, device_id: str, kind: str) -> bool:
        try:
            return bool(await self.redis.set(self.keys.pushed(call_id, device_id, kind), "1", nx=True, ex=self.ttl))
        except (aioredis.RedisError, OSError):
            return True  # Redis down: better a duplicate push than a phone that never rings
