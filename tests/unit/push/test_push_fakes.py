"""The fakes themselves are strict: requests the real services refuse are refused here too.
If these pass, a provider that sends a wrong header or body fails its own tests."""

from __future__ import annotations

import json
import ssl
import time
import uuid
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.fakes import FakeApns, FakeFcm, Pki
from tests.fakes.builders import apns_token, fcm_token
from tests.fakes.keys import ServiceAccountKey, ec_key
from tests.unit.push.conftest import KEY_ID, TEAM, TOPIC

# ---------------------------------------------------------------- FCM


async def _access_token(fake: FakeFcm, sa: ServiceAccountKey, client: httpx.AsyncClient, **claims: Any) -> Any:
    now = int(time.time())
    payload = {"iss": sa.client_email, "scope": "https://www.googleapis.com/auth/firebase.messaging",
               "aud": fake.token_url, "iat": now, "exp": now + 3600, **claims}
    assertion = jwt.encode(payload, sa.key, algorithm="RS256", headers={"kid": sa.private_key_id})
    response = await client.post(fake.token_url, data={
        "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion})
    return response


@pytest.mark.parametrize(
    ("claims", "error"),
    [
        ({"aud": "https://elsewhere.example/token"}, "invalid_grant"),
        ({"scope": "https://www.googleapis.com/auth/userinfo.email"}, "invalid_scope"),
        ({"exp": int(time.time()) + 7200}, "invalid_grant"),
        ({"iat": int(time.time()) - 7200, "exp": int(time.time()) - 3600}, "invalid_grant"),
    ],
)
async def test_fcm_token_endpoint_refuses_bad_assertions(
    fake_fcm: FakeFcm, sa_keys: dict[str, ServiceAccountKey], claims: dict[str, Any], error: str
) -> None:
    fake_fcm.add_project("proj-a", sa_keys["proj-a"])
    async with _client(fake_fcm.pki) as client:
        response = await _access_token(fake_fcm, sa_keys["proj-a"], client, **claims)
        wrong_grant = await client.post(fake_fcm.token_url, data={"grant_type": "client_credentials"})
    assert response.status_code == 400 and response.json()["error"] == error
    assert wrong_grant.json()["error"] == "unsupported_grant_type"
    assert fake_fcm.token_issuances == 0


def _bad(body: dict[str, Any]) -> dict[str, Any]:
    message = {"token": fcm_token(1), "data": {"a": "b"}, "android": {"priority": "high", "ttl": "30s"}}
    message.update(body)
    return {"message": {k: v for k, v in message.items() if v is not None}}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"message": {"token": fcm_token(1)}, "dry_run": True}, "dry_run"),
        (_bad({"notification_x": {}}), "message.notification_x"),
        (_bad({"topic": "news"}), "message"),
        (_bad({"token": None}), "message"),
        (_bad({"data": {"n": 1}}), "message.data[0].value"),
        (_bad({"data": {"from": "x"}}), "message.data[0].key"),
        (_bad({"data": {"google.sent": "x"}}), "message.data[0].key"),
        (_bad({"data": {"gcm.n": "x"}}), "message.data[0].key"),
        (_bad({"data": {"k": "v" * 4096}}), "message.data"),
        (_bad({"android": {"priority": "urgent"}}), "message.android.priority"),
        (_bad({"android": {"ttl": "30"}}), "message.android.ttl"),
        (_bad({"android": {"ttl": 30}}), "message.android.ttl"),
        (_bad({"android": {"ttl": "1.0000000001s"}}), "message.android.ttl"),
        (_bad({"android": {"time_to_live": "3s"}}), "message.android.time_to_live"),
        (_bad({"android": {"direct_boot_ok": "yes"}}), "message.android.direct_boot_ok"),
        (_bad({"android": {"notification": {"sound_x": "a"}}}), "message.android.notification.sound_x"),
        (_bad({"notification": {"title": "a", "subtitle": "b"}}), "message.notification.subtitle"),
        (_bad({"notification": {"title": 5}}), "message.notification.title"),
        (_bad({"notification": "ring"}), "message.notification"),
        (_bad({"apns": {"headers": {"apns-priority": 10}}}), "message.apns.headers"),
        (_bad({"apns": {"headers": {"apns-priority": "7"}}}), "message.apns.headers"),
        (_bad({"apns": {"payload": "aps"}}), "message.apns.payload"),
        (_bad({"apns": {"aps": {}}}), "message.apns.aps"),
        (_bad({"webpush": {"headers": {"TTL": 30}}}), "message.webpush.headers"),
        (_bad({"webpush": {"urgency": "high"}}), "message.webpush.urgency"),
        (_bad({"webpush": {"data": {"n": 1}}}), "message.webpush.data"),
    ],
)
async def test_fcm_send_refuses_invalid_messages(
    fake_fcm: FakeFcm, sa_keys: dict[str, ServiceAccountKey], body: dict[str, Any], field: str
) -> None:
    fake_fcm.add_project("proj-a", sa_keys["proj-a"])
    async with _client(fake_fcm.pki) as client:
        token = (await _access_token(fake_fcm, sa_keys["proj-a"], client)).json()["access_token"]
        response = await client.post(f"{fake_fcm.url}/v1/projects/proj-a/messages:send", json=body,
                                     headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT" and error["code"] == 400
    assert {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "INVALID_ARGUMENT"} \
        in error["details"]
    violations = [d for d in error["details"] if d["@type"].endswith("BadRequest")]
    assert violations[0]["fieldViolations"][0]["field"] == field
    assert fake_fcm.requests == []


async def test_fcm_send_checks_bearer_and_project(
    fake_fcm: FakeFcm, sa_keys: dict[str, ServiceAccountKey]
) -> None:
    fake_fcm.add_project("proj-a", sa_keys["proj-a"])
    fake_fcm.add_project("proj-b", sa_keys["proj-b"])
    body = _bad({})
    async with _client(fake_fcm.pki) as client:
        token = (await _access_token(fake_fcm, sa_keys["proj-a"], client)).json()["access_token"]
        no_auth = await client.post(f"{fake_fcm.url}/v1/projects/proj-a/messages:send", json=body)
        forged = await client.post(f"{fake_fcm.url}/v1/projects/proj-a/messages:send", json=body,
                                   headers={"authorization": "Bearer ya29.made-up"})
        foreign = await client.post(f"{fake_fcm.url}/v1/projects/proj-b/messages:send", json=body,
                                    headers={"authorization": f"Bearer {token}"})
        ok = await client.post(f"{fake_fcm.url}/v1/projects/proj-a/messages:send", json=body,
                               headers={"authorization": f"Bearer {token}"})
        legacy = await client.post(f"{fake_fcm.url}/fcm/send", json=body)
    assert no_auth.status_code == forged.status_code == 401
    assert no_auth.json()["error"]["status"] == "UNAUTHENTICATED"
    assert foreign.status_code == 403 and foreign.json()["error"]["status"] == "PERMISSION_DENIED"
    assert ok.status_code == 200 and ok.json()["name"].startswith("projects/proj-a/messages/")
    assert legacy.status_code == 404


async def test_fcm_accepts_well_formed_blocks(fake_fcm: FakeFcm, sa_keys: dict[str, ServiceAccountKey],
                                              pki: Pki) -> None:
    fake_fcm.add_project("proj-a", sa_keys["proj-a"])
    body = _bad({"notification": {"title": "Bob", "body": "calling"},
                 "apns": {"headers": {"apns-priority": "10"}, "payload": {"aps": {}}},
                 "webpush": {"headers": {"TTL": "30"}, "data": {"a": "b"}}})
    async with _client(pki) as client:
        token = (await _access_token(fake_fcm, sa_keys["proj-a"], client)).json()["access_token"]
        ok = await client.post(f"{fake_fcm.url}/v1/projects/proj-a/messages:send", json=body,
                               headers={"authorization": f"Bearer {token}"})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("token", ["t", "tok-1", "APA91b" + "x" * 20, "a" * 160, fcm_token(1) + "!",
                                   "inst:" + fcm_token(1)[23:].replace("APA91b", "APA91c")])
async def test_fcm_refuses_tokens_not_of_the_registration_token_shape(
    fake_fcm: FakeFcm, sa_keys: dict[str, ServiceAccountKey], pki: Pki, token: str
) -> None:
    fake_fcm.add_project("proj-a", sa_keys["proj-a"])
    async with _client(pki) as client:
        access = (await _access_token(fake_fcm, sa_keys["proj-a"], client)).json()["access_token"]
        response = await client.post(f"{fake_fcm.url}/v1/projects/proj-a/messages:send",
                                     json=_bad({"token": token}), headers={"authorization": f"Bearer {access}"})
    assert response.status_code == 400
    assert response.json()["error"] == {
        "code": 400, "message": "The registration token is not a valid FCM registration token",
        "status": "INVALID_ARGUMENT",
        "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "INVALID_ARGUMENT"}]}
    assert fake_fcm.requests == []


async def test_fcm_token_of_another_project_is_sender_id_mismatch(
    fake_fcm: FakeFcm, sa_keys: dict[str, ServiceAccountKey], pki: Pki
) -> None:
    fake_fcm.add_project("proj-a", sa_keys["proj-a"])
    fake_fcm.bind_token(fcm_token(1), "proj-b")
    async with _client(pki) as client:
        access = (await _access_token(fake_fcm, sa_keys["proj-a"], client)).json()["access_token"]
        response = await client.post(f"{fake_fcm.url}/v1/projects/proj-a/messages:send",
                                     json=_bad({}), headers={"authorization": f"Bearer {access}"})
    assert response.status_code == 403
    assert response.json()["error"]["details"][0]["errorCode"] == "SENDER_ID_MISMATCH"


async def test_fcm_is_http2_over_tls_only(fake_fcm: FakeFcm, pki: Pki) -> None:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    async with httpx.AsyncClient(verify=ctx, trust_env=False) as http1:  # HTTP/1.1 only: no h2 in ALPN
        with pytest.raises(httpx.HTTPError):
            await http1.post(fake_fcm.token_url, data={"grant_type": "x"})
    async with httpx.AsyncClient(trust_env=False) as public_cas:  # the test CA is not a public one
        with pytest.raises(httpx.ConnectError):
            await public_cas.post(fake_fcm.token_url, data={"grant_type": "x"})
    assert fake_fcm.refused_connections >= 1 and fake_fcm.token_requests == 0
    async with _client(pki) as client:
        get = await client.get(f"{fake_fcm.url}/v1/projects/proj-a/messages:send")
    assert get.status_code == 405


# ---------------------------------------------------------------- APNs


def _client(pki: Pki) -> httpx.AsyncClient:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    return httpx.AsyncClient(http1=False, http2=True, verify=ctx, trust_env=False)


def _jwt(key: ec.EllipticCurvePrivateKey, *, iat: int | None = None, kid: str = KEY_ID, iss: str = TEAM) -> str:
    return jwt.encode({"iss": iss, "iat": int(time.time()) if iat is None else iat}, key, algorithm="ES256",
                      headers={"kid": kid})


def _headers(key: ec.EllipticCurvePrivateKey, **changes: str | None) -> dict[str, str]:
    headers: dict[str, str | None] = {
        "authorization": f"bearer {_jwt(key)}", "apns-push-type": "voip", "apns-topic": TOPIC,
        "apns-priority": "10", "apns-expiration": "0", "apns-id": str(uuid.uuid4()),
    }
    headers.update(changes)
    return {k: v for k, v in headers.items() if v is not None}


@pytest.mark.parametrize(
    ("changes", "path", "payload", "status", "reason"),
    [
        ({}, f"/3/device/{apns_token(1)}", b'{"aps":{}}', 200, ""),
        ({}, "/3/device/not-hex", b'{"aps":{}}', 400, "BadDeviceToken"),
        ({}, "/2/device/x", b'{"aps":{}}', 404, "BadPath"),
        ({"authorization": None}, None, b'{"aps":{}}', 403, "MissingProviderToken"),
        ({"apns-push-type": None}, None, b'{"aps":{}}', 400, "InvalidPushType"),
        ({"apns-topic": "com.example.phone"}, None, b'{"aps":{}}', 400, "BadTopic"),
        ({"apns-topic": "com.other.voip"}, None, b'{"aps":{}}', 400, "TopicDisallowed"),
        ({"apns-topic": None}, None, b'{"aps":{}}', 400, "MissingTopic"),
        ({"apns-priority": "7"}, None, b'{"aps":{}}', 400, "BadPriority"),
        ({"apns-expiration": "soon"}, None, b'{"aps":{}}', 400, "BadExpirationDate"),
        ({"apns-priority": None}, None, b'{"aps":{}}', 400, "BadPriority"),
        ({"apns-priority": "5"}, None, b'{"aps":{}}', 400, "BadPriority"),
        ({"apns-expiration": None}, None, b'{"aps":{}}', 400, "BadExpirationDate"),
        ({"apns-id": "123"}, None, b'{"aps":{}}', 400, "BadMessageId"),
        ({"apns-collapse-id": "c" * 65}, None, b'{"aps":{}}', 400, "BadCollapseId"),
        ({}, None, b"", 400, "PayloadEmpty"),
        ({}, None, b'{"aps":{},"x":"' + b"y" * 5120 + b'"}', 413, "PayloadTooLarge"),
    ],
)
async def test_apns_refuses_what_apple_refuses(
    fake_apns: FakeApns, pki: Pki, changes: dict[str, str | None], path: str | None, payload: bytes,
    status: int, reason: str
) -> None:
    key = ec_key()
    fake_apns.add_key(TEAM, KEY_ID, [TOPIC], key=key)
    async with _client(pki) as client:
        response = await client.post(f"{fake_apns.url}{path or f'/3/device/{apns_token(1)}'}",
                                     content=payload, headers=_headers(key, **changes))
    assert response.status_code == status
    assert response.http_version == "HTTP/2"
    if status == 200:
        assert response.content == b"" and "apns-id" in response.headers
    else:
        assert response.json() == {"reason": reason}


async def test_apns_checks_the_provider_token(fake_apns: FakeApns, pki: Pki) -> None:
    key, other = ec_key(), ec_key()
    fake_apns.add_key(TEAM, KEY_ID, [TOPIC], key=key)
    url = f"{fake_apns.url}/3/device/{apns_token(1)}"
    cases = {
        "bad signature": (_jwt(other), "InvalidProviderToken"),
        "unknown kid": (_jwt(key, kid="NOPE000000"), "InvalidProviderToken"),
        "wrong team": (_jwt(key, iss="OTHERTEAM1"), "InvalidProviderToken"),
        "older than an hour": (_jwt(key, iat=int(time.time()) - 3700), "ExpiredProviderToken"),
        "HS256": (jwt.encode({"iss": TEAM, "iat": int(time.time())}, "k" * 32, algorithm="HS256",
                             headers={"kid": KEY_ID}), "InvalidProviderToken"),
    }
    async with _client(pki) as client:
        for name, (token, reason) in cases.items():
            response = await client.post(url, content=b"{}", headers=_headers(key, authorization=f"bearer {token}"))
            assert response.status_code == 403, name
            assert response.json() == {"reason": reason}, name
    assert fake_apns.handshakes == 1


async def test_apns_refuses_http1(fake_apns: FakeApns, pki: Pki) -> None:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    async with httpx.AsyncClient(verify=ctx, trust_env=False) as client:
        with pytest.raises(httpx.HTTPError):
            await client.post(f"{fake_apns.url}/3/device/{apns_token(1)}", content=b"{}")
    assert fake_apns.requests == []


async def test_apns_410_body_has_timestamp(fake_apns: FakeApns, pki: Pki) -> None:
    from tests.fakes import ApnsAnswer

    key = ec_key()
    fake_apns.add_key(TEAM, KEY_ID, [TOPIC], key=key)
    fake_apns.script(apns_token(3), ApnsAnswer(410, "Unregistered", timestamp_ms=1700000000000))
    async with _client(pki) as client:
        response = await client.post(f"{fake_apns.url}/3/device/{apns_token(3)}", content=b"{}",
                                     headers=_headers(key))
    assert response.status_code == 410
    assert json.loads(response.content) == {"reason": "Unregistered", "timestamp": 1700000000000}


@pytest.mark.parametrize(
    ("token_kind", "changes", "payload", "reason"),
    [
        ("remote", {}, b'{"aps":{}}', "DeviceTokenNotForTopic"),  # a VoIP push to a remote token
        ("voip", {"apns-push-type": "alert", "apns-topic": "com.example.phone"},
         b'{"aps":{"alert":"x"}}', "DeviceTokenNotForTopic"),  # an alert push to a VoIP token
        ("remote", {"apns-push-type": "alert", "apns-topic": TOPIC}, b'{"aps":{"alert":"x"}}',
         "DeviceTokenNotForTopic"),  # the VoIP topic for an alert push
        ("remote", {"apns-push-type": "background", "apns-topic": "com.example.phone", "apns-priority": "10"},
         b'{"aps":{"content-available":1}}', "BadPriority"),  # background at priority 10
        ("remote", {"apns-push-type": "alert", "apns-topic": "com.example.phone"}, b'{"aps":{}}',
         "PayloadEmpty"),  # an alert push without aps.alert
    ],
)
async def test_apns_holds_each_token_to_its_push_type(
        fake_apns: FakeApns, pki: Pki, token_kind: str, changes: dict[str, str], payload: bytes,
        reason: str) -> None:
    key = ec_key()
    fake_apns.add_key(TEAM, KEY_ID, [TOPIC, "com.example.phone"], key=key)
    voip, remote = apns_token(21), apns_token(22)
    fake_apns.register_device("com.example.phone", voip=voip, remote=remote)
    token = voip if token_kind == "voip" else remote
    async with _client(pki) as client:
        response = await client.post(f"{fake_apns.url}/3/device/{token}", content=payload,
                                     headers=_headers(key, **changes))
    assert response.status_code == 400 and response.json() == {"reason": reason}
    assert fake_apns.requests == []


async def test_apns_tokens_belong_to_one_environment(pki: Pki) -> None:
    production = await FakeApns(pki).start()
    sandbox = await FakeApns(pki, environment="sandbox", device_tokens=production.device_tokens).start()
    try:
        key = ec_key()
        for fake in (production, sandbox):
            fake.add_key(TEAM, KEY_ID, [TOPIC], key=key)
        production.bind_token(apns_token(2), "sandbox")
        headers = _headers(key)
        async with _client(pki) as client:
            answers = {}
            for name, fake in (("production", production), ("sandbox", sandbox)):
                for n in (1, 2):
                    r = await client.post(f"{fake.url}/3/device/{apns_token(n)}", content=b'{"aps":{}}',
                                          headers=headers)
                    answers[(name, n)] = (r.status_code, r.json()["reason"] if r.content else "")
    finally:
        await production.stop()
        await sandbox.stop()
    assert answers == {("production", 1): (200, ""), ("production", 2): (400, "BadDeviceToken"),
                       ("sandbox", 1): (400, "BadDeviceToken"), ("sandbox", 2): (200, "")}


async def test_apns_expiry_is_by_issue_time(fake_apns: FakeApns, pki: Pki) -> None:
    """After expire_provider_tokens(), a token re-signed with the same ``iat`` is expired too."""
    key = ec_key()
    fake_apns.add_key(TEAM, KEY_ID, [TOPIC], key=key)
    iat = int(time.time())
    async with _client(pki) as client:
        url = f"{fake_apns.url}/3/device/{apns_token(1)}"
        first = await client.post(url, content=b'{"aps":{}}', headers=_headers(key))
        fake_apns.expire_provider_tokens()
        same_second = await client.post(url, content=b'{"aps":{}}', headers=_headers(
            key, authorization=f"bearer {_jwt(key, iat=fake_apns.newest_iat(KEY_ID))}"))
        later = await client.post(url, content=b'{"aps":{}}', headers=_headers(
            key, authorization=f"bearer {_jwt(key, iat=max(iat, fake_apns.newest_iat(KEY_ID)) + 1)}"))
    assert first.status_code == 200
    assert (same_second.status_code, same_second.json()["reason"]) == (403, "ExpiredProviderToken")
    assert later.status_code == 200  # a later iat is a fresh token: no TooManyProviderTokenUpdates
