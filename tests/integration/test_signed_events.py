"""The verifying consumer against the real Kafka and PostgreSQL: each attack ends in the dead-letter topic
(or, for a replay, is dropped) with its reason, a counter and a log line; valid events around them are
applied exactly once, in order. Each test has its own topic, dead-letter topic and consumer group."""

import datetime as dt
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import structlog
from confluent_kafka import Consumer, Producer
from prometheus_client import REGISTRY
from sqlalchemy import Column, Engine, MetaData, String, Table, create_engine, select
from sqlalchemy.types import BigInteger

from bastion.access.v1.decision_pb2 import EventRejected
from bastion.accounts.v1.events_pb2 import AccountFrozen, AccountOpened, MoneyDeposited
from bastion.devstack.components.kafka import Kafka
from bastion.devstack.components.postgres import Postgres
from bastion.devstack.context import StackContext
from bastion.devstack.event_access import AclGrant, EventAccessPolicy, TopicPolicy
from bastion.events.consumer import REJECTION_NAMESPACE, ConsumerSettings, VerifyingConsumer
from bastion.events.envelopes import bundle, envelope_for, republish, seal
from bastion.events.field_crypto import DataKeyRing, encrypt_field, field_context, reveal
from bastion.events.keys import KeyRing
from bastion.events.outbox import Outbox
from bastion.events.signing import SignatureChecker, sign
from bastion.events.storage import EVENTS_METADATA, held, outbox
from bastion.events.trust import TrustPolicy
from bastion.events.v1.envelope_pb2 import Envelope, EnvelopeBundle
from bastion.events.verify import BUNDLE_CONTENT, BUNDLE_HEADER, EnvelopeVerifier, VerifiedEvent
from bastion.payments.v1.events_pb2 import PaymentCompleted
from tests.integration.conftest import bastion

CONSUMER = "notifications"
TEST_TABLES = MetaData()
applied = Table(
    "it_applied_events", TEST_TABLES,
    Column("event_id", String(36), primary_key=True),
    Column("aggregate_id", String(200), nullable=False),
    Column("sequence", BigInteger, nullable=False),
    Column("consumer_group", String(100), nullable=False),
    Column("applied_order", BigInteger, nullable=False),
)


@dataclass
class Lane:
    """One test's own topic, dead-letter topic, group, key ring and consumer."""

    topic: str
    group: str
    ring: KeyRing
    engine: Engine
    consumer: VerifyingConsumer
    kafka: Kafka
    ctx: StackContext
    seen: list[VerifiedEvent]

    def publish_raw(self, *records: bytes, key: bytes = b"k", headers: list[tuple[str, bytes]] | None = None) -> None:
        """Write records as the broker's admin: the attacker here has got past the ACLs."""
        producer = Producer(self.kafka.client_config("admin", self.ctx.credentials.kafka["admin"]))
        for record in records:
            producer.produce(self.topic, value=record, key=key, headers=headers or [])
        assert producer.flush(20) == 0

    def seal(self, producer: str, payload: object, aggregate: str, sequence: int, **kwargs: object) -> Envelope:
        return seal(self.ring.signing_key(producer), self.topic, payload, aggregate, sequence,  # type: ignore[arg-type]
                    correlation_id=f"corr-{aggregate}-{sequence}", **kwargs)  # type: ignore[arg-type]

    def consume_until(self, count: int, timeout: float = 60) -> None:
        deadline, handled = time.monotonic() + timeout, 0
        while handled < count and time.monotonic() < deadline:
            handled += self.consumer.poll_batch()
        assert handled == count, f"handled {handled} of {count} records"

    def applied_sequences(self, aggregate: str) -> list[int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(applied.c.sequence).where(
                applied.c.aggregate_id == aggregate, applied.c.consumer_group == self.group
            ).order_by(applied.c.applied_order)).all()
        return [row.sequence for row in rows]

    def security_records(self) -> list[EventRejected]:
        """The EventRejected records the consumer raised about this lane's topic (its outbox, not yet relayed)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(outbox.c.envelope).where(outbox.c.partition_key == f"consumer:{CONSUMER}",
                                                                outbox.c.topic == "access.decisions.v1")).all()
        records = [EventRejected.FromString(Envelope.FromString(row.envelope).payload) for row in rows]
        return [record for record in records if record.topic == self.topic]

    def dead_letters(self, count: int) -> list[tuple[bytes, dict[str, bytes]]]:
        reader = Consumer({**self.kafka.client_config("admin", self.ctx.credentials.kafka["admin"]),
                           "group.id": f"{self.group}-dlq-reader", "auto.offset.reset": "earliest"})
        reader.subscribe([f"{self.topic}.dlq"])
        found: list[tuple[bytes, dict[str, bytes]]] = []
        deadline = time.monotonic() + 30
        while len(found) < count and time.monotonic() < deadline:
            msg = reader.poll(1)
            if msg is not None and msg.error() is None:
                found.append((msg.value(), dict(msg.headers() or [])))
        reader.close()
        return found


def counter(name: str, topic: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"consumer": CONSUMER, "topic": topic, **labels}) or 0.0


@pytest.fixture(scope="module")
def engine(postgres: Postgres, ctx: StackContext) -> Engine:
    engine = create_engine(postgres.sqlalchemy_url(CONSUMER, ctx.credentials.postgres[CONSUMER], CONSUMER))
    EVENTS_METADATA.create_all(engine)
    TEST_TABLES.create_all(engine)
    return engine


@pytest.fixture()
def lane(kafka: Kafka, ctx: StackContext, engine: Engine, unique: str, tmp_path: Path) -> Iterator[Lane]:
    topic, group = f"it.{unique}.v1", f"it-{unique}"
    access = EventAccessPolicy({
        topic: TopicPolicy(topic, 1, ("accounts", "payments"), {CONSUMER: group},
                           {"message.timestamp.type": "LogAppendTime"}),
        f"{topic}.dlq": TopicPolicy(f"{topic}.dlq", 1, (CONSUMER,), {}),
    })
    admin = kafka.admin()
    admin.ensure_topics(access)
    admin.grant(access.grants() | {AclGrant(CONSUMER, "TOPIC", "access.decisions.v1", "WRITE")})
    ring = KeyRing(tmp_path / "keys")
    ring.ensure(["accounts", "payments", CONSUMER])
    trust = TrustPolicy({topic: {
        "accounts": frozenset({"bastion.accounts.v1.AccountOpened", "bastion.accounts.v1.MoneyDeposited",
                               "bastion.accounts.v1.AccountFrozen"}),
        "payments": frozenset({"bastion.payments.v1.PaymentCompleted"}),
    }})
    order = iter(range(1, 10**6))
    seen: list[VerifiedEvent] = []

    def handler(conn: object, event: VerifiedEvent) -> None:
        if isinstance(event.payload, AccountFrozen) and event.payload.reason == "poison":
            raise RuntimeError("this handler cannot apply that event")
        seen.append(event)
        conn.execute(applied.insert().values(  # type: ignore[attr-defined]
            event_id=event.event_id, aggregate_id=event.envelope.aggregate_id, sequence=event.envelope.sequence,
            consumer_group=group, applied_order=time.monotonic_ns() + next(order)))

    consumer = VerifyingConsumer(
        ConsumerSettings(CONSUMER, group, [topic], batch_size=50, poll_seconds=0.5),
        kafka.client_config(CONSUMER, ctx.credentials.kafka[CONSUMER]),
        EnvelopeVerifier(ring.trust_store(), trust), engine, handler,
        security_outbox=Outbox(ring.signing_key(CONSUMER)),
    )
    yield Lane(topic, group, ring, engine, consumer, kafka, ctx, seen)
    consumer.close()
    admin.revoke(access.grants())
    admin.client.delete_topics([topic, f"{topic}.dlq"])


def test_valid_stream_is_applied_exactly_once_in_order_and_each_attack_is_refused(lane: Lane, tmp_path: Path) -> None:
    aggregate = f"acc-{lane.group}"
    opened = AccountOpened(account_id=aggregate, owner="alice", currency="EUR")
    first = lane.seal("accounts", opened, aggregate, 1)
    tampered = lane.seal("accounts", opened, aggregate, 2)
    tampered.payload = AccountOpened(account_id=aggregate, owner="mallory", currency="EUR").SerializeToString()
    rogue_ring = KeyRing(tmp_path / "rogue")
    rogue_ring.ensure(["accounts"])
    unknown_key = seal(rogue_ring.signing_key("accounts"), lane.topic, opened, aggregate, 2, "corr-rogue")
    a_with_b_key = lane.seal("payments", opened, aggregate, 2)
    a_with_b_key.producer = "accounts"
    a_with_b_key.key_id = lane.ring.signing_key("accounts").key_id
    not_allowed = lane.seal("payments", MoneyDeposited(account_id=aggregate, amount_minor=10**9), aggregate, 2)
    stale = lane.seal("accounts", opened, aggregate, 2, occurred_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10))
    unknown_fields = lane.seal("accounts", opened, aggregate, 2).SerializeToString() + b"\xa2\x06\x03bad"
    second = lane.seal("accounts", MoneyDeposited(account_id=aggregate, amount_minor=500, currency="EUR"), aggregate, 2)
    truncated = second.SerializeToString()[:40]
    third = lane.seal("accounts", MoneyDeposited(account_id=aggregate, amount_minor=700, currency="EUR"), aggregate, 3)
    attacks = {
        "bad_signature": tampered.SerializeToString(),
        "unknown_key": unknown_key.SerializeToString(),
        "bad_signature_b_key": a_with_b_key.SerializeToString(),
        "not_authorised": not_allowed.SerializeToString(),
        "stale": stale.SerializeToString(),
        "unknown_fields": unknown_fields,
        "malformed": truncated,
    }
    before = {reason: counter("bastion_events_rejected_total", lane.topic, reason=reason)
              for reason in ("bad_signature", "unknown_key", "not_authorised", "stale", "unknown_fields", "malformed")}
    replays_before = counter("bastion_events_dropped_total", lane.topic, reason="duplicate")

    with structlog.testing.capture_logs() as logs:
        lane.publish_raw(first.SerializeToString(), *attacks.values(), second.SerializeToString(),
                         first.SerializeToString(), third.SerializeToString())
        lane.consume_until(1 + len(attacks) + 3)

    assert lane.applied_sequences(aggregate) == [1, 2, 3]
    dead = lane.dead_letters(len(attacks))
    reasons = sorted(headers["bastion-reject-reason"].decode() for _, headers in dead)
    assert reasons == sorted(["bad_signature", "unknown_key", "bad_signature", "not_authorised", "stale",
                              "unknown_fields", "malformed"])
    assert {value for value, _ in dead} == set(attacks.values()), "the dead-letter topic keeps the original bytes"
    expected_increments = {"bad_signature": 2, "unknown_key": 1, "not_authorised": 1, "stale": 1,
                           "unknown_fields": 1, "malformed": 1}
    for reason, increment in expected_increments.items():
        assert counter("bastion_events_rejected_total", lane.topic, reason=reason) - before[reason] == increment
    assert counter("bastion_events_dropped_total", lane.topic, reason="duplicate") - replays_before == 1
    rejected_logs = [entry for entry in logs if entry["event"] == "event_rejected"]
    assert len(rejected_logs) == len(attacks)
    assert all(entry["log_level"] == "warning" and "correlation_id" in entry for entry in rejected_logs)
    assert {e["correlation_id"] for e in rejected_logs if e["reason"] == "stale"} == {f"corr-{aggregate}-2"}
    assert [e["reason"] for e in logs if e["event"] == "event_dropped"] == ["duplicate"]

    mine = lane.security_records()
    assert sorted(r.reason for r in mine) == reasons
    assert all(r.consumer == CONSUMER for r in mine)


def test_a_batch_signed_by_the_relay_is_applied_and_its_forged_members_are_refused(lane: Lane) -> None:
    """The relay signs a batch once; each event is still checked on its own. A payload swapped under a genuine
    proof, and a proof bent to fit, are both dead-lettered; the genuine events of the batch are applied."""
    aggregate = f"acc-batch-{lane.group}"
    events = [lane.seal("accounts", AccountOpened(account_id=aggregate, owner="alice", currency="EUR"), aggregate, 1)]
    events += [lane.seal("accounts", MoneyDeposited(account_id=aggregate, amount_minor=100 * n, currency="EUR"),
                         aggregate, n) for n in (2, 3, 4)]
    relayed = republish([event.SerializeToString() for event in events], lane.ring.signing_key("accounts"))
    assert {Envelope.FromString(raw).batch.leaf_count for raw in relayed} == {4}
    forged = Envelope.FromString(relayed[1])
    forged.payload = MoneyDeposited(account_id=aggregate, amount_minor=10**9, currency="EUR").SerializeToString()
    bent = Envelope.FromString(relayed[2])
    bent.batch.path[0] = bytes(32)
    attacks = [forged.SerializeToString(), bent.SerializeToString()]
    before = counter("bastion_events_rejected_total", lane.topic, reason="bad_signature")

    lane.publish_raw(relayed[0], *attacks, relayed[1], relayed[2], relayed[3])
    lane.consume_until(6)

    assert lane.applied_sequences(aggregate) == [1, 2, 3, 4]
    dead = lane.dead_letters(2)
    assert {value for value, _ in dead} == set(attacks)
    assert {headers["bastion-reject-reason"] for _, headers in dead} == {b"bad_signature"}
    assert counter("bastion_events_rejected_total", lane.topic, reason="bad_signature") - before == 2


def test_a_bundle_is_applied_envelope_by_envelope_and_refused_whole_when_tampered(lane: Lane) -> None:
    """A bundle from the relay (one record, one signature): its valid envelopes are applied in order, one of a type
    its producer may not emit is dead-lettered alone (as an envelope that verifies alone, with its place in the
    bundle) and raises a security record; replaying the bundle applies nothing twice; a bundle with one changed
    payload is dead-lettered whole, as it came, and none of its envelopes is applied."""
    aggregate, other = f"acc-bundle-{lane.group}", f"acc-bundle-other-{lane.group}"
    key = lane.ring.signing_key("accounts")

    def stored(payload: object, aggregate_id: str, sequence: int) -> bytes:
        return envelope_for(key, lane.topic, payload, aggregate_id, sequence,  # type: ignore[arg-type]
                            correlation_id=f"corr-{aggregate_id}-{sequence}").SerializeToString()

    rows = [stored(AccountOpened(account_id=aggregate, owner="alice", currency="EUR"), aggregate, 1),
            stored(MoneyDeposited(account_id=aggregate, amount_minor=100, currency="EUR"), aggregate, 2),
            stored(PaymentCompleted(payment_id="p-1"), f"pay-{aggregate}", 1),
            stored(MoneyDeposited(account_id=aggregate, amount_minor=200, currency="EUR"), aggregate, 3)]
    genuine = bundle(rows, key).SerializeToString()
    tampered = bundle([stored(AccountOpened(account_id=other, owner="bob", currency="EUR"), other, 1)], key)
    changed = Envelope.FromString(tampered.envelopes[0])
    changed.payload = AccountOpened(account_id=other, owner="mallory", currency="EUR").SerializeToString()
    tampered.envelopes[0] = changed.SerializeToString()
    refused_before = {reason: counter("bastion_events_rejected_total", lane.topic, reason=reason)
                      for reason in ("not_authorised", "bad_signature")}
    duplicates_before = counter("bastion_events_dropped_total", lane.topic, reason="duplicate")

    with structlog.testing.capture_logs() as logs:
        lane.publish_raw(genuine, tampered.SerializeToString(), genuine, headers=[(BUNDLE_HEADER, BUNDLE_CONTENT)])
        lane.consume_until(3)

    assert lane.applied_sequences(aggregate) == [1, 2, 3]
    assert lane.applied_sequences(other) == []
    dead = sorted(lane.dead_letters(3), key=lambda letter: letter[1]["bastion-source"])
    [whole] = [letter for letter in dead if letter[1]["bastion-reject-reason"] == b"bad_signature"]
    assert whole[0] == tampered.SerializeToString() and whole[1][BUNDLE_HEADER] == BUNDLE_CONTENT
    alone = [letter for letter in dead if letter[1]["bastion-reject-reason"] == b"not_authorised"]
    assert len(alone) == 2, "the refused envelope, once per delivery of the bundle"
    for value, headers in alone:
        assert headers["bastion-source"].decode().endswith("/2") and headers[BUNDLE_HEADER] == BUNDLE_CONTENT
        one = EnvelopeBundle.FromString(value)  # a bundle of one: the envelope, the signature, its proof
        [envelope] = [Envelope.FromString(member) for member in one.envelopes]
        assert envelope.event_type == "bastion.payments.v1.PaymentCompleted" and one.proof.leaf_count == 4
        SignatureChecker().verify_bundle(one, [envelope], key.private_key.public_key())  # checkable again alone
    assert counter("bastion_events_rejected_total", lane.topic, reason="not_authorised") \
        - refused_before["not_authorised"] == 2
    assert counter("bastion_events_rejected_total", lane.topic, reason="bad_signature") \
        - refused_before["bad_signature"] == 1
    assert counter("bastion_events_dropped_total", lane.topic, reason="duplicate") - duplicates_before == 3
    rejected = [entry for entry in logs if entry["event"] == "event_rejected"]
    assert sorted((entry["reason"], entry["item"]) for entry in rejected) == [
        ("bad_signature", None), ("not_authorised", 2), ("not_authorised", 2)]
    mine = sorted((r.reason, r.item if r.HasField("item") else None, r.offset) for r in lane.security_records())
    assert mine == [("bad_signature", None, 1), ("not_authorised", 2, 0), ("not_authorised", 2, 2)]


def test_envelopes_of_a_bundle_held_behind_a_gap_are_verified_again_and_applied_in_order(lane: Lane) -> None:
    """Events 2 and 3 of an aggregate arrive in a bundle before the bundle holding event 1: they are held (as
    bundles of one, each verifying alone) and applied after event 1."""
    aggregate = f"acc-held-{lane.group}"
    key = lane.ring.signing_key("accounts")
    rows = [envelope_for(key, lane.topic, MoneyDeposited(account_id=aggregate, amount_minor=n, currency="EUR"),
                         aggregate, n, correlation_id=f"corr-{n}").SerializeToString() for n in (1, 2, 3)]
    held_before = counter("bastion_events_held_total", lane.topic)
    lane.publish_raw(bundle(rows[1:], key).SerializeToString(), bundle(rows[:1], key).SerializeToString(),
                     headers=[(BUNDLE_HEADER, BUNDLE_CONTENT)])
    lane.consume_until(2)
    assert lane.applied_sequences(aggregate) == [1, 2, 3]
    assert counter("bastion_events_held_total", lane.topic) - held_before == 2
    assert [event.bundle is not None for event in lane.seen if event.envelope.aggregate_id == aggregate] == [True] * 3


def test_a_sequence_gap_is_held_back_and_released_in_order(lane: Lane) -> None:
    aggregate = f"gap-{lane.group}"
    events = [lane.seal("accounts", MoneyDeposited(account_id=aggregate, amount_minor=n, currency="EUR"), aggregate, n)
              for n in (1, 2, 3, 4)]
    held_before = counter("bastion_events_held_total", lane.topic)
    lane.publish_raw(events[0].SerializeToString(), events[2].SerializeToString(), events[3].SerializeToString())
    lane.consume_until(3)
    assert lane.applied_sequences(aggregate) == [1]
    assert counter("bastion_events_held_total", lane.topic) - held_before == 2
    lane.publish_raw(events[1].SerializeToString())
    lane.consume_until(1)
    assert lane.applied_sequences(aggregate) == [1, 2, 3, 4]


def test_a_gap_that_stays_open_is_reported_once_and_its_events_stay_held(lane: Lane) -> None:
    """Events 2 and 6 of an aggregate are missing: 3, 4 and 7 wait behind 2. Once they have waited longer than the
    consumer's `gap_alert_seconds`, the periodic look (in `poll_batch`) raises one `sequence_gap` security record
    naming the missing sequence and where the first held event was read, logs and counts it. An event held behind
    the same gap later raises nothing new. When 2 comes, 3 to 5 are applied and 7 now waits behind 6: a new gap, a
    new report at the next look (7 has waited long enough). When 6 comes, everything is applied in order."""
    aggregate = f"open-gap-{lane.group}"
    lane.consumer.settings = replace(lane.consumer.settings, gap_alert_seconds=1.0)
    events = [lane.seal("accounts", MoneyDeposited(account_id=aggregate, amount_minor=n, currency="EUR"), aggregate, n)
              for n in range(1, 8)]
    gaps_before = counter("bastion_events_sequence_gaps_total", lane.topic)

    def gap_records() -> list[EventRejected]:
        return [record for record in lane.security_records() if record.reason == "sequence_gap"]

    def reported_behind() -> dict[int, int | None]:
        with lane.engine.connect() as conn:
            return dict(conn.execute(select(held.c.sequence, held.c.reported_gap).where(
                held.c.aggregate_id == aggregate)).all())

    def publish(*sequences: int) -> None:
        lane.publish_raw(*(events[n - 1].SerializeToString() for n in sequences))
        lane.consume_until(len(sequences))

    publish(1, 3, 4, 7)
    assert gap_records() == [], "held for less than the consumer waits: not reported yet"
    time.sleep(1.5)
    with structlog.testing.capture_logs() as logs:
        assert lane.consumer.poll_batch() == 0  # nothing to read: only the periodic look for open gaps
    [record] = gap_records()
    assert record.consumer == CONSUMER and record.topic == lane.topic
    assert (record.partition, record.offset, record.HasField("item")) == (0, 1, False)  # where event 3 was read
    assert record.detail.startswith(f"sequence 2 of aggregate {aggregate} from accounts missing for over 1s: "
                                    "3 event(s) held behind, the first sequence 3")
    assert (record.claimed_producer, record.claimed_event_id, record.correlation_id) == (
        "accounts", events[2].event_id, events[2].correlation_id)
    [line] = [line for line in logs if line["event"] == "sequence_gap_open" and line["topic"] == lane.topic]
    assert (line["missing"], line["held"], line["correlation_id"]) == ("sequence 2", 3, events[2].correlation_id)
    assert counter("bastion_events_sequence_gaps_total", lane.topic) - gaps_before == 1
    assert reported_behind() == {3: 2, 4: 2, 7: 2}
    shown = bastion("events", "held")  # what an operator who got the alert reads
    assert shown.returncode == 0, shown.stdout + shown.stderr
    [line] = [line for line in shown.stdout.splitlines() if aggregate in line]
    assert f"notifications: accounts {aggregate} on {lane.topic}: waits for sequence 2; 3 event(s) held" in line
    assert line.endswith("reported behind 2"), line

    publish(5)
    time.sleep(1.5)
    assert lane.consumer.report_open_gaps() == [], "the same gap, reported already"
    assert len(gap_records()) == 1 and reported_behind() == {3: 2, 4: 2, 5: 2, 7: 2}
    assert counter("bastion_events_sequence_gaps_total", lane.topic) - gaps_before == 1

    publish(2)
    assert lane.applied_sequences(aggregate) == [1, 2, 3, 4, 5]
    lane.consumer.report_open_gaps()  # if the look after the batch that applied them was not due yet
    assert sorted(record.detail.split(" of ")[0] for record in gap_records()) == ["sequence 2", "sequence 6"]
    [second] = [record for record in gap_records() if record.detail.startswith("sequence 6")]
    assert "1 event(s) held behind, the first sequence 7" in second.detail and second.offset == 3
    assert counter("bastion_events_sequence_gaps_total", lane.topic) - gaps_before == 2
    assert reported_behind() == {7: 6}

    publish(6)
    assert lane.applied_sequences(aggregate) == [1, 2, 3, 4, 5, 6, 7]
    assert reported_behind() == {}


@pytest.mark.parametrize("transport", ["record", "bundle"])
def test_a_held_event_that_cannot_be_applied_is_set_aside_not_the_event_that_released_it(lane: Lane,
                                                                                          transport: str) -> None:
    """Events 2 (poison for the handler) and 3 arrive before 1 and are held. When 1 fills the gap, 1 is applied;
    2 is dead-lettered (handler_failed, with where it was released) after its retries, and its security record is
    kept under an id of its own; 3 stays held behind the gap 2 leaves. Before, the failure of 2 failed the whole
    transaction and set 1 aside in its place."""
    aggregate = f"held-poison-{lane.group}"
    events = [lane.seal("accounts", MoneyDeposited(account_id=aggregate, amount_minor=1, currency="EUR"), aggregate, 1),
              lane.seal("accounts", AccountFrozen(account_id=aggregate, reason="poison"), aggregate, 2),
              lane.seal("accounts", MoneyDeposited(account_id=aggregate, amount_minor=3, currency="EUR"), aggregate, 3)]
    rejected_before = counter("bastion_events_rejected_total", lane.topic, reason="handler_failed")
    if transport == "record":
        lane.publish_raw(events[1].SerializeToString(), events[2].SerializeToString())
        lane.consume_until(2)
        lane.publish_raw(events[0].SerializeToString())
        source = f"{lane.topic}/0/2/released/2"
    else:
        key = lane.ring.signing_key("accounts")
        lane.publish_raw(bundle([e.SerializeToString() for e in events[1:]], key).SerializeToString(),
                         headers=[(BUNDLE_HEADER, BUNDLE_CONTENT)])
        lane.consume_until(1)
        lane.publish_raw(bundle([events[0].SerializeToString()], key).SerializeToString(),
                         headers=[(BUNDLE_HEADER, BUNDLE_CONTENT)])
        source = f"{lane.topic}/0/1/0/released/2"
    lane.consume_until(1)
    assert lane.applied_sequences(aggregate) == [1]
    [(value, headers)] = lane.dead_letters(1)
    assert headers["bastion-reject-reason"] == b"handler_failed"
    assert headers["bastion-source"] == source.encode()
    if transport == "record":
        assert value == events[1].SerializeToString()
    else:
        assert headers[BUNDLE_HEADER] == BUNDLE_CONTENT
        [alone] = EnvelopeBundle.FromString(value).envelopes
        assert Envelope.FromString(alone).event_id == events[1].event_id
    assert counter("bastion_events_rejected_total", lane.topic, reason="handler_failed") - rejected_before == 1
    record_id = str(uuid.uuid5(REJECTION_NAMESPACE, f"{CONSUMER}/{source}"))
    with lane.engine.connect() as conn:
        still_held = conn.execute(select(held.c.sequence).where(held.c.aggregate_id == aggregate)).scalars().all()
        security_records = conn.execute(select(outbox.c.topic).where(outbox.c.event_id == record_id)).scalars().all()
    assert still_held == [3]
    assert security_records == ["access.decisions.v1"]


def test_a_replayed_sequence_with_a_new_event_id_has_no_effect(lane: Lane) -> None:
    aggregate = f"seq-{lane.group}"
    first = lane.seal("accounts", AccountOpened(account_id=aggregate), aggregate, 1)
    again = lane.seal("accounts", AccountOpened(account_id=aggregate), aggregate, 1)
    lane.publish_raw(first.SerializeToString(), again.SerializeToString())
    lane.consume_until(2)
    assert lane.applied_sequences(aggregate) == [1]


def test_an_event_signed_for_another_topic_is_refused(lane: Lane) -> None:
    aggregate = f"pay-{lane.group}"
    elsewhere = seal(lane.ring.signing_key("payments"), "payments.events.v1", PaymentCompleted(payment_id="p1"),
                     aggregate, 1, "corr-x")
    moved = Envelope()
    moved.CopyFrom(elsewhere)
    before = counter("bastion_events_rejected_total", lane.topic, reason="topic_mismatch")
    with structlog.testing.capture_logs() as logs:
        lane.publish_raw(moved.SerializeToString())
        lane.consume_until(1)
    dead = lane.dead_letters(1)
    assert dead[0][1]["bastion-reject-reason"] == b"topic_mismatch"
    assert lane.applied_sequences(aggregate) == []
    assert counter("bastion_events_rejected_total", lane.topic, reason="topic_mismatch") - before == 1
    [logged] = [entry for entry in logs if entry["event"] == "event_rejected"]
    assert (logged["reason"], logged["correlation_id"], logged["log_level"]) == ("topic_mismatch", "corr-x", "warning")
    assert [(r.reason, r.claimed_event_id) for r in lane.security_records()] == [("topic_mismatch", elsewhere.event_id)]
    resigned = Envelope()
    resigned.CopyFrom(elsewhere)
    resigned.topic = lane.topic
    sign(resigned, lane.ring.signing_key("payments").private_key)
    lane.publish_raw(resigned.SerializeToString())
    lane.consume_until(1)
    assert lane.applied_sequences(aggregate) == [1]


def test_personal_data_is_ciphertext_except_for_entitled_readers(lane: Lane, tmp_path: Path) -> None:
    issuer = DataKeyRing(tmp_path / "data" / "issuer")
    issuer.ensure([lane.topic])
    for service in ("accounts", "notifications"):
        issuer.export_to(tmp_path / "data" / service, lane.topic)
    accounts_keys, notifications_keys = (DataKeyRing(tmp_path / "data" / s) for s in ("accounts", "notifications"))
    audit_keys = DataKeyRing(tmp_path / "data" / "audit")
    aggregate, email = f"pii-{lane.group}", f"alice.{lane.group}@bastion.local"
    context = field_context("bastion.accounts.v1.AccountOpened.owner_email", aggregate)
    payload = AccountOpened(account_id=aggregate, owner="alice", currency="EUR",
                            owner_email=encrypt_field(accounts_keys, lane.topic, context, email))
    lane.publish_raw(lane.seal("accounts", payload, aggregate, 1).SerializeToString())
    lane.consume_until(1)

    [event] = [e for e in lane.seen if e.envelope.aggregate_id == aggregate]
    assert isinstance(event.payload, AccountOpened)
    assert reveal(notifications_keys, lane.topic, context, event.payload.owner_email) == email
    assert reveal(audit_keys, lane.topic, context, event.payload.owner_email) is None
    reader = Consumer({**lane.kafka.client_config("admin", lane.ctx.credentials.kafka["admin"]),
                       "group.id": f"{lane.group}-raw", "auto.offset.reset": "earliest"})
    reader.subscribe([lane.topic])
    raw = None
    for _ in range(30):
        message = reader.poll(1)
        if message is not None and message.error() is None:
            raw = message.value()
            break
    reader.close()
    assert raw is not None and email.encode() not in raw, "Kafka holds only ciphertext of the address"


def test_an_event_of_the_previous_schema_version_is_applied(lane: Lane) -> None:
    aggregate = f"v1-{lane.group}"
    old = lane.seal("accounts", MoneyDeposited(account_id=aggregate, amount_minor=250), aggregate, 1)
    old.schema_version = 1
    sign(old, lane.ring.signing_key("accounts").private_key)
    lane.publish_raw(old.SerializeToString())
    lane.consume_until(1)
    assert lane.applied_sequences(aggregate) == [1]
    [event] = [e for e in lane.seen if e.envelope.aggregate_id == aggregate]
    assert isinstance(event.payload, MoneyDeposited)
    assert (event.payload.amount_minor, event.payload.currency) == (250, "EUR")


def test_a_poison_event_is_set_aside_after_retries_and_the_partition_moves_on(lane: Lane) -> None:
    aggregate = f"poison-{lane.group}"
    poison = lane.seal("accounts", AccountFrozen(account_id=aggregate, reason="poison"), aggregate, 1)
    other = f"after-{lane.group}"
    after = lane.seal("accounts", AccountOpened(account_id=other), other, 1)
    lane.publish_raw(poison.SerializeToString(), after.SerializeToString())
    lane.consume_until(2)
    [(value, headers)] = lane.dead_letters(1)
    assert headers["bastion-reject-reason"] == b"handler_failed"
    assert value == poison.SerializeToString()
    assert lane.applied_sequences(aggregate) == []
    assert lane.applied_sequences(other) == [1]
