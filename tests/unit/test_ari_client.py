"""The ARI client after aclose(): a late REST call fails as a down link and opens nothing.

Before, ``AriClient.session`` made a new aiohttp session whenever the old one was closed, so a
call task finishing after the daemon closed its links left an unclosed session and socket
behind (a ResourceWarning that later failed an unrelated test under ``filterwarnings = error``).
"""

from __future__ import annotations

import pytest
from aiohttp import web

from ari_push.ari import AriClient, AriError
from ari_push.settings import AriSettings, Secret


async def test_a_call_after_aclose_fails_and_opens_no_session() -> None:
    async def channels(_request: web.Request) -> web.Response:
        return web.json_response([])

    app = web.Application()
    app.router.add_get("/ari/channels", channels)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        client = AriClient(AriSettings(url=f"http://127.0.0.1:{port}", password=Secret("p")), on_event=lambda e: None)
        assert await client.call("list_channels") == []  # works while open
        await client.aclose()
        with pytest.raises(AriError, match="client closed") as info:
            await client.call("list_channels")
        assert info.value.status == 0  # handled like a link that is down
        assert client._session is not None and client._session.closed  # no new session was made
    finally:
        await runner.cleanup()
