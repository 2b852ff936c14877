"""FCM HTTP v1 provider against the strict fake (OAuth endpoint + messages:send)."""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import time

import pytest

from ari_push.model import PushKind, PushOutcome
from ari_push.push.fcm import FcmProvider
from ari_push.settings import FcmProject, Secret, SettingsError
from tests.fakes import FakeFcm, FcmAnswer, TokenAnswer
from tests.fakes.builders import binding, fcm_token, message
from tests.fakes.keys import ServiceAccountKey

TOKEN = fcm_token(1)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_call_is_a_data_only_high_priority_message(fake_fcm: FakeFcm, fcm_project: FcmProject) -> None:
    provider = FcmProvider(fcm_project)
    msg = message(ring=25.7, extra=(("call_uuid", "6c1e"), ("google.x", "no"), ("from", "no")))
    try:
        result = await provider.send(binding("fcm", TOKEN, "proj-a"), msg)
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.DELIVERED, result
    (req,) = fake_fcm.requests
    assert req.project == "proj-a" and req.target == TOKEN
    sent = req.body["message"]
    assert set(sent) == {"token", "data", "android"}  # data-only: no notification block
    assert sent["data"] == {
        "type": "call", "call_id": "call-1", "caller_number": "+15551230000", "caller_name": "Bob",
        "callee": "alice", "deadline": str(int(msg.deadline)), "call_uuid": "6c1e",
    }
    assert sent["android"]["priority"] == "high"
    assert sent["android"]["ttl"] in ("25s", "24s")
    assert fake_fcm.token_issuances == 1


async def test_missed_call_is_normal_priority_and_ttl_never_negative(
    fake_fcm: FakeFcm, fcm_project: FcmProject
) -> None:
    provider = FcmProvider(fcm_project)
    try:
        result = await provider.send(binding("fcm", TOKEN, "proj-a"),
                                     message(PushKind.MISSED_CALL, deadline=time.time() - 5))
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.DELIVERED
    android = fake_fcm.requests[0].body["message"]["android"]
    assert android == {"priority": "normal", "ttl": "0s", "collapse_key": "call-1"}  # one key per call


async def test_access_token_is_cached_across_pushes(fake_fcm: FakeFcm, fcm_project: FcmProject) -> None:
    provider = FcmProvider(fcm_project)
    try:
        results = await asyncio.gather(*(provider.send(binding("fcm", fcm_token(i), "proj-a"), message())
                                         for i in range(20)))
    finally:
        await provider.aclose()
    assert {r.outcome for r in results} == {PushOutcome.DELIVERED}
    assert fake_fcm.token_issuances == 1  # one refresh at a time, shared by all 20
    assert len(fake_fcm.requests) == 20


async def test_token_refreshed_before_expiry(sa_keys: dict[str, ServiceAccountKey]) -> None:
    clock = Clock()
    fake = await FakeFcm(clock=clock, token_lifetime=3600).start()
    try:
        project = FcmProject("proj-a", Secret(fake.add_project("proj-a", sa_keys["proj-a"])), api_url=fake.url,
                               ca_file=fake.ca_file)
        provider = FcmProvider(project, clock=clock)
        b = binding("fcm", TOKEN, "proj-a")
        assert (await provider.send(b, message())).outcome is PushOutcome.DELIVERED
        clock.now += 3000  # 10 min before expiry: still good
        assert (await provider.send(b, message(deadline=clock.now + 30))).outcome is PushOutcome.DELIVERED
        assert fake.token_issuances == 1
        clock.now += 360  # inside the 5-minute margin: refresh before using it
        assert (await provider.send(b, message(deadline=clock.now + 30))).outcome is PushOutcome.DELIVERED
        assert fake.token_issuances == 2
        assert fake.refusals == []  # never sent an expired token
        await provider.aclose()
    finally:
        await fake.stop()


async def test_refresh_on_401_once(fake_fcm: FakeFcm, fcm_project: FcmProject) -> None:
    provider = FcmProvider(fcm_project)
    b = binding("fcm", TOKEN, "proj-a")
    try:
        assert (await provider.send(b, message())).outcome is PushOutcome.DELIVERED
        fake_fcm.revoke_access_tokens()
        results = await asyncio.gather(*(provider.send(b, message()) for _ in range(5)))
    finally:
        await provider.aclose()
    assert {r.outcome for r in results} == {PushOutcome.DELIVERED}
    assert fake_fcm.token_issuances == 2  # five 401s, one refresh
    assert [r["status"] for r in fake_fcm.refusals] == ["UNAUTHENTICATED"] * 5


async def test_bad_signing_key_fails_without_retry(
    fake_fcm: FakeFcm, sa_keys: dict[str, ServiceAccountKey]
) -> None:
    fake_fcm.add_project("proj-a", sa_keys["proj-a"])
    # proj-b's key file, but claiming to be proj-a's account: the fake checks the signature
    forged = json.loads(sa_keys["proj-b"].json(fake_fcm.token_url))
    forged["client_email"] = sa_keys["proj-a"].client_email
    forged.pop("private_key_id")
    project = FcmProject("proj-a", Secret(json.dumps(forged)), api_url=fake_fcm.url, ca_file=fake_fcm.ca_file)
    provider = FcmProvider(project)
    try:
        result = await provider.send(binding("fcm", TOKEN, "proj-a"), message())
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.FAILED
    assert "invalid_grant" in result.reason
    assert fake_fcm.token_refusals == ["invalid_grant: Invalid JWT Signature."]
    assert fake_fcm.requests == []


@pytest.mark.parametrize(
    ("answer", "outcome", "retry_after"),
    [
        (FcmAnswer.error(404, "UNREGISTERED", "Requested entity was not found."), PushOutcome.TOKEN_DEAD, None),
        (FcmAnswer.error(400, "INVALID_ARGUMENT", "The registration token is not a valid FCM registration token"),
         PushOutcome.FAILED, None),
        (FcmAnswer.error(403, "SENDER_ID_MISMATCH", "SenderId mismatch"), PushOutcome.FAILED, None),
        (FcmAnswer.error(401, "THIRD_PARTY_AUTH_ERROR", "APNs auth error"), PushOutcome.FAILED, None),
        (FcmAnswer.error(429, "QUOTA_EXCEEDED", "quota", retry_after="7"), PushOutcome.RETRY, 7.0),
        (FcmAnswer.error(503, "UNAVAILABLE", "busy", retry_after="3"), PushOutcome.RETRY, 3.0),
        (FcmAnswer.error(500, "INTERNAL", "oops"), PushOutcome.RETRY, None),
    ],
)
async def test_error_mapping(fake_fcm: FakeFcm, fcm_project: FcmProject, answer: FcmAnswer,
                             outcome: PushOutcome, retry_after: float | None) -> None:
    fake_fcm.script(fcm_token("x"), answer)
    provider = FcmProvider(fcm_project)
    try:
        result = await provider.send(binding("fcm", fcm_token("x"), "proj-a"), message())
    finally:
        await provider.aclose()
    assert result.outcome is outcome, result
    assert result.status == answer.status
    assert result.retry_after == retry_after
    code = answer.body["error"]["details"][0]["errorCode"] if answer.body else ""
    assert code in result.reason
    assert fake_fcm.token_issuances == 1  # THIRD_PARTY_AUTH_ERROR is not our OAuth token


async def test_unregistered_token_is_dead(fake_fcm: FakeFcm, fcm_project: FcmProject) -> None:
    fake_fcm.unregister(fcm_token("gone"))
    provider = FcmProvider(fcm_project)
    try:
        result = await provider.send(binding("fcm", fcm_token("gone"), "proj-a"), message())
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.TOKEN_DEAD and "UNREGISTERED" in result.reason


async def test_network_error_and_timeout_are_retry(fake_fcm: FakeFcm, fcm_project: FcmProject) -> None:
    fake_fcm.script(fcm_token("slow"), FcmAnswer(stall=True))
    provider = FcmProvider(dataclasses.replace(fcm_project, timeout=0.3))
    try:
        slow = await provider.send(binding("fcm", fcm_token("slow"), "proj-a"), message())
    finally:
        await provider.aclose()
    assert slow.outcome is PushOutcome.RETRY and "timeout" in slow.reason

    down = FcmProvider(dataclasses.replace(fcm_project, api_url="http://127.0.0.1:9"))
    try:
        result = await down.send(binding("fcm", TOKEN, "proj-a"), message())
    finally:
        await down.aclose()
    assert result.outcome is PushOutcome.RETRY and "network error" in result.reason


async def test_serves_by_project_and_default(fcm_project: FcmProject) -> None:
    only = FcmProvider(fcm_project, default=True)
    other = FcmProvider(fcm_project)
    assert only.serves(binding("fcm", "t", "proj-a"))
    assert only.serves(binding("fcm", "t", ""))
    assert not other.serves(binding("fcm", "t", ""))
    assert not only.serves(binding("fcm", "t", "proj-b"))
    assert not only.serves(binding("apns", "t", "proj-a"))


def test_bad_service_account_names_field_not_key() -> None:
    with pytest.raises(SettingsError, match="service_account") as info:
        FcmProvider(FcmProject("p", Secret('{"client_email": "x", "token_uri": "u", '
                                           '"private_key": "-----BEGIN PRIVATE KEY-----\\nAAAA"}')))
    assert "AAAA" not in str(info.value)
    with pytest.raises(SettingsError, match="not valid JSON"):
        FcmProvider(FcmProject("p", Secret("nope")))


async def test_oversized_data_fails_before_sending(fake_fcm: FakeFcm, fcm_project: FcmProject) -> None:
    provider = FcmProvider(fcm_project)
    try:
        big_extra = await provider.send(binding("fcm", TOKEN, "proj-a"), message(extra=(("blob", "x" * 5000),)))
        too_big = await provider.send(binding("fcm", TOKEN, "proj-a"), message(caller_name="x" * 5000))
    finally:
        await provider.aclose()
    assert big_extra.outcome is PushOutcome.DELIVERED  # extras dropped first
    assert "blob" not in fake_fcm.requests[0].body["message"]["data"]
    assert too_big.outcome is PushOutcome.FAILED and "4096" in too_big.reason
    assert len(fake_fcm.requests) == 1


# ---------------------------------------------------------------- what the strict fake refuses, handled


async def test_token_not_of_the_fcm_shape_is_failed_not_dead(fake_fcm: FakeFcm, fcm_project: FcmProject) -> None:
    provider = FcmProvider(fcm_project)
    try:
        result = await provider.send(binding("fcm", "tok-1", "proj-a"), message())
    finally:
        await provider.aclose()
    # Google's answer to a malformed token is 400 INVALID_ARGUMENT: not retried, and not a dead
    # token either (the same answer covers a bad message; dropping the binding would lose it).
    assert result.outcome is PushOutcome.FAILED and result.status == 400
    assert "INVALID_ARGUMENT" in result.reason and "not a valid FCM registration token" in result.reason
    assert fake_fcm.requests == [] and len(fake_fcm.refusals) == 1


async def test_sender_id_mismatch_is_failed(fake_fcm: FakeFcm, fcm_project: FcmProject) -> None:
    fake_fcm.bind_token(TOKEN, "proj-b")
    provider = FcmProvider(fcm_project)
    try:
        result = await provider.send(binding("fcm", TOKEN, "proj-a"), message())
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.FAILED and "SENDER_ID_MISMATCH" in result.reason


async def test_retry_after_as_an_http_date(fake_fcm: FakeFcm, fcm_project: FcmProject) -> None:
    clock = Clock()
    when = email.utils.formatdate(clock.now + 90, usegmt=True)
    fake_fcm.script(TOKEN, FcmAnswer.error(503, "UNAVAILABLE", "busy", retry_after=when))
    provider = FcmProvider(fcm_project, clock=clock)
    try:
        result = await provider.send(binding("fcm", TOKEN, "proj-a"), message(deadline=clock.now + 30))
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.RETRY
    assert result.retry_after is not None and 88 <= result.retry_after <= 90


async def test_expired_access_token_is_refreshed_after_the_401(fake_fcm: FakeFcm, fcm_project: FcmProject) -> None:
    """Google expired our token before we expected (its clock): one 401, one refresh, delivered."""
    provider = FcmProvider(fcm_project)
    try:
        assert (await provider.send(binding("fcm", TOKEN, "proj-a"), message())).outcome is PushOutcome.DELIVERED
        fake_fcm.expire_access_tokens()
        result = await provider.send(binding("fcm", TOKEN, "proj-a"), message())
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.DELIVERED
    assert fake_fcm.token_issuances == 2 and [r["status"] for r in fake_fcm.refusals] == ["UNAUTHENTICATED"]


async def test_second_401_after_a_refresh_is_failed_not_a_loop(fake_fcm: FakeFcm, fcm_project: FcmProject) -> None:
    fake_fcm.script(TOKEN, FcmAnswer.error(401, "UNAUTHENTICATED"), FcmAnswer.error(401, "UNAUTHENTICATED"))
    provider = FcmProvider(fcm_project)
    try:
        result = await provider.send(binding("fcm", TOKEN, "proj-a"), message())
    finally:
        await provider.aclose()
    assert result.outcome is PushOutcome.FAILED and result.status == 401
    assert fake_fcm.token_issuances == 2  # refreshed once, then gave up
    assert len(fake_fcm.sends_to(TOKEN)) == 2


@pytest.mark.parametrize(
    ("answer", "outcome", "retry_after", "reason"),
    [
        (TokenAnswer.error(429, "rate_limit_exceeded", retry_after="11"), PushOutcome.RETRY, 11.0, "HTTP 429"),
        (TokenAnswer.error(503, "temporarily_unavailable"), PushOutcome.RETRY, None, "HTTP 503"),
        (TokenAnswer.error(500, "internal_failure", retry_after="Wed, 21 Oct 2015 07:28:00 GMT"),
         PushOutcome.RETRY, 0.0, "HTTP 500"),
        (TokenAnswer(200, raw=b"<html>proxy error</html>"), PushOutcome.RETRY, None, "malformed"),
        (TokenAnswer(200, {"token_type": "Bearer"}), PushOutcome.RETRY, None, "malformed"),
        (TokenAnswer.error(400, "invalid_grant", "Invalid JWT Signature."), PushOutcome.FAILED, None,
         "invalid_grant"),
        (TokenAnswer.error(401, "unauthorized_client", "disabled"), PushOutcome.FAILED, None, "unauthorized_client"),
    ],
)
async def test_oauth_endpoint_failures(fake_fcm: FakeFcm, fcm_project: FcmProject, answer: TokenAnswer,
                                       outcome: PushOutcome, retry_after: float | None, reason: str) -> None:
    fake_fcm.script_token(answer)
    provider = FcmProvider(fcm_project)
    try:
        failed = await provider.send(binding("fcm", TOKEN, "proj-a"), message())
        again = await provider.send(binding("fcm", TOKEN, "proj-a"), message())  # the endpoint is back
    finally:
        await provider.aclose()
    assert failed.outcome is outcome, failed
    assert failed.retry_after == retry_after
    assert reason in failed.reason
    assert "ya29" not in failed.reason and "BEGIN" not in failed.reason
    assert fake_fcm.sends_to(TOKEN)[0].body["message"]["token"] == TOKEN  # only the second push went out
    assert again.outcome is PushOutcome.DELIVERED and len(fake_fcm.requests) == 1


async def test_warm_fetches_the_access_token_and_survives_a_down_endpoint(
        fake_fcm: FakeFcm, fcm_project: FcmProject, caplog: pytest.LogCaptureFixture) -> None:
    provider = FcmProvider(fcm_project)
    try:
        await provider.warm()
        assert fake_fcm.token_issuances == 1
        await provider.send(binding("fcm", TOKEN, "proj-a"), message())
        assert fake_fcm.token_issuances == 1  # the call's push reused the warm token
    finally:
        await provider.aclose()
    fake_fcm.script_token(TokenAnswer.error(503, "temporarily_unavailable"))
    cold = FcmProvider(fcm_project)
    try:
        await cold.warm()  # never raises
        assert "no access token yet" in caplog.text
        assert (await cold.send(binding("fcm", TOKEN, "proj-a"), message())).outcome is PushOutcome.DELIVERED
    finally:
        await cold.aclose()
