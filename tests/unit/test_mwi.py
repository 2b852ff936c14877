"""Voicemail pushes without sockets: recorded AMI wire text in, decisions out.

The MessageWaiting frame below was recorded from Asterisk 22.10 when app_voicemail saved a
message (docs/reachability.md). Real Asterisk + Redis + FCM: tests/integration/test_mwi.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pytest

from ari_push.ami_frames import AmiMessage, AmiParser
from ari_push.bindings import MemoryStore
from ari_push.metrics import Metrics
from ari_push.model import Binding, PushKind, PushMessage, PushOutcome, PushParams, PushResult
from ari_push.mwi import Decision, MailboxMap, MemoryLedger, MwiNotifier, parse_event
from ari_push.settings import MwiSettings

RECORDED = (
    b"Asterisk Call Manager/11.0.0\r\n"
    b"Event: MessageWaiting\r\nPrivilege: call,all\r\nSystemName: vmexp-s5\r\nChannel: PJSIP/vm3100-00000000\r\n"
    b"ChannelState: 6\r\nChannelStateDesc: Up\r\nCallerIDNum: vm3100\r\nCallerIDName: <unknown>\r\n"
    b"ConnectedLineNum: <unknown>\r\nConnectedLineName: <unknown>\r\nLanguage: en\r\nAccountCode: \r\n"
    b"Context: rig-vm\r\nExten: 3100\r\nPriority: 2\r\nUniqueid: vmexp-s5-1796160330.0\r\n"
    b"Linkedid: vmexp-s5-1796160330.0\r\nMailbox: 3100@default\r\nWaiting: 1\r\nNew: 1\r\nOld: 0\r\n\r\n"
)


def event(mailbox: str, new: int, old: int = 0) -> AmiMessage:
    (msg,) = AmiParser().feed(f"Asterisk Call Manager/11.0.0\r\nEvent: MessageWaiting\r\nMailbox: {mailbox}\r\n"
                              f"Waiting: {int(new > 0)}\r\nNew: {new}\r\nOld: {old}\r\n\r\n".encode())
    return msg


def test_the_recorded_event_parses() -> None:
    (msg,) = AmiParser().feed(RECORDED)
    counts = parse_event(msg, 5.0)
    assert counts is not None
    assert (counts.mailbox, counts.new, counts.old, counts.seen_at) == ("3100@default", 1, 0, 5.0)


@pytest.mark.parametrize("frame", [
    b"Event: MessageWaiting\r\nMailbox: 1@x\r\nNew: many\r\nOld: 0\r\n\r\n",
    b"Event: MessageWaiting\r\nMailbox: \r\nNew: 1\r\nOld: 0\r\n\r\n",
    b"Event: MessageWaiting\r\nMailbox: 1@x\r\nNew: -1\r\nOld: 0\r\n\r\n",
    b"Event: ContactStatus\r\nMailbox: 1@x\r\nNew: 1\r\n\r\n",
])
def test_bad_or_foreign_events_are_ignored(frame: bytes) -> None:
    (msg,) = AmiParser().feed(b"Asterisk Call Manager/11.0.0\r\n" + frame)
    assert parse_event(msg, 0.0) is None


async def test_ledger_dedupes_and_rate_limits() -> None:
    ledger = MemoryLedger()
    assert await ledger.decide("1@d", 1, 0, 100.0, 30) == (Decision.SEND, 0.0)
    assert await ledger.decide("1@d", 1, 0, 101.0, 30) == (Decision.SAME, 0.0)
    assert await ledger.decide("1@d", 2, 0, 101.0, 30) == (Decision.WAIT, 130.0)
    assert await ledger.decide("1@d", 2, 0, 130.0, 30) == (Decision.SEND, 0.0)
    assert await ledger.decide("2@d", 2, 0, 130.0, 30) == (Decision.SEND, 0.0)


@dataclass
class Endpoints:
    boxes: dict[str, list[str]]
    reads: int = 0

    async def mailboxes(self, endpoint: str) -> list[str]:
        self.reads += 1
        return self.boxes.get(endpoint, [])


@dataclass
class Pusher:
    sent: list[tuple[list[Binding], PushMessage]] = field(default_factory=list)

    async def send_many(self, bindings: Any, message: PushMessage) -> dict[str, PushResult]:
        bindings = list(bindings)
        self.sent.append((bindings, message))
        return {b.device_id: PushResult(PushOutcome.DELIVERED) for b in bindings}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def store_with(*aors: str) -> MemoryStore:
    store = MemoryStore()
    for aor in aors:
        push = PushParams(provider="fcm", token=f"tok-{aor}", param="p")
        await store.upsert(Binding(aor=aor, endpoint=aor, push=push, contact_uri=f"sip:{aor}@h", first_seen=1,
                                   last_seen=1))
    return store


async def test_map_from_endpoints_and_overrides() -> None:
    store = await store_with("1001", "1002")
    endpoints = Endpoints({"1001": ["100@default"], "1002": ["100@default", "200@other"]})
    clock = Clock()
    mapping = MailboxMap((("300", ("1002",)),), store, endpoints, ttl=300, clock=clock)
    assert await mapping.aors_for("100@default") == ("1001", "1002")
    assert await mapping.aors_for("200@other") == ("1002",)
    assert await mapping.aors_for("300@default") == ("1002",)  # override, context defaulted
    reads = endpoints.reads
    assert await mapping.aors_for("999@default") == ()
    assert endpoints.reads == reads  # an unknown mailbox re-reads at most every minute
    clock.now += 61
    assert await mapping.aors_for("999@default") == ()
    assert endpoints.reads > reads


def notifier(store: MemoryStore, pusher: Pusher, clock: Clock, endpoints: Endpoints) -> tuple[MwiNotifier, Metrics]:
    metrics = Metrics()
    settings = MwiSettings(min_interval=30)
    mapping = MailboxMap((), store, endpoints, ttl=300, clock=clock)
    return MwiNotifier(settings, MemoryLedger(), mapping, store, pusher, metrics, clock=clock, monotonic=clock), metrics


def fate(metrics: Metrics, name: str) -> float:
    return float(metrics.registry.get_sample_value("ari_push_mwi_events_total", {"fate": name}) or 0)


async def test_a_flood_is_coalesced_then_rate_limited() -> None:
    store, pusher, clock = await store_with("1001"), Pusher(), Clock()
    n, metrics = notifier(store, pusher, clock, Endpoints({"1001": ["100@default"]}))
    for i in range(1, 51):
        n.on_ami_event(event("100@default", i))
    assert n.queue.qsize() == 1 and fate(metrics, "coalesced") == 49
    await n._handle(await n.queue.get())
    ((bindings, message),) = pusher.sent
    assert message.kind is PushKind.MWI and dict(message.extra)["new"] == "50"
    assert [b.aor for b in bindings] == ["1001"]
    # more changes inside the interval wait for its end, and only the latest goes out
    n.on_ami_event(event("100@default", 51))
    await n._handle(await n.queue.get())
    n.on_ami_event(event("100@default", 52))
    assert n.queue.empty() and len(pusher.sent) == 1  # waiting: not queued again
    clock.now += 30
    due = n._later[0]
    assert due == (1030.0, "100@default")
    n._later.pop()
    n._waiting.discard(due[1])
    await n._handle(due[1])
    assert [dict(m.extra)["new"] for _, m in pusher.sent] == ["50", "52"]


async def test_unchanged_counts_are_not_pushed() -> None:
    store, pusher, clock = await store_with("1001"), Pusher(), Clock()
    n, metrics = notifier(store, pusher, clock, Endpoints({"1001": ["100@default"]}))
    for _ in range(2):
        n.on_ami_event(event("100@default", 1))
        await n._handle(await n.queue.get())
        clock.now += 60
    assert len(pusher.sent) == 1 and fate(metrics, "unchanged") == 1


async def test_a_mailbox_whose_aors_have_no_push_device_records_nothing() -> None:
    store, pusher, clock = await store_with("1001"), Pusher(), Clock()
    vendor = PushParams(provider="vendor", token="https://push.example/x", param="")
    await store.upsert(Binding(aor="1002", endpoint="1002", push=vendor, contact_uri="sip:1002@h", first_seen=1,
                               last_seen=1))
    n, metrics = notifier(store, pusher, clock, Endpoints({"1001": ["100@default"], "1002": ["200@default"]}))
    n.on_ami_event(event("200@default", 1))  # only a vendor URL device: vendor is off by default
    await n._handle(await n.queue.get())
    assert pusher.sent == [] and fate(metrics, "no-devices") == 1


async def test_unmapped_mailbox_is_logged_once_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    store, pusher, clock = await store_with("1001"), Pusher(), Clock()
    n, metrics = notifier(store, pusher, clock, Endpoints({}))
    with caplog.at_level(logging.WARNING, "ari_push.mwi"):
        for i in range(3):
            n.on_ami_event(event("555@default", i + 1))
            await n._handle(await n.queue.get())
    assert pusher.sent == [] and fate(metrics, "unmapped") == 3
    assert sum("555@default maps to no AOR" in r.getMessage() for r in caplog.records) == 1
