"""Circuit breaker state in the real Redis: replicas of a service share it, inside the service's ACL prefix."""

import asyncio
import time
from collections.abc import Iterator

import pybreaker
import pytest
import redis

from bastion.devstack.components.redis import Redis
from bastion.devstack.context import StackContext
from bastion.resilience.breaker import BreakerOpenError, redis_breaker, redis_namespace

FIELDS = ("state", "fail_counter", "success_counter", "opened_at")
# pybreaker stores opened_at in whole seconds, so the reset timeout is only good to a second.
RESET_SECONDS = 2


def unavailable(error: Exception) -> bool:
    return isinstance(error, ConnectionError)


@pytest.fixture()
def payments_redis(redis_server: Redis, ctx: StackContext) -> Iterator[redis.Redis]:
    client = redis_server.client("payments", ctx.credentials.redis["payments"])
    yield client
    client.close()


@pytest.fixture()
def downstream(payments_redis: redis.Redis, unique: str) -> Iterator[str]:
    name = f"accounts-{unique}"
    yield name
    payments_redis.delete(*(f"{redis_namespace('payments', name)}:pybreaker:{field}" for field in FIELDS))


def test_replicas_share_the_breaker_state_through_redis(
    redis_server: Redis, ctx: StackContext, payments_redis: redis.Redis, downstream: str
) -> None:
    other_connection = redis_server.client("payments", ctx.credentials.redis["payments"])
    replica_one, replica_two = (
        redis_breaker("payments", downstream, client, is_failure=unavailable, fail_max=3, reset_timeout=RESET_SECONDS)
        for client in (payments_redis, other_connection)
    )
    calls = 0

    async def fail() -> str:
        nonlocal calls
        calls += 1
        raise ConnectionError("accounts unavailable")

    async def succeed() -> str:
        nonlocal calls
        calls += 1
        return "ok"

    async def scenario() -> None:
        for _ in range(3):
            with pytest.raises(ConnectionError):
                await replica_one.call(fail)
        opened = time.monotonic()
        with pytest.raises(BreakerOpenError):
            await replica_two.call(succeed)
        assert calls == 3, "the second replica refused without calling"
        assert await replica_two.current_state() == pybreaker.STATE_OPEN

        await asyncio.sleep(RESET_SECONDS + 1.1 - (time.monotonic() - opened))
        assert await replica_two.call(succeed) == "ok"
        assert await replica_one.current_state() == pybreaker.STATE_CLOSED
        assert await replica_one.call(succeed) == "ok"

    asyncio.run(scenario())
    other_connection.close()
    prefix = f"payments:breaker:{downstream}:pybreaker:"
    assert payments_redis.get(prefix + "state") == b"closed"
    assert all(payments_redis.exists(prefix + field) for field in FIELDS)


def test_pybreakers_default_keys_are_outside_the_service_acl(payments_redis: redis.Redis) -> None:
    with pytest.raises(redis.exceptions.NoPermissionError):
        pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, payments_redis)
