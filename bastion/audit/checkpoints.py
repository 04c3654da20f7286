"""Signed checkpoints: the audit service's Ed25519 signature over (origin, length, head hash), kept outside
the database (a JSON-lines file in the state folder, and the `audit.checkpoints.v1` topic).

Why: the append-only trigger stops everybody, superusers included, until a superuser drops it. Then the
whole chain can be rewritten and re-hashed so that it is consistent again. A checkpoint signed before the
rewrite, with a key the database never held, still names the old head hash, and the verifier finds that.

Bytes: a checkpoint travels as a note modelled on the transparency-log "signed note" (C2SP signed-note,
tlog-checkpoint): the body is three lines, origin, length in decimal, head hash in base64; then an empty
line, then one signature line `— KEY_ID BASE64(key hash (4 bytes) || Ed25519 signature (64 bytes))`, with
the key hash of signed-note: SHA-256(KEY_ID || "\\n" || 0x01 || public key)[:4]. It differs from signed-note
on purpose in one point: the signature covers `CHECKPOINT_TAG || body`, not the body alone, so no other
message the audit key signs (the events it publishes are signed over another tag) can pass for a checkpoint.
The head hash is a hash-chain head, not a Merkle tree root.

Keys: the audit service's key is the `audit` producer key of `bastion.events.keys.KeyRing`; checkpoints are
verified with the trust store, so rotation works as for events. When its key changes, the service signs the
head it has at once with the new key (after checking that the log still extends the newest trusted
checkpoint), so the new key vouches for everything the old one signed. A retired audit key may have leaked, so
nothing it signed is believed: a checkpoint of it is set aside as superseded when a later checkpoint of a
trusted key covers its length (that one's head hash pins every record before it), and refused when none does.
Keys sign in runs: once the file moved on from a key to another, a line of that key again is refused, trusted
or not (a genuine service never signs with a key it rotated away from; a thief with the old key would).

The service issues checkpoints with `Checkpointer.maybe_checkpoint(head)` after each committed append,
which signs when due, writes the file and returns the checkpoint to publish (`Checkpoint.to_bytes`).
Verifiers load the file with `CheckpointFile.load`, which checks every signature and that lengths never
go backwards, or parse published bytes with `Checkpoint.from_bytes` and `verify_checkpoint`.
"""

import base64
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bastion.audit.chain import HASH_BYTES, Head
from bastion.audit.errors import (
    BadCheckpointSignatureError,
    CheckpointError,
    CheckpointForkError,
    CheckpointRollbackError,
    MalformedCheckpointError,
    UntrustedSigningKeyError,
)
from bastion.devstack.layout import PRIVATE_FILE_MODE
from bastion.events.errors import VerificationError
from bastion.events.keys import KeySource, SigningKey, TrustSource, TrustStore

CHECKPOINT_TAG = b"bastion.audit.v1.checkpoint\x00"
AUDIT_PRODUCER = "audit"
SIGNATURE_LINE_PREFIX = "\u2014 "  # an em dash and a space, as in signed-note
KEY_HASH_BYTES = 4
SIGNATURE_BYTES = 64


def key_hash(key_id: str, public_key: Ed25519PublicKey) -> bytes:
    """The signed-note key hash of an Ed25519 key named KEY_ID."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(key_id.encode("utf-8") + b"\n\x01" + raw).digest()[:KEY_HASH_BYTES]


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement that the log called ORIGIN had LENGTH records and head hash HEAD_HASH."""

    origin: str
    length: int
    head_hash: bytes
    key_id: str
    key_hash: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if not self.origin or "\n" in self.origin:
            raise MalformedCheckpointError("the origin must be one non-empty line")
        if not self.key_id or any(char.isspace() or char == "+" for char in self.key_id):
            raise MalformedCheckpointError("a key id is not empty and has no spaces and no '+'")
        if self.length < 0 or len(self.head_hash) != HASH_BYTES:
            raise MalformedCheckpointError("the length is negative or the head hash is not 32 bytes")
        if len(self.key_hash) != KEY_HASH_BYTES or len(self.signature) != SIGNATURE_BYTES:
            raise MalformedCheckpointError("the key hash must be 4 bytes and the signature 64")

    @property
    def head(self) -> Head:
        return Head(self.length, self.head_hash)

    def body(self) -> bytes:
        """The note body: origin, length and head hash, one per line."""
        return f"{self.origin}\n{self.length}\n{base64.b64encode(self.head_hash).decode()}\n".encode()

    def signed_bytes(self) -> bytes:
        return CHECKPOINT_TAG + self.body()

    def to_bytes(self) -> bytes:
        """The checkpoint as a signed note (what the service publishes on audit.checkpoints.v1)."""
        blob = base64.b64encode(self.key_hash + self.signature).decode()
        return self.body() + f"\n{SIGNATURE_LINE_PREFIX}{self.key_id} {blob}\n".encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Checkpoint":
        """Parse a signed note; raises MalformedCheckpointError. Parsing does not verify: see verify_checkpoint."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedCheckpointError("a checkpoint is UTF-8 text") from None
        body, separator, signatures = text.partition("\n\n")
        lines = body.split("\n")
        if not separator or len(lines) != 3 or not signatures.endswith("\n") or signatures.count("\n") != 1:
            raise MalformedCheckpointError("expected three body lines, an empty line and one signature line")
        origin, length, head = lines
        if not signatures.startswith(SIGNATURE_LINE_PREFIX):
            raise MalformedCheckpointError("the signature line must start with an em dash and a space")
        key_id, space, blob = signatures[len(SIGNATURE_LINE_PREFIX):-1].partition(" ")
        if not space:
            raise MalformedCheckpointError("the signature line must be `— KEY_ID BASE64(key hash || signature)`")
        raw = _base64(blob, "signature")
        return cls(origin, _length(length), _base64(head, "head hash"), key_id, raw[:KEY_HASH_BYTES],
                   raw[KEY_HASH_BYTES:])

    def to_json(self) -> str:
        """One line of the checkpoint file (no newline)."""
        return json.dumps({"origin": self.origin, "length": self.length, "head_hash": self.head_hash.hex(),
                           "key_id": self.key_id,
                           "signature": base64.b64encode(self.key_hash + self.signature).decode()},
                          sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> "Checkpoint":
        try:
            fields = json.loads(line)
            origin, length, head, key_id, blob = (fields[name] for name in
                                                  ("origin", "length", "head_hash", "key_id", "signature"))
            head_hash = bytes.fromhex(head)
        except (ValueError, KeyError, TypeError):
            raise MalformedCheckpointError("not a checkpoint line") from None
        if not all(isinstance(value, str) for value in (origin, key_id, blob)) or type(length) is not int:
            raise MalformedCheckpointError("not a checkpoint line")
        raw = _base64(blob, "signature")
        return cls(origin, length, head_hash, key_id, raw[:KEY_HASH_BYTES], raw[KEY_HASH_BYTES:])


def _base64(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error, or text outside ASCII (a plain ValueError no reader of the file handles)
        raise MalformedCheckpointError(f"the {what} is not base64") from None
    if base64.b64encode(raw).decode() != text:  # one encoding per value, so the body is canonical
        raise MalformedCheckpointError(f"the {what} is not in canonical base64")
    return raw


def _length(text: str) -> int:
    if not text.isascii() or not text.isdigit() or (text.startswith("0") and text != "0"):
        raise MalformedCheckpointError("the length must be a decimal number without leading zeros")
    return int(text)


def sign_checkpoint(key: SigningKey, origin: str, head: Head) -> Checkpoint:
    """A checkpoint of HEAD signed with KEY (the audit service's key from the KeyRing)."""
    unsigned = Checkpoint(origin, head.length, head.hash, key.key_id,
                          key_hash(key.key_id, key.private_key.public_key()), bytes(SIGNATURE_BYTES))
    return replace(unsigned, signature=key.private_key.sign(unsigned.signed_bytes()))


def verify_checkpoint(checkpoint: Checkpoint, trust_store: TrustStore, origin: str,
                      previous: Checkpoint | None = None) -> None:
    """Raise unless CHECKPOINT is ORIGIN's, signed by an audit key of TRUST_STORE, and (given PREVIOUS, the
    last accepted one) not shorter than PREVIOUS nor of the same length with another head."""
    if checkpoint.origin != origin:
        raise MalformedCheckpointError(f"checkpoint of {checkpoint.origin!r}, expected {origin!r}")
    try:
        public_key = trust_store.public_key(AUDIT_PRODUCER, checkpoint.key_id)
    except VerificationError as error:
        raise BadCheckpointSignatureError(f"key {checkpoint.key_id!r}: {error.detail}") from None
    _check_signature(checkpoint, public_key)
    _check_order(checkpoint, previous)


def _check_order(checkpoint: Checkpoint, previous: Checkpoint | None) -> None:
    if previous is None:
        return
    if checkpoint.length < previous.length:
        raise CheckpointRollbackError(
            f"checkpoint at length {checkpoint.length} is below the accepted length {previous.length} of the "
            "checkpoint before it")
    if checkpoint.length == previous.length and checkpoint.head_hash != previous.head_hash:
        raise CheckpointForkError(f"two different head hashes were signed for length {checkpoint.length}")


def _check_run(checkpoint: Checkpoint, previous: Checkpoint | None, ended: set[str]) -> None:
    """Keys sign in runs: ENDED (updated here) holds the keys the file moved on from, which never sign again."""
    if previous is not None and previous.key_id != checkpoint.key_id:
        ended.add(previous.key_id)
    if checkpoint.key_id in ended:
        raise BadCheckpointSignatureError(
            f"signed with {checkpoint.key_id!r} after the log moved on to another key: a rotated key signs no more")


def _check_signature(checkpoint: Checkpoint, public_key: Ed25519PublicKey) -> None:
    if checkpoint.key_hash != key_hash(checkpoint.key_id, public_key):
        raise BadCheckpointSignatureError(f"key hash does not match key {checkpoint.key_id!r}")
    try:
        public_key.verify(checkpoint.signature, checkpoint.signed_bytes())
    except InvalidSignature:
        raise BadCheckpointSignatureError(f"checkpoint at length {checkpoint.length} does not verify") from None


class CheckpointFile:
    """The append-only JSON-lines file of accepted checkpoints (0600), one writer: the audit service.

    A line that does not end with a newline (a write cut short) is refused like any other bad line rather
    than skipped: dropping the newest checkpoint is exactly what a tamperer would want. The published copy
    on Kafka is the second witness if the file itself is lost or truncated: `bastion audit verify` fails when
    the file lacks any published checkpoint (bastion/audit/published.py).

    UNANCHORED_OK is the signer's view (the audit service's own checkpointer), never a verifier's: checkpoints of
    retired keys at the end of the file, which no trusted checkpoint covers yet (the key was retired before the
    service signed with its new one), are kept in `unanchored` instead of refused, so that the service can cover
    them. It does so only over a log that still extends both the newest trusted checkpoint (`last`) and the file's
    newest line (`last_line`), and never with a length below theirs (services/audit/adapters/kafka.py).
    """

    def __init__(self, path: Path, trust: TrustSource, origin: str, unanchored_ok: bool = False) -> None:
        self.path = path
        self.trust = trust
        self.origin = origin
        self.unanchored_ok = unanchored_ok
        self.superseded: list[Checkpoint] = []
        self.unanchored: list[Checkpoint] = []
        self._last: Checkpoint | None = None
        self._last_line: Checkpoint | None = None
        self._ended: set[str] = set()
        self._loaded = False

    def lines(self) -> list[tuple[int, Checkpoint]]:
        """Each line of the file as (line number, checkpoint), parsed, none verified."""
        lines = []
        if self.path.exists():
            try:
                text = self.path.read_text(encoding="utf-8")
            except UnicodeDecodeError:  # refused like any bad line: a raw error would stop the consumer, not signing
                raise MalformedCheckpointError(f"{self.path}: not UTF-8 text") from None
            for number, line in enumerate(text.splitlines(keepends=True), start=1):
                if not line.endswith("\n"):
                    raise MalformedCheckpointError(f"{self.path}:{number}: incomplete line")
                try:
                    lines.append((number, Checkpoint.from_json(line)))
                except CheckpointError as error:
                    raise type(error)(f"{self.path}:{number}: {error}") from None
        return lines

    def load(self) -> list[Checkpoint]:
        """Every checkpoint in the file signed by a trusted audit key, each verified (signature, origin, length
        never going backwards, keys in runs). Those of retired audit keys are kept apart in `superseded` when a
        later trusted checkpoint covers their length, and refused when none does (then the old key's word is all
        there is), unless UNANCHORED_OK. A key the trust store does not know makes it read the store again once
        (a rotation newer than its last look)."""
        lines = self.lines()
        trust = self.trust.current()
        if any(not trust.knows(AUDIT_PRODUCER, checkpoint.key_id) for _, checkpoint in lines):
            trust = self.trust.reload()
        accepted: list[Checkpoint] = []
        superseded: list[Checkpoint] = []
        waiting: list[tuple[int, Checkpoint]] = []  # of retired keys, until a trusted checkpoint covers them
        ended: set[str] = set()
        previous: Checkpoint | None = None
        for number, checkpoint in lines:
            try:
                _check_run(checkpoint, previous, ended)
                retired = trust.retired_key(AUDIT_PRODUCER, checkpoint.key_id)
                if retired is not None and checkpoint.origin == self.origin:
                    _check_signature(checkpoint, retired)  # not believed, but not noise either
                    _check_order(checkpoint, previous)
                    waiting.append((number, checkpoint))
                else:
                    verify_checkpoint(checkpoint, trust, self.origin, previous)
                    superseded.extend(old for _, old in waiting)
                    waiting.clear()
                    accepted.append(checkpoint)
            except CheckpointError as error:
                raise type(error)(f"{self.path}:{number}: {error}") from None
            previous = checkpoint
        if waiting and not self.unanchored_ok:
            number, checkpoint = waiting[0]
            raise BadCheckpointSignatureError(
                f"{self.path}:{number}: checkpoint at length {checkpoint.length} is signed by the retired key "
                f"{checkpoint.key_id!r} and no later checkpoint of a trusted audit key covers it")
        self.superseded = superseded
        self.unanchored = [checkpoint for _, checkpoint in waiting]
        self._last = accepted[-1] if accepted else None
        self._last_line = previous
        self._ended = ended
        self._loaded = True
        return accepted

    @property
    def last(self) -> Checkpoint | None:
        """The newest accepted (trusted) checkpoint (reads the file the first time)."""
        if not self._loaded:
            self.load()
        return self._last

    @property
    def last_line(self) -> Checkpoint | None:
        """The file's newest checkpoint, trusted or not (an unanchored one, say)."""
        if not self._loaded:
            self.load()
        return self._last_line

    def append(self, checkpoint: Checkpoint) -> None:
        """Verify CHECKPOINT against the file's last line, then add it to the file and fsync it. A key the trust
        store does not know yet makes it read the store again once: the signer may have seen a rotation first."""
        previous = self.last_line
        ended = set(self._ended)
        _check_run(checkpoint, previous, ended)
        try:
            verify_checkpoint(checkpoint, self.trust.current(), self.origin, previous)
        except BadCheckpointSignatureError:
            verify_checkpoint(checkpoint, self.trust.reload(), self.origin, previous)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE_MODE)
        try:
            os.fchmod(fd, PRIVATE_FILE_MODE)
            os.write(fd, (checkpoint.to_json() + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        self.superseded += self.unanchored
        self.unanchored = []
        self._last = self._last_line = checkpoint
        self._ended = ended


class Checkpointer:
    """Decides when to sign: once EVERY_RECORDS records were added since the last checkpoint, or EVERY_SECONDS
    passed with at least one record added (an unchanged log is not signed again), and at once when the audit
    key changed since the last checkpoint (a rotation: the new key then vouches for what the old one signed,
    so the old one can be retired without leaving its checkpoints unverifiable).

    Call `maybe_checkpoint` with the head of a committed transaction only: a checkpoint of rows that are then
    rolled back would later read as a truncated log. A head below the file's last checkpoint (a database
    restored from an old backup) raises CheckpointRollbackError instead of signing the shorter log.
    """

    def __init__(self, key: KeySource, file: CheckpointFile, every_records: int = 1000,
                 every_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        if every_records < 1 or every_seconds <= 0:
            raise ValueError("every_records must be at least 1 and every_seconds positive")
        self.key = key
        self.file = file
        self.every_records = every_records
        self.every_seconds = every_seconds
        self.clock = clock
        self._signed_at = clock()

    def due(self, head: Head) -> bool:
        if head.length == 0:
            return False  # an empty log: nothing to vouch for
        last = self.file.last
        if self.file.unanchored or (last is not None and last.key_id != self.key.current().key_id):
            newest = self.file.last_line
            return head.length >= (newest.length if newest is not None else 0)
        signed = last.length if last else 0
        if head.length <= signed:
            return False
        return head.length - signed >= self.every_records or self.clock() - self._signed_at >= self.every_seconds

    def maybe_checkpoint(self, head: Head) -> Checkpoint | None:
        """Sign HEAD if due, write it to the file, and return it (for publishing); else None."""
        return self.checkpoint(head) if self.due(head) else None

    def checkpoint(self, head: Head) -> Checkpoint:
        """Sign HEAD now (at shutdown, say), write it to the file, and return it. UntrustedSigningKeyError when the
        key the ring gave is not (or no longer) trusted for checkpoints: the key ring is changing, try later."""
        key = self.key.current()
        checkpoint = sign_checkpoint(key, self.file.origin, head)
        try:
            self.file.append(checkpoint)
        except BadCheckpointSignatureError as error:
            store = self.file.trust.reload()
            if store.knows(AUDIT_PRODUCER, key.key_id) and store.retired_key(AUDIT_PRODUCER, key.key_id) is None:
                raise  # a key the store trusts and the file still refuses (signing again after moving on): no wait
            raise UntrustedSigningKeyError(f"checkpoint signed with {key.key_id!r} refused: {error}") from None
        self._signed_at = self.clock()
        return checkpoint
