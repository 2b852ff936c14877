"""The operator's console in a real headless Chromium, against the real rig (Asterisk, Redis, the
daemon, a local vendor push service): what an admin sees and can do, as they would use it.

Screenshots of every page go to ``<tmp_path>/screenshots/``; with ``ARI_PUSH_RIG_UPDATE_SCREENSHOT=1``
the timeline's is also copied to docs/console-timeline.png (the README's picture).
"""
# ruff: noqa: F811 (pytest fixtures imported from test_calls are parameters here)

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from rig.asterisk import AsteriskInstance
from rig.redis import RedisServer
from rig.sipua import SipUA
from tests.browser import chromium
from tests.conftest import daemon_config
from tests.integration.test_calls import PushEndpoint, hang_up_and_check, push_endpoint, sleeping_phone  # noqa: F401

USER, PASSWORD = "admin", "s3cret-console-pass"
AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
DOCS_SHOT = Path(__file__).resolve().parents[2] / "docs" / "console-timeline.png"


@pytest.fixture
async def console_daemon(tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon):
    secret = tmp_path / "console.basic"
    secret.write_text(f"{USER}:{PASSWORD}\n")
    secret.chmod(0o600)
    extra = ('[capture]\nvendor_allowed_hosts = ["127.0.0.1:*"]\n'
             '[calls]\ndefault_timeout = 30\n'
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
                                                 push_endpoint: PushEndpoint, aor: str, tmp_path: Path) -> None:
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


async def test_a_call_live_its_timeline_and_a_test_push(console_daemon, ensure_asterisk: AsteriskInstance,
                                                        push_endpoint: PushEndpoint, aor: str, tmp_path: Path) -> None:
    daemon = console_daemon.daemon
    base = f"http://127.0.0.1:{daemon.health.port}"
    phone = await sleeping_phone(ensure_asterisk, aor, push_endpoint, daemon.store)
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    async with chromium(tmp_path / "screenshots") as browser:
        await browser.set_headers({"Authorization": AUTH})
        await browser.go(f"{base}/console#/calls")
        await browser.wait_js("return document.body.dataset.loaded === 'calls' && "
                              "document.getElementById('live').classList.contains('on');", 30, "the calls page, live")

        # the call rings the sleeping phone: it shows up in flight while the caller waits
        answer = caller.start_call(aor)
        await asyncio.wait_for(push_endpoint.on_call.get(), 15)
        call_id = await browser.wait_js(
            "const r = [...document.querySelectorAll('#calls-live tr[data-call]')]"
            "  .find(r => r.cells[2].textContent === arguments[0]); return r ? r.dataset.call : null;",
            30, "the waiting call in the in-flight table", aor)
        [trace] = await daemon.traces.find(aor=aor, limit=1)
        assert trace.call_id == call_id and trace.in_flight
        assert not answer.done()  # still waiting for the phone
        await browser.screenshot("calls-in-flight")

        # the phone wakes, re-registers, answers, hangs up; the call leaves the in-flight table
        await asyncio.sleep(0.2)
        await phone.open(0)
        assert await phone.register() == 200
        await asyncio.wait_for(phone.invites.get(), 10)
        assert (await asyncio.wait_for(answer, 15)).status == 200
        await hang_up_and_check(phone, caller, ensure_asterisk)
        await browser.wait_js("return !document.querySelector(`#calls-live tr[data-call=\"${arguments[0]}\"]`) && "
                              "!!document.querySelector(`#calls tr[data-call=\"${arguments[0]}\"]`);", 30,
                              "the call among the last calls", call_id)
        await browser.screenshot("calls")

        # its timeline: the push and the re-REGISTER drawn on the time axis, with their times
        await browser.go(f"{base}/console#/call/{call_id}")
        events = await browser.wait_js(
            "if (document.body.dataset.loaded !== 'call') return null;"
            "const evs = [...document.querySelectorAll('#timeline svg g.ev')].map(g => ({kind: g.dataset.kind,"
            "  t: Number(g.dataset.tMs), x: Number(g.querySelector('[data-x]').dataset.x), text: g.textContent}));"
            "return evs.some(e => e.kind === 'register') && evs.some(e => e.kind === 'bridge') ? evs : null;",
            30, "the timeline with the re-REGISTER and the bridge")
        push = next(e for e in events if e["kind"] == "push")
        register = next(e for e in events if e["kind"] == "register")
        assert "push vendor call delivered" in push["text"] and f"+{push['t']:.0f} ms" in push["text"]
        assert "re-REGISTER (new URI)" in register["text"] and f"+{register['t']:.0f} ms" in register["text"]
        assert 0 <= push["t"] < register["t"]
        assert push["x"] < register["x"]  # drawn in time order on the axis
        status = await browser.wait_js("return document.getElementById('call-status')?.textContent === 'ANSWERED' "
                                       "&& 'ANSWERED';", 30, "the final status")
        assert status == "ANSWERED"
        shot = await browser.screenshot("call-timeline")
        if os.environ.get("ARI_PUSH_RIG_UPDATE_SCREENSHOT") == "1":  # the README's picture, when asked
            shutil.copyfile(shot, DOCS_SHOT)

        # the overview counts the call and its push
        await browser.go(f"{base}/console#/overview")
        await browser.wait_js("return document.body.dataset.loaded === 'overview';", 30, "the overview")
        pushes = await browser.js("return [...document.querySelectorAll('#pushes tbody tr')]"
                                  ".map(r => [...r.cells].map(c => c.textContent));")
        assert ["vendor", "call", "delivered", "1"] in pushes
        assert "ANSWERED: 1" in await browser.text("#calls-by-status")
        rates = await browser.js("return [...document.querySelectorAll('#error-rates tbody tr')]"
                                 ".map(r => [...r.cells].map(c => c.textContent));")
        assert rates == [["vendor", "1", "0", "0", "0.0 %"]]
        await browser.screenshot("overview-after-a-call")

        # the test-push button reaches the local push service, and the page shows its answer
        await browser.go(f"{base}/console#/devices?aor={aor}")
        await browser.wait_js("return document.querySelectorAll('#devices tbody tr[data-device]').length;", 30,
                              "the device row")
        last = await browser.text("#devices tbody tr[data-device] td:nth-child(8)")
        assert "call" in last and "delivered" in last  # the device's last push, from the trace
        before = len(push_endpoint.pushes)
        await browser.click("#devices tbody tr[data-device] button.test-push")
        result = await browser.wait_js("const t = document.getElementById('action-result').textContent;"
                                       "return t.includes('→') ? t : null;", 30, "the test push's answer")
        assert "vendor refresh → delivered in" in result and "[object" not in result
        assert len(push_endpoint.pushes) == before + 1 and push_endpoint.pushes[-1]["type"] == "refresh"
        await browser.screenshot("devices-test-push")
