"""Nothing is lost and nothing is applied twice: a relay or consumer killed with SIGKILL at the worst moment,
and Kafka stopped for 30 s while a service keeps writing. Real Kafka, real PostgreSQL, separate processes."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from sqlalchemy import Engine, create_engine, func, select

from bastion.accounts.v1.events_pb2 import AccountFrozen, MoneyDeposited
from bastion.devstack.components.kafka import Kafka
from bastion.devstack.components.postgres import Postgres
from bastion.devstack.context import StackContext
from bastion.devstack.event_access import EventAccessPolicy, TopicPolicy
from bastion.devstack.stack import Stack
from bastion.events.errors import EventTooLargeError
from bastion.events.keys import KeyRing
from bastion.events.outbox import Outbox, OutboxRelay
from bastion.events.partitions import partition_for
from bastion.events.storage import outbox
from bastion.events.v1.envelope_pb2 import EnvelopeBundle
from bastion.events.verify import MAX_ENVELOPE_BYTES, is_bundle
from bastion.grpc.errors import status_for
from tests.integration.conftest import bastion
from tests.integration.event_worker import applied, create_schema

EVENT_TYPE = "bastion.accounts.v1.MoneyDeposited"


@dataclass
class Delivery:
    topic: str
    group: str
    ring: KeyRing
    producer_db: Engine
    consumer_db: Engine
    producer_url: str
    consumer_url: str
    schema: str
    kafka: Kafka
    ctx: StackContext
    tmp: Path
    access: EventAccessPolicy

    def write(self, count: int, aggregates: int = 5) -> None:
        writer = Outbox(self.ring.signing_key("accounts"))
        with self.producer_db.begin() as conn:
            for n in range(count):
                writer.append(conn, self.topic, MoneyDeposited(account_id=f"a{n % aggregates}", amount_minor=n + 1,
                                                               currency="EUR"),
                              aggregate_id=f"{self.schema}-a{n % aggregates}", correlation_id=f"c{n}")

    def worker(self, mode: str, **extra: Any) -> subprocess.Popen[bytes]:
        principal = "accounts" if mode == "relay" else "notifications"
        config = {
            "mode": mode, "schema": self.schema, "topic": self.topic, "group": self.group,
            "db_url": self.producer_url if mode == "relay" else self.consumer_url,
            "kafka": self.kafka.client_config(principal, self.ctx.credentials.kafka[principal]) | {"logger": None},
            "keys_dir": str(self.ring.folder), "trust": {self.topic: {"accounts": [EVENT_TYPE]}}, **extra,
        }
        config["kafka"].pop("logger")
        path = self.tmp / f"{mode}-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(config))
        return subprocess.Popen([sys.executable, "-m", "tests.integration.event_worker", str(path)],
                                cwd=Path(__file__).resolve().parents[2])

    def unsent(self) -> int:
        with self.producer_db.connect() as conn:
            return conn.execute(select(func.count()).select_from(outbox).where(outbox.c.sent_at.is_(None))).scalar_one()

    def applied_rows(self) -> list[tuple[str, int]]:
        with self.consumer_db.connect() as conn:
            return [(r.aggregate_id, r.sequence) for r in
                    conn.execute(select(applied.c.aggregate_id, applied.c.sequence).order_by(applied.c.applied_ns))]

    def topic_size(self) -> int:
        """Records in the topic (the relay sends bundles: a record holds many events)."""
        probe = Consumer(self.kafka.client_config("admin", self.ctx.credentials.kafka["admin"]) | {"group.id": "probe"})
        low, high = probe.get_watermark_offsets(TopicPartition(self.topic, 0), timeout=10)
        probe.close()
        return int(high - low)

    def topic_events(self) -> int:
        """Events in the topic: every record read from the start, a bundle counted by its envelopes."""
        records = self.topic_size()
        reader = Consumer(self.kafka.client_config("admin", self.ctx.credentials.kafka["admin"])
                          | {"group.id": f"count-{time.monotonic_ns()}", "enable.auto.commit": False})
        reader.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
        events, seen, deadline = 0, 0, time.monotonic() + 30
        while seen < records and time.monotonic() < deadline:
            message = reader.poll(1)
            if message is None or message.error() is not None:
                continue
            seen += 1
            events += len(EnvelopeBundle.FromString(message.value()).envelopes) if is_bundle(message.headers()) else 1
        reader.close()
        return events

    def committed_offset(self) -> int:
        admin = self.kafka.client_config("admin", self.ctx.credentials.kafka["admin"])
        probe = Consumer(admin | {"group.id": self.group})
        [partition] = probe.committed([TopicPartition(self.topic, 0)], timeout=10)
        probe.close()
        return int(partition.offset)


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def assert_each_applied_once_in_order(delivery: Delivery, expected: int) -> None:
    rows = delivery.applied_rows()
    assert len(rows) == expected, f"{len(rows)} applied, {expected} written"
    assert len(set(rows)) == expected, "an event was applied twice"
    by_aggregate: dict[str, list[int]] = {}
    for aggregate, sequence in rows:
        by_aggregate.setdefault(aggregate, []).append(sequence)
    for aggregate, sequences in by_aggregate.items():
        assert sequences == list(range(1, len(sequences) + 1)), f"{aggregate} applied out of order"


@pytest.fixture()
def delivery(kafka: Kafka, postgres: Postgres, ctx: StackContext, unique: str, tmp_path: Path) -> Iterator[Delivery]:
    topic, group, schema = f"it.{unique}.v1", f"it-{unique}", f"it_{unique}"
    access = EventAccessPolicy({
        topic: TopicPolicy(topic, 1, ("accounts",), {"notifications": group},
                           {"message.timestamp.type": "LogAppendTime"}),
        f"{topic}.dlq": TopicPolicy(f"{topic}.dlq", 1, ("notifications",), {}),
    })
    admin = kafka.admin()
    admin.ensure_topics(access)
    admin.grant(access.grants())
    ring = KeyRing(tmp_path / "keys")
    ring.ensure(["accounts"])
    urls = {db: postgres.sqlalchemy_url(db, ctx.credentials.postgres[db], db) for db in ("accounts", "notifications")}
    producer_db = create_schema(create_engine(urls["accounts"]), schema)
    consumer_db = create_schema(create_engine(urls["notifications"]), schema)
    yield Delivery(topic, group, ring, producer_db, consumer_db,
                   urls["accounts"].render_as_string(hide_password=False),
                   urls["notifications"].render_as_string(hide_password=False), schema, kafka, ctx, tmp_path, access)
    admin.revoke(access.grants())
    admin.client.delete_topics([topic, f"{topic}.dlq"])


def test_relay_killed_mid_batch_then_restarted_delivers_every_event_once(delivery: Delivery) -> None:
    total = 3000
    delivery.write(total)
    marker = delivery.tmp / "relay-stalled"
    relay = delivery.worker("relay", batch_size=1000, stall_before_marking_sent=True, marker=str(marker))
    wait_for(marker.exists, 60, "the relay to publish its first batch")
    assert delivery.topic_events() >= 1000, "the first batch is in Kafka"
    os.kill(relay.pid, signal.SIGKILL)  # after the broker acknowledged the batch, before the rows were marked sent
    relay.wait()
    assert delivery.unsent() == total, "the relay was killed before it marked its batch sent"
    restarted = delivery.worker("relay", batch_size=1000)
    try:
        wait_for(lambda: delivery.unsent() == 0, 120, "the restarted relay to drain the outbox")
    finally:
        restarted.kill()
    assert delivery.topic_events() >= total
    consumer = delivery.worker("consumer")
    try:
        wait_for(lambda: len(delivery.applied_rows()) >= total and delivery.committed_offset() >= delivery.topic_size(),
                 180, "the consumer to apply every event")
    finally:
        consumer.kill()
    assert_each_applied_once_in_order(delivery, total)


def test_consumer_killed_after_its_effect_before_its_offset_commit_applies_each_event_once(delivery: Delivery) -> None:
    total = 40
    delivery.write(total, aggregates=1)
    relay = delivery.worker("relay")
    wait_for(lambda: delivery.unsent() == 0, 60, "the relay to publish")
    relay.kill()
    marker = delivery.tmp / "stalled"
    consumer = delivery.worker("consumer", stall_on_sequence=25, marker=str(marker), batch_size=100)
    wait_for(marker.exists, 60, "the consumer to reach sequence 25")
    applied_before_kill = len(delivery.applied_rows())
    assert applied_before_kill == 24, "effects of sequences 1..24 are committed"
    assert delivery.committed_offset() < delivery.topic_size(), "but the record's offset is not"
    os.kill(consumer.pid, signal.SIGKILL)
    consumer.wait()
    again = delivery.worker("consumer")
    try:
        wait_for(lambda: len(delivery.applied_rows()) >= total
                 and delivery.committed_offset() >= delivery.topic_size(), 90,
                 "the restarted consumer to catch up")
    finally:
        again.kill()
    assert_each_applied_once_in_order(delivery, total)


@pytest.mark.lifecycle
def test_kafka_down_for_30s_callers_see_no_error_and_the_backlog_drains(delivery: Delivery, stack: Stack) -> None:
    writer = Outbox(delivery.ring.signing_key("accounts"))
    relay = OutboxRelay(delivery.producer_db, delivery.kafka.client_config(
        "accounts", delivery.ctx.credentials.kafka["accounts"]), delivery.ring.signing_key("accounts"),
        batch_size=200, flush_timeout=5)
    stop, errors, written = threading.Event(), [], [0]

    def keep_writing() -> None:
        while not stop.is_set():
            try:
                with delivery.producer_db.begin() as conn:
                    n = written[0]
                    deposit = MoneyDeposited(account_id="x", amount_minor=n + 1, currency="EUR")
                    writer.append(conn, delivery.topic, deposit,
                                  aggregate_id=f"{delivery.schema}-a{n % 3}", correlation_id=f"c{n}")
                written[0] += 1
            except Exception as error:
                errors.append(error)
            time.sleep(0.05)

    threads = [threading.Thread(target=keep_writing), threading.Thread(target=relay.run, args=(stop,))]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: written[0] > 20 and delivery.unsent() < 10, 30, "events flowing before the outage")
        assert stack.supervisor.stop("kafka")
        outage_started = time.monotonic()
        backlog_early = delivery.unsent()
        time.sleep(30)
        backlog_late = delivery.unsent()
        assert backlog_late > backlog_early + 100, (backlog_early, backlog_late)
        result = bastion("up")
        assert result.returncode == 0, result.stdout + result.stderr
        # `up` makes the ACLs exactly infra/event-access.yaml again: give the throw-away topic its grants back.
        delivery.kafka.admin().grant(delivery.access.grants())
        wait_for(lambda: delivery.unsent() < 10, 120, "the backlog to drain after Kafka returned")
        assert time.monotonic() - outage_started > 30
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert errors == []
    while relay.run_once().published:
        pass
    assert delivery.unsent() == 0
    consumer = delivery.worker("consumer")
    try:
        wait_for(lambda: len(delivery.applied_rows()) >= written[0], 120, "every written event to be applied")
    finally:
        consumer.kill()
    assert_each_applied_once_in_order(delivery, written[0])


def test_an_event_too_large_for_consumers_is_refused_with_the_state_change_that_made_it(delivery: Delivery) -> None:
    """Consumers refuse an envelope over MAX_ENVELOPE_BYTES, and Kafka a record over 1 MB (which would stop the
    relay at that row): such an event is refused when it is written, as bad input, and nothing of its transaction
    is kept, not even the sequence number it took."""
    writer = Outbox(delivery.ring.signing_key("accounts"))
    aggregate = f"{delivery.schema}-big"
    huge = AccountFrozen(account_id=aggregate, reason="x" * MAX_ENVELOPE_BYTES)
    with (pytest.raises(EventTooLargeError, match="consumers accept at most") as refused,
          delivery.producer_db.begin() as conn):
        writer.append(conn, delivery.topic, MoneyDeposited(account_id=aggregate, amount_minor=1, currency="EUR"),
                      aggregate_id=aggregate, correlation_id="c-before")
        writer.append(conn, delivery.topic, huge, aggregate_id=aggregate, correlation_id="c-big")
    assert status_for(refused.value, "c-big")[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert delivery.unsent() == 0
    # A caller that catches the refusal and commits the rest leaves no gap in the aggregate's sequence.
    with delivery.producer_db.begin() as conn:
        with pytest.raises(EventTooLargeError):
            writer.append(conn, delivery.topic, huge, aggregate_id=aggregate, correlation_id="c-big-again")
        stored = writer.append(conn, delivery.topic, MoneyDeposited(account_id=aggregate, amount_minor=2,
                                                                    currency="EUR"),
                               aggregate_id=aggregate, correlation_id="c-after")
    assert stored is not None and stored.sequence == 1
    assert delivery.unsent() == 1


def test_the_relays_partition_for_a_key_is_the_one_librdkafka_chooses(kafka: Kafka, ctx: StackContext,
                                                                       unique: str) -> None:
    """The relay picks each bundle's partition itself; an aggregate whose events went through librdkafka's own
    partitioner before must land in the same partition now, or its order across the change would break."""
    topic = f"it.{unique}.partitions.v1"
    access = EventAccessPolicy({topic: TopicPolicy(topic, 3, (), {}, {})})
    admin = kafka.admin()
    admin.ensure_topics(access)
    try:
        producer = Producer(kafka.client_config("admin", ctx.credentials.kafka["admin"]))
        placed: dict[bytes, int] = {}
        keys = [f"acc-{number}-{unique}".encode() for number in range(60)]
        for key in keys:
            producer.produce(topic, value=b"x", key=key,
                             on_delivery=lambda error, message: placed.__setitem__(message.key(), message.partition()))
        assert producer.flush(20) == 0
        assert placed == {key: partition_for(key, 3) for key in keys}
        assert len(set(placed.values())) == 3
    finally:
        admin.client.delete_topics([topic])
