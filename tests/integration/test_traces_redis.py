"""The Redis trace store on a real redis-server: bounds (count, TTL, events per call, indexes),
one trace per call written by two nodes, queries, pub/sub updates, and an outage that drops
and counts writes without raising (trace_store.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from ari_push.trace_store import RedisTraceStore, TraceStart, TraceWrite
from ari_push.traces import TraceEvent
from rig.redis import RedisServer


@pytest.fixture
async def client(ensure_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(ensure_redis.url)
    yield c
    await c.aclose()


def prefix() -> str:
    return f"tr-{uuid.uuid4().hex[:8]}:"


def start(cid: str, aor: str = "1001", caller: str = "2000", at: float | None = None, node: str = "a") -> TraceWrite:
    return TraceWrite(cid, start=TraceStart(aor, caller, time.time() if at is None else at, node),
                      events=(TraceEvent(0.5, "call_start", None, {"node": node}),))


def push(cid: str, provider: str = "fcm", t: float = 3.0) -> TraceWrite:
    return TraceWrite(cid, events=(TraceEvent(t, "push", "dev1", {"provider": provider, "kind": "call",
                                                                  "outcome": "delivered", "latency_ms": 2.0}),))


async def written(store: RedisTraceStore, *writes: TraceWrite) -> None:
    for w in writes:
        store.submit(w)
    await store.flush()


async def test_round_trip_queries_and_the_in_flight_list(client: aioredis.Redis) -> None:
    store = RedisTraceStore(client, prefix())
    now = time.time()
    await written(store, start("c1", at=now - 3), push("c1", "apns"), start("c2", "1002", "2001", at=now - 2),
                  start("c3", caller="2001", at=now - 1), TraceWrite("c2", status="TIMEOUT", ended_at=now))
    c1 = await store.get("c1")
    assert c1 is not None and c1.aor == "1001" and c1.caller == "2000" and c1.node == "a" and c1.in_flight
    assert [e.kind for e in c1.events] == ["call_start", "push"] and c1.providers() == frozenset({"apns"})
    assert [t.call_id for t in await store.find(aor="1001")] == ["c3", "c1"]
    assert [t.call_id for t in await store.find(caller="2001")] == ["c3", "c2"]
    assert [t.call_id for t in await store.find(status="TIMEOUT")] == ["c2"]
    assert [t.call_id for t in await store.find(status="in_flight")] == ["c3", "c1"]
    assert [t.call_id for t in await store.find(provider="apns")] == ["c1"]
    assert [t.call_id for t in await store.find(limit=1)] == ["c3"]
    assert {t.call_id for t in await store.in_flight()} == {"c1", "c3"}
    assert await store.count() == 3 and await store.get("nope") is None
    c2 = await store.get("c2")
    assert c2 is not None and c2.status == "TIMEOUT" and c2.ended_at == pytest.approx(now)


async def test_a_second_node_appends_to_the_same_trace_and_owns_it(client: aioredis.Redis) -> None:
    store = RedisTraceStore(client, prefix())
    first_at = time.time() - 5
    await written(store, start("c1", at=first_at, node="a"), push("c1"))
    await written(store, start("c1", at=first_at + 0.01, node="b"), TraceWrite("c1", status="ANSWERED",
                                                                                ended_at=time.time()))
    (trace,) = await store.find(aor="1001")
    assert trace.node == "b" and trace.started_at == pytest.approx(first_at) and trace.status == "ANSWERED"
    assert [e.detail.get("node") for e in trace.events if e.kind == "call_start"] == ["a", "b"]
    assert await store.count() == 1


async def test_bounds_count_events_ttl_and_indexes(client: aioredis.Redis) -> None:
    p = prefix()
    store = RedisTraceStore(client, p, keep=600, max_calls=3, max_events=4, index_cap=2)
    now = time.time()
    await written(store, *(start(f"c{i}", at=now - 10 + i) for i in range(5)))
    assert await store.count() == 3 and await store.get("c0") is None and await store.get("c1") is None
    assert await client.exists(f"{p}trace:c0", f"{p}trace:c0:ev", f"{p}trace:c1") == 0  # deleted with them
    assert await client.zcard(f"{p}traces:aor:1001") == 2  # the AOR's index is capped too
    assert await client.zcard(f"{p}traces:live") == 3
    await written(store, TraceWrite("c4", events=tuple(TraceEvent(float(i), "note", None, {"text": "x"})
                                                       for i in range(10)), dropped=2))
    c4 = await store.get("c4")
    assert c4 is not None and len(c4.events) == 4 and c4.dropped == 7 + 2  # 11 events, 4 places, + 2
    for key in (f"{p}trace:c4", f"{p}trace:c4:ev", f"{p}traces:all", f"{p}traces:aor:1001",
                f"{p}traces:caller:2000"):
        assert 0 < await client.ttl(key) <= 600, key
    await written(store, push("c0"))  # events of a trace already evicted: not written
    assert await client.exists(f"{p}trace:c0", f"{p}trace:c0:ev") == 0


async def test_traces_older_than_keep_leave_the_indexes(client: aioredis.Redis) -> None:
    store = RedisTraceStore(client, prefix(), keep=60)
    now = time.time()
    await written(store, start("old", at=now - 120), start("new", at=now))
    assert [t.call_id for t in await store.find()] == ["new"]  # pruned from the index when "new" was added


async def test_updates_are_published_to_every_reader(client: aioredis.Redis) -> None:
    p = prefix()
    writer, reader = RedisTraceStore(client, p), RedisTraceStore(client, p)
    updates = reader.updates()
    got: asyncio.Task[Any] = asyncio.ensure_future(anext(updates))
    async def subscribed() -> bool:
        return bool((await client.pubsub_numsub(reader.channel))[0][1])
    from tests.conftest import wait_for

    await wait_for(subscribed, 5, "the reader subscribed")
    await written(writer, start("c1"), push("c1"))
    assert await asyncio.wait_for(got, 5) == "c1"
    await updates.aclose()


async def test_an_outage_holds_the_writes_until_redis_is_back_and_counts_only_what_overflows() -> None:
    server = RedisServer()
    server.start()
    client = aioredis.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
    counted: list[tuple[str, int]] = []
    store = RedisTraceStore(client, prefix(), on_dropped=lambda reason, n: counted.append((reason, n)), max_pending=3)
    try:
        await written(store, start("c1"))
        server.stop()
        started = time.monotonic()
        store.submit(start("c2", aor="1002"))  # a call that starts while Redis is down
        store.submit(push("c2"))  # never waits, whatever Redis does
        assert time.monotonic() - started < 0.05
        assert await store.flush() is False and counted == [] and store.held == 2  # kept, not lost
        store.submit(push("c1", t=1.0))  # the buffer's bound (3) reached
        store.submit(push("c1", t=2.0))
        assert counted == [("overflow", 1)] and store.dropped == 1
        assert await store.flush() is False and counted == [("overflow", 1)] and store.held == 3
        server.start()
        assert await store.flush() is True and store.held == 0 and store.dropped == 1
        c2 = await store.get("c2")  # the call of the outage has its trace afterwards
        assert c2 is not None and [e.kind for e in c2.events] == ["call_start", "push"] and c2.aor == "1002"
        assert [t.call_id for t in await store.find(aor="1002")] == ["c2"]
        c1 = await store.get("c1")
        assert c1 is not None and [e.t_ms for e in c1.events if e.kind == "push"] == [1.0]  # the one kept
    finally:
        await client.aclose()
        server.cleanup()


async def test_the_writer_task_retries_a_held_batch_by_itself_when_redis_returns() -> None:
    from tests.conftest import wait_for

    server = RedisServer()
    server.start()
    client = aioredis.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
    store = RedisTraceStore(client, prefix(), flush_delay=0.01, retry_cap=0.3)
    stop = asyncio.Event()
    task = asyncio.ensure_future(store.run(stop))
    try:
        server.stop()
        store.submit(start("c1"))
        store.submit(push("c1"))
        await wait_for(lambda: store.held == 2, 10, "the writes held while Redis is down")
        server.start()
        trace = await wait_for(lambda: store.get("c1"), 15, "the held writes written when Redis is back")
        assert [e.kind for e in trace.events] == ["call_start", "push"] and store.dropped == 0
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        stop.set()
        task.cancel()
        await client.aclose()
        server.cleanup()


async def test_a_call_whose_node_dies_reads_as_abandoned_until_another_node_takes_it(
        client: aioredis.Redis) -> None:
    from tests.conftest import wait_for

    p = prefix()
    a = RedisTraceStore(client, p, flush_delay=0.01, node="a", heartbeat=0.2, node_ttl=1.5)
    b = RedisTraceStore(client, p, flush_delay=0.01, node="b", heartbeat=0.2, node_ttl=1.5)
    reader = RedisTraceStore(client, p)  # as `ari-push trace` reads: no node of its own
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    task_a, task_b = asyncio.ensure_future(a.run(stop_a)), asyncio.ensure_future(b.run(stop_b))
    try:
        now = time.time()
        a.submit(start("c1", at=now - 2, node="a"))
        a.submit(start("c2", at=now - 1, node="a"))
        b.submit(start("c3", at=now, node="b"))

        async def ids(found: Any) -> set[str]:
            return {t.call_id for t in await found}

        await wait_for(lambda: _equal(ids(reader.in_flight()), {"c1", "c2", "c3"}), 10, "three calls in flight")
        assert await reader.find(status="abandoned") == []
        first = await client.zscore(a.nodes_key, "a")
        assert first is not None
        await wait_for(lambda: _later(client.zscore(a.nodes_key, "a"), first + 1500), 10,
                       "node a's heartbeat renewed past its first node_ttl")
        assert await ids(reader.in_flight()) == {"c1", "c2", "c3"}  # alive: still in flight
        task_a.cancel()  # node a dies: no clean stop, its heartbeat just stops
        died = time.time()
        await wait_for(lambda: _equal(ids(reader.find(status="abandoned")), {"c1", "c2"}), 10,
                       "node a's calls abandoned")
        c1 = await reader.get("c1")
        assert c1 is not None and c1.abandoned and not c1.in_flight and c1.status is None and c1.node == "a"
        assert c1.abandoned_at is not None and died - 1 <= c1.abandoned_at <= died + 1.5 + 0.5  # last beat + ttl
        assert [t.call_id for t in await reader.in_flight()] == ["c3"]
        assert [t.call_id for t in await reader.find(status="in_flight")] == ["c3"]
        assert [t.call_id for t in await reader.find(aor="1001")] == ["c3", "c2", "c1"]  # still found by AOR
        b.submit(start("c1", node="b"))  # b takes c1 over: the trace continues, in flight again
        await wait_for(lambda: _equal(ids(reader.in_flight()), {"c1", "c3"}), 10, "c1 in flight on node b")
        c1 = await reader.get("c1")
        assert c1 is not None and c1.node == "b" and c1.abandoned_at is None
        assert [e.detail["node"] for e in c1.events if e.kind == "call_start"] == ["a", "b"]
        b.submit(TraceWrite("c2", status="CANCELLED", ended_at=time.time()))  # an ended call is not abandoned
        await wait_for(lambda: _equal(ids(reader.find(status="CANCELLED")), {"c2"}), 10, "c2 ended")
        assert await reader.find(status="abandoned") == []
        stop_b.set()  # a clean stop marks b gone at once: a call it left unended reads abandoned
        await asyncio.wait_for(task_b, 5)
        assert {t.call_id for t in await reader.find(status="abandoned")} == {"c1", "c3"}
        assert await reader.in_flight() == []
    finally:
        stop_a.set()
        stop_b.set()
        task_a.cancel()
        task_b.cancel()


async def _equal(got: Any, want: set[str]) -> bool:
    return bool(await got == want)


async def _later(score: Any, than: float) -> bool:
    value = await score
    return value is not None and value > than


async def test_the_writer_task_batches_and_flushes_on_stop(client: aioredis.Redis) -> None:
    store = RedisTraceStore(client, prefix(), flush_delay=0.01)
    stop = asyncio.Event()
    task = asyncio.ensure_future(store.run(stop))
    store.submit(start("c1"))
    from tests.conftest import wait_for

    await wait_for(lambda: store.get("c1"), 5, "the writer wrote")
    store.submit(push("c1"))
    stop.set()
    await asyncio.wait_for(task, 5)
    trace = await store.get("c1")
    assert trace is not None and [e.kind for e in trace.events] == ["call_start", "push"]


async def test_the_least_privilege_acl_of_the_security_doc_allows_traces(tmp_path: Path) -> None:
    """The ACL line of docs/security.md lets the trace store write, read, publish and subscribe."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    line = next(x.strip() for x in doc.splitlines() if x.strip().startswith("ACL SETUSER ari-push "))
    server = RedisServer(workdir=tmp_path / "acl", password="admin-pw-0123456789")
    server.start()
    client = aioredis.Redis.from_url(server.url, username="ari-push", password="app-pw-0123456789")
    try:
        rules = [">app-pw-0123456789" if r == ">APP-PASSWORD" else r for r in line.split()[3:]]
        assert server.command("ACL", "SETUSER", "ari-push", *rules) == "OK"
        writer, reader = RedisTraceStore(client, "ari-push:", node="a"), RedisTraceStore(client, "ari-push:")
        updates = reader.updates()
        got: asyncio.Task[Any] = asyncio.ensure_future(anext(updates))
        while not (await client.pubsub_numsub(reader.channel))[0][1]:
            await asyncio.sleep(0.02)
        await written(writer, start("c1"), push("c1"))
        assert await asyncio.wait_for(got, 5) == "c1" and writer.dropped == 0
        trace = await reader.get("c1")
        assert trace is not None and [e.kind for e in trace.events] == ["call_start", "push"] and trace.in_flight
        assert await client.zscore("ari-push:traces:nodes", "a") is not None  # the writer's heartbeat allowed
        await updates.aclose()
    finally:
        await client.aclose()
        server.cleanup()
