"""Event-sourced read models of the audit log: a pure fold from log entries to projection rows.

Projections (each a table in PostgreSQL, see `bastion.audit.postgres`):
- `timeline`: the domain events of each aggregate (account, payment), in log order;
- `access_log`: every access decision about each principal; `access_summary`: per principal, how many
  calls were allowed and denied and the seq of the latest (a row updated in place: the fold is not only
  inserts, which is what makes a rebuild worth comparing);
- `security_view`: every refusal: denied access decisions and rejected events.
They are derived data: they hold nothing the log does not, so they can be dropped and rebuilt from it at
any time (`rebuild`), and a live projection that differs from its rebuild is a bug or tampering.

`Projections.apply(seq, record)` is the fold. The PostgreSQL adapter folds each appended batch with it and
merges the result into the tables as `Projections.merge` does in memory, so the rows are the same whichever
way they were made. `dump()` and
`digests()` give every row, in key order, as plain values, for comparing a live projection with a rebuild.
"""

import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from dataclasses import astuple, dataclass, fields
from typing import ClassVar

from bastion.audit.records import AuditRecord, Decision, RecordKind, rfc3339

Value = str | int | None
Row = tuple[Value, ...]
ProjectionDump = dict[str, list[Row]]


@dataclass(frozen=True)
class TimelineRow:
    TABLE: ClassVar[str] = "timeline"
    KEY: ClassVar[tuple[str, ...]] = ("aggregate_id", "seq")

    aggregate_id: str
    seq: int
    event_type: str
    producer: str
    event_id: str
    correlation_id: str
    occurred_at: dt.datetime


@dataclass(frozen=True)
class AccessRow:
    TABLE: ClassVar[str] = "access_log"
    KEY: ClassVar[tuple[str, ...]] = ("principal", "seq")

    principal: str
    seq: int
    action: str
    decision: str
    reason: str | None
    producer: str  # the service that decided
    correlation_id: str
    occurred_at: dt.datetime


@dataclass(frozen=True)
class AccessSummaryRow:
    TABLE: ClassVar[str] = "access_summary"
    KEY: ClassVar[tuple[str, ...]] = ("principal",)

    principal: str
    allowed: int
    denied: int
    last_seq: int

    def merge(self, later: "AccessSummaryRow") -> "AccessSummaryRow":
        """This summary followed by LATER's (the SQL upsert in the adapter does the same)."""
        return AccessSummaryRow(self.principal, self.allowed + later.allowed, self.denied + later.denied,
                                max(self.last_seq, later.last_seq))


@dataclass(frozen=True)
class SecurityRow:
    TABLE: ClassVar[str] = "security_view"
    KEY: ClassVar[tuple[str, ...]] = ("seq",)

    seq: int
    kind: str
    principal: str | None  # the denied caller, or the consumer that refused an event
    producer: str
    action: str | None
    reason: str | None
    detail: str | None
    topic: str
    partition: int
    offset: int
    event_id: str
    correlation_id: str
    occurred_at: dt.datetime


ProjectionRow = TimelineRow | AccessRow | AccessSummaryRow | SecurityRow
ROW_TYPES = (TimelineRow, AccessRow, AccessSummaryRow, SecurityRow)
TABLE_NAMES = tuple(row_type.TABLE for row_type in ROW_TYPES)


_COLUMNS: dict[type, tuple[str, ...]] = {}


def columns(row_type: type) -> tuple[str, ...]:
    """The field names of a dataclass, in order (the column names of its table); memoised: this runs per row."""
    names = _COLUMNS.get(row_type)
    if names is None:
        names = _COLUMNS[row_type] = tuple(field.name for field in fields(row_type))
    return names


def plain_row(values: Iterable[object]) -> Row:
    """A row as plain values: timestamps as RFC 3339 UTC text, so that rows from anywhere compare equal."""
    row: list[Value] = []
    for value in values:
        if isinstance(value, dt.datetime):
            row.append(rfc3339(value))
        elif value is None or isinstance(value, str | int):
            row.append(value)
        else:
            raise TypeError(f"unexpected projection value {value!r}")
    return tuple(row)


def digest_rows(rows: Iterable[Row]) -> str:
    """SHA-256 over the rows in the order given, one JSON array per line."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(list(row), separators=(",", ":"), ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def security_row(seq: int, record: AuditRecord) -> SecurityRow | None:
    """The security view's row of the record stored at SEQ: one for every refusal (a denied access decision or a
    rejected event), None for anything else."""
    if record.kind is not RecordKind.REJECTION and record.decision is not Decision.DENY:
        return None
    return SecurityRow(
        seq, record.kind.value, record.principal, record.producer, record.action, record.reason, record.detail,
        record.topic, record.partition, record.offset, record.event_id, record.correlation_id, record.occurred_at)


class Projections:
    """The projections held in memory: the fold itself, and the reference a rebuild is compared with."""

    def __init__(self) -> None:
        self.timeline: dict[tuple[str, int], TimelineRow] = {}
        self.access: dict[tuple[str, int], AccessRow] = {}
        self.summary: dict[str, AccessSummaryRow] = {}
        self.security: dict[int, SecurityRow] = {}

    def apply(self, seq: int, record: AuditRecord) -> None:
        """Fold the record stored at SEQ into the projections."""
        if record.kind is RecordKind.EVENT and record.aggregate_id:
            self.timeline[(record.aggregate_id, seq)] = TimelineRow(
                record.aggregate_id, seq, record.event_type, record.producer, record.event_id,
                record.correlation_id, record.occurred_at)
        if record.kind is RecordKind.ACCESS and record.principal is not None and record.action is not None \
                and record.decision is not None:
            self.access[(record.principal, seq)] = AccessRow(
                record.principal, seq, record.action, record.decision.value, record.reason, record.producer,
                record.correlation_id, record.occurred_at)
            allowed = record.decision is Decision.ALLOW
            change = AccessSummaryRow(record.principal, int(allowed), int(not allowed), seq)
            before = self.summary.get(record.principal)
            self.summary[record.principal] = before.merge(change) if before else change
        refusal = security_row(seq, record)
        if refusal is not None:
            self.security[seq] = refusal

    def merge(self, later: "Projections") -> None:
        """Add LATER, the fold of the entries that follow this one's, as the PostgreSQL adapter merges each
        appended batch: new rows are inserted, summaries are added up."""
        self.timeline.update(later.timeline)
        self.access.update(later.access)
        self.security.update(later.security)
        for principal, summary in later.summary.items():
            before = self.summary.get(principal)
            self.summary[principal] = before.merge(summary) if before else summary

    def dump(self) -> ProjectionDump:
        """Every row of every projection, in key order, as plain values."""
        tables: list[tuple[str, Iterable[ProjectionRow]]] = [
            (TimelineRow.TABLE, self.timeline.values()), (AccessRow.TABLE, self.access.values()),
            (AccessSummaryRow.TABLE, self.summary.values()), (SecurityRow.TABLE, self.security.values()),
        ]
        dump: ProjectionDump = {}
        for name, rows in tables:
            # Rows start with their key columns, which are unique: sorting whole rows sorts by key.
            dump[name] = sorted(plain_row(astuple(row)) for row in rows)
        return dump

    def digests(self) -> dict[str, str]:
        return {name: digest_rows(rows) for name, rows in self.dump().items()}
