"""Console page-load benchmark: N call traces stored, the calls page and its API timed.

    ARI_PUSH_RIG_SLOT=N .venv/bin/python bench/console_load.py [--calls 1000] [--runs 20] [--store redis|memory]

The daemon's own parts, nothing else: a real Redis (rig/redis.py) holding N traces written
through ``RedisTraceStore.submit`` (10 events each, like an answered call: start, ringback,
push, re-REGISTER, three leg states, bridge, hang-up, status; a tenth in flight), the health
server with the console's routes (``Console``), and Debian's headless Chromium
(tests/browser.py) for the page. Reported: median and p95 of each API call (client-side, over
a fresh connection each, as the page does) and of the calls page in the browser, from
navigation start to the tables filled (the page's own clock, ``performance.now()`` when it sets
``data-loaded``), and the Redis memory the traces take.
Results: docs/operations.md, "Console".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import redis.asyncio as aioredis  # noqa: E402

from ari_push.bindings import MemoryStore  # noqa: E402
from ari_push.console.access import Access  # noqa: E402
from ari_push.console.api import Console  # noqa: E402
from ari_push.health import HealthServer  # noqa: E402
from ari_push.links import LinkState  # noqa: E402
from ari_push.metrics import Metrics  # noqa: E402
from ari_push.trace_store import MemoryTraceStore, RedisTraceStore, TraceStart, TraceWrite  # noqa: E402
from ari_push.traces import TraceEvent  # noqa: E402
from rig.redis import RedisServer  # noqa: E402
from tests.browser import chromium  # noqa: E402

PROVIDERS = ("fcm", "apns", "vendor", "webpush")


def call_events(i: int) -> tuple[TraceEvent, ...]:
    dev = f"dev{i % 400:04d}"
    provider = PROVIDERS[i % len(PROVIDERS)]
    return (TraceEvent(2.0, "call_start", None, {"node": "bench"}), TraceEvent(9.0, "ringback"),
            TraceEvent(21.0, "push", dev, {"provider": provider, "kind": "call", "outcome": "delivered",
                                           "latency_ms": 38.5, "retries": 0, "token": "f00d…(152)"}),
            TraceEvent(1210.0, "register", dev, {"uri_change": "new"}),
            TraceEvent(1222.0, "leg", dev, {"fate": "originated"}), TraceEvent(1302.0, "leg", dev, {"fate": "ringing"}),
            TraceEvent(3105.0, "leg", dev, {"fate": "answered"}), TraceEvent(3111.0, "bridge"),
            TraceEvent(45000.0, "hangup", None, {"side": "callee", "cause": 16}),
            TraceEvent(45002.0, "status", None, {"status": "ANSWERED"}))


async def fill(store: MemoryTraceStore | RedisTraceStore, n: int) -> None:
    now = time.time() - n * 5
    for i in range(n):
        live = i >= n - n // 10
        started = now + 5 * i
        events = call_events(i)[:4] if live else call_events(i)
        store.submit(TraceWrite(f"bench-{i:06d}", TraceStart(f"{1000 + i % 300}", f"+3312345{i % 997:04d}", started,
                                                              "bench"), events,
                                None if live else "ANSWERED", None if live else started + 45))
        if isinstance(store, RedisTraceStore) and i % 200 == 199:
            await store.flush()
    if isinstance(store, RedisTraceStore):
        await store.flush()


async def get(port: int, path: str) -> tuple[float, int, int]:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    elapsed = 1000 * (time.perf_counter() - started)
    writer.close()
    return elapsed, int(raw.split(b" ", 2)[1]), len(raw)


def stats(samples: list[float]) -> str:
    s = sorted(samples)
    p95 = s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]
    return f"median {statistics.median(s):7.1f} ms  p95 {p95:7.1f} ms"


async def main(args: argparse.Namespace) -> None:
    redis_server = None
    client = None
    if args.store == "redis":
        redis_server = RedisServer(workdir=Path(tempfile.mkdtemp(prefix="ari-push-bench-")), appendonly=False)
        redis_server.start()
        client = aioredis.Redis.from_url(redis_server.url)
        used_before = int((await client.info("memory"))["used_memory"])
        traces: MemoryTraceStore | RedisTraceStore = RedisTraceStore(client, "bench:", 86400, 10_000, 200)
    else:
        traces = MemoryTraceStore(86400, 10_000, 200)
    metrics = Metrics()
    links = [LinkState("ami"), LinkState("ari"), LinkState("redis")]
    for link in links:
        link.set_up()
    server = HealthServer("127.0.0.1:0", links, metrics)
    console = Console(store=MemoryStore(), metrics=metrics, links=links, access=Access(), node_id="bench",
                      traces=traces)
    server.guard = console.access.check
    server.routes += console.routes()
    await server.start()
    try:
        t0 = time.perf_counter()
        await fill(traces, args.calls)
        print(f"{args.calls} traces written in {time.perf_counter() - t0:.2f} s ({args.store}); "
              f"stored: {await traces.count()}")
        if client is not None:
            used = int((await client.info("memory"))["used_memory"]) - used_before
            print(f"Redis memory for the traces: {used / 1e6:.2f} MB ({used / args.calls:.0f} B per call)")
        paths = ["/api/calls?limit=50", "/api/calls?status=in_flight&limit=500", "/api/calls?limit=500",
                 "/api/calls?provider=apns&limit=50", "/api/calls?aor=1007&limit=50",
                 f"/api/calls/bench-{args.calls // 2:06d}", "/api/overview", "/console"]
        for path in paths:
            samples = []
            size = 0
            for _ in range(args.runs):
                ms, status, size = await get(server.port, path)
                assert status == 200, (path, status)
                samples.append(ms)
            print(f"  GET {path:42s} {stats(samples)}  ({size / 1024:.0f} KiB)")
        async with chromium(Path(tempfile.mkdtemp(prefix="ari-push-bench-shots-")) / "shots") as browser:
            loads: list[float] = []
            wall: list[float] = []
            for i in range(args.runs):
                await browser.go("about:blank")
                started = time.perf_counter()
                await browser.go(f"http://127.0.0.1:{server.port}/console#/calls")
                await browser.wait_js("return document.body.dataset.loaded === 'calls';", 60, "the calls page")
                wall.append(1000 * (time.perf_counter() - started))
                loads.append(float(await browser.js("return document.body.dataset.loadedMs;")))
                if i == 0:
                    rows = await browser.js("return document.querySelectorAll('#calls tbody tr[data-call]').length +"
                                            " document.querySelectorAll('#calls-live tbody tr[data-call]').length;")
                    print(f"  calls page shows {rows} rows (50 last + {args.calls // 10} in flight)")
            print(f"  calls page in Chromium, navigation start to tables filled (page clock) {stats(loads)}")
            print(f"    (WebDriver round trips included, polled every 0.1 s: {stats(wall)})")
            timeline = []
            for _ in range(args.runs):
                await browser.go("about:blank")
                await browser.go(f"http://127.0.0.1:{server.port}/console#/call/bench-{args.calls // 2:06d}")
                await browser.wait_js("return document.body.dataset.loaded === 'call';", 60, "the timeline")
                timeline.append(float(await browser.js("return document.body.dataset.loadedMs;")))
            print(f"  one call's timeline page in Chromium, navigation start to drawn (page clock) {stats(timeline)}")
        print(json.dumps({"machine": platform.machine(), "python": platform.python_version()}))
    finally:
        await server.stop()
        if client is not None:
            await client.aclose()
        if redis_server is not None:
            redis_server.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--store", choices=("redis", "memory"), default="redis")
    asyncio.run(main(p.parse_args()))
