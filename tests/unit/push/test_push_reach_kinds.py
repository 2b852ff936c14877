"""Refresh, voicemail and message pushes through each provider, against the strict fakes.

iOS rule: a VoIP push is for a new call only; these kinds go to the remote token of a dual
registration as background/alert pushes on the bundle-id topic, or are skipped.
"""

from __future__ import annotations

import dataclasses

import pytest

from ari_push.model import Binding, PushKind, PushOutcome
from ari_push.push.apns import ApnsProvider
from ari_push.push.fcm import FcmProvider
from ari_push.push.webhook import WebhookProvider
from ari_push.settings import ApnsApp, FcmProject, Secret, WebhookSettings
from tests.fakes import FakeApns, FakeFcm
from tests.fakes.builders import apns_token, binding, fcm_token, message
from tests.unit.push.conftest import TOPIC

VOIP, REMOTE = apns_token(7), apns_token(8)


def dual() -> Binding:
    b = binding("apns", VOIP, TOPIC)
    return dataclasses.replace(b, push=dataclasses.replace(b.push, extra_tokens=(("remote", REMOTE),)))


@pytest.mark.parametrize(("kind", "priority"), [(PushKind.REFRESH, "normal"), (PushKind.MWI, "normal"),
                                                (PushKind.MESSAGE, "high")])
async def test_fcm_priorities(fake_fcm: FakeFcm, fcm_project: FcmProject, kind: PushKind, priority: str) -> None:
    provider = FcmProvider(fcm_project)
    try:
        result = await provider.send(binding("fcm", fcm_token(1), "proj-a"),
                                     message(kind, call_id="ev-1", extra=(("new", "2"), ("old", "1"))))
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.DELIVERED, result
    (req,) = fake_fcm.requests
    sent = req.body["message"]
    assert sent["android"]["priority"] == priority
    assert "notification" not in sent  # data only: the app decides what to show
    assert sent["data"]["type"] == str(kind) and sent["data"]["new"] == "2"


async def test_apns_refresh_is_a_background_push_to_the_remote_token(fake_apns: FakeApns, apns_app: ApnsApp) -> None:
    provider = ApnsProvider(apns_app)
    try:
        result = await provider.send(dual(), message(PushKind.REFRESH, extra=(("collapse_id", "refresh"),)))
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.DELIVERED, result
    (req,) = fake_apns.requests
    assert req.token == REMOTE  # never the VoIP token
    assert req.headers["apns-push-type"] == "background"
    assert req.headers["apns-priority"] == "5"  # Apple: background pushes at priority 5
    assert req.headers["apns-topic"] == "com.example.phone"  # bundle id, not .voip
    assert req.headers["apns-collapse-id"] == "refresh"
    assert req.payload["aps"] == {"content-available": 1}
    assert req.payload["type"] == "refresh"


async def test_apns_voicemail_alert_and_read_mailbox_is_silent(fake_apns: FakeApns, apns_app: ApnsApp) -> None:
    provider = ApnsProvider(apns_app)
    try:
        new = await provider.send(dual(), message(PushKind.MWI, extra=(("new", "3"), ("old", "1"))))
        read = await provider.send(dual(), message(PushKind.MWI, extra=(("new", "0"), ("old", "4"))))
    finally:
        await provider.aclose()
    assert new.outcome is read.outcome is PushOutcome.DELIVERED
    first, second = fake_apns.requests
    assert first.headers["apns-push-type"] == "alert" and first.token == REMOTE
    assert first.payload["aps"]["alert"] == {"title": "Voicemail", "body": "3 new, 1 old"}
    assert second.headers["apns-push-type"] == "background"
    assert second.payload["aps"] == {"content-available": 1} and second.payload["old"] == "4"


async def test_apns_message_alert_and_a_preview_too_big_is_dropped(fake_apns: FakeApns, apns_app: ApnsApp) -> None:
    provider = ApnsProvider(apns_app)
    try:
        small = await provider.send(dual(), message(PushKind.MESSAGE, caller_name="Bob",
                                                    extra=(("preview", "see you at 5"),)))
        big = await provider.send(dual(), message(PushKind.MESSAGE, caller_name="Bob",
                                                  extra=(("preview", "x" * 5000),)))
    finally:
        await provider.aclose()
    assert small.outcome is big.outcome is PushOutcome.DELIVERED
    first, second = fake_apns.requests
    assert first.headers["apns-priority"] == "10"
    assert first.payload["aps"]["alert"] == {"title": "Bob", "body": "see you at 5"}
    assert "preview" not in second.payload and second.payload["aps"]["alert"]["body"] == "New message"


async def test_apns_voip_only_device_gets_no_reach_push(fake_apns: FakeApns, apns_app: ApnsApp) -> None:
    provider = ApnsProvider(apns_app)
    try:
        results = [await provider.send(binding("apns", VOIP, TOPIC), message(kind))
                   for kind in (PushKind.REFRESH, PushKind.MWI, PushKind.MESSAGE)]
        call = await provider.send(binding("apns", VOIP, TOPIC), message(PushKind.CALL))
    finally:
        await provider.aclose()
    assert all(r.outcome is PushOutcome.SKIPPED and "VoIP-only" in r.reason for r in results)
    assert call.outcome is PushOutcome.DELIVERED
    (req,) = fake_apns.requests  # only the call went out, as VoIP
    assert req.headers["apns-push-type"] == "voip" and req.token == VOIP


async def test_apns_remote_only_registration_uses_its_token(fake_apns: FakeApns, apns_app: ApnsApp) -> None:
    provider = ApnsProvider(apns_app)
    try:
        result = await provider.send(binding("apns", REMOTE, "com.example.phone"), message(PushKind.REFRESH))
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.DELIVERED
    assert fake_apns.requests[0].token == REMOTE


def test_webhook_body_names_the_kind() -> None:
    hook = WebhookProvider(WebhookSettings(url="https://relay.example/push", secret=Secret("s3cret")))
    body = hook.build_body(binding("fcm", fcm_token(1), "proj-a"), message(PushKind.MWI, extra=(("new", "1"),)), 100.0)
    assert b'"event":"mwi"' in body and b'"new":"1"' in body
