"""Whether a service's background workers (consumers, relays) are doing their job, for its health check.

A worker that fails is rebuilt (`ServiceRuntime.start_worker`); one that keeps failing (the database or Kafka
gone for good, a bug) must not hide behind a health check that still says SERVING. A role is failing after
FAILURES_BEFORE_UNHEALTHY failures in a row, each within STEADY_SECONDS of its start; it is healthy again once
a run of it has lasted STEADY_SECONDS."""

import threading
from dataclasses import dataclass, field

FAILURES_BEFORE_UNHEALTHY = 3
STEADY_SECONDS = 30.0


@dataclass
class _Role:
    started_at: float = 0.0
    running: bool = False
    failures_in_a_row: int = 0


@dataclass
class WorkerHealth:
    roles: dict[str, _Role] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def started(self, role: str, now: float) -> None:
        with self._lock:
            state = self.roles.setdefault(role, _Role())
            state.started_at, state.running = now, True

    def failed(self, role: str, now: float) -> None:
        with self._lock:
            state = self.roles.setdefault(role, _Role())
            steady = state.running and now - state.started_at >= STEADY_SECONDS
            state.failures_in_a_row = 1 if steady else state.failures_in_a_row + 1
            state.running = False

    def failing(self, now: float) -> list[str]:
        """The roles that keep failing, by name."""
        with self._lock:
            for state in self.roles.values():
                if state.running and now - state.started_at >= STEADY_SECONDS:
                    state.failures_in_a_row = 0
            return sorted(role for role, state in self.roles.items()
                          if state.failures_in_a_row >= FAILURES_BEFORE_UNHEALTHY)
