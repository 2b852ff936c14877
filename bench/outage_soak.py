"""The outage soak of issue 18: one daemon under systemd-style restarts, sleeping phones, calls all
the time, and a fault every ``--fault-every`` seconds alternating a SIGKILL of the daemon
(restarted ``--restart-after`` s later, as systemd's RestartSec) and a Redis restart (down
``--redis-down`` s, 1 by default).

    ARI_PUSH_RIG_SLOT=N .venv/bin/python bench/outage_soak.py [--mode outbound|inbound] [--seconds 300]

12 phones sleep (their contact stays registered, nobody listens); a call every 1.5 s goes to a
free one; the push wakes it after 0.2-3 s, it registers from a new port, answers, hangs up
after 0.5 s and sleeps again. A call is lost when its caller gets no 200. At the end: channels
left on Asterisk, bindings per phone in Redis, and the daemon's restart-to-READY times (from
the NOTIFY_SOCKET this script listens on, as systemd would). Asterisk instance 4 of the slot,
its own Redis and workdir: it runs beside the tests. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rig.asterisk import REPO, AsteriskInstance, Ports, outbound_conf
from rig.provision import provision
from rig.redis import RedisServer, command, free_port
from rig.sipua import SipUA

PHONES = [str(a) for a in range(3170, 3182)]
PASSWORD = "soak-outbound-secret"


class Daemon:
    """``python -m ari_push run`` as systemd runs it (NOTIFY_SOCKET), killed with SIGKILL."""

    def __init__(self, config: Path, log: Path, notify_path: Path) -> None:
        self.config, self.log, self.notify_path = config, log, notify_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ARI_PUSH_")}
        env.update(NOTIFY_SOCKET=str(self.notify_path), PYTHONUNBUFFERED="1")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "ari_push", "--config", str(self.config), "run"],
                                         cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


async def wait_ready(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until a READY=1 datagram arrives (None: not within ``timeout``)."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while True:
                data = await loop.sock_recv(sock, 4096)
                if b"READY=1" in data.split(b"\n"):
                    return time.monotonic() - started
    return None


async def main(args: argparse.Namespace) -> int:
    root = provision()
    work = Path(tempfile.mkdtemp(prefix="ari-push-soak-"))
    ws_port = free_port()
    extra = outbound_conf(ws_port, PASSWORD) if args.mode == "outbound" else {}
    ast = AsteriskInstance(root, "soak", Ports.for_index(4), extra_conf=extra)
    redis = RedisServer()
    notify_path = work / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.setblocking(False)
    phones: dict[str, SipUA] = {}
    wake_delay: dict[str, float] = {}
    rng = random.Random(18)

    async def on_push(request: web.Request) -> web.Response:
        body = json.loads(await request.text())
        aor = request.match_info["aor"]
        if body.get("type") == "call" and aor in wake_delay:
            asyncio.get_running_loop().create_task(wake(aor, wake_delay.pop(aor)))
        return web.json_response({})

    async def wake(aor: str, delay: float) -> None:
        await asyncio.sleep(delay)
        phone = phones[aor]
        phone.close()
        await phone.open()
        with contextlib.suppress(TimeoutError):
            await phone.register()

    app = web.Application()
    app.router.add_post("/push/{aor}", on_push)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    push_port = runner.addresses[0][1]

    config = work / "ari-push.toml"
    ari_extra = (f'connection = "outbound"\noutbound_listen = "127.0.0.1:{ws_port}"\noutbound_password = "{PASSWORD}"\n'
                 if args.mode == "outbound" else "")
    daemon = Daemon(config, work / "daemon.log", notify_path)
    results = {"answered": 0, "lost": 0}
    lost: list[str] = []
    faults: list[str] = []
    ready_times: list[float] = []
    try:
        ast.write_config()
        ast.start()
        redis.start()
        base = ast.daemon_config(redis.url)
        base = base.replace("[ari]\n", "[ari]\nheartbeat = 2\n" + ari_extra, 1)
        config.write_text(base + '''key_prefix = "soak:"
[capture]
vendor_allowed_hosts = ["127.0.0.1:*"]
[calls]
default_timeout = 15
[push]
burst = 1000
[http]
listen = "127.0.0.1:0"
[vendor]
body_template = '{"type":"{kind}","call_id":"{call_id}","callee":"{callee}"}'
''')
        daemon.start()
        first = await wait_ready(notify, 30)
        if first is None:
            print(f"the daemon did not get ready; see {daemon.log}")
            return 2
        print(f"{args.mode} mode: daemon ready {first:.2f}s after start", flush=True)
        for aor in PHONES:
            phone = SipUA(aor, ast.ports.sip)
            await phone.open()
            await phone.register(f"X-PUSH-URI=http://127.0.0.1:{push_port}/push/{aor}")
            phone.close()  # asleep
            phones[aor] = phone
        await asyncio.sleep(1)

        free = list(PHONES)
        t0 = time.monotonic()
        end = t0 + args.seconds

        async def one_call() -> None:
            aor = free.pop(rng.randrange(len(free)))
            wake_delay[aor] = rng.uniform(0.2, 3.0)
            caller = SipUA("2000", ast.ports.sip)
            await caller.open()
            placed = time.monotonic() - t0
            try:
                target = f"o{aor}" if args.mode == "outbound" else aor
                try:
                    resp = await asyncio.wait_for(caller.call(target, timeout=60), 70)
                except TimeoutError:
                    resp = None
                if resp is not None and resp.status == 200:
                    results["answered"] += 1
                    await asyncio.sleep(0.5)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(caller.hangup(), 5)
                else:
                    results["lost"] += 1
                    last_fault = faults[-1] if faults else "none yet"
                    lost.append(f"t={placed:6.1f}s {aor}: {resp.status if resp else 'no answer'} "
                                f"(last fault: {last_fault})")
                    print("  LOST " + lost[-1], flush=True)
            finally:
                caller.close()
                wake_delay.pop(aor, None)
                phone = phones[aor]
                phone.dialog = {}
                phone.close()  # asleep again
                free.append(aor)

        async def fault_loop() -> None:
            n = 0
            while time.monotonic() + args.fault_every < end:
                await asyncio.sleep(args.fault_every)
                n += 1
                at = time.monotonic() - t0
                if n % 2 == 1:
                    daemon.kill()
                    faults.append(f"daemon SIGKILL at t={at:.1f}s")
                    await asyncio.sleep(args.restart_after)
                    daemon.start()
                    ready = await wait_ready(notify, 30)
                    if ready is not None:
                        ready_times.append(ready)
                    print(f"  t={at:6.1f}s daemon SIGKILL, restarted {args.restart_after:.0f}s later, READY "
                          f"{ready if ready is None else round(ready, 2)}s after its start", flush=True)
                else:
                    redis.stop()
                    faults.append(f"Redis restart at t={at:.1f}s")
                    await asyncio.sleep(args.redis_down)
                    redis.start()
                    print(f"  t={at:6.1f}s Redis restarted ({time.monotonic() - t0 - at:.2f}s down)", flush=True)

        calls: set[asyncio.Task[None]] = set()
        fault_task = asyncio.create_task(fault_loop())
        while time.monotonic() < end:
            if free:
                task = asyncio.create_task(one_call())
                calls.add(task)
                task.add_done_callback(calls.discard)
            await asyncio.sleep(args.every)
        await fault_task
        if calls:
            await asyncio.wait(calls, timeout=90)
        await asyncio.sleep(3)
        left = ast.ari("GET", "/ari/channels") or []
        per_phone = {aor: int(command(redis.port, "HLEN", f"soak:bindings:{{{aor}}}")) for aor in PHONES}  # type: ignore[call-overload]
        total = results["answered"] + results["lost"]
        print(f"\n{args.seconds:.0f} s soak, {args.mode} mode, a call every {args.every}s, a fault every "
              f"{args.fault_every:.0f}s ({len(faults)} faults: {sum('SIGKILL' in f for f in faults)} daemon SIGKILL, "
              f"{sum('Redis' in f for f in faults)} Redis restarts)")
        print(f"  calls {total}: answered {results['answered']}, lost {results['lost']}")
        for line in lost:
            print(f"    lost: {line}")
        print(f"  channels left on Asterisk: {len(left)} (a test-rig caller still in a call counts)")  # type: ignore[arg-type]
        print(f"  bindings per phone in Redis: {sorted(set(per_phone.values()))}")
        text = daemon.log.read_text(errors="replace")
        print(f"  daemon log: {text.count('the store cannot be read')} call(s) pushed from the binding cache, "
              f"{text.count('resuming call')} call(s) resumed after a restart, "
              f"{text.count('written when the store is back')} registration(s) kept during Redis outages, "
              f"{text.count('captured while the store was down')} write-back(s)")
        if ready_times:
            print(f"  restart-to-READY (process start to READY=1): median {statistics.median(ready_times):.2f}s, "
                  f"max {max(ready_times):.2f}s over {len(ready_times)} restarts")
        return 0 if results["lost"] == 0 and not left else 1
    finally:
        daemon.stop()
        for p in phones.values():
            p.close()
        await runner.cleanup()
        redis.cleanup()
        ast.stop()
        notify.close()
        print(f"  logs: {work}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("outbound", "inbound"), default="outbound")
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--every", type=float, default=1.5, help="seconds between calls")
    parser.add_argument("--fault-every", type=float, default=40)
    parser.add_argument("--restart-after", type=float, default=1.0)
    parser.add_argument("--redis-down", type=float, default=1.0, help="seconds between Redis' stop and start")
    sys.exit(asyncio.run(main(parser.parse_args())))
