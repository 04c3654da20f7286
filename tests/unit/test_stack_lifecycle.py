"""The order in which the dev stack starts, waits on, bootstraps and stops its components, and that it fails closed:
a component that exits or never becomes healthy stops `up` with an error, a port another process holds is refused
before anything starts, and the keys made at set-up are private and never replaced.

No server runs: stand-in components and a stand-in supervisor note what the stack does with them.
"""

import socket
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from bastion.devstack import stack as stack_module
from bastion.devstack.components.base import Component
from bastion.devstack.components.keycloak import Keycloak
from bastion.devstack.components.postgres import Postgres
from bastion.devstack.errors import ComponentStartError, PrerequisiteError
from bastion.devstack.process import LaunchSpec
from bastion.devstack.stack import Stack
from bastion.settings import DevstackSettings


class FakeSupervisor:
    """Starts nothing: notes each call; a started component runs unless it is one that crashes."""

    def __init__(self, events: list[tuple[str, str]], running: set[str], crashing: set[str]) -> None:
        self.events, self.running, self.crashing = events, running, crashing

    def pid(self, name: str) -> int | None:
        return 4242 if name in self.running else None

    def start(self, name: str, _spec: LaunchSpec) -> int:
        self.events.append(("start", name))
        if name not in self.crashing:
            self.running.add(name)
        return 4242

    def stop(self, name: str, timeout: float = 30.0) -> bool:
        self.events.append(("stop", name))
        was_running = name in self.running
        self.running.discard(name)
        return was_running

    def exit_detail(self, name: str) -> str:
        return f"{name}: the last lines"


def kind(name: str, events: list[tuple[str, str]], healthy: bool = True, ports: tuple[int, ...] = ()) -> type:
    class Fake(Component):
        def ports(self) -> list[int]:
            return list(ports)

        def prepare(self) -> None:
            events.append(("prepare", name))

        def launch_spec(self) -> LaunchSpec:
            return LaunchSpec(argv=[name])

        def probe(self) -> bool:
            events.append(("probe", name))
            return healthy

        def bootstrap(self) -> None:
            events.append(("bootstrap", name))

    Fake.name = name
    return Fake


class Harness:
    """A stack whose phases are stand-ins noting into `events`, set up already and its prerequisites met."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, running: tuple[str, ...] = (),
                 crashing: tuple[str, ...] = ()) -> None:
        self.events: list[tuple[str, str]] = []
        self.stack = Stack(DevstackSettings(state_dir=tmp_path / "state", start_timeout_seconds=1.0),
                           lambda _message: None)
        self.stack.supervisor = FakeSupervisor(self.events, set(running), set(crashing))  # type: ignore[assignment]
        monkeypatch.setattr(self.stack, "setup", lambda: None)
        monkeypatch.setattr(self.stack, "_check_prerequisites", lambda _ctx: None)

    def phases(self, *phases: list[str], unhealthy: tuple[str, ...] = ()) -> Stack:
        self.stack.phases = [[kind(name, self.events, healthy=name not in unhealthy) for name in phase]
                             for phase in phases]
        self.stack.kinds = [kind for phase in self.stack.phases for kind in phase]
        return self.stack


def test_up_starts_a_phase_together_and_the_next_only_once_the_first_is_healthy_and_bootstrapped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    harness = Harness(tmp_path, monkeypatch)
    harness.phases(["a", "b"], ["c"]).up()
    at = harness.events.index
    assert at(("stop", "a")) < at(("prepare", "a")) < at(("start", "a")), "what a crashed launcher left goes first"
    assert at(("start", "b")) < at(("probe", "a")), "a phase starts together"
    assert at(("probe", "a")) < at(("bootstrap", "a")) and at(("probe", "b")) < at(("bootstrap", "b"))
    assert max(at(("bootstrap", "a")), at(("bootstrap", "b"))) < at(("start", "c"))
    assert at(("probe", "c")) < at(("bootstrap", "c"))


def test_up_leaves_a_running_component_running_and_bootstraps_it_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    harness = Harness(tmp_path, monkeypatch, running=("a",))
    harness.phases(["a", "b"]).up()
    events = harness.events
    assert ("stop", "a") not in events and ("start", "a") not in events and ("prepare", "a") not in events
    assert ("bootstrap", "a") in events and ("start", "b") in events


def test_a_component_that_never_becomes_healthy_stops_up_before_its_bootstrap_and_the_next_phase(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    harness = Harness(tmp_path, monkeypatch)
    with pytest.raises(ComponentStartError, match="a did not become healthy within 1s") as failed:
        harness.phases(["a"], ["c"], unhealthy=("a",)).up()
    events = harness.events
    assert "a: the last lines" in failed.value.problem
    assert ("bootstrap", "a") not in events and ("start", "c") not in events


def test_a_component_that_exits_during_start_up_is_reported_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    harness = Harness(tmp_path, monkeypatch, crashing=("a",))
    with pytest.raises(ComponentStartError, match="a exited during start-up"):
        harness.phases(["a"]).up()
    assert ("bootstrap", "a") not in harness.events


def test_down_stops_the_phases_in_the_reverse_order_of_their_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    harness = Harness(tmp_path, monkeypatch, running=("a", "c"))
    assert harness.phases(["a", "b"], ["c"]).down() == ["c", "a"]
    assert harness.events[0] == ("stop", "c") and set(harness.events[1:]) == {("stop", "a"), ("stop", "b")}


def test_down_stops_the_components_of_one_phase_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    harness = Harness(tmp_path, monkeypatch, running=("a", "b", "c"))
    both_stopping = threading.Barrier(2, timeout=5)
    stop = harness.stack.supervisor.stop

    def slow_stop(name: str, timeout: float = 30.0) -> bool:
        if name in ("a", "b"):
            both_stopping.wait()  # breaks (BrokenBarrierError) if one waits for the other to finish first
        return stop(name, timeout)

    monkeypatch.setattr(harness.stack.supervisor, "stop", slow_stop)
    assert sorted(harness.phases(["c"], ["a", "b"]).down()) == ["a", "b", "c"]
    assert harness.events[-1] == ("stop", "c")


def test_reset_stops_everything_before_it_removes_the_state_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    harness = Harness(tmp_path, monkeypatch, running=("a",))
    stack = harness.phases(["a"])
    stack.layout.ensure()
    stack.reset()
    assert harness.events == [("stop", "a")]
    assert not stack.layout.root.exists()


def prerequisites_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, port: int,
                          running: tuple[str, ...] = ()) -> list[Any]:
    found: list[Any] = []
    monkeypatch.setattr(stack_module, "find_java", lambda home: found.append(("java", home)))
    monkeypatch.setattr(stack_module, "find_redis_server", lambda: found.append("redis-server"))
    monkeypatch.setattr(stack_module, "ephemeral_ports", lambda: set())
    events: list[tuple[str, str]] = []
    stack = Stack(DevstackSettings(state_dir=tmp_path / "state"), lambda _message: None)
    stack.supervisor = FakeSupervisor(events, set(running), set())  # type: ignore[assignment]
    stack.kinds = [kind("ledger", events, ports=(port,))]
    stack._check_prerequisites(None)  # type: ignore[arg-type]
    return found


def test_a_port_another_process_listens_on_stops_up_before_anything_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        with pytest.raises(PrerequisiteError, match=f"port {port} on 127.0.0.1, needed by ledger, is in use"):
            prerequisites_checked(tmp_path, monkeypatch, port)
        assert prerequisites_checked(tmp_path, monkeypatch, port, running=("ledger",)) == [
            ("java", None), "redis-server"], "a running component holds its own port; Java and Redis are checked"


def test_postgres_starts_before_keycloak_which_keeps_its_data_in_it_and_the_services_start_last(
        tmp_path: Path) -> None:
    stack = Stack(DevstackSettings(state_dir=tmp_path / "state"), lambda _message: None)
    phase_of = {kind.name: n for n, phase in enumerate(stack.phases) for kind in phase}
    assert phase_of[Postgres.name] < phase_of[Keycloak.name]
    assert {kind.name for kind in stack.phases[-1]} == set(stack.service_names)
    assert {"cli", *stack.service_names, "postgres", "redis", "kafka", "keycloak"} == set(stack.certificate_names())


def test_each_services_at_rest_key_is_private_256_bits_and_never_replaced(tmp_path: Path) -> None:
    stack = Stack(DevstackSettings(state_dir=tmp_path / "state"), lambda _message: None)
    stack._ensure_at_rest_keys()
    keys = {service: stack.layout.at_rest_key(service).read_bytes() for service in stack.service_names}
    assert {len(key) for key in keys.values()} == {32}
    folder = stack.layout.at_rest_key("accounts").parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {stat.S_IMODE(stack.layout.at_rest_key(s).stat().st_mode) for s in stack.service_names} == {0o600}
    stack._ensure_at_rest_keys()
    assert keys == {service: stack.layout.at_rest_key(service).read_bytes() for service in stack.service_names}
