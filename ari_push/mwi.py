"""Voicemail (MWI) pushes: AMI ``MessageWaiting`` -> the devices of the mailbox's AORs.

docs/reachability.md. ``app_voicemail`` raises ``MessageWaiting`` (AMI class ``call``) when a
message is left, read or deleted, and also when a caller merely visits the mailbox (counts
unchanged). Per mailbox:

* **deduplicated**: a push goes out only when (new, old) differ from the counts last pushed;
* **rate limited and coalesced**: at most one push per ``min_interval``; changes inside it
  replace each other and the latest counts go out when it ends;
* **shared**: with Redis, one Lua script decides for all daemons (each daemon sees the same
  AMI event; only the first to claim the change pushes).

Mailbox -> AOR: ``[mwi] mailboxes`` first, else the PJSIP endpoints' own ``mailboxes`` option
(read through ARI for the endpoints of the stored bindings, kept ``map_ttl`` s). A mailbox that
maps to no AOR is logged once and counted.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import redis.asyncio as aioredis

from ari_push.ami_frames import AmiMessage
from ari_push.ari import AriError
from ari_push.bindings import BindingStore, StoreUnavailable
from ari_push.metrics import Metrics
from ari_push.model import Binding, PushKind, PushMessage, PushResult
from ari_push.redis_keys import Keys
from ari_push.settings import MwiSettings

log = logging.getLogger("ari_push.mwi")

QUEUE_LIMIT = 10_000
REMAP_AFTER = 60.0  # an unknown mailbox re-reads the map at most this often


@dataclass(frozen=True, slots=True)
class MailboxCounts:
    mailbox: str
    new: int
    old: int
    seen_at: float  # monotonic, when the (latest) event arrived


def parse_event(msg: AmiMessage, now: float) -> MailboxCounts | None:
    """A ``MessageWaiting`` event as counts; None for other events or one without numbers."""
    if msg.event != "MessageWaiting":
        return None
    mailbox = msg.get("Mailbox").strip()
    try:
        new, old = int(msg.get("New") or 0), int(msg.get("Old") or 0)
    except ValueError:
        return None
    if not mailbox or new < 0 or old < 0:
        return None
    return MailboxCounts(_canonical(mailbox), new, old, now)


def _canonical(mailbox: str) -> str:
    return mailbox if "@" in mailbox else f"{mailbox}@default"


class Decision(StrEnum):
    SEND = "send"
    SAME = "same"  # the counts last pushed: nothing to tell
    WAIT = "wait"  # pushed less than min_interval ago: try again at the returned time


class CountsLedger(Protocol):
    async def decide(self, mailbox: str, new: int, old: int, now: float, interval: float) -> tuple[Decision, float]:
        """SEND (and remember these counts as pushed), SAME, or WAIT until the returned time."""
        ...


class MemoryLedger:
    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int, float]] = {}

    async def decide(self, mailbox: str, new: int, old: int, now: float, interval: float) -> tuple[Decision, float]:
        last = self._last.get(mailbox)
        if last is not None:
            if (last[0], last[1]) == (new, old):
                return Decision.SAME, 0.0
            if now < last[2] + interval:
                return Decision.WAIT, last[2] + interval
        self._last[mailbox] = (new, old, now)
        return Decision.SEND, 0.0


_DECIDE = """
local last = redis.call('HGET', KEYS[1], ARGV[1])
local counts = ARGV[2] .. ':' .. ARGV[3]
if last then
  local n, o, at = string.match(last, '^(%d+):(%d+):(.+)$')
  if n .. ':' .. o == counts then return {'same', '0'} end
  local next_at = tonumber(at) + tonumber(ARGV[5])
  if tonumber(ARGV[4]) < next_at then return {'wait', tostring(next_at)} end
end
redis.call('HSET', KEYS[1], ARGV[1], counts .. ':' .. ARGV[4])
return {'send', '0'}
"""


class RedisLedger:
    """Counts last pushed per mailbox in one Redis hash; decided by a Lua script."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.redis = client
        self.key = keys.mwi_state()
        self._decide = client.register_script(_DECIDE)

    async def decide(self, mailbox: str, new: int, old: int, now: float, interval: float) -> tuple[Decision, float]:
        try:
            what, when = await self._decide(keys=[self.key], args=[mailbox, new, old, repr(now), repr(interval)])
        except (aioredis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from None
        return Decision(_text(what)), float(_text(when))


class EndpointReader(Protocol):
    async def mailboxes(self, endpoint: str) -> list[str]: ...


class AriGet(Protocol):
    async def call(self, operation: str, path_params: dict[str, str] | None = None) -> object: ...


class AsteriskMailboxes:
    """The ``mailboxes`` option of a PJSIP endpoint, read through ARI's dynamic config."""

    def __init__(self, ari: AriGet) -> None:
        self.ari = ari

    async def mailboxes(self, endpoint: str) -> list[str]:
        try:
            attrs = await self.ari.call("get_config", {"configClass": "res_pjsip", "objectType": "endpoint",
                                                       "id": endpoint})
        except AriError as exc:
            if exc.status == 404:
                return []
            raise
        for attr in attrs if isinstance(attrs, list) else []:
            if isinstance(attr, dict) and attr.get("attribute") == "mailboxes":
                return [_canonical(m.strip()) for m in str(attr.get("value", "")).split(",") if m.strip()]
        return []


class MailboxMap:
    """mailbox -> AORs: the configured overrides, else what the endpoints say."""

    def __init__(self, overrides: Iterable[tuple[str, tuple[str, ...]]], store: BindingStore,
                 endpoints: EndpointReader, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.overrides = {_canonical(box): aors for box, aors in overrides}
        self.store = store
        self.endpoints = endpoints
        self.ttl = ttl
        self.clock = clock
        self._map: dict[str, tuple[str, ...]] = {}
        self._read_at = float("-inf")

    async def aors_for(self, mailbox: str) -> tuple[str, ...]:
        if mailbox in self.overrides:
            return self.overrides[mailbox]
        now = self.clock()
        stale = now - self._read_at > self.ttl
        if stale or (mailbox not in self._map and now - self._read_at > REMAP_AFTER):
            await self.read()
        return self._map.get(mailbox, ())

    async def read(self) -> None:
        """Map every mailbox named by the endpoints of stored bindings to their AORs."""
        self._read_at = self.clock()
        mapped: dict[str, set[str]] = {}
        endpoints: dict[str, set[str]] = {}
        for aor in await self.store.aors():
            for b in await self.store.bindings_for(aor):
                endpoints.setdefault(b.endpoint or aor, set()).add(aor)
        for endpoint, aors in endpoints.items():
            for box in await self.endpoints.mailboxes(endpoint):
                mapped.setdefault(box, set()).update(aors)
        self._map = {box: tuple(sorted(aors)) for box, aors in mapped.items()}


class Pusher(Protocol):
    async def send_many(self, bindings: Iterable[Binding], message: PushMessage) -> dict[str, PushResult]: ...


class MwiNotifier:
    def __init__(self, settings: MwiSettings, ledger: CountsLedger, mailboxes: MailboxMap, store: BindingStore,
                 pusher: Pusher, metrics: Metrics, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.ledger = ledger
        self.mailboxes = mailboxes
        self.store = store
        self.pusher = pusher
        self.metrics = metrics
        self.clock = clock
        self.monotonic = monotonic
        self.pending: dict[str, MailboxCounts] = {}  # latest counts not yet decided, by mailbox
        self.queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_LIMIT)
        self._later: list[tuple[float, str]] = []  # (Unix time, mailbox) waiting for their interval
        self._waiting: set[str] = set()  # the mailboxes in _later
        self._unmapped_logged: set[str] = set()
        self.latencies: list[float] = []  # event -> push answered, seconds (last 1000)

    # ---------------------------------------------------------------- feed

    def on_ami_event(self, msg: AmiMessage) -> None:
        """Called by the AMI reader for every event; never blocks."""
        counts = parse_event(msg, self.monotonic())
        if counts is None:
            return
        if counts.mailbox in self.pending:
            self.metrics.mwi_events.labels("coalesced").inc()  # a newer change replaces it
            self.pending[counts.mailbox] = counts
            return
        if len(self.pending) >= QUEUE_LIMIT:
            self.metrics.mwi_events.labels("dropped").inc()
            return
        self.pending[counts.mailbox] = counts
        if counts.mailbox not in self._waiting:
            self.queue.put_nowait(counts.mailbox)

    def _defer(self, counts: MailboxCounts, when: float) -> None:
        self.pending.setdefault(counts.mailbox, counts)
        if counts.mailbox not in self._waiting:
            self._waiting.add(counts.mailbox)
            heapq.heappush(self._later, (when, counts.mailbox))

    # ---------------------------------------------------------------- worker

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            timeout = 1.0
            if self._later:
                timeout = max(0.0, min(timeout, self._later[0][0] - self.clock()))
            try:
                async with asyncio.timeout(timeout):
                    mailbox = await self.queue.get()
            except TimeoutError:
                mailbox = ""
            while self._later and self._later[0][0] <= self.clock():
                _, due = heapq.heappop(self._later)
                self._waiting.discard(due)
                await self._handle(due)
            if mailbox:
                await self._handle(mailbox)

    async def _handle(self, mailbox: str) -> None:
        counts = self.pending.pop(mailbox, None)
        if counts is None:
            return
        try:
            await self.handle(counts)
        except (StoreUnavailable, AriError) as exc:
            log.warning("mwi: %s not pushed yet (%s); trying again", mailbox, exc)
            self._defer(counts, self.clock() + 5.0)
        except Exception:
            log.exception("mwi: handling %s failed", mailbox)

    async def handle(self, counts: MailboxCounts) -> None:
        aors = await self.mailboxes.aors_for(counts.mailbox)
        if not aors:
            self.metrics.mwi_events.labels("unmapped").inc()
            if counts.mailbox not in self._unmapped_logged and len(self._unmapped_logged) < 10_000:
                self._unmapped_logged.add(counts.mailbox)
                log.warning("mwi: mailbox %s maps to no AOR (no endpoint lists it in mailboxes=, no [mwi] "
                            "mailboxes entry): its changes are not pushed", counts.mailbox)
            return
        bindings = [b for aor in aors for b in await self.store.bindings_for(aor)
                    if b.push.provider not in self.settings.disabled_providers]
        if not bindings:
            self.metrics.mwi_events.labels("no-devices").inc()  # nothing to push; counts not recorded
            return
        now = self.clock()
        decision, when = await self.ledger.decide(counts.mailbox, counts.new, counts.old, now,
                                                  self.settings.min_interval)
        if decision is Decision.SAME:
            self.metrics.mwi_events.labels("unchanged").inc()
            return
        if decision is Decision.WAIT:
            self._defer(counts, when)
            return
        message = PushMessage(
            kind=PushKind.MWI, call_id=f"mwi-{counts.mailbox}-{counts.new}-{counts.old}-{int(now)}",
            caller_number="", caller_name="", callee=aors[0], deadline=now + self.settings.push_ttl,
            extra=(("mailbox", counts.mailbox), ("new", str(counts.new)), ("old", str(counts.old)),
                   ("collapse_id", f"mwi-{counts.mailbox}"[:64])))
        results = await self.pusher.send_many(bindings, message)
        self.metrics.mwi_events.labels("pushed").inc()
        for result in results.values():
            self.metrics.mwi_pushes.labels(str(result.outcome)).inc()
        self.latencies = [*self.latencies[-999:], self.monotonic() - counts.seen_at]
        log.info("mwi: %s new=%d old=%d pushed to %d device(s) of %s", counts.mailbox, counts.new, counts.old,
                 len(results), ",".join(aors))


def build_mwi(settings: MwiSettings, client: aioredis.Redis | None, keys: Keys, store: BindingStore, ari: AriGet,
              pusher: Pusher, metrics: Metrics) -> MwiNotifier | None:
    """The notifier the composition root runs, or None when voicemail pushes are off."""
    if not settings.enabled:
        return None
    ledger: CountsLedger = MemoryLedger() if client is None else RedisLedger(client, keys)
    mailboxes = MailboxMap(settings.mailboxes, store, AsteriskMailboxes(ari), settings.map_ttl)
    return MwiNotifier(settings, ledger, mailboxes, store, pusher, metrics)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
