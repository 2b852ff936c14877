"""What the console adds to a call's critical path: the same calls with and without console users.

    ARI_PUSH_RIG_SLOT=N .venv/bin/python bench/console_critical_path.py [--calls 40] [--block 10]

Real Asterisk 22 + Redis + the daemon (in this process) + a local vendor push endpoint; a
sleeping phone is called, woken by the push, re-REGISTERs and answers; the caller hangs up.
Two measured stretches of the critical path per call: the caller's INVITE to the push arriving
at the push service, and the phone's re-REGISTER to the INVITE reaching it. Calls alternate in
blocks between "no console" and "console busy": a separate process holding ``max_streams`` (8)
live event streams open and polling what two open browsers would (the calls list, the in-flight
list, the overview, the current call's timeline) every 0.5 s, with 1000 traces stored.
Reported: median and p95 of both stretches in each condition. Results: docs/operations.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aiohttp import ClientSession, ClientTimeout, web  # noqa: E402

from ari_push.service import Daemon  # noqa: E402
from ari_push.settings import load  # noqa: E402
from ari_push.trace_store import TraceStart, TraceWrite  # noqa: E402
from bench.console_load import call_events  # noqa: E402
from rig.asterisk import TEST_AOR_FIRST, AsteriskInstance, Ports  # noqa: E402
from rig.provision import provision  # noqa: E402
from rig.redis import RedisServer  # noqa: E402
from rig.sipua import SipUA  # noqa: E402


async def console_users(port: int, streams: int, period: float) -> None:
    """The load: ``streams`` event streams read to the end, and a poller; runs until killed."""
    async with ClientSession(timeout=ClientTimeout(total=None)) as http:
        async def stream() -> None:
            while True:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/api/events") as resp:
                        async for _ in resp.content:
                            pass
                except Exception:
                    await asyncio.sleep(0.2)

        async def poll() -> None:
            while True:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/api/calls?status=in_flight&limit=500") as r:
                        live = (await r.json())["calls"]
                    for path in ("/api/calls?limit=50", "/api/overview", "/api/calls?limit=50",
                                 *(f"/api/calls/{c['call_id']}" for c in live[:2])):
                        async with http.get(f"http://127.0.0.1:{port}{path}") as r:
                            await r.read()
                except Exception:
                    pass
                await asyncio.sleep(period)

        await asyncio.gather(*(stream() for _ in range(streams)), poll(), poll())


class Endpoint:
    def __init__(self) -> None:
        self.calls: asyncio.Queue[float] = asyncio.Queue()

    async def handle(self, request: web.Request) -> web.Response:
        body = json.loads(await request.text())
        if body.get("type") == "call":
            self.calls.put_nowait(time.perf_counter())
        return web.json_response({"ok": True})


def p95(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]


async def main(args: argparse.Namespace) -> None:
    root = provision()
    work = Path(tempfile.mkdtemp(prefix="ari-push-cpb-"))
    asterisk = AsteriskInstance(root, "cpb", Ports.for_index(3))
    asterisk.write_config()
    asterisk.start()
    redis = RedisServer(workdir=work / "redis", appendonly=False)
    redis.start()
    ep = Endpoint()
    app = web.Application()
    app.router.add_post("/push/{device}", ep.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    ep_port = runner.addresses[0][1]
    config = work / "ari-push.toml"
    config.write_text(asterisk.daemon_config(redis.url) + 'key_prefix = "cpb:"\n'
                      '[http]\nlisten = "127.0.0.1:0"\n[capture]\nvendor_allowed_hosts = ["127.0.0.1:*"]\n'
                      '[push]\nburst = 1000\nrate_per_minute = 10000\n[calls]\ndefault_timeout = 10\n'
                      '[log]\nlevel = "WARNING"\n'
                      '[vendor]\nbody_template = \'{"type":"{kind}","call_id":"{call_id}"}\'\n')
    daemon = Daemon(load(config, environ={}))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    users: subprocess.Popen[bytes] | None = None
    try:
        await asyncio.wait_for(daemon.started.wait(), 30)
        while not (daemon.ami.link.up and daemon.ari.link.up and daemon.redis_link.up):
            await asyncio.sleep(0.05)
        assert daemon.traces is not None
        now = time.time() - 5000
        for i in range(1000):  # 1000 traces stored, as in the page-load measurement
            daemon.traces.submit(TraceWrite(f"old-{i:05d}", TraceStart(f"{4000 + i % 300}", "2000", now + 5 * i,
                                                                       "old"), call_events(i), "ANSWERED",
                                            now + 5 * i + 45))
        aor = str(TEST_AOR_FIRST)
        phone = SipUA(aor, asterisk.ports.sip)
        await phone.open()
        assert await phone.register(f"X-PUSH-URI=http://127.0.0.1:{ep_port}/push/{aor}") == 200
        while not await daemon.store.bindings_for(aor):
            await asyncio.sleep(0.05)
        phone.close()
        results: dict[str, dict[str, list[float]]] = {c: {"invite_to_push": [], "register_to_invite": []}
                                                      for c in ("no console", "console busy")}
        port = daemon.health.port
        for block in range(2 * args.calls // args.block):
            condition = "console busy" if block % 2 else "no console"
            if condition == "console busy" and users is None:
                users = subprocess.Popen([sys.executable, __file__, "--users", str(port)])
                await asyncio.sleep(2.0)
                print(f"console users attached: {daemon.health.open_streams} event streams open")
            elif condition == "no console" and users is not None:
                users.terminate()
                users.wait(10)
                users = None
                await asyncio.sleep(1.0)
            for _ in range(args.block):
                caller = SipUA("2000", asterisk.ports.sip)
                await caller.open()
                t_call = time.perf_counter()
                answer = caller.start_call(aor)
                pushed_at = await asyncio.wait_for(ep.calls.get(), 15)
                await asyncio.sleep(0.05)
                await phone.open(0)
                t_reg = time.monotonic()  # SipUA stamps what it receives with time.monotonic()
                assert await phone.register() == 200
                invite = await asyncio.wait_for(phone.invites.get(), 10)
                assert (await asyncio.wait_for(answer, 15)).status == 200
                results[condition]["invite_to_push"].append(1000 * (pushed_at - t_call))
                results[condition]["register_to_invite"].append(1000 * (invite.received - t_reg))
                await phone.hangup()
                await asyncio.wait_for(caller.byes.get(), 5)
                caller.close()
                phone.close()
                while asterisk.ari("GET", "/ari/channels"):
                    await asyncio.sleep(0.05)
        for condition, r in results.items():
            print(f"{condition:13s} ({len(r['invite_to_push'])} calls): INVITE->push received median "
                  f"{statistics.median(r['invite_to_push']):6.1f} ms p95 {p95(r['invite_to_push']):6.1f} ms; "
                  f"re-REGISTER->INVITE median {statistics.median(r['register_to_invite']):6.1f} ms "
                  f"p95 {p95(r['register_to_invite']):6.1f} ms")
    finally:
        if users is not None:
            users.terminate()
            users.wait(10)
        stop.set()
        await asyncio.wait_for(task, 30)
        await runner.cleanup()
        redis.stop()
        asterisk.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=40, help="calls per condition")
    p.add_argument("--block", type=int, default=10, help="calls in a row per condition")
    p.add_argument("--users", type=int, default=0, help=argparse.SUPPRESS)  # the load process: the daemon's port
    a = p.parse_args()
    if a.users:
        asyncio.run(console_users(a.users, 8, 0.5))
    else:
        asyncio.run(main(a))
