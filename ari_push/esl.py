"""The FreeSWITCH event socket link (inbound ESL): auth, event subscription, api commands with
timeouts, heartbeat, reconnect with capped jittered backoff.

Written on the sans-IO framing in esl_frames.py rather than on an ESL library (see
docs/freeswitch.md): like the AMI link, every command is bounded by a timeout and fails at once
while the link is down, a half-open socket is caught by the heartbeat, a refused password is
reported as such (without the password), and the link state feeds /readyz. The connection loop
is stream_link.StreamLink's, shared with the AMI link.

Replies carry no id: FreeSWITCH answers the commands of one connection in order. A command whose
waiter gave up keeps its place in the queue, so a late reply is matched to it and dropped, never
to the next command.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

from ari_push.backoff import Backoff
from ari_push.esl_frames import EslEvent, EslMessage, EslParser, EslProtocolError, encode_command
from ari_push.settings import FreeswitchSettings
from ari_push.stream_link import ConnectHandler, StreamLink

log = logging.getLogger("ari_push.esl")

EventHandler = Callable[[EslEvent], None]

REGISTRATION_EVENTS = ("CUSTOM", "sofia::register", "sofia::unregister", "sofia::expire")


class EslError(RuntimeError):
    """A command failed: link down, timeout, or an -ERR answer (``reply`` is then set)."""

    def __init__(self, message: str, reply: EslMessage | None = None) -> None:
        super().__init__(message)
        self.reply = reply


class EslAuthError(EslError):
    pass


class EslClient(StreamLink):
    auth_error = EslAuthError
    link_errors = (OSError, EslError, EslProtocolError, TimeoutError, EOFError)
    peer = "FreeSWITCH"

    def __init__(
        self,
        settings: FreeswitchSettings,
        on_event: EventHandler,
        on_connect: ConnectHandler | None = None,
        backoff: Backoff | None = None,
        events: tuple[str, ...] = REGISTRATION_EVENTS,
    ) -> None:
        super().__init__("freeswitch", settings.host, settings.port, settings.request_timeout, settings.heartbeat,
                         on_connect, backoff)
        self.settings = settings
        self.on_event = on_event
        self.events = events
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

    # ---------------------------------------------------------------- the link's hooks (stream_link.py)

    def _new_parser(self) -> EslParser:
        return EslParser()

    async def _greet(self, reader: asyncio.StreamReader, parser: EslParser) -> None:
        """The auth request, read before the reader task exists."""
        async with asyncio.timeout(self.settings.request_timeout):
            while True:
                data = await reader.read(65536)
                if not data:
                    raise EOFError("FreeSWITCH closed the connection before asking for the password")
                messages = parser.feed(data)
                if messages:
                    break
        if len(messages) > 1:
            raise EslProtocolError("FreeSWITCH sent more than the auth request before auth")
        if messages[0].content_type != "auth/request":
            raise EslProtocolError(f"not a FreeSWITCH event socket (first message {messages[0].content_type!r})")

    async def _login(self, parser: EslParser) -> str:
        reply = await self._send(f"auth {self.settings.password}", (), during_login=True)
        if not reply.ok:
            raise EslAuthError(f"the event socket refused the password ({reply.reply_text.strip()[:60]})")
        if self.events:
            reply = await self._send("event plain " + " ".join(self.events), (), during_login=True)
            if not reply.ok:
                raise EslError(f"event subscription refused: {reply.reply_text.strip()[:100]}")
        version = await self._send("api version", (), during_login=True)
        self.version = version.text.strip()
        return f"{self.settings.host}:{self.settings.port}, {self.version}"

    def _auth_reason(self, exc: Exception) -> str:
        return f"{exc} (check [freeswitch] password against event_socket.conf)"

    async def _ping(self) -> None:
        await self.api("uptime")

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

    def _fail_pending(self, reason: str) -> None:
        for future in self._pending:
            if not future.done():
                future.set_exception(EslError(f"FreeSWITCH {reason}"))
                future.exception()  # mark retrieved: the waiter may have given up
        self._pending.clear()


def _verb(command: str) -> str:
    """What a command is, for messages: never its arguments (``auth`` carries the password)."""
    words = command.split(" ", 2)
    return " ".join(words[:2]) if words[0] in ("api", "bgapi") else words[0]
