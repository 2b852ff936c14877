"""The Stasis call flow: ring, push, wait for the re-registration, originate, bridge.

One ``Call`` task per inbound channel, owned by ``CallManager``. Each call reads one ordered
queue that carries its ARI events and the callee's registrations (the watch is taken before
any push is sent). See docs/calls.md for the flow, the statuses and the wake detection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from ari_push.ami import AmiClient
from ari_push.ari import AriClient, AriError
from ari_push.bindings import BindingStore, StoreUnavailable
from ari_push.cluster import MemoryLedger, PushLedger, channel_role, stasis_args
from ari_push.contacts import ContactPolicy, ContactRejected, parse_contact
from ari_push.metrics import Metrics
from ari_push.model import Binding, PushKind, PushMessage, PushOutcome, PushResult
from ari_push.push.dispatch import PushDispatcher
from ari_push.settings import Settings
from ari_push.wakeups import GAP, Registration, WakeupHub

log = logging.getLogger("ari_push.calls")

TARGET_RE = re.compile(r"^[A-Za-z0-9_.+\-]{1,64}$")
DIALED = "dialed"
DECLINE_CAUSES = frozenset({17, 21})  # user busy (486), call rejected (603)
REDIAL_WINDOW = 3.0  # s: a duplicate refusal this soon after a replacement means the phone took the old leg


class Status(StrEnum):
    ANSWERED = "ANSWERED"
    TIMEOUT = "TIMEOUT"
    NO_DEVICES = "NO_DEVICES"
    PUSH_FAILED = "PUSH_FAILED"
    DECLINED = "DECLINED"
    CANCELLED = "CANCELLED"
    SHUTDOWN = "SHUTDOWN"


@dataclass
class Leg:
    channel_id: str
    uri: str
    device_id: str
    started: float
    started_wall: float = field(default_factory=time.time)
    progressed: bool = False  # the phone answered the INVITE with 180/200: it is awake on this leg
    awake: bool = False  # dialled because the contact registered during this call


@dataclass
class CallOptions:
    target: str
    timeout: float


CALL_ID_NAMESPACE = uuid.UUID("5b0f3c0e-8a53-4c55-9d3e-3f1c2a7f6a10")


def call_id_for(asterisk_id: str, channel_id: str) -> str:
    """The call id in pushes: the same for one call whichever daemon handles it (after a
    take-over too), so pushes can be made idempotent across daemons."""
    return str(uuid.uuid5(CALL_ID_NAMESPACE, f"{asterisk_id}/{channel_id}"))


def channel_age(channel: dict[str, Any]) -> float:
    """Seconds since Asterisk created the channel: a call resumed after a restart or taken over
    from a dead daemon keeps its original deadline. 0 when unknown or in the future."""
    try:
        created = datetime.strptime(str(channel.get("creationtime", "")), "%Y-%m-%dT%H:%M:%S.%f%z")
    except ValueError:
        return 0.0
    return min(max(0.0, time.time() - created.timestamp()), 3600.0)


def contact_object_id(aor: str, uri: str) -> str:
    """Asterisk's id for a dynamic contact: ``<aor>;@<md5 of the stored URI>`` (measured)."""
    return f"{aor};@{hashlib.md5(uri.encode(), usedforsecurity=False).hexdigest()}"


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


@dataclass
class Call:
    """State of one inbound call. Only its own task touches it."""

    channel_id: str
    caller_number: str
    caller_name: str
    options: CallOptions
    call_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    legs: dict[str, Leg] = field(default_factory=dict)
    dialled_uris: set[str] = field(default_factory=set)
    failed_at: dict[str, float] = field(default_factory=dict)  # uri -> when its leg failed (not declined)
    replaced_at: dict[str, float] = field(default_factory=dict)  # device -> when its leg was replaced
    pushed: list[Binding] = field(default_factory=list)
    push_sent_at: float = 0.0
    started: float = field(default_factory=time.monotonic)
    bridge_id: str = ""
    answered_by: Leg | None = None
    caller_gone: bool = False
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # no longer waiting for a device


class CallManager:
    def __init__(
        self,
        settings: Settings,
        ari: AriClient,
        ami: AmiClient,
        store: BindingStore,
        wakeups: WakeupHub,
        dispatcher: PushDispatcher,
        metrics: Metrics,
        policy: ContactPolicy,
        node_id: str,
        ledger: PushLedger | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.ari = ari
        self.ami = ami
        self.store = store
        self.wakeups = wakeups
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.node_id = node_id
        self.ledger: PushLedger = ledger or MemoryLedger()
        self.bridge_watch: dict[str, asyncio.Queue[Any]] = {}  # channel id -> adopted bridge's queue
        self.asterisk_id = ""  # entity id of the Asterisk we serve (learnt on connect)
        self.calls: dict[str, Call] = {}  # caller channel id -> call
        self.leg_owner: dict[str, Call] = {}  # leg channel id -> call
        self.tasks: set[asyncio.Task[Any]] = set()
        self.draining = False
        self.events_seen = 0

    # ---------------------------------------------------------------- event routing

    def on_event(self, event: dict[str, Any]) -> None:
        self.events_seen += 1
        channel = event.get("channel") or {}
        cid = channel.get("id", "")
        kind = event.get("type")
        if kind == "StasisStart":
            args = [str(a) for a in event.get("args", [])]
            if args and args[0] == DIALED:
                owner = self.leg_owner.get(cid)
                if owner is not None:
                    owner.queue.put_nowait(event)
                else:  # a leg of a call this daemon no longer knows: never leave it in Stasis
                    self.spawn(self._hangup_quietly(cid), f"orphan-{cid}")
                return
            if cid in self.calls:
                return
            self._start_call(channel, args, str(event.get("asterisk_id", "")))
            return
        call = self.calls.get(cid) or self.leg_owner.get(cid)
        if call is not None:
            call.queue.put_nowait(event)
        elif cid in self.bridge_watch:
            self.bridge_watch[cid].put_nowait(event)

    def _start_call(self, channel: dict[str, Any], args: list[str], asterisk_id: str = "") -> None:
        cid = channel["id"]
        caller = channel.get("caller") or {}
        if self.draining:
            self.spawn(self._continue(cid, Status.SHUTDOWN), f"refuse-{cid}")
            return
        try:
            options = parse_args(args, self.settings.calls.default_timeout, self.settings.calls.max_timeout)
        except ValueError as exc:
            log.warning("call %s: %s; continuing with NO_DEVICES", cid, exc)
            self.metrics.calls.labels(Status.NO_DEVICES.value).inc()
            self.spawn(self._continue(cid, Status.NO_DEVICES), f"badargs-{cid}")
            return
        call = Call(cid, str(caller.get("number", "")), str(caller.get("name", "")), options,
                    call_id=call_id_for(asterisk_id or self.asterisk_id, cid),
                    started=time.monotonic() - channel_age(channel))
        self.calls[cid] = call
        self.spawn(self._run_call(call), f"call-{cid}")

    def spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    # ---------------------------------------------------------------- lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Owns the call tasks: on stop, whatever still runs is cancelled (after drain)."""
        await stop.wait()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    async def drain(self, timeout: float) -> None:
        """Stop taking calls; let waiting calls finish up to ``timeout``; continue the rest."""
        self.draining = True
        await self._settle(timeout)
        for call in list(self.calls.values()):
            if not call.settled.is_set():
                call.queue.put_nowait({"type": "ari-push:shutdown"})
        await self._settle(2.0)

    async def _settle(self, timeout: float) -> None:
        waits = [asyncio.ensure_future(c.settled.wait()) for c in self.calls.values() if not c.settled.is_set()]
        if waits:
            await asyncio.wait(waits, timeout=timeout)
            for w in waits:
                w.cancel()

    async def reconcile(self) -> None:
        """After an ARI (re)connect: events during the outage are lost. Check every channel in
        our app: known calls re-check their caller; unknown ones are resumed or hung up."""
        try:
            info = await self.ari.call("asterisk_info")
            self.asterisk_id = str((info.get("system") or {}).get("entity_id", "")) or self.asterisk_id
            channels = await self.ari.call("list_channels")
        except AriError as exc:
            log.warning("reconcile: cannot list channels: %s", exc)
            return
        live = {c["id"]: c for c in channels}
        try:
            ours = set((await self.ari.call("get_application", {"applicationName": self.settings.ari.app}))
                       .get("channel_ids", []))
        except AriError as exc:
            log.warning("reconcile: cannot read application %s: %s", self.settings.ari.app, exc)
            ours = set()
        for cid, call in list(self.calls.items()):
            if cid not in live:
                call.queue.put_nowait({"type": "StasisEnd", "channel": {"id": cid}, "reconciled": True})
            for leg_id in list(call.legs):
                if leg_id not in live:
                    call.queue.put_nowait({"type": "ChannelDestroyed", "channel": {"id": leg_id}, "cause": 16})
        for cid in ours:
            ch = live.get(cid)
            if ch is None or cid in self.calls or cid in self.leg_owner or cid in self.bridge_watch:
                continue
            args = stasis_args(ch)
            kind = channel_role(ch, args)
            if kind == "caller":
                log.info("reconcile: resuming call %s to %s", cid, args.split(",")[0])
                self._start_call(ch, args.split(","))
            elif kind == "up":
                await self._adopt_bridge_of(cid)
            else:
                log.info("reconcile: hanging up leg %s of a call this daemon does not know", cid)
                self.spawn(self._hangup_quietly(cid), f"orphan-{cid}")

    def start_adopted(self, channel: dict[str, Any], args: str) -> None:
        """A waiting call moved into our app from a dead daemon's (cluster.py)."""
        if channel["id"] not in self.calls:
            log.info("resuming adopted call %s to %s", channel["id"], args.split(",")[0])
            self._start_call(channel, args.split(","))

    async def _adopt_bridge_of(self, channel_id: str) -> None:
        """A channel that is up in our app but not ours: a bridged call from before a restart."""
        try:
            bridges = await self.ari.call("list_bridges")
        except AriError as exc:
            log.warning("reconcile: cannot list bridges: %s", exc)
            return
        bridge = next((b for b in bridges if channel_id in b.get("channels", [])), None)
        if bridge is not None and len(bridge["channels"]) >= 2:
            await self.adopt_bridge(bridge["id"], list(bridge["channels"]))
        else:
            log.info("reconcile: %s is up but alone; hanging it up", channel_id)
            await self._hangup_quietly(channel_id)

    async def adopt_bridge(self, bridge_id: str, channel_ids: list[str]) -> None:
        """Carry the hang-up of a bridged call this daemon did not set up (its daemon died or
        restarted): subscribe to its channels; when one leaves, end the others."""
        if any(cid in self.bridge_watch for cid in channel_ids):
            return
        queue: asyncio.Queue[Any] = asyncio.Queue()
        for cid in channel_ids:
            self.bridge_watch[cid] = queue
            await self._safe(self.ari.call("subscribe", {"applicationName": self.settings.ari.app},
                                           query={"eventSource": f"channel:{cid}"}), "subscribe")
        self.spawn(self._watch_bridge(bridge_id, channel_ids, queue), f"bridge-{bridge_id}")

    async def _watch_bridge(self, bridge_id: str, channel_ids: list[str], queue: asyncio.Queue[Any]) -> None:
        try:
            while True:
                event = await queue.get()
                if event.get("type") in ("ChannelHangupRequest", "ChannelDestroyed", "ChannelLeftBridge",
                                         "StasisEnd"):
                    break
            log.info("adopted bridge %s: one side left; ending the others", bridge_id)
            for cid in channel_ids:
                await self._hangup_quietly(cid)
            await self._safe(self.ari.call("destroy_bridge", {"bridgeId": bridge_id}), "destroy bridge",
                             quiet_404=True)
        finally:
            for cid in channel_ids:
                self.bridge_watch.pop(cid, None)

    # ---------------------------------------------------------------- the flow

    async def _run_call(self, call: Call) -> None:
        status = Status.TIMEOUT
        self.metrics.calls_waiting.inc()
        waiting = True
        try:
            with self.wakeups.watch(call.options.target, call.queue):
                status = await self._wait_for_answer(call)
                call.settled.set()
                if status is Status.ANSWERED:
                    self.metrics.calls_waiting.dec()
                    waiting = False
                    await self._bridged(call)
        except asyncio.CancelledError:
            status = Status.SHUTDOWN
            raise
        finally:
            call.settled.set()
            if waiting:
                self.metrics.calls_waiting.dec()
            self.metrics.calls.labels(status.value).inc()
            await asyncio.shield(self._cleanup(call, status))

    async def _wait_for_answer(self, call: Call) -> Status:
        target = call.options.target
        deadline = call.started + call.options.timeout
        moh = self.settings.calls.moh_class
        if moh:  # early media: 183 Session Progress, then music while the phone wakes
            await self._safe(self.ari.call("progress", {"channelId": call.channel_id}), "progress")
            await self._safe(self.ari.call("moh_start", {"channelId": call.channel_id}, query={"mohClass": moh}),
                             "music on hold")
        else:
            await self._safe(self.ari.call("ring", {"channelId": call.channel_id}), "ring")
        contacts = await self._live_contacts(target)
        if contacts is None:
            log.info("call %s: %s is not a known AOR", call.call_id, target)
            return Status.NO_DEVICES
        store_ok = True
        try:
            bindings = await self.store.bindings_for(target)
        except StoreUnavailable as exc:
            log.warning("call %s: binding store unavailable (%s); dialling live contacts only", call.call_id, exc)
            bindings, store_ok = [], False
        push_ids = {b.device_id for b in bindings}
        live = [(uri, self._device_of(uri)) for uri in contacts]
        for uri, device in live:
            if device and device in push_ids:
                # Drop the device's contact before pushing, so that the re-REGISTER the push
                # causes is a new contact that Asterisk reports, even with an unchanged URI.
                await self._safe(self.ari.call("delete_config", {
                    "configClass": "res_pjsip", "objectType": "contact", "id": contact_object_id(target, uri)}),
                    "delete stale contact")
        push_task: asyncio.Task[dict[str, PushResult]] | None = None
        if bindings:
            call.pushed = bindings
            call.push_sent_at = time.monotonic()
            push_task = asyncio.create_task(self._push_all(bindings, self._message(call, PushKind.CALL)))
        for uri, device in live:  # it may be awake: ring it at once too
            await self._originate(call, _endpoint_for(bindings, device, target), uri, device, awake=False)
        if not bindings and not call.legs:
            return Status.PUSH_FAILED if not store_ok else Status.NO_DEVICES
        try:
            status = await self._event_loop(call, deadline, push_task)
            # Nobody answered and the devices could not be pushed (store down): say so.
            return Status.PUSH_FAILED if status is Status.TIMEOUT and not store_ok else status
        finally:
            if push_task is not None and not push_task.done():
                push_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await push_task

    async def _event_loop(
        self, call: Call, deadline: float, push_task: asyncio.Task[dict[str, PushResult]] | None
    ) -> Status:
        declined = False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Status.DECLINED if declined and not call.legs else Status.TIMEOUT
            if push_task is not None and push_task.done():
                results = push_task.result()
                push_task = None
                if not any(r.outcome is PushOutcome.DELIVERED for r in results.values()) and not call.legs:
                    log.info("call %s: no push was delivered and nothing rings", call.call_id)
                    return Status.PUSH_FAILED
            get = asyncio.ensure_future(call.queue.get())
            waits: set[asyncio.Future[Any]] = {get}
            if push_task is not None:
                waits.add(push_task)
            done, _ = await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                continue
            item = get.result()
            if isinstance(item, Registration):
                await self._on_registration(call, item)
                continue
            kind = item.get("type")
            cid = (item.get("channel") or {}).get("id", "")
            if kind == "ari-push:shutdown":
                return Status.SHUTDOWN
            if cid == call.channel_id and kind in ("StasisEnd", "ChannelHangupRequest", "ChannelDestroyed"):
                call.caller_gone = True
                return Status.CANCELLED
            leg = call.legs.get(cid)
            if leg is None:
                continue
            if kind == "StasisStart":  # the originated leg answered
                call.answered_by = leg
                await self._answer(call, leg)
                return Status.ANSWERED
            if kind == "ChannelStateChange" and (item.get("channel") or {}).get("state") in ("Ringing", "Up"):
                leg.progressed = True
            if kind == "ChannelDestroyed":
                self._drop_leg(call, leg)
                cause = int(item.get("cause") or 0)
                device = leg.device_id or leg.uri.split(";")[0]
                if cause in DECLINE_CAUSES:
                    replaced = call.replaced_at.pop(leg.device_id, 0.0) if leg.device_id else 0.0
                    if time.time() - replaced < REDIAL_WINDOW:
                        # A retransmission of the INVITE it slept through reached its reopened
                        # socket first: it answered that leg (which we had replaced and hung up)
                        # and refused this one as a duplicate. It is free again: ring it once more.
                        log.info("call %s: %s refused the replacement INVITE; ringing it again", call.call_id,
                                 device)
                        call.dialled_uris.discard(leg.uri)
                        await asyncio.sleep(0.2)  # let the phone finish the dialog we hung up
                        await self._originate(call, self._endpoint_of(call, leg.device_id), leg.uri, leg.device_id)
                        continue
                    if leg.device_id and any(o.device_id == leg.device_id for o in call.legs.values()):
                        # The phone refused a second INVITE of this call (one sent while it slept,
                        # retransmitted to its reopened socket) while it takes the other.
                        log.info("call %s: device %s refused a duplicate INVITE", call.call_id, device)
                        continue
                    log.info("call %s: device %s declined (cause %d)", call.call_id, device, cause)
                    if self.settings.calls.on_decline == "busy":
                        return Status.DECLINED
                    declined = True
                else:
                    call.failed_at[leg.uri] = time.time()
                    log.info("call %s: leg to %s ended without an answer (cause %d %s)", call.call_id, device, cause,
                             item.get("cause_txt", ""))

    async def _on_registration(self, call: Call, reg: Registration) -> None:
        if reg is GAP:
            contacts = await self._live_contacts(call.options.target) or []
            regs = [Registration(call.options.target, uri, self._device_of(uri)) for uri in contacts]
        else:
            regs = [reg]
        for r in regs:
            if r.contact_uri in call.dialled_uris:
                stale = next((lg for lg in call.legs.values() if lg.uri == r.contact_uri), None)
                if stale is None:
                    if reg is not GAP and r.at > call.failed_at.get(r.contact_uri, float("inf")):
                        call.dialled_uris.discard(r.contact_uri)  # its leg failed; it registered since
                    else:
                        continue  # rung and over (declined...): never ring it twice
                elif reg is GAP or stale.awake or stale.progressed or r.at <= stale.started_wall:
                    # Rung because it registered during this call (a repeat of that registration,
                    # e.g. another daemon's capture, changes nothing), or it rings already.
                    continue
                else:
                    # Same URI registered afresh: the INVITE sent while it slept is lost; replace it.
                    await self._replace_leg(call, stale)
                    continue
            if call.push_sent_at and r.device_id and any(b.device_id == r.device_id for b in call.pushed):
                self.metrics.wake_latency.observe(time.monotonic() - call.push_sent_at)
            for old in [leg for leg in call.legs.values() if r.device_id and leg.device_id == r.device_id]:
                # The device came back on a new address: the INVITE to the old one is lost.
                self._drop_leg(call, old)
                await self._hangup_quietly(old.channel_id)
            endpoint = self._endpoint_of(call, r.device_id)
            await self._originate(call, endpoint, r.contact_uri, r.device_id)

    async def _replace_leg(self, call: Call, leg: Leg) -> None:
        log.info("call %s: %s registered again; replacing the INVITE it slept through", call.call_id,
                 leg.device_id or leg.uri.split(";")[0])
        self._drop_leg(call, leg)
        await self._hangup_quietly(leg.channel_id)
        call.dialled_uris.discard(leg.uri)
        if leg.device_id:
            call.replaced_at[leg.device_id] = time.time()
        await self._originate(call, self._endpoint_of(call, leg.device_id), leg.uri, leg.device_id)

    def _endpoint_of(self, call: Call, device_id: str) -> str:
        return next((b.endpoint for b in call.pushed if b.device_id == device_id), call.options.target)

    async def _originate(self, call: Call, endpoint: str, uri: str, device_id: str, awake: bool = True) -> None:
        if uri in call.dialled_uris:
            return
        call.dialled_uris.add(uri)
        leg = Leg(f"ap-{uuid.uuid4().hex[:20]}", uri, device_id, time.monotonic(), awake=awake)
        call.legs[leg.channel_id] = leg
        self.leg_owner[leg.channel_id] = call
        caller_id = f'"{_clean(call.caller_name)}" <{_clean(call.caller_number)}>'
        body: dict[str, Any] = {
            "endpoint": f"PJSIP/{endpoint}/{uri}",
            "app": self.settings.ari.app,
            "appArgs": f"{DIALED},{call.channel_id}",
            "callerId": caller_id,
            "timeout": int(self.settings.calls.dial_timeout),
            # The app can tell this call's INVITEs apart (the same call id as in the push), e.g.
            # to refuse an INVITE retransmitted to a socket it has reopened on the same port.
            "variables": {"ARI_PUSH_CALL_ID": call.call_id, "PJSIP_HEADER(add,X-Ari-Push-Call-Id)": call.call_id},
            "originator": call.channel_id,
        }
        try:
            await self.ari.call("originate", {"channelId": leg.channel_id}, body=body)
            log.info("call %s: ringing %s", call.call_id, device_id or uri.split(";")[0])
        except AriError as exc:
            log.warning("call %s: originate to %s failed: %s", call.call_id, uri.split(";")[0], exc)
            self._drop_leg(call, leg)

    async def _answer(self, call: Call, leg: Leg) -> None:
        bridge_id = f"ap-br-{uuid.uuid4().hex[:16]}"
        if self.settings.calls.moh_class:
            await self._safe(self.ari.call("moh_stop", {"channelId": call.channel_id}), "stop music on hold")
        await self.ari.call("create_bridge", {"bridgeId": bridge_id}, query={"type": "mixing", "name": call.call_id})
        call.bridge_id = bridge_id
        await self.ari.call("add_channel", {"bridgeId": bridge_id},
                            query={"channel": f"{call.channel_id},{leg.channel_id}"})
        await self.ari.call("answer", {"channelId": call.channel_id})
        log.info("call %s: answered by %s, bridged", call.call_id, leg.device_id or leg.uri.split(";")[0])
        for other in [lg for lg in call.legs.values() if lg is not leg]:
            self._drop_leg(call, other)
            await self._hangup_quietly(other.channel_id)
        others = [b for b in call.pushed if b.device_id != leg.device_id]
        if others:
            message = self._message(call, PushKind.ANSWERED_ELSEWHERE)
            self.spawn(self._push_all(others, message), f"elsewhere-{call.call_id}")

    async def _bridged(self, call: Call) -> None:
        """Asterisk does not carry a hang-up across a Stasis bridge: we do, both ways."""
        leg = call.answered_by
        assert leg is not None
        limit = self.settings.calls.max_duration
        while True:
            try:
                async with asyncio.timeout(limit - (time.monotonic() - call.started)):
                    item = await call.queue.get()
            except TimeoutError:
                log.warning("call %s: longer than calls.max_duration (%.0f s); ending it", call.call_id, limit)
                return
            if isinstance(item, Registration):
                continue
            cid = (item.get("channel") or {}).get("id", "")
            if item.get("type") in ("StasisEnd", "ChannelDestroyed", "ChannelHangupRequest") and cid in (
                    call.channel_id, leg.channel_id):
                if cid == call.channel_id:
                    call.caller_gone = True
                return

    # ---------------------------------------------------------------- endings

    async def _cleanup(self, call: Call, status: Status) -> None:
        try:
            for leg in list(call.legs.values()):
                if call.answered_by is not None and status is Status.ANSWERED and leg is not call.answered_by:
                    continue
                await self._hangup_quietly(leg.channel_id)
            if status is Status.ANSWERED:
                if not call.caller_gone:
                    await self._hangup_quietly(call.channel_id)
                if call.answered_by is not None:
                    await self._hangup_quietly(call.answered_by.channel_id)
            elif not call.caller_gone:
                await self._continue(call.channel_id, status)
            if call.bridge_id:
                await self._safe(self.ari.call("destroy_bridge", {"bridgeId": call.bridge_id}), "destroy bridge")
            if status is not Status.ANSWERED and call.pushed:
                message = self._message(call, PushKind.CANCEL)
                await self._push_all(call.pushed, message)
                if status is Status.TIMEOUT and self.settings.calls.missed_call_push:
                    await self._push_all(call.pushed, self._message(call, PushKind.MISSED_CALL))
            log.info("call %s to %s from %s ended: %s after %.2fs", call.call_id, call.options.target,
                     call.caller_number, status.value, time.monotonic() - call.started)
        finally:
            self.calls.pop(call.channel_id, None)
            for leg_id in list(call.legs):
                self.leg_owner.pop(leg_id, None)
            if call.answered_by is not None:
                self.leg_owner.pop(call.answered_by.channel_id, None)

    async def _continue(self, channel_id: str, status: Status) -> None:
        ok = await self._safe(self.ari.call("set_variable", {"channelId": channel_id},
                                            query={"variable": "PUSH_STATUS", "value": status.value}), "set status")
        if not ok:
            return
        query: dict[str, str] = {}
        ctx = self.settings.calls.continue_context
        if ctx:
            query = {"context": ctx, "extension": "s", "priority": "1"}
        await self._safe(self.ari.call("continue", {"channelId": channel_id}, query=query), "continue")

    def _drop_leg(self, call: Call, leg: Leg) -> None:
        call.legs.pop(leg.channel_id, None)
        if call.answered_by is not leg:
            self.leg_owner.pop(leg.channel_id, None)

    async def _hangup_quietly(self, channel_id: str) -> None:
        await self._safe(self.ari.call("hangup", {"channelId": channel_id}, query={"reason": "normal"}), "hangup",
                         quiet_404=True)

    async def _safe(self, op: Awaitable[Any], what: str, quiet_404: bool = False) -> bool:
        try:
            await op
        except AriError as exc:
            if not (quiet_404 and exc.status == 404):
                log.info("%s: %s", what, exc)
            return False
        return True

    async def _push_all(self, bindings: list[Binding], message: PushMessage) -> dict[str, PushResult]:
        # Exactly one push per (call, device, kind), whichever daemon handles the call: a push
        # another daemon sent for this call (before a take-over) counts as delivered.
        fresh, earlier = [], {}
        for b in bindings:
            if await self.ledger.first(message.call_id, b.device_id, message.kind.value):
                fresh.append(b)
            else:
                earlier[b.device_id] = PushResult(PushOutcome.DELIVERED, "sent earlier for this call")
        results = {**earlier, **await self.dispatcher.send_many(fresh, message)}
        bindings = fresh
        for b in bindings:
            r = results.get(b.device_id)
            if r is not None:
                self.metrics.pushes.labels(b.push.provider, message.kind.value, r.outcome.value).inc()
        return results

    def _message(self, call: Call, kind: PushKind) -> PushMessage:
        remaining = max(0.0, call.options.timeout - (time.monotonic() - call.started))
        deadline = time.time() + (remaining if kind is PushKind.CALL else 30.0)
        return PushMessage(kind=kind, call_id=call.call_id, caller_number=call.caller_number,
                           caller_name=call.caller_name, callee=call.options.target, deadline=deadline)

    def _device_of(self, uri: str) -> str:
        """The device id of a contact that carries push parameters, else ''."""
        try:
            push = parse_contact(uri, self.policy)
        except ContactRejected:
            return ""
        return push.device_id if push else ""

    async def _live_contacts(self, aor: str) -> list[str] | None:
        """Registered contact URIs of the AOR, or None when Asterisk has no such AOR."""
        try:
            attrs = await self.ari.call("get_config", {"configClass": "res_pjsip", "objectType": "aor", "id": aor})
        except AriError as exc:
            if exc.status == 404:
                return None
            log.warning("cannot read the contacts of %s: %s", aor, exc)
            return []
        uris: list[str] = []
        for attr in attrs or []:
            if attr.get("attribute") == "contact" and attr.get("value"):
                uris += [u.strip() for u in str(attr["value"]).split(",") if u.strip()]
        return uris


def _endpoint_for(bindings: list[Binding], device: str, default: str) -> str:
    return next((b.endpoint for b in bindings if b.device_id == device), default)


def _clean(text: str) -> str:
    return re.sub(r'[<>"\\\r\n]', "", text)[:80]
