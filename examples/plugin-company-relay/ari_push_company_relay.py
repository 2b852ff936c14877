"""Example ari-push provider plug-in: a company's own push relay (see README.md).

Everything a plug-in needs is the ProviderPlugin shape (``name``, ``provider_names``,
``configure``, ``build``) and providers of the PushProvider shape (``name``, ``serves``,
``warm``, ``send``, ``aclose``); the helpers from ``ari_push.push.common`` are optional.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from ari_push.model import Binding, PushMessage, PushOutcome, PushResult
from ari_push.push.base import PushProvider
from ari_push.push.common import LazyClient, call_fields, closed_result, network_result, retry_after
from ari_push.push.plugins import PluginContext
from ari_push.settings import Secret, SettingsError

DEVICE_RE = re.compile(r"[A-Za-z0-9._:-]{4,128}")


@dataclass(frozen=True)
class RelayConfig:
    url: str
    api_key: Secret
    timeout: float = 3.0
    ca_file: str = ""


class RelayProvider:
    name = "company"

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self._http = LazyClient(http2=False, ca_file=config.ca_file, timeout=config.timeout)

    def serves(self, binding: Binding) -> bool:
        return binding.push.provider == "company"

    async def warm(self) -> None:
        self._http.get()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, binding: Binding, message: PushMessage) -> PushResult:
        if self._http.closed:
            return closed_result()
        if not DEVICE_RE.fullmatch(binding.push.token):
            return PushResult(PushOutcome.FAILED, "device id is not [A-Za-z0-9._:-]{4,128}")
        fields = call_fields(message)
        body = {"device": binding.push.token, "event": fields.pop("type"), **fields}
        try:
            response = await self._http.get().post(self.config.url, json=body, headers={
                "authorization": f"Bearer {self.config.api_key}"})
        except httpx.HTTPError as exc:
            return network_result(exc)
        status = response.status_code
        if 200 <= status < 300:
            return PushResult(PushOutcome.DELIVERED, status=status)
        if status in (404, 410):
            return PushResult(PushOutcome.TOKEN_DEAD, f"HTTP {status}", status)
        if status == 429 or status >= 500:
            return PushResult(PushOutcome.RETRY, f"HTTP {status}", status,
                              retry_after=retry_after(response.headers.get("retry-after"), time.time()))
        return PushResult(PushOutcome.FAILED, f"HTTP {status}", status)


class CompanyRelayPlugin:
    name = "company-relay"
    provider_names = ("company",)

    def configure(self, table: Mapping[str, Any], where: str, base: Path | None) -> RelayConfig:
        known = {"url", "api_key", "api_key_file", "timeout", "ca_file"}
        for key in table:
            if key not in known:
                raise SettingsError(f"{where}.{key}", "unknown key (company-relay takes url, api_key[_file], "
                                                      "timeout, ca_file)")
        url = table.get("url")
        if not isinstance(url, str) or urlsplit(url).scheme != "https" or not urlsplit(url).hostname:
            raise SettingsError(f"{where}.url", "must be an https:// URL with a host")
        key = table.get("api_key", "")
        if "api_key_file" in table:
            path = Path(str(table["api_key_file"]))
            path = path if path.is_absolute() or base is None else base / path
            try:
                key = path.read_text().strip()
            except OSError as exc:
                raise SettingsError(f"{where}.api_key_file", f"cannot read {path}: {exc.strerror}") from None
        if not isinstance(key, str) or not key:
            raise SettingsError(f"{where}.api_key", "is required (api_key or api_key_file)")
        timeout = table.get("timeout", 3.0)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
            raise SettingsError(f"{where}.timeout", "must be a positive number")
        ca_file = table.get("ca_file", "")
        if not isinstance(ca_file, str):
            raise SettingsError(f"{where}.ca_file", "must be a path")
        return RelayConfig(url=url, api_key=Secret(key), timeout=float(timeout), ca_file=ca_file)

    def build(self, config: Any, context: PluginContext) -> Sequence[PushProvider]:
        return [RelayProvider(config)]


plugin = CompanyRelayPlugin()
