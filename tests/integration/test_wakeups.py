"""The registered signal between daemons over a real Redis, and the GAP after an outage."""

from __future__ import annotations

import asyncio
import uuid

from ari_push.redis_keys import Keys
from ari_push.service import make_redis
from ari_push.settings import RedisSettings
from ari_push.wakeups import GAP, RedisWakeups, Registration, Watch
from rig.redis import RedisServer


async def test_a_registration_seen_by_one_daemon_wakes_a_call_on_another() -> None:
    server = RedisServer()
    server.start()
    keys = Keys(f"t-{uuid.uuid4().hex[:6]}:")
    a_client, b_client = make_redis(RedisSettings(url=server.url)), make_redis(RedisSettings(url=server.url))
    a, b = RedisWakeups(a_client, keys, "node-a"), RedisWakeups(b_client, keys, "node-b")
    stop = asyncio.Event()
    tasks = [asyncio.create_task(a.run(stop)), asyncio.create_task(b.run(stop))]
    try:
        with b.watch("1001") as watch, a.watch("1001") as own:
            first = Registration("1001", "sip:1001@127.0.0.1:5000", "dev1", 1.0, "node-a")
            got = await published_until_received(a, first, watch)  # both subscriptions are in place
            assert got.contact_uri == "sip:1001@127.0.0.1:5000" and got.origin == "node-a"
            own_copies = drain(own)
            assert own_copies and all(r.device_id == "dev1" for r in own_copies)  # local, at once
            # its own message coming back through Redis is not delivered twice: a message from
            # node-b published after it arrives after it (one channel, in order), and alone
            await b.publish(Registration("1001", "sip:1001@127.0.0.1:5001", "dev2", 1.5, "node-b"))
            later = await asyncio.wait_for(own.queue.get(), 10)
            assert later.origin == "node-b" and own.queue.empty()
            drain(watch)
            # an outage: messages may be lost, so the watch gets a GAP once Redis is back
            server.restart()
            marker = await asyncio.wait_for(watch.queue.get(), 20)
            assert marker is GAP
            got = await published_until_received(
                a, Registration("1001", "sip:1001@127.0.0.1:5002", "dev1", 2.0, "node-a"), watch)
            assert got.contact_uri.endswith(":5002")
    finally:
        stop.set()
        try:
            for t in tasks:
                await asyncio.wait_for(t, 10)  # a crashed subscription task fails the test here
        finally:
            await a_client.aclose()
            await b_client.aclose()
            server.cleanup()


def drain(watch: Watch) -> list[Registration]:
    out = []
    while not watch.queue.empty():
        item = watch.queue.get_nowait()
        if item is not GAP:
            out.append(item)
    return out


async def published_until_received(sender: RedisWakeups, reg: Registration, watch: Watch) -> Registration:
    """Publish until the other daemon's watch has it: a subscription is in place only once a
    message comes through (pub/sub drops what is published before). Bounded, event-driven."""
    async with asyncio.timeout(20):
        while True:
            await sender.publish(reg)
            try:
                while True:
                    got = await asyncio.wait_for(watch.queue.get(), 0.5)
                    if got is not GAP and got.origin == reg.origin:
                        return got
            except TimeoutError:
                continue
