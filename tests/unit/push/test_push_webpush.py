"""Web Push (push/webpush.py, push/ece.py) against the strict local push service (tests/fakes/webpush.py)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ari_push.model import Binding, PushKind, PushOutcome, PushParams
from ari_push.push import ece
from ari_push.push.webpush import WebPushProvider, topic_for
from ari_push.settings import Secret, SettingsError, WebPushSettings
from tests.fakes.builders import message
from tests.fakes.keys import Pki, ec_key, private_pem
from tests.fakes.webpush import FakeWebPush, Subscription, WebPushAnswer


@pytest.fixture
async def service(pki: Pki) -> AsyncIterator[FakeWebPush]:
    fake = await FakeWebPush(pki).start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture(scope="session")
def vapid_key() -> ec.EllipticCurvePrivateKey:
    return ec_key()


@pytest.fixture
async def provider(pki: Pki, vapid_key: ec.EllipticCurvePrivateKey,
                   service: FakeWebPush) -> AsyncIterator[WebPushProvider]:
    settings = WebPushSettings(vapid_key=Secret(private_pem(vapid_key)), subject="mailto:ops@example.com",
                               ca_file=str(pki.ca_file), timeout=2.0)
    prov = WebPushProvider(settings, ["localhost:*"])  # the local service listens on a free port
    try:
        yield prov
    finally:
        await prov.aclose()


def wp_binding(sub: Subscription, keys: bool = True) -> Binding:
    extra = (("p256dh", sub.p256dh), ("auth", sub.auth_b64)) if keys and sub.private_key else ()
    return Binding("alice", "alice", PushParams("webpush", sub.endpoint, extra_tokens=extra), "sip:alice@h")


async def test_call_push_is_encrypted_and_decrypts_to_the_call(service: FakeWebPush,
                                                               provider: WebPushProvider) -> None:
    sub = service.subscribe()
    msg = message(ring=25, call_id="c-7")
    result = await provider.send(wp_binding(sub), msg)
    assert result.outcome is PushOutcome.DELIVERED and result.status == 201, result
    (push,) = service.pushes
    assert push.message == {"type": "call", "call_id": "c-7", "caller_number": "+15551230000", "caller_name": "Bob",
                            "callee": "alice", "deadline": str(int(msg.deadline))}
    h = push.headers
    assert h["Content-Encoding"] == "aes128gcm" and h["Urgency"] == "high" and h["Topic"] == topic_for("c-7")
    assert 23 <= int(h["TTL"]) <= 25
    scheme, _, params = h["Authorization"].partition(" ")
    fields = dict(p.strip().split("=", 1) for p in params.split(","))
    assert scheme == "vapid" and fields["k"] == provider.vapid.public_key
    claims = jwt.decode(fields["t"], options={"verify_signature": False})
    assert claims["aud"] == service.origin and claims["sub"] == "mailto:ops@example.com"


async def test_without_keys_the_push_is_empty(service: FakeWebPush, provider: WebPushProvider) -> None:
    sub = service.subscribe(keys=False)
    assert (await provider.send(wp_binding(sub), message())).outcome is PushOutcome.DELIVERED
    (push,) = service.pushes
    assert push.body == b"" and push.message is None and "Content-Encoding" not in push.headers


@pytest.mark.parametrize(("kind", "urgency"), [(PushKind.CANCEL, "high"), (PushKind.ANSWERED_ELSEWHERE, "high"),
                                               (PushKind.MISSED_CALL, "normal")])
async def test_urgency_per_kind(service: FakeWebPush, provider: WebPushProvider, kind: PushKind,
                                urgency: str) -> None:
    sub = service.subscribe()
    assert (await provider.send(wp_binding(sub), message(kind))).outcome is PushOutcome.DELIVERED
    assert service.pushes[0].headers["Urgency"] == urgency
    assert service.pushes[0].message is not None and service.pushes[0].message["type"] == str(kind)


async def test_gone_and_unknown_subscriptions_are_token_dead(service: FakeWebPush,
                                                             provider: WebPushProvider) -> None:
    sub = service.subscribe()
    service.unsubscribe(sub)
    gone = await provider.send(wp_binding(sub), message())
    unknown = Binding("a", "a", PushParams("webpush", f"{service.origin}/wp/nope"), "sip:a@h")
    missing = await provider.send(unknown, message())
    assert (gone.outcome, gone.status) == (PushOutcome.TOKEN_DEAD, 410)
    assert (missing.outcome, missing.status) == (PushOutcome.TOKEN_DEAD, 404)


async def test_413_shrinks_then_empties_the_payload(service: FakeWebPush, provider: WebPushProvider) -> None:
    sub = service.subscribe()
    service.script(sub, WebPushAnswer(413))
    result = await provider.send(wp_binding(sub), message(extra=(("note", "n" * 100),)))
    assert result.outcome is PushOutcome.DELIVERED
    assert service.pushes[0].message is not None and "note" not in service.pushes[0].message
    service.script(sub, WebPushAnswer(413))
    assert (await provider.send(wp_binding(sub), message())).outcome is PushOutcome.DELIVERED
    assert service.pushes[1].body == b""  # nothing left to shrink: a bare wake-up


async def test_payload_over_the_limit_goes_out_empty(service: FakeWebPush, provider: WebPushProvider) -> None:
    sub = service.subscribe()
    result = await provider.send(wp_binding(sub), message(caller_name="x" * 5000))
    assert result.outcome is PushOutcome.DELIVERED and service.pushes[0].body == b""


async def test_429_retry_after_and_5xx(service: FakeWebPush, provider: WebPushProvider) -> None:
    sub = service.subscribe()
    service.script(sub, WebPushAnswer(429, retry_after="9"), WebPushAnswer(503))
    first = await provider.send(wp_binding(sub), message())
    second = await provider.send(wp_binding(sub), message())
    assert (first.outcome, first.retry_after) == (PushOutcome.RETRY, 9.0)
    assert second.outcome is PushOutcome.RETRY


async def test_subscription_made_for_another_server_key_is_403(service: FakeWebPush,
                                                               provider: WebPushProvider) -> None:
    other = ece.Vapid(ec_key(), "mailto:x@example.com")
    sub = service.subscribe(server_key=other.public_key)
    result = await provider.send(wp_binding(sub), message())
    assert (result.outcome, result.status) == (PushOutcome.FAILED, 403)
    assert "k is not the key" in result.reason


async def test_host_not_allowed_is_refused_before_any_request(service: FakeWebPush, pki: Pki,
                                                              vapid_key: ec.EllipticCurvePrivateKey) -> None:
    prov = WebPushProvider(WebPushSettings(Secret(private_pem(vapid_key)), "mailto:a@b.c", ca_file=str(pki.ca_file)),
                           ["push.example.com"])
    try:
        result = await prov.send(wp_binding(service.subscribe()), message())
    finally:
        await prov.aclose()
    assert result.outcome is PushOutcome.FAILED and "not in capture.webpush_allowed_hosts" in result.reason
    assert not service.pushes and not service.refusals


async def test_vapid_token_reused_per_origin(service: FakeWebPush, provider: WebPushProvider) -> None:
    sub = service.subscribe()
    for _ in range(3):
        await provider.send(wp_binding(sub), message())
    assert len({p.headers["Authorization"] for p in service.pushes}) == 1


def test_vapid_key_forms_and_errors(vapid_key: ec.EllipticCurvePrivateKey) -> None:
    raw = vapid_key.private_numbers().private_value.to_bytes(32, "big")
    from_raw = ece.load_vapid_key(ece.b64url(raw))
    assert from_raw.private_numbers().private_value == vapid_key.private_numbers().private_value
    with pytest.raises(SettingsError, match="32-byte"):
        ece.load_vapid_key(ece.b64url(b"short"))
    with pytest.raises(SettingsError, match="P-256"):
        ece.load_vapid_key(private_pem(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(SettingsError) as info:
        ece.load_vapid_key("-----BEGIN PRIVATE KEY-----\nSECRETSTUFF\n-----END PRIVATE KEY-----")
    assert "SECRETSTUFF" not in str(info.value)


def test_origin_is_scheme_host_and_non_default_port() -> None:
    assert ece.origin("https://updates.push.services.mozilla.com/wpush/v2/gAAA") == \
        "https://updates.push.services.mozilla.com"
    assert ece.origin("https://localhost:8443/wp/x?y=1") == "https://localhost:8443"
    assert ece.origin("https://ntfy.example:443/upABC") == "https://ntfy.example"


def test_rfc8291_appendix_a_vector_decrypts() -> None:
    ua = ec.derive_private_key(int.from_bytes(ece.b64url_decode("q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94"),
                                              "big"), ec.SECP256R1())
    body = ece.b64url_decode(
        "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK"
        "6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN")
    assert ece.decrypt(body, ua, ece.b64url_decode("BTBZMqHH6r4Tts7J_aSIgg")) == \
        b"When I grow up, I want to be a watermelon"


def test_rfc8291_appendix_a_vector_encrypts_byte_for_byte() -> None:
    sender = ec.derive_private_key(int.from_bytes(ece.b64url_decode("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw"),
                                                  "big"), ec.SECP256R1())
    body = ece.encrypt(b"When I grow up, I want to be a watermelon",
                       "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
                       "BTBZMqHH6r4Tts7J_aSIgg", sender=sender, salt=ece.b64url_decode("DGv6ra1nlYgDCS1FRnbzlw"))
    assert ece.b64url(body).startswith("DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIg")
    assert ece.b64url(body).endswith("a-fN")


def test_encrypt_round_trip_padding_and_tamper() -> None:
    ua = ec_key()
    auth = os.urandom(16)
    p256dh = ece.b64url(ece._public_bytes(ua.public_key()))
    body = ece.encrypt(b"hi", p256dh, ece.b64url(auth), pad_to=100)
    assert ece.decrypt(body, ua, auth) == b"hi" and len(body) == 86 + 100 + 1 + 16
    tampered = body[:-1] + bytes([body[-1] ^ 1])
    with pytest.raises(ece.EceError, match="tag"):
        ece.decrypt(tampered, ua, auth)
    with pytest.raises(ece.EceError, match="at most"):
        ece.encrypt(b"x" * 5000, p256dh, ece.b64url(auth))
    with pytest.raises(ece.EceError, match="P-256"):
        ece.encrypt(b"x", ece.b64url(b"\x04" + b"\x01" * 64), ece.b64url(auth))
