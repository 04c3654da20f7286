"""The payments repository's SQL (services/payments/adapters/postgres.py) without a database server: the repository
contract on SQLite, the table's own checks, and which unique violations are taken for a reused idempotency key (the
same contract runs on PostgreSQL in tests/integration/test_payments_postgres.py)."""

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import Connection, create_engine, insert
from sqlalchemy.exc import IntegrityError

from bastion.payments.v1.events_pb2 import PaymentCompleted
from services.payments.adapters.postgres import METADATA, PostgresPayments, PostgresUnitOfWork, payments
from services.payments.domain import IdempotencyConflictError, Payment
from services.payments.handlers import TOPIC, PaymentsRepository
from tests.unit.services.test_payments_repository import PaymentsRepositoryContract, payment


def on_utc(found: Any) -> Any:
    if isinstance(found, Payment):
        return Payment(**{**found.__dict__, "created_at": found.created_at.replace(tzinfo=dt.UTC)})
    if isinstance(found, list):
        return [on_utc(item) for item in found]
    return found


class ReadAsUtc:
    """PostgresPayments on SQLite, which keeps no time zone: the times it reads back are UTC, as they were written
    (PostgreSQL's `timestamptz` gives them back with their zone)."""

    def __init__(self, inner: PostgresPayments) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.inner, name)
        return lambda *args, **kwargs: on_utc(method(*args, **kwargs))


@pytest.fixture()
def conn() -> Iterator[Connection]:
    engine = create_engine("sqlite://")
    METADATA.create_all(engine)
    with engine.connect() as conn:
        yield conn
    engine.dispose()


class TestPostgresPaymentsOnSqlite(PaymentsRepositoryContract):
    @pytest.fixture()
    def repository(self, conn: Connection) -> Iterator[PaymentsRepository]:
        yield ReadAsUtc(PostgresPayments(conn))  # type: ignore[misc]

    def test_a_second_payment_with_the_same_key_conflicts(self, repository: PaymentsRepository) -> None:
        """SQLite's errors name no constraint (psycopg's carry `diag.constraint_name`): the row is refused all the
        same, and the error is not taken for a reused key (the next tests give it the names PostgreSQL gives)."""
        repository.add(payment("key-contract-1"))
        with pytest.raises(IntegrityError):
            repository.add(payment("key-contract-1", amount=200))


@pytest.mark.parametrize(("column", "value"), [("amount_minor", 0), ("amount_minor", -5),
                                               ("to_account_id", "acc-1"), ("status", "REFUNDED")])
def test_the_table_itself_refuses_a_payment_no_handler_would_make(conn: Connection, column: str, value: object
                                                                  ) -> None:
    row = {**payment("key-table").__dict__, "status": "PENDING", column: value}
    with pytest.raises(IntegrityError):
        conn.execute(insert(payments).values(**row))


def test_the_table_itself_refuses_a_second_row_with_a_key(conn: Connection) -> None:
    first = {**payment("key-table").__dict__, "status": "PENDING"}
    conn.execute(insert(payments).values(**first))
    with pytest.raises(IntegrityError):
        conn.execute(insert(payments).values(**{**first, "payment_id": "another-id"}))


class Refusing:
    """A connection whose insert fails as PostgreSQL fails it: a unique violation naming CONSTRAINT."""

    def __init__(self, constraint: str | None) -> None:
        self.constraint = constraint

    def execute(self, _statement: object) -> None:
        orig = Exception("duplicate key value violates unique constraint")
        orig.diag = SimpleNamespace(constraint_name=self.constraint)  # type: ignore[attr-defined]
        raise IntegrityError("INSERT INTO payments ...", {}, orig)


@pytest.mark.parametrize("constraint", ["payments_idempotency_key", "payments_pkey"])
def test_a_reused_key_or_the_payment_id_made_from_it_is_an_idempotency_conflict(constraint: str) -> None:
    with pytest.raises(IdempotencyConflictError):
        PostgresPayments(Refusing(constraint)).add(payment("key-raced"))  # type: ignore[arg-type]


@pytest.mark.parametrize("constraint", ["payments_amount_positive", "payments_distinct_accounts", None])
def test_any_other_refusal_of_the_row_is_not_taken_for_a_reused_key(constraint: str | None) -> None:
    with pytest.raises(IntegrityError) as refused:
        PostgresPayments(Refusing(constraint)).add(payment("key-raced"))  # type: ignore[arg-type]
    assert not isinstance(refused.value, IdempotencyConflictError)


class Outbox:
    producer = "payments"

    def __init__(self) -> None:
        self.appended: list[tuple[object, str]] = []

    def append(self, conn: object, topic: str, *_args: object, **_kwargs: object) -> None:
        self.appended.append((conn, topic))


class Engine:
    """Hands out one connection, in a transaction that commits only when the work ends without an error."""

    def __init__(self) -> None:
        self.committed: list[bool] = []

    @contextmanager
    def begin(self) -> Iterator[object]:
        try:
            yield "the-connection"
        except BaseException:
            self.committed.append(False)
            raise
        self.committed.append(True)


def test_the_unit_of_work_gives_the_repository_and_the_payments_topic_one_transaction() -> None:
    engine, outbox = Engine(), Outbox()
    with PostgresUnitOfWork(engine, outbox)() as uow:  # type: ignore[arg-type]
        assert uow.payments.conn == "the-connection"
        uow.events.emit(PaymentCompleted(payment_id="p-1"), "p-1")
    assert outbox.appended == [("the-connection", TOPIC)] and engine.committed == [True]
    with pytest.raises(RuntimeError), PostgresUnitOfWork(engine, outbox)():  # type: ignore[arg-type]
        raise RuntimeError("the handler failed")
    assert engine.committed == [True, False]

