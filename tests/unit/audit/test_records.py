"""The audit record and its canonical bytes: pinned by a test vector, deterministic, UTC, and strict about
what it accepts."""

import datetime as dt
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.audit.chain import GENESIS_HASH, RECORD_TAG, record_hash
from bastion.audit.errors import InvalidRecordError
from bastion.audit.records import AuditRecord, Decision, RecordKind, canonical_bytes
from tests.unit.audit.samples import records, sample_record

VECTOR = json.loads((Path(__file__).parent / "vector-v1.json").read_text(encoding="utf-8"))


def vector_record() -> AuditRecord:
    fields = dict(VECTOR["record"])
    return AuditRecord(
        **{name: value for name, value in fields.items()
           if name not in ("kind", "decision", "occurred_at", "recorded_at", "envelope_hex")},
        kind=RecordKind(fields["kind"]), decision=Decision(fields["decision"]),
        occurred_at=dt.datetime.fromisoformat(fields["occurred_at"]),
        recorded_at=dt.datetime.fromisoformat(fields["recorded_at"]),
        envelope=bytes.fromhex(fields["envelope_hex"]),
    )


def test_the_vector_pins_the_canonical_bytes_and_the_chain_hashes() -> None:
    record = vector_record()
    canonical = canonical_bytes(record)
    assert canonical == VECTOR["canonical"].encode("utf-8")
    # The documented formula, written out independently of record_hash.
    first = hashlib.sha256(RECORD_TAG + (1).to_bytes(8, "big") + bytes(32) + canonical).digest()
    second = hashlib.sha256(RECORD_TAG + (2).to_bytes(8, "big") + first + canonical).digest()
    assert first.hex() == VECTOR["hash_seq_1_hex"] == record_hash(1, GENESIS_HASH, record).hex()
    assert second.hex() == VECTOR["hash_seq_2_hex"] == record_hash(2, first, record).hex()


def test_canonical_bytes_follow_the_stated_rules() -> None:
    canonical = VECTOR["canonical"]
    document = json.loads(canonical)
    assert list(document) == sorted(document), "keys sorted"
    assert json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False) == canonical
    assert document["occurred_at"] == "2026-03-01T08:30:05.000600Z", "UTC, six fractional digits, Z"
    assert document["envelope"] == "CiQwYjZmMmE0ZS01ZDBj", "bytes as standard base64"
    assert document["detail"] is None and "zoë" in document["principal"], "absent as null, UTF-8 as itself"


@given(records(), st.integers(-12 * 60, 14 * 60))
def test_canonical_bytes_do_not_depend_on_the_time_zone_given(record: AuditRecord, minutes: int) -> None:
    zone = dt.timezone(dt.timedelta(minutes=minutes))
    moved = replace(record, occurred_at=record.occurred_at.astimezone(zone),
                    recorded_at=record.recorded_at.astimezone(zone))
    assert canonical_bytes(moved) == canonical_bytes(record)


@given(records(), records())
def test_two_records_have_the_same_canonical_bytes_only_if_they_are_equal(first: AuditRecord,
                                                                          second: AuditRecord) -> None:
    assert (canonical_bytes(first) == canonical_bytes(second)) == (first == second)


@given(records())
def test_canonical_bytes_are_json_that_round_trips(record: AuditRecord) -> None:
    canonical = canonical_bytes(record)
    document = json.loads(canonical.decode("utf-8"))
    assert json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() == canonical
    assert document["kind"] == record.kind.value and document["offset"] == record.offset


NAIVE = dt.datetime(2026, 3, 1, 9, 30)


@pytest.mark.parametrize(("change", "message"), [
    ({"occurred_at": NAIVE}, "time zone"),
    ({"recorded_at": NAIVE}, "time zone"),
    ({"producer": "acc\x00ounts"}, "NUL"),
    ({"aggregate_id": "\ud800"}, "surrogate"),
    ({"partition": -1}, "out of range"),
    ({"offset": 2**63}, "out of range"),
    ({"item": -1}, "item -1 out of range"),
    ({"item": 2**16}, "out of range"),
    ({"item": True}, "out of range"),
    ({"decision": Decision.ALLOW}, "no decision"),
    ({"kind": "event"}, "RecordKind"),
    ({"kind": RecordKind.ACCESS}, "principal, action and decision"),
    ({"kind": RecordKind.REJECTION}, "reason"),
])
def test_a_record_that_cannot_be_stored_is_refused_when_built(change: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRecordError, match=message):
        replace(sample_record(1), **change)  # type: ignore[arg-type]


def test_item_is_written_only_for_an_envelope_of_a_bundle() -> None:
    """Records stored before bundles keep their canonical bytes (and so every stored hash): `item` appears only
    when set, and then it is covered like every other field."""
    alone = sample_record(7)
    assert "item" not in json.loads(canonical_bytes(alone))
    first, second = replace(alone, item=0), replace(alone, item=1)
    assert json.loads(canonical_bytes(first))["item"] == 0
    assert len({canonical_bytes(alone), canonical_bytes(first), canonical_bytes(second)}) == 3


@pytest.mark.parametrize(("kind", "change", "message"), [
    ("event", {"envelope": "signed envelope bytes"}, "envelope must be bytes"),
    ("event", {"topic": 5}, "topic must be text"),
    ("event", {"event_id": b"id"}, "event_id must be text"),
    ("access", {"detail": "spiffe://x\x00"}, "detail contains a NUL"),
    ("access", {"reason": "\ud800"}, "reason is not valid Unicode"),
    ("rejection", {"action": "accounts.events.v1/0/1\x00"}, "action contains a NUL"),
    ("access", {"principal": None}, "principal, action and decision"),
    ("access", {"action": None}, "principal, action and decision"),
])
def test_every_field_a_record_stores_is_checked_when_built(kind: str, change: dict[str, object],
                                                           message: str) -> None:
    """Optional text fields (principal, action, reason, detail) follow the same rules as the others: PostgreSQL
    text cannot hold NUL, and a value that is not text would hash differently from what is read back."""
    with pytest.raises(InvalidRecordError, match=message):
        replace(sample_record(1, kind), **change)  # type: ignore[arg-type]


def test_the_envelope_is_standard_base64_with_padding() -> None:
    """A verifier in another language decodes with standard base64: '+' and '/', never '-' and '_'."""
    record = replace(sample_record(1), envelope=b"\xfb\xff\xbf")
    assert json.loads(canonical_bytes(record))["envelope"] == "+/+/"
    record = replace(sample_record(1), envelope=b"\xfb\xff")
    assert json.loads(canonical_bytes(record))["envelope"] == "+/8="
