"""The forged-revocation lab, fed what a running stack would answer: it holds only when payments' own credentials
cannot write the topic, every service that reads it logs the forgery refused as not_authorised, and the customer's
token still counts; a write let through, a reader that took it or refused it for another reason, or a revoked token
is not; an outage or a refusal of another kind stops it as not run."""

from typing import Any

import grpc
import pytest
from confluent_kafka import KafkaError

from bastion.access.v1.decision_pb2 import AccessRevoked
from bastion.events.keys import KeyRing
from bastion.events.v1.envelope_pb2 import Envelope
from bastion.labs import tokens
from bastion.labs.base import Evidence
from bastion.labs.platform import Delivery, LabSetupError
from bastion.revocations.feed import TOPIC
from tests.unit.labs.fakes import RpcError
from tests.unit.labs.test_removed_role import Accounts, Admin
from tests.unit.labs.test_removed_role import Session as RemovedRoleSession

READERS = ["accounts", "audit", "notifications", "payments"]
REFUSED = '{"event": "revocation_refused", "reason": "not_authorised", "correlation_id": "lab-forged-revocation-1"}'


class Watch:
    def __init__(self, lines: dict[str, str]) -> None:
        self.lines = lines

    def log_lines(self, service: str, *needles: str) -> list[str]:
        line = self.lines.get(service, "")
        return [line] if line and all(needle in line for needle in needles) else []

    def audit_entries(self, *_args: Any, **_kwargs: Any) -> list[Any]:
        return []


class Session(RemovedRoleSession):
    """A lab session on a stand-in stack: the install's keys, Kafka's answers by principal, the services' logs."""

    def __init__(self, ring: KeyRing, answers: dict[str, Delivery], lines: dict[str, str]) -> None:
        super().__init__()
        self.ring, self.answers, self.lines = ring, answers, lines
        self.published: list[tuple[str, str, bytes]] = []

    def signing_key(self, producer: str) -> Any:
        return self.ring.signing_key(producer)

    def publish(self, principal: str, topic: str, value: bytes, key: bytes = b"lab") -> Delivery:
        self.published.append((principal, topic, value))
        return self.answers[principal]

    def watch(self) -> Watch:  # type: ignore[override]
        return Watch(self.lines)


DENIED = Delivery(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))
WRITTEN = Delivery(None, f"{TOPIC}/0/7")


def run(monkeypatch: pytest.MonkeyPatch, session: Session,
        after: RpcError | None = None) -> tuple[list[bool | None], list[Evidence]]:
    admin = Admin()
    accounts = Accounts(admin, None)
    if after is not None:  # the customer's token refused once the forgery was written past the ACLs
        served = accounts.ListAccounts

        def refusing(request: Any, metadata: Any, timeout: float) -> Any:
            if any(principal == "admin" for principal, _, _ in session.published):
                raise after
            return served(request, metadata, timeout)

        accounts.ListAccounts = refusing  # type: ignore[method-assign]
    monkeypatch.setattr(tokens, "KeycloakAdmin", lambda **_k: admin)
    monkeypatch.setattr(tokens.accounts_pb2_grpc, "AccountsStub", lambda _channel: accounts)
    monkeypatch.setattr(tokens.time, "sleep", lambda _seconds: None)
    evidence = list(tokens.forged_revocation(session))  # type: ignore[arg-type]
    assert admin.done[-1] == "delete", "the lab's customer is removed"
    return [item.held for item in evidence], evidence


def everyone_refuses(reason: str = "not_authorised") -> dict[str, str]:
    return {reader: REFUSED.replace("not_authorised", reason) for reader in READERS}


@pytest.fixture(autouse=True)
def correlation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "new_correlation_id", lambda lab: f"lab-{lab}-1")


def test_it_holds_when_the_acl_refuses_payments_every_reader_refuses_the_forgery_and_the_token_still_counts(
        monkeypatch: pytest.MonkeyPatch, ring: KeyRing) -> None:
    session = Session(ring, {"payments": DENIED, "admin": WRITTEN}, everyone_refuses())
    held, _ = run(monkeypatch, session)
    assert held == [None, None, True, None, True, True, True, True, True]
    [(first, topic, record), (second, _, same)] = session.published
    assert (first, second, topic) == ("payments", "admin", TOPIC) and record == same
    envelope = Envelope.FromString(record)
    assert (envelope.producer, envelope.topic, envelope.correlation_id) == ("payments", TOPIC,
                                                                            "lab-forged-revocation-1")
    assert AccessRevoked.FromString(envelope.payload).subject == "user-1", "the lab's own customer, nobody else"


def test_a_write_the_acl_lets_through_does_not_hold(monkeypatch: pytest.MonkeyPatch, ring: KeyRing) -> None:
    held, _ = run(monkeypatch, Session(ring, {"payments": WRITTEN, "admin": WRITTEN}, everyone_refuses()))
    assert held[2] is False


@pytest.mark.parametrize("lines", [
    {reader: line for reader, line in everyone_refuses().items() if reader != "notifications"},  # one took it
    {**everyone_refuses(), "audit": REFUSED.replace("not_authorised", "bad_signature")},  # another check
])
def test_a_reader_that_took_it_or_refused_it_for_another_reason_does_not_hold(
        monkeypatch: pytest.MonkeyPatch, ring: KeyRing, lines: dict[str, str]) -> None:
    held, _ = run(monkeypatch, Session(ring, {"payments": DENIED, "admin": WRITTEN}, lines))
    assert False in held[4:8] and held[-1] is True


def test_a_token_the_forgery_revoked_does_not_hold(monkeypatch: pytest.MonkeyPatch, ring: KeyRing) -> None:
    revoked = RpcError(grpc.StatusCode.UNAUTHENTICATED, "invalid token: revoked: access was revoked after this "
                                                        "token was issued: sign in again")
    held, evidence = run(monkeypatch, Session(ring, {"payments": DENIED, "admin": WRITTEN}, everyone_refuses()),
                         revoked)
    assert held[-1] is False and "the forgery revoked access" in evidence[-1].observed


@pytest.mark.parametrize(("answers", "after"), [
    ({"payments": Delivery(KafkaError(KafkaError._TRANSPORT)), "admin": WRITTEN}, None),  # an outage is no defence
    ({"payments": DENIED, "admin": Delivery(KafkaError(KafkaError._MSG_TIMED_OUT))}, None),  # no attack made
    ({"payments": DENIED, "admin": WRITTEN},
     RpcError(grpc.StatusCode.UNAVAILABLE, "token revocations unavailable: request refused")),  # cannot judge
])
def test_an_outage_or_a_refusal_of_another_kind_stops_the_lab_as_not_run(
        monkeypatch: pytest.MonkeyPatch, ring: KeyRing, answers: dict[str, Delivery], after: RpcError | None) -> None:
    with pytest.raises(LabSetupError):
        run(monkeypatch, Session(ring, answers, everyone_refuses()), after)
