"""The audit service's core on fakes: what each record read from Kafka becomes, which ListEvents queries are
valid, paging, and a refused checkpoint failing the verdict and raising a security record; what a producer chose is
kept bounded, an oversized record as a prefix with the digest of the whole; the alert as it is published."""

import base64
import datetime as dt
import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from bastion import pages
from bastion.access.v1.decision_pb2 import (
    DECISION_ALLOW,
    DECISION_DENY,
    DECISION_UNSPECIFIED,
    AccessDecision,
    EventRejected,
)
from bastion.accounts.v1.events_pb2 import MoneyDeposited
from bastion.audit.alerts import Alert, AlertRule
from bastion.audit.chain import EMPTY, LogEntry, extend
from bastion.audit.checkpoints import Checkpoint, CheckpointFile, sign_checkpoint
from bastion.audit.errors import CheckpointError, CheckpointForkError, CheckpointRollbackError
from bastion.audit.published import WitnessUnavailableError
from bastion.audit.records import Decision, RecordKind
from bastion.audit.verify import ChainReport, check_chain
from bastion.events.errors import RejectReason, VerificationError
from bastion.events.v1.envelope_pb2 import Envelope
from bastion.events.verify import MAX_ENVELOPE_BYTES, VerifiedEvent
from bastion.grpc.errors import InvalidArgumentError
from services.audit import domain
from services.audit.adapters.postgres import OutboxSecurityRecords, PostgresAlerts
from services.audit.domain import Delivery, EventQuery, InvalidQueryError
from services.audit.handlers import AuditHandlers, announce
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
    reported = verified(rejected, "bastion.access.v1.EventRejected")
    reported.envelope.producer = "notifications"  # its own refusal, signed with its own key
    record = domain.accepted(DELIVERY, reported, NOW)
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
    with pytest.raises(InvalidArgumentError, match=words):
        domain.query(**kwargs)  # type: ignore[arg-type]


def test_a_page_token_stands_for_the_last_seq_of_its_page() -> None:
    assert domain.query(token=domain.page_token(1234)).after_seq == 1234
    assert domain.query().page_size == pages.DEFAULT_PAGE_SIZE and domain.query().after_seq == 0


@dataclass
class MemoryReader:
    entries: list[LogEntry]
    opened: int = 0

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
    audit, security, file, _ = witnessed_handlers(tmp_path, entries, witness=list)
    return audit, security, file


def witnessed_handlers(tmp_path: Path, entries: list[LogEntry], witness: Callable[[], list[Checkpoint]],
                       ) -> tuple[AuditHandlers, MemorySecurity, CheckpointFile, MemoryReader]:
    """The handlers over ENTRIES, a checkpoint file in TMP_PATH and WITNESS as the published checkpoints."""
    reader = MemoryReader(entries)

    @contextmanager
    def readers() -> Iterator[MemoryReader]:
        reader.opened += 1
        yield reader

    security = MemorySecurity()
    file = CheckpointFile(tmp_path / "checkpoints.jsonl", trust_store(), ORIGIN)
    return AuditHandlers(readers, file, security, witness), security, file, reader


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


def test_a_refusal_repeated_is_recorded_once_and_again_after_the_file_was_accepted(tmp_path: Path) -> None:
    """Every VerifyChain while a file stays forged must not add a record (a poll would flood the log); the same
    forgery made again after the file was put right is another tampering and was left with no record of its own."""
    entries = extend(EMPTY, [sample_record(n) for n in range(1, 4)])
    audit, security, file = handlers(tmp_path, entries)
    good = sign_checkpoint(AUDIT_KEY, ORIGIN, entries[-1].head)
    file.append(good)
    honest = file.path.read_text()
    forged = honest + good.to_json().replace(f'"length":{good.length}', f'"length":{good.length + 5}') + "\n"

    def verdicts(times: int) -> list[bool]:
        return [audit.verify_chain().report.ok for _ in range(times)]

    file.path.write_text(forged)
    assert verdicts(3) == [False] * 3
    assert security.refused == [f"BadCheckpointSignatureError at {file.path}"], "the same refusal, recorded once"
    file.path.write_text(honest)
    assert verdicts(1) == [True]
    file.path.write_text(forged)
    assert verdicts(2) == [False] * 2
    assert security.refused == [f"BadCheckpointSignatureError at {file.path}"] * 2, "a second tampering, recorded"


def test_each_refusal_recorded_is_an_event_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """The record's id was made of its text, and the outbox (then the log) keeps an id once: a second refusal
    reading like the first was dropped."""
    appended: list[dict[str, Any]] = []

    class Engine:
        @contextmanager
        def begin(self) -> Iterator[None]:
            yield None

    class Outbox:
        def append(self, conn: None, topic: str, record: Any, **coordinates: str) -> None:
            appended.append(coordinates)

    records = OutboxSecurityRecords(Engine(), Outbox())  # type: ignore[arg-type]
    for _ in range(2):
        records.checkpoint_refused(CheckpointForkError("checkpoint at length 3 does not verify"), "/s/checkpoints")
    assert len({record["event_id"] for record in appended}) == 2
    assert all(record["correlation_id"] == record["event_id"] for record in appended)


def test_a_checkpoint_file_lacking_published_checkpoints_fails_the_verdict_before_the_log_is_read(
        tmp_path: Path) -> None:
    entries = extend(EMPTY, [sample_record(n) for n in range(1, 6)])
    published = [sign_checkpoint(AUDIT_KEY, ORIGIN, entries[n].head) for n in (1, 3)]
    audit, security, file, log = witnessed_handlers(tmp_path, entries, witness=lambda: published)
    # The file lost: without the witness this read as "no checkpoints yet" and a rewritten log verified.
    verdict = audit.verify_chain()
    assert not verdict.report.ok and verdict.published == 0
    assert verdict.report.reason.startswith("the checkpoint file lacks 2 of the 2 checkpoints published on "
                                            "audit.checkpoints.v1 (the newest it lacks covers 4 records")
    assert security.refused == [f"CheckpointsMissingError at {file.path}"], "tampering evidence: a security record"
    file.append(published[0])  # cut short before the newest published one
    verdict = audit.verify_chain()
    assert not verdict.report.ok and "lacks 1 of the 2" in verdict.report.reason
    assert log.opened == 0, "nothing checked against a file the witness contradicts"
    file.append(published[1])
    verdict = audit.verify_chain()
    assert verdict.report.ok and verdict.published == 2 and verdict.checkpoint_length == 4


def test_the_verdict_fails_when_the_published_checkpoints_cannot_be_read(tmp_path: Path) -> None:
    entries = extend(EMPTY, [sample_record(n) for n in range(1, 4)])

    def unreachable() -> list[Checkpoint]:
        raise WitnessUnavailableError("audit.checkpoints.v1 could not be read: broker down")

    audit, security, file, log = witnessed_handlers(tmp_path, entries, witness=unreachable)
    file.append(sign_checkpoint(AUDIT_KEY, ORIGIN, entries[-1].head))
    with capture_logs() as logs:
        verdict = audit.verify_chain()
    assert not verdict.report.ok and "cannot be read" in verdict.report.reason
    assert "broker down" in verdict.report.reason
    assert log.opened == 0
    assert security.refused == [], "an outage is not tampering: no security record, but no verdict either"
    assert [entry["event"] for entry in logs] == ["checkpoint_witness_unavailable"]


def test_the_witness_is_read_before_the_file_so_a_checkpoint_signed_meanwhile_is_no_false_alarm(
        tmp_path: Path) -> None:
    entries = extend(EMPTY, [sample_record(n) for n in range(1, 4)])
    signed = sign_checkpoint(AUDIT_KEY, ORIGIN, entries[-1].head)
    file_of: list[CheckpointFile] = []

    def the_service_signs_and_publishes() -> list[Checkpoint]:
        file_of[0].append(signed)  # written to the file, then published: the order of the audit service
        return [signed]

    audit, security, file, _ = witnessed_handlers(tmp_path, entries, witness=the_service_signs_and_publishes)
    file_of.append(CheckpointFile(file.path, trust_store(), ORIGIN))
    verdict = audit.verify_chain()
    assert verdict.report.ok and verdict.published == 1 and verdict.checkpoint_length == 3, verdict.report.reason
    assert security.refused == []


def test_signing_stops_when_the_log_no_longer_extends_the_last_checkpoint() -> None:
    entries = extend(EMPTY, [sample_record(n) for n in range(1, 6)])
    last = sign_checkpoint(AUDIT_KEY, ORIGIN, entries[2].head)
    domain.check_continuity(None, entries[-1].head, None)
    domain.check_continuity(last, entries[-1].head, entries[2].hash)  # grown on top of it: fine
    with pytest.raises(CheckpointRollbackError, match="below"):
        domain.check_continuity(last, entries[1].head, None)  # restored from an older copy
    with pytest.raises(CheckpointForkError, match="rewritten"):
        domain.check_continuity(last, entries[-1].head, bytes(32))  # same length or longer, other history


def test_only_an_explicit_allow_is_recorded_as_allowed() -> None:
    def decided(decision: int) -> Decision | None:
        payload = AccessDecision(principal="bob", method="/bastion.accounts.v1.Accounts/GetAccount", decision=decision)
        return domain.accepted(DELIVERY, verified(payload, "bastion.access.v1.AccessDecision"), NOW).decision

    assert decided(DECISION_ALLOW) is Decision.ALLOW
    assert decided(DECISION_DENY) is decided(DECISION_UNSPECIFIED) is Decision.DENY


def test_a_call_without_a_service_identity_is_kept_with_no_peer() -> None:
    decision = AccessDecision(principal="", method="/bastion.accounts.v1.Accounts/GetAccount", decision=DECISION_DENY,
                              reason="missing bearer token")
    record = domain.accepted(DELIVERY, verified(decision, "bastion.access.v1.AccessDecision"), NOW)
    assert record.detail == "peer=-"


def test_every_text_a_producer_chose_is_kept_bounded_and_without_nul() -> None:
    long = "\x00" + "x" * 5000
    envelope = Envelope(event_id=long, event_type=long, producer=long, aggregate_id=long, correlation_id=long)
    envelope.occurred_at.FromDatetime(NOW - dt.timedelta(seconds=2))
    decision = AccessDecision(principal=long, service_identity=long, method=long, decision=DECISION_DENY, reason=long)
    rejected = EventRejected(consumer=long, topic=long, partition=1, offset=7, reason=long, detail=long)
    kept = "\ufffd" + "x" * (domain.MAX_TEXT - 1)
    for payload in (decision, rejected, MoneyDeposited(account_id="agg-1")):
        record = domain.accepted(DELIVERY, VerifiedEvent(envelope, payload), NOW)  # type: ignore[arg-type]
        assert (record.event_id, record.event_type, record.producer, record.aggregate_id, record.correlation_id) == (
            kept,) * 5
        assert record.principal in (None, kept)
    access = domain.accepted(DELIVERY, VerifiedEvent(envelope, decision), NOW)
    assert (access.action, access.reason, access.detail) == (kept, kept, "peer=" + kept)
    rejection = domain.accepted(DELIVERY, VerifiedEvent(envelope, rejected), NOW)
    assert (rejection.reason, rejection.detail) == (kept, kept)


def test_an_accepted_event_keeps_when_it_occurred_and_one_refused_keeps_only_well_formed_claims() -> None:
    deposited = verified(MoneyDeposited(account_id="agg-1"), "bastion.accounts.v1.MoneyDeposited")
    assert domain.accepted(DELIVERY, deposited, NOW).occurred_at == NOW - dt.timedelta(seconds=2)
    claimed = Envelope(event_id="e-1", event_type="x\ny", producer="pay;ments", aggregate_id="a b",
                       correlation_id="corr-1")
    record = domain.refused(DELIVERY, claimed, VerificationError(RejectReason.BAD_SIGNATURE, "bad"), NOW)
    assert (record.event_id, record.event_type, record.producer, record.aggregate_id, record.correlation_id) == (
        "e-1", "(malformed)", "(malformed)", "(malformed)", "corr-1")
    assert (record.principal, record.action, record.recorded_at) == ("audit", "access.decisions.v1/2/41", NOW)


def test_an_oversized_record_is_kept_as_a_prefix_with_the_digest_and_size_of_the_whole() -> None:
    error = VerificationError(RejectReason.TOO_LARGE, "too large")
    at_limit = replace(DELIVERY, raw=b"a" * MAX_ENVELOPE_BYTES)
    record = domain.refused(at_limit, Envelope(), error, NOW)
    assert record.envelope == at_limit.raw and record.detail == "too large"
    over = replace(DELIVERY, raw=b"b" * 5000 + b"c" * MAX_ENVELOPE_BYTES)
    record = domain.refused(over, Envelope(), error, NOW)
    assert record.envelope == b"b" * domain.KEPT_PREFIX_BYTES
    assert record.detail == (f"too large (sha256 {hashlib.sha256(over.raw).hexdigest()}, {len(over.raw)} bytes)")


def test_a_detail_of_a_refusal_is_kept_bounded() -> None:
    error = VerificationError(RejectReason.MALFORMED, "y" * 5000)
    assert domain.refused(DELIVERY, Envelope(), error, NOW).detail == "y" * domain.MAX_TEXT


def test_an_alert_is_published_with_everything_that_raised_it() -> None:
    rule = AlertRule("token-guessing", "guessing tokens", "critical", "denial", "peer", 3, dt.timedelta(seconds=90))
    alert = Alert(rule, "cli", 3, 10, 14, NOW - dt.timedelta(seconds=80), NOW, "corr-14")
    message = domain.security_alert(alert)
    assert (message.rule, message.severity, message.description, message.counted_by, message.key) == (
        "token-guessing", "critical", "guessing tokens", "peer", "cli")
    assert (message.count, message.window_seconds, message.first_seq, message.last_seq,
            message.last_correlation_id) == (3, 90, 10, 14, "corr-14")
    assert message.first_at.ToDatetime(dt.UTC) == NOW - dt.timedelta(seconds=80)
    assert message.last_at.ToDatetime(dt.UTC) == NOW


def test_signing_goes_on_over_a_log_of_exactly_the_last_checkpoints_length_and_never_over_one_without_its_record(
) -> None:
    entries = extend(EMPTY, [sample_record(n) for n in range(1, 4)])
    last = sign_checkpoint(AUDIT_KEY, ORIGIN, entries[2].head)
    domain.check_continuity(last, entries[2].head, entries[2].hash)  # nothing appended since: fine
    with pytest.raises(CheckpointForkError):
        domain.check_continuity(last, entries[2].head, None)  # no record at the signed length any more


@pytest.mark.parametrize("token", [
    base64.urlsafe_b64encode(b"seq:-1").decode(), base64.urlsafe_b64encode(b"page:12").decode(),
    base64.urlsafe_b64encode(b":12").decode(), "   ",
])
def test_a_page_token_the_service_did_not_issue_is_invalid(token: str) -> None:
    with pytest.raises(InvalidArgumentError, match="page_token"):
        domain.query(token=token)


def test_every_filter_and_bound_of_a_query_is_kept_and_the_limits_are_inclusive() -> None:
    query = domain.query("acc-1", "alice", "bastion.T", NOW, NOW, pages.MAX_PAGE_SIZE, domain.page_token(3), True,
                         "corr-1")
    assert query == EventQuery("acc-1", "alice", "bastion.T", NOW, NOW, pages.MAX_PAGE_SIZE, 3, True, "corr-1")
    edge = "x" * domain.MAX_TEXT
    assert domain.query(edge, edge, edge, correlation_id=edge).principal == edge
    for name in ("principal", "event_type"):
        with pytest.raises(InvalidQueryError, match=name):
            domain.query(**{name: edge + "x"})  # type: ignore[arg-type]


def test_the_last_page_is_one_with_fewer_entries_than_asked(tmp_path: Path) -> None:
    audit, _, _ = handlers(tmp_path, extend(EMPTY, [sample_record(n) for n in range(1, 5)]))
    first, token = audit.list_events(domain.query(page_size=2))
    assert [e.seq for e in first] == [1, 2] and domain.after_seq_of(token) == 2
    second, token2 = audit.list_events(domain.query(page_size=2, token=token))
    assert [e.seq for e in second] == [3, 4] and token2 != ""
    last, token3 = audit.list_events(domain.query(page_size=2, token=token2))
    assert last == [] and token3 == ""


def test_the_first_envelope_of_a_bundle_is_refused_at_its_own_place() -> None:
    first = replace(DELIVERY, item=0)
    refused = domain.refused(first, Envelope(), VerificationError(RejectReason.STALE, "published long ago"), NOW)
    assert (refused.item, refused.action) == (0, "access.decisions.v1/2/41/0")


def test_the_verdict_names_the_newest_checkpoint_and_the_chain_is_checked_against_every_one(tmp_path: Path) -> None:
    entries = extend(EMPTY, [sample_record(n) for n in range(1, 6)])
    audit, _, file = handlers(tmp_path, entries)
    file.append(sign_checkpoint(AUDIT_KEY, ORIGIN, entries[1].head))
    file.append(sign_checkpoint(AUDIT_KEY, ORIGIN, entries[3].head))
    verdict = audit.verify_chain()
    assert verdict.report.ok and verdict.checkpoint_length == 4 and verdict.report.anchored_length == 4
    rewritten = extend(EMPTY, [sample_record(n, aggregate="acc-9") for n in range(1, 6)])
    tampered, security, _ = handlers(tmp_path, rewritten)
    verdict = tampered.verify_chain()
    assert not verdict.report.ok and verdict.report.first_bad_seq == 1 and "rewritten" in verdict.report.reason
    assert security.refused == [], "a log that differs from its checkpoints is a broken chain, not a refused file"


def test_each_alert_raised_is_counted_and_logged_once_committed() -> None:
    rules = [AlertRule("probing", "d", "warning", "denial", "principal", 5, dt.timedelta(seconds=60)),
             AlertRule("guessing", "d", "critical", "denial", "peer", 5, dt.timedelta(seconds=60))]
    alerts = [Alert(rules[0], "mallory", 5, 1, 5, NOW, NOW, "corr-5"), Alert(rules[1], "cli", 5, 2, 6, NOW, NOW, "c")]

    def counted(rule: str, severity: str) -> float:
        return REGISTRY.get_sample_value("bastion_security_alerts_total", {"rule": rule, "severity": severity}) or 0

    before = counted("probing", "warning"), counted("guessing", "critical")
    with capture_logs() as logs:
        announce(alerts)
    assert (counted("probing", "warning"), counted("guessing", "critical")) == (before[0] + 1, before[1] + 1)
    assert [(line["event"], line["rule"], line["key"], line["alert_id"]) for line in logs] == [
        ("security_alert", "probing", "mallory", alerts[0].alert_id),
        ("security_alert", "guessing", "cli", alerts[1].alert_id)]


def test_a_rejection_reported_in_another_consumers_name_is_refused_as_not_its_signers_to_make() -> None:
    """Every service reports its refusals in its own name (bastion/runtime.py: the consumer is the service), so a
    signed EventRejected naming another consumer is a forgery by its signer: the log must not keep it, nor the
    alert rules count it (failing-consumer, sequence-gaps), in the other consumer's name."""
    forged = EventRejected(consumer="notifications", topic="accounts.events.v1", partition=1, offset=7,
                           reason="sequence_gap", detail="a gap nobody had")
    signed_by_payments = verified(forged, "bastion.access.v1.EventRejected")
    signed_by_payments.envelope.producer = "payments"
    with pytest.raises(VerificationError, match="payments reported a refusal in the name of 'notifications'") as no:
        domain.accepted(DELIVERY, signed_by_payments, NOW)
    assert no.value.reason == RejectReason.NOT_AUTHORISED, "counted by the forged-events rule"
    signed_by_payments.envelope.producer = "notifications"
    assert domain.accepted(DELIVERY, signed_by_payments, NOW).principal == "notifications"


def test_a_forged_checkpoint_file_still_raises_its_security_record_while_the_published_checkpoints_cannot_be_read(
        tmp_path: Path) -> None:
    # docs/audit.md: a forged checkpoint is refused, the verdict fails, and a security record goes into the log.
    # Kafka being unreadable for the witness must not also hide the tampering of the file from the log.
    entries = extend(EMPTY, [sample_record(n) for n in range(1, 4)])

    def unreachable() -> list[Checkpoint]:
        raise WitnessUnavailableError("audit.checkpoints.v1 could not be read: broker down")

    audit, security, file, _ = witnessed_handlers(tmp_path, entries, witness=unreachable)
    good = sign_checkpoint(AUDIT_KEY, ORIGIN, entries[-1].head)
    file.append(good)
    with file.path.open("a") as lines:
        lines.write(good.to_json().replace(f'"length":{good.length}', f'"length":{good.length + 5}') + "\n")
    verdict = audit.verify_chain()
    assert not verdict.report.ok
    assert security.refused == [f"BadCheckpointSignatureError at {file.path}"]


class RecordingOutbox:
    def __init__(self) -> None:
        self.correlation_ids: list[str] = []

    def append(self, _conn: Any, _topic: str, _payload: Any, aggregate_id: str, correlation_id: str,
               event_id: str) -> str:
        self.correlation_ids.append(correlation_id)
        return event_id


class AnyConnection:
    def execute(self, _statement: Any) -> None:
        return None


@pytest.mark.parametrize("placeholder", ["-", "(malformed)"])
def test_an_alert_over_a_refusal_whose_correlation_id_was_not_kept_carries_its_own_id_not_the_placeholder(
        placeholder: str) -> None:
    # A refused event's claimed correlation id is kept only when well formed (safe_claim): "-" when it had none,
    # "(malformed)" otherwise. Neither names a request: an alert taking it would share it with every other
    # refusal that had no usable id (and `bastion trail "(malformed)"` would mix them all up).
    rule = AlertRule("forged-events", "forged events", "critical", "rejection", "producer", 3,
                     dt.timedelta(seconds=60))
    alert = Alert(rule, "(malformed)", 3, 10, 12, NOW, NOW, placeholder)
    outbox = RecordingOutbox()
    PostgresAlerts(outbox, None)._raise(AnyConnection(), alert)  # type: ignore[arg-type]
    assert outbox.correlation_ids == [alert.alert_id]
