"""The notifications repository on PostgreSQL: the same contract as the in-memory fake, per-recipient sequences
gap-free under concurrent appends (and never visible out of order), and an e-mail column that holds no
plaintext. Each test has its own schema, reached with the notifications service's own database role."""

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, select, text

from bastion.accounts.v1.events_pb2 import AccountOpened
from bastion.devstack.components.postgres import Postgres
from bastion.devstack.context import StackContext
from bastion.events.field_crypto import DataKeyRing, encrypt_field, field_context
from bastion.events.v1.envelope_pb2 import Envelope
from bastion.events.verify import VerifiedEvent
from services.notifications.adapters.at_rest import AtRestCipher
from services.notifications.adapters.postgres import (
    PostgresUnitOfWork,
    consumer_handler,
    create_schema,
    notifications,
    recipients,
)
from services.notifications.handlers import ACCOUNTS_TOPIC, OWNER_EMAIL, NotificationsHandlers, UnitOfWorkFactory
from tests.unit.services.test_notifications_repository import RepositoryContract, append


@pytest.fixture()
def engine(postgres: Postgres, ctx: StackContext, unique: str) -> Iterator[Engine]:
    base = create_engine(
        postgres.sqlalchemy_url("notifications", ctx.credentials.postgres["notifications"], "notifications"),
        pool_size=12, max_overflow=4)
    schema = f"it_notifications_{unique}"
    with base.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    scoped = base.execution_options(schema_translate_map={None: schema})
    create_schema(scoped)
    yield scoped
    with base.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    base.dispose()


class TestPostgresNotifications(RepositoryContract):
    @pytest.fixture()
    def unit_of_work(self, engine: Engine) -> UnitOfWorkFactory:
        return PostgresUnitOfWork(engine)

    @pytest.fixture()
    def user(self, unique: str) -> str:
        return f"user-{unique}"


def test_concurrent_appends_number_each_recipient_without_gaps(engine: Engine, unique: str) -> None:
    unit_of_work = PostgresUnitOfWork(engine)
    users = [f"alice-{unique}", f"bob-{unique}"]
    crashed: list[BaseException] = []
    out_of_order: list[list[int]] = []
    done = threading.Event()

    def writer(seed: int) -> None:
        try:
            for n in range(25):
                append(unit_of_work, users[(seed + n) % 2], f"{seed}-{n}")
        except BaseException as error:  # any failure fails the test below
            crashed.append(error)

    def reader() -> None:
        # A stream resumes after the last sequence it saw: it must never see N+1 before N is visible.
        while not done.is_set():
            with unit_of_work() as uow:
                seen = [n.sequence for n in uow.notifications.after(users[0], 0, 500)]
            if seen != list(range(1, len(seen) + 1)):
                out_of_order.append(seen)

    watcher = threading.Thread(target=reader)
    watcher.start()
    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    done.set()
    watcher.join(30)
    assert not any(t.is_alive() for t in threads), "an append hung"
    assert crashed == [] and out_of_order == []
    with engine.connect() as conn:
        for user in users:
            sequences = conn.execute(select(notifications.c.sequence).where(notifications.c.recipient == user)
                                     .order_by(notifications.c.sequence)).scalars().all()
            assert sequences == list(range(1, 101))


def test_the_email_column_holds_no_plaintext(engine: Engine, unique: str, tmp_path: Path) -> None:
    issuer = DataKeyRing(tmp_path / "data" / "issuer")
    issuer.ensure([ACCOUNTS_TOPIC])
    issuer.export_to(tmp_path / "data" / "notifications", ACCOUNTS_TOPIC)
    cipher = AtRestCipher.generate(tmp_path / "state" / "notifications-at-rest.key")
    handlers = NotificationsHandlers(PostgresUnitOfWork(engine), DataKeyRing(tmp_path / "data" / "notifications"),
                                     cipher)
    owner, account_id, email = f"alice-{unique}", f"acc-{unique}", f"alice.{unique}@bastion.local"
    field = encrypt_field(issuer, ACCOUNTS_TOPIC, field_context(OWNER_EMAIL, account_id), email)
    envelope = Envelope(event_id=str(uuid.uuid4()), event_type="bastion.accounts.v1.AccountOpened",
                        aggregate_id=account_id, sequence=1, topic=ACCOUNTS_TOPIC)
    with engine.begin() as conn:
        consumer_handler(handlers)(conn, VerifiedEvent(envelope, AccountOpened(
            account_id=account_id, owner=owner, currency="EUR", owner_email=field)))

    with engine.connect() as conn:
        row = conn.execute(select(recipients).where(recipients.c.recipient == owner)).one()
        texts = conn.execute(select(notifications.c.text)).scalars().all()
    assert row.email_key_id == cipher.key_id
    assert email.encode() not in bytes(row.email_sealed) and unique.encode() not in bytes(row.email_sealed)
    assert not any(email in t for t in texts)
    assert handlers.email_of(owner) == email
