"""End-to-end benchmark: real Asterisk 22 + Redis + the ari-push daemon + a local FCM, with
simulated phones that wake after a delay drawn from a distribution. Not part of the tests.

    .venv/bin/python bench/e2e.py [--only latency,answer,capacity,ingest,freeswitch] [--quick] [--traces on|off|both]

Sections (docs/performance.md has the results and how to read them):
  latency   re-REGISTER sent by the woken phone -> INVITE received by it, new-URI and same-URI wakes
  answer    time to answer for wake delays 0.3/1/2.5/4/8 s: ari-push vs the Wait(3) recipe, same run
  capacity  N calls waiting for a push at once (100, 500, 1000): completion, latencies, daemon CPU/RSS
  ingest    new-contact REGISTERs per second the capture path (AMI -> parse -> Redis -> signal) sustains
  freeswitch the same latency and time-to-answer rows on FreeSWITCH 1.10.12 against its `sleep 2000`
            recipe (bench/freeswitch_e2e.py, run from here after the Asterisk sections)

``--traces both`` runs the latency section in alternating blocks with call traces off and on
(the daemon restarted between blocks, ``--trace-rounds`` of each), to show what recording adds to
the caller's INVITE -> push (docs/operations.md, "Call traces").

The daemon runs as a subprocess (``python -m ari_push run``) so its CPU and peak RSS are its own.
Asterisk uses the port block of instance index 5 (another with --index 6) and, for the capacity
run, RTP ports 10000-14998. The harness (phones, callers, FCM) is one asyncio process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # freeswitch_e2e: the FreeSWITCH rows

from rig.asterisk import (  # noqa: E402
    AMI_SECRET,
    AMI_USER,
    TEST_AOR_COUNT,
    TEST_AOR_FIRST,
    AsteriskInstance,
    Ports,
)
from rig.demo import RecipeRelay, RecordingFcm, daemon_config, fcm_token, push_params, recipe_dialplan  # noqa: E402
from rig.demo import wait_ready as wait_daemon_ready  # noqa: E402
from rig.process import terminate  # noqa: E402
from rig.provision import asterisk_version, provision  # noqa: E402
from rig.redis import RedisServer, free_port  # noqa: E402
from rig.sipua import SipMessage, SipUA, build  # noqa: E402

BENCH_AOR_FIRST = 40000  # extra AORs for the capacity run, added through extra_pjsip
BENCH_AOR_COUNT = 1100
QUALIFY_TIMEOUT = 3.0  # s, with --qualify
RTP_PORTS = (10000, 14998)  # 2499 RTP sessions: a waiting call holds two (caller + the sleeping leg)
CALLER = "2000"
ANSWER_DELAYS = (0.3, 1.0, 2.5, 4.0, 8.0)
TICK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- small helpers


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[k]


def summary_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {"n": len(ms), "p50": pct(ms, 50), "p95": pct(ms, 95), "p99": pct(ms, 99),
            "max": max(ms) if ms else math.nan}


class Distribution:
    """``fixed:X``, ``uniform:A,B``, ``lognormal:MEDIAN,SIGMA`` or ``exp:MEAN`` (seconds)."""

    def __init__(self, spec: str, rng: random.Random) -> None:
        kind, _, args = spec.partition(":")
        self.spec = spec
        self.kind = kind
        self.args = [float(a) for a in args.split(",") if a]
        self.rng = rng
        if kind not in ("fixed", "uniform", "lognormal", "exp"):
            raise ValueError(f"unknown distribution {spec!r}")

    def draw(self) -> float:
        a = self.args
        if self.kind == "fixed":
            return a[0]
        if self.kind == "uniform":
            return self.rng.uniform(a[0], a[1])
        if self.kind == "lognormal":
            return min(60.0, self.rng.lognormvariate(math.log(a[0]), a[1]))
        return min(60.0, self.rng.expovariate(1 / a[0]))


@dataclass
class ProcSample:
    cpu: float  # seconds of CPU (user + system, all threads)
    rss_mb: float
    hwm_mb: float


def proc_sample(pid: int) -> ProcSample:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ProcSample(math.nan, math.nan, math.nan)
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)

    def mb(key: str) -> float:
        return int(fields.get(key, "0 kB").split()[0]) / 1024

    return ProcSample((int(stat[11]) + int(stat[12])) / TICK, mb("VmRSS"), mb("VmHWM"))


def machine_busy() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(v) - v[3] - v[4]) / TICK


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Meter:
    """CPU seconds and RSS of the daemon, Asterisk, Redis and this harness over one phase."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.start = {name: proc_sample(pid) for name, pid in pids.items()}
        self.harness0 = self_cpu()
        self.busy0 = machine_busy()
        self.load0 = os.getloadavg()[0]
        self.series: list[tuple[float, float]] = []  # (time, daemon CPU seconds)
        self.peak_rss: dict[str, float] = {name: s.rss_mb for name, s in self.start.items()}

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            for name, pid in self.pids.items():
                sample = proc_sample(pid)
                self.peak_rss[name] = max(self.peak_rss[name], sample.rss_mb)
                if name == "daemon":
                    self.series.append((time.monotonic(), sample.cpu))

    def daemon_cpu_between(self, t0: float, t1: float) -> float:
        """Daemon CPU % of one core between two instants (from the 0.25 s samples)."""
        inside = [(t, c) for t, c in self.series if t0 <= t <= t1]
        if len(inside) < 2:
            return math.nan
        return 100 * (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    async def _lag(self) -> None:
        """How late this harness's event loop wakes up: its own share of any latency measured."""
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.005)
            self.lags.append(time.monotonic() - t - 0.005)

    def __enter__(self) -> Meter:
        self.lags: list[float] = []
        # This harness is one Python process serving every phone, caller and the local FCM: a
        # collector pause of its own (up to ~280 ms measured at 1000 calls) would stamp the
        # pushes and INVITEs that arrive during it late, and count as the daemon's latency.
        # So its collector is off while a phase is measured (the daemon's is untouched).
        gc.collect()
        gc.freeze()
        gc.disable()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._sample()), loop.create_task(self._lag())]
        return self

    def __exit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        gc.enable()
        gc.unfreeze()
        self.elapsed = time.monotonic() - self.t0
        end = {name: proc_sample(pid) for name, pid in self.pids.items()}
        self.cpu_pct = {name: 100 * (end[name].cpu - self.start[name].cpu) / self.elapsed for name in self.pids}
        self.cpu_pct["harness"] = 100 * (self_cpu() - self.harness0) / self.elapsed
        self.cpu_pct["machine"] = 100 * (machine_busy() - self.busy0) / self.elapsed
        self.cpu_pct["others"] = self.cpu_pct["machine"] - sum(
            v for k, v in self.cpu_pct.items() if k not in ("machine",))
        self.hwm = {name: end[name].hwm_mb for name in self.pids}
        self.load1 = (self.load0, os.getloadavg()[0])

    def report(self) -> dict[str, Any]:
        return {"seconds": round(self.elapsed, 2),
                "cpu_percent": {k: round(v, 1) for k, v in self.cpu_pct.items()},
                "peak_rss_mb": {k: round(v, 1) for k, v in self.peak_rss.items()},
                "vm_hwm_mb": {k: round(v, 1) for k, v in self.hwm.items()},
                "loadavg_1min": [round(x, 2) for x in self.load1],
                "harness_loop_lag_ms": {"p50": round(pct(self.lags, 50) * 1000, 2),
                                        "p99": round(pct(self.lags, 99) * 1000, 2),
                                        "max": round(max(self.lags, default=0) * 1000, 2)}}


# ---------------------------------------------------------------- the rig


class Daemon:
    """The daemon as a subprocess in its own session, its log in a file."""

    def __init__(self, config: Path, log: Path, http_port: int) -> None:
        self.config, self.log, self.http_port = config, log, http_port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115
        env = dict(os.environ)
        env.pop("ARI_PUSH_CONFIG", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "ari_push", "--config", str(self.config), "run"],
                                     cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)
        out.close()
        wait_daemon_ready(f"http://127.0.0.1:{self.http_port}/readyz", 30, lambda: self.proc is not None
                          and self.proc.poll() is None)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=2) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
        return math.nan

    def stop(self) -> None:
        terminate(self.proc, 20)
        self.proc = None


class BenchUA(SipUA):
    """A SipUA that refuses INVITEs for another user (404), as a real phone does.

    With a thousand phones reopening sockets, the kernel hands out ports that other phones'
    stale contacts still point at; Asterisk's INVITEs to those sleeping contacts would otherwise be
    answered by whichever phone or caller got the port."""

    foreign = 0
    retransmissions = 0

    async def _request(self, method: str, uri: str, headers: list[tuple[str, str]], body: str = "",
                       timeout: float = 5.0, to: tuple[str, int] | None = None) -> SipMessage:
        """As SipUA's, plus RFC 3261 timer A over UDP (0.5, 1, 2, 4 s): a loaded Asterisk drops datagrams,
        and a real phone retransmits."""
        branch = uuid.uuid4().hex[:10]
        key = f"{branch}:{method}"
        fut: asyncio.Future[SipMessage] = asyncio.get_running_loop().create_future()
        self._waiters[key] = fut
        data = build(f"{method} {uri} SIP/2.0", [("Via", self._via(branch)), ("Max-Forwards", "70"), *headers], body)
        deadline = time.monotonic() + timeout
        interval = 0.5
        try:
            while True:
                self.send(data, to)
                wait = min(interval, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError(f"{method}: no answer in {timeout:g}s")
                done, _ = await asyncio.wait({fut}, timeout=wait)
                if done:
                    return fut.result()
                BenchUA.retransmissions += 1
                interval = min(2 * interval, 4.0)
        finally:
            self._waiters.pop(key, None)

    def _on_message(self, msg: SipMessage) -> None:
        if msg.is_request and msg.method == "INVITE" and not msg.uri.startswith(f"sip:{self.user}@"):
            BenchUA.foreign += 1
            self.send(self._response(msg, 404, "Not Found", "bench"), msg.source)
            return
        if msg.is_request and msg.method == "OPTIONS" and not msg.uri.startswith(f"sip:{self.user}@"):
            return  # another phone's qualify: any answer would make that sleeping phone Reachable
        super()._on_message(msg)


@dataclass
class Phone:
    aor: str
    ua: SipUA
    token: str
    port: int = 0
    used_ports: set[int] = field(default_factory=set)


@dataclass
class CallResult:
    approach: str  # ari-push | recipe
    aor: str
    wake: float
    same_uri: bool = False
    t0: float = 0.0
    push: float = math.nan  # seconds after t0
    register: float = math.nan
    invite: float = math.nan
    answer: float = math.nan
    registered: float = math.nan  # 200 OK to the re-REGISTER
    ami: float = math.nan  # Asterisk's AMI ContactStatus for the new contact (our own AMI session)
    captured: float = math.nan  # the daemon published the re-registration (Redis pub/sub, seen here)
    status: int = 0
    error: str = ""
    hangup: int = 0  # the final response to the phone's BYE
    caller_bye: bool = False  # the caller got the BYE (ari-push carried the hang-up across)
    invites: int = 0  # distinct INVITEs (SIP Call-IDs) the phone got after waking
    port_reused: bool = False  # woke on a port it had used before (same URI as an older contact)

    @property
    def answered(self) -> bool:
        return self.status == 200

    @property
    def added(self) -> float:
        """re-REGISTER sent -> INVITE received at the phone."""
        return self.invite - self.register


class Rig:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="ari-push-bench-"))
        self.rng = random.Random(args.seed)
        self.asterisk: AsteriskInstance | None = None
        self.redis: RedisServer | None = None
        self.daemon: Daemon | None = None
        self.fcm = RecordingFcm(self._on_fcm)
        self.relay = RecipeRelay(self._on_relay)
        self.phones: dict[str, Phone] = {}
        self.by_token: dict[str, str] = {}
        self.push_waiters: dict[str, asyncio.Future[float]] = {}
        self.capture_waiters: dict[str, asyncio.Future[float]] = {}
        self.captures: list[tuple[str, float]] = []
        self.prefix = "bench:"
        self._sub_task: asyncio.Task[None] | None = None
        self._ami_task: asyncio.Task[None] | None = None
        self.ami_seen: dict[str, float] = {}  # contact URI -> when our AMI session saw ContactStatus
        self.unreachable: set[str] = set()  # contact URIs Asterisk's qualify last found Unreachable (--qualify)
        self.leftovers: list[dict[str, Any]] = []
        self.sa_file = self.workdir / "service-account.json"
        self.traces = args.traces != "off"  # [traces] enabled for the next daemon start

    # ------------------------------------------------------------ push + capture observers

    def _on_fcm(self, token: str, message: dict[str, Any], when: float) -> None:
        if message.get("data", {}).get("type") != "call":
            return
        fut = self.push_waiters.get(self.by_token.get(token, ""))
        if fut is not None and not fut.done():
            fut.set_result(when)

    def _on_relay(self, aor: str, when: float) -> None:
        fut = self.push_waiters.get(aor)
        if fut is not None and not fut.done():
            fut.set_result(when)

    async def _subscribe(self) -> None:
        """Every capture the daemon publishes (``<prefix>registered:<aor>``), timestamped on arrival."""
        import redis.asyncio as aioredis

        assert self.redis is not None
        client = aioredis.Redis.from_url(self.redis.url)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        await pubsub.psubscribe(f"{self.prefix}registered:*")
        try:
            while True:
                msg = await pubsub.get_message(timeout=1.0)
                if msg is None:
                    continue
                now = time.monotonic()
                uri = json.loads(msg["data"]).get("contact_uri", "")
                self.captures.append((uri, now))
                fut = self.capture_waiters.pop(uri, None)
                if fut is not None and not fut.done():
                    fut.set_result(now)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
                await client.aclose()

    async def _ami_listen(self) -> None:
        """Our own AMI session: when Asterisk emitted ContactStatus for each new contact, to split
        the wake-up latency into Asterisk's part and the daemon's."""
        assert self.asterisk is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", self.asterisk.ports.ami)
        writer.write(f"Action: Login\r\nUsername: {AMI_USER}\r\nSecret: {AMI_SECRET}\r\nEvents: system\r\n\r\n"
                     .encode())
        await writer.drain()
        try:
            buf = b""
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                now = time.monotonic()
                buf += data
                *frames, buf = buf.split(b"\r\n\r\n")
                for frame in frames:
                    if b"Event: ContactStatus" not in frame:
                        continue
                    fields = dict(line.split(": ", 1) for line in frame.decode(errors="replace").split("\r\n")
                                  if ": " in line)
                    if fields.get("ContactStatus") in ("NonQualified", "Reachable"):
                        self.ami_seen.setdefault(fields.get("URI", ""), now)
                    if fields.get("ContactStatus") == "Unreachable":
                        self.unreachable.add(fields.get("URI", ""))
                    elif fields.get("ContactStatus") in ("Reachable", "Removed"):
                        self.unreachable.discard(fields.get("URI", ""))
        finally:
            writer.close()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        root = await asyncio.to_thread(provision)
        self.asterisk_version = asterisk_version(root)
        self.sa_file.write_text(await self.fcm.start())
        await self.relay.start()
        qualify = (f"qualify_frequency={self.args.qualify:g}\nqualify_timeout={QUALIFY_TIMEOUT:g}\n"
                   if self.args.qualify else "")
        extra = "\n".join(f"[{a}](phone-endpoint)\naors={a}\n[{a}](push-aor)\nminimum_expiration=1\n{qualify}"
                          for a in range(BENCH_AOR_FIRST, BENCH_AOR_FIRST + BENCH_AOR_COUNT))
        self.asterisk = AsteriskInstance(root, self.args.name, Ports.for_index(self.args.index),
                                         extra_dialplan=recipe_dialplan(self.relay.port, dial_timeout=10),
                                         extra_pjsip=extra, rtp_ports=RTP_PORTS,
                                         verbose=self.args.asterisk_verbose)
        await asyncio.to_thread(self.asterisk.write_config)
        for log in ("messages.log", "console.log"):  # -vvv at 1000 calls writes ~70 MB a run: keep only this one
            self.asterisk.host_path(f"/var/log/asterisk-{self.args.name}/{log}").unlink(missing_ok=True)
        await asyncio.to_thread(self.asterisk.start)
        self.redis = RedisServer(workdir=self.workdir / "redis")
        await asyncio.to_thread(self.redis.start)
        self._sub_task = asyncio.create_task(self._subscribe())
        self._ami_task = asyncio.create_task(self._ami_listen())
        await self.start_daemon()

    async def start_daemon(self) -> None:
        assert self.asterisk is not None and self.redis is not None
        if self.daemon is not None:
            await asyncio.to_thread(self.daemon.stop)
        port = free_port()
        config = self.workdir / "ari-push.toml"
        config.write_text(daemon_config(self.asterisk, self.redis.url, port, self.sa_file, self.fcm.url,
                                        self.prefix, default_timeout=60, ca_file=self.fcm.ca_file,
                                        extra="" if self.traces else "[traces]\nenabled = false\n"))
        self.daemon = Daemon(config, self.workdir / "daemon.log", port)
        await asyncio.to_thread(self.daemon.start)

    def push_metrics(self) -> list[str]:
        assert self.daemon is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{self.daemon.http_port}/metrics", timeout=2) as resp:
            return [line for line in resp.read().decode().splitlines()
                    if line.startswith(("ari_push_pushes_total", "ari_push_calls_total"))]

    @property
    def pids(self) -> dict[str, int]:
        assert self.asterisk is not None and self.asterisk.proc is not None and self.redis is not None
        assert self.redis.proc is not None and self.daemon is not None
        return {"daemon": self.daemon.pid, "asterisk": self.asterisk.proc.pid, "redis": self.redis.proc.pid}

    async def stop(self) -> None:
        for p in self.phones.values():
            p.ua.close()
        if self._ami_task is not None:
            self._ami_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await self._ami_task
        if self._sub_task is not None:
            self._sub_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sub_task
        await self.fcm.stop()
        await self.relay.stop()

    def stop_processes(self) -> None:
        if self.args.keep:
            print(f"[bench] work directory kept: {self.workdir}", file=sys.stderr)
        for stop in (self.daemon.stop if self.daemon else None, self.redis.stop if self.redis else None,
                     self.asterisk.stop if self.asterisk else None):
            if stop is not None:
                try:
                    stop()
                except Exception as exc:
                    print(f"[bench] clean-up: {exc}", file=sys.stderr)
        if not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------ phones

    async def phone(self, aor: str) -> Phone:
        """A phone registered with push parameters and captured by the daemon, then asleep."""
        assert self.asterisk is not None
        p = self.phones.get(aor)
        if p is None:
            token = fcm_token(self.rng)
            p = Phone(aor, BenchUA(aor, self.asterisk.ports.sip), token)
            self.phones[aor] = p
            self.by_token[token] = aor
        p.ua.close()
        await p.ua.open()
        if p.port:  # a clean start: drop the contact a previous round left (each costs a leg + RTP per call)
            p.ua.contact_params = push_params(p.token)
            old = p.ua.contact_uri.replace(f":{p.ua.port};", f":{p.port};")
            await p.ua.register(expires=0, contact_uri=old)
        while p.ua.port in p.used_ports:  # that URI may still be registered: a refresh, no new contact
            p.ua.close()
            await p.ua.open()
        p.port = p.ua.port
        p.used_ports.add(p.port)
        fut = asyncio.get_running_loop().create_future()
        p.ua.contact_params = push_params(p.token)
        self.capture_waiters[p.ua.contact_uri] = fut
        status = await p.ua.register(expires=600)
        if status != 200:
            raise RuntimeError(f"REGISTER of {aor} got {status}")
        async with asyncio.timeout(15):
            await fut
        self.ami_seen.pop(p.ua.contact_uri, None)
        p.ua.close()  # asleep; the contact stays registered
        return p

    async def phones_asleep(self, aors: list[str], parallel: int = 50) -> list[Phone]:
        sem = asyncio.Semaphore(parallel)

        async def one(aor: str) -> Phone:
            async with sem:
                return await self.phone(aor)

        return list(await asyncio.gather(*(one(a) for a in aors)))

    # ------------------------------------------------------------ one call

    async def call(self, phone: Phone, approach: str, wake: float, same_uri: bool = False, hold: float = 0.2,
                   on_push: Callable[[], None] | None = None,
                   barrier: asyncio.Future[float] | None = None) -> CallResult:
        """Call a sleeping phone; it wakes ``wake`` s after its push (or after ``barrier``'s time, when
        later), re-registers, answers, talks ``hold`` s and hangs up."""
        assert self.asterisk is not None
        r = CallResult(approach, phone.aor, wake, same_uri)
        ua = phone.ua
        ua.dialog = {}
        while not ua.invites.empty():
            ua.invites.get_nowait()
        caller = BenchUA(CALLER, self.asterisk.ports.sip)
        await caller.open()
        loop = asyncio.get_running_loop()
        pushed: asyncio.Future[float] = loop.create_future()
        self.push_waiters[phone.aor] = pushed
        r.t0 = time.monotonic()
        answer = caller.start_call(phone.aor if approach == "ari-push" else "*" + phone.aor, timeout=wake + 40)
        try:
            async with asyncio.timeout(20):
                push_at = await pushed
            r.push = push_at - r.t0
            if on_push is not None:
                on_push()
            if barrier is not None:
                push_at = max(push_at, await barrier)
            await asyncio.sleep(max(0.0, push_at + wake - time.monotonic()))
            try:
                await ua.open(phone.port if same_uri else 0)
            except OSError:  # the old port was taken meanwhile: a new URI after all
                await ua.open(0)
                r.error = "same port taken"
            r.port_reused = ua.port in phone.used_ports
            phone.port = ua.port
            phone.used_ports.add(ua.port)
            captured: asyncio.Future[float] = loop.create_future()
            contact = ua.contact_uri
            self.capture_waiters[contact] = captured
            captured.add_done_callback(lambda f: setattr(r, "captured", f.result() - r.t0)
                                       if not f.cancelled() else None)
            log_from = len(ua.log)
            self.ami_seen.pop(contact, None)  # an older registration of this URI (port reused) is not this one
            r.register = time.monotonic() - r.t0
            status = await ua.register(expires=600)
            r.registered = time.monotonic() - r.t0
            if status != 200:
                raise RuntimeError(f"re-REGISTER got {status}")
            invite_task = asyncio.ensure_future(ua.invites.get())
            done, _ = await asyncio.wait({invite_task, answer}, timeout=wake + 40,
                                         return_when=asyncio.FIRST_COMPLETED)
            if invite_task in done:
                r.invite = invite_task.result().received - r.t0
            else:
                invite_task.cancel()
            resp: SipMessage = await asyncio.wait_for(answer, wake + 40)
            seen = self.ami_seen.pop(contact, None)
            r.ami = seen - r.t0 if seen is not None else math.nan
            r.invites = len({m.header("Call-ID") for m in ua.log[log_from:] if m.is_request and m.method == "INVITE"})
            r.status = resp.status
            r.answer = resp.received - r.t0
            if resp.status == 200:
                await asyncio.sleep(hold)
                try:
                    r.hangup = await ua.hangup()
                except (TimeoutError, OSError, RuntimeError, KeyError) as exc:
                    r.error = f"hang-up: {type(exc).__name__}: {exc}"
                try:
                    await asyncio.wait_for(caller.byes.get(), 5)
                    r.caller_bye = True
                except TimeoutError:
                    pass
        except (TimeoutError, RuntimeError, OSError) as exc:
            r.error = r.error or f"{type(exc).__name__}: {exc}"
            if not answer.done():
                answer.cancel()
        finally:
            self.push_waiters.pop(phone.aor, None)
            self.capture_waiters.pop(ua.contact_uri, None)
            ua.close()
            caller.close()
        return r

    async def wait_no_channels(self, timeout: float = 30.0) -> int:
        """Channels still up after ``timeout`` (0: all calls cleaned up); their details go to leftovers."""
        assert self.asterisk is not None
        deadline = time.monotonic() + timeout
        left: list[Any] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                left = await asyncio.to_thread(self.asterisk.ari, "GET", "/ari/channels")  # type: ignore[assignment]
                if not left:
                    return 0
            await asyncio.sleep(0.5)
        self.leftovers = [{k: ch.get(k) for k in ("name", "state", "creationtime", "dialplan", "caller")}
                          for ch in left]
        return len(left)


# ---------------------------------------------------------------- sections


def breakdown(rs: list[CallResult]) -> dict[str, Any]:
    """Where re-REGISTER -> INVITE goes: Asterisk until its AMI ContactStatus (seen by our own AMI
    session), the daemon's capture until it published the registration (Redis pub/sub, seen here),
    and the rest (the call wakes, hangs up the old leg, originates; Asterisk sends the INVITE).
    Each split point is seen one hop late (AMI, pub/sub), so the parts are approximate."""
    c = [r for r in rs if not math.isnan(r.captured)]
    a = [r for r in c if not math.isnan(r.ami)]
    return {"register_to_200ok_ms": summary_ms([r.registered - r.register for r in rs]),
            "register_to_ami_ms": summary_ms([r.ami - r.register for r in a]),
            "ami_to_capture_ms": summary_ms([r.captured - r.ami for r in a]),
            "register_to_capture_ms": summary_ms([r.captured - r.register for r in c]),
            "capture_to_invite_ms": summary_ms([r.invite - r.captured for r in c])}


def test_aors(n: int, first: int = 0) -> list[str]:
    if first + n > TEST_AOR_COUNT:
        raise ValueError("not enough rig AORs")
    return [str(TEST_AOR_FIRST + i) for i in range(first, first + n)]


def bench_aors(n: int) -> list[str]:
    if n > BENCH_AOR_COUNT:
        raise ValueError(f"at most {BENCH_AOR_COUNT} bench AORs")
    return [str(BENCH_AOR_FIRST + i) for i in range(n)]


async def section_latency(rig: Rig, calls: int, parallel: int, dist: Distribution) -> dict[str, Any]:
    """``calls`` wakes of each kind; ``parallel`` calls at a time. The calls go round 40 phones, so that
    no phone is called more than 5 times (the daemon's default per-device push limit: a burst of 5,
    then 10 a minute)."""
    aors = test_aors(max(40, math.ceil(2 * calls / 5)), 0)
    await rig.phones_asleep(aors)
    results: list[CallResult] = []
    jobs = [(aors[i % len(aors)], i % 2 == 1) for i in range(2 * calls)]  # alternate new/same URI
    jobs.reverse()
    busy: set[str] = set()

    async def worker() -> None:
        while jobs:
            aor, same = jobs.pop()
            if aor in busy:  # another worker is calling it: take the next one
                jobs.insert(0, (aor, same))
                await asyncio.sleep(0.05)
                continue
            busy.add(aor)
            try:
                results.append(await rig.call(rig.phones[aor], "ari-push", dist.draw(), same_uri=same))
            finally:
                busy.discard(aor)
            await asyncio.sleep(0.2)

    with Meter(rig.pids) as meter:
        await asyncio.gather(*(worker() for _ in range(parallel)))
    out: dict[str, Any] = {"wake_distribution": dist.spec, "parallel": parallel, "meter": meter.report()}
    for same, label in ((False, "new_uri"), (True, "same_uri")):
        rs = [r for r in results if r.same_uri is same]
        ok = [r for r in rs if r.answered and not math.isnan(r.invite)]
        out[label] = {
            "calls": len(rs), "answered": sum(r.answered for r in rs),
            "reregister_to_invite_ms": summary_ms([r.added for r in ok]),
            **breakdown(ok),
            "call_to_push_ms": summary_ms([r.push for r in rs if not math.isnan(r.push)]),
            "call_to_push_raw_ms": [r.push for r in rs if not math.isnan(r.push)],
            # time to answer minus the wake delay: what ari-push adds to the phone's own wake-up
            "answer_after_wake_ms": summary_ms([r.answer - r.push - r.wake for r in ok if not math.isnan(r.push)]),
            "failures": [asdict(r) for r in rs if not r.answered][:10],
        }
    return out


async def section_traces(rig: Rig, args: argparse.Namespace) -> dict[str, Any]:
    """The latency section in alternating blocks, call traces off then on, the daemon restarted
    before each block; call -> push compared over all blocks of each mode."""
    raw: dict[str, list[float]] = {"off": [], "on": []}
    blocks = []
    for round_ in range(args.trace_rounds):
        for mode in ("off", "on"):
            rig.traces = mode == "on"
            await rig.start_daemon()
            r = await section_latency(rig, args.latency_calls, args.latency_parallel,
                                      Distribution(args.latency_wake, random.Random(args.seed + round_)))
            pushes = r["new_uri"]["call_to_push_raw_ms"] + r["same_uri"]["call_to_push_raw_ms"]
            raw[mode] += pushes
            s = summary_ms(pushes)
            blocks.append({"round": round_, "traces": mode, "calls": len(pushes), "call_to_push_ms": s,
                           "answered": r["new_uri"]["answered"] + r["same_uri"]["answered"]})
            print(f"  traces {mode} (round {round_ + 1}): {len(pushes)} calls, caller INVITE -> push p50 "
                  f"{s['p50']:.1f} p95 {s['p95']:.1f} p99 {s['p99']:.1f} ms", flush=True)
    out = {"blocks": blocks, **{mode: summary_ms(v) for mode, v in raw.items()}}
    for mode in ("off", "on"):
        s = out[mode]
        print(f"traces {mode}: {len(raw[mode])} calls, caller INVITE -> push p50 {s['p50']:.1f} p95 {s['p95']:.1f} "
              f"p99 {s['p99']:.1f} ms", flush=True)
    return out


async def section_answer(rig: Rig, per_delay: int, delays: tuple[float, ...]) -> dict[str, Any]:
    aors = test_aors(2 * per_delay, 80)
    await rig.phones_asleep(aors)
    out: dict[str, Any] = {"per_delay": per_delay, "recipe": "Ringing, CURL push, Wait(3), "
                           "Dial(${PJSIP_DIAL_CONTACTS(aor)},10)", "delays": {}}
    all_results: list[dict[str, Any]] = []
    # One call first, not counted: the daemon's first FCM push fetches an OAuth2 access token (once an hour).
    await rig.call(rig.phones[aors[0]], "ari-push", 0.1)

    async def staggered(i: int, aor: str, delay: float) -> CallResult:
        await asyncio.sleep(0.15 * i)  # not all at the same instant: phones do not wake in lockstep
        return await rig.call(rig.phones[aor], "ari-push" if i % 2 == 0 else "recipe", delay, hold=0.2)

    with Meter(rig.pids) as meter:
        for delay in delays:
            results = await asyncio.gather(*(staggered(i, aor, delay) for i, aor in enumerate(aors)))
            row: dict[str, Any] = {}
            for approach in ("ari-push", "recipe"):
                rs = [r for r in results if r.approach == approach]
                ok = [r.answer for r in rs if r.answered]
                row[approach] = {"answered": len(ok), "calls": len(rs),
                                 "time_to_answer_s": {"p50": pct(ok, 50), "p95": pct(ok, 95), "max":
                                                      max(ok) if ok else math.nan},
                                 "failed_after_s": [round(r.answer, 2) for r in rs if not r.answered],
                                 "statuses": sorted({r.status for r in rs})}
                all_results += [asdict(r) for r in rs]
            out["delays"][str(delay)] = row
            print(f"  wake {delay:>4} s: ari-push {row['ari-push']['answered']}/{per_delay} answered, p50 "
                  f"{row['ari-push']['time_to_answer_s']['p50']:.2f} s; recipe {row['recipe']['answered']}/"
                  f"{per_delay}, p50 {row['recipe']['time_to_answer_s']['p50']:.2f} s", flush=True)
            await rig.wait_no_channels(20)
    out["meter"] = meter.report()
    out["calls"] = all_results
    return out


async def section_capacity(rig: Rig, n: int, dist: Distribution, ramp: float, hold: float) -> dict[str, Any]:
    """``n`` sleeping phones; ``n`` calls placed at ``ramp`` calls/s. No phone wakes before every call has
    been pushed (all ``n`` wait at once); then each wakes after a delay drawn from ``dist``, answers,
    talks ``hold`` s and hangs up. A fresh daemon process per level: its peak RSS is this level's."""
    await rig.start_daemon()
    aors = bench_aors(n)
    t = time.monotonic()
    await rig.phones_asleep(aors, parallel=100)
    registered_in = time.monotonic() - t
    if rig.args.qualify:  # the calls start once Asterisk's qualify has found every sleeping phone
        uris = {rig.phones[a].ua.contact_uri for a in aors}
        deadline = time.monotonic() + rig.args.qualify + QUALIFY_TIMEOUT + 60
        while not uris <= rig.unreachable and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        print(f"  qualify: {len(uris & rig.unreachable)}/{len(uris)} sleeping contacts Unreachable after "
              f"{time.monotonic() - t - registered_in:.0f} s", flush=True)
    idle = proc_sample(rig.pids["daemon"])
    waiting_peak = 0.0
    loop = asyncio.get_running_loop()
    barrier: asyncio.Future[float] = loop.create_future()
    pushed = 0

    def on_push() -> None:
        nonlocal pushed
        pushed += 1
        if pushed == n and not barrier.done():
            barrier.set_result(time.monotonic())

    async def poll_waiting() -> None:
        nonlocal waiting_peak
        while True:
            with contextlib.suppress(Exception):
                waiting_peak = max(waiting_peak, await asyncio.to_thread(rig.daemon.metric,  # type: ignore[union-attr]
                                                                         "ari_push_calls_waiting"))
            await asyncio.sleep(0.5)

    async def placed(i: int, aor: str) -> CallResult:
        await asyncio.sleep(i / ramp)
        return await rig.call(rig.phones[aor], "ari-push", dist.draw(), hold=hold, on_push=on_push, barrier=barrier)

    poller = asyncio.create_task(poll_waiting())
    with Meter(rig.pids) as meter:
        start = time.monotonic()
        results = await asyncio.gather(*(placed(i, a) for i, a in enumerate(aors)))
    poller.cancel()
    left = await rig.wait_no_channels(30)
    leftovers, rig.leftovers = rig.leftovers, []
    ok = [r for r in results if r.answered]
    errors: dict[str, int] = {}
    for r in results:
        if not r.answered:
            key = r.error.split(":")[0] or f"status {r.status}"
            errors[key] = errors.get(key, 0) + 1
    all_pushed = barrier.result() if barrier.done() else math.nan
    first_wake = min((r.t0 + r.register for r in results if not math.isnan(r.register)), default=math.nan)
    last_answer = max((r.t0 + r.answer for r in ok), default=math.nan)
    return {
        "calls": n, "answered": len(ok), "ramp_calls_per_s": ramp, "wake_distribution": dist.spec,
        "hold_s": hold, "registered_in_s": round(registered_in, 1), "peak_waiting": waiting_peak,
        "channels_left": left, "leftover_channels": leftovers[:6], "errors": errors,
        "windows_s": {"placing": round(all_pushed - start, 1), "all_waiting": round(first_wake - all_pushed, 1),
                      "waking": round(last_answer - first_wake, 1)},
        "daemon_cpu_percent": {"placing": round(meter.daemon_cpu_between(start, all_pushed), 1),
                               "all_waiting": round(meter.daemon_cpu_between(all_pushed, first_wake), 1),
                               "waking": round(meter.daemon_cpu_between(first_wake, last_answer), 1)},
        "daemon_cpu_ms_per_call": round(1000 * (meter.cpu_pct["daemon"] / 100 * meter.elapsed) / n, 2),
        "call_to_push_ms": summary_ms([r.push for r in results if not math.isnan(r.push)]),
        "reregister_to_invite_ms": summary_ms([r.added for r in ok if not math.isnan(r.invite)]),
        **breakdown([r for r in ok if not math.isnan(r.invite)]),
        "wake_to_answer_ms": summary_ms([r.answer - r.register for r in ok]),
        "daemon_idle_rss_mb": round(idle.rss_mb, 1),
        "meter": meter.report(),
        "failures": [asdict(r) for r in results if not r.answered][:20],
        "hangup_not_carried": [asdict(r) for r in ok if not r.caller_bye][:10],
        "daemon_push_metrics": await asyncio.to_thread(rig.push_metrics),
        "fcm_refusals": [*rig.fcm.fake.refusals[-5:], *rig.fcm.fake.token_refusals[-5:]],
        "foreign_invites_refused": BenchUA.foreign,
        "sip_retransmissions": BenchUA.retransmissions,
    }


async def section_ingest(rig: Rig, rates: list[int], seconds: float, ues: int) -> dict[str, Any]:
    """Open-loop REGISTERs with a new Contact URI each (what Asterisk reports and ari-push captures):
    per offered rate, REGISTER -> 200 OK and REGISTER -> capture published (Redis pub/sub) latency."""
    assert rig.asterisk is not None
    aors = test_aors(ues, 0)
    probe_phones = await rig.phones_asleep(test_aors(24, ues))
    uas = []
    for aor in aors:
        ua = BenchUA(aor, rig.asterisk.ports.sip)
        await ua.open()
        uas.append((aor, ua, fcm_token(rig.rng)))
    seq = 0
    steps = []
    for rate in rates:
        sent: dict[str, float] = {}
        reg_lat: list[float] = []
        failures = 0
        rig.captures.clear()
        tasks: set[asyncio.Task[None]] = set()

        async def one(ua: SipUA, uri: str, sent: dict[str, float] = sent, reg_lat: list[float] = reg_lat) -> None:
            nonlocal failures
            t0 = time.monotonic()
            sent[uri] = t0
            try:
                status = await ua.register(expires=600, contact_uri=uri)
            except TimeoutError:
                failures += 1
                return
            if status == 200:
                reg_lat.append(time.monotonic() - t0)
            else:
                failures += 1

        probes: list[CallResult] = []
        sent_all = asyncio.Event()

        async def probe(phones: list[Phone], probes: list[CallResult] = probes,
                        sent_all: asyncio.Event = sent_all) -> None:
            """Calls to sleeping phones during the storm: does a wake-up wait behind the captures?
            (round a few phones: the daemon limits pushes per device, 5 at once then 10 a minute)"""
            while not sent_all.is_set():
                phone = phones.pop(0)
                phones.append(phone)
                probes.append(await rig.call(phone, "ari-push", 0.2, hold=0.1))
                await asyncio.sleep(0.5)

        probe_tasks = [asyncio.create_task(probe(probe_phones[i::2])) for i in range(2)]
        with Meter(rig.pids) as meter:
            start = time.monotonic()
            total = int(rate * seconds)
            for i in range(total):
                target = start + i / rate
                delay = target - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                aor, ua, token = uas[i % len(uas)]
                seq += 1
                uri = f"sip:{aor}@127.0.0.1:{20000 + seq % 40000};transport=udp;{push_params(token)};x-seq={seq}"
                task = asyncio.create_task(one(ua, uri))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            send_done = time.monotonic() - start
            sent_all.set()
            await asyncio.gather(*tasks, *probe_tasks)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and len({u for u, _ in rig.captures if u in sent}) < len(sent):
                await asyncio.sleep(0.2)
        captured = {u: t for u, t in rig.captures if u in sent}
        lat = [captured[u] - sent[u] for u in captured]
        ami = {u: rig.ami_seen.pop(u) for u in list(sent) if u in rig.ami_seen}
        ami_lat = [ami[u] - sent[u] for u in ami]
        ami_to_cap = [captured[u] - ami[u] for u in ami if u in captured]
        last = max(captured.values()) if captured else start
        step = {"offered_per_s": rate, "sent": len(sent), "send_seconds": round(send_done, 2),
                "register_failures": failures, "captured": len(captured),
                "captured_per_s": round(len(captured) / max(last - start, 1e-9), 1),
                "register_to_200_ms": summary_ms(reg_lat), "register_to_capture_ms": summary_ms(lat),
                "register_to_ami_ms": summary_ms(ami_lat), "ami_to_capture_ms": summary_ms(ami_to_cap),
                "probe_calls": len(probes), "probe_answered": sum(r.answered for r in probes),
                "probe_failures": [asdict(r) for r in probes if not r.answered][:5],
                "probe_reregister_to_invite_ms": summary_ms([r.added for r in probes
                                                             if r.answered and not math.isnan(r.invite)]),
                "meter": meter.report()}
        steps.append(step)
        print(f"  {rate:>5}/s offered: {len(captured)}/{len(sent)} captured at {step['captured_per_s']}/s, "
              f"capture p50 {step['register_to_capture_ms']['p50']:.1f} ms p99 "
              f"{step['register_to_capture_ms']['p99']:.1f} ms, 200 OK p99 {step['register_to_200_ms']['p99']:.1f}"
              f" ms, daemon CPU {step['meter']['cpu_percent']['daemon']:.0f}%, asterisk "
              f"{step['meter']['cpu_percent']['asterisk']:.0f}%, "
              f"harness {step['meter']['cpu_percent']['harness']:.0f}%; wake-ups meanwhile: re-REGISTER -> INVITE "
              f"p50 {step['probe_reregister_to_invite_ms']['p50']:.1f} ms max "
              f"{step['probe_reregister_to_invite_ms']['max']:.1f} ms ({step['probe_answered']}/{step['probe_calls']})",
              flush=True)
        await asyncio.sleep(2)
    for _, ua, _ in uas:
        ua.close()
    return {"ues": ues, "seconds_per_step": seconds, "steps": steps,
            "note": "each REGISTER carries a new Contact URI (a new contact: ContactStatus -> capture); "
                    "a refresh of an unchanged URI emits no AMI event and costs ari-push nothing"}


# ---------------------------------------------------------------- output


def machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        mem = f"{int(Path('/proc/meminfo').read_text().split()[1]) / 1048576:.1f} GiB"
    redis_v = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip()
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "ari_push"], capture_output=True,
                           text=True).stdout.split("\n")
    return {"git": git.stdout.strip(), "ari_push_uncommitted": [d.strip() for d in dirty if d.strip()],
            "cpu": cpu, "cores": os.cpu_count(), "memory": mem, "kernel": platform.release(),
            "python": platform.python_version(), "redis": redis_v.split()[2] if redis_v else "?",
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def _f(v: float, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    """The tables of docs/performance.md, from one results JSON."""
    out: list[str] = []
    if "latency" in results:
        lat = results["latency"]
        out += ["| wake | calls answered | re-REGISTER -> INVITE p50 / p95 / p99 / max (ms) | REGISTER -> 200 OK p50 / "
                "p99 | REGISTER -> AMI event (Asterisk) p50 / p99 | AMI event -> capture published (ari-push) p50 / "
                "p99 | capture -> INVITE p50 / p99 | caller INVITE -> push received p50 / p99 | time to answer - wake "
                "delay p50 / p99 |", "|---|---|---|---|---|---|---|---|---|"]
        for key, label in (("new_uri", "new URI (new port)"), ("same_uri", "same URI (same port)")):
            x = lat[key]
            a = x["reregister_to_invite_ms"]
            cells = " | ".join(f"{_f(y.get('p50', math.nan))} / {_f(y.get('p99', math.nan))}" for y in (
                x["register_to_200ok_ms"], x.get("register_to_ami_ms", {}), x.get("ami_to_capture_ms", {}),
                x["capture_to_invite_ms"], x.get("call_to_push_ms", {}), x.get("answer_after_wake_ms", {})))
            out.append(f"| {label} | {x['answered']}/{x['calls']} | {_f(a['p50'])} / {_f(a['p95'])} / {_f(a['p99'])} / "
                       f"{_f(a['max'])} | {cells} |")
        out.append("")
    if "answer" in results:
        ans = results["answer"]
        out += ["| wake delay | ari-push answered | ari-push time to answer p50 / max (s) | recipe answered | "
                "recipe time to answer p50 / max (s) | recipe failures (s after the call started) |",
                "|---|---|---|---|---|---|"]
        for d, row in ans["delays"].items():
            a, r = row["ari-push"], row["recipe"]
            fails = ", ".join(f"{x:.1f}" for x in r["failed_after_s"][:3]) + ("…" if len(r["failed_after_s"]) > 3
                                                                               else "")
            out.append(f"| {float(d):g} s | {a['answered']}/{a['calls']} | {_f(a['time_to_answer_s']['p50'], 2)} / "
                       f"{_f(a['time_to_answer_s']['max'], 2)} | {r['answered']}/{r['calls']} | "
                       f"{_f(r['time_to_answer_s']['p50'], 2)} / {_f(r['time_to_answer_s']['max'], 2)} | "
                       f"{fails or '-'} |")
        out.append("")
    if "capacity" in results:
        out += ["| calls waiting at once | answered | peak waiting (daemon gauge) | daemon peak RSS (MB) | daemon CPU "
                "placing / all waiting / waking (% of a core) | daemon CPU per call (ms) | call -> push p50 / p99 (ms) "
                "| re-REGISTER -> INVITE p50 / p99 (ms) | Asterisk CPU / peak RSS | others' CPU |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for c in results["capacity"]:
            m, w = c["meter"], c["daemon_cpu_percent"]
            out.append(f"| {c['calls']} | {c['answered']}/{c['calls']} | {c['peak_waiting']:.0f} | "
                       f"{_f(m['vm_hwm_mb']['daemon'])} (idle {c['daemon_idle_rss_mb']}) | "
                       f"{_f(w['placing'])} / {_f(w['all_waiting'])} / {_f(w['waking'])} | "
                       f"{c['daemon_cpu_ms_per_call']} | {_f(c['call_to_push_ms']['p50'])} / "
                       f"{_f(c['call_to_push_ms']['p99'])} | {_f(c['reregister_to_invite_ms']['p50'])} / "
                       f"{_f(c['reregister_to_invite_ms']['p99'])} | {_f(m['cpu_percent']['asterisk'], 0)}% / "
                       f"{_f(m['vm_hwm_mb']['asterisk'], 0)} MB | {_f(m['cpu_percent']['others'], 0)}% |")
        out.append("")
        out += ["| calls waiting at once | REGISTER -> 200 OK p50 / p99 | REGISTER -> AMI event (Asterisk) p50 / p99 | "
                "AMI event -> capture published (ari-push) p50 / p99 | capture -> INVITE p50 / p99 | "
                "re-REGISTER -> INVITE p50 / p95 / p99 (ms) |", "|---|---|---|---|---|---|"]
        for c in results["capacity"]:
            parts = [c.get(k, {}) for k in ("register_to_200ok_ms", "register_to_ami_ms", "ami_to_capture_ms",
                                            "capture_to_invite_ms")]
            cells = " | ".join(f"{_f(x.get('p50', math.nan))} / {_f(x.get('p99', math.nan))}" for x in parts)
            t = c["reregister_to_invite_ms"]
            out.append(f"| {c['calls']} | {cells} | {_f(t['p50'])} / {_f(t['p95'])} / {_f(t['p99'])} |")
        out.append("")
    if "ingest" in results:
        out += ["| offered REGISTER/s | captured | captured/s | REGISTER -> capture p50 / p99 (ms) | of which Asterisk "
                "(REGISTER -> AMI event) p50 / p99 | of which ari-push (AMI event -> capture published) p50 / p99 | "
                "REGISTER -> 200 OK p99 (ms) | wake-ups meanwhile: re-REGISTER -> INVITE p50 / max (ms) | daemon CPU | "
                "Asterisk CPU | harness CPU | others' CPU |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for st in results["ingest"]["steps"]:
            c, m, pr = st["register_to_capture_ms"], st["meter"]["cpu_percent"], st["probe_reregister_to_invite_ms"]
            am, ac = st.get("register_to_ami_ms", {}), st.get("ami_to_capture_ms", {})
            out.append(f"| {st['offered_per_s']} | {st['captured']}/{st['sent']} | {st['captured_per_s']:.0f} | "
                       f"{_f(c['p50'])} / {_f(c['p99'])} | {_f(am.get('p50', math.nan))} / "
                       f"{_f(am.get('p99', math.nan))} | {_f(ac.get('p50', math.nan))} / "
                       f"{_f(ac.get('p99', math.nan))} | "
                       f"{_f(st['register_to_200_ms']['p99'])} | "
                       f"{_f(pr['p50'])} / {_f(pr['max'])} ({st['probe_answered']}/{st['probe_calls']}) | "
                       f"{_f(m['daemon'], 0)}% | {_f(m['asterisk'], 0)}% | {_f(m['harness'], 0)}% | "
                       f"{_f(m['others'], 0)}% |")
        out.append("")
    if "freeswitch" in results:
        out += freeswitch_rows(results["freeswitch"], results.get("latency"))
    return "\n".join(out)


def freeswitch_rows(fs: dict[str, Any], asterisk: dict[str, Any] | None) -> list[str]:
    """FreeSWITCH beside Asterisk: re-REGISTER -> INVITE, then time to answer against the recipe."""
    out = ["| re-REGISTER -> INVITE at the phone (ms) | FreeSWITCH p50 / p99 / max (n) | Asterisk p50 / p99 / max "
           "(n) |", "|---|---|---|"]
    for key, label in (("new", "new URI (new port)"), ("same", "same URI (same port)")):
        f = fs.get(f"register_to_invite_{key}_uri", {})
        a = (asterisk or {}).get(f"{key}_uri", {}).get("reregister_to_invite_ms", {})
        acell = (f"{_f(a['p50'])} / {_f(a['p99'])} / {_f(a['max'])} ({a.get('n', '?')})" if a else "not run")
        out.append(f"| {label} | {_f(f.get('median_ms', math.nan))} / {_f(f.get('p99_ms', math.nan))} / "
                   f"{_f(f.get('max_ms', math.nan))} ({f.get('n', 0)}) | {acell} |")
    out.append("")
    out += ["| wake delay | FreeSWITCH ari-push, new URI | sleep-2000 recipe, new URI | ari-push, same URI | "
            "recipe, same URI |", "|---|---|---|---|---|"]
    new, same = fs.get("time_to_answer_new_uri", {}), fs.get("time_to_answer_same_uri", {})
    for d in new:
        cells = []
        for table in (new, same):
            for approach in ("ari-push", "recipe"):
                c = table.get(d, {}).get(approach, {})
                ms = c.get("median_ms")
                cells.append(f"{c.get('answered', '-')}, {ms:.0f} ms" if ms is not None else
                             f"**{c.get('answered', '-')}**")
        out.append(f"| {float(d):g} s | " + " | ".join(cells) + " |")
    out.append("")
    return out


def plot(answer: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    delays = [float(d) for d in answer["delays"]]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.plot([0, max(delays) + 0.5], [0, max(delays) + 0.5], color="0.75", ls=":", label="the phone's wake delay")
    ax.axvline(3.0, color="0.85", lw=1)
    ax.text(3.05, 0.2, "Wait(3)", color="0.5", fontsize=8)
    for approach, color, marker in (("ari-push", "tab:blue", "o"), ("recipe", "tab:red", "s")):
        xs, ys, lo, hi, fx, fy = [], [], [], [], [], []
        for d in delays:
            row = answer["delays"][str(d)][approach]
            times = [c["answer"] for c in answer["calls"] if c["approach"] == approach and c["wake"] == d
                     and c["status"] == 200]
            if times:
                xs.append(d)
                ys.append(statistics.median(times))
                lo.append(ys[-1] - min(times))
                hi.append(max(times) - ys[-1])
            for f in row["failed_after_s"]:
                fx.append(d)
                fy.append(f)
        label = "ari-push" if approach == "ari-push" else "Wait(3) recipe"
        ax.errorbar(xs, ys, yerr=[lo, hi], color=color, marker=marker, capsize=3, label=f"{label}: answered "
                    "(median, min-max)")
        if fx:
            ax.scatter(fx, fy, color=color, marker="x", s=60, label=f"{label}: call failed (time of failure)")
            for d in sorted(set(fx)):
                ax.annotate("never rung", (d, max(y for x, y in zip(fx, fy, strict=True) if x == d)),
                            textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8, color=color)
    ax.set_xlabel("wake delay: push received -> phone re-registers (s)")
    ax.set_ylabel("time to answer: caller's INVITE -> 200 OK (s)")
    ax.set_title("Time to answer a sleeping phone: ari-push vs push + Wait(3) + Dial")
    ax.set_xticks(delays)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_ylim(-0.5, max(ax.get_ylim()[1], 14.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rig = Rig(args)
    results: dict[str, Any] = {"machine": machine(), "command": " ".join(["bench/e2e.py", *sys.argv[1:]]),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    only = set(args.only.split(","))
    try:
        if only & {"latency", "answer", "capacity", "ingest"}:
            await rig.start()
            results["machine"]["asterisk"] = rig.asterisk_version
        rng = random.Random(args.seed)
        if "latency" in only and args.traces == "both":
            results["traces"] = await section_traces(rig, args)
        elif "latency" in only:
            print(f"latency: {args.latency_calls} new-URI + {args.latency_calls} same-URI wakes", flush=True)
            results["latency"] = await section_latency(rig, args.latency_calls, args.latency_parallel,
                                                       Distribution(args.latency_wake, rng))
            for k in ("new_uri", "same_uri"):
                s = results["latency"][k]["reregister_to_invite_ms"]
                print(f"  {k}: {results['latency'][k]['answered']}/{results['latency'][k]['calls']} answered; "
                      f"re-REGISTER -> INVITE p50 {s['p50']:.1f} p95 {s['p95']:.1f} p99 {s['p99']:.1f} ms; "
                      f"caller INVITE -> push p50 {results['latency'][k]['call_to_push_ms']['p50']:.1f} p99 "
                      f"{results['latency'][k]['call_to_push_ms']['p99']:.1f} ms; answer - wake p99 "
                      f"{results['latency'][k]['answer_after_wake_ms']['p99']:.1f} ms", flush=True)
        if "answer" in only:
            print(f"answer: {args.answer_calls} calls per approach and wake delay", flush=True)
            results["answer"] = await section_answer(rig, args.answer_calls, ANSWER_DELAYS)
            if args.plot:
                plot(results["answer"], Path(args.plot))
                print(f"  plot written to {args.plot}", flush=True)
        if "capacity" in only:
            results["capacity"] = []
            for n in [int(x) for x in args.capacity.split(",")]:
                print(f"capacity: {n} calls waiting", flush=True)
                c = await section_capacity(rig, n, Distribution(args.capacity_wake, rng), args.ramp, args.hold)
                results["capacity"].append(c)
                if c["channels_left"]:
                    print(f"  channels left after the calls: {c['leftover_channels']}", flush=True)
                m = c["meter"]
                print(f"  {c['answered']}/{n} answered, peak waiting {c['peak_waiting']:.0f}, errors {c['errors']}; "
                      f"re-REGISTER -> INVITE p50 {c['reregister_to_invite_ms']['p50']:.1f} p99 "
                      f"{c['reregister_to_invite_ms']['p99']:.1f} ms; call -> push p99 "
                      f"{c['call_to_push_ms']['p99']:.1f} ms; daemon CPU {m['cpu_percent']['daemon']:.0f}% peak RSS "
                      f"{m['vm_hwm_mb']['daemon']:.0f} MB; asterisk CPU {m['cpu_percent']['asterisk']:.0f}%; "
                      f"harness {m['cpu_percent']['harness']:.0f}%", flush=True)
        if "ingest" in only:
            print("ingest: new-contact REGISTERs at rising rates", flush=True)
            results["ingest"] = await section_ingest(rig, [int(x) for x in args.ingest_rates.split(",")],
                                                     args.ingest_seconds, 100)
    finally:
        if rig.daemon is not None:  # first: its shutdown still pushes (cancel) to the local FCM
            await asyncio.to_thread(rig.daemon.stop)
            rig.daemon = None
        await rig.stop()
        await asyncio.to_thread(rig.stop_processes)
    if "freeswitch" in only:  # its own FreeSWITCH, Redis and daemon, once Asterisk's are gone
        import freeswitch_e2e

        print(f"freeswitch: {args.freeswitch_rounds} new-URI + {args.freeswitch_rounds} same-URI wakes, "
              f"{args.freeswitch_answer_calls} calls per approach and wake delay", flush=True)
        results["freeswitch"] = await freeswitch_e2e.main(args.freeswitch_rounds, args.freeswitch_answer_calls)
        for k in ("new", "same"):
            s = results["freeswitch"][f"register_to_invite_{k}_uri"]
            print(f"  {k} URI: re-REGISTER -> INVITE p50 {s.get('median_ms')} p99 {s.get('p99_ms')} ms (n={s['n']})",
                  flush=True)
    return results


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="latency,answer,capacity,ingest,freeswitch")
    parser.add_argument("--quick", action="store_true", help="small numbers: a smoke run in about a minute")
    parser.add_argument("--index", type=int, default=5, choices=(5, 6))
    parser.add_argument("--name", default="bench")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (daemon log, Redis)")
    parser.add_argument("--latency-calls", type=int, default=100, help="wakes of each kind (new/same URI)")
    parser.add_argument("--latency-wake", default="uniform:0.1,0.6", help="wake delay distribution")
    parser.add_argument("--traces", default="on", choices=("on", "off", "both"),
                        help="[traces] enabled in the daemon; both: latency blocks with traces off and on")
    parser.add_argument("--trace-rounds", type=int, default=2, help="with --traces both: blocks of each mode")
    parser.add_argument("--latency-parallel", type=int, default=4, help="latency calls at a time (1: one by one)")
    parser.add_argument("--answer-calls", type=int, default=10, help="calls per approach and wake delay")
    parser.add_argument("--capacity", default="100,500,1000", help="concurrent waiting calls, comma-separated")
    parser.add_argument("--capacity-wake", default="uniform:2,22",
                        help="wake delay distribution, counted from the moment every call has been pushed")
    parser.add_argument("--qualify", type=float, default=0.0,
                        help="qualify_frequency (s) on the bench's push AORs; 0: off, as the sample config")
    parser.add_argument("--asterisk-verbose", type=int, default=3,
                        help="Asterisk's verbosity (-v count and messages.log level); 0: no verbose lines")
    parser.add_argument("--ramp", type=float, default=50.0, help="calls placed per second")
    parser.add_argument("--hold", type=float, default=1.0, help="seconds each answered call stays bridged")
    parser.add_argument("--ingest-rates", default="100,200,400,800,1200")
    parser.add_argument("--ingest-seconds", type=float, default=8.0)
    parser.add_argument("--freeswitch-rounds", type=int, default=50, help="FreeSWITCH wakes of each kind")
    parser.add_argument("--freeswitch-answer-calls", type=int, default=5,
                        help="FreeSWITCH calls per approach, wake delay and kind of wake")
    parser.add_argument("--out", default="", help="results JSON (default bench/results/e2e-<time>.json)")
    parser.add_argument("--plot", default=str(REPO / "docs" / "time-to-answer.png"))
    parser.add_argument("--report", default="", help="print the tables of a results JSON (and replot), run nothing")
    args = parser.parse_args()
    if args.report:
        results = json.loads(Path(args.report).read_text())
        print(markdown(results))
        if "answer" in results and args.plot:
            plot(results["answer"], Path(args.plot))
        return 0
    if args.quick:
        args.latency_calls, args.answer_calls, args.capacity = 10, 3, "50"
        args.ingest_rates, args.ingest_seconds, args.capacity_wake = "100,300", 4.0, "uniform:1,3"
        args.freeswitch_rounds, args.freeswitch_answer_calls = 5, 1
    if os.geteuid() != 0:
        print("the benchmark needs root (the sandbox Asterisk runs in a chroot)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    try:
        results = asyncio.run(run(args))
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"e2e-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(markdown(results))
    print(f"results: {out} ({results['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

