"""A strict local FCM HTTP v1 service: Google's OAuth token endpoint plus messages:send.

It refuses what Google refuses (bad assertion, unknown or expired bearer, foreign project,
unknown fields, several targets, non-string data, reserved data keys, bad priority or ttl,
data over 4096 bytes) with Google's error body shapes, so a wrong request fails our tests.

Usage (pytest or a plain script)::

    fake = FakeFcm()
    await fake.start()                     # 127.0.0.1, ephemeral port
    sa_json = fake.add_project("proj-a")   # service-account JSON with token_uri -> fake
    fake.script("tok-1", FcmAnswer.error(503, "UNAVAILABLE", retry_after="2"))
    ...
    await fake.stop()

Tokens starting with ``dead-`` answer 404 UNREGISTERED unless scripted otherwise.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web

from tests.fakes.keys import ServiceAccountKey, service_account

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SCOPES = ("https://www.googleapis.com/auth/firebase.messaging", "https://www.googleapis.com/auth/cloud-platform")
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
TTL_RE = re.compile(r"^\d+(\.\d{1,9})?s$")
MESSAGE_FIELDS = {"name", "data", "notification", "android", "webpush", "apns", "fcm_options", "token",
                  "topic", "condition"}
ANDROID_FIELDS = {"collapse_key", "priority", "ttl", "restricted_package_name", "data", "notification",
                  "fcm_options", "direct_boot_ok", "bandwidth_constrained_ok", "restricted_satellite_ok"}
RESERVED_KEYS = {"from", "notification", "message_type"}
STATUS_OF = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
             429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"


def error_body(code: int, message: str, error_code: str | None = None,
               status: str | None = None, bad_field: str | None = None) -> dict[str, Any]:
    """Google's error shape (google.rpc.Status) with an FcmError or BadRequest detail."""
    details: list[dict[str, Any]] = []
    if error_code:
        details.append({"@type": FCM_ERROR_TYPE, "errorCode": error_code})
    if bad_field:
        details.append({"@type": "type.googleapis.com/google.rpc.BadRequest",
                        "fieldViolations": [{"field": bad_field, "description": message}]})
    body: dict[str, Any] = {"code": code, "message": message, "status": status or STATUS_OF.get(code, "UNKNOWN")}
    if details:
        body["details"] = details
    return {"error": body}


@dataclass
class FcmAnswer:
    """A canned answer for one send. ``stall`` never answers (until the fake stops)."""

    status: int = 200
    body: dict[str, Any] | None = None
    retry_after: str | None = None
    stall: bool = False

    @classmethod
    def error(cls, status: int, error_code: str, message: str = "", retry_after: str | None = None) -> FcmAnswer:
        grpc = {"UNREGISTERED": "NOT_FOUND", "QUOTA_EXCEEDED": "RESOURCE_EXHAUSTED",
                "SENDER_ID_MISMATCH": "PERMISSION_DENIED", "THIRD_PARTY_AUTH_ERROR": "UNAUTHENTICATED"}
        return cls(status, error_body(status, message or error_code, error_code, grpc.get(error_code)),
                   retry_after)


@dataclass
class FcmRequest:
    project: str
    target: str
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class _Issued:
    client_email: str
    expires: float


@dataclass
class FakeFcm:
    clock: Callable[[], float] = time.time
    token_lifetime: int = 3599
    accept_google_audience: bool = True  # google-auth signs for Google's token URI
    requests: list[FcmRequest] = field(default_factory=list)
    token_issuances: int = 0
    token_refusals: list[str] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        self._accounts: dict[str, ServiceAccountKey] = {}  # client_email -> key
        self._issued: dict[str, _Issued] = {}
        self._scripts: dict[str, deque[FcmAnswer]] = {}
        self._seq = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------ control

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeFcm:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/token", self._token)
        app.router.add_post("/v1/projects/{project}/messages:send", self._send)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.host, self.port = self._runner.addresses[0][:2]
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeFcm:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def add_project(self, project_id: str, key: ServiceAccountKey | None = None) -> str:
        """Register a project and its service account; returns the key file's JSON text
        (token_uri pointing at this fake). Call after start()."""
        sa = key or service_account(project_id)
        self._accounts[sa.client_email] = sa
        return sa.json(self.token_url)

    def script(self, token: str, *answers: FcmAnswer) -> None:
        """Queue answers for sends to ``token`` (consumed in order, then the default)."""
        self._scripts.setdefault(token, deque()).extend(answers)

    def revoke_access_tokens(self) -> None:
        """Every access token issued so far now gets 401 (as after a key rotation)."""
        self._issued.clear()

    # ------------------------------------------------------------ OAuth2 token endpoint

    def _oauth_error(self, error: str, description: str, status: int = 400) -> web.Response:
        self.token_refusals.append(f"{error}: {description}")
        return web.json_response({"error": error, "error_description": description}, status=status)

    async def _token(self, request: web.Request) -> web.Response:
        if request.content_type != "application/x-www-form-urlencoded":
            return self._oauth_error("invalid_request", "Bad Request")
        form = await request.post()
        if form.get("grant_type") != GRANT_TYPE:
            return self._oauth_error("unsupported_grant_type", f"Invalid grant_type: {form.get('grant_type')!r}")
        assertion = form.get("assertion")
        if not isinstance(assertion, str) or not assertion:
            return self._oauth_error("invalid_request", "Missing required parameter: assertion")
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            return self._oauth_error("invalid_grant", "Invalid JWT: malformed")
        sa = self._accounts.get(str(unverified.get("iss")))
        if sa is None:
            return self._oauth_error("invalid_grant", "Invalid grant: account not found")
        if header.get("alg") != "RS256":
            return self._oauth_error("invalid_grant", "Invalid JWT: algorithm must be RS256")
        if "kid" in header and header["kid"] != sa.private_key_id:
            return self._oauth_error("invalid_grant", "Invalid JWT Signature.")
        audiences = [self.token_url] + ([GOOGLE_TOKEN_URI] if self.accept_google_audience else [])
        try:
            claims = jwt.decode(
                assertion, sa.key.public_key(), algorithms=["RS256"], audience=audiences,
                options={"require": ["iss", "aud", "iat", "exp"], "verify_exp": False, "verify_iat": False,
                         "verify_nbf": False},
            )
        except jwt.InvalidAudienceError:
            return self._oauth_error("invalid_grant", "Invalid JWT: aud is not the token URI")
        except jwt.PyJWTError:
            return self._oauth_error("invalid_grant", "Invalid JWT Signature.")
        now = self.clock()
        iat, exp = claims["iat"], claims["exp"]
        if not isinstance(iat, int) or not isinstance(exp, int) or exp - iat > 3600 or exp <= iat:
            return self._oauth_error("invalid_grant", "Invalid JWT: Token must be a short-lived token "
                                     "(60 minutes) and in a reasonable timeframe. Check your iat and exp values")
        if exp < now or iat > now + 60:
            return self._oauth_error("invalid_grant", "Invalid JWT: Token must be a short-lived token "
                                     "(60 minutes) and in a reasonable timeframe. Check your iat and exp values")
        scopes = str(claims.get("scope", "")).split()
        if not any(s in SCOPES for s in scopes):
            return self._oauth_error("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        token = f"ya29.fake-{next(self._seq)}-{sa.project_id}"
        self._issued[token] = _Issued(sa.client_email, now + self.token_lifetime)
        self.token_issuances += 1
        return web.json_response({"access_token": token, "expires_in": self.token_lifetime,
                                  "token_type": "Bearer"})

    # ------------------------------------------------------------ messages:send

    def _refuse(self, status: int, message: str, error_code: str | None = None,
                bad_field: str | None = None) -> web.Response:
        body = error_body(status, message, error_code, bad_field=bad_field)
        self.refusals.append(body["error"])
        return web.json_response(body, status=status)

    async def _send(self, request: web.Request) -> web.StreamResponse:
        project = request.match_info["project"]
        auth = request.headers.get("Authorization", "")
        issued = self._issued.get(auth[7:]) if auth[:7].lower() == "bearer " else None
        if issued is None or issued.expires <= self.clock():
            return self._refuse(401, "Request had invalid authentication credentials. Expected OAuth 2 access "
                                "token, login cookie or other valid authentication credential.")
        owner = self._accounts[issued.client_email]
        if owner.project_id != project:
            return self._refuse(403, f"Permission 'cloudmessaging.messages.create' denied on resource "
                                f"'//cloudresourcemanager.googleapis.com/projects/{project}' (or it may not exist).")
        if request.content_type != "application/json":
            return self._refuse(400, "Invalid JSON payload received. Content-Type must be application/json.")
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return self._refuse(400, "Invalid JSON payload received.")
        problem = self._validate(body)
        if problem is not None:
            return self._refuse(400, problem[1], "INVALID_ARGUMENT", bad_field=problem[0])
        message = body["message"]
        target = message.get("token") or message.get("topic") or message.get("condition")
        self.requests.append(FcmRequest(project, target, body, dict(request.headers)))
        queue = self._scripts.get(target)
        if queue:
            answer = queue.popleft()
        elif target.startswith("dead-"):
            answer = FcmAnswer.error(404, "UNREGISTERED", "Requested entity was not found.")
        else:
            answer = FcmAnswer()
        if answer.stall:
            await self._stopping.wait()
            return web.Response(status=503)
        if body.get("validate_only"):
            answer = FcmAnswer()
        payload = answer.body if answer.body is not None else {
            "name": f"projects/{project}/messages/0:{next(self._seq)}%fake"}
        headers = {"Retry-After": answer.retry_after} if answer.retry_after else {}
        return web.json_response(payload, status=answer.status, headers=headers)

    @staticmethod
    def _validate(body: Any) -> tuple[str, str] | None:
        """(field, message) of the first violation, like Google's BadRequest detail."""
        if not isinstance(body, dict):
            return "", "Invalid JSON payload received. Expected an object."
        for name in body:
            if name not in ("validate_only", "message", "validateOnly"):
                return name, f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.'
        message = body.get("message")
        if not isinstance(message, dict):
            return "message", "Request contains an invalid argument."
        for name in message:
            if name not in MESSAGE_FIELDS:
                return f"message.{name}", (f'Invalid JSON payload received. Unknown name "{name}" at '
                                           "'message': Cannot find field.")
        targets = [t for t in ("token", "topic", "condition") if message.get(t)]
        if len(targets) != 1:
            return "message", "Exactly one of token, topic or condition must be specified."
        data = message.get("data", {})
        size = 0
        if not isinstance(data, dict):
            return "message.data", "Invalid value at 'message.data' (type.googleapis.com/google.protobuf.Struct)"
        for i, (key, value) in enumerate(data.items()):
            if not isinstance(value, str):
                return f"message.data[{i}].value", f"Invalid value at 'message.data[{i}].value' (TYPE_STRING), {value}"
            if key in RESERVED_KEYS or key.startswith(("google.", "gcm.")):
                return f"message.data[{i}].key", f"Invalid data key: {key!r} is reserved"
            size += len(key.encode()) + len(value.encode())
        if size > 4096:
            return "message.data", "Message is too big"
        android = message.get("android")
        if android is not None:
            if not isinstance(android, dict):
                return "message.android", "Invalid value at 'message.android'"
            for name in android:
                if name not in ANDROID_FIELDS:
                    return f"message.android.{name}", (f'Invalid JSON payload received. Unknown name "{name}" '
                                                       "at 'message.android': Cannot find field.")
            if "priority" in android and android["priority"] not in ("normal", "high", "NORMAL", "HIGH"):
                return "message.android.priority", (
                    "Invalid value at 'message.android.priority' "
                    f"(type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority), {android['priority']!r}")
            ttl = android.get("ttl")
            if ttl is not None and (not isinstance(ttl, str) or not TTL_RE.match(ttl)
                                    or float(ttl[:-1]) > 2419200):
                return "message.android.ttl", (
                    f"Invalid value at 'message.android.ttl' (type.googleapis.com/google.protobuf.Duration), {ttl!r}")
            adata = android.get("data", {})
            if not isinstance(adata, dict) or not all(isinstance(v, str) for v in adata.values()):
                return "message.android.data", "Invalid value at 'message.android.data' (TYPE_STRING)"
        return None
