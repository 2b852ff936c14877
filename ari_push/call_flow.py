"""One call, as a state machine: take the call over, push, wait for a device, bridge, end.

A ``CallFlow`` owns everything about one inbound call: its phase, its legs, the devices it
pushed. It reads one ordered queue of typed events (``call_events``: the caller's and its legs'
channel events, the callee's registrations, signal gaps, shutdown, and its own timers and push
results) and acts only through the PBX port (``pbx.PbxPort``), the push planner and the
dispatcher, so it runs the same against Asterisk, another PBX or the in-memory PBX of the unit
tests. docs/calls.md describes the phases, the transitions and the statuses.

Phases and what moves a call between them (``TRANSITIONS``; ``HANDLERS`` says which event is
handled in which phase, everything else is ignored there):

    STARTING --taken over, pushed, live contacts rung--> WAITING
    STARTING --unknown AOR / nothing to push or ring--> ENDING  (store down: WAITING, read again)
    WAITING  --a leg answered--> ANSWERING --bridged--> BRIDGED
    WAITING  --caller left / timeout / declined / push failed / shutdown--> ENDING
    BRIDGED  --either side hung up / max duration--> ENDING --cleaned up--> ENDED

The critical path is the push: the flow reads the callee's devices with their ledger and
rate-limit verdicts in one store round trip (push/plan.py) and sends the push at once; the
ringback, the contact read, the stale-contact deletion and the ringing of live contacts run
beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ari_push.backoff import Backoff
from ari_push.bindings import StoreUnavailable
from ari_push.call_events import (
    HANGUPS,
    CallEvent,
    ChannelDestroyed,
    ChannelHangupRequest,
    ChannelStateChange,
    Shutdown,
    StasisEnd,
    StasisStart,
)
from ari_push.contacts import ContactPolicy, ContactRejected, parse_contact
from ari_push.metrics import Metrics
from ari_push.model import Binding, PushKind, PushMessage, PushOutcome, PushResult
from ari_push.pbx import ContactSnapshot, LegRequest, PbxError, PbxPort
from ari_push.push.dispatch import PushDispatcher
from ari_push.push.plan import PlannedPush, PushPlanner
from ari_push.qualify import ContactReach, Reach
from ari_push.recent import RecentMap
from ari_push.settings import CallSettings
from ari_push.trace_recorder import NO_TRACE, TraceRecorder
from ari_push.wakeups import Gap, Registration

log = logging.getLogger("ari_push.calls")

DECLINE_CAUSES = frozenset({17, 21})  # user busy (486), call rejected (603)
REDIAL_WINDOW = 3.0  # s: a duplicate refusal this soon after a replacement means the phone took the old leg
REDIAL_PAUSE = 0.2  # s: let the phone finish the dialog ari-push hung up before ringing it again


class Phase(StrEnum):
    STARTING = "starting"
    WAITING = "waiting"
    ANSWERING = "answering"
    BRIDGED = "bridged"
    ENDING = "ending"
    ENDED = "ended"


class Status(StrEnum):
    """``PUSH_STATUS`` as the dialplan reads it (docs/dialplan.md)."""

    ANSWERED = "ANSWERED"
    TIMEOUT = "TIMEOUT"
    NO_DEVICES = "NO_DEVICES"
    PUSH_FAILED = "PUSH_FAILED"
    DECLINED = "DECLINED"
    CANCELLED = "CANCELLED"
    SHUTDOWN = "SHUTDOWN"


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.STARTING: frozenset({Phase.WAITING, Phase.ENDING}),
    Phase.WAITING: frozenset({Phase.ANSWERING, Phase.ENDING}),
    Phase.ANSWERING: frozenset({Phase.BRIDGED, Phase.ENDING}),
    Phase.BRIDGED: frozenset({Phase.ENDING}),
    Phase.ENDING: frozenset({Phase.ENDED}),
    Phase.ENDED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class Deadline:
    """The call's timer ran out: the wait (timeout) or, once bridged, calls.max_duration."""


@dataclass(frozen=True, slots=True)
class RingStale:
    """Time to ring the old contact of a pushed device that has not re-registered."""

    uri: str
    device_id: str


@dataclass(frozen=True, slots=True)
class StoreBack:
    """The store answered again after the call's first read failed: the devices to push."""

    plans: tuple[PlannedPush, ...]


@dataclass(frozen=True, slots=True)
class PushesDone:
    """The call push to every device has a final result."""

    results: dict[str, PushResult]


FlowEvent = CallEvent | Deadline | PushesDone | StoreBack | RingStale


@dataclass(frozen=True, slots=True)
class EndNotice:
    """A pushed device that has not heard how its call ended (its end-of-call push was not
    delivered, e.g. an iOS app with a VoIP token only): when it re-registers within
    ``calls.end_notice_window`` it gets an INVITE for the call and a CANCEL with ``reason``."""

    binding: Binding
    call_id: str
    caller_channel: str
    caller_number: str
    caller_name: str
    reason: str  # the PBX hang-up reason: "answered_elsewhere" or "normal"


class AwakeDevices:
    """Devices seen answering on their old contact without re-registering (a desktop client,
    an app in the foreground): their old contact is rung at once on the next calls. Bounded."""

    def __init__(self, limit: int = 10_000) -> None:
        self._seen: RecentMap[str, None] = RecentMap(limit)

    def add(self, device_id: str) -> None:
        self._seen.put(device_id, None)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._seen


@dataclass
class Leg:
    """One INVITE to one exact contact of the callee."""

    channel_id: str
    uri: str
    device_id: str
    started_wall: float = field(default_factory=time.time)
    progressed: bool = False  # the phone answered the INVITE with 180/200: it is awake on this leg
    awake: bool = False  # dialled because the contact registered during this call


class StaleRing(StrEnum):
    """When a pushed device's contact registered before the call gets an INVITE."""

    NOW = "now"  # TCP/TLS (fails at once if dead), answers the qualify, or seen awake on it
    LATER = "later"  # UDP, not qualified: after calls.stale_ring_delay unless it re-registered
    IF_PUSH_FAILS = "if_push_fails"  # UDP, the qualify finds it unreachable: asleep


class LegAction(StrEnum):
    DIAL = "dial"  # ring the contact
    REPLACE = "replace"  # same URI registered afresh: the INVITE sent while it slept is lost
    IGNORE = "ignore"


@dataclass
class LegBook:
    """The legs of a call and the rules for ringing a contact again (pure: no I/O)."""

    legs: dict[str, Leg] = field(default_factory=dict)
    dialled: set[str] = field(default_factory=set)  # URIs rung during this call
    failed_at: dict[str, float] = field(default_factory=dict)  # URI -> when its leg failed (not declined)
    replaced_at: dict[str, float] = field(default_factory=dict)  # device -> when its leg was replaced

    def by_uri(self, uri: str) -> Leg | None:
        return next((leg for leg in self.legs.values() if leg.uri == uri), None)

    def of_device(self, device_id: str) -> list[Leg]:
        return [leg for leg in self.legs.values() if device_id and leg.device_id == device_id]

    def on_registration(self, reg: Registration, from_gap: bool) -> tuple[LegAction, Leg | None]:
        """What a (re-)registration of ``reg.contact_uri`` means for this call."""
        uri = reg.contact_uri
        if uri not in self.dialled:
            return LegAction.DIAL, None
        leg = self.by_uri(uri)
        if leg is None:
            if not from_gap and reg.at > self.failed_at.get(uri, float("inf")):
                self.dialled.discard(uri)  # its leg failed, and it registered since: ring it again
                return LegAction.DIAL, None
            return LegAction.IGNORE, None  # rung and over (declined...): never ring it twice
        if from_gap or leg.awake or leg.progressed or reg.at <= leg.started_wall:
            # Rung because it registered during this call (a repeat of that registration, e.g.
            # another daemon's capture, changes nothing), or it rings already.
            return LegAction.IGNORE, leg
        return LegAction.REPLACE, leg

    def add(self, leg: Leg) -> None:
        self.dialled.add(leg.uri)
        self.legs[leg.channel_id] = leg

    def drop(self, leg: Leg) -> None:
        self.legs.pop(leg.channel_id, None)

    def forget_uri(self, uri: str) -> None:
        self.dialled.discard(uri)


Spawn = Callable[[Awaitable[Any], str], None]


class CallFlow:
    """One inbound call. Only its own task (``run``) changes it; events come through ``put``."""

    def __init__(
        self,
        *,
        channel_id: str,
        call_id: str,
        target: str,
        timeout: float,
        caller_number: str,
        caller_name: str,
        age: float,
        pbx: PbxPort,
        planner: PushPlanner,
        dispatcher: PushDispatcher,
        settings: CallSettings,
        policy: ContactPolicy,
        metrics: Metrics,
        spawn: Spawn,
        on_leg: Callable[[str, CallFlow | None], None] = lambda _leg, _flow: None,
        awake: AwakeDevices | None = None,
        reach: ContactReach | None = None,
        on_end_notice: Callable[[EndNotice], None] = lambda _notice: None,
        trace: TraceRecorder = NO_TRACE,
    ) -> None:
        self.channel_id = channel_id
        self.call_id = call_id
        self.target = target
        self.timeout = timeout
        self.caller_number = caller_number
        self.caller_name = caller_name
        self.pbx = pbx
        self.planner = planner
        self.dispatcher = dispatcher
        self.settings = settings
        self.policy = policy
        self.metrics = metrics
        self.spawn = spawn
        self.on_leg = on_leg  # the manager routes a leg's events here from the moment it exists
        self.awake = awake if awake is not None else AwakeDevices()
        self.reach = reach if reach is not None else ContactReach()
        self.on_end_notice = on_end_notice
        self.trace = trace  # this call's timeline (trace_recorder.py): synchronous, no I/O
        self.started = time.monotonic() - age  # a resumed call keeps its original deadline
        self.phase = Phase.STARTING
        self.status = Status.TIMEOUT
        self.queue: asyncio.Queue[FlowEvent] = asyncio.Queue()
        self.book = LegBook()
        self.pushed: list[Binding] = []  # every device of the callee when the call started
        self.push_sent_at = 0.0
        self.woken: set[str] = set()  # devices whose wake-up was measured
        self.answered_by: Leg | None = None
        self.bridge_id = ""
        self.caller_gone = False
        self.callee_gone = False  # the answered leg's hang-up was seen
        self.declined = False
        self.store_ok = True
        self.settled = asyncio.Event()  # no longer waiting for a device
        self._push_task: asyncio.Task[None] | None = None
        self._retry_task: asyncio.Task[None] | None = None
        self._timers: set[asyncio.Task[None]] = set()
        self.live: list[str] = []  # the contacts registered when the call started
        self.dropped: dict[str, ContactSnapshot] = {}  # device -> its contact, deleted before the push
        self.registered: set[str] = set()  # devices that registered during this call
        self.call_results: dict[str, PushResult] = {}  # device -> its call push's result
        self.noticed: set[str] = set()  # devices handed an end notice
        self.stale_pending: dict[str, str] = {}  # device -> its old UDP contact, to ring after the delay

    # ---------------------------------------------------------------- plumbing

    def put(self, event: FlowEvent) -> None:
        self.queue.put_nowait(event)

    def to(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise RuntimeError(f"call {self.call_id}: no transition {self.phase} -> {phase}")
        log.debug("call %s: %s -> %s", self.call_id, self.phase, phase)
        self.phase = phase
        if phase is not Phase.WAITING:
            self.settled.set()

    def end(self, status: Status) -> None:
        self.status = status
        self.to(Phase.ENDING)

    def _deadline(self) -> float:
        if self.phase is Phase.BRIDGED:
            return self.started + self.settings.max_duration
        return self.started + self.timeout

    async def _next(self) -> FlowEvent:
        remaining = self._deadline() - time.monotonic()
        if remaining <= 0:
            return Deadline()
        try:
            async with asyncio.timeout(remaining):
                return await self.queue.get()
        except TimeoutError:
            return Deadline()

    async def _quietly(self, op: Awaitable[None], what: str) -> bool:
        try:
            await op
        except PbxError as exc:
            if not exc.gone:
                log.info("call %s: %s: %s", self.call_id, what, exc)
            return False
        return True

    # ---------------------------------------------------------------- the run

    async def run(self) -> None:
        """The whole call; the caller's channel is left in a clean state whatever happens."""
        self.metrics.calls_waiting.inc()
        waiting = True
        try:
            await self._start()
            while self.phase in (Phase.WAITING, Phase.BRIDGED):
                if waiting and self.phase is Phase.BRIDGED:
                    self.metrics.calls_waiting.dec()
                    waiting = False
                event = await self._next()
                handler = HANDLERS.get((self.phase, type(event)))
                if handler is not None:
                    await handler(self, event)
        except asyncio.CancelledError:
            self.status = Status.SHUTDOWN if self.status is not Status.ANSWERED else self.status
            raise
        finally:
            self.settled.set()
            if waiting:
                self.metrics.calls_waiting.dec()
            self.metrics.calls.labels(self.status.value).inc()
            await asyncio.shield(self._finish())

    async def _start(self) -> None:
        """Push first: one store round trip, then the push; everything else beside it."""
        # The store read comes first and alone (one round trip, ~0.2 ms), then the push task is
        # made before the ringback and the contact read, so its request is the first written:
        # their ARI requests cost CPU that would otherwise delay the store's answer and the push.
        try:
            plans = await self.planner.call_push(self.target, self.call_id)
        except StoreUnavailable as exc:
            log.warning("call %s: binding store unavailable (%s); ringing live contacts and reading the "
                        "store again until it answers", self.call_id, exc)
            self.store_ok, plans = False, []
            self._retry_task = asyncio.ensure_future(self._read_store_again())
        if plans:
            self._push(plans)
        contacts = asyncio.ensure_future(self._contacts())
        ringback = asyncio.ensure_future(self._ringback())
        try:
            live = await contacts
            if live is None:
                log.info("call %s: %s is not a known AOR", self.call_id, self.target)
                self.end(Status.NO_DEVICES)
                return
            self.live = live
            await self._ring_live(live)
        finally:
            await ringback
        if not self.pushed and not self.book.legs and self.store_ok:
            self.end(Status.NO_DEVICES)
            return
        self.to(Phase.WAITING)

    def _push(self, plans: Sequence[PlannedPush]) -> None:
        self.pushed = [p.binding for p in plans]
        self.push_sent_at = time.monotonic()
        self._push_task = asyncio.ensure_future(self._push_call(plans))

    async def _read_store_again(self) -> None:
        """The store did not answer (a Redis restart or fail-over takes about a second): read
        it again with a capped, jittered backoff until it answers or the call's time is up."""
        backoff = Backoff(base=0.1, cap=1.0)
        while True:
            await asyncio.sleep(backoff.next())
            if time.monotonic() >= self.started + self.timeout:
                return
            try:
                plans = await self.planner.call_push(self.target, self.call_id)
            except StoreUnavailable:
                continue
            self.put(StoreBack(tuple(plans)))
            return

    async def _ringback(self) -> None:
        if self.settings.moh_class:  # early media: 183 Session Progress, then music while the phone wakes
            ok = await self._quietly(self.pbx.early_media(self.channel_id, self.settings.moh_class), "early media")
        else:
            ok = await self._quietly(self.pbx.ring(self.channel_id), "ring")
        self.trace.add("ringback", early_media=bool(self.settings.moh_class), ok=ok)

    async def _contacts(self) -> list[str] | None:
        try:
            return await self.pbx.contacts(self.target)
        except PbxError as exc:
            log.warning("call %s: cannot read the contacts of %s: %s", self.call_id, self.target, exc)
            return []

    async def _ring_live(self, live: list[str], dial: bool = True) -> None:
        """Drop the registered contact of each pushed device (its re-REGISTER is then reported
        as new, even with an unchanged URI; the contact is put back unless the device
        re-registers), and ring the live contacts: it may be awake.

        A contact without push parameters, a pushed device's contact over TCP/TLS (it fails
        at once when the app's socket is gone), one that answers the PBX's qualify and one of a
        device known to answer on its old contact are rung at once. A pushed device's old UDP
        contact that the qualify finds unreachable is rung only if no push reaches the device;
        one that is not qualified is rung ``calls.stale_ring_delay`` after the push, and only if
        the device has not re-registered by then: an INVITE to a sleeping UDP phone is
        retransmitted for 32 s whatever happens to the call (measured), costs the PBX a channel
        and its retransmissions, and would reach the woken app after its call ended."""
        pushed = {b.device_id for b in self.pushed}
        devices = [(uri, self.device_of(uri)) for uri in live]
        reach = {uri: self.reach.of(uri) for uri in live}  # before the deletion makes the PBX forget it
        await asyncio.gather(*(self._drop_contact(uri, device) for uri, device in devices if device in pushed))
        if not dial:
            return
        now: list[tuple[str, str]] = []
        for uri, device in devices:
            ring = self._stale_ring(uri, device, reach[uri]) if device and device in pushed else StaleRing.NOW
            if ring is StaleRing.NOW:
                now.append((uri, device))
                continue
            self.stale_pending[device] = uri  # rung at once if no push reaches the device
            if ring is StaleRing.LATER:
                self._after(self.settings.stale_ring_delay, RingStale(uri, device))
        await asyncio.gather(*(self._originate(uri, device, awake=False) for uri, device in now))

    def _stale_ring(self, uri: str, device: str, reach: Reach) -> StaleRing:
        """When the old contact of a pushed device is worth an INVITE (see ``_ring_live``)."""
        snapshot = self.dropped.get(device)
        transport = (snapshot or ContactSnapshot(self.target, uri)).transport
        if transport != "udp" or device in self.awake:
            return StaleRing.NOW
        if reach is Reach.REACHABLE:
            return StaleRing.NOW
        return StaleRing.IF_PUSH_FAILS if reach is Reach.UNREACHABLE else StaleRing.LATER

    async def _drop_contact(self, uri: str, device: str) -> None:
        try:
            snapshot = await self.pbx.delete_contact(self.target, uri)
        except PbxError as exc:
            log.info("call %s: delete stale contact: %s", self.call_id, exc)
            return
        if snapshot is not None:
            self.dropped[device] = snapshot

    async def _restore(self, device: str) -> None:
        """Put back the contact deleted before the push: the device did not re-register (it
        was awake on it, or it slept through the call), so Asterisk finds it as before."""
        snapshot = self.dropped.pop(device, None)
        if snapshot is None or device in self.registered or device in self.noticed:
            return
        if any(r.outcome is PushOutcome.TOKEN_DEAD for r in (self.call_results.get(device),) if r is not None):
            return  # its binding was dropped: putting the contact back would capture the dead token again
        if snapshot.expires_at and snapshot.expires_at <= time.time():
            return  # it would have expired by now anyway
        if await self._quietly(self.pbx.restore_contact(snapshot), "restore contact"):
            log.info("call %s: contact of %s restored", self.call_id, device)

    def _after(self, delay: float, event: FlowEvent) -> None:
        async def fire() -> None:
            await asyncio.sleep(delay)
            self.put(event)

        task = asyncio.ensure_future(fire())
        self._timers.add(task)
        task.add_done_callback(self._timers.discard)

    async def _on_ring_stale(self, event: RingStale) -> None:
        if self.stale_pending.pop(event.device_id, None) is not None and event.device_id not in self.registered:
            await self._originate(event.uri, event.device_id, awake=False)

    async def _push_call(self, plans: Sequence[PlannedPush]) -> None:
        results = await self._send(plans, self._message(PushKind.CALL))
        self.call_results.update(results)
        self.put(PushesDone(results))

    # ---------------------------------------------------------------- WAITING

    async def _on_registration(self, reg: Registration) -> None:
        await self._registered(reg, from_gap=False)

    async def _on_gap(self, _gap: Gap) -> None:
        """Signals may have been lost: every live contact counts as registered now."""
        for uri in await self._contacts() or []:
            await self._registered(Registration(self.target, uri, self.device_of(uri)), from_gap=True)

    async def _registered(self, reg: Registration, from_gap: bool) -> None:
        if not from_gap:
            self.trace.add("register", reg.device_id, uri_change="same" if reg.contact_uri in self.live else "new")
        if reg.device_id:
            self.registered.add(reg.device_id)
            self.stale_pending.pop(reg.device_id, None)
        action, leg = self.book.on_registration(reg, from_gap)
        if action is LegAction.IGNORE:
            return
        self._observe_wake(reg.device_id)
        if action is LegAction.REPLACE and leg is not None:
            log.info("call %s: %s registered again; replacing the INVITE it slept through", self.call_id,
                     leg.device_id or leg.uri.split(";")[0])
            self.trace.add("leg", leg.device_id, fate="replaced", leg=leg.channel_id)
            self._drop(leg)
            self.book.forget_uri(leg.uri)
            if leg.device_id:
                self.book.replaced_at[leg.device_id] = time.time()
            await self._originate(leg.uri, leg.device_id)
            self._hang_up_later(leg)  # after the new INVITE: the phone waits for nothing else
            return
        replaced = self.book.of_device(reg.device_id)
        for old in replaced:
            # The device came back on a new address: the INVITE to the old one is lost.
            self.trace.add("leg", old.device_id, fate="replaced", leg=old.channel_id, new_address=True)
            self._drop(old)
        await self._originate(reg.contact_uri, reg.device_id)
        for old in replaced:
            self._hang_up_later(old)

    def _observe_wake(self, device_id: str) -> None:
        if (self.push_sent_at and device_id and device_id not in self.woken
                and any(b.device_id == device_id for b in self.pushed)):
            self.woken.add(device_id)
            self.metrics.wake_latency.observe(time.monotonic() - self.push_sent_at)

    async def _on_store_back(self, event: StoreBack) -> None:
        self.store_ok = True
        self._retry_task = None
        log.info("call %s: binding store answers again; pushing %d device(s)", self.call_id, len(event.plans))
        if not event.plans:
            if not self.book.legs:
                self.end(Status.NO_DEVICES)
            return
        self._push(event.plans)
        await self._ring_live(self.live, dial=False)

    async def _on_pushes_done(self, event: PushesDone) -> None:
        self._push_task = None
        for device, result in event.results.items():
            if result.outcome is not PushOutcome.DELIVERED and device in self.stale_pending:
                # No push reached it: its old contact is the only way, and there is no
                # re-REGISTER to wait for.
                await self._originate(self.stale_pending.pop(device), device, awake=False)
        if (not any(r.outcome is PushOutcome.DELIVERED for r in event.results.values()) and not self.book.legs
                and not self.stale_pending):
            log.info("call %s: no push was delivered and nothing rings", self.call_id)
            self.end(Status.PUSH_FAILED)

    async def _on_leg_state(self, event: ChannelStateChange) -> None:
        leg = self.book.legs.get(event.channel_id)
        if leg is not None and event.state in ("Ringing", "Up") and not leg.progressed:
            leg.progressed = True
            self.trace.add("leg", leg.device_id, fate="ringing", leg=leg.channel_id)
            await self._awake_on_old_contact(leg)

    async def _awake_on_old_contact(self, leg: Leg) -> None:
        """A leg to a contact registered before the call rings: that phone is awake and may
        never re-register. Put its contact back now, and ring it at once next time."""
        if not leg.awake and leg.device_id:
            self.awake.add(leg.device_id)
            await self._restore(leg.device_id)

    async def _on_stasis_start(self, event: StasisStart) -> None:
        leg = self.book.legs.get(event.channel_id)
        if leg is None:
            return
        self.answered_by = leg  # the originated leg answered: it entered the app
        self.trace.add("leg", leg.device_id, fate="answered", leg=leg.channel_id)
        self.to(Phase.ANSWERING)
        if not leg.progressed:
            leg.progressed = True
            await self._awake_on_old_contact(leg)
        try:
            await self._bridge(leg)
        except PbxError as exc:
            # The phone answered, so the call is over either way: most often the callee hung up
            # at once, before the bridge (FreeSWITCH answers the caller first, so the caller may
            # already have heard its 200 OK), or the caller left meanwhile. Both sides are hung
            # up, as after a bridged call; the other devices hear that it was answered.
            log.warning("call %s: bridging the answer of %s failed: %s", self.call_id,
                        leg.device_id or leg.uri.split(";")[0], exc)
            self.trace.add("bridge", leg.device_id, leg=leg.channel_id, failed=str(exc)[:160])
            self.status = Status.ANSWERED
            self._others_answered_elsewhere(leg)
            self.to(Phase.ENDING)
            return
        self.status = Status.ANSWERED
        self.to(Phase.BRIDGED)

    async def _on_hangup_waiting(self, event: StasisEnd | ChannelHangupRequest | ChannelDestroyed) -> None:
        if event.channel_id == self.channel_id:
            self.caller_gone = True
            self.trace.add("hangup", side="caller", cause=getattr(event, "cause", None))
            self.end(Status.CANCELLED)
            return
        leg = self.book.legs.get(event.channel_id)
        if leg is None or not isinstance(event, ChannelDestroyed):
            return
        self._drop(leg)
        device = leg.device_id or leg.uri.split(";")[0]
        self.trace.add("leg", leg.device_id, fate="refused" if event.cause in DECLINE_CAUSES else "failed",
                       leg=leg.channel_id, cause=event.cause, cause_txt=event.cause_txt or None)
        if event.cause not in DECLINE_CAUSES:
            self.book.failed_at[leg.uri] = time.time()
            log.info("call %s: leg to %s ended without an answer (cause %d %s)", self.call_id, device, event.cause,
                     event.cause_txt)
            return
        replaced = self.book.replaced_at.pop(leg.device_id, 0.0) if leg.device_id else 0.0
        if time.time() - replaced < REDIAL_WINDOW:
            # A retransmission of the INVITE it slept through reached its reopened socket
            # first: it answered that leg (which was replaced and hung up) and refused this
            # one as a duplicate. It is free again: ring it once more.
            log.info("call %s: %s refused the replacement INVITE; ringing it again", self.call_id, device)
            self.book.forget_uri(leg.uri)
            await asyncio.sleep(REDIAL_PAUSE)
            await self._originate(leg.uri, leg.device_id)
            return
        if self.book.of_device(leg.device_id):
            # The phone refused a second INVITE of this call (one sent while it slept,
            # retransmitted to its reopened socket) while it takes the other.
            log.info("call %s: device %s refused a duplicate INVITE", self.call_id, device)
            return
        log.info("call %s: device %s declined (cause %d)", self.call_id, device, event.cause)
        if self.settings.on_decline == "busy":
            self.end(Status.DECLINED)
            return
        self.declined = True

    async def _on_deadline_waiting(self, _event: Deadline) -> None:
        if self.declined and not self.book.legs:
            self.end(Status.DECLINED)
        elif not self.store_ok:
            self.end(Status.PUSH_FAILED)  # nobody answered and the devices could not be pushed
        else:
            self.end(Status.TIMEOUT)

    async def _on_shutdown(self, _event: Shutdown) -> None:
        self.end(Status.SHUTDOWN)

    # ---------------------------------------------------------------- BRIDGED

    async def _on_hangup_bridged(self, event: StasisEnd | ChannelHangupRequest | ChannelDestroyed) -> None:
        """Asterisk does not carry a hang-up across a Stasis bridge: the flow does, both ways."""
        leg = self.answered_by
        if event.channel_id == self.channel_id:
            self.caller_gone = True
        elif leg is None or event.channel_id != leg.channel_id:
            return
        else:
            self.callee_gone = True  # it is hanging up already: no second DELETE for it
        self.trace.add("hangup", None if self.caller_gone else (leg.device_id if leg else None),
                       side="caller" if self.caller_gone else "callee", cause=getattr(event, "cause", None))
        self.to(Phase.ENDING)

    async def _on_deadline_bridged(self, _event: Deadline) -> None:
        log.warning("call %s: longer than calls.max_duration (%.0f s); ending it", self.call_id,
                    self.settings.max_duration)
        self.to(Phase.ENDING)

    # ---------------------------------------------------------------- actions

    async def _bridge(self, leg: Leg) -> None:
        bridge_id = f"ap-br-{uuid.uuid4().hex[:16]}"
        if self.settings.moh_class:
            await self._quietly(self.pbx.stop_early_media(self.channel_id), "stop music on hold")
        await self.pbx.bridge(bridge_id, self.call_id, [self.channel_id, leg.channel_id])
        self.bridge_id = bridge_id
        await self.pbx.answer(self.channel_id)
        self.trace.add("bridge", leg.device_id, bridge=bridge_id, leg=leg.channel_id)
        log.info("call %s: answered by %s, bridged", self.call_id, leg.device_id or leg.uri.split(";")[0])
        for other in [lg for lg in self.book.legs.values() if lg is not leg]:
            # CANCEL with Reason: SIP;cause=200;text="Call completed elsewhere" (CallKit and
            # most SIP apps show "answered elsewhere", not a missed call)
            self.trace.add("leg", other.device_id, fate="cancelled", leg=other.channel_id, reason="answered_elsewhere")
            await self._drop_and_hang_up(other, "answered_elsewhere")
        self._others_answered_elsewhere(leg)

    def _others_answered_elsewhere(self, leg: Leg) -> None:
        """The push follow-up to every other pushed device: the call was answered on ``leg``."""
        others = [b for b in self.pushed if b.device_id != leg.device_id]
        if others:
            self.spawn(self._follow_up(others, PushKind.ANSWERED_ELSEWHERE), f"elsewhere-{self.call_id}")

    async def _originate(self, uri: str, device_id: str, awake: bool = True) -> None:
        if uri in self.book.dialled:
            return
        leg = Leg(f"ap-{uuid.uuid4().hex[:20]}", uri, device_id, awake=awake)
        self.book.add(leg)
        self.on_leg(leg.channel_id, self)
        request = LegRequest(
            leg_id=leg.channel_id, caller_channel=self.channel_id, endpoint=self._endpoint_of(device_id),
            contact_uri=uri, caller_name=self.caller_name, caller_number=self.caller_number,
            call_id=self.call_id, ring_timeout=self.settings.dial_timeout)
        self.trace.add("leg", device_id, fate="originated", leg=leg.channel_id, awake=awake)
        try:
            await self.pbx.originate(request)
            log.info("call %s: ringing %s", self.call_id, device_id or uri.split(";")[0])
        except PbxError as exc:
            self.trace.add("leg", device_id, fate="failed", leg=leg.channel_id, reason=str(exc)[:200])
            log.warning("call %s: originate to %s failed: %s", self.call_id, uri.split(";")[0], exc)
            self._drop(leg)
            # With no answer (the link dropped mid-request) the PBX may have made the channel
            # anyway: make sure no leg of this call rings on unseen.
            self.spawn(self._quietly(self.pbx.hangup(leg.channel_id), "hangup"), f"unmade-{leg.channel_id}")

    def _drop(self, leg: Leg) -> None:
        self.book.drop(leg)
        if self.answered_by is not leg:
            self.on_leg(leg.channel_id, None)

    async def _drop_and_hang_up(self, leg: Leg, reason: str = "normal") -> None:
        self._drop(leg)
        await self._quietly(self.pbx.hangup(leg.channel_id, reason), "hangup")

    def _hang_up_later(self, leg: Leg) -> None:
        """Hang up a leg already dropped from the book, beside the flow (off its critical path)."""
        self.spawn(self._quietly(self.pbx.hangup(leg.channel_id, "normal"), "hangup"), f"replaced-{leg.channel_id}")

    def _endpoint_of(self, device_id: str) -> str:
        return next((b.endpoint for b in self.pushed if b.device_id == device_id and b.endpoint), self.target)

    def device_of(self, uri: str) -> str:
        """The device id of a contact that carries push parameters, else ''."""
        try:
            push = parse_contact(uri, self.policy)
        except ContactRejected:
            return ""
        return push.device_id if push else ""

    # ---------------------------------------------------------------- pushes

    def _message(self, kind: PushKind) -> PushMessage:
        remaining = max(0.0, self.timeout - (time.monotonic() - self.started))
        deadline = time.time() + (remaining if kind is PushKind.CALL else 30.0)
        return PushMessage(kind=kind, call_id=self.call_id, caller_number=self.caller_number,
                           caller_name=self.caller_name, callee=self.target, deadline=deadline)

    async def _send(self, plans: Sequence[PlannedPush], message: PushMessage) -> dict[str, PushResult]:
        """Exactly one push per (call, device, kind), whichever daemon handles the call: a push
        another daemon sent for this call (before a take-over) counts as delivered."""
        fresh = [p for p in plans if p.first]
        earlier = {p.binding.device_id: PushResult(PushOutcome.DELIVERED, "sent earlier for this call")
                   for p in plans if not p.first}
        verdicts = {p.binding.device_id: p.allowed for p in fresh} if message.kind is PushKind.CALL else None
        results = await self.dispatcher.send_many([p.binding for p in fresh], message, verdicts=verdicts)
        for p in fresh:
            r = results.get(p.binding.device_id)
            if r is not None:
                self.metrics.pushes.labels(p.binding.push.provider, message.kind.value, r.outcome.value).inc()
        return {**earlier, **results}

    async def _settle_push(self, bound: float = 3.0) -> None:
        """The call ended while its push was still on the wire: give it ``bound`` seconds to get
        its answer (the follow-ups and end notices depend on whether it reached the phone; the
        caller's channel is already dealt with), then stop it."""
        push = self._push_task
        if push is None or push.done():
            return
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(push), bound)
        if not push.done():
            push.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await push

    async def _follow_up(self, bindings: Sequence[Binding], kind: PushKind) -> None:
        push = self._push_task
        if push is not None and not push.done():
            # Answered before every call push had its answer: wait for it (bounded by the push
            # deadline), so that the end notice below knows which devices were reached.
            try:
                await asyncio.shield(push)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # this follow-up itself is being cancelled: let it go
        plans = await self.planner.follow_up(self.call_id, bindings, kind)
        results = await self._send(plans, self._message(kind))
        if kind not in (PushKind.CANCEL, PushKind.ANSWERED_ELSEWHERE):
            return
        for b in bindings:
            # Pushed for the call, never registered during it (no leg to CANCEL), and the push
            # saying how it ended did not get through: tell it over SIP when it registers.
            called = self.call_results.get(b.device_id)
            told = results.get(b.device_id)
            if (called is not None and called.outcome is PushOutcome.DELIVERED and b.device_id not in self.registered
                    and (told is None or told.outcome is not PushOutcome.DELIVERED)):
                self.noticed.add(b.device_id)
                self.on_end_notice(EndNotice(
                    b, self.call_id, self.channel_id, self.caller_number, self.caller_name,
                    "answered_elsewhere" if kind is PushKind.ANSWERED_ELSEWHERE else "normal"))

    # ---------------------------------------------------------------- ENDING

    async def _finish(self) -> None:
        """Leave the PBX clean: legs hung up, the caller continued (or hung up after a bridged
        call), the bridge gone; then the follow-up pushes."""
        if self.phase is not Phase.ENDING:
            self.phase = Phase.ENDING  # cancelled or failed mid-way: clean up all the same
        self.trace.close(self.status.value)
        try:
            for task in (self._retry_task, *self._timers):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            answered = self.status is Status.ANSWERED
            for leg in list(self.book.legs.values()):
                if not (answered and leg is self.answered_by):
                    self.trace.add("leg", leg.device_id, fate="cancelled", leg=leg.channel_id)
                    await self._quietly(self.pbx.hangup(leg.channel_id), "hangup")
            if answered:
                if not self.caller_gone:
                    await self._quietly(self.pbx.hangup(self.channel_id), "hangup")
                if self.answered_by is not None and not self.callee_gone:
                    await self._quietly(self.pbx.hangup(self.answered_by.channel_id), "hangup")
            elif not self.caller_gone:
                await self._quietly(self.pbx.continue_in_dialplan(self.channel_id, self.status.value,
                                                                  self.settings.continue_context), "continue")
            if self.bridge_id:
                await self._quietly(self.pbx.destroy_bridge(self.bridge_id), "destroy bridge")
            await self._settle_push()
            if not answered and self.pushed:
                await self._follow_up(self.pushed, PushKind.CANCEL)
                if self.status is Status.TIMEOUT and self.settings.missed_call_push:
                    await self._follow_up(self.pushed, PushKind.MISSED_CALL)
            for device in list(self.dropped):
                await self._restore(device)
            log.info("call %s to %s from %s ended: %s after %.2fs", self.call_id, self.target, self.caller_number,
                     self.status.value, time.monotonic() - self.started)
        finally:
            for leg_id in list(self.book.legs):
                self.on_leg(leg_id, None)
            if self.answered_by is not None:
                self.on_leg(self.answered_by.channel_id, None)
            self.phase = Phase.ENDED


Handler = Callable[[CallFlow, Any], Awaitable[None]]

#: which event is handled in which phase; anything else is ignored in that phase
HANDLERS: dict[tuple[Phase, type], Handler] = {
    (Phase.WAITING, Registration): CallFlow._on_registration,
    (Phase.WAITING, Gap): CallFlow._on_gap,
    (Phase.WAITING, PushesDone): CallFlow._on_pushes_done,
    (Phase.WAITING, StoreBack): CallFlow._on_store_back,
    (Phase.WAITING, RingStale): CallFlow._on_ring_stale,
    (Phase.WAITING, ChannelStateChange): CallFlow._on_leg_state,
    (Phase.WAITING, StasisStart): CallFlow._on_stasis_start,
    (Phase.WAITING, Deadline): CallFlow._on_deadline_waiting,
    (Phase.WAITING, Shutdown): CallFlow._on_shutdown,
    **{(Phase.WAITING, kind): CallFlow._on_hangup_waiting for kind in HANGUPS},
    **{(Phase.BRIDGED, kind): CallFlow._on_hangup_bridged for kind in HANGUPS},
    (Phase.BRIDGED, Deadline): CallFlow._on_deadline_bridged,
}
