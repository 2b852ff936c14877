"""A harmless test push to an AOR's devices, through the daemon's real providers.

Used by ``ari-push test-push`` and by the web console's test-push button. The push is a
registration-refresh push (``PushKind.REFRESH``, one of ``REACH_KINDS``: docs/reachability.md)
marked ``test = 1``: the providers already send that kind silently where the platform allows
(FCM: data only, normal priority; APNs: ``background``, priority 5, to the *remote* token;
Huawei: push-type 6) and never as a VoIP push. At most it makes the app re-REGISTER, which is
what it does on its own anyway. A VoIP-only iOS device (no remote token) is refused here with
"no non-VoIP token" before any provider is asked: a VoIP push that reports no call gets the
app killed by iOS.

It goes through ``PushDispatcher.send`` (provider choice, retries, deadline, the token-dead
handler) like every other push; nothing about providers is duplicated here.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ari_push.bindings import StoreUnavailable
from ari_push.model import Binding, PushKind, PushMessage, PushResult, mask_token
from ari_push.push.apns import remote_target
from ari_push.traces import DetailValue

KIND = PushKind.REFRESH
TIMEOUT = 15.0  # s: the push's deadline (retries stop there)
REFUSED = "refused"  # outcome of a device no test push can be sent to (not a PushOutcome)
NO_NON_VOIP = "no non-VoIP token: this iOS app registered a VoIP token only, and a VoIP push must report a call"


class TestPushError(Exception):
    """Unknown AOR, unknown device, or the store cannot be read: nothing was sent."""

    __test__ = False  # not a pytest class


class Bindings(Protocol):
    async def bindings_for(self, aor: str) -> list[Binding]: ...


class Sender(Protocol):
    async def send(self, binding: Binding, message: PushMessage, verdict: bool | None = None) -> PushResult: ...


@dataclass(frozen=True)
class PushTestResult:
    """One device's answer. ``detail`` holds the masked token, the reason and HTTP status; never
    a secret in full."""

    device_id: str
    provider: str
    kind: str
    outcome: str  # a PushOutcome value, or "refused"
    latency_ms: float | None
    detail: Mapping[str, DetailValue] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"device_id": self.device_id, "provider": self.provider, "kind": self.kind, "outcome": self.outcome,
                "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 3),
                "detail": dict(self.detail)}


def voip_only(binding: Binding) -> bool:
    """An iOS device with nothing but a VoIP token (apns.remote_target finds no other)."""
    return binding.push.provider == "apns" and remote_target(binding.push) is None


def probe_message(aor: str, now: float | None = None) -> PushMessage:
    return PushMessage(kind=KIND, call_id=f"test-{uuid.uuid4().hex[:16]}", caller_number="", caller_name="",
                       callee=aor, deadline=(time.time() if now is None else now) + TIMEOUT,
                       extra=(("test", "1"), ("collapse_id", "test")))


async def send_test_push(store: Bindings, dispatcher: Sender, aor: str,
                         device_id: str | None = None) -> tuple[PushTestResult, ...]:
    """Send the test push to each device of ``aor`` (or only ``device_id``), one after the other
    (each latency is its own). Raises TestPushError when there is nothing to send to."""
    try:
        bindings = await store.bindings_for(aor)
    except StoreUnavailable as exc:
        raise TestPushError(f"the binding store cannot be read: {exc}") from None
    if not bindings:
        raise TestPushError(f"no device is known for AOR {aor!r}")
    if device_id:
        chosen = [b for b in bindings if b.device_id == device_id]
        if not chosen:
            known = ", ".join(b.device_id for b in bindings)
            raise TestPushError(f"AOR {aor!r} has no device {device_id!r} (its devices: {known})")
        bindings = chosen
    message = probe_message(aor)
    out = []
    for b in bindings:
        if voip_only(b):
            token = mask_token(b.push.provider, b.push.token)
            out.append(PushTestResult(b.device_id, b.push.provider, KIND.value, REFUSED, None,
                                      {"reason": NO_NON_VOIP, "token": token}))
            continue
        target = remote_target(b.push) if b.push.provider == "apns" else None
        token = mask_token(b.push.provider, target[0] if target else b.push.token)  # the token pushed
        started = time.monotonic()
        result = await dispatcher.send(b, message)
        latency = (time.monotonic() - started) * 1000.0
        out.append(PushTestResult(b.device_id, b.push.provider, KIND.value, result.outcome.value, latency,
                                  {"reason": result.reason[:300] or None, "status": result.status, "token": token}))
    return tuple(out)
