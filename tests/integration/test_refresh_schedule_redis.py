"""The refresh schedule suite of tests/unit/test_refresh_store.py, on a real Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from ari_push.redis_keys import Keys
from ari_push.refresh_store import RedisSchedule, RefreshSchedule
from rig.redis import RedisServer
from tests.unit.test_refresh_store import (  # noqa: F401  (collected here again, on Redis)
    AT,
    GRACE,
    test_a_claim_is_a_lease,
    test_a_registration_seen_meanwhile_wins_over_the_claimer,
    test_at_most_one_push_per_interval_per_device,
    test_claim_takes_at_most_limit,
    test_drop_removes_it,
    test_nothing_is_due_before_its_time,
    test_observe_after_a_push_reports_the_re_registration_once,
    test_put_after_push_moves_it_to_the_expiry,
)


@pytest.fixture
async def schedule(ensure_redis: RedisServer) -> AsyncIterator[RefreshSchedule]:
    client = aioredis.Redis.from_url(ensure_redis.url)
    yield RedisSchedule(client, Keys(f"t-{uuid.uuid4().hex[:8]}:"), AT, GRACE)
    await client.aclose()
