"""Connection state shared by the AMI, ARI and Redis links: logged once per change, read by /readyz."""

from __future__ import annotations

import asyncio
import logging
import time
from enum import StrEnum

log = logging.getLogger("ari_push.links")


class State(StrEnum):
    DOWN = "down"
    UP = "up"


class LinkState:
    """Tracks one link. ``set`` logs only real transitions, so a dead peer retried every few
    seconds gives one 'down' line, not thousands."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = State.DOWN
        self.reason = "not connected yet"
        self.since = time.time()
        self.up_event = asyncio.Event()
        self.changes = 0

    @property
    def up(self) -> bool:
        return self.state is State.UP

    def set_up(self, detail: str = "") -> None:
        if self.state is not State.UP:
            self.state, self.reason, self.since = State.UP, "", time.time()
            self.changes += 1
            log.info("%s link up%s", self.name, f" ({detail})" if detail else "")
        self.up_event.set()

    def set_down(self, reason: str) -> None:
        self.up_event.clear()
        self.reason = reason
        if self.state is State.UP or self.changes == 0:
            log.warning("%s link down: %s", self.name, reason)
            self.state, self.since = State.DOWN, time.time()
            self.changes += 1

    async def wait_up(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self.up_event.wait()
        except TimeoutError:
            return False
        return True
