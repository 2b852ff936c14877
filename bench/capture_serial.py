"""How fast is ari-push's capture step alone, against a real Redis? (supports docs/performance.md)

Runs what ``Capture.capture`` does per new contact, in a loop, the way the capture worker does
(one event after the other): parse the contact, ``RedisStore.upsert`` (EVALSHA + ZADD), then
``RedisWakeups.publish`` (local delivery + PUBLISH). No Asterisk, no AMI: the ceiling of the
serial capture worker on this machine.

    .venv/bin/python bench/capture_serial.py [--events 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ari_push.bindings import RedisStore
from ari_push.contacts import ContactPolicy, parse_contact
from ari_push.model import Binding
from ari_push.redis_keys import Keys
from ari_push.service import make_redis
from ari_push.settings import CaptureSettings, RedisSettings
from ari_push.wakeups import RedisWakeups, Registration
from rig.demo import fcm_token, push_params
from rig.redis import RedisServer


async def main(events: int) -> None:
    server = RedisServer()
    server.start()
    try:
        redis = make_redis(RedisSettings(url=server.url))
        keys = Keys("micro:")
        store = RedisStore(redis, keys, 30 * 86400)
        wakeups = RedisWakeups(redis, keys, "micro")
        policy = ContactPolicy.from_settings(CaptureSettings())
        tokens = [fcm_token() for _ in range(100)]
        uris = [f"sip:{3000 + i % 100}@127.0.0.1:{20000 + i};transport=udp;{push_params(tokens[i % 100])}"
                for i in range(events)]
        for label, steps in (("parse only", 1), ("parse + upsert", 2), ("parse + upsert + publish", 3)):
            started = time.perf_counter()
            for i, uri in enumerate(uris):
                aor = str(3000 + i % 100)
                push = parse_contact(uri, policy)
                assert push is not None
                if steps >= 2:
                    now = time.time()
                    await store.upsert(Binding(aor, aor, push, uri, "", now, now))
                if steps >= 3:
                    await wakeups.publish(Registration(aor, uri, push.device_id, time.time(), "micro"))
            took = time.perf_counter() - started
            print(f"{label:<26} {events / took:8.0f} events/s  ({1e6 * took / events:6.0f} us each, serial)")
        await redis.aclose()
    finally:
        server.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=5000)
    asyncio.run(main(parser.parse_args().events))
