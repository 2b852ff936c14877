"""Generic webhook: every push for the configured providers becomes a signed JSON POST to the
admin's own relay (``[webhook]``).

Signature: ``X-Ari-Push-Signature: sha256=<hex HMAC-SHA256 of the exact body bytes>`` with
the shared secret. ``X-Ari-Push-Timestamp`` repeats the body's ``timestamp`` field, so the
signature covers it and a receiver can refuse replays (e.g. older than 5 minutes).

Answers: 2xx delivered; 410 the device token is dead; 429/5xx retry (Retry-After honoured);
anything else (404 included: most likely a wrong URL, not a dead device) failed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from typing import Any

import httpx

from ari_push.model import Binding, PushMessage, PushOutcome, PushResult
from ari_push.push.common import (
    Clock,
    LazyClient,
    ResponseTooLarge,
    call_fields,
    closed_result,
    network_result,
    preload_http,
    retry_after,
    send_capped,
)
from ari_push.settings import WebhookSettings

SIGNATURE_HEADER = "X-Ari-Push-Signature"
TIMESTAMP_HEADER = "X-Ari-Push-Timestamp"


def sign(secret: str, body: bytes) -> str:
    """The signature header value for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    """What a receiver does (used by our tests; documented for relay authors)."""
    return hmac.compare_digest(sign(secret, body), header)


class WebhookProvider:
    """Relays pushes whose provider is listed in ``webhook.providers``."""

    name = "webhook"

    def __init__(self, settings: WebhookSettings, *, clock: Clock = time.time) -> None:
        self.settings = settings
        self._clock = clock
        self._http = LazyClient(http2=True, ca_file=settings.ca_file, timeout=settings.timeout)

    def serves(self, binding: Binding) -> bool:
        return bool(self.settings.url) and binding.push.provider in self.settings.providers

    async def warm(self) -> None:
        self._http.get()
        preload_http()

    async def aclose(self) -> None:
        await self._http.aclose()

    def build_body(self, binding: Binding, message: PushMessage, now: float) -> bytes:
        fields = call_fields(message)
        body: dict[str, Any] = {"event": fields.pop("type"), **fields, "timestamp": int(now)}
        body["extra"] = dict(message.extra)
        body["device"] = {
            "provider": binding.push.provider,
            "token": binding.push.token,
            "param": binding.push.param,
            "sandbox": binding.push.sandbox,
            "aor": binding.aor,
            "device_id": binding.device_id,
        }
        return json.dumps(body, separators=(",", ":")).encode()

    async def send(self, binding: Binding, message: PushMessage) -> PushResult:
        if self._http.closed:
            return closed_result()
        now = self._clock()
        body = self.build_body(binding, message, now)
        headers = {
            "content-type": "application/json",
            SIGNATURE_HEADER: sign(self.settings.secret, body),
            TIMESTAMP_HEADER: str(int(now)),
        }
        client = self._http.get()
        try:
            # The whole exchange is bounded (httpx's timeout is per read: a relay that trickles its
            # answer would hold the push until the call's deadline), and so is the answer's size.
            async with asyncio.timeout(self.settings.timeout):
                response = await send_capped(client, client.build_request("POST", self.settings.url, content=body,
                                                                          headers=headers),
                                             self.settings.max_response_bytes)
        except TimeoutError:
            return PushResult(PushOutcome.RETRY, f"timeout after {self.settings.timeout:g}s")
        except ResponseTooLarge as exc:
            return PushResult(PushOutcome.FAILED, str(exc))
        except httpx.HTTPError as exc:
            return network_result(exc)
        status = response.status_code
        if 200 <= status < 300:
            return PushResult(PushOutcome.DELIVERED, status=status)
        if status == 410:
            return PushResult(PushOutcome.TOKEN_DEAD, "HTTP 410 (relay says the token is dead)", status)
        if status == 429 or status >= 500:
            wait = retry_after(response.headers.get("retry-after"), now)
            return PushResult(PushOutcome.RETRY, f"HTTP {status}", status, retry_after=wait)
        if 300 <= status < 400:
            return PushResult(PushOutcome.FAILED, "redirect refused", status)
        return PushResult(PushOutcome.FAILED, f"HTTP {status}", status)
