"""/healthz, /readyz and /metrics over HTTP for systemd, Kubernetes and Prometheus.

A deliberately small HTTP/1.1 server (asyncio streams): nothing here is authenticated, so it
must not be a resource anyone on the network can hold (docs/security.md, "Health server"):

* one request per connection (``Connection: close``): no idle keep-alive connections;
* the request head must arrive whole within ``header_timeout`` (default 5 s) and within 8 KiB,
  else the connection is closed unanswered (a slowloris peer holds a socket for 5 s, no more);
* at most ``max_connections`` (default 64) connections at once; more are closed at once;
* GET and HEAD, plus the POST routes a part adds (``routes``: SIP MESSAGE hand-over from the
  dialplan, docs/reachability.md); a POST body is read only for such a route, with a
  Content-Length of at most ``MAX_BODY_BYTES``, within ``header_timeout``;
* a warning at start when bound to anything but loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ari_push.links import LinkState
from ari_push.metrics import Metrics

log = logging.getLogger("ari_push.health")

MAX_HEAD_BYTES = 8192
MAX_BODY_BYTES = 65536
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 411: "Length Required",
            413: "Content Too Large", 503: "Service Unavailable"}


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
    status: int = 200
    text: str = ""
    content_type: str = "text/plain; charset=utf-8"


RouteHandler = Callable[[HttpRequest], Awaitable[HttpResponse]]


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
                 header_timeout: float = 5.0, max_connections: int = 64) -> None:
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.links = links
        self.metrics = metrics
        self.draining = False
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.open_connections = 0
        self.refused_connections = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        #: more (method, path template, handler) routes, added before start()
        self.routes: list[tuple[str, str, RouteHandler]] = []

    async def start(self) -> None:
        if not is_loopback(self.host):
            log.warning("health and metrics server bound to %s: /readyz and /metrics are not authenticated; "
                        "expose them only to the scraper or through a proxy", self.host or "every address")
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
        added = self._added_route(method, path)
        if added is not None:
            handler, params = added
            headers = _headers(head)
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
            answer = await handler(HttpRequest(method, path, params, headers, body, dict(parse_qsl(query_text))))
            await self._respond(writer, answer.status, answer.text.encode(), answer.content_type, head=False)
            return
        if method not in ("GET", "HEAD"):
            await self._respond(writer, 405, b"GET or HEAD only\n", "text/plain", head=False)
            return
        status, body, ctype = await self._route(path)
        await self._respond(writer, status, body, ctype, head=method == "HEAD")

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
                       head: bool) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}", f"Content-Type: {ctype}",
                 f"Content-Length: {len(body)}", "Connection: close", "Cache-Control: no-store", "", ""]
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
