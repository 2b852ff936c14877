"""The operator's console in a real headless Chromium, against the real rig (Asterisk, Redis, the
daemon, a local vendor push service): what an admin sees and can do, as they would use it.

Screenshots of every page go to ``<tmp_path>/screenshots/``.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from rig.asterisk import AsteriskInstance
from rig.redis import RedisServer
from tests.browser import chromium
from tests.conftest import daemon_config
from tests.integration.test_calls import PushEndpoint, push_endpoint, sleeping_phone, wake_on_push  # noqa: F401


USER, PASSWORD = "admin", "s3cret-console-pass"
AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
DOCS_SHOT = Path(__file__).resolve().parents[2] / "docs" / "console-timeline.png"


@pytest.fixture
async def console_daemon(tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon):
    secret = tmp_path / "console.basic"
    secret.write_text(f"{USER}:{PASSWORD}\n")
    secret.chmod(0o600)
    extra = ('[capture]\nvendor_allowed_hosts = ["127.0.0.1:*"]\n'
             '[calls]\ndefault_timeout = 12\n'
             f'[http]\nbasic_auth_file = "{secret}"\n'
             '[vendor]\nbody_template = \'{"type":"{kind}","call_id":"{call_id}","caller":"{caller_number}"}\'\n')
    config = daemon_config(tmp_path, ensure_asterisk, ensure_redis.url, extra)
    rd = await start_daemon(config)
    rd.config = config
    return rd


def cli(config: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "ari_push", "--config", str(config), *args],
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout


async def test_devices_page_auth_csrf_and_forget(console_daemon, ensure_asterisk: AsteriskInstance,
                                                 push_endpoint: PushEndpoint, aor: str, tmp_path: Path) -> None:  # noqa: F811  # noqa: F811
    daemon = console_daemon.daemon
    base = f"http://127.0.0.1:{daemon.health.port}"
    shots = tmp_path / "screenshots"
    async with chromium(shots) as browser:
        # no credentials: refused, nothing of the console shown
        # (Chromium shows its login prompt, which headless leaves empty: the console never loads)
        await browser.go(f"{base}/console#/devices")
        assert "Devices" not in await browser.text("body")
        await browser.screenshot("refused-without-auth")
        async with aiohttp.ClientSession() as http:
            for headers in ({}, {"Authorization": "Basic " + base64.b64encode(b"admin:wrong").decode()},
                            {"Authorization": "Bearer " + PASSWORD}):
                for path in ("/console", "/api/devices?aor=" + aor, "/metrics"):
                    async with http.get(base + path, headers=headers) as resp:
                        assert resp.status == 401, (path, headers)
                        assert resp.headers["WWW-Authenticate"].startswith("Basic")
                        assert PASSWORD not in await resp.text()
            async with http.get(base + "/readyz") as resp:
                assert resp.status == 200  # probes stay open
        await browser.set_headers({"Authorization": AUTH})

        # the phone registers: the devices page lists it, token masked exactly as the CLI does
        await sleeping_phone(ensure_asterisk, aor, push_endpoint, daemon.store)
        await browser.go(f"{base}/console#/devices?aor={aor}")
        await browser.wait_js("return document.body.dataset.loaded === 'devices' && "
                              "document.querySelectorAll('#devices tbody tr[data-device]').length;", 30,
                              "the device row")
        [binding] = await daemon.store.bindings_for(aor)
        row = await browser.js("const r = document.querySelector('#devices tbody tr[data-device]');"
                               "return [r.dataset.device, ...[...r.cells].map(c => c.textContent)];")
        listed = cli(console_daemon.config, "tokens", "list", aor).strip().split("\t")
        assert row[0] == binding.device_id and row[2] == "vendor"
        assert row[3] == listed[3]  # the CLI's masked token, character for character
        assert binding.push.token not in json.dumps(row)
        assert row[4] == "zoiper"
        await browser.screenshot("devices")

        # a POST without the CSRF token, or not JSON, is refused, and the device stays
        refused = await browser.js(
            "const post = (h, b) => fetch('/api/devices/forget', {method: 'POST', headers: h, body: b})"
            "  .then(r => r.status);"
            "return Promise.all([post({'Content-Type': 'application/json'}, JSON.stringify({aor: arguments[0]})),"
            "  post({'Content-Type': 'text/plain', 'X-CSRF-Token': document.querySelector('meta[name=csrf-token]')"
            "    .content}, JSON.stringify({aor: arguments[0]})),"
            "  post({'Content-Type': 'application/json', 'X-CSRF-Token': 'forged'},"
            "    JSON.stringify({aor: arguments[0]}))]);",
            aor)
        assert refused == [403, 415, 403]
        assert len(await daemon.store.bindings_for(aor)) == 1

        # the forget button (with the page's token) drops it
        await browser.js("window.confirm = () => true;")
        await browser.click("#devices tbody tr[data-device] button.forget")
        await browser.wait_js("return document.getElementById('action-result').textContent.includes('forgot 1');",
                              30, "the forget answer")
        assert await daemon.store.bindings_for(aor) == []
        await browser.wait_js("return document.querySelectorAll('#devices tbody tr[data-device]').length === 0;", 30,
                              "the row gone")


async def test_overview_page(console_daemon, tmp_path: Path) -> None:
    daemon = console_daemon.daemon
    async with chromium(tmp_path / "screenshots") as browser:
        await browser.set_headers({"Authorization": AUTH})
        await browser.go(f"http://127.0.0.1:{daemon.health.port}/console#/overview")
        await browser.wait_js("return document.body.dataset.loaded === 'overview';", 30, "the overview")
        links = await browser.js("return [...document.querySelectorAll('#links li')].map(l => l.textContent);")
        assert sorted(links) == ["ami: up", "ari: up", "redis: up"]
        await browser.wait_js("return document.getElementById('live').classList.contains('on');", 30,
                              "the live event stream open")
        assert daemon.health.open_streams == 1
        await browser.screenshot("overview")
