"""A tiny HTTP endpoint that records POSTs: a Zoiper-style push URL, or a webhook relay.

Like a vendor's push service it refuses what it was not built for: a method other than
POST (405), another content type than the one configured (415), a body that does not have
the shape of the configured body template (400), and, as a webhook relay with a secret, a
body whose ``X-Ari-Push-Signature`` does not verify (401). Refused requests are kept in
``refusals``, accepted ones in ``requests``.

Answers are scripted per path: a status, a redirect, a huge body (declared or chunked),
a stall (never answers until the fake stops), or a trickle (a byte at a time, forever).
Unscripted paths answer 200 "ok".
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections import deque
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class VendorAnswer:
    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)
    redirect_to: str | None = None
    huge: int = 0  # send this many bytes of body instead
    declare_length: bool = True  # with ``huge``: Content-Length, or chunked without it
    stall: bool = False
    trickle: float = 0.0  # > 0: headers at once, then one body byte every ``trickle`` s, until stopped


@dataclass
class VendorRequest:
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


_PLACEHOLDER = re.compile(r"\{(kind|call_id|caller_number|caller_name|callee|deadline)\}")


def template_pattern(template: str) -> re.Pattern[str]:
    """A body the vendor accepts: the template's literal text, any value in each placeholder
    (JSON-escaped text: no bare quote, backslash or control character)."""
    parts = _PLACEHOLDER.split(template)
    out = []
    for i, part in enumerate(parts):
        out.append(r'(?:[^"\\\x00-\x1f]|\\.)*' if i % 2 else re.escape(part))
    return re.compile("".join(out), re.DOTALL)


class FakeVendor:
    def __init__(self, ssl_context: ssl.SSLContext | None = None, *, content_type: str | None = "application/json",
                 body_template: str | None = None, webhook_secret: str | None = None) -> None:
        self.ssl_context = ssl_context
        self.content_type = content_type
        self.body_template = body_template
        self.webhook_secret = webhook_secret
        self.requests: list[VendorRequest] = []
        self.refusals: list[tuple[int, str]] = []
        self.huge_sent: list[int] = []  # bytes of each huge answer written before the client left
        self.default = VendorAnswer()
        self.host = "127.0.0.1"
        self.port = 0
        self._scripts: dict[str, deque[VendorAnswer]] = {}
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeVendor:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self.ssl_context)
        await site.start()
        self.host, self.port = self._runner.addresses[0][:2]
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeVendor:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def script(self, path: str, *answers: VendorAnswer) -> None:
        self._scripts.setdefault(path, deque()).extend(answers)

    def _refuse(self, status: int, why: str) -> web.Response:
        self.refusals.append((status, why))
        return web.Response(status=status, text=why)

    def _check(self, request: web.Request, body: bytes) -> web.Response | None:
        if request.method != "POST":
            return self._refuse(405, f"method {request.method} not allowed")
        if self.content_type is not None and request.content_type != self.content_type:
            return self._refuse(415, f"content type {request.content_type!r}, expected {self.content_type!r}")
        if request.content_type == "application/json" or request.content_type.endswith("+json"):
            try:
                json.loads(body)
            except ValueError:
                return self._refuse(400, "body is not JSON")
        if self.body_template is not None and not template_pattern(self.body_template).fullmatch(
                body.decode(errors="replace")):
            return self._refuse(400, "body does not match the template")
        if self.webhook_secret is not None:
            from ari_push.push.webhook import SIGNATURE_HEADER, verify

            if not verify(self.webhook_secret, body, request.headers.get(SIGNATURE_HEADER, "")):
                return self._refuse(401, "signature does not verify")
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        refused = self._check(request, body)
        if refused is not None:
            return refused
        self.requests.append(VendorRequest(request.path, request.query_string, dict(request.headers), body))
        queue = self._scripts.get(request.path)
        answer = queue.popleft() if queue else self.default
        if answer.stall:
            await self._stopping.wait()
            return web.Response(status=503)
        if answer.trickle:
            response = web.StreamResponse(status=answer.status, headers=answer.headers)
            response.enable_chunked_encoding()
            await response.prepare(request)
            try:
                while not self._stopping.is_set():
                    await response.write(b"x")
                    await asyncio.sleep(answer.trickle)
            except (ConnectionError, RuntimeError):
                pass  # the client hung up, as it should
            return response
        if answer.redirect_to:
            return web.Response(status=answer.status if 300 <= answer.status < 400 else 302,
                                headers={"Location": answer.redirect_to})
        if answer.huge:
            response = web.StreamResponse(status=answer.status, headers=answer.headers)
            if answer.declare_length:
                response.content_length = answer.huge
            else:
                response.enable_chunked_encoding()
            await response.prepare(request)
            chunk = b"x" * 65536
            sent = 0
            try:
                while sent < answer.huge:
                    part = chunk[: answer.huge - sent]
                    await response.write(part)
                    sent += len(part)
            except (ConnectionError, RuntimeError):
                pass  # the client hung up, as it should
            self.huge_sent.append(sent)
            return response
        return web.Response(status=answer.status, body=answer.body, headers=answer.headers)
