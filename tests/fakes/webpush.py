"""A strict local Web Push service (RFC 8030) over TLS, checking VAPID (RFC 8292) and, for
subscriptions made with keys, decrypting the RFC 8291 ``aes128gcm`` body with the
subscription's private key, as the user agent would.

Subscriptions live at ``https://localhost:<port>/wp/<id>`` (the name, not 127.0.0.1: webpush
contacts may not name IP literals). ``subscribe(keys=True)`` makes one; ``unsubscribe`` makes its
endpoint answer 410 Gone; an unknown id answers 404. Accepted pushes answer 201 Created with a
``Location``, are kept in ``pushes`` (with the decrypted message) and passed to ``on_push``.
``CHECKS`` lists every rule; ``refusals`` keeps ``(status, why)`` for each refused request.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from multidict import CIMultiDict

from ari_push.push.ece import EceError, b64url, b64url_decode, decrypt, load_public
from tests.fakes.keys import Pki

CHECKS: tuple[tuple[int, str], ...] = (
    (404, "unknown subscription"),
    (410, "subscription expired / unsubscribed"),
    (401, "no Authorization header"),
    (401, "Authorization scheme is not vapid, or t= / k= missing"),
    (401, "k is not an uncompressed P-256 public key"),
    (401, "JWT not ES256 or signature does not verify with k"),
    (401, "aud is not the endpoint origin"),
    (401, "exp missing, past, or more than 24 h ahead"),
    (401, "sub present but not a mailto: or https: URI"),
    (403, "k is not the key the subscription was made for"),
    (400, "TTL header missing or not a non-negative integer"),
    (400, "Urgency not very-low/low/normal/high"),
    (400, "Topic longer than 32 or outside the base64url alphabet"),
    (400, "body without Content-Encoding: aes128gcm"),
    (400, "body on a subscription without keys (nothing could decrypt it)"),
    (400, "body does not decrypt with the subscription's keys"),
    (413, "body over 4096 bytes"),
)
URGENCIES = {"very-low", "low", "normal", "high"}
TOPIC_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


@dataclass
class Subscription:
    id: str
    endpoint: str
    private_key: ec.EllipticCurvePrivateKey | None = field(default=None, repr=False)
    auth: bytes = b""
    server_key: str = ""  # the application server key (VAPID k) it was made for; "" = any

    @property
    def p256dh(self) -> str:
        assert self.private_key is not None
        return b64url(self.private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint))

    @property
    def auth_b64(self) -> str:
        return b64url(self.auth)

    def contact_params(self) -> str:
        """The RFC 8599 contact parameters a phone registers with for this subscription."""
        params = f"pn-provider=webpush;pn-prid={self.endpoint}"
        if self.private_key is not None:
            params += f";pn-p256dh={self.p256dh};pn-auth={self.auth_b64}"
        return params


@dataclass
class WebPushAnswer:
    status: int = 201
    retry_after: str | None = None
    stall: bool = False


@dataclass
class WebPush:
    subscription: str
    headers: CIMultiDict[str]  # case-insensitive, as HTTP names are
    body: bytes
    message: dict[str, Any] | None  # decrypted JSON; None for an empty push


@dataclass
class FakeWebPush:
    pki: Pki
    clock: Callable[[], float] = time.time
    pushes: list[WebPush] = field(default_factory=list)
    refusals: list[tuple[int, str]] = field(default_factory=list)
    host: str = "localhost"
    port: int = 0

    def __post_init__(self) -> None:
        self._subs: dict[str, Subscription] = {}
        self._gone: set[str] = set()
        self._scripts: dict[str, deque[WebPushAnswer]] = {}
        self._seq = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.on_push: Callable[[WebPush], None] | None = None

    @property
    def origin(self) -> str:
        return f"https://{self.host}:{self.port}"

    async def start(self, port: int = 0) -> FakeWebPush:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.pki.server_cert, self.pki.server_key)
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/wp/{sub}", self._push)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=ctx).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def subscribe(self, keys: bool = True, server_key: str = "") -> Subscription:
        sub_id = f"s{next(self._seq):04d}" + "x" * 24
        sub = Subscription(sub_id, f"{self.origin}/wp/{sub_id}", server_key=server_key)
        if keys:
            sub.private_key = ec.generate_private_key(ec.SECP256R1())
            sub.auth = os.urandom(16)
        self._subs[sub_id] = sub
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._gone.add(sub.id)

    def script(self, sub: Subscription, *answers: WebPushAnswer) -> None:
        self._scripts.setdefault(sub.id, deque()).extend(answers)

    def _refuse(self, status: int, why: str) -> web.Response:
        self.refusals.append((status, why))
        return web.json_response({"code": status, "error": HTTPStatus(status).phrase, "message": why},
                                 status=status)

    def _check_vapid(self, header: str, sub: Subscription) -> tuple[int, str] | None:
        if not header:
            return 401, "no Authorization header"
        scheme, _, rest = header.partition(" ")
        params = dict(p.strip().partition("=")[::2] for p in rest.split(","))
        if scheme.lower() != "vapid" or not params.get("t") or not params.get("k"):
            return 401, "Authorization scheme is not vapid, or t= / k= missing"
        try:
            public = load_public(b64url_decode(params["k"]))
        except EceError:
            return 401, "k is not an uncompressed P-256 public key"
        try:
            claims = jwt.decode(params["t"], public, algorithms=["ES256"],
                                options={"verify_aud": False, "verify_exp": False, "require": []})
        except jwt.PyJWTError:
            return 401, "JWT not ES256 or signature does not verify with k"
        if claims.get("aud") != self.origin:
            return 401, "aud is not the endpoint origin"
        exp, now = claims.get("exp"), self.clock()
        if not isinstance(exp, int) or exp <= now or exp > now + 86400 + 60:
            return 401, "exp missing, past, or more than 24 h ahead"
        sub_claim = claims.get("sub")
        if sub_claim is not None and not str(sub_claim).startswith(("mailto:", "https://")):
            return 401, "sub present but not a mailto: or https: URI"
        if sub.server_key and params["k"].rstrip("=") != sub.server_key:
            return 403, "k is not the key the subscription was made for"
        return None

    async def _push(self, request: web.Request) -> web.Response:
        sub_id = request.match_info["sub"]
        sub = self._subs.get(sub_id)
        if sub is None:
            return self._refuse(404, "unknown subscription")
        if sub_id in self._gone:
            return self._refuse(410, "subscription expired / unsubscribed")
        problem = self._check_vapid(request.headers.get("Authorization", ""), sub)
        if problem is not None:
            return self._refuse(*problem)
        ttl = request.headers.get("TTL")
        if ttl is None or not ttl.isdigit():
            return self._refuse(400, "TTL header missing or not a non-negative integer")
        if request.headers.get("Urgency", "normal") not in URGENCIES:
            return self._refuse(400, "Urgency not very-low/low/normal/high")
        topic = request.headers.get("Topic")
        if topic is not None and not TOPIC_RE.match(topic):
            return self._refuse(400, "Topic longer than 32 or outside the base64url alphabet")
        body = await request.read()
        if len(body) > 4096:
            return self._refuse(413, "body over 4096 bytes")
        message: dict[str, Any] | None = None
        if body:
            if request.headers.get("Content-Encoding") != "aes128gcm":
                return self._refuse(400, "body without Content-Encoding: aes128gcm")
            if sub.private_key is None:
                return self._refuse(400, "body on a subscription without keys (nothing could decrypt it)")
            try:
                message = json.loads(decrypt(body, sub.private_key, sub.auth))
            except (EceError, ValueError):
                return self._refuse(400, "body does not decrypt with the subscription's keys")
        queue = self._scripts.get(sub_id)
        answer = queue.popleft() if queue else WebPushAnswer()
        if answer.stall:
            await self._stopping.wait()
            return web.Response(status=503)
        if answer.status >= 300:
            headers = {"Retry-After": answer.retry_after} if answer.retry_after else {}
            return web.json_response({"code": answer.status, "message": "scripted"}, status=answer.status,
                                     headers=headers)
        push = WebPush(sub_id, CIMultiDict(request.headers), body, message)
        self.pushes.append(push)
        if self.on_push is not None:
            self.on_push(push)
        return web.Response(status=201, headers={"Location": f"{self.origin}/m/{next(self._seq)}"})
