"""Call take-over: the SIPp caller, and the faults of issue 5 (Redis down, a hanging provider,
the ARI websocket dropping mid-call, two calls to one callee)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from rig.asterisk import AsteriskInstance
from rig.redis import RedisServer, free_port
from rig.sipua import SipUA
from rig.tcpproxy import TcpProxy
from tests.conftest import daemon_config, wait_for
from tests.integration.test_calls import (
    PushEndpoint,
    hang_up_and_check,
    no_channels,
    push_endpoint,  # noqa: F401  (fixture)
    sleeping_phone,
    wake_on_push,
)

SCENARIO = Path(__file__).parent / "sipp" / "caller.xml"


def extra(timeout: float = 6) -> str:
    return ('[capture]\nvendor_allowed_hosts = ["127.0.0.1:*"]\n'
            f'[calls]\ndefault_timeout = {timeout}\n'
            '[vendor]\ntimeout = 1\n'
            'body_template = \'{"type":"{kind}","call_id":"{call_id}","caller":"{caller_number}"}\'\n')


EXTRA = extra()


async def test_sipp_caller_rtp_echo_and_caller_hangs_up(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        push_endpoint: PushEndpoint, aor: str) -> None:  # noqa: F811
    rd = await start_daemon(daemon_config(tmp_path, ensure_asterisk, ensure_redis.url, EXTRA))
    phone = await sleeping_phone(ensure_asterisk, aor, push_endpoint, rd.daemon.store)
    sipp = await asyncio.create_subprocess_exec(
        "sipp", f"127.0.0.1:{ensure_asterisk.ports.sip}", "-sf", str(SCENARIO), "-s", aor,
        "-i", "127.0.0.1", "-p", str(free_port()), "-mi", "127.0.0.1", "-mp", str(free_port()), "-rtp_echo",
        "-m", "1", "-l", "1", "-nostdin", "-trace_err",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, cwd=tmp_path)  # a full pipe stalls SIPp
    try:
        try:
            await wake_on_push(phone, push_endpoint, same_port=False)
        except TimeoutError:
            pytest.fail("no push; SIPp errors: " + _sipp_errors(tmp_path))
        await asyncio.wait_for(phone.invites.get(), 5)
        await wait_for(lambda: phone.rtp is not None and phone.rtp.remote is not None, 5, "phone answered")
        assert phone.rtp is not None
        await phone.rtp.send_for(1.0)  # SIPp echoes it back through the bridge
        assert phone.rtp.received > 10, "RTP did not come back from the SIPp caller"
        try:
            bye = await asyncio.wait_for(phone.byes.get(), 10)  # caller's BYE reaches the phone
        except TimeoutError:
            pytest.fail("no BYE at the phone; SIPp errors: " + _sipp_errors(tmp_path))
        assert bye.method == "BYE"
        assert await asyncio.wait_for(sipp.wait(), 15) == 0, _sipp_errors(tmp_path)
    finally:
        if sipp.returncode is None:
            sipp.kill()
            await sipp.wait()
        phone.close()
    await wait_for(lambda: no_channels(ensure_asterisk), 5, "no channels left")


async def test_redis_down_dials_live_contacts_and_reports_push_failed(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, start_daemon, aor: str) -> None:
    redis = RedisServer()
    redis.start()
    try:
        # a store that cannot be read at all: no binding cache to ride through it (that is
        # test_outages.py::test_call_while_redis_restarts_is_pushed_from_the_cache_and_answered)
        rd = await start_daemon(daemon_config(tmp_path, ensure_asterisk, redis.url,
                                              EXTRA + "[redis]\ncache_max_age = 0.001\n"))
        await wait_for(lambda: rd.daemon.redis_link.up, 10, "redis up")
        desk = SipUA(aor, ensure_asterisk.ports.sip)  # an awake phone without push
        await desk.open()
        assert await desk.register() == 200
        redis.stop()
        await wait_for(lambda: not rd.daemon.redis_link.up, 10, "redis down")
        caller = SipUA("2000", ensure_asterisk.ports.sip)
        await caller.open()
        resp = await asyncio.wait_for(caller.call(aor), 10)
        assert resp.status == 200  # the live contact was dialled without the store
        await desk.hangup()
        await asyncio.wait_for(caller.byes.get(), 5)
        assert await desk.unregister() == 200
        desk.close()
        # only a sleeping contact left, store still down: nobody answers -> PUSH_FAILED
        sleeper = SipUA(aor, ensure_asterisk.ports.sip)
        await sleeper.open()
        assert await sleeper.register("pn-provider=fcm;pn-prid=cAbCdEf123:APA91bHxyz-_AbC_xyz-123;pn-param=p1") == 200
        sleeper.close()
        resp = await asyncio.wait_for(caller.call(aor), 12)
        assert resp.status == 480
        await wait_for(lambda: "PUSH_STATUS=PUSH_FAILED" in ensure_asterisk.log_text(), 5, "PUSH_FAILED")
        assert not rd.task.done()
        caller.close()
    finally:
        redis.cleanup()
    await wait_for(lambda: no_channels(ensure_asterisk), 5, "no channels left")


async def test_hanging_provider_does_not_delay_the_timeout_nor_other_calls(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        push_endpoint: PushEndpoint, aor: str, aor2: str) -> None:  # noqa: F811
    accepted: list[asyncio.BaseTransport] = []

    class Silent(asyncio.Protocol):  # accepts the connection, answers nothing
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.append(transport)

    stalled = await asyncio.get_running_loop().create_server(Silent, "127.0.0.1", 0)
    port = stalled.sockets[0].getsockname()[1]
    rd = await start_daemon(daemon_config(tmp_path, ensure_asterisk, ensure_redis.url, EXTRA))
    try:
        phone = SipUA(aor, ensure_asterisk.ports.sip)
        await phone.open()
        assert await phone.register(f"X-PUSH-URI=http://127.0.0.1:{port}/push") == 200
        await wait_for(lambda: rd.daemon.store.bindings_for(aor), 5, "stored")
        phone.close()
        caller = SipUA("2000", ensure_asterisk.ports.sip)
        await caller.open()
        started = time.monotonic()
        stalled_call = caller.start_call(aor)
        # meanwhile another callee, whose push service answers, is woken and rung as usual
        other = await sleeping_phone(ensure_asterisk, aor2, push_endpoint, rd.daemon.store)
        caller2 = SipUA("2000", ensure_asterisk.ports.sip)
        await caller2.open()
        good_call = caller2.start_call(aor2)
        await asyncio.wait_for(push_endpoint.on_call.get(), 5)
        await other.open()
        assert await other.register() == 200
        assert (await asyncio.wait_for(good_call, 5)).status == 200
        assert not stalled_call.done()
        await other.hangup()
        resp = await asyncio.wait_for(stalled_call, 15)
        took = time.monotonic() - started
        assert resp.status == 480
        assert took >= 5.5, f"ended after {took:.1f} s, before the 6 s timeout"  # the 15 s wait bounds it
        caller.close()
        caller2.close()
        other.close()
    finally:
        await rd.stop()  # no more pushes to the stalled server, then close what it accepted
        stalled.close()
        await stalled.wait_closed()
        for transport in accepted:
            transport.close()
    await wait_for(lambda: no_channels(ensure_asterisk), 5, "no channels left")


def _sipp_errors(folder: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in folder.glob("*errors.log"))[-2000:]


@pytest.fixture
async def ari_proxy(ensure_asterisk: AsteriskInstance):
    proxy = TcpProxy(ensure_asterisk.ports.http)
    await proxy.start()
    yield proxy
    await proxy.stop()


async def test_ari_websocket_drop_mid_call_is_reconciled(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        push_endpoint: PushEndpoint, ari_proxy: TcpProxy, aor: str) -> None:  # noqa: F811
    config = daemon_config(tmp_path, ensure_asterisk, ensure_redis.url, extra(10))
    config.write_text(config.read_text().replace(f":{ensure_asterisk.ports.http}", f":{ari_proxy.port}"))
    rd = await start_daemon(config)
    phone = await sleeping_phone(ensure_asterisk, aor, push_endpoint, rd.daemon.store)
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    answer = caller.start_call(aor)
    await asyncio.wait_for(push_endpoint.on_call.get(), 10)
    ari_proxy.drop_all()  # the event websocket (and any REST connection) dies mid-call
    await wait_for(lambda: not rd.daemon.ari.link.up, 5, "ari link down")
    await wait_for(lambda: rd.daemon.ari.link.up, 10, "ari link back")
    await phone.open()
    assert await phone.register() == 200
    await asyncio.wait_for(phone.invites.get(), 5)
    resp = await asyncio.wait_for(answer, 10)
    assert resp.status == 200
    await hang_up_and_check(phone, caller, ensure_asterisk)


async def test_caller_leaves_during_ari_outage_is_cleaned_up_on_reconnect(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        push_endpoint: PushEndpoint, ari_proxy: TcpProxy, aor: str) -> None:  # noqa: F811
    config = daemon_config(tmp_path, ensure_asterisk, ensure_redis.url, extra(20))
    config.write_text(config.read_text().replace(f":{ensure_asterisk.ports.http}", f":{ari_proxy.port}"))
    rd = await start_daemon(config)
    await sleeping_phone(ensure_asterisk, aor, push_endpoint, rd.daemon.store)
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    answer = caller.start_call(aor)
    await asyncio.wait_for(push_endpoint.on_call.get(), 10)
    ari_proxy.refusing = True
    ari_proxy.drop_all()
    await wait_for(lambda: not rd.daemon.ari.link.up, 5, "ari link down")
    await caller.cancel()  # the StasisEnd of this is lost with the websocket
    assert (await asyncio.wait_for(answer, 5)).status == 487
    refused = ari_proxy.refused
    await wait_for(lambda: ari_proxy.refused > refused, 15, "a reconnect attempt refused during the outage")
    ari_proxy.refusing = False
    await wait_for(lambda: rd.daemon.ari.link.up, 15, "ari link back")
    await wait_for(lambda: "cancel" in push_endpoint.kinds(), 10, "cancel push after reconcile")
    await wait_for(lambda: not rd.daemon.calls.calls, 5, "call forgotten")
    await wait_for(lambda: no_channels(ensure_asterisk), 5, "no channels left")
    caller.close()


async def test_two_calls_to_one_callee(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        push_endpoint: PushEndpoint, aor: str) -> None:  # noqa: F811
    rd = await start_daemon(daemon_config(tmp_path, ensure_asterisk, ensure_redis.url, EXTRA))
    phone = await sleeping_phone(ensure_asterisk, aor, push_endpoint, rd.daemon.store)
    phone.answer_delay = 0.3
    callers = [SipUA("2000", ensure_asterisk.ports.sip) for _ in range(2)]
    for c in callers:
        await c.open()
    first = callers[0].start_call(aor)
    await asyncio.wait_for(push_endpoint.on_call.get(), 10)
    second = callers[1].start_call(aor)
    await asyncio.wait_for(push_endpoint.on_call.get(), 10)
    await phone.open()
    assert await phone.register() == 200  # one wake-up serves both waiting calls
    phone.answer_code = 200
    results = await asyncio.wait_for(asyncio.gather(first, second), 15)
    statuses = sorted(r.status for r in results)
    # the phone answers the first INVITE; the second finds it busy (one line) -> DECLINED -> Busy()
    assert statuses == [200, 486], statuses
    await phone.hangup()
    for c in callers:
        c.close()
    phone.close()
    await wait_for(lambda: no_channels(ensure_asterisk), 10, "no channels left")


async def test_music_on_hold_as_early_media_while_the_phone_wakes(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        push_endpoint: PushEndpoint, aor: str) -> None:  # noqa: F811
    # The rig's Asterisk starts with a tone for the "default" class (rig.asterisk.moh_tone).
    rd = await start_daemon(daemon_config(tmp_path, ensure_asterisk, ensure_redis.url,
                                          extra(8).replace("[calls]\n", '[calls]\nmoh_class = "default"\n')))
    phone = await sleeping_phone(ensure_asterisk, aor, push_endpoint, rd.daemon.store)
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    answer = caller.start_call(aor)
    await asyncio.wait_for(push_endpoint.on_call.get(), 10)
    await wait_for(lambda: caller.rtp is not None and caller.rtp.received > 20, 5, "music before the answer")
    assert 183 in caller.provisional and not answer.done()
    await phone.open()
    assert await phone.register() == 200
    assert (await asyncio.wait_for(answer, 10)).status == 200
    await hang_up_and_check(phone, caller, ensure_asterisk)


async def test_call_in_flight_survives_a_sentinel_failover(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, start_daemon, push_endpoint: PushEndpoint,  # noqa: F811
        aor: str) -> None:
    from rig.redis import SentinelSet

    sentinels = SentinelSet()
    await asyncio.to_thread(sentinels.start)
    try:
        config = daemon_config(tmp_path, ensure_asterisk, "", extra(12) + "[redis]\nsentinels = [{}]\n".format(
            ", ".join(f'"{a}"' for a in sentinels.addresses)))
        rd = await start_daemon(config)
        await wait_for(lambda: rd.daemon.redis_link.up, 10, "redis via sentinel")
        phone = await sleeping_phone(ensure_asterisk, aor, push_endpoint, rd.daemon.store)
        caller = SipUA("2000", ensure_asterisk.ports.sip)
        await caller.open()
        answer = caller.start_call(aor)
        await asyncio.wait_for(push_endpoint.on_call.get(), 10)
        old = await asyncio.to_thread(sentinels.failover)
        await asyncio.to_thread(sentinels.wait_new_master, old, 15)
        await phone.open()
        assert await phone.register() == 200  # captured and signalled through the new master
        resp = await asyncio.wait_for(answer, 15)
        assert resp.status == 200
        assert [b.device_id for b in await rd.daemon.store.bindings_for(aor)]  # binding not lost
        await phone.hangup()
        await asyncio.wait_for(caller.byes.get(), 5)
        phone.close()
        caller.close()
        await wait_for(lambda: no_channels(ensure_asterisk), 5, "no channels left")
        await rd.stop()  # while its Redis is still there (the sentinels go next)
    finally:
        await asyncio.to_thread(sentinels.cleanup)


async def test_phone_refusing_the_replacement_invite_is_rung_again(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        push_endpoint: PushEndpoint, aor: str) -> None:  # noqa: F811
    """Same-URI wake: ari-push replaces the leg the phone slept through. If a retransmission of the
    old INVITE reached the phone first, it refuses the new one as a duplicate (486); ari-push must
    ring it again, not end the call busy. Simulated: the woken phone answers its first INVITE 486.
    The old UDP contact is rung (stale_ring_delay) before the phone wakes, as for a slow wake."""
    rd = await start_daemon(daemon_config(tmp_path, ensure_asterisk, ensure_redis.url,
                                          EXTRA.replace("[calls]\n", "[calls]\nstale_ring_delay = 0.05\n")))
    phone = await sleeping_phone(ensure_asterisk, aor, push_endpoint, rd.daemon.store)
    phone.answer_codes = [486]
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    answer = caller.start_call(aor)
    await wake_on_push(phone, push_endpoint, same_port=True, delay=0.4)
    first = await asyncio.wait_for(phone.invites.get(), 5)
    second = await asyncio.wait_for(phone.invites.get(), 5)
    assert first.header("Call-ID") != second.header("Call-ID")  # a new leg, not a retransmission
    assert (await asyncio.wait_for(answer, 10)).status == 200
    await hang_up_and_check(phone, caller, ensure_asterisk)


async def test_bridged_call_is_ended_after_max_duration(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        push_endpoint: PushEndpoint, aor: str) -> None:  # noqa: F811
    rd = await start_daemon(daemon_config(tmp_path, ensure_asterisk, ensure_redis.url,
                                          extra(6).replace("[calls]\n", "[calls]\nmax_duration = 3\n")))
    phone = await sleeping_phone(ensure_asterisk, aor, push_endpoint, rd.daemon.store)
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    answer = caller.start_call(aor)
    await wake_on_push(phone, push_endpoint, same_port=False)
    assert (await asyncio.wait_for(answer, 10)).status == 200
    await asyncio.wait_for(caller.byes.get(), 6)  # ari-push ends it: both sides get a BYE
    await asyncio.wait_for(phone.byes.get(), 2)
    phone.close()
    caller.close()
    await wait_for(lambda: no_channels(ensure_asterisk), 5, "no channels left")


async def test_graceful_shutdown_continues_waiting_calls_with_a_status(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        push_endpoint: PushEndpoint, aor: str) -> None:  # noqa: F811
    rd = await start_daemon(daemon_config(tmp_path, ensure_asterisk, ensure_redis.url,
                                          "shutdown_timeout = 1\n" + extra(20)))
    phone = await sleeping_phone(ensure_asterisk, aor, push_endpoint, rd.daemon.store)
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    answer = caller.start_call(aor)
    await asyncio.wait_for(push_endpoint.on_call.get(), 10)
    took = await rd.stop()  # SIGTERM's path: drain for shutdown_timeout, then continue the rest
    assert took < 1 + 10, f"stopped in {took:.1f} s"  # a generous guard: the call's own timeout is 20 s
    assert (await asyncio.wait_for(answer, 5)).status == 480  # back in the dialplan, not hanging
    await wait_for(lambda: "PUSH_STATUS=SHUTDOWN" in ensure_asterisk.log_text(), 5, "SHUTDOWN status")
    phone.close()
    caller.close()
    await wait_for(lambda: no_channels(ensure_asterisk), 5, "no channels left")
