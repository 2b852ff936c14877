"""One account floods its AOR with devices, then a call comes in (issue 16; docs/security.md).

10 000 REGISTERs for one AOR, each with a fresh Zoiper push URL (``X-PUSH-URI``), reach the
daemon's real capture path (``Capture.handle`` on the AMI ``ContactStatus`` events Asterisk
sends, in order, as the capture worker handles them) and a real Redis. Then one call does
what ``CallManager`` does to push: ``bindings_for`` the AOR, then ``PushDispatcher.send_many``
through the configured vendor provider to a local push endpoint (a separate process, so the
numbers are the daemon's). An event-loop lag probe runs throughout (a 2 ms timer; lag = how
late it fires).

Reports: devices stored, Redis memory, ``bindings_for`` time, pushes the call sent and how many
were delivered, the call's push wall time, and the event-loop lag p50/p99/max while the call
pushes. Runs against whatever ``ari_push`` is on the path, so the same script measures the code
before and after a change:

    .venv/bin/python bench/fanout.py [--registers 10000] [--calls 3] [--call-bound 120]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ari_push.ami_frames import AmiMessage
from ari_push.bindings import RedisStore
from ari_push.capture import Capture
from ari_push.contacts import ContactPolicy
from ari_push.metrics import Metrics
from ari_push.model import PushKind, PushMessage, PushOutcome, PushResult
from ari_push.push.dispatch import PushDispatcher
from ari_push.push.factory import build_providers
from ari_push.redis_keys import Keys
from ari_push.service import make_redis
from ari_push.settings import CaptureSettings, RedisSettings, Settings
from ari_push.wakeups import WakeupHub
from rig.redis import RedisServer

AOR = "1001"


def endpoint(conn: Connection) -> None:
    """The push endpoint every URL points at (another process): answers 200 at once, counts."""
    from tests.fakes.vendor import FakeVendor

    async def serve() -> None:
        fake = await FakeVendor().start()
        conn.send(fake.port)
        while True:
            await asyncio.to_thread(conn.poll, None)
            conn.recv()
            conn.send(len(fake.requests))

    asyncio.run(serve())


class LagProbe:
    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self.since = float("inf")  # loop time from which samples count
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            if due - self.interval >= self.since:  # a timer armed after recording began
                self.samples.append(max(0.0, loop.time() - due) * 1000)

    def record(self, on: bool) -> None:
        self.since = asyncio.get_running_loop().time() if on else float("inf")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def stats(self) -> str:
        s = sorted(self.samples) or [0.0]
        p99 = s[min(len(s) - 1, int(len(s) * 0.99))]
        return f"p50 {statistics.median(s):.1f} ms, p99 {p99:.1f} ms, max {s[-1]:.1f} ms ({len(s)} samples)"


def _allow_entry() -> str:
    try:  # newer code: an entry without a port means the default port only
        ContactPolicy(vendor_allowed_hosts=("127.0.0.1:*",))
        return "127.0.0.1:*"
    except ValueError:
        return "127.0.0.1"


async def _ignore(*_: object) -> None:
    return None


async def main(registers: int, call_bound: float, calls: int) -> None:
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=endpoint, args=(child,), daemon=True)
    proc.start()
    port = parent.recv()
    server = RedisServer()
    server.start()
    redis = make_redis(RedisSettings(url=server.url))
    probe = LagProbe()
    probe.start()
    try:
        settings = Settings(capture=CaptureSettings(vendor_allowed_hosts=(_allow_entry(),)))
        keys = Keys("fanout:")
        store = RedisStore(redis, keys, 30 * 86400)
        policy = ContactPolicy.from_settings(settings.capture)
        capture = Capture(store, WakeupHub(), policy, ami=None, metrics=Metrics())  # type: ignore[arg-type]
        started = time.perf_counter()
        for i in range(registers):
            uri = f"sip:{AOR}@127.0.0.1:{20000 + i % 40000};X-PUSH-URI=http://127.0.0.1:{port}/zp/{i:08d}-secret"
            await capture.handle(AmiMessage((("Event", "ContactStatus"), ("AOR", AOR), ("EndpointName", AOR),
                                             ("URI", uri), ("ContactStatus", "Created"))))
        took = time.perf_counter() - started
        memory = await redis.memory_usage(keys.bindings(AOR)) or 0
        t0 = time.perf_counter()
        bindings = await store.bindings_for(AOR)
        read = time.perf_counter() - t0
        print(f"ari_push from {Path(sys.modules['ari_push'].__file__ or '?').parent}")
        print(f"{registers} REGISTERs captured in {took:.1f} s ({registers / took:.0f}/s); "
              f"devices stored for the AOR: {len(bindings)}; Redis memory for them {memory / 1024:.0f} KiB; "
              f"bindings_for {read * 1000:.1f} ms")

        kwargs: dict[str, object] = {}
        try:
            from ari_push.push.fanout import Fanout

            kwargs["fanout"] = Fanout.from_settings(settings)
        except ImportError:
            pass
        providers = build_providers(settings)
        for provider in providers:
            await provider.warm()  # as the daemon does at start
        dispatcher = PushDispatcher(providers, _ignore, **kwargs)  # type: ignore[arg-type]
        for n in range(calls):
            message = PushMessage(PushKind.CALL, f"bench-call-{n}", "+15550001", "Bench", AOR, time.time() + 30)
            parent.send("count")
            before = parent.recv()
            probe.samples.clear()
            probe.record(True)
            t0 = time.perf_counter()
            results: dict[str, PushResult] = {}
            try:
                results = await asyncio.wait_for(dispatcher.send_many(bindings, message), call_bound)
                ended = "finished"
            except TimeoutError:
                ended = f"cut off after {call_bound:.0f} s"
            pushed = time.perf_counter() - t0
            await asyncio.sleep(0.05)  # a few more lag samples after the last push
            probe.record(False)
            parent.send("count")
            sent = parent.recv() - before
            delivered = sum(r.outcome is PushOutcome.DELIVERED for r in results.values())
            print(f"call {n + 1}: {len(bindings)} devices to push; {sent} pushes reached the endpoint, "
                  f"{delivered} delivered; {ended} in {pushed:.2f} s")
            print(f"  event-loop lag while the call pushed: {probe.stats()}")
        await dispatcher.aclose()
    finally:
        await redis.aclose()
        server.cleanup()
        proc.terminate()
        proc.join(5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--registers", type=int, default=10_000)
    parser.add_argument("--call-bound", type=float, default=120.0, help="stop waiting for the call's pushes")
    parser.add_argument("--calls", type=int, default=3, help="calls in a row (the first one opens connections)")
    args = parser.parse_args()
    asyncio.run(main(args.registers, args.call_bound, args.calls))
