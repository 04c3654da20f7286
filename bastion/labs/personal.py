"""Personal-data lab: an insider with the Kafka admin's credentials, the audit database and notifications'
database reads what bob gave when he opened an account. The address travels and rests only as ciphertext:
sealed by accounts under the topic's data key, which only notifications holds (infra/personal-data.yaml), and
kept by notifications sealed again under an at-rest key outside its database."""

import time
import uuid
from collections.abc import Iterator
from typing import Any

from sqlalchemy import create_engine, select

from bastion.accounts.v1.events_pb2 import AccountOpened
from bastion.audit.postgres import log as audit_log
from bastion.devstack.components.postgres import Postgres
from bastion.labs.bank import Bank
from bastion.labs.base import Evidence
from bastion.labs.events import ACCOUNTS_TOPIC, first_event
from bastion.labs.platform import LabSetupError, Session, TopicTail, new_correlation_id

LAB = "insider-reads-personal-data"
OPENED = str(AccountOpened.DESCRIPTOR.full_name)


def insider_reads_personal_data(session: Session) -> Iterator[Evidence]:
    address = f"bob.{uuid.uuid4().hex[:10]}@example.com"
    secret = address.encode()
    notifications = create_engine(Postgres(session.ctx).sqlalchemy_url(
        "notifications", session.ctx.credentials.postgres["notifications"], "notifications"))
    try:
        sealed_before = _sealed_address(notifications, "bob")
        tail = TopicTail(session, ACCOUNTS_TOPIC)
        try:
            account = Bank(session, LAB).open_account("bob", correlation_id=new_correlation_id(LAB),
                                                      notification_email=address)
            record, _, envelope = first_event(tail, account, OPENED, session.target.verdict_wait_seconds)
        finally:
            tail.close()
        opened = AccountOpened.FromString(envelope.payload)
        yield Evidence("bob opens an account", f"{account}, to be told at {address}")
        yield in_clear_or_sealed(f"Kafka, {ACCOUNTS_TOPIC} read as the broker's admin", record, secret,
                                 f"the AccountOpened record ({len(record)} bytes) holds no trace of it: owner_email is "
                                 f"{len(opened.owner_email.ciphertext)} bytes of AES-256-GCM under data key "
                                 f"{opened.owner_email.key_id}")
        sealed_after = _sealed_address(notifications, "bob", other_than=sealed_before,
                                       wait_seconds=session.target.verdict_wait_seconds)
        if sealed_after is None:
            raise LabSetupError("notifications did not take bob's new address: the lab cannot tell where it rests")
        yield Evidence("notifications, the entitled reader (calibration)", "took bob's new address")
        key_id, blob = sealed_after
        yield in_clear_or_sealed("notifications' database read with its own credentials", blob, secret,
                                 f"recipients.email_sealed is {len(blob)} bytes under at-rest key {key_id}, held "
                                 "outside the database: not in clear")
        yield _audit_log(session, account, secret)
    finally:
        notifications.dispose()


def in_clear_or_sealed(what: str, found: bytes, secret: bytes, sealed: str) -> Evidence:
    """What an insider read at WHAT: the attack got through if SECRET is in FOUND as text (UTF-8 or UTF-16, any
    case) or as hex."""
    forms = {secret, secret.hex().encode(), secret.decode().encode("utf-16-le")}
    found = found.lower()
    if any(form in found for form in forms):
        return Evidence(what, "the address, readable", False)
    return Evidence(what, sealed, True)


def _audit_log(session: Session, account: str, secret: bytes) -> Evidence:
    deadline = time.monotonic() + session.target.verdict_wait_seconds
    while True:
        with session.audit_engine().connect() as conn:
            rows = conn.execute(select(audit_log).where(audit_log.c.aggregate_id == account)).all()
        if rows or time.monotonic() >= deadline:
            break
        time.sleep(0.3)
    if not rows:
        raise LabSetupError(f"the audit log holds no record of account {account} after "
                            f"{session.target.verdict_wait_seconds:g}s: the lab cannot tell what it keeps")
    leaked = [row.seq for row in rows if any(secret in (value if isinstance(value, bytes) else str(value).encode())
                                             for value in row if value is not None)]
    return Evidence("the audit log, read as the audit role",
                    f"seq {', '.join(map(str, leaked))} hold the address in clear" if leaked else
                    f"{len(rows)} record(s) of the account, none holds the address: audit is no reader of the "
                    "data key and keeps ciphertext for good", not leaked)


def _sealed_address(engine: Any, recipient: str, other_than: tuple[str, bytes] | None = None,
                    wait_seconds: float = 0.0) -> tuple[str, bytes] | None:
    """RECIPIENT's sealed address as notifications keeps it (key id, blob), once it differs from OTHER_THAN (waiting
    up to WAIT_SECONDS); None if there is none (yet)."""
    deadline = time.monotonic() + wait_seconds
    while True:
        with engine.connect() as conn:
            row = conn.exec_driver_sql("SELECT email_key_id, email_sealed FROM recipients WHERE recipient = %s",
                                       (recipient,)).first()
        found = None if row is None or row[0] is None else (str(row[0]), bytes(row[1]))
        if (found is not None and found != other_than) or time.monotonic() >= deadline:
            return found if found != other_than else None
        time.sleep(0.3)
