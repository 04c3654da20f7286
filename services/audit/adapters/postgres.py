"""PostgreSQL adapters of the audit service: the reader of the log (ListEvents, VerifyChain) over the kit's
hash-chained table, and the security records and alerts it raises through its own outbox."""

import datetime as dt
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import BigInteger, Column, Connection, DateTime, Engine, MetaData, String, Table, func, select
from sqlalchemy.dialects.postgresql import insert as upsert

from bastion.access.v1.decision_pb2 import EventRejected
from bastion.audit.alerts import ALERTS_TOPIC, OUT_OF_ORDER, Alert, AlertDetector, longest_window
from bastion.audit.chain import Appended, LogEntry
from bastion.audit.checkpoints import Checkpoint
from bastion.audit.errors import CheckpointError
from bastion.audit.postgres import (
    AuditLog,
    entry_of_row,
    latest_refusals,
    refusals_after,
    security_view,
    select_log,
)
from bastion.audit.postgres import log as audit_log
from bastion.audit.verify import ChainReport
from bastion.events.consumer import SECURITY_TOPIC, names_a_request
from bastion.events.outbox import Outbox
from services.audit import domain
from services.audit.domain import EventQuery

CHECKPOINT_TOPIC = "audit.checkpoints.v1"
# Each alert is an aggregate of its own (sequence 1): alerts need no order among themselves, and so one alert a
# reader sets aside, or one lost, never holds every later one back behind a sequence gap.
ALERT_AGGREGATE = "security-alert:{}"
# A restarted detector counts again at most this many of the newest refusals.
PRIMING_ROWS = 100_000

# migrations/versions/0002_alert_marks.py; in the service's own schema, beside the outbox.
ALERTS_METADATA = MetaData()
alert_marks = Table(
    "alert_marks", ALERTS_METADATA,
    Column("rule", String(63), primary_key=True),
    Column("key", String(200), primary_key=True),
    Column("last_seq", BigInteger, nullable=False),
    Column("last_at", DateTime(timezone=True), nullable=False),
)


@dataclass
class PostgresAuditReader:
    conn: Connection
    store: AuditLog

    def find(self, query: EventQuery) -> list[LogEntry]:
        statement = select_log().where(audit_log.c.seq > query.after_seq)
        if query.aggregate_id:
            statement = statement.where(audit_log.c.aggregate_id == query.aggregate_id)
        if query.principal:
            statement = statement.where(audit_log.c.principal == query.principal)
        if query.event_type:
            statement = statement.where(audit_log.c.event_type == query.event_type)
        if query.correlation_id:  # index log_by_correlation_id (bastion/audit/postgres.py)
            statement = statement.where(audit_log.c.correlation_id == query.correlation_id)
        if query.since is not None:
            statement = statement.where(audit_log.c.occurred_at >= query.since)
        if query.until is not None:
            statement = statement.where(audit_log.c.occurred_at < query.until)
        if query.refusals_only:  # the security view's rows: one rule for what a refusal is (projections.py)
            statement = statement.where(audit_log.c.seq.in_(select(security_view.c.seq)))
        rows = self.conn.execute(statement.order_by(audit_log.c.seq).limit(query.page_size))
        return [entry_of_row(row) for row in rows]

    def check_chain(self, checkpoints: list[Checkpoint]) -> ChainReport:
        return self.store.check_chain(self.conn, checkpoints)


class PostgresAuditReaders:
    """Each use gets one read-only transaction: a consistent snapshot of the log for a whole verification."""

    def __init__(self, engine: Engine, store: AuditLog) -> None:
        self.engine = engine
        self.store = store

    @contextmanager
    def __call__(self) -> Iterator[PostgresAuditReader]:
        with self.engine.connect() as conn, conn.begin():
            conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield PostgresAuditReader(conn, self.store)


class OutboxSecurityRecords:
    """Security records leave through the outbox (signed, relayed to access.decisions.v1) and come back through
    the consumer into the log itself, like every other consumer's rejections."""

    def __init__(self, engine: Engine, outbox: Outbox) -> None:
        self.engine = engine
        self.outbox = outbox

    def checkpoint_refused(self, error: CheckpointError, where: str) -> None:
        """One record per call, its id its own: two refusals that read alike (the file tampered with twice the
        same way, accepted in between) are two occurrences, and an id made of the text kept only the first. A
        refusal repeated while it lasts is the caller's to record once (AuditHandlers, AuditConsumer)."""
        detail = f"{type(error).__name__}: {error}"[:500]
        record_id = str(uuid.uuid4())
        record = EventRejected(consumer=domain.CONSUMER, topic=CHECKPOINT_TOPIC, reason="checkpoint_refused",
                               detail=detail, correlation_id=record_id)
        with self.engine.begin() as conn:
            self.outbox.append(conn, SECURITY_TOPIC, record, aggregate_id=f"consumer:{domain.CONSUMER}",
                               correlation_id=record_id, event_id=record_id)


class PostgresAlerts:
    """The alert detector of the audit service, fed in the transaction that appends each batch: the alerts a batch
    raises are written to the outbox (signed, relayed to security.alerts.v1) with the mark of where each rule last
    raised one per key, in that same transaction. A crash before the commit loses neither: the batch is read again
    and raises them again. Alert ids come from what raised them, and the outbox stores an id once.

    One audit service writes the log (the writer lock makes a second one wait, and its detector would count the
    first one's entries too); the detector reads back the security view's rows of the entries each append added."""

    def __init__(self, outbox: Outbox, detector: AlertDetector) -> None:
        self.outbox = outbox
        self.detector = detector

    def start(self, conn: Connection, head: int, now: dt.datetime) -> list[Alert]:
        """Count again the log's recent refusals, but those an alert already counted, then go on after HEAD.
        Recent: within the longest window, plus OUT_OF_ORDER, before the newest refusal (or NOW, if earlier),
        among the newest PRIMING_ROWS: about as far back as the detector keeps them (it keeps them per key, so
        refusals read far out of time order may count differently after a restart). Returns the alerts this
        raises, written: normally none, unless rules were made stricter since."""
        rows = latest_refusals(conn, PRIMING_ROWS)
        if rows:
            since = min(now, max(row.occurred_at for row in rows)) - longest_window(self.detector.rules) \
                - OUT_OF_ORDER
            rows = [row for row in rows if row.occurred_at >= since]
        marks = {(mark.rule, mark.key): mark.last_seq for mark in conn.execute(
            select(alert_marks).where(alert_marks.c.last_seq >= (rows[0].seq if rows else head)))}
        raised = self.detector.observe(rows, skip_through=marks)
        self.detector.seen_through(head)
        return [alert for alert in raised if self._raise(conn, alert)]

    def observe(self, conn: Connection, placed: Sequence[Appended]) -> list[Alert]:
        """The alerts raised by the entries an append just added (PLACED is what it returned: the entries of the
        records given, some of them stored before); returns those written (not those the outbox had already)."""
        newest = max((appended.seq for appended in placed), default=0)
        raised = self.detector.observe(refusals_after(conn, self.detector.last_seq)) \
            if newest > self.detector.last_seq else []
        self.detector.seen_through(newest)
        return [alert for alert in raised if self._raise(conn, alert)]

    def _raise(self, conn: Connection, alert: Alert) -> bool:
        # The alert carries the correlation id of the refusal that raised it: `bastion trail` of that request shows
        # the alert, and the recipients being told of it, after the refusals. A refusal whose id was not kept (a
        # placeholder every such refusal shares) leaves the alert its own id.
        correlation_id = alert.last_correlation_id if names_a_request(alert.last_correlation_id) else alert.alert_id
        stored = self.outbox.append(conn, ALERTS_TOPIC, domain.security_alert(alert),
                                    aggregate_id=ALERT_AGGREGATE.format(alert.alert_id),
                                    correlation_id=correlation_id, event_id=alert.alert_id)
        mark = {"rule": alert.rule.name, "key": alert.key, "last_seq": alert.last_seq, "last_at": alert.last_at}
        conn.execute(upsert(alert_marks).values(**mark).on_conflict_do_update(
            index_elements=[alert_marks.c.rule, alert_marks.c.key],
            set_={"last_seq": func.greatest(alert_marks.c.last_seq, mark["last_seq"]), "last_at": mark["last_at"]}))
        return stored is not None
