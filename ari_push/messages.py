"""SIP MESSAGE to a sleeping phone: store, push, deliver on re-REGISTER, expire with a status.

docs/reachability.md. Asterisk answers every MESSAGE 202 and reports ``MessageSend`` as
SUCCESS even into a sleeping phone's stale contact (measured), so the message context hands
each MESSAGE for an AOR to ari-push (``CURL()`` to ``POST /messages/<aor>`` on the daemon's
HTTP listener, see asterisk-conf/extensions.conf). ari-push:

* stores it (Redis, or in process), answers ``STORED <id>``, or ``NOT_PUSH`` when the AOR has
  no push device (the dialplan then sends it itself), or ``FULL``;
* pushes the AOR's devices (kind ``message``: the sender, and a preview only when
  ``[messages] preview`` allows it and the whole text fits; never a truncated text);
* delivers it with ARI ``endpoints/sendMessage`` to the exact fresh contact as soon as a device
  re-registers (a new contact is seen from AMI at once; a same-URI refresh by polling the
  contacts' expiration times every ``poll`` s while messages wait, against the expiration each
  contact had when the message was stored, kept with the message, so a daemon started after
  the message arrived still sees a refresh that happened before its first look);
* after ``ttl`` s drops it undelivered. Either way the final status (``DELIVERED``,
  ``EXPIRED``) is written to AstDB ``ari-push-message/<id>``, where dialplan reads it with
  ``${DB(ari-push-message/<id>)}``.

Each message is taken out of the store by one atomic delete before it is sent: two daemons,
or a restarted one, never deliver it twice; a restart loses none (they wait in Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Protocol

import redis.asyncio as aioredis

from ari_push.ami_frames import AmiMessage
from ari_push.ari import AriError
from ari_push.bindings import BindingStore, StoreUnavailable
from ari_push.health import HttpRequest, HttpResponse, RouteHandler
from ari_push.metrics import Metrics
from ari_push.model import Binding, PushKind, PushMessage, PushResult
from ari_push.redis_keys import Keys
from ari_push.settings import MessageSettings

log = logging.getLogger("ari_push.messages")

ASTDB_FAMILY = "ari-push-message"
MAX_PER_AOR = 100
MAX_FRESH = 10_000  # registrations waiting for a delivery round (only grows while the store is down)
AOR_RE = re.compile(r"[A-Za-z0-9_.+\-]{1,64}")


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: str
    aor: str
    sender: str  # the From header as Asterisk gives it (MESSAGE(from))
    body: str
    received_at: float
    expires_at: float
    #: (contact URI, its expiration when the message was stored; 0 = not registered then), for
    #: each device of the AOR: a same-URI refresh is a later expiration than this
    seen: tuple[tuple[str, float], ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> StoredMessage:
        d = json.loads(text)
        seen = tuple((str(uri), float(exp)) for uri, exp in d.get("seen") or ())  # absent: stored before
        return cls(str(d["id"]), str(d["aor"]), str(d["sender"]), str(d["body"]), float(d["received_at"]),
                   float(d["expires_at"]), seen)

    def seen_expiration(self, uri: str) -> float | None:
        """The contact's expiration when this message was stored, if it was looked up then."""
        return next((exp for u, exp in self.seen if u == uri), None)


def sender_parts(sender: str) -> tuple[str, str]:
    """(display name, user) of a From value such as ``"Bob" <sip:2000@pbx>``."""
    name = ""
    m = re.match(r'\s*"([^"]*)"', sender)
    if m:
        name = m.group(1)
    user = re.search(r"sips?:([^@;>]+)", sender)
    return name[:64], (user.group(1) if user else sender.strip("<> "))[:64]


class MessageStore(Protocol):
    async def add(self, msg: StoredMessage, limit: int) -> bool: ...

    async def pending(self, aor: str) -> list[StoredMessage]: ...

    async def aors(self) -> list[str]: ...

    async def take(self, msg: StoredMessage) -> bool:
        """Remove the message; True for exactly one caller (who then delivers or expires it)."""
        ...

    async def expired(self, now: float, limit: int) -> list[StoredMessage]: ...


class MemoryMessages:
    def __init__(self) -> None:
        self._by_aor: dict[str, dict[str, StoredMessage]] = {}

    async def add(self, msg: StoredMessage, limit: int) -> bool:
        box = self._by_aor.setdefault(msg.aor, {})
        if len(box) >= limit:
            return False
        box[msg.id] = msg
        return True

    async def pending(self, aor: str) -> list[StoredMessage]:
        return sorted(self._by_aor.get(aor, {}).values(), key=lambda m: m.received_at)

    async def aors(self) -> list[str]:
        return [a for a, box in self._by_aor.items() if box]

    async def take(self, msg: StoredMessage) -> bool:
        return self._by_aor.get(msg.aor, {}).pop(msg.id, None) is not None

    async def expired(self, now: float, limit: int) -> list[StoredMessage]:
        out = [m for box in self._by_aor.values() for m in box.values() if m.expires_at <= now]
        return sorted(out, key=lambda m: m.expires_at)[:limit]


_ADD = """
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
return 1
"""


class RedisMessages:
    """HASH per AOR (id -> JSON) plus one ZSET of ``aor\\0id`` by expiry (docs/storage.md)."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self._add = client.register_script(_ADD)

    async def add(self, msg: StoredMessage, limit: int) -> bool:
        try:
            ok = await self._add(keys=[self.keys.messages(msg.aor), self.keys.messages_expiry()],
                                 args=[msg.id, msg.to_json(), limit, repr(msg.expires_at), f"{msg.aor}\x00{msg.id}"])
        except (aioredis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from None
        return bool(ok)

    async def pending(self, aor: str) -> list[StoredMessage]:
        try:
            raw = await self.redis.hvals(self.keys.messages(aor))
        except (aioredis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from None
        return sorted((StoredMessage.from_json(r) for r in raw), key=lambda m: m.received_at)

    async def aors(self) -> list[str]:
        try:
            members = await self.redis.zrange(self.keys.messages_expiry(), 0, -1)
        except (aioredis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from None
        return sorted({_text(m).partition("\x00")[0] for m in members if isinstance(m, bytes | str)})

    async def take(self, msg: StoredMessage) -> bool:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hdel(self.keys.messages(msg.aor), msg.id)
                pipe.zrem(self.keys.messages_expiry(), f"{msg.aor}\x00{msg.id}")
                gone, _ = await pipe.execute()
        except (aioredis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from None
        return bool(gone)

    async def expired(self, now: float, limit: int) -> list[StoredMessage]:
        try:
            members = await self.redis.zrangebyscore(self.keys.messages_expiry(), "-inf", repr(now), start=0,
                                                     num=limit)
            out = []
            for member in members:
                if not isinstance(member, bytes | str):
                    continue
                aor, _, mid = _text(member).partition("\x00")
                raw = await self.redis.hget(self.keys.messages(aor), mid)
                if raw is None:
                    await self.redis.zrem(self.keys.messages_expiry(), member)
                    continue
                out.append(StoredMessage.from_json(raw))
        except (aioredis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from None
        return out


class ContactReader(Protocol):
    async def expiration(self, aor: str, uri: str) -> float | None: ...


class Ari(Protocol):
    async def call(self, operation: str, path_params: dict[str, str] | None = None,
                   query: dict[str, str] | None = None) -> object: ...


class Ami(Protocol):
    async def action(self, name: str, **params: str) -> AmiMessage: ...


class Pusher(Protocol):
    async def send_many(self, bindings: Iterable[Binding], message: PushMessage) -> dict[str, PushResult]: ...


class MessageRelay:
    def __init__(self, settings: MessageSettings, store: MessageStore, bindings: BindingStore, contacts: ContactReader,
                 ari: Ari, ami: Ami, pusher: Pusher, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.bindings = bindings
        self.contacts = contacts
        self.ari = ari
        self.ami = ami
        self.pusher = pusher
        self.metrics = metrics
        self.clock = clock
        self._seen: dict[tuple[str, str], float] = {}  # (aor, uri) -> expiration when the message waited
        self._wake = asyncio.Event()
        self._fresh: deque[tuple[Binding, float]] = deque(maxlen=MAX_FRESH)  # the oldest go first
        self.delivery_after_register: list[float] = []  # seconds, for the benchmark (last 1000)

    # ---------------------------------------------------------------- input (the dialplan's CURL)

    def routes(self) -> list[tuple[str, str, RouteHandler]]:
        return [("POST", "/messages/{aor}", self.http_post)]

    async def http_post(self, request: HttpRequest) -> HttpResponse:
        """The dialplan's ``CURL(<url>/messages/<aor>,from=...&body=...)`` (form-encoded)."""
        aor = request.params.get("aor", "")
        if not AOR_RE.fullmatch(aor):
            return HttpResponse(400, "ERROR bad aor")
        if len(request.body) > self.settings.max_bytes * 3 + 4096:
            return HttpResponse(413, "ERROR too large")
        try:
            form = urllib.parse.parse_qs(request.body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            return HttpResponse(400, "ERROR body is not UTF-8")
        sender, body = (form.get("from") or [""])[0], (form.get("body") or [""])[0]
        if len(body.encode()) > self.settings.max_bytes:
            return HttpResponse(413, "ERROR too large")
        if not body:
            # Asterisk reads MESSAGE(body) into ~1 KB: a longer text reaches us empty (measured).
            # Refuse it, so the dialplan sends it itself rather than ari-push storing nothing.
            self.metrics.messages.labels("empty").inc()
            return HttpResponse(200, "ERROR empty body")
        try:
            status = await self.accept(aor, sender, body)
        except StoreUnavailable as exc:
            log.warning("messages: cannot store a message for %s: %s", aor, exc)
            status = "ERROR store unavailable"
        return HttpResponse(200, status)

    async def accept(self, aor: str, sender: str, body: str) -> str:
        devices = await self.bindings.bindings_for(aor)
        if not devices:
            self.metrics.messages.labels("not-push").inc()
            return "NOT_PUSH"
        seen = await self._snapshot(aor, devices)
        now = self.clock()
        msg = StoredMessage(uuid.uuid4().hex[:16], aor, sender[:256], body, now, now + self.settings.ttl, seen)
        if not await self.store.add(msg, MAX_PER_AOR):
            self.metrics.messages.labels("full").inc()
            return "FULL"
        self.metrics.messages.labels("stored").inc()
        await self._push(msg, devices)
        self._wake.set()
        return f"STORED {msg.id}"

    async def _snapshot(self, aor: str, devices: list[Binding]) -> tuple[tuple[str, float], ...]:
        """The expiration of each device's contact now, stored with the message: what a later
        refresh of the same URI is told apart by, on this daemon or on one started later."""
        seen: list[tuple[str, float]] = []
        for b in devices:
            try:
                exp = await self.contacts.expiration(aor, b.contact_uri) or 0.0
            except AriError:
                continue  # unknown: the first poll's look is this contact's baseline
            seen.append((b.contact_uri, exp))
            self._seen.setdefault((aor, b.contact_uri), exp)
        return tuple(seen)

    async def _push(self, msg: StoredMessage, devices: list[Binding]) -> None:
        name, user = sender_parts(msg.sender)
        extra: list[tuple[str, str]] = [("message_id", msg.id)]
        if self.settings.preview and len(msg.body) <= self.settings.preview_chars:
            extra.append(("preview", msg.body))  # the whole text or nothing: never a cut one
        push = PushMessage(kind=PushKind.MESSAGE, call_id=f"message-{msg.id}", caller_number=user, caller_name=name,
                           callee=msg.aor, deadline=msg.expires_at, extra=tuple(extra))
        results = await self.pusher.send_many(devices, push)
        for result in results.values():
            self.metrics.message_pushes.labels(str(result.outcome)).inc()

    # ---------------------------------------------------------------- re-registration

    def on_binding(self, binding: Binding, fresh: bool) -> None:
        """Capture's callback: a device registered a (new) contact: deliver what waits for it."""
        if fresh:
            self._fresh.append((binding, self.clock()))
            self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()  # before the round: a registration during it wakes the next at once
            await self.round()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll):
                    await self._wake.wait()
            if stop.is_set():
                break

    async def round(self) -> None:
        """Deliver to the registrations seen since the last round, poll, expire. A registration
        whose delivery failed (store or ARI down) is kept for the next round, with those after it."""
        fresh, self._fresh = self._fresh, deque(maxlen=MAX_FRESH)
        try:
            while fresh:
                binding, at = fresh[0]
                await self.deliver(binding.aor, binding.endpoint, binding.contact_uri, at)
                fresh.popleft()
            await self._poll()
            await self._expire()
        except (StoreUnavailable, AriError) as exc:
            log.debug("messages: %s", exc)
        except Exception:
            log.exception("messages: delivery round failed")
        finally:
            if fresh:
                self._fresh = deque([*fresh, *self._fresh], maxlen=MAX_FRESH)

    async def _poll(self) -> None:
        """Same-URI refreshes give no event: look at the expiration of the contacts of AORs
        that have messages waiting. A message waits for a later expiration than its contact had
        when it was stored (kept with it, so it holds after a restart); a contact the message
        did not look at (stored by an older version, or the device's contact changed since) is
        compared with this daemon's first look at it."""
        for aor in await self.store.aors():
            pending = await self.store.pending(aor)
            for b in await self.bindings.bindings_for(aor):
                exp = await self.contacts.expiration(aor, b.contact_uri)
                key = (aor, b.contact_uri)
                if key not in self._seen:
                    self._seen[key] = exp or 0.0  # first look (e.g. after a restart)
                    if all(m.seen_expiration(b.contact_uri) is None for m in pending):
                        continue  # the baseline: nothing to compare with yet
                if exp is None:
                    continue
                due = [m for m in pending if exp > _baseline(m, b.contact_uri, self._seen[key]) + 0.5]
                if due:
                    self._seen[key] = max(self._seen[key], exp)
                    await self.deliver(aor, b.endpoint, b.contact_uri, self.clock(), due)
                    pending = [m for m in pending if m not in due]
        if len(self._seen) > 10_000:
            self._seen.clear()

    async def deliver(self, aor: str, endpoint: str, uri: str, registered_at: float,
                      messages: list[StoredMessage] | None = None) -> int:
        """Send the messages waiting for the AOR (or those of ``messages``) to this fresh contact;
        returns how many."""
        sent = 0
        waiting = await self.store.pending(aor) if messages is None else messages
        if waiting:
            log.debug("messages: delivering %d for %s to %s", len(waiting), aor, uri)
        for msg in waiting:
            if not await self.store.take(msg):
                continue  # another daemon has it
            try:
                await self.ari.call("send_message", query={"to": f"pjsip:{endpoint or aor}/{uri}",
                                                           "from": msg.sender or f"sip:{aor}", "body": msg.body})
            except AriError as exc:
                log.warning("messages: delivering %s to %s failed (%s); put back", msg.id, aor, exc)
                await self.store.add(msg, MAX_PER_AOR + 1)
                continue
            sent += 1
            self.metrics.messages.labels("delivered").inc()
            self.delivery_after_register = [*self.delivery_after_register[-999:], self.clock() - registered_at]
            await self._status(msg.id, "DELIVERED")
        return sent

    async def _expire(self) -> None:
        for msg in await self.store.expired(self.clock(), 100):
            if await self.store.take(msg):
                self.metrics.messages.labels("expired").inc()
                log.info("messages: %s for %s expired undelivered", msg.id, msg.aor)
                await self._status(msg.id, "EXPIRED")

    async def _status(self, message_id: str, status: str) -> None:
        try:
            await self.ami.action("DBPut", Family=ASTDB_FAMILY, Key=message_id, Val=status)
        except Exception as exc:  # the status is a courtesy: never lose the delivery over it
            log.warning("messages: could not record %s for %s in AstDB: %s", status, message_id, exc)


def _baseline(msg: StoredMessage, uri: str, first_look: float) -> float:
    seen = msg.seen_expiration(uri)
    return first_look if seen is None else seen


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def build_messages(settings: MessageSettings, client: aioredis.Redis | None, keys: Keys, bindings: BindingStore,
                   contacts: ContactReader, ari: Ari, ami: Ami, pusher: Pusher,
                   metrics: Metrics) -> MessageRelay | None:
    """The relay the composition root runs, or None when it is off."""
    if not settings.enabled:
        return None
    store: MessageStore = MemoryMessages() if client is None else RedisMessages(client, keys)
    return MessageRelay(settings, store, bindings, contacts, ari, ami, pusher, metrics)
