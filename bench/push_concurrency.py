"""500 pushes in flight at once through PushDispatcher, against the fake FCM and APNs.

The fakes run in a separate process (multiprocessing, spawn) so the numbers are the
client's: its event loop, its memory. Reports wall time per burst, p50/p99 per push and
peak RSS of both processes.

    .venv/bin/python bench/push_concurrency.py [--pushes 500] [--rounds 5]

Not part of the tests. The fake FCM speaks HTTP/1.1 without TLS (aiohttp), so FCM pushes
share a pool of 100 connections; the fake APNs speaks HTTP/2 over TLS, so APNs pushes
share one connection, as against Apple.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ari_push.model import Binding, PushOutcome, PushResult
from ari_push.push.apns import ApnsProvider
from ari_push.push.dispatch import PushDispatcher
from ari_push.push.fcm import FcmProvider
from ari_push.settings import ApnsApp, FcmProject, Secret
from tests.fakes import FakeApns, FakeFcm, make_pki
from tests.fakes.builders import apns_token, binding, message

TEAM, KEY_ID, TOPIC = "TEAM123456", "KEY1234567", "com.example.phone.voip"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------- server process


def serve(conn: Connection, directory: str) -> None:
    async def main() -> None:
        pki = make_pki(Path(directory))
        fcm = await FakeFcm(pki).start()
        apns = await FakeApns(pki).start()
        conn.send({
            "fcm_url": fcm.url,
            "service_account": fcm.add_project("bench-project"),
            "apns_url": apns.url,
            "p8": apns.add_key(TEAM, KEY_ID, [TOPIC]),
            "ca_file": str(pki.ca_file),
        })
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, conn.recv)  # "stop"
        stats = {"fcm_sends": len(fcm.requests), "fcm_tokens": fcm.token_issuances,
                 "apns_pushes": len(apns.requests), "apns_handshakes": apns.handshakes, "rss_mb": rss_mb()}
        await fcm.stop()
        await apns.stop()
        conn.send(stats)

    asyncio.run(main())


# ---------------------------------------------------------------- client


async def burst(d: PushDispatcher, bindings: list[Binding]) -> tuple[float, list[float], list[PushResult]]:
    latencies: list[float] = []

    async def one(b: Binding) -> PushResult:
        started = time.perf_counter()
        result = await d.send(b, message(ring=30.0))
        latencies.append(time.perf_counter() - started)
        return result

    started = time.perf_counter()
    results = await asyncio.gather(*(one(b) for b in bindings))
    return time.perf_counter() - started, latencies, list(results)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def client(cfg: dict[str, str], pushes: int, rounds: int) -> None:
    fcm = FcmProvider(FcmProject("bench-project", Secret(cfg["service_account"]), api_url=cfg["fcm_url"],
                                 ca_file=cfg["ca_file"], timeout=10.0))
    apns = ApnsProvider(ApnsApp(name="bench", topics=(TOPIC,), team_id=TEAM, key_id=KEY_ID, key=Secret(cfg["p8"]),
                                production_url=cfg["apns_url"], sandbox_url=cfg["apns_url"],
                                ca_file=cfg["ca_file"], timeout=10.0))

    async def ignore(*_: object) -> None:
        return None

    d = PushDispatcher([apns, fcm], ignore, call_timeout=15.0)
    half = pushes // 2
    scenarios = {
        "mixed": [binding("apns", apns_token(i), TOPIC) for i in range(half)]
        + [binding("fcm", f"tok-{i}", "bench-project") for i in range(pushes - half)],
        "fcm-only": [binding("fcm", f"tok-{i}", "bench-project") for i in range(pushes)],
        "apns-only": [binding("apns", apns_token(i), TOPIC) for i in range(pushes)],
    }
    print(f"{pushes} pushes in flight per burst; fakes in a separate process; Python {sys.version.split()[0]}")
    print(f"{'scenario':<10} {'round':<6} {'wall s':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  outcomes")
    for name, bindings in scenarios.items():
        warm: list[float] = []
        walls: list[float] = []
        for r in range(rounds + 1):
            wall, lat, results = await burst(d, bindings)
            outcomes = {str(o): sum(1 for x in results if x.outcome is o) for o in PushOutcome}
            label = "cold" if (r == 0 and name == "mixed") else str(r)
            print(f"{name:<10} {label:<6} {wall:7.3f} {pct(lat, 50) * 1e3:8.1f} {pct(lat, 99) * 1e3:8.1f} "
                  f"{max(lat) * 1e3:8.1f}  {({k: v for k, v in outcomes.items() if v})}")
            if r > 0:
                warm.extend(lat)
                walls.append(wall)
        print(f"{name:<10} {'warm':<6} {statistics.median(walls):7.3f} {pct(warm, 50) * 1e3:8.1f} "
              f"{pct(warm, 99) * 1e3:8.1f} {max(warm) * 1e3:8.1f}  (median wall of {rounds} warm bursts)")
    print(f"client: provider token fetches {fcm.token_fetches}, APNs JWT signatures {apns.jwt_signings}, "
          f"peak RSS {rss_mb():.1f} MB")
    await d.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pushes", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    with tempfile.TemporaryDirectory() as directory:
        server = ctx.Process(target=serve, args=(theirs, directory), daemon=True)
        server.start()
        try:
            cfg = ours.recv()
            asyncio.run(client(cfg, args.pushes, args.rounds))
            ours.send("stop")
            stats = ours.recv()
            print(f"server: FCM sends {stats['fcm_sends']}, OAuth tokens issued {stats['fcm_tokens']}, "
                  f"APNs pushes {stats['apns_pushes']}, APNs TLS handshakes {stats['apns_handshakes']}, "
                  f"peak RSS {stats['rss_mb']:.1f} MB")
        finally:
            server.join(timeout=10)
            if server.is_alive():
                server.terminate()


if __name__ == "__main__":
    main()
