"""Capped exponential backoff with jitter (a floor of base/2, then uniform up to the cap), reset on success."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """``next()`` gives the next delay: uniform in [base/2, min(cap, base * 2**n)].

    The lower bound keeps a flapping peer from being hammered; the jitter keeps several
    daemons from reconnecting in lock-step after Asterisk or Redis restarts.
    """

    base: float = 0.5
    cap: float = 30.0
    attempts: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempts))
        self.attempts = min(self.attempts + 1, 32)
        return self.rng.uniform(min(self.base / 2, ceiling), ceiling)

    def reset(self) -> None:
        self.attempts = 0
