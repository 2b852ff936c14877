"""Issue 16 (hardening) on a real Redis: the per-AOR device cap (finding 1), stored times clamped
to the capture time (finding 8), and `tokens list|show` masking and escaping what a phone wrote
(findings 2 and 8). Each test failed on the code before the fix."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

from ari_push.bindings import RedisStore, to_json
from ari_push.capture import Capture
from ari_push.contacts import ContactPolicy, parse_contact
from ari_push.metrics import Metrics
from ari_push.model import Binding, PushParams
from ari_push.redis_keys import Keys
from ari_push.service import make_redis
from ari_push.settings import RedisSettings
from ari_push.wakeups import WakeupHub
from rig.redis import RedisServer

VOIP = "a1b2c3d4" * 8
REMOTE = "e5f6a7b8" * 8
DUAL = (f"sip:1001@192.0.2.1:5060;pn-provider=apns;pn-prid={VOIP}:voip&{REMOTE}:remote;"
        "pn-param=ABCD1234.com.example.app.voip&remote")
EVIL_UA = "Linphone\x1b]0;owned\x07\x1b[2J\x9b31m"


def _fcm(n: int, last_seen: float, aor: str = "1001") -> Binding:
    return Binding(aor, aor, PushParams("fcm", f"tok-{n:040d}", "p"), f"sip:{aor}@192.0.2.1;n={n}", "UA",
                   last_seen, last_seen)


async def test_redis_store_caps_devices_per_aor_and_capture_counts_evictions(ensure_redis: RedisServer) -> None:
    client = make_redis(RedisSettings(url=ensure_redis.url))
    keys = Keys(f"cap-{uuid.uuid4().hex[:8]}:")
    store = RedisStore(client, keys, 86400)
    metrics = Metrics()
    policy = ContactPolicy(vendor_allowed_hosts=("push.zoiper.example",), max_devices_per_aor=5)
    seconds = iter(range(int(time.time()) - 10_000, int(time.time())))  # one REGISTER a second, in the past
    capture = Capture(store, WakeupHub(), policy, ami=None, metrics=metrics,  # type: ignore[arg-type]
                      clock=lambda: float(next(seconds)))
    try:
        for i in range(30):  # a fresh push URL with every REGISTER
            await capture.capture("1001", "1001",
                                  f"sip:1001@192.0.2.1;X-PUSH-URI=https://push.zoiper.example/p/{i}", "Zoiper")
        kept = await store.bindings_for("1001")
        assert sorted(int(b.push.token.rsplit("/", 1)[1]) for b in kept) == list(range(25, 30))
        assert metrics.devices_evicted._value.get() == 25
        assert await client.hlen(keys.bindings("1001")) == 5
        assert await client.zcard(keys.seen()) == 5  # the evicted ones left the sweep's index too
        # a device seen again is the most recent one: the least recently seen of the others goes
        await capture.capture("1001", "1001", "sip:1001@192.0.2.1;X-PUSH-URI=https://push.zoiper.example/p/25", "Z")
        await capture.capture("1001", "1001", "sip:1001@192.0.2.1;X-PUSH-URI=https://push.zoiper.example/p/99", "Z")
        kept = await store.bindings_for("1001")
        assert sorted(int(b.push.token.rsplit("/", 1)[1]) for b in kept) == [25, 27, 28, 29, 99]
    finally:
        await client.aclose()


async def test_a_future_last_seen_in_redis_neither_shadows_upserts_nor_survives_the_sweep(
        ensure_redis: RedisServer) -> None:
    client = make_redis(RedisSettings(url=ensure_redis.url))
    keys = Keys(f"fut-{uuid.uuid4().hex[:8]}:")
    t = [float(int(time.time()))]  # whole seconds: stored times keep milliseconds
    store = RedisStore(client, keys, 30 * 86400, clock=lambda: t[0])
    future = t[0] + 10 * 365 * 86400
    try:
        # as an older daemon with a wrong clock (or a restored dump) left it
        await client.hset(keys.bindings("1001"), _fcm(1, future).device_id, to_json(_fcm(1, future)))
        await client.zadd(keys.seen(), {f"1001\x00{_fcm(1, future).device_id}": future})
        fresh = Binding("1001", "1001", _fcm(1, 0).push, "sip:new@192.0.2.1", "UA", t[0], t[0])
        stored = await store.upsert(fresh)
        assert stored.contact_uri == "sip:new@192.0.2.1" and stored.last_seen <= t[0]
        # another device written from the future straight away is clamped to the capture time
        assert (await store.upsert(_fcm(2, future))).last_seen <= t[0]
        assert await store.sweep(t[0] - 30 * 86400) == 0  # ages from now on
        t[0] += 31 * 86400
        assert await store.sweep(t[0] - 30 * 86400) == 2
        assert await store.bindings_for("1001") == []
    finally:
        await client.aclose()


async def test_tokens_cli_masks_every_token_half_and_escapes_the_user_agent(tmp_path: Path,
                                                                             ensure_redis: RedisServer) -> None:
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    config = tmp_path / "c.toml"
    config.write_text(f'[ari]\npassword="x"\n[ami]\nsecret="y"\n[redis]\nurl="{ensure_redis.url}"\n'
                      f'key_prefix="{prefix}"\n')
    client = make_redis(RedisSettings(url=ensure_redis.url))
    push = parse_contact(DUAL, ContactPolicy())
    assert push is not None
    now = time.time()
    await RedisStore(client, Keys(prefix), 86400).upsert(Binding("1001", "1001", push, DUAL, EVIL_UA, now, now))
    await client.aclose()

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "ari_push", "--config", str(config), "tokens", *args],
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    out = run("list") + run("show", "1001")
    for secret in (VOIP, REMOTE):
        assert not [secret[i:i + 8] for i in range(57) if secret[i:i + 8] in out]
    for raw in ("\x1b", "\x07", "\x9b"):
        assert raw not in out
    assert "Linphone\\x1b]0;owned" in out
    shown = json.loads(run("show", "1001"))
    assert shown[0]["push"]["extra_tokens"] == [["remote", "e5f6…(64)"]]
    revealed = run("list", "--reveal")
    assert VOIP in revealed and "\x1b" not in revealed  # revealed tokens, still no escape sequences
