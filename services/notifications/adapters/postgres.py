"""PostgreSQL adapters of the notifications ports (SQLAlchemy Core): the repository, the unit of work, and the
handler the verifying consumer calls with its own transaction's connection."""

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
    Identity,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    delete,
    insert,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import insert as upsert

from bastion.events.consumer import Handler
from bastion.events.verify import VerifiedEvent
from bastion.migrations import upgrade
from services.notifications.domain import Draft, Notification, SealedEmail
from services.notifications.handlers import NotificationsHandlers

METADATA = MetaData()
notifications = Table(
    "notifications", METADATA,
    Column("notification_id", String(36), primary_key=True),
    Column("recipient", String(100), nullable=False),
    Column("sequence", BigInteger, nullable=False),
    Column("kind", String(40), nullable=False),
    Column("text", String(1000), nullable=False),
    Column("event_id", String(36), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Also the index the stream reads by: a recipient's notifications after a sequence.
    UniqueConstraint("recipient", "sequence", name="one_notification_per_sequence"),
)
account_owners = Table(
    "account_owners", METADATA,
    Column("account_id", String(36), primary_key=True),
    Column("owner", String(100), nullable=False),
)
# Drafts for the owner of an account whose AccountOpened has not arrived yet (it travels in another partition).
deferred_notifications = Table(
    "deferred_notifications", METADATA,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("account_id", String(36), nullable=False, index=True),
    Column("kind", String(40), nullable=False),
    Column("text", String(1000), nullable=False),
    Column("event_id", String(36), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
recipients = Table(
    "recipients", METADATA,
    Column("recipient", String(100), primary_key=True),
    # The recipient's last notification sequence: the row lock on it orders concurrent appends.
    Column("last_sequence", BigInteger, nullable=False),
    # nonce || AES-GCM ciphertext of the address, bound to this recipient; the key lives outside the database.
    Column("email_key_id", String(100)),
    Column("email_sealed", LargeBinary),
    CheckConstraint("(email_key_id IS NULL) = (email_sealed IS NULL)", name="sealed_email_names_its_key"),
)


def create_schema(engine: Engine) -> None:
    """Migrate the notifications database to the latest revision (`services/notifications/migrations`); safe
    when several processes start at once. An engine with `schema_translate_map={None: name}` migrates that schema
    instead."""
    upgrade(engine, "notifications")


def _notification(row: object) -> Notification:
    return Notification(row.notification_id, row.recipient, row.sequence, row.kind,  # type: ignore[attr-defined]
                        row.text, row.created_at, row.event_id)  # type: ignore[attr-defined]


@dataclass
class PostgresNotifications:
    conn: Connection

    def remember_owner(self, account_id: str, owner: str) -> None:
        self._lock_account(account_id)
        statement = upsert(account_owners).values(account_id=account_id, owner=owner)
        self.conn.execute(statement.on_conflict_do_nothing(index_elements=[account_owners.c.account_id]))

    def _lock_account(self, account_id: str) -> None:
        """Serialise, until commit, a consumer deferring a draft for ACCOUNT_ID with one recording its owner: the
        later of the two then sees the other's work (READ COMMITTED), so no draft waits for ever."""
        self.conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
                          {"key": f"notifications.account-owner:{account_id}"})

    def defer(self, draft: Draft, event_id: str, created_at: dt.datetime) -> str | None:
        self._lock_account(draft.account_id)
        owner = self.owners_of([draft.account_id]).get(draft.account_id)
        if owner is not None:
            return owner
        self.conn.execute(insert(deferred_notifications).values(
            account_id=draft.account_id, kind=draft.kind, text=draft.text, event_id=event_id, created_at=created_at))
        return None

    def take_deferred(self, account_id: str) -> list[tuple[Draft, str]]:
        rows = self.conn.execute(delete(deferred_notifications).where(
            deferred_notifications.c.account_id == account_id).returning(
            deferred_notifications.c.id, deferred_notifications.c.kind, deferred_notifications.c.text,
            deferred_notifications.c.event_id)).all()
        return [(Draft("", row.kind, row.text, account_id), row.event_id) for row in sorted(rows, key=lambda r: r.id)]

    def owners_of(self, account_ids: list[str]) -> dict[str, str]:
        rows = self.conn.execute(select(account_owners).where(account_owners.c.account_id.in_(account_ids)))
        return {row.account_id: row.owner for row in rows}

    def save_email(self, recipient: str, sealed: SealedEmail) -> None:
        statement = upsert(recipients).values(recipient=recipient, last_sequence=0, email_key_id=sealed.key_id,
                                              email_sealed=sealed.blob)
        self.conn.execute(statement.on_conflict_do_update(
            index_elements=[recipients.c.recipient],
            set_={"email_key_id": statement.excluded.email_key_id, "email_sealed": statement.excluded.email_sealed}))

    def email_of(self, recipient: str) -> SealedEmail | None:
        row = self.conn.execute(select(recipients.c.email_key_id, recipients.c.email_sealed).where(
            recipients.c.recipient == recipient)).first()
        if row is None or row.email_key_id is None:
            return None
        return SealedEmail(row.email_key_id, bytes(row.email_sealed))

    def append(self, draft: Draft, notification_id: str, event_id: str, created_at: dt.datetime) -> Notification:
        """The upsert takes the recipient row's lock until commit: a concurrent append for the same recipient
        waits, then numbers after it, so sequence N+1 never becomes visible before N."""
        statement = upsert(recipients).values(recipient=draft.recipient, last_sequence=1)
        sequence: int = self.conn.execute(statement.on_conflict_do_update(
            index_elements=[recipients.c.recipient], set_={"last_sequence": recipients.c.last_sequence + 1},
        ).returning(recipients.c.last_sequence)).scalar_one()
        notification = Notification(notification_id, draft.recipient, sequence, draft.kind, draft.text, created_at,
                                    event_id)
        self.conn.execute(insert(notifications).values(**notification.__dict__))
        return notification

    def after(self, recipient: str, after_sequence: int, limit: int) -> list[Notification]:
        return [_notification(r) for r in self.conn.execute(
            select(notifications).where(notifications.c.recipient == recipient,
                                        notifications.c.sequence > after_sequence)
            .order_by(notifications.c.sequence).limit(limit))]


@dataclass
class PostgresUnitOfWorkState:
    notifications: PostgresNotifications


class PostgresUnitOfWork:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextmanager
    def __call__(self) -> Iterator[PostgresUnitOfWorkState]:
        with self.engine.begin() as conn:
            yield PostgresUnitOfWorkState(PostgresNotifications(conn))


def consumer_handler(handlers: NotificationsHandlers) -> Handler:
    """The VerifyingConsumer handler: the event's effect joins the consumer's transaction (with the inbox row)."""

    def handle(conn: Connection, event: VerifiedEvent) -> None:
        handlers.on_event(PostgresUnitOfWorkState(PostgresNotifications(conn)), event)

    return handle
