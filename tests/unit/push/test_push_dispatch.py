"""PushDispatcher: provider choice, retries with backoff and Retry-After under an injected
clock, the deadline, token-dead callbacks, SKIPPED logged once, bounded provider calls."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque

import pytest

from ari_push.model import Binding, PushMessage, PushOutcome, PushResult
from ari_push.push.apns import ApnsProvider
from ari_push.push.dispatch import PushDispatcher
from ari_push.settings import ApnsApp
from tests.fakes import ApnsAnswer, FakeApns
from tests.fakes.builders import apns_token, binding, message
from tests.unit.push.conftest import TOPIC

TOKEN = "fcm-token-0123456789-abcdefghijklmnopqrstuvwxyz"


class ScriptedProvider:
    """Answers from a queue; records calls."""

    def __init__(self, *answers: PushResult, name: str = "fcm", serves: str = "fcm") -> None:
        self.name = name
        self.answers = deque(answers)
        self.calls: list[tuple[Binding, PushMessage]] = []
        self._serves = serves
        self.closed = False

    def serves(self, binding: Binding) -> bool:
        return binding.push.provider == self._serves

    async def warm(self) -> None:
        self.warmed = True

    async def send(self, binding: Binding, message: PushMessage) -> PushResult:
        self.calls.append((binding, message))
        return self.answers.popleft() if self.answers else PushResult(PushOutcome.DELIVERED)

    async def aclose(self) -> None:
        self.closed = True


class FakeTime:
    """Injected clock and sleep: sleeping advances the clock, nothing really waits."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class DeadTokens:
    def __init__(self) -> None:
        self.calls: list[tuple[Binding, PushResult]] = []

    async def __call__(self, binding: Binding, result: PushResult) -> None:
        self.calls.append((binding, result))


def dispatcher(*providers: ScriptedProvider, t: FakeTime, dead: DeadTokens | None = None,
               **kw: float) -> PushDispatcher:
    return PushDispatcher(list(providers), dead or DeadTokens(), clock=t.clock, sleep=t.sleep,
                          jitter=lambda: 1.0, **kw)  # type: ignore[arg-type]


RETRY = PushResult(PushOutcome.RETRY, "UNAVAILABLE", 503)


async def test_retries_with_capped_exponential_backoff() -> None:
    t = FakeTime()
    p = ScriptedProvider(RETRY, RETRY, RETRY, RETRY, RETRY)
    d = dispatcher(p, t=t, backoff_base=0.5, backoff_cap=3.0)
    result = await d.send(binding("fcm", TOKEN, "p"), message(deadline=t.now + 60))
    assert result.outcome is PushOutcome.DELIVERED
    assert t.sleeps == [0.5, 1.0, 2.0, 3.0, 3.0]  # jitter pinned at its top
    assert d.attempt_counters == {("fcm", "retry"): 5, ("fcm", "delivered"): 1}
    assert d.counters == {("fcm", "delivered"): 1}


async def test_full_jitter_spans_zero_to_the_ceiling() -> None:
    values = iter([0.0, 0.5, 0.999])
    d = PushDispatcher([], DeadTokens(), jitter=lambda: next(values), backoff_base=1.0, backoff_cap=10.0)
    assert [d.backoff(3), d.backoff(3), d.backoff(3)] == [0.0, 2.0, pytest.approx(3.996)]


async def test_retry_after_is_honoured_when_longer() -> None:
    t = FakeTime()
    p = ScriptedProvider(dataclasses.replace(RETRY, retry_after=7.0), dataclasses.replace(RETRY, retry_after=0.1))
    d = dispatcher(p, t=t, backoff_base=0.5)
    result = await d.send(binding("fcm", TOKEN, "p"), message(deadline=t.now + 60))
    assert result.outcome is PushOutcome.DELIVERED
    assert t.sleeps == [7.0, 1.0]  # Retry-After 7 s wins; 0.1 s is shorter than the backoff


async def test_never_sleeps_past_the_deadline() -> None:
    t = FakeTime()
    p = ScriptedProvider(*[RETRY] * 50)
    d = dispatcher(p, t=t, backoff_base=0.5, backoff_cap=8.0, max_attempts=50)
    deadline = t.now + 5.0
    result = await d.send(binding("fcm", TOKEN, "p"), message(deadline=deadline))
    assert result.outcome is PushOutcome.RETRY and "deadline" in result.reason and result.status == 503
    assert t.sleeps == [0.5, 1.0, 2.0]  # the next (4 s) would end after the deadline
    assert t.now < deadline
    assert d.counters == {("fcm", "retry"): 1}


async def test_retry_after_beyond_the_deadline_stops_at_once() -> None:
    t = FakeTime()
    p = ScriptedProvider(dataclasses.replace(RETRY, retry_after=60.0))
    d = dispatcher(p, t=t)
    result = await d.send(binding("fcm", TOKEN, "p"), message(deadline=t.now + 30))
    assert result.outcome is PushOutcome.RETRY and result.reason.endswith("deadline reached before retry")
    assert t.sleeps == [] and len(p.calls) == 1


async def test_gives_up_after_max_attempts_and_not_after_deadline() -> None:
    t = FakeTime()
    p = ScriptedProvider(*[RETRY] * 10)
    d = dispatcher(p, t=t, max_attempts=3, backoff_base=0.1)
    result = await d.send(binding("fcm", TOKEN, "p"), message(deadline=t.now + 60))
    assert result.outcome is PushOutcome.RETRY and "3 attempts" in result.reason
    assert len(p.calls) == 3

    late = await d.send(binding("fcm", TOKEN, "p"), message(deadline=t.now - 1))
    assert late.outcome is PushOutcome.FAILED and "deadline" in late.reason
    assert len(p.calls) == 3


async def test_token_dead_calls_back_and_logs_masked(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    t = FakeTime()
    dead = DeadTokens()
    gone = PushResult(PushOutcome.TOKEN_DEAD, "UNREGISTERED", 404)
    p = ScriptedProvider(gone)
    d = dispatcher(p, t=t, dead=dead)
    b = binding("fcm", TOKEN, "p")
    result = await d.send(b, message(deadline=t.now + 30))
    assert result is gone
    assert dead.calls == [(b, gone)]
    assert TOKEN not in caplog.text and TOKEN[:4] in caplog.text  # masked: ends only
    assert d.counters == {("fcm", "token-dead"): 1}


async def test_failing_token_dead_handler_does_not_break_the_push(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(binding: Binding, result: PushResult) -> None:
        raise RuntimeError("store down")

    p = ScriptedProvider(PushResult(PushOutcome.TOKEN_DEAD, "Unregistered", 410))
    d = PushDispatcher([p], broken)
    result = await d.send(binding("fcm", TOKEN, "p"), message())
    assert result.outcome is PushOutcome.TOKEN_DEAD
    assert "token-dead handler failed" in caplog.text


async def test_no_credentials_skipped_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    t = FakeTime()
    d = dispatcher(ScriptedProvider(), t=t)
    results = [await d.send(binding("apns", "ab" * 32, "com.x.voip"), message(deadline=t.now + 30))
               for _ in range(3)]
    other = await d.send(binding("apns", "cd" * 32, "com.y.voip"), message(deadline=t.now + 30))
    assert {r.outcome for r in results} == {PushOutcome.SKIPPED}
    assert results[0].reason == "no credentials for apns/com.x.voip"
    assert other.reason == "no credentials for apns/com.y.voip"
    lines = [r.getMessage() for r in caplog.records if "no push credentials" in r.getMessage()]
    assert lines == ["no push credentials for apns/com.x.voip: pushes to such devices are skipped",
                     "no push credentials for apns/com.y.voip: pushes to such devices are skipped"]
    assert d.counters == {("apns", "skipped"): 4}


async def test_first_serving_provider_wins() -> None:
    first = ScriptedProvider(name="webhook", serves="fcm")
    second = ScriptedProvider(name="fcm", serves="fcm")
    d = PushDispatcher([first, second], DeadTokens())
    await d.send(binding("fcm", TOKEN, "p"), message())
    assert len(first.calls) == 1 and second.calls == []
    await d.aclose()
    assert first.closed and second.closed


async def test_provider_exception_becomes_failed() -> None:
    class Exploding(ScriptedProvider):
        async def send(self, binding: Binding, message: PushMessage) -> PushResult:
            raise KeyError("bug")

    d = PushDispatcher([Exploding()], DeadTokens())
    result = await d.send(binding("fcm", TOKEN, "p"), message())
    assert result.outcome is PushOutcome.FAILED and "KeyError" in result.reason


async def test_stalled_provider_is_bounded_and_deadline_kept(fake_apns: FakeApns, apns_app: ApnsApp) -> None:
    fake_apns.script(apns_token(5), *[ApnsAnswer(stall=True)] * 5)
    provider = ApnsProvider(dataclasses.replace(apns_app, timeout=30.0))  # its own timeout is no help
    d = PushDispatcher([provider], DeadTokens(), call_timeout=0.4, backoff_base=0.05)
    try:
        # a generous guard, far below the provider's own 30 s: only the 1 s deadline can end it
        async with asyncio.timeout(15):
            result = await d.send(binding("apns", apns_token(5), TOPIC), message(ring=1.0))
    finally:
        await d.aclose()
    assert result.outcome is PushOutcome.RETRY and "deadline" in result.reason
    assert "no answer within" in result.reason
    attempts = d.attempt_counters[("apns", "retry")]
    assert 1 <= attempts <= 3  # 0.4 s per attempt inside a 1 s deadline: never more than three


async def test_send_many_runs_concurrently_and_returns_per_device() -> None:
    in_flight = 0
    peak = 0

    class Slow(ScriptedProvider):
        async def send(self, binding: Binding, message: PushMessage) -> PushResult:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.05)
            in_flight -= 1
            if binding.push.token.startswith("dead"):
                return PushResult(PushOutcome.TOKEN_DEAD, "UNREGISTERED", 404)
            return PushResult(PushOutcome.DELIVERED)

    dead = DeadTokens()
    d = PushDispatcher([Slow()], dead)
    bindings = [binding("fcm", f"tok-{i}", "p") for i in range(10)] + [binding("fcm", "dead-1", "p"),
                                                                      binding("apns", "ab" * 32, "x")]
    results = await d.send_many(bindings + bindings[:2], message())
    assert peak == 11  # all eleven devices in flight at once (duplicates sent once)
    assert set(results) == {b.device_id for b in bindings}
    assert results[bindings[0].device_id].outcome is PushOutcome.DELIVERED
    assert results[bindings[10].device_id].outcome is PushOutcome.TOKEN_DEAD
    assert results[bindings[11].device_id].outcome is PushOutcome.SKIPPED
    assert [b for b, _ in dead.calls] == [bindings[10]]
