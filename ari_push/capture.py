"""Token capture: AMI registration events -> device bindings + the "registered" signal.

Feeds (docs/capture.md):
- ``ContactStatus`` (PJSIP): a new contact URI (NonQualified/Reachable) is parsed and, when it
  carries push parameters, stored. ``Removed`` never deletes a binding.
- ``PeerStatus`` ``Registered`` (chan_sip, Asterisk <= 20): the contact is read from astdb
  ``SIP/Registry/<peer>`` with ``DBGet``.
- Resynchronisation with ``PJSIPShowContacts`` at start-up and after every AMI reconnect.
The AMI reader wakes waiting calls at once, then queues the event for one of ``WORKERS``
workers chosen by AOR (the events of one AOR stay in order).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

from ari_push.ami_frames import AmiMessage
from ari_push.bindings import BindingStore, StoreUnavailable
from ari_push.contacts import ContactPolicy, ContactRejected, parse_chan_sip_registry, parse_contact
from ari_push.metrics import Metrics
from ari_push.model import Binding, mask_token
from ari_push.pbx import ContactDetails
from ari_push.recent import RecentMap
from ari_push.wakeups import Registration, WakeupHub

log = logging.getLogger("ari_push.capture")

LIVE_STATUSES = frozenset({"nonqualified", "reachable", "created", "updated"})
RECAPTURE_AFTER = 60.0  # s: a Reachable sooner than this after a capture of the same URI is not one
RECENT_LIMIT = 50_000
AGENT_KEPT = 3600.0  # s: how long a device's User-Agent read from the PBX is reused
QUEUE_LIMIT = 10_000
WORKERS = 4  # events of one AOR always go to the same worker, so they stay in order


E = TypeVar("E")


class EventShards(Generic[E]):
    """A PBX feed's events, queued to ``WORKERS`` workers by key (the AOR: one AOR's events stay in
    order) and handled there, so no reader ever waits on the store. A full queue drops the event and
    asks for a read-back (``resync``) once every queue has drained; waiting calls are then told to
    re-read their contacts (``gap``). A bad event is logged, never fatal. Shared by the Asterisk
    capture (here) and the FreeSWITCH one (fs_capture.py)."""

    def __init__(self, handle: Callable[[E], Awaitable[object]], resync: Callable[[], Awaitable[object]],
                 gap: Callable[[], None], what: str) -> None:
        self.handle = handle
        self.resync = resync
        self.gap = gap
        self.what = what
        self.queues: list[asyncio.Queue[E]] = [asyncio.Queue(QUEUE_LIMIT) for _ in range(WORKERS)]
        self.dropped = 0
        self.resync_needed = False

    def put(self, key: str, event: E) -> None:
        try:
            self.queues[hash(key) % WORKERS].put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            self.resync_needed = True  # what was dropped is read back once the queue drains
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("%s capture queue full; %d events dropped so far", self.what, self.dropped)

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            for queue in self.queues:
                tg.create_task(self._worker(queue, stop))

    async def _worker(self, queue: asyncio.Queue[E], stop: asyncio.Event) -> None:
        """Handle one shard's events in order until ``stop``."""
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while True:
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait({get, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return
                try:
                    await self.handle(get.result())
                    if self.resync_needed and all(q.empty() for q in self.queues):
                        self.resync_needed = False
                        await self.resync()
                        self.gap()  # waiting calls re-read the contacts they may have missed
                except Exception:
                    log.exception("capture failed on a %s event", self.what)
        finally:
            stopper.cancel()


class AmiActions(Protocol):
    async def action(self, name: str, **params: str) -> AmiMessage: ...

    async def action_list(self, name: str, **params: str) -> list[AmiMessage]: ...


class Capture:
    def __init__(
        self,
        store: BindingStore,
        wakeups: WakeupHub,
        policy: ContactPolicy,
        ami: AmiActions | None,
        metrics: Metrics,
        node_id: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.wakeups = wakeups
        self.policy = policy
        self.ami = ami
        self.metrics = metrics
        self.node_id = node_id
        self.clock = clock
        self.shards: EventShards[AmiMessage] = EventShards(self.handle, self.resync, wakeups.gap, "AMI")
        #: contact URI -> when it was last captured from a ContactStatus (bounded, oldest first)
        self._captured_at: RecentMap[str, float] = RecentMap(RECENT_LIMIT)
        #: device -> (its User-Agent, when read): bounded, re-read after AGENT_KEPT
        self._agents: RecentMap[str, tuple[str, float]] = RecentMap(RECENT_LIMIT)
        self._live_at: RecentMap[str, float] = RecentMap(RECENT_LIMIT)  # device id -> last live capture
        #: Says which provider table serves a binding (push/routing.py); set once providers exist.
        self.explain: Callable[[Binding], str] | None = None
        #: reads a registered contact's User-Agent (the PBX's contact object; set by the daemon)
        self.contact_of: Callable[[str, str], Awaitable[ContactDetails]] | None = None
        #: told about every stored push binding; ``fresh``: registered just now (refresh, messages);
        #: the contact's expiration when capture read it anyway (for its User-Agent), else None
        self.on_binding: Callable[[Binding, bool, float | None], None] | None = None
        #: told the PBX's qualify state of every contact it reports: (URI, ContactStatus/Status)
        self.on_contact_status: Callable[[str, str], None] | None = None

    @property
    def dropped(self) -> int:
        return self.shards.dropped

    @property
    def resync_needed(self) -> bool:
        return self.shards.resync_needed

    # ---------------------------------------------------------------- feeds

    def on_ami_event(self, msg: AmiMessage) -> None:
        """Called by the AMI reader for every event; must not block. A new contact wakes the
        calls waiting on this daemon at once, before anything is stored or published."""
        if msg.event not in ("ContactStatus", "PeerStatus"):
            return
        aor = msg.get("AOR") or msg.get("Peer")
        if msg.event == "ContactStatus":
            if self.on_contact_status is not None:
                self.on_contact_status(msg.get("URI"), msg.get("ContactStatus"))
            if msg.get("ContactStatus").lower() in LIVE_STATUSES:
                self.deliver_now(aor, msg.get("URI"))
        self.shards.put(aor, msg)

    def deliver_now(self, aor: str, uri: str) -> None:
        """Wake the calls waiting for ``aor`` on this daemon (the PBX feeds call it from their reader)."""
        if not aor or not uri:
            return
        try:
            push = parse_contact(uri, self.policy)
        except ContactRejected:
            push = None  # counted and logged by the worker
        self.wakeups.deliver(Registration(aor=aor, contact_uri=uri, device_id=push.device_id if push else "",
                                          at=self.clock(), origin=self.node_id))

    async def run(self, stop: asyncio.Event) -> None:
        await self.shards.run(stop)

    async def handle(self, msg: AmiMessage) -> Binding | None:
        if msg.event == "ContactStatus":
            if msg.get("ContactStatus").lower() not in LIVE_STATUSES:
                return None
            aor, uri = msg.get("AOR"), msg.get("URI")
            if self._seen_just_now(uri, msg.get("ContactStatus").lower() == "reachable"):
                return None
            return await self.capture(aor, msg.get("EndpointName") or aor, uri, "", delivered=True)
        if msg.event == "PeerStatus" and msg.get("PeerStatus").lower() == "registered":
            return await self._chan_sip(msg)
        return None

    def _seen_just_now(self, uri: str, qualified: bool) -> bool:
        """A qualify's ``Reachable`` for a contact captured moments ago (a new contact of a
        qualified AOR reports ``NonQualified`` then ``Reachable`` within a millisecond) says
        nothing new: the waiting calls were woken by the first, the binding written then.
        A ``Reachable`` long after (the phone answers OPTIONS again) is captured as a
        registration."""
        now = self.clock()
        last = self._captured_at.get(uri)
        self._captured_at.put(uri, now)
        return qualified and last is not None and now - last < RECAPTURE_AFTER

    async def resync(self) -> int:
        """Read every registered contact from Asterisk and store what carries push parameters."""
        if self.ami is None:  # FreeSWITCH: fs_capture.py resynchronises over the event socket
            return 0
        started = self.clock()
        contacts = await self.ami.action_list("PJSIPShowContacts")
        stored = 0
        # A device that woke on a new port has two contacts until the old one expires: the one
        # registered last is read last, so its binding ends with the newest contact.
        for c in sorted((c for c in contacts if c.event == "ContactList"), key=_expiration):
            aor = c.get("Aor") or c.get("ObjectName").partition(";@")[0]
            if self.on_contact_status is not None:
                self.on_contact_status(c.get("Uri"), c.get("Status"))
            if await self.capture(aor, c.get("Endpoint") or aor, c.get("Uri"), c.get("UserAgent"), signal=False,
                                  resync_since=started):
                stored += 1
        log.info("resynchronised %d contacts from Asterisk, %d with push parameters", len(contacts), stored)
        return stored

    # ---------------------------------------------------------------- core

    def _known_agent(self, device_id: str) -> str:
        agent, at = self._agents.get(device_id) or ("", 0.0)
        return agent if self.clock() - at < AGENT_KEPT else ""

    def _remember_agent(self, device_id: str, agent: str) -> None:
        if agent:
            self._agents.put(device_id, (agent, self.clock()))

    async def _details(self, aor: str, uri: str) -> ContactDetails:
        assert self.contact_of is not None
        try:
            async with asyncio.timeout(2.0):
                details = await self.contact_of(aor, uri)
            return ContactDetails(details.user_agent[:256], details.expires_at)
        except Exception as exc:  # the User-Agent is nice to have: never lose a binding for it
            log.debug("no user agent for a contact of %s: %s", aor, exc)
            return ContactDetails()

    async def capture(
        self, aor: str, endpoint: str, uri: str, user_agent: str, signal: bool = True, delivered: bool = False,
        resync_since: float | None = None,
    ) -> Binding | None:
        """Parse one contact; store its binding; publish the registered signal. ``resync_since``:
        a contact read back by a resync started then; a device registered live since keeps the
        binding of that registration (the listing may predate it)."""
        if not aor or not uri:
            return None
        now = self.clock()
        notes: list[ContactRejected] = []
        try:
            push = parse_contact(uri, self.policy, notes)
        except ContactRejected as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            log.warning("rejected contact of %s: %s", aor, exc)
            push = None
        for note in notes:  # accepted, but part of it refused (a bad half of a dual token)
            self.metrics.rejected.labels(note.reason).inc()
            log.warning("contact of %s: kept the valid token, refused %s", aor, note)
        if signal:
            # Wake waiting calls first: a call must not wait behind the store write (nor behind
            # other registrations' writes queued before it). Local calls may have been woken
            # already by on_ami_event; the other daemons learn it through Redis.
            reg = Registration(aor=aor, contact_uri=uri, device_id=push.device_id if push else "", at=now,
                               origin=self.node_id)
            await (self.wakeups.publish_remote(reg) if delivered else self.wakeups.publish(reg))
        if push is None:
            return None
        if signal:
            self._live_at.put(push.device_id, now)
        elif resync_since is not None and (self._live_at.get(push.device_id) or -1.0) >= resync_since:
            log.debug("resync: %s registered while the contacts were read; its new binding is kept", aor)
            return None
        expires: float | None = None
        if not user_agent and self.contact_of is not None:
            # AMI's ContactStatus carries no User-Agent (Asterisk 22); the contact object has it.
            # Read after the wake-up above, so no call waits for it; once an hour per device, as
            # every read is an ARI request that the next event of this shard waits behind. The
            # same read gives the expiration, handed on so the refresh need not read it again.
            user_agent = self._known_agent(push.device_id)
            if not user_agent:
                details = await self._details(aor, uri)
                user_agent, expires = details.user_agent, details.expires_at
                self._remember_agent(push.device_id, user_agent)
        else:
            self._remember_agent(push.device_id, user_agent)  # PJSIPShowContacts gives it
        binding = Binding(aor=aor, endpoint=endpoint, push=push, contact_uri=uri, user_agent=user_agent,
                          first_seen=now, last_seen=now)
        try:
            binding, evicted = await self.store.upsert_capped(binding, self.policy.max_devices_per_aor)
        except StoreUnavailable as exc:
            self.metrics.store_errors.inc()
            log.warning("could not store the binding of %s (kept; written when the store is back): %s", aor, exc)
            return binding
        self.metrics.registrations.labels(push.dialect.value).inc()
        if evicted:
            self.metrics.devices_evicted.inc(len(evicted))
            log.info("%s has more than %d devices: dropped the least recently seen (%s)", aor,
                     self.policy.max_devices_per_aor, ", ".join(evicted[:5]) + (" ..." if len(evicted) > 5 else ""))
        route = f", {self.explain(binding)}" if self.explain is not None else ""
        log.info("captured %s device %s of %s (token %s)%s", push.provider, binding.device_id, aor,
                 mask_token(push.provider, push.token), route)
        if self.on_binding is not None:
            self.on_binding(binding, signal, expires)
        return binding

    async def _chan_sip(self, msg: AmiMessage) -> Binding | None:
        peer = msg.get("Peer").removeprefix("SIP/")
        if not peer or self.ami is None:
            return None
        try:
            replies = await self.ami.action_list("DBGet", Family="SIP/Registry", Key=peer)
        except Exception as exc:
            log.warning("could not read SIP/Registry/%s: %s", peer, exc)
            return None
        values = [r.get("Val") for r in replies if r.event == "DBGetResponse"]
        if not values:
            return None
        try:
            reg = parse_chan_sip_registry(values[0])
        except ContactRejected as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            log.warning("rejected SIP/Registry/%s: %s", peer, exc)
            return None
        return await self.capture(peer, peer, reg.contact, "")


def _expiration(contact: AmiMessage) -> float:
    try:
        return float(contact.get("ExpirationTime") or 0)
    except ValueError:
        return 0.0
