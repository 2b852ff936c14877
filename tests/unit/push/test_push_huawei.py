"""Huawei Push Kit providers (push/huawei.py) against the strict local Push Kit (tests/fakes/hms.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from ari_push.model import PushKind, PushOutcome
from ari_push.push.dispatch import PushDispatcher
from ari_push.push.huawei import HmosProvider, HmsProvider
from ari_push.settings import HmosProject, HmsApp, Secret, SettingsError
from tests.fakes.builders import binding, message
from tests.fakes.hms import FakeHuawei, HuaweiAnswer
from tests.fakes.keys import Pki

APP = "101234567"
PROJECT = "388421841221234567"
SECRET = "client-secret-0123456789"
TOKEN = "IQAAAACy0aUZAABfs3CF9QLKJ3l5mGJ6IH3eSoEsSGodcr0xw0_TwDbQ7rdvUJsmDfOnsK9cg"
HMOS_TOKEN = "MAMzLgAAAAAAb2hvc3Rva2VuLXRlc3QtMDEyMzQ1Njc4OWFiY2RlZg"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def huawei(pki: Pki, clock: Clock) -> AsyncIterator[FakeHuawei]:
    fake = await FakeHuawei(pki, clock=clock).start()
    fake.add_app(APP, SECRET)
    try:
        yield fake
    finally:
        await fake.stop()


def hms_app(fake: FakeHuawei, pki: Pki, **kw: object) -> HmsApp:
    args: dict[str, object] = {"app_id": APP, "client_id": APP, "client_secret": Secret(SECRET),
                               "token_url": fake.token_url, "api_url": fake.url, "ca_file": str(pki.ca_file),
                               "timeout": 2.0}
    args.update(kw)
    return HmsApp(**args)  # type: ignore[arg-type]


@pytest.fixture
async def hms(huawei: FakeHuawei, pki: Pki, clock: Clock) -> AsyncIterator[HmsProvider]:
    provider = HmsProvider(hms_app(huawei, pki), clock=clock)
    try:
        yield provider
    finally:
        await provider.aclose()


def hmos_project(fake: FakeHuawei, pki: Pki, account_json: str, **kw: object) -> HmosProject:
    args: dict[str, object] = {"project_id": PROJECT, "service_account": Secret(account_json), "api_url": fake.url,
                               "ca_file": str(pki.ca_file), "timeout": 2.0}
    args.update(kw)
    return HmosProject(**args)  # type: ignore[arg-type]


# ---------------------------------------------------------------- HMS Core v1


async def test_hms_call_is_a_high_urgency_voip_data_message(hms: HmsProvider, huawei: FakeHuawei,
                                                          clock: Clock) -> None:
    msg = message(deadline=clock.now + 27.6, call_id="c-42")
    result = await hms.send(binding("hms", TOKEN, APP), msg)
    assert result.outcome is PushOutcome.DELIVERED, result
    (req,) = huawei.requests
    assert req.api == "v1" and req.target == APP and req.token == TOKEN
    android = req.body["message"]["android"]
    assert android == {"urgency": "HIGH", "ttl": "27s", "bi_tag": "c-42", "category": "VOIP"}
    assert req.data == {"type": "call", "call_id": "c-42", "caller_number": "+15551230000", "caller_name": "Bob",
                        "callee": "alice", "deadline": str(int(msg.deadline))}
    assert req.headers["Authorization"].startswith("Bearer DQEDA")


async def test_hms_missed_call_goes_normal_without_category(hms: HmsProvider, huawei: FakeHuawei) -> None:
    assert (await hms.send(binding("hms", TOKEN, APP), message(PushKind.MISSED_CALL))).outcome is PushOutcome.DELIVERED
    android = huawei.requests[0].body["message"]["android"]
    assert android["urgency"] == "NORMAL" and "category" not in android


async def test_hms_one_access_token_for_many_concurrent_pushes(hms: HmsProvider, huawei: FakeHuawei) -> None:
    results = await asyncio.gather(*(hms.send(binding("hms", f"{TOKEN}{i:03d}", APP), message())
                                     for i in range(30)))
    assert {r.outcome for r in results} == {PushOutcome.DELIVERED}
    assert huawei.token_issuances == 1 and hms.token_fetches == 1


async def test_hms_token_refreshed_before_it_expires(hms: HmsProvider, huawei: FakeHuawei, clock: Clock) -> None:
    await hms.send(binding("hms", TOKEN, APP), message())
    clock.now += 3600 - 299  # inside the 5-minute margin
    assert (await hms.send(binding("hms", TOKEN, APP), message(deadline=clock.now + 30))).outcome \
        is PushOutcome.DELIVERED
    assert huawei.token_issuances == 2
    assert not huawei.refusals


async def test_hms_refused_token_is_refreshed_once(hms: HmsProvider, huawei: FakeHuawei) -> None:
    await hms.send(binding("hms", TOKEN, APP), message())
    huawei.revoke_access_tokens()
    assert (await hms.send(binding("hms", TOKEN, APP), message())).outcome is PushOutcome.DELIVERED
    assert [c for c, _ in huawei.refusals] == ["80200001"]
    assert hms.token_fetches == 2


async def test_hms_dead_token_is_token_dead_and_dropped(hms: HmsProvider) -> None:
    dropped: list[str] = []

    async def on_dead(b, r) -> None:  # type: ignore[no-untyped-def]
        dropped.append(b.push.token)

    dispatcher = PushDispatcher([hms], on_dead)
    result = await dispatcher.send(binding("hms", "dead" + TOKEN, APP), message())
    assert result.outcome is PushOutcome.TOKEN_DEAD and result.reason.startswith("80300007")
    assert dropped == ["dead" + TOKEN]


async def test_hms_wrong_secret_fails_without_showing_it(huawei: FakeHuawei, pki: Pki, clock: Clock) -> None:
    provider = HmsProvider(hms_app(huawei, pki, client_secret=Secret("not-the-secret-xyz")), clock=clock)
    try:
        result = await provider.send(binding("hms", TOKEN, APP), message())
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.FAILED and "1101" in result.reason and "invalid client" in result.reason
    assert "not-the-secret" not in result.reason
    assert not huawei.requests


async def test_hms_url_names_the_oauth_client_id(huawei: FakeHuawei, pki: Pki, clock: Clock) -> None:
    """An app whose OAuth client id differs from its app id: the URL carries the client id (the
    local service refuses a token used under another id with 80300002, test_push_fakes_hms_webpush)."""
    huawei.add_app(APP, "other-secret", client_id="109999999")
    provider = HmsProvider(hms_app(huawei, pki, client_id="109999999", client_secret=Secret("other-secret")),
                           clock=clock)
    try:
        result = await provider.send(binding("hms", TOKEN, APP), message())
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.DELIVERED, result
    assert huawei.requests[0].target == "109999999"


@pytest.mark.parametrize(("answer", "outcome"), [
    (HuaweiAnswer("81000001", "System inner error"), PushOutcome.RETRY),
    (HuaweiAnswer("80600003", "Request OAuth service failed"), PushOutcome.RETRY),
    (HuaweiAnswer("80100001", "Parameters check error"), PushOutcome.FAILED),
    (HuaweiAnswer("80300002", "APP is forbidden to send"), PushOutcome.FAILED),
    (HuaweiAnswer("80100000", json.dumps({"success": 0, "failure": 1, "illegal_tokens": [TOKEN]})),
     PushOutcome.TOKEN_DEAD),
])
async def test_hms_result_codes(hms: HmsProvider, huawei: FakeHuawei, answer: HuaweiAnswer,
                                outcome: PushOutcome) -> None:
    huawei.script(TOKEN, answer)
    result = await hms.send(binding("hms", TOKEN, APP), message())
    assert result.outcome is outcome, result
    assert result.reason.startswith(answer.code)


async def test_hms_flow_control_503_honours_retry_after(hms: HmsProvider, huawei: FakeHuawei) -> None:
    huawei.script(TOKEN, HuaweiAnswer("", "", status=503, retry_after="7"))
    result = await hms.send(binding("hms", TOKEN, APP), message())
    assert result.outcome is PushOutcome.RETRY and result.retry_after == 7.0


async def test_hms_oversized_extras_are_dropped_then_too_big_fails(hms: HmsProvider, huawei: FakeHuawei) -> None:
    big = message(extra=(("note", "x" * 5000),))
    assert (await hms.send(binding("hms", TOKEN, APP), big)).outcome is PushOutcome.DELIVERED
    assert "note" not in huawei.requests[0].data
    huge = message(caller_name="y" * 5000)
    result = await hms.send(binding("hms", TOKEN, APP), huge)
    assert result.outcome is PushOutcome.FAILED and "4096" in result.reason
    assert len(huawei.requests) == 1  # nothing sent


async def test_hms_unverified_certificate_is_failed(huawei: FakeHuawei, pki: Pki, clock: Clock) -> None:
    provider = HmsProvider(hms_app(huawei, pki, ca_file=""), clock=clock)
    try:
        result = await provider.send(binding("hms", TOKEN, APP), message())
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.FAILED and "TLS certificate not verified" in result.reason


def test_hms_serves_only_its_app() -> None:
    provider = HmsProvider(HmsApp(APP, APP, Secret(SECRET)))
    assert provider.serves(binding("hms", TOKEN, APP))
    assert not provider.serves(binding("hms", TOKEN, "109999999"))
    assert not provider.serves(binding("hmos", TOKEN, APP))


# ---------------------------------------------------------------- HarmonyOS v3


async def test_hmos_call_is_push_type_10_others_background(huawei: FakeHuawei, pki: Pki, clock: Clock) -> None:
    account = huawei.add_project(PROJECT)
    provider = HmosProvider(hmos_project(huawei, pki, account.json()), clock=clock)
    try:
        for kind in (PushKind.CALL, PushKind.CANCEL, PushKind.MISSED_CALL):
            result = await provider.send(binding("hmos", HMOS_TOKEN, PROJECT), message(kind, deadline=clock.now + 20.5))
            assert result.outcome is PushOutcome.DELIVERED, result
    finally:
        await provider.aclose()
    assert [r.headers["push-type"] for r in huawei.requests] == ["10", "6", "6"]
    first = huawei.requests[0]
    assert first.body["target"] == {"token": [HMOS_TOKEN]}
    assert first.body["pushOptions"]["ttl"] == 20 and first.body["pushOptions"]["biTag"] == "call-1"
    assert first.data["type"] == "call" and huawei.requests[1].data["type"] == "cancel"
    assert provider.jwt_signings == 1  # one JWT for the three pushes


async def test_hmos_jwt_re_signed_before_expiry(huawei: FakeHuawei, pki: Pki, clock: Clock) -> None:
    account = huawei.add_project(PROJECT)
    provider = HmosProvider(hmos_project(huawei, pki, account.json()), clock=clock)
    try:
        await provider.send(binding("hmos", HMOS_TOKEN, PROJECT), message(deadline=clock.now + 30))
        clock.now += 3400
        result = await provider.send(binding("hmos", HMOS_TOKEN, PROJECT), message(deadline=clock.now + 30))
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.DELIVERED and provider.jwt_signings == 2
    assert not huawei.refusals


async def test_hmos_no_call_right_is_failed_not_token_dead(huawei: FakeHuawei, pki: Pki, clock: Clock) -> None:
    account = huawei.add_project(PROJECT, call_right=False)
    provider = HmosProvider(hmos_project(huawei, pki, account.json()), clock=clock)
    fallback = HmosProvider(hmos_project(huawei, pki, account.json(), call_push_type=6), clock=clock)
    try:
        result = await provider.send(binding("hmos", HMOS_TOKEN, PROJECT), message())
        assert result.outcome is PushOutcome.FAILED and "call_push_type = 6" in result.reason
        assert (await fallback.send(binding("hmos", HMOS_TOKEN, PROJECT), message())).outcome \
            is PushOutcome.DELIVERED
    finally:
        await provider.aclose()
        await fallback.aclose()
    assert huawei.requests[0].headers["push-type"] == "6"


async def test_hmos_dead_token(huawei: FakeHuawei, pki: Pki, clock: Clock) -> None:
    account = huawei.add_project(PROJECT)
    provider = HmosProvider(hmos_project(huawei, pki, account.json()), clock=clock)
    try:
        result = await provider.send(binding("hmos", "dead" + HMOS_TOKEN, PROJECT), message())
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.TOKEN_DEAD and result.reason.startswith("80300007")


async def test_hmos_key_from_another_project_is_refused(huawei: FakeHuawei, pki: Pki, clock: Clock) -> None:
    other = huawei.add_project("388421841229999999")
    data = json.loads(other.json())
    data.pop("project_id")  # a key file without project_id: only Huawei can tell
    provider = HmosProvider(hmos_project(huawei, pki, json.dumps(data)), clock=clock)
    try:
        result = await provider.send(binding("hmos", HMOS_TOKEN, PROJECT), message())
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.FAILED and result.reason.startswith("80300002")


def test_hmos_service_account_checked_at_start(huawei: FakeHuawei, pki: Pki) -> None:
    account = huawei.add_project("388421841229999999")
    with pytest.raises(SettingsError, match="belongs to project 388421841229999999"):
        HmosProvider(hmos_project(huawei, pki, account.json()))
    with pytest.raises(SettingsError, match="not valid JSON"):
        HmosProvider(hmos_project(huawei, pki, "{nope"))
    data = json.loads(account.json())
    data["private_key"] = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    with pytest.raises(SettingsError) as info:
        HmosProvider(hmos_project(huawei, pki, json.dumps(data), project_id="388421841229999999"))
    assert "AAAA" not in str(info.value) and "private_key" in str(info.value)
