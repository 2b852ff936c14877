"""Stopping a child process the way every part of the rig does: SIGTERM, a bounded wait, then
SIGKILL of its process group (never by name); and the start/stop-by-PID code of the rig's PBX
instances (``PidInstance``: rig/asterisk.py, rig/freeswitch.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)


class PidInstance:
    """One PBX process of the rig (Asterisk, FreeSWITCH): started in its own session with its
    console log, checked until ready, stopped and killed by its PID (never by name). A subclass
    gives its command, ports, readiness check and error type; each keeps its own ``stop``
    (Asterisk's control socket, FreeSWITCH's SIGTERM)."""

    kind = "pbx"  # for messages: "asterisk", "freeswitch"
    error: type[Exception] = RuntimeError
    ready_poll = 0.1  # s between readiness checks
    name: str
    proc: subprocess.Popen[bytes] | None

    @property
    def console_log(self) -> Path:
        raise NotImplementedError

    def _ports(self) -> list[tuple[int, int]]:
        """(port, socket type) pairs the instance listens on."""
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        return None

    def _prepare(self) -> None:
        """What must be in place before the process starts."""

    def _ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> None:
        if self.running:
            return
        self._check_ports_free()
        self._prepare()
        self.console_log.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.console_log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env=self._env(), start_new_session=True)
        log.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise self.error(f"{self.kind} {self.name} exited with {self.proc.returncode}; see {self.console_log}")
            if self._ready():
                return
            time.sleep(self.ready_poll)
        raise self.error(f"{self.kind} {self.name} not ready within {timeout:.0f}s; see {self.console_log}")

    def _check_ports_free(self) -> None:
        for port, kind in self._ports():
            s = socket.socket(socket.AF_INET, kind)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the PBXs do: TIME_WAIT is fine
            try:
                s.bind(("127.0.0.1", port))
            except OSError as exc:
                raise self.error(f"port {port} for {self.kind} {self.name} is in use: {exc}") from None
            finally:
                s.close()

    def kill(self) -> None:
        """Crash the instance (SIGKILL of its process group), as a fault test wants."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    def stop(self, timeout: float = 15.0) -> None:
        terminate(self.proc, timeout)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
