"""Several daemons on one FreeSWITCH (docs/clustering.md, "FreeSWITCH").

Every daemon's event socket sees every ``CHANNEL_PARK``: there is no StasisBroadcast to win, so a
parked call is claimed in Redis (``SET NX <prefix>claim:<uuid>``) and the winner writes its member
name into the channel (``ari_push_owner``), as it does into every leg it originates. The members'
heartbeats are the Asterisk cluster's (cluster.ClusterNode); each janitor lists FreeSWITCH's
channels and adopts those whose owner is dead (one adopter per channel, ``SET NX
<prefix>adopt:<uuid>``):
- a caller still parked: owned by the adopter, then handled afresh (rung, pushes deduplicated by
  the push ledger, the wake-up awaited, the exact contact dialled);
- an answered channel in a bridge: owned, and its hang-up carried (``CallManager.adopt_bridge``);
- a leg still ringing, or an answered channel alone: hung up.
A parked caller nobody claimed (every daemon was down or draining when it parked) is claimed by
the first janitor that sees it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

import redis.asyncio as aioredis

from ari_push.call_events import ChannelInfo, StasisStart
from ari_push.channels import ChannelRole
from ari_push.cluster import CallTaker, ClusterNode
from ari_push.links import LinkState
from ari_push.pbx import PbxError
from ari_push.redis_keys import Keys
from ari_push.settings import ClusterSettings

log = logging.getLogger("ari_push.fs_cluster")

CLAIM_TTL = 3600  # s: longer than any wait; the channel variable is the lasting record


def cluster_member(settings: ClusterSettings, node_id: str) -> str:
    """A FreeSWITCH daemon's member name in ``<prefix>nodes`` and ``ari_push_owner``."""
    return f"{settings.app_family}-{node_id}"


class OwnedChannels(Protocol):
    """What the janitor asks of the FreeSWITCH adapter (freeswitch_pbx.FreeswitchPbx)."""

    async def channels(self) -> list[ChannelInfo]: ...

    async def owner_of(self, channel_id: str) -> str: ...

    async def set_owner(self, channel_id: str, owner: str) -> None: ...

    async def bridge_of(self, channel_id: str) -> tuple[str, list[str]] | None: ...

    async def hangup(self, channel_id: str, reason: str = "normal") -> None: ...


class FreeswitchCalls(CallTaker, Protocol):
    def on_event(self, event: StasisStart) -> None: ...


class FreeswitchCluster(ClusterNode):
    def __init__(
        self,
        settings: ClusterSettings,
        member: str,
        client: aioredis.Redis,
        keys: Keys,
        pbx: OwnedChannels,
        pbx_link: LinkState,
        node_id: str,
        calls: FreeswitchCalls,
        may_take_calls: Callable[[], bool],
    ) -> None:
        super().__init__(settings, member, client, keys, pbx_link, node_id, calls, may_take_calls)
        self.pbx = pbx
        self.fs_calls = calls

    async def _claim(self, channel_id: str) -> bool:
        """One daemon wins a parked call; it marks the channel as its own."""
        if not await self.redis.set(self.keys.claim(channel_id), self.app, nx=True, ex=CLAIM_TTL):
            return False
        await self.pbx.set_owner(channel_id, self.app)
        return True

    async def claim_call(self, event: StasisStart) -> None:
        """A caller parked for ari-push: handle it if this daemon wins the claim."""
        if not self.may_take_calls():
            return  # the janitor of a daemon that can serve it claims it
        try:
            won = await self._claim(event.channel_id)
        except (aioredis.RedisError, OSError, PbxError) as exc:
            log.warning("claim of %s failed: %s", event.channel_id, exc)
            return
        if won:
            log.info("claimed call %s", event.channel_id)
            self.fs_calls.on_event(event)

    async def _owner(self, channel: ChannelInfo) -> str:
        owner = await self.pbx.owner_of(channel.id)
        if not owner and channel.role is ChannelRole.CALLER:  # claimed, the variable not yet written
            raw = await self.redis.get(self.keys.claim(channel.id))
            owner = raw.decode() if isinstance(raw, bytes) else str(raw or "")
        return owner

    async def sweep(self) -> int:
        """Adopt the channels of dead members (and claim parked callers nobody claimed)."""
        channels = await self.pbx.channels()
        alive: set[str] | None = None
        n = 0
        for ch in channels:
            caller = ch.role is ChannelRole.CALLER and bool(ch.args)
            owner = await self._owner(ch)
            if not owner:
                if caller and await self._claim(ch.id):
                    log.warning("claiming waiting call %s nobody claimed", ch.id)
                    self.calls.start_adopted(ch)
                    n += 1
                continue  # not ari-push's, or a leg of a single daemon
            if owner == self.app:
                continue
            if alive is None:
                alive = await self.alive_apps()
            if owner in alive:
                continue
            if not await self.redis.set(self.keys.adopt(ch.id), self.node_id, nx=True, ex=15):
                continue  # another daemon adopts it
            n += 1
            await self._adopt(ch, owner, caller)
        return n

    async def _adopt(self, ch: ChannelInfo, owner: str, caller: bool) -> None:
        if ch.role is ChannelRole.UP:
            found = await self.pbx.bridge_of(ch.id)
            if found is not None and len(found[1]) >= 2:
                # A conversation in progress: keep it, and carry its hang-up from now on.
                log.warning("adopting bridged call %s of dead member %s", found[0], owner)
                for cid in found[1]:
                    with contextlib.suppress(PbxError):
                        await self.pbx.set_owner(cid, self.app)
                await self.calls.adopt_bridge(*found)
                return
        if not caller:  # a leg, or a lone answered channel
            log.warning("adopting %s of dead member %s: hanging it up", ch.id, owner)
            with contextlib.suppress(PbxError):
                await self.pbx.hangup(ch.id)
            return
        log.warning("adopting waiting call %s of dead member %s", ch.id, owner)
        try:
            await self.pbx.set_owner(ch.id, self.app)
        except PbxError as exc:
            log.warning("could not adopt %s: %s", ch.id, exc)
            return
        self.calls.start_adopted(ch)
