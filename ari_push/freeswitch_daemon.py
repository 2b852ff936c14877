"""The FreeSWITCH side of the daemon: one event socket link carrying capture and call control,
the shared call manager and flow behind ``FreeswitchPbx``, the shared store, planner and providers.

This is the composition service.py does for Asterisk, for a ``[freeswitch]`` configuration; it is
kept apart until the composition root takes it in (docs/freeswitch.md). Single-node only for now
(no ``[cluster]`` claims).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time

import redis.asyncio as aioredis

from ari_push.bindings import BindingStore, MemoryStore, RedisStore, StoreUnavailable
from ari_push.calls import CallManager
from ari_push.capture import Capture
from ari_push.contacts import ContactPolicy
from ari_push.esl import REGISTRATION_EVENTS, EslClient
from ari_push.esl_frames import EslEvent
from ari_push.freeswitch_pbx import CALL_EVENTS, FreeswitchPbx
from ari_push.fs_capture import FreeswitchCapture
from ari_push.metrics import Metrics
from ari_push.model import Binding, PushResult, mask
from ari_push.push.dispatch import PushDispatcher
from ari_push.push.factory import build_providers
from ari_push.push.plan import MemoryPushPlanner, PushPlanner, RedisPushPlanner
from ari_push.redis_keys import Keys
from ari_push.service import make_redis
from ari_push.settings import Settings
from ari_push.trace_recorder import build_traces
from ari_push.wakeups import RedisWakeups, WakeupHub

log = logging.getLogger("ari_push.freeswitch")


class FreeswitchDaemon:
    def __init__(self, settings: Settings) -> None:
        if settings.freeswitch is None:
            raise ValueError("FreeswitchDaemon needs a [freeswitch] section")
        self.settings = settings
        fs = settings.freeswitch
        self.node_id = settings.node_id or f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = Metrics()
        self.redis: aioredis.Redis | None = None
        self.store: BindingStore
        self.wakeups: WakeupHub
        self.planner: PushPlanner
        keys = Keys(settings.redis.key_prefix)
        if settings.redis.embedded:
            memory = MemoryStore()
            self.store, self.wakeups = memory, WakeupHub(self.node_id)
            self.planner = MemoryPushPlanner(memory, settings.push)
        else:
            self.redis = make_redis(settings.redis)
            self.store = RedisStore(self.redis, keys, settings.capture.retention_days * 86400,
                                    settings.redis.wait_replicas, settings.redis.wait_timeout)
            self.wakeups = RedisWakeups(self.redis, keys, self.node_id)
            self.planner = RedisPushPlanner(self.redis, keys, settings.push)
        self.policy = ContactPolicy.from_settings(settings.capture)
        self.esl = EslClient(fs, on_event=self._on_event, on_connect=self._on_connect,
                             events=CALL_EVENTS + REGISTRATION_EVENTS)
        self.capture = Capture(self.store, self.wakeups, self.policy, None, self.metrics, self.node_id)
        self.feed = FreeswitchCapture(self.capture, self.esl, fs.profile)
        self.pbx = FreeswitchPbx(self.esl, fs.profile)
        self.dispatcher = PushDispatcher(build_providers(settings), on_token_dead=self._on_token_dead)
        self.traces, tracer = build_traces(settings.traces, self.redis, keys.prefix, self.node_id, self.metrics,
                                           settings.cluster)
        self.dispatcher.observer = tracer.on_push
        self.calls = CallManager(settings, self.pbx, self.planner, self.dispatcher, self.wakeups, self.metrics,
                                 self.policy, tracer)
        self.started = asyncio.Event()

    def _on_event(self, event: EslEvent) -> None:
        if event.subclass:
            self.feed.on_esl_event(event)
            return
        translated = self.pbx.events.translate(event)
        if translated is not None:
            self.calls.on_event(translated)

    async def _on_token_dead(self, binding: Binding, result: PushResult) -> None:
        since = result.dead_since if result.dead_since is not None else time.time()
        try:
            if await self.store.forget_if_stale(binding.aor, binding.device_id, since):
                log.info("dropped device %s of %s: provider says token %s is dead (%s)", binding.device_id,
                         binding.aor, mask(binding.push.token), result.reason)
        except StoreUnavailable as exc:
            log.warning("could not drop the dead token of %s: %s", binding.aor, exc)

    async def _on_connect(self) -> None:
        await self.feed.resync_quietly()
        self.wakeups.gap()
        await self.calls.reconcile()

    async def run(self, stop: asyncio.Event) -> None:
        inner_stop = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.esl.run(inner_stop), name="freeswitch-esl")
                tg.create_task(self.feed.run(inner_stop), name="freeswitch-capture")
                tg.create_task(self.calls.run(inner_stop), name="calls")
                if self.traces is not None:
                    tg.create_task(self.traces.run(inner_stop), name="trace-writer")
                if isinstance(self.wakeups, RedisWakeups):
                    tg.create_task(self.wakeups.run(inner_stop), name="wakeups")
                self.started.set()
                await stop.wait()
                await self.calls.drain(self.settings.shutdown_timeout)
                inner_stop.set()
        finally:
            await self.dispatcher.aclose()
            if self.redis is not None:
                with contextlib.suppress(Exception):
                    await self.redis.aclose()
