"""What an investigator runs against a dev install (`bastion audit verify`, `bastion audit rebuild`): the log
is read straight from PostgreSQL as the audit role (which can only SELECT and INSERT it), and checked against the
signed checkpoint file, not through the audit service, so a compromised service cannot vouch for itself."""

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, create_engine
from sqlalchemy.pool import NullPool

from bastion.audit.checkpoints import Checkpoint, CheckpointFile
from bastion.audit.errors import CheckpointError
from bastion.audit.postgres import AuditLog, Rebuilt, rebuild
from bastion.audit.published import WitnessUnavailableError, load_witnessed, read_published, unverified_reason
from bastion.audit.verify import ChainReport
from bastion.devstack.components.kafka import Kafka
from bastion.devstack.components.postgres import Postgres
from bastion.devstack.context import StackContext
from bastion.devstack.kafka_admin import ADMIN
from bastion.events.keys import KeyRing

SERVICE = "audit"
ORIGIN = "bastion.local/audit"


@dataclass(frozen=True)
class Verification:
    report: ChainReport
    checkpoints: int
    checkpoint_length: int
    superseded: int = 0  # checkpoints of retired audit keys, covered by a later trusted one
    published: int = 0  # checkpoints on audit.checkpoints.v1, every one of them a line of the file


def audit_engine(ctx: StackContext) -> Engine:
    url = Postgres(ctx).sqlalchemy_url(SERVICE, ctx.credentials.postgres[SERVICE], SERVICE)
    return create_engine(url, poolclass=NullPool)


def checkpoint_file(ctx: StackContext, origin: str = ORIGIN) -> CheckpointFile:
    return CheckpointFile(ctx.layout.audit_checkpoints_file, KeyRing(ctx.layout.event_keys_dir).trust_store(), origin)


def published_checkpoints(ctx: StackContext, origin: str = ORIGIN) -> list[Checkpoint]:
    """The checkpoints of ORIGIN the audit service published, read as the broker's admin."""
    return read_published(Kafka(ctx).client_config(ADMIN, ctx.credentials.kafka[ADMIN]), origin)


def verify(ctx: StackContext, origin: str = ORIGIN,
           witness: Callable[[StackContext, str], list[Checkpoint]] = published_checkpoints,
           file: CheckpointFile | None = None) -> Verification:
    """The whole chain, recomputed in one read-only snapshot, against every signed checkpoint of the file (the
    install's, or FILE); and the file against the second witness (WITNESS: the checkpoints published on Kafka),
    each of which it must hold: a file lost, cut short or replaced must not read as fewer checkpoints to verify
    against."""
    file = file or checkpoint_file(ctx, origin)
    try:
        witnessed = load_witnessed(file, lambda: witness(ctx, origin))
    except (WitnessUnavailableError, CheckpointError) as error:
        return Verification(ChainReport(False, 0, b"", None, unverified_reason(error), 0), 0, 0)
    checkpoints = witnessed.checkpoints
    engine = audit_engine(ctx)
    try:
        with engine.connect() as conn, conn.begin():
            conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            report = AuditLog().check_chain(conn, checkpoints)
    finally:
        engine.dispose()
    return Verification(report, len(checkpoints), checkpoints[-1].length if checkpoints else 0, len(file.superseded),
                        witnessed.published)


def rebuild_projections(ctx: StackContext) -> Rebuilt:
    """Truncate the live projections and replay the whole log into them; the digests say whether the rebuilt
    ones equal the live ones they replaced."""
    engine = audit_engine(ctx)
    try:
        with engine.begin() as conn:
            return rebuild(conn)
    finally:
        engine.dispose()
