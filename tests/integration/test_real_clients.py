"""Real SIP stacks as the phones: PJSIP (pjsua2) and liblinphone (linphonec), on the real rig.

Everything is real but the cloud: Asterisk 22, Redis, the ari-push daemon with its real FCM HTTP v1
provider (OAuth2 service-account flow included) pushing to the strict local FCM of tests/fakes,
and each client run as its own process (rig/pjsua_phone.py, rig/linphone_phone.py). The caller is
rig/sipua.py's SipUA.

Killed app: the client registers with push parameters, is SIGKILLed (no un-REGISTER: its contact
stays in Asterisk), is called; the push reaches the local FCM; the client is started again (a new
process on a new port) and re-registers; it is rung on its fresh contact, auto-answers, the caller
gets 200 OK, the caller's BYE ends both sides, and no channel is left. Awake phone: the client stays
up and is called twice in a row; both calls must be answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ari_push.qualify import Reach
from rig.asterisk import QUALIFY_AOR_COUNT, QUALIFY_AOR_FIRST, AsteriskInstance
from rig.demo import PROJECT, RecordingFcm, fcm_token
from rig.linphone_phone import LinphonePhone
from rig.phone_proc import PhoneProcess
from rig.pjsua_phone import PjsuaPhone
from rig.redis import RedisServer
from rig.sipua import SipUA
from tests.conftest import daemon_config, wait_for

CLIENTS = {"pjsua2": PjsuaPhone, "linphonec": LinphonePhone}


def rfc8599(token: str) -> str:
    return f"pn-provider=fcm;pn-prid={token};pn-param={PROJECT}"


def legacy(token: str) -> str:
    """Linphone's own form (what Linphone apps sent before RFC 8599)."""
    return f"pn-type=firebase;pn-tok={token};app-id={PROJECT}"


DIALECTS = {"rfc8599": rfc8599, "legacy": legacy}


@dataclass
class PushInbox:
    """What the local FCM accepted from the daemon, in order, with the time it arrived."""

    pushes: list[tuple[str, dict[str, Any], float]] = field(default_factory=list)
    calls: asyncio.Queue[tuple[str, dict[str, Any], float]] = field(default_factory=asyncio.Queue)

    def on_push(self, token: str, message: dict[str, Any], when: float) -> None:
        self.pushes.append((token, message, when))
        if message.get("data", {}).get("type") == "call":
            self.calls.put_nowait((token, message, when))

    def kinds(self, token: str) -> list[str]:
        return [m.get("data", {}).get("type", "") for t, m, _ in self.pushes if t == token]


@dataclass
class Rig:
    asterisk: AsteriskInstance
    daemon: Any
    inbox: PushInbox
    fcm: RecordingFcm


@contextlib.asynccontextmanager
async def make_rig(tmp_path: Path, asterisk: AsteriskInstance, redis: RedisServer, start_daemon: Any,
                   calls: str = "") -> AsyncIterator[Rig]:
    inbox = PushInbox()
    fcm = RecordingFcm(inbox.on_push)
    sa_file = tmp_path / "service-account.json"
    sa_file.write_text(await fcm.start())
    sa_file.chmod(0o600)
    extra = ("[calls]\ndefault_timeout = 15\n" + calls +
             "[push]\nburst = 50\n"
             f'[[fcm]]\nproject_id = "{PROJECT}"\nservice_account_file = "{sa_file}"\n'
             f'api_url = "{fcm.url}"\nca_file = "{fcm.ca_file}"\n')
    daemon = await start_daemon(daemon_config(tmp_path, asterisk, redis.url, extra))
    try:
        yield Rig(asterisk, daemon, inbox, fcm)
    finally:
        await daemon.stop()
        await fcm.stop()


@pytest.fixture
async def rig(tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer,
              start_daemon) -> AsyncIterator[Rig]:
    async with make_rig(tmp_path, ensure_asterisk, ensure_redis, start_daemon) as made:
        yield made


class Phones:
    """The client processes of one test, their logs under the test's tmp_path; every one is ended
    at teardown (SIGKILL if need be)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[PhoneProcess] = []

    def new(self, client: str, aor: str, server_port: int, transport: str, params: str) -> PhoneProcess:
        phone = CLIENTS[client](aor, server_port, transport, params,
                                workdir=self.tmp_path / f"{client}-{len(self.started)}")
        self.started.append(phone)
        return phone


@pytest.fixture
async def phones(tmp_path: Path) -> AsyncIterator[Phones]:
    made = Phones(tmp_path)
    yield made
    for phone in made.started:
        await phone.kill()


def no_channels(asterisk: AsteriskInstance) -> bool:
    return asterisk.ari("GET", "/ari/channels") == []


def contact_port(uri: str) -> int:
    m = re.match(r"sip:[^@]+@[^:;>]+:(\d+)", uri)
    assert m, uri
    return int(m.group(1))


async def registered_contacts(asterisk: AsteriskInstance, aor: str) -> list[str]:
    """The AOR's contact URIs as Asterisk stores them (ARI's view of the pjsip config)."""
    attrs = await asyncio.to_thread(asterisk.ari, "GET", f"/ari/asterisk/config/dynamic/res_pjsip/aor/{aor}")
    assert isinstance(attrs, list)
    return sorted(u.strip() for a in attrs if a.get("attribute") == "contact" for u in str(a["value"]).split(",")
                  if u.strip())


async def start_client(rig: Rig, phones: Phones, client: str, aor: str, transport: str, params: str) -> PhoneProcess:
    phone = phones.new(client, aor, rig.asterisk.ports.sip, transport, params)
    reg = await phone.start(timeout=20)
    assert reg["code"] == 200
    await wait_for(lambda: rig.daemon.daemon.store.bindings_for(aor), 10, f"{client}'s push token captured")
    return phone


async def call_and_finish(rig: Rig, phone: PhoneProcess, aor: str) -> tuple[dict[str, Any], float]:
    """Call ``aor``; the client answers; the caller hangs up; both ends see the call end.
    Returns the client's ``incoming`` event and when the caller got its 200 OK."""
    caller = SipUA("2000", rig.asterisk.ports.sip)
    await caller.open()
    try:
        resp = await asyncio.wait_for(caller.call(aor, timeout=30), 35)
        assert resp.status == 200, f"caller got {resp.status}, not 200\n{phone.tail()}"
        incoming = await phone.expect("incoming", 5)
        await phone.expect("confirmed", 5)
        assert await caller.hangup() == 200  # the BYE reaches the client through ari-push's bridge
        await phone.expect("disconnected", 10)
        await wait_for(lambda: no_channels(rig.asterisk), 10, "no channels left")
        return incoming, resp.received
    finally:
        caller.close()


CASES = [("pjsua2", "rfc8599"), ("linphonec", "rfc8599"), ("linphonec", "legacy")]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize(("client", "dialect"), CASES, ids=[f"{c}-{d}" for c, d in CASES])
async def test_killed_client_is_pushed_restarts_on_a_new_port_and_answers(
        rig: Rig, phones: Phones, aor: str, client: str, dialect: str, transport: str) -> None:
    token = fcm_token()
    phone = await start_client(rig, phones, client, aor, transport, DIALECTS[dialect](token))
    (old_contact,) = await registered_contacts(rig.asterisk, aor)
    assert f"pn-{'prid' if dialect == 'rfc8599' else 'tok'}={token}" in old_contact
    await phone.kill()  # the OS kills the app: no un-REGISTER
    assert await registered_contacts(rig.asterisk, aor) == [old_contact]

    caller = SipUA("2000", rig.asterisk.ports.sip)
    await caller.open()
    try:
        answer = caller.start_call(aor, timeout=30)
        pushed_token, message, _ = await asyncio.wait_for(rig.inbox.calls.get(), 15)
        assert pushed_token == token  # the daemon's FCM provider, to the token the client registered
        assert message["android"]["priority"] == "high"
        push_call_id = message["data"]["call_id"]

        await phone.start(timeout=20)  # woken by the push: a new process, a new port
        incoming = await phone.expect("incoming", 10)
        resp = await asyncio.wait_for(answer, 30)
        assert resp.status == 200, f"caller got {resp.status}\n{phone.tail()}"
        assert contact_port(incoming["uri"]) != contact_port(old_contact)  # rung on the fresh contact
        assert f"={token}" in incoming["uri"]
        assert incoming["x_ari_push_call_id"] == push_call_id
        await phone.expect("confirmed", 5)
        assert await caller.hangup() == 200
        await phone.expect("disconnected", 10)
        await wait_for(lambda: no_channels(rig.asterisk), 10, "no channels left")
        assert phone.pending("incoming") == 0  # rung once: no second INVITE for the call
        assert rig.inbox.kinds(token) == ["call"]  # answered: no cancel push to the device that took it
    finally:
        caller.close()
    contacts = await registered_contacts(rig.asterisk, aor)
    assert len(contacts) == 1, contacts
    (fresh,) = contacts  # the woken process's; the killed one's is gone
    assert contact_port(fresh) == contact_port(incoming["uri"])
    await phone.quit()
    assert await registered_contacts(rig.asterisk, aor) == []  # a polite exit un-registers (a kill does not)


AWAKE = ["pjsua2", "linphonec"]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("client", AWAKE)
async def test_awake_client_answers_two_calls_in_a_row(
        rig: Rig, phones: Phones, aor: str, client: str, transport: str) -> None:
    token = fcm_token()
    phone = await start_client(rig, phones, client, aor, transport, rfc8599(token))
    for n in (1, 2):
        started = time.monotonic()
        incoming, _ = await call_and_finish(rig, phone, aor)
        assert f"={token}" in incoming["uri"], f"call {n}"
        assert time.monotonic() - started < 30
    assert phone.running  # the same process answered both: it never restarted
    assert phone.starts == 1
    assert len(await registered_contacts(rig.asterisk, aor)) == 1  # still registered, once
    await phone.quit()


@pytest.mark.parametrize("client", AWAKE)
async def test_awake_client_on_a_qualified_aor_rings_at_once_without_re_registering(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon: Any,
        phones: Phones, client: str) -> None:
    """The client answers Asterisk's OPTIONS, so the daemon knows it is awake: its old UDP contact
    rings at once, not after stale_ring_delay (60 s here), on every call. The top of the qualified
    AOR range (test_qualify.py takes from the bottom)."""
    aor = str(QUALIFY_AOR_FIRST + QUALIFY_AOR_COUNT - 1 - AWAKE.index(client))
    async with make_rig(tmp_path, ensure_asterisk, ensure_redis, start_daemon, "stale_ring_delay = 60\n") as rig:
        token = fcm_token()
        phone = await start_client(rig, phones, client, aor, "udp", rfc8599(token))
        (contact,) = await registered_contacts(rig.asterisk, aor)
        reach = rig.daemon.daemon.calls.reach
        await wait_for(lambda: reach.of(contact) is Reach.REACHABLE, 20, f"{client} answers the qualify")
        for n in (1, 2):
            started = time.monotonic()
            incoming, _ = await call_and_finish(rig, phone, aor)
            assert f"={token}" in incoming["uri"], f"call {n}"
            assert time.monotonic() - started < 30  # well inside the 60 s a stale ring would wait
            assert rig.inbox.kinds(token)[:1] == ["call"]  # it was pushed all the same
        assert phone.running and phone.starts == 1
        assert await registered_contacts(rig.asterisk, aor) == [contact]  # still registered, once
        await phone.quit()


@pytest.mark.parametrize("client", AWAKE)
async def test_client_hangs_up_and_the_caller_gets_the_bye(
        rig: Rig, phones: Phones, aor: str, client: str) -> None:
    """One call to an awake client, which hangs up itself: its BYE reaches the caller."""
    token = fcm_token()
    phone = await start_client(rig, phones, client, aor, "udp", rfc8599(token))
    caller = SipUA("2000", rig.asterisk.ports.sip)
    await caller.open()
    try:
        resp = await asyncio.wait_for(caller.call(aor, timeout=30), 35)
        assert resp.status == 200, f"caller got {resp.status}\n{phone.tail()}"
        incoming = await phone.expect("incoming", 5)
        assert f"={token}" in incoming["uri"]
        await phone.expect("confirmed", 5)
        await phone.hangup()
        bye = await asyncio.wait_for(caller.byes.get(), 10)
        assert bye.method == "BYE"
        await phone.expect("disconnected", 10)
        await wait_for(lambda: no_channels(rig.asterisk), 10, "no channels left")
    finally:
        caller.close()
    await phone.quit()
