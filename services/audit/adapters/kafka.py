"""The audit service's consumer: every record of the audited topics passes the verification pipeline (steps 1
to 5 of docs/events.md: size and schema, producer and key, signature, trust policy, freshness) and is then appended
to the hash-chained log, accepted or refused alike. A bundle record becomes one log record per envelope (its
`item`), each keeping that envelope as it verifies alone; a bundle refused whole is one refused record.

Steps 6 and 7 (inbox and per-aggregate sequence) are deliberately not applied here. They exist so that a replay
or a redelivery has no second *effect*; the audit log's effect is to say what was seen, and a replayed event or
a gap is itself evidence an investigator needs. A redelivery of the same Kafka record is still kept once:
the log is keyed by (topic, partition, offset). See docs/decisions.md.
"""

import datetime as dt
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaError, Message, Producer
from sqlalchemy import Engine

from bastion.audit.checkpoints import Checkpoint, Checkpointer
from bastion.audit.errors import CheckpointError, UntrustedSigningKeyError
from bastion.audit.postgres import AuditLog
from bastion.audit.records import AuditRecord
from bastion.events.consumer import DeadLetters, broker_time, claimed_envelope, safe_claim
from bastion.events.errors import RejectReason, TrustStoreUnavailableError, VerificationError
from bastion.events.metrics import EVENTS_APPLIED, EVENTS_REJECTED
from bastion.events.verify import EnvelopeVerifier, VerifiedEvent, is_bundle
from bastion.grpc.spans import SpanRecorder, TracedEvent
from services.audit import domain
from services.audit.domain import Delivery
from services.audit.handlers import Alerting, SecurityRecords, announce

log = structlog.get_logger(__name__)
CHECKPOINT_TOPIC = "audit.checkpoints.v1"
Clock = Callable[[], dt.datetime]


class CheckpointPublisher:
    """Publishes each signed checkpoint on `audit.checkpoints.v1` (idempotent producer, acks=all): a second
    witness outside the database and outside the state folder's file."""

    def __init__(self, kafka_config: dict[str, Any]) -> None:
        self.producer = Producer({**kafka_config, "enable.idempotence": True, "acks": "all"})

    def publish(self, checkpoint: Checkpoint) -> None:
        outcome: list[KafkaError | None] = []
        self.producer.produce(CHECKPOINT_TOPIC, value=checkpoint.to_bytes(), key=checkpoint.origin.encode(),
                              on_delivery=lambda err, _msg: outcome.append(err))
        self.producer.flush(30)
        if not outcome or outcome[0] is not None:
            # The checkpoint is already in the file; the next one covers this length too.
            log.warning("checkpoint_not_published", length=checkpoint.length, error=str(outcome))


class AuditRecords:
    """What the audit log keeps of each consumed Kafka record: it passes the verification pipeline and becomes
    one audit record, or one per envelope of a bundle. Refused ones are counted, logged and handed to LETTERS;
    whoever commits the offsets settles them first. Accepted events that carry a trace context are noted in
    `traced`, for their spans once the log holds them. No Kafka client of its own."""

    def __init__(self, verifier: EnvelopeVerifier, letters: DeadLetters,
                 clock: Clock = lambda: dt.datetime.now(dt.UTC)) -> None:
        self.verifier = verifier
        self.letters = letters
        self.clock = clock
        self.traced: list[TracedEvent] = []

    def of(self, message: Message) -> list[AuditRecord]:
        """The log records of one Kafka record: one, or one per envelope of a bundle."""
        if not is_bundle(message.headers()):
            return [self.record(message)]
        raw: bytes = message.value() or b""
        received = broker_time(message) or self.clock()
        delivery = Delivery(message.topic(), message.partition(), message.offset(), received, raw)
        try:
            verified = self.verifier.verify_bundle(raw, delivery.topic, received)
        except VerificationError as error:
            return [self._refuse(message, delivery, error, bundled=True)]
        records = []
        applied = 0
        for item, event in enumerate(verified.outcomes):
            # A bundle of one: the envelope with the bundle's signature and its inclusion proof, which verifies alone.
            alone = Delivery(delivery.topic, delivery.partition, delivery.offset, received, verified.alone(item), item)
            if isinstance(event, VerificationError):
                records.append(self._refuse(message, alone, event, bundled=True))
                continue
            try:
                records.append(domain.accepted(alone, event, self.clock()))
            except VerificationError as error:  # verified, but not the producer's to say (see domain.accepted)
                records.append(self._refuse(message, alone, error, bundled=True))
                continue
            except Exception as error:  # as in `record`: kept as refused, never a stop of the trail
                records.append(self._refuse(message, alone, VerificationError(
                    RejectReason.MALFORMED, f"not recordable: {type(error).__name__}: {error}"[:300]), bundled=True))
                continue
            self._note_trace(event)
            applied += 1
        if applied:
            EVENTS_APPLIED.labels(domain.CONSUMER, delivery.topic).inc(applied)
        return records

    def record(self, message: Message) -> AuditRecord:
        raw: bytes = message.value() or b""
        received = broker_time(message) or self.clock()
        delivery = Delivery(message.topic(), message.partition(), message.offset(), received, raw)
        try:
            event = self.verifier.verify(raw, delivery.topic, received)
            record = domain.accepted(delivery, event, self.clock())
        except VerificationError as error:
            return self._refuse(message, delivery, error)
        except TrustStoreUnavailableError:
            raise  # no verdict on the record: the consumer stops and reads it again once the keys can be read
        except Exception as error:
            # A record the checks let through but no audit record can hold is kept as refused: one bad record must
            # never stop the whole trail.
            return self._refuse(message, delivery, VerificationError(
                RejectReason.MALFORMED, f"not recordable: {type(error).__name__}: {error}"[:300]))
        self._note_trace(event)
        EVENTS_APPLIED.labels(domain.CONSUMER, delivery.topic).inc()
        return record

    def _note_trace(self, event: VerifiedEvent) -> None:
        if event.envelope.traceparent:
            self.traced.append(TracedEvent.of(event.envelope))

    def _refuse(self, message: Message, delivery: Delivery, error: VerificationError,
                bundled: bool = False) -> AuditRecord:
        claimed = claimed_envelope(delivery.raw, bundled)
        EVENTS_REJECTED.labels(domain.CONSUMER, delivery.topic, error.reason.value).inc()
        log.warning("event_rejected", consumer=domain.CONSUMER, topic=delivery.topic, partition=delivery.partition,
                    offset=delivery.offset, item=delivery.item, reason=error.reason.value, detail=error.detail[:300],
                    claimed_producer=safe_claim(claimed.producer), claimed_event_id=safe_claim(claimed.event_id),
                    correlation_id=safe_claim(claimed.correlation_id))
        self.letters.write(message, delivery.raw, error, delivery.item, bundled)
        return domain.refused(delivery, claimed, error, self.clock())


class AuditConsumer:
    def __init__(self, kafka_config: dict[str, Any], topics: list[str], verifier: EnvelopeVerifier, engine: Engine,
                 store: AuditLog, checkpointer: Checkpointer, publisher: CheckpointPublisher,
                 security: SecurityRecords, alerts: Alerting | None = None, batch_size: int = 500,
                 poll_seconds: float = 0.5, clock: Clock = lambda: dt.datetime.now(dt.UTC),
                 spans: SpanRecorder | None = None) -> None:
        self.engine = engine
        self.spans = spans
        self.alerts = alerts
        if alerts is not None:
            with engine.begin() as conn:
                raised = alerts.start(conn, store.head(conn).length, clock())
            announce(raised)
        self.store = store
        self.checkpointer = checkpointer
        self.publisher = publisher
        self.security = security
        self.signing_refused = False
        self.key_in_flux = False
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.consumer = Consumer({**kafka_config, "group.id": domain.CONSUMER, "enable.auto.commit": False,
                                  "auto.offset.reset": "earliest", "isolation.level": "read_committed"})
        self.dead_letters = Producer({**kafka_config, "enable.idempotence": True, "acks": "all"})
        self.letters = DeadLetters(self.dead_letters, domain.CONSUMER)
        self.records = AuditRecords(verifier, self.letters, clock)
        self.consumer.subscribe(topics)

    def close(self) -> None:
        self.consumer.close()
        self.dead_letters.flush(10)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.poll_batch()

    def poll_batch(self) -> int:
        """Read up to a batch, append it in one transaction with the alerts it raises, sign a checkpoint if one is
        due, then commit the offsets: a crash anywhere before the commit reads the batch again, and the log keeps
        each record once.
        The batch's refused records are dead-lettered together, and acknowledged before anything is committed.
        Each accepted event of a recorded call leaves a CONSUMER span from the batch's arrival to its append."""
        messages = self.consumer.consume(self.batch_size, self.poll_seconds)
        arrived = time.time_ns()
        self.records.traced.clear()  # what a failed batch noted: it is read again
        records = [record for message in messages if self._readable(message) for record in self.records.of(message)]
        self.letters.settle()
        raised = []
        if records:
            with self.engine.begin() as conn:
                placed = self.store.append(conn, records)
                if self.alerts is not None:
                    raised = self.alerts.observe(conn, placed)
            appended = time.time_ns()
            announce(raised)
        self._checkpoint_if_due()
        if records:
            self.consumer.commit(asynchronous=False)
            if self.spans is not None and self.records.traced:
                self.spans.events_handled("process", self.records.traced, arrived, appended)
        return len(records)

    def _checkpoint_if_due(self) -> None:
        """Sign the committed head when due. A head below the last signed checkpoint or the file's newest line (a
        database restored from an old copy, or rows removed), another hash at their length (rewritten), or a
        checkpoint file that does not verify, is never signed over: signing stops, and a security record says why.
        The log itself goes on taking records."""
        if self.signing_refused:
            return
        try:
            # The file is read at the first call (it may refuse a line). The log must still extend the newest trusted
            # checkpoint and the file's newest line, even one of a retired key the service is about to cover: it
            # believes no such line, but will not sign over a log that no longer matches it either.
            file = self.checkpointer.file
            signed = list(dict.fromkeys(line for line in (file.last, file.last_line) if line is not None))
            with self.engine.connect() as conn:
                head = self.store.head(conn)
                hashes = [self.store.hash_at(conn, line.length) for line in signed]
            for line, signed_hash in zip(signed, hashes, strict=True):
                domain.check_continuity(line, head, signed_hash)
            checkpoint = self.checkpointer.maybe_checkpoint(head)
        except UntrustedSigningKeyError as error:  # the key ring is changing: the next poll signs with the new key
            if not self.key_in_flux:
                log.warning("checkpoint_key_not_trusted", detail=str(error))
            self.key_in_flux = True
            return
        except CheckpointError as error:
            self.signing_refused = True  # recorded once: signing stops until a restart, which checks (records) again
            log.error("checkpoint_signing_refused", error=type(error).__name__, detail=str(error))
            self.security.checkpoint_refused(error, "checkpointer")
            return
        self.key_in_flux = False
        if checkpoint is not None:
            self.publisher.publish(checkpoint)

    @staticmethod
    def _readable(message: Message) -> bool:
        if message.error() is None:
            return True
        if message.error().code() != KafkaError._PARTITION_EOF:
            log.warning("consumer_error", consumer=domain.CONSUMER, error=message.error().str())
        return False
