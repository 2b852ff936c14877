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
from ari_push.call_events import ARI_EVENT_TYPES, CallBroadcast, StasisStart, from_ari
from ari_push.calls import CallManager
from ari_push.capture import Capture
from ari_push.channels import DIALED
from ari_push.cluster import Cluster, ClusterNode
from ari_push.console.access import Access
from ari_push.console.api import Console
from ari_push.contacts import ContactPolicy
from ari_push.esl import REGISTRATION_EVENTS, EslClient
from ari_push.esl_frames import EslEvent
from ari_push.freeswitch_pbx import CALL_EVENTS, FreeswitchPbx
from ari_push.fs_capture import FreeswitchCapture
from ari_push.fs_cluster import FreeswitchCluster, cluster_member
from ari_push.health import HealthServer
from ari_push.links import LinkState
from ari_push.messages import MessageRelay, build_messages
from ari_push.metrics import Metrics
from ari_push.model import Binding, PushResult, mask
from ari_push.mwi import MwiNotifier, build_mwi
from ari_push.pbx import Pbx, PbxError
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
from ari_push.settings import FreeswitchSettings, RedisSettings, Settings
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
    """The daemon. One PBX side is built behind the PBX port (docs/calls.md): Asterisk (``[ari]`` +
    ``[ami]``) or FreeSWITCH (``[freeswitch]``, one event socket for capture and calls,
    docs/freeswitch.md); the store, providers, dispatcher, call manager, cluster and health are the
    same for both."""

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
        self.policy = ContactPolicy.from_settings(settings.capture)
        self.providers: list[PushProvider] = build_providers(settings)
        # The rate limit of CALL pushes is taken by the planner, in the same round trip as the
        # bindings; the dispatcher only applies its verdicts.
        self.dispatcher = PushDispatcher(self.providers, on_token_dead=self._on_token_dead,
                                         fanout=Fanout.from_settings(settings))
        # The PBX side: its links, the capture feeding the shared Capture, the adapter behind the port.
        self.ami: AmiClient | None = None
        self.ari: AriClient | AriOutboundServer | None = None
        self.esl: EslClient | None = None
        self.fs_capture: FreeswitchCapture | None = None
        self.capture = Capture(self.store, self.wakeups, self.policy, None, self.metrics, self.node_id)
        self.capture.explain = Router(settings, self.providers).explain  # the capture log names the table
        self.pbx: Pbx
        self.calls: CallManager
        self.links: list[LinkState]  # what /readyz and READY=1 wait for: the PBX links (+ Redis)
        self.cluster: ClusterNode | None = None  # Cluster (Asterisk) or FreeswitchCluster
        # Call traces (docs/operations.md): Redis or in process; fed by the calls and the dispatcher
        self.traces, self.tracer = build_traces(settings.traces, self.redis, self.keys.prefix, self.node_id,
                                                self.metrics, settings.cluster)
        self.dispatcher.observer = self.tracer.on_push
        if settings.freeswitch is None:
            self._build_asterisk(settings)
        else:
            self._build_freeswitch(settings, settings.freeswitch)
        if self.redis is not None:
            self.links.append(self.redis_link)
        self.health = HealthServer(settings.http.listen, self.links, self.metrics,
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
            self.console = Console(store=self.store, metrics=self.metrics, links=self.links, access=self.access,
                                   node_id=self.node_id, traces=self.traces,
                                   test_push=functools.partial(send_test_push, self.store, self.dispatcher))
            self.health.routes += self.console.routes()
        self.started = asyncio.Event()
        # Reachability (docs/reachability.md): registration-refresh pushes, voicemail pushes, SIP
        # MESSAGE to sleeping phones; each None when its section is off. They read Asterisk's
        # contacts, mailboxes and AstDB: not built on FreeSWITCH yet (docs/freeswitch.md).
        self.refresh: RefreshScheduler | None = None
        self.mwi: MwiNotifier | None = None
        self.messages: MessageRelay | None = None
        if self.ami is not None and self.ari is not None:
            ari, ami = self.ari, self.ami
            r = settings.refresh
            schedule = (MemorySchedule(r.at_fraction, r.grace) if self.redis is None
                        else RedisSchedule(self.redis, self.keys, r.at_fraction, r.grace))
            self.refresh = build_refresh(r, schedule, self.store, ari, ami, self.dispatcher, self.policy, self.metrics)
            self.mwi = build_mwi(settings.mwi, self.redis, self.keys, self.store, ari, self.dispatcher, self.metrics)
            self.messages = build_messages(settings.messages, self.redis, self.keys, self.store,
                                           AsteriskContacts(ari, ami), ari, ami, self.dispatcher, self.metrics)
        else:
            off = [name for name, on in (("refresh", settings.refresh.enabled), ("mwi", settings.mwi.enabled),
                                         ("messages", settings.messages.enabled)) if on]
            if off:
                log.info("on FreeSWITCH [%s] are not available yet: off", "], [".join(off))
        if self.messages is not None:
            self.health.routes += self.messages.routes()
        if self.traces is not None:
            self.health.routes += TraceRoutes(self.traces).routes()
        self.capture.on_binding = self._on_binding
        self.capture.on_contact_status = self.calls.reach.on_status
        self.created_at = time.monotonic()
        self.ready_at: float | None = None

    def _build_asterisk(self, settings: Settings) -> None:
        """ARI for calls, AMI for capture (docs/architecture.md)."""
        # MessageWaiting is in AMI's "call" class: asked for only when voicemail pushes are on
        ami = self.ami = AmiClient(settings.ami, on_event=self._on_ami_event, on_connect=self._on_ami_connect,
                                   events="system,call" if settings.mwi.enabled else "system")
        ari_link = AriOutboundServer if settings.ari.connection == "outbound" else AriClient
        ari = self.ari = ari_link(settings.ari, on_event=self._on_ari_event, on_connect=self._on_ari_connect,
                                  event_types=ARI_EVENT_TYPES)
        self.capture.ami = ami
        pbx = AsteriskPbx(ari, settings.ari.app)
        self.pbx = pbx
        self.capture.contact_of = pbx.contact_details
        self.calls = CallManager(settings, pbx, self.planner, self.dispatcher, self.wakeups, self.metrics,
                                 self.policy, self.tracer)
        if settings.cluster.mode != "single" and self.redis is not None:
            cluster = self.cluster = Cluster(settings.cluster, settings.ari.app, self.redis, self.keys, ari,
                                             self.node_id, calls=self.calls, may_take_calls=self._may_take_calls)
            if settings.cluster.mode == "lease":
                ari.gate = (cluster.lease_held, cluster.lease_lost)
        self.links = [ami.link, ari.link]

    def _build_freeswitch(self, settings: Settings, fs: FreeswitchSettings) -> None:
        """One event socket carries capture and call control (docs/freeswitch.md)."""
        clustered = settings.cluster.mode != "single" and self.redis is not None
        member = cluster_member(settings.cluster, self.node_id) if clustered else ""
        esl = self.esl = EslClient(fs, on_event=self._on_esl_event, on_connect=self._on_esl_connect,
                                   events=CALL_EVENTS + REGISTRATION_EVENTS)
        self.fs_capture = FreeswitchCapture(self.capture, esl, fs.profile)
        pbx = FreeswitchPbx(esl, fs.profile, owner=member)
        self.pbx = pbx
        self.calls = CallManager(settings, pbx, self.planner, self.dispatcher, self.wakeups, self.metrics,
                                 self.policy, self.tracer)
        if clustered and self.redis is not None:
            self.cluster = FreeswitchCluster(settings.cluster, member, self.redis, self.keys, pbx, esl.link,
                                             self.node_id, calls=self.calls, may_take_calls=self._may_take_calls)
        self.links = [esl.link]

    # ---------------------------------------------------------------- wiring

    def _on_ami_event(self, msg: AmiMessage) -> None:
        self.capture.on_ami_event(msg)
        if self.mwi is not None:
            self.mwi.on_ami_event(msg)

    def _on_binding(self, binding: Binding, fresh: bool, expires: float | None) -> None:  # -> refresh, messages
        if self.refresh is not None:
            self.refresh.on_binding(binding, fresh, expires)
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
            if isinstance(self.cluster, Cluster):
                self.calls.spawn(self.cluster.claim(event.channel_id), "claim")
            return
        self.calls.on_event(event)

    def _on_esl_event(self, event: EslEvent) -> None:
        """FreeSWITCH: registration events go to the capture, channel events become the flow's events."""
        if event.subclass:
            assert self.fs_capture is not None
            self.fs_capture.on_esl_event(event)
            return
        assert isinstance(self.pbx, FreeswitchPbx)
        translated = self.pbx.events.translate(event)
        if translated is None:
            return
        if (isinstance(self.cluster, FreeswitchCluster) and isinstance(translated, StasisStart)
                and not (translated.args and translated.args[0] == DIALED)):
            # every daemon on this FreeSWITCH sees the park: the Redis claim picks one
            self.calls.spawn(self.cluster.claim_call(translated), f"claim-{translated.channel_id}")
            return
        self.calls.on_event(translated)

    async def _on_esl_connect(self) -> None:
        assert self.fs_capture is not None
        with contextlib.suppress(PbxError):  # reconcile tries again, and says why it cannot
            await self.calls.learn_pbx_id()
        await self.fs_capture.resync_quietly()
        self.wakeups.gap()  # waiting calls re-read what they may have missed while the link was down
        await self.calls.reconcile()

    def _may_take_calls(self) -> bool:
        """Claim calls only when this daemon can serve them (its capture link and store are up)."""
        store_ok = self.redis is None or self.redis_link.up
        capture = self.ami.link if self.ami is not None else self.esl.link if self.esl is not None else None
        return not self.calls.draining and capture is not None and capture.up and store_ok

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
        log.info("ari-push starting as node %s (PBX: %s, store: %s)", self.node_id,
                 "asterisk" if self.esl is None else "freeswitch", "embedded" if self.redis is None else "redis")
        providers = self.providers
        if self.settings.http.enabled:
            await self.health.start()
        inner_stop = asyncio.Event()  # links stop after the calls have drained
        try:
            async with asyncio.TaskGroup() as tg:
                if self.ami is not None and self.ari is not None:
                    tg.create_task(self.ami.run(inner_stop), name="ami")
                    tg.create_task(self.ari.run(inner_stop), name="ari")
                    tg.create_task(self.capture.run(inner_stop), name="capture")
                if self.esl is not None and self.fs_capture is not None:
                    tg.create_task(self.esl.run(inner_stop), name="freeswitch-esl")
                    tg.create_task(self.fs_capture.run(inner_stop), name="freeswitch-capture")
                tg.create_task(self.calls.run(inner_stop), name="calls")
                tg.create_task(self._sweeper(inner_stop), name="sweeper")
                if self.refresh is not None:
                    tg.create_task(self.refresh.run(inner_stop), name="refresh")
                if self.traces is not None:
                    tg.create_task(self.traces.run(inner_stop), name="trace-writer")
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
        links = self.links
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
        if self.ari is not None:
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
