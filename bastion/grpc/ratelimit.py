"""Per-principal rate limiting with its state in Redis, so every replica of a service shares the count.

A replica does not ask Redis on every call: it reserves a small batch of its principal's calls at a time (one
INCRBY) and spends them locally. A reservation never exceeds what is left in the window, so the shared count is
never overrun; the price is that calls a replica reserved but did not use are lost to the others until the
window ends (at most `batch` per replica and principal), which errs on the side of refusing.
"""

import asyncio
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from bastion.grpc.errors import ResourceExhaustedError, UnavailableError


@dataclass(frozen=True)
class RateLimit:
    calls: int
    window_seconds: int

    @property
    def batch(self) -> int:
        """How many calls a replica reserves at once: a fiftieth of the limit (so a replica holds back at most 2%
        of a window's calls from the others), at most 64, at least 1 (exact). A busy principal, such as a
        calling service at 30,000 calls a minute, then costs one Redis round trip per 64 calls."""
        return max(1, min(64, self.calls // 50))


# Reserve up to ARGV[2] calls of a window of ARGV[3] calls; the expiry is set with the window's first reservation.
# Returns how many were granted (0 when the window is spent). One round trip, atomic.
RESERVE_IN_WINDOW = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local granted = math.min(tonumber(ARGV[2]), tonumber(ARGV[3]) - used)
if granted <= 0 then return 0 end
if redis.call('INCRBY', KEYS[1], granted) == granted then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return granted
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
        self.reserve = client.register_script(RESERVE_IN_WINDOW)
        # Calls reserved in Redis and not spent yet, per window key (this replica's share).
        self.reserved: dict[str, int] = {}
        # The reservation in flight for a window key, if any (at most one per key).
        self._reserving: dict[str, asyncio.Future[int]] = {}

    async def admit(self, principal_key: str, service_account: bool = False) -> None:
        limit = self.service_limit if service_account else self.limit
        window = int(time.time()) // limit.window_seconds
        key = f"{self.service}:ratelimit:{principal_key}:{window}"
        while self.reserved.get(key, 0) <= 0:
            # One reservation in flight per key: the calls that find nothing reserved wait for it together, instead
            # of each reserving a batch (32 calls in flight once took 32 batches, holding back 32 times as many
            # calls from the other replicas as a replica should). Shielded, so a caller that goes away does not
            # cancel it for the others; its failure reaches every one of them.
            pending = self._reserving.get(key)
            if pending is None:
                pending = self._reserving[key] = asyncio.ensure_future(self._reserve(key, window, limit))
            if await asyncio.shield(pending) <= 0:
                raise ResourceExhaustedError(f"rate limit of {limit.calls} calls per {limit.window_seconds}s exceeded")
        self.reserved[key] -= 1

    async def _reserve(self, key: str, window: int, limit: RateLimit) -> int:
        """Reserve a batch of KEY's window in Redis and add it to this replica's share; how many were granted."""
        try:
            granted = int(await self.reserve(keys=[key], args=[limit.window_seconds * 2, limit.batch, limit.calls]))
        except (RedisError, OSError) as error:
            raise UnavailableError("rate limiter unavailable: request refused") from error
        finally:
            del self._reserving[key]
        if granted > 0:
            self._forget_old_windows(window)
            self.reserved[key] = self.reserved.get(key, 0) + granted
        return granted

    def _forget_old_windows(self, window: int) -> None:
        """Drop reservations of windows that have ended, so the map stays as small as the active principals."""
        if len(self.reserved) > 1024:
            suffix = f":{window}"
            self.reserved = {key: left for key, left in self.reserved.items() if key.endswith(suffix)}
