"""The AMI link: login, events, actions with timeouts, heartbeat, reconnect.

Written instead of using panoramisk (see docs/architecture.md): every action is bounded by
a timeout and fails at once while the link is down, a half-open socket is caught by the
Ping heartbeat, and a wrong secret is reported as such instead of looping silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable

from ari_push.ami_frames import AmiMessage, AmiParser, AmiProtocolError, encode_action
from ari_push.backoff import Backoff
from ari_push.links import LinkState
from ari_push.settings import AmiSettings

log = logging.getLogger("ari_push.ami")

EventHandler = Callable[[AmiMessage], None]
ConnectHandler = Callable[[], Awaitable[None]]


class AmiError(RuntimeError):
    """An action failed: link down, timeout, or an error response (``response`` is then set)."""

    def __init__(self, message: str, response: AmiMessage | None = None) -> None:
        super().__init__(message)
        self.response = response


class AmiAuthError(AmiError):
    pass


class _Pending:
    """An action waiting for its reply; list actions collect events until EventList: Complete."""

    def __init__(self, is_list: bool) -> None:
        self.is_list = is_list
        self.future: asyncio.Future[list[AmiMessage]] = asyncio.get_running_loop().create_future()
        self.items: list[AmiMessage] = []


class AmiClient:
    def __init__(
        self,
        settings: AmiSettings,
        on_event: EventHandler,
        on_connect: ConnectHandler | None = None,
        backoff: Backoff | None = None,
        events: str = "system",
    ) -> None:
        self.settings = settings
        self.events = events  # event classes asked for at login ("system,call" adds MessageWaiting)
        self.on_event = on_event
        self.on_connect = on_connect
        self.backoff = backoff or Backoff(base=0.5, cap=15.0)
        self.link = LinkState("ami")
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self.banner = ""

    # ---------------------------------------------------------------- public API

    async def action(self, name: str, **params: str) -> AmiMessage:
        """Send an action and return its response; AmiError on error response, timeout or no link."""
        replies = await self._send(name, params, is_list=False)
        reply = replies[0]
        if reply.response.lower() == "error":
            raise AmiError(f"{name}: {reply.get('Message') or 'error'}", reply)
        return reply

    async def action_list(self, name: str, **params: str) -> list[AmiMessage]:
        """Send a list action (PJSIPShowContacts, ...) and return its events, without the
        trailing *Complete event. An 'Error' answer that means 'nothing found' gives []."""
        replies = await self._send(name, params, is_list=True)
        head = replies[0]
        if head.response.lower() == "error":
            message = head.get("Message")
            if "no " in message.lower() and "found" in message.lower():
                return []
            raise AmiError(f"{name}: {message or 'error'}", head)
        return [m for m in replies[1:] if m.get("EventList").lower() != "complete"]

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the link up until ``stop`` is set. Never raises for network trouble."""
        while not stop.is_set():
            try:
                await self._session(stop)
                self.backoff.reset()
            except AmiAuthError as exc:
                self.link.set_down(f"login refused: {exc} (check [ami] username/secret and manager.conf)")
            except (OSError, AmiError, AmiProtocolError, TimeoutError, EOFError) as exc:
                self.link.set_down(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            finally:
                await self._teardown("link lost")
            if stop.is_set():
                break
            delay = self.backoff.next()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
        self.link.set_down("stopped")

    # ---------------------------------------------------------------- internals

    async def _send(self, name: str, params: dict[str, str], is_list: bool) -> list[AmiMessage]:
        writer = self._writer
        if writer is None or (not self.link.up and name != "Login"):
            raise AmiError(f"{name}: AMI link is down ({self.link.reason})")
        action_id = f"ap-{next(self._ids)}"
        pending = _Pending(is_list)
        self._pending[action_id] = pending
        try:
            writer.write(encode_action(name, action_id, **params))
            async with asyncio.timeout(self.settings.request_timeout):
                await writer.drain()
                return await pending.future
        except TimeoutError:
            raise AmiError(f"{name}: no answer within {self.settings.request_timeout}s") from None
        finally:
            self._pending.pop(action_id, None)

    async def _session(self, stop: asyncio.Event) -> None:
        async with asyncio.timeout(self.settings.request_timeout):
            reader, writer = await asyncio.open_connection(self.settings.host, self.settings.port)
        self._writer = writer
        parser = AmiParser()
        reader_task = asyncio.create_task(self._read(reader, parser), name="ami-reader")
        try:
            login = {"Username": self.settings.username, "Secret": str(self.settings.secret), "Events": self.events}
            reply = await self._send("Login", login, is_list=False)
            if reply[0].response.lower() != "success":
                raise AmiAuthError(reply[0].get("Message") or "authentication failed")
            self.banner = parser.banner or ""
            self.link.set_up(f"{self.settings.host}:{self.settings.port}, {self.banner}")
            if self.on_connect is not None:
                await self.on_connect()
            await self._heartbeat(stop, reader_task)
        finally:
            reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader_task

    async def _heartbeat(self, stop: asyncio.Event, reader_task: asyncio.Task[None]) -> None:
        """Ping every `heartbeat` s; a Ping without answer means a half-open socket."""
        stop_wait = asyncio.create_task(stop.wait(), name="ami-stop-wait")
        try:
            while True:
                done, _ = await asyncio.wait({stop_wait, reader_task}, timeout=self.settings.heartbeat,
                                             return_when=asyncio.FIRST_COMPLETED)
                if stop_wait in done:
                    return
                if reader_task in done:
                    exc = reader_task.exception()
                    raise exc if exc else EOFError("AMI closed the connection")
                await self.action("Ping")
        finally:
            stop_wait.cancel()

    async def _read(self, reader: asyncio.StreamReader, parser: AmiParser) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                raise EOFError("AMI closed the connection")
            for msg in parser.feed(data):
                self._dispatch(msg)

    def _dispatch(self, msg: AmiMessage) -> None:
        pending = self._pending.get(msg.action_id) if msg.action_id else None
        if pending is not None and not pending.future.done():
            pending.items.append(msg)
            if _completes(pending, msg):
                pending.future.set_result(pending.items)
            return
        if msg.event:
            try:
                self.on_event(msg)
            except Exception:  # a handler bug must not take the link down
                log.exception("AMI event handler failed on %s", msg.event)

    async def _teardown(self, reason: str) -> None:
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(AmiError(f"AMI {reason}"))
                pending.future.exception()  # mark retrieved: the waiter may have given up
        self._pending.clear()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await writer.wait_closed()


def _completes(pending: _Pending, msg: AmiMessage) -> bool:
    """A plain action ends with its response; a list action with an error or *Complete event."""
    if not pending.is_list:
        return True
    if len(pending.items) == 1 and msg.response.lower() == "error":
        return True
    return bool(msg.event) and msg.get("EventList").lower() == "complete"
