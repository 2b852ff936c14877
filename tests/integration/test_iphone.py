"""A simulated iPhone (rig/iphone.py) that applies Apple's PushKit/CallKit rules, on the real rig.

The daemon's own APNs provider pushes to the strict local APNs (tests/fakes/apns.py over
HTTP/2 + TLS), which holds each token to its push type and topic and hands every accepted push
to the phone. The phone fails the test ("app killed") on a VoIP push that is not a new call, and
requires to learn how each call ended within a few seconds of waking: an INVITE answered, a
CANCEL/BYE, or a background/alert push naming the call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rig.asterisk import AsteriskInstance
from rig.iphone import IPhone
from rig.redis import RedisServer
from rig.sipua import SipUA
from tests.conftest import daemon_config, wait_for
from tests.fakes import FakeApns, make_pki
from tests.fakes.builders import apns_token

TEAM, KEY_ID, BUNDLE = "TEAM123456", "KEY1234567", "com.example.phone"


@pytest.fixture
async def apns(tmp_path: Path) -> AsyncIterator[tuple[FakeApns, Path, Path]]:
    pki = make_pki(tmp_path / "pki")
    fake = await FakeApns(pki).start()
    key = tmp_path / "apns.p8"
    key.write_text(fake.add_key(TEAM, KEY_ID, [f"{BUNDLE}.voip", BUNDLE]))
    try:
        yield fake, key, pki.ca_file
    finally:
        await fake.stop()


async def start(tmp_path: Path, asterisk: AsteriskInstance, redis: RedisServer, start_daemon: Any,
                apns: tuple[FakeApns, Path, Path], timeout: float = 8, extra: str = "") -> Any:
    fake, key, ca = apns
    text = (f"[calls]\ndefault_timeout = {timeout}\n{extra}[push]\nburst = 50\n"
            f'[[apns]]\nname = "phone"\ntopics = ["{BUNDLE}.voip"]\nteam_id = "{TEAM}"\nkey_id = "{KEY_ID}"\n'
            f'key_file = "{key}"\nproduction_url = "{fake.url}"\nsandbox_url = "{fake.url}"\nca_file = "{ca}"\n')
    return await start_daemon(daemon_config(tmp_path, asterisk, redis.url, text))


async def iphone(asterisk: AsteriskInstance, fake: FakeApns, rd: Any, aor: str, *, dual: bool = True,
                 wake_delay: float = 0.3, answer: bool = True) -> IPhone:
    n = int(aor)
    phone = IPhone(aor, asterisk.ports.sip, apns_token(50_000 + n), apns_token(60_000 + n) if dual else "",
                   team=TEAM, bundle=BUNDLE, wake_delay=wake_delay, answer=answer)
    fake.register_device(BUNDLE, voip=phone.voip_token, remote=phone.remote_token)
    previous = fake.on_push

    def hand_over(token: str, headers: dict[str, str], payload: dict[str, Any]) -> None:
        if token.lower() in (phone.voip_token.lower(), phone.remote_token.lower()):
            phone.on_push(token, headers, payload)
        elif previous is not None:
            previous(token, headers, payload)

    fake.on_push = hand_over
    await phone.register_and_sleep()
    await wait_for(lambda: rd.daemon.store.bindings_for(aor), 5, "the iPhone's binding")
    return phone


def no_channels(asterisk: AsteriskInstance) -> bool:
    return asterisk.ari("GET", "/ari/channels") == []


def check(phone: IPhone, fake: FakeApns) -> None:
    assert phone.violations == []
    assert all(status == 200 for status, _ in fake.answers), fake.answers  # nothing Apple would refuse


@dataclass
class Scene:
    """A started daemon, an iPhone asleep on ``aor`` and a caller; ``desk``: a desk phone on the
    same AOR, opened on demand."""

    asterisk: AsteriskInstance
    fake: FakeApns
    phone: IPhone
    caller: SipUA
    desk: SipUA


@contextlib.asynccontextmanager
async def scene(tmp_path: Path, asterisk: AsteriskInstance, redis: RedisServer, start_daemon: Any,
                apns: tuple[FakeApns, Path, Path], aor: str, *, timeout: float = 8,
                **phone: Any) -> AsyncIterator[Scene]:
    """Everything a case needs; afterwards Apple's rules hold (no violation, nothing refused),
    every socket is closed and no channel is left."""
    rd = await start(tmp_path, asterisk, redis, start_daemon, apns, timeout=timeout)
    s = Scene(asterisk, apns[0], await iphone(asterisk, apns[0], rd, aor, **phone), SipUA("2000", asterisk.ports.sip),
              SipUA(aor, asterisk.ports.sip))
    await s.caller.open()
    try:
        yield s
        check(s.phone, s.fake)
    finally:
        if s.desk.port:
            await s.desk.unregister()
        s.desk.close()
        s.caller.close()
        s.phone.close()
    await wait_for(lambda: no_channels(asterisk), 10, "no channels left")


async def test_normal_wake_is_one_voip_push_then_the_call(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon: Any,
        apns: tuple[FakeApns, Path, Path], aor: str) -> None:
    async with scene(tmp_path, ensure_asterisk, ensure_redis, start_daemon, apns, aor) as sc:
        resp = await asyncio.wait_for(sc.caller.call(aor), 15)
        assert resp.status == 200
        (call_id,) = sc.phone.calls
        assert await sc.phone.learnt(call_id, 5) == "answered"
        await sc.caller.hangup()
        await asyncio.wait_for(sc.phone.ua.byes.get(), 5)  # type: ignore[union-attr]
        assert [(kind, push_type) for kind, push_type, _ in sc.phone.pushes] == [("voip", "voip")]


async def test_caller_hangs_up_before_the_wake_the_phone_learns_it_by_a_background_push(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon: Any,
        apns: tuple[FakeApns, Path, Path], aor: str) -> None:
    async with scene(tmp_path, ensure_asterisk, ensure_redis, start_daemon, apns, aor, wake_delay=2.0) as sc:
        answer = sc.caller.start_call(aor)
        await wait_for(lambda: sc.phone.calls, 10, "the VoIP push")
        await sc.caller.cancel()
        await asyncio.wait_for(answer, 10)
        (call_id,) = sc.phone.calls
        assert await sc.phone.learnt(call_id, 10) == "push:cancel"
        assert ("remote", "background") in [(k, t) for k, t, _ in sc.phone.pushes]
        await asyncio.wait_for(sc.phone.woke.wait(), 10)
        await asyncio.sleep(0)  # the phone is up: nothing for the ended call may reach it now
        assert sc.phone.ua is not None and sc.phone.ua.invites.empty()


async def test_timeout_then_late_wake_gets_cancel_and_a_missed_call_alert(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon: Any,
        apns: tuple[FakeApns, Path, Path], aor: str) -> None:
    async with scene(tmp_path, ensure_asterisk, ensure_redis, start_daemon, apns, aor, timeout=1,
                     wake_delay=3.0) as sc:
        resp = await asyncio.wait_for(sc.caller.call(aor), 15)
        assert resp.status >= 400  # nobody woke in time: the dialplan's answer
        (call_id,) = sc.phone.calls
        assert await sc.phone.learnt(call_id, 10) == "push:cancel"
        await wait_for(lambda: ("remote", "alert") in [(k, t) for k, t, _ in sc.phone.pushes], 10,
                       "missed-call alert")
        alert = next(p for k, t, p in sc.phone.pushes if t == "alert")
        assert alert["type"] == "missed-call" and "2000" in alert["aps"]["alert"]["loc-args"][0]  # the caller
        await asyncio.wait_for(sc.phone.woke.wait(), 10)
        assert sc.phone.ua is not None and sc.phone.ua.invites.empty()


async def test_answered_elsewhere_by_a_desk_phone(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon: Any,
        apns: tuple[FakeApns, Path, Path], aor: str) -> None:
    async with scene(tmp_path, ensure_asterisk, ensure_redis, start_daemon, apns, aor, wake_delay=1.5) as sc:
        await sc.desk.open()
        assert await sc.desk.register() == 200  # a desk phone on the same AOR: rung at once, answers
        resp = await asyncio.wait_for(sc.caller.call(aor), 15)
        assert resp.status == 200
        await wait_for(lambda: sc.phone.calls, 10, "the VoIP push")
        (call_id,) = sc.phone.calls
        assert await sc.phone.learnt(call_id, 10) == "push:answered-elsewhere"
        await sc.caller.hangup()
        await asyncio.wait_for(sc.desk.byes.get(), 5)


@pytest.mark.parametrize("ending", ["caller-gave-up", "answered-elsewhere"])
async def test_voip_only_iphone_learns_the_end_by_invite_and_cancel(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon: Any,
        apns: tuple[FakeApns, Path, Path], aor: str, ending: str) -> None:
    """No remote token: no push may tell it. When it re-registers it gets an INVITE for the
    call and a CANCEL with the RFC 3326 reason."""
    async with scene(tmp_path, ensure_asterisk, ensure_redis, start_daemon, apns, aor, dual=False,
                     wake_delay=2.0, answer=False) as sc:
        if ending == "answered-elsewhere":
            await sc.desk.open()
            assert await sc.desk.register() == 200
            assert (await asyncio.wait_for(sc.caller.call(aor), 15)).status == 200
        else:
            answer = sc.caller.start_call(aor)
            await wait_for(lambda: sc.phone.calls, 10, "the VoIP push")
            await sc.caller.cancel()
            await asyncio.wait_for(answer, 10)
        await wait_for(lambda: sc.phone.calls, 10, "the VoIP push")
        (call_id,) = sc.phone.calls
        how = await sc.phone.learnt(call_id, 15)
        if ending == "answered-elsewhere":
            assert how.startswith("cancel:") and 'SIP;cause=200;text="Call completed elsewhere"' in how
            await sc.caller.hangup()
        else:
            assert how.startswith("cancel:") and "completed elsewhere" not in how
        assert [(k, t) for k, t, _ in sc.phone.pushes] == [("voip", "voip")]  # nothing but the call
