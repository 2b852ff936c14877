"""OAuth 2.0 pieces the FCM and Huawei providers share: the key file, the token cache, the
token endpoint's answer.

A service-account key file is JSON with a PEM RSA key: errors name the field, never show the
key. An access token is fetched once for all the pushes waiting on it (one lock), refreshed
``REFRESH_EARLY`` before it expires (half-way for short test tokens), and never handed back
once the API refused it. A token endpoint that answers 429/5xx is a RETRY (with its
Retry-After), any other refusal a FAILED.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from ari_push.model import PushOutcome, PushResult
from ari_push.push.common import Clock, retry_after
from ari_push.settings import SettingsError

REFRESH_EARLY = 300.0  # seconds before expiry


class AuthFailure(Exception):
    """The token endpoint refused or failed; carries the result to hand back."""

    def __init__(self, result: PushResult) -> None:
        super().__init__(result.reason)
        self.result = result


def load_key_file(text: str, where: str, required: tuple[str, ...], kind: str,
                  rsa_hint: str = "") -> tuple[dict[str, Any], RSAPrivateKey]:
    """The JSON object of a key file and its RSA ``private_key``; ``required`` fields must be
    non-empty strings. ``kind`` names the file in the error ("a service-account key file")."""
    try:
        data = json.loads(text)
    except ValueError:
        raise SettingsError(where, f"is not valid JSON (expected {kind})") from None
    if not isinstance(data, dict):
        raise SettingsError(where, "is not a JSON object")
    for name in required:
        if not isinstance(data.get(name), str) or not data[name]:
            raise SettingsError(where, f"has no {name!r}")
    try:
        key = load_pem_private_key(data["private_key"].encode(), password=None)
    except (ValueError, TypeError):
        raise SettingsError(where, "private_key is not a PEM private key") from None
    if not isinstance(key, RSAPrivateKey):
        raise SettingsError(where, f"private_key is not an RSA key{rsa_hint}")
    return data, key


class TokenCache:
    """One access token, fetched by ``fetch`` (-> token, refresh-at) when missing, due or refused."""

    def __init__(self, fetch: Callable[[], Awaitable[tuple[str, float]]], clock: Clock) -> None:
        self._fetch = fetch
        self._clock = clock
        self._lock = asyncio.Lock()
        self.token = ""
        self.refresh_at = 0.0
        self.fetches = 0

    async def get(self, stale: str | None = None) -> str:
        """A valid access token. ``stale`` is one the API just refused: never hand it back."""
        if self.fresh(stale):
            return self.token
        async with self._lock:
            if self.fresh(stale):  # another task refreshed while we waited
                return self.token
            self.fetches += 1
            self.token, self.refresh_at = await self._fetch()
            return self.token

    def fresh(self, stale: str | None = None) -> bool:
        return bool(self.token) and self.token != stale and self._clock() < self.refresh_at


def token_answer(response: httpx.Response, started: float, detail: Callable[[dict[str, Any]], str],
                 log: logging.Logger, who: str) -> tuple[str, float]:
    """(access token, when to refresh it) from a token endpoint's response, else AuthFailure.
    ``detail`` renders the endpoint's error body for the reason (never a secret); a refusal
    that retrying will not cure is logged as ``who``'s error."""
    where = f"oauth token endpoint HTTP {response.status_code}"
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200:
        reason = f"{where} {detail(body) if isinstance(body, dict) else ''}".strip()
        if response.status_code == 429 or response.status_code >= 500:
            wait = retry_after(response.headers.get("retry-after"), started)
            raise AuthFailure(PushResult(PushOutcome.RETRY, reason, response.status_code, wait))
        log.error("%s: cannot get an access token: %s", who, reason)
        raise AuthFailure(PushResult(PushOutcome.FAILED, reason, response.status_code))
    token = body.get("access_token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        raise AuthFailure(PushResult(PushOutcome.RETRY, f"{where}: malformed token response"))
    assert isinstance(body, dict)
    try:
        lifetime = float(body.get("expires_in", 3600))
    except (TypeError, ValueError):
        lifetime = 3600.0
    return token, started + lifetime - min(REFRESH_EARLY, lifetime / 2)
