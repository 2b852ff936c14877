"""A strict local Huawei Push Kit over TLS: the OAuth 2.0 token endpoint, the HMS Core v1 send
API and the HarmonyOS v3 send API, refusing what Huawei refuses with Huawei's result codes.

* ``POST /oauth2/v3/token`` (form, ``grant_type=client_credentials``, ``client_id``,
  ``client_secret``) -> ``{"access_token", "expires_in", "token_type": "Bearer"}`` or Huawei's
  OAuth error ``{"error": 1101|1102, "sub_error": ..., "error_description": ...}``.
* ``POST /v1/{clientId}/messages:send`` (the app's OAuth client id, usually its app id) with
  ``Authorization: Bearer <access token>``.
* ``POST /v3/{projectId}/messages:send`` with ``Authorization: Bearer <service-account JWT>``
  (PS256, ``kid`` = key_id, ``iss`` = sub_account, ``aud`` = the token URI, at most 3600 s) and
  a ``push-type`` header.

Answers carry ``{"code", "msg", "requestId"}``; ``80000000`` is success. Every refusal is kept
in ``refusals`` as ``(code, why)``; ``CHECKS`` lists each rule the fake enforces.

Tokens starting with ``dead`` answer 80300007 (all tokens invalid) unless scripted otherwise.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from multidict import CIMultiDict

from tests.fakes.keys import Pki, private_pem, rsa_key

HUAWEI_TOKEN_URI = "https://oauth-login.cloud.huawei.com/oauth2/v3/token"
TTL_RE = re.compile(r"^\d+(\.\d{1,9})?[sS]?$")
MAX_TTL = 15 * 86400
PUSH_TYPES = {"0", "1", "2", "6", "7", "10", "11"}
#: The rules, for the report: (API, what is refused, result code).
CHECKS: tuple[tuple[str, str, str], ...] = (
    ("oauth", "not a form body", "1102"),
    ("oauth", "grant_type is not client_credentials", "1102"),
    ("oauth", "unknown client_id or wrong client_secret", "1101"),
    ("v1", "no or unknown bearer token", "80200001"),
    ("v1", "expired access token", "80200003"),
    ("v1", "token issued to another client (app) id than the URL's", "80300002"),
    ("v1", "Content-Type is not application/json", "80100003"),
    ("v1", "body is not a JSON object with a message", "80100003"),
    ("v1", "message.token missing or empty", "80100001"),
    ("v1", "more than 1000 tokens", "80300010"),
    ("v1", "message.data is not a string", "80100003"),
    ("v1", "android.urgency not HIGH/NORMAL", "80100001"),
    ("v1", "android.category not VOIP/PLAY_VOICE on a data message", "80100001"),
    ("v1", "android.ttl malformed or over 15 days", "80100001"),
    ("v1", "android.bi_tag not a string", "80100001"),
    ("v1", "message over 4096 bytes (tokens excluded)", "80300008"),
    ("v1", "token malformed or unknown (all tokens invalid)", "80300007"),
    ("v3", "no bearer, bad JWT, unknown kid, not PS256, wrong iss/aud", "80200001"),
    ("v3", "JWT expired or valid for more than 3600 s", "80200003"),
    ("v3", "service account of another project", "80300002"),
    ("v3", "push-type header missing or unknown", "80100001"),
    ("v3", "body without payload/target.token", "80100003"),
    ("v3", "payload.extraData not a string", "80100003"),
    ("v3", "pushOptions.ttl not an integer in 0..15 days", "80100001"),
    ("v3", "push-type 10 without the in-app call right", "80300007 noPushTypeRight"),
    ("v3", "message over 4096 bytes (token excluded)", "80300008"),
    ("v3", "token malformed or unknown (all tokens invalid)", "80300007"),
)
TOKEN_RE = re.compile(r"^[A-Za-z0-9_.+/=-]{32,256}$")
HTTP_OF = {"80000000": 200, "80100000": 200, "80100001": 400, "80100003": 400, "80200001": 401,
           "80200003": 401, "80300002": 403, "80300007": 400, "80300008": 400, "80300010": 400,
           "81000001": 500, "80600003": 500}


@dataclass
class HuaweiAnswer:
    """A canned answer for one send: a result code (HTTP status follows Huawei's table) or a
    raw HTTP status (``status``), ``retry_after``, or ``stall`` (never answers)."""

    code: str = "80000000"
    msg: str = "Success"
    status: int | None = None
    retry_after: str | None = None
    stall: bool = False


@dataclass
class HuaweiRequest:
    api: str  # "v1" or "v3"
    target: str  # app id or project id
    token: str
    headers: CIMultiDict[str]  # case-insensitive, as HTTP names are
    body: dict[str, Any]

    @property
    def data(self) -> dict[str, Any]:
        """The call fields we sent: v1 ``message.data`` or v3 ``payload.extraData``, decoded."""
        text = self.body["message"]["data"] if self.api == "v1" else self.body["payload"]["extraData"]
        return dict(json.loads(text))


@dataclass
class HarmonyAccount:
    project_id: str
    key_id: str
    sub_account: str
    key: rsa.RSAPrivateKey
    call_right: bool = True  # may send push-type 10 (in-app call)

    def json(self) -> str:
        """The service-account key file, as AppGallery Connect's API Console hands it out."""
        return json.dumps({"project_id": self.project_id, "key_id": self.key_id,
                           "private_key": private_pem(self.key), "sub_account": self.sub_account,
                           "auth_uri": "https://oauth-login.cloud.huawei.com/oauth2/v3/authorize",
                           "token_uri": HUAWEI_TOKEN_URI,
                           "auth_provider_cert_uri": "https://oauth-login.cloud.huawei.com/oauth2/v3/certs",
                           "client_cert_uri": "https://oauth-login.cloud.huawei.com/oauth2/v3/x509?client_id="})


@dataclass
class FakeHuawei:
    pki: Pki
    clock: Callable[[], float] = time.time
    token_lifetime: int = 3600
    requests: list[HuaweiRequest] = field(default_factory=list)
    refusals: list[tuple[str, str]] = field(default_factory=list)
    token_issuances: int = 0
    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        self._clients: dict[str, tuple[str, str]] = {}  # client_id -> (secret, app_id)
        self._issued: dict[str, tuple[str, float]] = {}  # access token -> (client_id, expires)
        self._accounts: dict[str, HarmonyAccount] = {}  # key_id -> account
        self._scripts: dict[str, deque[HuaweiAnswer]] = {}
        self._seq = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.on_request: Callable[[HuaweiRequest], None] | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.url}/oauth2/v3/token"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeHuawei:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.pki.server_cert, self.pki.server_key)
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/oauth2/v3/token", self._token)
        app.router.add_post("/v1/{target}/messages:send", self._v1)
        app.router.add_post("/v3/{target}/messages:send", self._v3)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, ssl_context=ctx).start()
        self.host, self.port = self._runner.addresses[0][:2]
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------ control

    def add_app(self, app_id: str, client_secret: str, client_id: str | None = None) -> None:
        """An HMS Core app whose OAuth client may send to ``app_id``."""
        self._clients[client_id or app_id] = (client_secret, app_id)

    def add_project(self, project_id: str, *, call_right: bool = True,
                    key: rsa.RSAPrivateKey | None = None) -> HarmonyAccount:
        """A HarmonyOS project and its service account; ``.json()`` is the key file."""
        n = next(self._seq)
        account = HarmonyAccount(project_id, f"kid{n:04d}{project_id[-4:]}", f"10{n:06d}{project_id[-6:]}",
                                 key or rsa_key(), call_right)
        self._accounts[account.key_id] = account
        return account

    def script(self, token: str, *answers: HuaweiAnswer) -> None:
        self._scripts.setdefault(token, deque()).extend(answers)

    def revoke_access_tokens(self) -> None:
        self._issued.clear()

    # ------------------------------------------------------------ helpers

    def _refuse(self, code: str, why: str, extra_msg: str | None = None) -> web.Response:
        self.refusals.append((code, why))
        body = {"code": code, "msg": extra_msg or why, "requestId": f"{next(self._seq):020d}"}
        return web.json_response(body, status=HTTP_OF.get(code, 400))

    def _oauth_error(self, error: int, sub: int, why: str, status: int = 400) -> web.Response:
        self.refusals.append((str(error), why))
        return web.json_response({"error": error, "sub_error": sub, "error_description": why}, status=status)

    async def _answer(self, api: str, target: str, token: str, request: web.Request,
                      body: dict[str, Any]) -> web.Response:
        record = HuaweiRequest(api, target, token, CIMultiDict(request.headers), body)
        queue = self._scripts.get(token)
        if queue:
            answer = queue.popleft()
        elif not TOKEN_RE.match(token) or token.startswith("dead"):
            answer = self._dead_answer(api, token)
        else:
            answer = HuaweiAnswer()
        if answer.code in ("80000000", "80100000"):
            self.requests.append(record)  # accepted: Huawei delivers it
            if self.on_request is not None:
                self.on_request(record)
        if answer.stall:
            await self._stopping.wait()
            return web.Response(status=503)
        headers = {"Retry-After": answer.retry_after} if answer.retry_after else {}
        status = answer.status or HTTP_OF.get(answer.code, 400)
        return web.json_response({"code": answer.code, "msg": answer.msg, "requestId": f"{next(self._seq):020d}"},
                                 status=status, headers=headers)

    def _dead_answer(self, api: str, token: str) -> HuaweiAnswer:
        if api == "v1":
            return HuaweiAnswer("80300007", "All the tokens are invalid")
        return HuaweiAnswer("80300007", json.dumps({"failure": 1, "illegalTokens": {"invalidTokens": [token]}}))

    # ------------------------------------------------------------ OAuth 2.0

    async def _token(self, request: web.Request) -> web.Response:
        if request.content_type != "application/x-www-form-urlencoded":
            return self._oauth_error(1102, 20001, "invalid request: form body expected")
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return self._oauth_error(1102, 20003, "unsupported grant type")
        client = self._clients.get(str(form.get("client_id", "")))
        if client is None or form.get("client_secret") != client[0]:
            return self._oauth_error(1101, 20152, "invalid client", status=401)
        client_id = str(form.get("client_id"))
        token = f"DQEDA{next(self._seq):06d}+fake/{client_id}="
        self._issued[token] = (client_id, self.clock() + self.token_lifetime)
        self.token_issuances += 1
        return web.json_response({"access_token": token, "expires_in": self.token_lifetime,
                                  "token_type": "Bearer"})

    # ------------------------------------------------------------ v1 (HMS Core)

    async def _v1(self, request: web.Request) -> web.Response:
        client_id = request.match_info["target"]  # Huawei's reference: the OAuth 2.0 client id
        auth = request.headers.get("Authorization", "")
        issued = self._issued.get(auth[7:]) if auth.startswith("Bearer ") else None
        if issued is None:
            return self._refuse("80200001", "Oauth authentication error")
        if issued[1] <= self.clock():
            return self._refuse("80200003", "Oauth Token expired")
        if issued[0] != client_id:
            return self._refuse("80300002", "APP is forbidden to send")
        if request.content_type != "application/json":
            return self._refuse("80100003", "Message structure error (Content-Type)")
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return self._refuse("80100003", "Message structure error")
        if not isinstance(body, dict) or not isinstance(body.get("message"), dict):
            return self._refuse("80100003", "Message structure error")
        message = body["message"]
        tokens = message.get("token")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            return self._refuse("80100001", "Parameters check error: token")
        if len(tokens) > 1000:
            return self._refuse("80300010", "Tokens exceed the default value")
        if "data" in message and not isinstance(message["data"], str):
            return self._refuse("80100003", "Message structure error: data must be a string")
        android = message.get("android", {})
        if not isinstance(android, dict):
            return self._refuse("80100003", "Message structure error: android")
        if android.get("urgency", "NORMAL") not in ("HIGH", "NORMAL"):
            return self._refuse("80100001", "Parameters check error: urgency")
        if "category" in android and "notification" not in message and android["category"] not in ("VOIP",
                                                                                                   "PLAY_VOICE"):
            return self._refuse("80100001", "Parameters check error: category")
        ttl = android.get("ttl")
        if ttl is not None and (not isinstance(ttl, str) or not TTL_RE.match(ttl)
                                or float(ttl.rstrip("sS")) > MAX_TTL):
            return self._refuse("80100001", "Parameters check error: ttl")
        if "bi_tag" in android and not isinstance(android["bi_tag"], str):
            return self._refuse("80100001", "Parameters check error: bi_tag")
        if len(raw) - sum(len(t.encode()) for t in tokens) > 4096:  # Huawei counts without the tokens
            return self._refuse("80300008", "The message body size exceeds the default value set by the system")
        return await self._answer("v1", client_id, tokens[0], request, body)

    # ------------------------------------------------------------ v3 (HarmonyOS)

    def _account(self, auth: str) -> tuple[HarmonyAccount | None, str, str]:
        """(account, code, why) from the bearer JWT."""
        if not auth.startswith("Bearer "):
            return None, "80200001", "no bearer JWT"
        token = auth[7:]
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return None, "80200001", "malformed JWT"
        account = self._accounts.get(str(header.get("kid")))
        if account is None or header.get("alg") != "PS256":
            return None, "80200001", "unknown kid or not PS256"
        try:
            claims = jwt.decode(token, account.key.public_key(), algorithms=["PS256"], audience=HUAWEI_TOKEN_URI,
                                options={"require": ["iss", "aud", "iat", "exp"], "verify_exp": False,
                                         "verify_iat": False})
        except jwt.PyJWTError as exc:
            return None, "80200001", f"JWT refused: {type(exc).__name__}"
        if claims["iss"] != account.sub_account:
            return None, "80200001", "iss is not the sub_account"
        iat, exp, now = claims["iat"], claims["exp"], self.clock()
        if not isinstance(iat, int) or not isinstance(exp, int) or exp - iat > 3600 or exp <= now or iat > now + 60:
            return None, "80200003", "JWT expired or valid for more than 3600 s"
        return account, "", ""

    async def _v3(self, request: web.Request) -> web.Response:
        project_id = request.match_info["target"]
        account, code, why = self._account(request.headers.get("Authorization", ""))
        if account is None:
            return self._refuse(code, why)
        if account.project_id != project_id:
            return self._refuse("80300002", "the service account belongs to another project")
        push_type = request.headers.get("push-type")
        if push_type not in PUSH_TYPES:
            return self._refuse("80100001", "Parameters check error: push-type")
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return self._refuse("80100003", "Message structure error")
        if not isinstance(body, dict) or not isinstance(body.get("payload"), dict) \
                or not isinstance(body.get("target"), dict):
            return self._refuse("80100003", "Message structure error: payload/target")
        tokens = body["target"].get("token")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            return self._refuse("80100003", "Message structure error: target.token")
        if push_type in ("6", "10") and not isinstance(body["payload"].get("extraData"), str):
            return self._refuse("80100003", "Message structure error: extraData must be a string")
        ttl = body.get("pushOptions", {}).get("ttl")
        if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 <= ttl <= MAX_TTL):
            return self._refuse("80100001", "Parameters check error: ttl")
        if push_type == "10" and not account.call_right:
            return self._refuse("80300007", "no in-app call right",
                                json.dumps({"failure": 1, "illegalTokens": {"noPushTypeRight": tokens}}))
        if len(raw) - sum(len(t.encode()) for t in tokens) > 4096:
            return self._refuse("80300008", "message body exceeds 4096 bytes")
        return await self._answer("v3", project_id, tokens[0], request, body)
