"""A worker that keeps failing makes its service unhealthy; one that runs steadily again makes it healthy."""

from bastion.worker_health import FAILURES_BEFORE_UNHEALTHY, STEADY_SECONDS, WorkerHealth


def test_a_worker_that_keeps_failing_is_reported_until_it_runs_steadily_again() -> None:
    health, now = WorkerHealth(), 1000.0
    for _ in range(FAILURES_BEFORE_UNHEALTHY - 1):
        health.started("consumer", now)
        health.failed("consumer", now + 1)
        now += 3
    assert health.failing(now) == []  # a few restarts are what the restart loop is for
    health.started("consumer", now)
    health.failed("consumer", now + 1)
    assert health.failing(now + 2) == ["consumer"]
    health.started("consumer", now + 3)
    assert health.failing(now + 4) == ["consumer"]  # running, but not steadily yet
    assert health.failing(now + 3 + STEADY_SECONDS) == []


def test_a_failure_after_a_long_steady_run_starts_the_count_again() -> None:
    health = WorkerHealth()
    health.started("relay", 0.0)
    for moment in (STEADY_SECONDS + 1, STEADY_SECONDS + 2, STEADY_SECONDS + 3):
        health.failed("relay", moment)
        health.started("relay", moment)
    health.failed("relay", STEADY_SECONDS + 4)
    assert health.failing(STEADY_SECONDS + 5) == ["relay"]  # 1 after the steady run, then 3 quick ones
    other = WorkerHealth()
    other.started("relay", 0.0)
    other.failed("relay", STEADY_SECONDS + 1)
    assert other.failing(STEADY_SECONDS + 2) == []
