"""What the docs promise about calls, settings and operations, each shown on the real rig.

The daemon pushes through its own FCM provider to the strict local FCM (HTTP/2 over TLS),
as in test_providers_e2e.py; Asterisk and Redis are real. One test per promise:

* docs/configuration.md: ``continue_context``, ``on_decline = "keep-waiting"``,
  ``missed_call_push``, ``dial_timeout``, ``[http] enabled``;
* docs/dialplan.md / the sample extensions.conf: ``STASISSTATUS=FAILED`` (no daemon) rings the
  registered contacts directly;
* docs/operations.md: ``/readyz`` answers 503 while draining; the call, push and wake metrics;
* docs/storage.md: upserts that arrive out of order converge on the newest registration;
* docs/providers.md: a device that did not answer hears ``answered-elsewhere``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx
import pytest

from ari_push.bindings import RedisStore
from ari_push.model import Binding, PushParams
from ari_push.redis_keys import Keys
from ari_push.service import make_redis
from ari_push.settings import RedisSettings
from rig.asterisk import AsteriskInstance
from rig.redis import RedisServer
from rig.sipua import SipUA
from tests.conftest import RunningDaemon, wait_for
from tests.fakes.builders import fcm_token
from tests.integration.test_calls import no_channels
from tests.integration.test_providers_e2e import (
    Services,
    fcm_params,
    fcm_pushes,
    provider_daemon,
    services,  # noqa: F401  (fixture)
    sleeping_phone,
)


@pytest.fixture
def make_daemon(tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
                services: Services):  # noqa: F811
    async def make(calls: str = "", extra: str = "", top: str = "") -> RunningDaemon:
        return await provider_daemon(tmp_path, ensure_asterisk, ensure_redis, start_daemon, services,
                                     calls=calls, extra=extra, top=top)
    return make


async def open_caller(asterisk: AsteriskInstance) -> SipUA:
    caller = SipUA("2000", asterisk.ports.sip)
    await caller.open()
    return caller


# ---------------------------------------------------------------- [calls]


async def test_continue_context_takes_the_unanswered_call(
        make_daemon, services: Services, ensure_asterisk: AsteriskInstance, aor: str) -> None:  # noqa: F811
    rd = await make_daemon(calls='continue_context = "rig-continue"\ndefault_timeout = 3\n')
    token = fcm_token(f"cont{aor}")
    await sleeping_phone(ensure_asterisk, aor, fcm_params(token), rd)
    caller = await open_caller(ensure_asterisk)
    try:
        resp = await asyncio.wait_for(caller.call(aor), 20)
        assert resp.status == 200  # answered by rig-continue's Echo(), not the caller's 480
        await wait_for(lambda: "rig-continue: PUSH_STATUS=TIMEOUT" in ensure_asterisk.log_text(), 10,
                       "the call continued in rig-continue,s,1 with its status")
        assert await caller.hangup() == 200
    finally:
        caller.close()
    await wait_for(lambda: no_channels(ensure_asterisk), 10, "no channels left")


async def test_on_decline_keep_waiting_ignores_a_decline(
        make_daemon, services: Services, ensure_asterisk: AsteriskInstance, aor: str) -> None:  # noqa: F811
    rd = await make_daemon(calls='on_decline = "keep-waiting"\ndefault_timeout = 5\n')
    token = fcm_token(f"decl{aor}")
    phone = await sleeping_phone(ensure_asterisk, aor, fcm_params(token), rd)
    phone.answer_code = 603
    caller = await open_caller(ensure_asterisk)
    try:
        started = time.monotonic()
        answer = caller.start_call(aor)
        await wait_for(lambda: fcm_pushes(services.fcm, token, "call"), 15, "call push")
        await phone.open()
        assert await phone.register() == 200
        await asyncio.wait_for(phone.invites.get(), 10)  # rung, and it declines (603)
        resp = await asyncio.wait_for(answer, 20)
        took = time.monotonic() - started
    finally:
        phone.close()
        caller.close()
    # not busy at once (on_decline = "busy" ends the call on the decline): it waited the 5 s for
    # other devices, then ended DECLINED (the sample dialplan: Busy, 486)
    assert resp.status == 486 and took >= 4.5
    assert "PUSH_STATUS=DECLINED" in ensure_asterisk.log_text()
    await wait_for(lambda: no_channels(ensure_asterisk), 10, "no channels left")


async def test_missed_call_push_off_sends_the_cancel_only(
        make_daemon, services: Services, ensure_asterisk: AsteriskInstance, aor: str) -> None:  # noqa: F811
    rd = await make_daemon(calls="missed_call_push = false\ndefault_timeout = 3\n")
    token = fcm_token(f"miss{aor}")
    await sleeping_phone(ensure_asterisk, aor, fcm_params(token), rd)
    caller = await open_caller(ensure_asterisk)
    try:
        assert (await asyncio.wait_for(caller.call(aor), 20)).status == 480
    finally:
        caller.close()
    # the cancel goes out when the call ends, where the missed-call push would go too
    await wait_for(lambda: fcm_pushes(services.fcm, token, "cancel"), 10, "the cancel push")
    await wait_for(lambda: not rd.daemon.calls.calls, 10, "the call finished")
    assert fcm_pushes(services.fcm, token, "missed-call") == []
    await wait_for(lambda: no_channels(ensure_asterisk), 10, "no channels left")


async def test_dial_timeout_gives_up_on_a_leg_that_never_answers(
        make_daemon, services: Services, ensure_asterisk: AsteriskInstance, aor: str) -> None:  # noqa: F811
    rd = await make_daemon(calls="dial_timeout = 2\ndefault_timeout = 30\n")
    token = fcm_token(f"dial{aor}")
    phone = await sleeping_phone(ensure_asterisk, aor, fcm_params(token), rd)
    phone.answer_delay = 120  # woken, rings, never picks up
    caller = await open_caller(ensure_asterisk)
    try:
        answer = caller.start_call(aor, timeout=60)
        await wait_for(lambda: fcm_pushes(services.fcm, token, "call"), 15, "call push")
        await phone.open()
        assert await phone.register() == 200
        await asyncio.wait_for(phone.invites.get(), 10)
        # the 2 s dial timeout ends the leg (a generous bound, far below the call's 30 s)
        await asyncio.wait_for(phone.cancels.get(), 15)
        assert not answer.done()  # the call itself still waits for its own timeout
        await caller.cancel()
        assert (await asyncio.wait_for(answer, 10)).status == 487
    finally:
        phone.close()
        caller.close()
    await wait_for(lambda: no_channels(ensure_asterisk), 10, "no channels left")


# ---------------------------------------------------------------- answered elsewhere


async def test_the_device_that_did_not_answer_hears_answered_elsewhere(
        make_daemon, services: Services, ensure_asterisk: AsteriskInstance, aor: str) -> None:  # noqa: F811
    rd = await make_daemon()
    phone_token, tablet_token = fcm_token(f"ph{aor}"), fcm_token(f"tab{aor}")
    phone = await sleeping_phone(ensure_asterisk, aor, fcm_params(phone_token), rd)
    tablet = SipUA(aor, ensure_asterisk.ports.sip)
    await tablet.open()
    assert await tablet.register(fcm_params(tablet_token)) == 200
    await wait_for(lambda: _count(rd, aor, 2), 10, "two devices stored")
    tablet.close()
    caller = await open_caller(ensure_asterisk)
    try:
        answer = caller.start_call(aor)
        await wait_for(lambda: fcm_pushes(services.fcm, phone_token, "call")
                       and fcm_pushes(services.fcm, tablet_token, "call"), 15, "both devices pushed")
        await phone.open()
        assert await phone.register() == 200
        await asyncio.wait_for(phone.invites.get(), 10)
        assert (await asyncio.wait_for(answer, 15)).status == 200
        await wait_for(lambda: fcm_pushes(services.fcm, tablet_token, "answered-elsewhere"), 10,
                       "answered-elsewhere to the tablet")
        (pushed,) = fcm_pushes(services.fcm, tablet_token, "answered-elsewhere")
        (call,) = fcm_pushes(services.fcm, tablet_token, "call")
        assert pushed["data"]["call_id"] == call["data"]["call_id"] and pushed["android"]["priority"] == "high"
        assert fcm_pushes(services.fcm, phone_token, "answered-elsewhere") == []  # not to the one that answered
        assert await phone.hangup() == 200
        await asyncio.wait_for(caller.byes.get(), 10)
    finally:
        phone.close()
        caller.close()
    await wait_for(lambda: no_channels(ensure_asterisk), 10, "no channels left")


async def _count(rd: RunningDaemon, aor: str, n: int) -> bool:
    return len(await rd.daemon.store.bindings_for(aor)) == n


# ---------------------------------------------------------------- the sample dialplan without a daemon


async def test_no_daemon_stasis_failed_rings_the_registered_contacts(
        ensure_asterisk: AsteriskInstance, aor: str) -> None:
    """No ari-push connected: Stasis() fails at once (STASISSTATUS=FAILED) and the sample
    dialplan dials what is registered, without any push."""
    desk = SipUA(aor, ensure_asterisk.ports.sip)
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await desk.open()
    await caller.open()
    try:
        assert await desk.register() == 200
        answer = caller.start_call(aor)
        invite = await asyncio.wait_for(desk.invites.get(), 15)
        assert invite.header("X-Ari-Push-Call-Id") == ""  # dialled by the dialplan, not by ari-push
        assert (await asyncio.wait_for(answer, 10)).status == 200
        assert "STASISSTATUS=FAILED" in ensure_asterisk.log_text()
        assert await desk.hangup() == 200
        await asyncio.wait_for(caller.byes.get(), 10)
        await desk.unregister()
    finally:
        desk.close()
        caller.close()
    await wait_for(lambda: no_channels(ensure_asterisk), 10, "no channels left")


# ---------------------------------------------------------------- [http], /readyz, /metrics


async def test_http_disabled_opens_no_port(make_daemon, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ari_push.health")
    rd = await make_daemon(extra="[http]\nenabled = false\n")
    assert rd.daemon.health.port == 0  # the configured 127.0.0.1:0 was never bound
    assert not [r for r in caplog.records if "health and metrics on" in r.getMessage()]


async def test_readyz_is_503_while_draining(
        make_daemon, services: Services, ensure_asterisk: AsteriskInstance, aor: str) -> None:  # noqa: F811
    rd = await make_daemon(top="shutdown_timeout = 5\n", calls="default_timeout = 30\n")
    url = f"http://127.0.0.1:{rd.daemon.health.port}/readyz"
    async with httpx.AsyncClient(trust_env=False) as http:
        ready = await http.get(url)
        assert ready.status_code == 200 and ready.json()["ready"] is True
        token = fcm_token(f"drain{aor}")
        await sleeping_phone(ensure_asterisk, aor, fcm_params(token), rd)
        caller = await open_caller(ensure_asterisk)
        try:
            answer = caller.start_call(aor)
            await wait_for(lambda: fcm_pushes(services.fcm, token, "call"), 15, "call push")
            rd.stop_event.set()  # SIGTERM's path: stop taking calls, drain the waiting one
            await wait_for(lambda: rd.daemon.health.draining, 10, "draining")
            draining = await http.get(url)
            assert draining.status_code == 503
            assert draining.json()["draining"] is True and draining.json()["ready"] is False
            assert (await asyncio.wait_for(answer, 20)).status == 480  # continued, PUSH_STATUS=SHUTDOWN
        finally:
            caller.close()
    async with asyncio.timeout(20):
        await rd.task
    await wait_for(lambda: no_channels(ensure_asterisk), 10, "no channels left")


async def test_metrics_count_calls_pushes_and_wake_ups(
        make_daemon, services: Services, ensure_asterisk: AsteriskInstance, aor: str) -> None:  # noqa: F811
    rd = await make_daemon()
    token = fcm_token(f"metric{aor}")
    phone = await sleeping_phone(ensure_asterisk, aor, fcm_params(token), rd)
    caller = await open_caller(ensure_asterisk)
    try:
        answer = caller.start_call(aor)
        await wait_for(lambda: fcm_pushes(services.fcm, token, "call"), 15, "call push")
        await phone.open()
        assert await phone.register() == 200
        await asyncio.wait_for(phone.invites.get(), 10)
        assert (await asyncio.wait_for(answer, 15)).status == 200
        assert await phone.hangup() == 200
        await asyncio.wait_for(caller.byes.get(), 10)
    finally:
        phone.close()
        caller.close()
    await wait_for(lambda: not rd.daemon.calls.calls, 10, "the call finished")
    async with httpx.AsyncClient(trust_env=False) as http:
        text = (await http.get(f"http://127.0.0.1:{rd.daemon.health.port}/metrics")).text
    samples = _samples(text)
    assert samples['ari_push_calls_total{status="ANSWERED"}'] == 1
    assert samples['ari_push_pushes_total{kind="call",provider="fcm",result="delivered"}'] == 1
    assert samples['ari_push_registrations_captured_total{dialect="rfc8599"}'] >= 2  # asleep, then awake
    assert samples["ari_push_wake_latency_seconds_count"] == 1
    assert samples["ari_push_calls_waiting"] == 0
    assert samples['ari_push_link_up{link="redis"}'] == 1
    assert samples["ari_push_store_errors_total"] == 0


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            labels = name.partition("{")
            if labels[1]:  # prometheus_client orders labels as declared: sort them for the lookup
                inner = ",".join(sorted(labels[2].rstrip("}").split(",")))
                name = f"{labels[0]}{{{inner}}}"
            out[name] = float(value)
    return out


# ---------------------------------------------------------------- storage


async def test_out_of_order_upserts_converge_on_the_newest(ensure_redis: RedisServer) -> None:
    """Two daemons (or a resync racing a live event) write the same device out of order:
    the newest ``last_seen`` wins in Redis, whatever the arrival order."""
    client = make_redis(RedisSettings(url=ensure_redis.url))
    try:
        store = RedisStore(client, Keys(f"ooo-{time.monotonic_ns()}:"), 86400)
        push = PushParams("fcm", fcm_token("ooo"), "proj")
        older = Binding("1001", "1001", push, "sip:1001@127.0.0.1:5001", "old", 100.0, 100.0)
        newer = Binding("1001", "1001", push, "sip:1001@127.0.0.1:5002", "new", 100.0, 200.0)
        assert older.device_id == newer.device_id
        await store.upsert(newer)
        kept = await store.upsert(older)  # arrives late
        assert kept.contact_uri.endswith(":5002") and kept.last_seen == 200.0
        (stored,) = await store.bindings_for("1001")
        assert stored.contact_uri.endswith(":5002") and stored.last_seen == 200.0
        assert await store.sweep(150.0) == 0  # the index kept the newest time too (gt=True)
    finally:
        await client.aclose()
