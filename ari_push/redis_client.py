"""The Redis client pieces ``service.make_redis`` builds a Sentinel client from.

redis-py's Sentinel pool asks the sentinels for the master only when it opens a connection.
After a manual ``SENTINEL FAILOVER``, the old master stays a master until Sentinel demotes it at
its next 10-second INFO poll. Pooled connections kept writing there for ~10 s, and Sentinel then
threw those writes away. A pattern subscription stayed there too and missed every message
published on the new master (both measured: tests/integration/test_redis_ha.py). The pool here
asks again at most every ``recheck`` seconds, whenever a command needs a connection. When the
master has changed, it drops every connection (a command in flight fails and its retry goes to
the new master; a pub/sub connection re-subscribes there), and it hands out only connections to
the master the sentinels name now.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


class FollowMasterPool(SentinelConnectionPool):
    """A Sentinel master pool that re-reads the master's address at most every ``recheck``
    seconds (on demand, when a command needs a connection) and reconnects a connection that
    still points at an older master before handing it out."""

    recheck = 1.0

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self._checked = float("-inf")

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if self.is_master and now - self._checked >= self.recheck:
            self._checked = now
            before = self.master_address
            # no sentinel answers, or no master: the connect below says so
            with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
                await self.get_master_address()  # type: ignore[no-untyped-call]
            if before is not None and self.master_address != before:
                # Connections in use point at the old master too: a command in flight fails and
                # its retry goes to the new master; a pub/sub connection re-subscribes there.
                await self.disconnect(inuse_connections=True)
        conn = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        if self.is_master and self.master_address is not None and (conn.host, conn.port) != tuple(
                self.master_address):
            try:  # a connection that was in use when the master changed
                await conn.disconnect()
                await conn.connect()
            except BaseException:
                await self.release(conn)
                raise
        return conn


class SentinelRedis(aioredis.Redis):
    """The master client of a Sentinel set-up; closing it also closes the sentinel connections."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        if manager is not None:
            await manager.aclose()
