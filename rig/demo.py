"""`make demo`: a sleeping phone woken by a push, rung and bridged, against the seed recipe.

Everything is real except the push provider: a sandbox Asterisk 22 (instance "demo", ports of
index 5), Redis, the ari-push daemon (a subprocess, as in production) and SIP phones from
``rig.sipua``. The push goes through ari-push's real FCM HTTP v1 provider (OAuth2 service-account
flow included) to the strict local FCM of ``tests/fakes``, which hands it to the phone.

1. The phone 1001 registers with RFC 8599 push parameters; ari-push captures its token; the phone
   falls asleep (its socket closes; its contact stays registered in Asterisk, as with a real app).
2. Call 1: 2000 dials 1001 -> ``Stasis(ari-push,1001)``; the phone wakes ``--wake`` seconds after
   the push, re-registers, and is rung at once on its fresh contact; a timeline is printed live.
3. Call 2: 2000 dials ``*1001`` -> the seed recipe: push (``CURL()`` to a local relay), ``Wait(3)``,
   ``Dial(${PJSIP_DIAL_CONTACTS(1001)})``; same phone, same wake delay. Both are compared.

``--pbx freeswitch`` (``make demo PBX=freeswitch``) runs the same timeline on a sandbox FreeSWITCH
1.10.12 (the daemon on its event socket, the call parked for it) against the FreeSWITCH recipe:
push (``system`` curl to the local relay), ``sleep 2000``, ``bridge ${sofia_contact(1001@...)}``.

Every process it starts is stopped on exit, on Ctrl-C and on SIGTERM (see docs/demo.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rig.asterisk import AsteriskInstance, Ports
from rig.freeswitch import SIP_PASSWORD, FreeswitchInstance, FsPorts
from rig.freeswitch import recipe_dialplan as freeswitch_recipe
from rig.provision import ProvisionError, provision
from rig.redis import RedisServer, free_port
from rig.sipua import SipMessage, SipUA, parse

REPO = Path(__file__).resolve().parent.parent
PROJECT = "demo-project"
PHONE, CALLER = "1001", "2000"
RECIPE_PREFIX = "*"  # 2000 dials *1001 for the recipe, 1001 for ari-push (both in from-internal)


def recipe_dialplan(relay_port: int, wait: float = 3.0, dial_timeout: int = 10) -> str:
    """The seed-style recipe, appended to from-internal: ``*<aor>`` pushes, waits, dials the contacts.

    The push is a ``CURL()`` to a local relay (recipes call a push script with CURL() or
    System(curl ...)); the relay wakes the simulated phone. ``Ringing()`` gives the caller the
    same ringback ari-push gives, so only the waiting differs.
    """
    return "\n".join([
        "[from-internal]",
        f"exten => _{RECIPE_PREFIX}X.,1,NoOp(seed recipe: push, Wait({wait:g}), Dial for ${{EXTEN:1}})",
        " same => n,Ringing()",
        f" same => n,Set(PUSHED=${{CURL(http://127.0.0.1:{relay_port}/recipe-push/${{EXTEN:1}})}})",
        f" same => n,Wait({wait:g})",
        f" same => n,Dial(${{PJSIP_DIAL_CONTACTS(${{EXTEN:1}})}},{dial_timeout})",
        " same => n,NoOp(recipe: DIALSTATUS=${DIALSTATUS})",
        " same => n,Hangup()",
    ])


def fcm_token(rng: random.Random | None = None) -> str:
    """A token shaped like an FCM registration token (instance id, ':APA91b', 140 more)."""
    rng = rng or random.Random()
    alphabet = string.ascii_letters + string.digits + "-_"
    return "".join(rng.choice(alphabet) for _ in range(22)) + ":APA91b" + "".join(
        rng.choice(alphabet) for _ in range(134))


def push_params(token: str, project: str = PROJECT) -> str:
    return f"pn-provider=fcm;pn-prid={token};pn-param={project}"


def mask(token: str) -> str:
    from ari_push.model import mask as _mask

    return _mask(token)


# ---------------------------------------------------------------- local push services


class RecordingFcm:
    """The strict fake FCM of tests/fakes, telling a callback about every accepted send."""

    def __init__(self, on_push: Callable[[str, dict[str, Any], float], None]) -> None:
        from tests.fakes.fcm import FakeFcm, FcmRequest

        def on_send(request: FcmRequest) -> None:
            on_push(request.target, request.body["message"], time.monotonic())

        self.fake = FakeFcm(on_send=on_send)  # HTTP/2 over TLS, its own test CA

    @property
    def ca_file(self) -> str:
        """The CA the daemon must trust for this FCM ([[fcm]] ca_file)."""
        return str(self.fake.ca_file)

    async def start(self) -> str:
        """Start; returns the service-account JSON (token_uri pointing at the fake)."""
        await self.fake.start()
        return str(self.fake.add_project(PROJECT))

    @property
    def url(self) -> str:
        return str(self.fake.url)

    async def stop(self) -> None:
        await self.fake.stop()


class RecipeRelay:
    """What the recipe's CURL() calls: ``/recipe-push/<aor>``; tells a callback."""

    def __init__(self, on_push: Callable[[str, float], None]) -> None:
        self.on_push = on_push
        self.port = 0
        self._runner: Any = None

    async def start(self) -> None:
        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            self.on_push(request.match_info["aor"], time.monotonic())
            return web.Response(text="sent")

        app = web.Application()
        app.router.add_get("/recipe-push/{aor}", handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


# ---------------------------------------------------------------- the daemon as a subprocess


class DaemonProcess:
    """``python -m ari_push run`` in its own session; its log lines reach ``on_line``."""

    def __init__(self, config: Path, log_file: Path, on_line: Callable[[str, float], None] | None = None) -> None:
        self.config = config
        self.log_file = log_file
        self.on_line = on_line
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self) -> int:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("ARI_PUSH_CONFIG", None)
        env.pop("ARI_PUSH_RIG_SLOT", None)  # a rig variable: the daemon would refuse it as an unknown setting
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ari_push", "--config", str(self.config), "run"],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, env=env,
        )
        self._reader = threading.Thread(target=self._read, name="daemon-log", daemon=True)
        self._reader.start()
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_file, "ab") as out:
            for raw in self.proc.stdout:
                out.write(raw)
                out.flush()
                line = raw.decode(errors="replace").rstrip()
                self.lines.append(line)
                if self.on_line is not None:
                    self.on_line(line, time.monotonic())

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (the daemon drains and exits), SIGKILL of its process group as a last resort."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(2)
        self.proc = None


def wait_ready(url: str, timeout: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the ari-push daemon exited during start-up")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = exc.read().decode(errors="replace")[:300]
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"the ari-push daemon is not ready after {timeout:.0f}s: {last}")


def daemon_config(ast: AsteriskInstance | FreeswitchInstance, redis_url: str, http_port: int, service_account: Path,
                  fcm_url: str, prefix: str, default_timeout: float = 20.0, extra: str = "", ca_file: str = "") -> str:
    return (ast.daemon_config(redis_url) + f'key_prefix = "{prefix}"\n'
            f'[http]\nlisten = "127.0.0.1:{http_port}"\n'
            f"[calls]\ndefault_timeout = {default_timeout:g}\n"
            f"{extra}"
            f'[[fcm]]\nproject_id = "{PROJECT}"\nservice_account_file = "{service_account}"\n'
            f'api_url = "{fcm_url}"\n' + (f'ca_file = "{ca_file}"\n' if ca_file else ""))


# ---------------------------------------------------------------- a phone that reports what it sees


class TracingUA(SipUA):
    """A SipUA that reports every SIP message it sends or receives to ``observer``."""

    def __init__(self, user: str, server_port: int, observer: Callable[[TracingUA, str, SipMessage], None],
                 password: str = "") -> None:
        super().__init__(user, server_port, password=password)
        self.observer = observer

    def _on_message(self, msg: SipMessage) -> None:
        super()._on_message(msg)
        self.observer(self, "in", msg)

    def send(self, data: bytes, to: tuple[str, int] | None = None) -> None:
        super().send(data, to)
        self.observer(self, "out", parse(data))


# ---------------------------------------------------------------- the demo


@dataclass
class CallRecord:
    label: str
    t0: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)
    result: str = ""

    def mark(self, name: str, when: float) -> float:
        self.marks.setdefault(name, when)
        return when - self.t0

    def rel(self, name: str) -> float | None:
        t = self.marks.get(name)
        return None if t is None else t - self.t0


class Demo:
    def __init__(self, args: argparse.Namespace, out: Callable[[str], None]) -> None:
        self.args = args
        self.say = out
        self.workdir = Path(tempfile.mkdtemp(prefix="ari-push-demo-"))
        self.asterisk: AsteriskInstance | None = None
        self.freeswitch: FreeswitchInstance | None = None
        self.on_freeswitch = getattr(args, "pbx", "asterisk") == "freeswitch"
        self.pbx_name = "FreeSWITCH" if self.on_freeswitch else "Asterisk"
        self.recipe_name = "sleep 2000 recipe" if self.on_freeswitch else "Wait(3) recipe"
        self.redis: RedisServer | None = None
        self.daemon: DaemonProcess | None = None
        self.fcm: RecordingFcm | None = None
        self.relay: RecipeRelay | None = None
        self.uas: list[SipUA] = []
        self.call: CallRecord | None = None
        self.pushes: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
        self.daemon_status: asyncio.Queue[str] = asyncio.Queue()
        self.captured = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.token = fcm_token()
        self.phone: TracingUA

    # ------------------------------------------------------------ timeline

    def event(self, name: str, when: float, text: str) -> None:
        call = self.call
        if call is None or name in call.marks:
            return
        call.mark(name, when)
        self.say(f"   {when - call.t0:+7.3f} s  {text}")

    def on_sip(self, ua: TracingUA, direction: str, msg: SipMessage) -> None:
        when = msg.received if direction == "in" else time.monotonic()
        who = "caller" if ua.user == CALLER else "phone"
        if who == "caller":
            if direction == "out" and msg.method == "INVITE":
                self.event("invite", when, f"caller {CALLER} sends INVITE to {msg.uri.split(':')[1].split('@')[0]}")
            elif direction == "in" and msg.method == "INVITE" and msg.status == 180:
                self.event("ringback", when, "caller hears ringback (180 Ringing)")
            elif direction == "in" and msg.method == "INVITE" and msg.status in (401, 407):
                self.event("challenge", when, f"caller is challenged ({msg.status}) and sends the INVITE again "
                                              "with its credentials")
            elif direction == "in" and msg.method == "INVITE" and msg.status == 200:
                self.event("answered", when, "caller is answered (200 OK): the call is bridged")
            elif direction == "in" and msg.method == "INVITE" and msg.status > 200:
                self.event("failed", when, f"caller gets {msg.status} {msg.start.split(' ', 2)[-1]}: the call failed")
            elif direction == "in" and msg.method == "BYE":
                self.event("caller_bye", when, "caller gets the BYE: call over")
            return
        if direction == "out" and msg.method == "REGISTER" and msg.is_request:
            self.event("register", when, f"phone re-registers from its new socket (REGISTER, port {ua.port})")
        elif direction == "in" and msg.method == "REGISTER" and msg.status == 200:
            sent = self.call.marks.get("register", when) if self.call else when
            self.event("registered", when, f"registrar accepts it (200 OK, {1000 * (when - sent):.1f} ms)")
        elif direction == "in" and msg.is_request and msg.method == "INVITE":
            sent = self.call.marks.get("register") if self.call else None
            after = f", {1000 * (when - sent):.1f} ms after its REGISTER" if sent else ""
            tag = msg.header("X-Ari-Push-Call-Id")
            via = f" (X-Ari-Push-Call-Id {tag[:8]}…)" if tag else ""
            self.event("phone_invite", when, f"INVITE reaches the phone{after}{via}")
        elif direction == "out" and not msg.is_request and msg.method == "INVITE" and msg.status == 200:
            self.event("phone_answer", when, "phone answers (200 OK)")
        elif direction == "out" and msg.is_request and msg.method == "BYE":
            self.event("phone_bye", when, "phone hangs up (BYE)")

    def on_fcm(self, token: str, message: dict[str, Any], when: float) -> None:
        data = message.get("data", {})
        android = message.get("android", {})
        if data.get("type") == "call":
            self.pushes.put_nowait((token, when))
            self.event("push", when, f"ari-push pushes the phone: FCM HTTP v1, project {PROJECT}, token "
                                     f"{mask(token)}, priority {android.get('priority')}, "
                                     f"ttl {android.get('ttl')}")

    def on_relay(self, aor: str, when: float) -> None:
        self.pushes.put_nowait((aor, when))
        how = "system curl" if self.on_freeswitch else "CURL()"
        self.event("push", when, f"the recipe pushes the phone ({how} to its push script, aor {aor})")

    def on_daemon_line(self, line: str, when: float) -> None:
        if self.args.verbose:
            self.loop.call_soon_threadsafe(self.say, f"             daemon| {line[24:]}")
        if "captured fcm device" in line:
            self.loop.call_soon_threadsafe(self.captured.set)
        m = re.search(r"ended: ([A-Z_]+) after", line)
        if m:
            self.loop.call_soon_threadsafe(self.daemon_status.put_nowait, m.group(1))

    # ------------------------------------------------------------ set-up

    def step(self, n: int, text: str) -> None:
        self.say(f"[{n}/5] {text}")

    async def setup(self) -> None:
        args = self.args
        started = time.monotonic()
        self.step(1, "sandbox: Debian packages, the cached Asterisk 22 root and FreeSWITCH tree ...")
        root = await asyncio.to_thread(provision)
        from rig.provision import asterisk_version

        self.step(1, f"sandbox ready: Asterisk {asterisk_version(root)}, FreeSWITCH 1.10.12 "
                     f"({time.monotonic() - started:.1f} s)")

        self.fcm = RecordingFcm(self.on_fcm)
        service_account = await self.fcm.start()
        sa_file = self.workdir / "service-account.json"
        sa_file.write_text(service_account)
        sa_file.chmod(0o600)
        self.relay = RecipeRelay(self.on_relay)
        await self.relay.start()

        t = time.monotonic()
        if self.on_freeswitch:
            fs_ports = FsPorts.for_index(args.index)
            self.freeswitch = FreeswitchInstance.provisioned(
                args.name, fs_ports, users=(int(PHONE), int(CALLER)),
                extra_dialplan=freeswitch_recipe(self.relay.port, RECIPE_PREFIX, leg_timeout=10))
            await asyncio.to_thread(self.freeswitch.write_config)
            await asyncio.to_thread(self.freeswitch.start)
            pid = self.freeswitch.proc.pid if self.freeswitch.proc else 0
            self.step(2, f'FreeSWITCH instance "{self.freeswitch.name}" (pid {pid}): SIP 127.0.0.1:{fs_ports.sip}, '
                         f"event socket port {fs_ports.esl} ({time.monotonic() - t:.1f} s)")
        else:
            ports = Ports.for_index(args.index)
            self.asterisk = AsteriskInstance(root, args.name, ports, extra_dialplan=recipe_dialplan(self.relay.port))
            await asyncio.to_thread(self.asterisk.write_config)
            await asyncio.to_thread(self.asterisk.start)
            pid = self.asterisk.proc.pid if self.asterisk.proc else 0
            self.step(2, f'Asterisk instance "{args.name}" (pid {pid}): SIP 127.0.0.1:{ports.sip}, '
                         f"ARI {self.asterisk.ari_url}, AMI port {ports.ami} ({time.monotonic() - t:.1f} s)")

        self.redis = RedisServer(workdir=self.workdir / "redis")
        await asyncio.to_thread(self.redis.start)
        rpid = self.redis.proc.pid if self.redis.proc else 0
        self.step(3, f"Redis {self.redis.url} (pid {rpid}); local FCM HTTP v1 service {self.fcm.url} "
                     f"(OAuth2 + messages:send, project {PROJECT})")

        t = time.monotonic()
        http_port = free_port()
        config = self.workdir / "ari-push.toml"
        pbx = self.freeswitch or self.asterisk
        assert pbx is not None
        config.write_text(daemon_config(pbx, self.redis.url, http_port, sa_file, self.fcm.url, "demo:",
                                         ca_file=self.fcm.ca_file))
        self.daemon = DaemonProcess(config, self.workdir / "daemon.log", self.on_daemon_line)
        dpid = self.daemon.start()
        await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{http_port}/readyz", 30, self.daemon.running)
        links = "event socket" if self.on_freeswitch else "AMI, ARI"
        self.step(4, f"ari-push daemon (pid {dpid}) ready: {links} and Redis links up "
                     f"({time.monotonic() - t:.1f} s); log {self.workdir / 'daemon.log'}")

        phone = self.ua(PHONE)
        await phone.open()
        status = await phone.register(push_params(self.token))
        if status != 200:
            raise RuntimeError(f"the phone's REGISTER got {status}")
        async with asyncio.timeout(10):
            await self.captured.wait()
        self.step(5, f"phone {PHONE} registered with pn-provider=fcm;pn-prid={mask(self.token)};"
                     f"pn-param={PROJECT}; ari-push captured its token")
        phone.close()
        self.phone = phone
        self.say(f"      the phone falls asleep: its socket is closed, its contact (port {phone.port}) stays "
                 f"registered in {self.pbx_name}")

    def ua(self, user: str) -> TracingUA:
        if self.freeswitch is not None:  # directory users answer a digest challenge
            ua = TracingUA(user, self.freeswitch.ports.sip, self.on_sip, password=SIP_PASSWORD)
        else:
            assert self.asterisk is not None
            ua = TracingUA(user, self.asterisk.ports.sip, self.on_sip)
        self.uas.append(ua)
        return ua

    # ------------------------------------------------------------ one call

    async def run_call(self, label: str, dial: str, expect_status: bool) -> CallRecord:
        wake = self.args.wake
        rec = CallRecord(label)
        while not self.pushes.empty():
            self.pushes.get_nowait()
        while not self.daemon_status.empty():
            self.daemon_status.get_nowait()
        caller = self.ua(CALLER)
        await caller.open()
        self.call = rec
        rec.t0 = time.monotonic()
        answer = caller.start_call(dial, timeout=40)
        wake_task = asyncio.create_task(self.wake_on_push(wake))
        try:
            async with asyncio.timeout(40):
                resp = await answer
        finally:
            if not wake_task.done():
                wake_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await wake_task
        phone = self.phone
        if resp.status == 200:
            assert phone.rtp is not None and caller.rtp is not None
            await asyncio.gather(phone.rtp.send_for(1.0), caller.rtp.send_for(1.0))
            self.event("rtp", time.monotonic(), f"audio both ways through {self.pbx_name}: the phone received "
                                                f"{phone.rtp.received} RTP packets, the caller {caller.rtp.received}")
            await phone.hangup()
            async with asyncio.timeout(5):
                await caller.byes.get()
            rec.result = "ANSWERED"
        else:
            rec.result = f"FAILED ({resp.status})"
        if expect_status:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    rec.result = f"{rec.result}, PUSH_STATUS {await self.daemon_status.get()}"
        self.call = None
        caller.close()
        return rec

    async def wake_on_push(self, delay: float) -> None:
        """The phone's OS: the push arrives, the app wakes ``delay`` later, opens a new socket and
        re-registers (the same Contact parameters, a new port)."""
        _, pushed_at = await self.pushes.get()
        await asyncio.sleep(max(0.0, pushed_at + delay - time.monotonic()))
        rec = self.call
        if rec is not None:
            self.event("wake", time.monotonic(), f"phone wakes up ({delay:.2f} s after the push)")
        await self.phone.open()
        await self.phone.register()

    # ------------------------------------------------------------ the whole show

    async def run(self) -> int:
        await self.setup()
        wake = self.args.wake
        self.say("")
        take_over = f"park for ari-push (push_target={PHONE})" if self.on_freeswitch else f"Stasis(ari-push,{PHONE})"
        self.say(f"Call 1: {CALLER} dials {PHONE} -> {take_over}. The phone wakes {wake:.2f} s after its push.")
        first = await self.run_call("ari-push", PHONE, expect_status=True)
        self.say(f"   result: {first.result}, caller answered after {_secs(first.rel('answered'))}")

        self.phone.close()
        await asyncio.sleep(0.3)
        self.say("")
        if self.on_freeswitch:
            recipe = (f"push (system curl), sleep 2000, bridge ${{sofia_contact({PHONE}@...)}}")
            waited = "sleep 2000"
        else:
            recipe = f"push, Wait(3), Dial(${{PJSIP_DIAL_CONTACTS({PHONE})}},10)"
            waited = "Wait(3)"
        self.say(f"Call 2: the phone sleeps again; {CALLER} dials {RECIPE_PREFIX}{PHONE} -> the seed recipe "
                 f"({recipe}). Same wake delay.")
        second = await self.run_call(self.recipe_name, RECIPE_PREFIX + PHONE, expect_status=False)
        self.say(f"   result: {second.result}, caller answered after {_secs(second.rel('answered'))}"
                 if second.result == "ANSWERED" else f"   result: {second.result} after "
                 f"{_secs(second.rel('failed'))}: the phone woke after the recipe's {waited} and "
                 "was never rung")
        self.say("")
        self.compare(first, second)
        return 0

    def compare(self, a: CallRecord, b: CallRecord) -> None:
        rows = [
            ("push sent", "push"),
            ("phone re-registered (REGISTER)", "register"),
            ("INVITE reached the phone", "phone_invite"),
            ("caller answered (200 OK)", "answered"),
        ]
        self.say(f"   {'seconds after the call started':<34}{'ari-push':>12}{self.recipe_name:>20}")
        for title, key in rows:
            self.say(f"   {title:<34}{_cell(a.rel(key)):>12}{_cell(b.rel(key)):>20}")
        gaps = []
        for rec in (a, b):
            reg, inv = rec.rel("register"), rec.rel("phone_invite")
            gaps.append(f"{1000 * (inv - reg):.0f} ms" if reg is not None and inv is not None else "-")
        self.say(f"   {'re-REGISTER -> INVITE at the phone':<34}{gaps[0]:>12}{gaps[1]:>20}")
        self.say(f"   {'result':<34}{a.result.split(',')[0]:>12}{b.result.split(',')[0]:>20}")
        ta, tb = a.rel("answered"), b.rel("answered")
        if ta is not None and tb is not None and a.result.startswith("ANSWERED") and b.result == "ANSWERED":
            limit = "2 s" if self.on_freeswitch else "3 s"
            self.say(f"   ari-push answered {tb - ta:.2f} s sooner. With a phone slower than {limit} the recipe "
                     f"fails outright: try `make demo{' PBX=freeswitch' if self.on_freeswitch else ''} WAKE=4`.")
        elif ta is not None and a.result.startswith("ANSWERED") and b.result != "ANSWERED":
            dialled = "2" if self.on_freeswitch else "3"
            self.say(f"   ari-push answered at {ta:.2f} s; the recipe dialled at {dialled} s, found only the sleeping "
                     f"contact and the caller got {b.result.split()[-1].strip('()')} after "
                     f"{_secs(b.rel('failed'))}: " + ("the phone was awake and never rung."
                                                      if (b.rel("failed") or 0) > self.args.wake else
                                                      "it gave up before the phone was even awake."))

    # ------------------------------------------------------------ teardown

    async def aclose(self) -> None:
        for ua in self.uas:
            with contextlib.suppress(Exception):
                ua.close()
        for svc in (self.fcm, self.relay):
            if svc is not None:
                with contextlib.suppress(Exception):
                    await svc.stop()

    def stop_processes(self, keep_workdir: bool) -> None:
        """Stop every process started here; safe to call twice, at any point of start-up."""
        steps: list[tuple[str, Callable[[], None]]] = []
        if self.daemon is not None:
            steps.append(("ari-push daemon", self.daemon.stop))
        if self.redis is not None:
            steps.append(("Redis", self.redis.stop))
        if self.asterisk is not None:
            steps.append(("Asterisk", self.asterisk.stop))
        if self.freeswitch is not None:
            steps.append(("FreeSWITCH", self.freeswitch.stop))
        for name, stop in steps:
            try:
                stop()
            except Exception as exc:
                self.say(f"[demo] could not stop {name}: {exc}")
        if keep_workdir:
            self.say(f"[demo] logs kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _cell(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m rig demo", description=__doc__.split("\n")[0])
    parser.add_argument("--wake", type=float, default=1.2, help="seconds from the push to the phone's REGISTER")
    parser.add_argument("--pbx", choices=("asterisk", "freeswitch"), default="asterisk",
                        help="the PBX of the demo (make demo PBX=freeswitch)")
    parser.add_argument("--index", type=int, default=5, choices=(5, 6), help="port block of the PBX instance")
    parser.add_argument("--name", default="demo", help="PBX instance name (Asterisk: config dir /etc/asterisk-NAME)")
    parser.add_argument("--verbose", action="store_true", help="also print the daemon's log lines")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the demo needs root (the sandbox Asterisk runs in a chroot); run it as root", file=sys.stderr)
        return 2

    def say(text: str) -> None:
        print(text, flush=True)

    demo: Demo | None = None
    failed = True
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)

    async def run() -> int:
        nonlocal demo
        demo = Demo(args, say)
        try:
            return await demo.run()
        finally:
            await demo.aclose()

    say(f"ari-push demo: a sleeping Android phone ({PHONE}) is called by a desk phone ({CALLER}); Ctrl-C stops "
        "everything")
    try:
        code = asyncio.run(run())
        failed = code != 0
        return code
    except KeyboardInterrupt:
        failed = False
        say("\n[demo] interrupted: stopping everything it started ...")
        return 130
    except (ProvisionError, RuntimeError, TimeoutError, OSError) as exc:
        say(f"[demo] failed: {type(exc).__name__}: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if demo is not None:
            demo.stop_processes(keep_workdir=failed)
            say(f"[demo] stopped: {demo.pbx_name}, Redis and the daemon are gone")
        signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


__all__ = ["CallRecord", "DaemonProcess", "RecipeRelay", "RecordingFcm", "TracingUA", "daemon_config",
           "fcm_token", "push_params", "recipe_dialplan", "wait_ready"]
