"""The call manager: routes PBX events to each call's flow, owns the flows' tasks.

One ``CallFlow`` (call_flow.py) per inbound call. The manager starts a flow on a caller's
StasisStart, takes the callee's registration watch before the flow sends any push, routes
every later event by channel id (the caller's, or one of its legs'), and after a reconnect
reconciles what it knows with what the PBX has. It also carries the hang-up of bridged calls
that a dead or restarted daemon set up (``adopt_bridge``). docs/calls.md.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from ari_push.call_events import (
    HANGUPS,
    ChannelDestroyed,
    ChannelEvent,
    ChannelInfo,
    ChannelLeftBridge,
    ChannelStateChange,
    Shutdown,
    StasisEnd,
    StasisStart,
)
from ari_push.call_flow import AwakeDevices, CallFlow, EndNotice, Status
from ari_push.channels import DIALED, ChannelRole, call_id_for
from ari_push.contacts import ContactPolicy
from ari_push.metrics import Metrics
from ari_push.pbx import LegRequest, Pbx, PbxError
from ari_push.push.dispatch import PushDispatcher
from ari_push.push.plan import PushPlanner
from ari_push.qualify import ContactReach
from ari_push.settings import Settings
from ari_push.trace_recorder import NO_TRACE, Tracer, TraceRecorder
from ari_push.wakeups import Registration, Signal, WakeupHub

log = logging.getLogger("ari_push.calls")

TARGET_RE = re.compile(r"^[A-Za-z0-9_.+\-]{1,64}$")


@dataclass(frozen=True, slots=True)
class CallOptions:
    target: str
    timeout: float


def parse_args(args: list[str], default_timeout: float, max_timeout: float) -> CallOptions:
    """``Stasis(app,<target>[,timeout=N][,...])``; raises ValueError with a readable reason."""
    if not args or not TARGET_RE.match(args[0]):
        raise ValueError(f"bad or missing target {args[0][:40] if args else ''!r}")
    timeout = default_timeout
    for arg in args[1:]:
        for item in filter(None, (a.strip() for a in arg.split(","))):
            key, sep, value = item.partition("=")
            if key == "timeout" and sep:
                try:
                    timeout = float(value)
                except ValueError:
                    raise ValueError(f"timeout={value[:20]!r} is not a number") from None
                if not 0 < timeout <= max_timeout:
                    raise ValueError(f"timeout={value} is outside 0..{max_timeout:g}")
    return CallOptions(target=args[0], timeout=timeout)


class CallManager:
    def __init__(
        self,
        settings: Settings,
        pbx: Pbx,
        planner: PushPlanner,
        dispatcher: PushDispatcher,
        wakeups: WakeupHub,
        metrics: Metrics,
        policy: ContactPolicy,
        tracer: Tracer | None = None,
    ) -> None:
        self.settings = settings
        self.pbx = pbx
        self.planner = planner
        self.dispatcher = dispatcher
        self.wakeups = wakeups
        self.metrics = metrics
        self.policy = policy
        self.tracer = tracer or Tracer(None, "")  # call traces (trace_recorder.py); none by default
        self.pbx_id = ""  # the PBX's entity id, part of every call id (learnt on connect)
        self.calls: dict[str, CallFlow] = {}  # caller channel id -> its flow
        self.leg_owner: dict[str, CallFlow] = {}  # leg channel id -> the flow that originated it
        self.bridge_watch: dict[str, asyncio.Queue[ChannelEvent]] = {}  # channel id -> adopted bridge's queue
        self.notice_legs: dict[str, asyncio.Queue[ChannelEvent]] = {}  # end-notice leg -> its events
        self.awake = AwakeDevices()  # shared by the calls of this daemon
        self.reach = ContactReach()  # the PBX's qualify state per contact, fed by capture
        self.tasks: set[asyncio.Task[Any]] = set()
        self.draining = False

    # ---------------------------------------------------------------- routing

    def on_event(self, event: ChannelEvent) -> None:
        cid = event.channel_id
        if isinstance(event, StasisStart):
            if event.args and event.args[0] == DIALED:
                owner = self.leg_owner.get(cid)
                if owner is not None:
                    owner.put(event)
                else:  # a leg of a call this daemon no longer knows: never leave it in Stasis
                    self.spawn(self._hangup_quietly(cid), f"orphan-{cid}")
                return
            if cid not in self.calls:
                self.start_call(event.channel, list(event.args), event.pbx_id)
            return
        flow = self.calls.get(cid) or self.leg_owner.get(cid)
        if flow is not None:
            flow.put(event)
        elif cid in self.bridge_watch:
            self.bridge_watch[cid].put_nowait(event)
        elif cid in self.notice_legs:
            self.notice_legs[cid].put_nowait(event)

    def start_call(self, channel: ChannelInfo, args: list[str], pbx_id: str = "", resumed: bool = False) -> None:
        cid = channel.id
        call_id = call_id_for(pbx_id or self.pbx_id, cid)
        if self.draining:
            trace = self._refused(channel, args, call_id, resumed, Status.SHUTDOWN,
                                  "refused: the daemon is stopping")
            self.spawn(self._refuse(cid, Status.SHUTDOWN, trace), f"refuse-{cid}")
            return
        try:
            options = parse_args(args, self.settings.calls.default_timeout, self.settings.calls.max_timeout)
        except ValueError as exc:
            log.warning("call %s: %s; continuing with NO_DEVICES", cid, exc)
            self.metrics.calls.labels(Status.NO_DEVICES.value).inc()
            trace = self._refused(channel, args, call_id, resumed, Status.NO_DEVICES,
                                  f"refused: bad Stasis arguments: {exc}")
            self.spawn(self._refuse(cid, Status.NO_DEVICES, trace), f"badargs-{cid}")
            return
        trace = self.tracer.open(cid, call_id, options.target, channel.caller_number, channel.age, resumed)
        flow = CallFlow(
            channel_id=cid, call_id=call_id, target=options.target,
            timeout=options.timeout, caller_number=channel.caller_number, caller_name=channel.caller_name,
            age=channel.age, pbx=self.pbx, planner=self.planner, dispatcher=self.dispatcher,
            settings=self.settings.calls, policy=self.policy, metrics=self.metrics, spawn=self.spawn,
            on_leg=self._on_leg, awake=self.awake, reach=self.reach, on_end_notice=self.end_notice, trace=trace)
        self.calls[cid] = flow
        self.spawn(self._run(flow), f"call-{cid}")

    async def _run(self, flow: CallFlow) -> None:
        try:
            # The watch is taken before the flow can send any push: no wake-up slips between.
            with self.wakeups.watch(flow.target, flow.put):
                await flow.run()
        finally:
            self.calls.pop(flow.channel_id, None)

    def _on_leg(self, leg_id: str, flow: CallFlow | None) -> None:
        if flow is None:
            self.leg_owner.pop(leg_id, None)
        else:
            self.leg_owner[leg_id] = flow

    def start_adopted(self, channel: ChannelInfo) -> None:
        """A waiting call moved into this daemon's app from a dead daemon's (cluster.py)."""
        if channel.id not in self.calls:
            log.info("resuming adopted call %s to %s", channel.id, channel.args.split(",")[0])
            self.start_call(channel, channel.args.split(","), resumed=True)

    # ---------------------------------------------------------------- tasks

    def spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    async def run(self, stop: asyncio.Event) -> None:
        """Owns the call tasks: on stop, whatever still runs is cancelled (after the drain)."""
        await stop.wait()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    async def drain(self, timeout: float) -> None:
        """Stop taking calls; let waiting calls finish up to ``timeout``; continue the rest."""
        self.draining = True
        await self._settle(timeout)
        for flow in list(self.calls.values()):
            if not flow.settled.is_set():
                flow.put(Shutdown())
        await self._settle(2.0)

    async def _settle(self, timeout: float) -> None:
        waits = [asyncio.ensure_future(f.settled.wait()) for f in self.calls.values() if not f.settled.is_set()]
        if waits:
            await asyncio.wait(waits, timeout=timeout)
            for w in waits:
                w.cancel()

    # ---------------------------------------------------------------- after a reconnect

    async def learn_pbx_id(self) -> None:
        """The PBX's own id, part of every call id: first thing on every connect, so that a call
        adopted or resumed gets the same call id in every daemon (the push ledger keys on it)."""
        self.pbx_id = await self.pbx.system_id() or self.pbx_id

    async def reconcile(self) -> None:
        """After a PBX (re)connect, events during the outage are lost. Check every channel in
        the app: known calls re-check their caller and legs; unknown ones are resumed or hung up."""
        # What was known before the PBX was asked: a leg originated while the listing is in
        # flight is missing from it without being gone.
        known = {cid: (flow, set(flow.book.legs)) for cid, flow in self.calls.items()}
        try:
            await self.learn_pbx_id()
            live = {c.id: c for c in await self.pbx.channels()}
        except PbxError as exc:
            log.warning("reconcile: cannot list channels: %s", exc)
            return
        try:
            ours = await self.pbx.app_channel_ids()
        except PbxError as exc:
            log.warning("reconcile: cannot read the application's channels: %s", exc)
            ours = set()
        for cid, (flow, legs) in known.items():
            if cid not in live and await self._gone(cid):
                flow.put(StasisEnd(cid))
            for leg_id in legs & set(flow.book.legs):
                if leg_id not in live and await self._gone(leg_id):
                    flow.put(ChannelDestroyed(leg_id, 16))
        for cid in ours:
            channel = live.get(cid)
            if channel is None or cid in self.calls or cid in self.leg_owner or cid in self.bridge_watch:
                continue
            role = channel.role
            if role is ChannelRole.CALLER:
                log.info("reconcile: resuming call %s to %s", cid, channel.args.split(",")[0])
                self.start_call(channel, channel.args.split(","), resumed=True)
            elif role is ChannelRole.UP:
                await self._adopt_bridge_of(cid)
            else:
                log.info("reconcile: hanging up leg %s of a call this daemon does not know", cid)
                self.spawn(self._hangup_quietly(cid), f"orphan-{cid}")

    async def _gone(self, channel_id: str) -> bool:
        """A channel missing from the listing is gone only if the PBX says so when asked for it
        (a listing may lag: a call that arrived just after the reconnect is not ended by it)."""
        try:
            return not await self.pbx.exists(channel_id)
        except PbxError as exc:
            log.warning("reconcile: cannot check channel %s: %s", channel_id, exc)
            return False

    async def _adopt_bridge_of(self, channel_id: str) -> None:
        """A channel that is up in the app but not known: a bridged call from before a restart."""
        try:
            found = await self.pbx.bridge_of(channel_id)
        except PbxError as exc:
            log.warning("reconcile: cannot list bridges: %s", exc)
            return
        if found is not None and len(found[1]) >= 2:
            await self.adopt_bridge(*found)
        else:
            log.info("reconcile: %s is up but alone; hanging it up", channel_id)
            await self._hangup_quietly(channel_id)

    async def adopt_bridge(self, bridge_id: str, channel_ids: list[str]) -> None:
        """Carry the hang-up of a bridged call this daemon did not set up (its daemon died or
        restarted): watch its channels; when one leaves, end the others."""
        if any(cid in self.bridge_watch for cid in channel_ids):
            return
        queue: asyncio.Queue[ChannelEvent] = asyncio.Queue()
        for cid in channel_ids:
            self.bridge_watch[cid] = queue
            try:
                await self.pbx.watch_channel(cid)
            except PbxError as exc:
                log.info("adopted bridge %s: cannot watch %s: %s", bridge_id, cid, exc)
        self.spawn(self._watch_bridge(bridge_id, channel_ids, queue), f"bridge-{bridge_id}")

    async def _watch_bridge(self, bridge_id: str, channel_ids: list[str], queue: asyncio.Queue[ChannelEvent]) -> None:
        try:
            while not isinstance(await queue.get(), (*HANGUPS, ChannelLeftBridge)):
                pass
            log.info("adopted bridge %s: one side left; ending the others", bridge_id)
            for cid in channel_ids:
                await self._hangup_quietly(cid)
            try:
                await self.pbx.destroy_bridge(bridge_id)
            except PbxError as exc:
                if not exc.gone:
                    log.info("destroy bridge %s: %s", bridge_id, exc)
        finally:
            for cid in channel_ids:
                self.bridge_watch.pop(cid, None)

    # ---------------------------------------------------------------- end notices

    def end_notice(self, notice: EndNotice) -> None:
        self.spawn(self._end_notice(notice), f"end-notice-{notice.call_id}")

    async def _end_notice(self, notice: EndNotice) -> None:
        """Wait up to ``calls.end_notice_window`` for the device to register, then INVITE it for
        the call and CANCEL at once with the reason, so its call screen (CallKit) ends the call
        the push started, the right way. The leg is never bridged: answered anyway, it is hung up."""
        b = notice.binding
        until = time.monotonic() + self.settings.calls.end_notice_window
        signals: asyncio.Queue[Signal] = asyncio.Queue()
        reg: Registration | None = None
        with self.wakeups.watch(b.aor, signals.put_nowait):
            while reg is None:
                left = until - time.monotonic()
                if left <= 0:
                    log.info("call %s: device %s did not register within %.0f s; no end notice", notice.call_id,
                             b.device_id, self.settings.calls.end_notice_window)
                    return
                try:
                    signal = await asyncio.wait_for(signals.get(), left)
                except TimeoutError:
                    continue
                if isinstance(signal, Registration) and signal.device_id == b.device_id:
                    reg = signal
        leg_id = f"ap-end-{uuid.uuid4().hex[:16]}"
        events: asyncio.Queue[ChannelEvent] = asyncio.Queue()
        self.notice_legs[leg_id] = events
        try:
            await self.pbx.originate(LegRequest(
                leg_id=leg_id, caller_channel=notice.caller_channel, endpoint=b.endpoint or b.aor,
                contact_uri=reg.contact_uri, caller_name=notice.caller_name, caller_number=notice.caller_number,
                call_id=notice.call_id, ring_timeout=10.0, linked=False))
            # A CANCEL can only follow a provisional answer: wait for the 180 (at most 2 s).
            deadline = time.monotonic() + 2.0
            while (left := deadline - time.monotonic()) > 0:
                try:
                    event = await asyncio.wait_for(events.get(), left)
                except TimeoutError:
                    break
                if isinstance(event, ChannelStateChange) and event.state in ("Ringing", "Up"):
                    break
                if isinstance(event, HANGUPS):
                    return
            await self.pbx.hangup(leg_id, notice.reason)
            rec = self.tracer.recorder_for(notice.call_id)
            if rec is not None:
                rec.add("note", b.device_id, text=f"end notice sent (INVITE + CANCEL, {notice.reason})")
            log.info("call %s: told device %s how the call ended (INVITE + CANCEL, %s)", notice.call_id, b.device_id,
                     notice.reason)
        except PbxError as exc:
            log.info("call %s: end notice to %s: %s", notice.call_id, b.device_id, exc)
        finally:
            self.notice_legs.pop(leg_id, None)

    # ---------------------------------------------------------------- small actions

    def _refused(self, channel: ChannelInfo, args: list[str], call_id: str, resumed: bool, status: Status,
                 reason: str) -> TraceRecorder:
        """The whole trace of a call refused before its flow starts: its start, why, its status
        (synchronous, nothing awaited)."""
        target = args[0] if args and TARGET_RE.match(args[0]) else ""  # a bad target is in the reason
        trace = self.tracer.open(channel.id, call_id, target, channel.caller_number, channel.age, resumed)
        trace.add("note", text=reason[:200])
        trace.close(status.value)
        return trace

    async def _refuse(self, channel_id: str, status: Status, trace: TraceRecorder = NO_TRACE) -> None:
        try:
            await self.pbx.continue_in_dialplan(channel_id, status.value, self.settings.calls.continue_context)
        except PbxError as exc:
            log.info("call %s: continue: %s", channel_id, exc)
            trace.add("note", text=f"continue in the dialplan failed: {exc}"[:200])

    async def _hangup_quietly(self, channel_id: str) -> None:
        try:
            await self.pbx.hangup(channel_id)
        except PbxError as exc:
            if not exc.gone:
                log.info("hangup %s: %s", channel_id, exc)
