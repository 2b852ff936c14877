"""Whole calls through the daemon's own push providers: FCM HTTP v1, APNs and the webhook.

Real Asterisk, real Redis, the daemon as built by service.py (build_providers, the dispatcher,
the dead-token handler), and the strict local push services of tests/fakes over TLS: FCM and
APNs over HTTP/2 (ALPN h2, as Google and Apple serve them), the webhook relay over HTTPS
checking our HMAC signature. A phone registers with RFC 8599 push parameters, goes to sleep,
and re-registers only when the fake service has accepted a call push for its token.
"""

from __future__ import annotations

import asyncio
import email.utils
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rig.asterisk import AsteriskInstance
from rig.redis import RedisServer
from rig.sipua import SipUA
from tests.conftest import RunningDaemon, daemon_config, wait_for
from tests.fakes import ApnsAnswer, FakeApns, FakeFcm, FakeVendor, FcmAnswer, Pki, VendorAnswer, make_pki
from tests.fakes.builders import apns_token, fcm_token
from tests.integration.test_calls import no_channels

PROJECT = "ari-push-e2e"
TEAM = "TEAM123456"
KEY_ID = "KEY1234567"
BUNDLE = "com.example.phone"
TOPIC = f"{BUNDLE}.voip"
SECRET = "relay-shared-secret-0123456789"
RELAYED = "acme"  # an extra provider the webhook relays
TIMEOUT = 8  # [calls] default_timeout


@dataclass
class Services:
    pki: Pki
    fcm: FakeFcm
    apns: FakeApns
    sandbox: FakeApns
    relay: FakeVendor


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    pki = make_pki(tmp_path / "pki")
    fcm = FakeFcm(pki)
    apns = FakeApns(pki)
    sandbox = FakeApns(pki, environment="sandbox", device_tokens=apns.device_tokens)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    relay = FakeVendor(ctx, webhook_secret=SECRET)
    started: list[Any] = []
    try:
        for fake in (fcm, apns, sandbox, relay):
            await fake.start()
            started.append(fake)
        yield Services(pki, fcm, apns, sandbox, relay)
    finally:
        for fake in reversed(started):
            await fake.stop()


@pytest.fixture
async def daemon(tmp_path: Path, services: Services, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer,
                 start_daemon) -> RunningDaemon:
    # services first: fixtures end in reverse order, so the daemon stops before the push services
    # do (a daemon still pushing to a service that is closing leaves a TLS socket behind)
    return await provider_daemon(tmp_path, ensure_asterisk, ensure_redis, start_daemon, services)


async def provider_daemon(tmp_path: Path, asterisk: AsteriskInstance, redis: RedisServer, start_daemon: Any,
                          s: Services, calls: str = "", extra: str = "", top: str = "") -> RunningDaemon:
    """A daemon with [[fcm]], [[apns]] and [webhook] pointing at the local services;
    ``calls`` adds [calls] keys, ``extra`` more tables, ``top`` top-level keys."""
    sa_file = tmp_path / "service-account.json"
    sa_file.write_text(s.fcm.add_project(PROJECT))
    key_file = tmp_path / "AuthKey.p8"
    p8 = s.apns.add_key(TEAM, KEY_ID, [TOPIC])
    key_file.write_text(p8)
    s.sandbox.add_key(TEAM, KEY_ID, [TOPIC], key=_load_p8(p8))
    text = top + (f'[capture]\nextra_providers = ["{RELAYED}"]\n'
            "[calls]\n" + ("" if "default_timeout" in calls else f"default_timeout = {TIMEOUT}\n") + calls +
            "[push]\nburst = 50\n"
            f'[webhook]\nurl = "{s.relay.url}/relay"\nsecret = "{SECRET}"\nproviders = ["{RELAYED}"]\n'
            f'ca_file = "{s.pki.ca_file}"\n' + extra)
    path = daemon_config(tmp_path, asterisk, redis.url, text)
    path.write_text(path.read_text()
                    + f'[[fcm]]\nproject_id = "{PROJECT}"\nservice_account_file = "{sa_file}"\n'
                      f'api_url = "{s.fcm.url}"\nca_file = "{s.pki.ca_file}"\n'
                    + f'[[apns]]\nname = "phone"\ntopics = ["{TOPIC}"]\nteam_id = "{TEAM}"\nkey_id = "{KEY_ID}"\n'
                      f'key_file = "{key_file}"\nproduction_url = "{s.apns.url}"\nsandbox_url = "{s.sandbox.url}"\n'
                      f'ca_file = "{s.pki.ca_file}"\n')
    rd: RunningDaemon = await start_daemon(path)
    await wait_for(lambda: s.fcm.token_issuances >= 1, 10, "the FCM provider warmed up (access token)")
    return rd


def _load_p8(pem: str) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    return load_pem_private_key(pem.encode(), password=None)


# ---------------------------------------------------------------- the phone and the caller


def fcm_params(token: str) -> str:
    return f"pn-provider=fcm;pn-prid={token};pn-param={PROJECT}"


def apns_params(token: str, sandbox: bool = False) -> str:
    return f"pn-provider={'apns.dev' if sandbox else 'apns'};pn-prid={token};pn-param={TEAM}.{TOPIC}"


def relay_params(token: str) -> str:
    return f"pn-provider={RELAYED};pn-prid={token}"


async def sleeping_phone(asterisk: AsteriskInstance, aor: str, params: str, rd: RunningDaemon) -> SipUA:
    phone = SipUA(aor, asterisk.ports.sip)
    await phone.open()
    assert await phone.register(params) == 200
    await wait_for(lambda: rd.daemon.store.bindings_for(aor), 10, "binding stored")
    phone.close()  # asleep: its contact stays in Asterisk, nobody listens on it
    return phone


def fcm_pushes(fake: FakeFcm, token: str, kind: str) -> list[dict[str, Any]]:
    return [r.body["message"] for r in fake.sends_to(token) if r.body["message"]["data"]["type"] == kind]


def apns_pushes(fake: FakeApns, token: str, kind: str) -> list[dict[str, Any]]:
    return [r.payload for r in fake.requests if r.token == token.lower() and r.payload.get("type") == kind]


def relay_pushes(fake: FakeVendor, kind: str) -> list[dict[str, Any]]:
    import json

    return [b for b in (json.loads(r.body) for r in fake.requests) if b["event"] == kind]


async def wake_when(phone: SipUA, pushed: Callable[[], Any]) -> None:
    """The phone wakes when the push service has the call push for it, and re-registers."""
    await wait_for(pushed, 15, "the call push at the push service")
    await phone.open()
    assert await phone.register() == 200


async def answered_call(asterisk: AsteriskInstance, phone: SipUA, aor: str, pushed: Callable[[], Any]) -> None:
    caller = SipUA("2000", asterisk.ports.sip)
    await caller.open()
    try:
        answer = caller.start_call(aor)
        await wait_for(pushed, 15, "the call push at the push service")
        # the caller hears ringing at once, while the phone still sleeps (docs: "rings the caller")
        await wait_for(lambda: 180 in caller.provisional, 10, "180 Ringing at the caller")
        assert not answer.done() and phone.invites.empty()
        await wake_when(phone, pushed)
        await asyncio.wait_for(phone.invites.get(), 10)
        assert (await asyncio.wait_for(answer, 15)).status == 200
        assert await phone.hangup() == 200
        await asyncio.wait_for(caller.byes.get(), 10)
    finally:
        phone.close()
        caller.close()
    await wait_for(lambda: no_channels(asterisk), 10, "no channels left")


async def unanswered_call(asterisk: AsteriskInstance, aor: str, status: int) -> None:
    caller = SipUA("2000", asterisk.ports.sip)
    await caller.open()
    try:
        resp = await asyncio.wait_for(caller.call(aor), TIMEOUT + 15)
        assert resp.status == status
    finally:
        caller.close()
    await wait_for(lambda: no_channels(asterisk), 10, "no channels left")


async def _none_stored(rd: RunningDaemon, aor: str) -> bool:
    return await rd.daemon.store.bindings_for(aor) == []


# ---------------------------------------------------------------- FCM HTTP v1


async def test_fcm_wakes_the_phone_over_http2_tls_and_the_call_is_answered(
        daemon: RunningDaemon, services: Services, ensure_asterisk: AsteriskInstance, aor: str) -> None:
    token = fcm_token(f"wake{aor}")
    phone = await sleeping_phone(ensure_asterisk, aor, fcm_params(token), daemon)
    await answered_call(ensure_asterisk, phone, aor, lambda: fcm_pushes(services.fcm, token, "call"))
    (sent,) = services.fcm.sends_to(token)
    assert sent.headers[":scheme"] == "https" and sent.headers[":method"] == "POST"  # HTTP/2 pseudo-headers
    assert sent.project == PROJECT and sent.headers["authorization"].startswith("Bearer ya29.")
    message = sent.body["message"]
    assert set(message) == {"token", "data", "android"} and message["android"]["priority"] == "high"
    assert message["data"]["callee"] == aor
    assert services.fcm.refusals == [] and services.fcm.token_issuances == 1  # warm()'s token, reused


async def test_fcm_caller_hangs_up_cancel_push_goes_out(
        daemon: RunningDaemon, services: Services, ensure_asterisk: AsteriskInstance, aor: str) -> None:
    token = fcm_token(f"cancel{aor}")
    await sleeping_phone(ensure_asterisk, aor, fcm_params(token), daemon)
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    try:
        answer = caller.start_call(aor)
        await wait_for(lambda: fcm_pushes(services.fcm, token, "call"), 15, "call push")
        await caller.cancel()
        assert (await asyncio.wait_for(answer, 10)).status == 487
    finally:
        caller.close()
    await wait_for(lambda: fcm_pushes(services.fcm, token, "cancel"), 10, "cancel push through FCM")
    (call,) = fcm_pushes(services.fcm, token, "call")
    (cancel,) = fcm_pushes(services.fcm, token, "cancel")
    assert cancel["data"]["call_id"] == call["data"]["call_id"] and cancel["android"]["priority"] == "high"
    await wait_for(lambda: no_channels(ensure_asterisk), 10, "no channels left")


async def test_fcm_nobody_wakes_timeout_then_cancel_and_missed_call(
        daemon: RunningDaemon, services: Services, ensure_asterisk: AsteriskInstance, aor: str) -> None:
    token = fcm_token(f"timeout{aor}")
    await sleeping_phone(ensure_asterisk, aor, fcm_params(token), daemon)
    await unanswered_call(ensure_asterisk, aor, 480)
    await wait_for(lambda: fcm_pushes(services.fcm, token, "missed-call"), 10, "missed-call push")
    assert len(fcm_pushes(services.fcm, token, "cancel")) == 1
    (missed,) = fcm_pushes(services.fcm, token, "missed-call")
    assert missed["android"]["priority"] == "normal"  # not a ring: must not be demoted for wasting high priority
    assert "PUSH_STATUS=TIMEOUT" in ensure_asterisk.log_text()


async def test_fcm_unregistered_token_is_dropped_from_the_store(
        daemon: RunningDaemon, services: Services, ensure_asterisk: AsteriskInstance, aor: str) -> None:
    token = fcm_token(f"gone{aor}")
    await sleeping_phone(ensure_asterisk, aor, fcm_params(token), daemon)
    services.fcm.unregister(token)  # the app was uninstalled
    await unanswered_call(ensure_asterisk, aor, 480)
    await wait_for(lambda: _none_stored(daemon, aor), 10, "the dead binding dropped")
    assert len(fcm_pushes(services.fcm, token, "call")) == 1  # a dead token's call push is not retried


@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_fcm_429_and_503_retry_after_is_honoured_then_the_call_is_answered(
        daemon: RunningDaemon, services: Services, ensure_asterisk: AsteriskInstance, aor: str, form: str) -> None:
    token = fcm_token(f"busy{form}{aor}")
    phone = await sleeping_phone(ensure_asterisk, aor, fcm_params(token), daemon)
    wait = 2
    retry_after = str(wait) if form == "seconds" else email.utils.formatdate(time.time() + wait + 1, usegmt=True)
    status, code = (429, "QUOTA_EXCEEDED") if form == "seconds" else (503, "UNAVAILABLE")
    services.fcm.script(token, FcmAnswer.error(status, code, retry_after=retry_after))
    await answered_call(ensure_asterisk, phone, aor, lambda: len(fcm_pushes(services.fcm, token, "call")) >= 2)
    refused, delivered = services.fcm.sends_to(token)  # refused once, delivered on the retry
    # the retry waited for Retry-After (a lower bound: a loaded machine only makes it later)
    assert delivered.received - refused.received >= wait - 0.5
    assert services.fcm.refusals == []  # the 429/503 was the service's answer, not a refused request


@pytest.mark.parametrize("how", ["expired", "revoked"])
async def test_fcm_access_token_refreshed_after_expiry_or_401_mid_life(
        daemon: RunningDaemon, services: Services, ensure_asterisk: AsteriskInstance, aor: str, how: str) -> None:
    token = fcm_token(f"oauth{how}{aor}")
    phone = await sleeping_phone(ensure_asterisk, aor, fcm_params(token), daemon)
    if how == "expired":
        services.fcm.expire_access_tokens()  # Google's clock: the daemon's token reached its end
    else:
        services.fcm.revoke_access_tokens()  # a key rotation: the token is refused before its end
    await answered_call(ensure_asterisk, phone, aor, lambda: fcm_pushes(services.fcm, token, "call")
                        and services.fcm.token_issuances == 2)
    assert [r["status"] for r in services.fcm.refusals] == ["UNAUTHENTICATED"]
    assert services.fcm.token_issuances == 2 and len(services.fcm.sends_to(token)) == 1  # the 401 was refused


# ---------------------------------------------------------------- APNs


async def test_apns_voip_push_wakes_the_phone_and_the_call_is_answered(
        daemon: RunningDaemon, services: Services, ensure_asterisk: AsteriskInstance, aor: str) -> None:
    token = apns_token(int(aor))
    phone = await sleeping_phone(ensure_asterisk, aor, apns_params(token), daemon)
    await answered_call(ensure_asterisk, phone, aor, lambda: apns_pushes(services.apns, token, "call"))
    (request,) = [r for r in services.apns.requests if r.token == token]
    assert request.headers["apns-push-type"] == "voip" and request.headers["apns-topic"] == TOPIC
    assert request.headers["apns-priority"] == "10" and int(request.headers["apns-expiration"]) > time.time()
    assert services.sandbox.requests == []
    assert all(status == 200 for status, _ in services.apns.answers)


async def test_apns_sandbox_token_goes_to_the_sandbox(
        daemon: RunningDaemon, services: Services, ensure_asterisk: AsteriskInstance, aor: str) -> None:
    token = apns_token(10_000 + int(aor))
    services.apns.bind_token(token, "sandbox")  # production would answer BadDeviceToken (and we'd drop it)
    phone = await sleeping_phone(ensure_asterisk, aor, apns_params(token, sandbox=True), daemon)
    await answered_call(ensure_asterisk, phone, aor, lambda: apns_pushes(services.sandbox, token, "call"))
    assert services.apns.requests == [] and services.apns.answers == []
    assert len(await daemon.daemon.store.bindings_for(aor)) == 1


async def test_apns_410_unregistered_with_timestamp_drops_the_binding(
        daemon: RunningDaemon, services: Services, ensure_asterisk: AsteriskInstance, aor: str) -> None:
    token = apns_token(20_000 + int(aor))
    await sleeping_phone(ensure_asterisk, aor, apns_params(token), daemon)
    services.apns.script(token, ApnsAnswer(410, "Unregistered", timestamp_ms=int(time.time() * 1000) + 1000))
    await unanswered_call(ensure_asterisk, aor, 480)
    await wait_for(lambda: _none_stored(daemon, aor), 10, "the dead binding dropped")
    assert (410, "Unregistered") in services.apns.answers


async def test_apns_410_older_than_the_last_register_keeps_the_binding(
        daemon: RunningDaemon, services: Services, ensure_asterisk: AsteriskInstance, aor: str) -> None:
    token = apns_token(30_000 + int(aor))
    services.apns.script(token, ApnsAnswer(410, "Unregistered", timestamp_ms=int((time.time() - 3600) * 1000)))
    await sleeping_phone(ensure_asterisk, aor, apns_params(token), daemon)  # registered after the timestamp
    await unanswered_call(ensure_asterisk, aor, 480)
    await wait_for(lambda: (410, "Unregistered") in services.apns.answers, 10, "the 410 answered")
    await wait_for(lambda: not daemon.daemon.calls.calls, 10, "the call and its pushes finished")
    assert len(await daemon.daemon.store.bindings_for(aor)) == 1


async def test_apns_expired_provider_token_is_resigned_and_the_call_still_rings(
        daemon: RunningDaemon, services: Services, ensure_asterisk: AsteriskInstance, aor: str, aor2: str) -> None:
    first = apns_token(40_000 + int(aor))
    phone = await sleeping_phone(ensure_asterisk, aor, apns_params(first), daemon)
    await answered_call(ensure_asterisk, phone, aor, lambda: apns_pushes(services.apns, first, "call"))
    signed = services.apns.newest_iat(KEY_ID)
    await wait_for(lambda: int(time.time()) > signed, 5, "a later second (a fresh token gets a later iat)")
    services.apns.expire_provider_tokens()  # Apple now calls the daemon's provider token expired
    second = apns_token(50_000 + int(aor2))
    phone2 = await sleeping_phone(ensure_asterisk, aor2, apns_params(second), daemon)
    await answered_call(ensure_asterisk, phone2, aor2, lambda: apns_pushes(services.apns, second, "call"))
    assert services.apns.answers.count((403, "ExpiredProviderToken")) == 1
    assert services.apns.provider_tokens_seen(KEY_ID) == 2
    assert (429, "TooManyProviderTokenUpdates") not in services.apns.answers


# ---------------------------------------------------------------- webhook relay


async def test_webhook_relay_wakes_the_phone_with_a_signed_push(
        daemon: RunningDaemon, services: Services, ensure_asterisk: AsteriskInstance, aor: str) -> None:
    token = f"relay-device-{aor}-0123456789"
    phone = await sleeping_phone(ensure_asterisk, aor, relay_params(token), daemon)
    await answered_call(ensure_asterisk, phone, aor, lambda: relay_pushes(services.relay, "call"))
    (call,) = relay_pushes(services.relay, "call")
    assert call["device"]["token"] == token and call["device"]["provider"] == RELAYED and call["callee"] == aor
    assert services.relay.refusals == []  # every POST carried a signature the relay's verify() accepted


async def test_webhook_410_drops_the_binding(
        daemon: RunningDaemon, services: Services, ensure_asterisk: AsteriskInstance, aor: str) -> None:
    token = f"relay-gone-{aor}-0123456789"
    await sleeping_phone(ensure_asterisk, aor, relay_params(token), daemon)
    services.relay.script("/relay", VendorAnswer(410, b"gone"))
    await unanswered_call(ensure_asterisk, aor, 480)
    await wait_for(lambda: _none_stored(daemon, aor), 10, "the dead binding dropped")
