"""Redis high availability, for real: Sentinel fail-over (manual and SIGKILL), AOF persistence
across restarts and crashes, AUTH, TLS and a least-privilege ACL user through ``make_redis``.

Every Redis here is Debian's redis-server / redis-sentinel on free loopback ports (rig/redis.py).
The measured gaps are printed (``pytest -s``), never asserted; docs/operations.md quotes them.

The fail-over tests run the product's own write path: the store a ``Daemon`` builds from
``[redis] wait_replicas = 1`` (``RedisStore``: upsert, ``seen`` index and ``WAIT`` in one
pipeline; a binding no replica acknowledged goes on ``RedisStore.unconfirmed``) and the
daemon's once-a-second ``_redis_monitor``, which calls ``RedisStore.confirm()`` to write the
unconfirmed ones again. Replication is asynchronous: a binding the master acknowledged but no
replica holds is lost when Sentinel promotes the replica, unless ``confirm()`` writes it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from ari_push.bindings import RedisStore, StoreUnavailable
from ari_push.model import Binding, PushParams
from ari_push.push.ratelimit import RedisRateLimiter
from ari_push.redis_keys import Keys
from ari_push.service import Daemon, make_redis
from ari_push.settings import RedisSettings, Secret, Settings, load
from ari_push.wakeups import RedisWakeups, Registration
from rig.redis import RedisServer, SentinelSet, TlsFiles, command, info
from tests.conftest import wait_for
from tests.fakes.keys import make_pki

Clients = Callable[[RedisSettings], aioredis.Redis]
PASSWORD = "s3cret-redis-pass-0123"  # a test password, checked never to leak


def binding(i: int, aor: str = "") -> Binding:
    now = time.time()
    return Binding(aor=aor or f"a{i}", endpoint=aor or f"a{i}",
                   push=PushParams("fcm", f"token-{i:05d}-{uuid.uuid4().hex}", "proj"),
                   contact_uri=f"sip:{i}@127.0.0.1:5060", user_agent="test", first_seen=now, last_seen=now)


@dataclass
class Writer:
    """Upserts one new binding every ``interval`` s through the product's store, recording what
    WAIT said about each (``store.unconfirmed`` right after the write)."""

    store: RedisStore
    interval: float = 0.01
    acked: dict[str, Binding] = field(default_factory=dict)  # on at least one replica
    unconfirmed: dict[str, Binding] = field(default_factory=dict)  # master said OK, WAIT said 0
    failures: list[tuple[float, str]] = field(default_factory=list)
    successes: list[float] = field(default_factory=list)
    running: bool = True

    async def run(self) -> None:
        i = 0
        while self.running:
            b = binding(i)
            i += 1
            at = time.monotonic()
            try:
                await self.store.upsert(b)
            except StoreUnavailable as exc:
                self.failures.append((at, str(exc)))
            else:
                self.successes.append(at)
                confirmed = (b.aor, b.device_id) not in self.store.unconfirmed
                (self.acked if confirmed else self.unconfirmed)[b.aor] = b
            await asyncio.sleep(self.interval)  # the write rate, not synchronisation

    def gap_after(self, t: float) -> float:
        """Time from ``t`` to the first successful write started after it."""
        return next(s for s in self.successes if s >= t) - t


async def missing(store: RedisStore, bindings: dict[str, Binding]) -> list[str]:
    out = []
    for aor, b in bindings.items():
        try:
            stored = await store.bindings_for(aor)
        except StoreUnavailable:
            out.append(aor)
            continue
        if [s.device_id for s in stored] != [b.device_id]:
            out.append(aor)
    return out


@contextlib.asynccontextmanager
async def daemon_store(settings: RedisSettings) -> AsyncIterator[tuple[Daemon, RedisStore]]:
    """The store and the Redis monitor (confirm() every second) of a Daemon built from settings."""
    daemon = Daemon(Settings(redis=settings))
    # the daemon's store is the Redis store behind its read-through cache (binding_cache.py)
    store = daemon.redis_store
    assert isinstance(store, RedisStore) and store.wait_replicas == settings.wait_replicas
    stop = asyncio.Event()
    monitor = asyncio.create_task(daemon._redis_monitor(stop))
    try:
        yield daemon, store
    finally:
        stop.set()
        await monitor  # a crash in the monitor fails the test here
        assert daemon.redis is not None
        await daemon.redis.aclose()
        await daemon.ari.aclose()


@pytest.fixture
def sentinel_set() -> Iterator[SentinelSet]:
    s = SentinelSet(password=PASSWORD, down_after_ms=1000, failover_timeout_ms=4000)
    try:
        s.start()
        yield s
    finally:
        s.cleanup()


@pytest.fixture
async def clients() -> AsyncIterator[Clients]:
    """make_redis, with every client closed at teardown even when the test fails."""
    made: list[aioredis.Redis] = []

    def make(settings: RedisSettings) -> aioredis.Redis:
        made.append(make_redis(settings))
        return made[-1]

    yield make
    for client in made:
        with contextlib.suppress(Exception):
            await client.aclose()


def sentinel_client_settings(s: SentinelSet, wait_replicas: int = 0, wait_timeout: float = 0.1) -> RedisSettings:
    return RedisSettings(sentinels=tuple(s.addresses), password=Secret(PASSWORD), socket_timeout=1.0,
                         key_prefix="ha:", wait_replicas=wait_replicas, wait_timeout=wait_timeout)


def no_secret_logged(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        assert PASSWORD not in record.getMessage()


# ---------------------------------------------------------------- (a) Sentinel fail-over


async def test_sentinel_manual_failover_loses_no_binding(
        clients: Clients, sentinel_set: SentinelSet, caplog: pytest.LogCaptureFixture) -> None:
    """SENTINEL FAILOVER under a steady write load. Sentinel promotes the replica in ~0.2 s but
    names it only ~1 s later, and leaves the old master a master until its next 10 s poll: writes
    that reach the old master meanwhile are thrown away by the promotion. WAIT said 0 for each,
    so they were on ``unconfirmed``, and the daemon's confirm() loop writes them again."""
    caplog.set_level(logging.DEBUG)
    settings = sentinel_client_settings(sentinel_set, wait_replicas=1, wait_timeout=0.1)
    async with daemon_store(settings) as (daemon, store):
        client = daemon.redis
        assert client is not None
        writer = Writer(store, interval=0.02)
        # a pattern subscription on the same client, as RedisWakeups holds one
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        await pubsub.psubscribe("ha:registered:*")
        published: list[float] = []
        received: set[float] = set()

        async def publish_and_listen() -> None:
            while writer.running:
                t = time.monotonic()
                with contextlib.suppress(redis.exceptions.RedisError):
                    await client.publish("ha:registered:1001", repr(t))
                    published.append(t)
                with contextlib.suppress(redis.exceptions.RedisError):
                    while (msg := await pubsub.get_message(timeout=0.05)) is not None:
                        received.add(float(msg["data"]))

        task = asyncio.create_task(writer.run())
        signals = asyncio.create_task(publish_and_listen())
        try:
            await wait_for(lambda: len(writer.acked) >= 5, 15, "writes confirmed by the replica")
            assert not writer.unconfirmed and not writer.failures, (len(writer.unconfirmed), writer.failures[:3])
            started = time.monotonic()
            old = await asyncio.to_thread(sentinel_set.failover)
            new = await asyncio.to_thread(sentinel_set.wait_new_master, old, 30)
            switched = time.monotonic()
            # the subscription follows the master too (without that it stays on the old master,
            # which gets none of the new master's messages until Sentinel demotes it ~10 s later)
            await wait_for(lambda: [t for t in published if t > switched + 1.5 and t in received], 20,
                           "a signal published on the new master and received")
            await wait_for(lambda: len([t for t in writer.successes if t > switched + 1.5]) >= 3, 20,
                           "writes after the fail-over")
        finally:
            writer.running = False
            await task
            await signals
            await pubsub.aclose()  # type: ignore[no-untyped-call]
        assert new != old
        written = {**writer.acked, **writer.unconfirmed}

        def on_new_master(b: Binding) -> bool:
            return command(new, "HEXISTS", Keys("ha:").bindings(b.aor), b.device_id, password=PASSWORD) == 1

        astray_before = [aor for aor, b in written.items() if not on_new_master(b)]
        # every binding WAIT did not confirm is written again by the daemon's confirm() loop
        await wait_for(lambda: _none_missing(store, written), 30, "every binding on the new master")
        assert [aor for aor, b in written.items() if not on_new_master(b)] == []
        assert set(astray_before) <= set(writer.unconfirmed), "a binding WAIT confirmed was lost"
    print(f"\nSENTINEL FAILOVER: sentinels named the new master after {switched - started:.2f}s; "
          f"{len(writer.failures)} writes failed; {len(writer.acked)} confirmed by WAIT, {len(writer.unconfirmed)} "
          f"not; {len(astray_before)} of those were dropped by the fail-over and written again by confirm(); "
          "0 lost")
    no_secret_logged(caplog)


async def _none_missing(store: RedisStore, bindings: dict[str, Binding]) -> bool:
    return await missing(store, bindings) == []


async def test_sigkill_master_fails_over_and_replicated_bindings_survive(
        clients: Clients, sentinel_set: SentinelSet, caplog: pytest.LogCaptureFixture) -> None:
    """The master crashes: writes fail (StoreUnavailable, never silently) until the sentinels
    agree it is down (down-after 1 s) and promote the replica; then they go to the new master."""
    caplog.set_level(logging.DEBUG)
    settings = sentinel_client_settings(sentinel_set, wait_replicas=1, wait_timeout=0.2)
    async with daemon_store(settings) as (_daemon, store):
        durable = {}
        for i in range(50):
            b = binding(i, f"d{i}")
            await store.upsert(b)
            durable[b.aor] = b
        assert store.unconfirmed == {}  # WAIT: the replica has every one of them
        master = sentinel_set.master()
        replica = next(s for s in sentinel_set.servers if s is not master)
        writer = Writer(store, interval=0.02)
        task = asyncio.create_task(writer.run())
        try:
            await wait_for(lambda: writer.successes, 10, "the writer running")
            killed_at = time.monotonic()
            await asyncio.to_thread(master.kill)
            new = await asyncio.to_thread(sentinel_set.wait_new_master, master.port, 30)
            promoted = time.monotonic() - killed_at
            await wait_for(lambda: len([s for s in writer.successes if s > killed_at + promoted]) >= 3, 30,
                           "writes to the new master")
        finally:
            writer.running = False
            await task
        assert new == replica.port
        gap = writer.gap_after(killed_at)
        reasons = {why.split(" connecting")[0].split(" : ")[0] for _, why in writer.failures}
        print(f"\nSIGKILL master: new master after {promoted:.2f}s (down-after 1.0s); first successful write "
              f"{gap:.2f}s after the kill; {len(writer.failures)} writes refused meanwhile: {sorted(reasons)}; "
              f"{len(writer.unconfirmed)} writes not confirmed by WAIT (no replica left)")
        assert writer.failures and all(why.startswith("redis: ") for _, why in writer.failures)
        assert await missing(store, durable) == []
        assert await missing(store, writer.acked) == []
        # after the promotion the new master has no replica: WAIT says so, the writes still stand,
        # and they stay on the daemon's list to be confirmed once a replica is back
        assert writer.unconfirmed and await missing(store, writer.unconfirmed) == []
        assert set(writer.unconfirmed) <= {aor for aor, _ in store.unconfirmed}
    no_secret_logged(caplog)


# ---------------------------------------------------------------- (b) persistence


@pytest.mark.parametrize("how", ["restart", "crash"])
async def test_appendonly_bindings_survive_a_redis_restart(
        clients: Clients, tmp_path: Path, how: str) -> None:
    server = RedisServer(workdir=tmp_path / "aof", appendonly=True,
                         extra_args=["--appendfsync", "everysec"])
    server.start()
    try:
        settings = RedisSettings(url=server.url, socket_timeout=1.0)
        client = clients(settings)
        store = RedisStore(client, Keys("aof:"), 86400)
        written = {f"p{i}": binding(i, f"p{i}") for i in range(20)}
        for b in written.values():
            await store.upsert(b)
        if how == "crash":
            server.kill()  # no shutdown work: the AOF has what write() put in the page cache
            server.start()
        else:
            server.restart()
        assert await missing(store, written) == []
        assert sorted(await store.aors()) == sorted(written)
    finally:
        server.cleanup()


async def test_without_persistence_a_crash_loses_every_binding(
        clients: Clients, tmp_path: Path) -> None:
    """The contrast that makes `appendonly yes` a requirement (docs/operations.md)."""
    server = RedisServer(workdir=tmp_path / "none", appendonly=False)
    server.start()
    try:
        client = clients(RedisSettings(url=server.url, socket_timeout=1.0))
        store = RedisStore(client, Keys("none:"), 86400)
        await store.upsert(binding(1, "gone"))
        server.kill()
        server.start()
        assert await store.bindings_for("gone") == []
    finally:
        server.cleanup()


# ---------------------------------------------------------------- (c) AUTH and TLS


async def test_auth_with_password_file_setting_round_trips(
        clients: Clients, tmp_path: Path) -> None:
    server = RedisServer(workdir=tmp_path / "auth", password=PASSWORD)
    server.start()
    try:
        (tmp_path / "redis.secret").write_text(PASSWORD + "\n")
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[ari]\npassword="x"\n[ami]\nsecret="y"\n[redis]\nurl="{server.url}"\n'
                       'password_file="redis.secret"\n')
        settings = load(cfg, environ={}).redis
        client = clients(settings)
        store = RedisStore(client, Keys("auth:"), 86400)
        b = binding(1, "auth1")
        await store.upsert(b)
        assert [x.device_id for x in await store.bindings_for("auth1")] == [b.device_id]

        # a password inside the URL is moved out of it by the settings loader
        url_cfg = tmp_path / "u.toml"
        url_cfg.write_text(f'[ari]\npassword="x"\n[ami]\nsecret="y"\n[redis]\n'
                           f'url="redis://default:{PASSWORD}@127.0.0.1:{server.port}/0"\n')
        from_url = load(url_cfg, environ={}).redis
        assert PASSWORD not in from_url.url and from_url.password == PASSWORD
        client = clients(from_url)
        assert await RedisStore(client, Keys("auth:"), 86400).aors() == ["auth1"]
    finally:
        server.cleanup()


@pytest.mark.parametrize("given", ["wrong", "none"])
async def test_wrong_password_is_a_clear_error_without_the_password(
        clients: Clients, tmp_path: Path, given: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = RedisServer(workdir=tmp_path / "auth", password=PASSWORD)
    server.start()
    wrong = "not-the-" + PASSWORD
    try:
        settings = RedisSettings(url=server.url, password=Secret(wrong if given == "wrong" else ""),
                                 socket_timeout=1.0)
        client = clients(settings)
        store = RedisStore(client, Keys("auth:"), 86400)
        with pytest.raises(StoreUnavailable) as err:
            await store.bindings_for("x")
        text = str(err.value)
        # redis-py 8 speaks RESP3: without a password its HELLO is refused ("... authenticated ...")
        assert ("invalid username-password" in text) if given == "wrong" else ("authenticated" in text)
        assert PASSWORD not in text and wrong not in text

        # the daemon's Redis link: down, with the same reason, on /readyz
        daemon = Daemon(Settings(redis=settings))
        stop = asyncio.Event()
        monitor = asyncio.create_task(daemon._redis_monitor(stop))
        try:
            async with asyncio.timeout(5):
                while daemon.redis_link.changes == 0:
                    await asyncio.sleep(0.02)
        finally:
            stop.set()
            await monitor
            assert daemon.redis is not None
            await daemon.redis.aclose()
            await daemon.ari.aclose()
        reason = daemon.redis_link.reason
        assert not daemon.redis_link.up and "AuthenticationError" in reason
        assert PASSWORD not in reason and wrong not in reason
        for record in caplog.records:
            assert PASSWORD not in record.getMessage() and wrong not in record.getMessage()
    finally:
        server.cleanup()


async def test_tls_with_client_certificate_and_auth(
        clients: Clients, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", client_common_name="ari-push")
    tls = TlsFiles(cert_file=pki.server_cert, key_file=pki.server_key, ca_file=pki.ca_file,
                   auth_clients="yes", client_file=pki.client_file)
    server = RedisServer(workdir=tmp_path / "tls", password=PASSWORD, tls=tls)
    server.start()
    try:
        assert server.url.startswith("rediss://")
        good = RedisSettings(url=server.url, password=Secret(PASSWORD), tls=True, tls_ca_file=str(pki.ca_file),
                             tls_cert_file=str(pki.client_file), socket_timeout=1.0)
        client = clients(good)
        store = RedisStore(client, Keys("tls:"), 86400)
        b = binding(1, "tls1")
        await store.upsert(b)
        assert [x.device_id for x in await store.bindings_for("tls1")] == [b.device_id]
        assert int(info(server.port, "stats", PASSWORD, tls)["total_connections_received"]) >= 1

        # a server certificate from another CA: refused, and the error says why
        other = make_pki(tmp_path / "other")
        client = clients(RedisSettings(url=server.url, password=Secret(PASSWORD), tls=True,
                                          tls_ca_file=str(other.ca_file), tls_cert_file=str(pki.client_file),
                                          socket_timeout=1.0))
        with pytest.raises(StoreUnavailable, match="certificate verify failed"):
            await RedisStore(client, Keys("tls:"), 86400).aors()

        # no client certificate while the server asks for one (tls-auth-clients yes): refused
        client = clients(RedisSettings(url=server.url, password=Secret(PASSWORD), tls=True,
                                          tls_ca_file=str(pki.ca_file), socket_timeout=1.0))
        with pytest.raises(StoreUnavailable):
            await RedisStore(client, Keys("tls:"), 86400).aors()
    finally:
        server.cleanup()


async def test_least_privilege_acl_from_the_security_doc(clients: Clients, tmp_path: Path) -> None:
    """The ACL user docs/security.md recommends can do all ari-push does (bindings, wake-up
    signals between daemons, the rate limit, WAIT) and nothing outside its prefix."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    line = next(x.strip() for x in doc.splitlines() if x.strip().startswith("ACL SETUSER ari-push "))
    rules = line.split()[3:]  # after "ACL SETUSER ari-push"
    assert ">APP-PASSWORD" in rules
    server = RedisServer(workdir=tmp_path / "acl", password=PASSWORD)  # the admin's password
    server.start()
    try:
        assert server.command("ACL", "SETUSER", "ari-push", *[">acl-" + PASSWORD if r == ">APP-PASSWORD" else r
                                                              for r in rules]) == "OK"
        settings = RedisSettings(url=server.url, username="ari-push", password=Secret("acl-" + PASSWORD))
        client, other = clients(settings), clients(settings)
        keys = Keys("ari-push:")
        store = RedisStore(client, keys, 86400, wait_replicas=1, wait_timeout=0.01)  # WAIT is allowed
        b = binding(1, "1001")
        await store.upsert(b)
        assert store.unconfirmed == {("1001", b.device_id): b}  # no replica here: WAIT said 0
        assert [x.device_id for x in await store.bindings_for("1001")] == [b.device_id]
        assert await store.aors() == ["1001"]
        assert await store.sweep(b.last_seen - 1) == 0  # seen since the cut-off: kept
        assert await store.forget_if_stale("1001", b.device_id, b.last_seen + 1)
        assert await store.bindings_for("1001") == []
        await store.upsert(b)
        assert await store.sweep(b.last_seen + 1) == 1 and await store.aors() == []  # retention

        limiter = RedisRateLimiter(client, "ari-push:", 6, 1)
        assert [await limiter.acquire("dev"), await limiter.acquire("dev")] == [True, False]
        assert not limiter._degraded

        wakeups, stop = RedisWakeups(client, keys, "node-a"), asyncio.Event()
        task = asyncio.create_task(wakeups.run(stop))
        try:
            with wakeups.watch("1001") as watch:
                reg = Registration("1001", "sip:1001@192.0.2.1", origin="node-b")
                async with asyncio.timeout(5):
                    while watch.queue.empty():  # until the subscription is in place
                        await RedisWakeups(other, keys, "node-b").publish(reg)
                        await asyncio.sleep(0.1)
                assert watch.queue.get_nowait() == reg  # not a GAP: the subscription was allowed
        finally:
            stop.set()
            await task

        with pytest.raises(redis.exceptions.NoPermissionError):
            await client.set("someone-else:key", "x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            await client.execute_command("FLUSHALL")
        with pytest.raises(redis.exceptions.NoPermissionError):
            await client.execute_command("CONFIG", "GET", "requirepass")
    finally:
        server.cleanup()


async def test_daemon_stops_within_its_bound_when_every_sentinel_is_gone(sentinel_set: SentinelSet) -> None:
    from ari_push.settings import AmiSettings, AriSettings, HttpSettings

    settings = Settings(redis=sentinel_client_settings(sentinel_set),
                        ari=AriSettings(url="http://127.0.0.1:9", password=Secret("x")),
                        ami=AmiSettings(port=9, secret=Secret("x")), http=HttpSettings(listen="127.0.0.1:0"))
    daemon, stop = Daemon(settings), asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await wait_for(lambda: daemon.redis_link.up, 15, "redis up through the sentinels")
        await asyncio.to_thread(sentinel_set.cleanup)  # the whole Redis side is gone
        stop.set()
        async with asyncio.timeout(10):  # shutdown_timeout (10 s) with no call to drain: a generous bound
            await asyncio.shield(task)
    finally:
        stop.set()
        async with asyncio.timeout(60):
            await task
