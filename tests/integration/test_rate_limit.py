"""The rate limiter's reservations against the real Redis: replicas that reserve calls in batches never admit
more than the limit between them, a single replica spends its whole window, and a service account has its own
budget."""

import asyncio
import time
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis

from bastion.devstack.context import StackContext
from bastion.grpc.errors import ResourceExhaustedError, UnavailableError
from bastion.grpc.ratelimit import RateLimit, RedisRateLimiter

SERVICE = "accounts"


def replica(ctx: StackContext, limit: RateLimit, service_limit: RateLimit | None = None) -> RedisRateLimiter:
    client = aioredis.Redis(**ctx.redis_options(SERVICE, ctx.credentials.redis[SERVICE]))
    return RedisRateLimiter(client, SERVICE, limit, service_limit)


async def admitted(limiter: RedisRateLimiter, principal: str, attempts: int, service_account: bool = False) -> int:
    count = 0
    for _ in range(attempts):
        try:
            await limiter.admit(principal, service_account)
            count += 1
        except ResourceExhaustedError:
            pass
    return count


def test_replicas_reserving_in_batches_never_admit_more_than_the_limit(stack: Any, ctx: StackContext) -> None:
    limit = RateLimit(calls=100, window_seconds=3600)  # a window that will not turn during the test
    principal = f"it-ratelimit:{uuid.uuid4()}"

    async def run() -> tuple[int, int, int]:
        first, second = replica(ctx, limit), replica(ctx, limit)
        together = await asyncio.gather(admitted(first, principal, 70), admitted(second, principal, 70))
        return together[0], together[1], await admitted(replica(ctx, limit), principal, 5)

    first, second, late = asyncio.run(run())
    # Unused reservations make the replicas refuse early, never admit late: at most one batch each is left over.
    assert 100 - 2 * limit.batch <= first + second <= 100 and late == 0


def test_one_replica_spends_its_whole_window_then_is_refused(stack: Any, ctx: StackContext) -> None:
    limit = RateLimit(calls=37, window_seconds=3600)
    assert asyncio.run(admitted(replica(ctx, limit), f"it-ratelimit:{uuid.uuid4()}", 50)) == 37


@pytest.mark.parametrize(("service_account", "expected"), [(False, 10), (True, 30)])
def test_a_service_account_has_its_own_budget(stack: Any, ctx: StackContext, service_account: bool,
                                              expected: int) -> None:
    limiter = replica(ctx, RateLimit(calls=10, window_seconds=3600), RateLimit(calls=30, window_seconds=3600))
    assert asyncio.run(admitted(limiter, f"it-ratelimit:{uuid.uuid4()}", 40, service_account)) == expected


def test_calls_in_flight_together_share_one_reservation(stack: Any, ctx: StackContext) -> None:
    """Calls that find nothing reserved wait for one reservation together: a replica holds back at most one batch
    from the others, however many of its calls arrive at once (each reserving its own batch once made 100
    concurrent calls reserve the whole window)."""
    limit = RateLimit(calls=3_200, window_seconds=3600)
    principal = f"it-ratelimit:{uuid.uuid4()}"
    limiter = replica(ctx, limit)

    async def run() -> int:
        first = int(time.time()) // limit.window_seconds
        await asyncio.gather(*(limiter.admit(principal) for _ in range(100)))
        windows = range(first, int(time.time()) // limit.window_seconds + 1)  # one, unless an hour just turned
        used = [await limiter.client.get(f"{SERVICE}:ratelimit:{principal}:{window}") for window in windows]
        return sum(int(value) for value in used if value is not None)

    reserved_in_redis = asyncio.run(run())
    assert 100 <= reserved_in_redis <= 100 + limit.batch


def test_a_reservation_that_fails_refuses_every_call_waiting_for_it(stack: Any, ctx: StackContext) -> None:
    """Redis unreachable: every call waiting for the shared reservation is refused UNAVAILABLE (fail closed)."""
    client = aioredis.Redis(**ctx.redis_options(SERVICE, "wrong"))
    limiter = RedisRateLimiter(client, SERVICE, RateLimit(calls=3_200, window_seconds=3600))

    async def run() -> list[BaseException | None]:
        return await asyncio.gather(*(limiter.admit(f"it-ratelimit:{uuid.uuid4()}") for _ in range(1)),
                                    *(limiter.admit("it-ratelimit:shared") for _ in range(20)),
                                    return_exceptions=True)

    outcomes = asyncio.run(run())
    assert all(isinstance(outcome, UnavailableError) for outcome in outcomes), outcomes
    assert limiter._reserving == {}


def test_a_window_key_expires_after_two_windows(stack: Any, ctx: StackContext) -> None:
    limit = RateLimit(calls=100, window_seconds=3600)
    principal = f"it-ratelimit:{uuid.uuid4()}"
    limiter = replica(ctx, limit)

    async def run() -> list[int]:
        await limiter.admit(principal)  # one reservation: the window's first, which sets the expiry
        return [await limiter.client.ttl(key) for key in limiter.reserved]  # SCAN is not the service's to run

    ttls = asyncio.run(run())
    assert len(ttls) == 1 and 0 < ttls[0] <= 2 * limit.window_seconds
