"""`bastion backup` against the test install's real PostgreSQL: a backup holds every database, encrypted (age
archives, a marker written before it nowhere in clear) and private; it verifies, and restores into a new database
with the marker back; an altered, extended, shortened, re-signed, linked or renamed backup is refused by `verify`
and by `restore`, which then creates nothing."""

import base64
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg import sql

from bastion.devstack import backups
from bastion.devstack.components.postgres import ADMIN_ROLE, Postgres
from bastion.devstack.context import StackContext
from tests.integration.conftest import bastion


def admin(ctx: StackContext, dbname: str = "postgres") -> psycopg.Connection[Any]:
    return psycopg.connect(Postgres(ctx).conninfo(ADMIN_ROLE, ctx.credentials.postgres[ADMIN_ROLE], dbname),
                           autocommit=True)


@pytest.fixture(scope="module")
def marker(stack: Any, ctx: StackContext) -> Iterator[str]:
    """A row only this test wrote, in a schema of its own in the accounts database."""
    value = f"it-backup-marker-{base64.b32encode(os.urandom(10)).decode()}"
    schema = "it_backup_" + value.rsplit("-", 1)[-1].lower()
    with admin(ctx, "accounts") as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("CREATE TABLE {}.marker (value text)").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("INSERT INTO {}.marker VALUES (%s)").format(sql.Identifier(schema)), [value])
    yield value
    with admin(ctx, "accounts") as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(scope="module")
def made(ctx: StackContext, marker: str) -> Iterator[Path]:
    before = set(backups.listed(ctx))
    result = bastion("backup", "create")
    assert result.returncode == 0, result.stdout + result.stderr
    [folder] = set(backups.listed(ctx)) - before
    yield folder
    shutil.rmtree(folder)


def test_a_backup_of_a_database_that_does_not_exist_fails_and_leaves_nothing(ctx: StackContext) -> None:
    before = set(backups.listed(ctx))
    result = bastion("backup", "create", "--database", "ledger")
    assert result.returncode == 2 and "pg_dump of ledger failed" in " ".join(result.stderr.split()), result.stderr
    assert set(backups.listed(ctx)) == before


def test_a_backup_holds_every_database_encrypted_signed_and_private(ctx: StackContext, made: Path,
                                                                   marker: str) -> None:
    verified = backups.verify(ctx, made)
    assert set(verified.databases) == set(Postgres(ctx).databases)
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    for path in made.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert marker.encode() not in path.read_bytes(), f"{path.name} holds the marker in clear"
    for path in made.glob(f"*{backups.SUFFIX}"):  # pg_dump compresses: the marker alone would not prove encryption
        assert path.read_bytes().startswith(b"age-encryption.org/v1\n"), path
        assert b"PGDMP" not in path.read_bytes()[:4096], path
    result = bastion("backup", "verify", made.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"backup {made.name} verified" in " ".join(result.stdout.split())


def test_a_restore_brings_the_data_back_into_a_new_database_and_leaves_the_live_one(ctx: StackContext, made: Path,
                                                                                     marker: str) -> None:
    result = bastion("backup", "restore", made.name, "accounts")
    assert result.returncode == 0, result.stdout + result.stderr
    target = f"restore_accounts_{made.name.lower()}"
    assert target in " ".join(result.stdout.split())
    try:
        schema = "it_backup_" + marker.rsplit("-", 1)[-1].lower()
        with admin(ctx, target) as conn:
            rows = conn.execute(sql.SQL("SELECT value FROM {}.marker").format(sql.Identifier(schema))).fetchall()
        assert rows == [(marker,)]
        again = bastion("backup", "restore", made.name, "accounts")
        assert again.returncode == 2 and "already exists" in " ".join(again.stderr.split()), again.stderr
    finally:
        with admin(ctx) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(target)))


def test_a_restore_that_fails_part_way_leaves_no_database(ctx: StackContext, small: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def load_then_fail(*args: Any) -> None:
        raise backups.BackupError("pg_restore into the new database failed (exit 1): simulated", "test")

    monkeypatch.setattr(backups, "_load", load_then_fail)
    with pytest.raises(backups.BackupError, match="simulated"):
        backups.restore(ctx, small, "accounts")
    with admin(ctx) as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname = %s",
                            [f"restore_accounts_{small.name.lower()}"]).fetchall()
    assert left == [], "the half-restored database is dropped"


def flip_a_byte(folder: Path) -> None:
    path = folder / "accounts.dump.age"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def grow_the_manifest(folder: Path) -> None:
    path = folder / backups.MANIFEST
    path.write_bytes(path.read_bytes().replace(b'"bytes":', b'"bytes":1', 1))


def resign(folder: Path) -> None:
    body = (folder / backups.MANIFEST).read_bytes()
    (folder / backups.SIGNATURE).write_bytes(base64.b64encode(Ed25519PrivateKey.generate().sign(body)))


def swap_in_another_archive(folder: Path) -> None:
    """What a thief with the (public) recipient can do: put an archive of their own in, digest and all."""
    (folder / "payments.dump.age").replace(folder / "accounts.dump.age")
    shutil.copy(folder / "accounts.dump.age", folder / "payments.dump.age")


def link_an_archive(folder: Path) -> None:
    (folder / "payments.dump.age").unlink()
    (folder / "payments.dump.age").symlink_to(folder / "accounts.dump.age")


@pytest.fixture()
def small(ctx: StackContext) -> Iterator[Path]:
    """A backup of two small databases, to damage."""
    before = set(backups.listed(ctx))
    result = bastion("backup", "create", "--database", "accounts", "--database", "payments")
    assert result.returncode == 0, result.stdout + result.stderr
    [folder] = set(backups.listed(ctx)) - before
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize(("damage", "reason"), [
    (flip_a_byte, "accounts.dump.age does not match its digest"),
    (grow_the_manifest, "signature does not verify"),
    (resign, "signature does not verify"),
    (swap_in_another_archive, "accounts.dump.age does not match its digest"),
    (lambda folder: (folder / "notes.txt").write_text("x"), "not in the manifest ['notes.txt']"),
    (lambda folder: (folder / "payments.dump.age").unlink(), "missing ['payments.dump.age']"),
    (link_an_archive, "payments.dump.age does not match its digest"),
], ids=["flipped-byte", "edited-manifest", "re-signed", "swapped-archive", "added-file", "missing-file", "symlink"])
def test_an_altered_backup_is_refused_and_restores_nothing(ctx: StackContext, small: Path, damage: Any,
                                                            reason: str) -> None:
    damage(small)
    assert_refused(ctx, small.name, reason)


def test_an_older_backup_renamed_to_pass_for_a_newer_one_is_refused(ctx: StackContext, small: Path) -> None:
    newer = small.parent / "29991231T235959000000Z"
    small.rename(newer)
    try:
        assert_refused(ctx, newer.name, "not at the time its folder is named after")
    finally:
        newer.rename(small)


def assert_refused(ctx: StackContext, name: str, reason: str) -> None:
    checked = bastion("backup", "verify", name)
    assert checked.returncode == 1 and reason in " ".join(checked.stderr.split()), checked.stderr
    restored = bastion("backup", "restore", name, "accounts")
    assert restored.returncode == 2 and reason in " ".join(restored.stderr.split()), restored.stderr
    with admin(ctx) as conn:
        created = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                               [f"restore_accounts_{name.lower()}%"]).fetchall()
    assert created == [], "nothing restored from a backup that does not verify"
    listed = bastion("backup", "list")
    assert listed.returncode == 1 and "NOT verified" in listed.stdout, "a backup that does not verify is a problem"
