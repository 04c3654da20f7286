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
    """A fixed window per principal, counted by a small Lua script. Redis unreachable fails closed.

    A service account gets SERVICE_LIMIT instead of LIMIT: it calls on behalf of many users, each of whom the
    calling service's own limiter has already counted at its edge."""

    def __init__(self, client: aioredis.Redis, service: str, limit: RateLimit,
                 service_limit: RateLimit | None = None) -> None:
        self.client = client
        self.service = service
        self.limit = limit
        self.service_limit = service_limit or limit
        self.count = client.register_script(COUNT_IN_WINDOW)

    async def admit(self, principal_key: str, service_account: bool = False) -> None:
        limit = self.service_limit if service_account else self.limit
        window = int(time.time()) // limit.window_seconds
        key = f"{self.service}:ratelimit:{principal_key}:{window}"
        try:
            count = await self.count(keys=[key], args=[limit.window_seconds * 2])
        except (RedisError, OSError) as error:
            raise UnavailableError("rate limiter unavailable: request refused") from error
        if int(count) > limit.calls:
            raise ResourceExhaustedError(f"rate limit of {limit.calls} calls per {limit.window_seconds}s exceeded")
