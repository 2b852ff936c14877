"""A small HTTP/2-over-TLS server for the fakes of the services that speak HTTP/2 (FCM, APNs).

TLS with ALPN ``h2`` only (a client that cannot speak HTTP/2 is refused at the handshake,
as the fake APNs does); each request is handed to an async handler as a :class:`H2Request`
and its :class:`H2Response` is written back. Every connection and every handler task is
owned by the server and ended by :meth:`H2Server.stop`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from tests.fakes.keys import Pki


@dataclass
class H2Request:
    method: str
    path: str
    headers: dict[str, str]  # the first value of each name
    body: bytes
    header_list: list[tuple[str, str]] = field(default_factory=list)  # as sent, repeats included
    peer_cn: str | None = None  # the client certificate's common name, when it showed one
    connection: int = 0  # which TLS connection (1, 2, ...: the handshake count when it was made)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()


@dataclass
class H2Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[H2Request], Awaitable[H2Response | None]]  # None: never answer (a stall)


class _Conn(asyncio.Protocol):
    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.streams: dict[int, tuple[list[tuple[str, str]], bytearray]] = {}
        self.number = 0
        self.peer_cn: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.handshakes += 1
        self.number = self.server.handshakes
        self.server._conns.add(self)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
            self.server.refused_connections += 1
            transport.close()
            return
        for rdn in (ssl_object.getpeercert() or {}).get("subject", ()):
            for name, value in rdn:
                if name == "commonName":
                    self.peer_cn = value
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000})
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._conns.discard(self)

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.streams[event.stream_id] = ([(str(k), str(v)) for k, v in event.headers or ()], bytearray())
            elif isinstance(event, h2.events.DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None and event.data:
                    stream[1].extend(event.data)
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                stream = self.streams.pop(event.stream_id, None)
                if stream is not None:
                    self.server._spawn(self._serve(event.stream_id, *stream))
            elif isinstance(event, h2.events.StreamReset):
                self.streams.pop(event.stream_id, None)
            elif isinstance(event, h2.events.ConnectionTerminated) and self.transport is not None:
                self.flush()
                self.transport.close()
                return
        self.flush()

    async def _serve(self, stream_id: int, header_list: list[tuple[str, str]], body: bytearray) -> None:
        headers: dict[str, str] = {}
        for name, value in header_list:
            headers.setdefault(name, value)
        request = H2Request(headers.get(":method", ""), headers.get(":path", ""), headers, bytes(body),
                            header_list, self.peer_cn, self.number)
        response = await self.server.handler(request)
        if response is None or self.transport is None or self.transport.is_closing():
            return
        out = [(":status", str(response.status)), *response.headers]
        if response.body:  # an empty answer has no DATA frame and no length (APNs' 200)
            out.append(("content-length", str(len(response.body))))
        try:
            if response.body:
                self.conn.send_headers(stream_id, out)
                self.conn.send_data(stream_id, response.body, end_stream=True)
            else:
                self.conn.send_headers(stream_id, out, end_stream=True)
        except h2.exceptions.ProtocolError:  # the client reset the stream meanwhile
            return
        self.flush()


class H2Server:
    """``client_ca``: ask clients for a certificate signed by it (optional, as APNs does:
    certificate-auth clients show one, token-auth ones do not)."""

    def __init__(self, pki: Pki, handler: Handler, *, client_ca: str = "") -> None:
        self.pki = pki
        self.handler = handler
        self.client_ca = client_ca
        self.handshakes = 0
        self.refused_connections = 0
        self.host = "127.0.0.1"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.pki.server_cert, self.pki.server_key)
        if self.client_ca:
            ctx.load_verify_locations(self.client_ca)
            ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.set_alpn_protocols(["h2"])
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Conn(self), host, port, ssl=ctx)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]

    def drop_connections(self) -> None:
        for conn in list(self._conns):
            if conn.transport is not None:
                conn.transport.abort()

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self.drop_connections()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
