"""Several daemons on one Redis (docs/clustering.md).

- Every daemon announces itself (its Stasis app name) in a Redis ZSET scored by Redis' own
  clock, every ``heartbeat`` seconds; a daemon silent for ``node_ttl`` is dead.
- ``broadcast`` mode: calls come with StasisBroadcast(); every live daemon may claim; Asterisk
  gives the call to the first claim. A janitor on every daemon adopts the channels of dead
  daemons: waiting callers are moved into its own app (and handled afresh), orphan legs are
  hung up. One daemon adopts a channel (SET NX).
- ``lease`` mode (Asterisk without StasisBroadcast): one app name, and only the holder of a
  Redis lease connects its event websocket; a standby takes over when the lease expires and
  reconciles the channels left in the app.
Pushes are idempotent per (call, device, kind) across daemons through the push ledger
(push/ledger.py), which single-node daemons use too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

import redis.asyncio as aioredis

from ari_push.ari import AriClient, AriError
from ari_push.call_events import ChannelInfo, channel_info
from ari_push.channels import ChannelRole, channel_role, stasis_args
from ari_push.links import LinkState
from ari_push.pbx import PbxError
from ari_push.redis_keys import Keys
from ari_push.settings import ClusterSettings

log = logging.getLogger("ari_push.cluster")

_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 10 * tonumber(ARGV[2]))
return now
"""

_ALIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf')
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class CallTaker(Protocol):
    """What the cluster asks of the call manager (calls.CallManager)."""

    def start_adopted(self, channel: ChannelInfo) -> None: ...

    async def adopt_bridge(self, bridge_id: str, channel_ids: list[str]) -> None: ...


class ClusterNode:
    """What every cluster member does whatever its PBX: the heartbeat in ``<prefix>nodes`` under
    its member name, the list of live members, and a janitor that runs ``sweep`` every heartbeat
    while the PBX link is up and this daemon may take calls. ``Cluster`` (Asterisk, below) and
    ``fs_cluster.FreeswitchCluster`` say what claiming and sweeping mean on their PBX."""

    def __init__(
        self,
        settings: ClusterSettings,
        app: str,
        client: aioredis.Redis,
        keys: Keys,
        pbx_link: LinkState,
        node_id: str,
        calls: CallTaker,
        may_take_calls: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.app = app  # the member name: the Stasis app on Asterisk
        self.redis = client
        self.keys = keys
        self.pbx_link = pbx_link
        self.node_id = node_id
        self.calls = calls
        self.may_take_calls = may_take_calls
        self._beat = client.register_script(_BEAT)
        self._alive = client.register_script(_ALIVE)
        self._renew = client.register_script(_RENEW)
        self.lease_held = asyncio.Event()
        self.lease_lost = asyncio.Event()

    async def sweep(self) -> int:
        """Adopt the channels of dead members; how many this daemon adopted."""
        raise NotImplementedError

    # ---------------------------------------------------------------- loops

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._heartbeat(stop))
            if self.settings.mode == "broadcast":
                tg.create_task(self._janitor(stop))
            if self.settings.mode == "lease":
                tg.create_task(self._lease(stop))

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await stop.wait()

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        ttl_ms = int(self.settings.node_ttl * 1000)
        while not stop.is_set():
            with contextlib.suppress(aioredis.RedisError, OSError):
                await self._beat(keys=[self.keys.nodes()], args=[self.app, ttl_ms])
            await self._sleep(stop, self.settings.heartbeat)
        with contextlib.suppress(aioredis.RedisError, OSError):
            await self.redis.zrem(self.keys.nodes(), self.app)  # a clean stop is not a death

    async def alive_apps(self) -> set[str]:
        raw = await self._alive(keys=[self.keys.nodes()], args=[int(self.settings.node_ttl * 1000)])
        return {m.decode() if isinstance(m, bytes) else str(m) for m in raw}

    async def _janitor(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._sleep(stop, self.settings.heartbeat)
            if stop.is_set() or not self.pbx_link.up or not self.may_take_calls():
                continue
            try:
                await self.sweep()
            except (aioredis.RedisError, OSError, AriError, PbxError) as exc:
                log.debug("janitor: %s", exc)

    async def _lease(self, stop: asyncio.Event) -> None:
        """Hold the lease of the shared app; the PBX link connects only while it is held."""
        key, ttl_ms = self.keys.lease(self.app), int(self.settings.lease_ttl * 1000)
        while not stop.is_set():
            held = False
            try:
                if self.lease_held.is_set():
                    held = bool(await self._renew(keys=[key], args=[self.node_id, ttl_ms]))
                else:
                    held = bool(await self.redis.set(key, self.node_id, nx=True, px=ttl_ms))
            except (aioredis.RedisError, OSError) as exc:
                log.debug("lease: %s", exc)
            if held and not self.lease_held.is_set():
                log.info("lease of app %s taken: this daemon is active", self.app)
                self.lease_lost.clear()
                self.lease_held.set()
            elif not held and self.lease_held.is_set():
                log.warning("lease of app %s lost: standing by", self.app)
                self.lease_held.clear()
                self.lease_lost.set()
            await self._sleep(stop, self.settings.lease_ttl / 3)
        if self.lease_held.is_set():
            with contextlib.suppress(aioredis.RedisError, OSError):
                await self._renew(keys=[key], args=[self.node_id, 1])  # hand over at once


class Cluster(ClusterNode):
    """Asterisk: StasisBroadcast claims over ARI, adoption by moving channels between apps."""

    def __init__(
        self,
        settings: ClusterSettings,
        app: str,
        client: aioredis.Redis,
        keys: Keys,
        ari: AriClient,
        node_id: str,
        calls: CallTaker,
        may_take_calls: Callable[[], bool],
    ) -> None:
        super().__init__(settings, app, client, keys, ari.link, node_id, calls, may_take_calls)
        self.ari = ari

    # ---------------------------------------------------------------- broadcast

    async def claim(self, channel_id: str) -> None:
        """A CallBroadcast: claim it unless this daemon is stopping or missing a link."""
        if not channel_id or not self.may_take_calls():
            return
        try:
            await self.ari.call("claim", query={"channelId": channel_id, "application": self.app})
        except AriError as exc:
            if exc.status != 409:  # 409: another daemon was first, as designed
                log.warning("claim of %s failed: %s", channel_id, exc)

    # ---------------------------------------------------------------- adoption

    def _family(self, app: str) -> bool:
        return app.startswith(self.settings.app_family + "-")

    async def sweep(self) -> int:
        """Adopt the channels of dead daemons. Returns how many this daemon adopted."""
        apps = await self.ari.call("list_applications")
        owned = {a["name"]: a.get("channel_ids", []) for a in apps
                 if self._family(a.get("name", "")) and a["name"] != self.app and a.get("channel_ids")}
        if not owned:
            return 0
        channels = {c["id"]: c for c in await self.ari.call("list_channels")}
        orphans = [(channels[cid], app, stasis_args(channels[cid])) for app, ids in owned.items()
                   for cid in ids if cid in channels]
        alive = await self.alive_apps()
        n = 0
        bridges: list[dict[str, Any]] | None = None
        for ch, app, args in orphans:
            if app in alive:
                continue
            cid = ch["id"]
            if not await self.redis.set(self.keys.adopt(cid), self.node_id, nx=True, ex=15):
                continue  # another daemon adopts it
            n += 1
            role = channel_role(ch, args)
            if role is ChannelRole.UP:
                if bridges is None:
                    bridges = await self.ari.call("list_bridges")
                bridge = next((b for b in bridges or [] if cid in b.get("channels", [])), None)
                if bridge is not None and len(bridge["channels"]) >= 2:
                    # A conversation in progress: keep it, and carry its hang-up from now on.
                    log.warning("adopting bridged call %s of dead app %s", bridge["id"], app)
                    await self.calls.adopt_bridge(bridge["id"], list(bridge["channels"]))
                    continue
            if role is not ChannelRole.CALLER:  # a leg, or a lone up channel
                log.warning("adopting %s of dead app %s: hanging it up", cid, app)
                with contextlib.suppress(AriError):
                    await self.ari.call("hangup", {"channelId": cid}, query={"reason": "normal"})
            else:
                log.warning("adopting waiting call %s of dead app %s", cid, app)
                try:
                    await self.ari.call("move", {"channelId": cid}, query={"app": self.app, "appArgs": args})
                except AriError as exc:
                    log.warning("could not move %s into %s: %s", cid, self.app, exc)
                    continue
                # Do not wait for the StasisStart of the move: out of a dead app it was seen not
                # to come every time. The channel is ours now; its StasisStart, if any, is ignored.
                self.calls.start_adopted(channel_info(ch))
        return n
