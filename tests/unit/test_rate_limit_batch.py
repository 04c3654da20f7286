"""How many calls a replica reserves from Redis at once: enough to spare busy principals a round trip per call,
never so many that one replica holds back more than a fiftieth of a window from the others. And a limiter that
cannot reach Redis fails closed."""

import asyncio
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from bastion.grpc.errors import UnavailableError
from bastion.grpc.ratelimit import RateLimit, RedisRateLimiter
from bastion.runtime import DEFAULT_RATE_LIMIT, SERVICE_ACCOUNT_RATE_LIMIT


@pytest.mark.parametrize(("calls", "batch"), [(1, 1), (37, 1), (100, 2), (600, 12), (3_200, 64), (10**9, 64)])
def test_a_reservation_is_a_fiftieth_of_the_limit_between_1_and_64(calls: int, batch: int) -> None:
    assert RateLimit(calls, 60).batch == batch


def test_the_platform_limits_reserve_little_for_people_and_the_most_for_services() -> None:
    assert DEFAULT_RATE_LIMIT.batch * 50 <= DEFAULT_RATE_LIMIT.calls
    assert SERVICE_ACCOUNT_RATE_LIMIT.batch == 64


class UnreachableRedis:
    """A Redis client whose every script call fails as a lost connection does."""

    def __init__(self) -> None:
        self.calls = 0

    def register_script(self, _source: str) -> Any:
        async def run(**_kwargs: Any) -> int:
            self.calls += 1
            raise RedisConnectionError("Connection refused")
        return run


def test_a_limiter_that_cannot_reach_redis_refuses_every_waiting_call_and_grants_nothing() -> None:
    redis = UnreachableRedis()
    limiter = RedisRateLimiter(redis, "accounts", RateLimit(600, 60))  # type: ignore[arg-type]

    async def burst() -> list[BaseException | None]:
        return await asyncio.gather(*(limiter.admit("bastion-cli:alice") for _ in range(5)), return_exceptions=True)

    outcomes = asyncio.run(burst())
    assert all(isinstance(outcome, UnavailableError) for outcome in outcomes), outcomes
    assert "rate limiter unavailable" in str(outcomes[0]) and redis.calls == 1
    assert not any(left > 0 for left in limiter.reserved.values())
