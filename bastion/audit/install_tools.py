"""What an investigator runs against a dev install (`bastion audit verify`, `bastion audit rebuild`): the log
is read straight from PostgreSQL as the audit role (which can only SELECT and INSERT it), and checked against the
signed checkpoint file, not through the audit service, so a compromised service cannot vouch for itself."""

from dataclasses import dataclass

from sqlalchemy import Engine, create_engine
from sqlalchemy.pool import NullPool

from bastion.audit.checkpoints import CheckpointFile
from bastion.audit.errors import CheckpointError
from bastion.audit.postgres import AuditLog, Rebuilt, rebuild
from bastion.audit.verify import ChainReport
from bastion.devstack.components.postgres import Postgres
from bastion.devstack.context import StackContext
from bastion.events.keys import KeyRing

SERVICE = "audit"
ORIGIN = "bastion.local/audit"


@dataclass(frozen=True)
class Verification:
    report: ChainReport
    checkpoints: int
    checkpoint_length: int
    superseded: int = 0  # checkpoints of retired audit keys, covered by a later trusted one


def audit_engine(ctx: StackContext) -> Engine:
    url = Postgres(ctx).sqlalchemy_url(SERVICE, ctx.credentials.postgres[SERVICE], SERVICE)
    return create_engine(url, poolclass=NullPool)


def checkpoint_file(ctx: StackContext, origin: str = ORIGIN) -> CheckpointFile:
    return CheckpointFile(ctx.layout.audit_checkpoints_file, KeyRing(ctx.layout.event_keys_dir).trust_store(), origin)


def verify(ctx: StackContext, origin: str = ORIGIN) -> Verification:
    """The whole chain, recomputed in one read-only snapshot, against every signed checkpoint of the file."""
    file = checkpoint_file(ctx, origin)
    try:
        checkpoints = file.load()
    except CheckpointError as error:
        return Verification(ChainReport(False, 0, b"", None, f"checkpoint refused: {error}", 0), 0, 0)
    engine = audit_engine(ctx)
    try:
        with engine.connect() as conn, conn.begin():
            conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            report = AuditLog().check_chain(conn, checkpoints)
    finally:
        engine.dispose()
    return Verification(report, len(checkpoints), checkpoints[-1].length if checkpoints else 0, len(file.superseded))


def rebuild_projections(ctx: StackContext) -> Rebuilt:
    """Truncate the live projections and replay the whole log into them; the digests say whether the rebuilt
    ones equal the live ones they replaced."""
    engine = audit_engine(ctx)
    try:
        with engine.begin() as conn:
            return rebuild(conn)
    finally:
        engine.dispose()
