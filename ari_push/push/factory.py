"""Builds the configured push providers from Settings (the composition root calls this).

Every provider family, built in or installed, is a plug-in of one shape
(:class:`ari_push.push.plugins.ProviderPlugin`): ``build(config, context)`` returns its
providers. Order matters: the dispatcher uses the first provider that serves a binding, so the
webhook (an explicit admin choice to relay some providers) comes first, then APNs (one provider
per app), FCM (per project), HMS Core (per app), HarmonyOS (per project), Web Push, vendor URLs,
and last the installed plug-ins (``[[plugin]]``).

No I/O happens here and no loop is needed: the daemon warms every provider at start
(``warm()`` opens its HTTP clients and fetches credentials, so the first call's push does not
pay the TLS set-up), a provider not yet warmed opens its client on its first push, and
``PushDispatcher.aclose()`` closes them all at stop. Credentials are parsed here, so a bad key
fails start-up (and ``ari-push check-config``) with a SettingsError.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ari_push.push.apns import ApnsProvider
from ari_push.push.base import PushProvider
from ari_push.push.common import Clock
from ari_push.push.fcm import FcmProvider
from ari_push.push.huawei import HmosProvider, HmsProvider
from ari_push.push.plugins import PluginContext, load_plugin
from ari_push.push.vendor import VendorProvider
from ari_push.push.webhook import WebhookProvider
from ari_push.push.webpush import WebPushProvider
from ari_push.settings import Settings, SettingsError

log = logging.getLogger("ari_push.push")


class _Builtin:
    """A built-in family as a plug-in: its tables come typed from settings.py."""

    def __init__(self, name: str, provider_names: Sequence[str], configs: Any, build: Any) -> None:
        self.name = name
        self.provider_names = tuple(provider_names)
        self._configs = configs
        self._build = build

    def configs(self, settings: Settings) -> Sequence[Any]:
        return tuple(self._configs(settings))

    def configure(self, table: Mapping[str, Any], where: str, base: Path | None) -> Any:
        raise SettingsError(where, f"{self.name} is built in: configure it with its own table")

    def build(self, config: Any, context: PluginContext) -> Sequence[PushProvider]:
        return list(self._build(config, context))


def _webpush_hosts(settings: Settings) -> tuple[str, ...]:
    from ari_push.contacts import DEFAULT_WEBPUSH_HOSTS

    hosts = settings.capture.webpush_allowed_hosts
    return DEFAULT_WEBPUSH_HOSTS if hosts is None else hosts


BUILTIN: tuple[_Builtin, ...] = (
    _Builtin("webhook", (), lambda s: [s.webhook] if s.webhook.url and s.webhook.providers else [],
             lambda c, ctx: [WebhookProvider(c, clock=ctx.clock)]),
    _Builtin("apns", ("apns",), lambda s: s.apns, lambda c, ctx: [ApnsProvider(c, clock=ctx.clock)]),
    _Builtin("fcm", ("fcm",), lambda s: s.fcm,
             lambda c, ctx: [FcmProvider(c, default=len(ctx.settings.fcm) == 1, clock=ctx.clock)]),
    _Builtin("hms", ("hms",), lambda s: s.hms, lambda c, ctx: [HmsProvider(c, clock=ctx.clock)]),
    _Builtin("hmos", ("hmos",), lambda s: s.hmos, lambda c, ctx: [HmosProvider(c, clock=ctx.clock)]),
    # Without a VAPID key no push service takes our requests: leave webpush bindings unserved
    # (the dispatcher logs "no credentials" once) unless a webhook relays them.
    _Builtin("webpush", ("webpush",), lambda s: [s.webpush] if s.webpush.vapid_key else [],
             lambda c, ctx: [WebPushProvider(c, _webpush_hosts(ctx.settings), clock=ctx.clock)]),
    # Without an allow-list every vendor URL would be refused: leave vendor bindings unserved.
    _Builtin("vendor", ("vendor",), lambda s: [s.vendor] if s.capture.vendor_allowed_hosts else [],
             lambda c, ctx: [VendorProvider(c, ctx.settings.capture.vendor_allowed_hosts)]),
)


def build_providers(settings: Settings, *, clock: Clock = time.time) -> list[PushProvider]:
    """Every configured provider, credentials parsed. SettingsError (naming the key) for
    anything ``run`` could not start with; ``check-config`` calls this too."""
    if settings.push.allow_plain_http:
        log.warning("[push] allow_plain_http is on: provider URLs may be plain http (test rigs only; "
                    "tokens and access tokens would cross the network in clear)")
    context = PluginContext(settings=settings, clock=clock)
    providers: list[PushProvider] = []
    for family in BUILTIN:
        for config in family.configs(settings):
            providers.extend(family.build(config, context))
    for i, fcm in enumerate(p for p in providers if isinstance(p, FcmProvider)):
        if not fcm.account.token_uri.startswith("https://") and not settings.push.allow_plain_http:
            raise SettingsError(f"fcm[{i}].service_account", "its token_uri must be an https:// URL (the OAuth "
                                "assertion is sent there); [push] allow_plain_http is for test rigs only")
    for i, entry in enumerate(settings.plugins):
        plugin = load_plugin(entry.name, f"plugin[{i}].name")
        providers.extend(plugin.build(entry.config, context))
    return providers
