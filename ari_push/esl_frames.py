"""FreeSWITCH event socket (ESL) wire framing, sans-IO: bytes in, EslMessage out; commands to bytes.

The server speaks LF-terminated ``Key: Value`` header lines; a blank line ends the headers, and a
``Content-Length`` header announces a body of that many bytes. The first message after connecting
is ``Content-Type: auth/request``. Events (``text/event-plain``) carry a second header block in
their body whose values are URL-encoded, and may carry a body of their own (BACKGROUND_JOB).
Replies (``command/reply``, ``api/response``) come back in the order the commands were sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

MAX_MESSAGE_BYTES = 4 << 20  # `sofia xmlstatus ... reg` with thousands of contacts is well under this
MAX_HEADER_BYTES = 64 << 10


class EslProtocolError(ValueError):
    pass


def _lookup(fields: tuple[tuple[str, str], ...], key: str, default: str) -> str:
    k = key.lower()
    for name, value in fields:
        if name.lower() == k:
            return value
    return default


@dataclass(frozen=True, slots=True)
class EslEvent:
    """A decoded ``text/event-plain`` event. Header look-ups ignore case; values are URL-decoded."""

    headers: tuple[tuple[str, str], ...]
    body: str = ""

    def get(self, key: str, default: str = "") -> str:
        return _lookup(self.headers, key, default)

    @property
    def name(self) -> str:
        return self.get("Event-Name")

    @property
    def subclass(self) -> str:
        return self.get("Event-Subclass")

    @property
    def uuid(self) -> str:
        return self.get("Unique-ID")


@dataclass(frozen=True, slots=True)
class EslMessage:
    """One message on the socket: its outer headers and raw body."""

    headers: tuple[tuple[str, str], ...]
    body: bytes = b""

    def get(self, key: str, default: str = "") -> str:
        return _lookup(self.headers, key, default)

    @property
    def content_type(self) -> str:
        return self.get("Content-Type")

    @property
    def reply_text(self) -> str:
        return self.get("Reply-Text")

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    @property
    def is_reply(self) -> bool:
        """A ``command/reply`` or ``api/response``: the answer to the oldest command in flight."""
        return self.content_type in ("command/reply", "api/response")

    @property
    def ok(self) -> bool:
        """A reply that does not start with ``-ERR`` (api bodies and Reply-Text alike)."""
        if self.content_type == "api/response":
            return not self.text.startswith("-ERR") and not self.text.startswith("-USAGE")
        return not self.reply_text.startswith("-ERR")

    def event(self) -> EslEvent:
        if self.content_type != "text/event-plain":
            raise EslProtocolError(f"not a plain event: {self.content_type!r}")
        return parse_plain_event(self.body)


def _parse_headers(block: bytes, decode: bool) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for raw in block.decode("utf-8", "replace").split("\n"):
        line = raw.rstrip("\r")
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise EslProtocolError(f"header line without a colon: {line[:60]!r}")
        value = value.strip()
        out.append((name.strip(), unquote(value) if decode else value))
    return out


def parse_plain_event(body: bytes) -> EslEvent:
    head, sep, rest = body.partition(b"\n\n")
    headers = _parse_headers(head, decode=True)
    text = ""
    if sep:
        length = _lookup(tuple(headers), "Content-Length", "")
        if length:
            if not length.isdigit():
                raise EslProtocolError(f"bad event Content-Length {length[:20]!r}")
            text = rest[: int(length)].decode("utf-8", "replace")
    return EslEvent(tuple(headers), text)


class EslParser:
    """Feed bytes as they arrive; get complete messages back. Never blocks, never does I/O."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._head: tuple[tuple[str, str], ...] | None = None
        self._need = 0

    def feed(self, data: bytes) -> list[EslMessage]:
        self._buf += data
        out: list[EslMessage] = []
        while True:
            if self._head is None:
                # blank lines between messages are allowed
                while self._buf[:1] == b"\n":
                    del self._buf[:1]
                end = self._buf.find(b"\n\n")
                if end < 0:
                    if len(self._buf) > MAX_HEADER_BYTES:
                        raise EslProtocolError("ESL headers longer than 64 KiB")
                    return out
                head = tuple(_parse_headers(bytes(self._buf[:end]), decode=False))
                del self._buf[: end + 2]
                length = _lookup(head, "Content-Length", "0") or "0"
                if not length.isdigit():
                    raise EslProtocolError(f"bad Content-Length {length[:20]!r}")
                if int(length) > MAX_MESSAGE_BYTES:
                    raise EslProtocolError(f"ESL message of {length} bytes (limit {MAX_MESSAGE_BYTES})")
                self._head, self._need = head, int(length)
            if len(self._buf) < self._need:
                return out
            body = bytes(self._buf[: self._need])
            del self._buf[: self._need]
            out.append(EslMessage(self._head, body))
            self._head, self._need = None, 0


def _check(text: str, what: str) -> None:
    if "\n" in text or "\r" in text:
        raise ValueError(f"ESL {what} contains a line break")


def encode_command(command: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """One command (``auth``, ``api``, ``bgapi``, ``event``, ``sendmsg <uuid>`` ...) with optional
    header lines. No part may carry a line break: that would inject a second command."""
    _check(command, "command")
    lines = [command]
    for key, value in headers:
        _check(key, "header name")
        _check(value, f"header {key}")
        lines.append(f"{key}: {value}")
    return ("\n".join(lines) + "\n\n").encode()
