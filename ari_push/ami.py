"""The AMI link: login, events, actions with timeouts, heartbeat, reconnect.

Written instead of using panoramisk (see docs/architecture.md): every action is bounded by
a timeout and fails at once while the link is down, a half-open socket is caught by the
Ping heartbeat, and a wrong secret is reported as such instead of looping silently. The
connection loop is stream_link.StreamLink's, shared with the FreeSWITCH event socket link.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

from ari_push.ami_frames import AmiMessage, AmiParser, AmiProtocolError, encode_action
from ari_push.backoff import Backoff
from ari_push.settings import AmiSettings
from ari_push.stream_link import ConnectHandler, StreamLink

log = logging.getLogger("ari_push.ami")

EventHandler = Callable[[AmiMessage], None]


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


class AmiClient(StreamLink):
    auth_error = AmiAuthError
    link_errors = (OSError, AmiError, AmiProtocolError, TimeoutError, EOFError)
    peer = "AMI"

    def __init__(
        self,
        settings: AmiSettings,
        on_event: EventHandler,
        on_connect: ConnectHandler | None = None,
        backoff: Backoff | None = None,
        events: str = "system",
    ) -> None:
        super().__init__("ami", settings.host, settings.port, settings.request_timeout, settings.heartbeat,
                         on_connect, backoff)
        self.settings = settings
        self.events = events  # event classes asked for at login ("system,call" adds MessageWaiting)
        self.on_event = on_event
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

    # ---------------------------------------------------------------- the link's hooks (stream_link.py)

    def _new_parser(self) -> AmiParser:
        return AmiParser()

    async def _login(self, parser: AmiParser) -> str:
        login = {"Username": self.settings.username, "Secret": str(self.settings.secret), "Events": self.events}
        reply = await self._send("Login", login, is_list=False)
        if reply[0].response.lower() != "success":
            raise AmiAuthError(reply[0].get("Message") or "authentication failed")
        self.banner = parser.banner or ""
        return f"{self.settings.host}:{self.settings.port}, {self.banner}"

    def _auth_reason(self, exc: Exception) -> str:
        return f"login refused: {exc} (check [ami] username/secret and manager.conf)"

    async def _ping(self) -> None:
        await self.action("Ping")

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

    def _fail_pending(self, reason: str) -> None:
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(AmiError(f"AMI {reason}"))
                pending.future.exception()  # mark retrieved: the waiter may have given up
        self._pending.clear()


def _completes(pending: _Pending, msg: AmiMessage) -> bool:
    """A plain action ends with its response; a list action with an error or *Complete event."""
    if not pending.is_list:
        return True
    if len(pending.items) == 1 and msg.response.lower() == "error":
        return True
    return bool(msg.event) and msg.get("EventList").lower() == "complete"
