"""Which provider table serves a binding, or why none does (``inspect-contact``, the capture log).

The answer comes from the providers the daemon really builds (the same first-match rule as
the dispatcher), so it cannot drift from what happens on a call; the reasons for "none" come
from the settings, in words an admin can act on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ari_push.model import Binding
from ari_push.push.apns import ApnsProvider
from ari_push.push.base import PushProvider
from ari_push.push.fcm import FcmProvider
from ari_push.push.huawei import HmosProvider, HmsProvider
from ari_push.settings import Settings


@dataclass(frozen=True, slots=True)
class Route:
    """``table`` is the settings table that serves (``fcm[0]``, ``[webpush]``...) or "" for none;
    ``why`` says how it matched, or why nothing does."""

    table: str
    why: str

    def __str__(self) -> str:
        return f"served by {self.table} ({self.why})" if self.table else f"served by no provider: {self.why}"


class Router:
    def __init__(self, settings: Settings, providers: Sequence[PushProvider]) -> None:
        self.settings = settings
        self.providers = list(providers)

    def route(self, binding: Binding) -> Route:
        for provider in self.providers:
            if provider.serves(binding):
                return Route(self._label(provider), self._how(provider, binding))
        return Route("", self._why_none(binding))

    def explain(self, binding: Binding) -> str:
        return str(self.route(binding))

    def _label(self, provider: PushProvider) -> str:
        s = self.settings
        if isinstance(provider, ApnsProvider):
            return f"apns[{s.apns.index(provider.app)}]"
        if isinstance(provider, FcmProvider):
            return f"fcm[{s.fcm.index(provider.project)}]"
        if isinstance(provider, HmsProvider):
            return f"hms[{s.hms.index(provider.app)}]"
        if isinstance(provider, HmosProvider):
            return f"hmos[{s.hmos.index(provider.project)}]"
        if provider.name in ("webhook", "webpush", "vendor"):
            return f"[{provider.name}]"
        for i, plugin in enumerate(s.plugins):
            if provider.name in plugin.provider_names or provider.name == plugin.name:
                return f"plugin[{i}] ({plugin.name})"
        return provider.name

    def _how(self, provider: PushProvider, binding: Binding) -> str:
        push = binding.push
        if provider.name == "webhook":
            return f"relays {push.provider} to {self.settings.webhook.url}"
        if isinstance(provider, FcmProvider):
            if push.param and push.param == provider.project.sender_id:
                return f"sender_id {push.param} of project {provider.project.project_id} (legacy app-id)"
            if not push.param:
                return f"no pn-param; the only FCM project is {provider.project.project_id}"
            return f"project_id {push.param}"
        if isinstance(provider, ApnsProvider):
            return f"topic {push.param}" + (" (sandbox)" if push.sandbox else "")
        if isinstance(provider, HmsProvider):
            return f"app_id {push.param}"
        if isinstance(provider, HmosProvider):
            return f"project_id {push.param}"
        if provider.name == "webpush":
            keys = dict(push.extra_tokens)
            return "encrypted payload (RFC 8291)" if "p256dh" in keys else "empty wake-up push (no subscription keys)"
        return push.provider

    def _why_none(self, binding: Binding) -> str:
        s, push = self.settings, binding.push
        param = push.param or "-"
        if push.provider == "fcm":
            if not s.fcm:
                return "no [[fcm]] table is configured"
            if not push.param:
                return "no pn-param/app-id and more than one [[fcm]] project: cannot choose"
            if push.param.isdigit():
                return (f"app-id {push.param} looks like a sender id (the project number): set "
                        f"sender_id = \"{push.param}\" in the [[fcm]] table of that project")
            return f"no [[fcm]] table has project_id {param}"
        if push.provider == "apns":
            return f"no [[apns]] table lists topic {param}" if s.apns else "no [[apns]] table is configured"
        if push.provider == "hms":
            return f"no [[hms]] table has app_id {param}" if s.hms else "no [[hms]] table is configured"
        if push.provider == "hmos":
            return f"no [[hmos]] table has project_id {param}" if s.hmos else "no [[hmos]] table is configured"
        if push.provider == "webpush":
            return "[webpush] has no vapid_key (and no [webhook] relays webpush)"
        if push.provider == "vendor":
            return "capture.vendor_allowed_hosts is empty"
        return f"no [[plugin]] serves {push.provider!r} (and no [webhook] relays it)"
