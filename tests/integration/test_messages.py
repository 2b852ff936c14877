"""SIP MESSAGE to a sleeping phone on the real rig: Asterisk 22's message context hands the
MESSAGE to ari-push (CURL), ari-push stores it, pushes the phone through the strict fake FCM and
delivers it with ARI sendMessage to the fresh contact once the phone re-registers; undelivered
messages expire with a status in AstDB; a restart loses none and delivers none twice.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rig.asterisk import AsteriskInstance, Ports
from rig.demo import PROJECT
from rig.redis import RedisServer
from rig.sipua import SipUA
from tests.conftest import daemon_config, wait_for
from tests.fakes.builders import fcm_token
from tests.integration.test_refresh import Pushes, fcm_contact, metric, pushes  # noqa: F401  (fixture)

DELIVERY_MS: list[float] = []


@pytest.fixture(scope="module")
def msg_asterisk(asterisk_root: Path) -> Iterator[AsteriskInstance]:
    inst = AsteriskInstance(asterisk_root, "msg", Ports.for_index(3))
    inst.write_config()
    inst.start()
    yield inst
    inst.stop()
    if DELIVERY_MS:
        print(f"\nre-REGISTER -> MESSAGE at the phone: median {statistics.median(DELIVERY_MS):.1f} ms, "
              f"max {max(DELIVERY_MS):.1f} ms over {len(DELIVERY_MS)}")


async def start(tmp_path: Path, asterisk: AsteriskInstance, p: Pushes, redis_url: str, start_daemon: Any,
                extra: str = "", config: Path | None = None) -> Any:
    assert p.fcm is not None
    if config is None:
        text = ("[refresh]\nenabled = false\n[mwi]\nenabled = false\n[messages]\npoll = 0.2\n" + extra +
                f'[[fcm]]\nproject_id = "{PROJECT}"\nservice_account_file = "{p.service_account}"\n'
                f'api_url = "{p.fcm.url}"\nca_file = "{p.fcm.ca_file}"\n')
        config = daemon_config(tmp_path, asterisk, redis_url, text)
    if not asterisk.running:
        asterisk.start()
    rd = await start_daemon(config)
    asterisk.cli(f"dialplan set global ARI_PUSH_URL http://127.0.0.1:{rd.daemon.health.port}")
    return rd


async def sleeping(asterisk: AsteriskInstance, aor: str, store: Any, tag: str) -> tuple[SipUA, str]:
    token = fcm_token(f"msg-{aor}-{tag}")
    phone = SipUA(aor, asterisk.ports.sip)
    await phone.open()
    assert await phone.register(fcm_contact(token)) == 200
    await wait_for(lambda: store.bindings_for(aor), 5, "binding stored")
    phone.close()
    return phone, token


async def received(phone: SipUA, timeout: float = 10) -> Any:
    async with asyncio.timeout(timeout):
        return await phone.messages.get()


def astdb(asterisk: AsteriskInstance, message_id: str) -> str:
    out = asterisk.cli(f"database get ari-push-message {message_id}", check=False).stdout
    m = re.search(r"Value:\s*(\S+)", out)
    return m.group(1) if m else ""


async def test_message_for_a_sleeping_phone_is_pushed_and_delivered_on_re_register(
        tmp_path: Path, msg_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        pushes: Pushes, aor: str, aor2: str) -> None:  # noqa: F811
    rd = await start(tmp_path, msg_asterisk, pushes, ensure_redis.url, start_daemon,
                     "preview = true\npreview_chars = 40\n")
    d = rd.daemon
    phone, token = await sleeping(msg_asterisk, aor, d.store, "a")
    sender = SipUA(aor2, msg_asterisk.ports.sip)
    await sender.open()
    assert await sender.send_message(aor, "see you at 5 & bring the keys") == 202
    (push,) = await wait_for(lambda: pushes.of(token, "message"), 10, "the message push")
    assert push["data"]["caller_number"] == aor2 and push["data"]["caller_name"] == f"Test {aor2}"
    assert push["data"]["preview"] == "see you at 5 & bring the keys"  # allowed and short enough
    assert push["android"]["priority"] == "high"
    message_id = push["data"]["message_id"]
    assert phone.messages.empty()
    await phone.open()  # wakes with a new socket: a new contact, seen from AMI at once
    assert await phone.register(fcm_contact(token)) == 200
    registered = time.monotonic()
    msg = await received(phone)
    DELIVERY_MS.append((msg.received - registered) * 1000)
    assert msg.body == "see you at 5 & bring the keys"
    assert f"sip:{aor2}@" in msg.header("From")
    await wait_for(lambda: astdb(msg_asterisk, message_id) == "DELIVERED", 5, "the status in AstDB")
    await asyncio.sleep(1.0)
    assert phone.messages.empty()  # once
    assert metric(d, "ari_push_messages_total", {"fate": "delivered"}) == 1
    await phone.unregister()
    phone.close()
    sender.close()


async def test_same_uri_wake_and_a_text_too_long_for_the_push(
        tmp_path: Path, msg_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        pushes: Pushes, aor: str, aor2: str) -> None:  # noqa: F811
    rd = await start(tmp_path, msg_asterisk, pushes, ensure_redis.url, start_daemon,
                     "preview = true\npreview_chars = 40\n")
    phone, token = await sleeping(msg_asterisk, aor, rd.daemon.store, "b")
    port = phone.port
    text = "long " * 190  # 950 characters: more than the push may carry (preview_chars = 40)
    sender = SipUA(aor2, msg_asterisk.ports.sip)
    await sender.open()
    assert await sender.send_message(aor, text) == 202
    (push,) = await wait_for(lambda: pushes.of(token, "message"), 10, "the message push")
    assert "preview" not in push["data"]  # never a truncated text in the push
    await asyncio.sleep(1.1)  # a phone takes a while to wake; Asterisk keeps expiry in whole seconds
    await phone.open(port)  # the same contact URI: no AMI event, found by polling
    assert await phone.register(fcm_contact(token)) == 200
    registered = time.monotonic()
    msg = await received(phone)
    DELIVERY_MS.append((msg.received - registered) * 1000)
    assert msg.body == text  # delivered whole, over SIP
    await phone.unregister()
    phone.close()
    sender.close()


async def test_undelivered_message_expires_with_a_status(
        tmp_path: Path, msg_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        pushes: Pushes, aor: str, aor2: str) -> None:  # noqa: F811
    rd = await start(tmp_path, msg_asterisk, pushes, ensure_redis.url, start_daemon, "ttl = 2\n")
    d = rd.daemon
    phone, token = await sleeping(msg_asterisk, aor, d.store, "c")
    sender = SipUA(aor2, msg_asterisk.ports.sip)
    await sender.open()
    assert await sender.send_message(aor, "are you there?") == 202
    (push,) = await wait_for(lambda: pushes.of(token, "message"), 10, "the message push")
    assert "preview" not in push["data"]  # previews are off by default
    message_id = push["data"]["message_id"]
    await wait_for(lambda: astdb(msg_asterisk, message_id) == "EXPIRED", 10, "EXPIRED in AstDB")
    assert await d.messages.store.pending(aor) == []  # nothing kept
    await phone.open()
    assert await phone.register(fcm_contact(token)) == 200
    await asyncio.sleep(1.5)
    assert phone.messages.empty()  # an expired message is not delivered late
    await phone.unregister()
    phone.close()
    sender.close()


async def test_a_restart_with_messages_waiting_loses_none_and_doubles_none(
        tmp_path: Path, msg_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        pushes: Pushes, aor: str, aor2: str) -> None:  # noqa: F811
    first = await start(tmp_path, msg_asterisk, pushes, ensure_redis.url, start_daemon)
    phone, token = await sleeping(msg_asterisk, aor, first.daemon.store, "d")
    sender = SipUA(aor2, msg_asterisk.ports.sip)
    await sender.open()
    for i in range(3):
        assert await sender.send_message(aor, f"message {i}") == 202
    await wait_for(lambda: len(pushes.of(token, "message")) == 3, 10, "three pushes")
    await first.stop()
    second = await start(tmp_path, msg_asterisk, pushes, ensure_redis.url, start_daemon,
                         config=tmp_path / "ari-push.toml")
    await phone.open()
    assert await phone.register(fcm_contact(token)) == 200
    bodies = [(await received(phone)).body for _ in range(3)]
    assert sorted(bodies) == ["message 0", "message 1", "message 2"]
    await asyncio.sleep(1.5)
    assert phone.messages.empty()
    assert metric(second.daemon, "ari_push_messages_total", {"fate": "delivered"}) == 3
    await phone.unregister()
    phone.close()
    sender.close()


async def test_a_phone_without_push_gets_its_message_from_the_dialplan(
        tmp_path: Path, msg_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        pushes: Pushes, aor: str, aor2: str) -> None:  # noqa: F811
    await start(tmp_path, msg_asterisk, pushes, ensure_redis.url, start_daemon)
    desk = SipUA(aor, msg_asterisk.ports.sip)
    await desk.open()
    assert await desk.register() == 200  # no push parameters: ari-push answers NOT_PUSH
    sender = SipUA(aor2, msg_asterisk.ports.sip)
    await sender.open()
    assert await sender.send_message(aor, "plain delivery") == 202
    msg = await received(desk)
    assert msg.body == "plain delivery"
    await desk.unregister()
    desk.close()
    sender.close()


async def test_a_text_too_long_for_the_message_context_is_sent_by_the_dialplan(
        tmp_path: Path, msg_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        pushes: Pushes, aor: str, aor2: str) -> None:  # noqa: F811
    rd = await start(tmp_path, msg_asterisk, pushes, ensure_redis.url, start_daemon)
    awake = SipUA(aor, msg_asterisk.ports.sip)
    await awake.open()
    assert await awake.register(fcm_contact(fcm_token(f"msg-{aor}-e"))) == 200  # a push phone, awake
    await wait_for(lambda: rd.daemon.store.bindings_for(aor), 5, "binding stored")
    sender = SipUA(aor2, msg_asterisk.ports.sip)
    await sender.open()
    text = "x" * 2000  # MESSAGE(body) reads it empty in the dialplan (1000 bytes pass, 1300 do not)
    assert await sender.send_message(aor, text) == 202
    msg = await received(awake)  # the dialplan's MessageSend fallback ran (ari-push stored nothing) ...
    # ... but Asterisk 22 itself passes such a body on empty (Content-Length: 0, measured): a text
    # this long cannot cross Asterisk's message context at all, with or without ari-push.
    assert msg.method == "MESSAGE" and msg.header("Content-Length") == "0"
    assert metric(rd.daemon, "ari_push_messages_total", {"fate": "empty"}) == 1
    assert metric(rd.daemon, "ari_push_messages_total", {"fate": "stored"}) == 0
    await awake.unregister()
    awake.close()
    sender.close()
