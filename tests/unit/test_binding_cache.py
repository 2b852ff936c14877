"""The binding cache and write-back queue (binding_cache.py): a Redis blink loses neither a call's
push nor a registration. The store that fails is the daemon's own RedisStore / RedisPushPlanner
talking to a port where nothing listens (what a restarting Redis looks like to the client)."""

from __future__ import annotations

import dataclasses

import pytest
import redis.asyncio as aioredis

from ari_push.binding_cache import BindingCache, CachedPushPlanner, CachedStore
from ari_push.bindings import MemoryStore, RedisStore, StoreUnavailable
from ari_push.model import Binding
from ari_push.push.plan import MemoryPushPlanner, RedisPushPlanner
from ari_push.redis_keys import Keys
from ari_push.service import make_redis
from ari_push.settings import PushSettings, RedisSettings
from rig.redis import free_port
from tests.fakes.builders import binding


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def seen(b: Binding, at: float, contact_uri: str) -> Binding:
    return dataclasses.replace(b, last_seen=at, contact_uri=contact_uri)


@pytest.fixture
def dead_redis() -> aioredis.Redis:
    """The daemon's own Redis client (make_redis), pointed at a port where nothing listens."""
    return make_redis(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.5))


def test_cache_serves_within_max_age_only() -> None:
    clock = Clock()
    cache = BindingCache(max_age=60, clock=clock)
    cache.read("alice", [binding("fcm", "tok-a")])
    clock.now += 59
    entry = cache.get("alice")
    assert entry is not None and [b.push.token for b in entry.bindings] == ["tok-a"]
    clock.now += 2
    assert cache.get("alice") is None
    assert len(cache) == 0


def test_cache_newest_registration_wins_and_an_empty_read_drops_the_aor() -> None:
    cache = BindingCache()
    old = binding("fcm", "tok-old")
    cache.captured(seen(old, 10.0, "sip:alice@192.0.2.10:5070"))
    cache.captured(seen(old, 5.0, "sip:alice@192.0.2.10:5080"))  # an older event arriving late changes nothing
    entry = cache.get("alice")
    assert entry is not None and [b.contact_uri for b in entry.bindings] == ["sip:alice@192.0.2.10:5070"]
    cache.read("alice", [])  # the store knows no device of alice any more
    assert cache.get("alice") is None


def test_cache_forget_and_lru_bound() -> None:
    cache = BindingCache(max_aors=2)
    cache.read("alice", [binding("fcm", "a", aor="alice"), binding("apns", "b" * 64, aor="alice")])
    cache.read("bob", [binding("fcm", "c", aor="bob")])
    device = binding("fcm", "a", aor="alice").device_id
    cache.forget("alice", device)
    entry = cache.get("alice")
    assert entry is not None and [b.push.provider for b in entry.bindings] == ["apns"]
    cache.read("carol", [binding("fcm", "d", aor="carol")])  # over the bound: the least recently used goes
    assert cache.get("bob") is None and cache.get("carol") is not None
    cache.forget("alice")
    assert cache.get("alice") is None


async def test_store_down_serves_reads_from_cache_and_writes_captures_back(dead_redis: aioredis.Redis) -> None:
    cache = BindingCache()
    store = CachedStore(RedisStore(dead_redis, Keys("t:"), 86400), cache)
    b = binding("fcm", "tok-a")
    with pytest.raises(StoreUnavailable):
        await store.upsert(b)  # the caller (capture) logs it; the binding is kept
    assert list(store.pending.values()) == [b]
    assert await store.bindings_for("alice") == [b]  # served from what was captured
    with pytest.raises(StoreUnavailable):
        await store.bindings_for("nobody")  # nothing cached: the failure is not hidden
    with pytest.raises(StoreUnavailable):
        await store.flush()
    assert store.pending  # still kept for the next try
    await dead_redis.aclose()
    # the store is back (here: the embedded store stands in for a Redis that answers again)
    memory = MemoryStore()
    store.inner = memory
    assert await store.flush() == 1
    assert await memory.bindings_for("alice") == [b] and not store.pending


async def test_capped_captures_are_kept_while_down_and_written_back_under_the_cap(
        dead_redis: aioredis.Redis) -> None:
    """Capture writes through ``upsert_capped`` (the per-AOR device cap): the same write-back."""
    cache = BindingCache()
    store = CachedStore(RedisStore(dead_redis, Keys("t:"), 86400), cache, max_devices=1)
    old, new = binding("fcm", "tok-old"), binding("fcm", "tok-new")
    for b in (old, new):
        with pytest.raises(StoreUnavailable):
            await store.upsert_capped(b, 1)
    assert len(store.pending) == 2
    await dead_redis.aclose()
    memory = MemoryStore()
    store.inner = memory
    assert await store.flush() == 2
    kept = await memory.bindings_for("alice")
    assert len(kept) == 1  # written back under the cap: the AOR keeps one device


async def test_forget_drops_the_kept_capture_and_the_cached_binding() -> None:
    cache = BindingCache()
    store = CachedStore(MemoryStore(), cache)
    b = binding("fcm", "tok-a")
    await store.upsert(b)
    assert cache.get("alice") is not None
    assert await store.forget("alice", b.device_id) == 1
    assert cache.get("alice") is None


async def test_planner_pushes_from_cache_when_redis_is_down_once_per_call(dead_redis: aioredis.Redis) -> None:
    cache = BindingCache()
    planner = CachedPushPlanner(RedisPushPlanner(dead_redis, Keys("t:"), PushSettings()), cache)
    with pytest.raises(StoreUnavailable):
        await planner.call_push("alice", "call-1")  # nothing cached: the flow retries the store
    cache.captured(binding("fcm", "tok-a"))
    plans = await planner.call_push("alice", "call-1")
    assert [(p.binding.push.token, p.first, p.allowed) for p in plans] == [("tok-a", True, True)]
    again = await planner.call_push("alice", "call-1")  # the same call asks again: no second push
    assert [p.first for p in again] == [False]
    assert cache.served == 2
    await dead_redis.aclose()


async def test_planner_refreshes_the_cache_from_every_read() -> None:
    memory = MemoryStore()
    cache = BindingCache()
    planner = CachedPushPlanner(MemoryPushPlanner(memory, PushSettings()), cache)
    await memory.upsert(binding("fcm", "tok-a"))
    plans = await planner.call_push("alice", "call-1")
    assert [p.first for p in plans] == [True]
    entry = cache.get("alice")
    assert entry is not None and [b.push.token for b in entry.bindings] == ["tok-a"]
    await memory.forget("alice")  # forgotten elsewhere: the next read drops it from the cache too
    assert await planner.call_push("alice", "call-2") == []
    assert cache.get("alice") is None
