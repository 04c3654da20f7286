"""Access audit: every allow and deny becomes a signed AccessDecision on access.decisions.v1.

Publishing never adds a network round trip, nor signing, to a call: `record` puts the decision on a queue; a
worker thread takes whatever has queued up within 20 ms (up to 500), signs it as one batch (one Ed25519
signature over the batch's Merkle root, `signing.sign_batch`) and hands it to librdkafka, which sends it in
the background.
"""

import itertools
import queue
import threading
import time
import uuid
from typing import Any, Protocol

import structlog
from confluent_kafka import KafkaException, Producer
from prometheus_client import Counter

from bastion.access.v1.decision_pb2 import DECISION_ALLOW, DECISION_DENY, AccessDecision
from bastion.events.envelopes import envelope_for
from bastion.events.keys import SigningKey
from bastion.events.signing import sign_batch

TOPIC = "access.decisions.v1"
log = structlog.get_logger(__name__)
DECISIONS_LOST = Counter("bastion_access_decisions_lost_total", "Access decisions that could not be queued or "
                         "delivered to Kafka", ["service"])


class AccessAudit(Protocol):
    def record(self, decision: AccessDecision) -> None: ...


def decision(principal: str, service_identity: str, method: str, allowed: bool, reason: str,
             correlation_id: str) -> AccessDecision:
    return AccessDecision(principal=principal, service_identity=service_identity, method=method,
                          decision=DECISION_ALLOW if allowed else DECISION_DENY, reason=reason[:300],
                          correlation_id=correlation_id)


class MemoryAccessAudit:
    """For unit tests: keeps the decisions in a list."""

    def __init__(self) -> None:
        self.decisions: list[AccessDecision] = []

    def record(self, decision: AccessDecision) -> None:
        self.decisions.append(decision)


class KafkaAccessAudit:
    """Signs decisions with the service's key and hands them to Kafka, from a thread of its own: the call
    path only puts the decision on a bounded queue, so auditing costs it no signing and no I/O. Under load the
    thread signs what queued up while it was busy as one batch, so signing costs one Ed25519 operation per
    batch, not per call."""

    def __init__(self, key: SigningKey, kafka_config: dict[str, Any], max_queued: int = 100_000,
                 max_batch: int = 500, linger: float = 0.02) -> None:
        self.key = key
        self.max_batch = max_batch
        self.linger = linger
        # Delivery reports for failures only: a callback per delivered decision was Python work on every call.
        # linger.ms 100, not 20: librdkafka's broker thread then cost the server 4 µs of CPU per call instead of
        # about 90 (benchmarks/grpc_chain.py, docs/performance.md); a decision reaches Kafka 0.1 s later.
        self.producer = Producer({**kafka_config, "enable.idempotence": True, "acks": "all", "linger.ms": 100,
                                  "delivery.report.only.error": True})
        self.pending: queue.Queue[AccessDecision | None] = queue.Queue(maxsize=max_queued)
        self._closed = False
        self._new_aggregate()
        self.worker = threading.Thread(target=self._publish, name=f"access-audit-{key.producer}", daemon=True)
        self.worker.start()

    def _new_aggregate(self) -> None:
        """One aggregate per process (gap-free sequences without coordinating replicas); a new one after a
        lost decision, so the audit consumer never waits for a sequence number that will not come."""
        self.aggregate_id = f"access:{self.key.producer}:{uuid.uuid4()}"
        self.sequence = itertools.count(1)
        self._sequence_broken = False

    def record(self, decision: AccessDecision) -> None:
        """Queue DECISION; never blocks or raises into the call path (a lost decision is logged and counted)."""
        if self._closed:
            self._count_lost(decision.correlation_id, "audit closed")
            return
        try:
            self.pending.put_nowait(decision)
        except queue.Full:
            self._count_lost(decision.correlation_id, "audit queue full")

    def _take(self) -> list[AccessDecision | None]:
        """The next decision, waiting for it, then after LINGER seconds whatever else queued up meanwhile (up
        to MAX_BATCH in all). One wake-up and one signature per batch: taking decisions one by one as they
        come cost the server several times more CPU per call than the rest of the security chain."""
        taken = [self.pending.get()]
        if taken[0] is not None and self.linger > 0:
            time.sleep(self.linger)
        while len(taken) < self.max_batch and taken[-1] is not None:
            try:
                taken.append(self.pending.get_nowait())
            except queue.Empty:
                break
        return taken

    def _publish(self) -> None:
        while True:
            taken = self._take()
            decisions = [decision for decision in taken if decision is not None]
            while decisions:
                try:
                    decisions = self._publish_batch(decisions)
                except Exception as error:  # the thread must outlive a bad batch: count and log what it lost
                    for decision in decisions:
                        self._lost(decision.correlation_id, repr(error))
                    decisions = []
            self.producer.poll(0)
            for _ in taken:
                self.pending.task_done()
            if taken[-1] is None:  # close() queued None: everything before it is out
                return

    def _publish_batch(self, decisions: list[AccessDecision]) -> list[AccessDecision]:
        """Sign DECISIONS as one batch and hand them to the producer, in order. If one is lost, the rest are
        returned unsent: published after it under the same aggregate they would wait behind a gap for ever,
        so the caller signs them again, numbered in a fresh aggregate."""
        if self._sequence_broken:
            self._new_aggregate()
        envelopes = [envelope_for(self.key, TOPIC, decision, self.aggregate_id, next(self.sequence),
                                  correlation_id=decision.correlation_id) for decision in decisions]
        sign_batch(envelopes, self.key.private_key)
        key = self.aggregate_id.encode()
        for index, (decision, envelope) in enumerate(zip(decisions, envelopes, strict=True)):
            if not self._produce(key, envelope.SerializeToString(), decision.correlation_id):
                return decisions[index + 1:]
        return []

    def _produce(self, key: bytes, value: bytes, correlation_id: str) -> bool:
        for _ in range(50):
            try:
                self.producer.produce(TOPIC, value=value, key=key, on_delivery=self._delivered)
                return True
            except BufferError:
                self.producer.poll(0.1)  # librdkafka's queue is full: let it drain, then try again
            except KafkaException as error:
                self._lost(correlation_id, repr(error))
                return False
        self._lost(correlation_id, "producer queue stayed full")
        return False

    def _delivered(self, error: Any, message: Any) -> None:
        if error is not None:
            self._lost("-", str(error))

    def _lost(self, correlation_id: str, error: str) -> None:
        """A decision that will not reach Kafka: counted, logged, and the worker starts a new aggregate before
        its next batch (this may run on librdkafka's callback, in whichever thread polls the producer)."""
        self._count_lost(correlation_id, error)
        self._sequence_broken = True

    def _count_lost(self, correlation_id: str, error: str) -> None:
        DECISIONS_LOST.labels(self.key.producer).inc()
        log.error("access_decision_lost", correlation_id=correlation_id, error=error)

    def flush(self, timeout: float = 10.0) -> int:
        """Wait (at most TIMEOUT seconds) until every queued decision was handed to Kafka and delivered;
        returns how many are still queued or in flight."""
        deadline = time.monotonic() + timeout
        with self.pending.all_tasks_done:
            while self.pending.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return int(self.pending.unfinished_tasks)
                self.pending.all_tasks_done.wait(left)
        remaining: int = self.producer.flush(max(deadline - time.monotonic(), 0.0))
        return remaining

    def close(self) -> None:
        """Publish what is queued, then stop; decisions recorded afterwards are counted as lost."""
        self._closed = True
        self.pending.put(None)
        self.worker.join(10)
        self.producer.flush(10)
