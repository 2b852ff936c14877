"""Token capture on a real FreeSWITCH 1.10.12: our SIP phone registers (digest auth) with each
dialect; the event socket feed stores the bindings in a real Redis; faults of the ESL link."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from ari_push.bindings import RedisStore
from ari_push.esl import EslClient
from ari_push.fs_capture import FreeswitchCapture
from ari_push.metrics import Metrics
from ari_push.redis_keys import Keys
from ari_push.service import Daemon, make_redis
from ari_push.settings import load
from ari_push.wakeups import WakeupHub
from rig.freeswitch import ESL_PASSWORD, PROFILE, SIP_PASSWORD, FreeswitchInstance
from rig.redis import RedisServer
from rig.sipua import SipUA
from rig.tcpproxy import TcpProxy
from tests.conftest import wait_for
from tests.integration.test_capture import DIALECTS, EXTRA


class RunningFeed:
    """The daemon (service.Daemon, built for [freeswitch]) and a reader of its Redis store."""

    def __init__(self, daemon: Daemon, task: asyncio.Task[None], stop: asyncio.Event, store: RedisStore) -> None:
        self.daemon, self.task, self.stop_event, self.store = daemon, task, stop, store
        assert daemon.esl is not None and daemon.fs_capture is not None
        self.esl: EslClient = daemon.esl
        self.capture: FreeswitchCapture = daemon.fs_capture
        self.wakeups: WakeupHub = daemon.wakeups
        self.metrics: Metrics = daemon.metrics

    async def bindings(self, user: str) -> list:
        return await self.store.bindings_for(user)


StartFeed = Callable[..., Awaitable[RunningFeed]]


@pytest.fixture
async def start_feed(tmp_path: Path, ensure_redis: RedisServer) -> AsyncIterator[StartFeed]:
    """Start the daemon on the FreeSWITCH side (its ESL link + capture) with a real Redis store."""
    running: list[tuple[RunningFeed, object]] = []

    async def start(fs: FreeswitchInstance, *, port: int | None = None, password: str = ESL_PASSWORD,
                    wait_up: bool = True, extra: str = "") -> RunningFeed:
        text = (f'[freeswitch]\nport = {port or fs.ports.esl}\npassword = "{password}"\nprofile = "{PROFILE}"\n'
                "heartbeat = 1\nrequest_timeout = 2\n"
                f'[redis]\nurl = "{ensure_redis.url}"\nkey_prefix = "t-{uuid.uuid4().hex[:8]}:"\n'
                '[http]\nlisten = "127.0.0.1:0"\n' + EXTRA + extra)
        path = tmp_path / f"fs-{len(running)}.toml"
        path.write_text(text)
        settings = load(path, environ={})
        redis = make_redis(settings.redis)
        store = RedisStore(redis, Keys(settings.redis.key_prefix), 86400.0)
        daemon = Daemon(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        rf = RunningFeed(daemon, task, stop, store)
        running.append((rf, redis))
        if wait_up:
            await wait_for(lambda: rf.esl.link.up, 15, "FreeSWITCH link up")
        return rf

    yield start
    for rf, redis in running:
        rf.stop_event.set()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(15):
                await rf.task
        await redis.aclose()  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def phone(user: str, fs: FreeswitchInstance, transport: str = "udp") -> AsyncIterator[SipUA]:
    ua = SipUA(user, fs.ports.sip, transport, password=SIP_PASSWORD)
    await ua.open()
    try:
        yield ua
    finally:
        with contextlib.suppress(Exception):
            await ua.unregister()
        ua.close()


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("dialect", sorted(DIALECTS))
async def test_each_dialect_is_captured(start_feed: StartFeed, ensure_freeswitch: FreeswitchInstance, aor: str,
                                        dialect: str, transport: str) -> None:
    params, provider, kind = DIALECTS[dialect]
    rf = await start_feed(ensure_freeswitch)
    async with phone(aor, ensure_freeswitch, transport) as ua:
        assert await ua.register(params) == 200  # after a 401 digest challenge
        bindings = await wait_for(lambda: rf.bindings(aor), 5, "binding stored")
        assert len(bindings) == 1
        b = bindings[0]
        assert b.aor == aor and b.endpoint == aor
        assert b.push.provider == provider and b.push.dialect == kind
        assert b.contact_uri == ua.contact_uri  # FreeSWITCH keeps every URI parameter
        assert b.user_agent == "ari-push-test-ua/1.0"
        if dialect == "apple-dual":
            assert b.push.token == "ab" * 32 and b.push.sandbox
            assert b.push.extra_tokens == (("remote", "cd" * 32),)
        if dialect == "zoiper":
            assert b.push.token.startswith("http://db3.notify.live.net/throttledthirdparty/")


async def test_same_uri_reregistration_signals_and_unregister_keeps_the_binding(
        start_feed: StartFeed, ensure_freeswitch: FreeswitchInstance, aor: str) -> None:
    """FreeSWITCH sends sofia::register for every REGISTER, a refresh of the same contact URI too:
    each one wakes a waiting call (no stale-contact trick needed, docs/freeswitch.md)."""
    rf = await start_feed(ensure_freeswitch)
    user = aor
    async with phone(aor, ensure_freeswitch) as ua:
        assert await ua.register(DIALECTS["rfc8599-fcm"][0]) == 200
        first = (await wait_for(lambda: rf.bindings(aor), 5, "first binding"))[0]
        with rf.wakeups.watch(user) as w:
            for _ in range(3):
                assert await ua.register() == 200  # same socket, same URI: a refresh
                async with asyncio.timeout(5):
                    reg = await w.queue.get()
                assert reg.aor == user and reg.contact_uri == ua.contact_uri and reg.device_id == first.device_id
        assert await ua.unregister() == 200
        await wait_for(lambda: rf.capture.gone >= 1, 5, "sofia::unregister handled")
        assert [b.device_id for b in await rf.bindings(aor)] == [first.device_id]
        assert not rf.task.done()


async def test_registration_made_before_start_is_found_by_resync(
        start_feed: StartFeed, ensure_freeswitch: FreeswitchInstance, aor: str) -> None:
    async with phone(aor, ensure_freeswitch, "tcp") as ua:
        assert await ua.register(DIALECTS["linphone-firebase"][0]) == 200  # no feed running yet
        rf = await start_feed(ensure_freeswitch)
        bindings = await wait_for(lambda: rf.bindings(aor), 5, "resync stored it")
        assert bindings[0].push.provider == "fcm" and bindings[0].contact_uri == ua.contact_uri
        assert bindings[0].user_agent == "ari-push-test-ua/1.0"  # resync reads the user agent too
        assert rf.capture.resyncs >= 1


async def test_link_loss_reconnects_and_resync_finds_what_was_missed(
        start_feed: StartFeed, ensure_freeswitch: FreeswitchInstance, aor: str) -> None:
    proxy = TcpProxy(ensure_freeswitch.ports.esl)
    await proxy.start()
    try:
        rf = await start_feed(ensure_freeswitch, port=proxy.port)
        link = rf.esl.link
        changes = link.changes
        proxy.refusing = True
        proxy.drop_all()
        await wait_for(lambda: not link.up, 10, "link down")
        async with phone(aor, ensure_freeswitch) as ua:
            assert await ua.register(DIALECTS["rfc8599-apns"][0]) == 200  # while the daemon is cut off
            await asyncio.sleep(0.3)
            assert await rf.bindings(aor) == []
            proxy.refusing = False
            await wait_for(lambda: link.up, 20, "link up again (backoff)")
            assert link.changes >= changes + 2
            bindings = await wait_for(lambda: rf.bindings(aor), 5, "resync after reconnect stored it")
            assert bindings[0].contact_uri == ua.contact_uri
    finally:
        await proxy.stop()


async def test_half_open_socket_is_caught_by_the_heartbeat(
        start_feed: StartFeed, ensure_freeswitch: FreeswitchInstance) -> None:
    proxy = TcpProxy(ensure_freeswitch.ports.esl)
    await proxy.start()
    try:
        rf = await start_feed(ensure_freeswitch, port=proxy.port)
        link = rf.esl.link
        proxy.frozen = True  # bytes stop, sockets stay open
        await wait_for(lambda: not link.up, 10, "heartbeat noticed the dead link")
        assert "uptime" in link.reason and "no answer" in link.reason
        proxy.frozen = False
        proxy.drop_all()
        await wait_for(lambda: link.up, 20, "link up again")
    finally:
        await proxy.stop()


async def test_wrong_password_is_a_clear_error_without_the_secret(
        start_feed: StartFeed, ensure_freeswitch: FreeswitchInstance, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not-the-esl-password-" + uuid.uuid4().hex[:8]
    rf = await start_feed(ensure_freeswitch, password=wrong, wait_up=False)
    link = rf.esl.link
    await wait_for(lambda: "refused the password" in link.reason, 10, "auth refusal reported")
    assert "[freeswitch] password" in link.reason
    assert not link.up and not rf.task.done()  # keeps retrying with backoff, never crashes
    assert wrong not in caplog.text and wrong not in link.reason
    assert "refused the password" in caplog.text


async def test_freeswitch_restart_under_the_feed(
        start_feed: StartFeed, ensure_freeswitch: FreeswitchInstance, aor: str, aor2: str) -> None:
    fs = ensure_freeswitch
    rf = await start_feed(fs)
    link = rf.esl.link
    async with phone(aor, fs) as ua:
        assert await ua.register(DIALECTS["rfc8599-apns"][0]) == 200
        await wait_for(lambda: rf.bindings(aor), 5, "binding before the restart")
        resyncs = rf.capture.resyncs
        changes = link.changes
        await asyncio.to_thread(fs.restart)
        await wait_for(lambda: link.up and link.changes >= changes + 2, 30, "link back after the restart")
        await wait_for(lambda: rf.capture.resyncs > resyncs, 10, "resync on reconnect")
    async with phone(aor2, fs, "tcp") as ua2:
        assert await ua2.register(DIALECTS["rfc8599-fcm"][0]) == 200
        bindings = await wait_for(lambda: rf.bindings(aor2), 5, "capture after the restart")
        assert bindings[0].contact_uri == ua2.contact_uri
    assert len(await rf.bindings(aor)) == 1


async def test_hostile_contacts_are_rejected_and_not_stored(
        start_feed: StartFeed, ensure_freeswitch: FreeswitchInstance, aor: str,
        caplog: pytest.LogCaptureFixture) -> None:
    rf = await start_feed(ensure_freeswitch)
    secret_token = "Z" * 40
    hostile = [
        f"pn-provider=apns;pn-prid={secret_token};pn-param=T.com.x.voip",  # not 64 hex
        "X-PUSH-URI=http://169.254.169.254/latest/meta-data",  # host not allowed
        "pn-provider=pigeon;pn-prid=abc;pn-param=x",  # unknown provider
    ]
    for params in hostile:
        async with phone(aor, ensure_freeswitch) as ua:
            assert await ua.register(params) == 200  # FreeSWITCH accepts it; we refuse to store it
    metrics = rf.metrics
    await wait_for(lambda: _rejected(metrics) >= len(hostile), 5, "rejections counted")
    assert await rf.bindings(aor) == []
    assert secret_token not in caplog.text
    assert rf.esl.link.up and not rf.task.done()


def _rejected(metrics: Metrics) -> float:
    return sum(s.value for m in metrics.rejected.collect() for s in m.samples if s.name.endswith("_total"))
