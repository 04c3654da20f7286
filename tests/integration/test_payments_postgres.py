"""The payments repository on PostgreSQL runs the same contract as the in-memory fake
(tests/unit/services/test_payments_repository.py), so a fake that passes means something. Each test has its own
schema, reached with the payments service's own database role."""

from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from bastion.devstack.components.postgres import Postgres
from bastion.devstack.context import StackContext
from services.payments.adapters.postgres import PostgresPayments, create_schema
from services.payments.handlers import PaymentsRepository
from tests.unit.services.test_payments_repository import PaymentsRepositoryContract


class TestPostgresPayments(PaymentsRepositoryContract):
    @pytest.fixture()
    def repository(self, postgres: Postgres, ctx: StackContext, unique: str) -> Iterator[PaymentsRepository]:
        base = create_engine(postgres.sqlalchemy_url("payments", ctx.credentials.postgres["payments"], "payments"))
        schema = f"it_payments_{unique}"
        with base.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        scoped = base.execution_options(schema_translate_map={None: schema})
        create_schema(scoped)
        # Autocommit: each call stands alone, as in the service, where each runs in a unit of work of its own.
        with scoped.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            yield PostgresPayments(conn)
        with base.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        base.dispose()
