"""Access audit: every allow and deny becomes a signed AccessDecision on access.decisions.v1.

Publishing never adds a network round trip, nor signing, to a call: `record` appends the decision to a deque;
a worker thread takes whatever has queued up within 20 ms (up to 500), signs it as one bundle (one Ed25519
signature over the Merkle root of the decisions' envelopes, `signing.sign_bundle`) and hands it to librdkafka
as one Kafka record, which it sends in the background. The audit service keeps one record per decision.
"""

import collections
import itertools
import threading
import time
import uuid
from typing import Any, Protocol

import structlog
from confluent_kafka import KafkaException, Producer
from prometheus_client import Counter

from bastion.access.v1.decision_pb2 import DECISION_ALLOW, DECISION_DENY, AccessDecision
from bastion.events.catalog import SCHEMAS
from bastion.events.envelopes import new_event_ids
from bastion.events.keys import KeySource, SigningKey
from bastion.events.signing import sign_bundle
from bastion.events.v1.envelope_pb2 import Envelope, EnvelopeBundle
from bastion.events.verify import BUNDLE_CONTENT, BUNDLE_HEADER
from bastion.grpc.context import MAX_METHOD

TOPIC = "access.decisions.v1"
BUNDLE_HEADERS = [(BUNDLE_HEADER, BUNDLE_CONTENT)]
DECISION_TYPE = str(AccessDecision.DESCRIPTOR.full_name)
log = structlog.get_logger(__name__)
DECISIONS_LOST = Counter("bastion_access_decisions_lost_total", "Access decisions that could not be queued or "
                         "delivered to Kafka", ["service"])


class AccessAudit(Protocol):
    def record(self, decision: AccessDecision) -> None: ...


# A bundle of decisions stays far below Kafka's largest record (1 MB): a batch that would not is sent as several.
MAX_BUNDLE_BYTES = 256 * 1024


def decision(principal: str, service_identity: str, method: str, allowed: bool, reason: str,
             correlation_id: str) -> AccessDecision:
    return AccessDecision(principal=principal, service_identity=service_identity, method=method[:MAX_METHOD],
                          decision=DECISION_ALLOW if allowed else DECISION_DENY, reason=reason[:300],
                          correlation_id=correlation_id)


def bundle_cuts(sizes: list[int], budget: int) -> list[int]:
    """Where to cut items of SIZES, in order, into runs whose sizes add up to at most BUDGET (an item larger than
    BUDGET alone in its run): the end index of each run."""
    cuts, total = [], 0
    for index, size in enumerate(sizes):
        if index and total + size > budget:
            cuts.append(index)
            total = 0
        total += size
    return [*cuts, len(sizes)]


class MemoryAccessAudit:
    """For unit tests: keeps the decisions in a list."""

    def __init__(self) -> None:
        self.decisions: list[AccessDecision] = []

    def record(self, decision: AccessDecision) -> None:
        self.decisions.append(decision)


class DecisionSealer:
    """Numbers access decisions in this process's aggregate and seals them into signed bundles: one Ed25519
    signature per bundle, over the Merkle root of its envelopes (`signing.sign_bundle`). No I/O."""

    def __init__(self, key: KeySource, topic: str = TOPIC) -> None:
        self.key = key
        self.topic = topic
        self.new_aggregate()

    def new_aggregate(self) -> None:
        """One aggregate per process (gap-free sequences without coordinating replicas); a new one after a
        lost decision, so the audit consumer never waits for a sequence number that will not come."""
        self.aggregate_id = f"access:{self.key.producer}:{uuid.uuid4()}"
        self.sequence = itertools.count(1)

    def bundles(self, decisions: list[tuple[AccessDecision, int]]) -> list[tuple[bytes, int, int]]:
        """DECISIONS ((decision, when it was recorded in ns), in order) numbered on and sealed: each bundle's bytes
        with the range [start, end) of DECISIONS it holds. A batch of long decisions is several bundles, so none
        is ever too large for Kafka (a refused bundle would lose every decision in it, the legitimate ones with
        the others)."""
        key = self.key.current()  # one key for the batch: a rotation applies from the next one
        members = self._members(decisions, key)
        sealed, start = [], 0
        for end in bundle_cuts([len(member) for member in members], MAX_BUNDLE_BYTES):
            signed = EnvelopeBundle(envelopes=members[start:end])
            sign_bundle(signed, key.private_key)
            sealed.append((signed.SerializeToString(), start, end))
            start = end
        return sealed

    def _members(self, decisions: list[tuple[AccessDecision, int]], key: SigningKey) -> list[bytes]:
        """Unsigned envelopes for DECISIONS, numbered on in this aggregate, each occurring when it was recorded
        and published now (freshness is judged on `published_at`: a decision that waited is stamped when it
        leaves). Copied from one template of the fields they share (what `envelope_for` builds, at a third of
        its cost: this runs for every call the service answers)."""
        template = Envelope(event_type=DECISION_TYPE, schema_version=SCHEMAS[DECISION_TYPE].current_version,
                            producer=key.producer, key_id=key.key_id, aggregate_id=self.aggregate_id,
                            topic=self.topic)
        published_seconds, published_nanos = divmod(time.time_ns(), 1_000_000_000)
        members = []
        envelope = Envelope()
        for (decision, recorded_ns), event_id in zip(decisions, new_event_ids(len(decisions)), strict=True):
            envelope.CopyFrom(template)
            envelope.event_id = event_id
            envelope.sequence = next(self.sequence)
            envelope.correlation_id = decision.correlation_id
            envelope.payload = decision.SerializeToString(deterministic=True)
            seconds, nanos = divmod(recorded_ns, 1_000_000_000)
            envelope.occurred_at.seconds, envelope.occurred_at.nanos = seconds, nanos
            envelope.published_at.seconds, envelope.published_at.nanos = published_seconds, published_nanos
            members.append(envelope.SerializeToString())
        return members


class KafkaAccessAudit:
    """Signs decisions with the service's key and hands them to Kafka, from a thread of its own: the call
    path only appends the decision to a bounded deque (one uncontended lock, no wake-up while the worker is
    busy), so auditing costs it no signing and no I/O. The worker signs what queued up as one batch, so signing costs
    one Ed25519 operation per batch, not per call."""

    def __init__(self, key: KeySource, kafka_config: dict[str, Any], max_queued: int = 100_000,
                 max_batch: int = 500, linger: float = 0.02, topic: str = TOPIC) -> None:
        self.key = key
        self.topic = topic
        self.max_queued = max_queued
        self.max_batch = max_batch
        self.linger = linger
        # Delivery reports for failures only: a callback per delivered decision was Python work on every call.
        # linger.ms 100, not 20: librdkafka's broker thread then cost the server 4 µs of CPU per call instead of
        # about 90 (benchmarks/grpc_chain.py, docs/performance.md); a decision reaches Kafka 0.1 s later.
        self.producer = Producer({**kafka_config, "enable.idempotence": True, "acks": "all", "linger.ms": 100,
                                  "delivery.report.only.error": True})
        # (decision, when it was recorded in ns). deque.append and popleft are atomic; the call path takes only
        # `_closing` (below), never the worker's lock or condition.
        self.pending: collections.deque[tuple[AccessDecision, int]] = collections.deque()
        # True from the moment the worker takes a batch until it handed it to Kafka (IN_HAND decisions): with
        # PENDING, what `flush` waits for.
        self._taking = False
        self._in_hand = 0
        self._progress = threading.Condition()
        # Held while checking `_closed` and appending, and while closing: nothing is appended after close() has
        # decided what the worker still publishes (uncontended, it costs the call well under a microsecond).
        self._closing = threading.Lock()
        self._wake = threading.Event()
        # `_idle` and `_taking` are single attribute stores shared without a lock (atomic under CPython's GIL); a
        # wake-up missed all the same would cost the worker's 1 s wait, never a decision.
        self._idle = False
        self._closed = False
        self.sealer = DecisionSealer(key, topic)
        self._sequence_broken = False
        self.worker = threading.Thread(target=self._publish, name=f"access-audit-{key.producer}", daemon=True)
        self.worker.start()

    def record(self, decision: AccessDecision) -> None:
        """Queue DECISION; never blocks or raises into the call path (a lost decision is logged and counted).
        Called from the server's event-loop thread."""
        with self._closing:
            if self._closed:
                refusal = "audit closed"
            elif len(self.pending) >= self.max_queued:
                refusal = "audit queue full"
            else:
                refusal = ""
                self.pending.append((decision, time.time_ns()))
        if refusal:
            self._count_lost(decision.correlation_id, refusal)
            return
        if self._idle:  # the worker waits for work: wake it (only then, so a busy call path pays no wake-up)
            self._idle = False
            self._wake.set()

    def _take(self) -> list[tuple[AccessDecision, int]]:
        """Wait for work, then after LINGER seconds take whatever queued up meanwhile (up to MAX_BATCH). One
        wake-up and one signature per batch: taking decisions one by one as they came cost the server several
        times more CPU per call than the rest of the security chain."""
        while not self.pending and not self._closed:
            self._wake.clear()
            self._idle = True
            if not self.pending and not self._closed:  # `record` sets the event if it came in meanwhile
                self._wake.wait(1.0)
            self._idle = False
        if self.pending and self.linger > 0 and not self._closed:
            time.sleep(self.linger)
        self._taking = True
        taken: list[tuple[AccessDecision, int]] = []
        while len(taken) < self.max_batch:
            try:
                taken.append(self.pending.popleft())
            except IndexError:
                break
        self._in_hand = len(taken)
        return taken

    def _publish(self) -> None:
        while True:
            taken = self._take()
            if not taken and self._closed:
                with self._progress:
                    self._taking = False
                    self._progress.notify_all()
                return
            decisions = taken
            while decisions:
                try:
                    decisions = self._publish_batch(decisions)
                except Exception as error:  # the thread must outlive a bad batch: count and log what it lost
                    for decision, _ in decisions:
                        self._lost(decision.correlation_id, repr(error))
                    decisions = []
            try:
                self.producer.poll(0)
            except Exception as error:  # a callback's error: the worker must go on
                log.error("access_audit_poll_failed", error=repr(error))
            with self._progress:
                self._taking = False
                self._in_hand = 0
                self._progress.notify_all()

    def _publish_batch(self, decisions: list[tuple[AccessDecision, int]]) -> list[tuple[AccessDecision, int]]:
        """Seal DECISIONS (one bundle, or several if they are long) and hand each bundle to the producer as one
        Kafka record (one record per batch, not per call: each record cost the server, librdkafka and the broker
        more than signing did). A bundle the producer refuses is lost whole (each decision counted and logged),
        and the next batch is numbered in a fresh aggregate. Returns the decisions to seal again: none (the
        signature covers all or none)."""
        if self._sequence_broken:
            self.sealer.new_aggregate()
            self._sequence_broken = False
        key = self.sealer.aggregate_id.encode()
        for bundle, start, end in self.sealer.bundles(decisions):
            self._produce(key, bundle, [decision.correlation_id for decision, _ in decisions[start:end]])
        return []

    def _produce(self, key: bytes, value: bytes, correlation_ids: list[str]) -> bool:
        for _ in range(50):
            try:
                self.producer.produce(self.topic, value=value, key=key, headers=BUNDLE_HEADERS,
                                      on_delivery=self._delivery_of(correlation_ids))
                return True
            except BufferError:
                self.producer.poll(0.1)  # librdkafka's queue is full: let it drain, then try again
            except KafkaException as error:
                self._lost_all(correlation_ids, repr(error))
                return False
        self._lost_all(correlation_ids, "producer queue stayed full")
        return False

    def _delivery_of(self, correlation_ids: list[str]) -> Any:
        def delivered(error: Any, _message: Any) -> None:
            if error is not None:
                self._lost_all(correlation_ids, str(error))
        return delivered

    def _lost_all(self, correlation_ids: list[str], error: str) -> None:
        for correlation_id in correlation_ids:
            self._lost(correlation_id, error)

    def _lost(self, correlation_id: str, error: str) -> None:
        """A decision that will not reach Kafka: counted, logged, and the worker starts a new aggregate before
        its next batch (this may run on librdkafka's callback, in whichever thread polls the producer)."""
        self._count_lost(correlation_id, error)
        self._sequence_broken = True

    def _count_lost(self, correlation_id: str, error: str) -> None:
        DECISIONS_LOST.labels(self.key.producer).inc()
        log.error("access_decision_lost", correlation_id=correlation_id, error=error)

    def flush(self, timeout: float = 10.0) -> int:
        """Wait (at most TIMEOUT seconds) until every decision recorded so far was handed to Kafka and
        delivered; returns how many are still queued or in flight."""
        deadline = time.monotonic() + timeout
        with self._progress:
            while self.pending or self._taking:
                left = deadline - time.monotonic()
                if left <= 0 or not self.worker.is_alive():
                    return len(self.pending) + self._in_hand
                self._progress.wait(min(left, 0.1))  # PENDING grows without notifying: look again now and then
        remaining: int = self.producer.flush(max(deadline - time.monotonic(), 0.0))
        return remaining

    def close(self, timeout: float = 10.0) -> None:
        """Publish what is queued and wait (TIMEOUT seconds for the worker, as long again for Kafka) until it is
        delivered, then stop. Whatever is not delivered by then is counted and logged as lost, by correlation id:
        the process that closes its audit is about to end, and librdkafka's queue ends with it. Decisions recorded
        afterwards are counted as lost too."""
        with self._closing:
            self._closed = True  # from here on nothing is appended: the worker publishes what is queued, then ends
        self._wake.set()
        self.worker.join(timeout)
        while self.pending:  # only if the worker died or is stuck past the join
            try:
                decision, _ = self.pending.popleft()
            except IndexError:
                break
            self._count_lost(decision.correlation_id, "audit closed before it was published")
        if self.worker.is_alive() and self._in_hand:  # stuck with a batch it has not handed to Kafka
            DECISIONS_LOST.labels(self.key.producer).inc(self._in_hand)
            log.error("access_decisions_lost", count=self._in_hand, error="audit closed while a batch was sealed")
        if self.producer.flush(timeout):
            # Kafka did not acknowledge everything in time: purge fails each bundle still held, and serving the
            # delivery reports counts and logs each of its decisions as lost.
            self.producer.purge()
            self.producer.poll(0)
