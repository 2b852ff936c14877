"""APNs provider over HTTP/2 (httpx), for one iOS app: VoIP pushes for calls, the rest to
the app's remote token.

PushKit's rule (iOS 13+): every VoIP push must be reported to CallKit as a new incoming call at
once, or iOS kills the app and, if it keeps happening, stops delivering VoIP pushes to it. So
only a CALL goes out as a VoIP push (to the VoIP token, topic ``<bundle>.voip``, priority 10);
a cancel or answered-elsewhere is a ``background`` push (``content-available: 1``, priority 5)
and a missed call a visible, localizable ``alert`` push, both to the *remote* token with the
topic ``<bundle>`` (``route``). A device with a VoIP token only gets nothing but calls (its
call's end reaches it over SIP: docs/calls.md); a device with a remote token only gets its
calls as alert pushes (degraded: no CallKit).

One long-lived client per environment (production, sandbox), opened by ``warm()`` at start
(or on the first push to that environment): Apple asks
providers to keep connections open, and HTTP/2 multiplexes every push on one of them.

Token auth signs an ES256 JWT with the app's .p8 key and reuses it for ``jwt_lifetime``
seconds (Apple refuses tokens older than an hour and answers 429 to re-signing more often
than every 20 minutes). A 403 ExpiredProviderToken re-signs once and retries the push.
Certificate auth puts ``cert_file`` on the TLS context instead. See docs/providers.md.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from ari_push.model import Binding, PushKind, PushMessage, PushOutcome, PushResult
from ari_push.push.common import (
    USER_AGENT,
    Clock,
    ResponseTooLarge,
    call_fields,
    closed_result,
    describe,
    network_result,
    preload_http,
    retry_after,
    send_capped,
    tls_context,
)
from ari_push.settings import ApnsApp, SettingsError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ApnsRoute:
    """Where and how one push goes: token, topic, ``apns-push-type`` and ``apns-priority``."""

    token: str
    topic: str
    push_type: str
    priority: int


def route(binding: Binding, kind: PushKind) -> ApnsRoute | PushResult:
    """The token, topic, push type and priority of a push of ``kind`` to this device."""
    push = binding.push
    bundle = push.param.removesuffix(".voip")
    voip = push.token if push.param.endswith(".voip") else ""
    remote = dict(push.extra_tokens).get("remote", "") or ("" if voip else push.token)
    if kind is PushKind.CALL:
        if voip:
            return ApnsRoute(voip, bundle + ".voip", "voip", 10)
        return ApnsRoute(remote, bundle, "alert", 10)  # no VoIP token: a visible alert (degraded)
    if not remote:
        return PushResult(PushOutcome.SKIPPED, "VoIP token only: iOS allows no VoIP push but for a new call")
    if kind is PushKind.MISSED_CALL:
        return ApnsRoute(remote, bundle, "alert", 10)
    return ApnsRoute(remote, bundle, "background", 5)  # cancel, answered elsewhere, and any later kind

MAX_PAYLOAD = 5120  # bytes, VoIP pushes
MAX_COLLAPSE_ID = 64  # bytes
TOKEN_RE = re.compile(r"[0-9A-Fa-f]{64}")
DEAD_TOKEN_REASONS = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic"})
GONE_REASONS = frozenset({"Unregistered", "ExpiredToken"})


def load_p8(pem: str, where: str = "apns.key") -> EllipticCurvePrivateKey:
    """Load an APNs auth key (.p8, PKCS#8 PEM, P-256). Errors never show the key."""
    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise SettingsError(where, "is not a PEM private key (.p8 file from Apple)") from None
    if not isinstance(key, EllipticCurvePrivateKey) or not isinstance(key.curve, SECP256R1):
        raise SettingsError(where, "is not a P-256 (ES256) key")
    return key


class ApnsProvider:
    """Sends VoIP pushes for one configured app (its topics, its key or certificate)."""

    name = "apns"

    def __init__(self, app: ApnsApp, *, clock: Clock = time.time) -> None:
        self.app = app
        self._clock = clock
        self._key = load_p8(app.key, f"apns[{app.name}].key") if app.key else None
        self._clients: dict[bool, httpx.AsyncClient] = {}
        self._closed = False
        self._jwt = ""
        self._jwt_signed_at = 0.0
        self.jwt_signings = 0

    def serves(self, binding: Binding) -> bool:
        """The app's configured topics are its VoIP topics (``<bundle>.voip``); a device with a
        remote token only names ``<bundle>``."""
        param = binding.push.param
        return binding.push.provider == "apns" and (param in self.app.topics or param + ".voip" in self.app.topics)

    async def warm(self) -> None:
        self._http(False)
        self._http(True)
        preload_http()

    async def aclose(self) -> None:
        self._closed = True
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    # ------------------------------------------------------------ sending

    async def send(self, binding: Binding, message: PushMessage) -> PushResult:
        if self._closed:
            return closed_result()
        if not self.serves(binding):
            return PushResult(PushOutcome.FAILED,
                              f"topic {binding.push.param!r} is not configured for app {self.app.name}")
        way = route(binding, message.kind)
        if isinstance(way, PushResult):
            return way
        token = way.token
        if not TOKEN_RE.fullmatch(token):
            return PushResult(PushOutcome.FAILED, "device token is not 64 hex digits")
        payload = self.build_payload(message, way)
        if isinstance(payload, PushResult):
            return payload
        headers = self.build_headers(way, message)
        base = self.app.sandbox_url if binding.push.sandbox else self.app.production_url
        url = f"{base.rstrip('/')}/3/device/{token}"
        client = self._http(binding.push.sandbox)
        stale: str | None = None
        try:
            for _attempt in range(2):
                if self._key is not None:
                    headers["authorization"] = f"bearer {self.provider_token(stale)}"
                response = await send_capped(client, client.build_request("POST", url, content=payload,
                                                                          headers=headers))
                reason, timestamp = _apns_error(response)
                if (
                    response.status_code == 403
                    and reason == "ExpiredProviderToken"
                    and self._key is not None
                    and stale is None
                ):
                    log.info("apns %s: provider token expired for Apple, re-signing", self.app.name)
                    stale = headers["authorization"].removeprefix("bearer ")
                    continue
                break
        except httpx.HTTPError as exc:
            return network_result(exc)
        except ResponseTooLarge as exc:
            return PushResult(PushOutcome.FAILED, str(exc))
        result = self._result(response, reason, timestamp)
        if result.outcome is not PushOutcome.DELIVERED:
            log.debug("apns %s: %s -> %s %s", self.app.name, describe(binding), result.outcome, result.reason)
        return result

    def build_payload(self, message: PushMessage, way: ApnsRoute | None = None) -> bytes | PushResult:
        """The JSON payload: ``aps`` for the push type plus the call fields (deadline as a
        number). VoIP: an empty ``aps`` (the app reports the call to CallKit itself);
        background: ``content-available``; alert: a localizable alert naming the caller."""
        body: dict[str, Any] = {"aps": _aps(message, way.push_type if way is not None else "voip")}
        for key, value in call_fields(message).items():
            body[key] = value
        body["deadline"] = int(message.deadline)
        for key, value in message.extra:
            if key not in body and key != "collapse_id":
                body[key] = value
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        if len(payload) > MAX_PAYLOAD:
            body = {k: body[k] for k in ("aps", *call_fields(message))}
            body["deadline"] = int(message.deadline)
            payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
            if len(payload) > MAX_PAYLOAD:
                return PushResult(PushOutcome.FAILED, f"payload exceeds {MAX_PAYLOAD} bytes")
        return payload

    def build_headers(self, way: ApnsRoute, message: PushMessage) -> dict[str, str]:
        headers = {
            "apns-push-type": way.push_type,
            "apns-topic": way.topic,
            "apns-priority": str(way.priority),
            # Apple keeps the push until the ring deadline and no longer.
            "apns-expiration": str(max(0, int(message.deadline))),
            "apns-id": str(uuid.uuid4()),
            "content-type": "application/json",
        }
        collapse = dict(message.extra).get("collapse_id", "") or (message.call_id if way.push_type != "voip" else "")
        if collapse and len(collapse.encode()) <= MAX_COLLAPSE_ID:
            headers["apns-collapse-id"] = collapse
        return headers

    def _result(self, response: httpx.Response, reason: str, timestamp: float | None) -> PushResult:
        status = response.status_code
        if status == 200:
            return PushResult(PushOutcome.DELIVERED, response.headers.get("apns-id", ""), status)
        label = reason or f"HTTP {status}"
        if status == 410 or reason in GONE_REASONS:
            return PushResult(PushOutcome.TOKEN_DEAD, label, status, dead_since=timestamp)
        if status == 400 and reason in DEAD_TOKEN_REASONS:
            return PushResult(PushOutcome.TOKEN_DEAD, label, status)
        if status == 429 or status >= 500:
            wait = retry_after(response.headers.get("retry-after"), self._clock())
            return PushResult(PushOutcome.RETRY, label, status, retry_after=wait)
        if status == 403:
            log.error("apns %s: Apple refused our credentials: %s", self.app.name, label)
        return PushResult(PushOutcome.FAILED, label, status)

    # ------------------------------------------------------------ credentials

    def provider_token(self, stale: str | None = None) -> str:
        """The ES256 provider JWT, reused for ``jwt_lifetime`` seconds. ``stale`` is one Apple
        called expired: re-sign unless another push already did. No await inside, so
        concurrent pushes share one signature."""
        assert self._key is not None
        now = self._clock()
        if self._jwt and self._jwt != stale and now - self._jwt_signed_at < self.app.jwt_lifetime:
            return self._jwt
        self._jwt = jwt.encode(
            {"iss": self.app.team_id, "iat": int(now)},
            self._key,
            algorithm="ES256",
            headers={"kid": self.app.key_id},
        )
        self._jwt_signed_at = now
        self.jwt_signings += 1
        return self._jwt

    def _http(self, sandbox: bool) -> httpx.AsyncClient:
        client = self._clients.get(sandbox)
        if client is None:
            client = httpx.AsyncClient(
                http1=False,  # APNs speaks HTTP/2 only; fail loudly rather than fall back
                http2=True,
                verify=tls_context(self.app.ca_file, self.app.cert_file),
                timeout=httpx.Timeout(self.app.timeout),
                limits=httpx.Limits(max_connections=10, max_keepalive_connections=10, keepalive_expiry=3600),
                follow_redirects=False,
                trust_env=False,
                headers={"user-agent": USER_AGENT},
            )
            self._clients[sandbox] = client
        return client


def _apns_error(response: httpx.Response) -> tuple[str, float | None]:
    """(reason, timestamp in Unix seconds) from an APNs error body; ('', None) on 200."""
    if response.status_code == 200 or not response.content:
        return "", None
    try:
        body = response.json()
    except ValueError:
        return "", None
    if not isinstance(body, dict):
        return "", None
    reason = str(body.get("reason", ""))[:100]
    stamp = body.get("timestamp")
    timestamp = stamp / 1000.0 if isinstance(stamp, int | float) and not isinstance(stamp, bool) else None
    return reason, timestamp


def _aps(message: PushMessage, push_type: str) -> dict[str, Any]:
    if push_type == "background":
        return {"content-available": 1}
    if push_type != "alert":
        return {}
    caller = message.caller_name or message.caller_number or "?"
    if message.kind is PushKind.MISSED_CALL:
        key, title = "ARI_PUSH_MISSED_CALL", "Missed call"
    else:
        key, title = "ARI_PUSH_INCOMING_CALL", "Incoming call"
    # loc-key/loc-args: the app's Localizable.strings has the text ("Missed call from %@");
    # title/body are what iOS shows when the app has no such key.
    return {"alert": {"title": title, "body": caller, "loc-key": key, "loc-args": [caller]},
            "sound": "default", "thread-id": message.call_id}
