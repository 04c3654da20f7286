"""Access audit: every allow and deny becomes a signed AccessDecision on access.decisions.v1.

Publishing never adds a network round trip to a call: `record` signs and hands the event to the Kafka
producer's local queue; librdkafka sends it in the background.
"""

import itertools
import threading
import uuid
from typing import Any, Protocol

import structlog
from confluent_kafka import Producer

from bastion.access.v1.decision_pb2 import DECISION_ALLOW, DECISION_DENY, AccessDecision
from bastion.events.envelopes import seal
from bastion.events.keys import SigningKey

TOPIC = "access.decisions.v1"
log = structlog.get_logger(__name__)


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
    """Signs each decision with the service's key and queues it for the broker."""

    def __init__(self, key: SigningKey, kafka_config: dict[str, Any]) -> None:
        self.key = key
        # One aggregate per process, so the sequence stays gap-free without coordination between replicas.
        self.aggregate_id = f"access:{key.producer}:{uuid.uuid4()}"
        self.sequence = itertools.count(1)
        self.lock = threading.Lock()
        self.producer = Producer({**kafka_config, "enable.idempotence": True, "acks": "all", "linger.ms": 20})

    def record(self, decision: AccessDecision) -> None:
        with self.lock:
            envelope = seal(self.key, TOPIC, decision, self.aggregate_id, next(self.sequence),
                            correlation_id=decision.correlation_id)
            self.producer.produce(TOPIC, value=envelope.SerializeToString(), key=self.aggregate_id.encode(),
                                  on_delivery=self._delivered)
        self.producer.poll(0)

    def _delivered(self, error: Any, _message: Any) -> None:
        if error is not None:
            log.error("access_decision_not_delivered", error=str(error))

    def flush(self, timeout: float = 10.0) -> int:
        remaining: int = self.producer.flush(timeout)
        return remaining
