"""Field encryption: only a ring holding the topic's data key reads a field, and only in its own place."""

import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.events.field_crypto import (
    DataKeyError,
    DataKeyRing,
    FieldIntegrityError,
    NotEntitledError,
    associated_data,
    decrypt_field,
    encrypt_field,
    field_context,
    reveal,
)
from bastion.events.v1.envelope_pb2 import EncryptedField

TOPIC = "accounts.events.v1"
OTHER_TOPIC = "payments.events.v1"
EMAIL = "bastion.accounts.v1.AccountOpened.owner_email"
CONTEXT = field_context(EMAIL, "a1")


@pytest.fixture()
def ring(tmp_path: Path) -> DataKeyRing:
    ring = DataKeyRing(tmp_path / "producer")
    ring.ensure([TOPIC, OTHER_TOPIC])
    return ring


def copy(field: EncryptedField, **changes: object) -> EncryptedField:
    moved = EncryptedField()
    moved.CopyFrom(field)
    for name, value in changes.items():
        setattr(moved, name, value)
    return moved


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=50)
@given(plaintext=st.text())
def test_round_trip_of_arbitrary_text(ring: DataKeyRing, plaintext: str) -> None:
    field = encrypt_field(ring, TOPIC, CONTEXT, plaintext)
    assert field.key_id == ring.active(TOPIC)[0]
    assert decrypt_field(ring, TOPIC, CONTEXT, field) == plaintext


def test_the_wire_carries_no_plaintext(ring: DataKeyRing) -> None:
    plaintext = "alice@example.org"
    field = encrypt_field(ring, TOPIC, CONTEXT, plaintext)
    assert plaintext.encode() not in field.SerializeToString()
    assert len(field.nonce) == 12
    assert field.nonce != encrypt_field(ring, TOPIC, CONTEXT, plaintext).nonce


def test_a_reader_without_the_key_is_not_entitled(ring: DataKeyRing, tmp_path: Path) -> None:
    field = encrypt_field(ring, TOPIC, CONTEXT, "alice@example.org")
    audit = DataKeyRing(tmp_path / "audit")
    with pytest.raises(NotEntitledError):
        decrypt_field(audit, TOPIC, CONTEXT, field)
    assert reveal(audit, TOPIC, CONTEXT, field) is None
    assert reveal(None, TOPIC, CONTEXT, field) is None
    assert reveal(ring, TOPIC, CONTEXT, field) == "alice@example.org"


@pytest.mark.parametrize("change", ["ciphertext", "nonce"])
def test_tampering_fails_authentication(ring: DataKeyRing, change: str) -> None:
    field = encrypt_field(ring, TOPIC, CONTEXT, "alice@example.org")
    original: bytes = getattr(field, change)
    tampered = copy(field, **{change: bytes([original[0] ^ 1]) + original[1:]})
    with pytest.raises(FieldIntegrityError):
        decrypt_field(ring, TOPIC, CONTEXT, tampered)
    with pytest.raises(FieldIntegrityError):
        reveal(ring, TOPIC, CONTEXT, tampered)


@pytest.mark.parametrize("bad", [{"nonce": b"short"}, {"ciphertext": b""}, {"key_id": f"{TOPIC}/../../etc"},
                                 {"key_id": f"{TOPIC}/20261127-0a1b2c3d\n"}])
def test_malformed_fields_are_refused(ring: DataKeyRing, bad: dict[str, object]) -> None:
    field = encrypt_field(ring, TOPIC, CONTEXT, "alice@example.org")
    with pytest.raises(FieldIntegrityError):
        decrypt_field(ring, TOPIC, CONTEXT, copy(field, **bad))


@pytest.mark.parametrize(
    ("topic", "context"),
    [
        (TOPIC, field_context(EMAIL, "a2")),
        (TOPIC, field_context("bastion.accounts.v1.AccountOpened.owner", "a1")),
        (OTHER_TOPIC, CONTEXT),
    ],
    ids=["another-aggregate", "another-field", "another-topic"],
)
def test_a_ciphertext_moved_elsewhere_does_not_decrypt(ring: DataKeyRing, topic: str, context: str) -> None:
    field = encrypt_field(ring, TOPIC, CONTEXT, "alice@example.org")
    with pytest.raises(FieldIntegrityError):
        decrypt_field(ring, topic, context, field)


def test_relabelling_the_key_id_of_a_moved_ciphertext_does_not_help(ring: DataKeyRing) -> None:
    field = encrypt_field(ring, TOPIC, CONTEXT, "alice@example.org")
    relabelled = copy(field, key_id=ring.active(OTHER_TOPIC)[0])
    with pytest.raises(FieldIntegrityError):
        decrypt_field(ring, OTHER_TOPIC, CONTEXT, relabelled)


def test_the_aad_is_length_prefixed_so_parts_cannot_shift() -> None:
    assert associated_data("a.b", "c", "k") != associated_data("a", "b.c", "k")
    assert associated_data("t", "x@a", "k").startswith(b"bastion.events.v1.EncryptedField\x00\x00\x00\x00\x01t")


def test_rotation_keeps_old_fields_readable_and_encrypts_under_the_new_key(ring: DataKeyRing) -> None:
    old_id = ring.active(TOPIC)[0]
    old = encrypt_field(ring, TOPIC, CONTEXT, "alice@example.org")
    new_id = ring.rotate(TOPIC)
    assert new_id != old_id and new_id.startswith(f"{TOPIC}/")
    assert ring.states(TOPIC) == {old_id: "decrypt-only", new_id: "active"}
    assert decrypt_field(ring, TOPIC, CONTEXT, old) == "alice@example.org"
    new = encrypt_field(ring, TOPIC, CONTEXT, "alice@example.org")
    assert new.key_id == new_id
    assert decrypt_field(ring, TOPIC, CONTEXT, new) == "alice@example.org"


def test_a_retired_key_no_longer_decrypts(ring: DataKeyRing) -> None:
    old = encrypt_field(ring, TOPIC, CONTEXT, "alice@example.org")
    ring.rotate(TOPIC)
    ring.retire(TOPIC, old.key_id)
    assert ring.get(TOPIC, old.key_id) is None
    assert ring.states(TOPIC)[old.key_id] == "retired"
    with pytest.raises(NotEntitledError):
        decrypt_field(ring, TOPIC, CONTEXT, old)


def test_the_active_key_cannot_be_retired(ring: DataKeyRing) -> None:
    active_id = ring.active(TOPIC)[0]
    with pytest.raises(DataKeyError, match="rotate before retiring"):
        ring.retire(TOPIC, active_id)
    assert ring.get(TOPIC, active_id) is not None


def test_ensure_is_idempotent(ring: DataKeyRing) -> None:
    before = ring.states(TOPIC)
    ring.ensure([TOPIC])
    assert ring.states(TOPIC) == before and list(before.values()) == ["active"]


def test_key_ids_name_the_topic_and_date(ring: DataKeyRing) -> None:
    key_id = ring.active(TOPIC)[0]
    assert key_id.startswith(f"{TOPIC}/")
    date, _, suffix = key_id.removeprefix(f"{TOPIC}/").partition("-")
    assert len(date) == 8 and date.isdigit() and len(suffix) == 8


def test_key_files_are_private(ring: DataKeyRing) -> None:
    ring.rotate(TOPIC)
    files = list((ring.folder / TOPIC).iterdir())
    assert len([f for f in files if f.suffix == ".key"]) == 2
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert all(len(f.read_bytes()) == 32 for f in files if f.suffix == ".key")


def test_export_hands_over_exactly_the_non_retired_keys(ring: DataKeyRing, tmp_path: Path) -> None:
    first = ring.active(TOPIC)[0]
    old = encrypt_field(ring, TOPIC, CONTEXT, "alice@example.org")
    second = ring.rotate(TOPIC)
    consumer = DataKeyRing(tmp_path / "notifications")
    assert ring.export_to(consumer.folder, TOPIC) == sorted([first, second])
    assert decrypt_field(consumer, TOPIC, CONTEXT, old) == "alice@example.org"
    third = ring.rotate(TOPIC)
    ring.retire(TOPIC, first)
    assert ring.export_to(consumer.folder, TOPIC) == sorted([second, third])
    assert {f.stem for f in (consumer.folder / TOPIC).glob("*.key")} == {
        k.removeprefix(f"{TOPIC}/") for k in (second, third)
    }
    assert consumer.get(TOPIC, first) is None and consumer.active(TOPIC) == ring.active(TOPIC)
    assert reveal(consumer, TOPIC, CONTEXT, old) is None
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in (consumer.folder / TOPIC).iterdir())
    # Only the exported topic: the other topic's key never leaves the producer's ring.
    assert not (consumer.folder / OTHER_TOPIC).exists()


def test_topic_names_cannot_escape_the_folder(ring: DataKeyRing) -> None:
    with pytest.raises(DataKeyError):
        ring.rotate("../escape")


def test_a_ring_without_an_active_key_says_so(tmp_path: Path) -> None:
    with pytest.raises(DataKeyError, match="no active data key"):
        encrypt_field(DataKeyRing(tmp_path / "empty"), TOPIC, CONTEXT, "x")


def test_a_context_needs_a_qualified_field_name() -> None:
    with pytest.raises(ValueError, match="fully qualified"):
        field_context("owner_email", "a1")
    with pytest.raises(ValueError, match="fully qualified"):
        field_context("bastion.accounts.v1.AccountOpened.owner_email\n", "a1")
