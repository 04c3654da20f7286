"""`bastion status` exits 1 unless every component is healthy: the servers and the four services alike (a script
or an operator reads the exit code; a crashed service must not pass for a healthy stack)."""

from typing import Any

import pytest

from bastion import cli
from bastion.devstack.stack import NOT_BUILT

HEALTHY: dict[str, dict[str, Any]] = {
    "postgres": {"healthy": True, "pid": 10}, "redis": {"healthy": True, "pid": 11},
    "kafka": {"healthy": True, "pid": 12, "bootstrap": "localhost:19092"},
    "keycloak": {"healthy": True, "pid": 13, "issuer": "https://localhost:18443/realms/bastion"},
    "accounts": {"healthy": True, "pid": 14, "grpc": "localhost:15051"},
    "audit": {"healthy": True, "pid": 15, "grpc": "localhost:15054"},
}


class FakeStack:
    def __init__(self, components: dict[str, dict[str, Any]]) -> None:
        self.components = components

    def status(self) -> dict[str, Any]:
        return {"state_dir": "/s", "pki_dir": "/s/pki", "credentials_file": "/s/credentials.json",
                "components": self.components}


def status_exit(components: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(cli, "_stack", lambda quiet=False: FakeStack(components))
    return cli.main(["status", "--json"])


def test_a_stack_whose_every_component_is_healthy_exits_0(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert status_exit(HEALTHY, monkeypatch) == 0
    assert '"accounts"' in capsys.readouterr().out


@pytest.mark.parametrize("down", ["accounts", "audit", "kafka", "redis"])
def test_one_component_down_server_or_service_exits_1(down: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert status_exit({**HEALTHY, down: {**HEALTHY[down], "healthy": False, "pid": None}}, monkeypatch) == 1


def test_a_service_not_built_yet_is_not_expected_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    loyalty = {"healthy": False, "pid": None, "grpc": "localhost:15055", "detail": NOT_BUILT}
    assert status_exit({**HEALTHY, "loyalty": loyalty}, monkeypatch) == 0


def test_an_install_not_set_up_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    assert status_exit({name: {"healthy": False, "pid": None, "detail": "not set up: run `make setup`"}
                        for name in HEALTHY}, monkeypatch) == 1
    assert status_exit({}, monkeypatch) == 1, "nothing to report is no healthy stack"
