"""Call take-over end to end: a caller, a sleeping phone woken by a push, real Asterisk and Redis.

The phone registers with a Zoiper-style X-PUSH-URI pointing at a push endpoint served by
the test; a POST there wakes the phone (new socket), which re-registers and answers.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from ari_push.call_events import ARI_EVENT_TYPES
from rig.asterisk import AsteriskInstance
from rig.redis import RedisServer
from rig.sipua import SipUA
from tests.conftest import daemon_config, wait_for


@dataclass
class PushEndpoint:
    """A local vendor push service: records every push and wakes the phone on 'call'."""

    port: int = 0
    pushes: list[dict[str, str]] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)
    on_call: asyncio.Queue[dict[str, str]] = field(default_factory=asyncio.Queue)

    async def handle(self, request: web.Request) -> web.Response:
        body = json.loads(await request.text())
        self.pushes.append(body)
        self.received_at.append(time.monotonic())
        if body.get("type") == "call":
            self.on_call.put_nowait(body)
        return web.json_response({"ok": True})

    def kinds(self) -> list[str]:
        return [p["type"] for p in self.pushes]


@pytest.fixture
async def push_endpoint() -> AsyncIterator[PushEndpoint]:
    ep = PushEndpoint()
    app = web.Application()
    app.router.add_post("/push/{device}", ep.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    ep.port = runner.addresses[0][1]
    yield ep
    await runner.cleanup()


@pytest.fixture
async def call_daemon(tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon):
    extra = ('[capture]\nvendor_allowed_hosts = ["127.0.0.1:*"]\n'
             '[calls]\ndefault_timeout = 8\n'
             '[push]\nburst = 50\n'  # the latency test calls one phone many times in a row
             '[vendor]\nbody_template = \'{"type":"{kind}","call_id":"{call_id}","caller":"{caller_number}"}\'\n')
    return await start_daemon(daemon_config(tmp_path, ensure_asterisk, ensure_redis.url, extra))


async def sleeping_phone(asterisk: AsteriskInstance, aor: str, ep: PushEndpoint, store) -> SipUA:
    phone = SipUA(aor, asterisk.ports.sip)
    await phone.open()
    assert await phone.register(f"X-PUSH-URI=http://127.0.0.1:{ep.port}/push/{aor}") == 200
    await wait_for(lambda: store.bindings_for(aor), 5, "binding stored")
    phone.close()  # asleep: the contact stays registered in Asterisk, nobody listens
    return phone


async def wake_on_push(phone: SipUA, ep: PushEndpoint, same_port: bool, delay: float = 0.2) -> float:
    """Wait for the call push, 'wake' after ``delay``, re-register; return when REGISTER was sent."""
    old_port = phone.port
    await asyncio.wait_for(ep.on_call.get(), 10)
    await asyncio.sleep(delay)
    await phone.open(old_port if same_port else 0)
    sent = time.monotonic()
    assert await phone.register() == 200
    return sent


async def hang_up_and_check(phone: SipUA, caller: SipUA, asterisk: AsteriskInstance) -> None:
    """The phone hangs up; the BYE reaches the caller (ari-push carries it); nothing is left."""
    await phone.hangup()
    await asyncio.wait_for(caller.byes.get(), 5)
    phone.close()
    caller.close()
    await wait_for(lambda: no_channels(asterisk), 5, "no channels left")


def no_channels(asterisk: AsteriskInstance) -> bool:
    channels = asterisk.ari("GET", "/ari/channels")
    return channels == []


@pytest.mark.parametrize("same_port", [False, True], ids=["new-uri", "same-uri"])
async def test_sleeping_phone_is_woken_rung_bridged_and_hung_up(
        call_daemon, ensure_asterisk: AsteriskInstance, push_endpoint: PushEndpoint, aor: str, same_port: bool,
        capsys) -> None:
    store = call_daemon.daemon.store
    phone = await sleeping_phone(ensure_asterisk, aor, push_endpoint, store)
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    t_call = time.monotonic()
    answer = caller.start_call(aor)
    reregistered = await wake_on_push(phone, push_endpoint, same_port)
    invite = await asyncio.wait_for(phone.invites.get(), 5)
    resp = await asyncio.wait_for(answer, 10)
    assert resp.status == 200
    assert invite.uri == phone.contact_uri  # dialled by its exact, fresh URI
    assert invite.header("X-Ari-Push-Call-Id") == push_endpoint.pushes[0]["call_id"]
    # audio both ways through the bridge
    assert phone.rtp is not None and caller.rtp is not None
    await asyncio.gather(phone.rtp.send_for(0.6), caller.rtp.send_for(0.6))
    assert phone.rtp.received > 5 and caller.rtp.received > 5
    # the phone hangs up: the caller gets the BYE (ari-push propagates it)
    assert await phone.hangup() == 200
    bye = await asyncio.wait_for(caller.byes.get(), 5)
    assert bye.method == "BYE"
    await wait_for(lambda: no_channels(ensure_asterisk), 5, "no channels left")
    assert push_endpoint.kinds() == ["call"]  # answered: no cancel to the answering device
    # the call went through with Asterisk sending the app only the event types the flow reads
    app = ensure_asterisk.ari("GET", "/ari/applications/ari-push")
    assert isinstance(app, dict)
    assert {e["type"] for e in app["events_allowed"]} == set(ARI_EVENT_TYPES)
    with capsys.disabled():
        kind = "same" if same_port else "new"
        print(f"\n[{kind} URI] INVITE sent->push received {1000 * (push_endpoint.received_at[0] - t_call):.1f} ms;"
              f" re-REGISTER->INVITE {1000 * (invite.received - reregistered):.1f} ms")
    phone.close()
    caller.close()


async def test_caller_hangs_up_while_waiting_gets_cancel_push_and_no_orphans(
        call_daemon, ensure_asterisk: AsteriskInstance, push_endpoint: PushEndpoint, aor: str) -> None:
    phone = await sleeping_phone(ensure_asterisk, aor, push_endpoint, call_daemon.daemon.store)
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    answer = caller.start_call(aor)
    await asyncio.wait_for(push_endpoint.on_call.get(), 10)
    await caller.cancel()
    resp = await asyncio.wait_for(answer, 5)
    assert resp.status == 487
    await wait_for(lambda: "cancel" in push_endpoint.kinds(), 5, "cancel push")
    call_id = push_endpoint.pushes[0]["call_id"]
    assert all(p["call_id"] == call_id for p in push_endpoint.pushes)
    await wait_for(lambda: no_channels(ensure_asterisk), 5, "no channels left")
    # the phone wakes after the caller left: nothing rings it. The daemon has seen the
    # re-REGISTER once the stored binding is refreshed (it signals waiting calls before storing).
    before = (await call_daemon.daemon.store.bindings_for(aor))[0].last_seen
    await phone.open()
    assert await phone.register() == 200

    async def refreshed() -> bool:
        return any(b.last_seen > before for b in await call_daemon.daemon.store.bindings_for(aor))

    await wait_for(refreshed, 10, "the daemon saw the re-REGISTER")
    assert no_channels(ensure_asterisk) and phone.invites.empty()
    phone.close()
    caller.close()


async def test_nobody_wakes_timeout_continues_dialplan_with_status(
        call_daemon, ensure_asterisk: AsteriskInstance, push_endpoint: PushEndpoint, aor: str) -> None:
    await sleeping_phone(ensure_asterisk, aor, push_endpoint, call_daemon.daemon.store)
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    started = time.monotonic()
    resp = await asyncio.wait_for(caller.call(aor), 15)
    took = time.monotonic() - started
    assert resp.status == 480  # extensions.conf: TIMEOUT -> Hangup(19)
    assert took >= 7.5, took  # it waited for the 8 s timeout (how much longer is the bench's business)
    await wait_for(lambda: {"cancel", "missed-call"} <= set(push_endpoint.kinds()), 5, "cancel + missed-call")
    assert push_endpoint.kinds()[0] == "call"
    log = ensure_asterisk.log_text()
    assert "PUSH_STATUS=TIMEOUT" in log
    await wait_for(lambda: no_channels(ensure_asterisk), 5, "no channels left")
    caller.close()


@pytest.mark.parametrize("target", ["unknown", "empty"])
async def test_no_devices_is_immediate(call_daemon, ensure_asterisk: AsteriskInstance, aor: str, target: str) -> None:
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    started = time.monotonic()
    resp = await asyncio.wait_for(caller.call("98765" if target == "unknown" else aor), 10)
    assert resp.status == 480
    assert time.monotonic() - started < 6  # did not wait for the 8 s ring timeout (a generous bound)
    assert "PUSH_STATUS=NO_DEVICES" in ensure_asterisk.log_text()
    await wait_for(lambda: no_channels(ensure_asterisk), 5, "no channels left")
    caller.close()


async def test_phone_declines_caller_gets_busy(
        call_daemon, ensure_asterisk: AsteriskInstance, push_endpoint: PushEndpoint, aor: str) -> None:
    phone = await sleeping_phone(ensure_asterisk, aor, push_endpoint, call_daemon.daemon.store)
    phone.answer_code = 603
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    answer = caller.start_call(aor)
    await wake_on_push(phone, push_endpoint, same_port=False)
    resp = await asyncio.wait_for(answer, 10)
    assert resp.status == 486  # extensions.conf: DECLINED -> Busy()
    await wait_for(lambda: "cancel" in push_endpoint.kinds(), 5, "cancel push after decline")
    await wait_for(lambda: no_channels(ensure_asterisk), 5, "no channels left")
    phone.close()
    caller.close()


async def test_wake_latency_medians(call_daemon, ensure_asterisk: AsteriskInstance, push_endpoint: PushEndpoint,
                                    aor: str, capsys) -> None:
    """Measured, not asserted: re-REGISTER sent -> INVITE received, new and same URI."""
    store = call_daemon.daemon.store
    results: dict[str, list[float]] = {"new": [], "same": []}
    for i in range(6):
        same = i % 2 == 1
        phone = await sleeping_phone(ensure_asterisk, aor, push_endpoint, store)
        caller = SipUA("2000", ensure_asterisk.ports.sip)
        await caller.open()
        answer = caller.start_call(aor)
        sent = await wake_on_push(phone, push_endpoint, same_port=same, delay=0.05)
        invite = await asyncio.wait_for(phone.invites.get(), 5)
        results["same" if same else "new"].append((invite.received - sent) * 1000)
        assert invite.uri == phone.contact_uri  # each time dialled at its fresh contact
        assert (await asyncio.wait_for(answer, 10)).status == 200
        await hang_up_and_check(phone, caller, ensure_asterisk)
    with capsys.disabled():
        for k, v in results.items():
            print(f"\nre-REGISTER->INVITE, {k} URI: median {statistics.median(v):.1f} ms over {len(v)}")
