"""Voicemail pushes on the real rig: app_voicemail records a real message left by our SIP caller,
Asterisk raises AMI MessageWaiting, the daemon pushes the mailbox's devices through the strict
fake FCM (normal priority, new/old counts). Mapping through the endpoint's mailboxes= option and
through [mwi] mailboxes; unchanged counts, floods, and mailboxes that map to nobody.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from rig.asterisk import AsteriskInstance
from rig.demo import PROJECT
from rig.redis import RedisServer
from rig.sipua import SipUA
from rig.voicemail import leave_message, visit_mailbox, voicemail_instance
from tests.conftest import daemon_config, wait_for
from tests.fakes.builders import fcm_token
from tests.integration.test_refresh import Pushes, fcm_contact, metric, pushes  # noqa: F401  (fixture)

BOXES = {"7001": "7001@default", "7002": "7002@default", "7003": "7003@default", "7004": "", "7005": "7005"}
USERS = ["7001", "7002", "7003", "7004", "7005", "7099"]


@pytest.fixture(scope="module")
def vm_asterisk(asterisk_root: Path) -> Iterator[AsteriskInstance]:
    inst = voicemail_instance(asterisk_root, "vm", 4, BOXES, USERS)
    yield inst
    inst.stop()


def mwi_config(tmp_path: Path, asterisk: AsteriskInstance, p: Pushes, redis_url: str, extra: str = "") -> Path:
    assert p.fcm is not None
    text = ("[refresh]\nenabled = false\n[mwi]\nenabled = true\nmin_interval = 3\n" + extra +
            f'[[fcm]]\nproject_id = "{PROJECT}"\nservice_account_file = "{p.service_account}"\n'
            f'api_url = "{p.fcm.url}"\nca_file = "{p.fcm.ca_file}"\n')
    return daemon_config(tmp_path, asterisk, redis_url, text)


async def phone(asterisk: AsteriskInstance, aor: str, store: Any) -> str:
    token = fcm_token(f"mwi-{aor}-{id(store) % 10_000}")
    ua = SipUA(aor, asterisk.ports.sip)
    await ua.open()
    assert await ua.register(fcm_contact(token)) == 200
    await wait_for(lambda: store.bindings_for(aor), 5, "binding stored")
    ua.close()  # asleep: Asterisk's MWI NOTIFYs go nowhere, the push is what reaches it
    return token


@pytest.fixture
async def mwi_daemon(tmp_path: Path, vm_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
                     pushes: Pushes) -> AsyncIterator[Any]:  # noqa: F811
    if not vm_asterisk.running:
        vm_asterisk.start()
        vm_asterisk.cli("module load app_voicemail.so")
    yield await start_daemon(mwi_config(tmp_path, vm_asterisk, pushes, ensure_redis.url,
                                        '[mwi.mailboxes]\n"7004@default" = ["7004"]\n'))


async def test_a_voicemail_left_pushes_the_mailbox_devices(mwi_daemon: Any, vm_asterisk: AsteriskInstance,
                                                           pushes: Pushes) -> None:  # noqa: F811
    d = mwi_daemon.daemon
    token = await phone(vm_asterisk, "7001", d.store)
    await leave_message(vm_asterisk, "7001")
    (msg,) = await wait_for(lambda: pushes.of(token, "mwi"), 10, "the voicemail push")
    assert msg["android"]["priority"] == "normal"
    assert msg["data"]["mailbox"] == "7001@default"
    assert (msg["data"]["new"], msg["data"]["old"]) == ("1", "0")
    assert metric(d, "ari_push_mwi_pushes_total", {"result": "delivered"}) == 1
    # visiting the mailbox raises MessageWaiting again with the same counts: no second push
    await visit_mailbox(vm_asterisk, "7001")
    await wait_for(lambda: metric(d, "ari_push_mwi_events_total", {"fate": "unchanged"}) >= 1, 10,
                   "the unchanged counts seen")
    assert len(pushes.of(token, "mwi")) == 1


async def test_a_flood_is_coalesced_into_one_push_per_interval(mwi_daemon: Any, vm_asterisk: AsteriskInstance,
                                                               pushes: Pushes) -> None:  # noqa: F811
    d = mwi_daemon.daemon
    token = await phone(vm_asterisk, "7002", d.store)
    for _ in range(3):  # three messages within the 3 s interval
        await leave_message(vm_asterisk, "7002", 0.2)
    await wait_for(lambda: [m["data"]["new"] for m in pushes.of(token, "mwi")][-1:] == ["3"], 15,
                   "the latest counts pushed")
    counts = [m["data"]["new"] for m in pushes.of(token, "mwi")]
    assert counts[0] == "1" and counts[-1] == "3"
    assert len(counts) < 3  # at least one change was coalesced into a later push
    await asyncio.sleep(4)
    assert len(pushes.of(token, "mwi")) == len(counts)  # nothing more once the counts are out


async def test_override_and_unmapped_mailboxes(mwi_daemon: Any, vm_asterisk: AsteriskInstance,
                                               pushes: Pushes, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    d = mwi_daemon.daemon
    token4 = await phone(vm_asterisk, "7004", d.store)  # its endpoint has no mailboxes=: the override maps it
    token5 = await phone(vm_asterisk, "7005", d.store)  # mailboxes=7005: the context defaults to @default
    await leave_message(vm_asterisk, "7004")
    await leave_message(vm_asterisk, "7005")
    await wait_for(lambda: pushes.of(token4, "mwi") and pushes.of(token5, "mwi"), 10, "both pushed")
    # 7099 is a mailbox no endpoint names and no override lists
    await leave_message(vm_asterisk, "7099")
    await leave_message(vm_asterisk, "7099")
    await wait_for(lambda: metric(d, "ari_push_mwi_events_total", {"fate": "unmapped"}) == 2, 15, "unmapped counted")
    assert sum("7099@default maps to no AOR" in r.getMessage() for r in caplog.records) == 1  # logged once


async def test_two_daemons_push_each_change_once(tmp_path: Path, vm_asterisk: AsteriskInstance,
                                                 ensure_redis: RedisServer, start_daemon,
                                                 pushes: Pushes) -> None:  # noqa: F811
    if not vm_asterisk.running:
        vm_asterisk.start()
        vm_asterisk.cli("module load app_voicemail.so")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = mwi_config(tmp_path / "a", vm_asterisk, pushes, ensure_redis.url)
    prefix = next(line for line in one.read_text().splitlines() if line.startswith("key_prefix"))
    two = mwi_config(tmp_path / "b", vm_asterisk, pushes, ensure_redis.url)
    two.write_text("\n".join(prefix if line.startswith("key_prefix") else line
                             for line in two.read_text().splitlines()) + "\n")
    a = await start_daemon(one)
    b = await start_daemon(two)
    token = await phone(vm_asterisk, "7003", a.daemon.store)
    await wait_for(lambda: b.daemon.store.bindings_for("7003"), 5, "seen by both")
    await leave_message(vm_asterisk, "7003")
    await wait_for(lambda: pushes.of(token, "mwi"), 10, "the voicemail push")
    await wait_for(lambda: sum(metric(r.daemon, "ari_push_mwi_events_total", {"fate": f})
                               for r in (a, b) for f in ("pushed", "unchanged")) == 2, 10, "both decided")
    assert len(pushes.of(token, "mwi")) == 1
