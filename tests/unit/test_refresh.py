"""RefreshScheduler decisions with a scripted clock and contact list (no sockets).

The real Asterisk, Redis and FCM versions of these flows are in tests/integration/test_refresh.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from ari_push.ari import AriError
from ari_push.bindings import MemoryStore
from ari_push.channels import contact_object_id as contact_id
from ari_push.contacts import ContactPolicy
from ari_push.metrics import Metrics
from ari_push.model import Binding, PushKind, PushMessage, PushOutcome, PushResult
from ari_push.refresh import RefreshScheduler
from ari_push.refresh_store import MemorySchedule
from ari_push.settings import CaptureSettings, RefreshSettings

URI = "sip:alice@127.0.0.1:5070;transport=udp;pn-provider=fcm;pn-prid=cAlice123:APA91bHalice-token;pn-param=proj"


class Clock:
    def __init__(self, now: float = 10_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Contacts:
    """Asterisk's contact table as the scheduler reads it."""

    table: dict[tuple[str, str], float] = field(default_factory=dict)
    down: bool = False
    reads: int = 0

    async def expiration(self, aor: str, uri: str) -> float | None:
        self.reads += 1
        if self.down:
            raise AriError("get_config", 0, "no answer")
        return self.table.get((aor, uri))

    async def contacts(self) -> list[tuple[str, str, float]]:
        return [(a, u, e) for (a, u), e in self.table.items()]


@dataclass
class Pusher:
    outcome: PushOutcome = PushOutcome.DELIVERED
    sent: list[tuple[Binding, PushMessage]] = field(default_factory=list)
    serves: bool = True

    def provider_for(self, binding: Binding) -> object | None:
        return object() if self.serves else None

    async def send(self, binding: Binding, message: PushMessage) -> PushResult:
        self.sent.append((binding, message))
        return PushResult(self.outcome)


def metric(m: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    return float(m.registry.get_sample_value(name, labels or {}) or 0.0)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def parts(clock: Clock) -> tuple[RefreshScheduler, Contacts, Pusher, MemoryStore, Metrics]:
    settings = RefreshSettings(min_interval=60.0, grace=2.0)
    contacts, pusher, store, metrics = Contacts(), Pusher(), MemoryStore(), Metrics()
    sched = RefreshScheduler(settings, MemorySchedule(settings.at_fraction, settings.grace), store, contacts,
                             pusher, ContactPolicy.from_settings(CaptureSettings()), metrics, clock=clock)
    return sched, contacts, pusher, store, metrics


async def register(store: MemoryStore, contacts: Contacts, clock: Clock, expires_in: float = 100.0) -> Binding:
    from ari_push.contacts import parse_contact

    push = parse_contact(URI, ContactPolicy.from_settings(CaptureSettings()))
    assert push is not None
    b = Binding(aor="alice", endpoint="alice", push=push, contact_uri=URI, first_seen=clock.now, last_seen=clock.now)
    await store.upsert(b)
    contacts.table[("alice", URI)] = clock.now + expires_in
    return b


def test_contact_id_is_asterisks() -> None:
    # measured on Asterisk 22 (docs/reachability.md): <aor>;@<md5 of the stored URI>
    uri = "sip:1001@127.0.0.1:5401;transport=udp;pn-provider=apns;pn-prid=TOKA;pn-param=ABCD1234.com.example.voip"
    assert contact_id("1001", uri) == "1001;@84f144c75c7c3bd5d179f4e1f4508456"


async def test_push_at_eighty_percent_then_judged_after_expiry(parts, clock: Clock) -> None:
    sched, contacts, pusher, store, metrics = parts
    await register(store, contacts, clock)
    assert await sched.sync() == 1
    clock.now += 79
    assert await sched.tick() == 0
    clock.now += 1.5
    assert await sched.tick() == 1
    ((_binding, message),) = pusher.sent
    assert message.kind is PushKind.REFRESH and message.callee == "alice"
    assert message.deadline == contacts.table[("alice", URI)]  # useless after the expiry
    assert metric(metrics, "ari_push_refresh_pushes_total", {"result": "delivered"}) == 1
    contacts.table[("alice", URI)] = clock.now + 100  # the phone re-registered (same URI)
    clock.now += 22
    assert await sched.tick() == 1
    assert metric(metrics, "ari_push_refresh_reregistered_total") == 1
    clock.now += 60  # ... and the next refresh at 80 % of the new registration
    await sched.tick()
    assert len(pusher.sent) == 2


async def test_expired_anyway(parts, clock: Clock) -> None:
    sched, contacts, _pusher, store, metrics = parts
    await register(store, contacts, clock)
    await sched.sync()
    clock.now += 81
    await sched.tick()
    del contacts.table[("alice", URI)]  # Asterisk removed it on expiry
    clock.now += 25
    await sched.tick()
    assert metric(metrics, "ari_push_refresh_expired_total", {"pushed": "yes"}) == 1
    assert await sched.schedule.size() == 0


async def test_a_phone_that_refreshes_by_itself_gets_no_push(parts, clock: Clock) -> None:
    sched, contacts, pusher, store, _metrics = parts
    await register(store, contacts, clock)
    await sched.sync()
    clock.now += 50
    contacts.table[("alice", URI)] = clock.now + 100
    clock.now += 31
    await sched.tick()  # due by the old registration: the lookup shows the new one
    assert pusher.sent == []
    clock.now += 48
    await sched.tick()
    assert pusher.sent == []  # 80 % of the new one is at +80 after the refresh (+130)
    clock.now += 2
    await sched.tick()
    assert len(pusher.sent) == 1


async def test_at_most_one_push_per_interval(parts, clock: Clock) -> None:
    sched, contacts, pusher, store, metrics = parts
    await register(store, contacts, clock, expires_in=20)
    await sched.sync()
    clock.now += 17
    await sched.tick()
    contacts.table[("alice", URI)] = clock.now + 20
    clock.now += 6
    await sched.tick()  # judged: re-registered
    clock.now += 10
    await sched.tick()  # due again, but only 16 s after the last push (min_interval 60)
    assert len(pusher.sent) == 1
    assert metric(metrics, "ari_push_refresh_pushes_total", {"result": "rate-limited"}) == 1


async def test_failed_push_is_not_counted_as_sent_and_asterisk_down_defers(parts, clock: Clock) -> None:
    sched, contacts, pusher, store, metrics = parts
    await register(store, contacts, clock)
    await sched.sync()
    contacts.down = True
    clock.now += 81
    await sched.tick()  # no lookup possible: nothing pushed, tried again in 5 s
    assert pusher.sent == []
    contacts.down = False
    clock.now += 4
    await sched.tick()
    assert pusher.sent == []
    clock.now += 1.5
    pusher.outcome = PushOutcome.TOKEN_DEAD
    await sched.tick()
    assert len(pusher.sent) == 1
    assert metric(metrics, "ari_push_refresh_pushes_total", {"result": "token-dead"}) == 1
    assert metric(metrics, "ari_push_refresh_pushes_total", {"result": "delivered"}) == 0


async def test_devices_nobody_can_push_are_not_scheduled(parts, clock: Clock) -> None:
    sched, contacts, pusher, store, _metrics = parts
    await register(store, contacts, clock)
    pusher.serves = False
    assert await sched.sync() == 0
    assert await sched.schedule.size() == 0


async def test_a_full_queue_asks_for_a_full_read(parts, clock: Clock) -> None:
    sched, contacts, _pusher, store, _metrics = parts
    b = await register(store, contacts, clock)
    for _ in range(sched.queue.maxsize + 3):
        sched.on_binding(b, True)
    assert sched.dropped == 3 and sched._sync_now.is_set()



async def test_a_registration_whose_expiration_capture_read_is_scheduled_without_a_read(
        parts, clock: Clock) -> None:
    sched, contacts, _pusher, store, _metrics = parts
    b = await register(store, contacts, clock)
    sched.on_binding(b, True, clock.now + 100)  # capture read the contact (its User-Agent) just now
    await sched.observe_registration(*sched.queue.get_nowait())
    assert contacts.reads == 0 and await sched.schedule.size() == 1
    sched.on_binding(b, True)  # nothing read by capture: the scheduler reads it
    await sched.observe_registration(*sched.queue.get_nowait())
    assert contacts.reads == 1 and await sched.schedule.size() == 1
