"""Producer signing keys: one Ed25519 key pair per producer and key id, rotated without a flag day.

Layout in the state folder (`keys/events/`):
  trust-store.json            public keys of every producer, each `active`, `verify-only` or `retired`
  private/PRODUCER/KEY.pem    the private keys (0600); a service reads only its own
Rotation: `rotate` makes a new active key and turns the previous one `verify-only`, so events already in
flight still verify; `retire` removes a key from verification for good.

Running services follow the folder (`KeyRing.followed_trust_store`, `KeyRing.followed_signing_key`): they look
at the trust store's file every few seconds and read it again when it changed, so a rotation is picked up by
every producer and a retirement refused by every consumer within seconds, without a restart. The file is
replaced whole (`os.replace`), so a reader sees the old store or the new one, never half of each.
"""

import base64
import datetime as dt
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Literal, Protocol, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bastion.devstack.layout import write_private
from bastion.devstack.writer_lock import writer_lock
from bastion.events.errors import KeyNotFoundError, RejectReason, TrustStoreUnavailableError, VerificationError

KeyState = Literal["active", "verify-only", "retired"]
# How often a running service looks at the trust store's file for a rotation or a retirement (one stat call).
FOLLOW_CHECK_SECONDS = 2.0


@dataclass(frozen=True)
class SigningKey:
    producer: str
    key_id: str
    private_key: Ed25519PrivateKey

    def current(self) -> "SigningKey":
        """A fixed key is its own current key (see `KeySource`)."""
        return self


class KeySource(Protocol):
    """Where a signer takes the key to sign with: a fixed `SigningKey`, or the producer's key as the key ring
    says now (`KeyRing.followed_signing_key`). Take it once per signed batch, so its id and key go together."""

    @property
    def producer(self) -> str: ...

    def current(self) -> SigningKey: ...


class TrustStore:
    """The public half: which keys verify which producer's events."""

    def __init__(self, entries: dict[str, dict[str, tuple[Ed25519PublicKey, KeyState]]]) -> None:
        self._entries = entries

    @classmethod
    def from_json(cls, text: str) -> "TrustStore":
        raw = json.loads(text)
        entries: dict[str, dict[str, tuple[Ed25519PublicKey, KeyState]]] = {}
        for producer, keys in raw["producers"].items():
            entries[producer] = {
                key_id: (Ed25519PublicKey.from_public_bytes(base64.b64decode(entry["public_key"])), entry["state"])
                for key_id, entry in keys.items()
            }
        return cls(entries)

    @property
    def producers(self) -> set[str]:
        return set(self._entries)

    def current(self) -> "TrustStore":
        """A fixed store is its own current store (see `TrustSource`)."""
        return self

    def reload(self) -> "TrustStore":
        return self

    def public_key(self, producer: str, key_id: str) -> Ed25519PublicKey:
        """The key that verifies PRODUCER's events signed under KEY_ID; raises if unknown or retired."""
        keys = self._entries.get(producer)
        if keys is None:
            raise VerificationError(RejectReason.UNKNOWN_PRODUCER, f"producer {producer!r} is not in the trust store")
        entry = keys.get(key_id)
        if entry is None:
            raise VerificationError(RejectReason.UNKNOWN_KEY, f"key {key_id!r} is not a key of {producer!r}")
        key, state = entry
        if state not in ("active", "verify-only"):  # retired, or anything this code does not know: refuse
            raise VerificationError(RejectReason.UNKNOWN_KEY, f"key {key_id!r} of {producer!r} is {state}")
        return key

    def knows(self, producer: str, key_id: str) -> bool:
        """Whether PRODUCER has (or had) a key KEY_ID, in whatever state."""
        return key_id in self._entries.get(producer, {})

    def retired_key(self, producer: str, key_id: str) -> Ed25519PublicKey | None:
        """The public half of KEY_ID if PRODUCER had it and retired it, else None. Nothing it verifies is to be
        believed (a key is retired because it may have leaked); it only tells a line signed with it from noise."""
        entry = self._entries.get(producer, {}).get(key_id)
        return entry[0] if entry is not None and entry[1] == "retired" else None

    def retiring(self, producer: str, key_id: str) -> "TrustStore":
        """This store as it would be once PRODUCER's KEY_ID is retired (to check beforehand what that breaks)."""
        entries = {name: dict(keys) for name, keys in self._entries.items()}
        key, _ = entries[producer][key_id]
        entries[producer][key_id] = (key, "retired")
        return TrustStore(entries)


class TrustSource(Protocol):
    """Where a verifier takes the public keys from: a fixed `TrustStore`, or the key ring's trust store as its
    file says now (`KeyRing.followed_trust_store`)."""

    def current(self) -> TrustStore: ...

    def reload(self) -> TrustStore: ...


T = TypeVar("T")


class Followed(Generic[T]):
    """What LOAD makes of a file, made again when the file changed: its identity, size and modification time are
    looked at on `current()`, at most every CHECK_SECONDS. A load that fails raises, and the next look tries again:
    a caller never goes on with what it knows to be out of date."""

    def __init__(self, path: Path, load: Callable[[], T], check_seconds: float = FOLLOW_CHECK_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._load = load
        self.check_seconds = check_seconds
        self._clock = clock
        self._stamp = _stamp(path)
        self._value = load()
        self._next_look = clock() + check_seconds

    def current(self) -> T:
        now = self._clock()
        if now >= self._next_look:
            stamp = _stamp(self.path)
            if stamp != self._stamp:
                # A load that raises schedules no next look: every call looks (and raises) until the file loads.
                self._value = self._load()
                self._stamp = stamp
            self._next_look = now + self.check_seconds
        return self._value

    def reload(self) -> T:
        """Load now, whatever the file's stamp says."""
        stamp = _stamp(self.path)
        self._value = self._load()
        self._stamp = stamp
        return self._value


class FollowedSigningKey(Followed[SigningKey]):
    """A producer's active key as the key ring says now (a `KeySource`)."""

    def __init__(self, ring: "KeyRing", producer: str, check_seconds: float = FOLLOW_CHECK_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.producer = producer
        super().__init__(ring.trust_store_file, lambda: ring.signing_key(producer), check_seconds, clock)


def _stamp(path: Path) -> tuple[int, int, int, int] | None:
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


class KeyRing:
    """Creates, rotates and loads producer keys in a folder of the state directory."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @property
    def trust_store_file(self) -> Path:
        return self.folder / "trust-store.json"

    def _load_raw(self) -> dict[str, dict[str, dict[str, dict[str, str]]]]:
        if not self.trust_store_file.exists():
            if any((self.folder / "private").glob("*/*.pem")):
                # A ring that has keys but lost its trust store: starting an empty one would mint new keys and
                # leave every event and checkpoint the old ones signed unverifiable for good.
                raise TrustStoreUnavailableError(
                    f"the trust store {self.trust_store_file} is missing, though this ring holds private keys: "
                    "put it back (a copy of the state folder) rather than start a new one")
            return {"producers": {}}
        raw: dict[str, dict[str, dict[str, dict[str, str]]]] = json.loads(self.trust_store_file.read_text())
        return raw

    def _save_raw(self, raw: dict[str, dict[str, dict[str, dict[str, str]]]]) -> None:
        """Replace the trust store's file whole: a service reading it meanwhile gets the old one or the new one."""
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.trust_store_file.with_name(f".{self.trust_store_file.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        os.replace(partial, self.trust_store_file)

    def _private_file(self, producer: str, key_id: str) -> Path:
        return self.folder / "private" / producer / f"{key_id.replace('/', '_')}.pem"

    def trust_store(self) -> TrustStore:
        """The public keys as the file holds them now; a file that is missing, or cannot be read or understood,
        raises TrustStoreUnavailableError (a verifier must then refuse to go on, not go on with nothing: a missing
        file is not a store that trusts nobody)."""
        try:
            return TrustStore.from_json(self.trust_store_file.read_text())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise TrustStoreUnavailableError(
                f"the trust store {self.trust_store_file} cannot be read: {type(error).__name__}") from error

    def followed_trust_store(self, check_seconds: float = FOLLOW_CHECK_SECONDS,
                             clock: Callable[[], float] = time.monotonic) -> Followed[TrustStore]:
        """The trust store as its file says now (a `TrustSource`): a retired key stops verifying within
        CHECK_SECONDS in the process holding it."""
        return Followed(self.trust_store_file, self.trust_store, check_seconds, clock)

    def followed_signing_key(self, producer: str, check_seconds: float = FOLLOW_CHECK_SECONDS,
                             clock: Callable[[], float] = time.monotonic) -> FollowedSigningKey:
        """PRODUCER's active key as the ring says now: a rotation is signed with within CHECK_SECONDS."""
        return FollowedSigningKey(self, producer, check_seconds, clock)

    def ensure(self, producers: list[str]) -> None:
        """Give every producer that has no active key a first one (idempotent)."""
        with writer_lock(self.folder):
            raw = self._load_raw()
            for producer in producers:
                keys = raw["producers"].get(producer, {})
                if not any(entry["state"] == "active" for entry in keys.values()):
                    self.rotate(producer)

    def rotate(self, producer: str) -> str:
        """Create a new active key for PRODUCER; the previous active key becomes verify-only."""
        with writer_lock(self.folder):  # read, changed and written back: one writer at a time
            return self._rotate(producer)

    def _rotate(self, producer: str) -> str:
        raw = self._load_raw()
        keys = raw["producers"].setdefault(producer, {})
        for entry in keys.values():
            if entry["state"] == "active":
                entry["state"] = "verify-only"
        now = dt.datetime.now(dt.UTC)
        key_id = f"{producer}/{now:%Y%m%d}-{secrets.token_hex(4)}"
        private_key = Ed25519PrivateKey.generate()
        pem = private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_private(self._private_file(producer, key_id), pem)
        public = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        keys[key_id] = {"public_key": base64.b64encode(public).decode(), "state": "active",
                        "created_at": now.isoformat(timespec="seconds")}
        self._save_raw(raw)
        return key_id

    def state(self, producer: str, key_id: str) -> KeyState | None:
        """KEY_ID's state among PRODUCER's keys, or None if the ring has no such key."""
        entry = self._load_raw()["producers"].get(producer, {}).get(key_id)
        return None if entry is None else entry["state"]  # type: ignore[return-value]

    def retire(self, producer: str, key_id: str) -> None:
        """Stop verifying KEY_ID for good and delete its private key."""
        with writer_lock(self.folder):
            raw = self._load_raw()
            entry = raw["producers"][producer][key_id]
            if entry["state"] == "active":
                raise KeyNotFoundError(f"{key_id} is {producer}'s active key: rotate before retiring it")
            entry["state"] = "retired"
            self._save_raw(raw)
            self._private_file(producer, key_id).unlink(missing_ok=True)

    def signing_key(self, producer: str) -> SigningKey:
        """PRODUCER's active private key; a missing key fails with a message that names it."""
        keys = self._load_raw()["producers"].get(producer, {})
        active = [key_id for key_id, entry in keys.items() if entry["state"] == "active"]
        if not active:
            raise KeyNotFoundError(f"no active signing key for producer {producer!r} in {self.folder}")
        path = self._private_file(producer, active[0])
        if not path.exists():
            raise KeyNotFoundError(f"private key of {active[0]!r} is missing: expected {path}")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyNotFoundError(f"{path} is not an Ed25519 private key")
        return SigningKey(producer, active[0], key)
