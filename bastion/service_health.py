"""The service's gRPC health check, which never says SERVING while the service cannot serve.

A status set as SERVING (the server factory sets one per service at start) is answered NOT_SERVING while the
condition says something fails: a worker that keeps failing, tokens that cannot be checked. The condition is
asked at every `set`, so a server starts NOT_SERVING when it cannot serve yet, and again at every `refresh`,
which the service's watchdog calls on a schedule."""

from collections.abc import Callable

from grpc_health.v1 import health, health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServiceHealth(health.aio.HealthServicer):  # type: ignore[misc]
    def __init__(self, failing: Callable[[], list[str]]) -> None:
        super().__init__()
        self._failing = failing
        self._wanted: dict[str, int] = {"": SERVING}  # the overall status the base class starts with

    async def set(self, service: str, status: int) -> None:
        self._wanted[service] = status
        await super().set(service, NOT_SERVING if self._failing() else status)

    async def refresh(self) -> list[str]:
        """Ask the condition again and answer every status by it; returns what fails, by name."""
        failing = self._failing()
        for service, status in self._wanted.items():
            await super().set(service, NOT_SERVING if failing else status)
        return failing
