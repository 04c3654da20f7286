"""Retries of transient failures: exponential backoff with full jitter, bounded by attempts, a deadline and a
retry budget, so that retries never multiply the load on a struggling downstream.

Every attempt repeats the same operation: callers must pass the same idempotency key on every attempt, so that
a retried call whose first attempt did reach the server has no second effect.
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

from bastion.resilience.breaker import AsyncCircuitBreaker, ErrorPredicate, ResilienceError

T = TypeVar("T")


class DeadlineExceededError(ResilienceError):
    """The deadline passed while an attempt was running; the attempt was cancelled."""


class RetryBudget:
    """A token bucket shared by all calls to one downstream (one event loop; not thread-safe).

    Each call deposits RATIO tokens, up to CAP; each retry withdraws one, and there is no retry without a whole
    token. Retries thus add at most RATIO of the calls' load, plus CAP, the floor the bucket starts full with.
    """

    def __init__(self, *, ratio: float = 0.2, cap: float = 10.0) -> None:
        if ratio < 0 or cap < 0:
            raise ValueError("a retry budget's ratio and cap must be >= 0")
        self.ratio = ratio
        self.cap = cap
        self._tokens = cap

    @property
    def tokens(self) -> float:
        return self._tokens

    def deposit(self) -> None:
        """A call's first attempt earns RATIO of a retry."""
        self._tokens = min(self.cap, self._tokens + self.ratio)

    def withdraw(self) -> bool:
        """Pay for one retry; False, and nothing taken, if the budget cannot."""
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


async def call_with_retries(
    fn: Callable[[], Awaitable[T]], *, is_transient: ErrorPredicate, deadline_seconds: float, budget: RetryBudget,
    max_attempts: int = 4, initial_backoff: float = 0.05, max_backoff: float = 1.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Await FN, retrying it while its error is transient, attempts and the budget remain, and the deadline allows.

    Retry number n sleeps a random time in [0, min(MAX_BACKOFF, INITIAL_BACKOFF * 2**(n-1))] first; there is no
    retry if that sleep would end past the deadline. A non-transient error, or the last one, is raised as it is.
    An attempt still running at the deadline is cancelled, and `DeadlineExceededError` raised. The kit's own
    errors (`BreakerOpenError`) and cancellation are never retried. SLEEP waits out each backoff (tests watch it).
    """
    if deadline_seconds <= 0 or max_attempts < 1:
        raise ValueError("deadline_seconds must be > 0 and max_attempts >= 1")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_seconds

    def worth_retrying(error: BaseException) -> bool:
        return isinstance(error, Exception) and not isinstance(error, ResilienceError) and is_transient(error)

    def stop(state: RetryCallState) -> bool:
        # tenacity has already chosen the next sleep (upcoming_sleep); the budget is paid only for a real retry.
        if state.attempt_number >= max_attempts or deadline - loop.time() < state.upcoming_sleep:
            return True
        return not budget.withdraw()

    retrying = AsyncRetrying(
        retry=retry_if_exception(worth_retrying), stop=stop,
        wait=wait_random_exponential(multiplier=initial_backoff, max=max_backoff), reraise=True, sleep=sleep,
    )
    async def attempt() -> T:
        # tenacity awaits only coroutine functions; FN may be any callable returning an awaitable (a gRPC stub).
        return await fn()

    budget.deposit()
    timeout = asyncio.timeout_at(deadline)
    try:
        async with timeout:
            result: T = await retrying(attempt)
            return result
    except TimeoutError as error:
        if timeout.expired():
            raise DeadlineExceededError(f"deadline of {deadline_seconds}s passed during an attempt") from error
        raise


async def resilient_call(
    fn: Callable[[], Awaitable[T]], *, breaker: AsyncCircuitBreaker, budget: RetryBudget,
    is_transient: ErrorPredicate, deadline_seconds: float, max_attempts: int = 4, initial_backoff: float = 0.05,
    max_backoff: float = 1.0,
) -> T:
    """`call_with_retries` with each attempt through BREAKER: once it is open, `BreakerOpenError` ends the retries."""
    return await call_with_retries(
        lambda: breaker.call(fn), is_transient=is_transient, deadline_seconds=deadline_seconds, budget=budget,
        max_attempts=max_attempts, initial_backoff=initial_backoff, max_backoff=max_backoff,
    )
