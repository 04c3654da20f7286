"""The rules of the audit service, pure: what an audit record says about each Kafka record it read, and which
ListEvents queries are valid. No I/O, no framework."""

import datetime as dt
import hashlib
from dataclasses import dataclass

from bastion import pages
from bastion.access.v1.decision_pb2 import DECISION_ALLOW, AccessDecision, EventRejected, SecurityAlert
from bastion.audit.alerts import Alert
from bastion.audit.chain import Head
from bastion.audit.checkpoints import Checkpoint
from bastion.audit.errors import CheckpointForkError, CheckpointRollbackError
from bastion.audit.records import AuditRecord, Decision, RecordKind
from bastion.events.consumer import safe_claim
from bastion.events.errors import RejectReason, VerificationError
from bastion.events.v1.envelope_pb2 import Envelope
from bastion.events.verify import MAX_ENVELOPE_BYTES, VerifiedEvent
from bastion.grpc.errors import InvalidArgumentError

CONSUMER = "audit"
SEQ_PAGES = "seq"  # the kind of ListEvents' page tokens: the seq of the last record served
MAX_TEXT = 1000
KEPT_PREFIX_BYTES = 4096
MAX_SEQ = 2**63 - 1  # the log's seq is a PostgreSQL bigint: a larger position fails the query itself (INTERNAL)


class AuditServiceError(Exception):
    """Base of the audit service's errors."""


class InvalidQueryError(AuditServiceError, InvalidArgumentError):
    pass


@dataclass(frozen=True)
class Delivery:
    """Where and when a record was read: its Kafka coordinates, the broker's append time, and its bytes. For one
    envelope of a bundle record: its place in the bundle, and as bytes that envelope as it verifies alone."""

    topic: str
    partition: int
    offset: int
    broker_time: dt.datetime
    raw: bytes
    item: int | None = None

    @property
    def place(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}" + (f"/{self.item}" if self.item is not None else "")


def _text(value: str) -> str:
    """Attacker-influenced text kept in the log: bounded, and without the NUL PostgreSQL text cannot hold."""
    return value.replace("\x00", "\ufffd")[:MAX_TEXT]


def _kept(raw: bytes) -> bytes:
    """The bytes kept of a record: whole up to the envelope limit; beyond it (a refused oversized record) a prefix,
    so that a flood of huge records cannot exhaust the consumer; `refused` puts the full SHA-256 in the detail."""
    return raw if len(raw) <= MAX_ENVELOPE_BYTES else raw[:KEPT_PREFIX_BYTES]


def accepted(delivery: Delivery, event: VerifiedEvent, recorded_at: dt.datetime) -> AuditRecord:
    """The record of an event that passed every check: a domain event, an access decision of an interceptor,
    or another consumer's report that it refused an event. Built once, of its kind (each record is checked when
    built, and the consumer builds one per access decision the platform makes)."""
    envelope, payload = event.envelope, event.payload
    kind, principal, action, decision, reason, detail = RecordKind.EVENT, None, None, None, None, None
    # Even a verified event's strings are a producer's input: bounded and NUL-free, so none can stop the log.
    if isinstance(payload, AccessDecision):
        kind, principal, action = RecordKind.ACCESS, _text(payload.principal), _text(payload.method)
        decision = Decision.ALLOW if payload.decision == DECISION_ALLOW else Decision.DENY
        reason, detail = _text(payload.reason), f"peer={_text(payload.service_identity) or '-'}"
    elif isinstance(payload, EventRejected):
        if payload.consumer != envelope.producer:
            # Each service reports the refusals of its own consumer, signed with its own key (bastion/runtime.py):
            # a report in another consumer's name is its signer's forgery, and would put an alert on that name.
            raise VerificationError(RejectReason.NOT_AUTHORISED, f"{_text(envelope.producer)} reported a refusal in "
                                    f"the name of {_text(payload.consumer)!r}: a service reports only its own")
        kind, principal = RecordKind.REJECTION, _text(payload.consumer)
        action = _text(f"{payload.topic}/{payload.partition}/{payload.offset}")
        reason, detail = _text(payload.reason), _text(payload.detail)
    return AuditRecord(
        kind, topic=delivery.topic, partition=delivery.partition, offset=delivery.offset,
        event_id=_text(envelope.event_id), event_type=_text(envelope.event_type), producer=_text(envelope.producer),
        aggregate_id=_text(envelope.aggregate_id), correlation_id=_text(envelope.correlation_id),
        occurred_at=envelope.occurred_at.ToDatetime(dt.UTC), recorded_at=recorded_at, envelope=delivery.raw,
        principal=principal, action=action, decision=decision, reason=reason, detail=detail, item=delivery.item)


def refused(delivery: Delivery, claimed: Envelope, error: VerificationError, recorded_at: dt.datetime) -> AuditRecord:
    """The record of an event this service itself refused. What the event claims about itself is unverified:
    only well-formed ids are kept, and its time is the broker's, which no producer chooses."""
    return AuditRecord(
        RecordKind.REJECTION, topic=delivery.topic, partition=delivery.partition, offset=delivery.offset,
        event_id=safe_claim(claimed.event_id), event_type=safe_claim(claimed.event_type),
        producer=safe_claim(claimed.producer), aggregate_id=safe_claim(claimed.aggregate_id),
        correlation_id=safe_claim(claimed.correlation_id), occurred_at=delivery.broker_time,
        recorded_at=recorded_at, envelope=_kept(delivery.raw), principal=CONSUMER, item=delivery.item,
        action=delivery.place, reason=error.reason.value,
        detail=_text(f"{error.detail} (sha256 {hashlib.sha256(delivery.raw).hexdigest()}, {len(delivery.raw)} "
                     "bytes)" if len(delivery.raw) > MAX_ENVELOPE_BYTES else error.detail))


def security_alert(alert: Alert) -> SecurityAlert:
    """The signed event an alert is published as."""
    rule = alert.rule
    message = SecurityAlert(
        rule=rule.name, severity=rule.severity, description=rule.description, counted_by=rule.count_by,
        key=alert.key, count=alert.count, window_seconds=int(rule.window.total_seconds()),
        first_seq=alert.first_seq, last_seq=alert.last_seq, last_correlation_id=alert.last_correlation_id)
    message.first_at.FromDatetime(alert.first_at)
    message.last_at.FromDatetime(alert.last_at)
    return message


def check_continuity(last: Checkpoint | None, head: Head, signed_hash: bytes | None) -> None:
    """Before signing HEAD: the log must still extend the LAST signed checkpoint. SIGNED_HASH is the hash the log
    holds now at the checkpoint's length. A shorter log (restored from an old copy, rows removed) or another
    hash there (rewritten) raises, and the service stops signing rather than vouch for it."""
    if last is None:
        return
    if head.length < last.length:
        raise CheckpointRollbackError(
            f"the log has {head.length} records, below the {last.length} of the last signed checkpoint")
    if signed_hash != last.head_hash:
        raise CheckpointForkError(
            f"record {last.length} no longer has the hash the last checkpoint signed: the log was rewritten")


@dataclass(frozen=True)
class EventQuery:
    """ListEvents: filters (each applies when set, combined with AND), a page size and where to continue."""

    aggregate_id: str = ""
    principal: str = ""
    event_type: str = ""
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    page_size: int = pages.DEFAULT_PAGE_SIZE
    after_seq: int = 0
    # Only denied access decisions and rejected events.
    refusals_only: bool = False
    correlation_id: str = ""


def page_token(last_seq: int) -> str:
    return pages.page_token(SEQ_PAGES, str(last_seq))


def after_seq_of(token: str) -> int:
    """The position a page token stands for; tokens are opaque to clients, so anything else is invalid."""
    key = pages.token_key(token, SEQ_PAGES, 1)
    if key is None:
        return 0
    # ASCII digits only, and within the bigint the query compares it with: a forged token is the caller's error.
    if key[0].isascii() and key[0].isdigit() and int(key[0]) <= MAX_SEQ:
        return int(key[0])
    raise pages.InvalidPageError("page_token is not one this service issued")


def query(aggregate_id: str = "", principal: str = "", event_type: str = "", since: dt.datetime | None = None,
          until: dt.datetime | None = None, page_size: int = 0, token: str = "", refusals_only: bool = False,
          correlation_id: str = "") -> EventQuery:
    size = pages.page_size(page_size)
    if since is not None and until is not None and since > until:
        raise InvalidQueryError("since must not be later than until")
    for name, value in (("aggregate_id", aggregate_id), ("principal", principal), ("event_type", event_type),
                        ("correlation_id", correlation_id)):
        if len(value) > MAX_TEXT:
            raise InvalidQueryError(f"{name} is longer than {MAX_TEXT} characters")
        # PostgreSQL text cannot hold a NUL: the driver would fail the query (INTERNAL). The log keeps none (`_text`
        # replaces it), so no record could match anyway.
        if "\x00" in value:
            raise InvalidQueryError(f"{name} must not contain a NUL character")
    return EventQuery(aggregate_id, principal, event_type, since, until, size, after_seq_of(token), refusals_only,
                      correlation_id)
