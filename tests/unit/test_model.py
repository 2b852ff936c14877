"""Device identity and secret masking."""

from __future__ import annotations

from ari_push.model import PushParams, mask


def test_apns_device_id_ignores_hex_case_other_providers_do_not() -> None:
    token = "00FC13ADFF785122B4AD28809A3420982341241421348097878E577C991DE8F0"
    assert PushParams("apns", token).device_id == PushParams("apns", token.lower()).device_id
    fcm = "AbC:def-123456789012345"
    assert PushParams("fcm", fcm).device_id != PushParams("fcm", fcm.lower()).device_id
    assert PushParams("fcm", "x" * 30).device_id != PushParams("apns", "x" * 30).device_id


def test_mask_keeps_only_the_ends() -> None:
    assert mask("") == ""
    assert mask("short") == "*****"
    shown = mask("0123456789abcdef0123")
    assert shown == "0123…0123(20)" and "456789" not in shown
