"""The transactional outbox and its relay without a database server or Kafka: the outbox tables in SQLite and a
broker that keeps what it is handed (the relay against the real ones is in tests/integration/test_event_delivery.py).
An event takes the next sequence of its aggregate and waits unsent; the relay publishes unsent rows in order, as
signed bundles on their key's partition, marks sent only what the broker acknowledged, and leaves the rest queued."""

import datetime as dt
import logging
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.schema import CreateTable

from bastion.accounts.v1.events_pb2 import AccountFrozen, AccountOpened, MoneyDeposited
from bastion.events.envelopes import envelope_for
from bastion.events.errors import EventTooLargeError
from bastion.events.keys import KeyRing
from bastion.events.outbox import STAMP_BYTES, Outbox, OutboxRelay, RelayResult
from bastion.events.partitions import partition_for
from bastion.events.signing import SignatureChecker
from bastion.events.storage import EVENTS_METADATA, outbox
from bastion.events.v1.envelope_pb2 import Envelope, EnvelopeBundle
from bastion.events.verify import MAX_ENVELOPE_BYTES, is_bundle
from tests.unit.test_spans import SAMPLED, recorder

TOPIC = "accounts.events.v1"


def events_database() -> Engine:
    """The signed-events tables (`storage.EVENTS_METADATA`) in SQLite, the outbox's identity column as SQLite's own
    row id."""
    engine = create_engine("sqlite://")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            str(CreateTable(outbox).compile(dialect=sqlite.dialect())).replace("id BIGINT", "id INTEGER")
        )
    EVENTS_METADATA.create_all(engine, tables=[table for table in EVENTS_METADATA.sorted_tables if table is not outbox])
    return engine


@pytest.fixture()
def engine() -> Engine:
    return events_database()


def deposit(amount: int) -> MoneyDeposited:
    return MoneyDeposited(account_id="acc", amount_minor=amount, currency="EUR")


def stored_rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(outbox).order_by(outbox.c.id)).all())


def test_each_event_of_an_aggregate_takes_its_next_sequence_and_waits_unsent_under_its_aggregate(
    ring: KeyRing, engine: Engine
) -> None:
    writer = Outbox(ring.signing_key("accounts"))
    traced = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with engine.begin() as conn:
        first = writer.append(
            conn,
            TOPIC,
            deposit(1),
            "acc-1",
            "corr-1",
            causation_id="cause-1",
            event_id="0b6f2a4e-5d0c-4c7e-9a57-2f7d1c3e8b10",
            traceparent=traced,
        )
        other = writer.append(conn, TOPIC, deposit(2), "acc-2", "corr-2")
        second = writer.append(conn, TOPIC, deposit(3), "acc-1", "corr-3")
    assert first is not None and other is not None and second is not None
    assert [(e.aggregate_id, e.sequence) for e in (first, other, second)] == [("acc-1", 1), ("acc-2", 1), ("acc-1", 2)]
    assert (first.event_id, first.causation_id, first.correlation_id, first.traceparent) == (
        "0b6f2a4e-5d0c-4c7e-9a57-2f7d1c3e8b10",
        "cause-1",
        "corr-1",
        traced,
    )
    rows = stored_rows(engine)
    assert [(row.event_id, row.topic, row.partition_key, row.sent_at) for row in rows] == [
        (first.event_id, TOPIC, "acc-1", None),
        (other.event_id, TOPIC, "acc-2", None),
        (second.event_id, TOPIC, "acc-1", None),
    ]
    assert [Envelope.FromString(row.envelope) for row in rows] == [first, other, second]
    assert not first.signature, "stored unsigned: the relay signs each batch it publishes"


def test_an_event_id_appended_again_is_stored_once_and_takes_no_sequence(ring: KeyRing, engine: Engine) -> None:
    """A retried handler appends the same event again: the second append stores nothing and returns None."""
    writer = Outbox(ring.signing_key("accounts"))
    event_id = "0b6f2a4e-5d0c-4c7e-9a57-2f7d1c3e8b10"
    with engine.begin() as conn:
        assert writer.append(conn, TOPIC, deposit(1), "acc-1", "corr-1", event_id=event_id) is not None
        assert writer.append(conn, TOPIC, deposit(1), "acc-1", "corr-1", event_id=event_id) is None
        after = writer.append(conn, TOPIC, deposit(2), "acc-1", "corr-2")
    assert after is not None and after.sequence == 2
    assert [row.event_id for row in stored_rows(engine)] == [event_id, after.event_id]


def stamped_size(envelope: Envelope) -> int:
    return len(envelope.SerializeToString()) + STAMP_BYTES


def append_of_size(writer: Outbox, engine: Engine, size: int) -> Envelope | EventTooLargeError:
    """Append, in a transaction of its own that commits, an event of aggregate "big" whose stamped size is SIZE.
    The size of its timestamps follows the clock's microseconds, so an event that missed by a byte is tried again."""
    for _ in range(50):
        probe = envelope_for(
            writer.key.current(), TOPIC, AccountFrozen(account_id="big", reason="x" * 60_000), "big", 1, "corr"
        )
        payload = AccountFrozen(account_id="big", reason="x" * (60_000 + size - stamped_size(probe)))
        with engine.begin() as conn:
            try:
                stored = writer.append(conn, TOPIC, payload, "big", "corr")
            except EventTooLargeError as refused:
                if f"would be {size} bytes" in str(refused):
                    return refused
                continue
            assert stored is not None
            if stamped_size(stored) == size:
                return stored
            conn.rollback()
    raise AssertionError(f"no event of {size} bytes in 50 tries")


def test_an_event_up_to_the_size_consumers_accept_is_stored_and_one_a_byte_over_is_refused_giving_its_sequence_back(
    ring: KeyRing, engine: Engine
) -> None:
    """Stamping (a key id, a publication time, a bundle's framing) adds up to STAMP_BYTES: the limit applies to the
    envelope as consumers will read it. A refusal gives its sequence number back, so a caller that catches it and
    commits leaves no gap behind which the aggregate's later events would be held."""
    writer = Outbox(ring.signing_key("accounts"))
    at_limit = append_of_size(writer, engine, MAX_ENVELOPE_BYTES)
    assert isinstance(at_limit, Envelope) and at_limit.sequence == 1
    over = append_of_size(writer, engine, MAX_ENVELOPE_BYTES + 1)
    assert isinstance(over, EventTooLargeError)
    assert str(over).endswith(
        f"would be {MAX_ENVELOPE_BYTES + 1} bytes once published; consumers accept at most {MAX_ENVELOPE_BYTES}"
    )
    with engine.begin() as conn:
        after = writer.append(conn, TOPIC, AccountFrozen(account_id="big", reason="small"), "big", "corr")
    assert after is not None and after.sequence == 2
    assert [Envelope.FromString(row.envelope).sequence for row in stored_rows(engine)] == [1, 2]


# The relay, with a broker that keeps what it is handed.


class Broker:
    """A producer that takes records and acknowledges them at flush; REFUSE_NEXT records are refused at once (its
    queue is full), FAIL_NEXT acknowledged with an error. It knows PARTITIONS of each topic."""

    def __init__(self, config: dict[str, Any], partitions: dict[str, int] | None = None) -> None:
        self.config = config
        self.partitions = partitions if partitions is not None else {TOPIC: 3}
        self.published: list[tuple[str, int, EnvelopeBundle, list[tuple[str, bytes]]]] = []
        self.waiting: list[tuple[Any, KafkaError | None]] = []
        self.refuse_next = self.fail_next = 0
        self.metadata_asked = self.flushes = 0
        self.metadata_error: KafkaError | None = None

    def list_topics(self, topic: str, timeout: float) -> Any:
        self.metadata_asked += 1
        if topic not in self.partitions:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Local: Broker transport failure"))
        partitions = {number: object() for number in range(self.partitions[topic])}
        return SimpleNamespace(topics={topic: SimpleNamespace(error=self.metadata_error, partitions=partitions)})

    def produce(
        self, topic: str, value: bytes, partition: int = -1, headers: Any = None, on_delivery: Any = None, **_: Any
    ) -> None:
        if self.refuse_next:
            self.refuse_next -= 1
            raise BufferError("Local: Queue full")
        error = None
        if self.fail_next:
            self.fail_next -= 1
            error = KafkaError(KafkaError.NOT_ENOUGH_REPLICAS, "Broker: Not enough in-sync replicas")
        else:
            self.published.append((topic, partition, EnvelopeBundle.FromString(value), list(headers or [])))
        self.waiting.append((on_delivery, error))

    def poll(self, _timeout: float) -> int:
        return 0

    def flush(self, _timeout: float) -> int:
        self.flushes += 1
        for report, error in self.waiting:
            report(error, None)
        self.waiting = []
        return 0

    def events(self) -> list[Envelope]:
        return [Envelope.FromString(member) for _, _, bundle, _ in self.published for member in bundle.envelopes]


@pytest.fixture()
def brokers(monkeypatch: pytest.MonkeyPatch) -> list[Broker]:
    """Each relay built from now on gets a Broker of its own in place of confluent_kafka's Producer."""
    made: list[Broker] = []

    def producer(config: dict[str, Any]) -> Broker:
        made.append(Broker(config))
        return made[-1]

    monkeypatch.setattr("bastion.events.outbox.Producer", producer)
    return made


def write(ring: KeyRing, engine: Engine, *aggregates: str) -> list[Envelope]:
    writer = Outbox(ring.signing_key("accounts"))
    with engine.begin() as conn:
        return [
            writer.append(conn, TOPIC, deposit(number), aggregate, f"corr-{number}")  # type: ignore[misc]
            for number, aggregate in enumerate(aggregates)
        ]


def relay_for(ring: KeyRing, engine: Engine, **options: Any) -> tuple[OutboxRelay, Broker]:
    relay = OutboxRelay(engine, {"bootstrap.servers": "kafka:9093"}, ring.followed_signing_key("accounts"), **options)
    return relay, relay.producer  # type: ignore[return-value]


def unsent(engine: Engine) -> list[str]:
    return [row.event_id for row in stored_rows(engine) if row.sent_at is None]


def test_the_relays_producer_is_idempotent_waits_for_every_replica_and_gives_up_before_flush_whatever_it_is_told(
    ring: KeyRing, engine: Engine, brokers: list[Broker]
) -> None:
    OutboxRelay(
        engine,
        {"bootstrap.servers": "kafka:9093", "acks": "1", "enable.idempotence": False},
        ring.signing_key("accounts"),
        flush_timeout=10,
    )
    [broker] = brokers
    assert (broker.config["acks"], broker.config["enable.idempotence"]) == ("all", True)
    assert broker.config["bootstrap.servers"] == "kafka:9093"
    assert broker.config["message.timeout.ms"] < 10_000, "a delivery report lands in the batch that sent it"


def test_the_relay_publishes_unsent_rows_in_order_as_signed_bundles_on_their_keys_partition_and_marks_them_sent(
    ring: KeyRing, engine: Engine, brokers: list[Broker]
) -> None:
    written = write(ring, engine, "acc-1", "acc-2", "acc-1", "acc-3", "acc-1")
    relay, broker = relay_for(ring, engine)
    before = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    assert relay.run_once() == RelayResult(published=5, failed=0)
    key = ring.signing_key("accounts")
    for topic, partition, bundle, headers in broker.published:
        members = [Envelope.FromString(member) for member in bundle.envelopes]
        assert is_bundle(headers), "consumers read the record as a bundle"
        assert topic == TOPIC and {partition_for(m.aggregate_id.encode(), 3) for m in members} == {partition}
        SignatureChecker().verify_bundle(bundle, members, key.private_key.public_key())
    assert [(e.aggregate_id, e.sequence) for e in broker.events() if e.aggregate_id == "acc-1"] == [
        ("acc-1", 1),
        ("acc-1", 2),
        ("acc-1", 3),
    ]
    assert sorted(e.event_id for e in broker.events()) == sorted(e.event_id for e in written)
    assert unsent(engine) == [] and all(row.sent_at >= before for row in stored_rows(engine))
    assert relay.backlog() == 0
    assert relay.run_once() == RelayResult(0, 0) and len(broker.events()) == 5, "a row sent is never sent again"
    write(ring, engine, "acc-1")
    assert relay.backlog() == 1
    assert relay.run_once() == RelayResult(1, 0)
    assert [(e.aggregate_id, e.sequence) for e in broker.events()][-1] == ("acc-1", 4)


def test_a_batch_is_at_most_batch_size_rows_the_oldest_and_the_next_run_takes_the_rest(
    ring: KeyRing, engine: Engine, brokers: list[Broker]
) -> None:
    written = write(ring, engine, *[f"acc-{number}" for number in range(5)])
    relay, broker = relay_for(ring, engine, batch_size=2)
    assert relay.run_once() == RelayResult(2, 0)
    assert unsent(engine) == [e.event_id for e in written[2:]]
    assert relay.run_once() == RelayResult(2, 0)
    assert relay.run_once() == RelayResult(1, 0)
    assert unsent(engine) == [] and [e.event_id for e in broker.events()] == [e.event_id for e in written]


def test_the_relay_locks_the_rows_it_takes_and_skips_those_another_relay_holds(
    ring: KeyRing, engine: Engine, brokers: list[Broker]
) -> None:
    """Two replicas of a service relay one outbox: each takes rows the other has not locked, and never waits on
    them (the locks are PostgreSQL's: what the relay asks of it is checked here, its effect in integration)."""
    asked: list[str] = []

    @event.listens_for(engine, "before_execute")
    def keep(_conn: Any, statement: Any, *_args: Any) -> None:
        if getattr(statement, "is_select", False):
            asked.append(str(statement.compile(dialect=postgresql.dialect())))

    write(ring, engine, "acc-1")
    relay, _broker = relay_for(ring, engine)
    relay.run_once()
    [taken] = [sql for sql in asked if "sent_at IS NULL" in sql]
    assert taken.endswith("FOR UPDATE SKIP LOCKED")


def test_a_topic_whose_partitions_the_broker_cannot_say_sends_nothing_and_every_row_waits(
    ring: KeyRing, engine: Engine, brokers: list[Broker]
) -> None:
    written = write(ring, engine, "acc-1", "acc-2")
    relay, broker = relay_for(ring, engine)
    for partitions, error in [
        ({}, None),
        ({TOPIC: 0}, None),
        ({TOPIC: 3}, KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "not authorised")),
    ]:
        broker.partitions, broker.metadata_error = partitions, error
        assert relay.run_once() == RelayResult(published=0, failed=2)
        assert broker.published == [] and unsent(engine) == [e.event_id for e in written]
    broker.metadata_error = None
    assert relay.run_once() == RelayResult(2, 0)


def test_the_relay_asks_a_topics_partitions_once(ring: KeyRing, engine: Engine, brokers: list[Broker]) -> None:
    """Asked once per relay: the broker is not asked again for every batch."""
    relay, broker = relay_for(ring, engine)
    for number in range(3):
        write(ring, engine, f"acc-{number}")
        assert relay.run_once() == RelayResult(1, 0)
    assert broker.metadata_asked == 1


def test_a_bundle_the_producer_refused_stops_the_batch_so_the_later_rows_of_its_partition_wait(
    ring: KeyRing, engine: Engine, brokers: list[Broker], caplog: pytest.LogCaptureFixture
) -> None:
    """Rows of one aggregate over the bundle budget go in two bundles of one partition: the second must not be
    published ahead of the first, so nothing after a refused bundle is handed over; all of it goes next time."""
    writer = Outbox(ring.signing_key("accounts"))
    with engine.begin() as conn:
        written = [
            writer.append(
                conn,
                TOPIC,
                AccountFrozen(account_id="acc-1", reason=f"{number:02}" * 30_000),
                "acc-1",
                f"corr-{number}",
            )
            for number in range(14)
        ]
    relay, broker = relay_for(ring, engine)
    broker.refuse_next = 1
    with caplog.at_level(logging.WARNING, "bastion.events.outbox"):
        assert relay.run_once() == RelayResult(published=0, failed=14)
    assert broker.published == [] and len(unsent(engine)) == 14
    assert "14 of 14 events not delivered yet (Local: Queue full)" in caplog.text
    assert relay.run_once() == RelayResult(14, 0)
    assert len(broker.published) == 2, "cut in two bundles"
    assert [e.sequence for e in broker.events()] == [e.sequence for e in written if e is not None]


def test_a_bundle_the_broker_did_not_acknowledge_stays_queued_and_is_logged(
    ring: KeyRing, engine: Engine, brokers: list[Broker], caplog: pytest.LogCaptureFixture
) -> None:
    write(ring, engine, "acc-1")
    relay, broker = relay_for(ring, engine)
    broker.fail_next = 1
    with caplog.at_level(logging.WARNING, "bastion.events.outbox"):
        assert relay.run_once() == RelayResult(published=0, failed=1)
    assert "1 of 1 events not delivered yet (Broker: Not enough in-sync replicas)" in caplog.text
    assert relay.backlog() == 1
    assert relay.run_once() == RelayResult(1, 0)


class StopWhenIdle(threading.Event):
    """Set itself the first time the relay waits (it found nothing to send), remembering how long it would wait."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        self.set()
        return True


def test_the_relay_runs_batch_after_batch_while_there_is_work_and_waits_only_when_idle(
    ring: KeyRing, engine: Engine, brokers: list[Broker]
) -> None:
    write(ring, engine, "acc-1", "acc-2", "acc-3")
    relay, broker = relay_for(ring, engine, batch_size=1)
    stop = StopWhenIdle()
    relay.run(stop, idle_seconds=7)
    assert unsent(engine) == [] and stop.waits == [7]
    flushes = broker.flushes
    relay.close()
    assert broker.flushes == flushes + 1, "closing waits for what was handed to the broker"


def test_rows_of_several_topics_each_go_to_their_own_topic(
    ring: KeyRing, engine: Engine, brokers: list[Broker]
) -> None:
    writer = Outbox(ring.signing_key("accounts"))
    with engine.begin() as conn:
        writer.append(conn, TOPIC, AccountOpened(account_id="acc-1"), "acc-1", "corr-1")
        writer.append(conn, "accounts.audit.v1", AccountOpened(account_id="acc-1"), "acc-1", "corr-2")
    relay, broker = relay_for(ring, engine)
    broker.partitions["accounts.audit.v1"] = 1
    assert relay.run_once() == RelayResult(2, 0)
    assert sorted(
        (topic, Envelope.FromString(bundle.envelopes[0]).topic) for topic, _, bundle, _ in broker.published
    ) == [("accounts.audit.v1", "accounts.audit.v1"), (TOPIC, TOPIC)]


class TimedBroker(Broker):
    """Notes when its last flush, the broker's acknowledgement, was over."""

    acknowledged_by = 0

    def flush(self, timeout: float) -> int:
        answered = super().flush(timeout)
        self.acknowledged_by = time.time_ns()
        return answered


def test_a_relayed_events_span_names_the_partition_of_its_bundle_and_ends_when_the_broker_acknowledged_it(
    ring: KeyRing, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bastion.events.outbox.Producer", TimedBroker)
    spans, exported = recorder()
    writer = Outbox(ring.signing_key("accounts"))
    with engine.begin() as conn:
        for number in range(6):
            writer.append(conn, TOPIC, deposit(number), f"acc-{number}", f"corr-{number}", traceparent=SAMPLED)
    relay, broker = relay_for(ring, engine, spans=spans)
    assert relay.run_once() == RelayResult(6, 0)
    partitions = {
        member.event_id: partition
        for _, partition, bundle, _ in broker.published
        for member in map(Envelope.FromString, bundle.envelopes)
    }
    assert len(set(partitions.values())) > 1, "the events went to several partitions"
    sent = exported.get_finished_spans()
    assert len(sent) == 6
    for span in sent:
        attributes = dict(span.attributes or {})
        assert attributes["messaging.destination.partition.id"] == str(partitions[str(attributes["bastion.event_id"])])
        assert span.end_time is not None and span.end_time <= broker.acknowledged_by, "not when the spans were written"
