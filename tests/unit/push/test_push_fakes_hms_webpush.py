"""The local Huawei Push Kit and Web Push services refuse what the real ones refuse: every rule in
their CHECKS lists is driven here with a raw request, and answers with the documented code."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jwt
import pytest

from ari_push.push import ece
from tests.fakes import hms as hms_fake
from tests.fakes import webpush as wp_fake
from tests.fakes.hms import FakeHuawei
from tests.fakes.keys import Pki, ec_key, rsa_key
from tests.fakes.webpush import FakeWebPush

APP, SECRET, PROJECT = "101234567", "s3cret-s3cret", "388421841221234567"
TOKEN = "IQAAAACy0aUZAABfs3CF9QLKJ3l5mGJ6IH3eSoEsSGodcr0xw0_TwDbQ7rd"


@pytest.fixture
async def huawei(pki: Pki) -> AsyncIterator[FakeHuawei]:
    fake = await FakeHuawei(pki).start()
    fake.add_app(APP, SECRET)
    fake.add_app("109999999", "other")
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def client(pki: Pki) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(pki.ca_file)), timeout=5) as c:
        yield c


async def access_token(fake: FakeHuawei, client: httpx.AsyncClient, app: str = APP, secret: str = SECRET) -> str:
    r = await client.post(fake.token_url, data={"grant_type": "client_credentials", "client_id": app,
                                                "client_secret": secret})
    return str(r.json()["access_token"])


def v1_body(**android: Any) -> dict[str, Any]:
    return {"message": {"data": '{"type":"call"}', "android": {"urgency": "HIGH", "category": "VOIP",
                                                                "ttl": "30s", **android}, "token": [TOKEN]}}


def hmos_jwt(account: hms_fake.HarmonyAccount, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": account.sub_account, "aud": hms_fake.HUAWEI_TOKEN_URI, "iat": now, "exp": now + 3600}
    payload.update(claims)
    alg = payload.pop("alg", "PS256")
    key = payload.pop("key", account.key)
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key, algorithm=alg,
                      headers={"kid": payload.pop("kid", account.key_id)})


def v3_body(**options: Any) -> dict[str, Any]:
    return {"payload": {"extraData": '{"type":"call"}'}, "target": {"token": [TOKEN]}, "pushOptions": options}


Case = Callable[[FakeHuawei, httpx.AsyncClient], Any]


async def _oauth_form(f: FakeHuawei, c: httpx.AsyncClient) -> httpx.Response:
    return await c.post(f.token_url, json={"grant_type": "client_credentials"})


async def _oauth_grant(f: FakeHuawei, c: httpx.AsyncClient) -> httpx.Response:
    return await c.post(f.token_url, data={"grant_type": "password", "client_id": APP, "client_secret": SECRET})


async def _oauth_client(f: FakeHuawei, c: httpx.AsyncClient) -> httpx.Response:
    return await c.post(f.token_url, data={"grant_type": "client_credentials", "client_id": APP,
                                           "client_secret": "wrong"})


def _v1(body: Any = None, *, token: str | None = None, app: str = APP, ctype: str = "application/json",
        raw: bytes | None = None, expire: bool = False) -> Case:
    async def run(f: FakeHuawei, c: httpx.AsyncClient) -> httpx.Response:
        bearer = token if token is not None else await access_token(f, c)
        if expire:
            f.clock = lambda: time.time() + 7200
        content = raw if raw is not None else json.dumps(v1_body() if body is None else body).encode()
        return await c.post(f"{f.url}/v1/{app}/messages:send", content=content,
                            headers={"authorization": f"Bearer {bearer}", "content-type": ctype})
    return run


def _v3(body: Any = None, *, push_type: str | None = "10", right: bool = True, project: str = PROJECT,
        jwt_claims: dict[str, Any] | None = None, bearer: str | None = None, raw: bytes | None = None) -> Case:
    async def run(f: FakeHuawei, c: httpx.AsyncClient) -> httpx.Response:
        account = f.add_project(PROJECT, call_right=right)
        token = bearer if bearer is not None else hmos_jwt(account, **(jwt_claims or {}))
        headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
        if push_type is not None:
            headers["push-type"] = push_type
        content = raw if raw is not None else json.dumps(v3_body() if body is None else body).encode()
        return await c.post(f"{f.url}/v3/{project}/messages:send", content=content, headers=headers)
    return run


HUAWEI_CASES: list[tuple[int, Case, str]] = [
    (0, _oauth_form, "1102"),
    (1, _oauth_grant, "1102"),
    (2, _oauth_client, "1101"),
    (3, _v1(token="not-issued"), "80200001"),
    (4, _v1(expire=True), "80200003"),
    (5, _v1(app="109999999"), "80300002"),
    (6, _v1(ctype="text/plain"), "80100003"),
    (7, _v1(raw=b"[1, 2]"), "80100003"),
    (8, _v1({"message": {"data": "{}", "token": []}}), "80100001"),
    (9, _v1({"message": {"data": "{}", "token": [TOKEN] * 1001}}), "80300010"),
    (10, _v1({"message": {"data": {"type": "call"}, "token": [TOKEN]}}), "80100003"),
    (11, _v1(v1_body(urgency="URGENT")), "80100001"),
    (12, _v1(v1_body(category="MARKETING")), "80100001"),
    (13, _v1(v1_body(ttl="16d")), "80100001"),
    (13, _v1(v1_body(ttl=f"{16 * 86400}s")), "80100001"),
    (14, _v1(v1_body(bi_tag=5)), "80100001"),
    (15, _v1({"message": {"data": "x" * 5000, "token": [TOKEN]}}), "80300008"),
    (16, _v1({"message": {"data": "{}", "token": ["short"]}}), "80300007"),
    (17, _v3(bearer="not-a-jwt"), "80200001"),
    (17, _v3(jwt_claims={"alg": "RS256"}), "80200001"),
    (17, _v3(jwt_claims={"aud": "https://elsewhere.example/token"}), "80200001"),
    (17, _v3(jwt_claims={"iss": "someone-else"}), "80200001"),
    (17, _v3(jwt_claims={"key": rsa_key()}), "80200001"),
    (18, _v3(jwt_claims={"exp": int(time.time()) - 10, "iat": int(time.time()) - 100}), "80200003"),
    (18, _v3(jwt_claims={"exp": int(time.time()) + 7200}), "80200003"),
    (19, _v3(project="388421841229999999"), "80300002"),
    (20, _v3(push_type=None), "80100001"),
    (20, _v3(push_type="5"), "80100001"),
    (21, _v3({"payload": {"extraData": "{}"}}), "80100003"),
    (22, _v3({"payload": {"extraData": {"type": "call"}}, "target": {"token": [TOKEN]}}), "80100003"),
    (23, _v3(v3_body(ttl="30")), "80100001"),
    (24, _v3(right=False), "80300007"),
    (25, _v3({"payload": {"extraData": "x" * 5000}, "target": {"token": [TOKEN]}}), "80300008"),
    (26, _v3({"payload": {"extraData": "{}"}, "target": {"token": ["dead" + TOKEN]}}), "80300007"),
]


@pytest.mark.parametrize(("check", "case", "code"), HUAWEI_CASES)
async def test_huawei_refuses(huawei: FakeHuawei, client: httpx.AsyncClient, check: int, case: Case,
                              code: str) -> None:
    response = await case(huawei, client)
    body = response.json()
    got = str(body.get("code", body.get("error")))
    assert got == code, body
    assert response.status_code == hms_fake.HTTP_OF.get(code, 401 if code == "1101" else 400)
    assert huawei.refusals or code == "80300007"
    assert not huawei.requests  # nothing refused counts as delivered


def test_every_huawei_check_is_driven() -> None:
    assert {c for c, _, _ in HUAWEI_CASES} == set(range(len(hms_fake.CHECKS)))


async def test_huawei_accepts_a_well_formed_push_of_each_api(huawei: FakeHuawei, client: httpx.AsyncClient) -> None:
    assert (await _v1()(huawei, client)).json()["code"] == "80000000"
    assert (await _v3()(huawei, client)).json()["code"] == "80000000"
    assert [r.api for r in huawei.requests] == ["v1", "v3"] and not huawei.refusals


# ---------------------------------------------------------------- Web Push


@pytest.fixture
async def service(pki: Pki) -> AsyncIterator[FakeWebPush]:
    fake = await FakeWebPush(pki).start()
    try:
        yield fake
    finally:
        await fake.stop()


VAPID = ece.Vapid(ec_key(), "mailto:ops@example.com")


def _wp(*, keys: bool = True, gone: bool = False, unknown: bool = False, auth: str | None = None,
        headers: dict[str, str] | None = None, body: bytes | None = None, claims: dict[str, Any] | None = None,
        server_key: str = "", encrypt_for_other: bool = False) -> Callable[[FakeWebPush, httpx.AsyncClient], Any]:
    async def run(f: FakeWebPush, c: httpx.AsyncClient) -> httpx.Response:
        sub = f.subscribe(keys=keys, server_key=server_key)
        if gone:
            f.unsubscribe(sub)
        endpoint = f"{f.origin}/wp/unknown" if unknown else sub.endpoint
        if auth is not None:
            authorization = auth
        elif claims is not None:
            now = int(time.time())
            payload = {"aud": f.origin, "exp": now + 3600, "sub": "mailto:a@b.c", **claims}
            alg = payload.pop("alg", "ES256")
            key = payload.pop("key", VAPID.key)
            token = jwt.encode({k: v for k, v in payload.items() if v is not None}, key, algorithm=alg)
            authorization = f"vapid t={token}, k={VAPID.public_key}"
        else:
            authorization = VAPID.header(endpoint, time.time())
        h = {"authorization": authorization, "ttl": "30", "urgency": "high", "topic": "abc"}
        h.update(headers or {})
        h = {k: v for k, v in h.items() if v != "-"}
        content = b""
        if body is not None:
            content = body
        elif keys and encrypt_for_other:
            other = FakeWebPush(f.pki).subscribe()
            content = ece.encrypt(b'{"type":"call"}', other.p256dh, other.auth_b64)
            h["content-encoding"] = "aes128gcm"
        return await c.post(endpoint, content=content, headers=h)
    return run


WEBPUSH_CASES: list[tuple[int, Any, int]] = [
    (0, _wp(unknown=True), 404),
    (1, _wp(gone=True), 410),
    (2, _wp(auth="", headers={"authorization": "-"}), 401),
    (3, _wp(auth="WebPush abc"), 401),
    (3, _wp(auth=f"vapid k={VAPID.public_key}"), 401),
    (4, _wp(auth="vapid t=a.b.c, k=AAAA"), 401),
    (5, _wp(claims={"alg": "HS256", "key": "x" * 32}), 401),
    (5, _wp(claims={"key": ec_key()}), 401),
    (6, _wp(claims={"aud": "https://elsewhere.example"}), 401),
    (7, _wp(claims={"exp": None}), 401),
    (7, _wp(claims={"exp": int(time.time()) - 5}), 401),
    (7, _wp(claims={"exp": int(time.time()) + 2 * 86400}), 401),
    (8, _wp(claims={"sub": "ops@example.com"}), 401),
    (9, _wp(server_key=ece.Vapid(ec_key(), "mailto:x@y.z").public_key), 403),
    (10, _wp(headers={"ttl": "-"}), 400),
    (10, _wp(headers={"ttl": "-5"}), 400),
    (11, _wp(headers={"urgency": "urgent"}), 400),
    (12, _wp(headers={"topic": "t" * 33}), 400),
    (12, _wp(headers={"topic": "a b"}), 400),
    (13, _wp(body=b"plaintext"), 400),
    (14, _wp(keys=False, body=b"x" * 100, headers={"content-encoding": "aes128gcm"}), 400),
    (15, _wp(encrypt_for_other=True), 400),
    (16, _wp(body=b"x" * 4097, headers={"content-encoding": "aes128gcm"}), 413),
]


@pytest.mark.parametrize(("check", "case", "status"), WEBPUSH_CASES)
async def test_webpush_refuses(service: FakeWebPush, client: httpx.AsyncClient, check: int, case: Any,
                               status: int) -> None:
    response = await case(service, client)
    assert response.status_code == status, response.text
    assert service.refusals[-1] == (status, wp_fake.CHECKS[check][1])
    assert not service.pushes


def test_every_webpush_check_is_driven() -> None:
    assert {c for c, _, _ in WEBPUSH_CASES} == set(range(len(wp_fake.CHECKS)))


async def test_webpush_accepts_empty_and_encrypted(service: FakeWebPush, client: httpx.AsyncClient) -> None:
    assert (await _wp(keys=False)(service, client)).status_code == 201
    sub = service.subscribe()
    body = ece.encrypt(b'{"type":"call"}', sub.p256dh, sub.auth_b64)
    r = await client.post(sub.endpoint, content=body, headers={
        "authorization": VAPID.header(sub.endpoint, time.time()), "ttl": "0", "content-encoding": "aes128gcm"})
    assert r.status_code == 201 and r.headers["location"].startswith(service.origin)
    assert service.pushes[-1].message == {"type": "call"} and not service.refusals
