"""Whole calls through the providers for phones without Google or Apple: Huawei HMS Core (v1),
HarmonyOS (Push Kit v3) and Web Push (encrypted, and empty wake-ups), each against its strict
local service on TLS, with the real Asterisk and Redis: wake, cancel, timeout, dead token.

A phone registers with the provider's contact parameters and goes to sleep; the local service
hands every accepted push to the test, which "wakes" the phone on the call push.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rig.asterisk import AsteriskInstance
from rig.redis import RedisServer
from rig.sipua import SipUA
from tests.conftest import daemon_config, wait_for
from tests.fakes.hms import FakeHuawei
from tests.fakes.keys import Pki, ec_key, make_pki, private_pem
from tests.fakes.webpush import FakeWebPush
from tests.integration.test_calls import hang_up_and_check, no_channels

APP = "101234567"
PROJECT = "388421841221234567"
SECRET = "hms-client-secret-for-tests"
PROVIDERS = ["hms", "hmos", "webpush", "webpush-empty"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(Path(tmp_path_factory.mktemp("pki17")))


@dataclass
class Service:
    """One local push service as the test sees it: what the phone registers with, the pushes
    it accepted (decoded call fields plus the headers that matter), and how to kill a token."""

    kind: str
    extra: str
    pushes: list[dict[str, Any]] = field(default_factory=list)
    calls: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    fake: Any = None

    def record(self, fields: dict[str, Any]) -> None:
        self.pushes.append(fields)
        if fields.get("type") in ("call", None):  # an empty web push can only be the call
            self.calls.put_nowait(fields)

    def kinds(self) -> list[Any]:
        return [p.get("type") for p in self.pushes]

    def contact(self, aor: str, dead: bool = False) -> str:
        if self.kind == "hms":
            return f"pn-provider=hms;pn-prid={'dead' if dead else ''}IQAAAACy0aUZ{aor}AABfs3CF9QLKJ3l5mGJ6IH3eS;" \
                   f"pn-param={APP}"
        if self.kind == "hmos":
            return f"pn-provider=hmos;pn-prid={'dead' if dead else ''}MAMzLgAAAAAAb2hvc3Rva2Vu{aor}LXRlc3Qt;" \
                   f"pn-param={PROJECT}"
        sub = self.fake.subscribe(keys=self.kind == "webpush")
        if dead:
            self.fake.unsubscribe(sub)
        return str(sub.contact_params())


@pytest.fixture(params=PROVIDERS)
async def service(request: pytest.FixtureRequest, pki: Pki, tmp_path: Path) -> AsyncIterator[Service]:
    kind: str = request.param
    base = '[calls]\ndefault_timeout = 5\n[push]\nburst = 50\n'
    if kind in ("hms", "hmos"):
        fake = await FakeHuawei(pki).start()
        if kind == "hms":
            fake.add_app(APP, SECRET)
            extra = base + (f'[[hms]]\napp_id = "{APP}"\nclient_secret = "{SECRET}"\ntoken_url = "{fake.token_url}"\n'
                            f'api_url = "{fake.url}"\nca_file = "{pki.ca_file}"\n')
        else:
            account = fake.add_project(PROJECT)
            key_file = tmp_path / "hmos-service-account.json"
            key_file.write_text(account.json())
            extra = base + (f'[[hmos]]\nproject_id = "{PROJECT}"\nservice_account_file = "{key_file}"\n'
                            f'api_url = "{fake.url}"\nca_file = "{pki.ca_file}"\n')
        svc = Service(kind, extra, fake=fake)
        fake.on_request = lambda r: svc.record({**r.data, "_push_type": r.headers.get("push-type"),
                                                "_android": r.body.get("message", {}).get("android")})
    else:
        fake = await FakeWebPush(pki).start()
        vapid = tmp_path / "vapid.pem"
        vapid.write_text(private_pem(ec_key()))
        extra = ('[capture]\nwebpush_allowed_hosts = ["localhost:*"]\n'
                 f'[webpush]\nvapid_key_file = "{vapid}"\nsubject = "mailto:ops@example.com"\n'
                 f'ca_file = "{pki.ca_file}"\n'
                 + base)
        svc = Service(kind, extra, fake=fake)
        fake.on_push = lambda p: svc.record({**(p.message or {"type": None}), "_urgency": p.headers.get("Urgency"),
                                            "_topic": p.headers.get("Topic")})
    try:
        yield svc
    finally:
        await fake.stop()


@pytest.fixture
async def daemon(tmp_path: Path, service: Service, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer,
                 start_daemon):  # service first: the daemon stops before it (fixtures end in reverse order)
    return await start_daemon(daemon_config(tmp_path, ensure_asterisk, ensure_redis.url, service.extra))


async def sleeping_phone(asterisk: AsteriskInstance, aor: str, params: str, store) -> SipUA:
    phone = SipUA(aor, asterisk.ports.sip)
    await phone.open()
    assert await phone.register(params) == 200
    await wait_for(lambda: store.bindings_for(aor), 5, "binding stored")
    phone.close()
    return phone


async def test_wake_ring_bridge_hang_up(daemon, ensure_asterisk: AsteriskInstance, service: Service, aor: str,
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ari_push.capture")
    phone = await sleeping_phone(ensure_asterisk, aor, service.contact(aor), daemon.daemon.store)
    table = {"hms": "hms[0]", "hmos": "hmos[0]"}.get(service.kind, "[webpush]")
    assert any(f"served by {table}" in r.getMessage() for r in caplog.records), caplog.text
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    answer = caller.start_call(aor)
    push = await asyncio.wait_for(service.calls.get(), 10)
    await phone.open()
    assert await phone.register() == 200
    invite = await asyncio.wait_for(phone.invites.get(), 5)
    assert (await asyncio.wait_for(answer, 10)).status == 200
    assert invite.uri == phone.contact_uri
    if service.kind == "webpush-empty":
        assert push["type"] is None  # no subscription keys: an empty wake-up push
    else:
        assert push["type"] == "call" and invite.header("X-Ari-Push-Call-Id") == push["call_id"]
    if service.kind == "hms":
        assert push["_android"]["urgency"] == "HIGH" and push["_android"]["category"] == "VOIP"
    elif service.kind == "hmos":
        assert push["_push_type"] == "10"
    else:
        assert push["_urgency"] == "high" and len(push["_topic"]) == 32
    assert phone.rtp is not None and caller.rtp is not None
    await asyncio.gather(phone.rtp.send_for(0.4), caller.rtp.send_for(0.4))
    assert phone.rtp.received > 3 and caller.rtp.received > 3
    await hang_up_and_check(phone, caller, ensure_asterisk)
    assert len(service.pushes) == 1  # answered: no cancel to the answering device


async def test_caller_hangs_up_cancel_push(daemon, ensure_asterisk: AsteriskInstance, service: Service,
                                           aor: str) -> None:
    await sleeping_phone(ensure_asterisk, aor, service.contact(aor), daemon.daemon.store)
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    answer = caller.start_call(aor)
    await asyncio.wait_for(service.calls.get(), 10)
    await caller.cancel()
    assert (await asyncio.wait_for(answer, 5)).status == 487
    await wait_for(lambda: len(service.pushes) >= 2, 5, "cancel push")
    cancel = service.pushes[1]
    if service.kind == "webpush-empty":
        assert cancel["type"] is None
    else:
        assert cancel["type"] == "cancel" and cancel["call_id"] == service.pushes[0]["call_id"]
    if service.kind == "hmos":
        assert cancel["_push_type"] == "6"  # background: only the call itself is an in-app call message
    if service.kind.startswith("webpush"):
        assert cancel["_urgency"] == "high" and cancel["_topic"] == service.pushes[0]["_topic"]
    await wait_for(lambda: no_channels(ensure_asterisk), 5, "no channels left")
    caller.close()


async def test_nobody_wakes_timeout(daemon, ensure_asterisk: AsteriskInstance, service: Service, aor: str) -> None:
    await sleeping_phone(ensure_asterisk, aor, service.contact(aor), daemon.daemon.store)
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    started = time.monotonic()
    resp = await asyncio.wait_for(caller.call(aor), 15)
    took = time.monotonic() - started
    assert resp.status == 480
    assert 4.5 < took < 9, took
    await wait_for(lambda: len(service.pushes) >= 3, 5, "cancel and missed-call pushes")
    if service.kind != "webpush-empty":
        assert service.kinds() == ["call", "cancel", "missed-call"]
    if service.kind == "hms":
        assert [p["_android"]["urgency"] for p in service.pushes] == ["HIGH", "HIGH", "NORMAL"]
    if service.kind.startswith("webpush"):
        assert [p["_urgency"] for p in service.pushes] == ["high", "high", "normal"]
    assert "PUSH_STATUS=TIMEOUT" in ensure_asterisk.log_text()
    await wait_for(lambda: no_channels(ensure_asterisk), 5, "no channels left")
    caller.close()


async def test_dead_token_is_dropped(daemon, ensure_asterisk: AsteriskInstance, service: Service, aor: str) -> None:
    store = daemon.daemon.store
    await sleeping_phone(ensure_asterisk, aor, service.contact(aor, dead=True), store)
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    answer = caller.start_call(aor)
    # the service's answer drops it, not the registration's expiry (300 s away)
    await wait_for(lambda: _no_bindings(store, aor), 10, "dead binding dropped")
    resp = await asyncio.wait_for(answer, 15)
    assert resp.status == 480
    assert service.pushes == []  # refused by the service, delivered nowhere
    refusals = service.fake.refusals
    if service.kind.startswith("webpush"):
        assert refusals and refusals[-1][0] == 410
    await wait_for(lambda: no_channels(ensure_asterisk), 5, "no channels left")
    caller.close()


async def _no_bindings(store, aor: str) -> bool:
    return not await store.bindings_for(aor)

