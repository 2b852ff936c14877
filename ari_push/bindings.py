"""Where device bindings live: Redis (clusters) or in process (a single small PBX).

Both stores have the same semantics, tested by one shared suite:
- ``upsert`` is idempotent and order-tolerant: the newest ``last_seen`` wins, ``first_seen``
  is kept from the first sighting; several daemons may store the same event. Times are clamped
  to the store's clock (the capture time): a ``last_seen`` in the future (a daemon with a wrong
  clock, a restored dump) can neither shadow later upserts nor escape the retention sweep.
- ``upsert_capped`` also keeps at most ``max_devices`` devices per AOR: beyond that, the least
  recently seen device goes (never the one just written). Without a cap, anyone who can REGISTER
  could create a device per fresh push URL and make every call push all of them.
- A binding outlives its SIP registration; only ``forget``, ``forget_if_stale`` (a provider
  said the token is dead, and the device has not registered since) and the retention sweep
  delete it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis.asyncio as aioredis

from ari_push.model import Binding, Dialect, PushParams
from ari_push.redis_keys import Keys


class StoreUnavailable(RuntimeError):
    """The store cannot be reached (Redis down); callers degrade, nothing is lost silently."""


#: How far ahead of this daemon's clock a stored time may be before it counts as wrong
#: (daemons on several hosts: their clocks differ a little).
CLOCK_SKEW = 60.0


class BindingStore(Protocol):
    async def upsert(self, binding: Binding) -> Binding: ...

    async def upsert_capped(self, binding: Binding, max_devices: int) -> tuple[Binding, list[str]]:
        """Upsert, then drop the AOR's least recently seen devices beyond ``max_devices`` (0: no
        cap). Returns the stored binding and the device ids dropped."""
        ...

    async def bindings_for(self, aor: str) -> list[Binding]: ...

    async def aors(self) -> list[str]: ...

    async def forget(self, aor: str, device_id: str | None = None) -> int: ...

    async def forget_if_stale(self, aor: str, device_id: str, dead_since: float) -> bool: ...

    async def sweep(self, older_than: float) -> int: ...


# ---------------------------------------------------------------- (de)serialisation


def to_json(b: Binding) -> str:
    p = b.push
    return json.dumps(
        {
            "aor": b.aor,
            "endpoint": b.endpoint,
            "contact_uri": b.contact_uri,
            "user_agent": b.user_agent,
            # milliseconds: Redis' cjson re-encodes numbers with 14 significant digits
            "first_seen": round(b.first_seen, 3),
            "last_seen": round(b.last_seen, 3),
            "provider": p.provider,
            "token": p.token,
            "param": p.param,
            "sandbox": p.sandbox,
            "dialect": p.dialect.value,
            "purr": p.purr,
            "extra_tokens": [list(t) for t in p.extra_tokens],
            "options": [list(o) for o in p.options],
        },
        separators=(",", ":"),
    )


def _pairs(value: Any) -> tuple[tuple[str, str], ...]:
    # Lua's cjson writes an empty list as {}: treat any empty container as no pairs.
    if not value:
        return ()
    return tuple((str(a), str(b)) for a, b in value)


def from_json(text: str | bytes) -> Binding:
    d = json.loads(text)
    push = PushParams(
        provider=d["provider"],
        token=d["token"],
        param=d.get("param", ""),
        sandbox=bool(d.get("sandbox", False)),
        dialect=Dialect(d.get("dialect", "rfc8599")),
        purr=d.get("purr", ""),
        extra_tokens=_pairs(d.get("extra_tokens")),
        options=_pairs(d.get("options")),
    )
    return Binding(
        aor=d["aor"],
        endpoint=d.get("endpoint", d["aor"]),
        push=push,
        contact_uri=d.get("contact_uri", ""),
        user_agent=d.get("user_agent", ""),
        first_seen=float(d.get("first_seen", 0)),
        last_seen=float(d.get("last_seen", 0)),
    )


# ---------------------------------------------------------------- in process


class MemoryStore:
    """The embedded store: same semantics as Redis, lost on restart (docs/storage.md)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._data: dict[str, dict[str, Binding]] = {}
        self.clock = clock

    async def upsert(self, binding: Binding) -> Binding:
        return (await self.upsert_capped(binding, 0))[0]

    async def upsert_capped(self, binding: Binding, max_devices: int) -> tuple[Binding, list[str]]:
        now = self.clock()
        binding = _clamped(binding, now)
        devices = self._data.setdefault(binding.aor, {})
        old = devices.get(binding.device_id)
        if old is not None:
            if min(old.last_seen, now) > binding.last_seen:
                return old, []
            binding = Binding(**{**_fields(binding), "first_seen": min(old.first_seen, binding.first_seen),
                                 "user_agent": binding.user_agent or old.user_agent})
        devices[binding.device_id] = binding
        evicted: list[str] = []
        if max_devices and len(devices) > max_devices:
            others = sorted((b for d, b in devices.items() if d != binding.device_id),
                            key=lambda b: (min(b.last_seen, now), b.device_id))
            for gone in others[: len(devices) - max_devices]:
                del devices[gone.device_id]
                evicted.append(gone.device_id)
        return binding, evicted

    async def bindings_for(self, aor: str) -> list[Binding]:
        return sorted(self._data.get(aor, {}).values(), key=lambda b: b.first_seen)

    async def aors(self) -> list[str]:
        return sorted(aor for aor, devices in self._data.items() if devices)

    async def forget(self, aor: str, device_id: str | None = None) -> int:
        devices = self._data.get(aor, {})
        if device_id is None:
            n = len(devices)
            devices.clear()
            return n
        return 1 if devices.pop(device_id, None) is not None else 0

    async def forget_if_stale(self, aor: str, device_id: str, dead_since: float) -> bool:
        current = self._data.get(aor, {}).get(device_id)
        if current is None or current.last_seen > dead_since:
            return False
        del self._data[aor][device_id]
        return True

    async def sweep(self, older_than: float) -> int:
        n = 0
        now = self.clock()
        for devices in self._data.values():
            for device_id, b in list(devices.items()):
                if b.last_seen > now + CLOCK_SKEW:  # from the future: it ages from now on
                    devices[device_id] = _clamped(b, now)
            for device_id in [d for d, b in devices.items() if b.last_seen < older_than]:
                del devices[device_id]
                n += 1
        return n


def _clamped(b: Binding, now: float) -> Binding:
    """``b`` with its times no later than ``now`` (the capture time)."""
    if b.last_seen <= now and b.first_seen <= now:
        return b
    last = min(b.last_seen, now)
    return Binding(**{**_fields(b), "last_seen": last, "first_seen": min(b.first_seen, last)})


def _fields(b: Binding) -> dict[str, Any]:
    return {f: getattr(b, f) for f in ("aor", "endpoint", "push", "contact_uri", "user_agent",
                                        "first_seen", "last_seen")}


# ---------------------------------------------------------------- Redis

# KEYS: the AOR's bindings hash (one key: the script stays on one cluster slot). ARGV: device id,
# JSON, last_seen, expire seconds, now (the capture time: stored times are clamped to it; default
# last_seen), max devices (0 or absent: no cap). Returns the stored JSON, or, when devices were
# evicted, {stored JSON, evicted device id, ...} (the caller drops them from the seen index).
_UPSERT = """
local now = tonumber(ARGV[5]) or tonumber(ARGV[3])
local old = redis.call('HGET', KEYS[1], ARGV[1])
local new = ARGV[2]
if old then
  local o = cjson.decode(old)
  if math.min(tonumber(o.last_seen), now) > tonumber(ARGV[3]) then return old end
  local n = cjson.decode(new)
  n.first_seen = math.min(tonumber(o.first_seen), tonumber(n.first_seen))
  if n.user_agent == '' then n.user_agent = o.user_agent end
  new = cjson.encode(n)
end
redis.call('HSET', KEYS[1], ARGV[1], new)
redis.call('EXPIRE', KEYS[1], ARGV[4])
local out = {new}
local cap = tonumber(ARGV[6]) or 0
if cap > 0 and redis.call('HLEN', KEYS[1]) > cap then
  local all = redis.call('HGETALL', KEYS[1])
  local others = {}
  for i = 1, #all, 2 do
    if all[i] ~= ARGV[1] then
      local seen = tonumber(cjson.decode(all[i + 1]).last_seen) or 0
      table.insert(others, {math.min(seen, now), all[i]})
    end
  end
  table.sort(others, function(a, b) if a[1] == b[1] then return a[2] < b[2] end return a[1] < b[1] end)
  for i = 1, (#others + 1) - cap do
    redis.call('HDEL', KEYS[1], others[i][2])
    table.insert(out, others[i][2])
  end
end
if #out == 1 then return new end
return out
"""

# A binding whose last_seen is in the future ages from now on: KEYS bindings hash, seen index;
# ARGV device id, now, member.
_CLAMP = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then redis.call('ZREM', KEYS[2], ARGV[3]) return 0 end
local o = cjson.decode(old)
local now = tonumber(ARGV[2])
if tonumber(o.last_seen) > now then o.last_seen = now end
if tonumber(o.first_seen) > now then o.first_seen = now end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(o))
redis.call('ZADD', KEYS[2], now, ARGV[3])
return 1
"""

_FORGET_IF_OLDER = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return -1 end
if tonumber(cjson.decode(old).last_seen) > tonumber(ARGV[2]) then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""


class RedisStore:
    """Bindings in Redis (layout in docs/storage.md). Raises StoreUnavailable when Redis is
    unreachable; every call is bounded by the client's socket timeout."""

    def __init__(self, client: aioredis.Redis, keys: Keys, retention: float, wait_replicas: int = 0,
                 wait_timeout: float = 0.1, clock: Callable[[], float] = time.time) -> None:
        self.redis = client
        self.clock = clock
        self.keys = keys
        self.retention = retention
        self.wait_replicas = wait_replicas
        self.wait_ms = max(1, int(wait_timeout * 1000))
        # Written on the master but not (yet) on a replica: a fail-over now would lose them, so
        # they are written again (idempotently) until a replica confirms. Bounded.
        self.unconfirmed: dict[tuple[str, str], Binding] = {}
        self._upsert = client.register_script(_UPSERT)
        self._clamp = client.register_script(_CLAMP)
        self._forget_if_older = client.register_script(_FORGET_IF_OLDER)

    async def upsert(self, binding: Binding) -> Binding:
        return (await self.upsert_capped(binding, 0))[0]

    async def upsert_capped(self, binding: Binding, max_devices: int) -> tuple[Binding, list[str]]:
        now = self.clock()
        binding = _clamped(binding, now)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                await self._upsert(
                    keys=[self.keys.bindings(binding.aor)],
                    args=[binding.device_id, to_json(binding), repr(binding.last_seen), int(self.retention) + 60,
                          repr(now), max(0, int(max_devices))],
                    client=pipe,
                )
                pipe.zadd(self.keys.seen(), {_member(binding.aor, binding.device_id): binding.last_seen}, gt=True)
                if self.wait_replicas:
                    pipe.wait(self.wait_replicas, self.wait_ms)
                replies = await pipe.execute()
        except (aioredis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from None
        key = (binding.aor, binding.device_id)
        if self.wait_replicas and int(replies[2]) < self.wait_replicas:
            if len(self.unconfirmed) < 10_000:
                self.unconfirmed[key] = binding
        else:
            self.unconfirmed.pop(key, None)
        if isinstance(replies[0], list):
            stored, *gone = replies[0]
            evicted = [_text(d) for d in gone]
            # the index only steers the sweep: a failure here leaves entries it skips later
            with contextlib.suppress(aioredis.RedisError, OSError):
                await self.redis.zrem(self.keys.seen(), *[_member(binding.aor, d) for d in evicted])
        else:
            stored, evicted = replies[0], []
        return from_json(stored), evicted

    async def confirm(self) -> int:
        """Write the unconfirmed bindings again (after a fail-over they may be gone from the new
        master); returns how many are still unconfirmed. Called every second by the daemon."""
        for binding in list(self.unconfirmed.values()):
            try:
                await self.upsert(binding)
            except StoreUnavailable:
                break
        return len(self.unconfirmed)

    async def bindings_for(self, aor: str) -> list[Binding]:
        try:
            raw = await self.redis.hgetall(self.keys.bindings(aor))
        except (aioredis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from None
        return sorted((from_json(v) for v in raw.values()), key=lambda b: b.first_seen)

    async def aors(self) -> list[str]:
        try:
            members = await self.redis.zrange(self.keys.seen(), 0, -1)
        except (aioredis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from None
        return sorted({_split(m)[0] for m in members if isinstance(m, bytes | str)})

    async def forget(self, aor: str, device_id: str | None = None) -> int:
        key = self.keys.bindings(aor)
        try:
            ids = [device_id] if device_id else [_text(k) for k in await self.redis.hkeys(key)]
            if not ids:
                return 0
            n = int(await self.redis.hdel(key, *ids))
            await self.redis.zrem(self.keys.seen(), *[_member(aor, d) for d in ids])
        except (aioredis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from None
        return n

    async def forget_if_stale(self, aor: str, device_id: str, dead_since: float) -> bool:
        try:
            gone = await self._forget_if_older(keys=[self.keys.bindings(aor)], args=[device_id, repr(dead_since)])
            if gone != 0:
                await self.redis.zrem(self.keys.seen(), _member(aor, device_id))
        except (aioredis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from None
        return bool(gone == 1)

    async def sweep(self, older_than: float) -> int:
        """Delete bindings not seen since ``older_than``. Safe to run on every daemon at once."""
        n = 0
        now = self.clock()
        try:
            future = await self.redis.zrangebyscore(self.keys.seen(), f"({now + CLOCK_SKEW!r}", "+inf", start=0,
                                                    num=1000)
            for member in future:
                if isinstance(member, bytes | str):
                    aor, device_id = _split(member)
                    await self._clamp(keys=[self.keys.bindings(aor), self.keys.seen()],
                                      args=[device_id, repr(now), _text(member)])
            members = await self.redis.zrangebyscore(self.keys.seen(), "-inf", f"({older_than!r}", start=0, num=1000)
            for member in members:
                if not isinstance(member, bytes | str):
                    continue
                aor, device_id = _split(member)
                gone = await self._forget_if_older(keys=[self.keys.bindings(aor)], args=[device_id, repr(older_than)])
                if gone != 0:  # deleted now, or already gone (hash expired): drop the index entry
                    await self.redis.zrem(self.keys.seen(), member)
                n += gone == 1
        except (aioredis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from None
        return n


def _member(aor: str, device_id: str) -> str:
    return f"{aor}\x00{device_id}"


def _text(value: bytes | str) -> str:
    return value if isinstance(value, str) else value.decode()


def _split(member: bytes | str) -> tuple[str, str]:
    text = _text(member)
    aor, _, device_id = text.partition("\x00")
    return aor, device_id
