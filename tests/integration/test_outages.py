"""Issue 18: no call lost to a one-second outage (real Asterisk 22, real Redis, the real daemon).

- outbound websocket mode: a call placed while the daemon is down (SIGKILL, restarted 1 s
  later) waits in Stasis and is pushed and answered when the daemon is back; a call placed
  while it stays down longer than the dialplan's bound leaves Stasis and ends;
- inbound mode: the sample dialplan offers the call again while no daemon is connected;
- a call placed while Redis restarts is pushed (from the binding cache) and answered, and a
  registration captured while Redis is down is written when it is back.

The daemons of the restart tests are processes (``python -m ari_push run``) killed with
SIGKILL; they report readiness to a NOTIFY_SOCKET the test listens on, as systemd would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ari_push.bindings import StoreUnavailable
from rig.asterisk import REPO, AsteriskInstance, Ports, outbound_conf
from rig.redis import RedisServer, free_port
from rig.sipua import SipUA
from tests.conftest import daemon_config, wait_for
from tests.integration.test_calls import (
    PushEndpoint,
    hang_up_and_check,
    no_channels,
    push_endpoint,  # noqa: F401  (fixture)
    wake_on_push,
)

OUTBOUND_PASSWORD = "rig-outbound-secret"
BOUND = 5  # ARI_PUSH_BOUND of the outbound test instance (the sample says 30)
VENDOR = ('[capture]\nvendor_allowed_hosts = ["127.0.0.1:*"]\n'
          '[calls]\ndefault_timeout = 10\n'
          '[vendor]\ntimeout = 2\n'
          'body_template = \'{"type":"{kind}","call_id":"{call_id}","caller":"{caller_number}"}\'\n')


class NotifySocket:
    """What systemd listens on for Type=notify: a unix datagram socket."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []

    def drain(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return [m for _, m in self.messages]
            self.messages.append((time.monotonic(), data.decode()))

    def ready_at(self, after: float) -> float | None:
        self.drain()
        return next((t for t, m in self.messages if t >= after and "READY=1" in m.splitlines()), None)

    def close(self) -> None:
        self.sock.close()


class DaemonProc:
    """The daemon as systemd runs it: a process with NOTIFY_SOCKET, killed with SIGKILL."""

    def __init__(self, config: Path, notify: NotifySocket, log: Path) -> None:
        self.config, self.notify, self.log = config, notify, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ARI_PUSH_")}
        env.update(NOTIFY_SOCKET=str(self.notify.path), PYTHONUNBUFFERED="1")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "ari_push", "--config", str(self.config), "run"],
                                         cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        self.started = time.monotonic()

    async def ready(self, timeout: float = 20) -> float:
        """Seconds from start to READY=1."""
        started = self.started
        at = await wait_for(lambda: self.notify.ready_at(started), timeout, "READY=1 from the daemon")
        return float(at - started)

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

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path)
    yield sock
    sock.close()


@pytest.fixture
def daemon_procs() -> Iterator[list[DaemonProc]]:
    procs: list[DaemonProc] = []
    yield procs
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def outbound_ws_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def outbound_asterisk(asterisk_root: Path, outbound_ws_port: int) -> Iterator[AsteriskInstance]:
    inst = AsteriskInstance(asterisk_root, "t3", Ports.for_index(3),
                            extra_conf=outbound_conf(outbound_ws_port, OUTBOUND_PASSWORD, BOUND))
    inst.write_config()
    inst.start()
    yield inst
    inst.stop()


def outbound_config(tmp_path: Path, ast: AsteriskInstance, redis: RedisServer, ws_port: int) -> Path:
    return daemon_config(tmp_path, ast, redis.url, VENDOR + (
        f'[ari]\nconnection = "outbound"\noutbound_listen = "127.0.0.1:{ws_port}"\n'
        f'outbound_password = "{OUTBOUND_PASSWORD}"\n'))


async def sleeping_phone_of(ast: AsteriskInstance, aor: str, ep: PushEndpoint, daemon: DaemonProc) -> SipUA:
    phone = SipUA(aor, ast.ports.sip)
    await phone.open()
    assert await phone.register(f"X-PUSH-URI=http://127.0.0.1:{ep.port}/push/{aor}") == 200
    await wait_for(lambda: f" of {aor} (token " in daemon.text(), 10, "binding captured")
    phone.close()
    return phone


async def test_outbound_call_while_the_daemon_restarts_is_pushed_and_answered(
        tmp_path: Path, outbound_asterisk: AsteriskInstance, outbound_ws_port: int, ensure_redis: RedisServer,
        push_endpoint: PushEndpoint, notify_socket: NotifySocket, daemon_procs: list[DaemonProc],  # noqa: F811
        aor: str, capsys: pytest.CaptureFixture[str]) -> None:
    ast = outbound_asterisk
    daemon = DaemonProc(outbound_config(tmp_path, ast, ensure_redis, outbound_ws_port), notify_socket,
                        tmp_path / "daemon.log")
    daemon_procs.append(daemon)
    daemon.start()
    first_ready = await daemon.ready()
    phone = await sleeping_phone_of(ast, aor, push_endpoint, daemon)
    daemon.kill()
    caller = SipUA("2000", ast.ports.sip)
    await caller.open()
    bounded_before = ast.log_text().count("no daemon took the call")
    placed = time.monotonic()
    answer = caller.start_call(f"o{aor}")
    await wait_for(lambda: any(c["dialplan"]["app_name"] == "Stasis" for c in ast.ari("GET", "/ari/channels")),
                   10, "the call waiting in Stasis with no daemon")
    await asyncio.sleep(1.0)  # systemd's RestartSec
    daemon.start()
    restart_ready = await daemon.ready()
    # the phone answers after the dialplan's bound: the daemon lifted it when it took the call
    await wake_on_push(phone, push_endpoint, same_port=False, delay=BOUND)
    await asyncio.wait_for(phone.invites.get(), 10)
    assert (await asyncio.wait_for(answer, 15)).status == 200
    assert time.monotonic() - placed > BOUND
    await hang_up_and_check(phone, caller, ast)
    assert push_endpoint.kinds() == ["call"]
    assert ast.log_text().count("no daemon took the call") == bounded_before
    with capsys.disabled():
        print(f"\n[outbound] start-to-READY {first_ready:.2f}s; restart-to-READY {restart_ready:.2f}s")


async def test_outbound_call_while_the_daemon_stays_down_ends_at_the_bound(
        tmp_path: Path, outbound_asterisk: AsteriskInstance, outbound_ws_port: int, ensure_redis: RedisServer,
        notify_socket: NotifySocket, daemon_procs: list[DaemonProc], aor: str) -> None:
    ast = outbound_asterisk
    daemon = DaemonProc(outbound_config(tmp_path, ast, ensure_redis, outbound_ws_port), notify_socket,
                        tmp_path / "daemon.log")
    daemon_procs.append(daemon)
    daemon.start()
    await daemon.ready()
    daemon.kill()
    caller = SipUA("2000", ast.ports.sip)
    await caller.open()
    started = time.monotonic()
    answer = caller.start_call(f"o{aor}")  # nobody registered: the direct dial after the bound fails
    await wait_for(lambda: ast.ari("GET", "/ari/channels") != [], 10, "the call waiting in Stasis")
    resp = await asyncio.wait_for(answer, BOUND + 15)
    waited = time.monotonic() - started
    assert resp.status >= 400
    assert waited >= BOUND - 0.5, f"the call ended after {waited:.1f}s, before the bound"
    await wait_for(lambda: no_channels(ast), 5, "no channel left in Stasis")
    assert f"no daemon took the call to {aor} within {BOUND}s" in ast.log_text()
    caller.close()
    # the daemon comes back: nothing is left for it to resume, and it takes calls again
    daemon.start()
    await daemon.ready()
    assert no_channels(ast)


async def test_inbound_call_while_the_daemon_restarts_is_offered_again_pushed_and_answered(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer,
        push_endpoint: PushEndpoint, notify_socket: NotifySocket, daemon_procs: list[DaemonProc],  # noqa: F811
        aor: str, capsys: pytest.CaptureFixture[str]) -> None:
    ast = ensure_asterisk
    daemon = DaemonProc(daemon_config(tmp_path, ast, ensure_redis.url, VENDOR), notify_socket, tmp_path / "d.log")
    daemon_procs.append(daemon)
    daemon.start()
    await daemon.ready()
    phone = await sleeping_phone_of(ast, aor, push_endpoint, daemon)
    daemon.kill()
    caller = SipUA("2000", ast.ports.sip)
    await caller.open()
    refused = ast.log_text().count("STASISSTATUS=FAILED")
    answer = caller.start_call(aor)
    await wait_for(lambda: ast.log_text().count("STASISSTATUS=FAILED") > refused, 10, "Stasis refused, no daemon")
    await asyncio.sleep(1.0)  # systemd's RestartSec
    daemon.start()
    restart_ready = await daemon.ready()
    await wake_on_push(phone, push_endpoint, same_port=False)
    await asyncio.wait_for(phone.invites.get(), 10)
    assert (await asyncio.wait_for(answer, 15)).status == 200
    await hang_up_and_check(phone, caller, ast)
    with capsys.disabled():
        print(f"\n[inbound] restart-to-READY {restart_ready:.2f}s")


async def in_redis(daemon: Any, aor: str) -> list[Any]:
    try:
        return list(await daemon.redis_store.bindings_for(aor))
    except StoreUnavailable:
        return []


async def test_call_while_redis_restarts_is_pushed_from_the_cache_and_answered(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, start_daemon, push_endpoint: PushEndpoint,  # noqa: F811
        aor: str, aor2: str) -> None:
    redis = RedisServer()
    redis.start()
    try:
        rd = await start_daemon(daemon_config(tmp_path, ensure_asterisk, redis.url, VENDOR))
        await wait_for(lambda: rd.daemon.redis_link.up, 10, "redis up")
        phone = SipUA(aor, ensure_asterisk.ports.sip)
        await phone.open()
        assert await phone.register(f"X-PUSH-URI=http://127.0.0.1:{push_endpoint.port}/push/{aor}") == 200
        await wait_for(lambda: in_redis(rd.daemon, aor), 5, "binding in Redis")
        phone.close()
        redis.stop()
        caller = SipUA("2000", ensure_asterisk.ports.sip)
        await caller.open()
        answer = caller.start_call(aor)
        push = await asyncio.wait_for(push_endpoint.on_call.get(), 10)  # pushed while Redis is down
        assert push["type"] == "call"
        assert rd.daemon.cache.served == 1
        # a phone that registers while Redis is down: kept, written when Redis is back
        other = SipUA(aor2, ensure_asterisk.ports.sip)
        await other.open()
        assert await other.register(f"X-PUSH-URI=http://127.0.0.1:{push_endpoint.port}/push/{aor2}") == 200
        other.close()
        await wait_for(lambda: rd.daemon.store.pending, 5, "the registration kept while Redis is down")
        await asyncio.sleep(1.0)
        redis.start()
        await phone.open()
        assert await phone.register() == 200
        await asyncio.wait_for(phone.invites.get(), 10)
        assert (await asyncio.wait_for(answer, 15)).status == 200
        await hang_up_and_check(phone, caller, ensure_asterisk)
        found = await wait_for(lambda: in_redis(rd.daemon, aor2), 10, "the kept binding in Redis")
        assert found[0].aor == aor2 and not rd.daemon.store.pending
        assert push_endpoint.kinds() == ["call"]
    finally:
        redis.cleanup()
