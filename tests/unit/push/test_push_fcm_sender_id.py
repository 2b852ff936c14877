"""Legacy Linphone contacts put the FCM sender id (the project number) in app-id: an [[fcm]] table
with that sender_id serves them, pushing to its project."""

from __future__ import annotations

import dataclasses

from ari_push.contacts import ContactPolicy, parse_contact
from ari_push.model import Binding, PushOutcome
from ari_push.push.dispatch import PushDispatcher
from ari_push.push.factory import build_providers
from ari_push.settings import FcmProject, PushSettings, Settings
from tests.fakes import FakeFcm
from tests.fakes.builders import fcm_token, message

PLAIN = PushSettings(allow_plain_http=True)  # the fake FCM's token_uri may be http

LEGACY = f"sip:1001@192.0.2.1:5060;pn-type=firebase;pn-tok={fcm_token(7)};app-id=929724111839"  # FCM's token shape


async def _ignore(*_: object) -> None:
    return None


async def test_sender_id_app_id_is_pushed_to_its_project(fake_fcm: FakeFcm, fcm_project: FcmProject) -> None:
    push = parse_contact(LEGACY, ContactPolicy())
    assert push is not None and push.param == "929724111839"
    binding = Binding("1001", "1001", push, LEGACY)
    other = dataclasses.replace(fcm_project, project_id="proj-b")  # two projects: no default
    unserved = PushDispatcher(build_providers(Settings(fcm=(fcm_project, other), push=PLAIN)), _ignore)
    assert (await unserved.send(binding, message())).outcome is PushOutcome.SKIPPED
    named = dataclasses.replace(fcm_project, sender_id="929724111839")
    dispatcher = PushDispatcher(build_providers(Settings(fcm=(named, other), push=PLAIN)), _ignore)
    try:
        assert (await dispatcher.send(binding, message())).outcome is PushOutcome.DELIVERED
    finally:
        await dispatcher.aclose()
        await unserved.aclose()
    (request,) = fake_fcm.requests
    assert request.project == "proj-a" and request.target == push.token
