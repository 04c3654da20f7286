"""The backup lab: a thief with a copy of a backup folder. They cannot read it (age, to the install's recipient),
cannot open it with an identity of their own, and cannot slip a database of their own in under the manifest: the
lab makes a backup of the notifications database, attacks a copy of it, and removes both."""

import io
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyrage
from pyrage import x25519

from bastion.devstack import backups
from bastion.labs.base import Evidence
from bastion.labs.platform import LabSetupError, Session

# How `backups.verify` refuses an archive that is not the one the signed manifest names (bastion/devstack/backups.py).
DIGEST_REFUSAL = "does not match its digest"

TARGET = "notifications"  # small, and it holds personal data worth stealing: who was told what
AGE_HEADER = b"age-encryption.org/v1\n"


def stolen_backup(session: Session) -> Iterator[Evidence]:
    ctx = session.ctx
    try:
        folder = backups.create(ctx, [TARGET])
    except backups.BackupError as error:
        raise LabSetupError(f"no backup to steal: {error.problem}") from None
    stolen = folder.parent / f"stolen-{uuid.uuid4().hex[:8]}"
    try:
        backups.verify(ctx, folder)
        yield Evidence(f"a backup of {TARGET} (calibration)", f"{folder.name}: made and verified by the install")
        shutil.copytree(folder, stolen)
        archive = stolen / f"{TARGET}{backups.SUFFIX}"
        yield from _read(archive)
        yield from _decrypt_with_own_identity(archive)
        yield from _slip_in_own_database(session, folder, archive)
    finally:
        shutil.rmtree(stolen, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)


def _read(archive: Path) -> Iterator[Evidence]:
    data = archive.read_bytes()
    clear = [word.decode() for word in (b"PGDMP", b"CREATE TABLE", b"notifications", b"alice") if word in data]
    found = ", ".join(repr(word) for word in clear) or "nothing: no dump header, no table, no name"
    yield Evidence(f"the thief reads {archive.name} ({len(data):,} bytes)",
                   f"an age file ({data[:len(AGE_HEADER)].decode(errors='replace').strip()!r}); in clear: {found}",
                   data.startswith(AGE_HEADER) and not clear)


def _decrypt_with_own_identity(archive: Path) -> Iterator[Evidence]:
    try:
        pyrage.decrypt(archive.read_bytes(), [x25519.Identity.generate()])
    except pyrage.DecryptError as error:
        yield Evidence("the thief decrypts it with an identity of their own", f"refused: {error}", True)
        return
    yield Evidence("the thief decrypts it with an identity of their own", "decrypted", False)


def _slip_in_own_database(session: Session, genuine: Path, archive: Path) -> Iterator[Evidence]:
    """The recipient is public: anyone can encrypt to it. Put an archive of one's own in place of the genuine one,
    then into the genuine backup's folder, as if it came from the install."""
    recipient = x25519.Recipient.from_str((backups.backup_keys(session.ctx).recipient_file).read_text().strip())
    forged = io.BytesIO()
    pyrage.encrypt_io(io.BytesIO(b"PGDMP" + b"\x00" * 4096), forged, [recipient])
    original = (genuine / archive.name).read_bytes()
    (genuine / archive.name).write_bytes(forged.getvalue())
    try:
        backups.verify(session.ctx, genuine)
    except backups.BackupError as error:
        if DIGEST_REFUSAL not in error.problem:
            # Refused for what the archive holds (no pg_dump inside): a thief's real dump would pass that check.
            raise LabSetupError(f"the thief's archive was refused for another reason than its digest "
                                f"({error.problem}): the lab cannot tell") from None
        yield Evidence("the thief's own archive, encrypted to the install's public recipient, in place of the "
                       "genuine one (`bastion backup verify`)", f"refused: {error.problem}", True)
        return
    finally:
        (genuine / archive.name).write_bytes(original)
    yield Evidence("the thief's own archive, encrypted to the install's public recipient, in place of the genuine "
                   "one (`bastion backup verify`)", "verified: the backup would restore the thief's data", False)
