"""Token revocation (bastion/revocations): Keycloak's admin events become revocations by infra/revocation-triggers.yaml,
the audit service publishes them, every service reads them into the tokens it refuses, failing closed."""

import datetime as dt
import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from confluent_kafka import KafkaError, KafkaException
from keycloak.exceptions import KeycloakGetError
from prometheus_client import REGISTRY
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from structlog.testing import capture_logs

from bastion.access.v1.decision_pb2 import AccessRevoked, EventRejected, RevocationsCurrent
from bastion.devstack.event_access import load_policy
from bastion.events.consumer import SECURITY_TOPIC, rejection_recorder
from bastion.events.envelopes import bundle_of, seal
from bastion.events.keys import KeyRing
from bastion.events.outbox import Outbox
from bastion.events.storage import outbox
from bastion.events.trust import load_trust_policy
from bastion.events.v1.envelope_pb2 import Envelope
from bastion.events.verify import EnvelopeVerifier
from bastion.grpc.tokens import AuthenticationError, AuthReason, Principal
from bastion.revocations.feed import TOPIC, UNKNOWN_KEY_RETRY_SECONDS, RevocationFeed
from bastion.revocations.revoked import COMMIT_MARGIN_SECONDS, PRUNE_EVERY_SECONDS, RevokedTokens
from bastion.revocations.triggers import (
    Revocation,
    Scope,
    TriggerError,
    load_triggers,
    revocation_of,
    revocation_of_user_event,
)
from bastion.revocations.watcher import (
    ERROR_EVENTS_WORTH_SECONDS,
    ERROR_PAGES,
    ERROR_READ_SECONDS,
    MAX_FRESH,
    PAGE,
    RECORDING_CHECK_SECONDS,
    AdminEventsNotRecordedError,
    AdminEventsRefusedError,
    RevocationWatcher,
    UserEventsNotRecordedError,
    keycloak_events,
)
from tests.unit.test_consumer import BUNDLED, Record
from tests.unit.test_event_verification import INFRA, SERVICES
from tests.unit.test_outbox import events_database

TRIGGERS = load_triggers(INFRA / "revocation-triggers.yaml")
USER = "41c0a279-2dde-4129-b01a-8a99fd57a8e8"
NOW = 1_800_000_000.0


def admin_event(resource: str, operation: str, path: str, moment_ms: int = int(NOW * 1000),
                event_id: str = "0b91a6a6-41ac-4e00-b91c-e079c0bb1d37") -> dict[str, Any]:
    return {"id": event_id, "time": moment_ms, "operationType": operation, "resourceType": resource,
            "resourcePath": path, "realmId": "r", "authDetails": {"userId": "admin"}}


def principal(subject: str = USER, issued_at: int = int(NOW) - 10, session: str | None = None) -> Principal:
    return Principal(subject, "rita", "bastion-cli", frozenset({"customer"}), "jti", issued_at + 300, issued_at,
                     session)


# --- the triggers ---

def test_taking_a_role_away_revokes_that_users_tokens_and_giving_one_revokes_nothing() -> None:
    taken = revocation_of(admin_event("REALM_ROLE_MAPPING", "DELETE", f"users/{USER}/role-mappings/realm"), TRIGGERS)
    assert taken == Revocation(USER, int(NOW * 1000), "REALM_ROLE_MAPPING DELETE",
                               "0b91a6a6-41ac-4e00-b91c-e079c0bb1d37")
    assert revocation_of(admin_event("REALM_ROLE_MAPPING", "CREATE", f"users/{USER}/role-mappings/realm"),
                         TRIGGERS) is None
    assert revocation_of(admin_event("USER", "CREATE", f"users/{USER}"), TRIGGERS) is None
    assert revocation_of(admin_event("CLIENT", "CREATE", "clients/x"), TRIGGERS) is None


@pytest.mark.parametrize(("resource", "operation", "path"), [
    ("USER", "UPDATE", f"users/{USER}"),  # disabled
    ("USER", "DELETE", f"users/{USER}"),
    ("USER", "ACTION", f"users/{USER}/logout"),
    ("CLIENT_ROLE_MAPPING", "DELETE", f"users/{USER}/role-mappings/clients/c1"),
    ("GROUP_MEMBERSHIP", "DELETE", f"users/{USER}/groups/g1"),
])
def test_each_change_that_takes_a_users_access_away_revokes_their_tokens(resource: str, operation: str,
                                                                          path: str) -> None:
    revocation = revocation_of(admin_event(resource, operation, path), TRIGGERS)
    assert revocation is not None and revocation.subject == USER


@pytest.mark.parametrize(("resource", "operation", "path"), [
    ("REALM_ROLE", "DELETE", "roles-by-id/r1"),
    ("REALM_ROLE", "UPDATE", "roles-by-id/r1/composites"),
    ("GROUP", "DELETE", "groups/g1"),
    ("REALM", "ACTION", "logout-all"),
    # What reaches a client's tokens: its scope mappings (no full scope), its mappers (audiences), the client.
    ("REALM_SCOPE_MAPPING", "DELETE", "clients/c1/scope-mappings/realm"),
    ("CLIENT_SCOPE_MAPPING", "DELETE", "clients/c1/scope-mappings/clients/c2"),
    ("PROTOCOL_MAPPER", "DELETE", "clients/c1/protocol-mappers/models/m1"),
    ("CLIENT", "UPDATE", "clients/c1"),  # disabled
    ("CLIENT", "ACTION", "clients/c1/client-secret"),  # its secret regenerated
    # A user's trigger whose path names no user (a group's role mappings): everyone, the safe side.
    ("REALM_ROLE_MAPPING", "DELETE", "groups/g1/role-mappings/realm"),
    ("USER", "UPDATE", "users/not-a-user-id"),
])
def test_a_change_whose_reach_is_not_one_user_revokes_everyones_tokens(resource: str, operation: str,
                                                                       path: str) -> None:
    revocation = revocation_of(admin_event(resource, operation, path), TRIGGERS)
    assert revocation is not None and revocation.subject is None
    assert revocation.message().everyone and not revocation.message().subject


def test_an_admin_event_without_an_id_or_a_time_cannot_be_placed() -> None:
    for broken in ({"id": ""}, {"time": None}, {"time": True}, {"time": 0}):
        event = {**admin_event("USER", "DELETE", f"users/{USER}"), **broken}
        with pytest.raises(ValueError, match="without"):
            revocation_of(event, TRIGGERS)


def test_one_keycloak_event_is_one_revocation_however_often_it_is_published() -> None:
    first = revocation_of(admin_event("USER", "DELETE", f"users/{USER}"), TRIGGERS)
    again = revocation_of(admin_event("USER", "DELETE", f"users/{USER}"), TRIGGERS)
    other = revocation_of(admin_event("USER", "DELETE", f"users/{USER}", event_id="another"), TRIGGERS)
    assert first is not None and again is not None and other is not None
    assert first.event_id == again.event_id != other.event_id
    message = first.message()
    assert (message.subject, message.revoked_at.ToMilliseconds(), message.cause) == (
        USER, int(NOW * 1000), "USER DELETE")


ADMIN = "admin_events: [{resource: USER, operations: [DELETE], scope: user}]"


@pytest.mark.parametrize(("text", "complaint"), [
    ("triggers: []", "exactly `admin_events` and `user_events`"),
    (f"{ADMIN}", "exactly `admin_events` and `user_events`"),
    ("admin_events: []\nuser_events: []", "`admin_events` must be a non-empty list"),
    (f"{ADMIN}\nuser_events: {{}}", "`user_events` must be a list"),
    ("admin_events: [{resource: USER, operations: [DELETE]}]\nuser_events: []",
     "exactly `resource`, `operations` and `scope`"),
    ("admin_events: [{resource: user, operations: [DELETE], scope: user}]\nuser_events: []",
     "Keycloak resource type"),
    ("admin_events: [{resource: USER, operations: [], scope: user}]\nuser_events: []", "non-empty list"),
    ("admin_events: [{resource: USER, operations: [READ], scope: user}]\nuser_events: []", "non-empty list"),
    ("admin_events: [{resource: USER, operations: [DELETE], scope: someone}]\nuser_events: []",
     "the scope must be one of"),
    ("admin_events: [{resource: USER, operations: [DELETE], scope: user}, {resource: USER, operations: [UPDATE], "
     "scope: user}]\nuser_events: []", "more than once"),
    (f"{ADMIN}\nuser_events: [{{type: LOGOUT}}]", "needs `type` and `scope`"),
    (f"{ADMIN}\nuser_events: [{{type: LOGOUT, scope: session, error: x}}]", "nothing else"),
    (f"{ADMIN}\nuser_events: [{{type: LOGOUT, scope: session, reason: ''}}]", "the reason must be"),
    (f"{ADMIN}\nuser_events: [{{type: REFRESH_TOKEN_ERROR, scope: session}}]", "needs a `reason`"),
    (f"{ADMIN}\nuser_events: [{{type: LOGOUT, scope: session, reason: [x]}}]", "the reason must be"),
    (f"{ADMIN}\nuser_events: [{{type: X, scope: session, reason: a}}, {{type: X, scope: user, reason: a}}]",
     "more than once"),
    (f"{ADMIN}\nuser_events: [{{type: logout, scope: session}}]", "user event type"),
    (f"{ADMIN}\nuser_events: [{{type: LOGOUT, scope: everyone}}]", "the scope must be one of"),
    (f"{ADMIN}\nuser_events: [{{type: LOGOUT, scope: session}}, {{type: LOGOUT, scope: user}}]", "more than once"),
    ("admin_events: [", "cannot be read"),
])
def test_a_wrong_triggers_file_is_refused_naming_the_problem(tmp_path: Path, text: str, complaint: str) -> None:
    path = tmp_path / "triggers.yaml"
    path.write_text(text)
    with pytest.raises(TriggerError, match=complaint):
        load_triggers(path)


def test_the_shipped_triggers_cover_what_takes_access_away() -> None:
    by_resource = {trigger.resource: trigger for trigger in TRIGGERS.admin}
    assert by_resource["REALM_ROLE_MAPPING"].scope is Scope.USER
    assert "DELETE" in by_resource["REALM_ROLE_MAPPING"].operations
    assert {"UPDATE", "DELETE", "ACTION"} <= by_resource["USER"].operations
    assert by_resource["REALM"].scope is Scope.EVERYONE
    assert by_resource["USER_SESSION"].scope is Scope.SESSION
    assert all("CREATE" not in trigger.operations for trigger in TRIGGERS.admin)
    assert [(trigger.type, trigger.scope, trigger.reason) for trigger in TRIGGERS.user] == [
        ("LOGOUT", Scope.SESSION, None),
        ("REFRESH_TOKEN_ERROR", Scope.SESSION, "Maximum allowed refresh token reuse exceeded")]


SESSION = "9eebb993-e64d-cb7f-e14c-20cd5b284900"


def user_event(kind: str = "LOGOUT", user: Any = USER, session: Any = SESSION, event_id: str = "u1",
               moment_ms: int = int(NOW * 1000)) -> dict[str, Any]:
    return {"id": event_id, "time": moment_ms, "type": kind, "realmId": "r", "clientId": "bastion-cli",
            "userId": user, "sessionId": session}


def test_a_users_own_sign_out_revokes_that_session_and_other_user_events_nothing() -> None:
    signed_out = revocation_of_user_event(user_event(), TRIGGERS)
    assert signed_out == Revocation(USER, int(NOW * 1000), "user LOGOUT", "u1", session=SESSION)
    assert signed_out is not None and signed_out.message().session_id == SESSION
    assert not signed_out.everyone and not signed_out.message().everyone
    assert revocation_of_user_event(user_event("LOGIN"), TRIGGERS) is None
    # No well-formed session: the user's tokens; no well-formed user either: everyone's.
    assert revocation_of_user_event(user_event(session=None), TRIGGERS) == Revocation(
        USER, int(NOW * 1000), "user LOGOUT", "u1")
    fallback = revocation_of_user_event(user_event(user="x", session="../x"), TRIGGERS)
    assert fallback is not None and fallback.everyone
    with pytest.raises(ValueError, match="a user event \\(LOGOUT\\) without an id"):
        revocation_of_user_event(user_event(event_id=""), TRIGGERS)


def refresh_error(reason: str, session: Any = SESSION) -> dict[str, Any]:
    """A refresh refused, as Keycloak 26 records it: no user id, the session and the refresh token's subject in it."""
    return {**user_event("REFRESH_TOKEN_ERROR", user=None, session=session, event_id="r1"), "error": "invalid_token",
            "details": {"reason": reason, "grant_type": "refresh_token", "refresh_token_sub": USER}}


def test_a_refresh_token_used_twice_revokes_its_session_and_other_refresh_errors_nothing() -> None:
    reused = revocation_of_user_event(refresh_error("Maximum allowed refresh token reuse exceeded"), TRIGGERS)
    assert reused == Revocation(None, int(NOW * 1000), "user REFRESH_TOKEN_ERROR: Maximum allowed refresh token reuse "
                                "exceeded", "r1", session=SESSION)
    assert reused is not None and not reused.everyone
    # A refresh token Keycloak never issued (anyone may send one), or one of a session already detached: not a theft
    # Keycloak detected, so nothing is revoked (and above all not everyone's tokens, for want of a user).
    for other in ("Invalid refresh token", "Session doesn't have required client", "Token is not active"):
        assert revocation_of_user_event(refresh_error(other), TRIGGERS) is None, other
        assert revocation_of_user_event(refresh_error(other, session=None), TRIGGERS) is None, other
    without_details = {**refresh_error("x"), "details": None}
    assert revocation_of_user_event(without_details, TRIGGERS) is None


def test_a_session_id_of_a_later_keycloak_base64url_not_a_uuid_is_still_one_session() -> None:
    later = "k3J9xQ_2vLm8-ZpR4tYw0aBc"
    signed_out = revocation_of_user_event(user_event(session=later), TRIGGERS)
    assert signed_out is not None and signed_out.session == later
    ended = revocation_of(admin_event("USER_SESSION", "DELETE", f"sessions/{later}"), TRIGGERS)
    assert ended is not None and ended.session == later
    for odd in ("short", "has/slash", "x" * 65, "with space in it!"):
        assert revocation_of_user_event(user_event(session=odd), TRIGGERS) == Revocation(
            USER, int(NOW * 1000), "user LOGOUT", "u1")


def test_a_session_an_admin_ends_is_revoked_and_one_not_named_revokes_everyone() -> None:
    ended = revocation_of(admin_event("USER_SESSION", "DELETE", f"sessions/{SESSION}"), TRIGGERS)
    assert ended is not None and (ended.session, ended.subject) == (SESSION, None)
    unnamed = revocation_of(admin_event("USER_SESSION", "DELETE", "sessions/"), TRIGGERS)
    assert unnamed is not None and unnamed.everyone


# --- the tokens a service refuses ---

class Clocks:
    def __init__(self) -> None:
        self.wall, self.monotonic = NOW, 100.0


@pytest.fixture()
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture()
def revoked(clocks: Clocks) -> RevokedTokens:
    tokens = RevokedTokens(keep_seconds=360, max_staleness_seconds=30, max_watch_silence_seconds=60,
                           clock=lambda: clocks.wall, monotonic=lambda: clocks.monotonic)
    tokens.confirm_current(clocks.monotonic)
    tokens.watched(int(clocks.wall * 1000))
    return tokens


def refusal(revoked: RevokedTokens, who: Principal) -> AuthReason | None:
    try:
        revoked.check(who)
    except AuthenticationError as error:
        return error.reason
    return None


def test_a_token_issued_before_its_subject_was_revoked_is_refused_and_a_later_one_is_not(
        revoked: RevokedTokens) -> None:
    assert refusal(revoked, principal()) is None
    revoked.revoke(USER, int(NOW * 1000) + 400)  # 0.4 s into the second NOW
    assert refusal(revoked, principal(issued_at=int(NOW) - 10)) == AuthReason.REVOKED
    # `iat` counts whole seconds, and Keycloak stamps the change before it commits: a token of the same second, or
    # of the two after it, may carry what the change took away, so it is refused too.
    assert refusal(revoked, principal(issued_at=int(NOW))) == AuthReason.REVOKED
    assert refusal(revoked, principal(issued_at=int(NOW) + COMMIT_MARGIN_SECONDS)) == AuthReason.REVOKED
    assert refusal(revoked, principal(issued_at=int(NOW) + COMMIT_MARGIN_SECONDS + 1)) is None
    assert refusal(revoked, principal(subject="someone-else")) is None


def test_a_revocation_of_everyone_ends_every_token_issued_before_it(revoked: RevokedTokens) -> None:
    revoked.revoke(None, int(NOW * 1000))
    assert refusal(revoked, principal()) == AuthReason.REVOKED
    assert refusal(revoked, principal(subject="someone-else")) == AuthReason.REVOKED
    assert refusal(revoked, principal(subject="someone-else", issued_at=int(NOW) + COMMIT_MARGIN_SECONDS + 1)) is None


def test_an_older_revocation_read_later_does_not_undo_a_newer_one(revoked: RevokedTokens) -> None:
    revoked.revoke(USER, int(NOW * 1000))
    revoked.revoke(USER, int(NOW * 1000) - 60_000)  # a replay, or the lookback read again after a restart
    assert refusal(revoked, principal(issued_at=int(NOW) - 10)) == AuthReason.REVOKED


def test_tokens_are_refused_until_the_revocations_were_read_and_when_they_were_not_read_lately(
        clocks: Clocks) -> None:
    tokens = RevokedTokens(keep_seconds=360, max_staleness_seconds=30, max_watch_silence_seconds=60,
                           clock=lambda: clocks.wall, monotonic=lambda: clocks.monotonic)
    tokens.watched(int(clocks.wall * 1000))
    assert refusal(tokens, principal()) == AuthReason.REVOCATIONS_UNAVAILABLE
    assert not tokens.is_current()
    tokens.confirm_current(clocks.monotonic)
    assert refusal(tokens, principal()) is None and tokens.is_current()
    clocks.monotonic += 30
    assert refusal(tokens, principal()) is None
    clocks.monotonic += 0.5
    with pytest.raises(AuthenticationError, match="last read 30 s ago"):
        tokens.check(principal())
    assert not tokens.is_current()
    tokens.confirm_current(clocks.monotonic - 100)  # an older confirmation does not move it back
    assert refusal(tokens, principal()) == AuthReason.REVOCATIONS_UNAVAILABLE
    tokens.confirm_current(clocks.monotonic)
    assert refusal(tokens, principal()) is None


def test_tokens_are_refused_until_the_realms_watch_was_heard_from_and_once_it_has_been_silent_a_minute(
        clocks: Clocks) -> None:
    """The feed read to its end says nothing was revoked only if the audit service's watch on the realm is alive: a
    watch that stopped (the audit service down, Keycloak refusing it) must not read as "nothing revoked"."""
    tokens = RevokedTokens(keep_seconds=360, max_staleness_seconds=30, max_watch_silence_seconds=60,
                           clock=lambda: clocks.wall, monotonic=lambda: clocks.monotonic)
    tokens.confirm_current(clocks.monotonic)
    with pytest.raises(AuthenticationError, match=r"the realm's watch \(the audit service\) has not been heard from"):
        tokens.check(principal())
    assert not tokens.is_current()
    assert tokens.watched(int(clocks.wall * 1000) - 5_000) == clocks.wall - 5
    assert refusal(tokens, principal()) is None and tokens.is_current()
    clocks.wall += 55
    clocks.monotonic += 20
    tokens.confirm_current(clocks.monotonic)  # the topic is read to its end all along: nothing new on it
    assert refusal(tokens, principal()) is None
    clocks.wall += 1
    with pytest.raises(AuthenticationError, match=r"the realm's watch .* was last heard from 61 s ago"):
        tokens.check(principal())
    assert not tokens.is_current()
    # An older word read again (the lookback after a restart, or a replay) neither moves it back nor keeps a silent
    # watch alive.
    assert tokens.watched(int(NOW * 1000) - 30_000) == NOW - 5
    assert refusal(tokens, principal()) == AuthReason.REVOCATIONS_UNAVAILABLE
    tokens.watched(int(clocks.wall * 1000))
    assert refusal(tokens, principal()) is None and tokens.is_current()


def test_a_silent_watch_is_found_out_a_minute_on_whatever_the_services_wall_clock_says(clocks: Clocks) -> None:
    """The watch's word is dated by the audit service's clock (capped at the broker's): a service whose own clock is
    behind, or is set back meanwhile (NTP stepping it), would otherwise take a watch that died for alive for as long
    as its clock lags."""
    tokens = RevokedTokens(keep_seconds=360, max_staleness_seconds=30, max_watch_silence_seconds=60,
                           clock=lambda: clocks.wall, monotonic=lambda: clocks.monotonic)
    tokens.watched(int(clocks.wall * 1000))
    clocks.wall -= 120  # the service's clock set back two minutes
    for _ in range(6):  # the feed keeps reading the topic to its end: nothing new on it, the watch is silent
        clocks.monotonic += 10
        clocks.wall += 10
        tokens.confirm_current(clocks.monotonic)
    assert refusal(tokens, principal()) is None
    clocks.monotonic += 1
    clocks.wall += 1
    tokens.confirm_current(clocks.monotonic)
    with pytest.raises(AuthenticationError, match=r"the realm's watch .* was last heard from 61 s ago"):
        tokens.check(principal())
    assert not tokens.is_current()
    tokens.watched(int(clocks.wall * 1000) - 5_000)  # an older word does not count as heard again
    assert refusal(tokens, principal()) == AuthReason.REVOCATIONS_UNAVAILABLE
    tokens.watched(int(NOW * 1000) + 70_000)  # the watch speaks again
    assert refusal(tokens, principal()) is None


def test_every_token_of_an_ended_session_is_refused_whenever_it_was_issued_and_other_sessions_are_not(
        revoked: RevokedTokens) -> None:
    revoked.revoke(USER, int(NOW * 1000), session=SESSION)
    assert refusal(revoked, principal(session=SESSION)) == AuthReason.REVOKED
    assert refusal(revoked, principal(session=SESSION, issued_at=int(NOW) + 60)) == AuthReason.REVOKED
    assert refusal(revoked, principal(session="another-session")) is None
    assert refusal(revoked, principal()) is None  # a token without a session, of the same user
    with pytest.raises(AuthenticationError, match="the session this token was issued in has ended"):
        revoked.check(principal(session=SESSION))


def test_revocations_are_forgotten_once_every_token_they_end_has_expired(revoked: RevokedTokens,
                                                                        clocks: Clocks) -> None:
    for number in range(100):
        revoked.revoke(f"user-{number}", int(NOW * 1000))
        revoked.revoke(f"user-{number}", int(NOW * 1000), session=f"session-{number}")
    assert len(revoked) == 200
    clocks.wall += 360 + COMMIT_MARGIN_SECONDS
    revoked.revoke(USER, int(clocks.wall * 1000))
    assert len(revoked) == 201  # a token they end may still be accepted (issued in the margin, within the leeway)
    clocks.wall += 1
    revoked.revoke(USER, int(clocks.wall * 1000))
    assert len(revoked) == 1


def test_expired_revocations_are_looked_for_at_most_once_a_second_however_many_arrive(
        revoked: RevokedTokens, clocks: Clocks) -> None:
    revoked.revoke("first", int(clocks.wall * 1000))  # looks for expired ones now
    stale = int((clocks.wall - 1_000) * 1000)
    clocks.wall += 0.5
    for number in range(100):  # a burst within the second: no scan for each
        revoked.revoke(f"stale-{number}", stale)
    assert len(revoked) == 101
    clocks.wall += PRUNE_EVERY_SECONDS
    revoked.revoke("next", int(clocks.wall * 1000))
    assert len(revoked) == 2


# --- the feed every service reads ---

class Partitions:
    """Stands in for confluent_kafka's Consumer on the one-partition revocations topic."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.queued: list[Record] = []
        self.end = 0
        self.assigned: list[Any] = []
        self.unreachable = False

    def list_topics(self, topic: str, timeout: float) -> Any:
        partition = type("Partition", (), {})()
        metadata = type("Topic", (), {"error": None, "partitions": {0: partition}})()
        return type("Metadata", (), {"topics": {topic: metadata}})()

    def offsets_for_times(self, wanted: list[Any], timeout: float) -> list[Any]:
        self.asked_since = wanted[0].offset
        return [type("Start", (), {"partition": 0, "offset": 3, "error": None})()]

    def get_watermark_offsets(self, partition: Any, timeout: float) -> tuple[int, int]:
        if self.unreachable:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        return 0, self.end

    def assign(self, partitions: list[Any]) -> None:
        self.assigned = partitions

    def poll(self, timeout: float) -> Record | None:
        return self.queued.pop(0) if self.queued else None

    def close(self) -> None:
        pass


class OnPartitionZero(Record):
    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return 0


def revocation_record(ring: KeyRing, offset: int, producer: str = "audit", subject: str = USER,
                      everyone: bool = False, revoked_at: dt.datetime | None = None,
                      session: str = "") -> OnPartitionZero:
    payload = AccessRevoked(subject=subject, everyone=everyone, cause="USER DELETE", keycloak_event_id="k1",
                            session_id=session)
    payload.revoked_at.FromDatetime(revoked_at or dt.datetime.now(dt.UTC))
    envelope = seal(ring.signing_key(producer), TOPIC, payload, aggregate_id=subject or "everyone",
                    sequence=offset + 1, correlation_id="keycloak-k1")
    return OnPartitionZero(envelope.SerializeToString(), offset)


def unwatched_feed(ring: KeyRing) -> tuple[RevocationFeed, Partitions, RevokedTokens]:
    """accounts' feed over a stand-in topic, the audit service's and accounts' real keys and the shipped policies;
    nothing heard from the realm's watch yet."""
    access = load_policy(INFRA / "event-access.yaml", SERVICES)
    verifier = EnvelopeVerifier(ring.trust_store(), load_trust_policy(INFRA / "event-trust.yaml", access))
    revoked = RevokedTokens(keep_seconds=360, max_staleness_seconds=30, max_watch_silence_seconds=60)
    made: list[Partitions] = []

    def make(config: dict[str, Any]) -> Partitions:
        made.append(Partitions(config))
        return made[0]

    reader = RevocationFeed("accounts", {"bootstrap.servers": "x"}, "accounts-revocations", verifier, revoked, 360,
                            check_every_seconds=0.0, make_consumer=make)
    return reader, made[0], revoked


@pytest.fixture()
def feed(ring: KeyRing) -> tuple[RevocationFeed, Partitions, RevokedTokens]:
    reader, kafka, revoked = unwatched_feed(ring)
    revoked.watched(int(time.time() * 1000))  # the watch's word read: the tests using this are about revocations
    return reader, kafka, revoked


def rejected(reason: str) -> float:
    return REGISTRY.get_sample_value("bastion_events_rejected_total",
                                     {"consumer": "accounts", "topic": TOPIC, "reason": reason}) or 0.0


def assert_refused_and_counted(reader: RevocationFeed, kafka: Partitions, record: OnPartitionZero,
                               reason: str) -> None:
    """RECORD, the topic's last, is read, refused for REASON, logged and counted."""
    before = rejected(reason)
    kafka.queued, kafka.end = [record], 4
    with capture_logs() as logs:
        run_until_read(reader)
    assert rejected(reason) == before + 1
    assert [entry["reason"] for entry in logs if entry["event"] == "revocation_refused"] == [reason]


def run_until_read(reader: RevocationFeed) -> None:
    stop = threading.Event()
    kafka: Any = reader._consumer
    original = kafka.poll

    def poll_then_stop(timeout: float) -> Record | None:
        record = original(timeout)
        if record is None:
            stop.set()
        return record

    kafka.poll = poll_then_stop
    reader.run(stop)


def test_the_feed_reads_from_the_lookback_and_applies_the_audit_services_signed_revocations(
        feed: tuple[RevocationFeed, Partitions, RevokedTokens], ring: KeyRing) -> None:
    reader, kafka, revoked = feed
    assert kafka.config["group.id"] == "accounts-revocations" and kafka.config["enable.auto.commit"] is False
    kafka.queued, kafka.end = [revocation_record(ring, 3)], 4
    run_until_read(reader)
    assert [(p.topic, p.partition, p.offset) for p in kafka.assigned] == [(TOPIC, 0, 3)]
    assert refusal(revoked, principal(issued_at=int(dt.datetime.now(dt.UTC).timestamp()) - 5)) == AuthReason.REVOKED


def test_the_feed_applies_an_ended_session_to_that_sessions_tokens_only(
        feed: tuple[RevocationFeed, Partitions, RevokedTokens], ring: KeyRing) -> None:
    reader, kafka, revoked = feed
    kafka.queued, kafka.end = [revocation_record(ring, 3, subject="", session=SESSION)], 4
    run_until_read(reader)
    now = int(dt.datetime.now(dt.UTC).timestamp())
    assert refusal(revoked, principal(issued_at=now - 5, session=SESSION)) == AuthReason.REVOKED
    assert refusal(revoked, principal(issued_at=now - 5, session="another")) is None
    assert refusal(revoked, principal(issued_at=now - 5)) is None


def test_the_feed_confirms_the_set_only_once_it_has_read_to_the_topics_end(
        feed: tuple[RevocationFeed, Partitions, RevokedTokens], ring: KeyRing) -> None:
    reader, kafka, revoked = feed
    kafka.end = 5  # two records the broker holds that the reader has not had yet
    kafka.queued = [revocation_record(ring, 3)]
    run_until_read(reader)
    assert not revoked.is_current()
    kafka.queued = [revocation_record(ring, 4, subject="another")]
    run_until_read(reader)
    assert revoked.is_current()
    kafka.unreachable = True  # the broker cannot be asked: the set is not confirmed again, it ages
    with capture_logs() as logs:
        reader._confirm_if_read_to_end(10**9)
    assert [entry["event"] for entry in logs] == ["revocation_feed_unconfirmed"]


@pytest.mark.parametrize(("forge", "reason"), [
    ("accounts", "not_authorised"),  # a validly signed service that may not revoke
    ("tampered", "bad_signature"),
    ("both", "malformed"),  # a subject and everyone
    ("session-and-everyone", "malformed"),
    ("neither", "malformed"),
])
def test_a_revocation_the_pipeline_refuses_changes_nothing_and_is_counted(
        feed: tuple[RevocationFeed, Partitions, RevokedTokens], ring: KeyRing, forge: str, reason: str) -> None:
    reader, kafka, revoked = feed
    if forge == "accounts":
        record = revocation_record(ring, 3, producer="accounts")
    elif forge == "both":
        record = revocation_record(ring, 3, everyone=True)
    elif forge == "session-and-everyone":
        record = revocation_record(ring, 3, subject="", everyone=True, session=SESSION)
    elif forge == "neither":
        record = revocation_record(ring, 3, subject="")
    else:
        record = revocation_record(ring, 3)
        record._value = (record.value() or b"").replace(USER.encode(), USER.replace("4", "5").encode())
    assert_refused_and_counted(reader, kafka, record, reason)
    assert refusal(revoked, principal()) is None
    assert revoked.is_current()  # refused, but read: the feed goes on


def test_a_revocation_dated_ahead_of_the_broker_counts_as_dated_a_minute_after_it(
        feed: tuple[RevocationFeed, Partitions, RevokedTokens], ring: KeyRing) -> None:
    reader, kafka, revoked = feed
    now = dt.datetime.now(dt.UTC)
    kafka.queued, kafka.end = [revocation_record(ring, 3, revoked_at=now + dt.timedelta(days=365))], 4
    with capture_logs() as logs:
        run_until_read(reader)
    assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == ["revocation_dated_ahead"]
    issued = int(now.timestamp())
    assert refusal(revoked, principal(issued_at=issued + 30)) == AuthReason.REVOKED  # never dropped: fail closed
    assert refusal(revoked, principal(issued_at=issued + 120)) is None  # nor a year of lock-out


def current_record(ring: KeyRing, offset: int, as_of: dt.datetime | None, producer: str = "audit",
                   appended: dt.datetime | None = None) -> OnPartitionZero:
    current = RevocationsCurrent()
    if as_of is not None:
        current.as_of.FromDatetime(as_of)
    envelope = seal(ring.signing_key(producer), TOPIC, current, aggregate_id="realm-watch", sequence=offset + 1,
                    correlation_id="revocation-watch")
    return OnPartitionZero(envelope.SerializeToString(), offset, appended=appended)


def watched_gauge() -> float | None:
    return REGISTRY.get_sample_value("bastion_revocations_watched_until_seconds", {"consumer": "accounts"})


def test_the_feed_takes_the_watchs_word_that_it_is_current_never_dated_after_the_broker_took_it(
        ring: KeyRing) -> None:
    reader, kafka, revoked = unwatched_feed(ring)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    kafka.queued, kafka.end = [current_record(ring, 3, now - dt.timedelta(seconds=3), appended=now)], 4
    run_until_read(reader)
    assert revoked.is_current() and refusal(revoked, principal(issued_at=int(now.timestamp()))) is None
    assert watched_gauge() == now.timestamp() - 3
    # Dated a day ahead of the broker: taken as of the broker's time, or a watch that died would stay "alive".
    kafka.queued, kafka.end = [current_record(ring, 4, now + dt.timedelta(days=1), appended=now)], 5
    run_until_read(reader)
    assert watched_gauge() == now.timestamp()
    assert revoked.watched(0) == now.timestamp()


@pytest.mark.parametrize(("forge", "reason"), [
    ("accounts", "not_authorised"),  # a validly signed service that may not speak for the watch
    ("tampered", "bad_signature"),
    ("undated", "malformed"),
])
def test_a_word_of_the_watch_the_pipeline_refuses_keeps_nothing_alive(ring: KeyRing, forge: str,
                                                                      reason: str) -> None:
    reader, kafka, revoked = unwatched_feed(ring)
    now = dt.datetime.now(dt.UTC)
    record = current_record(ring, 3, None if forge == "undated" else now,
                            producer="accounts" if forge == "accounts" else "audit")
    if forge == "tampered":
        record._value = (record.value() or b"").replace(b"realm-watch", b"realm-watcH")
    assert_refused_and_counted(reader, kafka, record, reason)
    with pytest.raises(AuthenticationError, match="has not been heard from"):
        revoked.check(principal())


def security_records(engine: Any) -> list[tuple[Envelope, EventRejected]]:
    with engine.connect() as conn:
        rows = conn.execute(select(outbox.c.envelope).where(outbox.c.topic == SECURITY_TOPIC)
                            .order_by(outbox.c.id)).scalars()
        envelopes = [Envelope.FromString(row) for row in rows]
    return [(envelope, EventRejected.FromString(envelope.payload)) for envelope in envelopes]


def test_a_refused_revocation_becomes_the_services_signed_security_record_once_however_often_it_is_read(
        feed: tuple[RevocationFeed, Partitions, RevokedTokens], ring: KeyRing) -> None:
    """As a verifying consumer's refusals do, so that the audit log (and its alert rules) see a forged revocation,
    not only the service's log and counters; read again (the lookback after a restart), it is recorded once."""
    reader, kafka, _ = feed
    engine = events_database()
    reader.record_refusals = rejection_recorder(engine, Outbox(ring.signing_key("accounts")), "accounts")
    forged = revocation_record(ring, 3, producer="payments")
    kafka.queued, kafka.end = [forged], 4
    run_until_read(reader)
    reader.take(forged)
    [(envelope, record)] = security_records(engine)
    assert (envelope.producer, envelope.topic) == ("accounts", SECURITY_TOPIC)
    assert (record.consumer, record.topic, record.partition, record.offset) == ("accounts", TOPIC, 0, 3)
    assert (record.reason, record.claimed_producer, record.correlation_id) == ("not_authorised", "payments",
                                                                               "keycloak-k1")


def test_the_refused_envelope_of_a_bundle_is_recorded_alone_and_the_others_applied(
        feed: tuple[RevocationFeed, Partitions, RevokedTokens], ring: KeyRing) -> None:
    reader, kafka, revoked = feed
    engine = events_database()
    reader.record_refusals = rejection_recorder(engine, Outbox(ring.signing_key("accounts")), "accounts")
    now = dt.datetime.now(dt.UTC)
    key = ring.signing_key("audit")
    members = []
    for subject, everyone in ((USER, False), ("someone", True)):  # the second names a subject and everyone
        payload = AccessRevoked(subject=subject, everyone=everyone, cause="USER DELETE", keycloak_event_id="k1")
        payload.revoked_at.FromDatetime(now)
        members.append(seal(key, TOPIC, payload, aggregate_id=subject, sequence=1, correlation_id="keycloak-k1"))
    record = OnPartitionZero(bundle_of(members, key, now).SerializeToString(), 3, headers=BUNDLED)
    kafka.queued, kafka.end = [record], 4
    run_until_read(reader)
    assert refusal(revoked, principal(issued_at=int(now.timestamp()) - 5)) == AuthReason.REVOKED
    assert refusal(revoked, principal(subject="another", issued_at=int(now.timestamp()) - 5)) is None
    [(_, rejected_alone)] = security_records(engine)
    assert (rejected_alone.item, rejected_alone.reason, rejected_alone.offset) == (1, "malformed", 3)


def test_a_refusal_that_cannot_be_recorded_makes_the_worker_again(
        feed: tuple[RevocationFeed, Partitions, RevokedTokens], ring: KeyRing) -> None:
    reader, _, _ = feed

    def database_away(message: Any, refusals: list[Any]) -> None:
        raise OperationalError("INSERT", {}, Exception("connection refused"))

    reader.record_refusals = database_away
    with pytest.raises(OperationalError):  # made again, it reads the lookback and records it then
        reader.take(revocation_record(ring, 3, producer="payments"))


class LateTrust:
    """The trust store as a service sees it right after a producer rotated its key: the new key only once this
    service has looked at the file again (asking again at once was spent on something else lately)."""

    def __init__(self, before: Any, after: Any) -> None:
        self.before, self.after, self.known = before, after, False

    def current(self) -> Any:
        return self.after if self.known else self.before

    def reload(self) -> Any:
        return self.current()


def feed_after_rotation(ring: KeyRing, producer: str) -> tuple[RevocationFeed, Partitions, RevokedTokens,
                                                                LateTrust, list[float], list[Any]]:
    """accounts' feed whose trust store does not know PRODUCER's key yet, on a clock the test moves, recording
    refusals in a list."""
    before = ring.trust_store()
    ring.rotate(producer)
    trust = LateTrust(before, ring.trust_store())
    access = load_policy(INFRA / "event-access.yaml", SERVICES)
    verifier = EnvelopeVerifier(trust, load_trust_policy(INFRA / "event-trust.yaml", access))
    clock, recorded, kafka = [100.0], list[Any](), Partitions({})
    revoked = RevokedTokens(keep_seconds=360, max_staleness_seconds=30, max_watch_silence_seconds=60,
                            monotonic=lambda: clock[0])
    revoked.watched(int(time.time() * 1000))
    reader = RevocationFeed("accounts", {}, "accounts-revocations", verifier, revoked, 360, check_every_seconds=0.0,
                            make_consumer=lambda config: kafka, monotonic=lambda: clock[0],
                            record_refusals=lambda message, refusals: recorded.extend(refusals))
    return reader, kafka, revoked, trust, clock, recorded


def checked(reader: RevocationFeed, clock: list[float], seconds: float) -> None:
    """SECONDS later, the feed's check: records of an unknown key tried again, the set confirmed if read."""
    clock[0] += seconds
    reader.try_unknown_keys_again()
    reader._confirm_if_read_to_end(clock[0])


def test_a_revocation_under_a_key_this_service_does_not_know_yet_is_tried_again_never_dropped(
        ring: KeyRing) -> None:
    """The audit service's first revocation under a key it has just rotated to: refused at once it would be lost
    while later words of the watch verify, so it is held, the set not confirmed meanwhile, and applied once the
    trust store knows the key."""
    reader, kafka, revoked, trust, clock, recorded = feed_after_rotation(ring, "audit")
    before = rejected("unknown_key")
    kafka.end = 4
    reader.take(revocation_record(ring, 3))
    checked(reader, clock, 1)
    assert not revoked.is_current() and recorded == [] and rejected("unknown_key") == before
    trust.known = True  # the file looked at again
    checked(reader, clock, 1)
    assert revoked.is_current()
    assert refusal(revoked, principal(issued_at=int(dt.datetime.now(dt.UTC).timestamp()) - 5)) == AuthReason.REVOKED


def test_a_key_that_never_comes_is_refused_recorded_and_the_feed_goes_on_after_the_retry_time(
        ring: KeyRing) -> None:
    reader, kafka, revoked, _, clock, recorded = feed_after_rotation(ring, "audit")
    before = rejected("unknown_key")
    kafka.end = 4
    reader.take(revocation_record(ring, 3))
    checked(reader, clock, UNKNOWN_KEY_RETRY_SECONDS - 1)
    assert not revoked.is_current() and recorded == []
    checked(reader, clock, 2)
    assert [refused.error.reason for refused in recorded] == ["unknown_key"]
    assert rejected("unknown_key") == before + 1 and revoked.is_current()
    assert refusal(revoked, principal()) is None


def test_an_unknown_key_of_a_producer_that_may_not_revoke_is_refused_at_once(ring: KeyRing) -> None:
    reader, kafka, revoked, _, clock, recorded = feed_after_rotation(ring, "payments")
    kafka.end = 4
    reader.take(revocation_record(ring, 3, producer="payments"))
    assert [refused.error.reason for refused in recorded] == ["unknown_key"]
    checked(reader, clock, 1)
    assert revoked.is_current()


def test_a_passing_kafka_error_is_waited_out_and_a_fatal_one_makes_the_worker_again(
        feed: tuple[RevocationFeed, Partitions, RevokedTokens]) -> None:
    reader, _, _ = feed
    with capture_logs() as logs:
        reader.take(OnPartitionZero(None, 0, error=KafkaError(KafkaError._TRANSPORT)))
    assert [entry["event"] for entry in logs] == ["revocation_feed_kafka_error"]
    with pytest.raises(KafkaException):
        reader.take(OnPartitionZero(None, 0, error=KafkaError(KafkaError._FATAL, fatal=True)))


def test_a_revocation_appended_while_the_feed_places_its_start_is_read(
        feed: tuple[RevocationFeed, Partitions, RevokedTokens], ring: KeyRing) -> None:
    reader, kafka, revoked = feed
    kafka.end = 3

    def nothing_that_recent_then_one_appended(wanted: list[Any], timeout: float) -> list[Any]:
        kafka.end = 4  # a revocation lands at offset 3 just after the broker answered "nothing that recent"
        return [type("Start", (), {"partition": 0, "offset": -1, "error": None})()]

    kafka.offsets_for_times = nothing_that_recent_then_one_appended  # type: ignore[method-assign]
    kafka.queued = [revocation_record(ring, 3)]
    run_until_read(reader)
    assert [p.offset for p in kafka.assigned] == [3]
    assert refusal(revoked, principal(issued_at=int(dt.datetime.now(dt.UTC).timestamp()) - 5)) == AuthReason.REVOKED


def test_a_partition_the_broker_cannot_place_in_time_makes_the_worker_again_not_read_from_its_end(
        feed: tuple[RevocationFeed, Partitions, RevokedTokens]) -> None:
    reader, kafka, revoked = feed
    kafka.end = 4
    kafka.offsets_for_times = lambda wanted, timeout: [  # type: ignore[method-assign]
        type("Start", (), {"partition": 0, "offset": -1, "error": KafkaError(KafkaError.LEADER_NOT_AVAILABLE)})()]
    with pytest.raises(KafkaException):
        run_until_read(reader)
    assert not revoked.is_current()


def test_a_topic_without_partitions_is_never_confirmed_current(
        feed: tuple[RevocationFeed, Partitions, RevokedTokens]) -> None:
    reader, kafka, revoked = feed
    metadata = type("Topic", (), {"error": None, "partitions": {}})()
    kafka.list_topics = lambda topic, timeout: type(  # type: ignore[method-assign]
        "Metadata", (), {"topics": {topic: metadata}})()
    with pytest.raises(KafkaException):
        run_until_read(reader)
    assert not revoked.is_current()


def test_a_topic_that_ends_before_what_was_read_is_not_confirmed_but_read_again(
        feed: tuple[RevocationFeed, Partitions, RevokedTokens], ring: KeyRing) -> None:
    reader, kafka, revoked = feed
    kafka.queued, kafka.end = [revocation_record(ring, 3)], 4
    run_until_read(reader)
    assert revoked.is_current()
    later = RevokedTokens(keep_seconds=360, max_staleness_seconds=30, max_watch_silence_seconds=60)
    later.watched(int(time.time() * 1000))
    reader.revoked = later
    kafka.end = 1  # the topic was made again: its records were never read
    with pytest.raises(KafkaException):
        reader._confirm_if_read_to_end(10**9)
    assert not later.is_current()


# --- the audit service's watch on the realm ---

class Realm:
    """Keycloak's admin events endpoint: the events from a time on, oldest first, a page at a time."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.asked: list[tuple[int, int, int]] = []

    def __call__(self, since_ms: int, first: int, count: int) -> list[dict[str, Any]]:
        self.asked.append((since_ms, first, count))
        matching = [event for event in self.events if event["time"] >= since_ms]
        return matching[first:first + count]


def watcher(realm: Realm, published: list[Revocation], users: Realm | None = None,
            said_current: list[int] | None = None) -> RevocationWatcher:
    return RevocationWatcher(realm, users or Realm(), TRIGGERS, published.extend,
                             (said_current if said_current is not None else []).append, lookback_seconds=360,
                             clock=lambda: NOW)


def test_the_watch_publishes_a_revocation_for_each_matching_admin_event_once() -> None:
    realm, published = Realm(), []
    watch = watcher(realm, published)
    moment = int(NOW * 1000)
    realm.events = [admin_event("USER", "CREATE", f"users/{USER}", moment, "e1"),
                    admin_event("REALM_ROLE_MAPPING", "DELETE", f"users/{USER}/role-mappings/realm", moment + 1, "e2")]
    assert [r.keycloak_event_id for r in watch.run_once()] == ["e2"]
    assert realm.asked[0][0] == moment - 360_000  # it starts a lookback back
    # Read again within the overlap, never published twice; a later event, and one stamped a little earlier that
    # became visible late, are.
    realm.events += [admin_event("USER", "DELETE", f"users/{USER}", moment + 10, "e3"),
                     admin_event("USER", "UPDATE", f"users/{USER}", moment - 2_000, "e4")]
    assert [r.keycloak_event_id for r in watch.run_once()] == ["e3", "e4"]
    assert watch.run_once() == []
    assert [r.keycloak_event_id for r in published] == ["e2", "e3", "e4"]
    assert realm.asked[-1][0] == moment + 10 - 5_000


def test_the_watch_reads_every_page_each_from_the_last_time_of_the_one_before() -> None:
    realm, published = Realm(), []
    moment = int(NOW * 1000)
    realm.events = [admin_event("USER", "DELETE", f"users/{USER}", moment + n, f"e{n}") for n in range(PAGE + 5)]
    assert len(watcher(realm, published).run_once()) == PAGE + 5
    assert [(since - moment, first) for since, first, _ in realm.asked] == [(-360_000, 0), (PAGE - 1, 0)]


def test_a_flood_of_refresh_errors_holds_back_neither_sign_outs_nor_the_word_that_the_watch_is_current() -> None:
    """Anyone can make Keycloak record a refresh error (a made-up refresh token at the public CLI client): read from
    a source of their own, on a budget, they never delay the rest, and a reuse among them is published later."""
    moment = int(NOW * 1000)
    users, errors, published, said_current = Realm(), Realm(), [], []
    users.events = [user_event(event_id="signed-out", moment_ms=moment + 1)]
    flood = ERROR_PAGES * PAGE + 50
    flooded_from = moment - 60_000  # a minute of it, a few per millisecond
    errors.events = [{**refresh_error("Invalid refresh token", session=None), "id": f"junk{n}",
                      "time": flooded_from + n // 3} for n in range(flood)]
    errors.events.append({**refresh_error("Maximum allowed refresh token reuse exceeded"), "id": "reused",
                          "time": flooded_from + flood // 3})
    watch = RevocationWatcher(Realm(), users, TRIGGERS, published.extend, said_current.append, lookback_seconds=360,
                              clock=lambda: NOW, error_events=errors)
    assert [r.keycloak_event_id for r in watch.run_once()] == ["signed-out"]
    assert said_current == [moment], "current as of the round's start, the flood left for later"
    assert len(errors.asked) == ERROR_PAGES
    assert [r.keycloak_event_id for r in watch.run_once()] == ["reused"]
    assert published[-1].session == SESSION and not published[-1].everyone


def test_refresh_errors_older_than_any_live_token_are_not_read() -> None:
    """Behind by more than twice the access tokens' life (a flood, a watch down), the error source skips ahead: a
    reuse that long ago leaves no live token of its session to end."""
    errors, published = Realm(), []
    RevocationWatcher(Realm(), Realm(), TRIGGERS, published.extend, [].append, lookback_seconds=3600,
                      clock=lambda: NOW, error_events=errors).run_once()
    assert errors.asked[0][0] == int((NOW - ERROR_EVENTS_WORTH_SECONDS) * 1000)


class Reshuffling(Realm):
    """Keycloak orders by time alone: events of one millisecond come in another order at each request."""

    def __call__(self, since_ms: int, first: int, count: int) -> list[dict[str, Any]]:
        self.events.sort(key=lambda event: (event["time"], random.random()))
        return super().__call__(since_ms, first, count)


def test_events_of_one_millisecond_across_a_page_edge_are_all_taken_whatever_their_order() -> None:
    realm, published = Reshuffling(), []
    moment = int(NOW * 1000)
    realm.events = [admin_event("USER", "DELETE", f"users/{USER}", moment + n // 7, f"e{n}") for n in range(PAGE * 3)]
    made = watcher(realm, published).run_once()
    assert sorted(r.keycloak_event_id for r in made) == sorted(f"e{n}" for n in range(PAGE * 3))


def test_a_page_all_of_one_millisecond_moves_on_within_it() -> None:
    realm, published = Realm(), []
    moment = int(NOW * 1000)
    realm.events = [admin_event("USER", "DELETE", f"users/{USER}", moment, f"e{n}") for n in range(PAGE + 3)]
    assert len(watcher(realm, published).run_once()) == PAGE + 3
    assert [first for _, first, _ in realm.asked] == [0, 0, PAGE]


def test_the_watch_gets_past_more_events_than_a_round_takes_within_the_overlap() -> None:
    realm, published = Realm(), []
    moment = int(NOW * 1000)
    # A bulk change (users created by a script): more events than a round takes, all within the overlap.
    realm.events = [admin_event("USER", "CREATE", f"users/{USER}", moment, f"c{n}") for n in range(MAX_FRESH + 1)]
    realm.events.append(admin_event("USER", "DELETE", f"users/{USER}", moment + 1, "after"))
    watch = watcher(realm, published)
    for _ in range(3):
        watch.run_once()
    assert [r.keycloak_event_id for r in published] == ["after"]


def test_a_round_that_left_events_for_the_next_does_not_say_every_change_before_it_was_published() -> None:
    """A flood of events (anyone can sign in and out again and again) makes a round stop at MAX_FRESH: the word that
    the watch is current may only cover what was read, or a revocation left behind reads as "nothing revoked" for as
    long as the flood lasts."""
    realm, published, said_current = Realm(), [], []
    moment = int(NOW * 1000)
    realm.events = [admin_event("USER", "CREATE", f"users/{USER}", moment - 30_000 + n // 10, f"c{n}")
                    for n in range(MAX_FRESH + 2 * PAGE)]
    realm.events.append(admin_event("USER", "DELETE", f"users/{USER}", moment - 1_000, "after"))
    watch = watcher(realm, published, said_current=said_current)
    watch.run_once()
    assert published == []
    assert said_current and said_current[-1] <= moment - 30_000 + (MAX_FRESH + PAGE) // 10, \
        "the word covers only the events the round read, not the revocation it left for the next"
    watch.heartbeat_seconds = 0
    watch.run_once()
    assert [r.keycloak_event_id for r in published] == ["after"]
    assert said_current[-1] == moment


def test_revocations_not_published_are_read_and_published_again() -> None:
    realm = Realm()
    realm.events = [admin_event("USER", "DELETE", f"users/{USER}", int(NOW * 1000), "e1")]

    def refuse(revocations: list[Revocation]) -> None:
        raise KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT))

    said_current: list[int] = []
    failing = RevocationWatcher(realm, Realm(), TRIGGERS, refuse, said_current.append, lookback_seconds=360,
                                clock=lambda: NOW)
    with pytest.raises(KafkaException):
        failing.run_once()
    assert said_current == [], "a round whose revocations were not all published does not say the watch is current"
    published: list[Revocation] = []
    failing.publish = published.extend
    assert [r.keycloak_event_id for r in failing.run_once()] == ["e1"]
    assert said_current == [int(NOW * 1000)]


class Moments:
    def __init__(self) -> None:
        self.wall, self.monotonic = NOW, 0.0


def test_the_watch_says_it_is_current_as_of_each_rounds_start_at_most_every_few_seconds() -> None:
    """The services hear the watch is alive, dated when the round that read the realm began (every change Keycloak
    had committed by then was published), and not in every round of a second."""
    moments, realm = Moments(), Realm()
    said_current: list[int] = []
    published: list[Revocation] = []

    def page(since_ms: int, first: int, count: int) -> list[dict[str, Any]]:
        moments.wall += 0.3  # asking Keycloak takes a while: the word is dated before it
        return realm(since_ms, first, count)

    watch = RevocationWatcher(page, Realm(), TRIGGERS, published.extend, said_current.append, lookback_seconds=360,
                              heartbeat_seconds=5, clock=lambda: moments.wall, monotonic=lambda: moments.monotonic)
    watch.run_once()
    assert said_current == [int(NOW * 1000)]
    for _ in range(4):  # a round a second: nothing more to say yet
        moments.monotonic += 1
        watch.run_once()
    assert len(said_current) == 1
    moments.monotonic += 1
    began = moments.wall
    watch.run_once()
    assert said_current == [int(NOW * 1000), int(began * 1000)]


def test_a_watch_keycloak_does_not_answer_never_says_it_is_current() -> None:
    said_current: list[int] = []

    def unreachable(since_ms: int, first: int, count: int) -> list[dict[str, Any]]:
        raise requests.ConnectionError("Keycloak is away")

    watch = RevocationWatcher(Realm(), unreachable, TRIGGERS, [].extend, said_current.append, lookback_seconds=360,
                              clock=lambda: NOW)
    with pytest.raises(requests.ConnectionError):
        watch.run_once()
    assert said_current == []


def test_an_admin_event_keycloak_gave_without_an_id_is_logged_and_the_others_published() -> None:
    realm, published = Realm(), []
    realm.events = [{**admin_event("USER", "DELETE", f"users/{USER}", int(NOW * 1000), "e1"), "id": None},
                    admin_event("USER", "DELETE", f"users/{USER}", int(NOW * 1000) + 1, "e2")]
    with capture_logs() as logs:
        assert [r.keycloak_event_id for r in watcher(realm, published).run_once()] == ["e2"]
    assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == ["keycloak_event_unreadable"]


def test_the_watch_reads_user_events_on_a_cursor_of_their_own_and_publishes_sign_outs() -> None:
    realm, users, published = Realm(), Realm(), []
    watch = watcher(realm, published, users)
    moment = int(NOW * 1000)
    realm.events = [admin_event("USER", "DELETE", f"users/{USER}", moment + 60_000, "a1")]
    users.events = [user_event(moment_ms=moment, event_id="u1"), user_event("LOGIN", event_id="u2")]
    made = watch.run_once()
    assert [(r.keycloak_event_id, r.session) for r in made] == [("a1", None), ("u1", SESSION)]
    # The admin event a minute later does not move the user events' cursor: one stamped just after u1 is read.
    users.events.append(user_event(moment_ms=moment + 10, event_id="u3"))
    assert [r.keycloak_event_id for r in watch.run_once()] == ["u3"]
    assert users.asked[-1][0] == moment - 5_000  # read from u1 on, not from the admin event's time


class RealmAdmin:
    """python-keycloak's KeycloakAdmin as the watch uses it: the realm's events settings and its user events."""

    def __init__(self, events_enabled: bool, types: list[str]) -> None:
        self.config = {"eventsEnabled": events_enabled, "enabledEventTypes": types, "adminEventsEnabled": True}
        self.queries: list[dict[str, Any]] = []
        self.connection = self  # KeycloakAdmin.connection: raw requests to the realm
        self.realm_name = "bastion"

    def raw_get(self, path: str) -> requests.Response:
        assert path == "admin/realms/bastion/events/config"
        response = requests.Response()
        response.status_code, response._content = 200, json.dumps(self.config).encode()
        return response

    def get_events(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        self.queries.append(query)
        return [user_event()]


RECORDED = ["LOGOUT", "REFRESH_TOKEN_ERROR"]  # what the realm records for the shipped triggers


def test_the_watch_refuses_to_read_sign_outs_from_a_realm_that_does_not_record_them() -> None:
    # A realm imported before sign-outs were recorded answers the events query with nothing: that must not read
    # as "nobody signed out".
    for admin in (RealmAdmin(False, RECORDED), RealmAdmin(True, ["LOGIN"]), RealmAdmin(True, ["LOGIN", "LOGOUT"])):
        _, user_events, _ = keycloak_events(admin, TRIGGERS.user_event_types)
        with pytest.raises(UserEventsNotRecordedError, match="REFRESH_TOKEN_ERROR"):
            user_events(int(NOW * 1000), 0, PAGE)
        assert admin.queries == []
    # Events on with no type named is Keycloak's default: the types it saves by default, sign-outs among them, a
    # refresh token's reuse not (measured on Keycloak 26).
    _, by_default, _ = keycloak_events(RealmAdmin(True, []), ["LOGOUT"])
    assert by_default(int(NOW * 1000), 0, PAGE)
    _, by_default, _ = keycloak_events(RealmAdmin(True, []), TRIGGERS.user_event_types)
    with pytest.raises(UserEventsNotRecordedError, match=r"\['REFRESH_TOKEN_ERROR'\]"):
        by_default(int(NOW * 1000), 0, PAGE)
    recording = RealmAdmin(True, ["LOGIN", *RECORDED])
    clock = [0.0]
    _, user_events, _ = keycloak_events(recording, TRIGGERS.user_event_types, monotonic=lambda: clock[0])
    assert [event["id"] for event in user_events(int(NOW * 1000), 0, PAGE)] == [user_event()["id"]]
    assert recording.queries[0]["type"] == RECORDED
    # Turned off later (a change no trigger sees): found out at the next check.
    recording.config["eventsEnabled"] = False
    user_events(int(NOW * 1000), 0, PAGE)
    clock[0] += RECORDING_CHECK_SECONDS
    with pytest.raises(UserEventsNotRecordedError):
        user_events(int(NOW * 1000), 0, PAGE)


class AdminEventsAdmin(RealmAdmin):
    def get_admin_events(self, _query: dict[str, Any]) -> list[dict[str, Any]]:
        return []


def test_the_watch_refuses_to_read_admin_events_from_a_realm_that_does_not_record_them() -> None:
    # Admin events turned off answer the admin events query with nothing: a role taken away would read as "nothing
    # changed" while the watch keeps saying it is current.
    for types in (TRIGGERS.user_event_types, []):
        admin = AdminEventsAdmin(True, RECORDED)
        admin.config["adminEventsEnabled"] = False
        admin_events, _, _ = keycloak_events(admin, types)
        with pytest.raises(AdminEventsNotRecordedError, match="admin events"):
            admin_events(int(NOW * 1000), 0, PAGE)
    recording = AdminEventsAdmin(True, RECORDED)
    clock = [0.0]
    admin_events, _, _ = keycloak_events(recording, TRIGGERS.user_event_types, monotonic=lambda: clock[0])
    assert admin_events(int(NOW * 1000), 0, PAGE) == []
    recording.config["adminEventsEnabled"] = False  # turned off later: found out at the next check
    admin_events(int(NOW * 1000), 0, PAGE)
    clock[0] += RECORDING_CHECK_SECONDS
    with pytest.raises(AdminEventsNotRecordedError):
        admin_events(int(NOW * 1000), 0, PAGE)


class RefusingAdmin(RealmAdmin):
    """A Keycloak that answers the events queries with CODE: 403 for a service account without view-events."""

    def __init__(self, code: int) -> None:
        super().__init__(True, RECORDED)
        self.code = code

    def get_admin_events(self, _query: dict[str, Any]) -> list[dict[str, Any]]:
        raise KeycloakGetError(error_message=b"forbidden", response_code=self.code)


def test_a_watch_keycloak_refuses_the_events_says_why_and_another_failure_passes_as_it_is() -> None:
    admin_events, _, _ = keycloak_events(RefusingAdmin(403), TRIGGERS.user_event_types)
    with pytest.raises(AdminEventsRefusedError, match="lacks realm-management's view-events"):
        admin_events(int(NOW * 1000), 0, PAGE)
    admin_events, _, _ = keycloak_events(RefusingAdmin(502), TRIGGERS.user_event_types)
    with pytest.raises(KeycloakGetError):
        admin_events(int(NOW * 1000), 0, PAGE)


def test_a_reused_refresh_token_without_a_session_never_revokes_everyone() -> None:
    """Keycloak records a reuse without a user id: with no well-formed session either, the fallback of a sign-out
    (everyone) would let anybody holding a refresh token end every token of the realm, as often as they like."""
    reuse = "Maximum allowed refresh token reuse exceeded"
    for session in (None, "", "../x", "short"):
        fallback = revocation_of_user_event(refresh_error(reuse, session=session), TRIGGERS)
        assert fallback == Revocation(USER, int(NOW * 1000), f"user REFRESH_TOKEN_ERROR: {reuse}", "r1"), session
        assert not fallback.everyone
    unnamed = {**refresh_error(reuse, session=None), "details": {"reason": reuse, "refresh_token_sub": "x"}}
    assert revocation_of_user_event(unnamed, TRIGGERS) is None, "no session, no user: nothing, never everyone"


def test_a_quiet_error_source_never_warns_that_it_skipped_events_but_one_left_behind_does() -> None:
    """No refresh error for longer than the error source's horizon is the usual case (its cursor stays at the last
    one seen): nothing was skipped, so nothing is said; a source that stopped on its budget and is overtaken by the
    horizon did skip some, and says so."""
    now = [NOW]
    errors = Realm()
    watch = RevocationWatcher(Realm(), Realm(), TRIGGERS, [].extend, [].append, lookback_seconds=360,
                              clock=lambda: now[0], error_events=errors)
    with capture_logs() as logs:
        for _ in range(3):
            watch.run_once()
            now[0] += ERROR_EVENTS_WORTH_SECONDS
    assert [log for log in logs if log["event"] == "keycloak_events_skipped"] == []
    moment = int(now[0] * 1000)
    errors.events = [{**refresh_error("Invalid refresh token", session=None), "id": f"junk{n}", "time": moment + n}
                     for n in range(ERROR_PAGES * PAGE + 1)]
    watch.run_once()
    assert watch.sources[-1].left_behind
    now[0] += 2 * ERROR_EVENTS_WORTH_SECONDS
    with capture_logs() as logs:
        watch.run_once()
    assert [log["kind"] for log in logs if log["event"] == "keycloak_events_skipped"] == ["error"]


def test_a_keycloak_slow_to_answer_refresh_errors_adds_one_page_of_them_to_a_round_not_its_whole_budget() -> None:
    """A flood of refresh errors may slow Keycloak down: past the first page, the error source stops once it has
    spent ERROR_READ_SECONDS, so the sign-outs and the word that the watch is current wait for one answer, not
    ERROR_PAGES of them; the rest is read in the following rounds."""
    ticks = [0.0]

    class Slow(Realm):
        def __call__(self, since_ms: int, first: int, count: int) -> list[dict[str, Any]]:
            ticks[0] += ERROR_READ_SECONDS  # each answer takes that long
            return super().__call__(since_ms, first, count)

    moment = int(NOW * 1000)
    errors = Slow()
    errors.events = [{**refresh_error("Invalid refresh token", session=None), "id": f"junk{n}", "time": moment + n}
                     for n in range(ERROR_PAGES * PAGE)]
    errors.events.append({**refresh_error("Maximum allowed refresh token reuse exceeded"), "id": "reused",
                          "time": moment + ERROR_PAGES * PAGE})
    said_current: list[int] = []
    watch = RevocationWatcher(Realm(), Realm(), TRIGGERS, [].extend, said_current.append, lookback_seconds=360,
                              clock=lambda: NOW, monotonic=lambda: ticks[0], heartbeat_seconds=0,
                              error_events=errors)
    watch.run_once()
    assert len(errors.asked) == 1 and said_current == [moment]
    published = []
    for _ in range(ERROR_PAGES + 1):
        published += watch.run_once()
    assert [r.keycloak_event_id for r in published] == ["reused"]
