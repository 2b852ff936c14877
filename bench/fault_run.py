"""A 60-second fault run for the clustering issue: two Asterisk instances, three daemons in
broadcast mode on one Redis, sleeping phones woken by pushes, calls all the time, and a daemon
SIGKILLed (and restarted) every few seconds. Counts calls completed, continued to the dialplan
with a status, and lost (no final answer for the caller, or a channel left in Stasis).

    .venv/bin/python bench/fault_run.py [--seconds 60]

Uses Asterisk instances 7 and 8 (ports 15760.., 15860..) and its own Redis: it can run beside
the tests. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rig.asterisk import AsteriskInstance, Ports
from rig.process import terminate
from rig.provision import provision
from rig.redis import RedisServer
from rig.sipua import SipUA

PHONES = [str(a) for a in range(3150, 3170)]


class Daemon:
    def __init__(self, name: str, asterisk: AsteriskInstance, redis: RedisServer, push_port: int, work: Path):
        self.name = name
        self.config = work / f"{name}.toml"
        self.config.write_text(asterisk.daemon_config(redis.url) + f'''key_prefix = "fault:"
[ari]
app = "ari-push-{name}"
[cluster]
mode = "broadcast"
heartbeat = 0.5
node_ttl = 2
[capture]
vendor_allowed_hosts = ["127.0.0.1:*"]
[calls]
default_timeout = 8
[push]
burst = 1000
[http]
listen = "127.0.0.1:0"
[vendor]
body_template = '{{"type":"{{kind}}","call_id":"{{call_id}}","callee":"{{callee}}"}}'
''')
        self.log = work / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.push_port = push_port

    def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "ari_push", "--config", str(self.config), "run"],
                                     stdout=out, stderr=subprocess.STDOUT)
        out.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        terminate(self.proc, 15)


def merge(text: str) -> str:
    """The rig's daemon_config and the extra keys both open [ari]: merge duplicate tables."""
    sections: dict[str, list[str]] = {"": []}
    order, current = [""], ""
    for line in text.splitlines():
        if line.startswith("[") and not line.startswith("[["):
            current = line.strip()
            if current not in sections:
                sections[current] = []
                order.append(current)
            continue
        sections[current].append(line)
    return "\n".join(x for name in order for x in ([name] if name else []) + sections[name]) + "\n"


async def main(seconds: float) -> int:
    root = provision()
    work = Path(tempfile.mkdtemp(prefix="ari-push-fault-"))
    x = AsteriskInstance(root, "fx", Ports.for_index(7))
    y = AsteriskInstance(root, "fy", Ports.for_index(8))
    redis = RedisServer()
    phones: dict[str, SipUA] = {}
    asterisks = [x, y]
    wake_plan: dict[str, float] = {}  # aor -> wake delay; negative: never wakes

    async def on_push(request: web.Request) -> web.Response:
        body = json.loads(await request.text())
        aor = request.match_info["aor"]
        if body.get("type") == "call" and wake_plan.get(aor, -1) >= 0:
            asyncio.get_running_loop().create_task(wake(aor, wake_plan[aor]))
        return web.json_response({})

    async def wake(aor: str, delay: float) -> None:
        await asyncio.sleep(delay)
        phone = phones[aor]
        phone.close()
        phone.server = ("127.0.0.1", random.choice(asterisks).ports.sip)  # wakes on either node
        await phone.open()
        with contextlib.suppress(TimeoutError):
            await phone.register()

    app = web.Application()
    app.router.add_post("/push/{aor}", on_push)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    push_port = runner.addresses[0][1]

    daemons: list[Daemon] = []
    results = {"completed": 0, "continued": 0, "lost": 0}
    statuses: dict[int, int] = {}
    gaps: list[float] = []
    try:
        for a in asterisks:
            a.write_config()
            a.start()
        redis.start()
        for name, a in (("a1", x), ("a2", x), ("b1", y)):
            d = Daemon(name, a, redis, push_port, work)
            d.config.write_text(merge(d.config.read_text()))
            d.start()
            daemons.append(d)
        await asyncio.sleep(3)
        for aor in PHONES:
            phone = SipUA(aor, x.ports.sip)
            await phone.open()
            await phone.register(f"X-PUSH-URI=http://127.0.0.1:{push_port}/push/{aor}")
            phone.close()  # asleep
            phones[aor] = phone
        await asyncio.sleep(1)

        free = list(PHONES)
        end = time.monotonic() + seconds

        async def one_call() -> None:
            aor = free.pop(0)
            try:
                wake_plan[aor] = random.choice([0.2, 0.5, 1.0, 1.5, 2.5, -1])
                caller = SipUA("2000", x.ports.sip)
                await caller.open()
                started = time.monotonic()
                try:
                    resp = await asyncio.wait_for(caller.call(f"c{aor}", timeout=25), 30)
                except TimeoutError:
                    results["lost"] += 1
                    print(f"  LOST: call to {aor} at t={seconds - (end - started):.1f}s: no final answer", flush=True)
                    caller.close()
                    return
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                if resp.status == 200:
                    await asyncio.sleep(0.5)
                    try:
                        await asyncio.wait_for(caller.hangup(), 5)
                        results["completed"] += 1
                    except TimeoutError:
                        results["lost"] += 1
                        print(f"  LOST: call to {aor} at t={seconds - (end - started):.1f}s: BYE unanswered",
                              flush=True)
                else:
                    results["continued"] += 1
                caller.close()
                phone = phones[aor]
                phone.dialog = {}
                phone.close()  # asleep again
            finally:
                free.append(aor)

        async def faults() -> None:
            i = 0
            while time.monotonic() < end - 5:
                await asyncio.sleep(6)
                victim = daemons[i % 2]  # the two daemons of Asterisk x take turns dying
                i += 1
                victim.kill()
                killed = time.monotonic()
                print(f"  t={seconds - (end - killed):5.1f}s SIGKILL {victim.name}", flush=True)
                await asyncio.sleep(3)
                victim.start()
                gaps.append(time.monotonic() - killed)

        calls: set[asyncio.Task[None]] = set()
        fault_task = asyncio.create_task(faults())
        while time.monotonic() < end:
            while len(calls) < 4 and free:
                t = asyncio.create_task(one_call())
                calls.add(t)
                t.add_done_callback(calls.discard)
            await asyncio.sleep(0.3)
        await fault_task
        if calls:
            await asyncio.wait(calls, timeout=40)
        await asyncio.sleep(3)
        leftover = [c for a in asterisks for c in a.ari("GET", "/ari/channels") or []]  # type: ignore[union-attr]
        results["lost"] += len([c for c in leftover if c["name"].startswith("PJSIP/2000-")])
        total = sum(results.values())
        print(f"\n{seconds:.0f} s fault run, 2 Asterisk, 3 daemons (broadcast), a daemon SIGKILLed every 9 s:")
        print(f"  calls {total}: completed {results['completed']}, continued with a status "
              f"{results['continued']}, lost {results['lost']}; caller final answers {statuses}")
        print(f"  channels left on the Asterisks: {len(leftover)}")
        return 0 if results["lost"] == 0 else 1
    finally:
        for d in daemons:
            d.stop()
        for p in phones.values():
            p.close()
        await runner.cleanup()
        redis.cleanup()
        for a in asterisks:
            a.stop()
        print(f"  logs: {work}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60)
    sys.exit(asyncio.run(main(parser.parse_args().seconds)))
