"""PostgreSQL adapters of the audit service: the reader of the log (ListEvents, VerifyChain) over the kit's
hash-chained table, and the security records it raises through its own outbox."""

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, select

from bastion.access.v1.decision_pb2 import EventRejected
from bastion.audit.chain import LogEntry
from bastion.audit.checkpoints import Checkpoint
from bastion.audit.errors import CheckpointError
from bastion.audit.postgres import AuditLog, entry_of_row, security_view
from bastion.audit.postgres import log as audit_log
from bastion.audit.verify import ChainReport
from bastion.events.consumer import SECURITY_TOPIC
from bastion.events.outbox import Outbox
from services.audit import domain
from services.audit.domain import EventQuery

CHECKPOINT_TOPIC = "audit.checkpoints.v1"
SECURITY_NAMESPACE = uuid.UUID("0c8f1c35-2f8e-4c55-9c0e-5b8f0b1d7a21")


@dataclass
class PostgresAuditReader:
    conn: Connection
    store: AuditLog

    def find(self, query: EventQuery) -> list[LogEntry]:
        statement = select(audit_log).where(audit_log.c.seq > query.after_seq)
        if query.aggregate_id:
            statement = statement.where(audit_log.c.aggregate_id == query.aggregate_id)
        if query.principal:
            statement = statement.where(audit_log.c.principal == query.principal)
        if query.event_type:
            statement = statement.where(audit_log.c.event_type == query.event_type)
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
        detail = f"{type(error).__name__}: {error}"[:500]
        record_id = str(uuid.uuid5(SECURITY_NAMESPACE, f"{where}/{detail}"))
        record = EventRejected(consumer=domain.CONSUMER, topic=CHECKPOINT_TOPIC, reason="checkpoint_refused",
                               detail=detail, correlation_id=record_id)
        with self.engine.begin() as conn:
            self.outbox.append(conn, SECURITY_TOPIC, record, aggregate_id=f"consumer:{domain.CONSUMER}",
                               correlation_id=record_id, event_id=record_id)
