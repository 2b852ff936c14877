"""Huawei Push Kit, both generations (docs/providers.md, "Huawei Push Kit"):

* ``HmsProvider``: HMS Core (Android phones without Google services), Push Kit v1,
  ``POST {api}/v1/{appId}/messages:send`` with an OAuth 2.0 client-credentials access token,
  cached and refreshed before it expires (and once after Huawei calls it invalid or expired).
  Calls go out as data messages at ``urgency: HIGH`` with ``category: VOIP``.
* ``HmosProvider``: HarmonyOS 5+ (no Android at all), Push Kit v3,
  ``POST {api}/v3/{projectId}/messages:send`` with a service-account JWT (PS256) as the bearer and
  a ``push-type`` header: 10 (in-app call) for calls, 6 (background) for everything else.

Both answer with a result code in the JSON body (``80000000`` success); the mapping is in
``result_for``. Neither raises for an answer or a network error.
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
    preload_http,
    retry_after,
    send_capped,
)
from ari_push.push.oauth import REFRESH_EARLY, AuthFailure, TokenCache, load_key_file, token_answer
from ari_push.settings import HmosProject, HmsApp, SettingsError

log = logging.getLogger(__name__)

SUCCESS = "80000000"
#: Every token in the request is invalid (the app was uninstalled, or the token is foreign).
DEAD_CODES = frozenset({"80300007"})
#: Partial success: the body's ``msg`` lists the illegal tokens; with one token that is ours.
PARTIAL = "80100000"
#: Our access token / JWT was refused or has expired: get a new one and resend once.
AUTH_CODES = frozenset({"80200001", "80200003"})
#: Huawei's side: a system internal error (HTTP 500). Other transient failures (Huawei's OAuth
#: service failing, flow control) come as HTTP 5xx or 429 and are retried by status.
RETRY_CODES = frozenset({"81000001"})
MAX_MESSAGE_BYTES = 4096
HUAWEI_TOKEN_URL = "https://oauth-login.cloud.huawei.com/oauth2/v3/token"
HIGH = frozenset({PushKind.CALL, PushKind.CANCEL, PushKind.ANSWERED_ELSEWHERE})


def result_for(response: httpx.Response, clock: Clock) -> PushResult:
    """Map a Push Kit answer (v1 or v3) to a PushResult."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    code = str(body.get("code", "")) if isinstance(body, dict) else ""
    msg = str(body.get("msg", ""))[:200] if isinstance(body, dict) else ""
    reason = f"{code} {msg}".strip() if code else f"HTTP {status}"
    if code == SUCCESS and status == 200:
        return PushResult(PushOutcome.DELIVERED, str(body.get("requestId", "")) if isinstance(body, dict) else "",
                          status)
    if code in DEAD_CODES and "nopushtyperight" in msg.lower():
        # Not the token: the project lacks the right to this push-type (in-app call, 10).
        return PushResult(PushOutcome.FAILED, f"{code} the project has no right to this push-type "
                          "(apply for it, or set call_push_type = 6)", status)
    if code in DEAD_CODES or (code == PARTIAL and "illegal" in msg.lower()):
        return PushResult(PushOutcome.TOKEN_DEAD, reason, status)
    if code in RETRY_CODES or status == 429 or status >= 500:
        return PushResult(PushOutcome.RETRY, reason, status,
                          retry_after=retry_after(response.headers.get("retry-after"), clock()))
    return PushResult(PushOutcome.FAILED, reason, status)


def _code(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    return str(body.get("code", "")) if isinstance(body, dict) else ""


def _data(message: PushMessage) -> dict[str, str]:
    fields = call_fields(message)
    for key, value in message.extra:
        fields.setdefault(key, value)
    return fields


# ---------------------------------------------------------------- HMS Core (v1, OAuth 2.0)


class HmsProvider:
    """One HMS Core app (``[[hms]]``): serves ``pn-provider=hms`` with ``pn-param`` = its app id."""

    name = "hms"

    def __init__(self, app: HmsApp, *, clock: Clock = time.time) -> None:
        self.app = app
        self._clock = clock
        self._http = LazyClient(http2=False, ca_file=app.ca_file, timeout=app.timeout,
                                limits=httpx.Limits(max_connections=100, max_keepalive_connections=50))
        self.tokens = TokenCache(self._fetch, clock)
        # Huawei's reference names the path segment the OAuth 2.0 client id (for an app, its app id).
        self._send_url = f"{app.api_url.rstrip('/')}/v1/{quote(app.client_id or app.app_id, safe='')}/messages:send"

    def serves(self, binding: Binding) -> bool:
        return binding.push.provider == "hms" and binding.push.param == self.app.app_id

    async def warm(self) -> None:
        preload_http()
        self._http.get()
        try:
            await self.tokens.get()
        except Exception as exc:
            log.warning("HMS app %s: no access token yet (%s); the first push will try again", self.app.app_id, exc)

    async def aclose(self) -> None:
        await self._http.aclose()

    def build_body(self, binding: Binding, message: PushMessage) -> bytes | PushResult:
        data = _data(message)
        text = json.dumps(data, separators=(",", ":"))
        if len(text.encode()) > MAX_MESSAGE_BYTES - 512:
            text = json.dumps(call_fields(message), separators=(",", ":"))
        ttl = max(1, math.floor(message.deadline - self._clock()))
        android: dict[str, Any] = {
            "urgency": "HIGH" if message.kind in HIGH else "NORMAL",
            "ttl": f"{ttl}s",
            "bi_tag": message.call_id[:64],
        }
        if message.kind in HIGH:
            android["category"] = "VOIP"  # high-urgency data messages must name their scenario
        body = json.dumps({"validate_only": False,
                           "message": {"data": text, "android": android, "token": [binding.push.token]}},
                          separators=(",", ":")).encode()
        if len(body) - len(binding.push.token.encode()) > MAX_MESSAGE_BYTES:  # Huawei counts without the token
            return PushResult(PushOutcome.FAILED, f"message exceeds {MAX_MESSAGE_BYTES} bytes")
        return body

    async def send(self, binding: Binding, message: PushMessage) -> PushResult:
        if self._http.closed:
            return closed_result()
        body = self.build_body(binding, message)
        if isinstance(body, PushResult):
            return body
        try:
            token = await self.tokens.get()
            response = await self._post(token, body)
            if _code(response) in AUTH_CODES or response.status_code == 401:
                log.info("hms %s: access token refused, refreshing", self.app.app_id)
                token = await self.tokens.get(stale=token)
                response = await self._post(token, body)
        except AuthFailure as exc:
            return exc.result
        except ResponseTooLarge as exc:
            return PushResult(PushOutcome.FAILED, str(exc))
        except httpx.HTTPError as exc:
            return network_result(exc)
        result = result_for(response, self._clock)
        if result.outcome is not PushOutcome.DELIVERED:
            log.debug("hms %s: %s -> %s %s", self.app.app_id, describe(binding), result.outcome, result.reason)
        return result

    async def _post(self, token: str, body: bytes) -> httpx.Response:
        client = self._http.get()
        return await send_capped(client, client.build_request("POST", self._send_url, content=body, headers={
            "authorization": f"Bearer {token}", "content-type": "application/json;charset=utf-8"}))

    @property
    def token_fetches(self) -> int:
        return self.tokens.fetches

    async def _fetch(self) -> tuple[str, float]:
        started = self._clock()
        client = self._http.get()
        try:
            response = await send_capped(client, client.build_request("POST", self.app.token_url, data={
                "grant_type": "client_credentials", "client_id": self.app.client_id,
                "client_secret": str(self.app.client_secret)}))
        except ResponseTooLarge as exc:
            raise AuthFailure(PushResult(PushOutcome.FAILED, f"oauth token endpoint: {exc}")) from None
        return token_answer(response, started, _oauth_error, log, f"hms {self.app.app_id}")


def _oauth_error(body: dict[str, Any]) -> str:
    return (f"error {body.get('error', '')} sub_error {body.get('sub_error', '')}: "
            f"{str(body.get('error_description', ''))[:120]}")


# ---------------------------------------------------------------- HarmonyOS (v3, service-account JWT)


@dataclass(frozen=True, slots=True)
class HuaweiServiceAccount:
    """The fields of a Huawei service-account key file we use; the key never shows in repr."""

    project_id: str
    key_id: str
    sub_account: str
    token_uri: str
    private_key: RSAPrivateKey = field(repr=False)

    @classmethod
    def parse(cls, text: str, where: str) -> HuaweiServiceAccount:
        data, key = load_key_file(text, where, ("key_id", "private_key", "sub_account"),
                                  "a Huawei service-account key file", " (Huawei signs PS256)")
        return cls(project_id=str(data.get("project_id", "")), key_id=data["key_id"],
                   sub_account=data["sub_account"], token_uri=str(data.get("token_uri") or HUAWEI_TOKEN_URL),
                   private_key=key)


class HmosProvider:
    """One HarmonyOS project (``[[hmos]]``): serves ``pn-provider=hmos`` with ``pn-param`` = its
    project id."""

    name = "hmos"

    def __init__(self, project: HmosProject, *, clock: Clock = time.time) -> None:
        self.project = project
        where = f"hmos[{project.project_id}].service_account"
        self.account = HuaweiServiceAccount.parse(project.service_account, where)
        if self.account.project_id and self.account.project_id != project.project_id:
            raise SettingsError(where, f"belongs to project {self.account.project_id}, not {project.project_id}")
        self._clock = clock
        self._http = LazyClient(http2=False, ca_file=project.ca_file, timeout=project.timeout,
                                limits=httpx.Limits(max_connections=100, max_keepalive_connections=50))
        self._send_url = f"{project.api_url.rstrip('/')}/v3/{quote(project.project_id, safe='')}/messages:send"
        self._jwt = ""
        self._jwt_until = 0.0
        self.jwt_signings = 0

    def serves(self, binding: Binding) -> bool:
        return binding.push.provider == "hmos" and binding.push.param == self.project.project_id

    async def warm(self) -> None:
        preload_http()
        self._http.get()
        self.bearer()

    async def aclose(self) -> None:
        await self._http.aclose()

    def bearer(self, stale: str | None = None) -> str:
        """The service-account JWT, reused until shortly before it expires (no await: concurrent
        pushes share one signature)."""
        now = self._clock()
        if self._jwt and self._jwt != stale and now < self._jwt_until:
            return self._jwt
        iat = int(now)
        exp = iat + int(self.project.jwt_lifetime)
        self._jwt = jwt.encode({"iss": self.account.sub_account, "aud": self.account.token_uri,
                                "iat": iat, "exp": exp},
                               self.account.private_key, algorithm="PS256",
                               headers={"kid": self.account.key_id, "typ": "JWT"})
        self._jwt_until = exp - min(REFRESH_EARLY, self.project.jwt_lifetime / 2)
        self.jwt_signings += 1
        return self._jwt

    def push_type(self, message: PushMessage) -> int:
        return self.project.call_push_type if message.kind is PushKind.CALL else 6

    def build_body(self, binding: Binding, message: PushMessage) -> bytes | PushResult:
        extra = json.dumps(_data(message), separators=(",", ":"))
        if len(extra.encode()) > MAX_MESSAGE_BYTES - 512:
            extra = json.dumps(call_fields(message), separators=(",", ":"))
        ttl = max(1, math.floor(message.deadline - self._clock()))
        body = json.dumps({"payload": {"extraData": extra},
                           "target": {"token": [binding.push.token]},
                           "pushOptions": {"ttl": ttl, "biTag": message.call_id[:64]}},
                          separators=(",", ":")).encode()
        if len(body) - len(binding.push.token.encode()) > MAX_MESSAGE_BYTES:
            return PushResult(PushOutcome.FAILED, f"message exceeds {MAX_MESSAGE_BYTES} bytes")
        return body

    async def send(self, binding: Binding, message: PushMessage) -> PushResult:
        if self._http.closed:
            return closed_result()
        body = self.build_body(binding, message)
        if isinstance(body, PushResult):
            return body
        headers = {"content-type": "application/json", "push-type": str(self.push_type(message))}
        stale: str | None = None
        try:
            for _attempt in range(2):
                headers["authorization"] = f"Bearer {self.bearer(stale)}"
                client = self._http.get()
                response = await send_capped(client, client.build_request("POST", self._send_url, content=body,
                                                                          headers=headers))
                if stale is None and (_code(response) in AUTH_CODES or response.status_code == 401):
                    log.info("hmos %s: JWT refused, signing a new one", self.project.project_id)
                    stale = headers["authorization"].removeprefix("Bearer ")
                    continue
                break
        except ResponseTooLarge as exc:
            return PushResult(PushOutcome.FAILED, str(exc))
        except httpx.HTTPError as exc:
            return network_result(exc)
        result = result_for(response, self._clock)
        if result.outcome is not PushOutcome.DELIVERED:
            log.debug("hmos %s: %s -> %s %s", self.project.project_id, describe(binding), result.outcome,
                      result.reason)
        return result
