"""The devstack's process supervisor (bastion/devstack/process.py): each component runs in a session of its own,
is recorded by pid and start time, and is stopped with its whole group, gently first; a pid file that does not
describe a process of ours never makes it signal anything.

Real but tiny processes (`sh`, `sleep`), each one killed at the end of its test.
"""

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from bastion.devstack.layout import StateLayout
from bastion.devstack.process import LaunchSpec, ProcessSupervisor, wait_until


class Supervisor(ProcessSupervisor):
    """Remembers what it started, for the clean-up."""

    def __init__(self, layout: StateLayout) -> None:
        super().__init__(layout)
        self.launched: list[int] = []

    def start(self, name: str, spec: LaunchSpec) -> int:
        pid = super().start(name, spec)
        self.launched.append(pid)
        return pid


@pytest.fixture()
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    layout = StateLayout(tmp_path / "state")
    layout.run_dir.mkdir(parents=True)
    supervisor = Supervisor(layout)
    yield supervisor
    for leader in supervisor.launched:  # whatever a failed test left running of the groups it started
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def started(*argv: str) -> subprocess.Popen[bytes]:
    """A process of no component, in a session of its own (so the leader of its process group)."""
    return subprocess.Popen(list(argv), start_new_session=True)


def eventually(check: object, seconds: float = 5.0) -> bool:
    return wait_until(check, time.monotonic() + seconds, interval=0.02)  # type: ignore[arg-type]


def test_a_component_runs_in_a_session_of_its_own_with_its_own_environment_over_ours(
        supervisor: Supervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_PROBE", "ours")
    out = tmp_path / "seen"
    pid = supervisor.start("redis", LaunchSpec(argv=["sh", "-c", f'echo "$BASTION_PROBE" > {out}; exec sleep 30'],
                                               env={"BASTION_PROBE": "the component's"}))
    try:
        assert os.getsid(pid) == pid and os.getpgid(pid) == pid, "its own session, so its own process group"
        assert eventually(lambda: out.exists() and out.read_text() == "the component's\n")
        assert supervisor.pid("redis") == pid
    finally:
        supervisor.stop("redis", timeout=5)


def test_a_pid_file_whose_start_time_does_not_match_the_process_names_no_process_of_ours(
        supervisor: Supervisor) -> None:
    ours = psutil.Process()
    supervisor.layout.pid_file("kafka").write_text(f"{ours.pid} {ours.create_time() - 100}\n")
    assert supervisor.tracked("kafka") is None, "a recycled pid is not ours"
    supervisor.layout.pid_file("kafka").write_text(f"{ours.pid} {ours.create_time()}\n")
    assert supervisor.pid("kafka") == ours.pid
    supervisor.layout.pid_file("kafka").write_text("not a pid file\n")
    assert supervisor.tracked("kafka") is None and supervisor.recorded("kafka") is None


def test_stopping_sends_sigterm_first_so_a_server_shuts_down_cleanly(supervisor: Supervisor,
                                                                   tmp_path: Path) -> None:
    marker, ready = tmp_path / "clean", tmp_path / "ready"
    supervisor.start("postgres", LaunchSpec(argv=[
        "sh", "-c", f"trap 'echo clean > {marker}; exit 0' TERM; touch {ready}; sleep 30 & wait"]))
    assert eventually(ready.exists)
    assert supervisor.stop("postgres", timeout=5) is True
    assert marker.read_text() == "clean\n"
    assert not supervisor.layout.pid_file("postgres").exists()
    assert supervisor.stop("postgres") is False, "nothing recorded any more: nothing stopped"


def test_what_ignores_sigterm_is_killed_once_the_timeout_passes(supervisor: Supervisor,
                                                               tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    pid = supervisor.start("kafka", LaunchSpec(argv=["sh", "-c", f"trap '' TERM; touch {ready}; sleep 30 & wait"]))
    assert eventually(ready.exists)
    children = psutil.Process(pid).children()
    begun = time.monotonic()
    assert supervisor.stop("kafka", timeout=0.5) is True
    assert time.monotonic() - begun < 5
    assert not alive(pid) and not any(alive(child.pid) for child in children)


def test_the_group_is_stopped_even_when_its_launcher_is_gone(supervisor: Supervisor, tmp_path: Path) -> None:
    """As when kc.sh is killed with -9 and its Java child keeps the ports."""
    child = tmp_path / "child"
    pid = supervisor.start("keycloak", LaunchSpec(argv=["sh", "-c", f"sleep 30 & echo $! > {child}.new; "
                                                                   f"mv {child}.new {child}; wait"]))
    assert eventually(child.exists)
    java = int(child.read_text())
    os.kill(pid, signal.SIGKILL)
    assert eventually(lambda: supervisor.pid("keycloak") is None)
    assert alive(java)
    assert supervisor.stop("keycloak", timeout=5) is True
    assert eventually(lambda: not alive(java))


def test_stopping_a_component_whose_processes_are_all_gone_reports_nothing_stopped(
        supervisor: Supervisor) -> None:
    pid = supervisor.start("redis", LaunchSpec(argv=["true"]))
    with contextlib.suppress(ChildProcessError):  # reaped, as it is once `bastion up` has exited
        os.waitpid(pid, 0)
    assert supervisor.stop("redis", timeout=1) is False


def test_a_process_older_than_the_recorded_start_is_never_signalled(supervisor: Supervisor) -> None:
    other = started("sleep", "30")
    try:
        created = psutil.Process(other.pid).create_time()
        supervisor.layout.pid_file("kafka").write_text(f"{other.pid} {created + 1000}\n")
        assert supervisor.stop("kafka", timeout=1) is False
        assert alive(other.pid)
    finally:
        other.kill()
        other.wait()


def test_a_stale_pid_file_naming_a_recycled_pid_never_stops_the_unrelated_process(
        supervisor: Supervisor) -> None:
    """The pid was ours once; now an unrelated process leads a process group under that number. The kernel gives
    no new process a number still in use as a process group id, so while a process holds the number our group is
    gone: nothing of it is left to stop."""
    other = started("sleep", "30")
    try:
        created = psutil.Process(other.pid).create_time()
        supervisor.layout.pid_file("kafka").write_text(f"{other.pid} {created - 3600}\n")
        assert supervisor.tracked("kafka") is None
        assert supervisor.stop("kafka", timeout=1) is False
        assert alive(other.pid)
    finally:
        other.kill()
        other.wait()
