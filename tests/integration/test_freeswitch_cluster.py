"""Several daemons on one real FreeSWITCH and one Redis (docs/clustering.md, "FreeSWITCH"): every
daemon sees each parked call, the Redis claim gives it to one; a daemon SIGKILLed while its call
waits is replaced by another, which adopts the call and completes it without pushing again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from ari_push.bindings import RedisStore
from ari_push.redis_keys import Keys
from ari_push.service import make_redis
from ari_push.settings import RedisSettings
from rig.freeswitch import ESL_PASSWORD, PROFILE, SIP_PASSWORD, FreeswitchInstance
from rig.redis import RedisServer
from rig.sipua import SipUA
from tests.conftest import wait_for
from tests.integration.test_calls import PushEndpoint, push_endpoint  # noqa: F401 - the fixture
from tests.integration.test_cluster import VENDOR, DaemonProcess, daemons  # noqa: F401 - the fixture
from tests.integration.test_freeswitch_calls import parked


def fs_cluster_config(tmp_path: Path, fs: FreeswitchInstance, redis: RedisServer, name: str, prefix: str) -> Path:
    """An `ari-push run` config: this FreeSWITCH, the shared Redis prefix, broadcast claims."""
    folder = tmp_path / name
    folder.mkdir()
    text = (f'node_id = "{name}"\n'
            f'[freeswitch]\nport = {fs.ports.esl}\npassword = "{ESL_PASSWORD}"\nprofile = "{PROFILE}"\n'
            'heartbeat = 2\nrequest_timeout = 3\n'
            f'[redis]\nurl = "{redis.url}"\nkey_prefix = "{prefix}"\n'
            '[http]\nlisten = "127.0.0.1:0"\n'
            '[cluster]\nmode = "broadcast"\nheartbeat = 0.5\nnode_ttl = 2\n' + VENDOR)
    path = folder / "ari-push.toml"
    path.write_text(text)
    return path


async def shared_sleeping_phone(fs: FreeswitchInstance, redis: RedisServer, prefix: str, user: str,
                                ep: PushEndpoint) -> SipUA:
    """A phone that registers with its push URL, is stored in the daemons' shared Redis, and sleeps."""
    client = make_redis(RedisSettings(url=redis.url))
    store = RedisStore(client, Keys(prefix), 86400)
    try:
        phone = SipUA(user, fs.ports.sip, password=SIP_PASSWORD)
        await phone.open()
        assert await phone.register(f"X-PUSH-URI=http://127.0.0.1:{ep.port}/push/{user}") == 200
        await wait_for(lambda: store.bindings_for(user), 10, "binding stored in the shared Redis")
        phone.close()  # asleep: its registration stays in FreeSWITCH, nobody listens
        return phone
    finally:
        await client.aclose()


async def test_two_daemons_one_freeswitch_one_call_handled_once(
        tmp_path: Path, ensure_freeswitch: FreeswitchInstance, ensure_redis: RedisServer,
        daemons: Callable[..., DaemonProcess], push_endpoint: PushEndpoint, aor: str, aor2: str) -> None:  # noqa: F811
    fs, ep = ensure_freeswitch, push_endpoint
    prefix = f"fc-{time.monotonic_ns()}:"
    a = daemons("a", fs_cluster_config(tmp_path, fs, ensure_redis, "a", prefix))
    b = daemons("b", fs_cluster_config(tmp_path, fs, ensure_redis, "b", prefix))
    for d in (a, b):
        await d.wait_log("freeswitch link up")
    phone = await shared_sleeping_phone(fs, ensure_redis, prefix, aor, ep)
    caller = SipUA(aor2, fs.ports.sip, password=SIP_PASSWORD)
    await caller.open()
    call = caller.start_call(aor, timeout=30)
    await asyncio.wait_for(ep.on_call.get(), 15)
    await phone.open()
    assert await phone.register() == 200
    async with asyncio.timeout(10):
        invite = await phone.invites.get()
    assert invite.header("X-Ari-Push-Call-Id") == ep.pushes[0]["call_id"]
    assert (await asyncio.wait_for(call, 15)).status == 200
    await wait_for(lambda: [d for d in (a, b) if "answered by" in d.text()], 10, "the call's owner logged it")
    claimed = [d for d in (a, b) if "claimed call" in d.text()]
    assert len(claimed) == 1  # both saw the park; one won the claim
    assert [d for d in (a, b) if "answered by" in d.text()] == claimed
    assert ep.kinds() == ["call"]  # two daemons, one push
    assert phone.invites.empty()  # and one INVITE
    assert await phone.hangup() == 200
    async with asyncio.timeout(5):
        await caller.byes.get()
    await wait_for(lambda: not parked(fs), 10, "no channels left")
    phone.close()
    caller.close()


async def test_daemon_killed_while_call_waits_another_adopts_and_completes_it(
        tmp_path: Path, ensure_freeswitch: FreeswitchInstance, ensure_redis: RedisServer,
        daemons: Callable[..., DaemonProcess], push_endpoint: PushEndpoint, aor: str, aor2: str,  # noqa: F811
        capsys) -> None:
    fs, ep = ensure_freeswitch, push_endpoint
    prefix = f"fc-{time.monotonic_ns()}:"
    a = daemons("a", fs_cluster_config(tmp_path, fs, ensure_redis, "a", prefix))
    await a.wait_log("freeswitch link up")
    phone = await shared_sleeping_phone(fs, ensure_redis, prefix, aor, ep)
    caller = SipUA(aor2, fs.ports.sip, password=SIP_PASSWORD)
    await caller.open()
    call = caller.start_call(aor, timeout=40)
    await asyncio.wait_for(ep.on_call.get(), 15)  # daemon a took the call and pushed
    await a.wait_log("claimed call")
    b = daemons("b", fs_cluster_config(tmp_path, fs, ensure_redis, "b", prefix))
    await b.wait_log("freeswitch link up")
    await asyncio.sleep(1.5)  # b's janitor sweeps a few times while a lives: a's call is left alone
    assert "adopting" not in b.text() and "claimed call" not in b.text()
    killed = time.monotonic()
    a.kill()
    await b.wait_log("adopting waiting call", timeout=20)
    gap = time.monotonic() - killed
    await phone.open()
    assert await phone.register() == 200
    async with asyncio.timeout(10):
        await phone.invites.get()
    assert (await asyncio.wait_for(call, 15)).status == 200
    await b.wait_log("answered by", timeout=10)
    assert ep.kinds().count("call") == 1  # b did not push the same call again
    assert await phone.hangup() == 200
    async with asyncio.timeout(5):
        await caller.byes.get()
    with capsys.disabled():
        print(f"\n[freeswitch broadcast] SIGKILL -> call adopted by the other daemon: {gap:.2f} s")
    await wait_for(lambda: not parked(fs), 10, "no channels left")
    phone.close()
    caller.close()
