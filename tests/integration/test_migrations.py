"""Each service's Alembic migrations on PostgreSQL: they create exactly the tables declared in code (Alembic's
comparison, plus CHECK constraints and partial indexes), a second run changes nothing, processes starting together
migrate once, a schema made by `create_all` before migrations is adopted, and the comparison does see drift.
Each test has its own schema, reached with the service's own database role."""

import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, MetaData, column, create_engine, event, inspect, select, table, text

from bastion.devstack.components.postgres import Postgres
from bastion.devstack.context import StackContext
from bastion.events.storage import EVENTS_METADATA
from bastion.migrations import check, script_location, upgrade, version_table
from services.accounts.adapters import postgres as accounts_postgres
from services.notifications.adapters import postgres as notifications_postgres
from services.payments.adapters import postgres as payments_postgres

SERVICES: dict[str, tuple[MetaData, Callable[[Engine], None]]] = {
    "accounts": (accounts_postgres.METADATA, accounts_postgres.create_schema),
    "payments": (payments_postgres.METADATA, payments_postgres.create_schema),
    "notifications": (notifications_postgres.METADATA, notifications_postgres.create_schema),
}
# What a starting service process does, in a process of its own (the URL, with its password, in the environment).
UPGRADE = ("import os, sys; from sqlalchemy import create_engine; from bastion.migrations import upgrade; "
           "upgrade(create_engine(os.environ['MIGRATIONS_TEST_URL']), sys.argv[1], schema=sys.argv[2])")


@pytest.fixture(params=sorted(SERVICES))
def service(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture()
def engine(postgres: Postgres, ctx: StackContext, service: str) -> Iterator[Engine]:
    base = create_engine(postgres.sqlalchemy_url(service, ctx.credentials.postgres[service], service))
    yield base
    base.dispose()


@pytest.fixture()
def schema(engine: Engine, service: str, unique: str) -> Iterator[str]:
    name = f"it_migrations_{service}_{unique}"
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{name}"'))
    yield name
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{name}" CASCADE'))


def versions(engine: Engine, service: str, schema: str) -> list[str]:
    with engine.connect() as conn:
        recorded = table(version_table(service), column("version_num"), schema=schema)
        return list(conn.execute(select(recorded.c.version_num)).scalars())


def head(service: str) -> str:
    revision = ScriptDirectory(str(script_location(service))).get_current_head()
    assert revision is not None
    return revision


def test_migrations_create_exactly_the_tables_declared_in_code(engine: Engine, service: str, schema: str) -> None:
    upgrade(engine, service, schema=schema)

    assert check(engine, service, schema=schema) == []
    declared = {table.name for table in [*SERVICES[service][0].sorted_tables, *EVENTS_METADATA.sorted_tables]}
    assert set(inspect(engine).get_table_names(schema=schema)) == declared | {version_table(service)}
    assert versions(engine, service, schema) == [head(service)]


def test_a_second_upgrade_changes_nothing(engine: Engine, service: str, schema: str) -> None:
    upgrade(engine, service, schema=schema)
    statements: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        upgrade(engine, service, schema=schema)
    finally:
        event.remove(engine, "before_cursor_execute", record)

    assert statements, "the second upgrade did run"
    assert [s for s in statements if not s.lstrip().upper().startswith("SELECT")] == []
    assert versions(engine, service, schema) == [head(service)]
    assert check(engine, service, schema=schema) == []


def test_create_schema_migrates_the_schema_the_engine_translates_to(engine: Engine, service: str,
                                                                     schema: str) -> None:
    scoped = engine.execution_options(schema_translate_map={None: schema})

    SERVICES[service][1](scoped)

    assert version_table(service) in inspect(engine).get_table_names(schema=schema)
    assert check(scoped, service) == []


def test_processes_starting_together_migrate_once(engine: Engine, service: str, schema: str) -> None:
    env = {**os.environ, "MIGRATIONS_TEST_URL": engine.url.render_as_string(hide_password=False)}
    starts = [subprocess.Popen([sys.executable, "-c", UPGRADE, service, schema], env=env, stderr=subprocess.PIPE,
                               text=True) for _ in range(4)]
    errors = [start.communicate(timeout=120)[1] for start in starts]

    assert [start.returncode for start in starts] == [0] * len(starts), errors
    assert versions(engine, service, schema) == [head(service)]
    assert check(engine, service, schema=schema) == []


def test_a_schema_made_by_create_all_before_migrations_is_adopted(engine: Engine, service: str,
                                                                   schema: str) -> None:
    scoped = engine.execution_options(schema_translate_map={None: schema})
    SERVICES[service][0].create_all(scoped)
    EVENTS_METADATA.create_all(scoped)

    upgrade(scoped, service)

    assert versions(engine, service, schema) == [head(service)]
    assert check(scoped, service) == []


def test_the_comparison_sees_drift(engine: Engine, service: str, schema: str) -> None:
    upgrade(engine, service, schema=schema)
    with engine.begin() as conn:
        conn.execute(text(f'DROP INDEX "{schema}".event_outbox_unsent'))
        conn.execute(text(f'CREATE INDEX event_outbox_unsent ON "{schema}".event_outbox (id) '
                          "WHERE sent_at IS NOT NULL"))
        conn.execute(text(f'ALTER TABLE "{schema}".event_inbox ALTER COLUMN applied_at DROP DEFAULT'))
        conn.execute(text(f'ALTER TABLE "{schema}".event_held ADD CONSTRAINT unexpected CHECK (sequence > 0)'))

    differences = check(engine, service, schema=schema)

    kinds = {d[0][0] if isinstance(d, list) else d[0] for d in differences}
    assert kinds == {"modify_index_predicate", "modify_default", "remove_check_constraint"}, differences
