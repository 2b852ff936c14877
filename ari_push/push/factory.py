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

import logging
import time

from ari_push.push.apns import ApnsProvider
from ari_push.push.base import PushProvider
from ari_push.push.common import Clock
from ari_push.push.fcm import FcmProvider
from ari_push.push.vendor import VendorProvider
from ari_push.push.webhook import WebhookProvider
from ari_push.settings import Settings, SettingsError

log = logging.getLogger("ari_push.push")


def build_providers(settings: Settings, *, clock: Clock = time.time) -> list[PushProvider]:
    """Every configured provider, credentials parsed. SettingsError (naming the key) for
    anything ``run`` could not start with; ``check-config`` calls this too."""
    if settings.push.allow_plain_http:
        log.warning("[push] allow_plain_http is on: provider URLs may be plain http (test rigs only; "
                    "tokens and access tokens would cross the network in clear)")
    providers: list[PushProvider] = []
    if settings.webhook.url and settings.webhook.providers:
        providers.append(WebhookProvider(settings.webhook, clock=clock))
    providers.extend(ApnsProvider(app, clock=clock) for app in settings.apns)
    single = len(settings.fcm) == 1
    for i, project in enumerate(settings.fcm):
        fcm = FcmProvider(project, default=single, clock=clock)
        if not fcm.account.token_uri.startswith("https://") and not settings.push.allow_plain_http:
            raise SettingsError(f"fcm[{i}].service_account", "its token_uri must be an https:// URL (the OAuth "
                                "assertion is sent there); [push] allow_plain_http is for test rigs only")
        providers.append(fcm)
    if settings.capture.vendor_allowed_hosts:
        # Without an allow-list every vendor URL would be refused: leave vendor bindings
        # unserved instead, so the dispatcher logs "no credentials" once, not a failure per call.
        providers.append(VendorProvider(settings.vendor, settings.capture.vendor_allowed_hosts))
    return providers
