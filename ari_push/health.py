"""/healthz, /readyz and /metrics over HTTP for systemd, Kubernetes and Prometheus.

A deliberately small HTTP/1.1 server (asyncio streams): nothing here is authenticated, so it
must not be a resource anyone on the network can hold (docs/security.md, "Health server"):

* one request per connection (``Connection: close``): no idle keep-alive connections;
* the request head must arrive whole within ``header_timeout`` (default 5 s) and within 8 KiB,
  else the connection is closed unanswered (a slowloris peer holds a socket for 5 s, no more);
* at most ``max_connections`` (default 64) connections at once; more are closed at once;
* GET and HEAD, plus the routes a part adds (``routes``: SIP MESSAGE hand-over from the
  dialplan, docs/reachability.md; the operator's console, ari_push/console/); a POST body is
  read only for such a route, with a Content-Length of at most ``MAX_BODY_BYTES``, within
  ``header_timeout``;
* ``guard`` (the console's access check, console/access.py), when set, answers first for
  /metrics, /console and /api/: /healthz, /readyz and the dialplan's routes stay open;
* one bounded streaming mode, for server-sent events: a route's answer may carry ``stream``;
  at most ``max_streams`` at once (more get 503), each written with the head timeout per
  chunk (a reader that stops reading is dropped), each ended after ``stream_max_seconds``
  (EventSource reconnects by itself), and all of them closed when draining starts or on stop;
* a warning at start when bound to anything but loopback without authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ari_push.links import LinkState
from ari_push.metrics import Metrics

log = logging.getLogger("ari_push.health")

MAX_HEAD_BYTES = 8192
MAX_BODY_BYTES = 65536
_REASONS = {200: "OK", 302: "Found", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 411: "Length Required", 413: "Content Too Large",
            415: "Unsupported Media Type", 502: "Bad Gateway", 503: "Service Unavailable"}
GUARDED_PREFIXES = ("/metrics", "/console", "/api/")


@dataclass(frozen=True)
class HttpRequest:
    """A request handed to an added route: its path parameters and its (bounded) body."""

    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    query: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HttpResponse:
    """``body`` (bytes) wins over ``text``; ``stream`` makes it a server-sent event stream."""

    status: int = 200
    text: str = ""
    content_type: str = "text/plain; charset=utf-8"
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    stream: Callable[[], AsyncIterator[bytes]] | None = None


RouteHandler = Callable[[HttpRequest], Awaitable[HttpResponse]]
Guard = Callable[[HttpRequest], HttpResponse | None]


def _pattern(template: str) -> re.Pattern[str]:
    """``/messages/{aor}`` -> a regex with a named group per ``{name}`` (one path segment)."""
    out = ""
    for piece in re.split(r"(\{[a-z_]+\})", template):
        out += f"(?P<{piece[1:-1]}>[^/]+)" if piece.startswith("{") else re.escape(piece)
    return re.compile(f"^{out}$")


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HealthServer:
    def __init__(self, listen: str, links: Sequence[LinkState], metrics: Metrics, *,
                 header_timeout: float = 5.0, max_connections: int = 64, max_streams: int = 8,
                 stream_max_seconds: float = 600.0) -> None:
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.links = links
        self.metrics = metrics
        self._draining = False
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.max_streams = max_streams
        self.stream_max_seconds = stream_max_seconds
        self.open_connections = 0
        self.refused_connections = 0
        self.refused_streams = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._streams: set[asyncio.Task[None]] = set()
        #: more (method, path template, handler) routes, added before start()
        self.routes: list[tuple[str, str, RouteHandler]] = []
        #: the access check for /metrics, /console and /api/ (None: open, as loopback-only is)
        self.guard: Guard | None = None
        self.authenticated = False  # set with guard when a secret is configured: only changes the warning

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = value
        if value:
            self._close_streams()

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def _close_streams(self) -> None:
        for task in list(self._streams):
            task.cancel()

    async def start(self) -> None:
        if not is_loopback(self.host) and not self.authenticated:
            log.warning("health and metrics server bound to %s: /readyz, /metrics and the console are not "
                        "authenticated; set [http] auth_token_file or basic_auth_file, or expose them only to the "
                        "scraper or through a proxy", self.host or "every address")
        self._server = await asyncio.start_server(self._accept, self.host or None, self.port,
                                                  limit=MAX_HEAD_BYTES + 2)
        if self.port == 0 and self._server.sockets:
            self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("health and metrics on http://%s:%d/", self.host, self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            for task in list(self._handlers):
                task.cancel()
            with contextlib.suppress(Exception):
                await server.wait_closed()

    def status(self) -> dict[str, object]:
        return {
            "ready": all(link.up for link in self.links) and not self.draining,
            "draining": self.draining,
            "links": {link.name: {"state": link.state.value, "reason": link.reason} for link in self.links},
        }

    # ---------------------------------------------------------------- connections

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._connection(reader, writer)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._server is not None or task is None:
                raise
            task.uncancel()  # stop() ends its own handlers: done, not an error for asyncio to report

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open_connections >= self.max_connections:
            self.refused_connections += 1
            writer.close()
            return
        self.open_connections += 1
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self.open_connections -= 1
            if task is not None:
                self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.header_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            return  # slow or silent peer: closed unanswered
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self._respond(writer, 400, b"bad request\n", "text/plain", head=False)
            return
        method, target, _ = parts
        path, _, query_text = target.partition("?")
        headers = _headers(head)
        request = HttpRequest(method, path, {}, headers, b"", dict(parse_qsl(query_text)))
        if self.guard is not None and path.startswith(GUARDED_PREFIXES):
            refused = self.guard(request)
            if refused is not None:
                await self._answer(writer, refused, head=False)
                return
        added = self._added_route(method, path)
        if added is not None:
            handler, params = added
            body = b""
            if method not in ("GET", "HEAD"):
                length = headers.get("content-length", "")
                if not length.isdigit():
                    await self._respond(writer, 411, b"Content-Length required\n", "text/plain", head=False)
                    return
                if int(length) > MAX_BODY_BYTES:
                    await self._respond(writer, 413, b"too large\n", "text/plain", head=False)
                    return
                async with asyncio.timeout(self.header_timeout):
                    body = await reader.readexactly(int(length))
            answer = await handler(HttpRequest(method, path, params, headers, body, request.query))
            if answer.stream is not None:
                await self._stream(writer, answer)
                return
            await self._answer(writer, answer, head=method == "HEAD")
            return
        if method not in ("GET", "HEAD"):
            await self._respond(writer, 405, b"GET or HEAD only\n", "text/plain", head=False)
            return
        status, body, ctype = await self._route(path)
        await self._respond(writer, status, body, ctype, head=method == "HEAD")

    async def _answer(self, writer: asyncio.StreamWriter, answer: HttpResponse, *, head: bool) -> None:
        body = answer.body or answer.text.encode()
        await self._respond(writer, answer.status, body, answer.content_type, head=head, extra=answer.headers)

    async def _stream(self, writer: asyncio.StreamWriter, answer: HttpResponse) -> None:
        """Server-sent events: the head, then each chunk as the route's iterator yields it."""
        assert answer.stream is not None
        task = asyncio.current_task()
        if len(self._streams) >= self.max_streams or self._draining or task is None:
            self.refused_streams += 1
            await self._respond(writer, 503, b"too many event streams\n", "text/plain", head=False)
            return
        self._streams.add(task)
        try:
            lines = ["HTTP/1.1 200 OK", f"Content-Type: {answer.content_type}", "Connection: close",
                     "Cache-Control: no-store", "X-Accel-Buffering: no", *(f"{k}: {v}" for k, v in answer.headers),
                     "", ""]
            writer.write("\r\n".join(lines).encode("latin-1"))
            chunks = answer.stream()
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.stream_max_seconds):
                        async for chunk in chunks:
                            writer.write(chunk)
                            async with asyncio.timeout(self.header_timeout):
                                await writer.drain()
            finally:
                close = getattr(chunks, "aclose", None)  # the route's generator cleans up now, not at GC
                if close is not None:
                    with contextlib.suppress(Exception):
                        await close()
        except asyncio.CancelledError:
            task.uncancel()  # draining or stop: this stream ends, the connection closes in _accept
        finally:
            self._streams.discard(task)

    def _added_route(self, method: str, path: str) -> tuple[RouteHandler, dict[str, str]] | None:
        for route_method, template, handler in self.routes:
            match = _pattern(template).match(path)
            if match is not None and route_method == method:
                return handler, match.groupdict()
        return None

    async def _route(self, path: str) -> tuple[int, bytes, str]:
        if path == "/healthz":
            return 200, json.dumps({"status": "ok"}).encode(), "application/json"
        if path == "/readyz":
            status = self.status()
            return (200 if status["ready"] else 503), json.dumps(status).encode(), "application/json"
        if path == "/metrics":
            for link in self.links:
                self.metrics.link_up.labels(link.name).set(1 if link.up else 0)
            body = await asyncio.to_thread(generate_latest, self.metrics.registry)
            return 200, body, CONTENT_TYPE_LATEST
        return 404, b"not found\n", "text/plain"

    async def _respond(self, writer: asyncio.StreamWriter, status: int, body: bytes, ctype: str, *,
                       head: bool, extra: Sequence[tuple[str, str]] = ()) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}", f"Content-Type: {ctype}",
                 f"Content-Length: {len(body)}", "Connection: close", "Cache-Control: no-store",
                 *(f"{k}: {v}" for k, v in extra), "", ""]
        writer.write("\r\n".join(lines).encode("latin-1") + (b"" if head else body))
        async with asyncio.timeout(self.header_timeout):
            await writer.drain()


def _headers(head: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            out[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
    return out
