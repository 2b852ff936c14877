"""The registered signal between daemons over a real Redis, and the GAP after an outage."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from ari_push.redis_keys import Keys
from ari_push.service import make_redis
from ari_push.settings import RedisSettings
from ari_push.wakeups import GAP, RedisWakeups, Registration
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
            await asyncio.sleep(0.3)  # both subscriptions confirmed
            await a.publish(Registration("1001", "sip:1001@127.0.0.1:5000", "dev1", 1.0, "node-a"))
            got = await asyncio.wait_for(watch.queue.get(), 5)
            assert got.contact_uri == "sip:1001@127.0.0.1:5000" and got.origin == "node-a"
            assert (await asyncio.wait_for(own.queue.get(), 1)).device_id == "dev1"  # local, at once
            await asyncio.sleep(0.3)
            assert own.queue.empty()  # its own message coming back through Redis is not delivered twice
            # an outage: messages may be lost, so the watch gets a GAP once Redis is back
            server.restart()
            marker = await asyncio.wait_for(watch.queue.get(), 15)
            assert marker is GAP
            await asyncio.sleep(0.3)
            await a.publish(Registration("1001", "sip:1001@127.0.0.1:5002", "dev1", 2.0, "node-a"))
            while (got := await asyncio.wait_for(watch.queue.get(), 5)) is GAP:
                pass
            assert got.contact_uri.endswith(":5002")
    finally:
        stop.set()
        for t in tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(t, 5)
        await a_client.aclose()
        await b_client.aclose()
        server.cleanup()
