"""What call traces cost: Redis memory for N stored traces, in-process memory, and the CPU one
call's recording takes on the daemon's side. Not part of the tests.

    .venv/bin/python bench/trace_memory.py [--calls 10000]

Traces are built the way the daemon builds them (trace_recorder.Tracer, the same event details
as call_flow.py and the dispatcher write), in the mix a busy PBX sees: 70 % answered after a
push and a re-REGISTER (10 events), 20 % timed out (call, cancel and missed-call pushes; 8
events), 10 % with two devices (14 events). They are written through RedisTraceStore (the Lua
script, pipelined) to a private redis-server; memory is ``INFO memory`` used_memory before and
after and ``MEMORY USAGE`` of the keys. docs/operations.md, "Call traces", has the results.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import sys
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import redis.asyncio as aioredis  # noqa: E402

from ari_push.trace_recorder import Tracer  # noqa: E402
from ari_push.trace_store import MemoryTraceStore, RedisTraceStore, TraceWrite  # noqa: E402
from rig.redis import RedisServer  # noqa: E402

PREFIX = "ari-push:"


class Collect:
    """A sink that keeps the writes (to replay them into each store)."""

    def __init__(self) -> None:
        self.writes: list[TraceWrite] = []

    def submit(self, write: TraceWrite) -> None:
        self.writes.append(write)


def hexid(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


def one_call(tracer: Tracer, rng: random.Random, i: int, clock: list[float]) -> None:
    """The events of one call, as the daemon records them."""
    call_id = f"{1_733_100_000 + i // 10}.{i}"
    aor = str(1000 + rng.randrange(1000))
    caller = f"+3361{rng.randrange(3000):07d}"
    clock[0] = 0.0
    rec = tracer.open(call_id, str(uuid.UUID(int=rng.getrandbits(128))), aor, caller, age=0.0018)
    kind = rng.random()
    devices = [hexid(rng, 20) for _ in range(2 if kind > 0.9 else 1)]

    def at(ms: float) -> None:
        clock[0] = ms / 1000.0

    def push(dev: str, what: str, ms: float) -> None:
        at(ms)
        rec.add("push", dev, provider="fcm", kind=what, outcome="delivered", latency_ms=round(rng.uniform(2, 40), 3),
                retries=0, token=f"{hexid(rng, 4)}…(163)", status=200, reason=None)

    for dev in devices:
        push(dev, "call", 4.1)
    at(6.0)
    rec.add("ringback", None, early_media=False, ok=True)
    if kind < 0.7 or kind > 0.9:
        for n, dev in enumerate(devices):
            at(700.0 + 300 * n)
            rec.add("register", dev, uri_change="new")
            leg = f"ap-{hexid(rng, 20)}"
            rec.add("leg", dev, fate="originated", leg=leg, awake=True)
            at(760.0 + 300 * n)
            rec.add("leg", dev, fate="ringing", leg=leg)
        at(2500.0)
        rec.add("leg", devices[0], fate="answered", leg=leg)
        rec.add("bridge", devices[0], bridge=f"ap-br-{hexid(rng, 16)}", leg=leg)
        if len(devices) > 1:
            rec.add("leg", devices[1], fate="cancelled", leg=f"ap-{hexid(rng, 20)}", reason="answered_elsewhere")
            push(devices[1], "answered-elsewhere", 2510.0)
        at(60_000.0)
        rec.add("hangup", devices[0], side="callee", cause=16)
        rec.close("ANSWERED")
    else:
        at(30_000.0)
        rec.close("TIMEOUT")
        push(devices[0], "cancel", 30_010.0)
        push(devices[0], "missed-call", 30_020.0)


def build(n: int, seed: int) -> tuple[list[TraceWrite], float]:
    """The writes of ``n`` calls (and the CPU microseconds one call took, generation included)."""
    rng = random.Random(seed)
    sink = Collect()
    clock = [0.0]
    tracer = Tracer(sink, "pbx1-1234", clock=lambda: clock[0])
    started = time.process_time()
    for i in range(n):
        one_call(tracer, rng, i, clock)
    return sink.writes, (time.process_time() - started) / n * 1e6


async def used_memory(client: aioredis.Redis) -> int:
    await client.execute_command("MEMORY", "PURGE")
    info = await client.info("memory")
    return int(info["used_memory"])


async def redis_cost(writes: list[TraceWrite], n: int) -> dict[str, Any]:
    server = RedisServer()
    server.start()
    client = aioredis.Redis.from_url(server.url)
    try:
        store = RedisTraceStore(client, PREFIX, max_calls=max(n, 10_000))
        before = await used_memory(client)
        cpu0, wall0 = time.process_time(), time.monotonic()
        for start in range(0, len(writes), 2000):
            for w in writes[start:start + 2000]:
                store.submit(w)
            await store.flush()
        cpu = time.process_time() - cpu0
        wall = time.monotonic() - wall0
        after = await used_memory(client)
        ids = [i.decode() for i in await client.zrange(f"{PREFIX}traces:all", 0, -1)]
        sample = random.Random(1).sample(ids, min(200, len(ids)))
        per_trace = []
        for cid in sample:
            h = await client.memory_usage(f"{PREFIX}trace:{cid}") or 0
            e = await client.memory_usage(f"{PREFIX}trace:{cid}:ev") or 0
            per_trace.append(h + e)
        indexes = 0
        async for key in client.scan_iter(match=f"{PREFIX}traces:*", count=1000):
            indexes += await client.memory_usage(key) or 0
        one = await store.get(sample[0])
        assert one is not None
        return {
            "traces": await store.count(), "used_memory_delta_bytes": after - before,
            "per_call_bytes": (after - before) / n, "memory_usage_trace_keys_mean_bytes": statistics.mean(per_trace),
            "indexes_bytes": indexes, "events_per_trace_mean": statistics.mean(
                [len(t.events) for t in await store.find(limit=200)]),
            "json_bytes_one_trace": len(json.dumps(one.to_json())),
            "writer_cpu_us_per_call": cpu / n * 1e6, "writer_wall_s": wall,
            "redis_version": (await client.info("server"))["redis_version"],
        }
    finally:
        await client.aclose()
        server.cleanup()


def memory_cost(n: int, seed: int) -> dict[str, Any]:
    """The in-process store filled by the tracer itself (events allocated under tracemalloc)."""
    rng = random.Random(seed)
    clock = [0.0]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    store = MemoryTraceStore(max_calls=max(n, 10_000))
    tracer = Tracer(store, "pbx1-1234", clock=lambda: clock[0])
    for i in range(n):
        one_call(tracer, rng, i, clock)
    tracer._by_push_id.clear()  # the tracer's own map of open calls is bounded apart; count the store only
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return {"bytes": used, "per_call_bytes": used / n}


def record_cost(rounds: int = 20_000) -> dict[str, float]:
    """CPU of the recorder on the call's path, with the Redis store's submit (a buffer append):
    opening a call (before the push: its start and call_start) and one event."""
    store = RedisTraceStore(aioredis.Redis(), PREFIX, max_pending=10 * rounds)
    tracer = Tracer(store, "pbx1-1234")
    ids = [(f"1733100000.{i}", str(uuid.uuid4())) for i in range(rounds)]
    t0 = time.perf_counter()
    recs = [tracer.open(cid, pid, "1001", "+33612345678", 0.0018) for cid, pid in ids]
    t1 = time.perf_counter()
    for rec in recs:
        rec.add("push", "0123456789abcdef0123", provider="fcm", kind="call", outcome="delivered", latency_ms=3.2,
                retries=0, token="abcd…(163)", status=200, reason=None)
    t2 = time.perf_counter()
    return {"open_us": (t1 - t0) / rounds * 1e6, "event_us": (t2 - t1) / rounds * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    writes, _ = build(args.calls, args.seed)
    result = {"calls": args.calls, "writes": len(writes), "recorder_cpu": record_cost(),
              "redis": asyncio.run(redis_cost(writes, args.calls)), "in_process": memory_cost(args.calls, args.seed)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
