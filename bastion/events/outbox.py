"""The transactional outbox: events are written with the state change, in one transaction, and a relay
publishes them with an idempotent producer (acks=all). While Kafka is down the rows wait; the service
keeps working; when Kafka returns they drain in order.

The relay sends each batch as bundles (`verify.verify_bundle`): one Kafka record per partition the batch's rows
go to (librdkafka's own partitioner, `partitions.partition_for`, so an aggregate keeps its partition), signed
once. A bundle stays under Kafka's largest record; a larger group is cut into several, in order."""

import datetime as dt
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer
from google.protobuf.message import Message
from sqlalchemy import Connection, Engine, select, update
from sqlalchemy.dialects.postgresql import insert

from bastion.events.envelopes import bundle_of, envelope_for
from bastion.events.errors import EventTooLargeError
from bastion.events.keys import KeySource
from bastion.events.partitions import partition_for
from bastion.events.storage import outbox, producer_sequence
from bastion.events.v1.envelope_pb2 import Envelope
from bastion.events.verify import BUNDLE_CONTENT, BUNDLE_HEADER, MAX_BUNDLE_BYTES, MAX_ENVELOPE_BYTES
from bastion.grpc.context import CallContext, current_call
from bastion.grpc.spans import SpanRecorder, TracedEvent

log = logging.getLogger(__name__)


class Outbox:
    """Appends events to the outbox inside the caller's transaction. They are stored unsigned: the relay signs
    each batch it publishes with the producer's current key (`envelopes.bundle`), so signing here as well
    would only add an Ed25519 operation to every state change's transaction."""

    def __init__(self, key: KeySource) -> None:
        self.key = key

    @property
    def producer(self) -> str:
        return self.key.producer

    def append(
        self,
        conn: Connection,
        topic: str,
        payload: Message,
        aggregate_id: str,
        correlation_id: str,
        causation_id: str = "",
        event_id: str | None = None,
        traceparent: str = "",
    ) -> Envelope | None:
        """Store one event; the next sequence of its aggregate is taken in the same transaction.

        A given EVENT_ID is stored once: appending it again (a retried handler) returns None.
        """
        if event_id is not None and conn.execute(select(outbox.c.id).where(outbox.c.event_id == event_id)).first():
            return None
        sequence = conn.execute(
            insert(producer_sequence)
            .values(aggregate_id=aggregate_id, last_sequence=1)
            .on_conflict_do_update(
                index_elements=[producer_sequence.c.aggregate_id],
                set_={"last_sequence": producer_sequence.c.last_sequence + 1},
            )
            .returning(producer_sequence.c.last_sequence)
        ).scalar_one()
        envelope = envelope_for(self.key.current(), topic, payload, aggregate_id, sequence, correlation_id,
                                causation_id, event_id=event_id, traceparent=traceparent)
        stored = envelope.SerializeToString()
        if len(stored) + STAMP_BYTES > MAX_ENVELOPE_BYTES:
            # Give the sequence number back, so that a caller who catches this and commits leaves no gap (every
            # later event of the aggregate would be held behind it); uncaught, the transaction is rolled back.
            conn.execute(update(producer_sequence).where(producer_sequence.c.aggregate_id == aggregate_id)
                         .values(last_sequence=producer_sequence.c.last_sequence - 1))
            raise EventTooLargeError(
                f"event {envelope.event_type} of {aggregate_id[:100]} would be {len(stored) + STAMP_BYTES} bytes once "
                f"published; consumers accept at most {MAX_ENVELOPE_BYTES}")
        conn.execute(
            insert(outbox).values(event_id=envelope.event_id, topic=topic, partition_key=aggregate_id,
                                  envelope=stored)
        )
        return envelope


@dataclass
class OutboxEventSink:
    """A service's domain events, written to the outbox in the transaction that changed its state; the
    correlation id is the current call's, so an event can be traced to the request that caused it."""

    conn: Connection
    outbox: Outbox
    topic: str

    def emit(self, payload: Message, aggregate_id: str) -> None:
        call = current_call.get(None)
        correlation_id = call.correlation_id if call else f"{self.outbox.producer}:{aggregate_id}"
        self.outbox.append(self.conn, self.topic, payload, aggregate_id, correlation_id,
                           traceparent=traceparent_of(call))


def traceparent_of(call: CallContext | None) -> str:
    """The trace context an event caused by CALL carries: the call's span as the parent, when that span was
    recorded (a consumer's span then joins the call's trace); "" otherwise."""
    if call is None or call.span is None or call.trace is None:
        return ""
    return call.trace.child_headers()[0][1]


@dataclass(frozen=True)
class RelayResult:
    published: int
    failed: int


# What a bundle's envelopes may add up to as stored (the relay adds a key id and a timestamp to each, and the
# bundle a signature), leaving room under MAX_BUNDLE_BYTES.
BUNDLE_BUDGET = MAX_BUNDLE_BYTES * 3 // 4
STAMP_BYTES = 128  # at most what stamping adds to one envelope (key id, published_at, the bundle's framing)


def in_bundles(rows: Sequence[Any], partitions: Mapping[str, int]) -> list[tuple[str, int, list[Any]]]:
    """ROWS (with topic, partition_key, envelope) as (topic, partition, rows) groups, each one bundle: grouped by
    where their key goes, in the order of each group's first row, each group cut to BUNDLE_BUDGET bytes. A row
    too large for a consumer to take (over MAX_ENVELOPE_BYTES once stamped) goes alone: a bundle with it is
    refused whole, and the events around it must not be refused with it."""
    groups: dict[tuple[str, int], list[list[Any]]] = {}
    sizes: dict[tuple[str, int], int] = {}
    for row in rows:
        place = (row.topic, partition_for(row.partition_key.encode(), partitions[row.topic]))
        size = len(row.envelope) + STAMP_BYTES
        alone = size > MAX_ENVELOPE_BYTES
        chunks = groups.setdefault(place, [[]])
        if chunks[-1] and (alone or sizes[place] + size > BUNDLE_BUDGET):
            chunks.append([])
            sizes[place] = 0
        chunks[-1].append(row)
        sizes[place] = BUNDLE_BUDGET + 1 if alone else sizes.get(place, 0) + size  # nothing joins a lone row
    return [(topic, partition, chunk) for (topic, partition), chunks in groups.items() for chunk in chunks]


BUNDLE_HEADERS = [(BUNDLE_HEADER, BUNDLE_CONTENT)]


@dataclass
class _SentBundle:
    """One bundle the relay handed to the producer: its rows, its traced events, and the broker's answer."""

    topic: str
    partition: int
    row_ids: list[int]
    traced: list[TracedEvent]
    acknowledged_ns: int = 0
    error: str | None = None


class OutboxRelay:
    """Publishes unsent outbox rows in id order, as bundles, and marks them sent once the broker acknowledged
    them. With SPANS, an event whose trace was sampled (the call that caused it was recorded) leaves a PRODUCER
    span from the batch's start to the broker's acknowledgement: in a trace, the gap between the call's span and
    this one is the time the event waited in the outbox."""

    def __init__(self, engine: Engine, producer_config: dict[str, Any], key: KeySource, batch_size: int = 500,
                 flush_timeout: float = 30.0, metadata_timeout: float = 5.0,
                 spans: SpanRecorder | None = None) -> None:
        self.engine = engine
        self.spans = spans
        self.key = key
        self.batch_size = batch_size
        self.flush_timeout = flush_timeout
        self.metadata_timeout = metadata_timeout
        self._partition_counts: dict[str, int] = {}
        self.producer = Producer(
            # Messages time out before flush gives up, so every delivery report lands in its own batch.
            {**producer_config, "enable.idempotence": True, "acks": "all", "linger.ms": 5,
             "message.timeout.ms": int(flush_timeout * 1000 * 0.8)}
        )

    def run_once(self) -> RelayResult:
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(outbox.c.id, outbox.c.topic, outbox.c.partition_key, outbox.c.envelope)
                .where(outbox.c.sent_at.is_(None))
                .order_by(outbox.c.id)
                .limit(self.batch_size)
                .with_for_update(skip_locked=True)
            ).all()
            if not rows:
                return RelayResult(0, 0)
            started = time.time_ns()
            try:
                bundles = in_bundles(rows, {topic: self._partitions(topic) for topic in {row.topic for row in rows}})
            except KafkaException as away:
                log.warning("outbox relay: %d events wait, Kafka's metadata is unavailable (%s)", len(rows),
                            away.args[0].str() if away.args and isinstance(away.args[0], KafkaError) else away)
                return RelayResult(0, len(rows))
            key = self.key.current()  # one key for the whole batch: a rotation applies from the next one
            delivered: list[int] = []
            errors: list[KafkaError] = []
            sent: list[_SentBundle] = []

            def on_delivery(outcome: _SentBundle) -> Any:
                def report(error: KafkaError | None, _message: Any) -> None:
                    outcome.acknowledged_ns = time.time_ns()
                    if error is None:
                        delivered.extend(outcome.row_ids)
                    else:
                        outcome.error = error.str()
                        errors.append(error)
                return report

            for topic, partition, group in bundles:
                members = [Envelope.FromString(row.envelope) for row in group]
                outcome = _SentBundle(topic, partition, [row.id for row in group],
                                      [TracedEvent.of(member) for member in members if member.traceparent])
                value = bundle_of(members, key).SerializeToString()
                try:
                    self.producer.produce(topic, value=value, partition=partition, headers=BUNDLE_HEADERS,
                                          on_delivery=on_delivery(outcome))
                except (KafkaException, BufferError) as refused:
                    # Stop here: the rows after this bundle wait too, so each partition keeps its order.
                    errors.append(refused.args[0] if refused.args and isinstance(refused.args[0], KafkaError)
                                  else KafkaError(KafkaError._FAIL, str(refused)))
                    break
                sent.append(outcome)
                self.producer.poll(0)
            self.producer.flush(self.flush_timeout)
            if delivered:
                self._mark_sent(conn, delivered)
            if errors:
                log.warning("outbox relay: %d of %d events not delivered yet (%s); they stay queued",
                            len(rows) - len(delivered), len(rows), errors[0].str())
        self._record_spans(sent, started)
        return RelayResult(len(delivered), len(rows) - len(delivered))

    def _record_spans(self, sent: list[_SentBundle], started: int) -> None:
        """The PRODUCER spans of the traced events of the bundles SENT, once their rows' fate is committed."""
        if self.spans is None:
            return
        for outcome in sent:
            if outcome.traced:
                failure = outcome.error if outcome.error is not None else \
                    None if outcome.acknowledged_ns else "not acknowledged in time"
                self.spans.events_handled("send", outcome.traced, started, outcome.acknowledged_ns or time.time_ns(),
                                          failure, {"messaging.destination.partition.id": str(outcome.partition),
                                                    "messaging.batch.message_count": len(outcome.row_ids)})

    def _partitions(self, topic: str) -> int:
        """How many partitions TOPIC has, asked once per relay (a topic's partitions only grow, and growing them
        moves keys for every producer alike). Raises KafkaException while the broker cannot say."""
        known = self._partition_counts.get(topic)
        if known is None:
            metadata = self.producer.list_topics(topic, timeout=self.metadata_timeout).topics.get(topic)
            if metadata is None or metadata.error is not None or not metadata.partitions:
                raise KafkaException(metadata.error if metadata is not None and metadata.error is not None
                                     else KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, f"no partitions for {topic}"))
            known = self._partition_counts[topic] = len(metadata.partitions)
        return known

    def _mark_sent(self, conn: Connection, delivered: list[int]) -> None:
        """Rows the broker acknowledged; a crash before this commits means they are published again (the
        consumers' inbox makes that harmless)."""
        conn.execute(update(outbox).where(outbox.c.id.in_(delivered)).values(sent_at=dt.datetime.now(dt.UTC)))

    def close(self) -> None:
        self.producer.flush(self.flush_timeout)

    def backlog(self) -> int:
        with self.engine.connect() as conn:
            return len(conn.execute(select(outbox.c.id).where(outbox.c.sent_at.is_(None))).all())

    def run(self, stop: threading.Event, idle_seconds: float = 0.2) -> None:
        """Relay until STOP is set; sleep briefly when there is nothing to send or Kafka is away."""
        while not stop.is_set():
            result = self.run_once()
            if result.published == 0:
                stop.wait(idle_seconds)
