"""bench-grpc --pin: the benchmark's processes are pinned, the dev stack it may start is not."""

import sys

import pytest

from benchmarks import grpc_chain


class StackStarted(Exception):
    """Stops the benchmark once `bastion up` ran: nothing after it is asked about."""


def test_pin_leaves_the_dev_stack_that_bastion_up_starts_on_every_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """`bastion up` starts the dev stack's processes as children of the benchmark, and a child inherits the CPUs its
    parent may use: pinned before it, Kafka, Keycloak, PostgreSQL and Redis would stay off the last CPU for as long
    as they run, while the docs say the dev stack is left where it is."""
    affinity = {0, 1, 2, 3}

    def set_affinity(pid: int, cpus: set[int]) -> None:
        assert pid == 0
        affinity.clear()
        affinity.update(cpus)

    monkeypatch.setattr(grpc_chain.os, "sched_getaffinity", lambda pid: set(affinity))
    monkeypatch.setattr(grpc_chain.os, "sched_setaffinity", set_affinity)
    started_on: list[set[int]] = []

    def bastion(*args: str) -> None:
        assert args == ("up",)
        started_on.append(set(affinity))
        raise StackStarted

    monkeypatch.setattr(grpc_chain, "bastion", bastion)
    monkeypatch.setattr(sys, "argv", ["grpc_chain", "--pin"])
    with pytest.raises(StackStarted):
        grpc_chain.main()
    assert started_on == [{0, 1, 2, 3}], "the dev stack may use every CPU"
