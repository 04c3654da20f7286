"""The audit service's alert detector on PostgreSQL (`PostgresAlerts`): an alert is written to the outbox, with its
mark, in the transaction of the batch that raised it, once; a batch read again, or a Kafka record kept before in
another form, raises nothing; a detector started again over the log raises what one running throughout would.
Each test installs the log into a schema of its own and the service's own tables (outbox, marks) into another,
and works as the `audit` service role."""

import datetime as dt
from collections.abc import Iterator
from dataclasses import replace

import pytest
from sqlalchemy import Engine, create_engine, func, select

from bastion.audit.alerts import Alert, AlertDetector, AlertRule
from bastion.audit.postgres import AUDIT_SCHEMA, AuditLog, install
from bastion.audit.records import AuditRecord
from bastion.devstack.components.postgres import ADMIN_ROLE, Postgres
from bastion.devstack.context import StackContext
from bastion.events.outbox import Outbox
from bastion.events.storage import outbox as outbox_table
from bastion.events.v1.envelope_pb2 import Envelope
from bastion.migrations import upgrade
from services.audit.adapters import postgres as adapters
from services.audit.adapters.postgres import PostgresAlerts, alert_marks
from tests.unit.audit.samples import AUDIT_KEY, BASE_TIME, sample_record

SERVICE_ROLE = "audit"
PROBING = AlertRule("permission-probing", "probing", "warning", "denial", "principal", 5, dt.timedelta(seconds=60),
                    ("permission denied",))
FORGED = AlertRule("forged-events", "forged", "critical", "rejection", "reason", 2, dt.timedelta(seconds=300),
                   ("bad_signature",))


@pytest.fixture()
def engine(postgres: Postgres, ctx: StackContext, unique: str) -> Iterator[Engine]:
    admin = create_engine(postgres.sqlalchemy_url(ADMIN_ROLE, ctx.credentials.postgres[ADMIN_ROLE], "audit"))
    base = create_engine(postgres.sqlalchemy_url(SERVICE_ROLE, ctx.credentials.postgres[SERVICE_ROLE], "audit"))
    log_schema, own_schema = f"it_alerts_log_{unique}", f"it_alerts_own_{unique}"
    with admin.begin() as conn:
        install(conn, SERVICE_ROLE, schema=log_schema)
        conn.exec_driver_sql(f'CREATE SCHEMA "{own_schema}" AUTHORIZATION "{SERVICE_ROLE}"')
    service = base.execution_options(schema_translate_map={AUDIT_SCHEMA: log_schema, None: own_schema})
    upgrade(service, "audit")
    yield service
    with admin.begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA "{log_schema}" CASCADE')
        conn.exec_driver_sql(f'DROP SCHEMA "{own_schema}" CASCADE')
    base.dispose()
    admin.dispose()


def denial(number: int, seconds: float) -> AuditRecord:
    record = sample_record(number, "access", principal="mallory", decision="deny")
    return replace(record, reason="permission denied: tellers only",
                   occurred_at=BASE_TIME + dt.timedelta(seconds=seconds))


def append(engine: Engine, alerts: PostgresAlerts, records: list[AuditRecord]) -> list[Alert]:
    with engine.begin() as conn:
        placed = AuditLog().append(conn, records)
        return alerts.observe(conn, placed)


def started(engine: Engine, rules: list[AlertRule], seconds: float) -> PostgresAlerts:
    alerts = PostgresAlerts(Outbox(AUDIT_KEY), AlertDetector(rules))
    with engine.begin() as conn:
        assert alerts.start(conn, AuditLog().head(conn).length, BASE_TIME + dt.timedelta(seconds=seconds)) == []
    return alerts


def written(engine: Engine) -> tuple[list[str], list[tuple[str, str, int]]]:
    with engine.connect() as conn:
        rows = conn.execute(select(outbox_table.c.event_id, outbox_table.c.topic, outbox_table.c.partition_key)
                            .order_by(outbox_table.c.id)).all()
        # Each alert on the alerts' own topic, an aggregate of its own (no sequence ties one alert to another).
        assert all(row.topic == "security.alerts.v1" and row.partition_key == f"security-alert:{row.event_id}"
                   for row in rows), rows
        events = [row.event_id for row in rows]
        marks = [(row.rule, row.key, row.last_seq) for row in conn.execute(select(alert_marks))]
    return events, marks


def test_an_alert_is_written_once_with_its_batch_and_a_restart_goes_on_as_if_it_never_stopped(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # Seconds of each denial: an alert at the fifth, two more, a restart at second 100, then three more.
    times = [0, 10, 20, 30, 60, 70, 100, 101, 102, 103]
    records = [denial(number, at) for number, at in enumerate(times, start=1)]
    alerts = started(engine, [PROBING], 0)
    assert append(engine, alerts, records[:4]) == []
    [first] = append(engine, alerts, records[4:5])
    assert (first.key, first.count, first.first_seq, first.last_seq) == ("mallory", 5, 1, 5)
    assert written(engine) == ([first.alert_id], [("permission-probing", "mallory", 5)])
    with engine.connect() as conn:
        envelope = Envelope.FromString(conn.execute(select(outbox_table.c.envelope)).scalar_one())
    assert envelope.correlation_id == records[4].correlation_id, "`bastion trail` of the fifth denial finds it"
    assert append(engine, alerts, records[:5]) == [], "the same batch read again raises nothing"
    forgetful = PostgresAlerts(Outbox(AUDIT_KEY), AlertDetector([PROBING]))  # never started: counts 1 to 5 again
    assert append(engine, forgetful, records[:5]) == [], "the outbox keeps an alert id once: not raised twice"
    assert append(engine, alerts, records[5:7]) == []
    assert written(engine)[0] == [first.alert_id]

    # Started again over the newest three refusals of the log (seq 5 to 7): it counts 6 and 7 again, but not 5,
    # which the first alert counted (without its mark, it would raise at seq 9).
    monkeypatch.setattr(adapters, "PRIMING_ROWS", 3)
    restarted = started(engine, [PROBING], 100)
    assert append(engine, restarted, records[7:9]) == []
    [second] = append(engine, restarted, records[9:])
    assert (second.first_seq, second.last_seq) == (6, 10), "what a detector running throughout raises"
    assert written(engine) == ([first.alert_id, second.alert_id], [("permission-probing", "mallory", 10)])


def test_a_kafka_record_kept_before_in_another_form_is_not_counted_again(engine: Engine) -> None:
    alerts = started(engine, [FORGED], 0)
    accepted = sample_record(50)  # a bundle's envelope that verified, kept as item 0 of its record
    refused_whole = replace(sample_record(50, "rejection"), item=None)  # the same record, refused on a redelivery
    assert append(engine, alerts, [replace(accepted, item=0)]) == []
    assert append(engine, alerts, [refused_whole, refused_whole]) == [], "the log keeps what it saw first"
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(outbox_table)).scalar_one() == 0
    # Two refusals the log does keep raise the alert.
    [alert] = append(engine, alerts, [sample_record(51, "rejection"), sample_record(52, "rejection")])
    assert (alert.key, alert.count) == ("bad_signature", 2)
