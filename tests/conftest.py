"""Fixtures shared by every tier.

Integration fixtures start real parts: one Asterisk 22 (session-scoped, from the cached
Debian sid root) and one redis-server (session-scoped); each test gets its own AOR(s)
from the 3000-3199 block and its own Redis key prefix, so tests never see each other's
state. Daemons run in the test's event loop and are stopped by the fixture.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rig.asterisk import TEST_AOR_COUNT, TEST_AOR_FIRST, AsteriskInstance, Ports
from rig.redis import RedisServer

_aors = itertools.count(TEST_AOR_FIRST)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def asterisk_root() -> Path:
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (chroot into the Asterisk root); run `make unit` for the unit tier")
    from rig.provision import provision

    return provision()


@pytest.fixture(scope="session")
def asterisk(asterisk_root: Path) -> Iterator[AsteriskInstance]:
    inst = AsteriskInstance(asterisk_root, "t0", Ports.for_index(0))
    inst.write_config()
    inst.start()
    yield inst
    inst.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def ensure_asterisk(asterisk: AsteriskInstance) -> AsteriskInstance:
    """The session Asterisk, restarted if an earlier test stopped it."""
    if not asterisk.running:
        asterisk.start()
    return asterisk


@pytest.fixture
def ensure_redis(redis_server: RedisServer) -> RedisServer:
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    return redis_server


@pytest.fixture
def aor() -> str:
    """A push AOR no other test uses."""
    n = next(_aors)
    if n >= TEST_AOR_FIRST + TEST_AOR_COUNT:
        pytest.fail("out of test AORs: raise TEST_AOR_COUNT in rig/asterisk.py")
    return str(n)


@pytest.fixture
def aor2(aor: str) -> str:
    """A second AOR for tests that need two callees."""
    n = next(_aors)
    if n >= TEST_AOR_FIRST + TEST_AOR_COUNT:
        pytest.fail("out of test AORs: raise TEST_AOR_COUNT in rig/asterisk.py")
    return str(n)


def daemon_config(tmp_path: Path, asterisk: AsteriskInstance, redis_url: str = "", extra: str = "") -> Path:
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    text = asterisk.daemon_config(redis_url)
    if redis_url:
        text += f'key_prefix = "{prefix}"\n'
    text += '[http]\nlisten = "127.0.0.1:0"\n[ari]\nheartbeat = 2\nrequest_timeout = 3\n' \
            '[ami]\nheartbeat = 2\nrequest_timeout = 3\n'
    # lines of `extra` before its first [table] are top-level keys: they must come first
    lines = extra.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines) if line.lstrip().startswith("[")), len(lines))
    text = "".join(lines[:first]) + text + "".join(lines[first:])
    # merge duplicate tables: TOML forbids them, so later keys go into the first [section]
    path = tmp_path / "ari-push.toml"
    path.write_text(_merge_tables(text))
    return path


def _merge_tables(text: str) -> str:
    sections: dict[str, list[str]] = {"": []}
    order = [""]
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and not stripped.startswith("[["):
            current = stripped
            if current not in sections:
                sections[current] = []
                order.append(current)
            continue
        sections[current].append(line)
    out: list[str] = []
    for name in order:
        if name:
            out.append(name)
        out.extend(sections[name])
    return "\n".join(out) + "\n"


class RunningDaemon:
    def __init__(self, daemon: Any, task: asyncio.Task[None], stop: asyncio.Event) -> None:
        self.daemon = daemon
        self.task = task
        self.stop_event = stop

    async def stop(self, timeout: float = 15.0) -> float:
        started = time.monotonic()
        self.stop_event.set()
        async with asyncio.timeout(timeout):
            await self.task
        return time.monotonic() - started


@pytest.fixture
async def start_daemon() -> AsyncIterator[Callable[[Path], Awaitable[RunningDaemon]]]:
    """Start a Daemon from a config file in this loop; every one is stopped at teardown."""
    from ari_push.service import Daemon
    from ari_push.settings import load

    running: list[RunningDaemon] = []

    async def start(config: Path, wait_links: bool = True) -> RunningDaemon:
        settings = load(config, environ={})
        daemon = Daemon(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        rd = RunningDaemon(daemon, task, stop)
        running.append(rd)
        async with asyncio.timeout(10):
            await daemon.started.wait()
        if wait_links:
            await wait_for(lambda: daemon.ami.link.up and daemon.ari.link.up, 15, "daemon links up")
        return rd

    yield start
    problems: list[str] = []
    for rd in running:
        if rd.task.done():  # ended before teardown: fine if a test stopped it, not if it crashed
            if not rd.task.cancelled() and rd.task.exception() is not None:
                problems.append(f"the daemon task crashed: {rd.task.exception()!r}")
            continue
        try:
            await rd.stop()
        except BaseException as exc:
            problems.append(f"stopping the daemon failed: {exc!r}")
            if not rd.task.done():
                rd.task.cancel()
                with contextlib.suppress(BaseException):
                    await rd.task
    if problems:
        pytest.fail("; ".join(problems))


async def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll a condition in a test (never in the product): fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


# ---------------------------------------------------------------- FreeSWITCH (docs/freeswitch.md)


@pytest.fixture(scope="session")
def freeswitch() -> Iterator[Any]:
    """One FreeSWITCH 1.10.12 for the session (rig/freeswitch.py, instance index 0)."""
    if os.geteuid() != 0:
        pytest.fail("FreeSWITCH integration tests need root (provisioning installs runtime libraries)")
    from rig.freeswitch import FreeswitchInstance, FsPorts

    inst = FreeswitchInstance.provisioned("f0", FsPorts.for_index(0))
    inst.write_config()
    inst.start()
    yield inst
    inst.stop()


@pytest.fixture
def ensure_freeswitch(freeswitch: Any) -> Any:
    """The session FreeSWITCH, started again if an earlier test stopped it."""
    if not freeswitch.running:
        freeswitch.start()
    return freeswitch
