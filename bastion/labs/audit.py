"""The audit lab: rewriting the audit log, first as the audit service's own role and as the database admin with
the append-only trigger in place (on the real log, in transactions that are rolled back), then as the admin
with the trigger disabled on a scratch copy of the log in a schema of its own, which the verifier must catch;
last, the checkpoint file deleted (checked in a scratch folder), which the published checkpoints must catch."""

import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, Executable, MetaData, create_engine, delete, func, insert, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from bastion.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from bastion.audit.checkpoints import Checkpoint, CheckpointFile
from bastion.audit.errors import CheckpointError
from bastion.audit.install_tools import ORIGIN, SERVICE, checkpoint_file, published_checkpoints, verify
from bastion.audit.postgres import AUDIT_SCHEMA, AuditLog, install
from bastion.audit.postgres import log as audit_log
from bastion.audit.published import WitnessUnavailableError
from bastion.audit.verify import ChainReport
from bastion.devstack.components.postgres import ADMIN_ROLE, Postgres
from bastion.events.keys import KeyRing
from bastion.labs.base import Evidence
from bastion.labs.platform import TIMEOUT, LabSetupError, Session, new_correlation_id

SCRATCH_RECORDS = 200
MIN_RECORDS = 2
# What both the missing grants and the append-only trigger answer with (bastion/audit/postgres.py).
INSUFFICIENT_PRIVILEGE = "42501"


def audit_tampering(session: Session) -> Iterator[Evidence]:
    ctx = session.ctx
    service = session.audit_engine()
    admin = create_engine(Postgres(ctx).sqlalchemy_url(ADMIN_ROLE, ctx.credentials.postgres[ADMIN_ROLE], SERVICE),
                          poolclass=NullPool)
    try:
        length = _records(session, service)
        yield Evidence("the audit log", f"{length} records; the lab goes for record {length}, the newest")
        newest = audit_log.c.seq == length
        attempts: dict[str, Executable] = {
            f"UPDATE record {length}": update(audit_log).where(newest).values(reason="nothing to see"),
            f"DELETE record {length}": delete(audit_log).where(newest),
            "TRUNCATE the log": text(f"TRUNCATE {AUDIT_SCHEMA}.log"),
        }
        for what, statement in attempts.items():
            yield _rolled_back(service, f"the audit service's own role: {what}", statement)
        yield _rolled_back(admin, f"the database admin, a superuser, with the trigger in place: UPDATE record {length}",
                           attempts[f"UPDATE record {length}"])
        yield from _tamper_a_scratch_copy(session, admin, service, min(length, SCRATCH_RECORDS))
        yield from _without_the_checkpoint_file(session)
        real = verify(ctx).report
        yield Evidence("the real log afterwards (`bastion audit verify`)",
                       f"{'verified' if real.ok else 'NOT verified'}: {real.length} records; {real.reason}")
    finally:
        admin.dispose()


def _records(session: Session, service: Engine) -> int:
    """How many records the log holds; a fresh install's log gets one access decision first."""
    count = select(func.coalesce(func.max(audit_log.c.seq), 0))
    with service.connect() as conn:
        length = int(conn.execute(count).scalar_one())
    if length >= MIN_RECORDS:
        return length
    accounts = accounts_pb2_grpc.AccountsStub(session.channel("accounts"))  # type: ignore[no-untyped-call]
    accounts.ListAccounts(accounts_pb2.ListAccountsRequest(),
                          metadata=session.as_user("ada", new_correlation_id("audit-tampering")), timeout=TIMEOUT)
    deadline = time.monotonic() + session.target.verdict_wait_seconds
    while length < MIN_RECORDS and time.monotonic() < deadline:
        time.sleep(0.5)
        with service.connect() as conn:
            length = int(conn.execute(count).scalar_one())
    if length < MIN_RECORDS:
        raise LabSetupError("the audit log stays empty: is the audit service consuming access.decisions.v1?")
    return length


def _rolled_back(engine: Engine, what: str, statement: Executable) -> Evidence:
    """Run STATEMENT in a transaction that is always rolled back: only whether it was refused matters."""
    try:
        with engine.connect() as conn:
            transaction = conn.begin()
            try:
                conn.execute(statement)
            finally:
                transaction.rollback()
    except DBAPIError as error:
        cause = error.orig or error
        message = str(cause).strip().splitlines()[0]
        sqlstate = getattr(cause, "sqlstate", None)
        if sqlstate != INSUFFICIENT_PRIVILEGE:
            # A connection that failed, a missing table, a lock timeout: not the grants or the trigger refusing.
            raise LabSetupError(f"{what} failed for another reason than a refusal: {message} (SQLSTATE "
                                f"{sqlstate or '?'}): the lab cannot tell") from None
        return Evidence(what, f"refused: {message} (SQLSTATE {sqlstate})", True)
    return Evidence(what, "executed (the lab rolled it back): nothing stopped it", False)


def _tamper_a_scratch_copy(session: Session, admin: Engine, service: Engine, length: int) -> Iterator[Evidence]:
    scratch = f"lab_audit_{uuid.uuid4().hex[:12]}"
    copied = audit_log.to_metadata(MetaData(), schema=scratch)
    edited = max(1, length // 2)
    try:
        with admin.begin() as conn:
            install(conn, SERVICE, schema=scratch)
            conn.execute(insert(copied).from_select([column.name for column in audit_log.columns],
                                                    select(*audit_log.columns).where(audit_log.c.seq <= length)))
        copy = service.execution_options(schema_translate_map={AUDIT_SCHEMA: scratch})
        checkpoints = _checkpoints_within(session, length)
        before = _check(copy, checkpoints)
        yield Evidence(f"a scratch copy of records 1-{length} in schema {scratch}, verified",
                       f"{'ok' if before.ok else before.reason}: {before.length} records, "
                       f"{len(checkpoints)} signed checkpoint(s) within them")
        if not before.ok:
            raise LabSetupError(f"the copy of the audit log does not verify before tampering: {before.reason}")
        with admin.begin() as conn:
            conn.exec_driver_sql(f"ALTER TABLE {scratch}.log DISABLE TRIGGER log_append_only")
            conn.execute(update(copied).where(copied.c.seq == edited).values(reason="nothing to see here"))
            conn.exec_driver_sql(f"ALTER TABLE {scratch}.log ENABLE ALWAYS TRIGGER log_append_only")
        after = _check(copy, checkpoints)
        found = f"first bad seq {after.first_bad_seq}: {after.reason}" if not after.ok else "ok: the edit went unseen"
        yield Evidence(f"the admin disables the trigger on the copy and edits record {edited}; the verifier",
                       found, after.first_bad_seq == edited)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {scratch} CASCADE")


def _without_the_checkpoint_file(session: Session) -> Iterator[Evidence]:
    """The checkpoint file deleted (an empty place where a copy would be, the install's own file untouched): the
    verifier must not read that as "no checkpoints yet", since the audit service published each one on Kafka."""
    deadline = time.monotonic() + session.target.verdict_wait_seconds
    try:
        while not (published := published_checkpoints(session.ctx)):
            if time.monotonic() > deadline:
                raise LabSetupError("the audit service has published no checkpoint yet: is it running?")
            time.sleep(1)
    except WitnessUnavailableError as error:
        raise LabSetupError(f"the published checkpoints cannot be read: {error}") from error
    yield Evidence("checkpoints published on audit.checkpoints.v1 (the second witness)",
                   f"{len(published)}, the newest covering {published[-1].length} records")
    with tempfile.TemporaryDirectory() as scratch:
        deleted = CheckpointFile(Path(scratch) / "checkpoints.jsonl", KeyRing(session.ctx.layout.event_keys_dir)
                                 .trust_store(), ORIGIN)
        verdict = verify(session.ctx, file=deleted).report
    caught = not verdict.ok and "lacks" in verdict.reason
    yield Evidence("the checkpoint file deleted, then `bastion audit verify`",
                   f"NOT verified: {verdict.reason}" if not verdict.ok else "verified: the deletion went unseen",
                   caught)


def _checkpoints_within(session: Session, length: int) -> list[Checkpoint]:
    try:
        return [c for c in checkpoint_file(session.ctx).load() if c.length <= length]
    except CheckpointError as error:
        raise LabSetupError(f"the signed checkpoints are refused: {error}") from error


def _check(engine: Engine, checkpoints: list[Checkpoint]) -> ChainReport:
    with engine.connect() as conn, conn.begin():
        return AuditLog().check_chain(conn, checkpoints)
