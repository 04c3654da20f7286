"""PostgreSQL adapters of the accounts ports (SQLAlchemy Core): the repository, the outbox-backed event
sink and the unit of work that gives both one transaction."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Connection,
    DateTime,
    Engine,
    LargeBinary,
    MetaData,
    String,
    Table,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from bastion.events.outbox import Outbox, OutboxEventSink
from bastion.migrations import upgrade
from services.accounts.domain import Account, IdempotencyConflictError
from services.accounts.handlers import TOPIC

UNIQUE_VIOLATION = "23505"  # PostgreSQL's SQLSTATE for a duplicate key

METADATA = MetaData()
accounts = Table(
    "accounts", METADATA,
    Column("account_id", String(36), primary_key=True),
    Column("owner", String(100), nullable=False, index=True),
    Column("currency", String(3), nullable=False),
    Column("balance_minor", BigInteger, nullable=False),
    Column("frozen", Boolean, nullable=False, default=False),
    Column("last_fencing_token", BigInteger, nullable=False, default=0),
    # The database refuses a negative balance even if a code path forgot to check.
    CheckConstraint("balance_minor >= 0", name="balance_never_negative"),
)
idempotency = Table(
    "idempotency_keys", METADATA,
    Column("idempotency_key", String(100), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("response", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)


def create_schema(engine: Engine) -> None:
    """Migrate the accounts database to the latest revision (`services/accounts/migrations`); safe when several
    processes start at once. An engine with `schema_translate_map={None: name}` migrates that schema instead."""
    upgrade(engine, "accounts")


def _account(row: object) -> Account:
    return Account(row.account_id, row.owner, row.currency, row.balance_minor, row.frozen,  # type: ignore[attr-defined]
                   row.last_fencing_token)  # type: ignore[attr-defined]


@dataclass
class PostgresAccounts:
    conn: Connection

    def add(self, account: Account) -> None:
        self.conn.execute(insert(accounts).values(**account.__dict__))

    def get(self, account_id: str) -> Account | None:
        row = self.conn.execute(select(accounts).where(accounts.c.account_id == account_id)).first()
        return _account(row) if row else None

    def lock_in_order(self, account_ids: list[str]) -> dict[str, Account]:
        """Lock each row FOR UPDATE, one by one in sorted id order, so two transfers never deadlock."""
        locked = {}
        for account_id in sorted(account_ids):
            row = self.conn.execute(
                select(accounts).where(accounts.c.account_id == account_id).with_for_update()
            ).first()
            if row:
                locked[account_id] = _account(row)
        return locked

    def save(self, account: Account) -> None:
        self.conn.execute(update(accounts).where(accounts.c.account_id == account.account_id).values(
            balance_minor=account.balance_minor, frozen=account.frozen,
            last_fencing_token=account.last_fencing_token))

    def listed(self, owner: str | None, after: str | None, limit: int) -> list[Account]:
        query = select(accounts)
        if owner is not None:
            query = query.where(accounts.c.owner == owner)
        if after is not None:
            query = query.where(accounts.c.account_id > after)
        return [_account(r) for r in self.conn.execute(query.order_by(accounts.c.account_id).limit(limit))]

    def remembered(self, idempotency_key: str) -> tuple[str, bytes] | None:
        row = self.conn.execute(select(idempotency.c.fingerprint, idempotency.c.response).where(
            idempotency.c.idempotency_key == idempotency_key)).first()
        return (row.fingerprint, bytes(row.response)) if row else None

    def remember(self, idempotency_key: str, fingerprint: str, response: bytes) -> None:
        try:
            self.conn.execute(insert(idempotency).values(idempotency_key=idempotency_key, fingerprint=fingerprint,
                                                         response=response))
        except IntegrityError as error:
            # Taken meanwhile by a request on other rows (the same rows' lock would have shown it): another request.
            if getattr(error.orig, "sqlstate", None) == UNIQUE_VIOLATION:
                raise IdempotencyConflictError("this idempotency key was used for a different request") from None
            raise


@dataclass
class PostgresUnitOfWorkState:
    accounts: PostgresAccounts
    events: OutboxEventSink


class PostgresUnitOfWork:
    def __init__(self, engine: Engine, outbox: Outbox) -> None:
        self.engine = engine
        self.outbox = outbox

    @contextmanager
    def __call__(self) -> Iterator[PostgresUnitOfWorkState]:
        with self.engine.begin() as conn:
            yield PostgresUnitOfWorkState(PostgresAccounts(conn), OutboxEventSink(conn, self.outbox, TOPIC))
