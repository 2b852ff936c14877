"""A small SIP user agent for the tests: a mobile phone that registers with push parameters,
falls asleep (closes its socket), wakes, answers INVITEs, sends RTP; and a caller.

UDP and TCP, no authentication (the sample endpoints have none), one dialog at a time per
role. It is a test peer, not a product: just enough SIP to drive Asterisk for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import struct
import time
import uuid
import weakref
from dataclasses import dataclass, field


def _tag() -> str:
    return uuid.uuid4().hex[:10]


@dataclass
class SipMessage:
    start: str
    headers: list[tuple[str, str]]
    body: str = ""
    received: float = field(default_factory=time.monotonic)
    source: tuple[str, int] | None = None  # where it came from (UDP): responses go back there

    def header(self, name: str) -> str:
        n = name.lower()
        short = {"via": "v", "from": "f", "to": "t", "call-id": "i", "contact": "m", "cseq": "c",
                 "content-length": "l", "content-type": "c"}.get(n)
        for k, v in self.headers:
            if k.lower() == n or (short and k.lower() == short and n != "content-type"):
                return v
        return ""

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def is_request(self) -> bool:
        return not self.start.startswith("SIP/2.0")

    @property
    def method(self) -> str:
        return self.start.split(" ", 1)[0] if self.is_request else self.header("CSeq").split()[-1]

    @property
    def status(self) -> int:
        return 0 if self.is_request else int(self.start.split()[1])

    @property
    def uri(self) -> str:
        return self.start.split()[1] if self.is_request else ""


def parse(data: bytes) -> SipMessage:
    text = data.decode("utf-8", "replace")
    head, _, body = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.append((k.strip(), v.strip()))
    return SipMessage(lines[0], headers, body)


def build(start: str, headers: list[tuple[str, str]], body: str = "") -> bytes:
    lines = [start] + [f"{k}: {v}" for k, v in headers] + [f"Content-Length: {len(body.encode())}", "", ""]
    return ("\r\n".join(lines)).encode() + body.encode()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, ua: SipUA) -> None:
        self.ua = ua

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data.strip():
            msg = parse(data)
            msg.source = addr
            self.ua._on_message(msg)


#: every SipUA whose socket is open now (tests check at teardown that they closed theirs)
OPEN: weakref.WeakSet[SipUA] = weakref.WeakSet()


class SipUA:
    """One SIP phone on 127.0.0.1. ``open()`` binds a fresh local port (a 'new socket')."""

    def __init__(self, user: str, server_port: int, transport: str = "udp", password: str = "") -> None:
        """``password``: answer digest challenges (401/407) with it, as FreeSWITCH directory users need."""
        self.user = user
        self.password = password
        self.server = ("127.0.0.1", server_port)
        self.transport = transport
        self.port = 0
        self.call_id = f"{uuid.uuid4().hex}@ua"
        self.cseq = 1
        self.from_tag = _tag()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp_writer: asyncio.StreamWriter | None = None
        self._tcp_task: asyncio.Task[None] | None = None
        self._waiters: dict[str, asyncio.Future[SipMessage]] = {}
        self.invites: asyncio.Queue[SipMessage] = asyncio.Queue()
        self.byes: asyncio.Queue[SipMessage] = asyncio.Queue()
        self.cancels: asyncio.Queue[SipMessage] = asyncio.Queue()
        self.messages: asyncio.Queue[SipMessage] = asyncio.Queue()  # SIP MESSAGEs received (answered 200)
        self.answer_code = 200  # what to answer INVITEs with (486/603 to decline)
        self.answer_codes: list[int] = []  # answers for the next INVITEs, in order, before answer_code
        self.answer_delay = 0.0
        self.contact_params = ""
        self.dialog: dict[str, str] = {}
        self.rtp: RtpPeer | None = None
        self.log: list[SipMessage] = []
        self.provisional: list[int] = []  # 180/183 seen by the caller
        #: a suspended app behind a live socket: every request is logged, none is answered
        self.asleep = False

    # ---------------------------------------------------------------- transport

    async def open(self, port: int = 0) -> None:
        """Open the socket: on ``port``, or on a new one (0). A new one is never the port this
        phone had before: the kernel may hand the same ephemeral port back after a close, and a
        wake meant to be on a new URI would silently be a same-URI one."""
        loop = asyncio.get_running_loop()
        OPEN.add(self)
        if self.transport == "udp":
            previous = self.port
            transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=("127.0.0.1", port))
            if not port and previous and transport.get_extra_info("sockname")[1] == previous:
                # the old port came back: take another while this one holds it, then let it go
                other, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=("127.0.0.1", 0))
                transport.close()
                transport = other
            self._udp = transport
            self.port = transport.get_extra_info("sockname")[1]
        else:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.setblocking(False)
            await loop.sock_connect(sock, self.server)
            reader, writer = await asyncio.open_connection(sock=sock)
            self._tcp_writer = writer
            self.port = sock.getsockname()[1]
            self._tcp_task = asyncio.create_task(self._tcp_reader(reader))

    async def _tcp_reader(self, reader: asyncio.StreamReader) -> None:
        buf = b""
        while True:
            data = await reader.read(65536)
            if not data:
                return
            buf += data
            while b"\r\n\r\n" in buf:
                head, _, rest = buf.partition(b"\r\n\r\n")
                m = re.search(rb"(?im)^(?:content-length|l)\s*:\s*(\d+)", head)
                n = int(m.group(1)) if m else 0
                if len(rest) < n:
                    break
                self._on_message(parse(head + b"\r\n\r\n" + rest[:n]))
                buf = rest[n:]

    def close(self) -> None:
        """Fall asleep: the socket goes away, as iOS/Android do to a backgrounded app."""
        OPEN.discard(self)
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp_writer is not None:
            self._tcp_writer.close()
            self._tcp_writer = None
        if self._tcp_task is not None:
            self._tcp_task.cancel()
            self._tcp_task = None
        if self.rtp is not None:
            self.rtp.close()
            self.rtp = None

    def send(self, data: bytes, to: tuple[str, int] | None = None) -> None:
        if self._udp is not None:
            self._udp.sendto(data, to or self.server)
        elif self._tcp_writer is not None:
            self._tcp_writer.write(data)
        else:
            raise RuntimeError("the phone is asleep (no socket)")

    # ---------------------------------------------------------------- helpers

    def _new_rtp(self) -> None:
        if self.rtp is not None:
            self.rtp.close()
        self.rtp = RtpPeer()

    @property
    def contact_uri(self) -> str:
        params = f";{self.contact_params}" if self.contact_params else ""
        return f"sip:{self.user}@127.0.0.1:{self.port};transport={self.transport}{params}"

    def _via(self, branch: str | None = None) -> str:
        return f"SIP/2.0/{self.transport.upper()} 127.0.0.1:{self.port};rport;branch=z9hG4bK{branch or _tag()}"

    async def _request(self, method: str, uri: str, headers: list[tuple[str, str]], body: str = "",
                       timeout: float = 5.0, to: tuple[str, int] | None = None) -> SipMessage:
        branch = _tag()
        key = f"{branch}:{method}"
        fut: asyncio.Future[SipMessage] = asyncio.get_running_loop().create_future()
        self._waiters[key] = fut
        self.send(build(f"{method} {uri} SIP/2.0", [("Via", self._via(branch)), ("Max-Forwards", "70"), *headers],
                        body), to)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self._waiters.pop(key, None)

    # ---------------------------------------------------------------- registration

    async def register(self, contact_params: str | None = None, expires: int = 300,
                       contact_uri: str | None = None) -> int:
        if contact_params is not None:
            self.contact_params = contact_params
        self.cseq += 1
        contact = contact_uri or self.contact_uri
        uri = f"sip:127.0.0.1:{self.server[1]}"
        headers = [
            ("From", f"<sip:{self.user}@127.0.0.1>;tag={self.from_tag}"),
            ("To", f"<sip:{self.user}@127.0.0.1>"),
            ("Call-ID", self.call_id),
            ("Contact", f"<{contact}>"), ("Expires", str(expires)), ("User-Agent", "ari-push-test-ua/1.0"),
        ]
        resp = await self._request("REGISTER", uri, [*headers, ("CSeq", f"{self.cseq} REGISTER")])
        if resp.status in (401, 407) and self.password:
            self.cseq += 1
            name = "Authorization" if resp.status == 401 else "Proxy-Authorization"
            challenge = resp.header("WWW-Authenticate" if resp.status == 401 else "Proxy-Authenticate")
            resp = await self._request("REGISTER", uri, [
                *headers, ("CSeq", f"{self.cseq} REGISTER"),
                (name, digest_response(challenge, "REGISTER", uri, self.user, self.password))])
        return resp.status

    async def send_message(self, target: str, body: str, content_type: str = "text/plain") -> int:
        """A SIP MESSAGE to ``target`` through Asterisk; returns the final status (202 there)."""
        self.cseq += 1
        resp = await self._request("MESSAGE", f"sip:{target}@127.0.0.1:{self.server[1]}", [
            ("From", f'"Test {self.user}" <sip:{self.user}@127.0.0.1>;tag={_tag()}'),
            ("To", f"<sip:{target}@127.0.0.1>"), ("Call-ID", f"{uuid.uuid4().hex}@msg"),
            ("CSeq", f"{self.cseq} MESSAGE"), ("Content-Type", content_type)], body)
        return resp.status

    async def unregister(self) -> int:
        return await self.register(expires=0)

    # ---------------------------------------------------------------- calls (UAS)

    def _on_message(self, msg: SipMessage) -> None:
        self.log.append(msg)
        if not msg.is_request:
            branch = re.search(r"branch=z9hG4bK([^;,\s]+)", msg.header("Via"))
            fut = self._waiters.get(f"{branch.group(1)}:{msg.method}") if branch else None
            if fut is not None and not fut.done() and msg.status >= 200:
                fut.set_result(msg)
            elif fut is not None and not fut.done() and 100 < msg.status < 200:
                self.provisional.append(msg.status)
            return
        if self.asleep:
            return
        if msg.method == "INVITE":
            push_call = msg.header("X-Ari-Push-Call-Id")
            if (push_call and push_call == self.dialog.get("push_call")) or self.dialog.get("call_id"):
                # a second INVITE for a call this phone already took (a leg sent while it slept),
                # or another call while it is on one: one line, busy
                self.send(self._response(msg, 486, "Busy Here", _tag()), msg.source)
                return
            self.invites.put_nowait(msg)
            asyncio.get_running_loop().create_task(self._answer(msg))
        elif msg.method == "BYE":
            self.send(self._response(msg, 200, "OK"), msg.source)
            self.dialog = {}
            self.byes.put_nowait(msg)
        elif msg.method == "CANCEL":
            self.send(self._response(msg, 200, "OK"), msg.source)
            self.cancels.put_nowait(msg)
        elif msg.method in ("OPTIONS", "NOTIFY"):
            self.send(self._response(msg, 200, "OK"), msg.source)
        elif msg.method == "MESSAGE":
            self.send(self._response(msg, 200, "OK", _tag()), msg.source)
            self.messages.put_nowait(msg)

    def _response(self, req: SipMessage, code: int, reason: str, to_tag: str = "",
                  extra: list[tuple[str, str]] | None = None, body: str = "") -> bytes:
        to = req.header("To")
        if to_tag and "tag=" not in to:
            to += f";tag={to_tag}"
        headers = [("Via", v) for v in req.all("Via") or req.all("v")]
        headers += [("From", req.header("From")), ("To", to), ("Call-ID", req.header("Call-ID")),
                    ("CSeq", req.header("CSeq"))]
        return build(f"SIP/2.0 {code} {reason}", headers + (extra or []), body)

    async def _answer(self, invite: SipMessage) -> None:
        tag = _tag()
        self.dialog = {"push_call": invite.header("X-Ari-Push-Call-Id"), "call_id": invite.header("Call-ID")}
        self.send(self._response(invite, 180, "Ringing", tag), invite.source)
        if self.answer_delay:
            await asyncio.sleep(self.answer_delay)
        code = self.answer_codes.pop(0) if self.answer_codes else self.answer_code
        if code != 200:
            self.send(self._response(invite, code, {603: "Declined", 486: "Busy Here"}.get(code, "Error"), tag),
                      invite.source)
            self.dialog = {}
            return
        self._new_rtp()
        assert self.rtp is not None
        await self.rtp.open()
        remote = _sdp_media(invite.body)
        if remote:
            self.rtp.remote = remote
        self.dialog = {"push_call": invite.header("X-Ari-Push-Call-Id"),
                       "call_id": invite.header("Call-ID"), "from": invite.header("From"),
                       "peer": f"{invite.source[0]}:{invite.source[1]}" if invite.source else "",
                       "to": invite.header("To") + f";tag={tag}", "remote_target":
                       re.sub(r"^.*<([^>]+)>.*$", r"\1", invite.header("Contact")), "role": "uas"}
        self.send(self._response(invite, 200, "OK", tag, [
            ("Contact", f"<sip:{self.user}@127.0.0.1:{self.port};transport={self.transport}>"),
            ("Content-Type", "application/sdp")], self.rtp.sdp(self.user)), invite.source)

    async def hangup(self) -> int:
        """BYE on the current dialog (either role)."""
        d = self.dialog
        self.cseq += 1
        if d.get("role") == "uas":
            from_h, to_h = d["to"], d["from"]
        else:
            from_h, to_h = d["from"], d["to"]
        host, _, port = d.get("peer", "").rpartition(":")
        resp = await self._request("BYE", d["remote_target"], [
            ("From", from_h), ("To", to_h), ("Call-ID", d["call_id"]), ("CSeq", f"{self.cseq} BYE")],
            to=(host, int(port)) if host else None)
        self.dialog = {}
        return resp.status

    # ---------------------------------------------------------------- calls (UAC)

    async def call(self, target: str, timeout: float = 60.0) -> SipMessage:
        """INVITE ``target`` via the PBX; return the final response (ACKed when 2xx). A digest
        challenge (401/407) is answered once with ``password`` when the UA has one."""
        self._new_rtp()
        assert self.rtp is not None
        await self.rtp.open()
        call_id = f"{uuid.uuid4().hex}@caller"
        tag = _tag()
        uri = f"sip:{target}@127.0.0.1:{self.server[1]}"
        from_h = f"<sip:{self.user}@127.0.0.1>;tag={tag}"
        auth: list[tuple[str, str]] = []
        for attempt in range(2):
            self.cseq += 1
            cseq = self.cseq
            self._invite = {"uri": uri, "call_id": call_id, "from": from_h, "cseq": str(cseq)}
            self._invite_branch = _tag()
            branch = self._invite_branch
            fut: asyncio.Future[SipMessage] = asyncio.get_running_loop().create_future()
            self._waiters[f"{branch}:INVITE"] = fut
            self.send(build(f"INVITE {uri} SIP/2.0", [
                ("Via", self._via(branch)), ("Max-Forwards", "70"), ("From", from_h), ("To", f"<{uri}>"),
                ("Call-ID", call_id), ("CSeq", f"{cseq} INVITE"),
                ("Contact", f"<sip:{self.user}@127.0.0.1:{self.port};transport={self.transport}>"), *auth,
                ("Content-Type", "application/sdp")], self.rtp.sdp(self.user)))
            try:
                async with asyncio.timeout(timeout):
                    resp = await fut
            finally:
                self._waiters.pop(f"{branch}:INVITE", None)
            ack_to = resp.header("To")
            ack_uri = re.sub(r"^.*<([^>]+)>.*$", r"\1", resp.header("Contact")) if resp.status < 300 else uri
            self.send(build(f"ACK {ack_uri} SIP/2.0", [
                ("Via", self._via(branch if resp.status >= 300 else None)), ("Max-Forwards", "70"),
                ("From", from_h), ("To", ack_to), ("Call-ID", call_id), ("CSeq", f"{cseq} ACK")]))
            if resp.status in (401, 407) and self.password and attempt == 0:
                name = "Authorization" if resp.status == 401 else "Proxy-Authorization"
                challenge = resp.header("WWW-Authenticate" if resp.status == 401 else "Proxy-Authenticate")
                auth = [(name, digest_response(challenge, "INVITE", uri, self.user, self.password))]
                continue
            break
        if resp.status < 300:
            remote = _sdp_media(resp.body)
            if remote:
                self.rtp.remote = remote
            self.dialog = {"call_id": call_id, "from": from_h, "to": ack_to, "remote_target": ack_uri, "role": "uac"}
        return resp

    def start_call(self, target: str, timeout: float = 60.0) -> asyncio.Task[SipMessage]:
        return asyncio.get_running_loop().create_task(self.call(target, timeout))

    async def cancel(self) -> None:
        inv = self._invite
        self.send(build(f"CANCEL {inv['uri']} SIP/2.0", [
            ("Via", self._via(self._invite_branch)), ("Max-Forwards", "70"), ("From", inv["from"]),
            ("To", f"<{inv['uri']}>"), ("Call-ID", inv["call_id"]), ("CSeq", f"{inv['cseq']} CANCEL")]))


def digest_response(challenge: str, method: str, uri: str, user: str, password: str) -> str:
    """An RFC 2617 ``Digest`` answer (MD5, qop=auth when offered) to a WWW-/Proxy-Authenticate."""
    import hashlib

    fields = {k: a or b for k, a, b in re.findall(r'(\w+)=(?:"([^"]*)"|([^,\s]+))', challenge.partition(" ")[2])}

    def md5(text: str) -> str:
        return hashlib.md5(text.encode()).hexdigest()

    realm, nonce = fields.get("realm", ""), fields.get("nonce", "")
    ha1, ha2 = md5(f"{user}:{realm}:{password}"), md5(f"{method}:{uri}")
    out = f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", algorithm=MD5'
    if "auth" in fields.get("qop", "").split(","):
        cnonce, nc = _tag(), "00000001"
        out += f', qop=auth, nc={nc}, cnonce="{cnonce}", response="{md5(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}")}"'
    else:
        out += f', response="{md5(f"{ha1}:{nonce}:{ha2}")}"'
    if "opaque" in fields:
        out += f', opaque="{fields["opaque"]}"'
    return out


def _sdp_media(body: str) -> tuple[str, int] | None:
    c = re.search(r"(?m)^c=IN IP4 (\S+)", body)
    m = re.search(r"(?m)^m=audio (\d+)", body)
    return (c.group(1), int(m.group(1))) if c and m else None


class _RtpProto(asyncio.DatagramProtocol):
    def __init__(self, peer: RtpPeer) -> None:
        self.peer = peer

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) >= 12:
            self.peer.received += 1


class RtpPeer:
    """Sends PCMU RTP and counts what comes back: enough to prove the audio path."""

    def __init__(self) -> None:
        self.port = 0
        self.remote: tuple[str, int] | None = None
        self.received = 0
        self.sent = 0
        self._t: asyncio.DatagramTransport | None = None
        self._seq = random.randint(0, 1000)
        self._ssrc = random.getrandbits(32)

    async def open(self) -> None:
        t, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _RtpProto(self), local_addr=("127.0.0.1", 0))
        self._t = t
        self.port = t.get_extra_info("sockname")[1]

    def sdp(self, user: str) -> str:
        return (f"v=0\r\no={user} 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                f"m=audio {self.port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n")

    async def send_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        ts = 0
        while time.monotonic() < end and self._t is not None and self.remote is not None:
            self._seq = (self._seq + 1) % 65536
            ts += 160
            pkt = struct.pack("!BBHII", 0x80, 0, self._seq, ts, self._ssrc) + b"\xff" * 160
            self._t.sendto(pkt, self.remote)
            self.sent += 1
            await asyncio.sleep(0.02)

    def close(self) -> None:
        if self._t is not None:
            with contextlib.suppress(Exception):
                self._t.close()
            self._t = None
