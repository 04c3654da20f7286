"""The event-access policy (infra/event-access.yaml): topics, who writes them, who reads them, as ACLs.

Pure data and checks only; `kafka_admin` applies the result to a running broker.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from bastion.devstack.errors import DevstackError

TOPIC_NAME = re.compile(r"[a-z][a-z0-9]*(\.[a-z0-9]+)*")
# Kafka takes the literal resource name "*" for every group, so a group is named in plain words only.
GROUP_NAME = re.compile(r"[a-z][a-z0-9]*([.-][a-z0-9]+)*")
DLQ_SUFFIX = ".dlq"

Operation = Literal["READ", "WRITE", "DESCRIBE"]
ResourceType = Literal["TOPIC", "GROUP"]


def dead_letter_topic(topic: str) -> str:
    """Where a verifying consumer of TOPIC sends what it refuses."""
    return f"{topic}{DLQ_SUFFIX}"


@dataclass(frozen=True)
class TopicPolicy:
    name: str
    partitions: int
    producers: tuple[str, ...]
    consumers: dict[str, str]
    config: dict[str, str] = field(default_factory=dict)
    # principal -> group: may read the topic to check what it says (partitions assigned, nothing committed, no
    # dead letters: a witness refuses nothing, it compares). The audit service reads its own published checkpoints.
    witnesses: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, order=True)
class AclGrant:
    """One ALLOW rule for a literal resource; the policy never produces a DENY or a wildcard."""

    principal: str
    resource_type: ResourceType
    resource_name: str
    operation: Operation

    @property
    def kafka_principal(self) -> str:
        return f"User:{self.principal}"


@dataclass(frozen=True)
class EventAccessPolicy:
    topics: dict[str, TopicPolicy]

    @property
    def principals(self) -> set[str]:
        names: set[str] = set()
        for topic in self.topics.values():
            names.update(topic.producers)
            names.update(topic.consumers)
            names.update(topic.witnesses)
        return names

    def readers_of(self, producer: str) -> dict[str, tuple[str, ...]]:
        """The topics PRODUCER signs events for, each with the consumer groups that read it (topics nobody reads
        left out). Dead-letter topics are left out too: what PRODUCER writes there is another producer's refused
        record, as it came, never signed by PRODUCER."""
        return {name: tuple(sorted(topic.consumers.values())) for name, topic in self.topics.items()
                if producer in topic.producers and topic.consumers and not name.endswith(DLQ_SUFFIX)}

    def grants(self) -> set[AclGrant]:
        grants: set[AclGrant] = set()
        for topic in self.topics.values():
            for producer in topic.producers:
                grants.add(AclGrant(producer, "TOPIC", topic.name, "WRITE"))
                grants.add(AclGrant(producer, "TOPIC", topic.name, "DESCRIBE"))
            for reader, group in (*topic.consumers.items(), *topic.witnesses.items()):
                grants.add(AclGrant(reader, "TOPIC", topic.name, "READ"))
                grants.add(AclGrant(reader, "TOPIC", topic.name, "DESCRIBE"))
                grants.add(AclGrant(reader, "GROUP", group, "READ"))
        return grants


def parse_policy(raw: dict[str, Any], known_principals: set[str]) -> EventAccessPolicy:
    """Build and check the policy; every problem found is reported at once, by topic."""
    problems: list[str] = []
    topics: dict[str, TopicPolicy] = {}
    for name, entry in (raw.get("topics") or {}).items():
        if not TOPIC_NAME.fullmatch(name):
            problems.append(f"{name}: not a valid topic name (lower-case words separated by dots)")
        unknown_keys = set(entry) - {"partitions", "producers", "consumers", "witnesses", "config"}
        if unknown_keys:
            problems.append(f"{name}: unknown keys {sorted(unknown_keys)}")
        producers = tuple(entry.get("producers") or ())
        consumers = {str(k): str(v) for k, v in (entry.get("consumers") or {}).items()}
        witnesses = {str(k): str(v) for k, v in (entry.get("witnesses") or {}).items()}
        for principal in (*producers, *consumers, *witnesses):
            if principal not in known_principals:
                problems.append(f"{name}: principal {principal!r} is not a service in infra/services.yaml")
        topics[name] = TopicPolicy(
            name=name,
            partitions=int(entry.get("partitions", 1)),
            producers=producers,
            consumers=consumers,
            config={str(k): str(v) for k, v in (entry.get("config") or {}).items()},
            witnesses=witnesses,
        )
    readers_of_group: dict[str, set[str]] = {}
    for topic in topics.values():
        for reader, group in (*topic.consumers.items(), *topic.witnesses.items()):
            readers_of_group.setdefault(group, set()).add(reader)
    for group, readers in sorted(readers_of_group.items()):
        if not GROUP_NAME.fullmatch(group):
            problems.append(f"consumer group {group!r} is not a valid group name (lower-case words separated by dots "
                            "or hyphens)")
        if len(readers) > 1:  # READ on a group lets its holder commit the group's offsets
            problems.append(f"consumer group {group!r} is granted to {sorted(readers)}: each principal needs a group "
                            "of its own, or one could move another's offsets")
    for name, topic in topics.items():
        if name.endswith(DLQ_SUFFIX):
            source = topics.get(name.removesuffix(DLQ_SUFFIX))
            if source is None:
                problems.append(f"{name}: dead-letter topic of an undeclared topic")
            elif set(topic.producers) != set(source.consumers):
                problems.append(
                    f"{name}: producers {sorted(topic.producers)} must equal the consumers of "
                    f"{source.name} {sorted(source.consumers)}"
                )
        elif topic.consumers and f"{name}{DLQ_SUFFIX}" not in topics:
            problems.append(f"{name}: has consumers but no dead-letter topic {name}{DLQ_SUFFIX}")
    if problems:
        raise DevstackError(
            "infra/event-access.yaml is inconsistent:\n  " + "\n  ".join(problems),
            "fix the file; the broker's ACLs are generated from it",
        )
    return EventAccessPolicy(topics)


def load_policy(path: Path, known_principals: set[str]) -> EventAccessPolicy:
    return parse_policy(yaml.safe_load(path.read_text()), known_principals)
