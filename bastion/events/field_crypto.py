"""Field-level encryption of personal data in event payloads: AES-256-GCM under per-topic data keys that only
the consumers entitled by infra/personal-data.yaml hold, so Kafka's disks and every other reader see ciphertext."""

import datetime as dt
import json
import os
import re
import secrets
import struct
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion.devstack.event_access import TOPIC_NAME
from bastion.devstack.layout import private_folders, write_private
from bastion.devstack.writer_lock import writer_lock
from bastion.events.errors import EventsError
from bastion.events.v1.envelope_pb2 import EncryptedField

DataKeyState = Literal["active", "decrypt-only", "retired"]

KEY_BYTES = 32
NONCE_BYTES = 12
AAD_DOMAIN_TAG = b"bastion.events.v1.EncryptedField\x00"
INDEX_FILE = "keys.json"
# A protobuf full name never contains "@", so the first "@" of a context ends the field name unambiguously.
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
KEY_SUFFIX = re.compile(r"[0-9]{8}-[0-9a-f]{8}")


class DataKeyError(EventsError):
    """A data-key ring is missing a key it must have, or was asked to do something unsafe."""


class NotEntitledError(EventsError):
    """The ring does not hold the key a field was encrypted under: this reader may only see ciphertext."""


class FieldIntegrityError(EventsError):
    """An encrypted field failed authentication: tampered, truncated, or moved to another topic/field/aggregate."""


def field_context(field: str, aggregate_id: str) -> str:
    """The context that pins a ciphertext to one field of one aggregate, e.g.
    `bastion.accounts.v1.AccountOpened.owner_email@a1`."""
    if not FIELD_NAME.fullmatch(field):
        raise ValueError(f"{field!r} is not a fully qualified protobuf field name")
    return f"{field}@{aggregate_id}"


def _blob(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def associated_data(topic: str, context: str, key_id: str) -> bytes:
    """AAD = DOMAIN_TAG || len(topic) topic || len(context) context || len(key_id) key_id.

    Lengths are 4-byte big-endian, strings UTF-8: the length prefixes make the parts unambiguous, so no
    choice of topic, context or key id can produce another triple's bytes.
    """
    return AAD_DOMAIN_TAG + b"".join(_blob(part.encode("utf-8")) for part in (topic, context, key_id))


class DataKeyRing:
    """Per-topic AES-256 data keys in a folder: the producer's master copy, or a consumer's exported copy.

    Layout: FOLDER/TOPIC/keys.json (each key id's state and creation time) and FOLDER/TOPIC/YYYYMMDD-HEX.key
    (32 raw bytes, 0600), FOLDER/TOPIC itself 0700. Rotation mirrors the signing keys: `rotate` makes a new
    active key and turns the previous one decrypt-only, so fields already published still decrypt; `retire`
    deletes a key's material, which crypto-shreds whatever was encrypted under it.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _topic_dir(self, topic: str) -> Path:
        # The topic becomes a path component: a name like "../x" must never reach the file system.
        if not TOPIC_NAME.fullmatch(topic):
            raise DataKeyError(f"{topic!r} is not a valid topic name")
        return self.folder / topic

    def _private_topic_dir(self, topic: str) -> Path:
        # Owner-only (and the ring's folder above it, when new) before a key is written into it, and tightened
        # again if an older version left it open.
        folder = self._topic_dir(topic)
        private_folders(folder)
        os.chmod(folder, 0o700)
        return folder

    def _key_file(self, topic: str, key_id: str) -> Path:
        suffix = key_id.removeprefix(f"{topic}/")
        if suffix == key_id or not KEY_SUFFIX.fullmatch(suffix):
            raise DataKeyError(f"{key_id!r} is not a key id of topic {topic!r}")
        return self._topic_dir(topic) / f"{suffix}.key"

    def _load_index(self, topic: str) -> dict[str, dict[str, str]]:
        path = self._topic_dir(topic) / INDEX_FILE
        if not path.exists():
            return {}
        keys: dict[str, dict[str, str]] = json.loads(path.read_text())["keys"]
        return keys

    def _save_index(self, topic: str, keys: dict[str, dict[str, str]]) -> None:
        folder = self._private_topic_dir(topic)
        # Written aside then renamed: a crash mid-write must not lose the states of keys that still exist.
        temporary = folder / f".{INDEX_FILE}.{os.getpid()}.tmp"  # a name of its own: two writers never share one
        write_private(temporary, json.dumps({"keys": keys}, indent=2, sort_keys=True) + "\n")
        os.replace(temporary, folder / INDEX_FILE)

    def states(self, topic: str) -> dict[str, DataKeyState]:
        """Every key id this ring has recorded for TOPIC, with its state."""
        return {key_id: _state(entry) for key_id, entry in self._load_index(topic).items()}

    def created(self, topic: str) -> dict[str, str]:
        """Every key id this ring has recorded for TOPIC, with when it was made (ISO 8601, UTC)."""
        return {key_id: str(entry.get("created_at", "")) for key_id, entry in self._load_index(topic).items()}

    def ensure(self, topics: list[str]) -> None:
        """Give every topic that has no active key a first one (idempotent)."""
        with writer_lock(self.folder):
            for topic in topics:
                if "active" not in self.states(topic).values():
                    self.rotate(topic)

    def rotate(self, topic: str) -> str:
        """Create a new active key for TOPIC; the previous active key becomes decrypt-only."""
        with writer_lock(self.folder):  # read, changed and written back: one writer at a time
            return self._rotate(topic)

    def _rotate(self, topic: str) -> str:
        keys = self._load_index(topic)
        now = dt.datetime.now(dt.UTC)
        key_id = f"{topic}/{now:%Y%m%d}-{secrets.token_hex(4)}"
        while key_id in keys:
            key_id = f"{topic}/{now:%Y%m%d}-{secrets.token_hex(4)}"
        # Key material first: an index naming an active key that has no file would stop every producer.
        self._private_topic_dir(topic)
        write_private(self._key_file(topic, key_id), AESGCM.generate_key(bit_length=KEY_BYTES * 8))
        for entry in keys.values():
            if entry["state"] == "active":
                entry["state"] = "decrypt-only"
        keys[key_id] = {"state": "active", "created_at": now.isoformat(timespec="seconds")}
        self._save_index(topic, keys)
        return key_id

    def retire(self, topic: str, key_id: str) -> None:
        """Delete KEY_ID's material for good: what was encrypted under it can no longer be read by this ring."""
        with writer_lock(self.folder):
            keys = self._load_index(topic)
            entry = keys.get(key_id)
            if entry is None:
                raise DataKeyError(f"{key_id!r} is not a key of topic {topic!r} in {self.folder}")
            if entry["state"] == "active":
                raise DataKeyError(f"{key_id} is the active key of {topic}: rotate before retiring it")
            entry["state"] = "retired"
            self._save_index(topic, keys)
            self._key_file(topic, key_id).unlink(missing_ok=True)

    def export_to(self, other_folder: Path, topic: str) -> list[str]:
        """Make OTHER_FOLDER's copy of TOPIC hold exactly this ring's non-retired keys; returns their ids.

        Keys the copy holds but this ring retired (or never had) are deleted there, so re-exporting after
        `retire` also takes the key away from every consumer it was handed to.
        """
        other = DataKeyRing(other_folder)
        with writer_lock(self.folder), writer_lock(other_folder):  # this ring's keys stay as read until copied
            keys = self._load_index(topic)
            other._private_topic_dir(topic)
            exported: list[str] = []
            for key_id, entry in sorted(keys.items()):
                if entry["state"] == "retired":
                    continue
                material = self.get(topic, key_id)
                if material is None:
                    raise DataKeyError(f"key material of {key_id!r} is missing: expected "
                                       f"{self._key_file(topic, key_id)}")
                write_private(other._key_file(topic, key_id), material)
                exported.append(key_id)
            keep = {other._key_file(topic, key_id).name for key_id in exported}
            for stale in other._topic_dir(topic).glob("*.key"):
                if stale.name not in keep:
                    stale.unlink()
            other._save_index(topic, keys)
            return exported

    def active(self, topic: str) -> tuple[str, bytes]:
        """TOPIC's active key id and key; new fields are encrypted under it."""
        for key_id, state in self.states(topic).items():
            if state == "active":
                material = self.get(topic, key_id)
                if material is None:
                    raise DataKeyError(f"key material of {key_id!r} is missing from {self.folder}")
                return key_id, material
        raise DataKeyError(f"no active data key for topic {topic!r} in {self.folder}")

    def get(self, topic: str, key_id: str) -> bytes | None:
        """The key KEY_ID of TOPIC if this ring holds it (active or decrypt-only), else None."""
        entry = self._load_index(topic).get(key_id)
        if entry is None or entry["state"] not in ("active", "decrypt-only"):
            return None
        path = self._key_file(topic, key_id)
        if not path.exists():
            return None
        material = path.read_bytes()
        if len(material) != KEY_BYTES:
            raise DataKeyError(f"{path} is not a {KEY_BYTES}-byte AES key")
        return material


_STATES: dict[str, DataKeyState] = {"active": "active", "decrypt-only": "decrypt-only", "retired": "retired"}


def _state(entry: dict[str, str]) -> DataKeyState:
    state = _STATES.get(entry["state"])
    if state is None:
        raise DataKeyError(f"unknown data key state {entry['state']!r}")
    return state


def encrypt_field(ring: DataKeyRing, topic: str, context: str, plaintext: str) -> EncryptedField:
    """Encrypt PLAINTEXT under TOPIC's active key, bound to TOPIC, CONTEXT and the key id (see
    `associated_data`); CONTEXT should come from `field_context(field, aggregate_id)`."""
    key_id, key = ring.active(topic)
    # A random 96-bit nonce per field: at well under 2**32 encryptions per key the collision risk is
    # negligible, and rotation bounds how many fields one key ever sees.
    nonce = secrets.token_bytes(NONCE_BYTES)
    ciphertext = AESGCM(key).encrypt(nonce, plaintext.encode("utf-8"), associated_data(topic, context, key_id))
    return EncryptedField(key_id=key_id, nonce=nonce, ciphertext=ciphertext)


def decrypt_field(ring: DataKeyRing, topic: str, context: str, field: EncryptedField) -> str:
    """The plaintext of FIELD; NotEntitledError if RING lacks its key, FieldIntegrityError if it fails to
    authenticate for this topic and context."""
    if not field.key_id.startswith(f"{topic}/"):
        raise FieldIntegrityError(f"field encrypted under {field.key_id!r}, which is not a key of topic {topic!r}")
    if len(field.nonce) != NONCE_BYTES:
        raise FieldIntegrityError(f"nonce of a field under {field.key_id!r} is not {NONCE_BYTES} bytes")
    if not KEY_SUFFIX.fullmatch(field.key_id.removeprefix(f"{topic}/")):
        raise FieldIntegrityError(f"{field.key_id!r} is not a well-formed data key id")
    key = ring.get(topic, field.key_id)
    if key is None:
        raise NotEntitledError(f"this ring does not hold data key {field.key_id!r} of topic {topic!r}")
    try:
        plaintext = AESGCM(key).decrypt(field.nonce, field.ciphertext, associated_data(topic, context, field.key_id))
    except InvalidTag:
        raise FieldIntegrityError(
            f"field under {field.key_id!r} does not authenticate for topic {topic!r} and context {context!r}"
        ) from None
    return plaintext.decode("utf-8")


def reveal(ring: DataKeyRing | None, topic: str, context: str, field: EncryptedField) -> str | None:
    """The plaintext, or None when the reader is not entitled (no ring, or no key): for consumers that work
    on ciphertext alone. Tampering still raises FieldIntegrityError: it must never pass for "not entitled"."""
    if ring is None:
        return None
    try:
        return decrypt_field(ring, topic, context, field)
    except NotEntitledError:
        return None
