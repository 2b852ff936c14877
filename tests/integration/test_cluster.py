"""Several daemons on one Redis: broadcast + claim, a daemon SIGKILLed mid-call, lease take-over,
and a registration on another Asterisk waking a call (docs/clustering.md)."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from rig.asterisk import AsteriskInstance, Ports
from rig.process import terminate
from rig.redis import RedisServer
from rig.sipua import SipUA
from tests.conftest import daemon_config, wait_for
from tests.integration.test_calls import PushEndpoint, hang_up_and_check, no_channels, push_endpoint, sleeping_phone  # noqa: F401

VENDOR = ('[capture]\nvendor_allowed_hosts = ["127.0.0.1:*"]\n[calls]\ndefault_timeout = 20\n[push]\nburst = 50\n'
          '[vendor]\nbody_template = \'{"type":"{kind}","call_id":"{call_id}","caller":"{caller_number}"}\'\n')


class DaemonProcess:
    """A real `ari-push run` process, so that a test can SIGKILL it."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        self._out = open(log, "w")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "ari_push", "--config", str(config), "run"],
                                     stdout=self._out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_log(self, needle: str, timeout: float = 15) -> None:
        await wait_for(lambda: needle in self.text(), timeout, f"{needle!r} in {self.log.name}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        terminate(self.proc, 15)
        self._out.close()


@pytest.fixture
async def daemons(tmp_path: Path) -> AsyncIterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(name: str, config: Path) -> DaemonProcess:
        d = DaemonProcess(config, tmp_path / f"{name}.log")
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def cluster_config(tmp_path: Path, asterisk: AsteriskInstance, redis: RedisServer, name: str, mode: str,
                   app: str, prefix: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    extra = (f'node_id = "{name}"\n[ari]\napp = "{app}"\n[cluster]\nmode = "{mode}"\nheartbeat = 0.5\n'
             f'node_ttl = 2\nlease_ttl = 2\n' + VENDOR)
    config = daemon_config(folder, asterisk, redis.url, extra)
    # all daemons of one test share one key prefix (daemon_config gives each its own)
    return _write(config, re.sub(r'key_prefix = "[^"]*"', f'key_prefix = "{prefix}"', config.read_text()))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


async def shared_sleeping_phone(asterisk: AsteriskInstance, redis: RedisServer, prefix: str, aor: str,
                                ep: PushEndpoint) -> SipUA:
    """A sleeping phone whose binding is seen in the store the cluster's daemons share."""
    from ari_push.bindings import RedisStore
    from ari_push.redis_keys import Keys
    from ari_push.service import make_redis
    from ari_push.settings import RedisSettings

    client = make_redis(RedisSettings(url=redis.url))
    try:
        return await sleeping_phone(asterisk, aor, ep, RedisStore(client, Keys(prefix), 86400))
    finally:
        await client.aclose()


def stasis_app_of(asterisk: AsteriskInstance, channel_id: str) -> str:
    try:
        ch = asterisk.ari("GET", f"/ari/channels/{channel_id}")
    except Exception:
        return ""
    assert isinstance(ch, dict)
    return str(ch.get("dialplan", {}).get("app_data", "")).split(",")[0]


def caller_channel(asterisk: AsteriskInstance) -> str:
    channels = asterisk.ari("GET", "/ari/channels")
    assert isinstance(channels, list)
    return next((c["id"] for c in channels if c["name"].startswith("PJSIP/2000-")), "")


async def test_broadcast_one_daemon_claims_and_pushes_once(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, daemons,
        push_endpoint: PushEndpoint, aor: str) -> None:  # noqa: F811
    prefix = f"c-{time.monotonic_ns()}:"
    a = daemons("a", cluster_config(tmp_path, ensure_asterisk, ensure_redis, "a", "broadcast", "ari-push-a", prefix))
    b = daemons("b", cluster_config(tmp_path, ensure_asterisk, ensure_redis, "b", "broadcast", "ari-push-b", prefix))
    for d in (a, b):
        await d.wait_log("ari link up")
        await d.wait_log("ami link up")
    phone = await shared_sleeping_phone(ensure_asterisk, ensure_redis, prefix, aor, push_endpoint)
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    answer = caller.start_call(f"c{aor}")
    await asyncio.wait_for(push_endpoint.on_call.get(), 10)
    await phone.open()
    assert await phone.register() == 200
    await asyncio.wait_for(phone.invites.get(), 5)
    assert (await asyncio.wait_for(answer, 10)).status == 200
    await wait_for(lambda: [d for d in (a, b) if "answered by" in d.text()], 10, "the call's owner logged it")
    assert push_endpoint.kinds() == ["call"]  # two daemons, one push
    handled = [d for d in (a, b) if "answered by" in d.text()]
    assert len(handled) == 1
    await hang_up_and_check(phone, caller, ensure_asterisk)


@pytest.mark.parametrize("mode", ["broadcast", "lease"])
async def test_daemon_killed_while_call_waits_another_completes_it(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, daemons,
        push_endpoint: PushEndpoint, aor: str, mode: str, capsys) -> None:  # noqa: F811
    prefix = f"c-{time.monotonic_ns()}:"
    apps = ("ari-push-a", "ari-push-b") if mode == "broadcast" else ("ari-push", "ari-push")
    a = daemons("a", cluster_config(tmp_path, ensure_asterisk, ensure_redis, "a", mode, apps[0], prefix))
    await a.wait_log("ari link up")
    await a.wait_log("ami link up")
    phone = await shared_sleeping_phone(ensure_asterisk, ensure_redis, prefix, aor, push_endpoint)
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    answer = caller.start_call(f"c{aor}" if mode == "broadcast" else aor)
    await asyncio.wait_for(push_endpoint.on_call.get(), 10)  # daemon a took the call and pushed
    b = daemons("b", cluster_config(tmp_path, ensure_asterisk, ensure_redis, "b", mode, apps[1], prefix))
    await b.wait_log("ami link up")
    if mode == "lease":
        await b.wait_log("ari link down: standby")
    channel = caller_channel(ensure_asterisk)
    assert channel
    killed = time.monotonic()
    a.kill()
    # the caller is taken over by b: moved into its app (broadcast) or resumed (lease)
    await b.wait_log("adopting waiting call" if mode == "broadcast" else "resuming call", timeout=15)
    gap = time.monotonic() - killed
    await phone.open()
    assert await phone.register() == 200
    await asyncio.wait_for(phone.invites.get(), 10)
    assert (await asyncio.wait_for(answer, 10)).status == 200
    assert push_endpoint.kinds().count("call") == 1  # b did not push the same call again
    await phone.hangup()
    await asyncio.wait_for(caller.byes.get(), 5)
    with capsys.disabled():
        print(f"\n[{mode}] SIGKILL -> call taken over by the other daemon: {gap:.2f} s")
    phone.close()
    caller.close()
    await wait_for(lambda: no_channels(ensure_asterisk), 5, "no channels left")


async def test_registration_on_another_asterisk_wakes_the_call(
        tmp_path: Path, asterisk_root: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer,
        daemons, push_endpoint: PushEndpoint, aor: str) -> None:  # noqa: F811
    other = AsteriskInstance(asterisk_root, "t2", Ports.for_index(2))
    other.write_config()
    await asyncio.to_thread(other.start)
    try:
        prefix = f"c-{time.monotonic_ns()}:"
        a = daemons("a", cluster_config(tmp_path, ensure_asterisk, ensure_redis, "a", "broadcast", "ari-push-a",
                                        prefix))
        c = daemons("c", cluster_config(tmp_path, other, ensure_redis, "c", "broadcast", "ari-push-c", prefix))
        for d in (a, c):
            await d.wait_log("ari link up")
            await d.wait_log("ami link up")
        phone = await shared_sleeping_phone(ensure_asterisk, ensure_redis, prefix, aor, push_endpoint)
        caller = SipUA("2000", ensure_asterisk.ports.sip)
        await caller.open()
        answer = caller.start_call(f"c{aor}")
        await asyncio.wait_for(push_endpoint.on_call.get(), 10)
        # the phone wakes and registers with the other Asterisk node
        phone.server = ("127.0.0.1", other.ports.sip)
        await phone.open()
        assert await phone.register() == 200
        await asyncio.wait_for(phone.invites.get(), 5)  # sent by the first Asterisk, woken through Redis
        assert (await asyncio.wait_for(answer, 10)).status == 200
        await hang_up_and_check(phone, caller, ensure_asterisk)
    finally:
        await asyncio.to_thread(other.stop)
