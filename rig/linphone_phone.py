"""A test phone on a real SIP stack: liblinphone through ``linphonec`` (Debian ``linphone-cli``).

Each start writes a fresh ``linphonerc`` (a new SIP port, picked here) and runs ``linphonec -a``
(auto-answer) with its own ``$HOME``. The push parameters go in ``[proxy_0]
contact_uri_parameters``: RFC 8599 (``pn-provider=fcm;pn-prid=...;pn-param=...``) or Linphone's
legacy form (``pn-type=firebase;pn-tok=...;app-id=...``); liblinphone appends them to the
Contact of its REGISTER (and of its 200 to an INVITE).

linphonec prints little on stdout, block-buffered when it is not a terminal, so the events come
from its log file instead (``-d 5 -l FILE``, written line by line, each line stamped to the
millisecond): account state ``LinphoneRegistrationOk`` -> ``registered``, call state
``IncomingReceived`` -> ``incoming`` (with the INVITE's request URI and ``X-Ari-Push-Call-Id``,
read from the SIP message the log carries), ``Connected`` -> ``confirmed``, ``End``/``Error`` ->
``disconnected``. Traps it has: without ``$HOME/.local/share/linphone`` it stays in start-up and
never opens its SIP port; it exits when its stdin reaches end of file (the parent keeps a pipe
open); ``sip_tcp_port=-1`` means a random port and 0 turns TCP off.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from rig.phone_proc import PhoneError, PhoneProcess

LINPHONEC = "linphonec"
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d):(\d{3}) ")
_REG_STATE = re.compile(r"moving from state \[LinphoneRegistration\w+\] to \[LinphoneRegistration(\w+)\]")
_CALL_STATE = re.compile(r"CallSession \[\w+\] moving from state LinphoneCall(\w+) to LinphoneCall(\w+)")
_REQUEST = re.compile(r"^(INVITE|CANCEL|BYE) (sip:\S+) SIP/2\.0$")
_RECEIVED = re.compile(r"received \[\d+\] new bytes from")
_SENT = re.compile(r"message sent to \[")


def linphonec_available() -> bool:
    return shutil.which(LINPHONEC) is not None


def free_port(kind: int) -> int:
    """A port nothing on 127.0.0.1 uses now, for UDP (SOCK_DGRAM) or TCP (SOCK_STREAM)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def linphonerc(user: str, server_port: int, transport: str, sip_port: int, params: str, expires: int = 300) -> str:
    """The client's whole configuration: one account, one transport, no audio card needed."""
    suffix = ";transport=tcp" if transport == "tcp" else ""
    udp, tcp = (sip_port, 0) if transport == "udp" else (0, sip_port)
    return "\n".join([
        "[sip]",
        f"sip_port={udp}",
        f"sip_tcp_port={tcp}",
        "sip_tls_port=0",
        "default_proxy=0",
        "ipv6=0",
        "register_only_when_network_is_up=0",
        "[net]",
        "firewall_policy=0",
        "[rtp]",
        "audio_rtp_port=-1",
        "video_rtp_port=-1",
        "[video]",
        "capture=0",
        "display=0",
        "[proxy_0]",
        f"reg_proxy=<sip:127.0.0.1:{server_port}{suffix}>",
        f"reg_identity=sip:{user}@127.0.0.1",
        f"reg_expires={expires}",
        "reg_sendregister=1",
        "publish=0",
        "dial_escape_plus=0",
        f"contact_uri_parameters={params}",
        "",
    ])


class LinphonePhone(PhoneProcess):
    """One ``linphonec`` process; events read from its log file."""

    kind = "linphonec"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.home = self.workdir / "home"
        self.rc = self.workdir / "linphonerc"
        self._tail: asyncio.Task[None] | None = None
        self._invite: dict[str, str] = {}
        self._in_headers = False
        self._received_at = self._sent_at = self._register_sent = 0.0
        self.log = self.workdir / "linphonec.log"

    def prepare(self) -> None:
        if not linphonec_available():
            raise PhoneError("linphonec is not installed: `apt-get install linphone-cli` (rig/provision.py does it)")
        # without this directory linphonec never leaves start-up (no SIP port, no REGISTER)
        (self.home / ".local/share/linphone").mkdir(parents=True, exist_ok=True)
        kind = socket.SOCK_DGRAM if self.transport == "udp" else socket.SOCK_STREAM
        self.port = free_port(kind)
        self.rc.write_text(linphonerc(self.user, self.server_port, self.transport, self.port, self.params))
        self.log = self.workdir / f"linphonec-{self.starts + 1}.log"
        self._invite = {}

    def command(self) -> list[str]:
        return [LINPHONEC, "-c", str(self.rc), "-a", "-d", "5", "-l", str(self.log)]

    def env(self) -> Mapping[str, str]:
        # its own HOME (config, call history) and runtime dir (the sound libraries' sockets and
        # lock files, which would otherwise land in /tmp as pulse-* directories)
        run = self.workdir / "run"
        run.mkdir(mode=0o700, exist_ok=True)
        return dict(os.environ, HOME=str(self.home), XDG_RUNTIME_DIR=str(run))

    def spawned(self) -> None:
        if self._tail is not None:
            self._tail.cancel()
        self._tail = asyncio.create_task(self._follow(self.log), name=f"linphonec-{self.user}-log")

    async def send_command(self, name: str) -> None:
        await self._write({"hangup": "terminate all", "quit": "quit"}[name] + "\n")

    async def kill(self) -> None:
        await super().kill()
        if self._tail is not None:
            await asyncio.sleep(0.05)  # the last lines it wrote
            self._tail.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tail
            self._tail = None

    def parse_line(self, line: str, when: float) -> list[dict[str, Any]]:
        return []  # stdout: prompts only; the events come from the log

    # ------------------------------------------------------------ the log

    async def _follow(self, log: Path) -> None:
        offset_clock = time.time() - time.monotonic()
        pos, partial, last_t = 0, "", 0.0
        while True:
            try:
                with open(log, "rb") as f:
                    f.seek(pos)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            if data:
                pos += len(data)
                text = partial + data.decode(errors="replace")
                lines = text.split("\n")
                partial = lines.pop()
                for line in lines:
                    line = line.rstrip("\r")
                    m = _STAMP.match(line)
                    if m:
                        wall = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000
                        last_t = wall - offset_clock
                    for event in self._events_in(line, last_t or time.monotonic()):
                        self.deliver(event)
            await asyncio.sleep(0.01)

    def _events_in(self, line: str, when: float) -> list[dict[str, Any]]:
        if _RECEIVED.search(line):
            self._received_at = when  # a packet arrived; liblinphone parses (and logs) it later
            self._in_headers = False
            return []
        if _SENT.search(line):
            self._sent_at = when
            self._in_headers = False
            return []
        if line.startswith("REGISTER sip:"):
            self._register_sent = self._sent_at  # the log line before a request it sent is its send time
            return []
        m = _REQUEST.match(line)
        if m:  # a SIP request the log carries; its headers follow, up to a blank line
            self._invite = {"method": m.group(1), "uri": m.group(2), "received": repr(self._received_at)}
            self._in_headers = True
            return []
        if self._in_headers:
            if not line.strip() or _STAMP.match(line):
                self._in_headers = False
            else:
                name, _, value = line.partition(":")
                self._invite.setdefault(name.strip().lower(), value.strip())
                return []
        m = _REG_STATE.search(line)
        if m:
            state = m.group(1)
            if state == "Ok":
                return [{"event": "registered", "t": when, "sent": self._register_sent or when, "code": 200,
                         "port": self.port}]
            if state in ("Failed", "Cleared"):
                return [{"event": "registration", "t": when, "state": state}]
            return []
        m = _CALL_STATE.search(line)
        if m:
            new = m.group(2)
            if new == "IncomingReceived":
                inv = self._invite if self._invite.get("method") == "INVITE" else {}
                # t: when the INVITE's packet reached the client (liblinphone takes tens of ms more
                # to parse it at this log level); state_t: when it became an incoming call
                arrived = float(inv.get("received", 0.0)) or when
                return [{"event": "incoming", "t": arrived, "state_t": when, "uri": inv.get("uri", ""),
                         "call_id": inv.get("call-id", inv.get("i", "")),
                         "x_ari_push_call_id": inv.get("x-ari-push-call-id", "")}]
            if new == "Connected":
                return [{"event": "confirmed", "t": when}]
            if new in ("End", "Error"):
                return [{"event": "disconnected", "t": when, "state": new}]
        return []
