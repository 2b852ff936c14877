"""The "registered" signal: a contact of an AOR (re)registered, seen by any daemon.

A call takes a ``Watch`` on the callee's AOR *before* it sends any push, so no wake-up can
slip between the push and the wait. Locally the hub hands signals to watches at once;
with Redis, every capture is also published on ``<prefix>registered:<aor>`` and one
pattern subscription per daemon feeds the local hub, so a registration seen on any
Asterisk node wakes a call waiting on any daemon.

Pub/sub loses messages published while the subscription is down: after a reconnect the hub
sends every watch a ``Gap``, and the call re-reads the contacts from the PBX.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis

from ari_push.backoff import Backoff
from ari_push.redis_keys import Keys

log = logging.getLogger("ari_push.wakeups")


@dataclass(frozen=True, slots=True)
class Registration:
    aor: str
    contact_uri: str
    device_id: str = ""  # empty for contacts without push parameters
    at: float = 0.0
    origin: str = ""  # node id of the daemon that captured it


@dataclass(frozen=True, slots=True)
class Gap:
    """Registration signals may have been lost (the subscription was down or moved)."""


GAP = Gap()
Signal = Registration | Gap


class Watch:
    """Registrations of one AOR from the moment it was taken. A call passes its own queue's
    ``put_nowait`` so that registrations and PBX events reach it in one ordered stream."""

    def __init__(self, aor: str, deliver: Callable[[Signal], None] | None = None) -> None:
        self.aor = aor
        self.queue: asyncio.Queue[Signal] = asyncio.Queue()
        self.deliver: Callable[[Signal], None] = deliver or self.queue.put_nowait


class WakeupHub:
    """Local fan-out of registrations to watches; the embedded mode needs nothing more."""

    def __init__(self, node_id: str = "") -> None:
        self.node_id = node_id
        self._watches: dict[str, set[Watch]] = {}

    @contextlib.contextmanager
    def watch(self, aor: str, deliver: Callable[[Signal], None] | None = None) -> Iterator[Watch]:
        w = Watch(aor, deliver)
        self._watches.setdefault(aor, set()).add(w)
        try:
            yield w
        finally:
            watches = self._watches.get(aor)
            if watches is not None:
                watches.discard(w)
                if not watches:
                    del self._watches[aor]

    def deliver(self, reg: Registration) -> None:
        for w in self._watches.get(reg.aor, ()):
            w.deliver(reg)

    def gap(self) -> None:
        for watches in self._watches.values():
            for w in watches:
                w.deliver(GAP)

    async def publish(self, reg: Registration) -> None:
        self.deliver(reg)

    async def publish_remote(self, reg: Registration) -> None:
        """Tell the other daemons only (this one delivered it already). Nobody else here."""


class RedisWakeups(WakeupHub):
    """The hub plus Redis pub/sub, for several daemons sharing one Redis."""

    def __init__(self, client: aioredis.Redis, keys: Keys, node_id: str) -> None:
        super().__init__(node_id)
        self.redis = client
        self.keys = keys
        self.backoff = Backoff(base=0.2, cap=10.0)

    async def publish(self, reg: Registration) -> None:
        self.deliver(reg)  # local waiters first: no round trip through Redis
        await self.publish_remote(reg)

    async def publish_remote(self, reg: Registration) -> None:
        try:
            await self.redis.publish(self.keys.registered_channel(reg.aor), json.dumps(asdict(reg)))
        except (aioredis.RedisError, OSError) as exc:
            log.debug("could not publish registration of %s: %s", reg.aor, exc)

    async def run(self, stop: asyncio.Event) -> None:
        """Hold one pattern subscription; feed the hub; mark a GAP after every outage, and when
        the subscription moves to another server (a Sentinel fail-over re-subscribes silently)."""
        outage = False  # messages may have been lost since the last confirmed subscription
        warned = False
        while not stop.is_set():
            pubsub = self.redis.pubsub()
            where: tuple[str, int] | None = None
            confirmed = False
            try:
                went, _ = await _unless_stopped(pubsub.psubscribe(self.keys.registered_pattern()), stop)
                while went and not stop.is_set():
                    # raced against stop: with every Sentinel gone, redis-py retries finding the
                    # master inside this call for ~20 s, and the daemon must stop within its bound
                    went, msg = await _unless_stopped(pubsub.get_message(timeout=1.0), stop)
                    if not went:
                        break
                    kind = msg.get("type") if msg else None
                    if kind == "psubscribe":
                        # A second confirmation on the same pubsub: redis-py reconnected and
                        # re-subscribed by itself; what was published meanwhile is lost.
                        if outage or confirmed:
                            self.gap()
                            log.info("registration signals subscribed again")
                        outage = warned = False
                        confirmed = True
                        self.backoff.reset()
                    elif kind == "pmessage":
                        self._on_message(msg.get("data") if msg else None)
                    conn = pubsub.connection
                    now_at = (str(conn.host), int(conn.port)) if conn is not None else None
                    if where is not None and now_at is not None and now_at != where:
                        self.gap()
                        log.info("registration signals moved to %s:%d", *now_at)
                    where = now_at or where
            except (aioredis.RedisError, OSError) as exc:
                outage = True
                if not warned:  # once per outage, not once per retry
                    log.warning("registration signals unavailable (calls fall back to re-reading "
                                "contacts): %s", exc)
                    warned = True
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            if stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.backoff.next()):
                    await stop.wait()

    def _on_message(self, data: object) -> None:
        try:
            raw = json.loads(data)  # type: ignore[arg-type]
            reg = Registration(**raw)
        except (TypeError, ValueError):
            log.warning("ignoring a malformed registration signal")
            return
        if reg.origin != self.node_id:
            self.deliver(reg)


async def _unless_stopped(aw: Awaitable[Any], stop: asyncio.Event) -> tuple[bool, Any]:
    """(True, its result) when ``aw`` finishes first (its exception is raised); (False, None)
    when ``stop`` is set first (``aw`` is cancelled)."""
    task = asyncio.ensure_future(aw)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return True, task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return False, None
