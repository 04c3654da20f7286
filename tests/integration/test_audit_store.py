"""The audit store on PostgreSQL: the service role can only read and append (not even change its own rows),
the trigger stops superusers too, and every superuser tampering that drops the trigger first (an edit, a
deletion, a swap, a truncated tail, a consistent rewrite) is found by the verifier at the right seq.
Projections kept live in the append's transaction equal a rebuild from the log. Each test installs the
store into its own schema (as the admin) and works as the `audit` service role."""

import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.exc import DBAPIError

from bastion.audit.chain import EMPTY, Head, LogEntry, extend
from bastion.audit.checkpoints import Checkpoint, Checkpointer, CheckpointFile, sign_checkpoint
from bastion.audit.errors import InstallError
from bastion.audit.postgres import AUDIT_SCHEMA, AuditLog, access_summary, dump, install, rebuild
from bastion.audit.postgres import log as log_table
from bastion.audit.projections import Projections
from bastion.audit.verify import ChainReport
from bastion.devstack.components.postgres import ADMIN_ROLE, Postgres
from bastion.devstack.context import StackContext
from services.audit import domain
from services.audit.adapters.postgres import PostgresAuditReader, PostgresAuditReaders
from tests.unit.audit.samples import AUDIT_KEY, ORIGIN, mixed_records, sample_record, trust_store

SERVICE_ROLE = "audit"


@dataclass(frozen=True)
class Store:
    admin: Engine  # the superuser, for set-up and for tampering
    service: Engine  # the audit service's own role, with the test's schema in place of `audit`
    schema: str

    def __post_init__(self) -> None:
        assert self.schema.isidentifier(), "the schema is interpolated into the tampering SQL below"


@pytest.fixture()
def store(postgres: Postgres, ctx: StackContext, unique: str) -> Iterator[Store]:
    admin = create_engine(postgres.sqlalchemy_url(ADMIN_ROLE, ctx.credentials.postgres[ADMIN_ROLE], "audit"))
    base = create_engine(postgres.sqlalchemy_url(SERVICE_ROLE, ctx.credentials.postgres[SERVICE_ROLE], "audit"),
                         pool_size=8, max_overflow=4)
    schema = f"it_audit_{unique}"
    with admin.begin() as conn:
        install(conn, SERVICE_ROLE, schema=schema)
    yield Store(admin, base.execution_options(schema_translate_map={AUDIT_SCHEMA: schema}), schema)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    base.dispose()
    admin.dispose()


def append(store: Store, count: int, start: int = 1) -> Head:
    with store.service.begin() as conn:
        AuditLog().append(conn, mixed_records(count, start))
        return AuditLog().head(conn)


def verify(store: Store, checkpoints: list[Checkpoint], page: int = 7) -> ChainReport:
    with store.service.begin() as conn:
        return AuditLog().check_chain(conn, checkpoints, page=page)


def entries(store: Store) -> list[LogEntry]:
    with store.service.begin() as conn:
        return list(AuditLog().iter_rows(conn))


def tamper(store: Store, *statements: str) -> None:
    """Run STATEMENTS as the superuser with the append-only trigger dropped out of the way."""
    with store.admin.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE {store.schema}.log DISABLE TRIGGER log_append_only")
        for statement in statements:
            conn.exec_driver_sql(statement.format(log=f"{store.schema}.log"))
        conn.exec_driver_sql(f"ALTER TABLE {store.schema}.log ENABLE ALWAYS TRIGGER log_append_only")


def refused(engine: Engine, statement: str) -> BaseException:
    with pytest.raises(DBAPIError) as caught, engine.begin() as conn:
        conn.exec_driver_sql(statement)
    return caught.value.orig or caught.value


# --- appending ---


def test_appends_chain_from_genesis_and_a_redelivery_is_not_kept_twice(store: Store) -> None:
    records = mixed_records(30)
    with store.service.begin() as conn:
        first = AuditLog().append(conn, records[:20])
    with store.service.begin() as conn:
        again = AuditLog().append(conn, records[10:30])  # 10 redelivered, 10 new
        head = AuditLog().head(conn)
    assert [placed.seq for placed in first] == list(range(1, 21))
    assert again[:10] == first[10:] and [placed.seq for placed in again[10:]] == list(range(21, 31))
    assert head == Head(30, again[-1].hash)
    assert entries(store) == extend(EMPTY, records), "exactly the chain the pure code computes"
    report = verify(store, [])
    assert report.ok and (report.length, report.head_hash) == head


def test_text_that_means_something_to_copy_is_stored_as_written(store: Store) -> None:
    """Rows go in through COPY: tabs, line breaks, backslashes, COPY's end marker and non-ASCII text in any field a
    producer chooses are stored as written, so they read back into the same records and the same hashes."""
    awkward = "tab\there\nline\r\\N \\. \\\\ zoë 🙂 \u2028"
    base = mixed_records(1)[0]
    records = [replace(base, aggregate_id=awkward, correlation_id=awkward, principal=awkward, detail=awkward,
                       reason="\\.", envelope=b"\t\n\\\x00\xff")]
    with store.service.begin() as conn:
        AuditLog().append(conn, records)
    assert entries(store) == extend(EMPTY, records)
    assert verify(store, []).ok
    with store.service.begin() as conn:
        assert rebuild(conn).matches, "the projections copied in read back as the fold computes them"


def test_a_bundle_is_kept_once_per_envelope_and_once_whatever_its_next_verdict(store: Store) -> None:
    """A bundle record becomes one entry per envelope (`item`); delivered again, it is not kept again, even when
    its verdict changed in between (refused whole the first time, accepted after a key reload, or the other
    way): the log keeps what was seen first."""
    base = mixed_records(1)[0]
    members = [replace(base, offset=10_000, item=item, event_id=f"member-{item}") for item in range(3)]
    refused_whole = replace(base, offset=10_001)  # a bundle refused as a whole: one entry, no item
    with store.service.begin() as conn:
        first = AuditLog().append(conn, [*members, refused_whole])
    with store.service.begin() as conn:
        again = AuditLog().append(conn, [replace(base, offset=10_000), *[
            replace(base, offset=10_001, item=item, event_id=f"later-{item}") for item in range(2)]])
        head = AuditLog().head(conn)
    assert [placed.seq for placed in first] == [1, 2, 3, 4]
    assert again == [first[0], first[3], first[3]], "nothing new: each Kafka record was kept already"
    assert head.length == 4
    assert [(entry.record.offset, entry.record.item) for entry in entries(store)] == [
        (10_000, 0), (10_000, 1), (10_000, 2), (10_001, None)]
    assert verify(store, []).ok


def test_concurrent_writers_are_serialised_into_one_gap_free_chain(store: Store) -> None:
    crashed: list[BaseException] = []

    def writer(number: int) -> None:
        try:
            for batch in range(10):
                with store.service.begin() as conn:
                    AuditLog().append(conn, mixed_records(5, start=number * 1000 + batch * 5))
        except BaseException as error:  # any failure fails the test below
            crashed.append(error)

    threads = [threading.Thread(target=writer, args=(number,)) for number in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert crashed == [] and not any(thread.is_alive() for thread in threads)
    assert [entry.seq for entry in entries(store)] == list(range(1, 201))
    assert verify(store, []).ok


def test_iter_rows_streams_through_one_server_side_cursor(store: Store) -> None:
    append(store, 300)
    with store.service.begin() as conn:
        rows = AuditLog().iter_rows(conn, page=50)
        assert next(rows).seq == 1
        assert conn.exec_driver_sql("SELECT count(*) FROM pg_cursors").scalar_one() == 1, "a cursor, not a list"
        assert [entry.seq for entry in rows] == list(range(2, 301))
        assert [entry.seq for entry in AuditLog().iter_rows(conn, after=295)] == [296, 297, 298, 299, 300]


# --- append-only ---


@pytest.mark.parametrize("statement", [
    "UPDATE {log} SET reason = 'nothing to see' WHERE seq = 3",
    "DELETE FROM {log} WHERE seq = 3",
    "TRUNCATE {log}",
    "ALTER TABLE {log} DISABLE TRIGGER log_append_only",
    "DROP TABLE {log}",
    "DROP SCHEMA {schema} CASCADE",
    "CREATE TABLE {schema}.decoy (seq bigint)",
])
def test_the_service_role_cannot_change_even_its_own_rows(store: Store, statement: str) -> None:
    append(store, 5)
    error = refused(store.service, statement.format(log=f"{store.schema}.log", schema=store.schema))
    assert isinstance(error, psycopg.errors.InsufficientPrivilege), error
    assert verify(store, []).length == 5


@pytest.mark.parametrize("replica", [False, True])
@pytest.mark.parametrize("statement", [
    "UPDATE {log} SET reason = 'nothing to see' WHERE seq = 3",
    "UPDATE {log} SET reason = reason WHERE false",
    "DELETE FROM {log} WHERE seq = 3",
    "TRUNCATE {log}",
])
def test_the_trigger_refuses_a_superuser_too(store: Store, statement: str, replica: bool) -> None:
    append(store, 5)
    prefix = "SET session_replication_role = replica; " if replica else ""
    error = refused(store.admin, prefix + statement.format(log=f"{store.schema}.log"))
    assert isinstance(error, psycopg.errors.InsufficientPrivilege) and "append-only" in str(error)


def test_the_service_role_cannot_make_schemas_or_drop_its_database(store: Store, unique: str) -> None:
    # The audit database belongs to the admin (infra/services.yaml: append_only_log), not to the service.
    error = refused(store.service, f"CREATE SCHEMA it_audit_squat_{unique}")
    assert isinstance(error, psycopg.errors.InsufficientPrivilege), error
    with store.service.connect() as conn:
        owner = conn.exec_driver_sql("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'audit'")
        assert owner.scalar_one() != SERVICE_ROLE


def test_install_refuses_a_schema_the_service_role_owns(store: Store, unique: str) -> None:
    schema = f"it_audit_squat_{unique}"
    with store.admin.begin() as conn:  # as if the role had owned the database once and made it then
        conn.exec_driver_sql(f"CREATE SCHEMA {schema} AUTHORIZATION {SERVICE_ROLE}")
    try:
        with pytest.raises(InstallError, match="owned by another role"), store.admin.begin() as conn:
            install(conn, SERVICE_ROLE, schema=schema)
    finally:
        with store.admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")


def test_install_is_idempotent(store: Store) -> None:
    head = append(store, 4)
    with store.admin.begin() as conn:
        install(conn, SERVICE_ROLE, schema=store.schema)
    assert verify(store, []).head_hash == head.hash


def found_and_plan(store: Store, column: str, value: str) -> tuple[list[LogEntry], str]:
    """What ListEvents finds with the filter COLUMN = VALUE, and PostgreSQL's plan for that page's query."""
    assert column in ("correlation_id", "aggregate_id"), "the column is interpolated into the EXPLAIN below"
    with store.service.begin() as conn:
        conn.exec_driver_sql(f"ANALYZE {store.schema}.log")
        found = PostgresAuditReader(conn, AuditLog()).find(domain.query(**{column: value}))
        conn.exec_driver_sql("SET search_path = " + store.schema)  # an identifier (Store.__post_init__)
        plan = "\n".join(row[0] for row in conn.exec_driver_sql(
            f"EXPLAIN SELECT * FROM log WHERE seq > 0 AND {column} = %(value)s ORDER BY seq LIMIT 100",  # noqa: S608
            {"value": value}))
    return found, plan


def test_one_requests_records_are_found_through_the_correlation_id_index(store: Store) -> None:
    """`bastion trail` asks ListEvents for one correlation id over the whole log: an index lookup, not a scan."""
    append(store, 3000)
    found, plan = found_and_plan(store, "correlation_id", "corr-2345")
    assert [entry.record.correlation_id for entry in found] == ["corr-2345"]
    assert "log_by_correlation_id" in plan, plan


def test_one_aggregates_records_are_found_through_the_aggregate_index(store: Store) -> None:
    """ListEvents by aggregate (one account's history) on a big log: an index lookup, in seq order, not a scan."""
    append(store, 3000)
    with store.service.begin() as conn:
        AuditLog().append(conn, [sample_record(number, aggregate="acc-rare") for number in (3001, 3002)])
    append(store, 1000, start=3003)
    found, plan = found_and_plan(store, "aggregate_id", "acc-rare")
    assert [(entry.record.aggregate_id, entry.record.offset) for entry in found] == [("acc-rare", 3001),
                                                                                    ("acc-rare", 3002)]
    assert "log_by_aggregate_id" in plan, plan


# --- tampering found ---


def test_an_edited_record_is_found(store: Store) -> None:
    append(store, 30)
    tamper(store, "UPDATE {log} SET principal = 'mallory' WHERE seq = 13")
    report = verify(store, [])
    assert not report.ok and report.first_bad_seq == 13 and report.length == 12


def test_a_row_tampered_into_nonsense_is_named_not_crashed_on(store: Store) -> None:
    append(store, 30)
    tamper(store, "UPDATE {log} SET kind = 'evnet' WHERE seq = 9")
    report = verify(store, [])
    assert not report.ok and report.first_bad_seq == 9 and "not a valid audit record" in report.reason


@pytest.mark.parametrize("edit", [
    "UPDATE {log} SET occurred_at = 'infinity' WHERE seq = 11",
    "UPDATE {log} SET recorded_at = '-infinity' WHERE seq = 11",
    "UPDATE {log} SET occurred_at = '20000-01-01 00:00:00+00' WHERE seq = 11",
])
def test_a_time_no_datetime_can_hold_is_named_as_tampering_not_crashed_on(store: Store, edit: str) -> None:
    """A superuser's edit can store a time Python cannot read (psycopg fails the fetch itself): the verification
    names that row instead of failing, and the listing sees a corrupt row, as for any other nonsense."""
    append(store, 30)
    tamper(store, edit)
    report = verify(store, [])
    assert not report.ok and report.first_bad_seq == 11 and "not a valid audit record" in report.reason


def test_a_deleted_record_is_found(store: Store) -> None:
    append(store, 30)
    tamper(store, "DELETE FROM {log} WHERE seq = 17")
    report = verify(store, [])
    assert not report.ok and report.first_bad_seq == 17 and "missing" in report.reason


def test_two_swapped_records_are_found(store: Store) -> None:
    append(store, 30)
    tamper(store, "UPDATE {log} SET seq = 1000000 WHERE seq = 8", "UPDATE {log} SET seq = 8 WHERE seq = 21",
           "UPDATE {log} SET seq = 21 WHERE seq = 1000000")
    report = verify(store, [])
    assert not report.ok and report.first_bad_seq == 8


def test_a_truncated_tail_is_found_against_the_signed_checkpoint(store: Store, tmp_path: Path) -> None:
    file = CheckpointFile(tmp_path / "audit-checkpoints.jsonl", trust_store(), ORIGIN)
    checkpointer = Checkpointer(AUDIT_KEY, file, every_records=10)
    for start in range(1, 31, 5):
        checkpointer.maybe_checkpoint(append(store, 5, start))  # after each commit, as the service does
    assert [checkpoint.length for checkpoint in file.load()] == [10, 20, 30]
    tamper(store, "DELETE FROM {log} WHERE seq > 24")
    report = verify(store, file.load())
    assert not report.ok and report.first_bad_seq == 25 and report.length == 24
    assert "deleted" in report.reason


def test_a_consistent_rewrite_after_a_checkpoint_is_found_one_past_it(store: Store) -> None:
    append(store, 30)
    original = entries(store)
    checkpoints = [sign_checkpoint(AUDIT_KEY, ORIGIN, original[9].head),
                   sign_checkpoint(AUDIT_KEY, ORIGIN, original[19].head)]
    forged = [entry.record for entry in original[14:]]
    forged[0] = replace(forged[0], producer="payments", aggregate_id="acc-mallory")
    rewritten = extend(original[13].head, forged)  # seq 15 to 30, every hash recomputed
    with store.admin.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE {store.schema}.log DISABLE TRIGGER log_append_only")
        scoped = conn.execution_options(schema_translate_map={AUDIT_SCHEMA: store.schema})
        for entry in rewritten:
            rewrite_row(scoped, entry)
        conn.exec_driver_sql(f"ALTER TABLE {store.schema}.log ENABLE ALWAYS TRIGGER log_append_only")
    without = verify(store, [])
    assert without.ok, "without checkpoints a consistent rewrite cannot be seen: that is why they exist"
    report = verify(store, checkpoints)
    assert not report.ok and report.first_bad_seq == 11 and report.anchored_length == 10
    assert "rewritten" in report.reason


def rewrite_row(conn: Connection, entry: LogEntry) -> None:
    record = entry.record
    conn.execute(log_table.update().where(log_table.c.seq == entry.seq).values(
        producer=record.producer, aggregate_id=record.aggregate_id, prev_hash=entry.prev_hash, hash=entry.hash))


# --- projections ---


def test_live_projections_equal_the_fold_and_a_rebuild(store: Store) -> None:
    for start in range(1, 400, 57):
        append(store, 57, start)
    fold = Projections()
    for entry in entries(store):
        fold.apply(entry.seq, entry.record)
    with store.service.begin() as conn:
        live = dump(conn)
        assert live == fold.dump()
        assert all(live.values()), "every projection has rows"
        rebuilt = rebuild(conn, page=64)
        assert rebuilt.replayed == 399 and rebuilt.matches
        assert dump(conn) == fold.dump()


def test_rebuild_repairs_a_projection_the_service_role_changed(store: Store) -> None:
    append(store, 60)
    with store.service.begin() as conn:
        conn.execute(access_summary.update().values(denied=0))
        result = rebuild(conn)
    assert not result.matches and result.live["access_summary"] != result.rebuilt["access_summary"]
    assert result.live["timeline"] == result.rebuilt["timeline"]
    with store.service.begin() as conn:
        assert rebuild(conn).matches


def test_an_appended_denial_reaches_the_security_view_in_the_same_transaction(store: Store) -> None:
    with store.service.connect() as conn:
        AuditLog().append(conn, [sample_record(1, "access", principal="mallory", decision="deny")])
        assert [row[:2] for row in dump(conn)["security_view"]] == [(1, "access")]
        conn.rollback()
    with store.service.begin() as conn:
        assert dump(conn)["security_view"] == [] and AuditLog().head(conn) == EMPTY


def test_a_time_window_takes_records_from_since_and_stops_before_until(store: Store) -> None:
    append(store, 10)  # record N occurred N seconds after BASE_TIME
    since, until = (sample_record(number).occurred_at for number in (3, 7))
    with store.service.begin() as conn:
        found = PostgresAuditReader(conn, AuditLog()).find(domain.query(since=since, until=until))
    assert [entry.seq for entry in found] == [3, 4, 5, 6]


def test_a_reader_sees_one_snapshot_and_can_change_nothing(store: Store) -> None:
    """ListEvents and VerifyChain read through PostgresAuditReaders: one REPEATABLE READ, READ ONLY transaction."""
    append(store, 5)
    readers = PostgresAuditReaders(store.service, AuditLog())
    with readers() as reader:
        before = reader.find(domain.query())
        append(store, 3, start=6)  # committed meanwhile by the consumer
        assert reader.find(domain.query()) == before, "a verification reads one consistent log"
        with pytest.raises(DBAPIError, match="read-only transaction"):
            reader.conn.execute(log_table.delete())
    with readers() as reader:
        assert len(reader.find(domain.query())) == 8
