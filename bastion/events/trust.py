"""The event trust policy (infra/event-trust.yaml): which producer may emit which event type on which topic."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bastion.devstack.errors import DevstackError
from bastion.devstack.event_access import DLQ_SUFFIX, EventAccessPolicy
from bastion.events.errors import RejectReason, VerificationError


@dataclass(frozen=True)
class TrustPolicy:
    allowed: dict[str, dict[str, frozenset[str]]]

    def check(self, topic: str, producer: str, event_type: str) -> None:
        """Raise VerificationError(NOT_AUTHORISED) unless PRODUCER may emit EVENT_TYPE on TOPIC."""
        producers = self.allowed.get(topic, {})
        if event_type not in producers.get(producer, frozenset()):
            raise VerificationError(
                RejectReason.NOT_AUTHORISED, f"{producer!r} may not emit {event_type!r} on {topic!r}"
            )

    def event_types(self) -> set[str]:
        return {t for producers in self.allowed.values() for types in producers.values() for t in types}


def _names(types: object) -> bool:
    return isinstance(types, list) and all(isinstance(name, str) and name for name in types)


def parse_trust_policy(raw: dict[str, Any], access: EventAccessPolicy) -> TrustPolicy:
    """Build the policy and check it agrees with the Kafka ACL file; all contradictions reported at once."""
    allowed = {
        # Only a list of names is read here: anything else (a number, not iterable; a list in the list, not hashable)
        # would raise a TypeError before it is refused as one of the problems listed below.
        topic: {producer: frozenset(types if _names(types) else ()) for producer, types in (producers or {}).items()}
        for topic, producers in (raw.get("topics") or {}).items()
    }
    # A bare string would be read letter by letter (`AccountOpened` as the types A, c, o, ...): refused, not failed
    # closed at run time with every event of that producer rejected.
    problems = [f"{topic}: the event types of {producer!r} must be a list of names"
                for topic, producers in (raw.get("topics") or {}).items()
                for producer, types in (producers or {}).items()
                if not _names(types)]
    for topic, producers in allowed.items():
        declared = access.topics.get(topic)
        if declared is None:
            problems.append(f"{topic}: not a topic of infra/event-access.yaml")
            continue
        problems += [
            f"{topic}: {producer!r} may emit here but has no WRITE ACL in infra/event-access.yaml"
            for producer in producers if producer not in declared.producers
        ]
    for topic in access.topics.values():
        if topic.name.endswith(DLQ_SUFFIX):
            continue
        problems += [
            f"{topic.name}: {producer!r} may write (ACL) but has no entry in infra/event-trust.yaml"
            for producer in topic.producers if producer not in allowed.get(topic.name, {})
        ]
    if problems:
        raise DevstackError(
            "the event trust policy contradicts the Kafka ACLs:\n  " + "\n  ".join(problems),
            "make infra/event-trust.yaml and infra/event-access.yaml agree",
        )
    return TrustPolicy(allowed)


def load_trust_policy(path: Path, access: EventAccessPolicy) -> TrustPolicy:
    return parse_trust_policy(yaml.safe_load(path.read_text()), access)
