"""Personal data at rest: AES-256-GCM under a key kept in a 0600 file outside the database, each ciphertext
bound to the recipient row it belongs to, so a copied database (or a row swapped with another) reveals nothing."""

import hashlib
import secrets
import stat
import struct
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion.devstack.layout import write_private
from services.notifications.domain import NotificationsError, SealedEmail

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
AAD_DOMAIN_TAG = b"bastion.notifications.recipients.email\x00"
KEY_ID_TAG = b"bastion.notifications.at-rest-key-id\x00"


class AtRestKeyError(NotificationsError):
    """The at-rest key file is missing, malformed or readable by others, or a value was sealed under another key."""


class AtRestIntegrityError(NotificationsError):
    """A sealed value failed authentication: tampered, truncated, or moved to another recipient's row."""


def associated_data(recipient: str, key_id: str) -> bytes:
    """AAD = DOMAIN_TAG || len(recipient) recipient || len(key_id) key_id (4-byte big-endian lengths, UTF-8)."""
    return AAD_DOMAIN_TAG + b"".join(struct.pack(">I", len(p)) + p for p in (recipient.encode(), key_id.encode()))


class AtRestCipher:
    """Seals and opens e-mail addresses with the key in KEY_FILE (see `generate`)."""

    def __init__(self, key_file: Path) -> None:
        if not key_file.is_file():
            raise AtRestKeyError(f"the notifications at-rest key is missing: expected {key_file}")
        if key_file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise AtRestKeyError(f"{key_file} is readable by others: it must be 0600")
        key = key_file.read_bytes()
        if len(key) != KEY_BYTES:
            raise AtRestKeyError(f"{key_file} is not a {KEY_BYTES}-byte AES key")
        self._aead = AESGCM(key)
        # Derived from the key (one-way), so a row names the key it needs without a separate index to keep.
        self.key_id = "at-rest/" + hashlib.sha256(KEY_ID_TAG + key).hexdigest()[:16]

    @classmethod
    def generate(cls, key_file: Path) -> "AtRestCipher":
        """Create a new key in KEY_FILE (0600); never overwrites one, since that would shred every sealed value."""
        if key_file.exists():
            raise AtRestKeyError(f"{key_file} already exists: refusing to replace the at-rest key")
        write_private(key_file, AESGCM.generate_key(bit_length=KEY_BYTES * 8))
        return cls(key_file)

    def encrypt(self, plaintext: str, recipient: str) -> SealedEmail:
        nonce = secrets.token_bytes(NONCE_BYTES)
        ciphertext = self._aead.encrypt(nonce, plaintext.encode(), associated_data(recipient, self.key_id))
        return SealedEmail(self.key_id, nonce + ciphertext)

    def decrypt(self, sealed: SealedEmail, recipient: str) -> str:
        if sealed.key_id != self.key_id:
            raise AtRestKeyError(f"sealed under key {sealed.key_id!r}, but this cipher holds {self.key_id!r}")
        if len(sealed.blob) < NONCE_BYTES + TAG_BYTES:
            raise AtRestIntegrityError(f"the sealed e-mail of {recipient!r} is truncated")
        nonce, ciphertext = sealed.blob[:NONCE_BYTES], sealed.blob[NONCE_BYTES:]
        try:
            return self._aead.decrypt(nonce, ciphertext, associated_data(recipient, sealed.key_id)).decode()
        except InvalidTag:
            raise AtRestIntegrityError(f"the sealed e-mail of {recipient!r} does not authenticate") from None
