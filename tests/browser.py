"""Headless Chromium from Debian, driven by Debian's chromedriver over the W3C WebDriver protocol.

No browser or driver is ever downloaded: the binaries are /usr/bin/chromium and
/usr/bin/chromedriver (packages ``chromium`` and ``chromium-driver``, installed by
rig/provision.py). The protocol is spoken directly with aiohttp (a handful of commands), so
the daemon under test keeps running in the same event loop while the browser works.
chromedriver listens on 127.0.0.1 only; the browser gets a fresh empty profile and the flags
that keep it from calling anything but the console.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000"]


class WebDriverError(RuntimeError):
    pass


def available() -> str | None:
    """None when both binaries are there, else what is missing (the test fails with it)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    return f"missing {', '.join(missing)}: apt-get install chromium chromium-driver (make sandbox)" if missing else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Browser:
    def __init__(self, http: aiohttp.ClientSession, base: str, session_id: str, shots: Path) -> None:
        self.http = http
        self.base = f"{base}/session/{session_id}"
        self.shots = shots

    async def _cmd(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        async with self.http.request(method, self.base + path, json=body if body is not None else
                                     ({} if method == "POST" else None)) as resp:
            data = await resp.json()
        if resp.status != 200:
            raise WebDriverError(f"{method} {path}: {data.get('value', data)}")
        return data["value"]

    async def cdp(self, cmd: str, params: dict[str, Any] | None = None) -> Any:
        return await self._cmd("POST", "/goog/cdp/execute", {"cmd": cmd, "params": params or {}})

    async def set_headers(self, headers: dict[str, str]) -> None:
        """Extra headers on every request the page makes (navigation, fetch, EventSource)."""
        await self.cdp("Network.enable")
        await self.cdp("Network.setExtraHTTPHeaders", {"headers": headers})

    async def go(self, url: str) -> None:
        await self._cmd("POST", "/url", {"url": url})

    async def js(self, script: str, *args: Any) -> Any:
        return await self._cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    async def click(self, css: str) -> None:
        found = await self._cmd("POST", "/element", {"using": "css selector", "value": css})
        if ELEMENT not in found:
            raise WebDriverError(f"no element {css!r}: {found!r}")
        await self._cmd("POST", f"/element/{found[ELEMENT]}/click")

    async def text(self, css: str) -> str:
        return str(await self.js("const n = document.querySelector(arguments[0]); return n ? n.textContent : null;",
                                 css) or "")

    async def wait_js(self, script: str, timeout: float, what: str, *args: Any) -> Any:
        """Poll ``script`` (a function body returning a value) until it is truthy."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            last = await self.js(script, *args)
            if last:
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"browser: timed out waiting for {what} (last: {last!r})")
            await asyncio.sleep(0.1)

    async def screenshot(self, name: str) -> Path:
        data = await self._cmd("GET", "/screenshot")
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        path.write_bytes(base64.b64decode(data))
        return path


@contextlib.asynccontextmanager
async def chromium(shots: Path) -> AsyncIterator[Browser]:
    """chromedriver on a free loopback port, one headless Chromium session; both gone after."""
    missing = available()
    if missing:
        raise AssertionError(missing)
    port = _free_port()
    profile = tempfile.mkdtemp(prefix="ari-push-chromium-")
    log = shots.parent / "chromedriver.log"
    shots.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen([CHROMEDRIVER, f"--port={port}", "--allowed-ips=127.0.0.1"],
                                stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with http.get(f"{base}/status") as resp:
                        if (await resp.json())["value"]["ready"]:
                            break
                except (aiohttp.ClientError, KeyError, ValueError):
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError(f"chromedriver did not start (log: {log})")
                await asyncio.sleep(0.1)
            caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
                "binary": CHROMIUM, "args": [*FLAGS, f"--user-data-dir={profile}"]}}}}
            async with http.post(f"{base}/session", json=caps) as resp:
                data = await resp.json()
            if resp.status != 200:
                raise AssertionError(f"chromedriver refused the session: {data}")
            session = data["value"]["sessionId"]
            browser = Browser(http, base, session, shots)
            try:
                yield browser
            finally:
                with contextlib.suppress(Exception):
                    async with http.delete(f"{base}/session/{session}"):
                        pass
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)
        shutil.rmtree(profile, ignore_errors=True)
