"""The audit service's core on fakes: what each record read from Kafka becomes, which ListEvents queries are
valid, paging, and a refused checkpoint failing the verdict and raising a security record."""

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from bastion.access.v1.decision_pb2 import DECISION_DENY, AccessDecision, EventRejected
from bastion.accounts.v1.events_pb2 import MoneyDeposited
from bastion.audit.chain import EMPTY, LogEntry, extend
from bastion.audit.checkpoints import Checkpoint, CheckpointFile, sign_checkpoint
from bastion.audit.errors import CheckpointError, CheckpointForkError, CheckpointRollbackError
from bastion.audit.records import Decision, RecordKind
from bastion.audit.verify import ChainReport, check_chain
from bastion.events.errors import RejectReason, VerificationError
from bastion.events.v1.envelope_pb2 import Envelope
from bastion.events.verify import VerifiedEvent
from services.audit import domain
from services.audit.domain import Delivery, EventQuery, InvalidQueryError
from services.audit.handlers import AuditHandlers
from tests.unit.audit.samples import AUDIT_KEY, ORIGIN, sample_record, trust_store

NOW = dt.datetime(2026, 3, 1, 10, 0, tzinfo=dt.UTC)
DELIVERY = Delivery("access.decisions.v1", 2, 41, NOW - dt.timedelta(seconds=1), b"\x0a\x01raw")


def verified(payload: object, event_type: str) -> VerifiedEvent:
    envelope = Envelope(event_id="e-1", event_type=event_type, producer="accounts", aggregate_id="agg-1",
                        correlation_id="corr-1")
    envelope.occurred_at.FromDatetime(NOW - dt.timedelta(seconds=2))
    return VerifiedEvent(envelope, payload)  # type: ignore[arg-type]


def test_a_domain_event_is_kept_with_its_envelope_and_coordinates() -> None:
    deposited = verified(MoneyDeposited(account_id="agg-1"), "bastion.accounts.v1.MoneyDeposited")
    record = domain.accepted(DELIVERY, deposited, NOW)
    assert (record.kind, record.topic, record.partition, record.offset) == (RecordKind.EVENT, DELIVERY.topic, 2, 41)
    assert (record.event_id, record.producer, record.correlation_id, record.envelope) == (
        "e-1", "accounts", "corr-1", DELIVERY.raw)
    assert record.principal is None and record.decision is None


def test_an_access_decision_names_who_did_what_and_the_verdict() -> None:
    decision = AccessDecision(principal="bob", service_identity="cli", method="/bastion.accounts.v1.Accounts/Deposit",
                              decision=DECISION_DENY, reason="needs one of teller")
    record = domain.accepted(DELIVERY, verified(decision, "bastion.access.v1.AccessDecision"), NOW)
    assert (record.kind, record.principal, record.action, record.decision, record.reason, record.detail) == (
        RecordKind.ACCESS, "bob", "/bastion.accounts.v1.Accounts/Deposit", Decision.DENY, "needs one of teller",
        "peer=cli")


def test_another_consumers_rejection_is_a_rejection_record() -> None:
    rejected = EventRejected(consumer="notifications", topic="accounts.events.v1", partition=1, offset=7,
                             reason="bad_signature", detail="signature does not verify")
    record = domain.accepted(DELIVERY, verified(rejected, "bastion.access.v1.EventRejected"), NOW)
    assert (record.kind, record.principal, record.action, record.reason) == (
        RecordKind.REJECTION, "notifications", "accounts.events.v1/1/7", "bad_signature")


def test_an_event_audit_refuses_keeps_only_well_formed_claims_and_the_brokers_time() -> None:
    claimed = Envelope(event_id="not an id; DROP TABLE", producer="payments", correlation_id="c-9\x00")
    error = VerificationError(RejectReason.BAD_SIGNATURE, "signature does not verify\x00")
    record = domain.refused(DELIVERY, claimed, error, NOW)
    assert (record.kind, record.principal, record.reason) == (RecordKind.REJECTION, "audit", "bad_signature")
    assert record.event_id == "(malformed)" and record.producer == "payments" and record.correlation_id == "(malformed)"
    assert record.occurred_at == DELIVERY.broker_time and "\x00" not in (record.detail or "")


def test_an_envelope_of_a_bundle_is_its_own_record_at_its_place() -> None:
    member = replace(DELIVERY, item=3, raw=b"\x0a\x01alone")
    record = domain.accepted(member, verified(MoneyDeposited(account_id="agg-1"), "bastion.accounts.v1.MoneyDeposited"),
                             NOW)
    assert (record.offset, record.item, record.envelope) == (41, 3, b"\x0a\x01alone")
    refused = domain.refused(member, Envelope(), VerificationError(RejectReason.STALE, "published long ago"), NOW)
    assert (refused.item, refused.action) == (3, "access.decisions.v1/2/41/3")
    assert domain.refused(DELIVERY, Envelope(), VerificationError(RejectReason.STALE, "old"), NOW).item is None


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"page_size": 501}, "page_size"),
    ({"page_size": -1}, "page_size"),
    ({"token": "bm90LWEtdG9rZW4="}, "page_token"),
    ({"token": "%%%"}, "page_token"),
    ({"since": NOW, "until": NOW - dt.timedelta(seconds=1)}, "since"),
    ({"aggregate_id": "x" * 1001}, "aggregate_id"),
    ({"correlation_id": "x" * 1001}, "correlation_id"),
])
def test_bad_queries_are_invalid_and_say_why(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidQueryError, match=words):
        domain.query(**kwargs)  # type: ignore[arg-type]


def test_a_page_token_stands_for_the_last_seq_of_its_page() -> None:
    assert domain.query(token=domain.page_token(1234)).after_seq == 1234
    assert domain.query().page_size == domain.DEFAULT_PAGE and domain.query().after_seq == 0


@dataclass
class MemoryReader:
    entries: list[LogEntry]

    def find(self, query: EventQuery) -> list[LogEntry]:
        found = [e for e in self.entries if e.seq > query.after_seq
                 and (not query.aggregate_id or e.record.aggregate_id == query.aggregate_id)]
        return found[:query.page_size]

    def check_chain(self, checkpoints: list[Checkpoint]) -> ChainReport:
        return check_chain(self.entries, checkpoints)


@dataclass
class MemorySecurity:
    refused: list[str] = field(default_factory=list)

    def checkpoint_refused(self, error: CheckpointError, where: str) -> None:
        self.refused.append(f"{type(error).__name__} at {where}")


def handlers(tmp_path: Path, entries: list[LogEntry]) -> tuple[AuditHandlers, MemorySecurity, CheckpointFile]:
    reader = MemoryReader(entries)

    @contextmanager
    def readers() -> Iterator[MemoryReader]:
        yield reader

    security = MemorySecurity()
    file = CheckpointFile(tmp_path / "checkpoints.jsonl", trust_store(), ORIGIN)
    return AuditHandlers(readers, file, security), security, file


def test_pages_follow_each_other_and_the_last_has_no_token(tmp_path: Path) -> None:
    audit, _, _ = handlers(tmp_path, extend(EMPTY, [sample_record(n) for n in range(1, 6)]))
    first, token = audit.list_events(domain.query(page_size=2))
    second, token2 = audit.list_events(domain.query(page_size=2, token=token))
    third, token3 = audit.list_events(domain.query(page_size=2, token=token2))
    assert [e.seq for e in first + second + third] == [1, 2, 3, 4, 5] and token3 == ""


def test_the_chain_verifies_against_its_checkpoints(tmp_path: Path) -> None:
    entries = extend(EMPTY, [sample_record(n) for n in range(1, 6)])
    audit, security, file = handlers(tmp_path, entries)
    file.append(sign_checkpoint(AUDIT_KEY, ORIGIN, entries[2].head))
    verdict = audit.verify_chain()
    assert verdict.report.ok and verdict.report.length == 5 and verdict.checkpoint_length == 3
    assert security.refused == []


def test_a_forged_checkpoint_fails_the_verdict_and_raises_a_security_record(tmp_path: Path) -> None:
    entries = extend(EMPTY, [sample_record(n) for n in range(1, 4)])
    audit, security, file = handlers(tmp_path, entries)
    good = sign_checkpoint(AUDIT_KEY, ORIGIN, entries[-1].head)
    file.append(good)
    forged = good.to_json().replace(f'"length":{good.length}', f'"length":{good.length + 5}')
    with file.path.open("a") as lines:
        lines.write(forged + "\n")
    verdict = audit.verify_chain()
    assert not verdict.report.ok and "checkpoint refused" in verdict.report.reason
    assert security.refused == [f"BadCheckpointSignatureError at {file.path}"]


def test_signing_stops_when_the_log_no_longer_extends_the_last_checkpoint() -> None:
    entries = extend(EMPTY, [sample_record(n) for n in range(1, 6)])
    last = sign_checkpoint(AUDIT_KEY, ORIGIN, entries[2].head)
    domain.check_continuity(None, entries[-1].head, None)
    domain.check_continuity(last, entries[-1].head, entries[2].hash)  # grown on top of it: fine
    with pytest.raises(CheckpointRollbackError, match="below"):
        domain.check_continuity(last, entries[1].head, None)  # restored from an older copy
    with pytest.raises(CheckpointForkError, match="rewritten"):
        domain.check_continuity(last, entries[-1].head, bytes(32))  # same length or longer, other history
