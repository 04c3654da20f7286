"""Signed checkpoints: pinned bytes, round trips, every refusal typed (bad signature, unknown or retired key,
another origin, a length going backwards, a fork), the 0600 append-only file, and the signing schedule."""

import json
import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from bastion.audit.chain import EMPTY, Head
from bastion.audit.checkpoints import (
    Checkpoint,
    Checkpointer,
    CheckpointFile,
    sign_checkpoint,
    verify_checkpoint,
)
from bastion.audit.errors import (
    BadCheckpointSignatureError,
    CheckpointForkError,
    CheckpointRollbackError,
    MalformedCheckpointError,
    UntrustedSigningKeyError,
)
from bastion.events.keys import KeyRing, SigningKey, TrustStore
from tests.unit.audit.samples import AUDIT_KEY, ORIGIN, trust_store

VECTOR = json.loads((Path(__file__).parent / "vector-v1.json").read_text(encoding="utf-8"))
HEAD = Head(2, bytes.fromhex(VECTOR["hash_seq_2_hex"]))
TRUST = trust_store()

hashes = st.binary(min_size=32, max_size=32)
heads = st.builds(Head, st.integers(0, 2**63 - 1), hashes)
origins = st.text(st.characters(codec="utf-8", exclude_characters="\n"), min_size=1, max_size=30)


def test_the_vector_pins_the_signed_bytes_the_note_and_the_json_line() -> None:
    assert AUDIT_KEY.private_key.private_bytes_raw().hex() == VECTOR["private_key_seed_hex"]
    checkpoint = sign_checkpoint(AUDIT_KEY, VECTOR["origin"], HEAD)
    assert checkpoint.signed_bytes().hex() == VECTOR["checkpoint_signed_bytes_hex"]
    assert checkpoint.to_bytes().decode() == VECTOR["checkpoint_note"]
    assert checkpoint.to_json() == VECTOR["checkpoint_json_line"]
    assert checkpoint.signed_bytes().startswith(b"bastion.audit.v1.checkpoint\x00bastion.test/audit\n2\n")


@given(origins, heads)
def test_a_signed_checkpoint_round_trips_as_bytes_and_as_json_and_verifies(origin: str, head: Head) -> None:
    checkpoint = sign_checkpoint(AUDIT_KEY, origin, head)
    assert Checkpoint.from_bytes(checkpoint.to_bytes()) == checkpoint
    assert Checkpoint.from_json(checkpoint.to_json()) == checkpoint
    verify_checkpoint(Checkpoint.from_bytes(checkpoint.to_bytes()), TRUST, origin)


@given(heads, st.sampled_from(["length", "head_hash", "signature"]), st.data())
def test_any_change_breaks_the_signature(head: Head, field: str, data: st.DataObject) -> None:
    checkpoint = sign_checkpoint(AUDIT_KEY, ORIGIN, head)
    if field == "length":
        changed = replace(checkpoint, length=data.draw(st.integers(0, 2**63 - 1).filter(lambda n: n != head.length)))
    elif field == "head_hash":
        changed = replace(checkpoint, head_hash=data.draw(hashes.filter(lambda h: h != head.hash)))
    else:
        flip = data.draw(st.integers(0, 63))
        signature = bytearray(checkpoint.signature)
        signature[flip] ^= 0x01
        changed = replace(checkpoint, signature=bytes(signature))
    with pytest.raises(BadCheckpointSignatureError):
        verify_checkpoint(changed, TRUST, ORIGIN)


def test_a_checkpoint_signed_with_another_key_is_refused() -> None:
    stranger = SigningKey("audit", AUDIT_KEY.key_id, Ed25519PrivateKey.generate())
    with pytest.raises(BadCheckpointSignatureError, match="key hash"):
        verify_checkpoint(sign_checkpoint(stranger, ORIGIN, HEAD), TRUST, ORIGIN)


def test_a_key_the_trust_store_does_not_know_or_has_retired_is_refused() -> None:
    accounts_key = SigningKey("accounts", "accounts/20260301-00000001", Ed25519PrivateKey.generate())
    both = TrustStore({"audit": {AUDIT_KEY.key_id: (AUDIT_KEY.private_key.public_key(), "active")},
                       "accounts": {accounts_key.key_id: (accounts_key.private_key.public_key(), "active")}})
    with pytest.raises(BadCheckpointSignatureError, match="not a key of 'audit'"):
        verify_checkpoint(sign_checkpoint(accounts_key, ORIGIN, HEAD), both, ORIGIN)
    with pytest.raises(BadCheckpointSignatureError, match="retired"):
        verify_checkpoint(sign_checkpoint(AUDIT_KEY, ORIGIN, HEAD), trust_store(state="retired"), ORIGIN)


def test_a_checkpoint_of_another_log_is_refused() -> None:
    with pytest.raises(MalformedCheckpointError, match="expected"):
        verify_checkpoint(sign_checkpoint(AUDIT_KEY, "elsewhere/audit", HEAD), TRUST, ORIGIN)


def test_a_length_going_backwards_or_forking_is_refused_and_an_equal_one_accepted() -> None:
    previous = sign_checkpoint(AUDIT_KEY, ORIGIN, Head(10, b"\x0a" * 32))
    with pytest.raises(CheckpointRollbackError, match="below the accepted length 10"):
        verify_checkpoint(sign_checkpoint(AUDIT_KEY, ORIGIN, Head(9, b"\x09" * 32)), TRUST, ORIGIN, previous)
    with pytest.raises(CheckpointForkError):
        verify_checkpoint(sign_checkpoint(AUDIT_KEY, ORIGIN, Head(10, b"\x0b" * 32)), TRUST, ORIGIN, previous)
    verify_checkpoint(sign_checkpoint(AUDIT_KEY, ORIGIN, Head(10, b"\x0a" * 32)), TRUST, ORIGIN, previous)
    verify_checkpoint(sign_checkpoint(AUDIT_KEY, ORIGIN, Head(11, b"\x0b" * 32)), TRUST, ORIGIN, previous)


NOTE = VECTOR["checkpoint_note"]


@pytest.mark.parametrize("data", [
    b"\xff\xfe not utf-8",
    NOTE.replace("\n\n", "\n").encode(),  # no empty line before the signature
    NOTE.replace("\n2\n", "\n2\nextension\n").encode(),  # a fourth body line
    NOTE.replace("\n2\n", "\n02\n").encode(),  # leading zero
    NOTE.replace("\n2\n", "\n-2\n").encode(),
    NOTE.replace("\n2\n", "\n\u0662\n").encode(),  # a non-ASCII digit
    NOTE.replace("Smgk=", "Smgk").encode(),  # not canonical base64
    NOTE.replace("4gU3DEcVeZiQdWR9Y9k1fwAb21ZImSzWPjH4ne9Smgk=", "AAAA").encode(),  # not 32 bytes
    NOTE.replace("\u2014 ", "- ").encode(),  # not an em dash
    (NOTE + NOTE.split("\n\n")[1]).encode(),  # two signature lines
    NOTE.rstrip("\n").encode(),  # no final newline
    NOTE.replace("audit/20260301-00000001 ", "audit/20260301-00000001").encode(),  # no space before the blob
    b"\norigin-less\n",
])
def test_malformed_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(MalformedCheckpointError):
        Checkpoint.from_bytes(data)


@pytest.mark.parametrize("line", [
    "not json", "[]", "{}",
    VECTOR["checkpoint_json_line"].replace('"length":2', '"length":"2"'),
    VECTOR["checkpoint_json_line"].replace('"length":2', '"length":true'),
    VECTOR["checkpoint_json_line"].replace('"head_hash":"e2', '"head_hash":"zz'),
])
def test_malformed_json_lines_are_refused(line: str) -> None:
    with pytest.raises(MalformedCheckpointError):
        Checkpoint.from_json(line)


@pytest.mark.parametrize("parse", [
    lambda: Checkpoint.from_bytes(NOTE.replace("Smgk=", "Smg\u00e9=").encode()),  # the head hash
    lambda: Checkpoint.from_bytes(" \u00e9".join(NOTE.rsplit(" ", 1)).encode()),  # the signature blob
    lambda: Checkpoint.from_json(json.dumps({**json.loads(VECTOR["checkpoint_json_line"]), "signature": "\u00e9"})),
], ids=["note head hash", "note signature", "json signature"])
def test_base64_with_a_character_outside_ascii_is_refused_as_malformed(parse: Callable[[], Checkpoint]) -> None:
    """Not a raw ValueError: whoever reads the file or the topic handles CheckpointError (the signer stops signing
    with a security record, the verifiers fail the verdict); anything else stopped them instead."""
    with pytest.raises(MalformedCheckpointError, match="base64"):
        parse()


def test_a_checkpoint_file_that_is_not_utf8_is_refused_as_malformed(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints.jsonl"
    path.write_bytes(at(3).to_json().encode() + b"\n\xff\n")
    with pytest.raises(MalformedCheckpointError, match="UTF-8"):
        CheckpointFile(path, TRUST, ORIGIN).load()


def at(length: int) -> Checkpoint:
    return sign_checkpoint(AUDIT_KEY, ORIGIN, Head(length, length.to_bytes(32, "big")))


def test_the_file_is_private_append_only_and_loads_verified(tmp_path: Path) -> None:
    path = tmp_path / "state" / "audit-checkpoints.jsonl"
    file = CheckpointFile(path, TRUST, ORIGIN)
    assert file.load() == [] and file.last is None
    for length in (0, 5, 5, 9):
        file.append(at(length))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert CheckpointFile(path, TRUST, ORIGIN).load() == [at(0), at(5), at(5), at(9)]
    with pytest.raises(CheckpointRollbackError):
        file.append(at(8))
    with pytest.raises(CheckpointRollbackError):
        CheckpointFile(path, TRUST, ORIGIN).append(at(8))  # a fresh instance reads the last one first
    assert len(path.read_text().splitlines()) == 4, "a refused checkpoint is not written"


def test_loading_refuses_a_forged_line_a_rollback_and_a_cut_short_line(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints.jsonl"
    forged = replace(at(7), head_hash=b"\x07" * 32)
    for lines, error, where in [
        ([at(3), forged], BadCheckpointSignatureError, ":2:"),
        ([at(3), at(9), at(4)], CheckpointRollbackError, ":3:"),
    ]:
        path.write_text("".join(checkpoint.to_json() + "\n" for checkpoint in lines))
        with pytest.raises(error, match=where):
            CheckpointFile(path, TRUST, ORIGIN).load()
    path.write_text(at(3).to_json() + "\n" + at(4).to_json())
    with pytest.raises(MalformedCheckpointError, match="incomplete line"):
        CheckpointFile(path, TRUST, ORIGIN).load()


def test_the_audit_key_comes_from_the_key_ring(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "keys")
    ring.ensure(["audit"])
    checkpoint = sign_checkpoint(ring.signing_key("audit"), ORIGIN, HEAD)
    verify_checkpoint(checkpoint, ring.trust_store(), ORIGIN)
    ring.rotate("audit")  # the old key turns verify-only: its checkpoints still verify
    verify_checkpoint(checkpoint, ring.trust_store(), ORIGIN)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_checkpointer_signs_every_n_records_or_t_seconds_of_growth(tmp_path: Path) -> None:
    clock = Clock()
    file = CheckpointFile(tmp_path / "checkpoints.jsonl", TRUST, ORIGIN)
    checkpointer = Checkpointer(AUDIT_KEY, file, every_records=3, every_seconds=60, clock=clock)
    assert checkpointer.maybe_checkpoint(EMPTY) is None
    assert checkpointer.maybe_checkpoint(Head(2, b"\x02" * 32)) is None
    issued = checkpointer.maybe_checkpoint(Head(3, b"\x03" * 32))
    assert issued is not None and issued.length == 3 and file.last == issued
    clock.now += 61
    assert checkpointer.maybe_checkpoint(Head(3, b"\x03" * 32)) is None, "an unchanged log is not signed again"
    issued = checkpointer.maybe_checkpoint(Head(4, b"\x04" * 32))
    assert issued is not None and issued.length == 4
    assert Checkpoint.from_bytes(issued.to_bytes()) == issued
    assert [c.length for c in CheckpointFile(file.path, TRUST, ORIGIN).load()] == [3, 4]
    with pytest.raises(CheckpointRollbackError):
        checkpointer.checkpoint(Head(2, b"\x02" * 32))


class SwitchableKey:
    """The audit service's key as a running service sees it: whatever the key ring says now."""

    def __init__(self, key: SigningKey) -> None:
        self.key = key
        self.producer = key.producer

    def current(self) -> SigningKey:
        return self.key


def test_a_new_audit_key_signs_the_unchanged_head_at_once_and_only_once(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "keys")
    ring.ensure(["audit"])
    key = SwitchableKey(ring.signing_key("audit"))
    # The trust store looked at long after the key: the checkpoint makes the file read again when it needs to.
    file = CheckpointFile(tmp_path / "checkpoints.jsonl", ring.followed_trust_store(check_seconds=3600), ORIGIN)
    checkpointer = Checkpointer(key, file, every_records=100, every_seconds=3600, clock=Clock())
    assert checkpointer.maybe_checkpoint(EMPTY) is None, "nothing to vouch for yet"
    first = checkpointer.checkpoint(Head(3, b"\x03" * 32))
    assert checkpointer.maybe_checkpoint(Head(3, b"\x03" * 32)) is None
    ring.rotate("audit")
    key.key = ring.signing_key("audit")
    anchored = checkpointer.maybe_checkpoint(Head(3, b"\x03" * 32))
    assert anchored is not None and anchored.key_id == key.key.key_id != first.key_id
    assert anchored.head == first.head, "the same log, now vouched for by the new key"
    assert checkpointer.maybe_checkpoint(Head(3, b"\x03" * 32)) is None, "signed once, not on every poll"


def file_of(path: Path, checkpoints: list[Checkpoint]) -> Path:
    path.write_text("".join(checkpoint.to_json() + "\n" for checkpoint in checkpoints))
    return path


def rotated_and_retired(ring: KeyRing) -> tuple[SigningKey, SigningKey]:
    """The audit key before and after a rotation; the old one retired (its private half deleted)."""
    old = ring.signing_key("audit")
    ring.rotate("audit")
    new = ring.signing_key("audit")
    ring.retire("audit", old.key_id)
    return old, new


def test_a_retired_keys_checkpoints_count_only_when_a_trusted_one_covers_them(ring: KeyRing, tmp_path: Path) -> None:
    old, new = rotated_and_retired(ring)
    anchored = [sign_checkpoint(key, ORIGIN, Head(length, bytes([length]) * 32))
                for key, length in ((old, 3), (old, 5), (new, 5), (new, 8))]
    file = CheckpointFile(file_of(tmp_path / "anchored.jsonl", anchored), ring.trust_store(), ORIGIN)
    assert file.load() == anchored[2:], "only a trusted key's word is believed"
    assert file.superseded == anchored[:2] and file.last == anchored[3]

    unanchored = CheckpointFile(file_of(tmp_path / "unanchored.jsonl", anchored[:2]), ring.trust_store(), ORIGIN)
    with pytest.raises(BadCheckpointSignatureError, match=r":1: .* retired key .* no later checkpoint of a trusted"):
        unanchored.load()
    with pytest.raises(BadCheckpointSignatureError):
        _ = unanchored.last  # so the audit service refuses to sign over it (services/audit/adapters/kafka.py)


CASES = ["after the anchor", "after the anchor, a genuine one after it", "longer than the anchor",
         "a fork before the anchor", "not even signed by it"]


@pytest.mark.parametrize("case", CASES)
def test_what_a_leaked_retired_key_signs_is_refused(ring: KeyRing, tmp_path: Path, case: str) -> None:
    old, new = rotated_and_retired(ring)
    before = sign_checkpoint(old, ORIGIN, Head(3, b"\x03" * 32))
    anchor = sign_checkpoint(new, ORIGIN, Head(3, b"\x03" * 32))
    forged = sign_checkpoint(old, ORIGIN, Head(9, b"\x09" * 32))
    lines, error, where = {
        "after the anchor": ([before, anchor, forged], BadCheckpointSignatureError, ":3: .* moved on to another key"),
        "after the anchor, a genuine one after it": ([before, anchor, forged, sign_checkpoint(
            new, ORIGIN, Head(12, b"\x0c" * 32))], BadCheckpointSignatureError, ":3: .* moved on to another key"),
        "longer than the anchor": ([forged, anchor], CheckpointRollbackError, ":2: .* below the accepted length 9"),
        "a fork before the anchor": ([before, sign_checkpoint(old, ORIGIN, Head(3, b"\x04" * 32)), anchor],
                                     CheckpointForkError, ":2: two different head hashes"),
        "not even signed by it": ([replace(before, head_hash=b"\x04" * 32), anchor],
                                  BadCheckpointSignatureError, ":1: checkpoint at length 3 does not verify"),
    }[case]
    with pytest.raises(error, match=where):
        CheckpointFile(file_of(tmp_path / "checkpoints.jsonl", lines), ring.trust_store(), ORIGIN).load()


def test_a_key_the_log_moved_on_from_never_signs_again_even_while_still_trusted(ring: KeyRing, tmp_path: Path
                                                                               ) -> None:
    """A leaked key still verify-only (rotated, not yet retired): its forgery after the new key's checkpoint."""
    old = ring.signing_key("audit")
    ring.rotate("audit")
    new = ring.signing_key("audit")
    lines = [sign_checkpoint(old, ORIGIN, Head(3, b"\x03" * 32)), sign_checkpoint(new, ORIGIN, Head(3, b"\x03" * 32)),
             sign_checkpoint(old, ORIGIN, Head(9, b"\x09" * 32))]
    path = file_of(tmp_path / "checkpoints.jsonl", lines[:2])
    file = CheckpointFile(path, ring.trust_store(), ORIGIN)
    assert file.load() == lines[:2], "verify-only: still believed"
    with pytest.raises(BadCheckpointSignatureError, match="moved on to another key"):
        file.append(lines[2])
    with pytest.raises(BadCheckpointSignatureError, match=r":3: .* moved on to another key"):
        CheckpointFile(file_of(path, lines), ring.trust_store(), ORIGIN).load()


def test_the_signer_covers_what_a_key_retired_too_early_left_unanchored(ring: KeyRing, tmp_path: Path) -> None:
    """Retired (with --force) before the service signed with its new key: a verifier refuses the file, the
    service's own view keeps the lines apart, signs over them with its new key, and the file verifies again."""
    old = ring.signing_key("audit")
    path = file_of(tmp_path / "checkpoints.jsonl", [sign_checkpoint(old, ORIGIN, Head(3, b"\x03" * 32)),
                                                     sign_checkpoint(old, ORIGIN, Head(5, b"\x05" * 32))])
    ring.rotate("audit")
    ring.retire("audit", old.key_id)
    with pytest.raises(BadCheckpointSignatureError, match="no later checkpoint of a trusted"):
        CheckpointFile(path, ring.trust_store(), ORIGIN).load()
    signer = CheckpointFile(path, ring.followed_trust_store(), ORIGIN, unanchored_ok=True)
    checkpointer = Checkpointer(ring.followed_signing_key("audit"), signer, every_records=100, every_seconds=3600)
    assert signer.last is None and [c.length for c in signer.unanchored] == [3, 5]
    assert checkpointer.maybe_checkpoint(Head(4, b"\x04" * 32)) is None, "never below what it covers"
    with pytest.raises(CheckpointRollbackError):
        checkpointer.checkpoint(Head(4, b"\x04" * 32))
    anchored = checkpointer.maybe_checkpoint(Head(6, b"\x06" * 32))
    assert anchored is not None and anchored.key_id != old.key_id and signer.unanchored == []
    verifier = CheckpointFile(path, ring.trust_store(), ORIGIN)
    assert verifier.load() == [anchored] and [c.length for c in verifier.superseded] == [3, 5]


def test_a_checkpoint_signed_with_a_key_no_longer_trusted_is_a_transient_refusal(ring: KeyRing, tmp_path: Path
                                                                                 ) -> None:
    """The moment between a retirement and the service's next look at the key ring: it still signs with the
    old key; the file refuses the checkpoint and the service is told to try again, not to stop signing."""
    old = ring.signing_key("audit")
    ring.rotate("audit")
    ring.retire("audit", old.key_id)
    checkpointer = Checkpointer(old, CheckpointFile(tmp_path / "checkpoints.jsonl", ring.trust_store(), ORIGIN))
    with pytest.raises(UntrustedSigningKeyError, match="retired"):
        checkpointer.checkpoint(Head(3, b"\x03" * 32))
    assert not (tmp_path / "checkpoints.jsonl").exists()


def test_retiring_is_checked_beforehand_on_a_copy_of_the_trust_store(ring: KeyRing) -> None:
    old = ring.signing_key("audit").key_id
    ring.rotate("audit")
    trust = ring.trust_store()
    assert trust.retiring("audit", old).retired_key("audit", old) is not None
    assert trust.retired_key("audit", old) is None and ring.state("audit", old) == "verify-only", "nothing changed"


def test_a_verifier_that_looked_at_the_trust_store_before_a_rotation_reads_it_again(ring: KeyRing, tmp_path: Path
                                                                                     ) -> None:
    """VerifyChain right after a rotation: the new key's checkpoint is in the file before the verifier's next
    scheduled look at the key ring; it reads the ring again rather than refusing the file."""
    old = ring.signing_key("audit")
    verifier = CheckpointFile(tmp_path / "checkpoints.jsonl", ring.followed_trust_store(check_seconds=3600), ORIGIN)
    ring.rotate("audit")
    lines = [sign_checkpoint(old, ORIGIN, Head(3, b"\x03" * 32)),
             sign_checkpoint(ring.signing_key("audit"), ORIGIN, Head(3, b"\x03" * 32))]
    file_of(verifier.path, lines)
    assert verifier.load() == lines


def test_a_trusted_key_refused_for_signing_again_after_the_file_moved_on_is_no_transient_matter(
    ring: KeyRing, tmp_path: Path
) -> None:
    """A key ring restored from an old backup under a running service: it signs with a key the file moved on
    from, still trusted. Waiting would not mend it, so it is not reported as a key ring in flux."""
    old = ring.signing_key("audit")
    ring.rotate("audit")
    path = file_of(tmp_path / "checkpoints.jsonl", [sign_checkpoint(old, ORIGIN, Head(3, b"\x03" * 32)),
                                                     sign_checkpoint(ring.signing_key("audit"), ORIGIN,
                                                                     Head(3, b"\x03" * 32))])
    checkpointer = Checkpointer(old, CheckpointFile(path, ring.trust_store(), ORIGIN))
    with pytest.raises(BadCheckpointSignatureError, match="moved on to another key") as refused:
        checkpointer.checkpoint(Head(4, b"\x04" * 32))
    assert not isinstance(refused.value, UntrustedSigningKeyError)


@pytest.mark.parametrize("change", [{"origin": ""}, {"origin": "bastion.test/audit\n7"}, {"key_id": ""},
                                    {"key_id": "audit key"}, {"key_id": "audit+1"}, {"length": -1},
                                    {"key_hash": b"\x01" * 3}, {"signature": b"\x01" * 63}])
def test_a_checkpoint_that_could_not_be_written_as_a_note_is_refused_when_built(change: dict[str, object]) -> None:
    with pytest.raises(MalformedCheckpointError):
        replace(sign_checkpoint(AUDIT_KEY, ORIGIN, HEAD), **change)  # type: ignore[arg-type]


def test_a_head_hash_in_non_canonical_base64_is_refused() -> None:
    """'Smgl=' decodes to the same bytes as 'Smgk=' (the unused low bits differ): one checkpoint, one encoding."""
    assert NOTE.count("Smgk=") == 1
    with pytest.raises(MalformedCheckpointError, match="canonical"):
        Checkpoint.from_bytes(NOTE.replace("Smgk=", "Smgl=").encode())


def test_a_retired_keys_line_of_another_log_is_refused_even_when_covered(ring: KeyRing, tmp_path: Path) -> None:
    old, new = rotated_and_retired(ring)
    lines = [sign_checkpoint(old, "elsewhere/audit", Head(3, b"\x03" * 32)),
             sign_checkpoint(new, ORIGIN, Head(3, b"\x03" * 32))]
    with pytest.raises(MalformedCheckpointError, match=r":1: .*expected"):
        CheckpointFile(file_of(tmp_path / "checkpoints.jsonl", lines), ring.trust_store(), ORIGIN).load()


def test_an_old_key_signs_no_more_after_this_file_appended_the_new_keys_checkpoint(ring: KeyRing,
                                                                                    tmp_path: Path) -> None:
    """The same rule as on load, for the running service's own file: after it appended the new key's
    checkpoint, the old key (still verify-only, so trusted) is refused without reading the file again."""
    old = ring.signing_key("audit")
    ring.rotate("audit")
    new = ring.signing_key("audit")
    file = CheckpointFile(tmp_path / "checkpoints.jsonl", ring.trust_store(), ORIGIN)
    file.append(sign_checkpoint(old, ORIGIN, Head(3, b"\x03" * 32)))
    file.append(sign_checkpoint(new, ORIGIN, Head(3, b"\x03" * 32)))
    with pytest.raises(BadCheckpointSignatureError, match="moved on to another key"):
        file.append(sign_checkpoint(old, ORIGIN, Head(4, b"\x04" * 32)))
    assert len(file.path.read_text().splitlines()) == 2


def test_appending_makes_an_existing_file_private_again(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints.jsonl"
    path.write_text(at(1).to_json() + "\n")
    path.chmod(0o644)  # restored from a backup, say
    CheckpointFile(path, TRUST, ORIGIN).append(at(2))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_time_based_schedule_starts_again_after_each_checkpoint(tmp_path: Path) -> None:
    clock = Clock()
    file = CheckpointFile(tmp_path / "checkpoints.jsonl", TRUST, ORIGIN)
    checkpointer = Checkpointer(AUDIT_KEY, file, every_records=100, every_seconds=60, clock=clock)
    clock.now += 61
    assert checkpointer.maybe_checkpoint(Head(1, b"\x01" * 32)) is not None
    clock.now += 1
    assert checkpointer.maybe_checkpoint(Head(2, b"\x02" * 32)) is None, "not one checkpoint per record"
    clock.now += 60
    assert checkpointer.maybe_checkpoint(Head(2, b"\x02" * 32)) is not None


@pytest.mark.parametrize(("every_records", "every_seconds"), [(0, 60.0), (10, 0.0), (10, -1.0)])
def test_a_checkpointer_that_would_sign_on_every_record_is_refused(tmp_path: Path, every_records: int,
                                                                   every_seconds: float) -> None:
    with pytest.raises(ValueError, match="every_records"):
        Checkpointer(AUDIT_KEY, CheckpointFile(tmp_path / "c.jsonl", TRUST, ORIGIN), every_records=every_records,
                     every_seconds=every_seconds)


def test_a_new_key_does_not_sign_an_empty_log(ring: KeyRing, tmp_path: Path) -> None:
    key = SwitchableKey(ring.signing_key("audit"))
    file = CheckpointFile(tmp_path / "checkpoints.jsonl", ring.followed_trust_store(check_seconds=3600), ORIGIN)
    checkpointer = Checkpointer(key, file, every_records=100, every_seconds=3600, clock=Clock())
    checkpointer.checkpoint(EMPTY)  # signed at shutdown with nothing in the log
    ring.rotate("audit")
    key.key = ring.signing_key("audit")
    assert checkpointer.maybe_checkpoint(EMPTY) is None, "an empty log: nothing to vouch for, whatever the key"
