"""Builds the configured push providers from Settings (the composition root calls this).

Order matters: the dispatcher uses the first provider that serves a binding, so the
webhook (an explicit admin choice to relay some providers) comes first, then one APNs
provider per app, one FCM provider per project, then vendor URLs.

No I/O happens here and no loop is needed: the daemon warms every provider at start
(``warm()`` opens its HTTP clients and fetches credentials, so the first call's push does not
pay the TLS set-up), a provider not yet warmed opens its client on its first push, and
``PushDispatcher.aclose()`` closes them all at stop.
Credentials are parsed here, so a bad key fails start-up with a SettingsError.
"""

from __future__ import annotations

import time

from ari_push.push.apns import ApnsProvider
from ari_push.push.base import PushProvider
from ari_push.push.common import Clock
from ari_push.push.fcm import FcmProvider
from ari_push.push.vendor import VendorProvider
from ari_push.push.webhook import WebhookProvider
from ari_push.settings import Settings


def build_providers(settings: Settings, *, clock: Clock = time.time) -> list[PushProvider]:
    providers: list[PushProvider] = []
    if settings.webhook.url and settings.webhook.providers:
        providers.append(WebhookProvider(settings.webhook, clock=clock))
    providers.extend(ApnsProvider(app, clock=clock) for app in settings.apns)
    single = len(settings.fcm) == 1
    providers.extend(FcmProvider(project, default=single, clock=clock) for project in settings.fcm)
    if settings.capture.vendor_allowed_hosts:
        # Without an allow-list every vendor URL would be refused: leave vendor bindings
        # unserved instead, so the dispatcher logs "no credentials" once, not a failure per call.
        providers.append(VendorProvider(settings.vendor, settings.capture.vendor_allowed_hosts))
    return providers
