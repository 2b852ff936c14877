"""Picks the provider for a binding, retries what is worth retrying, never past the deadline.

Retry policy (docs/providers.md): a RETRY answer is tried again after a capped exponential
backoff with full jitter (``uniform(0, min(cap, base * 2**n))``), or after the provider's
Retry-After when that is longer. A retry that could not start before ``message.deadline``
is not made: the last RETRY result is returned with a reason saying so. Each provider call
is bounded by ``asyncio.timeout(min(call_timeout, time left))``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from functools import partial

from ari_push.model import Binding, PushKind, PushMessage, PushOutcome, PushResult, mask
from ari_push.push.base import PushProvider
from ari_push.push.common import Clock, describe
from ari_push.push.fanout import Fanout
from ari_push.push.ratelimit import RateLimiter

log = logging.getLogger(__name__)

TokenDeadHandler = Callable[[Binding, PushResult], Awaitable[None]]
#: told each push's final result: (binding, message, provider name, result, latency ms, attempts)
PushObserver = Callable[[Binding, PushMessage, str, PushResult, float, int], None]
Sleep = Callable[[float], Awaitable[None]]


class PushDispatcher:
    """Sends pushes through the first provider that serves each binding.

    ``counters`` counts final results per ``(provider, outcome)``; ``attempt_counters``
    counts every provider answer (retries included). SKIPPED is counted under the
    binding's provider name.
    """

    def __init__(
        self,
        providers: Sequence[PushProvider],
        on_token_dead: TokenDeadHandler,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
        *,
        call_timeout: float = 10.0,
        max_attempts: int = 6,
        backoff_base: float = 0.25,
        backoff_cap: float = 4.0,
        jitter: Callable[[], float] = random.random,
        rate_limiter: RateLimiter | None = None,
        monotonic: Clock = time.monotonic,
        fanout: Fanout | None = None,
    ) -> None:
        self.providers = list(providers)
        self._on_token_dead = on_token_dead
        self._clock = clock
        self._sleep = sleep
        self.call_timeout = call_timeout
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._jitter = jitter
        self._unserved: set[tuple[str, str]] = set()
        self._final: Counter[tuple[str, str]] = Counter()
        self._attempts: Counter[tuple[str, str]] = Counter()
        self.rate_limiter = rate_limiter
        self._monotonic = monotonic
        self.fanout = fanout or Fanout()  # bounds pushes in flight per call and per host (push/fanout.py)
        # (call_id, device_id) of CALL pushes while a limiter is set -> (forget after, was pushed)
        self._calls: dict[tuple[str, str], tuple[float, bool]] = {}
        self._calls_prune_at = 1024
        self.rate_limited: Counter[str] = Counter()  # by push kind
        self._last_limit_log = float("-inf")
        self._limited_since_log = 0
        self.observer: PushObserver | None = None  # call traces (trace_recorder.Tracer.on_push)

    @property
    def counters(self) -> dict[tuple[str, str], int]:
        return dict(self._final)

    @property
    def attempt_counters(self) -> dict[tuple[str, str], int]:
        return dict(self._attempts)

    def provider_for(self, binding: Binding) -> PushProvider | None:
        for provider in self.providers:
            if provider.serves(binding):
                return provider
        return None

    def backoff(self, attempt: int) -> float:
        """Full-jitter delay before retry number ``attempt`` (1-based)."""
        return self._jitter() * min(self.backoff_cap, self.backoff_base * 2.0 ** (attempt - 1))

    async def send(self, binding: Binding, message: PushMessage, verdict: bool | None = None) -> PushResult:
        """Send one push; never raises for a provider's failure (CancelledError passes).

        ``verdict`` is the rate limit's answer for a CALL push when the caller already took the
        token (the call flow does, in the same store round trip as the bindings: push/plan.py);
        None asks the limiter here."""
        started = self._monotonic()
        result, provider_name, attempts = await self._send(binding, message, verdict)
        if self.observer is not None:
            try:
                self.observer(binding, message, provider_name, result, (self._monotonic() - started) * 1000.0,
                              attempts)
            except Exception:  # a trace must never fail a push
                log.exception("push observer failed")
        return result

    async def _send(self, binding: Binding, message: PushMessage,
                    verdict: bool | None) -> tuple[PushResult, str, int]:
        provider = self.provider_for(binding)
        if provider is None:
            key = (binding.push.provider, binding.push.param)
            if key not in self._unserved:
                self._unserved.add(key)
                log.warning("no push credentials for %s/%s: pushes to such devices are skipped",
                            key[0], key[1] or "-")
            result = PushResult(PushOutcome.SKIPPED, f"no credentials for {key[0]}/{key[1]}")
            self._final[(binding.push.provider, str(result.outcome))] += 1
            return result, binding.push.provider, 0
        limited = await self._rate_limited(binding, message, verdict)
        if limited is not None:
            self._final[(provider.name, str(limited.outcome))] += 1
            return limited, provider.name, 0
        result, attempts = await self._send_with_retries(provider, binding, message)
        self._final[(provider.name, str(result.outcome))] += 1
        if result.outcome is PushOutcome.TOKEN_DEAD:
            log.info("push %s: token dead (%s), call %s", describe(binding), result.reason, message.call_id)
            try:
                await self._on_token_dead(binding, result)
            except Exception:
                log.exception("token-dead handler failed for device %s", binding.device_id)
        elif result.outcome is not PushOutcome.DELIVERED:
            log.warning("push %s via %s: %s (%s), call %s", describe(binding), provider.name,
                        result.outcome, result.reason, message.call_id)
        return result, provider.name, attempts

    async def _rate_limited(self, binding: Binding, message: PushMessage,
                            verdict: bool | None = None) -> PushResult | None:
        """SKIPPED when this push may not go out under the rate limit, else None."""
        key = (message.call_id, binding.device_id)
        now = self._monotonic()
        if message.kind is not PushKind.CALL:
            state = self._calls.get(key)
            if state is not None and not state[1]:
                self.rate_limited[str(message.kind)] += 1
                return PushResult(PushOutcome.SKIPPED, "rate limited (so was the call push)")
            return None  # the phone was pushed for this call: it must hear the end of it
        if verdict is not None:
            allowed = verdict
        elif self.rate_limiter is not None:
            allowed = await self.rate_limiter.acquire(binding.device_id)
        else:
            return None
        # follow-ups come when the call ends: by its deadline, plus the cancel/missed-call margin
        expires = now + max(0.0, message.deadline - self._clock()) + 300.0
        self._calls[key] = (expires, allowed or self._calls.get(key, (0.0, False))[1])
        if len(self._calls) > self._calls_prune_at:
            self._calls = {k: v for k, v in self._calls.items() if v[0] > now}
            while len(self._calls) > 100_000:  # a flood of calls: keep the newest
                del self._calls[next(iter(self._calls))]
            self._calls_prune_at = max(1024, 2 * len(self._calls))
        if allowed:
            return None
        self.rate_limited[str(message.kind)] += 1
        self._limited_since_log += 1
        if now - self._last_limit_log >= 60.0:  # a flood must not become a log storm either
            log.warning("push %s rate limited, call %s (%d since the last such line); its follow-ups are "
                        "skipped too", describe(binding), message.call_id, self._limited_since_log)
            self._last_limit_log, self._limited_since_log = now, 0
        return PushResult(PushOutcome.SKIPPED, "rate limited")

    async def _send_with_retries(
        self, provider: PushProvider, binding: Binding, message: PushMessage
    ) -> tuple[PushResult, int]:
        """The final result and how many attempts it took."""
        attempt = 0
        last: PushResult | None = None
        while True:
            left = message.deadline - self._clock()
            if left <= 0:
                if last is None:
                    return PushResult(PushOutcome.FAILED, "deadline passed before the first attempt"), attempt
                return replace(last, reason=f"{last.reason}; deadline reached"), attempt
            attempt += 1
            result = await self._attempt(provider, binding, message, min(self.call_timeout, left))
            self._attempts[(provider.name, str(result.outcome))] += 1
            if result.outcome is not PushOutcome.RETRY:
                return result, attempt
            last = result
            if attempt >= self.max_attempts:
                return replace(result, reason=f"{result.reason}; gave up after {attempt} attempts"), attempt
            delay = self.backoff(attempt)
            if result.retry_after is not None:
                delay = max(delay, result.retry_after)
            if self._clock() + delay >= message.deadline:
                return replace(result, reason=f"{result.reason}; deadline reached before retry"), attempt
            log.debug("push %s: %s, retry %d in %.2fs", describe(binding), result.reason, attempt, delay)
            await self._sleep(delay)

    async def _attempt(
        self, provider: PushProvider, binding: Binding, message: PushMessage, timeout: float
    ) -> PushResult:
        try:
            async with asyncio.timeout(timeout), self.fanout.host_slot(provider.name, binding):
                return await provider.send(binding, message)
        except TimeoutError:
            return PushResult(PushOutcome.RETRY, f"no answer within {timeout:.1f}s")
        except Exception as exc:  # a provider bug must not take the call down
            log.exception("provider %s raised on %s", provider.name, describe(binding))
            return PushResult(PushOutcome.FAILED, f"provider error ({type(exc).__name__})")

    async def send_many(self, bindings: Iterable[Binding], message: PushMessage,
                        verdicts: Mapping[str, bool] | None = None) -> dict[str, PushResult]:
        """Push every binding at once; results by device_id (one per device). ``verdicts``:
        rate-limit answers by device id, taken by the caller (see ``send``)."""
        unique = {b.device_id: b for b in bindings}
        tasks: dict[str, asyncio.Task[PushResult]] = {}
        slots = self.fanout.call_slots()
        if len(unique) == 1:  # the common case: no task, the request leaves one loop turn sooner
            ((device_id, binding),) = unique.items()
            verdict = verdicts.get(device_id) if verdicts is not None else None
            return {device_id: await self.fanout.bounded(slots, partial(self.send, binding, message, verdict))}
        async with asyncio.TaskGroup() as group:
            for device_id, binding in unique.items():
                verdict = verdicts.get(device_id) if verdicts is not None else None
                tasks[device_id] = group.create_task(self.fanout.bounded(slots, partial(self.send, binding, message,
                                                                                        verdict)),
                                                     name=f"push-{mask(device_id)}")
        return {device_id: task.result() for device_id, task in tasks.items()}

    async def aclose(self) -> None:
        """Close every provider's client (the daemon does at stop)."""
        for provider in self.providers:
            try:
                await provider.aclose()
            except Exception:
                log.exception("closing provider %s", provider.name)
