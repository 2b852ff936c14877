"""The ARI outbound websocket server (ari_outbound.py), its settings, and sd_notify readiness.

The server is the daemon's own, on 127.0.0.1; the client here plays Asterisk's
res_websocket_client (Basic auth, subprotocol "ari", the measured message order: a queued
StasisStart first, then ApplicationRegistered). The end-to-end behaviour with Asterisk 22 is
tests/integration/test_outages.py."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ari_push.ari_outbound import AriOutboundServer, check_basic_auth
from ari_push.sd_notify import notify
from ari_push.settings import AriSettings, Secret, SettingsError, load
from tests.conftest import wait_for

PASSWORD = "outbound-secret-1"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_basic_auth_check() -> None:
    assert check_basic_auth(basic("ari-push", PASSWORD), "ari-push", PASSWORD)
    assert not check_basic_auth(basic("ari-push", "wrong"), "ari-push", PASSWORD)
    assert not check_basic_auth(basic("other", PASSWORD), "ari-push", PASSWORD)
    assert not check_basic_auth("", "ari-push", PASSWORD)
    assert not check_basic_auth("Basic !!!not-base64", "ari-push", PASSWORD)
    assert not check_basic_auth("Bearer " + PASSWORD, "ari-push", PASSWORD)
    assert not check_basic_auth("Basic " + base64.b64encode(b"no-colon").decode(), "ari-push", PASSWORD)


class Served:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.connects = 0


@pytest.fixture
async def server() -> Any:
    served = Served()

    async def on_connect() -> None:
        served.connects += 1

    settings = AriSettings(password=Secret("x"), connection="outbound", outbound_listen="127.0.0.1:0",
                           outbound_password=Secret(PASSWORD), heartbeat=5)
    srv = AriOutboundServer(settings, on_event=served.events.append, on_connect=on_connect)
    stop = asyncio.Event()
    task = asyncio.create_task(srv.run(stop))
    await asyncio.wait_for(srv.listening.wait(), 5)
    yield srv, served
    stop.set()
    await asyncio.wait_for(task, 5)
    await srv.aclose()


async def test_asterisk_connecting_feeds_events_and_the_link(server: Any) -> None:
    srv, served = server
    url = f"http://127.0.0.1:{srv.port}/ari"
    async with aiohttp.ClientSession() as http:
        assert not srv.link.up
        ws = await http.ws_connect(url, protocols=("ari",), headers={"Authorization": basic("ari-push", PASSWORD)})
        assert ws.protocol == "ari"
        await ws.send_str(json.dumps({"type": "StasisStart", "channel": {"id": "c1"}, "args": ["1001"]}))
        await ws.send_str(json.dumps({"type": "ApplicationRegistered", "application": "ari-push"}))
        await ws.send_str("not json")  # logged and skipped
        await wait_for(lambda: len(served.events) == 2, 5, "events delivered")
        assert [e["type"] for e in served.events] == ["StasisStart", "ApplicationRegistered"]
        assert srv.link.up and served.connects == 1
        # Asterisk reconnects while the old socket is half-open: the new one replaces it
        ws2 = await http.ws_connect(url, protocols=("ari",), headers={"Authorization": basic("ari-push", PASSWORD)})
        closing = await asyncio.wait_for(ws.receive(), 5)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), "the old socket is closed"
        await ws2.send_str(json.dumps({"type": "StasisEnd", "channel": {"id": "c1"}}))
        await wait_for(lambda: len(served.events) == 3, 5, "event over the new socket")
        assert srv.link.up and served.connects == 2
        await ws2.close()
        await wait_for(lambda: not srv.link.up, 5, "link down when Asterisk leaves")
        await ws.close()


async def test_wrong_credentials_are_refused_and_counted(server: Any) -> None:
    srv, served = server
    url = f"http://127.0.0.1:{srv.port}/ari"
    async with aiohttp.ClientSession() as http:
        for headers in ({"Authorization": basic("ari-push", "guess")}, {}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await http.ws_connect(url, protocols=("ari",), headers=headers)
            assert err.value.status == 401
        async with http.get(url, headers={"Authorization": basic("ari-push", PASSWORD)}) as resp:
            assert resp.status == 400  # not a websocket upgrade
    assert srv.refused == 3 and not srv.link.up and served.events == []


GOOD = '[ari]\npassword = "ari-pass-123"\n[ami]\nsecret = "ami-secret-456"\n'


def test_outbound_settings_load_and_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "ari-push.toml"
    path.write_text(GOOD.replace("[ari]\n", '[ari]\nconnection = "outbound"\noutbound_password = "pw-1"\n'
                                            'outbound_listen = "127.0.0.1:9765"\n'))
    s = load(path, environ={})
    assert s.ari.connection == "outbound" and s.ari.outbound_listen == "127.0.0.1:9765"
    assert s.ari.outbound_path == "/ari" and str(s.ari.outbound_password) == "pw-1"
    cases = [
        ('connection = "outbound"\n', "ari.outbound_password", "is required"),
        ('connection = "both"\n', "ari.connection", "must be one of"),
        ('connection = "outbound"\noutbound_password = "p"\noutbound_listen = "9765"\n', "ari.outbound_listen",
         "HOST:PORT"),
        ('outbound_path = "ari"\n', "ari.outbound_path", "must start with /"),
    ]
    for extra, key, why in cases:
        path.write_text(GOOD.replace("[ari]\n", "[ari]\n" + extra))
        with pytest.raises(SettingsError) as err:
            load(path, environ={})
        assert err.value.key == key and why in str(err.value), (extra, err.value)
    path.write_text(GOOD.replace("[ari]\n", '[ari]\nconnection = "outbound"\noutbound_password = "p"\n'
                                            'app = "ari-push-a"\n') +
                    "[redis]\nurl = 'redis://127.0.0.1:6379'\n[cluster]\nmode = 'broadcast'\n")
    with pytest.raises(SettingsError) as err:
        load(path, environ={})
    assert err.value.key == "ari.connection" and "inbound" in str(err.value)
    path.write_text(GOOD + "[redis]\nurl = 'redis://127.0.0.1:6379'\ncache_max_age = 0\n")
    with pytest.raises(SettingsError) as err:
        load(path, environ={})
    assert err.value.key == "redis.cache_max_age"


def test_the_rig_slot_variable_is_not_a_setting(tmp_path: Path) -> None:
    path = tmp_path / "ari-push.toml"
    path.write_text(GOOD)
    assert load(path, environ={"ARI_PUSH_RIG_SLOT": "6"}).ari.connection == "inbound"


def test_sd_notify_sends_to_a_path_and_an_abstract_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        assert notify("READY=1\nSTATUS=taking calls", {"NOTIFY_SOCKET": str(path)})
        assert sock.recv(100) == b"READY=1\nSTATUS=taking calls"
    name = f"ari-push-test-{id(path)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"STOPPING=1"


def test_sd_notify_without_a_service_manager_does_nothing(tmp_path: Path) -> None:
    assert not notify("READY=1", {})
    assert not notify("READY=1", {"NOTIFY_SOCKET": "relative/path"})  # refused, logged
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})  # logged, not raised
