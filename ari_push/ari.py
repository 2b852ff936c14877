"""The ARI link: REST calls with timeouts and the Stasis event websocket with a heartbeat.

A thin client of our own on aiohttp (see docs/architecture.md for why). Every REST call
the daemon makes is declared in OPERATIONS, so a contract test checks each one against
the running Asterisk's own /ari/api-docs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from ari_push.backoff import Backoff
from ari_push.links import LinkState
from ari_push.settings import AriSettings

log = logging.getLogger("ari_push.ari")

EventHandler = Callable[[dict[str, Any]], None]
ConnectHandler = Callable[[], Awaitable[None]]

# name -> (method, path template, query parameter names, body parameter names). A body parameter
# written "*name" is the whole JSON body (ARI's eventFilter takes its filter object as the body).
OPERATIONS: dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...]]] = {
    "asterisk_info": ("GET", "/asterisk/info", (), ()),
    "list_channels": ("GET", "/channels", (), ()),
    "get_channel": ("GET", "/channels/{channelId}", (), ()),
    "originate": (
        "POST", "/channels/{channelId}", (),
        ("endpoint", "app", "appArgs", "callerId", "timeout", "variables", "originator"),
    ),
    "ring": ("POST", "/channels/{channelId}/ring", (), ()),
    "answer": ("POST", "/channels/{channelId}/answer", (), ()),
    "hangup": ("DELETE", "/channels/{channelId}", ("reason",), ()),
    "set_variable": ("POST", "/channels/{channelId}/variable", ("variable", "value"), ()),
    "continue": ("POST", "/channels/{channelId}/continue", ("context", "extension", "priority"), ()),
    "moh_start": ("POST", "/channels/{channelId}/moh", ("mohClass",), ()),
    "moh_stop": ("DELETE", "/channels/{channelId}/moh", (), ()),
    "progress": ("POST", "/channels/{channelId}/progress", (), ()),
    "create_bridge": ("POST", "/bridges/{bridgeId}", ("type", "name"), ()),
    "add_channel": ("POST", "/bridges/{bridgeId}/addChannel", ("channel",), ()),
    "destroy_bridge": ("DELETE", "/bridges/{bridgeId}", (), ()),
    "list_bridges": ("GET", "/bridges", (), ()),
    "get_application": ("GET", "/applications/{applicationName}", (), ()),
    "list_applications": ("GET", "/applications", (), ()),
    "get_config": ("GET", "/asterisk/config/dynamic/{configClass}/{objectType}/{id}", (), ()),
    "delete_config": ("DELETE", "/asterisk/config/dynamic/{configClass}/{objectType}/{id}", (), ()),
    "put_config": ("PUT", "/asterisk/config/dynamic/{configClass}/{objectType}/{id}", (), ("fields",)),
    "claim": ("POST", "/events/claim", ("channelId", "application"), ()),
    "move": ("POST", "/channels/{channelId}/move", ("app", "appArgs"), ()),
    "subscribe": ("POST", "/applications/{applicationName}/subscription", ("eventSource",), ()),
    "filter_events": ("PUT", "/applications/{applicationName}/eventFilter", (), ("*filter",)),
    "send_message": ("PUT", "/endpoints/sendMessage", ("to", "from", "body"), ()),
}


class AriError(RuntimeError):
    """A REST call failed. ``status`` is the HTTP status (0: no answer / link down)."""

    def __init__(self, operation: str, status: int, message: str) -> None:
        super().__init__(f"ARI {operation}: {status or 'no answer'} {message}".rstrip())
        self.operation = operation
        self.status = status
        self.message = message


class AriClient:
    def __init__(
        self,
        settings: AriSettings,
        on_event: EventHandler,
        on_connect: ConnectHandler | None = None,
        backoff: Backoff | None = None,
        event_types: tuple[str, ...] = (),
    ) -> None:
        self.event_types = event_types  # the only event types the app is sent (empty: all)
        self.gate: tuple[asyncio.Event, asyncio.Event] | None = None  # (held, lost): lease mode
        self.settings = settings
        self.on_event = on_event
        self.on_connect = on_connect
        self.backoff = backoff or Backoff(base=0.5, cap=15.0)
        self.link = LinkState("ari")
        self.base = settings.url.rstrip("/") + "/ari"
        token = base64.b64encode(f"{settings.username}:{settings.password}".encode()).decode()
        self._headers = {"Authorization": f"Basic {token}"}
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._closed:
            # A late call (a call task finishing after the daemon closed its links) must not
            # open a new session that nobody closes: it fails like a link that is down.
            raise AriError("session", 0, "client closed")
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout),
            )
        return self._session

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()

    # ---------------------------------------------------------------- REST

    async def call(
        self,
        operation: str,
        path_params: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> Any:
        """Run one declared operation. Returns the decoded JSON (or None for 204)."""
        method, template, query_names, body_names = OPERATIONS[operation]
        path = template.format(**{k: quote(v, safe="") for k, v in (path_params or {}).items()})
        for key in query or {}:
            if key not in query_names:
                raise ValueError(f"{operation}: {key} is not a declared query parameter")
        for key in body or {}:
            if key not in body_names and f"*{key}" not in body_names:
                raise ValueError(f"{operation}: {key} is not a declared body parameter")
        payload: Any = dict(body) if body else None
        if body and body_names[0].startswith("*"):
            payload = body[body_names[0][1:]]
        try:
            async with self.session.request(method, self.base + path, params=dict(query or {}), json=payload) as resp:
                text = await resp.text()
                if resp.status >= 300:
                    message = text
                    with contextlib.suppress(ValueError, AttributeError):
                        message = json.loads(text).get("message", text)
                    raise AriError(operation, resp.status, message[:200])
                return json.loads(text) if text else None
        except TimeoutError:
            raise AriError(operation, 0, f"timed out after {self.settings.request_timeout}s") from None
        except aiohttp.ClientError as exc:
            raise AriError(operation, 0, str(exc) or type(exc).__name__) from None

    async def filter_events(self) -> None:
        """Ask Asterisk to send the app only ``event_types`` (PUT .../eventFilter), on every
        connect: fewer frames to read and decode per call. Refused (an Asterisk without the
        filter, ARI permissions): logged, and every event keeps coming, ignored as before."""
        if not self.event_types:
            return
        try:
            wanted = {"allowed": [{"type": t} for t in self.event_types], "disallowed": []}
            await self.call("filter_events", {"applicationName": self.settings.app}, body={"filter": wanted})
        except AriError as exc:
            log.warning("ARI: could not set the application's event filter (%s); all its events are read", exc)

    # ---------------------------------------------------------------- events

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the event websocket up until ``stop`` is set (in lease mode: while the lease is held)."""
        while not stop.is_set():
            if self.gate is not None and not self.gate[0].is_set():
                self.link.set_down("standby: another daemon holds the lease")
                await _first(stop.wait(), self.gate[0].wait())
                continue
            try:
                await self._session_loop(stop)
                self.backoff.reset()
            except (aiohttp.ClientError, OSError, TimeoutError, AriError) as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if isinstance(exc, aiohttp.WSServerHandshakeError) and exc.status == 401:
                    reason = "login refused (check [ari] username/password and ari.conf)"
                self.link.set_down(reason)
            if stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.backoff.next()):
                    await stop.wait()
        self.link.set_down("stopped")

    async def _session_loop(self, stop: asyncio.Event) -> None:
        url = self.base.replace("http", "ws", 1) + "/events"
        ws = await self.session.ws_connect(
            url,
            params={"app": self.settings.app, "subscribeAll": "false"},
            heartbeat=self.settings.heartbeat,
            timeout=aiohttp.ClientWSTimeout(ws_close=self.settings.request_timeout),
        )
        closer = asyncio.create_task(self._close_on(stop, ws), name="ari-ws-closer")
        try:
            self.link.set_up(f"{self.settings.url}, app {self.settings.app}")
            await self.filter_events()
            if self.on_connect is not None:
                await self.on_connect()
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._dispatch(msg.data)
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    break
            if not stop.is_set() and not (self.gate is not None and self.gate[1].is_set()):
                raise ConnectionResetError("event websocket closed")
        finally:
            closer.cancel()
            await ws.close()

    async def _close_on(self, stop: asyncio.Event, ws: aiohttp.ClientWebSocketResponse) -> None:
        if self.gate is None:
            await stop.wait()
        else:
            await _first(stop.wait(), self.gate[1].wait())
        await ws.close()

    def _dispatch(self, text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            log.warning("ARI sent a frame that is not JSON (%d bytes)", len(text))
            return
        if not isinstance(event, dict):
            return
        try:
            self.on_event(event)
        except Exception:
            log.exception("ARI event handler failed on %s", event.get("type"))


async def _first(*aws: Awaitable[Any]) -> None:
    """Wait until the first of ``aws`` is done; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
