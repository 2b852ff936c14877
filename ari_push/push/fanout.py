"""Bounds on pushes in flight: per call and per provider host (docs/security.md, "Fan-out").

A call pushes every device of its AOR at once. Without a bound, one AOR with a thousand
bindings puts a thousand requests into one HTTP pool at once, and the pool's bookkeeping costs
grow with the square of the queue (measured: 14 s of event-loop stall for ~1000 vendor URLs).
Here a call has at most ``per_call`` pushes on the wire, and one provider host at most
``per_host`` (``per_url_host`` for URL-addressed devices such as Zoiper's, whose HTTP/1.1 pool
per host is that small), across all calls. The rest wait on an asyncio semaphore, which costs
O(1) per wake-up. Waiting for a slot counts against the push attempt's own time bound.

Pure asyncio, no I/O; the dispatcher calls :meth:`Fanout.call_slots` once per fan-out and
:meth:`Fanout.host_slot` around each provider call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from ari_push.model import Binding

if TYPE_CHECKING:
    from ari_push.settings import Settings

T = TypeVar("T")


class _Slot:
    __slots__ = ("active", "semaphore", "users")

    def __init__(self, limit: int) -> None:
        self.semaphore = asyncio.Semaphore(limit)
        self.users = 0  # holders plus waiters: the slot is dropped when it falls to 0
        self.active = 0  # holders


class Fanout:
    def __init__(self, per_call: int = 16, per_host: int = 100, per_url_host: int = 8) -> None:
        if min(per_call, per_host, per_url_host) < 1:
            raise ValueError("fan-out limits must be at least 1")
        self.per_call = per_call
        self.per_host = per_host
        self.per_url_host = per_url_host
        self._hosts: dict[str, _Slot] = {}
        self.peak_in_flight: dict[str, int] = {}  # per host key, for tests and the benchmark

    @classmethod
    def from_settings(cls, settings: Settings) -> Fanout:
        return cls(settings.push.max_in_flight_per_call, settings.push.max_in_flight_per_host,
                   min(settings.push.max_in_flight_per_host, settings.vendor.max_connections_per_host))

    @staticmethod
    def host_key(provider_name: str, binding: Binding) -> str:
        """What one pool serves: a URL-addressed device's host and port, else the provider."""
        token = binding.push.token
        if "://" in token[:16]:
            try:
                parts = urlsplit(token)
                return f"{provider_name}:{(parts.hostname or '?').lower()}:{parts.port or parts.scheme}"
            except ValueError:
                return f"{provider_name}:?"
        return provider_name

    def call_slots(self) -> asyncio.Semaphore:
        """A fresh bound for one call's fan-out."""
        return asyncio.Semaphore(self.per_call)

    @staticmethod
    async def bounded(slots: asyncio.Semaphore, work: Callable[[], Awaitable[T]]) -> T:
        """``work()`` once a slot of this fan-out is free (the coroutine is made only then)."""
        async with slots:
            return await work()

    @contextlib.asynccontextmanager
    async def host_slot(self, provider_name: str, binding: Binding) -> AsyncIterator[None]:
        key = self.host_key(provider_name, binding)
        slot = self._hosts.get(key)
        if slot is None:
            slot = self._hosts[key] = _Slot(self.per_url_host if ":" in key else self.per_host)
        slot.users += 1
        try:
            async with slot.semaphore:
                slot.active += 1
                try:
                    if slot.active > self.peak_in_flight.get(key, 0):
                        self.peak_in_flight[key] = slot.active
                    yield
                finally:
                    slot.active -= 1
        finally:
            slot.users -= 1
            if slot.users == 0 and self._hosts.get(key) is slot:
                del self._hosts[key]
