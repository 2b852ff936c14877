"""A bounded map that forgets its least recently written entries: the per-daemon memories of
what was seen lately (devices answering on an old contact, qualify states, captures, User-Agents)."""

from __future__ import annotations

from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class RecentMap(Generic[K, V]):
    """At most ``limit`` entries; writing one makes it the newest, and the oldest go first."""

    def __init__(self, limit: int) -> None:
        self._items: dict[K, V] = {}
        self._limit = limit

    def put(self, key: K, value: V) -> None:
        self._items.pop(key, None)
        self._items[key] = value
        while len(self._items) > self._limit:
            del self._items[next(iter(self._items))]

    def get(self, key: K) -> V | None:
        return self._items.get(key)

    def pop(self, key: K) -> V | None:
        return self._items.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
