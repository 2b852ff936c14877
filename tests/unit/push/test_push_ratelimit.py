"""The per-device push rate limit: token buckets (in process, under an injected clock) and the
dispatcher's rule: CALL pushes are limited, the follow-ups of a pushed call never are, the
follow-ups of a limited call are skipped. The Redis-backed limiter is in
tests/integration/test_push_ratelimit_redis.py."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest

from ari_push.model import Binding, PushKind, PushMessage, PushOutcome, PushResult
from ari_push.push.dispatch import PushDispatcher
from ari_push.push.ratelimit import LocalRateLimiter, RedisRateLimiter, build_rate_limiter
from ari_push.settings import PushSettings, SettingsError, load
from tests.fakes.builders import binding, message


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Provider:
    name = "fcm"

    def __init__(self, *answers: PushResult) -> None:
        self.sent: list[tuple[str, PushKind, str]] = []
        self.answers = deque(answers)

    def serves(self, b: Binding) -> bool:
        return b.push.provider == "fcm"

    async def warm(self) -> None:
        pass

    async def send(self, b: Binding, m: PushMessage) -> PushResult:
        self.sent.append((b.device_id, m.kind, m.call_id))
        return self.answers.popleft() if self.answers else PushResult(PushOutcome.DELIVERED)

    async def aclose(self) -> None:
        pass


async def no_dead(b: Binding, r: PushResult) -> None:
    raise AssertionError("no token is dead here")


def limited_dispatcher(provider: Provider, rate: float = 6.0, burst: int = 2) -> tuple[PushDispatcher, Clock]:
    clock = Clock()
    limiter = LocalRateLimiter(rate, burst, clock=clock)
    d = PushDispatcher([provider], no_dead, rate_limiter=limiter, monotonic=clock, jitter=lambda: 0.0)
    return d, clock


# ---------------------------------------------------------------- the bucket


def test_bucket_allows_burst_then_one_per_interval() -> None:
    clock = Clock()
    lim = LocalRateLimiter(rate_per_minute=6, burst=3, clock=clock)  # one token every 10 s
    assert [lim.try_acquire("dev") for _ in range(4)] == [True, True, True, False]
    clock.now += 9.9
    assert not lim.try_acquire("dev")
    clock.now += 0.2
    assert lim.try_acquire("dev") and not lim.try_acquire("dev")
    clock.now += 1000
    assert lim.tokens("dev") == 3.0  # never more than the burst
    assert [lim.try_acquire("dev") for _ in range(4)] == [True, True, True, False]


def test_buckets_are_per_device() -> None:
    lim = LocalRateLimiter(rate_per_minute=1, burst=1, clock=Clock())
    assert lim.try_acquire("a") and not lim.try_acquire("a")
    assert lim.try_acquire("b")


def test_full_buckets_are_pruned_so_memory_stays_bounded() -> None:
    clock = Clock()
    lim = LocalRateLimiter(rate_per_minute=60, burst=2, clock=clock, prune_at=100)
    for i in range(100):
        lim.try_acquire(f"old-{i}")
    clock.now += 5  # two seconds refill a bucket: these are full again, i.e. forgettable
    for i in range(50):
        lim.try_acquire(f"new-{i}")
    assert len(lim) <= 100
    assert all(lim.tokens(f"new-{i}") < 2 for i in range(50))  # active buckets kept their state
    for i in range(300):  # all active at once: the table still stays bounded
        lim.try_acquire(f"flood-{i}")
    assert len(lim) <= 101


def test_limiter_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        LocalRateLimiter(0, 1)
    with pytest.raises(ValueError):
        LocalRateLimiter(10, 0)


# ---------------------------------------------------------------- in the dispatcher


async def test_call_pushes_beyond_the_burst_are_skipped_as_rate_limited() -> None:
    provider = Provider()
    d, clock = limited_dispatcher(provider)
    dev = binding("fcm", "token-1")
    results = [await d.send(dev, message(call_id=f"c{i}")) for i in range(4)]
    assert [r.outcome for r in results] == [PushOutcome.DELIVERED] * 2 + [PushOutcome.SKIPPED] * 2
    assert results[2].reason == "rate limited"
    assert [s[2] for s in provider.sent] == ["c0", "c1"]
    assert d.rate_limited["call"] == 2 and d.counters[("fcm", "skipped")] == 2
    clock.now += 10  # 6 per minute: a token every 10 s
    assert (await d.send(dev, message(call_id="c4"))).outcome is PushOutcome.DELIVERED
    other = binding("fcm", "token-2")  # another device has its own bucket
    assert (await d.send(other, message(call_id="c5"))).outcome is PushOutcome.DELIVERED


@pytest.mark.parametrize("kind", [PushKind.CANCEL, PushKind.ANSWERED_ELSEWHERE, PushKind.MISSED_CALL])
async def test_follow_ups_of_a_pushed_call_always_go_out(kind: PushKind) -> None:
    provider = Provider()
    d, _ = limited_dispatcher(provider, burst=1)
    dev = binding("fcm", "token-1")
    assert (await d.send(dev, message(call_id="pushed"))).outcome is PushOutcome.DELIVERED
    assert (await d.send(dev, message(call_id="flood"))).outcome is PushOutcome.SKIPPED  # bucket empty
    # the bucket is empty, yet the phone that rang for "pushed" must hear that it ended
    assert (await d.send(dev, message(kind, call_id="pushed"))).outcome is PushOutcome.DELIVERED
    assert (kind, "pushed") in [(s[1], s[2]) for s in provider.sent]


async def test_follow_ups_of_a_limited_call_are_skipped() -> None:
    provider = Provider()
    d, _ = limited_dispatcher(provider, burst=1)
    dev = binding("fcm", "token-1")
    await d.send(dev, message(call_id="c0"))
    assert (await d.send(dev, message(call_id="c1"))).outcome is PushOutcome.SKIPPED
    for kind in (PushKind.CANCEL, PushKind.MISSED_CALL):
        r = await d.send(dev, message(kind, call_id="c1"))
        assert r.outcome is PushOutcome.SKIPPED and "rate limited" in r.reason
    assert [s[2] for s in provider.sent] == ["c0"]  # no cancel storm for calls that never rang
    assert d.rate_limited == {"call": 1, "cancel": 1, "missed-call": 1}


async def test_a_call_pushed_once_keeps_its_follow_ups_even_if_a_repush_is_limited() -> None:
    provider = Provider()
    d, _ = limited_dispatcher(provider, burst=1)
    dev = binding("fcm", "token-1")
    assert (await d.send(dev, message(call_id="c0"))).outcome is PushOutcome.DELIVERED
    assert (await d.send(dev, message(call_id="c0"))).outcome is PushOutcome.SKIPPED  # a second CALL push
    assert (await d.send(dev, message(PushKind.CANCEL, call_id="c0"))).outcome is PushOutcome.DELIVERED


async def test_retries_spend_one_token_and_unserved_devices_none() -> None:
    retry = PushResult(PushOutcome.RETRY, "UNAVAILABLE", 503)
    provider = Provider(retry, retry)
    d, _ = limited_dispatcher(provider, burst=2)
    dev = binding("fcm", "token-1")
    assert (await d.send(dev, message(call_id="c0"))).outcome is PushOutcome.DELIVERED  # 3 attempts
    assert len(provider.sent) == 3
    assert d.rate_limiter is not None and isinstance(d.rate_limiter, LocalRateLimiter)
    assert d.rate_limiter.tokens(dev.device_id) == pytest.approx(1.0)
    apns = binding("apns", "ab" * 32, "com.example.voip")  # no credentials: SKIPPED, no token spent
    assert (await d.send(apns, message(call_id="c1"))).reason.startswith("no credentials")
    assert d.rate_limiter.tokens(apns.device_id) == 2.0


async def test_send_many_limits_each_device_of_a_flooded_extension() -> None:
    provider = Provider()
    d, _ = limited_dispatcher(provider, burst=2)
    phone, tablet = binding("fcm", "token-phone"), binding("fcm", "token-tablet")
    outcomes = []
    for i in range(10):  # ten calls in a row to one extension with two devices
        results = await d.send_many([phone, tablet], message(call_id=f"c{i}"))
        outcomes.append(tuple(r.outcome for r in results.values()))
    assert len(provider.sent) == 4  # two each, not twenty
    assert outcomes[2] == (PushOutcome.SKIPPED, PushOutcome.SKIPPED)


async def test_without_a_limiter_nothing_is_limited() -> None:
    provider = Provider()
    d = PushDispatcher([provider], no_dead)
    for i in range(20):
        assert (await d.send(binding("fcm", "t"), message(call_id=f"c{i}"))).outcome is PushOutcome.DELIVERED


# ---------------------------------------------------------------- settings


def test_push_settings_defaults_and_validation(tmp_path: Path) -> None:
    base = "[ari]\npassword='x'\n[ami]\nsecret='y'\n"
    cfg = tmp_path / "c.toml"
    cfg.write_text(base)
    assert load(cfg, environ={}).push == PushSettings(rate_per_minute=10.0, burst=5)
    cfg.write_text(base + "[push]\nrate_per_minute = 0\n")
    s = load(cfg, environ={"ARI_PUSH_PUSH__BURST": "3"})
    assert s.push == PushSettings(0.0, 3)
    assert build_rate_limiter(s.push) is None
    for bad, key in (("rate_per_minute = -1", "push.rate_per_minute"), ("burst = 0", "push.burst"),
                     ("burst = 1.5", "push.burst"), ("rate = 5", "push.rate")):
        cfg.write_text(base + f"[push]\n{bad}\n")
        with pytest.raises(SettingsError) as err:
            load(cfg, environ={})
        assert err.value.key == key


def test_build_rate_limiter_picks_redis_when_there_is_a_client() -> None:
    import redis.asyncio as aioredis

    assert isinstance(build_rate_limiter(PushSettings(6, 2)), LocalRateLimiter)
    client = aioredis.Redis(host="127.0.0.1", port=1)  # never connected
    limiter = build_rate_limiter(PushSettings(6, 2), client, "p:")
    assert isinstance(limiter, RedisRateLimiter) and limiter.key("dev") == "p:ratelimit:dev"
