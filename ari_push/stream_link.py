"""What the AMI link (ami.py) and the FreeSWITCH event socket link (esl.py) share: one TCP
connection kept up with capped jittered backoff, a reader task feeding a sans-IO parser, a
heartbeat that catches a half-open socket, a refused login reported as such, and the pending
commands failed at once when the connection goes.

A subclass says how to greet and log in, what its heartbeat command is, how a message is
dispatched, and how its pending commands are kept (AMI by ActionID, ESL in order).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from ari_push.backoff import Backoff
from ari_push.links import LinkState

ConnectHandler = Callable[[], Awaitable[None]]


class StreamLink:
    #: raised by ``_login`` when the PBX refuses the credentials
    auth_error: ClassVar[type[Exception]] = PermissionError
    #: what ends one connection (then: backoff, reconnect); never raised out of ``run``
    link_errors: ClassVar[tuple[type[BaseException], ...]] = (OSError, TimeoutError, EOFError)
    #: who is at the other end, for messages ("AMI", "FreeSWITCH")
    peer: ClassVar[str] = "PBX"

    def __init__(self, link_name: str, host: str, port: int, request_timeout: float, heartbeat: float,
                 on_connect: ConnectHandler | None, backoff: Backoff | None) -> None:
        self.host = host
        self.port = port
        self.request_timeout = request_timeout
        self.heartbeat_interval = heartbeat
        self.on_connect = on_connect
        self.backoff = backoff or Backoff(base=0.5, cap=15.0)
        self.link = LinkState(link_name)
        self._writer: asyncio.StreamWriter | None = None

    # ---------------------------------------------------------------- what a subclass says

    def _new_parser(self) -> Any:
        """A fresh sans-IO parser for one connection (``feed(bytes) -> list[message]``)."""
        raise NotImplementedError

    async def _greet(self, reader: asyncio.StreamReader, parser: Any) -> None:
        """Read what the PBX sends before the reader task starts (ESL's auth request)."""

    async def _login(self, parser: Any) -> str:
        """Log in (raise ``auth_error`` when refused); returns the link's description."""
        raise NotImplementedError

    async def _ping(self) -> None:
        """One heartbeat command; raising ends the connection."""
        raise NotImplementedError

    def _dispatch(self, msg: Any) -> None:
        raise NotImplementedError

    def _fail_pending(self, reason: str) -> None:
        """Fail every command still waiting for its reply (the connection is gone)."""
        raise NotImplementedError

    def _auth_reason(self, exc: Exception) -> str:
        return str(exc)

    # ---------------------------------------------------------------- the loop

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the link up until ``stop`` is set. Never raises for network trouble."""
        while not stop.is_set():
            try:
                await self._session(stop)
                self.backoff.reset()
            except self.auth_error as exc:
                self.link.set_down(self._auth_reason(exc))
            except self.link_errors as exc:
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

    async def _session(self, stop: asyncio.Event) -> None:
        async with asyncio.timeout(self.request_timeout):
            reader, writer = await asyncio.open_connection(self.host, self.port)
        self._writer = writer
        parser = self._new_parser()
        await self._greet(reader, parser)
        reader_task = asyncio.create_task(self._read(reader, parser), name=f"{self.link.name}-reader")
        try:
            self.link.set_up(await self._login(parser))
            if self.on_connect is not None:
                await self.on_connect()
            await self._heartbeat(stop, reader_task)
        finally:
            reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader_task

    async def _heartbeat(self, stop: asyncio.Event, reader_task: asyncio.Task[None]) -> None:
        """``_ping`` every ``heartbeat`` s; a ping without answer means a half-open socket."""
        stop_wait = asyncio.create_task(stop.wait(), name=f"{self.link.name}-stop-wait")
        try:
            while True:
                done, _ = await asyncio.wait({stop_wait, reader_task}, timeout=self.heartbeat_interval,
                                             return_when=asyncio.FIRST_COMPLETED)
                if stop_wait in done:
                    return
                if reader_task in done:
                    exc = reader_task.exception()
                    raise exc if exc else EOFError(f"{self.peer} closed the connection")
                await self._ping()
        finally:
            stop_wait.cancel()

    async def _read(self, reader: asyncio.StreamReader, parser: Any) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                raise EOFError(f"{self.peer} closed the connection")
            for msg in parser.feed(data):
                self._dispatch(msg)

    async def _teardown(self, reason: str) -> None:
        self._fail_pending(reason)
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await writer.wait_closed()
