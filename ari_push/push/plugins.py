"""Provider plug-ins: how a push service joins ari-push without a fork (docs/providers.md).

A plug-in is an object with the :class:`ProviderPlugin` shape, published by an installed
distribution under the entry-point group ``ari_push.providers``::

    [project.entry-points."ari_push.providers"]
    company-relay = "ari_push_company_relay:plugin"

and switched on by a ``[[plugin]]`` table naming it (``name = "company-relay"``); the rest of the
table is the plug-in's to validate. Contacts with ``pn-provider`` (or Linphone ``pn-type``) set
to one of its ``provider_names`` are then accepted by the parser and served by the providers its
``build`` returns, which implement :class:`ari_push.push.base.PushProvider`.

The built-in providers are plug-ins of the same shape (``BUILTIN``): the factory builds every
provider through ``build``; only their settings are parsed by settings.py into typed tables.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ari_push.push.base import PushProvider
from ari_push.push.common import Clock
from ari_push.settings import SettingsError

GROUP = "ari_push.providers"


@dataclass(frozen=True)
class PluginContext:
    """What the daemon hands a plug-in's ``build``: the clock, and the whole settings for
    plug-ins that need a shared value (allow-lists)."""

    settings: Any
    clock: Clock = time.time


@runtime_checkable
class ProviderPlugin(Protocol):
    #: The entry-point name, and what ``[[plugin]] name`` says.
    name: str
    #: ``pn-provider`` values its providers serve (lower case, [a-z0-9.-]).
    provider_names: Sequence[str]

    def configure(self, table: Mapping[str, Any], where: str, base: Path | None) -> Any:
        """Validate one ``[[plugin]]`` table (without ``name``) and return a frozen config.
        Raise SettingsError(key, why) naming the key; never show a secret."""
        ...

    def build(self, config: Any, context: PluginContext) -> Sequence[PushProvider]:
        """The providers for one config. No I/O here (``warm`` does it); bad credentials raise
        SettingsError."""
        ...


def discover() -> dict[str, Any]:
    """Installed plug-ins by entry-point name (not loaded yet)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load_plugin(name: str, where: str = "plugin.name") -> ProviderPlugin:
    found = discover().get(name)
    if found is None:
        installed = ", ".join(sorted(discover())) or "none"
        raise SettingsError(where, f"no installed plug-in {name!r} in entry-point group {GROUP} "
                                   f"(installed: {installed})")
    try:
        plugin = found.load()
    except Exception as exc:
        raise SettingsError(where, f"plug-in {name!r} does not load: {type(exc).__name__}: {exc}") from None
    if isinstance(plugin, type):
        plugin = plugin()
    if not isinstance(plugin, ProviderPlugin):
        raise SettingsError(where, f"plug-in {name!r} lacks name/provider_names/configure/build")
    for pn in plugin.provider_names:
        if not pn or pn != pn.lower() or not pn.replace("-", "").replace(".", "").isalnum():
            raise SettingsError(where, f"plug-in {name!r} declares a bad provider name {pn!r}")
    return plugin
