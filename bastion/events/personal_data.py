"""The personal-data policy (infra/personal-data.yaml): which event fields are encrypted, and which services
hold each topic's data key."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from google.protobuf.message import Message

from bastion.devstack.errors import DevstackError
from bastion.devstack.event_access import EventAccessPolicy
from bastion.events.catalog import SCHEMAS
from bastion.events.v1.envelope_pb2 import EncryptedField

ENTRY_KEYS = frozenset({"encrypted_fields", "readers"})


@dataclass(frozen=True)
class TopicPersonalData:
    topic: str
    # fully qualified field names, e.g. "bastion.accounts.v1.AccountOpened.owner_email"
    encrypted_fields: tuple[str, ...]
    readers: tuple[str, ...]
    # from infra/event-access.yaml: a producer needs the key to encrypt, though it is no reader
    producers: tuple[str, ...]


@dataclass(frozen=True)
class PersonalDataPolicy:
    topics: dict[str, TopicPersonalData]

    def is_reader(self, service: str, topic: str) -> bool:
        entry = self.topics.get(topic)
        return entry is not None and service in entry.readers

    def key_topics(self, service: str) -> list[str]:
        """The topics whose data keys SERVICE must be given: those it produces or is entitled to read."""
        return sorted(
            name for name, entry in self.topics.items() if service in entry.readers or service in entry.producers
        )


def _encrypted_fields(message: type[Message]) -> set[str]:
    return {
        field.full_name for field in message.DESCRIPTOR.fields
        if field.message_type is not None and field.message_type.full_name == EncryptedField.DESCRIPTOR.full_name
    }


def _field_problem(topic: str, name: str) -> str | None:
    event_type, _, field_name = str(name).rpartition(".")
    schema = SCHEMAS.get(event_type)
    if schema is None:
        return f"{topic}: {name!r} is not a field of a known event type (bastion/events/catalog.py)"
    field = schema.message.DESCRIPTOR.fields_by_name.get(field_name)
    if field is None:
        return f"{topic}: {event_type} has no field {field_name!r}"
    if field.full_name not in _encrypted_fields(schema.message):
        return f"{topic}: {name} is not an EncryptedField, so it would travel in clear"
    return None


def parse_personal_data(raw: dict[str, Any], access: EventAccessPolicy) -> PersonalDataPolicy:
    """Build the policy and check it against the Kafka ACLs and the event schemas; all problems at once."""
    problems: list[str] = []
    topics: dict[str, TopicPersonalData] = {}
    for topic, entry in (raw.get("topics") or {}).items():
        entry = entry or {}
        unknown_keys = set(entry) - ENTRY_KEYS
        if unknown_keys:
            problems.append(f"{topic}: unknown keys {sorted(unknown_keys)}")
        fields = tuple(str(name) for name in entry.get("encrypted_fields") or ())
        readers = tuple(str(reader) for reader in entry.get("readers") or ())
        declared = access.topics.get(topic)
        if declared is None:
            problems.append(f"{topic}: not a topic of infra/event-access.yaml")
            continue
        problems += [
            f"{topic}: reader {reader!r} is not a consumer of the topic in infra/event-access.yaml"
            for reader in readers if reader not in declared.consumers
        ]
        problems += [problem for name in fields if (problem := _field_problem(topic, name)) is not None]
        topics[topic] = TopicPersonalData(topic, fields, readers, declared.producers)
    listed = {name for entry in topics.values() for name in entry.encrypted_fields}
    for schema in SCHEMAS.values():
        problems += [
            f"{name}: an EncryptedField that no topic lists, so no service would be given its key"
            for name in sorted(_encrypted_fields(schema.message) - listed)
        ]
    if problems:
        raise DevstackError(
            "infra/personal-data.yaml is inconsistent:\n  " + "\n  ".join(problems),
            "fix the file; data keys are handed out from it",
        )
    return PersonalDataPolicy(topics)


def load_personal_data(path: Path, access: EventAccessPolicy) -> PersonalDataPolicy:
    return parse_personal_data(yaml.safe_load(path.read_text()), access)
