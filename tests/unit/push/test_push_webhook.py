"""Webhook provider: signed JSON POST to the admin's relay; the test verifies the HMAC."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from ari_push.model import PushKind, PushOutcome
from ari_push.push.webhook import WebhookProvider
from ari_push.settings import Secret, WebhookSettings
from tests.fakes import FakeVendor, VendorAnswer
from tests.fakes.builders import binding, message

SECRET = "s3cret-webhook-key"


def settings(fake: FakeVendor, path: str = "/hook") -> WebhookSettings:
    return WebhookSettings(url=f"{fake.url}{path}", secret=Secret(SECRET), timeout=1.0,
                           providers=("webpush", "fcm"))


async def test_signed_body_verifies(fake_vendor: FakeVendor) -> None:
    provider = WebhookProvider(settings(fake_vendor), clock=lambda: 1_700_000_123.9)
    b = binding("webpush", "https://push.example/ep/abc", "vapid-key", aor="bob")
    try:
        result = await provider.send(b, message(PushKind.ANSWERED_ELSEWHERE, deadline=1_700_000_150,
                                                extra=(("reason", "answered"),)))
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.DELIVERED
    (req,) = fake_vendor.requests
    # what a relay does: HMAC-SHA256 of the raw body with the shared secret
    expected = "sha256=" + hmac.new(SECRET.encode(), req.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(req.headers["X-Ari-Push-Signature"], expected)
    assert req.headers["X-Ari-Push-Timestamp"] == "1700000123"
    body = json.loads(req.body)
    assert body == {
        "event": "answered-elsewhere", "call_id": "call-1", "caller_number": "+15551230000",
        "caller_name": "Bob", "callee": "alice", "deadline": "1700000150", "timestamp": 1700000123,
        "extra": {"reason": "answered"},
        "device": {"provider": "webpush", "token": "https://push.example/ep/abc", "param": "vapid-key",
                   "sandbox": False, "aor": "bob", "device_id": b.device_id},
    }
    tampered = req.body.replace(b"bob", b"eve")
    assert hmac.new(SECRET.encode(), tampered, hashlib.sha256).hexdigest() not in req.headers["X-Ari-Push-Signature"]


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        (VendorAnswer(202), PushOutcome.DELIVERED),
        (VendorAnswer(410), PushOutcome.TOKEN_DEAD),
        (VendorAnswer(404), PushOutcome.FAILED),
        (VendorAnswer(503, headers={"Retry-After": "4"}), PushOutcome.RETRY),
        (VendorAnswer(301, redirect_to="http://elsewhere/"), PushOutcome.FAILED),
    ],
)
async def test_status_mapping(fake_vendor: FakeVendor, answer: VendorAnswer, outcome: PushOutcome) -> None:
    fake_vendor.script("/hook", answer)
    provider = WebhookProvider(settings(fake_vendor))
    try:
        result = await provider.send(binding("fcm", "tok", "proj"), message())
    finally:
        await provider.aclose()
    assert result.outcome is outcome
    if outcome is PushOutcome.RETRY:
        assert result.retry_after == 4.0


def test_serves_listed_providers_only(fake_vendor: FakeVendor) -> None:
    provider = WebhookProvider(settings(fake_vendor))
    assert provider.serves(binding("webpush", "x"))
    assert provider.serves(binding("fcm", "x", "any-project"))
    assert not provider.serves(binding("apns", "x"))
    assert not WebhookProvider(WebhookSettings(providers=("fcm",))).serves(binding("fcm", "x"))


async def test_relay_checking_signatures_accepts_ours_and_refuses_a_wrong_secret() -> None:
    """The relay runs the product's own verify(); a daemon with the wrong secret gets 401: FAILED."""
    from ari_push.push.webhook import verify

    relay = await FakeVendor(webhook_secret=SECRET).start()
    try:
        good = WebhookProvider(settings(relay))
        wrong = WebhookProvider(WebhookSettings(url=f"{relay.url}/hook", secret=Secret("not-the-secret"),
                                                timeout=1.0, providers=("fcm",)))
        ok = await good.send(binding("fcm", "t" * 40, "p"), message())
        refused = await wrong.send(binding("fcm", "t" * 40, "p"), message())
        await good.aclose()
        await wrong.aclose()
    finally:
        await relay.stop()
    assert ok.outcome is PushOutcome.DELIVERED
    assert refused.outcome is PushOutcome.FAILED and refused.reason == "HTTP 401"
    assert relay.refusals == [(401, "signature does not verify")]
    (req,) = relay.requests
    assert verify(SECRET, req.body, req.headers["X-Ari-Push-Signature"])
    assert not verify(SECRET, req.body + b" ", req.headers["X-Ari-Push-Signature"])
    assert not verify("other", req.body, req.headers["X-Ari-Push-Signature"])
