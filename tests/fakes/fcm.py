"""A strict local FCM HTTP v1 service: Google's OAuth token endpoint plus messages:send,
served as Google serves them: HTTP/2 over TLS (ALPN h2), certificate from a local test CA.

It refuses what Google refuses (bad assertion, unknown or expired bearer, foreign project,
unknown fields, several targets, a registration token not of the real shape, a token of
another project, non-string data, reserved data keys, bad priority or ttl, malformed
``notification`` / ``apns`` / ``webpush`` blocks, data over 4096 bytes) with Google's error
body shapes, so a wrong request fails our tests. The token endpoint can be scripted to fail
(429, 5xx, a malformed answer) like any other server.

Usage (pytest or a plain script)::

    fake = FakeFcm(pki)                    # tests.fakes.keys.make_pki(dir); None: a private one
    await fake.start()                     # 127.0.0.1, ephemeral port
    sa_json = fake.add_project("proj-a")   # service-account JSON with token_uri -> fake
    token = fcm_token(1)                   # tests.fakes.builders: the real token shape
    fake.script(token, FcmAnswer.error(503, "UNAVAILABLE", retry_after="2"))
    fake.unregister(token)                 # the app was uninstalled: 404 UNREGISTERED from now on
    ...
    await fake.stop()
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt

from tests.fakes.h2server import H2Request, H2Response, H2Server
from tests.fakes.keys import Pki, ServiceAccountKey, make_pki, service_account

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SCOPES = ("https://www.googleapis.com/auth/firebase.messaging", "https://www.googleapis.com/auth/cloud-platform")
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
TTL_RE = re.compile(r"^\d+(\.\d{1,9})?s$")
MESSAGE_FIELDS = {"name", "data", "notification", "android", "webpush", "apns", "fcm_options", "token",
                  "topic", "condition"}
ANDROID_FIELDS = {"collapse_key", "priority", "ttl", "restricted_package_name", "data", "notification",
                  "fcm_options", "direct_boot_ok", "bandwidth_constrained_ok", "restricted_satellite_ok"}
RESERVED_KEYS = {"from", "notification", "message_type"}
#: An FCM registration token: "<instance id>:APA91b<base64url>" (older ones without the id part).
REGISTRATION_TOKEN_RE = re.compile(r"^(?:[A-Za-z0-9_-]{11,}:)?APA91b[A-Za-z0-9_-]{100,300}$")
INVALID_TOKEN_MESSAGE = "The registration token is not a valid FCM registration token"
NOTIFICATION_FIELDS = {"title", "body", "image"}
APNS_FIELDS = {"headers", "payload", "fcm_options", "live_activity_token"}
WEBPUSH_FIELDS = {"headers", "data", "notification", "fcm_options"}
ANDROID_NOTIFICATION_FIELDS = {
    "title", "body", "icon", "color", "sound", "tag", "click_action", "body_loc_key", "body_loc_args",
    "title_loc_key", "title_loc_args", "channel_id", "ticker", "sticky", "event_time", "local_only",
    "notification_priority", "default_sound", "default_vibrate_timings", "default_light_settings",
    "vibrate_timings", "visibility", "notification_count", "light_settings", "image", "bypass_proxy_notification",
    "proxy"}
STATUS_OF = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
             429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
SEND_PATH_RE = re.compile(r"^/v1/projects/([^/]+)/messages:send$")


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
class TokenAnswer:
    """A canned answer from the OAuth token endpoint: an error, or a malformed 200 (``raw``)."""

    status: int = 200
    body: dict[str, Any] | None = None
    raw: bytes | None = None
    retry_after: str | None = None

    @classmethod
    def error(cls, status: int, error: str, description: str = "", retry_after: str | None = None) -> TokenAnswer:
        return cls(status, {"error": error, "error_description": description or error}, retry_after=retry_after)


def _json(status: int, body: Any, headers: list[tuple[str, str]] | None = None) -> H2Response:
    return H2Response(status, json.dumps(body).encode(),
                      [("content-type", "application/json; charset=UTF-8"), *(headers or [])])


@dataclass
class FcmRequest:
    project: str
    target: str
    body: dict[str, Any]
    headers: dict[str, str]
    received: float = field(default_factory=time.monotonic)


@dataclass
class _Issued:
    client_email: str
    expires: float


@dataclass
class FakeFcm:
    pki: Pki | None = None  # None: a private CA and certificate, made at start()
    clock: Callable[[], float] = time.time
    token_lifetime: int = 3599
    accept_google_audience: bool = True  # google-auth signs for Google's token URI
    requests: list[FcmRequest] = field(default_factory=list)
    token_issuances: int = 0
    token_requests: int = 0
    token_refusals: list[str] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0
    #: called with each accepted send (FcmRequest) before it is answered (the demo's timeline)
    on_send: Callable[[FcmRequest], None] | None = None

    def __post_init__(self) -> None:
        self._accounts: dict[str, ServiceAccountKey] = {}  # client_email -> key
        self._issued: dict[str, _Issued] = {}
        self._scripts: dict[str, deque[FcmAnswer]] = {}
        self._token_scripts: deque[TokenAnswer] = deque()
        self._unregistered: set[str] = set()
        self._token_project: dict[str, str] = {}
        self._seq = itertools.count(1)
        self._server: H2Server | None = None
        self._own_pki: Path | None = None
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------ control

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    @property
    def ca_file(self) -> str:
        """The CA a client must trust to talk to this fake (FcmProject.ca_file)."""
        assert self.pki is not None, "start() first"
        return str(self.pki.ca_file)

    @property
    def handshakes(self) -> int:
        return self._server.handshakes if self._server else 0

    @property
    def refused_connections(self) -> int:
        return self._server.refused_connections if self._server else 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeFcm:
        if self.pki is None:
            self._own_pki = Path(tempfile.mkdtemp(prefix="fake-fcm-"))
            self.pki = make_pki(self._own_pki)
        self._server = H2Server(self.pki, self._route)
        await self._server.start(host, port)
        self.host, self.port = self._server.host, self._server.port
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            await self._server.stop()
            self._server = None
        if self._own_pki is not None:
            shutil.rmtree(self._own_pki, ignore_errors=True)
            self._own_pki = None

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

    def script_token(self, *answers: TokenAnswer) -> None:
        """Queue answers of the OAuth token endpoint (consumed in order, then real tokens)."""
        self._token_scripts.extend(answers)

    def unregister(self, token: str) -> None:
        """The app instance behind ``token`` is gone: every send to it is 404 UNREGISTERED."""
        self._unregistered.add(token)

    def bind_token(self, token: str, project: str) -> None:
        """``token`` was issued for ``project``: a send to it from another project is 403
        SENDER_ID_MISMATCH, as Google answers."""
        self._token_project[token] = project

    def revoke_access_tokens(self) -> None:
        """Every access token issued so far now gets 401 (as after a key rotation)."""
        self._issued.clear()

    def expire_access_tokens(self) -> None:
        """Every access token issued so far has reached its expiry (Google's clock)."""
        now = self.clock()
        for issued in self._issued.values():
            issued.expires = min(issued.expires, now)

    def sends_to(self, token: str) -> list[FcmRequest]:
        return [r for r in self.requests if r.target == token]

    # ------------------------------------------------------------ routing

    async def _route(self, request: H2Request) -> H2Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/token":
            if request.method != "POST":
                return _json(405, {"error": "invalid_request", "error_description": "Method Not Allowed"})
            return await self._token(request)
        match = SEND_PATH_RE.match(path)
        if match is None:
            return H2Response(404, b"<html><title>Error 404 (Not Found)!!1</title></html>",
                              [("content-type", "text/html; charset=UTF-8")])
        if request.method != "POST":
            return self._refuse(405, f"Method {request.method} not allowed for this resource.")
        return await self._send(match.group(1), request)

    # ------------------------------------------------------------ OAuth2 token endpoint

    def _oauth_error(self, error: str, description: str, status: int = 400) -> H2Response:
        self.token_refusals.append(f"{error}: {description}")
        return _json(status, {"error": error, "error_description": description})

    async def _token(self, request: H2Request) -> H2Response:
        self.token_requests += 1
        if request.content_type != "application/x-www-form-urlencoded":
            return self._oauth_error("invalid_request", "Bad Request")
        if self._token_scripts:
            scripted = self._token_scripts.popleft()
            headers = [("retry-after", scripted.retry_after)] if scripted.retry_after else []
            if scripted.raw is not None:
                return H2Response(scripted.status, scripted.raw, [("content-type", "text/html"), *headers])
            if scripted.status != 200 and scripted.body is not None:
                self.token_refusals.append(f"{scripted.body.get('error')}: {scripted.body.get('error_description')}")
            return _json(scripted.status, scripted.body or {}, headers)
        form = {k: v[0] for k, v in parse_qs(request.body.decode(errors="replace")).items()}
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
        return _json(200, {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"})

    # ------------------------------------------------------------ messages:send

    def _refuse(self, status: int, message: str, error_code: str | None = None,
                bad_field: str | None = None) -> H2Response:
        body = error_body(status, message, error_code, bad_field=bad_field)
        self.refusals.append(body["error"])
        return _json(status, body)

    async def _send(self, project: str, request: H2Request) -> H2Response | None:
        auth = request.headers.get("authorization", "")
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
        try:
            body = json.loads(request.body)
        except ValueError:
            return self._refuse(400, "Invalid JSON payload received.")
        problem = self._validate(body)
        if problem is not None:
            return self._refuse(400, problem[1], "INVALID_ARGUMENT", bad_field=problem[0])
        message = body["message"]
        target = message.get("token") or message.get("topic") or message.get("condition")
        if message.get("token") and not REGISTRATION_TOKEN_RE.match(message["token"]):
            return self._refuse(400, INVALID_TOKEN_MESSAGE, "INVALID_ARGUMENT")
        bound = self._token_project.get(target)
        if bound is not None and bound != project:
            return _json(403, FcmAnswer.error(403, "SENDER_ID_MISMATCH", "SenderId mismatch").body)
        sent = FcmRequest(project, target, body, dict(request.headers))
        self.requests.append(sent)
        queue = self._scripts.get(target)
        if queue:
            answer = queue.popleft()
        elif target in self._unregistered:
            answer = FcmAnswer.error(404, "UNREGISTERED", "Requested entity was not found.")
        else:
            answer = FcmAnswer()
        if answer.stall:
            await self._stopping.wait()
            return None
        if body.get("validate_only"):
            answer = FcmAnswer()
        if answer.status == 200 and self.on_send is not None:
            self.on_send(sent)
        payload = answer.body if answer.body is not None else {
            "name": f"projects/{project}/messages/0:{next(self._seq)}%fake"}
        headers = [("retry-after", answer.retry_after)] if answer.retry_after else []
        return _json(answer.status, payload, headers)

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
            if "collapse_key" in android and not isinstance(android["collapse_key"], str):
                return "message.android.collapse_key", "Invalid value at 'message.android.collapse_key' (TYPE_STRING)"
            for flag in ("direct_boot_ok", "bandwidth_constrained_ok", "restricted_satellite_ok"):
                if flag in android and not isinstance(android[flag], bool):
                    return f"message.android.{flag}", f"Invalid value at 'message.android.{flag}' (TYPE_BOOL)"
            note = android.get("notification")
            if note is not None:
                problem = _fields_of(note, "message.android.notification", ANDROID_NOTIFICATION_FIELDS)
                if problem:
                    return problem
        if "notification" in message:
            problem = _fields_of(message["notification"], "message.notification", NOTIFICATION_FIELDS)
            if problem:
                return problem
            for name, value in message["notification"].items():
                if not isinstance(value, str):
                    return (f"message.notification.{name}",
                            f"Invalid value at 'message.notification.{name}' (TYPE_STRING), {value}")
        if "apns" in message:
            apns = message["apns"]
            problem = _fields_of(apns, "message.apns", APNS_FIELDS) or _string_map(apns, "headers", "message.apns")
            if problem:
                return problem
            if "payload" in apns and not isinstance(apns["payload"], dict):
                return "message.apns.payload", ("Invalid value at 'message.apns.payload' "
                                                "(type.googleapis.com/google.protobuf.Struct)")
            priority = apns.get("headers", {}).get("apns-priority")
            if priority is not None and priority not in ("5", "10", "1"):
                return "message.apns.headers", f"Invalid apns-priority: {priority!r}"
        if "webpush" in message:
            webpush = message["webpush"]
            problem = (_fields_of(webpush, "message.webpush", WEBPUSH_FIELDS)
                       or _string_map(webpush, "headers", "message.webpush")
                       or _string_map(webpush, "data", "message.webpush"))
            if problem:
                return problem
            if "notification" in webpush and not isinstance(webpush["notification"], dict):
                return "message.webpush.notification", "Invalid value at 'message.webpush.notification'"
        return None


def _fields_of(block: Any, where: str, allowed: set[str]) -> tuple[str, str] | None:
    """A block must be an object of known fields (Google: 'Unknown name ... Cannot find field')."""
    if not isinstance(block, dict):
        return where, f"Invalid value at '{where}'"
    for name in block:
        if name not in allowed:
            return f"{where}.{name}", (f'Invalid JSON payload received. Unknown name "{name}" at '
                                       f"'{where}': Cannot find field.")
    return None


def _string_map(block: dict[str, Any], name: str, where: str) -> tuple[str, str] | None:
    value = block.get(name, {})
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        return f"{where}.{name}", f"Invalid value at '{where}.{name}' (TYPE_STRING)"
    return None
