"""Field encryption: only a ring holding the topic's data key reads a field, and only in its own place."""

import json
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


def key_file(ring: DataKeyRing, key_id: str) -> Path:
    topic, _, suffix = key_id.partition("/")
    return ring.folder / topic / f"{suffix}.key"


def edit_index(ring: DataKeyRing, topic: str, key_id: str, state: str) -> None:
    """What a hand-edited or corrupted keys.json would say."""
    index = ring.folder / topic / "keys.json"
    data = json.loads(index.read_text())
    data["keys"][key_id] = {"state": state, "created_at": "2026-01-01T00:00:00+00:00"}
    index.write_text(json.dumps(data))


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


@pytest.mark.parametrize("bad", [{"nonce": b"short"}, {"nonce": bytes(200)}, {"ciphertext": b""},
                                 {"key_id": f"{TOPIC}/../../etc"}, {"key_id": f"{TOPIC}/20261127-0a1b2c3d\n"},
                                 {"key_id": "20261127-0a1b2c3d"}],
                         ids=["short-nonce", "long-nonce", "no-ciphertext", "key-id-escapes", "key-id-newline",
                              "key-id-without-topic"])
def test_malformed_fields_are_refused(ring: DataKeyRing, bad: dict[str, object]) -> None:
    """Tampering, never "not entitled": reveal must not pass a malformed field off as one this reader cannot see."""
    field = encrypt_field(ring, TOPIC, CONTEXT, "alice@example.org")
    with pytest.raises(FieldIntegrityError):
        decrypt_field(ring, TOPIC, CONTEXT, copy(field, **bad))
    with pytest.raises(FieldIntegrityError):
        reveal(ring, TOPIC, CONTEXT, copy(field, **bad))


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


def test_the_aad_is_exactly_the_documented_layout() -> None:
    """Every field already published was sealed with this layout: any change would make them all unreadable."""
    tag = b"bastion.events.v1.EncryptedField\x00"
    parts = tag + b"\x00\x00\x00\x04t.v1" + b"\x00\x00\x00\x03x@a" + b"\x00\x00\x00\x06t.v1/k"
    assert associated_data("t.v1", "x@a", "t.v1/k") == parts


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
    assert not key_file(ring, old.key_id).exists(), "crypto-shredding deletes the material, not just its state"


def test_a_retired_key_stays_retired_if_its_material_comes_back(ring: DataKeyRing) -> None:
    """A backup restored over the folder may bring the file back: the index, not the file, says what is usable."""
    old = encrypt_field(ring, TOPIC, CONTEXT, "alice@example.org")
    material = ring.active(TOPIC)[1]
    ring.rotate(TOPIC)
    ring.retire(TOPIC, old.key_id)
    key_file(ring, old.key_id).write_bytes(material)
    assert ring.get(TOPIC, old.key_id) is None
    assert reveal(ring, TOPIC, CONTEXT, old) is None


def test_retiring_a_key_the_ring_does_not_have_names_it(ring: DataKeyRing) -> None:
    with pytest.raises(DataKeyError, match=f"'{TOPIC}/20000101-00000000' is not a key of topic"):
        ring.retire(TOPIC, f"{TOPIC}/20000101-00000000")


def test_the_active_key_cannot_be_retired(ring: DataKeyRing) -> None:
    active_id = ring.active(TOPIC)[0]
    with pytest.raises(DataKeyError, match="rotate before retiring"):
        ring.retire(TOPIC, active_id)
    assert ring.get(TOPIC, active_id) is not None


def test_the_active_key_is_always_the_newest(ring: DataKeyRing) -> None:
    """Key ids sort by date and a random suffix, not by age: the ring must not take the first non-retired one."""
    for _ in range(8):
        newest = ring.rotate(TOPIC)
        assert ring.active(TOPIC)[0] == newest
        assert encrypt_field(ring, TOPIC, CONTEXT, "alice@example.org").key_id == newest


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


def test_the_folders_that_hold_keys_are_owner_only(ring: DataKeyRing, tmp_path: Path) -> None:
    """Not only the key files: another local user must not even list which keys a ring holds."""
    consumer = DataKeyRing(tmp_path / "notifications")
    ring.export_to(consumer.folder, TOPIC)
    (ring.folder / OTHER_TOPIC).chmod(0o755)  # as an earlier version left it
    ring.rotate(OTHER_TOPIC)
    for folder in (ring.folder / TOPIC, ring.folder / OTHER_TOPIC, consumer.folder / TOPIC):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


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


@pytest.mark.parametrize("topic", ["../escape", f"{TOPIC}/../../escape", "..", "."])
def test_topic_names_cannot_escape_the_folder(ring: DataKeyRing, topic: str) -> None:
    with pytest.raises(DataKeyError, match="not a valid topic name"):
        ring.rotate(topic)
    assert not (ring.folder.parent / "escape").exists()


@pytest.mark.parametrize(
    "key_id", [f"{TOPIC}/../../../outside", "20261127-0a1b2c3d", f"{OTHER_TOPIC}/20261127-0a1b2c3d"]
)
def test_a_key_id_in_the_index_names_a_file_of_its_own_topic_only(ring: DataKeyRing, key_id: str) -> None:
    edit_index(ring, TOPIC, key_id, "decrypt-only")
    with pytest.raises(DataKeyError, match="is not a key id of topic"):
        ring.get(TOPIC, key_id)


def test_an_unknown_key_state_is_refused_not_taken_for_active(ring: DataKeyRing) -> None:
    edit_index(ring, TOPIC, ring.active(TOPIC)[0], "Active")
    with pytest.raises(DataKeyError, match="unknown data key state 'Active'"):
        encrypt_field(ring, TOPIC, CONTEXT, "alice@example.org")


def test_missing_key_material_is_named_and_nothing_is_encrypted_or_exported(ring: DataKeyRing, tmp_path: Path) -> None:
    key_file(ring, ring.active(TOPIC)[0]).unlink()
    with pytest.raises(DataKeyError, match=r"key material of .* is missing"):
        encrypt_field(ring, TOPIC, CONTEXT, "alice@example.org")
    with pytest.raises(DataKeyError, match=r"key material of .* is missing"):
        ring.export_to(tmp_path / "notifications", TOPIC)
    assert not list((tmp_path / "notifications").rglob("*.key"))


@pytest.mark.parametrize("length", [0, 16, 31, 33])
def test_a_key_file_of_another_length_is_refused(ring: DataKeyRing, length: int) -> None:
    """16 or 24 bytes would pass for an AES key and quietly weaken it to AES-128 or AES-192."""
    key_file(ring, ring.active(TOPIC)[0]).write_bytes(bytes(length))
    with pytest.raises(DataKeyError, match="is not a 32-byte AES key"):
        encrypt_field(ring, TOPIC, CONTEXT, "alice@example.org")


def test_a_ring_without_an_active_key_says_so(tmp_path: Path) -> None:
    with pytest.raises(DataKeyError, match="no active data key"):
        encrypt_field(DataKeyRing(tmp_path / "empty"), TOPIC, CONTEXT, "x")


def test_a_context_needs_a_qualified_field_name() -> None:
    with pytest.raises(ValueError, match="fully qualified"):
        field_context("owner_email", "a1")
    with pytest.raises(ValueError, match="fully qualified"):
        field_context("bastion.accounts.v1.AccountOpened.owner_email\n", "a1")
