"""The composition root: builds every part from Settings, runs them, shuts them down.

Nothing else constructs connections. Every long-running task is owned by the TaskGroup in
``run``; a stop event (set by SIGTERM/SIGINT in the CLI, or by a test) ends it: stop taking
calls, drain waiting calls within ``shutdown_timeout``, close the links.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from ari_push.ami import AmiClient
from ari_push.ami_frames import AmiMessage
from ari_push.ari import AriClient
from ari_push.ari_outbound import AriOutboundServer, lift_bound
from ari_push.asterisk_pbx import AsteriskPbx
from ari_push.binding_cache import BindingCache, CachedPushPlanner, CachedStore
from ari_push.bindings import BindingStore, MemoryStore, RedisStore, StoreUnavailable
from ari_push.call_events import CallBroadcast, StasisStart, from_ari
from ari_push.calls import CallManager
from ari_push.capture import Capture
from ari_push.channels import DIALED
from ari_push.cluster import Cluster
from ari_push.console.access import Access
from ari_push.console.api import Console
from ari_push.contacts import ContactPolicy
from ari_push.health import HealthServer
from ari_push.links import LinkState
from ari_push.messages import MessageRelay, build_messages
from ari_push.metrics import Metrics
from ari_push.model import Binding, PushResult, mask
from ari_push.mwi import MwiNotifier, build_mwi
from ari_push.push.base import PushProvider
from ari_push.push.dispatch import PushDispatcher
from ari_push.push.factory import build_providers
from ari_push.push.fanout import Fanout
from ari_push.push.plan import MemoryPushPlanner, PushPlanner, RedisPushPlanner
from ari_push.push.routing import Router
from ari_push.redis_keys import Keys
from ari_push.refresh import AsteriskContacts, RefreshScheduler, build_refresh
from ari_push.refresh_store import MemorySchedule, RedisSchedule
from ari_push.sd_notify import notify
from ari_push.settings import RedisSettings, Settings
from ari_push.test_push import send_test_push
from ari_push.trace_recorder import build_traces
from ari_push.trace_routes import TraceRoutes
from ari_push.wakeups import RedisWakeups, WakeupHub

log = logging.getLogger("ari_push.service")


def make_redis(settings: RedisSettings) -> aioredis.Redis:
    """One Redis client, every command bounded: one retry, then StoreUnavailable upstream.

    Standalone (``url``: redis://, rediss://, unix://) or Sentinel (``sentinels``): with Sentinel
    every new connection asks the sentinels for the current master, and a connection that finds
    its master demoted (READONLY) is dropped, so the retry goes to the new master. ``tls`` (or a
    rediss:// URL) turns TLS on for the server and, with Sentinel, for the sentinels too. The
    Sentinel pool re-reads the master's address every second (redis_client.FollowMasterPool).
    Credentials go in keyword arguments only: nothing here puts a password into a URL, a repr
    or an error message.
    """
    common: dict[str, Any] = {
        "username": settings.username or None,
        "password": str(settings.password) or None,
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.socket_timeout,
        "retry": Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), 1),
        "health_check_interval": 15,
    }
    tls: dict[str, Any] = {}
    if settings.tls or settings.url.startswith("rediss://"):
        tls = {"ssl_ca_certs": settings.tls_ca_file or None, "ssl_certfile": settings.tls_cert_file or None,
               "ssl_keyfile": settings.tls_key_file or None}
    if settings.sentinels:
        from redis.asyncio.sentinel import Sentinel

        from ari_push.redis_client import FollowMasterPool, SentinelRedis

        hosts = []
        for h in settings.sentinels:
            host, _, port = h.rpartition(":")
            hosts.append((host.strip("[]"), int(port)))
        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": settings.socket_timeout,
            "socket_connect_timeout": settings.socket_timeout,
            "password": str(settings.sentinel_password) or None,
        }
        if tls:
            sentinel_kwargs.update(tls, ssl=True)
        sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
        master: aioredis.Redis = sentinel.master_for(
            settings.sentinel_service, redis_class=SentinelRedis, connection_pool_class=FollowMasterPool,
            **common, **tls, ssl=bool(tls))
        return master
    return aioredis.Redis.from_url(settings.url, **common, **tls)


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.node_id = settings.node_id or f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = Metrics()
        self.redis: aioredis.Redis | None = None
        self.redis_link = LinkState("redis")
        self.store: BindingStore
        self.wakeups: WakeupHub
        self.keys = Keys(settings.redis.key_prefix)
        self.planner: PushPlanner
        self.cache: BindingCache | None = None
        self.redis_store: RedisStore | None = None
        if settings.redis.embedded:
            memory = MemoryStore()
            self.store = memory
            self.wakeups = WakeupHub(self.node_id)
            self.planner = MemoryPushPlanner(memory, settings.push)
        else:
            self.redis = make_redis(settings.redis)
            self.redis_store = RedisStore(self.redis, self.keys, settings.capture.retention_days * 86400,
                                          settings.redis.wait_replicas, settings.redis.wait_timeout)
            # A Redis blink: calls are planned from what this daemon read or captured recently,
            # captures are written when Redis is back (binding_cache.py).
            self.cache = BindingCache(settings.redis.cache_max_age)
            self.store = CachedStore(self.redis_store, self.cache, max_devices=settings.capture.max_devices_per_aor)
            self.wakeups = RedisWakeups(self.redis, self.keys, self.node_id)
            self.planner = CachedPushPlanner(RedisPushPlanner(self.redis, self.keys, settings.push), self.cache)
        # MessageWaiting is in AMI's "call" class: asked for only when voicemail pushes are on
        self.ami = AmiClient(settings.ami, on_event=self._on_ami_event, on_connect=self._on_ami_connect,
                             events="system,call" if settings.mwi.enabled else "system")
        ari_link = AriOutboundServer if settings.ari.connection == "outbound" else AriClient
        self.ari = ari_link(settings.ari, on_event=self._on_ari_event, on_connect=self._on_ari_connect)
        self.policy = ContactPolicy.from_settings(settings.capture)
        self.capture = Capture(self.store, self.wakeups, self.policy, self.ami, self.metrics, self.node_id)
        self.providers: list[PushProvider] = build_providers(settings)
        self.capture.explain = Router(settings, self.providers).explain  # the capture log names the table
        # The rate limit of CALL pushes is taken by the planner, in the same round trip as the
        # bindings; the dispatcher only applies its verdicts.
        self.dispatcher = PushDispatcher(self.providers, on_token_dead=self._on_token_dead,
                                         fanout=Fanout.from_settings(settings))
        self.pbx = AsteriskPbx(self.ari, settings.ari.app)
        self.capture.user_agent_of = self.pbx.user_agent_of
        # Call traces (docs/operations.md): Redis or in process; fed by the calls and the dispatcher
        self.traces, self.tracer = build_traces(settings.traces, self.redis, self.keys.prefix, self.node_id,
                                                self.metrics, settings.cluster)
        self.dispatcher.observer = self.tracer.on_push
        self.calls = CallManager(settings, self.pbx, self.planner, self.dispatcher, self.wakeups, self.metrics,
                                 self.policy, self.tracer)
        self.cluster: Cluster | None = None
        if settings.cluster.mode != "single" and self.redis is not None:
            self.cluster = Cluster(settings.cluster, settings.ari.app, self.redis, self.keys, self.ari, self.node_id,
                                   calls=self.calls, may_take_calls=self._may_take_calls)
            if settings.cluster.mode == "lease":
                self.ari.gate = (self.cluster.lease_held, self.cluster.lease_lost)
        links = [self.ami.link, self.ari.link] + ([self.redis_link] if self.redis is not None else [])
        self.health = HealthServer(settings.http.listen, links, self.metrics,
                                   header_timeout=settings.http.header_timeout,
                                   max_connections=settings.http.max_connections,
                                   max_streams=settings.http.max_streams)
        # The operator's console (console/): pages and API on the health server, all behind one
        # access check (bearer/basic auth when configured, Host check, CSRF token for actions).
        self.access = Access(bearer_token=str(settings.http.auth_token), basic_auth=str(settings.http.basic_auth),
                             bound_host=self.health.host)
        self.health.guard, self.health.authenticated = self.access.check, self.access.authenticated
        self.console: Console | None = None
        if settings.http.console:
            self.console = Console(store=self.store, metrics=self.metrics, links=links, access=self.access,
                                   node_id=self.node_id, traces=self.traces,
                                   test_push=functools.partial(send_test_push, self.store, self.dispatcher))
            self.health.routes += self.console.routes()
        self.started = asyncio.Event()
        # Reachability (docs/reachability.md): registration-refresh pushes, voicemail pushes, SIP
        # MESSAGE to sleeping phones; each None when its section is off.
        r = settings.refresh
        schedule = (MemorySchedule(r.at_fraction, r.grace) if self.redis is None
                    else RedisSchedule(self.redis, self.keys, r.at_fraction, r.grace))
        self.refresh: RefreshScheduler | None = build_refresh(r, schedule, self.store, self.ari, self.ami,
                                                               self.dispatcher, self.policy, self.metrics)
        self.mwi: MwiNotifier | None = build_mwi(settings.mwi, self.redis, self.keys, self.store, self.ari,
                                                 self.dispatcher, self.metrics)
        self.messages: MessageRelay | None = build_messages(settings.messages, self.redis, self.keys, self.store,
                                                            AsteriskContacts(self.ari, self.ami), self.ari, self.ami,
                                                            self.dispatcher, self.metrics)
        if self.messages is not None:
            self.health.routes += self.messages.routes()
        if self.traces is not None:
            self.health.routes += TraceRoutes(self.traces).routes()
        self.capture.on_binding = self._on_binding
        self.capture.on_contact_status = self.calls.reach.on_status
        self.created_at = time.monotonic()
        self.ready_at: float | None = None

    # ---------------------------------------------------------------- wiring

    def _on_ami_event(self, msg: AmiMessage) -> None:
        self.capture.on_ami_event(msg)
        if self.mwi is not None:
            self.mwi.on_ami_event(msg)

    def _on_binding(self, binding: Binding, fresh: bool) -> None:  # capture -> refresh, messages
        if self.refresh is not None:
            self.refresh.on_binding(binding, fresh)
        if self.messages is not None:
            self.messages.on_binding(binding, fresh)

    async def _on_ami_connect(self) -> None:
        if self.refresh is not None:
            self.refresh.resync_soon()
        try:
            await self.capture.resync()
        except Exception as exc:  # resync is best effort; events keep flowing
            log.warning("contact resync failed: %s", exc)

    def _on_ari_event(self, raw: dict[str, Any]) -> None:
        event = from_ari(raw)  # the edge: ARI JSON becomes a typed event here, once
        if event is None:
            return
        if (isinstance(event, StasisStart) and isinstance(self.ari, AriOutboundServer)
                and not (event.args and event.args[0] == DIALED)):
            # the call is ari-push's now: its own deadline bounds it, not the dialplan's
            self.calls.spawn(lift_bound(self.ari, event.channel_id), f"lift-{event.channel_id}")
        if isinstance(event, CallBroadcast):
            if self.cluster is not None:
                self.calls.spawn(self.cluster.claim(event.channel_id), "claim")
            return
        self.calls.on_event(event)

    def _may_take_calls(self) -> bool:
        """Claim calls only when this daemon can serve them."""
        store_ok = self.redis is None or self.redis_link.up
        return not self.calls.draining and self.ami.link.up and store_ok

    async def _on_ari_connect(self) -> None:
        await self.calls.reconcile()

    async def _on_token_dead(self, binding: Binding, result: PushResult) -> None:
        since = result.dead_since if result.dead_since is not None else time.time()
        try:
            gone = await self.store.forget_if_stale(binding.aor, binding.device_id, since)
        except StoreUnavailable as exc:
            log.warning("could not drop the dead token of %s: %s", binding.aor, exc)
            return
        if gone:
            log.info("dropped device %s of %s: provider says token %s is dead (%s)", binding.device_id,
                     binding.aor, mask(binding.push.token), result.reason)

    # ---------------------------------------------------------------- lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        log.info("ari-push starting as node %s (store: %s)", self.node_id,
                 "embedded" if self.redis is None else "redis")
        providers = self.providers
        if self.settings.http.enabled:
            await self.health.start()
        inner_stop = asyncio.Event()  # links stop after the calls have drained
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.ami.run(inner_stop), name="ami")
                tg.create_task(self.ari.run(inner_stop), name="ari")
                tg.create_task(self.capture.run(inner_stop), name="capture")
                tg.create_task(self.calls.run(inner_stop), name="calls")
                tg.create_task(self._sweeper(inner_stop), name="sweeper")
                if self.traces is not None:
                    tg.create_task(self.traces.run(inner_stop), name="trace-writer")
                if self.refresh is not None:
                    tg.create_task(self.refresh.run(inner_stop), name="refresh")
                if self.mwi is not None:
                    tg.create_task(self.mwi.run(inner_stop), name="mwi")
                if self.messages is not None:
                    tg.create_task(self.messages.run(inner_stop), name="messages")
                if self.console is not None:
                    tg.create_task(self.console.run(inner_stop), name="console")
                if self.cluster is not None:
                    tg.create_task(self.cluster.run(inner_stop), name="cluster")
                if isinstance(self.wakeups, RedisWakeups):
                    tg.create_task(self.wakeups.run(inner_stop), name="wakeups")
                    tg.create_task(self._redis_monitor(inner_stop), name="redis-monitor")
                tg.create_task(self._warm(providers), name="warm-providers")
                self.started.set()
                tg.create_task(self._notify_ready(inner_stop), name="sd-notify")
                await stop.wait()
                notify("STOPPING=1\nSTATUS=draining waiting calls")
                log.info("stopping: no new calls; draining waiting calls (up to %.0fs)",
                         self.settings.shutdown_timeout)
                self.health.draining = True
                await self.calls.drain(self.settings.shutdown_timeout)
                inner_stop.set()
        finally:
            await self._close()
            log.info("ari-push stopped")

    async def _notify_ready(self, stop: asyncio.Event) -> None:
        """READY=1 to systemd (Type=notify) once the daemon can take a call: the links /readyz checks."""
        links = self.health.links
        while not stop.is_set():
            if all(link.up for link in links) and not self.health.draining:
                self.ready_at = time.monotonic()
                log.info("ready: taking calls (%.2fs after start)", self.ready_at - self.created_at)
                notify("READY=1\nSTATUS=taking calls")
                return
            await _first_up(links, stop)

    async def _warm(self, providers: list[PushProvider]) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await asyncio.gather(*(p.warm() for p in providers), return_exceptions=True)

    async def _close(self) -> None:
        await self.dispatcher.aclose()
        await self.ari.aclose()
        await self.health.stop()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()

    async def _redis_monitor(self, stop: asyncio.Event) -> None:
        assert self.redis is not None
        while not stop.is_set():
            try:
                async with asyncio.timeout(self.settings.redis.socket_timeout + 1):
                    await self.redis.ping()
                self.redis_link.set_up(self.settings.redis.url or "sentinel")
                if isinstance(self.store, CachedStore) and self.store.pending:
                    try:
                        await self.store.flush()
                    except StoreUnavailable as exc:
                        log.debug("bindings captured during the outage not written yet: %s", exc)
                if self.redis_store is not None and self.redis_store.unconfirmed:
                    left = await self.redis_store.confirm()
                    if left:
                        log.debug("%d binding(s) not yet on a replica; writing them again", left)
            except (aioredis.RedisError, OSError, TimeoutError) as exc:
                self.redis_link.set_down(f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # also how soon a Sentinel fail-over is noticed
                    await stop.wait()

    async def _sweeper(self, stop: asyncio.Event) -> None:
        """Retention: drop bindings whose device has not registered for retention_days."""
        retention = self.settings.capture.retention_days * 86400
        while not stop.is_set():
            try:
                n = await self.store.sweep(time.time() - retention)
                if n:
                    log.info("retention: dropped %d bindings not seen for %.0f days", n,
                             self.settings.capture.retention_days)
            except StoreUnavailable:
                pass
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(600):
                    await stop.wait()


async def _first_up(links: Sequence[LinkState], stop: asyncio.Event) -> None:
    """Wait until a link that is down comes up (or ``stop``), then return (the caller re-checks)."""
    waits = [asyncio.ensure_future(link.up_event.wait()) for link in links if not link.up]
    waits.append(asyncio.ensure_future(stop.wait()))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
