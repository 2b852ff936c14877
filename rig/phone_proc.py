"""The parent side of a real SIP client run as a child process (pjsua2, linphonec).

A test starts the client (:meth:`PhoneProcess.start`: it waits for the client's first 200 to
REGISTER), reads what the client reports as events (``registered``, ``incoming``, ``confirmed``,
``disconnected``), and ends it either politely (:meth:`quit`: the client un-registers) or as the OS
kills a backgrounded app (:meth:`kill`: SIGKILL, no un-REGISTER, its contact stays in Asterisk).
Starting again is a new process on a new port: what a phone woken by a push does.

Every event carries ``t``, a ``time.monotonic()`` stamp (the clock is system-wide on Linux, so
the child's stamps and the test's compare directly).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

EVENTS = ("ready", "registered", "registration", "incoming", "confirmed", "disconnected", "error", "exit")


class PhoneError(RuntimeError):
    """The client did not do what the test waited for; the message has its last output."""


class PhoneProcess:
    """One real SIP client process; subclasses say how to start it and how to read its output."""

    kind = "phone"

    def __init__(self, user: str, server_port: int, transport: str = "udp", params: str = "",
                 answer_code: int = 200, workdir: Path | None = None) -> None:
        if transport not in ("udp", "tcp"):
            raise ValueError(f"transport must be udp or tcp, got {transport!r}")
        self.user = user
        self.server_port = server_port
        self.transport = transport
        self.params = params
        self.answer_code = answer_code
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=f"ari-push-{self.kind}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.started_at = 0.0
        self.starts = 0
        self.events: list[dict[str, Any]] = []
        self.output: list[str] = []  # the child's stdout lines, for error messages
        self._queues: dict[str, asyncio.Queue[dict[str, Any]]] = {name: asyncio.Queue() for name in EVENTS}
        self._reader: asyncio.Task[None] | None = None
        self._stderr: Any = None

    # ------------------------------------------------------------ what a subclass provides

    def command(self) -> list[str]:
        raise NotImplementedError

    def cwd(self) -> Path:
        return self.workdir

    def env(self) -> Mapping[str, str]:
        return os.environ

    def prepare(self) -> None:
        """Write config files before each start (a new port each time)."""

    def spawned(self) -> None:
        """Called once the process exists (start another reader here)."""

    def parse_line(self, line: str, when: float) -> list[dict[str, Any]]:
        """Events in one line of the child's stdout (default: JSON lines)."""
        try:
            event = json.loads(line)
        except ValueError:
            return []
        return [event] if isinstance(event, dict) and "event" in event else []

    async def send_command(self, name: str) -> None:
        await self._write(json.dumps({"cmd": name}) + "\n")

    # ------------------------------------------------------------ life cycle

    async def start(self, timeout: float = 20.0) -> dict[str, Any]:
        """Start a new process; return its ``registered`` event (the first 2xx to its REGISTER)."""
        if self.running:
            raise PhoneError(f"{self.kind} {self.user} is already running")
        for q in self._queues.values():
            while not q.empty():
                q.get_nowait()
        self.prepare()
        self.starts += 1
        self._stderr = open(self.workdir / f"stderr-{self.starts}.log", "wb")  # noqa: SIM115
        self.started_at = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            *self.command(), cwd=self.cwd(), env=dict(self.env()), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=self._stderr, start_new_session=True)
        self._reader = asyncio.create_task(self._read(self.proc), name=f"{self.kind}-{self.user}-stdout")
        self.spawned()
        try:
            return await self.expect("registered", timeout)
        except BaseException:
            await self.kill()
            raise

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                break
            when = time.monotonic()
            line = raw.decode(errors="replace").rstrip("\r\n")
            self.output.append(line)
            for event in self.parse_line(line, when):
                event.setdefault("t", when)
                self.deliver(event)
        exit_event = {"event": "exit", "t": time.monotonic()}
        self.events.append(exit_event)
        self._queues["exit"].put_nowait(exit_event)

    def deliver(self, event: dict[str, Any]) -> None:
        if event["event"] == "ready" and event.get("port"):
            self.port = int(event["port"])
        self.events.append(event)
        q = self._queues.get(event["event"])
        if q is not None:
            q.put_nowait(event)

    async def expect(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next ``name`` event; fails with the client's recent output if it does not come (or the
        client exits first)."""
        queue, exits = self._queues[name], self._queues["exit"]
        get = asyncio.ensure_future(queue.get())
        died = asyncio.ensure_future(exits.get()) if name != "exit" else None
        waiting = {get} | ({died} if died else set())
        try:
            done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in waiting:
                if not fut.done():
                    fut.cancel()
        if get in done:
            if died is not None and died in done:
                exits.put_nowait(died.result())  # keep it for a later expect("exit")
            return get.result()
        if died is not None and died in done:
            exits.put_nowait(died.result())
            raise PhoneError(f"{self.kind} {self.user} exited while waiting for {name!r}:\n{self.tail()}")
        raise PhoneError(f"{self.kind} {self.user}: no {name!r} within {timeout:g}s:\n{self.tail()}")

    def pending(self, name: str) -> int:
        """How many ``name`` events arrived and were not taken by :meth:`expect`."""
        return self._queues[name].qsize()

    def tail(self, n: int = 15) -> str:
        lines = list(self.output[-n:])
        if self._stderr is not None:
            with contextlib.suppress(OSError):
                err = Path(self._stderr.name).read_text(errors="replace").splitlines()[-n:]
                lines += [f"stderr: {e}" for e in err]
        return "\n".join(lines)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def _write(self, text: str) -> None:
        if self.proc is None or self.proc.stdin is None:
            raise PhoneError(f"{self.kind} {self.user} is not running")
        self.proc.stdin.write(text.encode())
        await self.proc.stdin.drain()

    async def hangup(self) -> None:
        await self.send_command("hangup")

    async def kill(self) -> None:
        """SIGKILL, as the OS ends a backgrounded app: no un-REGISTER, its contact stays registered."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        await self._reap()

    async def quit(self, timeout: float = 10.0) -> None:
        """Politely: the client un-registers and exits (SIGKILL if it does not)."""
        if self.running:
            with contextlib.suppress(PhoneError, ConnectionError):
                await self.send_command("quit")
            assert self.proc is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), timeout)
        await self.kill()

    async def _reap(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10)
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        if self._reader is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 5)
            self._reader = None
        if self._stderr is not None:
            self._stderr.close()
        self.proc = None
