"""The daemon against the real Asterisk and Redis: connects, survives restarts, stops on time."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from rig.asterisk import AsteriskInstance, Ports
from rig.redis import RedisServer
from tests.conftest import daemon_config, wait_for


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.text()


async def test_connects_to_ami_ari_and_redis_and_reports_ready(
    tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon
) -> None:
    rd = await start_daemon(daemon_config(tmp_path, ensure_asterisk, ensure_redis.url))
    d = rd.daemon
    await wait_for(lambda: d.redis_link.up, 10, "redis link up")
    assert d.ami.banner.startswith("Asterisk Call Manager/")
    info = await d.ari.call("asterisk_info")
    assert info["system"]["version"].startswith("22.")
    base = f"http://127.0.0.1:{d.health.port}"
    status, body = await _get(base + "/readyz")
    assert status == 200, body
    assert json.loads(body)["links"] == {
        "ami": {"state": "up", "reason": ""}, "ari": {"state": "up", "reason": ""},
        "redis": {"state": "up", "reason": ""}}
    assert (await _get(base + "/healthz"))[0] == 200
    status, metrics = await _get(base + "/metrics")
    assert status == 200 and 'ari_push_link_up{link="ami"} 1.0' in metrics


async def test_survives_an_asterisk_restart_and_logs_each_change_once(
    tmp_path: Path, ensure_asterisk: AsteriskInstance, start_daemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ari_push.links")
    rd = await start_daemon(daemon_config(tmp_path, ensure_asterisk))
    d = rd.daemon
    await asyncio.to_thread(ensure_asterisk.stop)
    await wait_for(lambda: not d.ami.link.up and not d.ari.link.up, 10, "links down")
    status, body = await _get(f"http://127.0.0.1:{d.health.port}/readyz")
    assert status == 503 and json.loads(body)["ready"] is False
    await asyncio.sleep(3)  # several reconnect attempts while Asterisk is away
    await asyncio.to_thread(ensure_asterisk.start)
    await wait_for(lambda: d.ami.link.up and d.ari.link.up, 20, "links back up")
    assert not rd.task.done(), "the daemon must not crash"
    lines = [r.getMessage() for r in caplog.records if r.name == "ari_push.links"]
    for link in ("ami", "ari"):
        downs = [m for m in lines if m.startswith(f"{link} link down")]
        ups = [m for m in lines if m.startswith(f"{link} link up")]
        assert len(downs) == 1, downs  # one line for the outage, however many retries
        assert len(ups) == 2, ups  # first connect, reconnect


async def test_survives_a_redis_restart(
    tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon
) -> None:
    rd = await start_daemon(daemon_config(tmp_path, ensure_asterisk, ensure_redis.url))
    d = rd.daemon
    await wait_for(lambda: d.redis_link.up, 10, "redis up")
    await asyncio.to_thread(ensure_redis.stop)
    await wait_for(lambda: not d.redis_link.up, 15, "redis link down")
    await asyncio.to_thread(ensure_redis.start)
    await wait_for(lambda: d.redis_link.up, 20, "redis link back")
    assert not rd.task.done()
    assert d.ami.link.up and d.ari.link.up


async def test_starts_while_asterisk_is_down_and_connects_when_it_comes_up(
    tmp_path: Path, asterisk_root: Path, start_daemon
) -> None:
    late = AsteriskInstance(asterisk_root, "late", Ports.for_index(1))
    late.write_config()
    rd = await start_daemon(daemon_config(tmp_path, late), wait_links=False)
    try:
        await asyncio.sleep(1.0)
        assert not rd.daemon.ami.link.up and not rd.daemon.ari.link.up
        assert "ConnectionRefused" in rd.daemon.ami.link.reason or "Connect" in rd.daemon.ami.link.reason
        await asyncio.to_thread(late.start)
        await wait_for(lambda: rd.daemon.ami.link.up and rd.daemon.ari.link.up, 20, "links up after start")
    finally:
        await rd.stop()
        await asyncio.to_thread(late.stop)


async def test_wrong_ami_secret_is_reported_not_looped_silently(
    tmp_path: Path, ensure_asterisk: AsteriskInstance, start_daemon
) -> None:
    config = daemon_config(tmp_path, ensure_asterisk, extra='[ami]\nsecret = "wrong-secret"\n')
    text = config.read_text().replace('secret = "rig-ami-secret"\n', "")
    config.write_text(text)
    rd = await start_daemon(config, wait_links=False)
    await wait_for(lambda: "login refused" in rd.daemon.ami.link.reason, 10, "login refused reason")
    assert "wrong-secret" not in rd.daemon.ami.link.reason
    await wait_for(lambda: rd.daemon.ari.link.up, 10, "ari still connects")


def test_sigterm_stops_the_daemon_within_its_bound(tmp_path: Path, ensure_asterisk: AsteriskInstance) -> None:
    config = daemon_config(tmp_path, ensure_asterisk, extra="shutdown_timeout = 3\n")
    # ARI_PUSH_* variables are configuration overrides for the daemon; the rig's slot is not one
    env = {k: v for k, v in os.environ.items() if k != "ARI_PUSH_RIG_SLOT"}
    with subprocess.Popen([sys.executable, "-m", "ari_push", "--config", str(config), "run"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        seen: list[str] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
                any("ari link up" in s for s in seen) and any("ami link up" in s for s in seen)):
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
        if not (any("ari link up" in s for s in seen) and any("ami link up" in s for s in seen)):
            proc.kill()
            pytest.fail("daemon never connected: " + "".join(seen[-20:]))
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
        took = time.monotonic() - started
        rest = proc.stdout.read()
    assert code == 0, rest
    assert took < 3 + 7, f"stopped in {took:.1f}s"  # proc.wait(10) is the real bound; this names it
    assert "ari-push stopped" in rest
    everything = "".join(seen) + rest
    assert "rig-ari-secret" not in everything and "rig-ami-secret" not in everything
