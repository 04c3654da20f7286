"""The address a customer gives when opening an account, through the running services: accounts seals it for
the topic's entitled reader, notifications alone reads it and keeps it sealed at rest, and neither the Kafka record
nor the audit log ever holds it in clear. A malformed address is refused and opens nothing. The topic's data key
rotated and retired on the running platform (`bastion keys data`)."""

import time
import uuid
from typing import Any

import grpc
import pytest
from sqlalchemy import create_engine, select

from bastion.accounts.v1 import events_pb2 as account_events
from bastion.audit.install_tools import audit_engine
from bastion.audit.postgres import log as audit_log
from bastion.devstack.components.postgres import Postgres
from bastion.devstack.context import StackContext
from bastion.events.field_crypto import DataKeyRing, NotEntitledError, decrypt_field, field_context
from services.accounts.handlers import OWNER_EMAIL
from services.notifications.adapters.at_rest import AtRestCipher
from services.notifications.domain import SealedEmail
from tests.integration.bank import Bank, signed_events
from tests.integration.conftest import bastion

TOPIC = "accounts.events.v1"
WIDE = {"COLUMNS": "400"}


@pytest.fixture(scope="module")
def bank(stack: Any, ctx: StackContext) -> Bank:
    return Bank.connect(ctx)


def sealed_row(ctx: StackContext, recipient: str) -> SealedEmail | None:
    engine = create_engine(Postgres(ctx).sqlalchemy_url("notifications", ctx.credentials.postgres["notifications"],
                                                        "notifications"))
    try:
        with engine.connect() as conn:
            row = conn.exec_driver_sql("SELECT email_key_id, email_sealed FROM recipients WHERE recipient = %s",
                                       (recipient,)).first()
    finally:
        engine.dispose()
    return None if row is None or row[0] is None else SealedEmail(str(row[0]), bytes(row[1]))


def test_the_address_travels_sealed_and_only_notifications_reads_it(bank: Bank, ctx: StackContext) -> None:
    address = f"carol.{uuid.uuid4().hex[:10]}@example.com"
    account = bank.open_account("bob", notification_email=address)
    [event] = signed_events(ctx, [TOPIC], lambda e: e.envelope.aggregate_id == account
                            and isinstance(e.payload, account_events.AccountOpened), count=1)
    assert address.encode() not in event.envelope.SerializeToString()
    sealed = event.payload.owner_email
    assert sealed.key_id.startswith(f"{TOPIC}/") and sealed.ciphertext
    context = field_context(OWNER_EMAIL, account)
    assert decrypt_field(DataKeyRing(ctx.layout.data_keys_dir / "notifications"), TOPIC, context, sealed) == address
    for not_a_reader in ("audit", "payments"):
        with pytest.raises(NotEntitledError):
            decrypt_field(DataKeyRing(ctx.layout.data_keys_dir / not_a_reader), TOPIC, context, sealed)

    cipher = AtRestCipher(ctx.layout.at_rest_key("notifications"))
    deadline = time.monotonic() + 30
    while (row := sealed_row(ctx, "bob")) is None or cipher.decrypt(row, "bob") != address:
        assert time.monotonic() < deadline, "notifications never kept bob's new address"
        time.sleep(0.3)
    assert address.encode() not in row.blob

    deadline = time.monotonic() + 30
    with audit_engine(ctx).connect() as conn:
        while not (rows := conn.execute(select(audit_log).where(audit_log.c.aggregate_id == account)).all()):
            assert time.monotonic() < deadline, "the audit log never recorded the account"
            time.sleep(0.3)
    for row in rows:
        assert all(address.encode() not in (value if isinstance(value, bytes) else str(value).encode())
                   for value in row if value is not None), f"seq {row.seq} holds the address"


def test_a_rotated_data_key_seals_the_next_address_and_retiring_the_old_one_shreds_what_it_sealed(
        bank: Bank, ctx: StackContext) -> None:
    """`bastion keys data` on the running platform: no service restarts, notifications reads the address sealed
    under the new key, and once the old key is retired nobody can open what it sealed (crypto-shredding). The key
    retired is one this test made, so what other tests sealed under the install's first key stays readable."""
    reader = DataKeyRing(ctx.layout.data_keys_dir / "notifications")
    made = bastion("keys", "data", "rotate", TOPIC, env=WIDE)
    assert made.returncode == 0, made.stderr
    before = f"dora.{uuid.uuid4().hex[:10]}@example.com"
    first = bank.open_account("bob", notification_email=before)
    [opened] = signed_events(ctx, [TOPIC], lambda e: e.envelope.aggregate_id == first
                             and isinstance(e.payload, account_events.AccountOpened), count=1)
    old = opened.payload.owner_email.key_id
    assert old in made.stdout
    rotated = bastion("keys", "data", "rotate", TOPIC, env=WIDE)
    assert rotated.returncode == 0, rotated.stderr

    after = f"erin.{uuid.uuid4().hex[:10]}@example.com"
    second = bank.open_account("bob", notification_email=after)
    [reopened] = signed_events(ctx, [TOPIC], lambda e: e.envelope.aggregate_id == second
                               and isinstance(e.payload, account_events.AccountOpened), count=1)
    new = reopened.payload.owner_email.key_id
    assert new != old and new in rotated.stdout
    cipher = AtRestCipher(ctx.layout.at_rest_key("notifications"))
    deadline = time.monotonic() + 30
    while (row := sealed_row(ctx, "bob")) is None or cipher.decrypt(row, "bob") != after:
        assert time.monotonic() < deadline, "notifications never read the address sealed under the new key"
        time.sleep(0.3)

    retired = bastion("keys", "data", "retire", TOPIC, old, env=WIDE)
    assert retired.returncode == 0, retired.stderr
    context = field_context(OWNER_EMAIL, first)
    for holder in ("issuer", "accounts", "notifications"):
        with pytest.raises(NotEntitledError):
            decrypt_field(DataKeyRing(ctx.layout.data_keys_dir / holder), TOPIC, context, opened.payload.owner_email)
    assert decrypt_field(reader, TOPIC, field_context(OWNER_EMAIL, second), reopened.payload.owner_email) == after


@pytest.mark.parametrize("address", ["bob", "bob@@example.com", "bob@localhost", "b\u00f6b@example.com"])
def test_a_malformed_address_is_invalid_argument_and_opens_nothing(bank: Bank, address: str) -> None:
    before = len(bank.accounts_of("bob"))
    with pytest.raises(grpc.RpcError) as refusal:
        bank.open_account("bob", notification_email=address)
    assert refusal.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "notification_email is not an e-mail address" in (refusal.value.details() or "")
    assert len(bank.accounts_of("bob")) == before
