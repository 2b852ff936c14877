"""AMI wire framing, sans-IO: bytes in, AmiMessage out; AmiMessage to bytes.

AMI speaks CRLF-terminated ``Key: Value`` lines; a blank line ends a message. The first
line after connecting is the banner (``Asterisk Call Manager/x.y.z``), with no blank line.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_MESSAGE_BYTES = 1 << 20  # a PJSIPShowEndpoint reply is a few KB; 1 MiB means a broken peer


class AmiProtocolError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class AmiMessage:
    """One AMI message. Keys keep their case; look-ups ignore it. Repeated keys are kept."""

    fields: tuple[tuple[str, str], ...]

    def get(self, key: str, default: str = "") -> str:
        k = key.lower()
        for name, value in self.fields:
            if name.lower() == k:
                return value
        return default

    def get_all(self, key: str) -> list[str]:
        k = key.lower()
        return [v for n, v in self.fields if n.lower() == k]

    @property
    def event(self) -> str:
        return self.get("Event")

    @property
    def response(self) -> str:
        return self.get("Response")

    @property
    def action_id(self) -> str:
        return self.get("ActionID")

    def as_dict(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in self.fields:
            out.setdefault(name, value)
        return out


class AmiParser:
    """Feed bytes as they arrive; get complete messages back. Never blocks, never does I/O.

    Linear in the bytes received: each byte is searched once for the end of its message (the
    search resumes where the last one stopped, minus the 3 bytes a split terminator can
    straddle), so a peer that sends 1 MiB in 12-byte reads costs 1 MiB of scanning, not
    ~45 GB. ``scanned`` counts the bytes searched (tests check it stays linear)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._searched = 0  # bytes of _buf known to hold no message terminator
        self.banner: str | None = None
        self.scanned = 0

    def _find(self, sep: bytes) -> int:
        start = max(0, self._searched - (len(sep) - 1))
        end = self._buf.find(sep, start)
        self.scanned += (len(self._buf) if end < 0 else end + len(sep)) - start
        self._searched = len(self._buf) if end < 0 else 0
        return end

    def feed(self, data: bytes) -> list[AmiMessage]:
        self._buf += data
        out: list[AmiMessage] = []
        if self.banner is None:
            end = self._find(b"\r\n")
            if end < 0:
                if len(self._buf) > 1024:
                    raise AmiProtocolError("no AMI banner in the first 1024 bytes")
                return out
            line = bytes(self._buf[:end]).decode("utf-8", "replace")
            del self._buf[: end + 2]
            if not line.startswith("Asterisk Call Manager/"):
                raise AmiProtocolError(f"not an AMI server (banner {line[:60]!r})")
            self.banner = line
        while True:
            end = self._find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_MESSAGE_BYTES:
                    raise AmiProtocolError("AMI message larger than 1 MiB")
                return out
            block = bytes(self._buf[:end]).decode("utf-8", "replace")
            del self._buf[: end + 4]
            msg = parse_block(block)
            if msg.fields:
                out.append(msg)


def parse_block(block: str) -> AmiMessage:
    fields: list[tuple[str, str]] = []
    for line in block.split("\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            # Command output lines without a key; keep them under "Output".
            fields.append(("Output", line))
            continue
        fields.append((name.strip(), value.strip()))
    return AmiMessage(tuple(fields))


def encode_action(action: str, action_id: str, **params: str) -> bytes:
    """Serialise an action. Values cannot carry CR/LF: that would inject AMI lines."""
    lines = [f"Action: {action}", f"ActionID: {action_id}"]
    for key, value in params.items():
        if "\r" in value or "\n" in value or "\r" in key or "\n" in key:
            raise ValueError(f"AMI field {key} contains a line break")
        lines.append(f"{key}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
