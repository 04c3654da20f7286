"""The audit store in PostgreSQL (SQLAlchemy Core): the append-only log table, the live projections, and
the set-up that makes the log append-only for the service's own role.

Set-up, once, as the database owner or a superuser (`install`):
- schema `audit`, owned by the admin: the service role gets USAGE only. (Whoever owns a schema may drop any
  table in it, which is why the log does not live in `public`: in the dev stack the service role owns the
  `audit` database and, through it, `public`.)
- `audit.log`, owned by the admin; the service role may only SELECT and INSERT. A statement trigger refuses
  UPDATE, DELETE and TRUNCATE for everybody, superusers included, and is `ENABLE ALWAYS`, so setting
  `session_replication_role = replica` does not silence it either. A superuser (or the table owner) can
  still drop or disable the trigger, and whoever owns the database can drop it whole: that is why signed
  checkpoints are kept outside the database (`bastion.audit.checkpoints`).
- the projection tables, owned by the service role: they are derived data it updates and rebuilds.

At run time, as the service role (`AuditLog`): `append` takes a transaction-scoped advisory lock, so there
is one writer at a time, reads the head under it, links and inserts the records and updates the live
projections, all in the caller's transaction. `iter_rows` streams the log in seq order through a
server-side cursor; `check_chain` verifies it against the checkpoints; `rebuild` replays the log into the
projections; `dump` and `digests` read the projections for comparison with the fold. For queries of your
own, the tables are module attributes (`log`, `timeline`, ...) and `entry_of_row` reads a row of `log`.

Tests and benchmarks install into another schema: `install(..., schema=NAME)`, then use an engine with
`execution_options(schema_translate_map={AUDIT_SCHEMA: NAME})`.
"""

import datetime as dt
import hashlib
from collections.abc import Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Connection,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    Row,
    Select,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    case,
    collate,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as upsert

from bastion.audit.chain import EMPTY, Appended, Head, LogEntry, extend
from bastion.audit.checkpoints import Checkpoint
from bastion.audit.errors import AuditError, CorruptRowError, InstallError, InvalidRecordError
from bastion.audit.projections import (
    AccessRow,
    AccessSummaryRow,
    ProjectionDump,
    ProjectionRow,
    Projections,
    SecurityRow,
    TimelineRow,
    columns,
    digest_rows,
    plain_row,
)
from bastion.audit.projections import Row as PlainRow
from bastion.audit.records import AuditRecord, Decision, RecordKind
from bastion.audit.verify import ChainReport, check_chain

AUDIT_SCHEMA = "audit"
DEFAULT_PAGE = 1000
# One advisory lock key for the writers of the log: the first 8 bytes of a hash of a fixed name.
WRITER_LOCK = int.from_bytes(hashlib.sha256(b"bastion.audit.v1.writer").digest()[:8], "big", signed=True)

METADATA = MetaData(schema=AUDIT_SCHEMA)

log = Table(
    "log", METADATA,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("kind", Text, nullable=False),
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("event_id", Text, nullable=False),
    Column("event_type", Text, nullable=False),
    Column("producer", Text, nullable=False),
    Column("aggregate_id", Text, nullable=False),
    Column("correlation_id", Text, nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("envelope", LargeBinary, nullable=False),
    Column("principal", Text),
    Column("action", Text),
    Column("decision", Text),
    Column("reason", Text),
    Column("detail", Text),
    Column("item", Integer),
    Column("prev_hash", LargeBinary, nullable=False),
    Column("hash", LargeBinary, nullable=False),
    CheckConstraint("seq >= 1", name="log_seq_from_one"),
    CheckConstraint("octet_length(prev_hash) = 32 AND octet_length(hash) = 32", name="log_sha256_hashes"),
    # A Kafka record (or one envelope of a bundle record) is kept once: a redelivery finds its entry (see
    # AuditLog.append). NULLS NOT DISTINCT: a record that is not a bundle has no item, and is still unique.
    UniqueConstraint("topic", "partition", "offset", "item", name="log_one_entry_per_kafka_record_item",
                     postgresql_nulls_not_distinct=True),
)

timeline = Table(
    TimelineRow.TABLE, METADATA,
    Column("aggregate_id", Text, primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("event_type", Text, nullable=False),
    Column("producer", Text, nullable=False),
    Column("event_id", Text, nullable=False),
    Column("correlation_id", Text, nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
)

access_log = Table(
    AccessRow.TABLE, METADATA,
    Column("principal", Text, primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("action", Text, nullable=False),
    Column("decision", Text, nullable=False),
    Column("reason", Text),
    Column("producer", Text, nullable=False),
    Column("correlation_id", Text, nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
)

access_summary = Table(
    AccessSummaryRow.TABLE, METADATA,
    Column("principal", Text, primary_key=True),
    Column("allowed", BigInteger, nullable=False),
    Column("denied", BigInteger, nullable=False),
    Column("last_seq", BigInteger, nullable=False),
)

security_view = Table(
    SecurityRow.TABLE, METADATA,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("kind", Text, nullable=False),
    Column("principal", Text),
    Column("producer", Text, nullable=False),
    Column("action", Text),
    Column("reason", Text),
    Column("detail", Text),
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("event_id", Text, nullable=False),
    Column("correlation_id", Text, nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
)

# Each live projection table with the row type of the fold that fills it.
PROJECTIONS: tuple[tuple[Table, type[ProjectionRow]], ...] = (
    (timeline, TimelineRow), (access_log, AccessRow), (access_summary, AccessSummaryRow),
    (security_view, SecurityRow),
)
PROJECTION_TABLES = tuple(table for table, _ in PROJECTIONS)


def _quote(conn: Connection, name: str) -> str:
    return conn.dialect.identifier_preparer.quote(name)


def _schema(conn: Connection) -> str:
    """The schema the audit tables are in for CONN (after any schema_translate_map of its engine)."""
    translate = conn.get_execution_options().get("schema_translate_map") or {}
    return str(translate.get(AUDIT_SCHEMA, AUDIT_SCHEMA))


def install(admin_conn: Connection, service_role: str, schema: str = AUDIT_SCHEMA) -> None:
    """Create (or bring up to date) the audit schema, tables, trigger and grants. Idempotent.

    ADMIN_CONN is the database owner or a superuser, and a member of SERVICE_ROLE (to hand it the projection
    tables); the admin owns the schema and the log. Raises InstallError if the schema or the log already
    exists under another owner (the service role, say, which could then drop the log).
    """
    # Only the catalog on the search path: objects a service role may create in `public` (an operator or a
    # function shadowing a built-in) must never run with the admin's rights while it installs (CVE-2018-1058).
    admin_conn.exec_driver_sql("SET LOCAL search_path = pg_catalog, pg_temp")
    if admin_conn.exec_driver_sql("SELECT current_user").scalar_one() == service_role:
        raise InstallError("install runs as the admin, not as the service role it restricts")
    # Appends take this lock first: with it held here they wait at their first statement instead of holding
    # projection rows that the ALTERs below need, which would deadlock an install run while the service runs.
    admin_conn.execute(select(func.pg_advisory_xact_lock(WRITER_LOCK)))
    name, role = _quote(admin_conn, schema), _quote(admin_conn, service_role)
    admin_conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {name}")
    owners = admin_conn.exec_driver_sql(
        "SELECT n.nspowner = r.oid, (SELECT c.relowner = r.oid FROM pg_class c "
        "WHERE c.relnamespace = n.oid AND c.relname = 'log') "
        "FROM pg_namespace n, pg_roles r WHERE n.nspname = %(schema)s AND r.rolname = current_user",
        {"schema": schema},
    ).one()
    if not owners[0] or owners[1] is False:
        raise InstallError(f"schema {schema!r} or its log is owned by another role: refusing to install into it")
    admin_conn.exec_driver_sql(f"REVOKE ALL ON SCHEMA {name} FROM PUBLIC")
    admin_conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA {name} TO {role}")
    tables = MetaData(schema=schema)
    for table in METADATA.sorted_tables:
        table.to_metadata(tables, schema=schema)
    tables.create_all(admin_conn)
    # A log created before bundles: the item column, and uniqueness per envelope of a record (both idempotent).
    admin_conn.exec_driver_sql(f"ALTER TABLE {name}.log ADD COLUMN IF NOT EXISTS item integer")
    admin_conn.exec_driver_sql(f"ALTER TABLE {name}.log DROP CONSTRAINT IF EXISTS log_one_entry_per_kafka_record")
    if not admin_conn.exec_driver_sql(
            "SELECT 1 FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
            "WHERE n.nspname = %(schema)s AND c.conname = 'log_one_entry_per_kafka_record_item'",
            {"schema": schema}).first():
        admin_conn.exec_driver_sql(
            f"ALTER TABLE {name}.log ADD CONSTRAINT log_one_entry_per_kafka_record_item "
            'UNIQUE NULLS NOT DISTINCT (topic, "partition", "offset", item)')
    # ListEvents by correlation id (`bastion trail`) and by aggregate (one account's history): a request's or an
    # aggregate's few records found without reading the log, in seq order as pages are.
    admin_conn.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS log_by_correlation_id ON {name}.log (correlation_id, seq)")
    admin_conn.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS log_by_aggregate_id ON {name}.log (aggregate_id, seq)")
    admin_conn.exec_driver_sql(f"""
        CREATE OR REPLACE FUNCTION {name}.refuse_log_change() RETURNS trigger
        LANGUAGE plpgsql SET search_path = pg_catalog AS $$
        BEGIN
            RAISE EXCEPTION 'the audit log is append-only: %% refused', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END
        $$""")
    admin_conn.exec_driver_sql(f"REVOKE ALL ON FUNCTION {name}.refuse_log_change() FROM PUBLIC")
    admin_conn.exec_driver_sql(
        f"CREATE OR REPLACE TRIGGER log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {name}.log "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {name}.refuse_log_change()")
    admin_conn.exec_driver_sql(f"ALTER TABLE {name}.log ENABLE ALWAYS TRIGGER log_append_only")
    admin_conn.exec_driver_sql(f"REVOKE ALL ON {name}.log FROM PUBLIC")
    admin_conn.exec_driver_sql(f"GRANT SELECT, INSERT ON {name}.log TO {role}")
    for table in PROJECTION_TABLES:
        admin_conn.exec_driver_sql(f"REVOKE ALL ON {name}.{_quote(admin_conn, table.name)} FROM PUBLIC")
        admin_conn.exec_driver_sql(f"ALTER TABLE {name}.{_quote(admin_conn, table.name)} OWNER TO {role}")


Coordinates = tuple[str, int, int, int | None]


def _coordinates(record: AuditRecord) -> Coordinates:
    return record.topic, record.partition, record.offset, record.item


def _values(row: object) -> dict[str, object]:
    """A dataclass's fields as a dict, shallow (dataclasses.asdict deep-copies every value: slow here)."""
    return {name: getattr(row, name) for name in columns(type(row))}


def _log_row(entry: LogEntry) -> dict[str, object]:
    row = _values(entry.record)
    row["kind"] = entry.record.kind.value
    row["decision"] = None if entry.record.decision is None else entry.record.decision.value
    row.update(seq=entry.seq, prev_hash=entry.prev_hash, hash=entry.hash)
    return row


_READABLE_FROM = dt.datetime(1, 1, 2, tzinfo=dt.UTC)
_READABLE_UNTIL = dt.datetime(9999, 12, 30, tzinfo=dt.UTC)


def select_log() -> Select[Any]:
    """`select(log)`, but a time no Python datetime can hold (`infinity`, a year past 9999, which only a superuser's
    edit can store) reads as NULL instead of failing the fetch itself: `entry_of_row` then names that row as not a
    valid record, and a verification reports the tampering at its seq instead of crashing. (A day's margin at each
    end: the session's time zone could move a time across a year.)"""
    return select(*(case((column.between(_READABLE_FROM, _READABLE_UNTIL), column)).label(column.name)
                     if isinstance(column.type, DateTime) else column for column in log.c))


def entry_of_row(row: Row[tuple[object, ...]]) -> LogEntry:
    """The entry in a row of `select_log()` (for queries of your own over the log, such as a filtered listing).
    Raises CorruptRowError if the row does not read back as a valid record."""
    values = row._mapping
    seq = values["seq"]
    try:
        fields = {name: values[name] for name in columns(AuditRecord)}
        fields["kind"] = RecordKind(fields["kind"])
        fields["decision"] = None if fields["decision"] is None else Decision(fields["decision"])
        fields["envelope"] = bytes(fields["envelope"])
        record = AuditRecord(**fields)
        return LogEntry(seq, record, bytes(values["prev_hash"]), bytes(values["hash"]))
    except (InvalidRecordError, ValueError, TypeError) as error:
        raise CorruptRowError(seq if isinstance(seq, int) else 0, str(error)) from None


def _copy_in(conn: Connection, table: Table, rows: Sequence[dict[str, object]]) -> None:
    """Insert ROWS into TABLE with one COPY FROM STDIN in CONN's transaction: one stream of rows instead of a
    statement per row (the log gets a row per access decision the platform makes: with an INSERT per row, that
    was the largest part of the consumer's cost). The same rights as INSERT; the same constraints and triggers."""
    names = [column.name for column in table.columns]
    translate = conn.get_execution_options().get("schema_translate_map") or {}
    quote = conn.dialect.identifier_preparer.quote
    schema = table.schema or AUDIT_SCHEMA
    target = f"{quote(translate.get(schema, schema))}.{quote(table.name)}"
    statement = f"COPY {target} ({', '.join(quote(name) for name in names)}) FROM STDIN"
    driver = conn.connection.driver_connection
    if driver is None:
        raise AuditError("the audit store's connection has no open psycopg connection to copy rows through")
    with driver.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row([row[name] for name in names])


def _project(conn: Connection, entries: Sequence[LogEntry]) -> None:
    """Fold ENTRIES with the pure fold and merge the result into the live projection tables."""
    batch = Projections()
    for entry in entries:
        batch.apply(entry.seq, entry.record)
    for table, rows in ((timeline, batch.timeline), (access_log, batch.access), (security_view, batch.security)):
        if rows:
            _copy_in(conn, table, [_values(row) for row in rows.values()])
    if batch.summary:
        statement = upsert(access_summary)
        conn.execute(statement.on_conflict_do_update(
            index_elements=[access_summary.c.principal],
            set_={"allowed": access_summary.c.allowed + statement.excluded.allowed,
                  "denied": access_summary.c.denied + statement.excluded.denied,
                  "last_seq": func.greatest(access_summary.c.last_seq, statement.excluded.last_seq)},
        ), [_values(row) for row in batch.summary.values()])


class AuditLog:
    """The log's operations, each in the caller's transaction (a Connection from `engine.begin()`)."""

    def __init__(self, page: int = DEFAULT_PAGE) -> None:
        self.page = page

    def append(self, conn: Connection, records: Sequence[AuditRecord]) -> list[Appended]:
        """Append RECORDS in order and update the live projections; return (seq, hash) for each record.

        A Kafka record (topic, partition, offset) already kept is not kept again, in whatever form it was kept:
        as one record, or as the records of its bundle's envelopes (`item`). A redelivered batch is harmless
        even when its verdict changed in between (a bundle refused whole once, accepted after a key reload):
        the log keeps what was seen first. Records repeated in RECORDS are appended once. Each record's stored
        (seq, hash) is returned (for an envelope of a bundle kept in another form, the first entry of its Kafka
        record). The writer lock is held until the caller's transaction ends: keep that transaction short. Run
        it in READ COMMITTED (the default): the head must be read after the lock is granted.
        """
        if not records:
            return []
        conn.execute(select(func.pg_advisory_xact_lock(WRITER_LOCK)))
        kept = self._stored(conn, records)
        fresh: dict[Coordinates, AuditRecord] = {}
        for record in records:
            if _coordinates(record)[:3] not in kept:
                fresh.setdefault(_coordinates(record), record)
        entries = extend(self.head(conn), fresh.values())
        if entries:
            _copy_in(conn, log, [_log_row(entry) for entry in entries])
            _project(conn, entries)
        for entry in entries:
            kept.setdefault(_coordinates(entry.record)[:3], {})[entry.record.item] = Appended(entry.seq, entry.hash)
        placed = []
        for record in records:
            items = kept[_coordinates(record)[:3]]
            placed.append(items.get(record.item) or min(items.values(), key=lambda appended: appended.seq))
        return placed

    def _stored(self, conn: Connection, records: Sequence[AuditRecord]
                ) -> dict[tuple[str, int, int], dict[int | None, Appended]]:
        """The entries already stored for the Kafka records of RECORDS, by (topic, partition, offset) and item
        (one index lookup each)."""
        wanted = list(dict.fromkeys(_coordinates(record)[:3] for record in records))
        keys = func.unnest(
            bindparam("topics", [key[0] for key in wanted], type_=ARRAY(Text)),
            bindparam("partitions", [key[1] for key in wanted], type_=ARRAY(Integer)),
            bindparam("offsets", [key[2] for key in wanted], type_=ARRAY(BigInteger)),
        ).table_valued("topic", "partition", "offset").render_derived()
        rows = conn.execute(
            select(log.c.topic, log.c.partition, log.c.offset, log.c.item, log.c.seq, log.c.hash).join(keys, and_(
                log.c.topic == keys.c.topic, log.c.partition == keys.c.partition, log.c.offset == keys.c.offset)))
        kept: dict[tuple[str, int, int], dict[int | None, Appended]] = {}
        for row in rows:
            kept.setdefault((row.topic, row.partition, row.offset), {})[row.item] = Appended(row.seq, bytes(row.hash))
        return kept

    def head(self, conn: Connection) -> Head:
        """The log's length and head hash ((0, 32 zero bytes) when empty)."""
        row = conn.execute(select(log.c.seq, log.c.hash).order_by(log.c.seq.desc()).limit(1)).first()
        return EMPTY if row is None else Head(row.seq, bytes(row.hash))

    def hash_at(self, conn: Connection, seq: int) -> bytes | None:
        """The stored hash of the entry at SEQ, or None if there is none."""
        value = conn.execute(select(log.c.hash).where(log.c.seq == seq)).scalar_one_or_none()
        return None if value is None else bytes(value)

    def iter_rows(self, conn: Connection, page: int | None = None,
                  after: int = 0) -> Generator[LogEntry, None, None]:
        """The entries with seq > AFTER, in seq order, fetched PAGE rows at a time from one server-side cursor
        (one snapshot, constant memory). Raises CorruptRowError at a row that is not a valid record."""
        result = conn.execute(select_log().where(log.c.seq > after).order_by(log.c.seq),
                              execution_options={"yield_per": page or self.page})
        with closing(result):
            for row in result:
                yield entry_of_row(row)

    def check_chain(self, conn: Connection, checkpoints: Sequence[Checkpoint], page: int | None = None) -> ChainReport:
        """Verify the whole log against CHECKPOINTS (accepted ones: `CheckpointFile.load`), streaming."""
        with closing(self.iter_rows(conn, page)) as entries:
            return check_chain(entries, checkpoints)


@dataclass(frozen=True)
class Rebuilt:
    """What `rebuild` did: entries replayed, and the projections' digests before (live) and after."""

    replayed: int
    live: dict[str, str]
    rebuilt: dict[str, str]

    @property
    def matches(self) -> bool:
        return self.live == self.rebuilt


def rebuild(conn: Connection, page: int = DEFAULT_PAGE) -> Rebuilt:
    """Truncate the projection tables and replay the whole log into them, under the writer lock (appends
    wait). Replays what is stored without verifying it: run `check_chain` first."""
    conn.execute(select(func.pg_advisory_xact_lock(WRITER_LOCK)))
    live = digests(conn)
    schema = _quote(conn, _schema(conn))
    conn.exec_driver_sql("TRUNCATE " + ", ".join(f"{schema}.{_quote(conn, t.name)}" for t in PROJECTION_TABLES))
    replayed = 0
    batch: list[LogEntry] = []
    with closing(AuditLog(page).iter_rows(conn)) as entries:
        for entry in entries:
            batch.append(entry)
            if len(batch) == page:
                _project(conn, batch)
                replayed += len(batch)
                batch = []
    _project(conn, batch)
    return Rebuilt(replayed + len(batch), live, digests(conn))


def refusals_after(conn: Connection, seq: int) -> list[SecurityRow]:
    """The security view's rows after log entry SEQ, in log order."""
    rows = conn.execute(select(security_view).where(security_view.c.seq > seq).order_by(security_view.c.seq))
    return [SecurityRow(**row._mapping) for row in rows]


def latest_refusals(conn: Connection, count: int) -> list[SecurityRow]:
    """The COUNT newest rows of the security view, in log order."""
    rows = conn.execute(select(security_view).order_by(security_view.c.seq.desc()).limit(count))
    return [SecurityRow(**row._mapping) for row in reversed(rows.all())]


def _projection_rows(conn: Connection, table: Table, row_type: type[ProjectionRow],
                     page: int = DEFAULT_PAGE) -> Iterator[PlainRow]:
    """TABLE's rows in key order (text keys in code-point order, as Python sorts), as plain values."""
    order = [collate(table.c[key], "C") if isinstance(table.c[key].type, Text) else table.c[key]
             for key in row_type.KEY]
    result = conn.execute(select(*(table.c[name] for name in columns(row_type))).order_by(*order),
                          execution_options={"yield_per": page})
    with closing(result):
        for row in result:
            yield plain_row(row)


def dump(conn: Connection) -> ProjectionDump:
    """Every row of every live projection, in key order, as plain values (compare with Projections.dump)."""
    return {table.name: list(_projection_rows(conn, table, row_type)) for table, row_type in PROJECTIONS}


def digests(conn: Connection) -> dict[str, str]:
    """A SHA-256 per live projection, streamed (compare with Projections.digests, or before and after rebuild)."""
    return {table.name: digest_rows(_projection_rows(conn, table, row_type)) for table, row_type in PROJECTIONS}
