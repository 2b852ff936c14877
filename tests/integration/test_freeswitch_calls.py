"""Call take-over on a real FreeSWITCH 1.10.12: the dialplan parks the call, the FreeSWITCH side of
the daemon (the shared call flow behind FreeswitchPbx) pushes the sleeping phone through a local
vendor push endpoint, the phone wakes and re-registers, the daemon rings its exact contact and
bridges; hang-ups both ways, timeout with push_status, the caller giving up, a decline."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from ari_push.service import Daemon
from ari_push.settings import load
from rig.freeswitch import ESL_PASSWORD, PROFILE, SIP_PASSWORD, FreeswitchInstance
from rig.redis import RedisServer
from rig.sipua import SipUA
from tests.conftest import wait_for
from tests.integration.test_calls import PushEndpoint, push_endpoint  # noqa: F401 - the fixture

StartDaemon = Callable[..., Awaitable[Daemon]]


@contextlib.asynccontextmanager
async def running_daemon(tmp_path: Path, fs: FreeswitchInstance, redis: RedisServer,
                         calls: str = "", timeout: float = 6) -> AsyncIterator[Daemon]:
    """The daemon (service.Daemon on its FreeSWITCH side) in this loop; ``calls``: more [calls] keys."""
    text = (f'[freeswitch]\nport = {fs.ports.esl}\npassword = "{ESL_PASSWORD}"\n'
            f'profile = "{PROFILE}"\nheartbeat = 2\nrequest_timeout = 3\n'
            '[http]\nlisten = "127.0.0.1:0"\n'
            f'[redis]\nurl = "{redis.url}"\nkey_prefix = "t-{uuid.uuid4().hex[:8]}:"\n'
            '[capture]\nvendor_allowed_hosts = ["127.0.0.1:*"]\n'
            f'[calls]\ndefault_timeout = {timeout:g}\n' + calls +
            '[push]\nburst = 50\n'
            '[vendor]\nbody_template = \'{"type":"{kind}","call_id":"{call_id}","caller":"{caller_number}"}\'\n')
    path = tmp_path / f"fs-daemon-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(text)
    daemon = Daemon(load(path, environ={}))
    assert daemon.esl is not None
    esl = daemon.esl
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    await wait_for(lambda: esl.link.up, 15, "FreeSWITCH link up")
    try:
        yield daemon
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(20):
                await task


@pytest.fixture
async def fs_daemon(tmp_path: Path, ensure_freeswitch: FreeswitchInstance, ensure_redis: RedisServer,
                    push_endpoint: PushEndpoint) -> AsyncIterator[Daemon]:  # noqa: F811
    async with running_daemon(tmp_path, ensure_freeswitch, ensure_redis) as daemon:
        yield daemon


async def sleeping_phone(fs: FreeswitchInstance, user: str, ep: PushEndpoint, daemon: Daemon) -> SipUA:
    phone = SipUA(user, fs.ports.sip, password=SIP_PASSWORD)
    await phone.open()
    assert await phone.register(f"X-PUSH-URI=http://127.0.0.1:{ep.port}/push/{user}") == 200
    await wait_for(lambda: daemon.store.bindings_for(user), 5, "binding stored")
    phone.close()  # asleep: its registration stays in FreeSWITCH, nobody listens
    return phone


async def wake_on_push(phone: SipUA, ep: PushEndpoint, same_port: bool, delay: float = 0.2) -> None:
    old_port = phone.port
    await asyncio.wait_for(ep.on_call.get(), 10)
    await asyncio.sleep(delay)
    await phone.open(old_port if same_port else 0)
    assert await phone.register() == 200


def parked(fs: FreeswitchInstance) -> list[str]:
    text = fs.api("show channels")
    return [line for line in text.splitlines() if "," in line and not line.startswith("uuid,")]


@pytest.mark.parametrize("same_port", [False, True], ids=["new-uri", "same-uri"])
async def test_sleeping_phone_is_woken_rung_bridged_and_hung_up(
        fs_daemon: Daemon, ensure_freeswitch: FreeswitchInstance, push_endpoint: PushEndpoint,  # noqa: F811
        aor: str, aor2: str, same_port: bool) -> None:
    fs, ep = ensure_freeswitch, push_endpoint
    phone = await sleeping_phone(fs, aor, ep, fs_daemon)
    caller = SipUA(aor2, fs.ports.sip, password=SIP_PASSWORD)
    await caller.open()
    call = caller.start_call(aor, timeout=20)
    await wake_on_push(phone, ep, same_port)
    async with asyncio.timeout(10):
        invite = await phone.invites.get()
    assert invite.uri == phone.contact_uri or invite.uri.startswith(f"sip:{aor}@127.0.0.1:{phone.port}")
    assert invite.header("X-Ari-Push-Call-Id") == ep.pushes[0]["call_id"]
    answer = await call
    assert answer.status == 200
    assert 180 in caller.provisional  # ring_ready while the phone woke
    assert caller.rtp is not None and phone.rtp is not None
    await asyncio.gather(caller.rtp.send_for(0.6), phone.rtp.send_for(0.6))
    await asyncio.sleep(0.2)
    assert caller.rtp.received > 10 and phone.rtp.received > 10  # audio both ways through FreeSWITCH
    assert await phone.hangup() == 200
    async with asyncio.timeout(5):
        await caller.byes.get()  # the hang-up is carried to the caller
    await wait_for(lambda: not parked(fs), 5, "no channels left")
    assert ep.kinds() == ["call"]
    phone.close()
    caller.close()


async def test_nobody_wakes_timeout_hands_back_with_push_status(
        fs_daemon: Daemon, ensure_freeswitch: FreeswitchInstance, push_endpoint: PushEndpoint,  # noqa: F811
        aor: str, aor2: str) -> None:
    fs, ep = ensure_freeswitch, push_endpoint
    await sleeping_phone(fs, aor, ep, fs_daemon)
    caller = SipUA(aor2, fs.ports.sip, password=SIP_PASSWORD)
    await caller.open()
    final = await caller.call(aor, timeout=30)  # default_timeout 6 s, then the dialplan hangs up
    assert final.status >= 400
    await wait_for(lambda: f"push_status=TIMEOUT target={aor}" in fs.log_text(), 5, "dialplan saw push_status")
    await wait_for(lambda: ep.kinds() == ["call", "cancel", "missed-call"], 5, "cancel and missed-call pushes")
    await wait_for(lambda: not parked(fs), 5, "no channels left")
    caller.close()


async def test_caller_hangs_up_while_waiting_gets_cancel_push(
        fs_daemon: Daemon, ensure_freeswitch: FreeswitchInstance, push_endpoint: PushEndpoint,  # noqa: F811
        aor: str, aor2: str) -> None:
    fs, ep = ensure_freeswitch, push_endpoint
    await sleeping_phone(fs, aor, ep, fs_daemon)
    caller = SipUA(aor2, fs.ports.sip, password=SIP_PASSWORD)
    await caller.open()
    call = caller.start_call(aor, timeout=20)
    await asyncio.wait_for(ep.on_call.get(), 10)
    await caller.cancel()
    final = await call
    assert final.status == 487
    await wait_for(lambda: ep.kinds() == ["call", "cancel"], 5, "cancel push")
    await wait_for(lambda: not parked(fs), 5, "no channels left")
    caller.close()


async def test_phone_declines_caller_is_handed_back_declined(
        fs_daemon: Daemon, ensure_freeswitch: FreeswitchInstance, push_endpoint: PushEndpoint,  # noqa: F811
        aor: str, aor2: str) -> None:
    fs, ep = ensure_freeswitch, push_endpoint
    phone = await sleeping_phone(fs, aor, ep, fs_daemon)
    phone.answer_code = 486
    caller = SipUA(aor2, fs.ports.sip, password=SIP_PASSWORD)
    await caller.open()
    call = caller.start_call(aor, timeout=20)
    await wake_on_push(phone, ep, same_port=False)
    final = await call
    assert final.status >= 400
    await wait_for(lambda: f"push_status=DECLINED target={aor}" in fs.log_text(), 5, "dialplan saw DECLINED")
    phone.close()
    caller.close()


@pytest.mark.parametrize("moh", [False, True], ids=["ring_ready", "pre_answer-tone"])
async def test_what_the_caller_hears_while_the_phone_wakes(
        tmp_path: Path, ensure_freeswitch: FreeswitchInstance, ensure_redis: RedisServer,
        push_endpoint: PushEndpoint, aor: str, aor2: str, moh: bool) -> None:  # noqa: F811
    """Without ``moh_class`` the caller gets ringback signalling only (180, no media before the
    answer); with it, 183 Session Progress and the stream as early media (RTP) while the phone
    sleeps, then the phone's own audio once bridged."""
    fs, ep = ensure_freeswitch, push_endpoint
    calls = 'moh_class = "tone_stream://%(1000,4000,440,480);loops=-1"\n' if moh else ""
    async with running_daemon(tmp_path, fs, ensure_redis, calls, timeout=20) as daemon:
        phone = await sleeping_phone(fs, aor, ep, daemon)
        caller = SipUA(aor2, fs.ports.sip, password=SIP_PASSWORD)
        await caller.open()
        call = caller.start_call(aor, timeout=30)
        await asyncio.wait_for(ep.on_call.get(), 10)
        assert caller.rtp is not None
        rtp = caller.rtp
        if moh:
            await wait_for(lambda: 183 in caller.provisional, 10, "183 Session Progress")
            await wait_for(lambda: rtp.received >= 25, 10, "early media (RTP) while the phone sleeps")
        else:
            await wait_for(lambda: 180 in caller.provisional, 10, "180 Ringing")
            await asyncio.sleep(1.0)  # a window for media that must not come
            assert rtp.received == 0 and 183 not in caller.provisional
        before = rtp.received
        await phone.open()
        assert await phone.register() == 200
        assert (await call).status == 200
        assert 180 in caller.provisional
        assert caller.rtp is not None and phone.rtp is not None
        if not moh:
            assert before == 0  # nothing reached the caller until the answer
        crtp, prtp = caller.rtp, phone.rtp
        if moh:  # the stream stops once the phone answers
            await asyncio.sleep(0.5)
            quiet = crtp.received
            await asyncio.sleep(0.5)
            assert crtp.received - quiet <= 2
        heard = crtp.received
        await prtp.send_for(0.6)
        await wait_for(lambda: crtp.received >= heard + 10, 5, "the phone's audio at the caller")
        await crtp.send_for(0.6)
        await wait_for(lambda: prtp.received > 10, 5, "the caller's audio at the phone")
        assert await phone.hangup() == 200
        async with asyncio.timeout(5):
            await caller.byes.get()
        await wait_for(lambda: not parked(fs), 5, "no channels left")
        phone.close()
        caller.close()


@pytest.mark.parametrize("target", ["3999", "known-user-without-devices"])
async def test_unknown_user_or_no_devices_is_handed_back_at_once(
        fs_daemon: Daemon, ensure_freeswitch: FreeswitchInstance, aor: str, aor2: str,
        target: str) -> None:
    fs = ensure_freeswitch
    callee = "3999" if target == "3999" else aor  # 3999 is not in the directory; aor has no binding
    caller = SipUA(aor2, fs.ports.sip, password=SIP_PASSWORD)
    await caller.open()
    final = await caller.call(callee, timeout=20)
    assert final.status >= 400  # NO_DEVICES (below), not TIMEOUT: handed back without waiting
    await wait_for(lambda: f"push_status=NO_DEVICES target={callee}" in fs.log_text(), 5, "NO_DEVICES hand-back")
    caller.close()


async def test_link_loss_while_a_call_waits_the_call_continues(
        tmp_path: Path, ensure_freeswitch: FreeswitchInstance, ensure_redis: RedisServer,
        push_endpoint: PushEndpoint, aor: str, aor2: str) -> None:  # noqa: F811
    """The event socket drops while the phone wakes: its REGISTER is missed live, found by the
    resync on reconnect (a gap for the waiting call), and the call is answered all the same."""
    from rig.tcpproxy import TcpProxy

    fs, ep = ensure_freeswitch, push_endpoint
    proxy = TcpProxy(fs.ports.esl)
    await proxy.start()
    text = (f'[freeswitch]\nport = {proxy.port}\npassword = "{ESL_PASSWORD}"\nheartbeat = 1\nrequest_timeout = 2\n'
            f'[redis]\nurl = "{ensure_redis.url}"\nkey_prefix = "t-{uuid.uuid4().hex[:8]}:"\n'
            '[http]\nlisten = "127.0.0.1:0"\n'
            '[capture]\nvendor_allowed_hosts = ["127.0.0.1:*"]\n[calls]\ndefault_timeout = 20\n')
    path = tmp_path / "fs-proxy.toml"
    path.write_text(text)
    daemon = Daemon(load(path, environ={}))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await wait_for(lambda: daemon.esl.link.up, 15, "link up")
        phone = await sleeping_phone(fs, aor, ep, daemon)
        caller = SipUA(aor2, fs.ports.sip, password=SIP_PASSWORD)
        await caller.open()
        call = caller.start_call(aor, timeout=30)
        await asyncio.wait_for(ep.on_call.get(), 10)
        proxy.refusing = True
        proxy.drop_all()
        await wait_for(lambda: not daemon.esl.link.up, 10, "link down")
        await phone.open()
        assert await phone.register() == 200  # while the daemon is cut off
        proxy.refusing = False
        await wait_for(lambda: daemon.esl.link.up, 20, "link up again")
        async with asyncio.timeout(10):
            await phone.invites.get()
        assert (await call).status == 200
        assert await caller.hangup() == 200
        async with asyncio.timeout(5):
            await phone.byes.get()
        phone.close()
        caller.close()
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(20):
                await task
        await proxy.stop()


async def test_a_reconcile_just_after_a_call_arrives_does_not_end_it(
        fs_daemon: Daemon, ensure_freeswitch: FreeswitchInstance, push_endpoint: PushEndpoint,  # noqa: F811
        aor: str, aor2: str) -> None:
    """FreeSWITCH lists channels from a table it writes after the events: a caller parked a few
    ms ago is often missing from ``show channels``. The reconcile every reconnect runs (here: run
    while the call is new, as when a call arrives during a reconnect) must not take it for gone."""
    fs, ep = ensure_freeswitch, push_endpoint
    phone = await sleeping_phone(fs, aor, ep, fs_daemon)
    for _ in range(3):
        caller = SipUA(aor2, fs.ports.sip, password=SIP_PASSWORD)
        await caller.open()
        call = caller.start_call(aor, timeout=30)
        await wait_for(lambda: fs_daemon.calls.calls, 5, "the call is waiting")
        await fs_daemon.calls.reconcile()
        await wake_on_push(phone, ep, same_port=False)
        assert (await call).status == 200
        assert await phone.hangup() == 200
        async with asyncio.timeout(5):
            await caller.byes.get()
        assert ep.kinds().count("cancel") == 0
        phone.close()  # asleep again for the next round
        caller.close()
        await wait_for(lambda: not fs_daemon.calls.calls, 5, "the call ended")


async def test_freeswitch_restart_while_a_call_waits_ends_it_and_the_next_call_works(
        fs_daemon: Daemon, ensure_freeswitch: FreeswitchInstance, push_endpoint: PushEndpoint,  # noqa: F811
        aor: str, aor2: str) -> None:
    fs, ep = ensure_freeswitch, push_endpoint
    phone = await sleeping_phone(fs, aor, ep, fs_daemon)
    caller = SipUA(aor2, fs.ports.sip, password=SIP_PASSWORD)
    await caller.open()
    call = caller.start_call(aor, timeout=30)
    await asyncio.wait_for(ep.on_call.get(), 10)
    await wait_for(lambda: fs_daemon.calls.calls, 5, "the call is waiting")
    link = fs_daemon.esl.link
    changes = link.changes
    await asyncio.to_thread(fs.restart)  # the caller's channel dies with FreeSWITCH
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await call
    await wait_for(lambda: link.up and link.changes >= changes + 2, 30, "link back after the restart")
    await wait_for(lambda: not fs_daemon.calls.calls, 10, "the lost call ended in the daemon")
    # the registrations were in FreeSWITCH's database: the phone is still known; a new call works
    caller2 = SipUA(aor2, fs.ports.sip, password=SIP_PASSWORD)
    await caller2.open()
    call2 = caller2.start_call(aor, timeout=30)
    await wake_on_push(phone, ep, same_port=False)
    assert (await call2).status == 200
    assert await phone.hangup() == 200
    async with asyncio.timeout(5):
        await caller2.byes.get()
    phone.close()
    caller.close()
    caller2.close()
