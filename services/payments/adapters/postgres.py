"""PostgreSQL adapters of the payments ports (SQLAlchemy Core): the repository, the outbox-backed event
sink and the unit of work that gives both one transaction."""

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Connection,
    DateTime,
    Engine,
    Index,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    func,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError

from bastion.events.outbox import Outbox, OutboxEventSink
from bastion.migrations import upgrade
from services.payments.domain import IdempotencyConflictError, Payment, PaymentStatus
from services.payments.handlers import TOPIC, PaymentPlace

METADATA = MetaData()
payments = Table(
    "payments", METADATA,
    Column("payment_id", String(36), primary_key=True),
    Column("idempotency_key", String(100), nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("from_account_id", String(36), nullable=False),
    Column("to_account_id", String(36), nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("initiated_by", String(100), nullable=False),
    Column("status", String(9), nullable=False),
    Column("reason", String(500), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("idempotency_key", name="payments_idempotency_key"),
    CheckConstraint("amount_minor > 0", name="payments_amount_positive"),
    CheckConstraint("from_account_id <> to_account_id", name="payments_distinct_accounts"),
    CheckConstraint(f"status IN ({', '.join(repr(s.value) for s in PaymentStatus)})", name="payments_known_status"),
)
# The limit checks read one source account's recent payments.
Index("payments_source_recent", payments.c.from_account_id, payments.c.created_at)
# ListPayments reads one initiator's payments newest first, a page at a time (the index is read backwards).
Index("payments_initiator_order", payments.c.initiated_by, payments.c.created_at, payments.c.payment_id)
# What a repeated key collides with: the key itself, and the payment id derived from it.
KEY_CONSTRAINTS = frozenset({"payments_idempotency_key", "payments_pkey"})
# What counts against the daily limit: PENDING may already have moved the money.
SENT = (PaymentStatus.PENDING.value, PaymentStatus.COMPLETED.value)


def create_schema(engine: Engine) -> None:
    """Migrate the payments database to the latest revision (`services/payments/migrations`); safe when several
    processes start at once. An engine with `schema_translate_map={None: name}` migrates that schema instead."""
    upgrade(engine, "payments")


def _payment(row: object) -> Payment:
    values = row._mapping  # type: ignore[attr-defined]
    return Payment(**{**values, "status": PaymentStatus(values["status"])})


@dataclass
class PostgresPayments:
    conn: Connection

    def by_idempotency_key(self, idempotency_key: str) -> Payment | None:
        row = self.conn.execute(select(payments).where(payments.c.idempotency_key == idempotency_key)).first()
        return _payment(row) if row else None

    def add(self, payment: Payment) -> None:
        try:
            self.conn.execute(insert(payments).values(**{**payment.__dict__, "status": payment.status.value}))
        except IntegrityError as error:
            # Two first attempts with one key raced past the lookup (their sources differ, so do their locks).
            if getattr(getattr(error.orig, "diag", None), "constraint_name", None) in KEY_CONSTRAINTS:
                raise IdempotencyConflictError("this idempotency key was used for a different request") from None
            raise

    def settle(self, payment: Payment) -> bool:
        result = self.conn.execute(update(payments).where(
            payments.c.payment_id == payment.payment_id, payments.c.status == PaymentStatus.PENDING.value,
        ).values(status=payment.status.value, reason=payment.reason))
        return result.rowcount == 1

    def sent_on(self, account_id: str, day: dt.date) -> int:
        start = dt.datetime.combine(day, dt.time(), dt.UTC)
        total = self.conn.execute(select(func.coalesce(func.sum(payments.c.amount_minor), 0)).where(
            payments.c.from_account_id == account_id, payments.c.status.in_(SENT),
            payments.c.created_at >= start, payments.c.created_at < start + dt.timedelta(days=1))).scalar_one()
        return int(total)

    def count_since(self, account_id: str, since: dt.datetime) -> int:
        return int(self.conn.execute(select(func.count()).select_from(payments).where(
            payments.c.from_account_id == account_id, payments.c.created_at >= since)).scalar_one())

    def by_id(self, payment_id: str) -> Payment | None:
        row = self.conn.execute(select(payments).where(payments.c.payment_id == payment_id)).first()
        return _payment(row) if row else None

    def initiated_by(self, username: str, limit: int, before: PaymentPlace | None = None) -> list[Payment]:
        query = select(payments).where(payments.c.initiated_by == username)
        if before is not None:
            query = query.where(tuple_(payments.c.created_at, payments.c.payment_id) < tuple_(*before))
        rows = self.conn.execute(query.order_by(payments.c.created_at.desc(), payments.c.payment_id.desc())
                                 .limit(limit)).all()
        return [_payment(row) for row in rows]

    def pending_before(self, cutoff: dt.datetime, limit: int, after: PaymentPlace | None = None) -> list[Payment]:
        query = select(payments).where(payments.c.status == PaymentStatus.PENDING.value,
                                       payments.c.created_at < cutoff)
        if after is not None:
            query = query.where(tuple_(payments.c.created_at, payments.c.payment_id) > tuple_(*after))
        rows = self.conn.execute(query.order_by(payments.c.created_at, payments.c.payment_id).limit(limit)).all()
        return [_payment(row) for row in rows]


@dataclass
class PostgresUnitOfWorkState:
    payments: PostgresPayments
    events: OutboxEventSink


class PostgresUnitOfWork:
    def __init__(self, engine: Engine, outbox: Outbox) -> None:
        self.engine = engine
        self.outbox = outbox

    @contextmanager
    def __call__(self) -> Iterator[PostgresUnitOfWorkState]:
        with self.engine.begin() as conn:
            yield PostgresUnitOfWorkState(PostgresPayments(conn), OutboxEventSink(conn, self.outbox, TOPIC))
