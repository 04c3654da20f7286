"""The verifying consumer without Kafka or a database server: records handed over by a stand-in for confluent_kafka's
Consumer, its database in SQLite (inbox, sequences, held events, the outbox of its security records), the real
verifier, and a dead-letter producer that acknowledges at flush. Against the real Kafka and PostgreSQL:
tests/integration/test_signed_events.py and tests/integration/test_event_delivery.py."""

import datetime as dt
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
import sqlalchemy.exc
from confluent_kafka import TIMESTAMP_CREATE_TIME, TIMESTAMP_LOG_APPEND_TIME, KafkaError
from google.protobuf.message import Message
from prometheus_client import REGISTRY
from sqlalchemy import BigInteger, Column, Engine, MetaData, String, Table, select
from sqlalchemy.exc import OperationalError
from structlog.testing import capture_logs

from bastion.access.v1.decision_pb2 import EventRejected
from bastion.accounts.v1.events_pb2 import AccountFrozen, AccountOpened, MoneyDeposited
from bastion.devstack.event_access import load_policy
from bastion.events import inbox
from bastion.events.consumer import (
    REJECTION_NAMESPACE,
    SECURITY_TOPIC,
    ConsumerSettings,
    DeadLetterError,
    HeldEventNotSetAsideError,
    VerifyingConsumer,
    claimed_envelope,
)
from bastion.events.envelopes import bundle, envelope_for, seal
from bastion.events.keys import KeyRing
from bastion.events.outbox import Outbox
from bastion.events.signing import SignatureChecker, sign
from bastion.events.storage import held, outbox
from bastion.events.trust import TrustPolicy, load_trust_policy
from bastion.events.v1.envelope_pb2 import Envelope, EnvelopeBundle
from bastion.events.verify import BUNDLE_CONTENT, BUNDLE_HEADER, EnvelopeVerifier, VerifiedEvent
from bastion.payments.v1.events_pb2 import PaymentCompleted
from tests.unit.test_event_verification import INFRA, SERVICES
from tests.unit.test_outbox import events_database

TOPIC = "accounts.events.v1"
CONSUMER = "notifications"
BUNDLED = [(BUNDLE_HEADER, BUNDLE_CONTENT)]


class Record:
    """A Kafka record as confluent_kafka hands it over: the broker stamped it with its append time (the topics use
    LogAppendTime) unless KIND says the producer set the time."""

    def __init__(
        self,
        value: bytes | None,
        offset: int,
        headers: list[tuple[str, bytes]] | None = None,
        appended: dt.datetime | None = None,
        kind: int = TIMESTAMP_LOG_APPEND_TIME,
        error: KafkaError | None = None,
    ) -> None:
        self._value, self._offset, self._headers, self._error = value, offset, headers, error
        self._timestamp = (kind, int((appended or dt.datetime.now(dt.UTC)).timestamp() * 1000))

    def value(self) -> bytes | None:
        return self._value

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return 2

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b"aggregate-key"

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return self._timestamp

    def error(self) -> KafkaError | None:
        return self._error


class Kafka:
    """Stands in for confluent_kafka's Consumer: hands over the records queued, remembers the commits."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.subscribed: list[str] = []
        self.queued: list[Record] = []
        self.commits: list[bool] = []
        self.closed = False

    def subscribe(self, topics: list[str]) -> None:
        self.subscribed = topics

    def consume(self, count: int, _timeout: float) -> list[Record]:
        batch, self.queued = self.queued[:count], self.queued[count:]
        return batch

    def commit(self, asynchronous: bool = True) -> None:
        self.commits.append(asynchronous)

    def close(self) -> None:
        self.closed = True


@dataclass
class Letter:
    topic: str
    value: bytes
    key: bytes | None
    headers: dict[str, bytes]


class DeadLetterBroker:
    """Stands in for the dead-letter Producer: keeps what is written; acknowledges it at flush unless told not to
    answer (ANSWER False)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.letters: list[Letter] = []
        self.waiting: list[Any] = []
        self.flushes = 0
        self.answer = True

    def produce(
        self, topic: str, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]], on_delivery: Any
    ) -> None:
        self.letters.append(Letter(topic, value, key, dict(headers)))
        self.waiting.append(on_delivery)

    def poll(self, _timeout: float) -> int:
        return 0

    def flush(self, _timeout: float) -> int:
        self.flushes += 1
        if self.answer:
            for report in self.waiting:
                report(None, None)
            self.waiting = []
        return len(self.waiting)


TEST_TABLES = MetaData()
applied_rows = Table(
    "applied",
    TEST_TABLES,
    Column("event_id", String(36), primary_key=True),
    Column("sequence", BigInteger, nullable=False),
)


@dataclass
class Lane:
    """A consumer of TOPIC for CONSUMER, its fakes, its database and what its handler saw."""

    ring: KeyRing
    consumer: VerifyingConsumer
    kafka: Kafka
    letters: DeadLetterBroker
    engine: Engine
    applied: list[VerifiedEvent] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    offset: int = 0

    def record(self, value: bytes, headers: list[tuple[str, bytes]] | None = None, **stamp: Any) -> Record:
        self.offset += 1
        return Record(value, self.offset, headers, **stamp)

    def deliver(self, *records: Record) -> int:
        self.kafka.queued.extend(records)
        return self.consumer.poll_batch()

    def seal(self, payload: Message, sequence: int, aggregate: str = "acc-1", **kwargs: Any) -> bytes:
        return seal(
            self.ring.signing_key("accounts"),
            TOPIC,
            payload,
            aggregate,
            sequence,
            correlation_id=f"corr-{aggregate}-{sequence}",
            **kwargs,
        ).SerializeToString()

    def bundle(self, *members: tuple[Message, int], aggregate: str = "acc-1", now: dt.datetime | None = None) -> bytes:
        key = self.ring.signing_key("accounts")
        stored = [
            envelope_for(
                key, TOPIC, payload, aggregate, sequence, f"corr-{aggregate}-{sequence}", occurred_at=now
            ).SerializeToString()
            for payload, sequence in members
        ]
        return bundle(stored, key, now).SerializeToString()

    def applied_sequences(self) -> list[int]:
        return [event.envelope.sequence for event in self.applied]

    def stored_sequences(self) -> list[int]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(applied_rows.c.sequence)).scalars())

    def held_sequences(self) -> list[int]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(held.c.sequence).order_by(held.c.sequence)).scalars())

    def security_records(self) -> list[tuple[Envelope, EventRejected]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(outbox.c.envelope).where(outbox.c.topic == SECURITY_TOPIC).order_by(outbox.c.id)
            ).scalars()
            envelopes = [Envelope.FromString(row) for row in rows]
        return [(envelope, EventRejected.FromString(envelope.payload)) for envelope in envelopes]


def trust_policy() -> TrustPolicy:
    return load_trust_policy(INFRA / "event-trust.yaml", load_policy(INFRA / "event-access.yaml", SERVICES))


def poison(sequence: int) -> AccountFrozen:
    return AccountFrozen(account_id="acc-1", reason=f"poison {sequence}")


# Which gaps are due is `inbox.open_gaps`, a PostgreSQL query (its clock, its locks) covered by
# tests/integration/test_signed_events.py; here it is replaced by the gaps it would find (none unless a test says).


class OpenGaps:
    """What `inbox.open_gaps` finds: GAPS, or a failure when FAILING."""

    def __init__(self, gaps: list[inbox.OpenGap], failing: bool = False) -> None:
        self.gaps, self.failing = gaps, failing
        self.asked: list[tuple[list[str], dt.timedelta]] = []

    def __call__(self, _conn: Any, topics: list[str], held_for: dt.timedelta) -> list[inbox.OpenGap]:
        self.asked.append((topics, held_for))
        if self.failing:
            raise RuntimeError("the database went away mid-look")
        return self.gaps


def open_gap(missing: int = 2, first_held: int = 3, reported_before: bool = False) -> inbox.OpenGap:
    first = Envelope(
        producer="accounts",
        aggregate_id="acc-1",
        sequence=first_held,
        event_id=f"e-{first_held}",
        correlation_id=f"corr-acc-1-{first_held}",
    )
    return inbox.OpenGap(
        "accounts",
        "acc-1",
        missing,
        first_held,
        f"{TOPIC}/2/40/1",
        inbox.HELD_BUNDLE + EnvelopeBundle(envelopes=[first.SerializeToString()]).SerializeToString(),
        TOPIC,
        dt.datetime(2026, 11, 26, 12, tzinfo=dt.UTC),
        2,
        reported_before,
    )


@pytest.fixture()
def make_lane(ring: KeyRing, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Lane]:
    """A Lane; its handler stores each event it applies, and fails for an AccountFrozen whose reason starts with
    "poison" after storing it (a partial effect, undone with the attempt) or for as many calls as FLAKY says."""

    def make(attempts: int = 3, flaky: int = 0, security: bool = True) -> Lane:
        made: dict[str, Any] = {}
        monkeypatch.setattr("bastion.events.consumer.Consumer", lambda config: made.setdefault("kafka", Kafka(config)))
        monkeypatch.setattr(
            "bastion.events.consumer.Producer", lambda config: made.setdefault("letters", DeadLetterBroker(config))
        )
        monkeypatch.setattr("bastion.events.consumer.inbox.open_gaps", OpenGaps([]))
        engine = events_database()
        TEST_TABLES.create_all(engine)
        verifier = EnvelopeVerifier(ring.trust_store(), trust_policy())
        failures = [flaky]

        def handler(conn: Any, event: VerifiedEvent) -> None:
            lane.calls.append(event.event_id)
            if failures[0] > 0:
                failures[0] -= 1
                raise RuntimeError("the handler's database row is locked, try again")
            conn.execute(applied_rows.insert().values(event_id=event.event_id, sequence=event.envelope.sequence))
            if isinstance(event.payload, AccountFrozen) and event.payload.reason.startswith("poison"):
                raise RuntimeError(f"cannot apply {event.payload.reason}")
            lane.applied.append(event)

        consumer = VerifyingConsumer(
            ConsumerSettings(CONSUMER, CONSUMER, [TOPIC], handler_attempts=attempts),
            {"bootstrap.servers": "kafka:9093", "enable.auto.commit": True},
            verifier,
            engine,
            handler,
            security_outbox=Outbox(ring.signing_key(CONSUMER)) if security else None,
        )
        lane = Lane(ring, consumer, made["kafka"], made["letters"], engine)
        return lane

    return make


@pytest.fixture()
def lane(make_lane: Callable[..., Lane]) -> Lane:
    return make_lane()


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"consumer": CONSUMER, "topic": TOPIC, **labels}) or 0.0


def test_the_consumer_commits_itself_reads_only_committed_records_from_the_earliest_whatever_it_is_told(
    lane: Lane,
) -> None:
    assert lane.kafka.config["enable.auto.commit"] is False, "an offset is committed only once its effect is"
    assert lane.kafka.config["isolation.level"] == "read_committed"
    assert lane.kafka.config["auto.offset.reset"] == "earliest", "a new group reads what was written before it"
    assert (lane.kafka.config["group.id"], lane.kafka.subscribed) == (CONSUMER, [TOPIC])
    assert (lane.letters.config["acks"], lane.letters.config["enable.idempotence"]) == ("all", True)


def test_an_event_is_applied_once_with_its_inbox_row_and_its_offset_committed_after_its_effect(lane: Lane) -> None:
    applied_before = counted("bastion_events_applied_total")
    dropped_before = {
        reason: counted("bastion_events_dropped_total", reason=reason) for reason in ("duplicate", "replay")
    }
    handler, commits_while_applied = lane.consumer.handler, []

    def noting(conn: Any, event: VerifiedEvent) -> None:
        commits_while_applied.append(len(lane.kafka.commits))
        handler(conn, event)

    lane.consumer.handler = noting
    first = lane.seal(AccountOpened(account_id="acc-1", owner="alice", currency="EUR"), 1)
    assert lane.deliver(lane.record(first)) == 1
    assert lane.applied_sequences() == [1] and lane.stored_sequences() == [1]
    assert commits_while_applied == [0] and lane.kafka.commits == [False], "committed after, and synchronously"
    assert counted("bastion_events_applied_total") - applied_before == 1
    with lane.engine.connect() as conn:
        assert conn.execute(select(inbox.inbox.c.event_id)).scalars().all() == [Envelope.FromString(first).event_id]

    again = lane.seal(AccountOpened(account_id="acc-1", owner="mallory", currency="EUR"), 1)
    with capture_logs() as logs:
        assert lane.consumer.handle(lane.record(first)) == "duplicate"
        assert lane.consumer.handle(lane.record(again)) == "replay"
    assert lane.applied_sequences() == [1]
    assert [(line["event"], line["reason"]) for line in logs] == [
        ("event_dropped", "duplicate"),
        ("event_dropped", "replay"),
    ]
    for reason in ("duplicate", "replay"):
        assert counted("bastion_events_dropped_total", reason=reason) - dropped_before[reason] == 1
    assert lane.letters.letters == []


def test_a_batch_with_nothing_handled_commits_nothing_and_kafkas_own_errors_are_skipped(lane: Lane) -> None:
    eof = KafkaError(KafkaError._PARTITION_EOF, "Broker: No more messages")
    broken = KafkaError(KafkaError._TRANSPORT, "Local: Broker transport failure")
    with capture_logs() as logs:
        assert lane.deliver(Record(None, 1, error=eof)) == 0
        assert lane.kafka.commits == []
        assert (
            lane.deliver(
                Record(None, 2, error=broken),
                lane.record(lane.seal(AccountOpened(account_id="acc-1"), 1)),
                Record(None, 3, error=eof),
            )
            == 1
        )
    assert lane.kafka.commits == [False] and lane.letters.letters == []
    assert [line["error"] for line in logs if line["event"] == "consumer_error"] == ["Local: Broker transport failure"]


def test_a_refused_record_is_dead_lettered_counted_and_recorded_before_its_offset_is_committed(lane: Lane) -> None:
    genuine = Envelope.FromString(lane.seal(AccountOpened(account_id="acc-1", owner="alice", currency="EUR"), 1))
    genuine.payload = AccountOpened(account_id="acc-1", owner="mallory", currency="EUR").SerializeToString()
    tampered = genuine.SerializeToString()
    rejected_before = counted("bastion_events_rejected_total", reason="bad_signature")
    with capture_logs() as logs:
        assert lane.deliver(lane.record(tampered)) == 1
    assert lane.applied == [] and lane.kafka.commits == [False]
    [letter] = lane.letters.letters
    assert (letter.topic, letter.value, letter.key) == (f"{TOPIC}.dlq", tampered, b"aggregate-key")
    assert letter.headers["bastion-reject-reason"] == b"bad_signature"
    assert letter.headers["bastion-source"] == f"{TOPIC}/2/1".encode()
    assert letter.headers["bastion-consumer"] == CONSUMER.encode() and BUNDLE_HEADER not in letter.headers
    assert lane.letters.waiting == [], "acknowledged"
    assert counted("bastion_events_rejected_total", reason="bad_signature") - rejected_before == 1
    [line] = [line for line in logs if line["event"] == "event_rejected"]
    assert (line["reason"], line["claimed_event_id"], line["correlation_id"]) == (
        "bad_signature",
        genuine.event_id,
        "corr-acc-1-1",
    )
    [(stored, record)] = lane.security_records()
    assert (record.consumer, record.topic, record.partition, record.offset, record.reason) == (
        CONSUMER,
        TOPIC,
        2,
        1,
        "bad_signature",
    )
    assert (record.claimed_producer, record.claimed_event_id, record.correlation_id) == (
        "accounts",
        genuine.event_id,
        "corr-acc-1-1",
    )
    assert not record.HasField("item")
    assert stored.event_id == str(uuid.uuid5(REJECTION_NAMESPACE, f"{CONSUMER}/{TOPIC}/2/1"))
    assert stored.correlation_id == "corr-acc-1-1"

    redelivered = Record(tampered, 1)
    lane.deliver(redelivered)
    assert len(lane.letters.letters) == 2 and len(lane.security_records()) == 1, "one security record per place"
    lane.letters.answer = False
    with pytest.raises(DeadLetterError):
        lane.deliver(lane.record(tampered))
    assert lane.kafka.commits == [False, False], "no offset is committed before its dead letter is acknowledged"


def test_what_a_refused_record_claims_is_recorded_only_when_well_formed_and_a_long_reason_is_cut(lane: Lane) -> None:
    """A producer's key signs an envelope with a type name of a thousand characters and a correlation id that would
    start a line of its own: the refusal is recorded, its detail cut to what a dead-letter header and a security
    record hold, and the security record is correlated by its own id."""
    forged = seal(
        lane.ring.signing_key("accounts"),
        TOPIC,
        AccountOpened(account_id="acc-1"),
        "acc-1",
        1,
        correlation_id="forged\nline",
    )
    forged.event_type = "x" * 1000
    sign(forged, lane.ring.signing_key("accounts").private_key)
    lane.deliver(lane.record(forged.SerializeToString()))
    [letter] = lane.letters.letters
    assert letter.headers["bastion-reject-reason"] == b"not_authorised"
    assert len(letter.headers["bastion-reject-detail"]) == 500
    [(stored, record)] = lane.security_records()
    assert len(record.detail) == 500 and record.correlation_id == "(malformed)"
    assert stored.correlation_id == stored.event_id


def test_a_record_the_broker_appended_in_time_is_fresh_however_late_it_is_read_and_only_the_broker_says_when(
    lane: Lane,
) -> None:
    """Freshness is measured against the broker's append time (LogAppendTime, which producers cannot set): a backlog
    read an hour late is applied; a record whose time its producer set is measured against the clock."""
    an_hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    late = lane.seal(AccountOpened(account_id="acc-1"), 1, occurred_at=an_hour_ago)
    late_bundle = lane.bundle((MoneyDeposited(account_id="acc-1", amount_minor=2), 2), now=an_hour_ago)
    lane.deliver(lane.record(late, appended=an_hour_ago), lane.record(late_bundle, BUNDLED, appended=an_hour_ago))
    assert lane.applied_sequences() == [1, 2] and lane.letters.letters == []
    replayed = lane.seal(AccountOpened(account_id="acc-2"), 1, aggregate="acc-2", occurred_at=an_hour_ago)
    lane.deliver(lane.record(replayed, appended=an_hour_ago, kind=TIMESTAMP_CREATE_TIME))
    assert [letter.headers["bastion-reject-reason"] for letter in lane.letters.letters] == [b"stale"]


def test_a_bundle_is_applied_envelope_by_envelope_and_its_refused_envelopes_are_dead_lettered_alone_in_one_go(
    lane: Lane,
) -> None:
    key = lane.ring.signing_key("accounts")
    raw = lane.bundle(
        (AccountOpened(account_id="acc-1"), 1),
        (PaymentCompleted(payment_id="p-1"), 2),
        (MoneyDeposited(account_id="acc-1", amount_minor=3), 2),
        (PaymentCompleted(payment_id="p-2"), 3),
        (MoneyDeposited(account_id="acc-1", amount_minor=4), 3),
    )
    with capture_logs() as logs:
        assert lane.consumer.handle(lane.record(raw, BUNDLED)) == "applied"
    assert lane.applied_sequences() == [1, 2, 3]
    assert lane.letters.flushes == 1, "the refused envelopes of a record cost one broker round trip"
    for letter, item in zip(lane.letters.letters, (1, 3), strict=True):
        assert letter.headers["bastion-reject-reason"] == b"not_authorised"
        assert letter.headers["bastion-source"] == f"{TOPIC}/2/1/{item}".encode()
        assert letter.headers[BUNDLE_HEADER] == BUNDLE_CONTENT
        one = EnvelopeBundle.FromString(letter.value)
        [member] = [Envelope.FromString(envelope) for envelope in one.envelopes]
        assert member.event_type == "bastion.payments.v1.PaymentCompleted" and one.proof.leaf_index == item
        SignatureChecker().verify_bundle(one, [member], key.private_key.public_key())
    assert [(record.item, record.claimed_event_id) for _, record in lane.security_records()] == [
        (item, Envelope.FromString(EnvelopeBundle.FromString(raw).envelopes[item]).event_id) for item in (1, 3)
    ]
    assert [line["item"] for line in logs if line["event"] == "event_rejected"] == [1, 3]


def test_a_bundle_refused_whole_is_dead_lettered_as_it_came_and_none_of_its_envelopes_is_applied(lane: Lane) -> None:
    raw = EnvelopeBundle.FromString(
        lane.bundle((AccountOpened(account_id="acc-1"), 1), (MoneyDeposited(account_id="acc-1", amount_minor=2), 2))
    )
    changed = Envelope.FromString(raw.envelopes[1])
    changed.payload = MoneyDeposited(account_id="acc-1", amount_minor=10**9).SerializeToString()
    raw.envelopes[1] = changed.SerializeToString()
    tampered = raw.SerializeToString()
    assert lane.consumer.handle(lane.record(tampered, BUNDLED)) == "rejected"
    assert lane.applied == []
    [letter] = lane.letters.letters
    assert (letter.value, letter.headers["bastion-reject-reason"]) == (tampered, b"bad_signature")
    assert (
        letter.headers[BUNDLE_HEADER] == BUNDLE_CONTENT and letter.headers["bastion-source"] == f"{TOPIC}/2/1".encode()
    )
    [(_, record)] = lane.security_records()
    assert record.claimed_event_id == Envelope.FromString(raw.envelopes[0]).event_id, "what its first envelope claims"


def test_a_record_claims_nothing_when_it_does_not_parse_and_a_bundle_what_its_first_envelope_claims() -> None:
    first, second = Envelope(event_id="e-1", producer="accounts"), Envelope(event_id="e-2", producer="payments")
    two = EnvelopeBundle(envelopes=[first.SerializeToString(), second.SerializeToString()]).SerializeToString()
    assert claimed_envelope(two, bundled=True) == first
    assert claimed_envelope(EnvelopeBundle().SerializeToString(), bundled=True) == Envelope()
    assert claimed_envelope(b"\xff\xff\xff") == Envelope()
    assert claimed_envelope(b"\xff\xff\xff", bundled=True) == Envelope()


def test_a_handler_that_fails_for_a_while_is_tried_again_and_its_event_applied(make_lane: Callable[..., Lane]) -> None:
    lane = make_lane(attempts=3, flaky=2)
    event = lane.seal(AccountOpened(account_id="acc-1"), 1)
    assert lane.consumer.handle(lane.record(event)) == "applied"
    assert lane.applied_sequences() == [1] and lane.letters.letters == [] and len(lane.calls) == 3


@pytest.mark.parametrize("transport", ["record", "bundle"])
def test_a_poison_event_is_set_aside_after_its_tries_and_the_partition_moves_on(
    make_lane: Callable[..., Lane], transport: str
) -> None:
    lane = make_lane(attempts=3)
    rejected_before = counted("bastion_events_rejected_total", reason="handler_failed")
    if transport == "record":
        raw = lane.seal(poison(1), 1)
        records = [lane.record(raw), lane.record(lane.seal(AccountOpened(account_id="acc-2"), 1, aggregate="acc-2"))]
        source = f"{TOPIC}/2/1"
    else:
        raw = lane.bundle(
            (AccountOpened(account_id="acc-1"), 1), (poison(2), 2), (AccountOpened(account_id="acc-2"), 3)
        )
        records = [lane.record(raw, BUNDLED)]
        source = f"{TOPIC}/2/1/1"
    assert [lane.consumer.handle(record) for record in records] == (
        ["rejected", "applied"] if transport == "record" else ["held"]
    ), "a bundle: the outcome of its last envelope"
    assert len([call for call in lane.calls if call == lane.calls[-2 if transport == "record" else 1]]) == 3
    [letter] = lane.letters.letters
    assert letter.headers["bastion-reject-reason"] == b"handler_failed"
    assert letter.headers["bastion-reject-detail"].startswith(b"RuntimeError: cannot apply poison")
    assert letter.headers["bastion-source"] == source.encode()
    if transport == "record":
        assert letter.value == raw and BUNDLE_HEADER not in letter.headers
        assert lane.applied_sequences() == [1]
    else:
        assert letter.headers[BUNDLE_HEADER] == BUNDLE_CONTENT
        [member] = EnvelopeBundle.FromString(letter.value).envelopes
        assert Envelope.FromString(member).sequence == 2
        assert lane.applied_sequences() == [1], "3 waits behind the gap 2 leaves"
        assert lane.held_sequences() == [3]
    assert lane.stored_sequences() == lane.applied_sequences(), "each failed try was undone"
    assert counted("bastion_events_rejected_total", reason="handler_failed") - rejected_before == 1


DATABASE_AWAY = [
    OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly")),
    # psycopg maps these to InternalError: a standby after a failover, a corrupted page
    sqlalchemy.exc.InternalError("INSERT", {}, psycopg.errors.ReadOnlySqlTransaction("read-only transaction")),
    sqlalchemy.exc.InternalError("INSERT", {}, psycopg.errors.lookup("XX001")("could not read block 7")),
]


@pytest.mark.parametrize("error", DATABASE_AWAY, ids=["connection lost", "read-only", "data corrupted"])
def test_a_database_that_is_away_stops_the_consumer_and_never_sets_the_event_aside(lane: Lane,
                                                                                   error: Exception) -> None:
    def away(_conn: Any, _event: VerifiedEvent) -> None:
        raise error

    lane.consumer.handler = away
    with pytest.raises(type(error)):
        lane.deliver(lane.record(lane.seal(AccountOpened(account_id="acc-1"), 1)))
    assert lane.letters.letters == [] and lane.kafka.commits == []


def test_a_database_error_the_event_causes_sets_it_aside_after_the_tries(lane: Lane) -> None:
    """Not every refusal of the database is an outage: a value out of range is this event's, and set aside."""
    def out_of_range(_conn: Any, event: VerifiedEvent) -> None:
        raise sqlalchemy.exc.DataError("INSERT", {}, psycopg.errors.NumericValueOutOfRange("integer out of range"))

    lane.consumer.handler = out_of_range
    lane.deliver(lane.record(lane.seal(AccountOpened(account_id="acc-1"), 1)))
    [letter] = lane.letters.letters
    assert letter.headers["bastion-reject-reason"] == b"handler_failed"


@pytest.mark.parametrize("transport", ["record", "bundle"])
def test_events_ahead_of_a_gap_are_held_and_applied_in_order_once_it_fills(lane: Lane, transport: str) -> None:
    """Held events are verified again when released, but not for freshness: they passed it when they came."""
    held_before = counted("bastion_events_held_total")
    later = [(MoneyDeposited(account_id="acc-1", amount_minor=n), n) for n in (2, 3, 4)]
    with capture_logs() as logs:
        if transport == "record":
            outcomes = [lane.consumer.handle(lane.record(lane.seal(payload, n))) for payload, n in later]
            sources = [f"{TOPIC}/2/{offset}" for offset in (1, 2, 3)]
        else:
            outcomes = [lane.consumer.handle(lane.record(lane.bundle(*later), BUNDLED))]
            sources = [f"{TOPIC}/2/1/{item}" for item in (0, 1, 2)]
    assert outcomes == ["held"] * len(outcomes) and lane.applied == []
    assert counted("bastion_events_held_total") - held_before == 3
    assert [line["sequence"] for line in logs if line["event"] == "event_held_behind_sequence_gap"] == [2, 3, 4]
    with lane.engine.connect() as conn:
        assert conn.execute(select(held.c.source).order_by(held.c.sequence)).scalars().all() == sources
    first = lane.seal(AccountOpened(account_id="acc-1"), 1)
    assert lane.consumer.handle(lane.record(first)) == "applied"
    assert lane.applied_sequences() == [1, 2, 3, 4] and lane.held_sequences() == []
    assert [event.bundle is not None for event in lane.applied] == [False] + [transport == "bundle"] * 3
    assert lane.letters.letters == []


@pytest.mark.parametrize("transport", ["record", "bundle"])
def test_held_events_are_not_asked_again_whether_they_are_fresh(make_lane: Callable[..., Lane], transport: str) -> None:
    """They arrived in time (the broker's append time says so) and waited an hour behind the gap."""
    an_hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    lane = make_lane()
    deposit = MoneyDeposited(account_id="acc-1", amount_minor=2)
    early = (
        lane.seal(deposit, 2, occurred_at=an_hour_ago)
        if transport == "record"
        else lane.bundle((deposit, 2), now=an_hour_ago)
    )
    lane.deliver(lane.record(early, BUNDLED if transport == "bundle" else None, appended=an_hour_ago))
    lane.deliver(lane.record(lane.seal(AccountOpened(account_id="acc-1"), 1)))
    assert lane.applied_sequences() == [1, 2] and lane.letters.letters == []


@pytest.mark.parametrize("transport", ["record", "bundle"])
def test_a_held_event_that_cannot_be_applied_is_set_aside_and_the_event_that_released_it_applied(
    lane: Lane, transport: str
) -> None:
    """2 (poison) and 3 wait for 1. When 1 comes it is applied; 2 is tried, its effect undone each time, then
    dead-lettered with where it was released and a security record of its own; 3 stays held behind the gap 2
    leaves."""
    rejected_before = counted("bastion_events_rejected_total", reason="handler_failed")
    if transport == "record":
        lane.deliver(lane.record(lane.seal(poison(2), 2)), lane.record(lane.seal(AccountOpened(account_id="a"), 3)))
        source = f"{TOPIC}/2/3/released/2"
    else:
        lane.deliver(lane.record(lane.bundle((poison(2), 2), (AccountOpened(account_id="a"), 3)), BUNDLED))
        source = f"{TOPIC}/2/2/0/released/2"
    assert lane.held_sequences() == [2, 3]
    releasing = (
        lane.bundle((AccountOpened(account_id="acc-1"), 1))
        if transport == "bundle"
        else lane.seal(AccountOpened(account_id="acc-1"), 1)
    )
    lane.deliver(lane.record(releasing, BUNDLED if transport == "bundle" else None))
    assert lane.applied_sequences() == [1] and lane.stored_sequences() == [1], "2's tries left nothing behind"
    assert lane.held_sequences() == [3]
    assert lane.calls[1:] == [lane.calls[1]] * 3, "2 was tried three times"
    [letter] = lane.letters.letters
    assert letter.headers["bastion-source"] == source.encode()
    assert letter.headers["bastion-reject-reason"] == b"handler_failed"
    assert letter.headers["bastion-reject-detail"].startswith(b"held event 2, released by this record: RuntimeError")
    if transport == "bundle":
        assert letter.headers[BUNDLE_HEADER] == BUNDLE_CONTENT
        [member] = EnvelopeBundle.FromString(letter.value).envelopes
        assert Envelope.FromString(member).sequence == 2
    else:
        assert Envelope.FromString(letter.value).sequence == 2 and BUNDLE_HEADER not in letter.headers
    [(stored, record)] = lane.security_records()
    assert stored.event_id == str(uuid.uuid5(REJECTION_NAMESPACE, f"{CONSUMER}/{source}"))
    assert record.detail.startswith("held event 2, released by this record: ")
    assert counted("bastion_events_rejected_total", reason="handler_failed") - rejected_before == 1
    assert lane.kafka.commits[-1] is False


@pytest.mark.parametrize("transport", ["record", "bundle"])
def test_a_held_event_that_no_longer_verifies_is_set_aside_with_why_and_the_events_behind_it_stay_held(
    lane: Lane, transport: str
) -> None:
    """The trust policy changed while 2 (an AccountFrozen) waited: accounts may no longer emit it."""
    frozen = AccountFrozen(account_id="acc-1", reason="fraud")
    if transport == "record":
        lane.deliver(lane.record(lane.seal(frozen, 2)), lane.record(lane.seal(AccountOpened(account_id="a"), 3)))
    else:
        lane.deliver(lane.record(lane.bundle((frozen, 2), (AccountOpened(account_id="a"), 3)), BUNDLED))
    lane.consumer.verifier = EnvelopeVerifier(
        lane.ring.trust_store(),
        TrustPolicy(
            {
                TOPIC: {
                    "accounts": frozenset({"bastion.accounts.v1.AccountOpened", "bastion.accounts.v1.MoneyDeposited"})
                }
            }
        ),
    )
    lane.deliver(lane.record(lane.seal(AccountOpened(account_id="acc-1"), 1)))
    assert lane.applied_sequences() == [1] and lane.held_sequences() == [3]
    [letter] = lane.letters.letters
    assert letter.headers["bastion-reject-reason"] == b"not_authorised"
    assert letter.headers["bastion-source"].endswith(b"/released/2")
    assert len(lane.security_records()) == 1


@pytest.mark.parametrize("error", DATABASE_AWAY, ids=["connection lost", "read-only", "data corrupted"])
def test_a_database_that_goes_away_while_a_held_event_is_applied_stops_the_consumer_and_sets_nothing_aside(
    lane: Lane, error: Exception,
) -> None:
    """Not the held event's fault: it stays held, the event that released it is rolled back and read again."""
    lane.deliver(lane.record(lane.seal(MoneyDeposited(account_id="acc-1", amount_minor=2), 2)))
    handler = lane.consumer.handler

    def away_for_the_held_event(conn: Any, event: VerifiedEvent) -> None:
        if event.envelope.sequence == 2:
            raise error
        handler(conn, event)

    lane.consumer.handler = away_for_the_held_event
    with pytest.raises(type(error)):
        lane.deliver(lane.record(lane.seal(AccountOpened(account_id="acc-1"), 1)))
    assert lane.letters.letters == [] and lane.security_records() == []
    assert lane.stored_sequences() == [] and lane.held_sequences() == [2] and lane.kafka.commits == [False]


def test_a_held_event_that_cannot_be_set_aside_stops_the_consumer_and_the_event_that_released_it_is_read_again(
    lane: Lane,
) -> None:
    """The dead letter of the held event is not acknowledged: nothing is committed, and the event that released it
    is neither applied for good nor set aside in its place."""
    lane.deliver(lane.record(lane.seal(poison(2), 2)))
    lane.letters.answer = False
    first = lane.seal(AccountOpened(account_id="acc-1"), 1)
    with pytest.raises(HeldEventNotSetAsideError, match="held event 2 could not be set aside: DeadLetterError"):
        lane.deliver(lane.record(first))
    assert [letter.headers["bastion-source"] for letter in lane.letters.letters] == [f"{TOPIC}/2/2/released/2".encode()]
    assert lane.stored_sequences() == [] and lane.held_sequences() == [2] and lane.security_records() == []
    assert lane.kafka.commits == [False], "only the batch before it"


def test_closing_the_consumer_waits_for_its_dead_letters(lane: Lane) -> None:
    lane.consumer.close()
    assert lane.kafka.closed and lane.letters.flushes == 1


def test_a_consumer_that_would_never_try_its_handler_is_refused() -> None:
    with pytest.raises(ValueError, match="handler_attempts must be at least 1"):
        ConsumerSettings(CONSUMER, CONSUMER, [TOPIC], handler_attempts=0)
    assert ConsumerSettings(CONSUMER, CONSUMER, [TOPIC], handler_attempts=1).handler_attempts == 1


def test_a_gap_that_stayed_open_is_reported_once_with_a_security_record_a_log_line_and_a_count(
    lane: Lane, monkeypatch: pytest.MonkeyPatch
) -> None:
    looks = OpenGaps([open_gap()])
    monkeypatch.setattr("bastion.events.consumer.inbox.open_gaps", looks)
    gaps_before = counted("bastion_events_sequence_gaps_total")
    with capture_logs() as logs:
        assert lane.consumer.report_open_gaps() == [open_gap()]
    assert looks.asked == [([TOPIC], dt.timedelta(seconds=30))]
    [(stored, record)] = lane.security_records()
    assert (record.reason, record.topic, record.partition, record.offset, record.item) == (
        "sequence_gap",
        TOPIC,
        2,
        40,
        1,
    )
    assert record.detail == (
        "sequence 2 of aggregate acc-1 from accounts missing for over 30s: 2 event(s) held behind, "
        "the first sequence 3 (held, not lost: applied in order if the missing ones come)"
    )
    assert (record.claimed_producer, record.claimed_event_id, record.correlation_id) == (
        "accounts",
        "e-3",
        "corr-acc-1-3",
    )
    assert stored.event_id == str(uuid.uuid5(REJECTION_NAMESPACE, f"{CONSUMER}/gap/accounts/2/acc-1"))
    [line] = [line for line in logs if line["event"] == "sequence_gap_open"]
    assert (line["missing"], line["held"], line["correlation_id"]) == ("sequence 2", 2, "corr-acc-1-3")
    assert counted("bastion_events_sequence_gaps_total") - gaps_before == 1

    # Seen again: recorded before (by this consumer or another replica), or marked reported: nothing new is raised,
    # even when another event now heads the events held behind the same missing sequence.
    for again in ([open_gap()], [open_gap(first_held=4)], [open_gap(missing=5, first_held=6, reported_before=True)]):
        looks.gaps = again
        assert lane.consumer.report_open_gaps() == []
    assert len(lane.security_records()) == 1
    assert counted("bastion_events_sequence_gaps_total") - gaps_before == 1


def test_without_a_security_outbox_a_gap_is_still_logged_and_counted(
    make_lane: Callable[..., Lane], monkeypatch: pytest.MonkeyPatch
) -> None:
    lane = make_lane(security=False)
    monkeypatch.setattr("bastion.events.consumer.inbox.open_gaps", OpenGaps([open_gap()]))
    gaps_before = counted("bastion_events_sequence_gaps_total")
    assert lane.consumer.report_open_gaps() == [open_gap()]
    assert counted("bastion_events_sequence_gaps_total") - gaps_before == 1


def test_the_consumer_looks_for_open_gaps_at_its_first_poll_then_once_a_while_and_a_failed_look_stops_nothing(
    lane: Lane, monkeypatch: pytest.MonkeyPatch
) -> None:
    looks = OpenGaps([], failing=True)
    monkeypatch.setattr("bastion.events.consumer.inbox.open_gaps", looks)
    with capture_logs() as logs:
        assert lane.deliver(lane.record(lane.seal(AccountOpened(account_id="acc-1"), 1))) == 1
        assert lane.deliver(lane.record(lane.seal(AccountOpened(account_id="acc-2"), 1, aggregate="acc-2"))) == 1
    assert len(looks.asked) == 1, f"the next look is {lane.consumer.settings.gap_check_seconds}s later"
    assert lane.applied_sequences() == [1, 1] and lane.kafka.commits == [False, False]
    [line] = [line for line in logs if line["event"] == "sequence_gap_report_failed"]
    assert (line["error"], line["detail"]) == ("RuntimeError", "the database went away mid-look")
