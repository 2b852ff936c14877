"""The last hour of the daemon's counters, for the console's overview.

Prometheus counters only count up since start; "pushes in the last hour" is the difference
between now and a sample taken an hour ago. ``CounterHistory`` keeps one sample of the counters
it is asked about per ``interval`` (default a minute), at most ``window / interval + 1`` of them:
bounded memory, whatever the uptime. Pure: ``sample`` and ``window`` take the time, no task here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from prometheus_client import CollectorRegistry

Series = tuple[str, tuple[tuple[str, str], ...]]  # (metric, sorted labels)


def counter_values(registry: CollectorRegistry, names: Iterable[str]) -> dict[Series, float]:
    """Current value of every series of the counters ``names`` (family names, without _total)."""
    wanted = set(names)
    out: dict[Series, float] = {}
    for family in registry.collect():
        if family.name not in wanted:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                out[(family.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def gauge_value(registry: CollectorRegistry, name: str) -> float:
    """A label-less gauge's value (0 when absent)."""
    for family in registry.collect():
        if family.name == name:
            for sample in family.samples:
                if sample.name == name:
                    return float(sample.value)
    return 0.0


class CounterHistory:
    def __init__(self, registry: CollectorRegistry, names: Iterable[str], *, window: float = 3600.0,
                 interval: float = 60.0) -> None:
        self.registry = registry
        self.names = tuple(names)
        self.window = window
        self.interval = interval
        self._samples: deque[tuple[float, dict[Series, float]]] = deque(maxlen=int(window / interval) + 2)

    def sample(self, now: float) -> None:
        """Keep a sample if the last one is at least ``interval`` old (so calling often is cheap)."""
        if self._samples and now - self._samples[-1][0] < self.interval:
            return
        self._samples.append((now, counter_values(self.registry, self.names)))

    def window_delta(self, now: float) -> tuple[float, dict[Series, float]]:
        """(seconds covered, increase of each series over them): against the oldest sample that is
        at most ``window`` old, or the first one kept if the daemon is younger than that."""
        current = counter_values(self.registry, self.names)
        base_t, base = now, {}
        for t, values in self._samples:
            if now - t <= self.window + self.interval / 2:
                base_t, base = t, values
                break
        delta = {k: v - base.get(k, 0.0) for k, v in current.items()}
        return now - base_t, {k: v for k, v in delta.items() if v > 0}

    def __len__(self) -> int:
        return len(self._samples)
