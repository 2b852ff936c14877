"""The call flow (call_flow.py) and the call manager (calls.py) through an in-memory PBX.

No sockets: the PBX is ``MemoryPbx`` (it implements the PBX port and records what the flow
asks of it), the store and planner are the product's embedded ones, the dispatcher is the
product's; only the push service is scripted. Every transition of ``call_flow.TRANSITIONS``
is driven here; the integration tests drive the same flow against a real Asterisk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pytest

from ari_push.bindings import MemoryStore, StoreUnavailable
from ari_push.call_events import (
    ChannelDestroyed,
    ChannelInfo,
    ChannelStateChange,
    StasisEnd,
    StasisStart,
)
from ari_push.call_flow import HANDLERS, REDIAL_WINDOW, TRANSITIONS, CallFlow, LegAction, LegBook, Phase, Status
from ari_push.calls import CallManager
from ari_push.channels import DIALED
from ari_push.contacts import ContactPolicy
from ari_push.metrics import Metrics
from ari_push.model import Binding, PushKind, PushMessage, PushOutcome, PushParams, PushResult
from ari_push.pbx import ContactSnapshot, LegRequest, PbxError
from ari_push.push.dispatch import PushDispatcher
from ari_push.push.plan import MemoryPushPlanner, PlannedPush
from ari_push.qualify import ContactReach, Reach
from ari_push.settings import CallSettings, CaptureSettings, PushSettings, Settings
from ari_push.wakeups import Registration, WakeupHub

AOR = "1001"
TOKEN = "f" * 30 + ":APA91b" + "x" * 100
TOKEN2 = "g" * 30 + ":APA91b" + "y" * 100


def push_uri(port: int, token: str = TOKEN) -> str:
    return f"sip:{AOR}@127.0.0.1:{port};transport=udp;pn-provider=fcm;pn-prid={token};pn-param=proj-a"


def binding(token: str = TOKEN, port: int = 5001, seen: float = 1.0) -> Binding:
    return Binding(aor=AOR, endpoint=AOR, push=PushParams("fcm", token, "proj-a"), contact_uri=push_uri(port, token),
                   first_seen=seen, last_seen=seen)


# ---------------------------------------------------------------- the rig of this tier


@dataclass
class MemoryPbx:
    """The PBX port in memory: records every request; contacts and failures are set by the test."""

    contacts_of: dict[str, list[str] | None] = field(default_factory=dict)
    ops: list[tuple[str, ...]] = field(default_factory=list)
    legs: list[LegRequest] = field(default_factory=list)
    originated: asyncio.Queue[LegRequest] = field(default_factory=asyncio.Queue)
    failing: dict[str, PbxError] = field(default_factory=dict)
    contacts_gate: asyncio.Event | None = None  # the contact read waits for it when set
    live_channels: list[ChannelInfo] = field(default_factory=list)
    in_app: set[str] = field(default_factory=set)
    present: set[str] = field(default_factory=set)  # there when asked, listed or not (a lagging listing)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _op(self, *op: str) -> None:
        if op[0] in self.failing:
            raise self.failing[op[0]]
        self.ops.append(op)
        self.changed.set()

    def names(self) -> list[str]:
        return [op[0] for op in self.ops]

    async def ring(self, channel_id: str) -> None:
        self._op("ring", channel_id)

    async def early_media(self, channel_id: str, moh_class: str) -> None:
        self._op("early_media", channel_id, moh_class)

    async def stop_early_media(self, channel_id: str) -> None:
        self._op("stop_early_media", channel_id)

    async def originate(self, leg: LegRequest) -> None:
        self._op("originate", leg.leg_id, leg.contact_uri)
        self.legs.append(leg)
        self.originated.put_nowait(leg)

    async def answer(self, channel_id: str) -> None:
        self._op("answer", channel_id)

    async def bridge(self, bridge_id: str, name: str, channel_ids: Sequence[str]) -> None:
        self._op("bridge", bridge_id, *channel_ids)

    async def destroy_bridge(self, bridge_id: str) -> None:
        self._op("destroy_bridge", bridge_id)

    async def hangup(self, channel_id: str, reason: str = "normal") -> None:
        self._op("hangup", channel_id, reason)

    async def continue_in_dialplan(self, channel_id: str, status: str, context: str = "") -> None:
        self._op("continue", channel_id, status, context)

    async def contacts(self, aor: str) -> list[str] | None:
        if self.contacts_gate is not None:
            await self.contacts_gate.wait()
        self._op("contacts", aor)
        return list(self.contacts_of[aor]) if self.contacts_of.get(aor) is not None else None

    async def delete_contact(self, aor: str, contact_uri: str) -> ContactSnapshot | None:
        self._op("delete_contact", aor, contact_uri)
        if contact_uri not in (self.contacts_of.get(aor) or []):
            return None
        self.contacts_of[aor] = [u for u in self.contacts_of[aor] or [] if u != contact_uri]
        return ContactSnapshot(aor, contact_uri, time.time() + 300, (("uri", contact_uri),))

    async def restore_contact(self, snapshot: ContactSnapshot) -> None:
        self._op("restore_contact", snapshot.aor, snapshot.uri)
        self.contacts_of[snapshot.aor] = [*(self.contacts_of.get(snapshot.aor) or []), snapshot.uri]

    def restored(self) -> list[str]:
        return [op[2] for op in self.ops if op[0] == "restore_contact"]

    async def system_id(self) -> str:
        return "02:42:ac:11:00:02"

    async def channels(self) -> list[ChannelInfo]:
        return list(self.live_channels)

    async def exists(self, channel_id: str) -> bool:
        self._op("exists", channel_id)
        return channel_id in self.present or any(c.id == channel_id for c in self.live_channels)

    async def app_channel_ids(self) -> set[str]:
        return set(self.in_app)

    async def bridge_of(self, channel_id: str) -> tuple[str, list[str]] | None:
        return None

    async def watch_channel(self, channel_id: str) -> None:
        self._op("watch", channel_id)

    def hung_up(self) -> set[str]:
        return {op[1] for op in self.ops if op[0] == "hangup"}

    def reasons(self, channel_id: str) -> list[str]:
        return [op[2] for op in self.ops if op[0] == "hangup" and op[1] == channel_id]

    def continued(self) -> list[tuple[str, ...]]:
        return [op[1:] for op in self.ops if op[0] == "continue"]


@dataclass
class PushService:
    """The cloud push service (the one part that is replaced): answers as scripted."""

    name: str = "fcm"
    answer: PushOutcome = PushOutcome.DELIVERED
    answers: dict[PushKind, PushOutcome] = field(default_factory=dict)  # per kind, before ``answer``
    sent: list[tuple[str, PushKind]] = field(default_factory=list)
    arrived: asyncio.Queue[tuple[str, PushKind]] = field(default_factory=asyncio.Queue)

    def serves(self, b: Binding) -> bool:
        return b.push.provider == "fcm"

    async def warm(self) -> None:
        return None

    async def send(self, b: Binding, message: PushMessage) -> PushResult:
        self.sent.append((b.device_id, message.kind))
        self.arrived.put_nowait((b.device_id, message.kind))
        return PushResult(self.answers.get(message.kind, self.answer), "scripted")

    async def aclose(self) -> None:
        return None

    def kinds(self) -> list[PushKind]:
        return [k for _, k in self.sent]


class Harness:
    def __init__(self, calls: CallSettings | None = None, push: PushSettings | None = None) -> None:
        self.pbx = MemoryPbx()
        self.store = MemoryStore()
        self.service = PushService()
        self.metrics = Metrics()
        self.wakeups = WakeupHub()
        self.settings = Settings(calls=calls or CallSettings(default_timeout=5.0, dial_timeout=30.0))
        self.planner = MemoryPushPlanner(self.store, push or PushSettings(rate_per_minute=0))
        self.dispatcher = PushDispatcher([self.service], on_token_dead=self._dead)
        self.policy = ContactPolicy.from_settings(CaptureSettings())
        self.manager = CallManager(self.settings, self.pbx, self.planner, self.dispatcher, self.wakeups,
                                   self.metrics, self.policy)
        self.pbx.contacts_of[AOR] = []

    async def _dead(self, b: Binding, r: PushResult) -> None:
        await self.store.forget(b.aor, b.device_id)

    async def add(self, b: Binding) -> Binding:
        return await self.store.upsert(b)

    def call(self, channel: str = "caller-1", args: tuple[str, ...] = (AOR,)) -> CallFlow:
        info = ChannelInfo(channel, "Ring", "2000", "Alice", 0.0, "Stasis", ",".join(args))
        self.manager.on_event(StasisStart(info, args, "02:42:ac:11:00:02"))
        flow = self.manager.calls.get(channel)
        assert flow is not None, "no flow started"
        return flow

    async def leg(self) -> LegRequest:
        return await asyncio.wait_for(self.pbx.originated.get(), 5)

    def register(self, uri: str, device_id: str = "") -> None:
        self.wakeups.deliver(Registration(AOR, uri, device_id, at=time.time()))

    def answer(self, leg: LegRequest) -> None:
        info = ChannelInfo(leg.leg_id, "Up", AOR, "", 0.0, "Stasis", f"{DIALED},{leg.caller_channel}")
        self.manager.on_event(StasisStart(info, (DIALED, leg.caller_channel)))

    async def ended(self, flow: CallFlow, timeout: float = 10.0) -> Status:
        async def done() -> None:
            while flow.phase is not Phase.ENDED or flow.channel_id in self.manager.calls:
                await asyncio.sleep(0.005)
        await asyncio.wait_for(done(), timeout)
        return flow.status

    async def phase(self, flow: CallFlow, phase: Phase, timeout: float = 5.0) -> None:
        async def reached() -> None:
            while flow.phase is not phase:
                await asyncio.sleep(0.002)
        await asyncio.wait_for(reached(), timeout)

    async def push(self, kind: PushKind = PushKind.CALL) -> str:
        while True:
            device, got = await asyncio.wait_for(self.service.arrived.get(), 5)
            if got is kind:
                return device

    async def close(self) -> None:
        stop = asyncio.Event()
        stop.set()
        await self.manager.run(stop)


@pytest.fixture
async def rig() -> Harness:
    h = Harness()
    yield h  # type: ignore[misc]
    await h.close()


def h_with(**calls: object) -> Harness:
    return Harness(calls=replace(CallSettings(default_timeout=5.0, dial_timeout=30.0), **calls))  # type: ignore[arg-type]


# ---------------------------------------------------------------- the tables


def test_every_phase_has_its_transitions_and_handlers_only_in_live_phases() -> None:
    assert set(TRANSITIONS) == set(Phase)
    assert TRANSITIONS[Phase.ENDED] == frozenset()
    assert {phase for phase, _ in HANDLERS} == {Phase.WAITING, Phase.BRIDGED}


async def test_a_transition_outside_the_table_is_refused(rig: Harness) -> None:
    await rig.add(binding())
    flow = rig.call()
    await rig.phase(flow, Phase.WAITING)
    with pytest.raises(RuntimeError, match="no transition waiting -> bridged"):
        flow.to(Phase.BRIDGED)
    rig.manager.on_event(StasisEnd(flow.channel_id))
    assert await rig.ended(flow) is Status.CANCELLED


# ---------------------------------------------------------------- STARTING -> ENDING


async def test_unknown_aor_continues_with_no_devices(rig: Harness) -> None:
    rig.pbx.contacts_of[AOR] = None
    flow = rig.call()
    assert await rig.ended(flow) is Status.NO_DEVICES
    assert rig.pbx.continued() == [("caller-1", "NO_DEVICES", "")]
    assert rig.service.sent == []


async def test_nothing_to_push_or_ring_continues_with_no_devices(rig: Harness) -> None:
    flow = rig.call()
    assert await rig.ended(flow) is Status.NO_DEVICES
    assert "ring" in rig.pbx.names()  # the caller heard ringback at once, all the same


class BlinkingPlanner(MemoryPushPlanner):
    """The product's embedded planner behind a store that fails ``failures`` reads first."""

    def __init__(self, store: MemoryStore, failures: int) -> None:
        super().__init__(store, PushSettings(rate_per_minute=0))
        self.failures = failures
        self.reads = 0

    async def call_push(self, aor: str, call_id: str) -> list[PlannedPush]:
        self.reads += 1
        if self.reads <= self.failures:
            raise StoreUnavailable("redis: connection refused")
        return await super().call_push(aor, call_id)


async def test_store_down_for_the_whole_call_is_push_failed() -> None:
    h = h_with(default_timeout=0.6)
    planner = BlinkingPlanner(h.store, failures=10_000)
    h.manager.planner = planner
    await h.add(binding())
    flow = h.call()
    assert await h.ended(flow) is Status.PUSH_FAILED
    assert h.pbx.continued() == [("caller-1", "PUSH_FAILED", "")]
    assert planner.reads >= 2 and h.service.sent == []  # it kept trying within the call's time
    await h.close()


async def test_store_blink_read_again_and_pushed_when_it_answers() -> None:
    h = Harness()
    h.manager.planner = BlinkingPlanner(h.store, failures=2)
    b = await h.add(binding(port=5001))
    h.pbx.contacts_of[AOR] = [push_uri(5001)]  # the sleeping phone's stale contact
    flow = h.call()
    await h.phase(flow, Phase.WAITING)
    assert await h.push() == b.device_id  # pushed once the store answered
    assert ("delete_contact", AOR, push_uri(5001)) in h.pbx.ops  # and its stale contact dropped then
    h.register(push_uri(5002), b.device_id)
    leg = await h.leg()
    while leg.contact_uri != push_uri(5002):
        leg = await h.leg()
    h.answer(leg)
    await h.phase(flow, Phase.BRIDGED)
    h.manager.on_event(StasisEnd("caller-1"))
    assert await h.ended(flow) is Status.ANSWERED
    await h.close()


async def test_bad_arguments_and_a_draining_daemon_continue_the_caller_at_once(rig: Harness) -> None:
    rig.manager.on_event(StasisStart(ChannelInfo("c-bad"), ("10 01",)))
    rig.manager.draining = True
    rig.manager.on_event(StasisStart(ChannelInfo("c-late"), (AOR,)))
    async def both() -> None:
        while len(rig.pbx.continued()) < 2:
            await asyncio.sleep(0.002)
    await asyncio.wait_for(both(), 5)
    assert sorted(rig.pbx.continued()) == [("c-bad", "NO_DEVICES", ""), ("c-late", "SHUTDOWN", "")]
    assert rig.manager.calls == {}


# ---------------------------------------------------------------- the whole happy path


async def test_push_leaves_before_the_contacts_are_read(rig: Harness) -> None:
    b = await rig.add(binding())
    rig.pbx.contacts_gate = asyncio.Event()  # the PBX is slow to list contacts
    flow = rig.call()
    assert await rig.push() == b.device_id  # pushed while the contact read still waits
    assert "contacts" not in rig.pbx.names()
    rig.pbx.contacts_gate.set()
    await rig.phase(flow, Phase.WAITING)
    rig.manager.on_event(StasisEnd(flow.channel_id))
    await rig.ended(flow)


@pytest.mark.parametrize("moh", ["", "default"])
async def test_woken_phone_is_rung_at_its_exact_new_uri_bridged_and_hung_up(moh: str) -> None:
    h = h_with(moh_class=moh)
    b = await h.add(binding(port=5001))
    flow = h.call()
    await h.push()
    await h.phase(flow, Phase.WAITING)
    assert ("ring" in h.pbx.names()) is (not moh) and ("early_media" in h.pbx.names()) is bool(moh)
    fresh = push_uri(5002)
    h.register(fresh, b.device_id)
    leg = await h.leg()
    assert leg.contact_uri == fresh and leg.call_id == flow.call_id and leg.endpoint == AOR
    assert leg.caller_number == "2000" and leg.ring_timeout == 30.0
    h.answer(leg)
    await h.phase(flow, Phase.BRIDGED)
    bridge = next(op for op in h.pbx.ops if op[0] == "bridge")
    assert bridge[2:] == ("caller-1", leg.leg_id)
    assert ("answer", "caller-1") in h.pbx.ops
    assert ("stop_early_media" in h.pbx.names()) is bool(moh)
    assert h.metrics.calls_waiting._value.get() == 0
    h.manager.on_event(StasisEnd("caller-1"))  # the caller hangs up: the phone's leg goes too
    assert await h.ended(flow) is Status.ANSWERED
    assert leg.leg_id in h.pbx.hung_up() and "caller-1" not in h.pbx.hung_up()
    assert "destroy_bridge" in h.pbx.names() and h.pbx.continued() == []
    assert h.service.kinds() == [PushKind.CALL]  # no cancel after an answer
    assert h.manager.leg_owner == {} and h.manager.calls == {}
    await h.close()


async def test_phone_hanging_up_a_bridged_call_hangs_up_the_caller(rig: Harness) -> None:
    b = await rig.add(binding())
    flow = rig.call()
    await rig.phase(flow, Phase.WAITING)
    rig.register(push_uri(5002), b.device_id)
    leg = await rig.leg()
    rig.answer(leg)
    await rig.phase(flow, Phase.BRIDGED)
    rig.manager.on_event(ChannelDestroyed(leg.leg_id, 16))
    assert await rig.ended(flow) is Status.ANSWERED
    assert "caller-1" in rig.pbx.hung_up()
    assert leg.leg_id not in rig.pbx.hung_up()  # gone already: no second hang-up request for it


async def test_bridged_call_longer_than_max_duration_is_ended() -> None:
    h = h_with(max_duration=0.3)
    b = await h.add(binding())
    flow = h.call()
    await h.phase(flow, Phase.WAITING)
    h.register(push_uri(5002), b.device_id)
    h.answer(await h.leg())
    assert await h.ended(flow) is Status.ANSWERED
    assert {"caller-1"} <= h.pbx.hung_up()
    await h.close()


# ---------------------------------------------------------------- same URI, stale contacts


async def test_same_uri_wake_deletes_the_stale_contact_and_rings_the_fresh_registration(rig: Harness) -> None:
    b = await rig.add(binding(port=5001))
    stale = push_uri(5001)
    desk_uri = "sip:1001@127.0.0.1:6000"
    rig.pbx.contacts_of[AOR] = [stale, desk_uri]  # the sleeping phone and a desk phone
    flow = rig.call()
    desk = await rig.leg()
    assert desk.contact_uri == desk_uri  # a contact without push parameters rings at once
    assert ("delete_contact", AOR, stale) in rig.pbx.ops  # only the push device's contact is dropped
    assert not any(op[0] == "delete_contact" and op[2] == desk_uri for op in rig.pbx.ops)
    await rig.phase(flow, Phase.WAITING)
    rig.register(stale, b.device_id)  # the same URI registers afresh: now Asterisk reports it
    again = await rig.leg()
    assert again.contact_uri == stale
    assert rig.metrics.wake_latency._sum.get() > 0  # a same-URI wake is measured too
    rig.answer(again)
    await rig.phase(flow, Phase.BRIDGED)
    assert rig.pbx.reasons(desk.leg_id) == ["answered_elsewhere"]  # CANCEL: "Call completed elsewhere"
    rig.manager.on_event(StasisEnd("caller-1"))
    assert await rig.ended(flow) is Status.ANSWERED
    assert rig.pbx.restored() == []  # it registered again: nothing to put back
    assert [leg.contact_uri for leg in rig.pbx.legs].count(stale) == 1  # its old UDP contact never got an INVITE


async def test_old_udp_contact_is_rung_after_the_delay_when_the_device_does_not_reregister() -> None:
    h = h_with(stale_ring_delay=0.1)
    b = await h.add(binding(port=5001))
    stale = push_uri(5001)
    h.pbx.contacts_of[AOR] = [stale]
    flow = h.call()
    await h.push()
    leg = await h.leg()  # the phone is awake and never re-registers: its old contact rings
    assert leg.contact_uri == stale
    assert h.pbx.restored() == []
    h.manager.on_event(ChannelStateChange(leg.leg_id, "Ringing"))
    async def restored() -> None:
        while stale not in h.pbx.restored():
            await asyncio.sleep(0.002)
    await asyncio.wait_for(restored(), 5)  # awake on its old contact: put back at once
    assert b.device_id in h.manager.awake
    h.answer(leg)
    await h.phase(flow, Phase.BRIDGED)
    h.manager.on_event(StasisEnd("caller-1"))
    assert await h.ended(flow) is Status.ANSWERED
    assert h.pbx.contacts_of[AOR] == [stale]  # still registered for the next call
    # the next call rings its old contact at once: it is known to answer there
    second = h.call("caller-2")
    leg2 = await asyncio.wait_for(h.pbx.originated.get(), 0.09)
    assert leg2.contact_uri == stale
    h.answer(leg2)
    await h.phase(second, Phase.BRIDGED)
    h.manager.on_event(StasisEnd("caller-2"))
    assert await h.ended(second) is Status.ANSWERED
    assert h.pbx.contacts_of[AOR] == [stale]
    await h.close()


async def test_tcp_contact_of_a_pushed_device_is_rung_at_once(rig: Harness) -> None:
    await rig.add(binding(port=5001))
    tcp = push_uri(5001).replace("transport=udp", "transport=tcp")
    rig.pbx.contacts_of[AOR] = [tcp]
    flow = rig.call()
    assert (await rig.leg()).contact_uri == tcp  # over TCP a dead socket fails at once
    rig.manager.on_event(StasisEnd("caller-1"))
    await rig.ended(flow)


async def test_udp_contact_that_answers_the_qualify_is_rung_at_once() -> None:
    h = h_with(stale_ring_delay=60)
    await h.add(binding(port=5001))
    h.pbx.contacts_of[AOR] = [push_uri(5001)]
    h.manager.reach.on_status(push_uri(5001), "Reachable")  # the PBX's OPTIONS got an answer: awake
    flow = h.call()
    assert (await h.leg()).contact_uri == push_uri(5001)  # no 60 s wait
    h.manager.on_event(StasisEnd("caller-1"))
    await h.ended(flow)
    await h.close()


async def test_udp_contact_the_qualify_finds_unreachable_gets_no_invite_while_the_push_is_out() -> None:
    h = h_with(stale_ring_delay=0.05, default_timeout=0.5)
    await h.add(binding(port=5001))
    h.pbx.contacts_of[AOR] = [push_uri(5001)]
    h.manager.reach.on_status(push_uri(5001), "Unreachable")  # asleep: an INVITE would retransmit for 32 s
    flow = h.call()
    await h.push()
    assert await h.ended(flow) is Status.TIMEOUT  # it slept through the call...
    assert h.pbx.legs == []  # ...and was never sent an INVITE it could receive after it
    assert h.pbx.restored() == [push_uri(5001)]
    await h.close()


async def test_unreachable_udp_contact_is_rung_when_no_push_reaches_the_device() -> None:
    h = h_with(stale_ring_delay=60, default_timeout=0.5)
    h.service.answer = PushOutcome.FAILED
    await h.add(binding(port=5001))
    h.pbx.contacts_of[AOR] = [push_uri(5001)]
    h.manager.reach.on_status(push_uri(5001), "Unreachable")
    flow = h.call()
    assert (await h.leg()).contact_uri == push_uri(5001)  # the only way left, however unlikely
    assert await h.ended(flow) is Status.TIMEOUT
    await h.close()


async def test_qualify_state_forgotten_when_the_contact_is_removed() -> None:
    reach = ContactReach(limit=2)
    reach.on_status("sip:a", "Reachable")
    reach.on_status("sip:b", "UNREACHABLE")
    assert (reach.of("sip:a"), reach.of("sip:b")) == (Reach.REACHABLE, Reach.UNREACHABLE)
    reach.on_status("sip:a", "Removed")
    reach.on_status("sip:b", "NonQualified")  # re-registered with qualify off, or not qualified yet
    assert (reach.of("sip:a"), reach.of("sip:b"), len(reach)) == (Reach.UNKNOWN, Reach.UNKNOWN, 0)
    for uri in ("sip:1", "sip:2", "sip:3"):
        reach.on_status(uri, "Reachable")
    assert len(reach) == 2 and reach.of("sip:1") is Reach.UNKNOWN  # bounded: the oldest goes
    reach.on_status("", "Reachable")
    assert len(reach) == 2


async def test_contact_of_a_device_that_slept_through_the_call_is_put_back() -> None:
    h = h_with(default_timeout=0.3, stale_ring_delay=10)
    await h.add(binding(port=5001))
    h.pbx.contacts_of[AOR] = [push_uri(5001)]
    flow = h.call()
    assert await h.ended(flow) is Status.TIMEOUT
    assert h.pbx.restored() == [push_uri(5001)]  # Asterisk has it as before the call
    assert h.pbx.legs == []  # and it got no INVITE it could receive after the call
    await h.close()


async def test_voip_only_device_learns_over_sip_how_its_call_ended() -> None:
    """The push saying the call is over cannot reach it (iOS: no VoIP push but for a new call):
    when it registers, an INVITE for the call, then a CANCEL with the reason."""
    h = h_with(default_timeout=0.3)
    h.service.answers = {PushKind.CANCEL: PushOutcome.SKIPPED, PushKind.MISSED_CALL: PushOutcome.SKIPPED}
    b = await h.add(binding())
    flow = h.call()
    assert await h.ended(flow) is Status.TIMEOUT
    async def noticed() -> None:
        while not h.wakeups._watches.get(AOR):
            await asyncio.sleep(0.002)
    await asyncio.wait_for(noticed(), 5)
    h.register(push_uri(5007), b.device_id)  # the phone woke after the call ended
    notice = await h.leg()
    assert notice.contact_uri == push_uri(5007) and notice.call_id == flow.call_id and not notice.linked
    h.manager.on_event(ChannelStateChange(notice.leg_id, "Ringing"))
    async def cancelled() -> None:
        while notice.leg_id not in h.pbx.hung_up():
            await asyncio.sleep(0.002)
    await asyncio.wait_for(cancelled(), 5)
    assert h.pbx.reasons(notice.leg_id) == ["normal"]
    await h.close()


async def test_end_notice_answered_anyway_is_hung_up_never_bridged(rig: Harness) -> None:
    rig.service.answers = {PushKind.ANSWERED_ELSEWHERE: PushOutcome.SKIPPED}
    a = await rig.add(binding(TOKEN, 5001, seen=1))
    other = await rig.add(binding(TOKEN2, 5005, seen=2))
    flow = rig.call()
    await rig.phase(flow, Phase.WAITING)
    rig.register(push_uri(5002), a.device_id)
    rig.answer(await rig.leg())
    await rig.phase(flow, Phase.BRIDGED)
    async def noticed() -> None:  # the end notice watches the AOR beside the call
        while len(rig.wakeups._watches.get(AOR, ())) < 2:
            await asyncio.sleep(0.002)
    await asyncio.wait_for(noticed(), 5)
    rig.register(push_uri(5006, TOKEN2), other.device_id)  # the other phone wakes: INVITE + CANCEL
    notice = await rig.leg()
    assert notice.contact_uri == push_uri(5006, TOKEN2)
    rig.answer(notice)  # it answers before the CANCEL: hung up, never bridged
    async def gone() -> None:
        while notice.leg_id not in rig.pbx.hung_up():
            await asyncio.sleep(0.002)
    await asyncio.wait_for(gone(), 5)
    assert sum(1 for op in rig.pbx.ops if op[0] == "bridge") == 1
    rig.manager.on_event(StasisEnd("caller-1"))
    assert await rig.ended(flow) is Status.ANSWERED


async def test_repeated_registration_of_a_leg_that_rings_changes_nothing(rig: Harness) -> None:
    b = await rig.add(binding())
    flow = rig.call()
    await rig.phase(flow, Phase.WAITING)
    fresh = push_uri(5002)
    rig.register(fresh, b.device_id)
    leg = await rig.leg()
    rig.manager.on_event(ChannelStateChange(leg.leg_id, "Ringing"))
    rig.register(fresh, b.device_id)  # another daemon's capture of the same REGISTER
    rig.manager.on_event(StasisEnd("caller-1"))
    assert await rig.ended(flow) is Status.CANCELLED
    assert [leg.contact_uri for leg in rig.pbx.legs] == [fresh]


async def test_device_back_on_a_new_address_drops_its_old_leg(rig: Harness) -> None:
    b = await rig.add(binding())
    flow = rig.call()
    await rig.phase(flow, Phase.WAITING)
    rig.register(push_uri(5002), b.device_id)
    first = await rig.leg()
    rig.register(push_uri(5003), b.device_id)
    second = await rig.leg()
    assert second.contact_uri == push_uri(5003) and first.leg_id in rig.pbx.hung_up()
    rig.manager.on_event(StasisEnd("caller-1"))
    await rig.ended(flow)


async def test_signal_gap_rereads_contacts_and_rings_what_registered(rig: Harness) -> None:
    await rig.add(binding())
    flow = rig.call()
    await rig.phase(flow, Phase.WAITING)
    fresh = push_uri(5009)
    rig.pbx.contacts_of[AOR] = [fresh]
    rig.wakeups.gap()
    assert (await rig.leg()).contact_uri == fresh
    rig.manager.on_event(StasisEnd("caller-1"))
    await rig.ended(flow)


# ---------------------------------------------------------------- WAITING -> ENDING


async def test_caller_hanging_up_ends_legs_and_sends_the_cancel_push(rig: Harness) -> None:
    b = await rig.add(binding())
    flow = rig.call()
    await rig.phase(flow, Phase.WAITING)
    rig.register(push_uri(5002), b.device_id)
    leg = await rig.leg()
    rig.manager.on_event(StasisEnd("caller-1"))
    assert await rig.ended(flow) is Status.CANCELLED
    assert leg.leg_id in rig.pbx.hung_up() and rig.pbx.continued() == []
    assert rig.service.kinds() == [PushKind.CALL, PushKind.CANCEL]


async def test_timeout_continues_with_timeout_and_pushes_cancel_and_missed_call() -> None:
    h = h_with(default_timeout=0.3)
    await h.add(binding())
    flow = h.call()
    assert await h.ended(flow) is Status.TIMEOUT
    assert h.pbx.continued() == [("caller-1", "TIMEOUT", "")]
    assert h.service.kinds() == [PushKind.CALL, PushKind.CANCEL, PushKind.MISSED_CALL]
    await h.close()


async def test_timeout_goes_to_the_continue_context_without_missed_call_when_off() -> None:
    h = h_with(default_timeout=0.3, continue_context="after-push", missed_call_push=False)
    await h.add(binding())
    flow = h.call(args=(AOR, "timeout=0.2"))
    assert flow.timeout == 0.2
    assert await h.ended(flow) is Status.TIMEOUT
    assert h.pbx.continued() == [("caller-1", "TIMEOUT", "after-push")]
    assert h.service.kinds() == [PushKind.CALL, PushKind.CANCEL]
    await h.close()


@pytest.mark.parametrize("cause", [17, 21])
async def test_decline_ends_the_call_busy(rig: Harness, cause: int) -> None:
    b = await rig.add(binding())
    flow = rig.call()
    await rig.phase(flow, Phase.WAITING)
    rig.register(push_uri(5002), b.device_id)
    leg = await rig.leg()
    rig.manager.on_event(ChannelDestroyed(leg.leg_id, cause, "User busy"))
    assert await rig.ended(flow) is Status.DECLINED
    assert rig.pbx.continued() == [("caller-1", "DECLINED", "")]


async def test_decline_with_keep_waiting_waits_for_another_device_then_says_declined() -> None:
    h = h_with(on_decline="keep-waiting", default_timeout=0.5)
    b = await h.add(binding())
    flow = h.call()
    await h.phase(flow, Phase.WAITING)
    h.register(push_uri(5002), b.device_id)
    leg = await h.leg()
    h.manager.on_event(ChannelDestroyed(leg.leg_id, 21))
    await asyncio.sleep(0)  # handled, but the call waits on
    assert flow.phase is Phase.WAITING
    assert await h.ended(flow) is Status.DECLINED
    await h.close()


async def test_no_push_delivered_and_nothing_ringing_is_push_failed(rig: Harness) -> None:
    rig.service.answer = PushOutcome.FAILED
    await rig.add(binding())
    flow = rig.call()
    assert await rig.ended(flow) is Status.PUSH_FAILED
    assert rig.pbx.continued() == [("caller-1", "PUSH_FAILED", "")]


async def test_shutdown_continues_a_waiting_call(rig: Harness) -> None:
    await rig.add(binding())
    flow = rig.call()
    await rig.phase(flow, Phase.WAITING)
    await rig.manager.drain(0.05)
    assert await rig.ended(flow) is Status.SHUTDOWN
    assert rig.pbx.continued() == [("caller-1", "SHUTDOWN", "")]


# ---------------------------------------------------------------- redial rules


async def test_a_phone_refusing_its_replacement_invite_is_rung_again() -> None:
    h = h_with(stale_ring_delay=0.05)
    b = await h.add(binding(port=5001))
    stale = push_uri(5001)
    h.pbx.contacts_of[AOR] = [stale]
    flow = h.call()
    await h.leg()  # its old contact, rung after the delay
    h.register(stale, b.device_id)
    replacement = await h.leg()
    h.manager.on_event(ChannelDestroyed(replacement.leg_id, 17))  # "I have this call already"
    third = await h.leg()
    assert third.contact_uri == stale and flow.phase is Phase.WAITING
    h.manager.on_event(StasisEnd("caller-1"))
    assert await h.ended(flow) is Status.CANCELLED
    await h.close()


@pytest.mark.parametrize("same_uri", [False, True], ids=["new-address", "same-uri"])
async def test_the_new_invite_leaves_before_the_slept_through_leg_is_hung_up(same_uri: bool) -> None:
    """Re-REGISTER -> INVITE is the path the woken phone waits on: the hang-up of the INVITE it
    slept through (one more PBX request) comes after the new one, not before."""
    h = h_with(stale_ring_delay=0.05)
    b = await h.add(binding(port=5001))
    stale = push_uri(5001)
    h.pbx.contacts_of[AOR] = [stale]
    flow = h.call()
    slept = await h.leg()  # its old contact, rung after the delay
    fresh = stale if same_uri else push_uri(5002)
    h.register(fresh, b.device_id)
    new = await h.leg()
    assert new.contact_uri == fresh
    async def hung() -> None:
        while slept.leg_id not in h.pbx.hung_up():
            await asyncio.sleep(0.002)
    await asyncio.wait_for(hung(), 5)
    ops = [op[:2] for op in h.pbx.ops]
    assert ops.index(("originate", new.leg_id)) < ops.index(("hangup", slept.leg_id))
    h.manager.on_event(ChannelDestroyed(slept.leg_id, 16))  # its end is no news for the call
    h.answer(new)
    await h.phase(flow, Phase.BRIDGED)
    h.manager.on_event(StasisEnd("caller-1"))
    assert await h.ended(flow) is Status.ANSWERED
    await h.close()


def test_leg_book_rules() -> None:
    book = LegBook()
    reg = Registration(AOR, "sip:a", "d1", at=time.time())
    assert book.on_registration(reg, from_gap=False) == (LegAction.DIAL, None)
    from ari_push.call_flow import Leg

    leg = Leg("l1", "sip:a", "d1", started_wall=reg.at - 1)
    book.add(leg)
    assert book.on_registration(reg, from_gap=False) == (LegAction.REPLACE, leg)
    assert book.on_registration(reg, from_gap=True) == (LegAction.IGNORE, leg)
    leg.progressed = True
    assert book.on_registration(reg, from_gap=False) == (LegAction.IGNORE, leg)
    book.drop(leg)
    assert book.on_registration(reg, from_gap=False) == (LegAction.IGNORE, None)  # rung and over
    book.failed_at["sip:a"] = reg.at - 1  # its leg failed before it registered again
    assert book.on_registration(reg, from_gap=False) == (LegAction.DIAL, None)
    assert REDIAL_WINDOW > 0


async def test_a_failed_leg_is_rung_again_when_the_contact_registers_afresh(rig: Harness) -> None:
    b = await rig.add(binding())
    flow = rig.call()
    await rig.phase(flow, Phase.WAITING)
    fresh = push_uri(5002)
    rig.register(fresh, b.device_id)
    leg = await rig.leg()
    rig.manager.on_event(ChannelDestroyed(leg.leg_id, 18, "No user responding"))
    async def failed() -> None:
        while fresh not in flow.book.failed_at:
            await asyncio.sleep(0.002)
    await asyncio.wait_for(failed(), 5)
    rig.register(fresh, b.device_id)
    assert (await rig.leg()).contact_uri == fresh
    rig.manager.on_event(StasisEnd("caller-1"))
    await rig.ended(flow)


async def test_originate_refused_by_the_pbx_drops_the_leg(rig: Harness) -> None:
    b = await rig.add(binding())
    rig.pbx.failing["originate"] = PbxError("originate", "400 invalid endpoint")
    flow = rig.call()
    await rig.phase(flow, Phase.WAITING)
    rig.register(push_uri(5002), b.device_id)
    await rig.push()
    async def tried() -> None:
        while push_uri(5002) not in flow.book.dialled:
            await asyncio.sleep(0.002)
    await asyncio.wait_for(tried(), 5)
    assert flow.book.legs == {} and rig.manager.leg_owner == {}
    rig.manager.on_event(StasisEnd("caller-1"))
    await rig.ended(flow)


# ---------------------------------------------------------------- pushes


async def test_answered_elsewhere_goes_to_the_other_devices(rig: Harness) -> None:
    a = await rig.add(binding(TOKEN, 5001, seen=1))
    other = await rig.add(binding(TOKEN2, 5005, seen=2))
    flow = rig.call()
    await rig.phase(flow, Phase.WAITING)
    rig.register(push_uri(5002), a.device_id)
    rig.answer(await rig.leg())
    assert await rig.push(PushKind.ANSWERED_ELSEWHERE) == other.device_id
    rig.manager.on_event(StasisEnd("caller-1"))
    await rig.ended(flow)
    assert sorted(rig.service.sent) == sorted([(a.device_id, PushKind.CALL), (other.device_id, PushKind.CALL),
                                               (other.device_id, PushKind.ANSWERED_ELSEWHERE)])


async def test_a_callee_gone_before_the_bridge_ends_the_call_answered_not_handed_back(rig: Harness) -> None:
    """The phone answers and hangs up at once: the bridge finds its leg gone. The call was
    answered: the caller is hung up (not continued in the dialplan), the other devices are told
    it was answered elsewhere, and no cancel push goes out."""
    a = await rig.add(binding(TOKEN, 5001, seen=1))
    other = await rig.add(binding(TOKEN2, 5005, seen=2))
    flow = rig.call()
    await rig.phase(flow, Phase.WAITING)
    rig.register(push_uri(5002), a.device_id)
    leg = await rig.leg()
    rig.pbx.failing["bridge"] = PbxError("add_channel", "-ERR Invalid uuid", gone=True)
    rig.answer(leg)
    assert await rig.ended(flow) is Status.ANSWERED
    assert ("hangup", "caller-1", "normal") in rig.pbx.ops
    assert "continue" not in rig.pbx.names()
    assert await rig.push(PushKind.ANSWERED_ELSEWHERE) == other.device_id
    assert PushKind.CANCEL not in rig.service.kinds()


async def test_a_call_taken_over_does_not_push_the_same_device_again(rig: Harness) -> None:
    await rig.add(binding())
    first = rig.call("caller-1")
    await rig.phase(first, Phase.WAITING)
    rig.manager.calls.pop("caller-1")  # as if another daemon had it: same call id, same ledger
    again = rig.call("caller-1")
    assert again.call_id == first.call_id
    await rig.phase(again, Phase.WAITING)
    assert rig.service.kinds() == [PushKind.CALL]
    first.put(StasisEnd("caller-1"))
    rig.manager.on_event(StasisEnd("caller-1"))
    await rig.ended(again)


async def test_a_rate_limited_call_push_is_skipped_and_so_are_its_follow_ups() -> None:
    h = Harness(calls=CallSettings(default_timeout=0.3), push=PushSettings(rate_per_minute=1, burst=1))
    await h.add(binding())
    first = h.call("caller-1")
    assert await h.ended(first) is Status.TIMEOUT
    second = h.call("caller-2")
    assert await h.ended(second) is Status.PUSH_FAILED  # limited: nothing delivered, nothing rings
    assert h.service.kinds() == [PushKind.CALL, PushKind.CANCEL, PushKind.MISSED_CALL]
    assert h.dispatcher.rate_limited["call"] == 1 and h.dispatcher.rate_limited["cancel"] == 1
    await h.close()


async def test_dead_token_answer_drops_the_binding(rig: Harness) -> None:
    rig.service.answer = PushOutcome.TOKEN_DEAD
    await rig.add(binding())
    flow = rig.call()
    assert await rig.ended(flow) is Status.PUSH_FAILED
    assert await rig.store.bindings_for(AOR) == []


# ---------------------------------------------------------------- the manager


async def test_orphan_leg_entering_the_app_is_hung_up(rig: Harness) -> None:
    rig.manager.on_event(StasisStart(ChannelInfo("ap-orphan", "Up"), (DIALED, "gone-caller")))
    async def hung() -> None:
        while "ap-orphan" not in rig.pbx.hung_up():
            await asyncio.sleep(0.002)
    await asyncio.wait_for(hung(), 5)


async def test_reconcile_resumes_a_caller_and_ends_a_call_whose_caller_vanished(rig: Harness) -> None:
    await rig.add(binding())
    known = rig.call("caller-1")
    await rig.phase(known, Phase.WAITING)
    waiting = ChannelInfo("caller-2", "Ring", "2001", "", 1.0, "Stasis", AOR)
    rig.pbx.live_channels = [waiting]
    rig.pbx.in_app = {"caller-2"}
    await rig.manager.reconcile()
    assert await rig.ended(known) is Status.CANCELLED  # its channel is gone
    resumed = rig.manager.calls["caller-2"]
    assert resumed.caller_number == "2001" and resumed.started < time.monotonic() - 0.9  # keeps its age
    rig.manager.on_event(StasisEnd("caller-2"))
    await rig.ended(resumed)


async def test_reconcile_ends_no_call_a_lagging_listing_misses(rig: Harness) -> None:
    """FreeSWITCH lists channels from a table written after the events: a call (and its leg) that
    arrived after the reconnect can be missing from the listing. The PBX is asked before the
    call is ended; it answers that the channel is there, so the call goes on."""
    await rig.add(binding(port=5001))
    flow = rig.call("caller-1")
    await rig.phase(flow, Phase.WAITING)
    rig.register(push_uri(6001), "")
    leg = await rig.leg()
    rig.pbx.live_channels = []  # the listing has neither
    rig.pbx.present = {"caller-1", leg.leg_id}
    await rig.manager.reconcile()
    assert ("exists", "caller-1") in rig.pbx.ops and ("exists", leg.leg_id) in rig.pbx.ops
    rig.answer(leg)  # the call goes on: the phone answers, the call is bridged
    await rig.phase(flow, Phase.BRIDGED)
    rig.manager.on_event(StasisEnd("caller-1"))
    assert await rig.ended(flow) is Status.ANSWERED


async def test_a_device_no_push_reached_is_rung_on_its_old_contact_at_once() -> None:
    h = h_with(stale_ring_delay=60, default_timeout=0.5)
    h.service.answer = PushOutcome.FAILED
    await h.add(binding(port=5001))
    h.pbx.contacts_of[AOR] = [push_uri(5001)]
    flow = h.call()
    leg = await h.leg()  # nothing to wait for: its old contact is the only way to reach it
    assert leg.contact_uri == push_uri(5001)
    assert await h.ended(flow) is Status.TIMEOUT  # it rang: the call waited its time
    await h.close()


async def test_the_contact_of_a_dead_token_is_not_put_back(rig: Harness) -> None:
    rig.service.answer = PushOutcome.TOKEN_DEAD
    await rig.add(binding(port=5001))
    rig.pbx.contacts_of[AOR] = [push_uri(5001)]
    flow = rig.call()
    await rig.leg()
    rig.manager.on_event(StasisEnd("caller-1"))
    await rig.ended(flow)
    assert rig.pbx.restored() == []  # putting it back would capture the dead token again
    assert await rig.store.bindings_for(AOR) == []
