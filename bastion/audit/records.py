"""The audit record (what the audit store keeps of each Kafka record it consumed) and its canonical bytes.

`canonical_bytes` is the one definition of what the hash chain covers. It is JSON with sorted keys, no
whitespace, UTF-8 (non-ASCII characters as themselves), every field present (absent ones as `null`) but
`item`, which is written only for a record that is one envelope of a bundle (so every record stored before
bundles keeps its bytes and its hash),
bytes as standard base64 with padding and timestamps as RFC 3339 UTC with exactly six fractional digits and
a `Z`. With only strings, integers and null in it and ASCII keys, that text is also the RFC 8785 (JCS) form
of the object, so a verifier in another language can rebuild it with any JCS library.
tests/unit/audit/vector-v1.json pins it: a change here is a visible, deliberate break of every stored hash.
"""

import base64
import datetime as dt
import json
from dataclasses import dataclass, fields
from enum import StrEnum

from bastion.audit.errors import InvalidRecordError

MAX_PARTITION = 2**31 - 1
MAX_OFFSET = 2**63 - 1
MAX_ITEM = 2**16 - 1  # a bundle holds at most signing.MAX_BATCH envelopes


class RecordKind(StrEnum):
    EVENT = "event"  # a domain event that verified (accounts.events.v1, payments.events.v1)
    ACCESS = "access"  # an allow or deny of a gRPC interceptor (AccessDecision on access.decisions.v1)
    REJECTION = "rejection"  # an event a verifying consumer refused (EventRejected, or refused by audit itself)


class Decision(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True)
class AuditRecord:
    """One consumed Kafka record, as an investigator needs it.

    - `topic`, `partition`, `offset`: where the audit service read the record, and `item` the envelope's place
      when the record was a bundle of envelopes (None otherwise). They identify it: appending a record whose
      coordinates are already stored returns the stored entry (a redelivery is not kept twice).
    - `event_id`, `event_type`, `producer`, `aggregate_id`, `correlation_id`, `occurred_at`: from the envelope.
      For a REJECTION they are what the refused event claimed (unverified; "" when it did not parse), and
      `occurred_at` is the broker's append time when the envelope has none.
    - `recorded_at`: when the audit service took the record.
    - `envelope`: the record value exactly as read, the producer's signature included, so anybody can verify
      the producer's signature again later with the trust store of that time; for an envelope of a bundle, a
      bundle of one (that envelope's bytes, the bundle's signature, its inclusion proof), which verifies alone.
    - ACCESS: `principal` is the caller, `action` the gRPC method, `decision` allow or deny, `reason` why,
      `detail` what else the decision said (the caller's mTLS service identity).
    - REJECTION: `principal` is the consumer that refused the event, `action` the refused record's
      `topic/partition/offset`, `reason` the reject reason (`bad_signature`, ...), `detail` its detail text.
    - EVENT: `principal`, `action`, `decision`, `reason` and `detail` are None.
    Strings must be valid Unicode without NUL characters (PostgreSQL text cannot hold NUL); timestamps must
    carry a time zone. A record that breaks a rule raises `InvalidRecordError` when built.
    """

    kind: RecordKind
    topic: str
    partition: int
    offset: int
    event_id: str
    event_type: str
    producer: str
    aggregate_id: str
    correlation_id: str
    occurred_at: dt.datetime
    recorded_at: dt.datetime
    envelope: bytes
    principal: str | None = None
    action: str | None = None
    decision: Decision | None = None
    reason: str | None = None
    detail: str | None = None
    item: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, RecordKind):
            raise InvalidRecordError(f"kind must be a RecordKind, not {self.kind!r}")
        if self.decision is not None and not isinstance(self.decision, Decision):
            raise InvalidRecordError(f"decision must be a Decision, not {self.decision!r}")
        for name in ("occurred_at", "recorded_at"):
            value = getattr(self, name)
            if not isinstance(value, dt.datetime) or value.utcoffset() is None:
                raise InvalidRecordError(f"{name} must be a datetime with a time zone, not {value!r}")
        if not 0 <= self.partition <= MAX_PARTITION or not 0 <= self.offset <= MAX_OFFSET:
            raise InvalidRecordError(f"partition {self.partition} or offset {self.offset} out of range")
        if self.item is not None and (isinstance(self.item, bool) or not 0 <= self.item <= MAX_ITEM):
            raise InvalidRecordError(f"item {self.item!r} out of range")
        if not isinstance(self.envelope, bytes):
            raise InvalidRecordError("envelope must be bytes")
        for name in TEXT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                _check_text(name, value)
        if self.kind is RecordKind.ACCESS:
            if self.principal is None or self.action is None or self.decision is None:
                raise InvalidRecordError("an access record needs principal, action and decision")
        elif self.decision is not None:
            raise InvalidRecordError(f"a {self.kind} record has no decision")
        if self.kind is RecordKind.REJECTION and self.reason is None:
            raise InvalidRecordError("a rejection record needs its reason")


TEXT_FIELDS = tuple(field.name for field in fields(AuditRecord) if field.type in (str, str | None))


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise InvalidRecordError(f"{name} must be text, not {value!r}")
    if "\x00" in value:
        raise InvalidRecordError(f"{name} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRecordError(f"{name} is not valid Unicode (lone surrogate)") from None


def rfc3339(moment: dt.datetime) -> str:
    """UTC, microseconds always written: `2026-01-02T03:04:05.000600Z`."""
    return moment.astimezone(dt.UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def canonical_bytes(record: AuditRecord) -> bytes:
    """The bytes the hash chain covers (see the module docstring for the rules)."""
    document: dict[str, str | int | None] = {
        "kind": record.kind.value,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "event_id": record.event_id,
        "event_type": record.event_type,
        "producer": record.producer,
        "aggregate_id": record.aggregate_id,
        "correlation_id": record.correlation_id,
        "occurred_at": rfc3339(record.occurred_at),
        "recorded_at": rfc3339(record.recorded_at),
        "envelope": base64.b64encode(record.envelope).decode("ascii"),
        "principal": record.principal,
        "action": record.action,
        "decision": None if record.decision is None else record.decision.value,
        "reason": record.reason,
        "detail": record.detail,
    }
    if record.item is not None:
        document["item"] = record.item
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")
