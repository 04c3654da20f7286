"""Faults found by the fail-open review, fixed: a lab that reported the defence holding when it could not tell.
Each test failed before its fix; a lab that cannot tell now stops as not run (LabSetupError), never HELD."""

import ssl
import types
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from sqlalchemy import text

from bastion.accounts.v1.events_pb2 import AccountOpened
from bastion.labs import audit, money, personal, transport
from bastion.labs.base import LabResult, Outcome
from bastion.labs.logs import untouched_since
from bastion.labs.platform import LabSetupError
from tests.unit.labs.fakes import RpcError, lab
from tests.unit.labs.test_lab_checks import (
    DatabaseError,
    FailingEngine,
    FakeBank,
    FakePayments,
    plaintext_session,
    storm,
    storm_session,
)


def outcome_of(probe: Iterator[Any]) -> Outcome:
    """The verdict of a probe run to its end, as `run_lab` gives it."""
    evidence, error = [], None
    try:
        evidence.extend(probe)
    except LabSetupError as problem:
        error = str(problem)
    return LabResult(lab(), tuple(evidence), 0.0, error).outcome


def test_a_double_spend_race_in_which_no_transfer_was_even_answered_does_not_hold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Payments down: every transfer UNAVAILABLE, nothing moves. No payment completed (so none twice), the balance
    is untouched: every check of the lab is true, and it reports HELD without having raced anything."""

    class Unavailable(FakePayments):
        def Transfer(self, request: Any, metadata: Any, timeout: float) -> Any:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")

    payments = Unavailable(money.RACE_BALANCE)
    monkeypatch.setattr(money, "Bank", lambda session, name: FakeBank(payments))
    assert outcome_of(money.double_spend(None)) is not Outcome.HELD  # type: ignore[arg-type]


def test_a_retry_storm_that_never_reached_the_failing_downstream_does_not_hold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No attempt reached the lab's failing server (the client could not connect to it at all): "0 attempts for 30
    calls" is read as retries held in check, and the breaker opening on connection failures completes a HELD."""
    calls = [(0.2, "UNAVAILABLE: lab-x failed: UNAVAILABLE")] * 5 + \
        [(0.001, "UNAVAILABLE: lab-x is unavailable (circuit open): try again later")] * 25
    storm(monkeypatch, 0, calls, "open")
    assert outcome_of(money.retry_storm(storm_session())) is not Outcome.HELD


def test_a_service_log_that_gained_nothing_is_no_evidence_that_it_kept_the_forged_line_out() -> None:
    """A log file that is missing, rotated or truncated since the lab began reads as "" (`Watch.new_text`): "0 new
    line(s): none holds the attacker's text" was counted as the defence, though each of these logs must at least
    hold the refusal of the lab's own call or event. The lab cannot tell."""
    with pytest.raises(LabSetupError, match=r"notifications\.log gained no line"):
        untouched_since("notifications", "", "forged0123456789ab")


@pytest.mark.parametrize(("sqlstate", "message"), [
    (None, "unable to open database file"),  # the connection failed
    ("42P01", 'relation "audit.log" does not exist'),
    ("55P03", "canceling statement due to lock timeout"),
])
def test_a_statement_that_failed_for_another_reason_than_a_refusal_is_not_the_defence(
        sqlstate: str | None, message: str) -> None:
    """`_rolled_back` counted any DBAPIError as the grants or the trigger refusing (SQLSTATE 42501, both): a
    connection that fails (the admin's password changed, the database down), a missing table or a lock timeout
    read as "refused"."""
    failing = FailingEngine(DatabaseError(message, sqlstate))
    with pytest.raises(LabSetupError, match="failed for another reason than a refusal"):
        audit._rolled_back(failing, "the database admin: UPDATE record 9", text("UPDATE log SET seq = 0"))  # type: ignore[arg-type]


def test_the_controller_is_not_said_to_refuse_a_client_when_the_client_refused_the_controller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An SSLCertVerificationError is this side refusing the listener's certificate (another server on the port, a
    certificate for another name) before the controller was asked for anything; it is counted as the controller
    demanding a client certificate."""

    class Distrusting:
        def wrap_socket(self, raw: Any, server_hostname: str) -> Any:
            raise ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")

    class Raw:
        def __enter__(self) -> "Raw":
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(transport.socket, "create_connection", lambda address, timeout: Raw())
    monkeypatch.setattr(transport.ssl, "create_default_context", lambda cafile: Distrusting())
    try:
        observed, held = transport._controller_verdict(plaintext_session())
    except LabSetupError:
        return  # could not tell, said so: what a fix may do
    assert held is not True, observed


def test_the_personal_data_lab_does_not_hold_without_having_read_the_audit_log(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The audit log holds no record of bob's new account within the wait (the audit service behind, or not
    consuming): the lab's third claim, that the audit log keeps only ciphertext, is never checked, and the lab
    still reports HELD on the other two."""
    sealed = AccountOpened(account_id="acc-1", owner="bob")
    sealed.owner_email.key_id, sealed.owner_email.ciphertext = "dk-1", b"\x8f" * 40
    envelope = types.SimpleNamespace(payload=sealed.SerializeToString())
    addresses = iter([None, ("ak-1", b"\x13" * 48)])
    monkeypatch.setattr(personal, "create_engine", lambda url: types.SimpleNamespace(dispose=lambda: None))
    monkeypatch.setattr(personal, "Postgres", lambda ctx: types.SimpleNamespace(sqlalchemy_url=lambda *a: "url"))
    monkeypatch.setattr(personal, "_sealed_address", lambda *args, **kwargs: next(addresses))
    monkeypatch.setattr(personal, "TopicTail", lambda session, topic: types.SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(personal, "Bank", lambda session, name: types.SimpleNamespace(
        open_account=lambda owner, **kwargs: "acc-1"))
    monkeypatch.setattr(personal, "first_event", lambda *args: (b"\x0a\x05" + b"\x8f" * 60, [], envelope))

    class NoRecords:
        def __enter__(self) -> "NoRecords":
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def execute(self, query: Any) -> Any:
            return types.SimpleNamespace(all=lambda: [])

    session = types.SimpleNamespace(
        ctx=types.SimpleNamespace(credentials=types.SimpleNamespace(postgres={"notifications": "pw"})),
        target=types.SimpleNamespace(verdict_wait_seconds=0.0, context_wait_seconds=0.0),
        audit_engine=lambda: types.SimpleNamespace(connect=NoRecords))
    assert outcome_of(personal.insider_reads_personal_data(session)) is not Outcome.HELD  # type: ignore[arg-type]


@pytest.mark.parametrize("written", [
    '{"event":"event_rejected","note":"forged0123456789ab"',  # the attacker's text, the line not yet ended
    "\x1b[2J\x1b[31m\u202e",  # raw control characters without a line end
])
def test_a_log_that_gained_the_attackers_text_without_a_line_end_fails_rather_than_cannot_tell(written: str) -> None:
    """What the attacker put in the log is evidence whatever else the log holds: the check for a log that gained
    no line comes after the checks for the marker and for control characters, not before them."""
    evidence = untouched_since("accounts", written, "forged0123456789ab")
    assert evidence.held is False
