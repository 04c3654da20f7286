"""Fenced locks on a stand-in Redis: a fencing token only while locked, the lock released on exit and when no
token can be had, a lost lease made visible, and a failed release never masking the operation's outcome.
(The behaviour against a real Redis is in tests/integration/test_fenced_lock.py.)"""

import asyncio
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockNotOwnedError

from bastion.resilience.locks import FencedLock, LockBusyError, LockUnavailableError


class FakeLock:
    """redis-py's asyncio Lock as FencedLock uses it (acquire, reacquire, release), held in FakeRedis.held."""

    def __init__(self, redis: "FakeRedis", name: str) -> None:
        self.redis, self.name = redis, name

    async def acquire(self) -> bool:
        if self.redis.down:
            raise RedisConnectionError("Error 111 connecting to redis")
        if self.name in self.redis.held:
            return False
        self.redis.held.add(self.name)
        return True

    async def reacquire(self) -> bool:
        self.redis.extensions += 1
        if self.redis.lease_lost:
            raise LockNotOwnedError("Cannot reacquire a lock that's no longer owned")
        return True

    async def release(self) -> None:
        if self.redis.release_fails:
            raise RedisConnectionError("connection reset during release")
        self.redis.held.discard(self.name)


class FakeRedis:
    """The two calls FencedLock makes on its client: `lock(...)` and `incr(key)`."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.counters: dict[str, int] = {}
        self.down = self.incr_fails = self.lease_lost = self.release_fails = False
        self.extensions = 0

    def lock(self, name: str, **options: Any) -> FakeLock:
        return FakeLock(self, name)

    async def incr(self, key: str) -> int:
        if self.incr_fails:
            raise RedisConnectionError("connection lost before INCR")
        self.counters[key] = self.counters.get(key, 0) + 1
        return self.counters[key]


def test_the_lock_is_released_on_exit_and_each_holder_gets_a_higher_token() -> None:
    async def scenario() -> None:
        redis = FakeRedis()
        async with FencedLock(redis, "payments", "account:a") as first:  # type: ignore[arg-type]
            assert redis.held == {"payments:lock:account:a"}
        assert redis.held == set(), "the lock is released as soon as its holder is done, not left to expire"
        async with FencedLock(redis, "payments", "account:a") as second:  # type: ignore[arg-type]
            assert second > first

    asyncio.run(scenario())


def test_a_lock_held_by_another_is_refused_and_the_body_never_runs() -> None:
    async def scenario() -> None:
        redis = FakeRedis()
        redis.held.add("payments:lock:account:a")
        ran = False
        with pytest.raises(LockBusyError):
            async with FencedLock(redis, "payments", "account:a"):  # type: ignore[arg-type]
                ran = True
        assert not ran and redis.counters == {}, "no token is handed out without the lock"

    asyncio.run(scenario())


def test_no_fencing_token_means_no_operation_and_the_lock_is_given_back() -> None:
    async def scenario() -> None:
        redis = FakeRedis()
        redis.incr_fails = True
        ran = False
        with pytest.raises(LockUnavailableError, match="no fencing token"):
            async with FencedLock(redis, "payments", "account:a"):  # type: ignore[arg-type]
                ran = True
        assert not ran, "never run without a fencing token"
        assert redis.held == set(), "the lock is released at once, not held until its TTL runs out"

    asyncio.run(scenario())


def test_a_lease_that_can_no_longer_be_extended_is_reported_lost() -> None:
    async def scenario() -> None:
        redis = FakeRedis()
        redis.lease_lost = True
        # A TTL of zero makes the extender try at once (its wait is ttl / 3); nothing real sleeps.
        lock = FencedLock(redis, "payments", "account:a", ttl_seconds=0)  # type: ignore[arg-type]
        async with lock:
            await asyncio.wait_for(lock.lost.wait(), timeout=1)
        assert lock.lost.is_set() and redis.extensions >= 1

    asyncio.run(scenario())


def test_a_release_that_fails_does_not_replace_the_outcome_of_the_operation() -> None:
    async def scenario() -> None:
        redis = FakeRedis()
        redis.release_fails = True
        async with FencedLock(redis, "payments", "account:a") as token:  # type: ignore[arg-type]
            result = token * 10
        assert result == 10, "the operation's result stands; the lease simply expires"
        with pytest.raises(KeyError, match="the operation's own error"):
            async with FencedLock(redis, "payments", "account:b"):  # type: ignore[arg-type]
                raise KeyError("the operation's own error")

    asyncio.run(scenario())
