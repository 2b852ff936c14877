"""The SIP MESSAGE relay without sockets: what it stores, pushes, delivers and expires.
The real Asterisk + Redis + FCM flows are in tests/integration/test_messages.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from ari_push.ami_frames import AmiMessage
from ari_push.bindings import MemoryStore, StoreUnavailable
from ari_push.messages import MAX_PER_AOR, MemoryMessages, MessageRelay, StoredMessage, sender_parts
from ari_push.metrics import Metrics
from ari_push.model import Binding, PushKind, PushMessage, PushOutcome, PushParams, PushResult
from ari_push.settings import MessageSettings
from tests.conftest import wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Contacts:
    table: dict[tuple[str, str], float] = field(default_factory=dict)

    async def expiration(self, aor: str, uri: str) -> float | None:
        return self.table.get((aor, uri))


@dataclass
class Ari:
    sent: list[dict[str, str]] = field(default_factory=list)

    async def call(self, operation: str, path_params: dict[str, str] | None = None,
                   query: dict[str, str] | None = None) -> object:
        assert operation == "send_message" and query is not None
        self.sent.append(query)
        return None


@dataclass
class Ami:
    puts: list[dict[str, str]] = field(default_factory=list)

    async def action(self, name: str, **params: str) -> AmiMessage:
        assert name == "DBPut"
        self.puts.append(params)
        return AmiMessage(())


@dataclass
class Pusher:
    sent: list[PushMessage] = field(default_factory=list)

    async def send_many(self, bindings: Any, message: PushMessage) -> dict[str, PushResult]:
        self.sent.append(message)
        return {b.device_id: PushResult(PushOutcome.DELIVERED) for b in bindings}


URI = "sip:alice@127.0.0.1:5070;transport=udp;pn-provider=fcm;pn-prid=tok;pn-param=p"


@pytest.fixture
async def relay() -> tuple[MessageRelay, Clock, Contacts, Ari, Ami, Pusher]:
    clock, contacts, ari, ami, pusher = Clock(), Contacts(), Ari(), Ami(), Pusher()
    store = MemoryStore()
    await store.upsert(Binding(aor="alice", endpoint="alice", push=PushParams("fcm", "tok", "p"), contact_uri=URI,
                               first_seen=1, last_seen=1))
    contacts.table[("alice", URI)] = 5300.0
    settings = MessageSettings(ttl=60, preview=True, preview_chars=10)
    r = MessageRelay(settings, MemoryMessages(), store, contacts, ari, ami, pusher, Metrics(), clock=clock)
    return r, clock, contacts, ari, ami, pusher


def test_sender_parts() -> None:
    assert sender_parts('"Bob B" <sip:2000@pbx.example>;tag=x') == ("Bob B", "2000")
    assert sender_parts("<sips:carol@host>") == ("", "carol")
    assert sender_parts("") == ("", "")


async def test_not_a_push_aor(relay: Any) -> None:
    r, *_ = relay
    assert await r.accept("bob", "<sip:2000@pbx>", "hi") == "NOT_PUSH"


async def test_store_push_then_deliver_once_on_a_fresh_contact(relay: Any) -> None:
    r, clock, _contacts, ari, ami, pusher = relay
    status = await r.accept("alice", '"Bob" <sip:2000@pbx>', "short")
    assert status.startswith("STORED ")
    (push,) = pusher.sent
    assert push.kind is PushKind.MESSAGE and push.caller_number == "2000" and push.caller_name == "Bob"
    assert dict(push.extra)["preview"] == "short" and push.deadline == clock.now + 60
    assert await r.deliver("alice", "alice", URI, clock.now) == 1
    assert ari.sent == [{"to": f"pjsip:alice/{URI}", "from": '"Bob" <sip:2000@pbx>', "body": "short"}]
    assert ami.puts == [{"Family": "ari-push-message", "Key": status.split()[1], "Val": "DELIVERED"}]
    assert await r.deliver("alice", "alice", URI, clock.now) == 0  # never twice


async def test_a_text_longer_than_the_preview_limit_is_not_cut_into_the_push(relay: Any) -> None:
    r, _clock, _c, _ari, _ami, pusher = relay
    await r.accept("alice", "<sip:2000@pbx>", "this is longer than ten")
    assert "preview" not in dict(pusher.sent[0].extra)


async def test_same_uri_refresh_found_by_polling(relay: Any) -> None:
    r, _clock, contacts, ari, _ami, _p = relay
    await r.accept("alice", "<sip:2000@pbx>", "poll me")
    await r._poll()
    assert ari.sent == []  # expiration unchanged
    contacts.table[("alice", URI)] = 5310.0
    await r._poll()
    assert [q["body"] for q in ari.sent] == ["poll me"]


async def test_expiry_writes_the_status_and_drops_the_message(relay: Any) -> None:
    r, clock, _c, ari, ami, _p = relay
    status = await r.accept("alice", "<sip:2000@pbx>", "late")
    clock.now += 61
    await r._expire()
    assert ami.puts[-1] == {"Family": "ari-push-message", "Key": status.split()[1], "Val": "EXPIRED"}
    assert await r.store.pending("alice") == []
    assert await r.deliver("alice", "alice", URI, clock.now) == 0 and ari.sent == []


async def test_a_full_mailbox_refuses_more(relay: Any) -> None:
    r, *_ = relay
    for i in range(MAX_PER_AOR):
        assert (await r.accept("alice", "<sip:2000@pbx>", f"m{i}")).startswith("STORED")
    assert await r.accept("alice", "<sip:2000@pbx>", "one too many") == "FULL"


async def test_memory_store_take_is_once() -> None:
    store = MemoryMessages()
    msg = StoredMessage("id1", "alice", "<sip:b@h>", "x", 1.0, 2.0)
    assert await store.add(msg, 5)
    assert await store.expired(2.0, 10) == [msg]
    assert await store.take(msg) and not await store.take(msg)
    assert StoredMessage.from_json(msg.to_json()) == msg


async def test_stored_message_json_keeps_the_contacts_seen_and_reads_older_ones() -> None:
    msg = StoredMessage("id1", "alice", "<sip:b@h>", "x", 1.0, 2.0, ((URI, 5300.0),))
    assert StoredMessage.from_json(msg.to_json()) == msg
    assert msg.seen_expiration(URI) == 5300.0 and msg.seen_expiration("sip:other@h") is None
    old = '{"id":"id2","aor":"alice","sender":"s","body":"x","received_at":1.0,"expires_at":2.0}'
    assert StoredMessage.from_json(old).seen == ()  # stored by a version without it


async def test_a_same_uri_refresh_before_a_restarted_relays_first_poll_is_not_missed(relay: Any) -> None:
    r, clock, contacts, ari, ami, pusher = relay
    await r.accept("alice", "<sip:2000@pbx>", "across a restart")
    # the daemon restarts: a new relay on the same store, knowing nothing of the contact ...
    after = MessageRelay(r.settings, r.store, r.bindings, contacts, ari, ami, pusher, Metrics(), clock=clock)
    contacts.table[("alice", URI)] = 5310.0  # ... and the phone refreshes before its first poll
    await after._poll()
    assert [q["body"] for q in ari.sent] == ["across a restart"]


async def test_a_refresh_from_before_the_message_arrived_does_not_deliver_it(relay: Any) -> None:
    r, _clock, contacts, ari, _ami, _p = relay
    await r.accept("alice", "<sip:2000@pbx>", "first")
    contacts.table[("alice", URI)] = 5310.0
    await r._poll()
    assert [q["body"] for q in ari.sent] == ["first"]
    contacts.table[("alice", URI)] = 5320.0  # refreshed while nothing waited: awake then, maybe not now
    await r.accept("alice", "<sip:2000@pbx>", "second")
    await r._poll()
    assert [q["body"] for q in ari.sent] == ["first"]  # waits for a refresh after it arrived
    contacts.table[("alice", URI)] = 5330.0
    await r._poll()
    assert [q["body"] for q in ari.sent] == ["first", "second"]


class FlakyMessages(MemoryMessages):
    """The store is unreachable for the first ``failures`` reads of pending messages."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def pending(self, aor: str) -> list[StoredMessage]:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("redis: connection reset")
        return await super().pending(aor)


async def test_a_registration_seen_while_the_store_is_down_is_delivered_to_once_it_is_back() -> None:
    contacts = Contacts({("alice", URI): 5300.0, ("bob", BOB): 5300.0})
    ari, store = Ari(), MemoryStore()
    for aor, uri in (("alice", URI), ("bob", BOB)):
        await store.upsert(Binding(aor=aor, endpoint=aor, push=PushParams("fcm", f"tok-{aor}", "p"),
                                   contact_uri=uri, first_seen=1, last_seen=1))
    r = MessageRelay(MessageSettings(poll=0.01), FlakyMessages(0), store, contacts, ari, Ami(), Pusher(), Metrics())
    for aor in ("alice", "bob"):
        assert (await r.accept(aor, "<sip:2000@pbx>", f"for {aor}")).startswith("STORED")
    assert isinstance(r.store, FlakyMessages)
    r.store.failures = 1  # the round's first delivery fails: both registrations must survive it
    for b in (*await store.bindings_for("alice"), *await store.bindings_for("bob")):
        r.on_binding(b, True)
    stop = asyncio.Event()
    task = asyncio.create_task(r.run(stop))
    try:
        await wait_for(lambda: len(ari.sent) == 2, 5, "both messages sent")
    finally:
        stop.set()
        await task
    assert sorted(q["to"] for q in ari.sent) == sorted([f"pjsip:alice/{URI}", f"pjsip:bob/{BOB}"])


BOB = "sip:bob@127.0.0.1:5072;transport=udp;pn-provider=fcm;pn-prid=tok-bob;pn-param=p"

