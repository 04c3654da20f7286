"""infra/revocation-triggers.yaml: which of Keycloak's admin events end the access tokens issued before them, and the
revocation each one makes (`revocation_of`)."""

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from bastion.access.v1.decision_pb2 import AccessRevoked

# Keycloak's user ids are UUIDs; the resource path of an event about a user starts with users/ID.
_USER_PATH = re.compile(r"^users/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(?:/|$)")
_NAME = re.compile(r"^[A-Z][A-Z_]{0,63}$")
# The namespace of the event ids of revocations: one Keycloak event is one revocation, however often it is published.
_REVOCATION_IDS = uuid.UUID("6f1d3c52-8d0e-4b8a-9a57-2f4a3e1c7b90")


class TriggerError(ValueError):
    """The triggers file is not what this module reads: refused at start-up, naming what is wrong."""


class Scope(StrEnum):
    USER = "user"
    EVERYONE = "everyone"


@dataclass(frozen=True)
class Trigger:
    resource: str
    operations: frozenset[str]
    scope: Scope


@dataclass(frozen=True)
class Revocation:
    """The tokens of SUBJECT (of everyone when None) issued at or before REVOKED_AT_MS are no longer accepted."""

    subject: str | None
    revoked_at_ms: int
    cause: str
    keycloak_event_id: str

    @property
    def event_id(self) -> str:
        """The envelope's event id: the same Keycloak event always gives the same one."""
        return str(uuid.uuid5(_REVOCATION_IDS, f"{self.keycloak_event_id}/{self.subject or '*'}"))

    def message(self) -> AccessRevoked:
        revoked = AccessRevoked(subject=self.subject or "", everyone=self.subject is None, cause=self.cause,
                                keycloak_event_id=self.keycloak_event_id)
        revoked.revoked_at.FromMilliseconds(self.revoked_at_ms)
        return revoked


def load_triggers(path: Path) -> tuple[Trigger, ...]:
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise TriggerError(f"{path} cannot be read: {error}") from None
    entries = document.get("triggers") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise TriggerError(f"{path} must hold a non-empty `triggers` list")
    triggers = []
    for number, entry in enumerate(entries, 1):
        triggers.append(_trigger(entry, f"{path}, trigger {number}"))
    resources = [trigger.resource for trigger in triggers]
    repeated = sorted({name for name in resources if resources.count(name) > 1})
    if repeated:
        raise TriggerError(f"{path} names {repeated} more than once: give each resource one trigger")
    return tuple(triggers)


def _trigger(entry: Any, where: str) -> Trigger:
    if not isinstance(entry, dict) or set(entry) != {"resource", "operations", "scope"}:
        raise TriggerError(f"{where}: needs exactly `resource`, `operations` and `scope`")
    resource, operations, scope = entry["resource"], entry["operations"], entry["scope"]
    if not isinstance(resource, str) or not _NAME.match(resource):
        raise TriggerError(f"{where}: the resource must be a Keycloak resource type such as REALM_ROLE_MAPPING")
    if (not isinstance(operations, list) or not operations
            or not all(operation in ("CREATE", "UPDATE", "DELETE", "ACTION") for operation in operations)):
        raise TriggerError(f"{where}: operations must be a non-empty list of CREATE, UPDATE, DELETE, ACTION")
    if scope not in tuple(Scope):
        raise TriggerError(f"{where}: the scope must be one of {[str(s) for s in Scope]}")
    return Trigger(resource, frozenset(operations), Scope(scope))


def revocation_of(event: Mapping[str, Any], triggers: tuple[Trigger, ...]) -> Revocation | None:
    """The revocation Keycloak admin EVENT (its JSON representation) makes, or None when no trigger matches it.
    An event without a time or an id cannot be placed: ValueError."""
    resource, operation = event.get("resourceType"), event.get("operationType")
    trigger = next((t for t in triggers if t.resource == resource and operation in t.operations), None)
    if trigger is None:
        return None
    moment, event_id = event.get("time"), event.get("id")
    if isinstance(moment, bool) or not isinstance(moment, int) or moment <= 0:
        raise ValueError(f"an admin event ({resource} {operation}) without a time")
    if not isinstance(event_id, str) or not event_id:
        raise ValueError(f"an admin event ({resource} {operation}) without an id")
    subject = None
    if trigger.scope is Scope.USER:
        named = _USER_PATH.match(str(event.get("resourcePath") or ""))
        subject = named.group(1) if named else None  # no user named: everyone, the safe side
    return Revocation(subject, moment, f"{resource} {operation}", event_id)
