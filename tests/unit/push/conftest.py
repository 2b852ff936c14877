"""Fixtures for the push tier: strict fake FCM / APNs / vendor servers and credentials.

Keys and certificates are generated once per session (RSA is slow-ish); servers start per test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ari_push.settings import ApnsApp, FcmProject, Secret
from tests.fakes import FakeApns, FakeFcm, FakeVendor, Pki, make_pki, service_account
from tests.fakes.keys import ServiceAccountKey, ec_key

TEAM = "TEAM123456"
KEY_ID = "KEY1234567"
TOPIC = "com.example.phone.voip"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(Path(tmp_path_factory.mktemp("pki")))


@pytest.fixture(scope="session")
def sa_keys() -> dict[str, ServiceAccountKey]:
    return {p: service_account(p) for p in ("proj-a", "proj-b")}


@pytest.fixture(scope="session")
def p8_key() -> ec.EllipticCurvePrivateKey:
    return ec_key()


@pytest.fixture
async def fake_fcm(pki: Pki) -> AsyncIterator[FakeFcm]:
    fake = await FakeFcm(pki).start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def fake_apns(pki: Pki) -> AsyncIterator[FakeApns]:
    fake = await FakeApns(pki).start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def fake_vendor() -> AsyncIterator[FakeVendor]:
    fake = await FakeVendor().start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
def fcm_project(fake_fcm: FakeFcm, sa_keys: dict[str, ServiceAccountKey]) -> FcmProject:
    sa_json = fake_fcm.add_project("proj-a", sa_keys["proj-a"])
    return FcmProject(project_id="proj-a", service_account=Secret(sa_json), api_url=fake_fcm.url,
                      ca_file=fake_fcm.ca_file, timeout=2.0)


@pytest.fixture
def apns_app(fake_apns: FakeApns, pki: Pki, p8_key: ec.EllipticCurvePrivateKey) -> ApnsApp:
    pem = fake_apns.add_key(TEAM, KEY_ID, [TOPIC, "com.example.phone"], key=p8_key)
    return ApnsApp(name="phone", topics=(TOPIC, "com.example.phone"), team_id=TEAM, key_id=KEY_ID,
                   key=Secret(pem), production_url=fake_apns.url, sandbox_url=fake_apns.url,
                   ca_file=str(pki.ca_file), timeout=2.0)
