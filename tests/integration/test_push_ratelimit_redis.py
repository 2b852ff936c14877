"""The Redis-backed push rate limit on a real redis-server: one bucket per device shared by
every daemon, expiring keys, and a bounded fall-back to local buckets while Redis is down."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from collections.abc import Iterator

import pytest

from ari_push.model import PushOutcome
from ari_push.push.dispatch import PushDispatcher
from ari_push.push.ratelimit import RedisRateLimiter
from ari_push.service import make_redis
from ari_push.settings import RedisSettings
from rig.redis import RedisServer
from tests.conftest import wait_for
from tests.fakes.builders import binding, message
from tests.unit.push.test_push_ratelimit import Provider, no_dead


@pytest.fixture
def server() -> Iterator[RedisServer]:
    s = RedisServer(appendonly=False)
    s.start()
    yield s
    s.cleanup()


def prefix() -> str:
    return f"rl-{uuid.uuid4().hex[:8]}:"


async def test_daemons_share_one_bucket_per_device(server: RedisServer) -> None:
    p = prefix()
    a_client, b_client = make_redis(RedisSettings(url=server.url)), make_redis(RedisSettings(url=server.url))
    try:
        a = RedisRateLimiter(a_client, p, rate_per_minute=600, burst=3)  # a token every 0.1 s
        b = RedisRateLimiter(b_client, p, rate_per_minute=600, burst=3)
        assert [await a.acquire("dev"), await a.acquire("dev"), await b.acquire("dev")] == [True] * 3
        assert not await b.acquire("dev") and not await a.acquire("dev")
        assert await b.acquire("other-dev")  # per device
        ttl = await a_client.pttl(a.key("dev"))
        assert 0 < ttl <= 300 + 1000 + 50  # gone once the bucket is full again (+1 s margin)
        # the shared bucket refills (a token every 0.1 s), for both daemons
        await wait_for(lambda: b.acquire("dev"), 10, "a token back in the shared bucket", interval=0.05)
        assert not a._degraded and not b._degraded
    finally:
        await a_client.aclose()
        await b_client.aclose()


async def test_two_dispatchers_flooded_push_burst_in_total(server: RedisServer) -> None:
    p = prefix()
    clients = [make_redis(RedisSettings(url=server.url)) for _ in range(2)]
    try:
        providers = [Provider(), Provider()]
        dispatchers = [PushDispatcher([prov], no_dead, rate_limiter=RedisRateLimiter(c, p, 6, 2))
                       for prov, c in zip(providers, clients, strict=True)]
        phone = binding("fcm", "token-phone")
        results = [await dispatchers[i % 2].send(phone, message(call_id=f"c{i}")) for i in range(10)]
        assert sum(r.outcome is PushOutcome.DELIVERED for r in results) == 2
        assert sum(len(prov.sent) for prov in providers) == 2
        assert {r.reason for r in results if r.outcome is PushOutcome.SKIPPED} == {"rate limited"}
    finally:
        for c in clients:
            await c.aclose()


async def test_redis_down_falls_back_to_local_buckets(
        server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ari_push.push.ratelimit")
    client = make_redis(RedisSettings(url=server.url, socket_timeout=1.0))
    try:
        lim = RedisRateLimiter(client, prefix(), rate_per_minute=6, burst=2, timeout=0.25)
        assert await lim.acquire("dev")  # shared bucket: one token left there
        server.stop()
        async with asyncio.timeout(10):  # a generous guard; speed is for the benchmarks
            decisions = [await lim.acquire("dev") for _ in range(3)]
        assert decisions == [True, True, False]  # the local bucket limits on its own
        warnings = [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
        assert len(warnings) == 1  # once per outage
        server.start()

        async def shared_again() -> bool:
            await lim.acquire("another-dev")
            return not lim._degraded

        await wait_for(shared_again, 15, "the limiter back on Redis", interval=0.05)
        assert any("shared through Redis again" in r.getMessage() for r in caplog.records)
        assert await lim.acquire("dev2") and await client.exists(lim.key("dev2")) == 1  # in Redis again
    finally:
        await client.aclose()


async def test_a_hung_redis_delays_a_push_by_at_most_the_limiter_timeout(server: RedisServer) -> None:
    client = make_redis(RedisSettings(url=server.url, socket_timeout=30.0))
    assert server.proc is not None
    try:
        lim = RedisRateLimiter(client, prefix(), rate_per_minute=6, burst=2, timeout=0.25)
        assert await lim.acquire("dev")
        os.kill(server.proc.pid, signal.SIGSTOP)  # half-open: the socket stays, no answer comes
        try:
            started = time.monotonic()
            assert await lim.acquire("dev")  # local fall-back
            took = time.monotonic() - started
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        # bounded by the limiter's 0.25 s timeout, not the 30 s socket timeout (a generous guard)
        assert took < 10, f"a hung Redis held the push for {took:.2f}s"
        assert lim._degraded
    finally:
        await client.aclose()
