"""Push latency of the providers for phones without Google or Apple, each against its strict local
service over TLS: HMS Core (v1, OAuth), HarmonyOS (v3, PS256 JWT), Web Push encrypted (VAPID +
RFC 8291) and Web Push empty.

The local services run in a separate process (multiprocessing, spawn), so the numbers are the
client's. Each provider is warmed (TLS, OAuth token), then sends ``--pushes`` pushes one after
the other (latency of one push on an idle client), then ``--burst`` at once through the
PushDispatcher. Prints median and p99 per provider, and the number of contract rules each local
service enforces.

    .venv/bin/python bench/push_providers.py [--pushes 300] [--burst 200]

Not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ari_push.model import Binding, PushOutcome, PushParams
from ari_push.push.base import PushProvider
from ari_push.push.dispatch import PushDispatcher
from ari_push.push.huawei import HmosProvider, HmsProvider
from ari_push.push.webpush import WebPushProvider
from ari_push.settings import HmosProject, HmsApp, Secret, WebPushSettings
from tests.fakes import hms as hms_fake
from tests.fakes import webpush as wp_fake
from tests.fakes.builders import message
from tests.fakes.keys import ec_key, make_pki, private_pem

APP, PROJECT, SECRET = "101234567", "388421841221234567", "bench-client-secret"


def serve(conn: Connection, directory: str, subs: int) -> None:
    async def main() -> None:
        pki = make_pki(Path(directory))
        huawei = await hms_fake.FakeHuawei(pki).start()
        huawei.add_app(APP, SECRET)
        account = huawei.add_project(PROJECT)
        wp = await wp_fake.FakeWebPush(pki).start()
        keyed = [wp.subscribe(keys=True) for _ in range(subs)]
        bare = [wp.subscribe(keys=False) for _ in range(subs)]
        conn.send({"huawei": huawei.url, "webpush_port": wp.port, "token_url": huawei.token_url,
                   "account": account.json(),
                   "ca_file": str(pki.ca_file),
                   "keyed": [(s.endpoint, s.p256dh, s.auth_b64) for s in keyed],
                   "bare": [s.endpoint for s in bare]})
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        conn.send({"huawei_accepted": len(huawei.requests), "huawei_refused": len(huawei.refusals),
                   "webpush_accepted": len(wp.pushes), "webpush_refused": len(wp.refusals),
                   "oauth_tokens": huawei.token_issuances})
        await huawei.stop()
        await wp.stop()

    asyncio.run(main())


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(name: str, provider: PushProvider, bindings: list[Binding], pushes: int,
                  burst: int) -> dict[str, Any]:
    await provider.warm()
    for b in bindings[:5]:  # connections up
        await provider.send(b, message())
    seq: list[float] = []
    for i in range(pushes):
        started = time.perf_counter()
        result = await provider.send(bindings[i % len(bindings)], message(call_id=f"seq-{i}"))
        seq.append((time.perf_counter() - started) * 1000)
        assert result.outcome is PushOutcome.DELIVERED, result
    dispatcher = PushDispatcher([provider], _ignore, rate_limiter=None)
    lat: list[float] = []

    async def one(i: int) -> None:
        started = time.perf_counter()
        r = await dispatcher.send(bindings[i % len(bindings)], message(call_id=f"burst-{i}"))
        lat.append((time.perf_counter() - started) * 1000)
        assert r.outcome is PushOutcome.DELIVERED, r

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(burst)))
    wall = time.perf_counter() - started
    await provider.aclose()
    return {"provider": name, "seq_p50": statistics.median(seq), "seq_p99": pct(seq, 0.99),
            "burst_p50": statistics.median(lat), "burst_p99": pct(lat, 0.99), "burst_wall_s": wall}


async def _ignore(*_: object) -> None:
    return None


async def client(info: dict[str, Any], pushes: int, burst: int) -> list[dict[str, Any]]:
    ca = info["ca_file"]
    hms = HmsProvider(HmsApp(APP, APP, Secret(SECRET), info["token_url"], info["huawei"], ca))
    hmos = HmosProvider(HmosProject(PROJECT, Secret(info["account"]), info["huawei"], ca))
    vapid = WebPushSettings(Secret(private_pem(ec_key())), "mailto:bench@example.com", ca_file=ca)
    huawei_token = "IQAAAACy0aUZAABfs3CF9QLKJ3l5mGJ6IH3eSoEsSGodcr0xw0_Tw{:05d}"
    hms_b = [Binding("a", "a", PushParams("hms", huawei_token.format(i), APP), "sip:a@h") for i in range(50)]
    hmos_b = [Binding("a", "a", PushParams("hmos", huawei_token.format(i), PROJECT), "sip:a@h") for i in range(50)]
    keyed = [Binding("a", "a", PushParams("webpush", e, extra_tokens=(("p256dh", p), ("auth", a))), "sip:a@h")
             for e, p, a in info["keyed"]]
    bare = [Binding("a", "a", PushParams("webpush", e), "sip:a@h") for e in info["bare"]]
    allowed = [f"localhost:{info['webpush_port']}"]  # an allow-list entry names a non-default port
    return [
        await measure("hms (v1, OAuth)", hms, hms_b, pushes, burst),
        await measure("hmos (v3, PS256 JWT)", hmos, hmos_b, pushes, burst),
        await measure("webpush encrypted", WebPushProvider(vapid, allowed), keyed, pushes, burst),
        await measure("webpush empty", WebPushProvider(vapid, allowed), bare, pushes, burst),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pushes", type=int, default=300)
    parser.add_argument("--burst", type=int, default=200)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    with tempfile.TemporaryDirectory() as directory:
        proc = ctx.Process(target=serve, args=(child, directory, 50))
        proc.start()
        try:
            info = parent.recv()
            rows = asyncio.run(client(info, args.pushes, args.burst))
            parent.send("stop")
            stats = parent.recv()
        finally:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
    print(f"{'provider':24} {'one at a time p50':>18} {'p99':>8} | {args.burst} at once p50 {'p99':>8} {'wall':>7}")
    for r in rows:
        print(f"{r['provider']:24} {r['seq_p50']:15.2f} ms {r['seq_p99']:6.2f} ms | {r['burst_p50']:10.1f} ms "
              f"{r['burst_p99']:6.1f} ms {r['burst_wall_s']:5.2f} s")
    print(f"local services: {stats}")
    print(f"contract rules enforced: Huawei Push Kit {len(hms_fake.CHECKS)} "
          f"(OAuth {sum(c[0] == 'oauth' for c in hms_fake.CHECKS)}, v1 {sum(c[0] == 'v1' for c in hms_fake.CHECKS)}, "
          f"v3 {sum(c[0] == 'v3' for c in hms_fake.CHECKS)}); Web Push {len(wp_fake.CHECKS)}")


if __name__ == "__main__":
    main()
