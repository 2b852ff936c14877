"""The FreeSWITCH event socket link (inbound ESL): auth, event subscription, api commands with
timeouts, heartbeat, reconnect with capped jittered backoff.

Written on the sans-IO framing in esl_frames.py rather than on an ESL library (see
docs/freeswitch.md): like the AMI link, every command is bounded by a timeout and fails at once
while the link is down, a half-open socket is caught by the heartbeat, a refused password is
reported as such (without the password), and the link state feeds /readyz.

Replies carry no id: FreeSWITCH answers the commands of one connection in order. A command whose
waiter gave up keeps its place in the queue, so a late reply is matched to it and dropped, never
to the next command.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable

from ari_push.backoff import Backoff
from ari_push.esl_frames import EslEvent, EslMessage, EslParser, EslProtocolError, encode_command
from ari_push.links import LinkState
from ari_push.settings import FreeswitchSettings

log = logging.getLogger("ari_push.esl")

EventHandler = Callable[[EslEvent], None]
ConnectHandler = Callable[[], Awaitable[None]]

REGISTRATION_EVENTS = ("CUSTOM", "sofia::register", "sofia::unregister", "sofia::expire")


class EslError(RuntimeError):
    """A command failed: link down, timeout, or an -ERR answer (``reply`` is then set)."""

    def __init__(self, message: str, reply: EslMessage | None = None) -> None:
        super().__init__(message)
        self.reply = reply


class EslAuthError(EslError):
    pass


class EslClient:
    def __init__(
        self,
        settings: FreeswitchSettings,
        on_event: EventHandler,
        on_connect: ConnectHandler | None = None,
        backoff: Backoff | None = None,
        events: tuple[str, ...] = REGISTRATION_EVENTS,
    ) -> None:
        self.settings = settings
        self.on_event = on_event
        self.on_connect = on_connect
        self.backoff = backoff or Backoff(base=0.5, cap=15.0)
        self.events = events
        self.link = LinkState("freeswitch")
        self._writer: asyncio.StreamWriter | None = None
        self._pending: collections.deque[asyncio.Future[EslMessage]] = collections.deque()
        self.version = ""

    # ---------------------------------------------------------------- public API

    async def api(self, command: str) -> str:
        """Run an ``api`` command; its output, or EslError on -ERR, timeout or no link."""
        reply = await self.send(f"api {command}")
        if not reply.ok:
            raise EslError(f"api {command.split(' ', 1)[0]}: {reply.text.strip()[:200]}", reply)
        return reply.text

    async def send(self, command: str, headers: tuple[tuple[str, str], ...] = ()) -> EslMessage:
        """Send one command and return its reply (``command/reply`` or ``api/response``)."""
        return await self._send(command, headers, during_login=False)

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the link up until ``stop`` is set. Never raises for network trouble."""
        while not stop.is_set():
            try:
                await self._session(stop)
                self.backoff.reset()
            except EslAuthError as exc:
                self.link.set_down(f"{exc} (check [freeswitch] password against event_socket.conf)")
            except (OSError, EslError, EslProtocolError, TimeoutError, EOFError) as exc:
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

    async def _send(self, command: str, headers: tuple[tuple[str, str], ...], during_login: bool) -> EslMessage:
        writer = self._writer
        if writer is None or (not self.link.up and not during_login):
            raise EslError(f"{_verb(command)}: FreeSWITCH link is down ({self.link.reason})")
        data = encode_command(command, headers)
        future: asyncio.Future[EslMessage] = asyncio.get_running_loop().create_future()
        self._pending.append(future)
        writer.write(data)
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                await writer.drain()
                return await asyncio.shield(future)
        except TimeoutError:
            raise EslError(f"{_verb(command)}: no answer within {self.settings.request_timeout}s") from None

    async def _session(self, stop: asyncio.Event) -> None:
        async with asyncio.timeout(self.settings.request_timeout):
            reader, writer = await asyncio.open_connection(self.settings.host, self.settings.port)
        self._writer = writer
        parser = EslParser()
        async with asyncio.timeout(self.settings.request_timeout):
            hello = await self._next(reader, parser)
            if hello.content_type != "auth/request":
                raise EslProtocolError(f"not a FreeSWITCH event socket (first message {hello.content_type!r})")
        reader_task = asyncio.create_task(self._read(reader, parser), name="esl-reader")
        try:
            reply = await self._send(f"auth {self.settings.password}", (), during_login=True)
            if not reply.ok:
                raise EslAuthError(f"the event socket refused the password ({reply.reply_text.strip()[:60]})")
            if self.events:
                reply = await self._send("event plain " + " ".join(self.events), (), during_login=True)
                if not reply.ok:
                    raise EslError(f"event subscription refused: {reply.reply_text.strip()[:100]}")
            version = await self._send("api version", (), during_login=True)
            self.version = version.text.strip()
            self.link.set_up(f"{self.settings.host}:{self.settings.port}, {self.version}")
            if self.on_connect is not None:
                await self.on_connect()
            await self._heartbeat(stop, reader_task)
        finally:
            reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader_task

    async def _next(self, reader: asyncio.StreamReader, parser: EslParser) -> EslMessage:
        """The first message (the auth request), read before the reader task exists."""
        while True:
            data = await reader.read(65536)
            if not data:
                raise EOFError("FreeSWITCH closed the connection before asking for the password")
            messages = parser.feed(data)
            if messages:
                if len(messages) > 1:
                    raise EslProtocolError("FreeSWITCH sent more than the auth request before auth")
                return messages[0]

    async def _heartbeat(self, stop: asyncio.Event, reader_task: asyncio.Task[None]) -> None:
        """``api uptime`` every `heartbeat` s; no answer means a half-open socket."""
        stop_wait = asyncio.create_task(stop.wait(), name="esl-stop-wait")
        try:
            while True:
                done, _ = await asyncio.wait({stop_wait, reader_task}, timeout=self.settings.heartbeat,
                                             return_when=asyncio.FIRST_COMPLETED)
                if stop_wait in done:
                    return
                if reader_task in done:
                    exc = reader_task.exception()
                    raise exc if exc else EOFError("FreeSWITCH closed the connection")
                await self.api("uptime")
        finally:
            stop_wait.cancel()

    async def _read(self, reader: asyncio.StreamReader, parser: EslParser) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                raise EOFError("FreeSWITCH closed the connection")
            for msg in parser.feed(data):
                self._dispatch(msg)

    def _dispatch(self, msg: EslMessage) -> None:
        if msg.is_reply:
            if not self._pending:
                log.warning("FreeSWITCH sent a %s nobody asked for", msg.content_type)
                return
            future = self._pending.popleft()
            if not future.done():
                future.set_result(msg)
            return
        if msg.content_type == "text/event-plain":
            try:
                event = msg.event()
            except EslProtocolError as exc:
                log.warning("undecodable FreeSWITCH event: %s", exc)
                return
            try:
                self.on_event(event)
            except Exception:  # a handler bug must not take the link down
                log.exception("FreeSWITCH event handler failed on %s %s", event.name, event.subclass)
            return
        if msg.content_type == "text/disconnect-notice":
            raise EOFError("FreeSWITCH sent a disconnect notice")

    async def _teardown(self, reason: str) -> None:
        for future in self._pending:
            if not future.done():
                future.set_exception(EslError(f"FreeSWITCH {reason}"))
                future.exception()  # mark retrieved: the waiter may have given up
        self._pending.clear()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await writer.wait_closed()


def _verb(command: str) -> str:
    """What a command is, for messages: never its arguments (``auth`` carries the password)."""
    words = command.split(" ", 2)
    return " ".join(words[:2]) if words[0] in ("api", "bgapi") else words[0]
