"""Real SIP clients woken by a push: where the time goes. Measured, not part of the tests.

    ARI_PUSH_RIG_SLOT=N .venv/bin/python bench/real_clients.py [--rounds 7] [--awake 3] [--clients pjsua2,linphonec]
                                                              [--transports udp,tcp] [--json FILE]

The rig is the real one: a sandbox Asterisk 22 (port block of index 4), Redis, the ari-push daemon
as a subprocess (``python -m ari_push run``, as in production) with its real FCM HTTP v1 provider
pushing to the strict local FCM of tests/fakes. The phones are real SIP stacks run as their own
processes: PJSIP through pjsua2 (rig/pjsua_phone.py) and liblinphone through linphonec
(rig/linphone_phone.py), registering with RFC 8599 parameters.

Each round takes a fresh AOR and token: the client registers, the daemon captures its token, the
client is SIGKILLed (an app the OS ended: no un-REGISTER), the caller (rig/sipua.py) dials it;
as soon as the push reaches the local FCM a new client process is started (new port), re-registers,
is rung, auto-answers; the caller hangs up. Times per round, all from one monotonic clock:

  INVITE->push      caller's INVITE sent -> the daemon's push accepted by the local FCM
  push->REGISTER    push -> the new client process sends its REGISTER: the client's own start-up
                    (pjsua2: its onRegStarted callback; linphonec: the log line of the sent message)
  REGISTER->INVITE  that REGISTER -> the INVITE reaching the client (pjsua2: onIncomingCall;
                    linphonec: the log line of the packet's arrival, before liblinphone parses it)
  client answers    the INVITE reaching the client -> the caller's 200 OK (the client's 180/200
                    and Asterisk bridging)
  INVITE->200       caller's INVITE sent -> the caller's 200 OK (the whole call set-up)

Awake client (``--awake RUNS``, ``--awake-calls N``): one client process stays up, registered,
and does not react to pushes (an app in the foreground, a desktop client); it is called N times in
a row: the caller's INVITE -> the INVITE reaching the client, and -> the caller's 200 OK, per call
(the daemon rings a pushed device's old UDP contact only after ``[calls] stale_ring_delay`` unless
it saw the device answer there before; docs/architecture.md).

One round per client and transport is run first and not counted (the daemon's first FCM push also
fetches an OAuth2 access token).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rig.asterisk import TEST_AOR_FIRST, AsteriskInstance, Ports  # noqa: E402
from rig.demo import DaemonProcess, RecordingFcm, TracingUA, daemon_config, fcm_token, push_params  # noqa: E402
from rig.demo import wait_ready as wait_daemon_ready  # noqa: E402
from rig.linphone_phone import LinphonePhone  # noqa: E402
from rig.phone_proc import PhoneProcess  # noqa: E402
from rig.pjsua_phone import PjsuaPhone  # noqa: E402
from rig.provision import asterisk_version, provision  # noqa: E402
from rig.redis import RedisServer, free_port  # noqa: E402
from rig.sipua import SipMessage  # noqa: E402

CLIENTS: dict[str, type[PhoneProcess]] = {"pjsua2": PjsuaPhone, "linphonec": LinphonePhone}
STEPS = ("INVITE->push", "push->REGISTER", "REGISTER->INVITE", "client answers", "INVITE->200")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="ari-push-bench-clients-"))
        self.asterisk: AsteriskInstance | None = None
        self.redis: RedisServer | None = None
        self.daemon: DaemonProcess | None = None
        self.fcm = RecordingFcm(self._on_push)
        self.pushes: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
        self.captured: dict[str, asyncio.Event] = {}
        self.loop = asyncio.get_running_loop()
        self.next_aor = TEST_AOR_FIRST
        self.invite_sent = 0.0
        self.answered = 0.0

    def _on_push(self, token: str, message: dict[str, Any], when: float) -> None:
        if message.get("data", {}).get("type") == "call":
            self.pushes.put_nowait((token, when))

    def _on_daemon_line(self, line: str, when: float) -> None:
        m = re.search(r"captured fcm device \S+ of (\S+)", line)
        if m and m.group(1) in self.captured:
            self.loop.call_soon_threadsafe(self.captured[m.group(1)].set)

    def _on_sip(self, ua: TracingUA, direction: str, msg: SipMessage) -> None:
        if direction == "out" and msg.is_request and msg.method == "INVITE":
            self.invite_sent = time.monotonic()
        elif direction == "in" and not msg.is_request and msg.method == "INVITE" and msg.status == 200:
            self.answered = msg.received

    async def setup(self) -> None:
        root = await asyncio.to_thread(provision)
        sa_file = self.workdir / "service-account.json"
        sa_file.write_text(await self.fcm.start())
        sa_file.chmod(0o600)
        self.asterisk = AsteriskInstance(root, "bench-clients", Ports.for_index(self.args.index))
        await asyncio.to_thread(self.asterisk.write_config)
        await asyncio.to_thread(self.asterisk.start)
        self.redis = RedisServer(workdir=self.workdir / "redis")
        await asyncio.to_thread(self.redis.start)
        http_port = free_port()
        config = self.workdir / "ari-push.toml"
        config.write_text(daemon_config(self.asterisk, self.redis.url, http_port, sa_file, self.fcm.url,
                                        "bench-clients:", default_timeout=20, extra="[push]\nburst = 100\n"))
        self.daemon = DaemonProcess(config, self.workdir / "daemon.log", self._on_daemon_line)
        self.daemon.start()
        await asyncio.to_thread(wait_daemon_ready, f"http://127.0.0.1:{http_port}/readyz", 30, self.daemon.running)
        print(f"# Asterisk {asterisk_version(root)}, SIP 127.0.0.1:{self.asterisk.ports.sip}; "
              f"workdir {self.workdir}", flush=True)

    async def round(self, client: str, transport: str) -> dict[str, float]:
        assert self.asterisk is not None
        aor = str(self.next_aor)
        self.next_aor += 1
        token = fcm_token()
        self.captured[aor] = asyncio.Event()
        phone = CLIENTS[client](aor, self.asterisk.ports.sip, transport, push_params(token),
                                workdir=self.workdir / f"{client}-{aor}")
        caller = TracingUA("2000", self.asterisk.ports.sip, self._on_sip)
        try:
            await phone.start()
            await asyncio.wait_for(self.captured[aor].wait(), 10)
            await phone.kill()
            while not self.pushes.empty():
                self.pushes.get_nowait()
            await caller.open()
            self.invite_sent = self.answered = 0.0
            answer = caller.start_call(aor, timeout=30)
            pushed_token, pushed = await asyncio.wait_for(self.pushes.get(), 15)
            if pushed_token != token:
                raise RuntimeError("the push went to another token")
            registered = await phone.start()
            incoming = await phone.expect("incoming", 10)
            resp = await asyncio.wait_for(answer, 30)
            if resp.status != 200:
                raise RuntimeError(f"the caller got {resp.status}")
            await phone.expect("confirmed", 5)
            await caller.hangup()
            await phone.expect("disconnected", 10)
            return {
                "INVITE->push": pushed - self.invite_sent,
                "push->REGISTER": registered["sent"] - pushed,
                "REGISTER->INVITE": incoming["t"] - registered["sent"],
                "client answers": self.answered - incoming["t"],
                "INVITE->200": self.answered - self.invite_sent,
            }
        finally:
            caller.close()
            await phone.kill()
            shutil.rmtree(phone.workdir, ignore_errors=True)

    async def awake(self, client: str, transport: str, calls: int) -> list[dict[str, float]]:
        """One client process that stays up (and ignores pushes) called ``calls`` times in a row."""
        assert self.asterisk is not None
        aor = str(self.next_aor)
        self.next_aor += 1
        self.captured[aor] = asyncio.Event()
        phone = CLIENTS[client](aor, self.asterisk.ports.sip, transport, push_params(fcm_token()),
                                workdir=self.workdir / f"{client}-{aor}")
        rows = []
        try:
            await phone.start()
            await asyncio.wait_for(self.captured[aor].wait(), 10)
            for _ in range(calls):
                caller = TracingUA("2000", self.asterisk.ports.sip, self._on_sip)
                try:
                    await caller.open()
                    self.invite_sent = self.answered = 0.0
                    resp = await asyncio.wait_for(caller.call(aor, timeout=30), 35)
                    if resp.status != 200:
                        raise RuntimeError(f"the caller got {resp.status} from the awake {client}")
                    incoming = await phone.expect("incoming", 5)
                    await phone.expect("confirmed", 5)
                    await caller.hangup()
                    await phone.expect("disconnected", 10)
                    rows.append({"INVITE->INVITE at client": incoming["t"] - self.invite_sent,
                                 "INVITE->200": self.answered - self.invite_sent})
                finally:
                    caller.close()
                await asyncio.sleep(0.3)  # the daemon puts the contact back after the call
        finally:
            await phone.kill()
            shutil.rmtree(phone.workdir, ignore_errors=True)
        return rows

    async def run(self) -> dict[str, Any]:
        await self.setup()
        results: dict[str, Any] = {}
        for client in self.args.clients:
            for transport in self.args.transports:
                await self.round(client, transport)  # warm-up, not counted
                rows = [await self.round(client, transport) for _ in range(self.args.rounds)]
                key = f"{client} {transport}"
                results[key] = {step: [r[step] * 1000 for r in rows] for step in STEPS}
                print(summary_line(key, results[key]), flush=True)
        if self.args.awake:
            print("# awake client (stays up, does not re-register on a push), called "
                  f"{self.args.awake_calls} times in a row, {self.args.awake} runs: ms, median (min-max)")
            print(f"| {'client':<15} | {'call':<5} | {'INVITE->INVITE at client':<24} | {'INVITE->200':<17} |")
            for client in self.args.clients:
                for transport in self.args.transports:
                    runs = [await self.awake(client, transport, self.args.awake_calls)
                            for _ in range(self.args.awake)]
                    key = f"awake {client} {transport}"
                    results[key] = [{k: [run[i][k] * 1000 for run in runs] for k in runs[0][i]}
                                    for i in range(self.args.awake_calls)]
                    for i, by_step in enumerate(results[key]):
                        label = "1st" if i == 0 else f"{i + 1}th" if i > 2 else ("2nd", "3rd")[i - 1]
                        cells = [f"{statistics.median(v):8.1f} ({min(v):.0f}-{max(v):.0f})" for v in by_step.values()]
                        print(f"| {client + ' ' + transport:<15} | {label:<5} | {cells[0]:<24} | {cells[1]:<17} |",
                              flush=True)
        return results

    def stop(self, keep: bool = False) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        if self.redis is not None:
            self.redis.stop()
        if self.asterisk is not None:
            self.asterisk.stop()
        if keep:
            print(f"# logs kept in {self.workdir}", file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.fcm.stop()


def summary_line(key: str, steps: dict[str, list[float]]) -> str:
    cells = [f"{statistics.median(v):6.1f} ({min(v):.0f}-{max(v):.0f})" for v in steps.values()]
    return f"| {key:<15} | " + " | ".join(cells) + " |"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--clients", type=lambda s: s.split(","), default=list(CLIENTS))
    ap.add_argument("--transports", type=lambda s: s.split(","), default=["udp", "tcp"])
    ap.add_argument("--awake", type=int, default=3, help="runs of the awake-client calls (0: none)")
    ap.add_argument("--awake-calls", type=int, default=3, help="calls in a row per awake run")
    ap.add_argument("--index", type=int, default=4, help="Asterisk port block")
    ap.add_argument("--json", type=Path, help="write the raw per-round times (ms) here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (the sandbox Asterisk runs in a chroot)", file=sys.stderr)
        return 2
    print(f"# {args.rounds} rounds per client and transport (+1 warm-up); ms, median (min-max)")
    print("| client          | " + " | ".join(f"{s:<17}" for s in STEPS) + " |")
    bench: Bench | None = None

    async def go() -> dict[str, Any]:
        nonlocal bench
        bench = Bench(args)
        try:
            return await bench.run()
        finally:
            await bench.aclose()

    ok = False
    try:
        results = asyncio.run(go())
        ok = True
    finally:
        if bench is not None:
            bench.stop(keep=not ok)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
