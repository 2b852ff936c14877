"""APNs VoIP provider against the strict raw-h2 fake (TLS, ALPN h2, JWT checks)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ari_push.model import Binding, PushKind, PushOutcome
from ari_push.push.apns import ApnsProvider
from ari_push.settings import ApnsApp, Secret, SettingsError
from tests.conftest import wait_for
from tests.fakes import ApnsAnswer, FakeApns, Pki
from tests.fakes.builders import apns_token, binding, message
from tests.unit.push.conftest import KEY_ID, TEAM, TOPIC


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_voip_push_headers_and_payload(fake_apns: FakeApns, apns_app: ApnsApp) -> None:
    provider = ApnsProvider(apns_app)
    msg = message(extra=(("collapse_id", "call-1"),))
    try:
        result = await provider.send(binding("apns", apns_token(1), TOPIC), msg)
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.DELIVERED, result
    (req,) = fake_apns.requests
    h = req.headers
    assert h[":method"] == "POST" and h[":path"] == f"/3/device/{apns_token(1)}"
    assert h["apns-push-type"] == "voip" and h["apns-topic"] == TOPIC and h["apns-priority"] == "10"
    assert h["apns-expiration"] == str(int(msg.deadline))
    assert h["apns-collapse-id"] == "call-1"
    assert str(uuid.UUID(h["apns-id"])) == h["apns-id"]
    assert result.reason == h["apns-id"]  # Apple echoes it; 200 comes with no body at all
    claims = jwt.decode(h["authorization"].removeprefix("bearer "), options={"verify_signature": False})
    assert claims["iss"] == TEAM and jwt.get_unverified_header(h["authorization"][7:])["kid"] == KEY_ID
    assert req.payload == {
        "aps": {}, "type": "call", "call_id": "call-1", "caller_number": "+15551230000",
        "caller_name": "Bob", "callee": "alice", "deadline": int(msg.deadline),
    }


async def test_one_tls_connection_and_one_jwt_for_many_pushes(fake_apns: FakeApns, apns_app: ApnsApp) -> None:
    provider = ApnsProvider(apns_app)
    try:
        first = await asyncio.gather(*(provider.send(binding("apns", apns_token(i), TOPIC), message())
                                       for i in range(50)))
        second = await asyncio.gather(*(provider.send(binding("apns", apns_token(i), TOPIC), message())
                                        for i in range(50)))
    finally:
        await provider.aclose()
    assert {r.outcome for r in first + second} == {PushOutcome.DELIVERED}
    assert fake_apns.handshakes == 1  # server side: one TLS handshake for 100 pushes
    assert {r.connection for r in fake_apns.requests} == {1}
    assert fake_apns.provider_tokens_seen(KEY_ID) == 1
    assert provider.jwt_signings == 1


async def test_sandbox_uses_its_own_client(fake_apns: FakeApns, pki: Pki, apns_app: ApnsApp) -> None:
    sandbox = await FakeApns(pki).start()
    try:
        sandbox.add_key(TEAM, KEY_ID, [TOPIC], key=None)  # a different key: the JWT must not verify there
        provider = ApnsProvider(dataclasses.replace(apns_app, sandbox_url=sandbox.url))
        prod = await provider.send(binding("apns", apns_token(1), TOPIC), message())
        dev = await provider.send(binding("apns", apns_token(2), TOPIC, sandbox=True), message())
        await provider.aclose()
    finally:
        await sandbox.stop()
    assert prod.outcome is PushOutcome.DELIVERED
    assert dev.outcome is PushOutcome.FAILED and dev.reason == "InvalidProviderToken"
    assert [r.token for r in fake_apns.requests] == [apns_token(1)]
    assert sandbox.handshakes == 1 and sandbox.answers == [(403, "InvalidProviderToken")]


async def test_jwt_reused_then_resigned_after_lifetime(pki: Pki, apns_app: ApnsApp) -> None:
    clock = Clock()
    fake = await FakeApns(pki, clock=clock).start()
    try:
        pem = fake.add_key(TEAM, KEY_ID, [TOPIC])
        app = dataclasses.replace(apns_app, key=Secret(pem), production_url=fake.url, jwt_lifetime=3000)
        provider = ApnsProvider(app, clock=clock)
        b = binding("apns", apns_token(1), TOPIC)
        assert (await provider.send(b, message())).outcome is PushOutcome.DELIVERED
        clock.now += 2900
        assert (await provider.send(b, message(deadline=clock.now + 30))).outcome is PushOutcome.DELIVERED
        assert provider.jwt_signings == 1
        clock.now += 200  # past jwt_lifetime, still inside Apple's hour: re-sign proactively
        assert (await provider.send(b, message(deadline=clock.now + 30))).outcome is PushOutcome.DELIVERED
        assert provider.jwt_signings == 2 and fake.provider_tokens_seen(KEY_ID) == 2
        assert all(status == 200 for status, _ in fake.answers)
        await provider.aclose()
    finally:
        await fake.stop()


async def test_expired_provider_token_resigns_once_and_retries(fake_apns: FakeApns, apns_app: ApnsApp) -> None:
    provider = ApnsProvider(apns_app)
    try:
        assert (await provider.send(binding("apns", apns_token(1), TOPIC), message())).outcome \
            is PushOutcome.DELIVERED
        signed = fake_apns.newest_iat(KEY_ID)
        await wait_for(lambda: int(time.time()) > signed, 5, "the next second (a re-signed token has a later iat)")
        fake_apns.expire_provider_tokens()
        results = await asyncio.gather(*(provider.send(binding("apns", apns_token(i), TOPIC), message())
                                         for i in range(2, 12)))
    finally:
        await provider.aclose()
    assert {r.outcome for r in results} == {PushOutcome.DELIVERED}
    assert provider.jwt_signings == 2  # ten pushes refused, one re-sign
    assert fake_apns.answers.count((403, "ExpiredProviderToken")) == 10
    assert (429, "TooManyProviderTokenUpdates") not in fake_apns.answers


async def test_expired_again_after_resigning_is_failed_not_a_loop(fake_apns: FakeApns, apns_app: ApnsApp) -> None:
    """Apple still calls the re-signed token expired (same second: same iat): one re-sign, then FAILED."""
    clock = Clock()
    provider = ApnsProvider(apns_app, clock=clock)
    try:
        assert (await provider.send(binding("apns", apns_token(1), TOPIC), message())).outcome \
            is PushOutcome.DELIVERED
        fake_apns.expire_provider_tokens()
        result = await provider.send(binding("apns", apns_token(1), TOPIC), message())  # clock stands still
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.FAILED and result.reason == "ExpiredProviderToken"
    assert provider.jwt_signings == 2
    assert fake_apns.answers[1:] == [(403, "ExpiredProviderToken")] * 2


async def test_sandbox_token_goes_to_the_sandbox_and_routing_errors_would_show(
        pki: Pki, apns_app: ApnsApp, p8_key: ec.EllipticCurvePrivateKey) -> None:
    production = await FakeApns(pki).start()
    sandbox = await FakeApns(pki, environment="sandbox", device_tokens=production.device_tokens).start()
    try:
        for fake in (production, sandbox):
            fake.add_key(TEAM, KEY_ID, [TOPIC], key=p8_key)
        production.bind_token(apns_token(2), "sandbox")
        app = dataclasses.replace(apns_app, production_url=production.url, sandbox_url=sandbox.url)
        provider = ApnsProvider(app)
        prod = await provider.send(binding("apns", apns_token(1), TOPIC), message())
        dev = await provider.send(binding("apns", apns_token(2), TOPIC, sandbox=True), message())
        await provider.aclose()
        # an app whose URLs are swapped (a routing bug) sends each token to the wrong environment
        swapped = ApnsProvider(dataclasses.replace(app, production_url=sandbox.url, sandbox_url=production.url))
        wrong = await swapped.send(binding("apns", apns_token(2), TOPIC, sandbox=True), message())
        await swapped.aclose()
    finally:
        await production.stop()
        await sandbox.stop()
    assert prod.outcome is PushOutcome.DELIVERED and dev.outcome is PushOutcome.DELIVERED
    assert [r.token for r in production.requests] == [apns_token(1)]
    assert [r.token for r in sandbox.requests] == [apns_token(2)]
    assert wrong.outcome is PushOutcome.TOKEN_DEAD and wrong.reason == "BadDeviceToken"


async def test_expired_token_reason_is_dead(fake_apns: FakeApns, apns_app: ApnsApp) -> None:
    fake_apns.script(apns_token(6), ApnsAnswer(410, "ExpiredToken", timestamp_ms=1_700_000_000_000))
    provider = ApnsProvider(apns_app)
    try:
        result = await provider.send(binding("apns", apns_token(6), TOPIC), message())
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.TOKEN_DEAD and result.reason == "ExpiredToken"
    assert result.dead_since == pytest.approx(1_700_000_000.0)


async def test_signing_per_push_would_be_refused_by_the_fake(fake_apns: FakeApns, apns_app: ApnsApp) -> None:
    """The fake enforces Apple's 20-minute rule, so a provider that re-signed too often would fail."""
    a = ApnsProvider(apns_app)
    b = ApnsProvider(apns_app, clock=lambda: time.time() + 5)  # a second signer, seconds later
    try:
        assert (await a.send(binding("apns", apns_token(1), TOPIC), message())).outcome is PushOutcome.DELIVERED
        result = await b.send(binding("apns", apns_token(1), TOPIC), message())
    finally:
        await a.aclose()
        await b.aclose()
    assert result.outcome is PushOutcome.RETRY and result.reason == "TooManyProviderTokenUpdates"


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        (ApnsAnswer(400, "BadDeviceToken"), PushOutcome.TOKEN_DEAD),
        (ApnsAnswer(400, "DeviceTokenNotForTopic"), PushOutcome.TOKEN_DEAD),
        (ApnsAnswer(400, "BadCollapseId"), PushOutcome.FAILED),
        (ApnsAnswer(403, "InvalidProviderToken"), PushOutcome.FAILED),
        (ApnsAnswer(404, "BadPath"), PushOutcome.FAILED),
        (ApnsAnswer(413, "PayloadTooLarge"), PushOutcome.FAILED),
        (ApnsAnswer(429, "TooManyRequests", retry_after="9"), PushOutcome.RETRY),
        (ApnsAnswer(500, "InternalServerError"), PushOutcome.RETRY),
        (ApnsAnswer(503, "ServiceUnavailable", retry_after="2"), PushOutcome.RETRY),
    ],
)
async def test_error_mapping(fake_apns: FakeApns, apns_app: ApnsApp, answer: ApnsAnswer,
                             outcome: PushOutcome) -> None:
    fake_apns.script(apns_token(7), answer)
    provider = ApnsProvider(apns_app)
    try:
        result = await provider.send(binding("apns", apns_token(7), TOPIC), message())
    finally:
        await provider.aclose()
    assert result.outcome is outcome and result.reason == answer.reason and result.status == answer.status
    assert result.retry_after == (float(answer.retry_after) if answer.retry_after else None)


async def test_unregistered_gives_dead_since(fake_apns: FakeApns, apns_app: ApnsApp) -> None:
    fake_apns.script(apns_token(8), ApnsAnswer(410, "Unregistered", timestamp_ms=1_700_000_000_123))
    provider = ApnsProvider(apns_app)
    try:
        result = await provider.send(binding("apns", apns_token(8), TOPIC), message())
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.TOKEN_DEAD and result.status == 410
    assert result.dead_since == pytest.approx(1_700_000_000.123)


async def test_local_refusals_never_reach_apple(fake_apns: FakeApns, apns_app: ApnsApp) -> None:
    provider = ApnsProvider(apns_app)
    try:
        other_app = await provider.send(binding("apns", apns_token(1), "com.other.app.voip"), message())
        bad_token = await provider.send(binding("apns", "abc123", TOPIC), message())
        huge = await provider.send(binding("apns", apns_token(1), TOPIC), message(caller_name="x" * 6000))
    finally:
        await provider.aclose()
    assert other_app.outcome is PushOutcome.FAILED and "not configured" in other_app.reason
    assert bad_token.outcome is PushOutcome.FAILED and "64 hex" in bad_token.reason
    assert huge.outcome is PushOutcome.FAILED and "5120" in huge.reason
    assert fake_apns.requests == [] and fake_apns.handshakes == 0


async def test_stall_times_out_as_retry(fake_apns: FakeApns, apns_app: ApnsApp) -> None:
    fake_apns.script(apns_token(9), ApnsAnswer(stall=True))
    provider = ApnsProvider(dataclasses.replace(apns_app, timeout=0.3))
    try:
        async with asyncio.timeout(15):  # the fake never answers: only the provider's timeout ends this
            result = await provider.send(binding("apns", apns_token(9), TOPIC), message())
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.RETRY and "timeout" in result.reason


async def test_untrusted_server_certificate_is_failed(fake_apns: FakeApns, apns_app: ApnsApp) -> None:
    provider = ApnsProvider(dataclasses.replace(apns_app, ca_file=""))  # public CAs only
    try:
        result = await provider.send(binding("apns", apns_token(1), TOPIC), message())
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.FAILED and result.reason.startswith("TLS certificate not verified")
    assert fake_apns.requests == []


async def test_reconnects_after_connection_drop(fake_apns: FakeApns, apns_app: ApnsApp) -> None:
    provider = ApnsProvider(apns_app)
    try:
        assert (await provider.send(binding("apns", apns_token(1), TOPIC), message())).outcome \
            is PushOutcome.DELIVERED
        fake_apns.drop_connections()
        await wait_for(lambda: fake_apns.open_connections == 0, 10, "the server side closed")
        results = [await provider.send(binding("apns", apns_token(2), TOPIC), message()) for _ in range(2)]
    finally:
        await provider.aclose()
    # the first send after a drop may see the dead connection (RETRY); the next one reconnects
    assert results[-1].outcome is PushOutcome.DELIVERED
    assert all(r.outcome in (PushOutcome.DELIVERED, PushOutcome.RETRY) for r in results)
    assert fake_apns.handshakes == 2


async def test_certificate_auth(pki: Pki) -> None:
    fake = await FakeApns(pki, cert_topics={pki.client_common_name: {TOPIC}}).start()
    try:
        app = ApnsApp(name="certapp", topics=(TOPIC,), cert_file=str(pki.client_file),
                      production_url=fake.url, ca_file=str(pki.ca_file), timeout=2.0)
        provider = ApnsProvider(app)
        result = await provider.send(binding("apns", apns_token(1), TOPIC), message())
        no_cert = ApnsProvider(dataclasses.replace(app, cert_file=""))
        refused = await no_cert.send(binding("apns", apns_token(1), TOPIC), message())
        await provider.aclose()
        await no_cert.aclose()
    finally:
        await fake.stop()
    assert result.outcome is PushOutcome.DELIVERED
    assert "authorization" not in fake.requests[0].headers
    assert refused.outcome is PushOutcome.FAILED and refused.reason == "MissingProviderToken"


def test_serves_only_configured_topics(apns_app: ApnsApp) -> None:
    provider = ApnsProvider(apns_app)
    assert provider.serves(binding("apns", apns_token(1), TOPIC))
    assert provider.serves(binding("apns", apns_token(1), TOPIC, sandbox=True))
    assert not provider.serves(binding("apns", apns_token(1), "com.other.voip"))
    assert not provider.serves(binding("fcm", apns_token(1), TOPIC))


def test_bad_p8_key_is_a_settings_error(apns_app: ApnsApp) -> None:
    with pytest.raises(SettingsError, match="PEM") as info:
        ApnsProvider(dataclasses.replace(apns_app, key=Secret("-----BEGIN PRIVATE KEY-----\nSECRETSTUFF\n")))
    assert "SECRETSTUFF" not in str(info.value)


def dual(voip: int, remote: int) -> Binding:
    b = binding("apns", apns_token(voip), TOPIC)
    return dataclasses.replace(b, push=dataclasses.replace(b.push, extra_tokens=(("remote", apns_token(remote)),)))


async def test_only_a_call_is_a_voip_push_the_rest_goes_to_the_remote_token(fake_apns: FakeApns,
                                                                            apns_app: ApnsApp) -> None:
    """PushKit: every VoIP push must be a new incoming call. Cancel and answered elsewhere are
    background pushes (priority 5) and a missed call a visible alert, to the remote token."""
    provider = ApnsProvider(apns_app)
    device = dual(voip=11, remote=12)
    # the local APNs holds each token to its push type and topic, as Apple does
    fake_apns.register_device("com.example.phone", voip=apns_token(11), remote=apns_token(12))
    try:
        results = [await provider.send(device, message(kind)) for kind in
                   (PushKind.CALL, PushKind.CANCEL, PushKind.ANSWERED_ELSEWHERE, PushKind.MISSED_CALL)]
    finally:
        await provider.aclose()
    assert all(r.outcome is PushOutcome.DELIVERED for r in results), results
    sent = [(r.token, r.headers["apns-push-type"], r.headers["apns-topic"], r.headers["apns-priority"])
            for r in fake_apns.requests]
    assert sent == [(apns_token(11), "voip", TOPIC, "10"),
                    (apns_token(12), "background", "com.example.phone", "5"),
                    (apns_token(12), "background", "com.example.phone", "5"),
                    (apns_token(12), "alert", "com.example.phone", "10")]
    call, cancel, _, missed = (r.payload for r in fake_apns.requests)
    assert call["aps"] == {} and call["type"] == "call"
    assert cancel["aps"] == {"content-available": 1} and cancel["type"] == "cancel"
    alert = missed["aps"]["alert"]
    assert alert["loc-key"] == "ARI_PUSH_MISSED_CALL" and alert["loc-args"] == ["Bob"] and alert["title"]
    assert fake_apns.requests[1].headers["apns-collapse-id"] == "call-1"  # the call's pushes collapse


async def test_voip_only_device_gets_nothing_but_calls(fake_apns: FakeApns, apns_app: ApnsApp) -> None:
    provider = ApnsProvider(apns_app)
    try:
        call = await provider.send(binding("apns", apns_token(13), TOPIC), message())
        cancel = await provider.send(binding("apns", apns_token(13), TOPIC), message(PushKind.CANCEL))
    finally:
        await provider.aclose()
    assert call.outcome is PushOutcome.DELIVERED
    assert cancel.outcome is PushOutcome.SKIPPED and "VoIP token only" in cancel.reason
    assert len(fake_apns.requests) == 1


async def test_remote_token_only_gets_calls_as_alert_pushes(fake_apns: FakeApns, apns_app: ApnsApp) -> None:
    provider = ApnsProvider(apns_app)
    try:
        result = await provider.send(binding("apns", apns_token(14), "com.example.phone"), message())
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.DELIVERED
    (req,) = fake_apns.requests
    assert req.headers["apns-push-type"] == "alert" and req.headers["apns-topic"] == "com.example.phone"
    assert req.payload["aps"]["alert"]["loc-key"] == "ARI_PUSH_INCOMING_CALL"
