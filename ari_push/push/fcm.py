"""FCM HTTP v1 provider: one Firebase project, OAuth2 from its service-account key.

The access token comes from the key's ``token_uri`` with an RS256 JWT assertion we sign
ourselves (pyjwt): no google-auth, no blocking I/O. It is cached, refreshed a few minutes
before it expires and after a 401, one refresh at a time.

Calls go out as data-only messages (the app decides how to ring). See docs/providers.md.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from ari_push.model import Binding, PushKind, PushMessage, PushOutcome, PushResult
from ari_push.push.common import (
    Clock,
    LazyClient,
    ResponseTooLarge,
    call_fields,
    closed_result,
    describe,
    network_result,
    retry_after,
    send_capped,
)
from ari_push.push.oauth import AuthFailure, TokenCache, load_key_file, token_answer
from ari_push.settings import FcmProject, SettingsError

log = logging.getLogger(__name__)

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME = 3600  # Google's maximum
MAX_DATA_BYTES = 4096  # keys plus values, UTF-8
RESERVED_DATA_KEYS = frozenset({"from", "notification", "message_type"})
RESERVED_DATA_PREFIXES = ("google.", "gcm.")
RETRY_CODES = frozenset({"QUOTA_EXCEEDED", "UNAVAILABLE", "INTERNAL"})
#: Kinds sent at high priority: each one must reach a dozing phone now (ring, or stop ringing,
#: or show the text message that waits for it). Refresh and voicemail pushes go at normal
#: priority: high-priority messages that show nothing get demoted by Android.
HIGH_PRIORITY = frozenset({PushKind.CALL, PushKind.CANCEL, PushKind.ANSWERED_ELSEWHERE, PushKind.MESSAGE})


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    """The fields of a service-account JSON key that we use. The key never shows in repr."""

    client_email: str
    token_uri: str
    project_id: str
    private_key_id: str
    private_key: RSAPrivateKey = field(repr=False)

    @classmethod
    def parse(cls, text: str, where: str = "fcm.service_account") -> ServiceAccount:
        """Parse the JSON text; errors name the field, never show the key."""
        data, key = load_key_file(text, where, ("client_email", "private_key", "token_uri"),
                                  "a service-account key file")
        if data.get("type", "service_account") != "service_account":
            raise SettingsError(where, f"type is {data.get('type')!r}, not 'service_account'")
        return cls(
            client_email=data["client_email"],
            token_uri=data["token_uri"],
            project_id=str(data.get("project_id", "")),
            private_key_id=str(data.get("private_key_id", "")),
            private_key=key,
        )


class FcmProvider:
    """Sends to one FCM project. ``default=True`` also serves FCM bindings that name no
    project (set by the factory when exactly one project is configured).

    The HTTP client and the access token are made by :meth:`warm` when the daemon starts (or
    on the first push, so this may be built outside a loop) and live until :meth:`aclose`.
    """

    name = "fcm"

    def __init__(
        self,
        project: FcmProject,
        *,
        default: bool = False,
        clock: Clock = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.project = project
        self.default = default
        self.account = ServiceAccount.parse(project.service_account, f"fcm[{project.project_id}].service_account")
        self._clock = clock
        self._http = LazyClient(http2=True, ca_file=project.ca_file, timeout=project.timeout,
                                limits=httpx.Limits(max_connections=100, max_keepalive_connections=100),
                                transport=transport)
        self.tokens = TokenCache(self._fetch_token, clock)
        self._send_url = (
            f"{project.api_url.rstrip('/')}/v1/projects/{quote(project.project_id, safe='')}/messages:send"
        )

    def serves(self, binding: Binding) -> bool:
        push = binding.push
        if push.provider != "fcm":
            return False
        # Legacy Linphone contacts name the sender id (the project number) in app-id.
        sender = self.project.sender_id
        return push.param in (self.project.project_id, sender or None) or (not push.param and self.default)

    async def warm(self) -> None:
        self._http.get()
        try:  # the first call's push should not wait for the OAuth2 round trip
            await self.tokens.get()
        except Exception as exc:
            log.warning("FCM project %s: no access token yet (%s); the first push will try again",
                        self.project.project_id, exc)

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------ sending

    async def send(self, binding: Binding, message: PushMessage) -> PushResult:
        if self._http.closed:
            return closed_result()
        body = self.build_body(binding, message)
        if isinstance(body, PushResult):
            return body
        try:
            token = await self.tokens.get()
            response = await self._post(token, body)
            if response.status_code == 401 and _fcm_error(response)[0] != "THIRD_PARTY_AUTH_ERROR":
                # Our access token was refused (revoked, or the clock lied): get a new one, once.
                log.info("fcm %s: access token refused, refreshing", self.project.project_id)
                token = await self.tokens.get(stale=token)
                response = await self._post(token, body)
        except AuthFailure as exc:
            return exc.result
        except httpx.HTTPError as exc:
            return network_result(exc)
        except ResponseTooLarge as exc:
            return PushResult(PushOutcome.FAILED, str(exc))
        result = self._result(response)
        if result.outcome is not PushOutcome.DELIVERED:
            log.debug("fcm %s: %s -> %s %s", self.project.project_id, describe(binding), result.outcome,
                      result.reason)
        return result

    def build_body(self, binding: Binding, message: PushMessage) -> bytes | PushResult:
        """The messages:send request body, or a FAILED result when it cannot be valid."""
        data = call_fields(message)
        for key, value in message.extra:
            if key in data or key in RESERVED_DATA_KEYS or key.startswith(RESERVED_DATA_PREFIXES):
                continue
            data[key] = value
        if _data_size(data) > MAX_DATA_BYTES:
            data = call_fields(message)  # drop the extras first
            if _data_size(data) > MAX_DATA_BYTES:
                return PushResult(PushOutcome.FAILED, f"data exceeds {MAX_DATA_BYTES} bytes")
        ttl = max(0, math.floor(message.deadline - self._clock()))
        android: dict[str, Any] = {
            "priority": "high" if message.kind in HIGH_PRIORITY else "normal",
            "ttl": f"{ttl}s",
            # one call, one collapse key: a phone offline until after the call gets the last
            # word (cancel, missed call) instead of a stale call push first
            "collapse_key": message.call_id[:64],
        }
        body = {"message": {"token": binding.push.token, "data": data, "android": android}}
        return json.dumps(body, separators=(",", ":")).encode()

    async def _post(self, access_token: str, body: bytes) -> httpx.Response:
        client = self._http.get()
        return await send_capped(client, client.build_request(
            "POST",
            self._send_url,
            content=body,
            headers={"authorization": f"Bearer {access_token}", "content-type": "application/json"},
        ))

    def _result(self, response: httpx.Response) -> PushResult:
        status = response.status_code
        if status == 200:
            return PushResult(PushOutcome.DELIVERED, status=status)
        code, grpc_status, text = _fcm_error(response)
        label = code or grpc_status or f"HTTP {status}"
        reason = f"{label}: {text}" if text else label
        if code == "UNREGISTERED":
            return PushResult(PushOutcome.TOKEN_DEAD, reason, status=status)
        if status == 429 or status >= 500 or code in RETRY_CODES:
            wait = retry_after(response.headers.get("retry-after"), self._clock())
            return PushResult(PushOutcome.RETRY, reason, status=status, retry_after=wait)
        return PushResult(PushOutcome.FAILED, reason, status=status)

    # ------------------------------------------------------------ OAuth2

    @property
    def token_fetches(self) -> int:
        return self.tokens.fetches

    def assertion(self) -> str:
        """The signed JWT we trade for an access token (RFC 7523 jwt-bearer grant)."""
        now = int(self._clock())
        claims = {
            "iss": self.account.client_email,
            "scope": SCOPE,
            "aud": self.account.token_uri,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        }
        headers = {"kid": self.account.private_key_id} if self.account.private_key_id else None
        return jwt.encode(claims, self.account.private_key, algorithm="RS256", headers=headers)

    async def _fetch_token(self) -> tuple[str, float]:
        started = self._clock()
        client = self._http.get()
        response = await send_capped(client, client.build_request(
            "POST", self.account.token_uri, data={"grant_type": GRANT_TYPE, "assertion": self.assertion()}))
        return token_answer(response, started, _oauth_error, log, f"fcm {self.project.project_id}")


def _oauth_error(body: dict[str, Any]) -> str:
    return f"{body.get('error', '')}: {str(body.get('error_description', ''))[:200]}"


def _data_size(data: dict[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in data.items())


def _fcm_error(response: httpx.Response) -> tuple[str, str, str]:
    """(FcmError errorCode, google.rpc status, message) from an error body; blanks if absent."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return "", "", ""
    if not isinstance(error, dict):
        return "", "", ""
    code = ""
    details = error.get("details")
    if isinstance(details, list):
        for detail in details:
            if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("FcmError"):
                code = str(detail.get("errorCode", ""))
                break
    return code, str(error.get("status", "")), str(error.get("message", ""))[:200]
