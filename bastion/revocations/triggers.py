"""infra/revocation-triggers.yaml: which of Keycloak's admin events and user events end access tokens, and the
revocation each one makes (`revocation_of`, `revocation_of_user_event`)."""

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from bastion.access.v1.decision_pb2 import AccessRevoked

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# Keycloak's session ids are UUIDs in 26.4 and base64url text in later versions: either is taken, nothing else.
_SESSION = r"[0-9A-Za-z_-]{16,64}"
# Keycloak's user ids are UUIDs; the resource path of an event about a user starts with users/ID, of one about a
# session with sessions/ID.
_PATHS = {"user": re.compile(rf"^users/({_UUID})(?:/|$)"), "session": re.compile(rf"^sessions/({_SESSION})$")}
_ID = re.compile(rf"^{_UUID}$")
_SESSION_ID = re.compile(rf"^{_SESSION}$")
_NAME = re.compile(r"^[A-Z][A-Z_]{0,63}$")
OPERATIONS = ("CREATE", "UPDATE", "DELETE", "ACTION")
MAX_REASON = 200
# Of the user event types a trigger may name, those Keycloak records when the realm names no type at all (measured on
# 26.x: a sign-out is recorded, a refresh token's reuse is not).
SAVED_BY_DEFAULT = frozenset({"LOGOUT"})
# The namespace of the event ids of revocations: one Keycloak event is one revocation, however often it is published.
_REVOCATION_IDS = uuid.UUID("6f1d3c52-8d0e-4b8a-9a57-2f4a3e1c7b90")


class TriggerError(ValueError):
    """The triggers file is not what this module reads: refused at start-up, naming what is wrong."""


class Scope(StrEnum):
    SESSION = "session"
    USER = "user"
    EVERYONE = "everyone"


@dataclass(frozen=True)
class Trigger:
    """An admin event: Keycloak's resource type, the operations on it that revoke, and whose tokens."""

    resource: str
    operations: frozenset[str]
    scope: Scope


@dataclass(frozen=True)
class UserTrigger:
    """A user event (a user's own doing, such as signing out): its type, and whose tokens. With REASON, only an
    event whose `details.reason` is exactly that text (one kind of error event, not every one of its type)."""

    type: str
    scope: Scope
    reason: str | None = None

    def matches(self, event: Mapping[str, Any]) -> bool:
        if event.get("type") != self.type:
            return False
        if self.reason is None:
            return True
        details = event.get("details")
        return isinstance(details, Mapping) and details.get("reason") == self.reason


@dataclass(frozen=True)
class Triggers:
    admin: tuple[Trigger, ...]
    user: tuple[UserTrigger, ...]

    @property
    def user_event_types(self) -> list[str]:
        """What the realm must record for the user triggers to see anything (bastion/devstack/realm.py)."""
        return sorted({trigger.type for trigger in self.user})

    @property
    def lasting_event_types(self) -> list[str]:
        """The user event types of triggers that take every event of the type (a sign-out): read in full."""
        return sorted({trigger.type for trigger in self.user if trigger.reason is None})

    @property
    def error_event_types(self) -> list[str]:
        """The user event types of triggers that take one reason only (a refresh token's reuse among refresh
        errors): anyone can cause the others, so they are read on a budget of their own (watcher.py)."""
        return sorted({trigger.type for trigger in self.user if trigger.reason is not None})


@dataclass(frozen=True)
class Revocation:
    """Every token of SESSION when it is set; otherwise the tokens of SUBJECT (of everyone when None) issued at or
    before REVOKED_AT_MS."""

    subject: str | None
    revoked_at_ms: int
    cause: str
    keycloak_event_id: str
    session: str | None = None

    @property
    def event_id(self) -> str:
        """The envelope's event id: the same Keycloak event always gives the same one."""
        return str(uuid.uuid5(_REVOCATION_IDS, f"{self.keycloak_event_id}/{self.subject or '*'}/{self.session}"))

    @property
    def everyone(self) -> bool:
        return self.subject is None and self.session is None

    def message(self) -> AccessRevoked:
        revoked = AccessRevoked(subject=self.subject or "", everyone=self.everyone, cause=self.cause,
                                keycloak_event_id=self.keycloak_event_id, session_id=self.session or "")
        revoked.revoked_at.FromMilliseconds(self.revoked_at_ms)
        return revoked


def load_triggers(path: Path) -> Triggers:
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise TriggerError(f"{path} cannot be read: {error}") from None
    if not isinstance(document, dict) or set(document) != {"admin_events", "user_events"}:
        raise TriggerError(f"{path} must hold exactly `admin_events` and `user_events`")
    admin_entries, user_entries = document["admin_events"], document["user_events"]
    if not isinstance(admin_entries, list) or not admin_entries:
        raise TriggerError(f"{path}: `admin_events` must be a non-empty list")
    if not isinstance(user_entries, list):
        raise TriggerError(f"{path}: `user_events` must be a list")
    admin = tuple(_trigger(entry, f"{path}, admin event trigger {n}") for n, entry in enumerate(admin_entries, 1))
    user = tuple(_user_trigger(entry, f"{path}, user event trigger {n}") for n, entry in enumerate(user_entries, 1))
    user_names = [t.type if t.reason is None else f"{t.type} ({t.reason})" for t in user]
    for names, what in (([t.resource for t in admin], "admin_events"), (user_names, "user_events")):
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise TriggerError(f"{path}: {what} names {repeated} more than once: give each one trigger")
    return Triggers(admin, user)


def _scope(value: Any, where: str, allowed: tuple[Scope, ...]) -> Scope:
    if value not in [str(scope) for scope in allowed]:
        raise TriggerError(f"{where}: the scope must be one of {[str(scope) for scope in allowed]}")
    return Scope(value)


def _trigger(entry: Any, where: str) -> Trigger:
    if not isinstance(entry, dict) or set(entry) != {"resource", "operations", "scope"}:
        raise TriggerError(f"{where}: needs exactly `resource`, `operations` and `scope`")
    resource, operations = entry["resource"], entry["operations"]
    if not isinstance(resource, str) or not _NAME.match(resource):
        raise TriggerError(f"{where}: the resource must be a Keycloak resource type such as REALM_ROLE_MAPPING")
    if not isinstance(operations, list) or not operations or not all(op in OPERATIONS for op in operations):
        raise TriggerError(f"{where}: operations must be a non-empty list of {', '.join(OPERATIONS)}")
    return Trigger(resource, frozenset(operations), _scope(entry["scope"], where, tuple(Scope)))


def _user_trigger(entry: Any, where: str) -> UserTrigger:
    if not isinstance(entry, dict) or not {"type", "scope"} <= set(entry) <= {"type", "scope", "reason"}:
        raise TriggerError(f"{where}: needs `type` and `scope`, and may have `reason`, nothing else")
    if not isinstance(entry["type"], str) or not _NAME.match(entry["type"]):
        raise TriggerError(f"{where}: the type must be a Keycloak user event type such as LOGOUT")
    reason = entry.get("reason")
    if reason is not None and (not isinstance(reason, str) or not 0 < len(reason) <= MAX_REASON
                               or not reason.isprintable()):
        raise TriggerError(f"{where}: the reason must be Keycloak's text of the event's `details.reason`, "
                           f"1 to {MAX_REASON} printable characters")
    if reason is None and entry["type"].endswith("_ERROR"):
        # Anyone can make Keycloak record most errors (a made-up refresh token), and such an event names no user:
        # a trigger taking every one of them would revoke, for each, everyone's tokens (the fallback).
        raise TriggerError(f"{where}: an error event type ({entry['type']}) needs a `reason`: the one error it means")
    return UserTrigger(entry["type"], _scope(entry["scope"], where, (Scope.SESSION, Scope.USER)), reason)


def _placed(event: Mapping[str, Any], what: str) -> tuple[int, str]:
    moment, event_id = event.get("time"), event.get("id")
    if isinstance(moment, bool) or not isinstance(moment, int) or moment <= 0:
        raise ValueError(f"{what} without a time")
    if not isinstance(event_id, str) or not event_id:
        raise ValueError(f"{what} without an id")
    return moment, event_id


def revocation_of(event: Mapping[str, Any], triggers: Triggers) -> Revocation | None:
    """The revocation Keycloak admin EVENT (its JSON representation) makes, or None when no trigger matches it.
    An event without a time or an id cannot be placed: ValueError. An event whose path does not name what its
    trigger's scope needs (a user's, or a session's) revokes everyone's tokens: when in doubt, sign in again."""
    resource, operation = event.get("resourceType"), event.get("operationType")
    trigger = next((t for t in triggers.admin if t.resource == resource and operation in t.operations), None)
    if trigger is None:
        return None
    moment, event_id = _placed(event, f"an admin event ({resource} {operation})")
    cause = f"{resource} {operation}"
    if trigger.scope is Scope.EVERYONE:
        return Revocation(None, moment, cause, event_id)
    named = _PATHS[str(trigger.scope)].match(str(event.get("resourcePath") or ""))
    if named is None:
        return Revocation(None, moment, cause, event_id)
    if trigger.scope is Scope.SESSION:
        return Revocation(None, moment, cause, event_id, session=named.group(1))
    return Revocation(named.group(1), moment, cause, event_id)


def revocation_of_user_event(event: Mapping[str, Any], triggers: Triggers) -> Revocation | None:
    """The revocation Keycloak user EVENT makes, or None when no trigger matches it. A session trigger falls back to
    the user when the event names no well-formed session, and to everyone when it names no well-formed user; but an
    error event's trigger (one with a reason) never to everyone: to the refused token's user, or to nothing."""
    kind = event.get("type")
    trigger = next((t for t in triggers.user if t.matches(event)), None)
    if trigger is None:
        return None
    moment, event_id = _placed(event, f"a user event ({kind})")
    cause = f"user {kind}" if trigger.reason is None else f"user {kind}: {trigger.reason}"
    user, session = event.get("userId"), event.get("sessionId")
    subject = user if isinstance(user, str) and _ID.match(user) else None
    if trigger.scope is Scope.SESSION and isinstance(session, str) and _SESSION_ID.match(session):
        return Revocation(subject, moment, cause, event_id, session=session)
    if trigger.reason is not None and subject is None:
        # An error event (a refresh token's reuse) is anybody's to cause, again and again, and Keycloak records it
        # without a user id: falling back to everyone would let any holder of a refresh token end every token of the
        # realm. The user the refused token was issued to, when Keycloak names it; otherwise nothing.
        details = event.get("details")
        named = details.get("refresh_token_sub") if isinstance(details, Mapping) else None
        if not (isinstance(named, str) and _ID.match(named)):
            return None
        subject = named
    return Revocation(subject, moment, cause, event_id)
