"""Detached processes the devstack starts, tracks by pid file, and stops with their whole process group."""

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bastion.devstack.layout import StateLayout


@dataclass(frozen=True)
class LaunchSpec:
    """How to start one component: its argv, extra environment, working folder and, if any, the user."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    user: str | None = None


@dataclass(frozen=True)
class Tracked:
    pid: int
    started_at: float


class ProcessSupervisor:
    """Starts components in their own session, records `pid started_at` per component, stops groups."""

    def __init__(self, layout: StateLayout) -> None:
        self.layout = layout

    def start(self, name: str, spec: LaunchSpec) -> int:
        log = self.layout.log_file(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **spec.env}
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                spec.argv, cwd=spec.cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, user=spec.user,
            )
        started_at = psutil.Process(proc.pid).create_time()
        self.layout.pid_file(name).write_text(f"{proc.pid} {started_at}\n")
        return proc.pid

    def tracked(self, name: str) -> Tracked | None:
        """The live process recorded for NAME, or None; a recycled pid does not count as ours."""
        pid_file = self.layout.pid_file(name)
        try:
            pid_text, started_text = pid_file.read_text().split()
            tracked = Tracked(int(pid_text), float(started_text))
            proc = psutil.Process(tracked.pid)
            if abs(proc.create_time() - tracked.started_at) > 0.01 or proc.status() == psutil.STATUS_ZOMBIE:
                return None
        except (FileNotFoundError, ValueError, psutil.NoSuchProcess):
            return None
        return tracked

    def pid(self, name: str) -> int | None:
        tracked = self.tracked(name)
        return tracked.pid if tracked else None

    def exit_detail(self, name: str, lines: int = 15) -> str:
        """The tail of a component's log, to show why it stopped."""
        log = self.layout.log_file(name)
        if not log.exists():
            return "(no log written)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def recorded(self, name: str) -> Tracked | None:
        """What the pid file says, whether or not that process still runs."""
        try:
            pid_text, started_text = self.layout.pid_file(name).read_text().split()
            return Tracked(int(pid_text), float(started_text))
        except (FileNotFoundError, ValueError):
            return None

    def stop(self, name: str, timeout: float = 30.0) -> bool:
        """SIGTERM the component's process group, SIGKILL what is left after TIMEOUT; True if any ran.

        The group is stopped even when its leader is gone: a launcher script killed with -9 (Keycloak's
        kc.sh runs Java as its child) must not leave the server behind holding the ports.
        """
        recorded = self.recorded(name)
        self.layout.pid_file(name).unlink(missing_ok=True)
        if recorded is None or _recycled(recorded):
            return False
        members = _group_members(recorded.pid, recorded.started_at)
        if not members:
            return False
        _signal_group(recorded.pid, signal.SIGTERM)
        _, alive = psutil.wait_procs(members, timeout=timeout)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        return True


def _recycled(recorded: Tracked) -> bool:
    """Whether another process holds the recorded leader's number now (a pid file left from before a reboot, say).
    Then the recorded group is gone: Linux never hands out a number still in use as a process group id, so every
    process of a group with that number belongs to the newcomer, and none may be signalled."""
    try:
        return abs(psutil.Process(recorded.pid).create_time() - recorded.started_at) > 0.01
    except psutil.NoSuchProcess:
        return False  # the leader is gone, its group may not be (kc.sh killed -9, Java still running)


def _group_members(leader: int, started_at: float) -> list[psutil.Process]:
    """Processes of the group LEADER started, none older than it (so a recycled group id is not ours)."""
    members = []
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getpgid(proc.pid) == leader and proc.info["create_time"] >= started_at - 0.01:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def _signal_group(leader: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader, sig)


def wait_until(check: Callable[[], bool], deadline: float, interval: float = 0.5) -> bool:
    """Poll CHECK until it returns True or the monotonic DEADLINE passes."""
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()

