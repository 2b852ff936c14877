"""Web Push provider (RFC 8030), VAPID-authenticated (RFC 8292), payloads encrypted (RFC 8291).

The contact's ``pn-prid`` is the push subscription's endpoint URL (RFC 8599 section 12); it is
attacker-supplied, so every send re-applies the allow-list (``capture.webpush_allowed_hosts``)
and connects to the address it checked, like vendor URLs (vendor.py, SSRF rules). UnifiedPush
distributors (ntfy and others) take this same request.

Request: ``POST <endpoint>`` with ``TTL`` (seconds to the ring deadline), ``Urgency: high`` for
call, cancel and answered-elsewhere (``normal`` for the missed-call note), ``Topic`` (one per
call, so a later push for the same call replaces an undelivered earlier one) and
``Authorization: vapid t=<ES256 JWT>, k=<public key>``. The body is the call fields as JSON,
``aes128gcm``-encrypted, when the contact carries the subscription keys (``pn-p256dh``,
``pn-auth``); otherwise the push is empty (a bare wake-up, which needs no keys).

Answers: 201/202/200 delivered; 404/410 subscription gone (TOKEN_DEAD); 413 the payload was too
large: sent again once without the extras, then empty; 429/5xx retry (Retry-After honoured);
400/401/403 failed (bad request or VAPID refused: a configuration problem).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import httpx

from ari_push.model import Binding, PushKind, PushMessage, PushOutcome, PushResult
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
from ari_push.push.ece import EceError, Vapid, encrypt, load_vapid_key
from ari_push.push.vendor import Resolver, UrlRefused, check_url, system_resolver
from ari_push.settings import WebPushSettings

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 8192  # an error text is short; nothing more is read
HIGH_URGENCY = frozenset({PushKind.CALL, PushKind.CANCEL, PushKind.ANSWERED_ELSEWHERE})


def topic_for(call_id: str) -> str:
    """RFC 8030 section 5.4: at most 32 characters of the base64url alphabet."""
    return hashlib.sha256(call_id.encode()).hexdigest()[:32]


class WebPushProvider:
    """Sends to every allow-listed push service with one VAPID key."""

    name = "webpush"

    def __init__(
        self,
        settings: WebPushSettings,
        allowed_hosts: Sequence[str],
        *,
        clock: Clock = time.time,
        resolve: Resolver = system_resolver,
    ) -> None:
        self.settings = settings
        self.allowed_hosts = tuple(h.lower() for h in allowed_hosts)
        self.vapid = Vapid(load_vapid_key(settings.vapid_key), settings.subject, settings.jwt_lifetime)
        self._clock = clock
        self._resolve = resolve
        self._http = LazyClient(http2=False, ca_file=settings.ca_file, timeout=settings.timeout,
                                limits=httpx.Limits(max_connections=100, max_keepalive_connections=20,
                                                    keepalive_expiry=60))

    def serves(self, binding: Binding) -> bool:
        return binding.push.provider == "webpush"

    async def warm(self) -> None:
        preload_http()
        self._http.get()

    async def aclose(self) -> None:
        await self._http.aclose()

    def payload(self, message: PushMessage, extras: bool = True) -> bytes:
        fields: dict[str, Any] = dict(call_fields(message))
        if extras:
            for key, value in message.extra:
                fields.setdefault(key, value)
        return json.dumps(fields, separators=(",", ":")).encode()

    def body(self, binding: Binding, message: PushMessage, extras: bool = True) -> bytes:
        """The encrypted body, or b"" when the contact gave no subscription keys."""
        keys = dict(binding.push.extra_tokens)
        if "p256dh" not in keys or "auth" not in keys:
            return b""
        plain = self.payload(message, extras)
        limit = self.settings.max_payload - 86 - 17  # header, tag and delimiter
        if len(plain) > limit and extras:
            plain = self.payload(message, extras=False)
        if len(plain) > limit:
            return b""  # a bare wake-up still rings: the app fetches the call over SIP
        return encrypt(plain, keys["p256dh"], keys["auth"])

    def headers(self, endpoint: str, message: PushMessage, encrypted: bool) -> dict[str, str]:
        now = self._clock()
        headers = {
            "ttl": str(max(0, int(message.deadline - now))),
            "urgency": "high" if message.kind in HIGH_URGENCY else "normal",
            "topic": topic_for(message.call_id),
            "authorization": self.vapid.header(endpoint, now),
        }
        if encrypted:
            headers["content-encoding"] = "aes128gcm"
            headers["content-type"] = "application/octet-stream"
        return headers

    async def send(self, binding: Binding, message: PushMessage) -> PushResult:
        if self._http.closed:
            return closed_result()
        endpoint = binding.push.token
        try:
            target = await check_url(endpoint, self.allowed_hosts, self._resolve, "capture.webpush_allowed_hosts")
            if target.scheme != "https":
                return PushResult(PushOutcome.FAILED, "URL refused: push endpoints must be https")
            body = self.body(binding, message)
            result = await self._post(target, endpoint, message, body)
            if result.status == 413 and body:
                smaller = self.body(binding, message, extras=False)
                if len(smaller) >= len(body):
                    smaller = b""
                log.info("webpush %s: payload too large (%d bytes), sending %s", target.host, len(body),
                         f"{len(smaller)} bytes" if smaller else "an empty wake-up")
                result = await self._post(target, endpoint, message, smaller)
            return result
        except UrlRefused as exc:
            why = str(exc).replace("capture.vendor_allowed_hosts", "capture.webpush_allowed_hosts")
            log.warning("webpush push to %s refused: %s", target_host(endpoint), why)
            return PushResult(PushOutcome.FAILED, f"URL refused: {why}")
        except EceError as exc:
            return PushResult(PushOutcome.FAILED, f"cannot encrypt for this subscription: {exc}")
        except httpx.HTTPError as exc:
            return network_result(exc)

    async def _post(self, target: Any, endpoint: str, message: PushMessage, body: bytes) -> PushResult:
        headers = self.headers(endpoint, message, bool(body))
        headers["host"] = target.host_header
        client = self._http.get()
        request = client.build_request("POST", target.url, content=body, headers=headers,
                                       extensions={"sni_hostname": target.host})
        try:
            response = await send_capped(client, request, MAX_RESPONSE_BYTES)
        except ResponseTooLarge as exc:
            return PushResult(PushOutcome.FAILED, str(exc))
        text = response.text
        status = response.status_code
        if status in (200, 201, 202):
            return PushResult(PushOutcome.DELIVERED, response.headers.get("location", "")[:200], status)
        reason = f"HTTP {status} {_reason(text)}".strip()
        if status in (404, 410):
            return PushResult(PushOutcome.TOKEN_DEAD, reason, status)
        if status == 429 or status >= 500:
            return PushResult(PushOutcome.RETRY, reason, status,
                              retry_after=retry_after(response.headers.get("retry-after"), self._clock()))
        if 300 <= status < 400:
            return PushResult(PushOutcome.FAILED, "redirect refused", status)
        return PushResult(PushOutcome.FAILED, reason, status)


def _reason(body: str) -> str:
    """Push services answer errors with a short text or JSON (Mozilla: {"errno", "message"})."""
    text = body[:200]
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip().splitlines()[0][:120] if text.strip() else ""
    if isinstance(data, dict):
        return str(data.get("message") or data.get("error") or "")[:120]
    return ""


def target_host(url: str) -> str:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"
