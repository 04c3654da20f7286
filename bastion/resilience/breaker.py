"""Circuit breakers for async calls: pybreaker's state machine around an awaited call, state in Redis or memory.

pybreaker does not await coroutines: `CircuitBreaker.call(async_fn)` returns the un-awaited coroutine as a
success, so no failure is ever counted. `AsyncCircuitBreaker` decides admission itself (closed: go; open: refuse
until `reset_timeout` has passed, then half-open; half-open: one trial call at a time), awaits the call, and then
replays the outcome through `CircuitBreaker.call` with a plain function that returns or re-raises it. pybreaker
therefore keeps all the bookkeeping (failure counter, opening at `fail_max`, the trial closing or re-opening the
circuit, excluded errors) through its public API only.
"""

import asyncio
import contextlib
import functools
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pybreaker
import redis
import structlog

T = TypeVar("T")
R = TypeVar("R")

ErrorPredicate = Callable[[Exception], bool]

log = structlog.get_logger(__name__)

# A service or downstream name becomes part of a Redis key: no separators, no glob characters.
_NAME = re.compile(r"[a-z][a-z0-9_-]*")


class ResilienceError(Exception):
    """Base of the errors raised by the resilience kit itself (never by the wrapped call)."""


class BreakerOpenError(ResilienceError):
    """The circuit is open: the call was refused without being made."""

    def __init__(self, breaker: str, state: str) -> None:
        super().__init__(f"circuit breaker {breaker} is {state}: call refused")
        self.breaker = breaker
        self.state = state


class _LogStateChanges(pybreaker.CircuitBreakerListener):
    def state_change(
        self, cb: pybreaker.CircuitBreaker, old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        log.warning("circuit breaker state changed", breaker=cb.name,
                    old=old_state.name if old_state else None, new=new_state.name)


def _return_none() -> None:
    return None


def _reraise(error: Exception) -> None:
    raise error


class AsyncCircuitBreaker:
    """A circuit breaker for coroutines, on pybreaker's state machine.

    `is_failure(error)` decides which errors count against the downstream (unavailable, timed out); the others
    (not found, invalid argument) prove it is answering, so they count as successes, as pybreaker's `exclude` does.
    Cancellation is the caller's decision, not the downstream's fault: it is not counted at all.

    In half-open state this process lets one trial call through at a time and refuses the others. Replicas
    sharing the state may each run their own trial: whichever outcome is recorded last decides the state.

    OFFLOAD_STORAGE runs the storage's blocking I/O (Redis) in a worker thread, off the event loop.
    """

    def __init__(
        self, name: str, *, storage: pybreaker.CircuitBreakerStorage, is_failure: ErrorPredicate,
        fail_max: int = 5, reset_timeout: float = 30.0, offload_storage: bool = False,
    ) -> None:
        if fail_max < 1 or reset_timeout <= 0:
            raise ValueError(f"breaker {name}: fail_max must be >= 1 and reset_timeout > 0")
        self.name = name
        self._storage = storage
        self._offload = offload_storage
        self._trial_running = False
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=fail_max, reset_timeout=reset_timeout, name=name, state_storage=storage,
            exclude=[lambda error: not is_failure(error)], listeners=[_LogStateChanges()],
            # The call that trips the breaker raises its own error; the following calls get BreakerOpenError.
            throw_new_error_on_trip=False,
        )

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Await FN if the circuit lets it through and record the outcome; else raise `BreakerOpenError`."""
        trial = await self._admit()
        try:
            try:
                result = await fn()
            except Exception as error:
                await self._io(functools.partial(self._record_failure, error))
                raise
            await self._io(self._record_success)
            return result
        finally:
            if trial:
                self._trial_running = False

    async def current_state(self) -> str:
        """`closed`, `open` or `half-open`, as the storage holds it now."""
        return await self._io(lambda: self._breaker.current_state)

    async def _admit(self) -> bool:
        """Raise `BreakerOpenError`, or let the call through; True if it is the half-open trial."""
        state = await self.current_state()
        if state == pybreaker.STATE_CLOSED:
            return False
        if state == pybreaker.STATE_OPEN:
            opened_at = await self._io(lambda: self._storage.opened_at)
            # pybreaker stamps opened_at with the UTC wall clock, so replicas compare against the same clock.
            reopen_at = opened_at + timedelta(seconds=self._breaker.reset_timeout) if opened_at else None
            if reopen_at is not None and datetime.now(UTC) < reopen_at:
                raise BreakerOpenError(self.name, state)
        # Checked and taken with no await in between, so no other coroutine of this process can take it too.
        if self._trial_running:
            raise BreakerOpenError(self.name, state)
        self._trial_running = True
        if state == pybreaker.STATE_OPEN:
            try:
                await self._io(self._breaker.half_open)
            except BaseException:
                self._trial_running = False
                raise
        return True

    def _record_success(self) -> None:
        # CircuitBreakerError: another replica opened the circuit meanwhile, and this late outcome changes nothing.
        with contextlib.suppress(pybreaker.CircuitBreakerError):
            self._breaker.call(_return_none)

    def _record_failure(self, error: Exception) -> None:
        traceback = error.__traceback__
        try:
            self._breaker.call(_reraise, error)
        except pybreaker.CircuitBreakerError:
            # As in _record_success: another replica opened the circuit meanwhile; nothing left to record.
            pass
        except Exception as replayed:
            if replayed is not error:
                raise
        finally:
            # The replay added pybreaker's frames; the caller should see where the error really came from.
            error.__traceback__ = traceback

    async def _io(self, fn: Callable[[], R]) -> R:
        if self._offload:
            return await asyncio.to_thread(fn)
        return fn()


def redis_namespace(service: str, downstream: str) -> str:
    """The key prefix of SERVICE's breaker for DOWNSTREAM, inside SERVICE's Redis ACL prefix `SERVICE:`."""
    for label, value in (("service", service), ("downstream", downstream)):
        if not _NAME.fullmatch(value):
            raise ValueError(f"breaker {label} name {value!r} must match {_NAME.pattern}")
    return f"{service}:breaker:{downstream}"


def redis_breaker(
    service: str, downstream: str, redis_client: redis.Redis, *, is_failure: ErrorPredicate,
    fail_max: int = 5, reset_timeout: float = 30.0,
) -> AsyncCircuitBreaker:
    """SERVICE's breaker for calls to DOWNSTREAM, its state shared by every replica through Redis.

    Keys: `SERVICE:breaker:DOWNSTREAM:pybreaker:{state,fail_counter,success_counter,opened_at}` (pybreaker puts
    its namespace in front of `pybreaker:`), so the service's ACL (`~SERVICE:*`) allows them; pybreaker's default
    keys `pybreaker:*` would be refused. REDIS_CLIENT must be a synchronous client with `decode_responses=False`
    (pybreaker decodes the state bytes itself); its calls run in a worker thread. Creating the breaker writes the
    initial keys (SETNX). If Redis fails later, pybreaker logs it and treats the circuit as closed. `opened_at`
    is stored in whole seconds, so the circuit may half-open up to a second before RESET_TIMEOUT has passed.
    """
    if not isinstance(redis_client, redis.Redis):
        raise TypeError("pybreaker's Redis storage needs a synchronous redis.Redis client, not redis.asyncio")
    if redis_client.get_connection_kwargs().get("decode_responses"):
        raise ValueError("pybreaker's Redis storage needs a client with decode_responses=False")
    storage = pybreaker.CircuitRedisStorage(
        pybreaker.STATE_CLOSED, redis_client, namespace=redis_namespace(service, downstream),
    )
    return AsyncCircuitBreaker(
        f"{service}->{downstream}", storage=storage, is_failure=is_failure, fail_max=fail_max,
        reset_timeout=reset_timeout, offload_storage=True,
    )


def memory_breaker(
    name: str, *, is_failure: ErrorPredicate, fail_max: int = 5, reset_timeout: float = 30.0,
) -> AsyncCircuitBreaker:
    """A breaker whose state lives in this process only: for tests, and for callers with a single replica."""
    return AsyncCircuitBreaker(
        name, storage=pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED), is_failure=is_failure,
        fail_max=fail_max, reset_timeout=reset_timeout,
    )
