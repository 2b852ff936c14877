"""Contacts of phones without Google or Apple: pn-provider=hms / hmos (Huawei) and webpush with the
subscription keys (pn-p256dh, pn-auth)."""

from __future__ import annotations

import base64

import pytest

from ari_push.contacts import REASONS, ContactPolicy, ContactRejected, parse_contact
from ari_push.model import PushParams

LAB = "sip:1001@127.0.0.1:5401;transport=udp"
HMS = "IQAAAACy0aUZAABfs3CF9QLKJ3l5mGJ6IH3eSoEsSGodcr0xw0_TwDbQ7rdvUJsmDfOnsK9cg0tq9tV9Cz1-ZgZw1Ew"
HMOS = "MAMzLgAAAAAAb2hvc3Rva2VuLXRlc3QtMDEyMzQ1Njc4OWFiY2RlZg+/w=="
ENDPOINT = "https://updates.push.services.mozilla.com/wpush/v2/gAAAAABkZ3x"
P256DH = "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4"
AUTH = "BTBZMqHH6r4Tts7J_aSIgg"
POLICY = ContactPolicy()


def rejected(uri: str, reason: str, field: str, secret: str | None = None) -> None:
    with pytest.raises(ContactRejected) as info:
        parse_contact(uri, POLICY)
    assert (info.value.reason, info.value.field) == (reason, field), str(info.value)
    assert reason in REASONS
    if secret is not None:
        assert secret not in str(info.value)


def test_hms_contact() -> None:
    assert parse_contact(f"{LAB};pn-provider=hms;pn-prid={HMS};pn-param=101234567", POLICY) == \
        PushParams(provider="hms", token=HMS, param="101234567")


def test_hmos_contact_keeps_base64_tokens() -> None:
    assert parse_contact(f"{LAB};pn-provider=HMOS;pn-prid={HMOS};pn-param=388421841221234567", POLICY) == \
        PushParams(provider="hmos", token=HMOS, param="388421841221234567")


def test_huawei_device_ids_differ_by_provider() -> None:
    a = parse_contact(f"{LAB};pn-provider=hms;pn-prid={HMS};pn-param=1", POLICY)
    b = parse_contact(f"{LAB};pn-provider=hmos;pn-prid={HMS};pn-param=1", POLICY)
    assert a is not None and b is not None and a.device_id != b.device_id


@pytest.mark.parametrize(("params", "reason", "field"), [
    (f"pn-provider=hms;pn-prid={HMS}", "missing-param", "pn-param"),
    (f"pn-provider=hmos;pn-prid={HMOS}", "missing-param", "pn-param"),
    (f"pn-provider=hms;pn-prid={HMS};pn-param=com.example.app", "param-alphabet", "pn-param"),
    (f"pn-provider=hmos;pn-prid={HMOS};pn-param=12a4", "param-alphabet", "pn-param"),
    (f"pn-provider=hms;pn-prid={HMS};pn-param={'1' * 25}", "param-alphabet", "pn-param"),
    ("pn-provider=hms;pn-prid=IQAAAACy0aUZAAB;pn-param=1", "token-alphabet", "pn-prid"),  # too short
    (f"pn-provider=hms;pn-prid={HMS[:40]}%21{HMS[40:]};pn-param=1", "token-alphabet", "pn-prid"),
    (f"pn-provider=hmos;pn-prid={HMOS[:30]}:{HMOS[30:]};pn-param=1", "token-alphabet", "pn-prid"),
    (f"pn-provider=hms;pn-prid={'A' * 257};pn-param=1", "too-long", "pn-prid"),
    ("pn-provider=hms;pn-param=1", "missing-token", "pn-prid"),
])
def test_huawei_refusals(params: str, reason: str, field: str) -> None:
    rejected(f"{LAB};{params}", reason, field)


def test_webpush_with_subscription_keys() -> None:
    push = parse_contact(f"{LAB};pn-provider=webpush;pn-prid={ENDPOINT};pn-p256dh={P256DH};pn-auth={AUTH}", POLICY)
    assert push == PushParams(provider="webpush", token=ENDPOINT, extra_tokens=(("p256dh", P256DH), ("auth", AUTH)))


def test_webpush_keys_padding_is_dropped() -> None:
    padded = AUTH + "=="
    push = parse_contact(f"{LAB};pn-provider=webpush;pn-prid={ENDPOINT};pn-p256dh={P256DH}=;pn-auth={padded}",
                         POLICY)
    assert push is not None and dict(push.extra_tokens) == {"p256dh": P256DH, "auth": AUTH}


def test_webpush_without_keys_is_an_empty_push_contact() -> None:
    push = parse_contact(f"{LAB};pn-provider=webpush;pn-prid={ENDPOINT}", POLICY)
    assert push is not None and push.extra_tokens == ()


compressed = base64.urlsafe_b64encode(b"\x02" + b"\x11" * 64).rstrip(b"=").decode()


@pytest.mark.parametrize(("keys", "field"), [
    (f"pn-p256dh={P256DH}", "pn-auth"),
    (f"pn-auth={AUTH}", "pn-p256dh"),
    (f"pn-p256dh={P256DH};pn-auth", "pn-auth"),
    (f"pn-p256dh={P256DH};pn-auth=not*base64", "pn-auth"),
    (f"pn-p256dh={P256DH};pn-auth={AUTH[:-4]}", "pn-auth"),
    (f"pn-p256dh={P256DH[:-8]};pn-auth={AUTH}", "pn-p256dh"),
    (f"pn-p256dh={compressed};pn-auth={AUTH}", "pn-p256dh"),
])
def test_webpush_key_refusals(keys: str, field: str) -> None:
    rejected(f"{LAB};pn-provider=webpush;pn-prid={ENDPOINT};{keys}", "webpush-keys", field, AUTH)


def test_subscription_keys_only_on_webpush_contacts() -> None:
    rejected(f"{LAB};pn-provider=hms;pn-prid={HMS};pn-param=1;pn-p256dh={P256DH};pn-auth={AUTH}",
             "param-not-allowed", "pn-p256dh")
    rejected(f"{LAB};pn-type=firebase;pn-tok=dQw4w9WgXcQ:APA91bH-abc_DEF123;app-id=p;pn-auth={AUTH}",
             "param-not-allowed", "pn-auth")


def test_keys_alone_are_no_push_address() -> None:
    rejected(f"{LAB};pn-p256dh={P256DH};pn-auth={AUTH}", "missing-provider", "pn-auth")
