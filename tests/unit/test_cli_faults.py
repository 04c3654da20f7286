"""Faults of `bastion demo` and the command line found by the fail-open review, fixed: a step narrated as checked
that was not, bad input met with "unexpected ... please report this". Each test failed before its fix."""

from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from bastion.audit import refusals
from bastion.cli import main
from bastion.devstack.errors import DevstackError
from tests.unit.test_cli_demo import Platform, scenario
from tests.unit.test_cli_labs import FakeStack, on_stack


@pytest.mark.parametrize(("fault", "value", "step"), [
    # Step 4 caught any RpcError: accounts not answering bob was narrated "(he cannot even learn it exists)".
    ("bob_reads", grpc.StatusCode.UNAVAILABLE, "4."),
    ("bob_reads", grpc.StatusCode.DEADLINE_EXCEEDED, "4."),
    ("bob_reads", grpc.StatusCode.UNAUTHENTICATED, "4."),
    # Step 3 printed whether the replay named the same payment, as "(False)", with a tick, and went on.
    ("replay_is_new_payment", True, "3."),
])
def test_the_demo_does_not_tick_a_step_whose_check_did_not_pass(fault: str, value: object, step: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    platform = Platform()
    setattr(platform, fault, value)
    said: list[str] = []
    with pytest.raises(DevstackError):
        scenario(platform, said, monkeypatch).run()
    assert not any(line.startswith(step) for line in said), said


@pytest.mark.parametrize("argv", [["audit", "refusals", "--minutes", "nan"], ["audit", "alerts", "--minutes", "inf"]])
def test_minutes_that_are_not_a_finite_number_are_a_usage_error_not_an_unexpected_one(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """--minutes nan passes `_recent`'s `minutes <= 0` check (after a Keycloak sign-in) and ends in timedelta's
    ValueError/OverflowError: exit 3, "unexpected ... please report this"."""
    audit_service_answering(monkeypatch)
    status: Any = None
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    assert status == 2
    assert "minutes" in capsys.readouterr().err


def audit_service_answering(monkeypatch: pytest.MonkeyPatch) -> None:
    """An install whose Keycloak signs ada in and whose audit service answers with no records: what `bastion audit
    refusals` reaches before it uses --minutes (`bastion trail --minutes` goes the same way, `refusals.carrying`)."""
    ctx = SimpleNamespace(
        settings=SimpleNamespace(public_host="localhost", keycloak_port=1, infra_dir=Path("/infra")),
        service_names=["audit"], credentials=SimpleNamespace(users={"ada": "pw"}), ca_file="ca.pem",
        pki=SimpleNamespace(paths=lambda name: SimpleNamespace(cert="c", key="k")),
        grpc_address=lambda name: "localhost:1")
    stack = FakeStack()
    stack.context = lambda: ctx  # type: ignore[method-assign]
    on_stack(monkeypatch, stack)
    monkeypatch.setattr(refusals, "load_identities", lambda path, names: SimpleNamespace(realm="bastion",
                                                                                         cli_client="bastion-cli"))
    monkeypatch.setattr(refusals, "auditor_of", lambda identities: "ada")
    monkeypatch.setattr(refusals, "KeycloakOpenID", lambda **kwargs: SimpleNamespace(
        token=lambda user, password: {"access_token": "token"}))
    monkeypatch.setattr(refusals, "blocking_channel", lambda address, tls, service: nullcontext())
    monkeypatch.setattr(refusals.audit_pb2_grpc, "AuditStub", lambda channel: SimpleNamespace(
        ListEvents=lambda request, metadata, timeout: SimpleNamespace(events=[], next_page_token="")))
