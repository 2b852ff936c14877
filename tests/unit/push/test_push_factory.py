"""build_providers: one provider per app/project, in dispatch order, from Settings."""

from __future__ import annotations

import dataclasses

from ari_push.model import PushOutcome
from ari_push.push.apns import ApnsProvider
from ari_push.push.dispatch import PushDispatcher
from ari_push.push.factory import build_providers
from ari_push.push.fcm import FcmProvider
from ari_push.push.vendor import VendorProvider
from ari_push.push.webhook import WebhookProvider
from ari_push.settings import ApnsApp, CaptureSettings, FcmProject, Secret, Settings, WebhookSettings
from tests.fakes import FakeApns, FakeFcm
from tests.fakes.builders import apns_token, binding, fcm_token, message
from tests.fakes.keys import ServiceAccountKey
from tests.unit.push.conftest import TOPIC


def test_nothing_configured_means_no_providers() -> None:
    assert build_providers(Settings()) == []


def test_order_and_defaults(apns_app: ApnsApp, fcm_project: FcmProject, fake_fcm: FakeFcm,
                            sa_keys: dict[str, ServiceAccountKey]) -> None:
    second = FcmProject("proj-b", Secret(fake_fcm.add_project("proj-b", sa_keys["proj-b"])), api_url=fake_fcm.url)
    settings = Settings(
        apns=(apns_app,), fcm=(fcm_project, second),
        capture=CaptureSettings(vendor_allowed_hosts=("*.zoiper.com",)),
        webhook=WebhookSettings(url="https://relay.example/hook", secret=Secret("k"), providers=("webpush",)),
    )  # https only (the default): the fake FCM serves TLS, its token_uri is https too
    providers = build_providers(settings)
    assert [type(p) for p in providers] == [WebhookProvider, ApnsProvider, FcmProvider, FcmProvider,
                                            VendorProvider]
    fcm = [p for p in providers if isinstance(p, FcmProvider)]
    assert not any(p.serves(binding("fcm", "t", "")) for p in fcm)  # two projects: no default
    only = build_providers(Settings(fcm=(fcm_project,)))
    assert only[0].serves(binding("fcm", "t", ""))  # one project: serves bindings without pn-param


async def test_built_providers_push_end_to_end(fake_apns: FakeApns, fake_fcm: FakeFcm, apns_app: ApnsApp,
                                               fcm_project: FcmProject) -> None:
    d = PushDispatcher(build_providers(Settings(apns=(apns_app,), fcm=(fcm_project,))), _ignore)
    try:
        results = await d.send_many([binding("apns", apns_token(1), TOPIC), binding("fcm", fcm_token(1), ""),
                                     binding("vendor", "https://x.zoiper.com/p")], message())
    finally:
        await d.aclose()
    assert sorted(r.outcome for r in results.values()) == sorted(
        [PushOutcome.DELIVERED, PushOutcome.DELIVERED, PushOutcome.SKIPPED])
    assert len(fake_apns.requests) == 1 and len(fake_fcm.requests) == 1
    assert d.counters == {("apns", "delivered"): 1, ("fcm", "delivered"): 1, ("vendor", "skipped"): 1}


async def _ignore(*_: object) -> None:
    return None


def test_topics_and_sandbox_per_binding(apns_app: ApnsApp) -> None:
    other = dataclasses.replace(apns_app, name="other", topics=("com.other.voip",))
    providers = build_providers(Settings(apns=(apns_app, other)))
    d = PushDispatcher(providers, _ignore)
    assert d.provider_for(binding("apns", apns_token(1), "com.other.voip")) is providers[1]
    assert d.provider_for(binding("apns", apns_token(1), TOPIC, sandbox=True)) is providers[0]
