"""The key ring's own rules: one first key per producer, never a second; a retired key's private half deleted; only
an Ed25519 key signs; only an active or verify-only key verifies; a trust store that cannot be understood is
unavailable, never read as one that trusts nobody (or somebody)."""

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bastion.events.errors import KeyNotFoundError, RejectReason, TrustStoreUnavailableError, VerificationError
from bastion.events.keys import KeyRing
from tests.unit.conftest import SERVICES


def private_keys(ring: KeyRing, producer: str) -> list[Path]:
    return sorted((ring.folder / "private" / producer).glob("*.pem"))


def set_state(ring: KeyRing, producer: str, key_id: str, state: str) -> None:
    """Edit the trust store's file by hand, as an operator might."""
    raw = json.loads(ring.trust_store_file.read_text())
    raw["producers"][producer][key_id]["state"] = state
    ring.trust_store_file.write_text(json.dumps(raw))


def test_ensure_gives_each_producer_one_first_key_and_changes_nothing_after(ring: KeyRing) -> None:
    keys = {producer: ring.signing_key(producer).key_id for producer in SERVICES}
    ring.ensure([*SERVICES, "ledger"])
    ring.ensure([*SERVICES, "ledger"])
    assert {producer: ring.signing_key(producer).key_id for producer in SERVICES} == keys
    assert len(private_keys(ring, "ledger")) == 1 and len(private_keys(ring, "accounts")) == 1


def test_ensure_gives_a_new_active_key_to_a_producer_left_without_one(ring: KeyRing) -> None:
    old = ring.signing_key("accounts").key_id
    set_state(ring, "accounts", old, "verify-only")
    ring.ensure(list(SERVICES))
    assert ring.signing_key("accounts").key_id != old
    assert ring.state("accounts", old) == "verify-only"


def test_retiring_a_key_deletes_its_private_half(ring: KeyRing) -> None:
    old = ring.signing_key("accounts").key_id
    new = ring.rotate("accounts")
    assert len(private_keys(ring, "accounts")) == 2
    ring.retire("accounts", old)
    assert [path.stem for path in private_keys(ring, "accounts")] == [new.replace("/", "_")]


def test_a_private_key_that_is_not_ed25519_never_signs(ring: KeyRing) -> None:
    [path] = private_keys(ring, "accounts")
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(other)
    with pytest.raises(KeyNotFoundError, match="is not an Ed25519 private key"):
        ring.signing_key("accounts")


@pytest.mark.parametrize("state", ["retired", "revoked", "Active", ""])
def test_only_an_active_or_verify_only_key_verifies(ring: KeyRing, state: str) -> None:
    """A state this code does not know (a typo, a newer tool's) is refused like a retired one."""
    key_id = ring.signing_key("accounts").key_id
    assert ring.trust_store().public_key("accounts", key_id) is not None
    set_state(ring, "accounts", key_id, state)
    with pytest.raises(VerificationError) as refusal:
        ring.trust_store().public_key("accounts", key_id)
    assert refusal.value.reason == RejectReason.UNKNOWN_KEY


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",  # not an object
        "{}",  # no producers
        '{"producers": []}',  # producers not a mapping
        '{"producers": {"accounts": {"k": {"state": "active"}}}}',  # no public key
        '{"producers": {"accounts": {"k": {"public_key": 5, "state": "active"}}}}',  # not base64 text
        '{"producers": {"accounts": {"k": {"public_key": "AAAA", "state": "active"}}}}',  # not an Ed25519 key
    ],
)
def test_a_trust_store_that_cannot_be_understood_is_unavailable(ring: KeyRing, text: str) -> None:
    ring.trust_store_file.write_text(text)
    with pytest.raises(TrustStoreUnavailableError, match=r"trust-store\.json cannot be read"):
        ring.trust_store()


def test_a_trust_store_that_cannot_be_read_is_unavailable(ring: KeyRing) -> None:
    ring.trust_store_file.unlink()
    ring.trust_store_file.mkdir()  # a directory where the file was
    with pytest.raises(TrustStoreUnavailableError, match="IsADirectoryError"):
        ring.trust_store()
