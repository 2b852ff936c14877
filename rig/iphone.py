"""A simulated iPhone that holds ari-push to Apple's PushKit/CallKit rules.

The phone is ``rig.sipua.SipUA`` (its SIP) plus the part of iOS the tests need: it registers with
both tokens (RFC 8599 ``pn-prid=<voip>:voip&<remote>:remote``), sleeps (closes its socket), and
takes its pushes from the local APNs (``tests.fakes.apns.FakeApns``, which hands it every push
to its tokens). The rules it applies, as iOS 13+ does:

- **Every VoIP push is a new incoming call**, reported to CallKit at once. A VoIP push for a call
  CallKit already has, or one without a call id, is a violation: on a real phone iOS kills the app
  (and, repeated, stops delivering VoIP pushes to it). ``violations`` lists them; a test fails on any.
- A VoIP push wakes the app: ``wake_delay`` later it opens a new socket and re-registers.
- **Every call CallKit shows must end**, and the phone must learn how within ``learn_within``
  seconds of waking: a CANCEL or BYE on the call's INVITE (``X-Ari-Push-Call-Id``), the call
  answered, or a background/alert push to the remote token naming the call. ``unresolved()``
  lists the calls it never learnt about.
- An INVITE for a call it knows ended is refused (487), a second one for a call it has is refused
  (486): the app's side of docs/apps.md.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from rig.sipua import SipMessage, SipUA


@dataclass
class CallKitCall:
    call_id: str
    reported_at: float
    woke_at: float = 0.0
    ended_how: str = ""  # "cancel:<reason header>", "bye", "push:<type>", "answered"
    ended_at: float = 0.0
    answered: bool = False


@dataclass
class IPhone:
    aor: str
    sip_port: int
    voip_token: str
    remote_token: str
    team: str = "TEAM123456"
    bundle: str = "com.example.phone"
    wake_delay: float = 0.3
    answer: bool = True  # answer the call's INVITE (False: let it ring, e.g. to see the CANCEL)
    learn_within: float = 5.0
    calls: dict[str, CallKitCall] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    pushes: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # (token kind, push type, payload)
    woke: asyncio.Event = field(default_factory=asyncio.Event)
    ua: SipUA | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def contact_params(self) -> str:
        if not self.remote_token:  # an app that asked iOS for a VoIP token only
            return f"pn-provider=apns;pn-prid={self.voip_token};pn-param={self.team}.{self.bundle}.voip"
        return (f"pn-provider=apns;pn-prid={self.voip_token}:voip&{self.remote_token}:remote;"
                f"pn-param={self.team}.{self.bundle}.voip&remote")

    async def register_and_sleep(self) -> None:
        self.ua = _CallKitUA(self, self.aor, self.sip_port)
        await self.ua.open()
        status = await self.ua.register(self.contact_params, expires=600)
        if status != 200:
            raise RuntimeError(f"REGISTER got {status}")
        self.ua.close()  # asleep: iOS suspended the app, its contact stays registered

    # ---------------------------------------------------------------- pushes (from the local APNs)

    def on_push(self, token: str, headers: dict[str, str], payload: dict[str, Any]) -> None:
        """Called by the local APNs for every push it accepted to one of this phone's tokens."""
        push_type = headers.get("apns-push-type", "")
        kind = "voip" if token.lower() == self.voip_token.lower() else "remote"
        self.pushes.append((kind, push_type, payload))
        call_id = str(payload.get("call_id", ""))
        if kind == "voip":
            if push_type != "voip":
                self.violations.append(f"a {push_type} push to the VoIP token")
                return
            if not call_id or call_id in self.calls:
                self.violations.append(f"app killed: VoIP push for a call CallKit already has ({payload.get('type')})")
                return
            if payload.get("type") != "call":
                self.violations.append(f"app killed: VoIP push of type {payload.get('type')!r} is no new call")
            self.calls[call_id] = CallKitCall(call_id, time.monotonic())
            self._spawn(self._wake())
            return
        if push_type == "voip":
            self.violations.append("a VoIP push to the remote token")
            return
        call = self.calls.get(call_id)
        if call is not None and not call.ended_how and payload.get("type") != "call":
            call.ended_how, call.ended_at = f"push:{payload.get('type')}", time.monotonic()

    async def _wake(self) -> None:
        await asyncio.sleep(self.wake_delay)
        if self.woke.is_set():
            return
        assert self.ua is not None
        await self.ua.open()
        now = time.monotonic()
        for call in self.calls.values():
            call.woke_at = call.woke_at or now
        await self.ua.register(self.contact_params, expires=600)
        self.woke.set()

    # ---------------------------------------------------------------- SIP (through _CallKitUA)

    def on_invite(self, msg: SipMessage) -> int:
        """What the app answers to an INVITE: 0 to ring (and answer if ``answer``), else a code."""
        call_id = msg.header("X-Ari-Push-Call-Id")
        call = self.calls.get(call_id)
        if call is None:
            return 0  # not a call pushed to it (a plain call to an awake phone)
        if call.ended_how:
            return 487  # a call it knows is over
        return 0

    def on_cancel(self, msg: SipMessage, invite_call_id: str) -> None:
        call = self.calls.get(invite_call_id)
        if call is not None and not call.ended_how:
            call.ended_how, call.ended_at = f"cancel:{';'.join(msg.all('Reason'))}", time.monotonic()

    def on_answered(self, invite_call_id: str) -> None:
        call = self.calls.get(invite_call_id)
        if call is not None:
            call.answered = True
            call.ended_how = call.ended_how or "answered"
            call.ended_at = call.ended_at or time.monotonic()

    def on_bye(self, invite_call_id: str) -> None:
        call = self.calls.get(invite_call_id)
        if call is not None and not call.ended_how:
            call.ended_how, call.ended_at = "bye", time.monotonic()

    # ---------------------------------------------------------------- verdicts

    def unresolved(self) -> list[str]:
        """Calls CallKit still shows ``learn_within`` seconds after the phone woke."""
        now = time.monotonic()
        out = []
        for call in self.calls.values():
            start = call.woke_at or call.reported_at
            never = not call.ended_how and now - start >= self.learn_within
            late = bool(call.ended_how) and call.ended_at - start > self.learn_within
            if never or late:
                out.append(call.call_id)
        return out

    async def learnt(self, call_id: str, timeout: float) -> str:
        """How the phone learnt that ``call_id`` ended (waits up to ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            call = self.calls.get(call_id)
            if call is not None and call.ended_how:
                return call.ended_how
            await asyncio.sleep(0.02)
        raise AssertionError(f"the iPhone never learnt how call {call_id} ended")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.ua is not None:
            self.ua.close()


class _CallKitUA(SipUA):
    """The phone's SIP: SipUA's, with the app's decisions from ``IPhone``."""

    def __init__(self, phone: IPhone, user: str, server_port: int) -> None:
        super().__init__(user, server_port)
        self.phone = phone
        self.invite_push_ids: dict[str, str] = {}  # SIP Call-ID -> X-Ari-Push-Call-Id

    def _on_message(self, msg: SipMessage) -> None:
        if msg.is_request and msg.method == "INVITE" and msg.header("Call-ID") not in self.invite_push_ids:
            push_id = msg.header("X-Ari-Push-Call-Id")
            self.invite_push_ids[msg.header("Call-ID")] = push_id
            code = self.phone.on_invite(msg)
            if code:
                self.log.append(msg)
                self.send(self._response(msg, code, "Request Terminated" if code == 487 else "Busy Here", "t487"),
                          msg.source)
                return
            if not self.phone.answer:
                self.log.append(msg)
                self.invites.put_nowait(msg)
                self.send(self._response(msg, 180, "Ringing", "tring"), msg.source)
                return
        if msg.is_request and msg.method == "CANCEL":
            self.phone.on_cancel(msg, self.invite_push_ids.get(msg.header("Call-ID"), ""))
        if msg.is_request and msg.method == "BYE":
            self.phone.on_bye(self.invite_push_ids.get(msg.header("Call-ID"), ""))
        super()._on_message(msg)
        if msg.is_request and msg.method == "INVITE" and self.phone.answer:
            self.phone.on_answered(self.invite_push_ids.get(msg.header("Call-ID"), ""))
