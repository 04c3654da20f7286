"""The pure parts of encrypted backups: keys generated once and private, the manifest's signed form, and an archive
that decrypts only with the install's identity and only to a pg_dump archive (the rest runs against PostgreSQL in
tests/integration/test_backups.py)."""

import io
import stat
from pathlib import Path

import pyrage
import pytest
from pyrage import x25519

from bastion.devstack.backups import PG_DUMP_MAGIC, BackupError, BackupKeys, _check_archive, canonical


def test_keys_are_generated_once_private_and_never_replaced(tmp_path: Path) -> None:
    keys = BackupKeys(tmp_path / "backup")
    assert keys.ensure() is True
    for private in (keys.identity_file, keys.signing_file):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    identity = keys.identity_file.read_bytes()
    assert keys.ensure() is False and keys.identity_file.read_bytes() == identity
    assert str(keys.identity().to_public()) == str(keys.recipient())
    keys.verifier().verify(keys.signer().sign(b"manifest"), b"manifest")


@pytest.mark.parametrize("lost", ["identity_file", "signing_file"])
def test_a_lost_key_is_made_again_alone_and_the_other_kept(tmp_path: Path, lost: str) -> None:
    keys = BackupKeys(tmp_path / "backup")
    keys.ensure()
    kept = "signing_file" if lost == "identity_file" else "identity_file"
    before = getattr(keys, kept).read_bytes()
    getattr(keys, lost).unlink()
    assert keys.ensure() is True
    assert getattr(keys, kept).read_bytes() == before, "an existing key is never replaced"
    assert str(keys.identity().to_public()) == str(keys.recipient())
    keys.verifier().verify(keys.signer().sign(b"m"), b"m")


def test_missing_keys_name_the_file_and_the_remedy(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match=r"identity\.age cannot be read") as raised:
        BackupKeys(tmp_path / "none").identity()
    assert "bastion setup" in raised.value.remedy


def test_the_manifest_is_signed_in_one_canonical_form() -> None:
    assert canonical({"b": 1, "a": {"d": [1, 2], "c": "x"}}) == b'{"a":{"c":"x","d":[1,2]},"b":1}'


def archive(tmp_path: Path, content: bytes, recipient: x25519.Recipient) -> Path:
    path = tmp_path / "accounts.dump.age"
    out = io.BytesIO()
    pyrage.encrypt_io(io.BytesIO(content), out, [recipient])
    path.write_bytes(out.getvalue())
    return path


def test_an_archive_decrypts_only_with_the_identity_and_only_to_a_pg_dump(tmp_path: Path) -> None:
    identity = x25519.Identity.generate()
    _check_archive(archive(tmp_path, PG_DUMP_MAGIC + b"\x00" * 70_000, identity.to_public()), identity, "accounts")
    with pytest.raises(BackupError, match="does not decrypt with this install's identity"):
        _check_archive(archive(tmp_path, PG_DUMP_MAGIC, identity.to_public()), x25519.Identity.generate(), "accounts")
    with pytest.raises(BackupError, match="no pg_dump archive"):
        _check_archive(archive(tmp_path, b"#!/bin/sh\nrm -rf /\n", identity.to_public()), identity, "accounts")
    cut = archive(tmp_path, PG_DUMP_MAGIC + b"\x00" * 200_000, identity.to_public())
    cut.write_bytes(cut.read_bytes()[:-1000])  # truncated: age knows the last chunk is missing
    with pytest.raises(BackupError, match="does not decrypt"):
        _check_archive(cut, identity, "accounts")
