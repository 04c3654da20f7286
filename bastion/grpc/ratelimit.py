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


# One command per call instead of MULTI/INCR/EXPIRE/EXEC: the expiry is set with the window's first call.
COUNT_IN_WINDOW = """
local calls = redis.call('INCR', KEYS[1])
if calls == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return calls
"""


class RedisRateLimiter:
    """A fixed window per principal, counted by a small Lua script. Redis unreachable fails closed."""

    def __init__(self, client: aioredis.Redis, service: str, limit: RateLimit) -> None:
        self.client = client
        self.service = service
        self.limit = limit
        self.count = client.register_script(COUNT_IN_WINDOW)

    async def admit(self, principal_key: str) -> None:
        window = int(time.time()) // self.limit.window_seconds
        key = f"{self.service}:ratelimit:{principal_key}:{window}"
        try:
            count = await self.count(keys=[key], args=[self.limit.window_seconds * 2])
        except (RedisError, OSError) as error:
            raise UnavailableError("rate limiter unavailable: request refused") from error
        if int(count) > self.limit.calls:
            raise ResourceExhaustedError(
                f"rate limit of {self.limit.calls} calls per {self.limit.window_seconds}s exceeded"
            )
