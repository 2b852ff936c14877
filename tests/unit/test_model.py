"""Device identity and secret masking."""

from __future__ import annotations

from ari_push.model import PushParams, mask, mask_token, mask_url


def test_apns_device_id_ignores_hex_case_other_providers_do_not() -> None:
    token = "00FC13ADFF785122B4AD28809A3420982341241421348097878E577C991DE8F0"
    assert PushParams("apns", token).device_id == PushParams("apns", token.lower()).device_id
    fcm = "AbC:def-123456789012345"
    assert PushParams("fcm", fcm).device_id != PushParams("fcm", fcm.lower()).device_id
    assert PushParams("fcm", "x" * 30).device_id != PushParams("apns", "x" * 30).device_id


def test_mask_shows_nothing_of_a_short_secret_and_four_leading_characters_of_a_long_token() -> None:
    assert mask("") == ""
    assert mask("short") == "…(5)"
    assert mask("ac12345ce0") == "…(10)"  # was "ac…ce(10)": 4 of 10 characters shown
    assert mask("0123456789abcdef012345") == "…(22)"
    token = "00fc13adff785122b4ad28809a3420982341241421348097878e577c991de8f0"
    assert mask(token) == "00fc…(64)"
    assert mask(token, keep=10) == "00fc…(64)"  # never more than 4


def test_mask_url_keeps_the_host_only() -> None:
    assert mask_url("https://push.zoiper.com/p/very-secret?k=v") == "https://push.zoiper.com/…(18)"
    assert mask_url("https://user:pw@push.example.com:8443/x") == "https://push.example.com:8443/…(2)"
    assert "secret" not in mask_token("vendor", "http://h.example/secret-secret-secret")
