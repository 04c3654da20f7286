"""Per-principal rate limiting with its state in Redis, so every replica of a service shares the count."""

import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from bastion.grpc.errors import ResourceExhaustedError, UnavailableError


@dataclass(frozen=True)
class RateLimit:
    calls: int
    window_seconds: int


class RedisRateLimiter:
    """A fixed window per principal: INCR and EXPIRE in one round trip. Redis unreachable fails closed."""

    def __init__(self, client: aioredis.Redis, service: str, limit: RateLimit) -> None:
        self.client = client
        self.service = service
        self.limit = limit

    async def admit(self, principal_key: str) -> None:
        window = int(time.time()) // self.limit.window_seconds
        key = f"{self.service}:ratelimit:{principal_key}:{window}"
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, self.limit.window_seconds * 2)
                count, _ = await pipe.execute()
        except (RedisError, OSError) as error:
            raise UnavailableError("rate limiter unavailable: request refused") from error
        if int(count) > self.limit.calls:
            raise ResourceExhaustedError(
                f"rate limit of {self.limit.calls} calls per {self.limit.window_seconds}s exceeded"
            )
