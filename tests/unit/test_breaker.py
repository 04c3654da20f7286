"""The async circuit breaker: awaited failures count, an open circuit refuses at once, half-open lets one trial."""

import asyncio
import threading
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pybreaker
import pytest
import redis

from bastion.resilience.breaker import (
    AsyncCircuitBreaker,
    BreakerOpenError,
    ResilienceError,
    memory_breaker,
    redis_breaker,
    redis_namespace,
)

RESET = 0.05


def unavailable(error: Exception) -> bool:
    """ConnectionError stands for the downstream being down; anything else is a business answer."""
    return isinstance(error, ConnectionError)


class Downstream:
    """A fake downstream that counts the calls that reached it."""

    def __init__(self) -> None:
        self.calls = 0

    async def fail(self) -> str:
        self.calls += 1
        raise ConnectionError("downstream unavailable")

    async def not_found(self) -> str:
        self.calls += 1
        raise KeyError("no such account")

    async def succeed(self) -> str:
        self.calls += 1
        return "ok"


def breaker(fail_max: int = 3) -> AsyncCircuitBreaker:
    return memory_breaker("test", is_failure=unavailable, fail_max=fail_max, reset_timeout=RESET)


async def fail_times(cb: AsyncCircuitBreaker, fn: Callable[[], Awaitable[str]], times: int) -> None:
    for _ in range(times):
        with pytest.raises(ConnectionError):
            await cb.call(fn)


def test_async_failures_are_counted_and_open_the_breaker() -> None:
    async def scenario() -> None:
        cb, downstream = breaker(fail_max=3), Downstream()
        await fail_times(cb, downstream.fail, 2)
        assert await cb.current_state() == pybreaker.STATE_CLOSED
        await fail_times(cb, downstream.fail, 1)
        assert await cb.current_state() == pybreaker.STATE_OPEN
        assert downstream.calls == 3

    asyncio.run(scenario())


def test_an_open_breaker_fails_fast_without_calling() -> None:
    async def scenario() -> None:
        cb, downstream = breaker(fail_max=2), Downstream()
        await fail_times(cb, downstream.fail, 2)
        for _ in range(10):
            with pytest.raises(BreakerOpenError) as refused:
                await cb.call(downstream.succeed)
            assert isinstance(refused.value, ResilienceError)
        assert downstream.calls == 2

    asyncio.run(scenario())


def test_after_the_reset_timeout_a_successful_trial_closes_the_breaker() -> None:
    async def scenario() -> None:
        cb, downstream = breaker(fail_max=2), Downstream()
        await fail_times(cb, downstream.fail, 2)
        await asyncio.sleep(RESET * 1.5)
        assert await cb.call(downstream.succeed) == "ok"
        assert await cb.current_state() == pybreaker.STATE_CLOSED
        await fail_times(cb, downstream.fail, 1)
        assert await cb.current_state() == pybreaker.STATE_CLOSED, "the counter starts again from zero"

    asyncio.run(scenario())


def test_after_the_reset_timeout_a_failed_trial_reopens_the_breaker() -> None:
    async def scenario() -> None:
        cb, downstream = breaker(fail_max=2), Downstream()
        await fail_times(cb, downstream.fail, 2)
        await asyncio.sleep(RESET * 1.5)
        await fail_times(cb, downstream.fail, 1)
        assert await cb.current_state() == pybreaker.STATE_OPEN
        with pytest.raises(BreakerOpenError):
            await cb.call(downstream.succeed)
        assert downstream.calls == 3

    asyncio.run(scenario())


def test_half_open_lets_one_trial_through_at_a_time() -> None:
    async def scenario() -> None:
        cb, downstream = breaker(fail_max=1), Downstream()
        await fail_times(cb, downstream.fail, 1)
        await asyncio.sleep(RESET * 1.5)
        release = asyncio.Event()

        async def slow_success() -> str:
            await release.wait()
            return await downstream.succeed()

        trial = asyncio.create_task(cb.call(slow_success))
        await asyncio.sleep(0)
        assert await cb.current_state() == pybreaker.STATE_HALF_OPEN
        with pytest.raises(BreakerOpenError):
            await cb.call(downstream.succeed)
        release.set()
        assert await trial == "ok"
        assert await cb.current_state() == pybreaker.STATE_CLOSED
        assert downstream.calls == 2

    asyncio.run(scenario())


def test_concurrent_calls_after_the_timeout_make_a_single_trial() -> None:
    async def scenario() -> None:
        # Storage I/O in worker threads, as with Redis: the admission awaits between reading and deciding.
        cb = AsyncCircuitBreaker("test", storage=pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED),
                                 is_failure=unavailable, fail_max=1, reset_timeout=RESET, offload_storage=True)
        downstream = Downstream()
        await fail_times(cb, downstream.fail, 1)
        await asyncio.sleep(RESET * 1.5)

        async def slow_success() -> str:
            await asyncio.sleep(0.05)
            return await downstream.succeed()

        outcomes = await asyncio.gather(*(cb.call(slow_success) for _ in range(10)), return_exceptions=True)
        assert outcomes.count("ok") == 1
        assert all(isinstance(outcome, BreakerOpenError) for outcome in outcomes if outcome != "ok")
        assert downstream.calls == 2
        assert await cb.current_state() == pybreaker.STATE_CLOSED

    asyncio.run(scenario())


def test_business_errors_do_not_count_as_failures() -> None:
    async def scenario() -> None:
        cb, downstream = breaker(fail_max=3), Downstream()
        for _ in range(10):
            with pytest.raises(KeyError):
                await cb.call(downstream.not_found)
        await fail_times(cb, downstream.fail, 2)
        with pytest.raises(KeyError):
            await cb.call(downstream.not_found)
        await fail_times(cb, downstream.fail, 2)
        assert await cb.current_state() == pybreaker.STATE_CLOSED, "an answer resets the consecutive failures"
        assert downstream.calls == 15

    asyncio.run(scenario())


def test_the_call_result_and_error_pass_through_unchanged() -> None:
    async def scenario() -> None:
        cb = breaker()
        error = ConnectionError("down")

        async def fail() -> str:
            raise error

        assert await cb.call(Downstream().succeed) == "ok"
        with pytest.raises(ConnectionError) as raised:
            await cb.call(fail)
        assert raised.value is error
        frames = traceback.extract_tb(raised.value.__traceback__)
        assert not [frame for frame in frames if "pybreaker" in frame.filename], "no frames of the replay"

    asyncio.run(scenario())


def test_cancellation_is_not_a_failure() -> None:
    async def scenario() -> None:
        cb = breaker(fail_max=1)
        call = asyncio.create_task(cb.call(lambda: asyncio.sleep(10, result="late")))
        await asyncio.sleep(0)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await cb.current_state() == pybreaker.STATE_CLOSED

    asyncio.run(scenario())


def test_replicas_sharing_storage_share_the_state() -> None:
    async def scenario() -> None:
        shared = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        one, two = (
            AsyncCircuitBreaker(name, storage=shared, is_failure=unavailable, fail_max=2, reset_timeout=RESET)
            for name in ("one", "two")
        )
        downstream = Downstream()
        await fail_times(one, downstream.fail, 1)
        await fail_times(two, downstream.fail, 1)
        with pytest.raises(BreakerOpenError):
            await one.call(downstream.succeed)
        await asyncio.sleep(RESET * 1.5)
        assert await two.call(downstream.succeed) == "ok"
        assert await one.call(downstream.succeed) == "ok"
        assert downstream.calls == 4

    asyncio.run(scenario())


def test_redis_keys_stay_inside_the_service_acl_prefix() -> None:
    assert redis_namespace("payments", "accounts") == "payments:breaker:accounts"
    for service, downstream in [("payments:x", "accounts"), ("payments", "*"), ("Payments", "accounts")]:
        with pytest.raises(ValueError, match="must match"):
            redis_namespace(service, downstream)


def test_redis_breaker_refuses_clients_pybreaker_cannot_use() -> None:
    with pytest.raises(ValueError, match="decode_responses=False"):
        redis_breaker("payments", "accounts", redis.Redis(decode_responses=True), is_failure=unavailable)
    with pytest.raises(TypeError, match="synchronous"):
        redis_breaker("payments", "accounts", redis.asyncio.Redis(), is_failure=unavailable)  # type: ignore[arg-type]


class WatchedStorage(pybreaker.CircuitMemoryStorage):
    """Memory storage that notes which threads touch it and can fail its next state write (Redis gone)."""

    def __init__(self) -> None:
        super().__init__(pybreaker.STATE_CLOSED)
        self.threads: set[int] = set()
        self.fail_next_write = False

    @property
    def state(self) -> str:
        self.threads.add(threading.get_ident())
        return super().state

    @state.setter
    def state(self, state: str) -> None:
        self.threads.add(threading.get_ident())
        if self.fail_next_write:
            self.fail_next_write = False
            raise redis.exceptions.ConnectionError("redis went away")
        pybreaker.CircuitMemoryStorage.state.fset(self, state)  # type: ignore[attr-defined]

    def reset_timeout_passed(self) -> None:
        """As if RESET had long passed since the circuit opened (no sleeping)."""
        self.opened_at = datetime.now(UTC) - timedelta(hours=1)


def watched_breaker(storage: WatchedStorage, fail_max: int = 1, offload: bool = False) -> AsyncCircuitBreaker:
    return AsyncCircuitBreaker("test", storage=storage, is_failure=unavailable, fail_max=fail_max,
                               reset_timeout=RESET, offload_storage=offload)


def test_each_half_open_period_gets_its_own_trial_after_a_failed_one() -> None:
    async def scenario() -> None:
        storage, downstream = WatchedStorage(), Downstream()
        cb = watched_breaker(storage)
        await fail_times(cb, downstream.fail, 1)
        storage.reset_timeout_passed()
        await fail_times(cb, downstream.fail, 1)  # the first trial fails: open again
        assert await cb.current_state() == pybreaker.STATE_OPEN
        storage.reset_timeout_passed()
        assert await cb.call(downstream.succeed) == "ok", "the next period's trial is let through"
        assert await cb.current_state() == pybreaker.STATE_CLOSED

    asyncio.run(scenario())


def test_a_trial_that_could_not_half_open_the_circuit_does_not_block_the_next_one() -> None:
    async def scenario() -> None:
        storage, downstream = WatchedStorage(), Downstream()
        cb = watched_breaker(storage)
        await fail_times(cb, downstream.fail, 1)
        storage.reset_timeout_passed()
        storage.fail_next_write = True
        with pytest.raises(redis.exceptions.ConnectionError):
            await cb.call(downstream.succeed)
        assert await cb.call(downstream.succeed) == "ok"
        assert downstream.calls == 2

    asyncio.run(scenario())


def test_a_late_outcome_after_another_replica_opened_the_circuit_passes_through_unchanged() -> None:
    """One replica's call is still running when another replica opens the shared circuit: its success is
    still a success to its caller, and its failure is still its own error (not pybreaker's)."""

    async def scenario() -> None:
        shared = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        one, two = (AsyncCircuitBreaker(name, storage=shared, is_failure=unavailable, fail_max=2, reset_timeout=60)
                    for name in ("one", "two"))
        downstream, release = Downstream(), asyncio.Event()

        async def slow(outcome: Callable[[], Awaitable[str]]) -> str:
            await release.wait()
            return await outcome()

        late_success = asyncio.create_task(one.call(lambda: slow(downstream.succeed)))
        late_failure = asyncio.create_task(one.call(lambda: slow(downstream.fail)))
        await asyncio.sleep(0)
        await fail_times(two, downstream.fail, 2)
        assert await two.current_state() == pybreaker.STATE_OPEN
        release.set()
        assert await late_success == "ok"
        with pytest.raises(ConnectionError):
            await late_failure

    asyncio.run(scenario())


def test_offloaded_storage_io_never_runs_on_the_event_loop_thread() -> None:
    async def scenario() -> None:
        storage, downstream = WatchedStorage(), Downstream()
        cb = watched_breaker(storage, fail_max=2, offload=True)
        storage.threads.clear()  # building the breaker may read the storage; only calls matter here
        assert await cb.call(downstream.succeed) == "ok"
        await fail_times(cb, downstream.fail, 1)
        await cb.current_state()
        assert storage.threads and threading.get_ident() not in storage.threads

    asyncio.run(scenario())


def test_the_redis_breaker_keeps_its_keys_in_the_service_namespace_and_its_io_off_the_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[tuple[WatchedStorage, str | None]] = []

    def fake_redis_storage(state: str, redis_object: redis.Redis, namespace: str | None = None) -> WatchedStorage:
        storage = WatchedStorage()
        made.append((storage, namespace))
        return storage

    monkeypatch.setattr(pybreaker, "CircuitRedisStorage", fake_redis_storage)
    cb = redis_breaker("payments", "accounts", redis.Redis(), is_failure=unavailable)
    [(storage, namespace)] = made
    assert namespace == "payments:breaker:accounts"

    async def scenario() -> None:
        storage.threads.clear()
        assert await cb.call(Downstream().succeed) == "ok"
        assert storage.threads and threading.get_ident() not in storage.threads

    asyncio.run(scenario())


@pytest.mark.parametrize(("fail_max", "reset_timeout"), [(0, 30.0), (5, 0.0), (5, -1.0)])
def test_a_breaker_that_could_never_close_or_never_open_is_refused(fail_max: int, reset_timeout: float) -> None:
    with pytest.raises(ValueError, match="fail_max"):
        memory_breaker("test", is_failure=unavailable, fail_max=fail_max, reset_timeout=reset_timeout)
