"""The verifying consumer: every record passes the whole pipeline before it may have an effect.

Accepted events are applied with their inbox row in one database transaction; rejected ones go to
`<topic>.dlq` with the reason (and a security record for the audit service). The Kafka offset is committed
only after the effect and inbox row are committed, or the dead-letter write is acknowledged: nothing is lost.

A record is one envelope, or a bundle of them (the relay's batch for one partition, `verify.verify_bundle`): a
bundle refused as a whole goes to the dead-letter topic as it came; after that, each of its envelopes is
applied or dropped on its own, in order; those refused alone (each kept as the envelope that verifies alone,
`signed_envelope`) are then recorded and dead-lettered together, in one transaction and one broker round trip. The
record's offset is committed once every one of them is settled.

An event that arrives ahead of a gap in its aggregate's sequence is held back until the gap fills. A gap still open
after `gap_alert_seconds` (an event lost, suppressed or refused upstream, or one from far ahead) is reported once:
logged, counted and raised as a `sequence_gap` security record, which the audit service's alert rules turn into a
security alert. The held events stay held: nothing is lost, and they are applied if the gap ever fills.
"""

import contextlib
import datetime as dt
import hashlib
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import structlog
from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME, Consumer, KafkaError, Message, Producer
from google.protobuf.message import DecodeError
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from bastion.access.v1.decision_pb2 import EventRejected
from bastion.devstack.event_access import dead_letter_topic
from bastion.events import inbox
from bastion.events.errors import (
    EventsError,
    KeyNotFoundError,
    RejectReason,
    TrustStoreUnavailableError,
    VerificationError,
)
from bastion.events.metrics import EVENTS_APPLIED, EVENTS_DROPPED, EVENTS_GAPS_OPEN, EVENTS_HELD, EVENTS_REJECTED
from bastion.events.outbox import Outbox
from bastion.events.v1.envelope_pb2 import Envelope, EnvelopeBundle
from bastion.events.verify import BUNDLE_CONTENT, BUNDLE_HEADER, EnvelopeVerifier, VerifiedEvent, is_bundle
from bastion.grpc.spans import SpanRecorder

log = structlog.get_logger(__name__)
SECURITY_TOPIC = "access.decisions.v1"
# A refused record larger than this is dead-lettered as a prefix (Kafka's largest record is 1 MB, headers included).
DEAD_LETTER_MAX_BYTES = 900_000
DEAD_LETTER_PREFIX_BYTES = 4096
# Dead letters handed to the producer before `DeadLetters` waits for them: a bundle can hold thousands of refused
# envelopes, and librdkafka's queue is bounded. Waiting early is safe: offsets are committed after the last wait.
MAX_UNSETTLED_LETTERS = 1000
SAFE_ID = re.compile(r"[A-Za-z0-9._:/-]{1,100}")
CONSUMER_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
REJECTION_NAMESPACE = uuid.UUID("5b0f3c1e-6a43-4d0e-9a59-2f1f0a0c9b11")
# The consumer looks for gaps that stayed open every quarter of its wait, and at least this often, so a gap is
# reported at most that late (plus one poll).
MAX_GAP_CHECK_SECONDS = 15.0

Handler = Callable[[Connection, VerifiedEvent], None]


class DeadLetterError(EventsError):
    """The dead-letter write was not acknowledged: the offset stays uncommitted and the record comes back."""


class HeldEventNotSetAsideError(EventsError):
    """A released held event that could not be applied could not be set aside either (its dead letter or its
    security record failed): the consumer stops, and the record that released it is read again after a restart."""


@dataclass(frozen=True)
class Refusal:
    """A refused record (RAW), or (ITEM set) the refused envelope of a bundle record, as a bundle of one (BUNDLED:
    RAW is a bundle), or (RELEASED set) the held event of that sequence which the record's event released and
    which could not be applied."""

    raw: bytes
    error: VerificationError
    item: int | None = None
    bundled: bool = False
    released: int | None = None


@dataclass(frozen=True)
class ConsumerSettings:
    name: str
    group: str
    topics: list[str]
    batch_size: int = 200
    poll_seconds: float = 0.5
    handler_attempts: int = 3
    # A sequence gap still open after this long is reported. Events of one aggregate share a partition and come in
    # order, so a gap that lasts is not a slow producer: an event was lost, suppressed or refused on the way.
    gap_alert_seconds: float = 30.0  # the services take BASTION_SEQUENCE_GAP_ALERT_SECONDS (same default)

    def __post_init__(self) -> None:
        # The name begins the place a security record's id is derived from (`consumer/topic/partition/offset`):
        # a name with a "/" could make two places one.
        if not CONSUMER_NAME.fullmatch(self.name):
            raise ValueError(f"consumer name {self.name!r} is not a service name ({CONSUMER_NAME.pattern})")
        if self.handler_attempts < 1:
            raise ValueError("handler_attempts must be at least 1")
        if not 0 < self.gap_alert_seconds <= 86_400:
            raise ValueError("gap_alert_seconds must be more than 0 and at most a day")

    @property
    def gap_check_seconds(self) -> float:
        return min(self.gap_alert_seconds / 4, MAX_GAP_CHECK_SECONDS)


def broker_time(message: Message) -> dt.datetime | None:
    kind, millis = message.timestamp()
    if kind != TIMESTAMP_LOG_APPEND_TIME:
        return None
    return dt.datetime.fromtimestamp(millis / 1000, dt.UTC)


NO_CLAIM, MALFORMED_CLAIM = "-", "(malformed)"  # what safe_claim keeps instead of an id: none, or not well formed


def safe_claim(text: str) -> str:
    """A claimed id is attacker input: only a well-formed one goes into logs and security records."""
    return text if SAFE_ID.fullmatch(text) else (NO_CLAIM if not text else MALFORMED_CLAIM)


def names_a_request(correlation_id: str) -> bool:
    """Whether CORRELATION_ID, as kept, is a request's own id rather than safe_claim's stand-in for none."""
    return correlation_id not in (NO_CLAIM, MALFORMED_CLAIM) and bool(SAFE_ID.fullmatch(correlation_id))


def claimed_envelope(raw: bytes, bundled: bool = False) -> Envelope:
    """Whatever a rejected record claims about itself (for a bundle, its first envelope), for the log and the
    security record."""
    try:
        if bundled:
            bundle = EnvelopeBundle.FromString(raw)
            return Envelope.FromString(bundle.envelopes[0]) if bundle.envelopes else Envelope()
        return Envelope.FromString(raw)
    except DecodeError:  # a record that does not even parse claims nothing
        return Envelope()


class VerifyingConsumer:
    def __init__(
        self,
        settings: ConsumerSettings,
        kafka_config: dict[str, Any],
        verifier: EnvelopeVerifier,
        engine: Engine,
        handler: Handler,
        security_outbox: Outbox | None = None,
        spans: SpanRecorder | None = None,
    ) -> None:
        self.settings = settings
        self.spans = spans
        self.verifier = verifier
        self.engine = engine
        self.handler = handler
        self.security_outbox = security_outbox
        self.consumer = Consumer(
            {**kafka_config, "group.id": settings.group, "enable.auto.commit": False,
             "auto.offset.reset": "earliest", "isolation.level": "read_committed"}
        )
        self.dead_letters = Producer({**kafka_config, "enable.idempotence": True, "acks": "all"})
        self.letters = DeadLetters(self.dead_letters, settings.name)
        self.consumer.subscribe(settings.topics)
        self._next_gap_check = 0.0

    def close(self) -> None:
        self.consumer.close()
        self.dead_letters.flush(10)

    def run(self, stop: threading.Event) -> None:
        """Consume until STOP is set. A failure propagates without committing the batch's offsets, so the
        records from the last commit on are read again after a restart (the inbox makes that harmless)."""
        while not stop.is_set():
            self.poll_batch()

    def poll_batch(self) -> int:
        """Handle up to one batch, then commit its offsets (every effect is committed by then)."""
        messages = self.consumer.consume(self.settings.batch_size, self.settings.poll_seconds)
        handled = 0
        for message in messages:
            if message.error():
                if message.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer_error", consumer=self.settings.name, error=message.error().str())
                continue
            self.handle(message)
            handled += 1
        if handled:
            self.consumer.commit(asynchronous=False)
        if time.monotonic() >= self._next_gap_check:
            self._next_gap_check = time.monotonic() + self.settings.gap_check_seconds
            try:
                self.report_open_gaps()
            except Exception as error:  # a report that fails must not stop the events; the next look tries again
                log.warning("sequence_gap_report_failed", consumer=self.settings.name, error=type(error).__name__,
                            detail=str(error)[:300])
        return handled

    def handle(self, message: Message) -> str:
        raw: bytes = message.value() or b""
        topic: str = message.topic()
        if is_bundle(message.headers()):
            return self._handle_bundle(message, raw)
        try:
            event = self.verifier.verify(raw, topic, broker_time(message))
        except VerificationError as error:
            self._reject(message, raw, error)
            return "rejected"
        return self._settle(message, event, raw)

    def _handle_bundle(self, message: Message, raw: bytes) -> str:
        """Every envelope of a bundle in order; the outcome of the last (or the bundle's refusal)."""
        try:
            verified = self.verifier.verify_bundle(raw, message.topic(), broker_time(message))
        except VerificationError as error:
            self._reject(message, raw, error, bundled=True)
            return "rejected"
        outcome = "rejected"
        refused = []
        for item, event in enumerate(verified.outcomes):
            if isinstance(event, VerificationError):
                refused.append(Refusal(verified.alone(item), event, item, bundled=True))
                outcome = "rejected"
            else:
                outcome = self._settle(message, event, b"", item)
        if refused:
            self._reject_all(message, refused)
        return outcome

    def _settle(self, message: Message, event: VerifiedEvent, raw: bytes, item: int | None = None) -> str:
        """Apply a verified event with its inbox row, trying a few times; a handler that keeps failing sets it
        aside (RAW, or the envelope that verifies alone, to the dead-letter topic)."""
        for attempt in range(1, self.settings.handler_attempts + 1):
            try:
                with self.engine.begin() as conn:
                    return self._apply_in_order(conn, message, event, item)
            except (HeldEventNotSetAsideError, TrustStoreUnavailableError, KeyNotFoundError):
                # A held event could not be set aside (`_release`), or the keys cannot be read (a held event
                # verified again, a security record signed): stop here; the record is read again after the restart.
                # Never the current event's fault, so never set aside for it.
                raise
            except Exception as error:
                if database_away(error):
                    raise  # the same: the record is read again once the database takes writes
                # One poison event must not stop its partition for ever: after a few tries it is set aside.
                log.warning("handler_failed", consumer=self.settings.name, topic=message.topic(), attempt=attempt,
                            error=type(error).__name__, event_id=event.event_id,
                            correlation_id=event.envelope.correlation_id)
                if attempt == self.settings.handler_attempts:
                    self._reject(message, raw or event.alone(), handler_failure(error), item=item,
                                 bundled=event.bundle is not None)
        return "rejected"

    def _apply_in_order(self, conn: Connection, message: Message, event: VerifiedEvent, item: int | None) -> str:
        env = event.envelope
        topic = env.topic
        admission = inbox.admit(conn, event, source_of(message, item))
        if admission is inbox.Admission.APPLY:
            self._apply(conn, event)
            following = env.sequence + 1
            while (held := inbox.take_held(conn, env.producer, env.aggregate_id, following)) is not None:
                if not self._release(conn, message, item, held, topic, following):
                    break  # set aside: the events after it stay held behind the gap it leaves
                following += 1
            return "applied"
        if admission is inbox.Admission.HELD:
            EVENTS_HELD.labels(self.settings.name, topic).inc()
            log.warning("event_held_behind_sequence_gap", consumer=self.settings.name, topic=topic,
                        producer=env.producer, aggregate_id=env.aggregate_id, sequence=env.sequence,
                        event_id=env.event_id, correlation_id=env.correlation_id)
            return "held"
        EVENTS_DROPPED.labels(self.settings.name, topic, admission.value).inc()
        log.info("event_dropped", consumer=self.settings.name, topic=topic, reason=admission.value,
                 event_id=env.event_id, correlation_id=env.correlation_id)
        return admission.value

    def _release(self, conn: Connection, message: Message, item: int | None, held: bytes, topic: str,
                 sequence: int) -> bool:
        """Apply the held event SEQUENCE, released by MESSAGE's event (envelope ITEM of a bundle), in a savepoint;
        True once applied.

        One that no longer verifies, or whose handler keeps failing, is set aside to the dead-letter topic, and
        the event that released it is applied all the same: the poison is the held event, not the one that
        filled the gap (which a failure of the whole transaction would have set aside in its place)."""
        try:
            event = self._released(held, topic)
        except VerificationError as error:
            self._set_aside_held(conn, message, item, held, error, sequence)
            return False
        for attempt in range(1, self.settings.handler_attempts + 1):
            try:
                with conn.begin_nested():
                    self._apply(conn, event)
                return True
            except Exception as error:
                if database_away(error):
                    raise
                log.warning("handler_failed", consumer=self.settings.name, topic=topic, attempt=attempt,
                            error=type(error).__name__, event_id=event.event_id, released_from_hold=True,
                            correlation_id=event.envelope.correlation_id)
                failure = handler_failure(error)
        self._set_aside_held(conn, message, item, held, failure, sequence)
        return False

    def _set_aside_held(self, conn: Connection, message: Message, item: int | None, held: bytes,
                        error: VerificationError, sequence: int) -> None:
        """Dead-letter a held event (its `held_form` bytes) that could not be applied when released. Its security
        record goes in CONN's transaction, with the removal of its held row: both commit only after the broker
        acknowledged the dead letter, or neither does (a crash in between writes the dead letter again). Any
        failure here is HeldEventNotSetAsideError, never a failure of the event that released it."""
        raw, bundled = inbox.unwrap_held(held)
        try:
            self._reject(message, raw, error, item=item, bundled=bundled, released=sequence, conn=conn)
        except Exception as failure:
            raise HeldEventNotSetAsideError(f"held event {sequence} could not be set aside: "
                                            f"{type(failure).__name__}") from failure

    def _released(self, held: bytes, topic: str) -> VerifiedEvent:
        """A held event verified again (it passed every step when it arrived; freshness is not asked twice)."""
        raw, bundled = inbox.unwrap_held(held)
        if not bundled:
            return self.verifier.verify(raw, topic, check_freshness=False)
        [outcome] = self.verifier.verify_bundle(raw, topic, check_freshness=False).outcomes
        if isinstance(outcome, VerificationError):
            raise outcome
        return outcome

    def report_open_gaps(self) -> list[inbox.OpenGap]:
        """Report, once each, the sequence gaps on this consumer's topics that events have waited behind for
        longer than `gap_alert_seconds`: a `sequence_gap` security record (in the transaction that marks their held
        rows reported), a warning log line with the first held event's correlation id, a count. A gap reported
        before, with more events held behind it since, raises nothing new. Returns the gaps reported now."""
        held_for = dt.timedelta(seconds=self.settings.gap_alert_seconds)
        with self.engine.begin() as conn:
            reported = [gap for gap in inbox.open_gaps(conn, self.settings.topics, held_for)
                        if not gap.reported_before and self._gap_record(conn, gap)]
        for gap in reported:
            claimed = claimed_envelope(*inbox.unwrap_held(gap.form))
            EVENTS_GAPS_OPEN.labels(self.settings.name, gap.topic).inc()
            log.warning("sequence_gap_open", consumer=self.settings.name, topic=gap.topic,
                        producer=safe_claim(gap.producer), aggregate_id=safe_claim(gap.aggregate_id),
                        missing=gap.missing_range, held=gap.held, first_held=gap.first_held, source=gap.source,
                        held_since=gap.held_since.isoformat(), event_id=safe_claim(claimed.event_id),
                        correlation_id=safe_claim(claimed.correlation_id))
        return reported

    def _gap_record(self, conn: Connection, gap: inbox.OpenGap) -> bool:
        """Write GAP's security record; False when it was written before (its id is the gap's)."""
        if self.security_outbox is None:
            return True
        claimed = claimed_envelope(*inbox.unwrap_held(gap.form))
        partition, offset, item = place_in(gap.source)
        record = EventRejected(
            consumer=self.settings.name, topic=gap.topic, partition=partition, offset=offset,
            reason=RejectReason.SEQUENCE_GAP.value,
            detail=(f"{gap.missing_range} of aggregate {safe_claim(gap.aggregate_id)} from "
                    f"{safe_claim(gap.producer)} missing for over {self.settings.gap_alert_seconds:g}s: {gap.held} "
                    f"event(s) held behind, the first sequence {gap.first_held} (held, not lost: applied in order "
                    "if the missing ones come)")[:500],
            claimed_producer=safe_claim(gap.producer), claimed_event_id=safe_claim(claimed.event_id),
            correlation_id=safe_claim(claimed.correlation_id), item=item,
        )
        # One record per gap: the missing sequence of the aggregate names it (the aggregate last, as it may hold "/").
        record_id = str(uuid.uuid5(REJECTION_NAMESPACE,
                                   f"{self.settings.name}/gap/{gap.producer}/{gap.missing}/{gap.aggregate_id}"))
        stored = self.security_outbox.append(
            conn, SECURITY_TOPIC, record, aggregate_id=f"consumer:{self.settings.name}",
            correlation_id=record.correlation_id if SAFE_ID.fullmatch(record.correlation_id) else record_id,
            event_id=record_id)
        return stored is not None

    def _apply(self, conn: Connection, event: VerifiedEvent) -> None:
        env = event.envelope
        if self.spans is not None and env.traceparent:
            with self.spans.processing(env.topic, env.event_type, env.event_id, env.correlation_id, env.traceparent):
                self.handler(conn, event)
        else:
            self.handler(conn, event)
        inbox.record(conn, event)
        EVENTS_APPLIED.labels(self.settings.name, event.envelope.topic).inc()

    def _reject(self, message: Message, raw: bytes, error: VerificationError, item: int | None = None,
                bundled: bool = False, released: int | None = None, conn: Connection | None = None) -> None:
        self._reject_all(message, [Refusal(raw, error, item, bundled, released)], conn)

    def _reject_all(self, message: Message, refusals: list[Refusal], conn: Connection | None = None) -> None:
        """Count, log, raise a security record for and dead-letter each of REFUSALS of MESSAGE. The security
        records are written in CONN's transaction when given, else in one of their own, and the dead letters are
        settled once: a bundle's refused envelopes cost one commit and one broker round trip, not one each."""
        noted = [self._noted(message, refusal) for refusal in refusals]
        outbox = self.security_outbox
        if outbox is not None:
            with contextlib.nullcontext(conn) if conn is not None else self.engine.begin() as target:
                for refusal, claimed in noted:
                    self._security_record(outbox, target, message, refusal, claimed)
        for refusal, _ in noted:
            self.letters.write(message, refusal.raw, refusal.error, refusal.item, refusal.bundled, refusal.released)
        self.letters.settle()

    def _noted(self, message: Message, refusal: Refusal) -> tuple[Refusal, Envelope]:
        """REFUSAL counted and logged, with what its record claims about itself (the reason of a released held
        event names it)."""
        claimed = claimed_envelope(refusal.raw, refusal.bundled)
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        error = refusal.error
        if refusal.released is not None:
            error = VerificationError(error.reason, f"held event {refusal.released}, released by this record: "
                                                    f"{error.detail}")
            refusal = replace(refusal, error=error)
        EVENTS_REJECTED.labels(self.settings.name, topic, error.reason.value).inc()
        log.warning("event_rejected", consumer=self.settings.name, topic=topic, partition=partition, offset=offset,
                    item=refusal.item, released=refusal.released, reason=error.reason.value,
                    detail=error.detail[:300], claimed_producer=safe_claim(claimed.producer),
                    claimed_event_id=safe_claim(claimed.event_id), correlation_id=safe_claim(claimed.correlation_id))
        return refusal, claimed

    def _security_record(self, outbox: Outbox, target: Connection, message: Message, refusal: Refusal,
                         claimed: Envelope) -> None:
        append_rejection(outbox, target, self.settings.name, message, refusal, claimed)


def rejection_recorder(engine: Engine, outbox: Outbox, consumer: str) -> Callable[[Message, list[Refusal]], None]:
    """Records CONSUMER's refusals of a record, each a signed EventRejected appended to OUTBOX, in one transaction
    of ENGINE: for a reader that, unlike VerifyingConsumer, keeps nothing else in the database."""

    def record(message: Message, refusals: list[Refusal]) -> None:
        with engine.begin() as target:
            for refusal in refusals:
                append_rejection(outbox, target, consumer, message, refusal,
                                 claimed_envelope(refusal.raw, refusal.bundled))

    return record


def append_rejection(outbox: Outbox, target: Connection, consumer: str, message: Message, refusal: Refusal,
                     claimed: Envelope) -> None:
    """CONSUMER's signed EventRejected for REFUSAL of MESSAGE (CLAIMED: what it says about itself), appended to OUTBOX
    in TARGET's transaction for access.decisions.v1 and so for the audit log. Its id is the refused record's place,
    so a record refused again (read again after a restart) is recorded once."""
    record = EventRejected(
        consumer=consumer, topic=message.topic(), partition=message.partition(),
        offset=message.offset(), reason=refusal.error.reason.value, detail=refusal.error.detail[:500],
        claimed_producer=safe_claim(claimed.producer), claimed_event_id=safe_claim(claimed.event_id),
        correlation_id=safe_claim(claimed.correlation_id), item=refusal.item,
    )
    place = f"{consumer}/{source_of(message, refusal.item, refusal.released)}"
    record_id = str(uuid.uuid5(REJECTION_NAMESPACE, place))
    outbox.append(target, SECURITY_TOPIC, record, aggregate_id=f"consumer:{consumer}",
                  correlation_id=record.correlation_id if SAFE_ID.fullmatch(record.correlation_id) else record_id,
                  event_id=record_id)


# SQLSTATEs of a database that cannot take writes now, whatever the event: a read-only server (a standby after a
# failover) and corruption or internal errors of the server. psycopg maps them to InternalError, not to the
# OperationalError of a lost connection, a shutdown, a full disk or a deadlock.
DATABASE_AWAY_STATES = ("25006", "XX")


def database_away(error: BaseException) -> bool:
    """Whether ERROR says the database is away or cannot take writes, not that the event is bad: the consumer then
    stops and reads the record again later, rather than set a sound event aside during an outage."""
    if isinstance(error, OperationalError):
        return True
    state = getattr(error.orig, "sqlstate", None) if isinstance(error, DBAPIError) else None
    return isinstance(state, str) and state.startswith(DATABASE_AWAY_STATES)


def handler_failure(error: Exception) -> VerificationError:
    """Why an event whose handler kept failing is set aside: the error's type and message, cut."""
    return VerificationError(RejectReason.HANDLER_FAILED, f"{type(error).__name__}: {error}"[:300])


def source_of(message: Message, item: int | None = None, released: int | None = None) -> str:
    """Where a refused event came from: topic/partition/offset of its record, `/ITEM` for an envelope of a bundle,
    `/released/SEQUENCE` for a held event of the same aggregate that the record's event released."""
    place = f"{message.topic()}/{message.partition()}/{message.offset()}"
    if item is not None:
        place += f"/{item}"
    if released is not None:
        place += f"/released/{released}"
    return place


def place_in(source: str | None) -> tuple[int, int, int | None]:
    """Partition, offset and bundle item of a `source_of` place; (-1, -1, None) when it is not known."""
    parts = (source or "").split("/")  # a topic name never holds "/"
    if len(parts) in (3, 4) and all(part.isascii() and part.isdecimal() for part in parts[1:]):
        return int(parts[1]), int(parts[2]), int(parts[3]) if len(parts) == 4 else None
    return -1, -1, None


class DeadLetters:
    """Writes refused records to `<topic>.dlq` with the reason in their headers. `write` hands one to the producer;
    `settle` returns once the broker has acknowledged every one written since the last settle (the caller commits
    the offset only then) and raises DeadLetterError otherwise.

    The refused envelopes of one bundle are written together and settled once: one broker round trip per bundle,
    not per envelope, so a bundle of hundreds of refused envelopes (a producer's stolen key can sign one) costs
    the consumer one wait, not hundreds. Every MAX_UNSETTLED letters it waits once on the way, so that however
    many are refused, the producer's queue never overflows and the consumer moves on."""

    def __init__(self, producer: Producer, consumer: str, max_unsettled: int = MAX_UNSETTLED_LETTERS) -> None:
        self.producer = producer
        self.consumer = consumer
        self.max_unsettled = max_unsettled
        self._outcomes: list[KafkaError | None] = []
        self._written: list[str] = []

    def write(self, message: Message, raw: bytes, error: VerificationError, item: int | None = None,
              bundled: bool = False, released: int | None = None) -> None:
        """Hand the refused record (or, ITEM set, the refused envelope of a bundle record, as a bundle of one) to
        the producer. A bundle (BUNDLED) keeps the bundle header, so it can be read as one again."""
        source = source_of(message, item, released)
        headers = [
            ("bastion-reject-reason", error.reason.value.encode()),
            ("bastion-reject-detail", error.detail[:500].encode()),
            ("bastion-source", source.encode()),
            ("bastion-consumer", self.consumer.encode()),
        ]
        if len(raw) > DEAD_LETTER_MAX_BYTES:
            # With the headers it would not fit in a Kafka record: the write would fail on every restart and stop
            # the partition. Keep a prefix, the size and the digest of the whole; the source stays in its topic.
            headers += [("bastion-truncated-from", str(len(raw)).encode()),
                        ("bastion-sha256", hashlib.sha256(raw).hexdigest().encode())]
            raw = raw[:DEAD_LETTER_PREFIX_BYTES]
        if bundled:
            headers.append((BUNDLE_HEADER, BUNDLE_CONTENT))
        if len(self._written) >= self.max_unsettled:
            self.settle()
        outcomes = self._outcomes  # this settle's list: the report may come after the next settle began
        for _ in range(100):
            try:
                self.producer.produce(dead_letter_topic(message.topic()), value=raw, key=message.key(),
                                      headers=headers, on_delivery=lambda err, _msg: outcomes.append(err))
                break
            except BufferError:  # librdkafka's queue is full (other writers share the producer): let it drain
                self.producer.poll(0.1)
        else:
            raise DeadLetterError(f"dead-letter write for {source} not accepted: the producer's queue stayed full")
        self._written.append(source)

    def settle(self, timeout: float = 30.0) -> None:
        """Wait (one flush) until the broker has acknowledged every dead letter written since the last settle."""
        if not self._written:
            return
        written, outcomes = self._written, self._outcomes
        self._written, self._outcomes = [], []
        self.producer.flush(timeout)
        failed = [str(outcome) for outcome in outcomes if outcome is not None]
        if len(outcomes) < len(written) or failed:
            raise DeadLetterError(f"dead-letter writes not acknowledged: {len(written) - len(outcomes)} without an "
                                  f"answer, {len(failed)} failed ({'; '.join(failed)[:300]}), first at {written[0]}")
