"""Distributed locks with fencing tokens, for critical operations such as moving money.

The lock (redis-py's `Lock`: SET NX PX, owner-checked extend and release) keeps two holders apart while both
are healthy; the fencing token (INCR of a per-resource counter, taken after the lock) protects against the
holder that is paused past its TTL and wakes up believing it still holds the lock: the resource's owner
accepts a write only with a token higher than the last it accepted.
"""

import asyncio
import contextlib
from types import TracebackType

import redis.asyncio as aioredis
import structlog
from redis.exceptions import LockError, LockNotOwnedError, RedisError

from bastion.resilience.breaker import ResilienceError

log = structlog.get_logger(__name__)


class LockUnavailableError(ResilienceError):
    """The lock service could not be reached: the critical operation must be refused, never run unlocked."""


class LockBusyError(ResilienceError):
    """Another holder kept the lock for longer than we were willing to wait."""


class FencedLock:
    """`async with FencedLock(...) as token:` holds RESOURCE, extended every third of TTL while held."""

    def __init__(self, client: aioredis.Redis, service: str, resource: str, ttl_seconds: float = 10.0,
                 wait_seconds: float = 5.0) -> None:
        self.client = client
        self.resource = resource
        self.ttl_seconds = ttl_seconds
        self.lock_key = f"{service}:lock:{resource}"
        self.fence_key = f"{service}:fence:{resource}"
        self._lock = client.lock(self.lock_key, timeout=ttl_seconds, blocking_timeout=wait_seconds,
                                 thread_local=False)
        self._extender: asyncio.Task[None] | None = None
        self.lost = asyncio.Event()

    async def __aenter__(self) -> int:
        try:
            acquired = await self._lock.acquire()
        except (RedisError, OSError) as error:
            raise LockUnavailableError(f"lock service unreachable for {self.resource}") from error
        if not acquired:
            raise LockBusyError(f"{self.resource} is locked by another operation")
        try:
            token = int(await self.client.incr(self.fence_key))
        except (RedisError, OSError) as error:
            await self._release()
            raise LockUnavailableError(f"no fencing token for {self.resource}") from error
        self._extender = asyncio.create_task(self._keep_extending())
        return token

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        if self._extender is not None:
            self._extender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._extender
        await self._release()

    async def _keep_extending(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_seconds / 3)
            try:
                await self._lock.reacquire()
            except (LockError, RedisError, OSError) as error:
                # The fencing token still protects the resource; say loudly that the lease is gone.
                self.lost.set()
                log.warning("lock_lost", resource=self.resource, error=type(error).__name__)
                return

    async def _release(self) -> None:
        try:
            await self._lock.release()
        except LockNotOwnedError:
            log.warning("lock_expired_before_release", resource=self.resource)
        except (LockError, RedisError, OSError) as error:
            log.warning("lock_release_failed", resource=self.resource, error=type(error).__name__)
