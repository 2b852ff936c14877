"""The PBX's qualify decides whether a pushed phone's old UDP contact gets an INVITE.

Real Asterisk (AORs 3900-3903 qualify every 2 s, timeout 1 s), real Redis, the daemon, a local
vendor push service. A phone whose app is suspended behind a live socket answers nothing, so
Asterisk finds it Unreachable: it is pushed and never sent an INVITE it would get after its call
(over UDP Asterisk retransmits one for 32 s). An awake phone that answers OPTIONS but ignores the
push rings at once on its old contact, without the ``stale_ring_delay`` wait.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from ari_push.qualify import Reach
from rig.asterisk import QUALIFY_AOR_COUNT, QUALIFY_AOR_FIRST, AsteriskInstance
from rig.redis import RedisServer
from rig.sipua import SipUA
from tests.conftest import daemon_config, wait_for
from tests.integration.test_calls import PushEndpoint, no_channels, push_endpoint  # noqa: F401 (fixture)

_aors = itertools.count(QUALIFY_AOR_FIRST)


@pytest.fixture
def qaor() -> str:
    n = next(_aors)
    if n >= QUALIFY_AOR_FIRST + QUALIFY_AOR_COUNT:
        pytest.fail("out of qualified AORs: raise QUALIFY_AOR_COUNT in rig/asterisk.py")
    return str(n)


async def start(tmp_path: Path, asterisk: AsteriskInstance, redis: RedisServer, start_daemon, delay: float):
    extra = ('[capture]\nvendor_allowed_hosts = ["127.0.0.1:*"]\n'
             f'[calls]\ndefault_timeout = 4\nstale_ring_delay = {delay}\n'
             '[vendor]\nbody_template = \'{"type":"{kind}","call_id":"{call_id}"}\'\n')
    return await start_daemon(daemon_config(tmp_path, asterisk, redis.url, extra))


async def registered(asterisk: AsteriskInstance, aor: str, ep: PushEndpoint, rd) -> SipUA:
    phone = SipUA(aor, asterisk.ports.sip)
    await phone.open()
    assert await phone.register(f"X-PUSH-URI=http://127.0.0.1:{ep.port}/push/{aor}") == 200
    await wait_for(lambda: rd.daemon.store.bindings_for(aor), 5, "binding stored")
    return phone


async def test_phone_asleep_behind_a_live_socket_is_pushed_and_never_sent_an_invite(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        push_endpoint: PushEndpoint, qaor: str) -> None:  # noqa: F811
    rd = await start(tmp_path, ensure_asterisk, ensure_redis, start_daemon, delay=0.2)
    phone = await registered(ensure_asterisk, qaor, push_endpoint, rd)
    uri = phone.contact_uri
    phone.asleep = True  # the app is suspended: OPTIONS go unanswered
    await wait_for(lambda: rd.daemon.calls.reach.of(uri) is Reach.UNREACHABLE, 20, "Asterisk finds it unreachable")
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    resp = await asyncio.wait_for(caller.call(qaor), 15)
    assert resp.status == 480  # nobody woke: TIMEOUT, after its 4 s (20 times the 0.2 s stale delay)
    await wait_for(lambda: {"cancel", "missed-call"} <= set(push_endpoint.kinds()), 5, "cancel + missed-call")
    assert push_endpoint.kinds()[0] == "call"
    assert [m for m in phone.log if m.is_request and m.method == "INVITE"] == []  # not one INVITE reached it
    await wait_for(lambda: no_channels(ensure_asterisk), 5, "no channels left")
    # its contact was put back after the call: Asterisk still has it for the next one
    await wait_for(lambda: uri.split(";")[0] in ensure_asterisk.cli(f"pjsip show aor {qaor}").stdout, 5,
                   "contact put back")
    phone.asleep = False
    await phone.unregister()
    phone.close()
    caller.close()


async def test_awake_phone_answering_the_qualify_rings_at_once_on_its_old_contact(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        push_endpoint: PushEndpoint, qaor: str) -> None:  # noqa: F811
    rd = await start(tmp_path, ensure_asterisk, ensure_redis, start_daemon, delay=60)
    phone = await registered(ensure_asterisk, qaor, push_endpoint, rd)  # awake; ignores the push
    await wait_for(lambda: rd.daemon.calls.reach.of(phone.contact_uri) is Reach.REACHABLE, 20, "reachable")
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    answer = caller.start_call(qaor)
    invite = await asyncio.wait_for(phone.invites.get(), 15)  # well before the 60 s stale delay
    assert invite.uri == phone.contact_uri
    assert (await asyncio.wait_for(answer, 10)).status == 200
    assert await phone.hangup() == 200
    await asyncio.wait_for(caller.byes.get(), 5)
    await wait_for(lambda: no_channels(ensure_asterisk), 5, "no channels left")
    assert push_endpoint.kinds()[0] == "call"
    # it stays registered (its contact put back once it answered there): the next call rings it too
    answer = caller.start_call(qaor)
    assert (await asyncio.wait_for(phone.invites.get(), 15)).uri == phone.contact_uri
    assert (await asyncio.wait_for(answer, 10)).status == 200
    assert await phone.hangup() == 200
    await asyncio.wait_for(caller.byes.get(), 5)
    await phone.unregister()
    phone.close()
    caller.close()

