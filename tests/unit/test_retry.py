"""Retries: only transient errors, with backoff inside the deadline, capped by the budget and by an open breaker."""

import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc
import pybreaker
import pytest

from bastion.grpc.client import is_transient
from bastion.resilience.breaker import BreakerOpenError, memory_breaker
from bastion.resilience.retry import DeadlineExceededError, RetryBudget, call_with_retries, resilient_call

TINY = 0.001  # seconds of backoff, so that tests about attempts run fast


def transient(error: Exception) -> bool:
    return isinstance(error, ConnectionError)


class Flaky:
    """Fails with ERROR FAILURES times, then answers; counts every attempt."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or ConnectionError("unavailable")
        self.attempts = 0

    async def __call__(self) -> str:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise self.error
        return "ok"


def big_budget() -> RetryBudget:
    return RetryBudget(ratio=1.0, cap=1000.0)


def retry(
    fn: Callable[[], Awaitable[str]], *, deadline: float = 5, budget: RetryBudget | None = None, max_attempts: int = 4,
    initial_backoff: float = TINY, max_backoff: float = TINY,
) -> str:
    """Run `call_with_retries` on a fresh event loop, retrying ConnectionError."""
    return asyncio.run(call_with_retries(
        fn, is_transient=transient, deadline_seconds=deadline, budget=budget or big_budget(),
        max_attempts=max_attempts, initial_backoff=initial_backoff, max_backoff=max_backoff,
    ))


def test_transient_errors_are_retried_until_success() -> None:
    flaky = Flaky(failures=2)
    assert retry(flaky) == "ok"
    assert flaky.attempts == 3


def test_any_callable_returning_an_awaitable_is_awaited() -> None:
    flaky = Flaky(failures=1)
    assert retry(lambda: flaky()) == "ok"
    assert flaky.attempts == 2


def test_a_non_transient_error_is_raised_at_once() -> None:
    error = ValueError("invalid amount")
    flaky = Flaky(failures=10, error=error)
    with pytest.raises(ValueError) as raised:
        retry(flaky)
    assert raised.value is error
    assert flaky.attempts == 1


def test_the_last_transient_error_is_raised_when_attempts_run_out() -> None:
    flaky = Flaky(failures=10)
    with pytest.raises(ConnectionError):
        retry(flaky, max_attempts=4)
    assert flaky.attempts == 4


class Stamped(Flaky):
    """A Flaky that notes the event loop's time of each attempt."""

    def __init__(self, failures: int) -> None:
        super().__init__(failures)
        self.times: list[float] = []

    async def __call__(self) -> str:
        self.times.append(asyncio.get_running_loop().time())
        return await super().__call__()


def test_backoff_never_sleeps_past_the_deadline() -> None:
    """Backoffs of up to 0.1 s in a 1 s deadline, with real sleeps: no sleep is ever planned to end past the
    deadline (without the deadline check in `stop`, the one that crosses it is). What each sleep was planned to
    end at is checked, not how the last one went: on a busy machine a sleep planned to end just before the
    deadline can wake after it, and the call then ends DeadlineExceededError, as it should."""
    flaky = Stamped(failures=1000)
    planned: list[float] = []

    async def watched(seconds: float) -> None:
        planned.append(asyncio.get_running_loop().time() + seconds)
        await asyncio.sleep(seconds)

    async def run() -> float:
        deadline = asyncio.get_running_loop().time() + 1.0
        with pytest.raises((ConnectionError, DeadlineExceededError)):
            await call_with_retries(flaky, is_transient=transient, deadline_seconds=1.0, budget=big_budget(),
                                    max_attempts=1000, initial_backoff=0.1, max_backoff=0.1, sleep=watched)
        return deadline

    deadline = asyncio.run(run())
    assert flaky.attempts >= 3  # it retried while the deadline allowed (unless the loop stalled for 0.8 s)
    assert max(planned) <= deadline + 1e-3  # call_with_retries reads the clock a moment after this test did


def test_backoff_grows_up_to_its_cap_with_full_jitter() -> None:
    slept: list[float] = []

    async def note(seconds: float) -> None:
        slept.append(seconds)

    flaky = Flaky(failures=6)
    assert asyncio.run(call_with_retries(
        flaky, is_transient=transient, deadline_seconds=5, budget=big_budget(), max_attempts=10,
        initial_backoff=0.02, max_backoff=0.08, sleep=note,
    )) == "ok"
    assert flaky.attempts == 7
    ceilings = [0.02, 0.04, 0.08, 0.08, 0.08, 0.08]  # doubling from the initial backoff, then the cap
    assert len(slept) == len(ceilings)
    assert all(0 <= seconds <= ceiling for seconds, ceiling in zip(slept, ceilings, strict=True))
    assert len(set(slept)) > 1  # jitter: random, not the ceiling every time


def test_an_attempt_still_running_at_the_deadline_is_cancelled() -> None:
    async def hangs() -> str:
        await asyncio.sleep(10)
        return "too late"

    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        retry(hangs, deadline=0.05)
    assert time.monotonic() - started < 1


def test_the_budget_starts_full_earns_a_ratio_per_call_and_pays_one_per_retry() -> None:
    budget = RetryBudget(ratio=0.5, cap=2.0)
    assert [budget.withdraw(), budget.withdraw(), budget.withdraw()] == [True, True, False]
    budget.deposit()
    assert not budget.withdraw()
    budget.deposit()
    assert budget.withdraw()
    for _ in range(10):
        budget.deposit()
    assert budget.tokens == 2.0


def test_the_budget_caps_the_total_attempts() -> None:
    ratio, floor, calls = 0.2, 10.0, 100
    budget = RetryBudget(ratio=ratio, cap=floor)
    flaky = Flaky(failures=10**6)

    async def many_calls() -> None:
        for _ in range(calls):
            with pytest.raises(ConnectionError):
                await call_with_retries(flaky, is_transient=transient, deadline_seconds=5, budget=budget,
                                        max_attempts=4, initial_backoff=TINY, max_backoff=TINY)

    asyncio.run(many_calls())
    assert calls < flaky.attempts <= calls * (1 + ratio) + floor
    assert flaky.attempts < calls * 4 / 2


def test_an_empty_budget_means_no_retry() -> None:
    flaky = Flaky(failures=1)
    with pytest.raises(ConnectionError):
        retry(flaky, budget=RetryBudget(ratio=0, cap=0))
    assert flaky.attempts == 1


def test_resilient_call_retries_through_the_breaker() -> None:
    async def scenario() -> None:
        breaker = memory_breaker("test", is_failure=transient, fail_max=3)
        flaky = Flaky(failures=2)
        result = await resilient_call(flaky, breaker=breaker, budget=big_budget(), is_transient=transient,
                                      deadline_seconds=5, initial_backoff=TINY, max_backoff=TINY)
        assert result == "ok"
        assert flaky.attempts == 3
        assert await breaker.current_state() == pybreaker.STATE_CLOSED

    asyncio.run(scenario())


def test_an_open_breaker_stops_the_retries() -> None:
    async def scenario() -> None:
        breaker = memory_breaker("test", is_failure=transient, fail_max=2)
        flaky = Flaky(failures=100)
        with pytest.raises(BreakerOpenError):
            await resilient_call(flaky, breaker=breaker, budget=big_budget(), is_transient=lambda error: True,
                                 deadline_seconds=5, max_attempts=10, initial_backoff=TINY, max_backoff=TINY)
        assert flaky.attempts == 2

    asyncio.run(scenario())


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_only_unavailable_and_deadline_exceeded_are_retried_by_the_client(code: grpc.StatusCode) -> None:
    """A retried INTERNAL or UNKNOWN could run a call twice that did something the first time; a business refusal
    would be asked again for nothing. Only UNAVAILABLE and DEADLINE_EXCEEDED are transient; a deadline can pass
    after the server did the work, which is why callers send the same idempotency key on every attempt."""
    error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="from a test")
    assert is_transient(error) == (code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED))
    assert not is_transient(RuntimeError("not a gRPC error"))


def test_the_kits_own_refusal_is_never_retried_whatever_the_predicate_says() -> None:
    """An open breaker ends the retries at once: no budget spent, no backoff slept, even with a caller whose
    predicate calls every error transient."""
    refused = Flaky(failures=10, error=BreakerOpenError("payments->accounts", "open"))
    budget = big_budget()
    with pytest.raises(BreakerOpenError):
        asyncio.run(call_with_retries(refused, is_transient=lambda error: True, deadline_seconds=5, budget=budget,
                                      initial_backoff=TINY, max_backoff=TINY))
    assert refused.attempts == 1 and budget.tokens == 1000.0


def test_a_cancelled_attempt_is_not_retried() -> None:
    cancelled = Flaky(failures=1, error=asyncio.CancelledError())  # type: ignore[arg-type]
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(call_with_retries(cancelled, is_transient=lambda error: True, deadline_seconds=5,
                                      budget=big_budget(), initial_backoff=TINY, max_backoff=TINY))
    assert cancelled.attempts == 1


def test_every_call_earns_its_ratio_for_the_budget() -> None:
    budget = RetryBudget(ratio=0.5, cap=2.0)
    assert budget.withdraw() and budget.withdraw() and budget.tokens == 0
    assert retry(Flaky(failures=0), budget=budget) == "ok"
    assert budget.tokens == 0.5
    flaky = Flaky(failures=1)
    assert retry(flaky, budget=budget) == "ok", "two calls earned the retry the third one needs"
    assert flaky.attempts == 2 and budget.tokens == 0


def test_a_timeout_error_of_the_call_itself_is_not_mistaken_for_the_deadline() -> None:
    error = TimeoutError("read timed out")  # the downstream's own, long before the deadline
    flaky = Flaky(failures=10, error=error)
    with pytest.raises(TimeoutError) as raised:
        retry(flaky, deadline=5)
    assert raised.value is error and not isinstance(raised.value, DeadlineExceededError)


def test_resilient_call_honours_max_attempts() -> None:
    async def scenario() -> None:
        breaker = memory_breaker("test", is_failure=transient, fail_max=100)
        flaky = Flaky(failures=100)
        with pytest.raises(ConnectionError):
            await resilient_call(flaky, breaker=breaker, budget=big_budget(), is_transient=transient,
                                 deadline_seconds=5, max_attempts=2, initial_backoff=TINY, max_backoff=TINY)
        assert flaky.attempts == 2

    asyncio.run(scenario())


@pytest.mark.parametrize("options", [{"deadline_seconds": 0}, {"deadline_seconds": -1}, {"max_attempts": 0}])
def test_a_call_that_could_never_be_made_is_refused_up_front(options: dict[str, float]) -> None:
    flaky = Flaky(failures=0)
    arguments: dict[str, float] = {"deadline_seconds": 5, "max_attempts": 4, **options}
    with pytest.raises(ValueError, match="deadline_seconds"):
        asyncio.run(call_with_retries(flaky, is_transient=transient, budget=big_budget(), **arguments))  # type: ignore[arg-type]
    assert flaky.attempts == 0


@pytest.mark.parametrize("options", [{"ratio": -0.1}, {"cap": -1.0}])
def test_a_budget_with_negative_tokens_is_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="ratio and cap"):
        RetryBudget(**options)
