"""The refresh schedule's semantics. The same tests run on the Redis schedule in
tests/integration/test_refresh_schedule_redis.py (it re-imports them with a Redis fixture)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ari_push.refresh_store import MemorySchedule, RefreshSchedule, Seen, Watch, merge

AT, GRACE = 0.8, 2.0


@pytest.fixture
async def schedule() -> AsyncIterator[RefreshSchedule]:
    yield MemorySchedule(AT, GRACE)


def watch(expires: float = 1000.0, lifetime: float = 100.0, device: str = "d1", uri: str = "sip:a@h:1",
          pushed_at: float = 0.0) -> Watch:
    return Watch("alice", device, uri, expires, lifetime, pushed_at)


def test_due_times() -> None:
    assert watch().due(AT, GRACE) == pytest.approx(980.0)  # 80 % of 100 s before 1000
    assert watch(pushed_at=950).due(AT, GRACE) == 1002.0  # judged after the expiry
    assert watch(pushed_at=-1).due(AT, GRACE) == 1002.0


def test_merge_rules() -> None:
    assert merge(None, watch(), True) == (Seen.NEW, watch())
    assert merge(watch(), watch(expires=1000.4), True) == (Seen.SAME, None)
    assert merge(watch(), watch(expires=900), True) == (Seen.OLDER, None)
    seen, stored = merge(watch(pushed_at=990), watch(expires=1100, lifetime=40), False)
    assert seen is Seen.REREGISTERED and stored is not None
    assert stored.lifetime == 100.0 and stored.pushed_at == 0.0  # estimates never shrink it
    seen, stored = merge(watch(), watch(expires=1100, lifetime=40), True)
    assert seen is Seen.REFRESHED and stored is not None and stored.lifetime == 40.0  # exact wins


async def test_nothing_is_due_before_its_time(schedule: RefreshSchedule) -> None:
    assert await schedule.observe(watch(), exact=True) == (Seen.NEW, 0.0)
    assert await schedule.claim(979.0, 10, 60) == []
    (claimed,) = await schedule.claim(980.0, 10, 60)
    assert claimed == watch()
    assert await schedule.size() == 1


async def test_a_claim_is_a_lease(schedule: RefreshSchedule) -> None:
    await schedule.observe(watch(), exact=True)
    assert len(await schedule.claim(985.0, 10, 60)) == 1
    assert await schedule.claim(1040.0, 10, 60) == []  # claimed: no other daemon gets it
    # the claimer died without writing back: the entry comes back after the lease
    assert len(await schedule.claim(1045.0, 10, 60)) == 1


async def test_put_after_push_moves_it_to_the_expiry(schedule: RefreshSchedule) -> None:
    await schedule.observe(watch(), exact=True)
    (w,) = await schedule.claim(985.0, 10, 60)
    assert await schedule.put(Watch(w.aor, w.device_id, w.contact_uri, w.expires, w.lifetime, 985.0), w.expires)
    assert await schedule.claim(1001.0, 10, 60) == []
    (judged,) = await schedule.claim(1002.0, 10, 60)
    assert judged.pushed_at == 985.0


async def test_a_registration_seen_meanwhile_wins_over_the_claimer(schedule: RefreshSchedule) -> None:
    await schedule.observe(watch(), exact=True)
    (w,) = await schedule.claim(985.0, 10, 60)
    # the phone re-registered from a new port while the claimer was pushing
    seen, _ = await schedule.observe(watch(expires=1090, lifetime=100, uri="sip:a@h:2"), exact=True)
    assert seen is Seen.REFRESHED
    assert not await schedule.put(Watch(w.aor, w.device_id, w.contact_uri, w.expires, w.lifetime, 985.0), w.expires)
    assert not await schedule.drop(w)
    (fresh,) = await schedule.claim(1070.0, 10, 60)
    assert fresh.contact_uri == "sip:a@h:2" and fresh.pushed_at == 0.0


async def test_observe_after_a_push_reports_the_re_registration_once(schedule: RefreshSchedule) -> None:
    await schedule.observe(watch(), exact=True)
    (w,) = await schedule.claim(985.0, 10, 60)
    await schedule.put(Watch(w.aor, w.device_id, w.contact_uri, w.expires, w.lifetime, 985.0), w.expires)
    assert await schedule.observe(watch(expires=1095), exact=True) == (Seen.REREGISTERED, 985.0)
    assert (await schedule.observe(watch(expires=1095), exact=True))[0] is Seen.SAME  # a second daemon
    assert (await schedule.observe(watch(expires=1000), exact=False))[0] is Seen.OLDER


async def test_drop_removes_it(schedule: RefreshSchedule) -> None:
    await schedule.observe(watch(), exact=True)
    await schedule.observe(watch(device="d2"), exact=True)
    assert await schedule.drop(watch())
    assert await schedule.size() == 1
    assert [w.device_id for w in await schedule.claim(2000.0, 10, 60)] == ["d2"]


async def test_claim_takes_at_most_limit(schedule: RefreshSchedule) -> None:
    for i in range(25):
        await schedule.observe(watch(device=f"d{i}", expires=1000.0 + i), exact=True)
    first = await schedule.claim(2000.0, 10, 60)
    second = await schedule.claim(2000.0, 100, 60)
    assert len(first) == 10 and len(second) == 15
    assert {w.device_id for w in first} | {w.device_id for w in second} == {f"d{i}" for i in range(25)}


async def test_at_most_one_push_per_interval_per_device(schedule: RefreshSchedule) -> None:
    assert await schedule.allow_push("d1", 1.0, 100.0)
    assert not await schedule.allow_push("d1", 1.0, 100.1)
    assert await schedule.allow_push("d2", 1.0, 100.1)
