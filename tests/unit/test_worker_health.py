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


def test_three_quick_failures_make_a_role_failing_and_thirty_seconds_of_running_heal_it() -> None:
    """The thresholds the health check promises (docs and the integration test wait for these)."""
    health = WorkerHealth()
    for moment in (0.0, 10.0):
        health.started("consumer", moment)
        health.failed("consumer", moment + 5)
    assert health.failing(16.0) == [], "two are not enough"
    health.started("consumer", 20.0)
    health.failed("consumer", 49.9)
    assert health.failing(50.0) == ["consumer"]
    health.started("consumer", 60.0)
    assert health.failing(89.9) == ["consumer"]
    assert health.failing(90.0) == []


def test_a_failure_exactly_steady_seconds_after_the_start_ends_a_steady_run() -> None:
    health = WorkerHealth()
    for moment in (0.0, 1.0):
        health.started("relay", moment)
        health.failed("relay", moment + 0.5)
    health.started("relay", 2.0)
    health.failed("relay", 2.0 + STEADY_SECONDS)
    assert health.failing(3.0 + STEADY_SECONDS) == [], "a steady run, so one failure in a row"


def test_one_failure_after_a_steady_run_counts_as_the_first_of_a_new_row() -> None:
    health = WorkerHealth()
    health.started("relay", 0.0)
    health.failed("relay", STEADY_SECONDS + 1)
    for moment in (STEADY_SECONDS + 2, STEADY_SECONDS + 4):
        health.started("relay", moment)
        health.failed("relay", moment + 1)
    assert health.failing(STEADY_SECONDS + 6) == ["relay"], "the steady run's failure and two quick ones"


def test_quick_failures_before_a_steady_run_are_forgotten_when_it_fails() -> None:
    health = WorkerHealth()
    for moment in (0.0, 2.0):
        health.started("relay", moment)
        health.failed("relay", moment + 1)
    health.started("relay", 10.0)
    health.failed("relay", 10.0 + STEADY_SECONDS + 1)  # nobody asked meanwhile
    health.started("relay", 12.0 + STEADY_SECONDS)
    health.failed("relay", 13.0 + STEADY_SECONDS)
    assert health.failing(14.0 + STEADY_SECONDS) == []


def test_a_worker_that_cannot_even_be_built_is_failing_and_stays_so_while_it_cannot() -> None:
    """The build (a connection to the database or Kafka) fails before the worker starts: no `started` at all."""
    health = WorkerHealth()
    for moment in (0.0, 2.0, 4.0):
        health.failed("consumer", moment)
    assert health.failing(5.0) == ["consumer"]
    assert health.failing(5.0 + 10 * STEADY_SECONDS) == ["consumer"], "not running is not running steadily"


def test_after_a_long_run_a_worker_whose_rebuild_keeps_failing_is_failing() -> None:
    health = WorkerHealth()
    health.started("consumer", 0.0)
    for moment in (100.0, 102.0, 104.0):  # the run ended; each rebuild fails before the worker starts
        health.failed("consumer", moment)
    assert health.failing(105.0) == ["consumer"]


def test_a_role_that_stopped_after_failing_is_still_failing_however_long_ago_it_started() -> None:
    health = WorkerHealth()
    for moment in (0.0, 2.0, 4.0):
        health.started("relay", moment)
        health.failed("relay", moment + 1)
    assert health.failing(4.0 + 2 * STEADY_SECONDS) == ["relay"]


def test_the_failing_roles_are_listed_by_name() -> None:
    health = WorkerHealth()
    for role in ("relay", "consumer", "audit-consumer"):
        for moment in (0.0, 1.0, 2.0):
            health.failed(role, moment)
    assert health.failing(3.0) == ["audit-consumer", "consumer", "relay"]
