"""`[redis] wait_replicas`: a binding only the master holds is written again until a replica has it."""

from __future__ import annotations

import asyncio
import time

from ari_push.bindings import RedisStore
from ari_push.model import Binding, PushParams
from ari_push.redis_keys import Keys
from ari_push.service import make_redis
from ari_push.settings import RedisSettings
from rig.redis import RedisServer
from tests.conftest import wait_for


async def test_unconfirmed_bindings_are_rewritten_until_a_replica_confirms() -> None:
    master = RedisServer(appendonly=False)
    master.start()
    replica = RedisServer(appendonly=False, replica_of=master.port)
    client = make_redis(RedisSettings(url=master.url))
    try:
        store = RedisStore(client, Keys("w:"), 86400, wait_replicas=1, wait_timeout=0.05)
        now = time.time()
        b = Binding("1001", "1001", PushParams("fcm", "tok-" + "a" * 30, "p1"), "sip:1001@h", "", now, now)
        async with asyncio.timeout(10):  # a generous guard: WAIT gives up after wait_timeout (50 ms)
            await store.upsert(b)
        assert list(store.unconfirmed) == [("1001", b.device_id)]  # no replica yet
        replica.start()

        async def confirmed() -> bool:  # what the daemon's monitor does once a second
            return await store.confirm() == 0

        await wait_for(confirmed, 30, "a replica confirmed the binding", interval=0.1)
        assert store.unconfirmed == {}
        assert [x.device_id for x in await store.bindings_for("1001")] == [b.device_id]
    finally:
        await client.aclose()
        replica.cleanup()
        master.cleanup()
