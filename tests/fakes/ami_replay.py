"""An AMI server that replays recorded wire text: for Asterisk versions that cannot run here
(chan_sip, Asterisk <= 20). It speaks the real framing to our real AmiClient; only the
answers are canned, from the documented chan_sip-era formats."""

from __future__ import annotations

import asyncio
import contextlib

from ari_push.ami_frames import AmiParser

UNKNOWN = "Response: Error\nActionID: {id}\nMessage: Invalid/unknown command\n\n"


class AmiReplay:
    def __init__(self, banner: str = "Asterisk Call Manager/2.10.6") -> None:
        self.banner = banner
        self.port = 0
        self.actions: list[dict[str, str]] = []
        self.replies: dict[str, str] = {}  # action name -> wire text, with {id} for the ActionID
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def emit(self, text: str) -> None:
        """Send an event to every connected client."""
        for w in self._writers:
            w.write(text.replace("\n", "\r\n").encode())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        writer.write(f"{self.banner}\r\n".encode())
        parser = AmiParser()
        parser.banner = "client"  # the client sends no banner
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(4096):
                for msg in parser.feed(data):
                    action = msg.as_dict()
                    self.actions.append(action)
                    name, aid = action.get("Action", ""), action.get("ActionID", "")
                    if name == "Login":
                        text = "Response: Success\nActionID: {id}\nMessage: Authentication accepted\n\n"
                    else:
                        text = self.replies.get(name, UNKNOWN)
                    writer.write(text.replace("{id}", aid).replace("\n", "\r\n").encode())
                    await writer.drain()
