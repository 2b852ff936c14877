"""The OAuth pieces FCM and Huawei share (ari_push/push/oauth.py)."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from ari_push.model import PushOutcome
from ari_push.push.oauth import AuthFailure, TokenCache, load_key_file, token_answer
from ari_push.settings import SettingsError

LOG = logging.getLogger("test.oauth")


def answer(status: int, body: object = None, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers) if body is not None else \
        httpx.Response(status, content=b"<html>oops</html>", headers=headers)


def detail(body: dict[str, object]) -> str:
    return f"{body.get('error')}"


def test_token_and_its_refresh_time() -> None:
    fresh = token_answer(answer(200, {"access_token": "t1", "expires_in": 3600}), 1000.0, detail, LOG, "t")
    assert fresh == ("t1", 4300.0)
    assert token_answer(answer(200, {"access_token": "t1", "expires_in": 60}), 0.0, detail, LOG, "t") == ("t1", 30.0)
    assert token_answer(answer(200, {"access_token": "t1", "expires_in": "x"}), 0.0, detail, LOG, "t")[1] == 3300.0


@pytest.mark.parametrize(("status", "body", "outcome"), [
    (200, {"expires_in": 3600}, PushOutcome.RETRY),  # no token
    (200, None, PushOutcome.RETRY),  # not JSON
    (400, {"error": "invalid_grant"}, PushOutcome.FAILED),
    (401, None, PushOutcome.FAILED),
    (429, {"error": "slow down"}, PushOutcome.RETRY),
    (503, None, PushOutcome.RETRY),
])
def test_refusals(status: int, body: object, outcome: PushOutcome) -> None:
    with pytest.raises(AuthFailure) as info:
        token_answer(answer(status, body, {"retry-after": "7"}), 0.0, detail, LOG, "t")
    assert info.value.result.outcome is outcome
    if status != 200:
        assert info.value.result.status == status
    else:
        assert "malformed token response" in info.value.result.reason
    if status == 400:
        assert "invalid_grant" in info.value.result.reason
    if outcome is PushOutcome.RETRY and status >= 429:
        assert info.value.result.retry_after == 7.0


async def test_one_fetch_for_concurrent_callers_and_never_the_refused_token() -> None:
    now = [0.0]
    issued: list[str] = []

    async def fetch() -> tuple[str, float]:
        await asyncio.sleep(0.01)
        issued.append(f"t{len(issued) + 1}")
        return issued[-1], now[0] + 100

    cache = TokenCache(fetch, lambda: now[0])
    assert await asyncio.gather(*(cache.get() for _ in range(20))) == ["t1"] * 20
    assert cache.fetches == 1
    assert await cache.get(stale="t1") == "t2"  # the API refused t1
    now[0] = 150.0
    assert await cache.get() == "t3" and cache.fetches == 3  # due


def test_key_file_errors_name_the_field_never_the_key() -> None:
    with pytest.raises(SettingsError, match="is not valid JSON"):
        load_key_file("{", "x.key", ("private_key",), "a key file")
    with pytest.raises(SettingsError, match="has no 'client_email'"):
        load_key_file('{"private_key": "k"}', "x.key", ("client_email", "private_key"), "a key file")
    with pytest.raises(SettingsError, match="not a PEM private key") as info:
        load_key_file('{"private_key": "SECRET-MATERIAL"}', "x.key", ("private_key",), "a key file")
    assert "SECRET-MATERIAL" not in str(info.value)
