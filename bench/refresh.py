"""Registration-refresh benchmark: N phones with short registrations, real Asterisk 22 + Redis +
the ari-push daemon (a subprocess) + the strict local FCM. Not part of the tests.

    ARI_PUSH_RIG_SLOT=N .venv/bin/python bench/refresh.py [--devices 1000] [--duration 300]

Each phone registers once (Expires drawn from --min-exp..--max-exp, registrations spread over
--spread s) and then sleeps: it never refreshes by itself. A refresh push wakes it after a
delay drawn from --wake-min..--wake-max, and it re-REGISTERs the same contact. A share of the
phones (--never) never wakes. Reported: pushes sent and received, re-REGISTERs within the
window (between the push and the contact's expiry), contacts that expired anyway, what the
daemon counted, and the daemon's CPU and memory (docs/reachability.md has the results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.e2e import BenchUA, Daemon, Meter  # noqa: E402
from rig.asterisk import AsteriskInstance, Ports  # noqa: E402
from rig.demo import RecordingFcm, daemon_config, fcm_token, push_params  # noqa: E402
from rig.provision import asterisk_version, provision  # noqa: E402
from rig.redis import RedisServer, free_port  # noqa: E402

AOR_FIRST = 50000


@dataclass
class Phone:
    aor: str
    ua: BenchUA
    token: str
    expires: int
    wakes: bool
    registered_at: float = 0.0  # monotonic time of the last 200 OK
    pushes: list[float] = field(default_factory=list)
    in_window: int = 0  # re-REGISTERs answered before the contact expired
    late: int = 0  # pushes that came after the contact had already expired
    waking: bool = False

    @property
    def expiry(self) -> float:
        return self.registered_at + self.expires


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("ari_push_refresh") and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = Path(tempfile.mkdtemp(prefix="ari-push-refresh-"))
        self.fcm = RecordingFcm(self.on_push)
        self.phones: dict[str, Phone] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.errors = 0
        self.pushes_received = 0

    def on_push(self, token: str, message: dict[str, Any], at: float) -> None:
        phone = self.phones.get(token)
        if phone is None or message.get("data", {}).get("type") != "refresh":
            return
        self.pushes_received += 1
        phone.pushes.append(at)
        assert message["android"]["priority"] == "normal"
        if at > phone.expiry:
            phone.late += 1
        if phone.wakes and not phone.waking:
            phone.waking = True
            task = asyncio.get_running_loop().create_task(self.wake(phone))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def wake(self, phone: Phone) -> None:
        try:
            await asyncio.sleep(self.rng.uniform(self.args.wake_min, self.args.wake_max))
            status = await phone.ua.register(push_params(phone.token), expires=phone.expires)
            now = time.monotonic()
            if status == 200:
                if now <= phone.expiry:
                    phone.in_window += 1
                phone.registered_at = now
            else:
                self.errors += 1
        except (TimeoutError, OSError):
            self.errors += 1
        except RuntimeError:  # the run ended and the phone's socket is gone
            pass
        finally:
            phone.waking = False

    async def run(self) -> dict[str, Any]:
        a = self.args
        root = await asyncio.to_thread(provision)
        sa_file = self.workdir / "sa.json"
        sa_file.write_text(await self.fcm.start())
        extra = "\n".join(f"[{n}](phone-endpoint)\naors={n}\n[{n}](push-aor)\nminimum_expiration=1\n"
                          for n in range(AOR_FIRST, AOR_FIRST + a.devices))
        ast = AsteriskInstance(root, "bench-refresh", Ports.for_index(a.index), extra_pjsip=extra)
        await asyncio.to_thread(ast.write_config)
        await asyncio.to_thread(ast.start)
        redis = RedisServer(workdir=self.workdir / "redis")
        await asyncio.to_thread(redis.start)
        http_port = free_port()
        config = self.workdir / "ari-push.toml"
        config.write_text(daemon_config(
            ast, redis.url, http_port, sa_file, self.fcm.url, f"bench-{uuid.uuid4().hex[:6]}:",
            extra=f"[log]\nlevel = \"WARNING\"\n[refresh]\nmin_interval = {a.min_interval}\n"))
        daemon = Daemon(config, self.workdir / "daemon.log", http_port)
        try:
            # the daemon reads every ARI_PUSH_* variable as a setting: the rig's slot is not one
            slot = os.environ.pop("ARI_PUSH_RIG_SLOT", None)
            try:
                await asyncio.to_thread(daemon.start)
            finally:
                if slot is not None:
                    os.environ["ARI_PUSH_RIG_SLOT"] = slot
            report = await self.measure(ast, daemon, http_port)
            report["asterisk"] = asterisk_version(root)
            return report
        finally:
            for task in list(self.tasks):
                task.cancel()
            for phone in self.phones.values():
                phone.ua.close()
            await asyncio.to_thread(daemon.stop)
            await self.fcm.stop()
            await asyncio.to_thread(ast.stop)
            await asyncio.to_thread(redis.cleanup)

    async def measure(self, ast: AsteriskInstance, daemon: Daemon, http_port: int) -> dict[str, Any]:
        a = self.args
        never = set(self.rng.sample(range(a.devices), int(a.devices * a.never)))
        for i in range(a.devices):
            token = fcm_token(self.rng)
            ua = BenchUA(str(AOR_FIRST + i), ast.ports.sip)
            self.phones[token] = Phone(ua.user, ua, token, self.rng.randint(a.min_exp, a.max_exp), i not in never)
        with Meter({"daemon": daemon.pid}) as meter:
            t0 = time.monotonic()
            sem = asyncio.Semaphore(50)

            async def first(phone: Phone, at: float) -> None:
                await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
                async with sem:
                    await phone.ua.open()
                    if await phone.ua.register(push_params(phone.token), expires=phone.expires) == 200:
                        phone.registered_at = time.monotonic()
                    else:
                        self.errors += 1

            await asyncio.gather(*(first(p, self.rng.uniform(0, a.spread)) for p in self.phones.values()))
            registered = time.monotonic() - t0
            await asyncio.sleep(max(0.0, a.duration - registered))
        end = time.monotonic()
        await asyncio.sleep(a.settle)  # let the daemon judge the last contacts
        m = metrics(http_port)
        phones = list(self.phones.values())
        waking = [p for p in phones if p.wakes]
        sleepers = [p for p in phones if not p.wakes]
        # a sleeper's contact expires once; a waking phone's registration should never lapse
        lapsed = sum(1 for p in waking if p.expiry < end and not p.waking)
        return {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "devices": a.devices, "never_wake": len(sleepers), "expires_s": [a.min_exp, a.max_exp],
            "wake_delay_s": [a.wake_min, a.wake_max], "duration_s": a.duration,
            "registration_phase_s": round(registered, 1),
            "harness": {
                "refresh_pushes_received": self.pushes_received,
                "pushes_to_waking_phones": sum(len(p.pushes) for p in waking),
                "pushes_to_never_waking_phones": sum(len(p.pushes) for p in sleepers),
                "pushes_after_expiry": sum(p.late for p in phones),
                "re_registers_within_window": sum(p.in_window for p in waking),
                "waking_phones_whose_registration_lapsed": lapsed,
                "never_waking_phones_pushed_exactly_once": sum(1 for p in sleepers if len(p.pushes) == 1),
                "sip_errors": self.errors, "sip_retransmissions": BenchUA.retransmissions,
            },
            "daemon_metrics": m,
            "daemon_success_ratio": round(m.get("ari_push_refresh_reregistered_total", 0)
                                          / max(1.0, m.get('ari_push_refresh_pushes_total{result="delivered"}', 0)),
                                          3),
            "daemon": meter.report(),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--never", type=float, default=0.1, help="share of phones that never wake")
    p.add_argument("--min-exp", type=int, default=60)
    p.add_argument("--max-exp", type=int, default=180)
    p.add_argument("--spread", type=float, default=30.0, help="first registrations over this many seconds")
    p.add_argument("--wake-min", type=float, default=0.3)
    p.add_argument("--wake-max", type=float, default=3.0)
    p.add_argument("--min-interval", type=float, default=30.0, help="[refresh] min_interval of the daemon")
    p.add_argument("--duration", type=float, default=300.0)
    p.add_argument("--settle", type=float, default=10.0)
    p.add_argument("--index", type=int, default=7, help="rig port block (plus 10 x ARI_PUSH_RIG_SLOT)")
    p.add_argument("--seed", type=int, default=11)
    args = p.parse_args()
    print(json.dumps(asyncio.run(Bench(args).run()), indent=2))


if __name__ == "__main__":
    main()
