"""Audit records for tests: a plain factory (also used by the PostgreSQL tests) and hypothesis strategies."""

import datetime as dt
import uuid
from dataclasses import replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import strategies as st

from bastion.audit.checkpoints import AUDIT_PRODUCER
from bastion.audit.records import AuditRecord, Decision, RecordKind
from bastion.events.keys import KeyState, SigningKey, TrustStore

BASE_TIME = dt.datetime(2026, 3, 1, 9, 30, tzinfo=dt.UTC)
ORIGIN = "bastion.test/audit"
KEY_ID = "audit/20260301-00000001"
AUDIT_KEY = SigningKey(AUDIT_PRODUCER, KEY_ID, Ed25519PrivateKey.from_private_bytes(bytes(range(32))))


def trust_store(key: SigningKey = AUDIT_KEY, state: KeyState = "active") -> TrustStore:
    """A trust store that knows KEY (the audit test key) only."""
    return TrustStore({key.producer: {key.key_id: (key.private_key.public_key(), state)}})


def sample_record(number: int, kind: str = "event", topic: str = "accounts.events.v1", aggregate: str = "acc-1",
                  principal: str = "alice", decision: str = "allow") -> AuditRecord:
    """Record NUMBER of a test log, unique by (topic, number)."""
    moment = BASE_TIME + dt.timedelta(seconds=number, microseconds=number % 7)
    event = AuditRecord(
        kind=RecordKind.EVENT, topic=topic, partition=number % 3, offset=number, event_id=str(uuid.UUID(int=number)),
        event_type="bastion.accounts.v1.MoneyDeposited", producer="accounts", aggregate_id=aggregate,
        correlation_id=f"corr-{number}", occurred_at=moment, recorded_at=moment + dt.timedelta(milliseconds=40),
        envelope=b"\x0a\x24" + number.to_bytes(8, "big") + b"signed envelope bytes",
    )
    if kind == "access":
        return replace(event, kind=RecordKind.ACCESS, event_type="bastion.access.v1.AccessDecision",
                       principal=principal, action="/bastion.accounts.v1.Accounts/GetAccount",
                       decision=Decision(decision), reason="policy" if decision == "allow" else "not_owner",
                       detail="spiffe://bastion.local/service/gateway")
    if kind == "rejection":
        return replace(event, kind=RecordKind.REJECTION, principal="notifications",
                       action=f"accounts.events.v1/0/{number}", reason="bad_signature",
                       detail="signature does not verify")
    return event


def mixed_records(count: int, start: int = 1, topic: str = "accounts.events.v1") -> list[AuditRecord]:
    """A realistic mix: events over a few accounts, allowed and denied calls, some rejections."""
    records = []
    for number in range(start, start + count):
        if number % 10 == 3:
            records.append(sample_record(number, "access", topic, principal=f"user-{number % 4}",
                                         decision="deny" if number % 20 == 3 else "allow"))
        elif number % 10 == 7:
            records.append(sample_record(number, "rejection", topic))
        else:
            records.append(sample_record(number, "event", topic, aggregate=f"acc-{number % 5}"))
    return records


text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
optional_text = st.none() | text
moments = st.datetimes(min_value=dt.datetime(1970, 1, 1), max_value=dt.datetime(2200, 1, 1),
                       timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=-5, minutes=-30))]))
events = st.builds(
    AuditRecord, kind=st.just(RecordKind.EVENT), topic=text, partition=st.integers(0, 2**31 - 1),
    offset=st.integers(0, 2**63 - 1), event_id=text, event_type=text, producer=text, aggregate_id=text,
    correlation_id=text, occurred_at=moments, recorded_at=moments, envelope=st.binary(max_size=40),
)


@st.composite
def records(draw: st.DrawFn) -> AuditRecord:
    """Any valid record, of any kind."""
    event = replace(draw(events), item=draw(st.none() | st.integers(0, 2**16 - 1)))
    kind = draw(st.sampled_from(RecordKind))
    if kind is RecordKind.ACCESS:
        return replace(event, kind=kind, principal=draw(text), action=draw(text),
                       decision=draw(st.sampled_from(Decision)), reason=draw(optional_text),
                       detail=draw(optional_text))
    if kind is RecordKind.REJECTION:
        return replace(event, kind=kind, principal=draw(optional_text), action=draw(optional_text),
                       reason=draw(text), detail=draw(optional_text))
    return event
