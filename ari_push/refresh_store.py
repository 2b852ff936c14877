"""The registration-refresh schedule: one entry per push device whose contact is registered.

One shared schedule, no task per device (docs/reachability.md). Two implementations with the
same semantics, tested by one suite: ``RedisSchedule`` (a sorted set of due times plus a hash
of entries, changed only by Lua scripts, so several daemons share it) and ``MemorySchedule``
(the embedded store; rebuilt from Asterisk's contact list after a restart).

An entry (``Watch``) is due at ``expires - (1 - at_fraction) * lifetime`` while no refresh
push was sent for the current registration, then at ``expires + grace`` to judge whether the
phone re-registered. A daemon *claims* due entries: they move ``lease`` seconds into the
future, so a daemon that dies mid-way leaves them to another one, and no two daemons work
on one entry at once. Writes after a claim are conditional on the registration being the
one claimed (``expires`` unchanged): a re-registration seen meanwhile wins.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Protocol

import redis.asyncio as aioredis

from ari_push.bindings import StoreUnavailable
from ari_push.redis_keys import Keys

SAME_EXPIRY = 0.5  # Asterisk keeps expiration times in whole seconds


@dataclass(frozen=True, slots=True)
class Watch:
    """One device's registered contact as the scheduler knows it.

    ``pushed_at``: 0 while no refresh push went out for this registration; the push time once
    one was delivered; -1 when it was skipped (rate limited, failed, no credentials)."""

    aor: str
    device_id: str
    contact_uri: str
    expires: float
    lifetime: float
    pushed_at: float = 0.0

    @property
    def member(self) -> str:
        return f"{self.aor}\x00{self.device_id}"

    def due(self, at_fraction: float, grace: float) -> float:
        if self.pushed_at:
            return self.expires + grace
        return self.expires - (1.0 - at_fraction) * self.lifetime

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Watch:
        d = json.loads(text)
        return cls(aor=str(d["aor"]), device_id=str(d["device_id"]), contact_uri=str(d["contact_uri"]),
                   expires=float(d["expires"]), lifetime=float(d["lifetime"]), pushed_at=float(d["pushed_at"]))


class Seen(StrEnum):
    """What an observation of a contact meant to the schedule."""

    NEW = "new"  # first time this device is scheduled
    SAME = "same"  # the registration already known (nothing changed)
    OLDER = "older"  # an older contact of the device (expires sooner): ignored
    REFRESHED = "refreshed"  # re-registered on its own (no push was sent)
    REREGISTERED = "reregistered"  # re-registered after a refresh push: the push worked


class RefreshSchedule(Protocol):
    async def observe(self, watch: Watch, exact: bool) -> tuple[Seen, float]:
        """Merge a contact just read from Asterisk; returns what it meant and, for
        REREGISTERED, when the push had been sent. ``exact``: ``watch.lifetime`` is known
        (the registration was seen as it happened) rather than estimated."""
        ...

    async def claim(self, now: float, limit: int, lease: float) -> list[Watch]: ...

    async def put(self, watch: Watch, claimed_expires: float, due: float | None = None) -> bool:
        """Store ``watch`` and its due time (``due`` overrides it: a retry) if the entry still
        holds the registration that was claimed; False when a newer one was observed meanwhile."""
        ...

    async def drop(self, watch: Watch) -> bool: ...

    async def allow_push(self, device_id: str, interval: float, now: float) -> bool:
        """True at most once per ``interval`` seconds per device (across daemons)."""
        ...

    async def size(self) -> int: ...


def merge(old: Watch | None, new: Watch, exact: bool) -> tuple[Seen, Watch | None]:
    """The observe rule, shared by both implementations (the Lua script mirrors it)."""
    if old is None:
        return Seen.NEW, new
    if new.expires <= old.expires + SAME_EXPIRY:
        return (Seen.OLDER if new.expires < old.expires - SAME_EXPIRY else Seen.SAME), None
    lifetime = new.lifetime if exact else max(new.lifetime, old.lifetime)
    stored = replace(new, lifetime=lifetime, pushed_at=0.0)
    return (Seen.REREGISTERED if old.pushed_at > 0 else Seen.REFRESHED), stored


# ---------------------------------------------------------------- in process


class MemorySchedule:
    """The embedded schedule: a heap of (due, member) with lazy deletion."""

    def __init__(self, at_fraction: float, grace: float) -> None:
        self.at_fraction = at_fraction
        self.grace = grace
        self._watches: dict[str, Watch] = {}
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._sent: dict[str, float] = {}

    def _schedule(self, member: str, due: float) -> None:
        self._due[member] = due
        heapq.heappush(self._heap, (due, member))
        if len(self._heap) > 4 * len(self._due) + 1024:  # drop stale heap entries
            self._heap = [(d, m) for m, d in self._due.items()]
            heapq.heapify(self._heap)

    async def observe(self, watch: Watch, exact: bool) -> tuple[Seen, float]:
        old = self._watches.get(watch.member)
        seen, stored = merge(old, watch, exact)
        if stored is not None:
            self._watches[stored.member] = stored
            self._schedule(stored.member, stored.due(self.at_fraction, self.grace))
        return seen, (old.pushed_at if old is not None and seen is Seen.REREGISTERED else 0.0)

    async def claim(self, now: float, limit: int, lease: float) -> list[Watch]:
        out: list[Watch] = []
        while self._heap and self._heap[0][0] <= now and len(out) < limit:
            due, member = heapq.heappop(self._heap)
            if self._due.get(member) != due:
                continue  # rescheduled or dropped since
            self._schedule(member, now + lease)
            out.append(self._watches[member])
        return out

    async def put(self, watch: Watch, claimed_expires: float, due: float | None = None) -> bool:
        cur = self._watches.get(watch.member)
        if cur is None or abs(cur.expires - claimed_expires) > SAME_EXPIRY:
            return False
        self._watches[watch.member] = watch
        self._schedule(watch.member, watch.due(self.at_fraction, self.grace) if due is None else due)
        return True

    async def drop(self, watch: Watch) -> bool:
        cur = self._watches.get(watch.member)
        if cur is None or abs(cur.expires - watch.expires) > SAME_EXPIRY:
            return False
        del self._watches[watch.member]
        self._due.pop(watch.member, None)
        return True

    async def allow_push(self, device_id: str, interval: float, now: float) -> bool:
        if self._sent.get(device_id, float("-inf")) + interval > now:
            return False
        self._sent[device_id] = now
        if len(self._sent) > 2 * len(self._watches) + 1024:
            self._sent = {d: t for d, t in self._sent.items() if t + interval > now}
        return True

    async def size(self) -> int:
        return len(self._watches)


# ---------------------------------------------------------------- Redis

# KEYS: state hash, due zset. ARGV: member, new json, new expires, new lifetime, exact, at_fraction
_OBSERVE = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
local exp = tonumber(ARGV[3])
local life = tonumber(ARGV[4])
local seen = 'new'
local pushed = 0
if old then
  local o = cjson.decode(old)
  local oexp = tonumber(o.expires)
  if exp <= oexp + 0.5 then
    if exp < oexp - 0.5 then return {'older', '0'} end
    return {'same', '0'}
  end
  if ARGV[5] == '0' then life = math.max(life, tonumber(o.lifetime)) end
  pushed = tonumber(o.pushed_at)
  if pushed > 0 then seen = 'reregistered' else seen = 'refreshed' end
end
local n = cjson.decode(ARGV[2])
n.lifetime = life
n.pushed_at = 0
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(n))
redis.call('ZADD', KEYS[2], exp - (1 - tonumber(ARGV[6])) * life, ARGV[1])
if seen == 'reregistered' then return {seen, tostring(pushed)} end
return {seen, '0'}
"""

# ARGV: now, limit, lease score
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, m in ipairs(due) do
  local st = redis.call('HGET', KEYS[1], m)
  if st then
    redis.call('ZADD', KEYS[2], ARGV[3], m)
    table.insert(out, st)
  else
    redis.call('ZREM', KEYS[2], m)
  end
end
return out
"""

# ARGV: member, json, due, claimed expires
_PUT = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
if math.abs(tonumber(cjson.decode(cur).expires) - tonumber(ARGV[4])) > 0.5 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""

# ARGV: member, expires
_DROP = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
if math.abs(tonumber(cjson.decode(cur).expires) - tonumber(ARGV[2])) > 0.5 then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


class RedisSchedule:
    """The shared schedule (layout in docs/storage.md). Raises StoreUnavailable when Redis
    cannot be reached; the scheduler then retries on its next tick."""

    def __init__(self, client: aioredis.Redis, keys: Keys, at_fraction: float, grace: float) -> None:
        self.redis = client
        self.keys = keys
        self.at_fraction = at_fraction
        self.grace = grace
        self._keys = [keys.refresh_state(), keys.refresh_due()]
        self._observe = client.register_script(_OBSERVE)
        self._claim = client.register_script(_CLAIM)
        self._put = client.register_script(_PUT)
        self._drop = client.register_script(_DROP)

    async def observe(self, watch: Watch, exact: bool) -> tuple[Seen, float]:
        try:
            seen, pushed = await self._observe(keys=self._keys, args=[
                watch.member, watch.to_json(), repr(watch.expires), repr(watch.lifetime), "1" if exact else "0",
                repr(self.at_fraction)])
        except (aioredis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from None
        return Seen(_text(seen)), float(_text(pushed))

    async def claim(self, now: float, limit: int, lease: float) -> list[Watch]:
        try:
            raw = await self._claim(keys=self._keys, args=[repr(now), limit, repr(now + lease)])
        except (aioredis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from None
        return [Watch.from_json(r) for r in raw]

    async def put(self, watch: Watch, claimed_expires: float, due: float | None = None) -> bool:
        when = watch.due(self.at_fraction, self.grace) if due is None else due
        try:
            done = await self._put(keys=self._keys, args=[
                watch.member, watch.to_json(), repr(when), repr(claimed_expires)])
        except (aioredis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from None
        return bool(done)

    async def drop(self, watch: Watch) -> bool:
        try:
            done = await self._drop(keys=self._keys, args=[watch.member, repr(watch.expires)])
        except (aioredis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from None
        return bool(done)

    async def allow_push(self, device_id: str, interval: float, now: float = 0.0) -> bool:
        try:
            ok = await self.redis.set(self.keys.refresh_sent(device_id), "1", nx=True,
                                      px=max(1, int(interval * 1000)))
        except (aioredis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from None
        return bool(ok)

    async def size(self) -> int:
        try:
            return int(await self.redis.hlen(self.keys.refresh_state()))
        except (aioredis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from None


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
