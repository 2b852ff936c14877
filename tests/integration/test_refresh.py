"""Registration-refresh pushes on the real rig: Asterisk 22, Redis, the strict fake FCM.

A phone registers with a short Expires and falls asleep (its socket closes). Before the
contact expires the daemon must send one silent, normal-priority FCM data message; a phone
that wakes on it and re-registers is counted as re-registered, one that does not as expired
anyway. Several daemons share one schedule (one push per contact), and the schedule survives
a daemon restart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rig.asterisk import AsteriskInstance
from rig.demo import PROJECT, RecordingFcm
from rig.redis import RedisServer
from rig.sipua import SipUA
from tests.conftest import daemon_config, wait_for
from tests.fakes.builders import fcm_token


@dataclass
class Pushes:
    fcm: RecordingFcm | None = None
    service_account: Path | None = None
    seen: list[tuple[str, dict[str, Any], float]] = field(default_factory=list)

    def on_push(self, token: str, message: dict[str, Any], at: float) -> None:
        self.seen.append((token, message, at))

    def of(self, token: str, kind: str = "refresh") -> list[dict[str, Any]]:
        return [m for t, m, _ in self.seen if t == token and m.get("data", {}).get("type") == kind]


@pytest.fixture
async def pushes(tmp_path: Path) -> AsyncIterator[Pushes]:
    p = Pushes()
    p.fcm = RecordingFcm(p.on_push)
    sa = await p.fcm.start()
    p.service_account = tmp_path / "sa.json"
    p.service_account.write_text(sa)
    yield p
    await p.fcm.stop()


def refresh_config(tmp_path: Path, asterisk: AsteriskInstance, pushes: Pushes, redis_url: str,
                   extra: str = "", name: str = "ari-push.toml") -> Path:
    assert pushes.fcm is not None
    text = ("[refresh]\nmin_interval = 2\ngrace = 1\ntick = 0.2\n" + extra +
            f'[[fcm]]\nproject_id = "{PROJECT}"\nservice_account_file = "{pushes.service_account}"\n'
            f'api_url = "{pushes.fcm.url}"\nca_file = "{pushes.fcm.ca_file}"\n')
    sub = tmp_path / name.removesuffix(".toml")
    sub.mkdir(exist_ok=True)
    return daemon_config(sub, asterisk, redis_url, text)


def fcm_contact(token: str) -> str:
    return f"pn-provider=fcm;pn-prid={token};pn-param={PROJECT}"


def metric(daemon: Any, name: str, labels: dict[str, str] | None = None) -> float:
    value = daemon.metrics.registry.get_sample_value(name, labels or {})
    return float(value or 0.0)


async def sleeping(asterisk: AsteriskInstance, aor: str, token: str, expires: int) -> SipUA:
    phone = SipUA(aor, asterisk.ports.sip)
    await phone.open()
    assert await phone.register(fcm_contact(token), expires=expires) == 200
    phone.close()
    return phone


async def test_refresh_push_wakes_the_phone_before_its_contact_expires(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        pushes: Pushes, aor: str) -> None:
    rd = await start_daemon(refresh_config(tmp_path, ensure_asterisk, pushes, ensure_redis.url))
    d = rd.daemon
    token = fcm_token(f"refresh-{aor}-wake")
    phone = SipUA(aor, ensure_asterisk.ports.sip)
    await phone.open()
    registered = time.monotonic()
    assert await phone.register(fcm_contact(token), expires=10) == 200
    port = phone.port
    await wait_for(lambda: d.store.bindings_for(aor), 5, "binding stored")
    phone.close()  # asleep
    await wait_for(lambda: pushes.of(token), 15, "a refresh push")
    at = next(a for t, m, a in pushes.seen if t == token)
    # default 80 % of a 10 s registration: 8 s in, and before the expiry
    assert 6.5 < at - registered < 10.0, at - registered
    (msg,) = pushes.of(token)
    assert msg["android"]["priority"] == "normal"  # silent: never high priority
    assert msg["data"]["callee"] == aor and "notification" not in msg
    assert int(msg["android"]["ttl"].rstrip("s")) <= 10
    # the phone wakes on the push and re-registers with the same contact (no AMI event at all)
    await phone.open(port)
    assert await phone.register(fcm_contact(token), expires=10) == 200
    await wait_for(lambda: metric(d, "ari_push_refresh_reregistered_total") == 1, 10, "re-registration counted")
    assert metric(d, "ari_push_refresh_pushes_total", {"result": "delivered"}) == 1
    assert metric(d, "ari_push_refresh_expired_total", {"pushed": "yes"}) == 0
    # ... and the next refresh comes again at 80 % of the new registration
    await wait_for(lambda: len(pushes.of(token)) == 2, 15, "the second refresh push")
    await phone.unregister()
    phone.close()


async def test_a_phone_that_never_wakes_is_counted_expired_and_the_entry_goes(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        pushes: Pushes, aor: str) -> None:
    rd = await start_daemon(refresh_config(tmp_path, ensure_asterisk, pushes, ensure_redis.url))
    d = rd.daemon
    token = fcm_token(f"refresh-{aor}-never")
    await sleeping(ensure_asterisk, aor, token, expires=5)
    await wait_for(lambda: metric(d, "ari_push_refresh_expired_total", {"pushed": "yes"}) == 1, 15,
                   "expired anyway")
    assert len(pushes.of(token)) == 1
    assert metric(d, "ari_push_refresh_reregistered_total") == 0
    await wait_for(lambda: _size_is(d, 0), 5, "nothing left in the schedule")
    await asyncio.sleep(1.0)
    assert len(pushes.of(token)) == 1  # and no further push for a contact that is gone


async def _size_is(d: Any, n: int) -> bool:
    return bool(await d.refresh.schedule.size() == n)


async def test_two_daemons_send_one_refresh_per_contact(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        pushes: Pushes, aor: str, aor2: str) -> None:
    one = refresh_config(tmp_path, ensure_asterisk, pushes, ensure_redis.url, name="a.toml")
    prefix = next(line for line in one.read_text().splitlines() if line.startswith("key_prefix"))
    two = refresh_config(tmp_path, ensure_asterisk, pushes, ensure_redis.url, name="b.toml")
    two.write_text("\n".join(prefix if line.startswith("key_prefix") else line
                             for line in two.read_text().splitlines()) + "\n")
    a = await start_daemon(one)
    b = await start_daemon(two)
    tokens = [fcm_token(f"refresh-{x}-pair") for x in (aor, aor2)]
    for x, token in zip((aor, aor2), tokens, strict=True):
        await sleeping(ensure_asterisk, x, token, expires=6)
    await wait_for(lambda: all(pushes.of(t) for t in tokens), 15, "refresh pushes")
    await wait_for(lambda: sum(metric(r.daemon, "ari_push_refresh_expired_total", {"pushed": "yes"})
                               for r in (a, b)) == 2, 15, "both judged")
    assert [len(pushes.of(t)) for t in tokens] == [1, 1]
    sent = [metric(r.daemon, "ari_push_refresh_pushes_total", {"result": "delivered"}) for r in (a, b)]
    assert sum(sent) == 2


async def test_the_schedule_survives_a_daemon_restart(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        pushes: Pushes, aor: str) -> None:
    config = refresh_config(tmp_path, ensure_asterisk, pushes, ensure_redis.url)
    first = await start_daemon(config)
    token = fcm_token(f"refresh-{aor}-restart")
    phone = SipUA(aor, ensure_asterisk.ports.sip)
    await phone.open()
    assert await phone.register(fcm_contact(token), expires=12) == 200
    phone.close()
    await wait_for(lambda: _size_is(first.daemon, 1), 5, "scheduled")
    await first.stop()
    second = await start_daemon(config)
    await wait_for(lambda: pushes.of(token), 15, "the refresh push from the restarted daemon")
    await asyncio.sleep(1.0)
    assert len(pushes.of(token)) == 1
    assert metric(second.daemon, "ari_push_refresh_pushes_total", {"result": "delivered"}) == 1


async def test_embedded_store_and_a_new_port_after_the_push(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, start_daemon, pushes: Pushes, aor: str) -> None:
    rd = await start_daemon(refresh_config(tmp_path, ensure_asterisk, pushes, ""))
    d = rd.daemon
    token = fcm_token(f"refresh-{aor}-embedded")
    phone = await sleeping(ensure_asterisk, aor, token, expires=8)
    await wait_for(lambda: pushes.of(token), 15, "a refresh push")
    await phone.open()  # wakes with a new socket: a new contact URI, seen through AMI at once
    assert await phone.register(fcm_contact(token), expires=8) == 200
    await wait_for(lambda: metric(d, "ari_push_refresh_reregistered_total") == 1, 5, "counted at once")
    assert d.metrics.registry.get_sample_value("ari_push_refresh_wake_seconds_count") == 1
    await phone.unregister()
    phone.close()


async def test_a_provider_switched_off_gets_no_refresh(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        pushes: Pushes, aor: str) -> None:
    rd = await start_daemon(refresh_config(tmp_path, ensure_asterisk, pushes, ensure_redis.url,
                                           'disabled_providers = ["fcm"]\n'))
    token = fcm_token(f"refresh-{aor}-off")
    await sleeping(ensure_asterisk, aor, token, expires=4)
    await wait_for(lambda: rd.daemon.store.bindings_for(aor), 5, "binding stored")
    await asyncio.sleep(5.5)  # past the expiry: a refresh would have been sent by now
    assert pushes.of(token) == []
    assert await rd.daemon.refresh.schedule.size() == 0


async def test_ios_dual_token_gets_a_background_push_on_its_remote_token(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        aor: str) -> None:
    from tests.fakes import FakeApns, make_pki

    pki = make_pki(tmp_path / "pki")
    apns = await FakeApns(pki).start()
    try:
        key = tmp_path / "apns.p8"
        key.write_text(apns.add_key("TEAM123456", "KEY1234567", ["com.example.phone.voip", "com.example.phone"]))
        extra = ("[refresh]\nmin_interval = 2\ngrace = 1\ntick = 0.2\n"
                 f'[[apns]]\ntopics = ["com.example.phone.voip"]\nteam_id = "TEAM123456"\nkey_id = "KEY1234567"\n'
                 f'key_file = "{key}"\nproduction_url = "{apns.url}"\nsandbox_url = "{apns.url}"\n'
                 f'ca_file = "{pki.ca_file}"\n')
        rd = await start_daemon(daemon_config(tmp_path, ensure_asterisk, ensure_redis.url, extra))
        voip, remote = "ab" * 32, "cd" * 32
        phone = SipUA(aor, ensure_asterisk.ports.sip)
        await phone.open()
        assert await phone.register(f"pn-provider=apns;pn-prid={voip}:voip&{remote}:remote;"
                                    "pn-param=TEAM123456.com.example.phone.voip&remote", expires=6) == 200
        phone.close()
        await wait_for(lambda: apns.requests, 15, "the refresh push")
        (req,) = apns.requests
        assert req.token == remote  # never the VoIP token: PushKit wants a call for each VoIP push
        assert req.headers["apns-push-type"] == "background" and req.headers["apns-priority"] == "5"
        assert req.headers["apns-topic"] == "com.example.phone"
        assert req.payload["aps"] == {"content-available": 1} and req.payload["type"] == "refresh"
        # the local APNs has the request before the daemon has its answer: wait for the count
        await wait_for(lambda: metric(rd.daemon, "ari_push_refresh_pushes_total", {"result": "delivered"}) == 1,
                       10, "the delivered refresh counted")
    finally:
        await apns.stop()
