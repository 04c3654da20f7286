"""Fenced locks on the real Redis: exclusion, extension while held, monotonic fencing tokens after expiry,
and refusal (never an unlocked run) when Redis cannot be reached."""

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from bastion.devstack.context import StackContext
from bastion.resilience.locks import FencedLock, LockBusyError, LockUnavailableError


def client(ctx: StackContext, port: int | None = None) -> aioredis.Redis:
    options = ctx.redis_options("payments", ctx.credentials.redis["payments"])
    return aioredis.Redis(**{**options, "port": port or options["port"]}, socket_connect_timeout=1)


def test_a_second_holder_waits_and_gets_a_higher_token(ctx: StackContext) -> None:
    resource = f"account:{uuid.uuid4()}"

    async def scenario() -> None:
        redis = client(ctx)
        async with FencedLock(redis, "payments", resource, ttl_seconds=2) as first:
            with pytest.raises(LockBusyError):
                async with FencedLock(redis, "payments", resource, ttl_seconds=2, wait_seconds=0.3):
                    pytest.fail("two holders at once")
        async with FencedLock(redis, "payments", resource, ttl_seconds=2) as second:
            assert second > first
        await redis.aclose()

    asyncio.run(scenario())


def test_the_lock_is_extended_while_held(ctx: StackContext) -> None:
    resource = f"account:{uuid.uuid4()}"

    async def scenario() -> None:
        redis = client(ctx)
        async with FencedLock(redis, "payments", resource, ttl_seconds=0.6) as held:
            await asyncio.sleep(1.5)  # well past the TTL: only the extension keeps it
            with pytest.raises(LockBusyError):
                async with FencedLock(redis, "payments", resource, ttl_seconds=0.6, wait_seconds=0.2):
                    pytest.fail("the lock expired while its holder was alive")
        assert held > 0
        await redis.aclose()

    asyncio.run(scenario())


def test_an_expired_lease_goes_to_the_next_holder_with_a_higher_token(ctx: StackContext) -> None:
    resource = f"account:{uuid.uuid4()}"

    async def scenario() -> None:
        redis = client(ctx)
        stale = FencedLock(redis, "payments", resource, ttl_seconds=0.5)
        stale_token = await stale.__aenter__()
        assert stale._extender is not None
        stale._extender.cancel()  # the holder is paused: nothing extends its lease
        await asyncio.sleep(0.8)
        async with FencedLock(redis, "payments", resource, ttl_seconds=2) as fresh:
            assert fresh > stale_token, "the owner of the resource can now refuse the stale holder"
        await stale.__aexit__(None, None, None)  # releasing an expired lease harms nobody
        await redis.aclose()

    asyncio.run(scenario())


def test_redis_unreachable_refuses_instead_of_running_unlocked(ctx: StackContext) -> None:
    async def scenario() -> None:
        redis = client(ctx, port=1)
        with pytest.raises(LockUnavailableError):
            async with FencedLock(redis, "payments", "account:x", wait_seconds=0.5):
                pytest.fail("ran without the lock")
        await redis.aclose()

    asyncio.run(scenario())
