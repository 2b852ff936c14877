"""Token capture on the real rig: a SIP phone of ours registers with each dialect."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import pytest

from ari_push.model import Dialect
from rig.asterisk import AsteriskInstance
from rig.redis import RedisServer
from rig.sipua import SipUA
from tests.conftest import daemon_config, wait_for

APNS_TOKEN = "00fc13adff785122b4ad28809a3420982341241421348097878e577c991de8f0"
ZOIPER = ("rinstance=0667df2a9c36ce63;X-PUSH-URI=http://db3.notify.live.net/throttledthirdparty/01.00/"
          "AQEVPwmdC_zuSZiednVGrPo6AgAAAAADOwAAAAQUZm52OkE0QUNBREI0MTdBQzBCNjQFBlVTTkMwMQ")
DIALECTS = {
    "rfc8599-apns": (f"pn-provider=apns;pn-prid={APNS_TOKEN};pn-param=ABCD1234.com.example.voip", "apns",
                     Dialect.RFC8599),
    "rfc8599-fcm": ("pn-provider=fcm;pn-prid=cAbCdEf123:APA91bHxyz-_AbC_xyz-123;pn-param=my-project-id", "fcm",
                    Dialect.RFC8599),
    "linphone-firebase": ("app-id=929724111839;pn-type=firebase;pn-tok=dQw4w9WgXcQ:APA91bH-abc_DEF123;pn-silent=1",
                          "fcm", Dialect.LINPHONE),
    "apple-dual": ("pn-provider=apns.dev;pn-prid=" + "ab" * 32 + ":voip&" + "cd" * 32 + ":remote;"
                   "pn-param=ABCD1234.org.linphone.phone.voip&remote", "apns", Dialect.RFC8599),
    "zoiper": (ZOIPER, "vendor", Dialect.ZOIPER),
}
EXTRA = '[capture]\nvendor_allowed_hosts = ["*.notify.live.net"]\n'


@pytest.fixture
async def capture_daemon(tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer,
                         start_daemon):
    return await start_daemon(daemon_config(tmp_path, ensure_asterisk, ensure_redis.url, EXTRA))


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("dialect", sorted(DIALECTS))
async def test_each_dialect_is_captured(capture_daemon, ensure_asterisk: AsteriskInstance, aor: str,
                                        dialect: str, transport: str) -> None:
    params, provider, kind = DIALECTS[dialect]
    phone = SipUA(aor, ensure_asterisk.ports.sip, transport)
    await phone.open()
    try:
        assert await phone.register(params) == 200
        store = capture_daemon.daemon.store
        bindings = await wait_for(lambda: store.bindings_for(aor), 5, "binding stored")
        assert len(bindings) == 1
        b = bindings[0]
        assert b.push.provider == provider and b.push.dialect == kind
        assert b.contact_uri == phone.contact_uri  # as Asterisk reports it
        assert b.endpoint == aor and b.first_seen > 0
        assert b.user_agent == "ari-push-test-ua/1.0"  # live capture reads it from the contact object
        if dialect == "apple-dual":
            assert b.push.token == "ab" * 32 and b.push.sandbox
            assert b.push.extra_tokens == (("remote", "cd" * 32),)
        if dialect == "zoiper":
            assert b.push.token.startswith("http://db3.notify.live.net/throttledthirdparty/")
    finally:
        await phone.unregister()
        phone.close()


async def test_new_port_updates_the_binding_and_unregister_expiry_keep_it(
        capture_daemon, ensure_asterisk: AsteriskInstance, aor: str) -> None:
    store = capture_daemon.daemon.store
    params = DIALECTS["rfc8599-apns"][0]
    phone = SipUA(aor, ensure_asterisk.ports.sip)
    await phone.open()
    assert await phone.register(params) == 200
    first = (await wait_for(lambda: store.bindings_for(aor), 5, "first binding"))[0]
    old_uri = phone.contact_uri
    phone.close()
    await phone.open()  # the app wakes with a new socket: a new contact URI, same token
    assert phone.contact_uri != old_uri
    assert await phone.register(params) == 200
    await wait_for(lambda: _uri_is(store, aor, phone.contact_uri), 5, "binding moved to the new port")
    bindings = await store.bindings_for(aor)
    assert len(bindings) == 1  # one device, not two
    assert bindings[0].first_seen == first.first_seen and bindings[0].last_seen >= first.last_seen
    # un-REGISTER: Asterisk removes the contact, the binding stays. A later REGISTER of the same
    # AOR is handled after it (one capture worker per AOR, events in order), so once that one
    # shows in the store, the un-REGISTER has been handled too.
    assert await _contact_listed(ensure_asterisk, aor, phone.contact_uri)  # the check sees a contact
    assert await phone.unregister() == 200
    assert not await _contact_listed(ensure_asterisk, aor, phone.contact_uri)
    seen = bindings[0].last_seen
    assert await phone.register(params, expires=1) == 200  # a short registration that expires
    await wait_for(lambda: _seen_after(store, aor, seen), 10, "the REGISTER after the un-REGISTER handled")
    # the registration expires: Asterisk drops the contact (verified), the binding is kept
    await wait_for(lambda: _gone(ensure_asterisk, aor, phone.contact_uri), 15, "the 1 s contact expired")
    seen = (await store.bindings_for(aor))[0].last_seen
    assert await phone.register(params) == 200  # handled after the expiry event, as above
    await wait_for(lambda: _seen_after(store, aor, seen), 10, "the REGISTER after the expiry handled")
    after = await store.bindings_for(aor)
    assert [b.device_id for b in after] == [first.device_id] and after[0].first_seen == first.first_seen
    await phone.unregister()
    phone.close()


async def _contact_listed(asterisk: AsteriskInstance, aor: str, uri: str) -> bool:
    out = await asyncio.to_thread(asterisk.cli, f"pjsip show aor {aor}", 10.0, False)
    return uri.split(";")[0].removeprefix("sip:") in out.stdout


async def _gone(asterisk: AsteriskInstance, aor: str, uri: str) -> bool:
    return not await _contact_listed(asterisk, aor, uri)


async def _seen_after(store, aor: str, seen: float) -> bool:
    return any(b.last_seen > seen for b in await store.bindings_for(aor))


async def _uri_is(store, aor: str, uri: str) -> bool:
    return any(b.contact_uri == uri for b in await store.bindings_for(aor))


async def test_registration_while_the_daemon_is_down_is_found_by_resync(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon, aor: str) -> None:
    phone = SipUA(aor, ensure_asterisk.ports.sip)
    await phone.open()
    assert await phone.register(DIALECTS["rfc8599-fcm"][0]) == 200  # no daemon running yet
    try:
        rd = await start_daemon(daemon_config(tmp_path, ensure_asterisk, ensure_redis.url))
        bindings = await wait_for(lambda: rd.daemon.store.bindings_for(aor), 5, "resync stored it")
        assert bindings[0].push.provider == "fcm"
        assert bindings[0].user_agent == "ari-push-test-ua/1.0"  # resync reads the user agent
    finally:
        await phone.unregister()
        phone.close()


async def test_hostile_contacts_are_rejected_counted_and_not_stored(
        capture_daemon, ensure_asterisk: AsteriskInstance, aor: str, caplog: pytest.LogCaptureFixture) -> None:
    d = capture_daemon.daemon
    secret_token = "Z" * 40
    hostile = [
        f"pn-provider=apns;pn-prid={secret_token};pn-param=T.com.x.voip",  # not 64 hex
        "X-PUSH-URI=http://169.254.169.254/latest/meta-data",  # host not allowed
        "X-PUSH-URI=ftp://db3.notify.live.net/x",  # scheme
        "pn-provider=pigeon;pn-prid=abc;pn-param=x",  # unknown provider
    ]
    for params in hostile:
        phone = SipUA(aor, ensure_asterisk.ports.sip)
        await phone.open()
        assert await phone.register(params) == 200  # Asterisk accepts it; we refuse to store it
        await phone.unregister()
        phone.close()
    await wait_for(lambda: _rejected(d) >= len(hostile), 5, "rejections counted")
    assert await d.store.bindings_for(aor) == []
    assert secret_token not in caplog.text
    assert d.ami.link.up and not capture_daemon.task.done()


def _rejected(d) -> float:
    total = 0.0
    for metric in d.metrics.rejected.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                total += sample.value
    return total


async def test_capture_latency(capture_daemon, ensure_asterisk: AsteriskInstance, aor: str, capsys) -> None:
    """REGISTER sent -> binding in Redis. Reported, not asserted (see docs/performance.md)."""
    store = capture_daemon.daemon.store
    samples = []
    for i in range(20):
        phone = SipUA(aor, ensure_asterisk.ports.sip)
        await phone.open()
        token = f"{i:064x}"
        t0 = time.monotonic()
        assert await phone.register(f"pn-provider=apns;pn-prid={token};pn-param=T.com.example.voip") == 200
        await wait_for(lambda t=token: _has_token(store, aor, t), 5, "stored", interval=0.0005)
        samples.append((time.monotonic() - t0) * 1000)
        await phone.unregister()
        phone.close()
    with capsys.disabled():
        print(f"\ncapture latency REGISTER->stored (ms): median {statistics.median(samples):.2f}, "
              f"max {max(samples):.2f}, n={len(samples)}")
    # 20 devices registered one after the other; [capture] max_devices_per_aor (10) keeps the newest
    kept = {b.push.token for b in await store.bindings_for(aor)}
    assert kept == {f"{i:064x}" for i in range(10, 20)}


async def _has_token(store, aor: str, token: str) -> bool:
    return any(b.push.token == token for b in await store.bindings_for(aor))
