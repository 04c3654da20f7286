"""The pure parts of encrypted backups: keys generated once and private, the manifest's signed form, and an archive
that decrypts only with the install's identity and only to a pg_dump archive (the rest runs against PostgreSQL in
tests/integration/test_backups.py)."""

import base64
import datetime as dt
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyrage
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyrage import x25519

from bastion import cli
from bastion.devstack import backups
from bastion.devstack.backups import PG_DUMP_MAGIC, BackupError, BackupKeys, _check_archive, canonical
from bastion.devstack.components.postgres import ADMIN_ROLE
from bastion.devstack.layout import StateLayout, write_private


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
    with pytest.raises(BackupError, match="no pg_dump archive"):
        _check_archive(archive(tmp_path, b"PGDM", identity.to_public()), identity, "accounts")
    with pytest.raises(BackupError, match="no pg_dump archive"):
        _check_archive(archive(tmp_path, b"PG" + b"\x00" * 100, identity.to_public()), identity, "accounts")
    cut = archive(tmp_path, PG_DUMP_MAGIC + b"\x00" * 200_000, identity.to_public())
    cut.write_bytes(cut.read_bytes()[:-1000])  # truncated: age knows the last chunk is missing
    with pytest.raises(BackupError, match="does not decrypt"):
        _check_archive(cut, identity, "accounts")


# `create`, `verify`, `find` and `restore` up to the database, on a scratch install: a stand-in `pg_dump` (a shell
# script writing what a custom-format archive starts with) and the install's real backup keys; no server.

FAKE_PG_DUMP = """#!/bin/sh
# pg_dump --format=custom --dbname NAME
if [ "$3" = ledger ]; then echo 'pg_dump: error: database "ledger" does not exist' >&2; exit 1; fi
printf 'PGDMP custom archive of %s' "$3"
if [ "$3" = big ]; then head -c 1048576 /dev/zero; fi
"""

FAKE_PG_RESTORE = """#!/bin/sh
# pg_restore ... --dbname TARGET, the archive on its input: keeps what it read, or stops as $RESTORE_MODE says.
case "$RESTORE_MODE" in
  refuse) head -c 10 > /dev/null; echo 'pg_restore: error: could not execute query' >&2; exit 1 ;;
  quit) exec 3<&0; (sleep 0.3; head -c 10 <&3 > /dev/null) & exit 0 ;;  # says 0 at once, then drops the rest
esac
cat > "$RESTORED"
"""


@pytest.fixture()
def ctx(tmp_path: Path) -> SimpleNamespace:
    """What the backup functions read of a StackContext: the layout, the PostgreSQL tools and the admin password."""
    layout = StateLayout(tmp_path / "state")
    layout.ensure()
    BackupKeys(layout.backup_keys_dir).ensure()
    tools = tmp_path / "pg-bin"
    tools.mkdir()
    for name in ("postgres", "initdb"):
        (tools / name).write_text("")
    (tools / "pg_dump").write_text(FAKE_PG_DUMP)
    (tools / "pg_dump").chmod(0o755)
    (tools / "pg_restore").write_text(FAKE_PG_RESTORE)
    (tools / "pg_restore").chmod(0o755)
    # Port 1: should a restore ever get as far as PostgreSQL in these tests, it reaches nothing.
    settings = SimpleNamespace(postgres_bin_dir=tools, public_host="127.0.0.1", postgres_port=1)
    return SimpleNamespace(layout=layout, settings=settings, credentials=SimpleNamespace(postgres={ADMIN_ROLE: "pw"}),
                           ca_file=tmp_path / "ca.pem", service_names=["accounts", "payments"])


MOMENT = dt.datetime(2026, 11, 28, 12, 30, 5, 123456, tzinfo=dt.UTC)


@pytest.fixture()
def made(ctx: SimpleNamespace) -> Path:
    return backups.create(ctx, now=MOMENT)  # type: ignore[arg-type]


def resign(ctx: SimpleNamespace, folder: Path, manifest: dict[str, Any] | bytes) -> None:
    """What only the holder of the install's backup key can do: sign a manifest of their choosing."""
    body = manifest if isinstance(manifest, bytes) else backups.canonical(manifest)
    (folder / backups.MANIFEST).write_bytes(body)
    signer = BackupKeys(ctx.layout.backup_keys_dir).signer()
    (folder / backups.SIGNATURE).write_bytes(base64.b64encode(signer.sign(body)) + b"\n")


def manifest_of(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / backups.MANIFEST).read_bytes()))


def test_a_backup_is_a_private_folder_named_after_its_signed_time_that_verifies(ctx: SimpleNamespace,
                                                                             made: Path) -> None:
    assert made == ctx.layout.backups_dir / "20261128T123005123456Z"
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    assert sorted(path.name for path in made.iterdir()) == [
        "accounts.dump.age", "keycloak.dump.age", "manifest.json", "manifest.sig", "payments.dump.age"]
    for path in made.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    manifest = manifest_of(made)
    assert (manifest["format"], manifest["created_at"]) == (1, "2026-11-28T12:30:05.123456+00:00")
    assert manifest["recipient"] == str(BackupKeys(ctx.layout.backup_keys_dir).recipient())
    for name, entry in manifest["databases"].items():
        content = (made / f"{name}.dump.age").read_bytes()
        assert (entry["bytes"], entry["sha256"]) == (len(content), hashlib.sha256(content).hexdigest()), name
    verified = backups.verify(ctx, made)  # type: ignore[arg-type]
    assert (verified.folder, verified.created_at, sorted(verified.databases)) == (
        made, manifest["created_at"], ["accounts", "keycloak", "payments"])
    assert backups.find(ctx, made.name) == made  # type: ignore[arg-type]
    assert backups.listed(ctx) == [made]  # type: ignore[arg-type]


def test_two_backups_a_moment_apart_are_two_folders(ctx: SimpleNamespace, made: Path) -> None:
    later = backups.create(ctx, ["accounts"], now=MOMENT + dt.timedelta(microseconds=1))  # type: ignore[arg-type]
    assert later != made and backups.listed(ctx) == [made, later]  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["ledger", "Accounts", "../accounts", "accounts; DROP", ""])
def test_a_backup_that_cannot_be_made_leaves_nothing(ctx: SimpleNamespace, name: str) -> None:
    with pytest.raises(BackupError, match="pg_dump of ledger failed .exit 1.: pg_dump: error: database" if
                       name == "ledger" else "is not a database name"):
        backups.create(ctx, ["accounts", name], now=MOMENT)  # type: ignore[arg-type]
    assert list(ctx.layout.backups_dir.glob("*")) == [], "no half backup is left to be mistaken for one"


@pytest.mark.parametrize("unwritten", [backups.MANIFEST, backups.SIGNATURE])
def test_a_backup_whose_manifest_cannot_be_written_leaves_nothing(ctx: SimpleNamespace, unwritten: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk at the manifest left the archives behind, and `backup list` showed the folder as a backup."""
    write = write_private

    def full_disk(path: Path, content: bytes) -> None:
        if path.name == unwritten:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(path, content)

    monkeypatch.setattr(backups, "write_private", full_disk)
    with pytest.raises(BackupError, match="not made: its signed manifest cannot be written: No space left"):
        backups.create(ctx, now=MOMENT)  # type: ignore[arg-type]
    assert list(ctx.layout.backups_dir.glob("*")) == [], "no half backup is left to be mistaken for one"


def test_a_folder_without_a_signed_manifest_is_listed_as_incomplete_and_never_used(
        ctx: SimpleNamespace, made: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """What a create killed before it could clean up leaves: archives, no signature. Never presented as a backup."""
    (made / backups.SIGNATURE).unlink()
    assert backups.incomplete(made)
    for attempt in (lambda: backups.verify(ctx, made), lambda: backups.restore(ctx, made, "accounts")):  # type: ignore[arg-type]
        with pytest.raises(BackupError, match="is incomplete: no signed manifest"):
            attempt()
    monkeypatch.setattr(cli, "_stack", lambda quiet=False: SimpleNamespace(context=lambda: ctx))
    monkeypatch.setenv("COLUMNS", "200")  # the row on one line
    assert cli.main(["backup", "list"]) == 1
    row = next(line for line in capsys.readouterr().out.splitlines() if made.name in line)
    assert "NOT verified" in row and "is incomplete: no signed manifest" in row


def test_find_and_listed_take_only_folders_named_as_backups(ctx: SimpleNamespace, made: Path,
                                                           tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / made.name
    shutil.copytree(made, outside)
    for name in ("../elsewhere/" + made.name, "latest", made.name + "/", made.name.lower()):
        with pytest.raises(BackupError, match="is not a backup name"):
            backups.find(ctx, name)  # type: ignore[arg-type]
    (ctx.layout.backups_dir / "20261128T123005Z").write_text("a file, not a backup")
    with pytest.raises(BackupError, match="no backup 20261128T123005Z"):
        backups.find(ctx, "20261128T123005Z")  # type: ignore[arg-type]
    (ctx.layout.backups_dir / "20261128T123006Z").symlink_to(outside, target_is_directory=True)
    with pytest.raises(BackupError, match="no backup 20261128T123006Z"):
        backups.find(ctx, "20261128T123006Z")  # type: ignore[arg-type]
    (ctx.layout.backups_dir / "notes").mkdir()
    listed = [path.name for path in backups.listed(ctx)]  # type: ignore[arg-type]
    assert made.name in listed and "notes" not in listed and "20261128T123005Z" not in listed


def test_a_backup_folder_that_is_a_symbolic_link_is_refused(ctx: SimpleNamespace, made: Path,
                                                           tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    made.rename(elsewhere)
    made.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(BackupError, match="is a symbolic link"):
        backups.verify(ctx, made)  # type: ignore[arg-type]


def flip_a_byte(folder: Path) -> None:
    path = folder / "accounts.dump.age"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def same_size_other_archive(folder: Path) -> None:
    """An archive of the same length encrypted to the install's (public) recipient: only the digest tells."""
    path = folder / "accounts.dump.age"
    recipient = x25519.Recipient.from_str(manifest_of(folder)["recipient"])
    while True:
        out = io.BytesIO()
        pyrage.encrypt_io(io.BytesIO(b"PGDMP custom archive of mallory"[:len("PGDMP custom archive of accounts")]),
                          out, [recipient])
        if len(out.getvalue()) == path.stat().st_size:
            path.write_bytes(out.getvalue())
            return


def link_to_an_identical_copy(folder: Path) -> None:
    """A symbolic link whose target holds the very bytes signed: whatever it points to can change after verify."""
    path = folder / "payments.dump.age"
    copy = folder.parent / "copy-of-payments.dump.age"
    shutil.copy(path, copy)
    path.unlink()
    path.symlink_to(copy)


@pytest.mark.parametrize(("damage", "reason"), [
    (flip_a_byte, "accounts.dump.age does not match its digest"),
    (same_size_other_archive, "accounts.dump.age does not match its digest"),
    (lambda folder: (folder / "payments.dump.age").write_bytes(b"x"), "payments.dump.age does not match"),
    (link_to_an_identical_copy, "payments.dump.age does not match its digest"),
    (lambda folder: (folder / "notes.txt").write_text("x"), "not in the manifest ['notes.txt']"),
    (lambda folder: (folder / "payments.dump.age").unlink(), "missing ['payments.dump.age']"),
    (lambda folder: (folder / backups.SIGNATURE).unlink(), "is incomplete: no signed manifest"),
    (lambda folder: (folder / backups.SIGNATURE).write_bytes(b"not base64!\n"), "manifest or signature unreadable"),
    (lambda folder: (folder / backups.SIGNATURE).write_bytes(
        base64.b64encode(Ed25519PrivateKey.generate().sign((folder / backups.MANIFEST).read_bytes()))),
     "signature does not verify with this install's backup key"),
    (lambda folder: (folder / backups.MANIFEST).write_bytes(
        (folder / backups.MANIFEST).read_bytes().replace(b'"bytes":', b'"bytes":1', 1)), "signature does not verify"),
], ids=["flipped-byte", "same-size-archive", "shortened", "symlink", "added-file", "missing-file", "no-signature",
        "signature-not-base64", "re-signed-by-another-key", "edited-manifest"])
def test_an_altered_backup_is_refused(ctx: SimpleNamespace, made: Path, damage: Any, reason: str) -> None:
    damage(made)
    with pytest.raises(BackupError) as refused:
        backups.verify(ctx, made, decrypt=False)  # type: ignore[arg-type]
    assert reason in str(refused.value)


def test_a_signature_with_characters_outside_base64_is_unreadable(ctx: SimpleNamespace, made: Path) -> None:
    """Nothing but the signature's base64 is accepted in its file (b64decode would otherwise skip the rest)."""
    path = made / backups.SIGNATURE
    encoded = path.read_bytes().strip()
    path.write_bytes(encoded[:10] + b"*" + encoded[10:] + b"\n")
    with pytest.raises(BackupError, match="manifest or signature unreadable"):
        backups.verify(ctx, made, decrypt=False)  # type: ignore[arg-type]


def signed_in_archive(ctx: SimpleNamespace, made: Path, database: str, content: bytes) -> dict[str, Any]:
    """DATABASE's archive replaced by CONTENT encrypted to the backup's recipient, and signed into its manifest (as
    only the install's backup key could); returns the manifest."""
    manifest = manifest_of(made)
    path = made / f"{database}.dump.age"
    out = io.BytesIO()
    pyrage.encrypt_io(io.BytesIO(content), out, [x25519.Recipient.from_str(manifest["recipient"])])
    path.write_bytes(out.getvalue())
    manifest["databases"][database].update(bytes=path.stat().st_size, sha256=backups._digest(path))
    resign(ctx, made, manifest)
    return manifest


def test_verify_decrypts_each_archive_only_when_asked(ctx: SimpleNamespace, made: Path) -> None:
    """An archive encrypted to the (public) recipient and signed into the manifest, but no pg_dump archive."""
    manifest = signed_in_archive(ctx, made, "accounts", b"#!/bin/sh\n")
    assert backups.verify(ctx, made, decrypt=False).created_at == manifest["created_at"]  # type: ignore[arg-type]
    with pytest.raises(BackupError, match=r"accounts\.dump\.age decrypts to 10 bytes that are no pg_dump archive"):
        backups.verify(ctx, made)  # type: ignore[arg-type]


@pytest.mark.parametrize("change", [
    lambda manifest: manifest.update(format=2),
    lambda manifest: manifest.update(databases=[["accounts", manifest["databases"]["accounts"]]]),
    lambda manifest: manifest["databases"]["accounts"].update(comment="x"),
    lambda manifest: manifest["databases"]["accounts"].update(file="payments.dump.age"),
    lambda manifest: manifest["databases"]["accounts"].update(bytes=str(manifest["databases"]["accounts"]["bytes"])),
    lambda manifest: manifest["databases"]["accounts"].update(sha256=None),
    lambda manifest: manifest["databases"].update(accounts=["file", "bytes", "sha256"]),
    lambda manifest: manifest.pop("created_at"),
    lambda manifest: manifest.update(created_at=1),
    lambda manifest: manifest.update(created_at="yesterday"),
], ids=["format", "databases-not-a-map", "extra-field", "another-database's-file", "bytes-text",
        "digest-not-text", "entry-not-a-map", "no-time", "time-not-text", "time-unreadable"])
def test_a_signed_manifest_of_another_shape_is_refused(ctx: SimpleNamespace, made: Path, change: Any) -> None:
    manifest = manifest_of(made)
    change(manifest)
    resign(ctx, made, manifest)
    with pytest.raises(BackupError, match="the manifest is not of format 1"):
        backups.verify(ctx, made, decrypt=False)  # type: ignore[arg-type]


def test_a_signed_manifest_naming_a_database_of_another_form_is_refused(ctx: SimpleNamespace, made: Path) -> None:
    """Even with its file there under that name: the name becomes the restored database's."""
    manifest = manifest_of(made)
    (made / "accounts.dump.age").rename(made / "Accounts.dump.age")
    manifest["databases"]["Accounts"] = {**manifest["databases"].pop("accounts"), "file": "Accounts.dump.age"}
    resign(ctx, made, manifest)
    with pytest.raises(BackupError, match="the manifest is not of format 1"):
        backups.verify(ctx, made, decrypt=False)  # type: ignore[arg-type]


def test_a_signed_manifest_not_in_its_canonical_form_is_refused(ctx: SimpleNamespace, made: Path) -> None:
    resign(ctx, made, json.dumps(manifest_of(made), indent=1).encode())
    with pytest.raises(BackupError, match="the manifest is not of format 1"):
        backups.verify(ctx, made, decrypt=False)  # type: ignore[arg-type]


def test_a_backup_renamed_to_pass_for_another_time_is_refused(ctx: SimpleNamespace, made: Path) -> None:
    newer = made.rename(made.parent / "29991231T235959000000Z")
    with pytest.raises(BackupError, match="not at the time its folder is named after"):
        backups.verify(ctx, newer, decrypt=False)  # type: ignore[arg-type]


def test_a_manifest_time_with_another_offset_is_named_by_its_utc_time(ctx: SimpleNamespace, made: Path) -> None:
    manifest = manifest_of(made)
    manifest["created_at"] = "2026-11-28T14:30:05.123456+02:00"  # the same moment as the folder's name
    resign(ctx, made, manifest)
    assert backups.verify(ctx, made, decrypt=False).created_at == manifest["created_at"]  # type: ignore[arg-type]


def test_keys_of_another_kind_are_refused(tmp_path: Path) -> None:
    keys = BackupKeys(tmp_path / "backup")
    keys.ensure()
    other = ec.generate_private_key(ec.SECP256R1())
    keys.signing_file.write_bytes(other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    with pytest.raises(BackupError, match=r"signing\.pem is not an Ed25519 private key"):
        keys.signer()
    keys.verify_file.write_bytes(other.public_key().public_bytes(serialization.Encoding.PEM,
                                                                 serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(BackupError, match=r"signing\.pub is not an Ed25519 public key"):
        keys.verifier()


def test_the_keys_folder_is_owner_only_and_a_key_is_never_written_over(tmp_path: Path) -> None:
    keys = BackupKeys(tmp_path / "keys" / "backup")
    keys.ensure()
    assert stat.S_IMODE(keys.folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700, "every folder it had to make, not the last"
    with pytest.raises(FileExistsError):
        backups._write_new(keys.identity_file, "AGE-SECRET-KEY-1...")


def test_a_tool_that_outlives_its_time_is_killed() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    started = time.monotonic()
    backups._finish(sleeper, 0.2)
    assert sleeper.returncode == -signal.SIGKILL and time.monotonic() - started < 10


def test_a_restore_of_a_database_the_backup_does_not_hold_is_refused(ctx: SimpleNamespace, made: Path) -> None:
    with pytest.raises(BackupError, match="holds no database 'ledger'") as refused:
        backups.restore(ctx, made, "ledger")  # type: ignore[arg-type]
    assert refused.value.remedy == "it holds accounts, keycloak, payments"


def test_a_restore_refuses_a_backup_that_does_not_verify_in_full(ctx: SimpleNamespace, made: Path) -> None:
    """restore decrypts every archive before it creates a database: a signed archive that is no pg_dump stops it."""
    signed_in_archive(ctx, made, "payments", b"not a dump")
    with pytest.raises(BackupError, match="no pg_dump archive"):
        backups.restore(ctx, made, "accounts")  # type: ignore[arg-type]


def test_an_archive_changed_after_it_was_verified_is_refused_before_any_database_is_made(
        ctx: SimpleNamespace, made: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    verify = backups.verify

    def verify_then_swap(*args: Any, **kwargs: Any) -> backups.Verified:
        verified = verify(*args, **kwargs)
        flip_a_byte(made)  # someone writing to the backups between verify and the copy
        return verified

    monkeypatch.setattr(backups, "verify", verify_then_swap)
    with pytest.raises(BackupError, match=r"accounts\.dump\.age changed after it was verified"):
        backups.restore(ctx, made, "accounts")  # type: ignore[arg-type]


class AdminConnection:
    """PostgreSQL's admin connection as restore uses it: notes each statement; ON_CREATE runs at CREATE DATABASE."""

    def __init__(self, statements: list[str], existing: set[str], on_create: Any) -> None:
        self.statements, self.existing, self.on_create = statements, existing, on_create

    def __enter__(self) -> "AdminConnection":
        return self

    def __exit__(self, *_exc: object) -> None:
        pass

    def execute(self, query: Any, params: list[str] | None = None) -> Any:
        text = query if isinstance(query, str) else query.as_string(None)
        self.statements.append(text)
        if text.startswith("CREATE DATABASE"):
            self.on_create()
        return SimpleNamespace(fetchone=lambda: (1,) if params and params[0] in self.existing else None)


@pytest.fixture()
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SimpleNamespace:
    """A stand-in for the install's PostgreSQL: the admin connection's statements, what pg_restore was given."""
    noted = SimpleNamespace(statements=[], existing=set(), on_create=lambda: None, restored=tmp_path / "restored")

    class FakePostgres(backups.Postgres):
        def admin(self) -> Any:
            return AdminConnection(noted.statements, noted.existing, noted.on_create)

    monkeypatch.setattr(backups, "Postgres", FakePostgres)
    monkeypatch.setenv("RESTORED", str(noted.restored))
    return noted


def test_a_restore_loads_the_verified_archive_into_a_new_database(ctx: SimpleNamespace, made: Path,
                                                                  server: SimpleNamespace) -> None:
    target = backups.restore(ctx, made, "accounts")  # type: ignore[arg-type]
    assert target == "restore_accounts_20261128t123005123456z"
    assert server.restored.read_bytes() == b"PGDMP custom archive of accounts"
    assert server.statements == ["SELECT 1 FROM pg_database WHERE datname = %s",
                                 'CREATE DATABASE "restore_accounts_20261128t123005123456z"']


def test_a_restore_reads_its_private_copy_not_the_backup_folder(ctx: SimpleNamespace, made: Path,
                                                                server: SimpleNamespace) -> None:
    """Whatever is written into the backup after the copy was checked never reaches the database."""
    server.on_create = lambda: flip_a_byte(made)
    backups.restore(ctx, made, "accounts")  # type: ignore[arg-type]
    assert server.restored.read_bytes() == b"PGDMP custom archive of accounts"


def test_a_restore_into_a_database_that_exists_is_refused(ctx: SimpleNamespace, made: Path,
                                                          server: SimpleNamespace) -> None:
    server.existing.add("restore_accounts_20261128t123005123456z")
    with pytest.raises(BackupError, match="database restore_accounts_20261128t123005123456z already exists"):
        backups.restore(ctx, made, "accounts")  # type: ignore[arg-type]
    assert not any(statement.startswith(("CREATE", "DROP")) for statement in server.statements)


@pytest.mark.parametrize(("database", "mode", "reason"), [
    ("accounts", "refuse", "failed (exit 1): pg_restore: error: could not execute query"),
    ("big", "quit", "big.dump.age does not decrypt with this install's identity"),
], ids=["pg_restore-fails", "archive-not-read-to-its-end"])
def test_a_restore_that_fails_drops_the_new_database(ctx: SimpleNamespace, server: SimpleNamespace,
                                                     monkeypatch: pytest.MonkeyPatch, database: str, mode: str,
                                                     reason: str) -> None:
    """pg_restore stopping with an error, or with exit status 0 before it read the archive (1 MiB: more than a pipe
    holds) to its end: neither is a restore."""
    made = backups.create(ctx, [database], now=MOMENT)  # type: ignore[arg-type]
    monkeypatch.setenv("RESTORE_MODE", mode)
    with pytest.raises(BackupError) as failed:
        backups.restore(ctx, made, database)  # type: ignore[arg-type]
    assert reason in " ".join(str(failed.value).split())
    assert server.statements[-1] == f'DROP DATABASE IF EXISTS "restore_{database}_20261128t123005123456z"'


def test_the_postgresql_tools_connect_over_verified_tls_with_the_password_kept_off_the_command_line(
        ctx: SimpleNamespace) -> None:
    env = backups._pg_env(ctx)  # type: ignore[arg-type]
    assert {key: env[key] for key in ("PGHOST", "PGHOSTADDR", "PGPORT", "PGUSER", "PGPASSWORD", "PGSSLMODE",
                                      "PGSSLROOTCERT")} == {
        "PGHOST": "postgres.bastion.local", "PGHOSTADDR": "127.0.0.1", "PGPORT": "1", "PGUSER": ADMIN_ROLE,
        "PGPASSWORD": "pw", "PGSSLMODE": "verify-full", "PGSSLROOTCERT": str(ctx.ca_file)}


def test_database_names_are_checked_before_any_is_dumped_and_each_is_dumped_once(
        ctx: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--database accounts --database ../x` dumped accounts before refusing ../x; `--database accounts --database
    accounts` dumped it twice into one file and ended in FileExistsError ("unexpected ... please report this")."""
    dumped: list[str] = []
    dump = backups._dump_encrypted

    def noted(ctx: Any, postgres: Any, name: str, target: Path, recipient: Any) -> None:
        dumped.append(name)
        dump(ctx, postgres, name, target, recipient)

    monkeypatch.setattr(backups, "_dump_encrypted", noted)
    with pytest.raises(BackupError, match="is not a database name"):
        backups.create(ctx, ["accounts", "../x"], now=MOMENT)  # type: ignore[arg-type]
    assert dumped == []
    folder = backups.create(ctx, ["accounts", "accounts"], now=MOMENT)  # type: ignore[arg-type]
    assert dumped == ["accounts"] and list(backups.verify(ctx, folder).databases) == ["accounts"]  # type: ignore[arg-type]
