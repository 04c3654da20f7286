"""The audit service's watch on the realm: Keycloak's admin and user events in, signed AccessRevoked events out.

Every POLL seconds it asks Keycloak (as the audit service account, which holds only realm-management's
`view-events`) for the admin events, and the user events of the types the triggers name, since the last ones it
saw, in time order, and publishes a revocation for each one a trigger of infra/revocation-triggers.yaml matches. It
starts LOOKBACK seconds back, so a restart publishes again what it may have missed (harmless: a revocation only ends
tokens issued before the change it records, or of a session that is over), and it reads a few seconds back each
round, because an event Keycloak stamped earlier may become visible after a later one. A round whose revocations
cannot all be published fails: the worker is made again and reads them again.

Error events (a refresh token's reuse among `REFRESH_TOKEN_ERROR`s) are read from a cursor of their own, on a budget:
anyone can make Keycloak record a refresh error (a made-up refresh token at the public CLI client), so a flood of them
must not hold back the sign-outs and admin changes, nor the word that the watch is current. That source reads at most
ERROR_PAGES pages a round (and past the first, for at most ERROR_READ_SECONDS), never further back than
ERROR_EVENTS_WORTH_SECONDS (a session's access tokens have expired by then), and does not count towards
RevocationsCurrent: under a flood, a reuse may be revoked late or, past that horizon, not at all (logged), and the
reused session's access tokens then live out their 5 minutes, as they would without this trigger.

After a round that read both kinds of event and published every revocation it made, and at most every HEARTBEAT
seconds, it publishes a signed RevocationsCurrent dated when the round began: every change Keycloak had committed
by then was published (a round that left events for the next: dated at the last one it read). The services refuse
every token once they have not read one for a while, so a watch that stopped (the audit service down, Keycloak
refusing it) fails closed instead of reading as "nothing revoked".
"""

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import structlog
from confluent_kafka import KafkaError, Producer
from keycloak.exceptions import KeycloakError, KeycloakGetError, raise_error_from_response
from keycloak.urls_patterns import URL_ADMIN_EVENTS_CONFIG

from bastion.access.v1.decision_pb2 import RevocationsCurrent
from bastion.events.envelopes import seal
from bastion.events.keys import FollowedSigningKey
from bastion.events.v1.envelope_pb2 import Envelope
from bastion.revocations.feed import TOPIC
from bastion.revocations.triggers import (
    SAVED_BY_DEFAULT,
    Revocation,
    Triggers,
    revocation_of,
    revocation_of_user_event,
)

log = structlog.get_logger(__name__)

EventPage = Callable[[int, int, int], list[Mapping[str, Any]]]  # (from epoch ms, first, max) -> oldest first
OVERLAP_MS = 5_000
PAGE = 100
MAX_FRESH = 5_000  # a round takes at most this many events not handled yet; the rest is read next round
RECORDING_CHECK_SECONDS = 60.0  # how often the watch asks again whether the realm still records those user events
HEARTBEAT_SECONDS = 5.0  # how often, at most, the watch says it is alive (RevocationsCurrent)
ERROR_PAGES = 5  # pages of error events a round reads at most: a flood of them delays nothing else
# Nor longer than this, past their first page: a Keycloak slowed down (by that flood) would otherwise add ERROR_PAGES
# of its answers to every round, before the next sign-out is read and the next word that the watch is current said.
ERROR_READ_SECONDS = 2.0
# How far back error events are still worth reading: twice the realm's access-token lifetime (300 s). A reuse older
# than that leaves no live token of its session to end.
ERROR_EVENTS_WORTH_SECONDS = 600.0


class AdminEventsRefusedError(Exception):
    """Keycloak does not let this service account read the realm's admin events."""


class AdminEventsNotRecordedError(Exception):
    """The realm does not record admin events: every role taken away, every user disabled would go unpublished."""


class UserEventsNotRecordedError(Exception):
    """The realm does not record the user events the triggers read: every sign-out would go unpublished."""


class RevocationNotPublishedError(Exception):
    """Kafka did not take every revocation of a round."""


class Publish(Protocol):
    def __call__(self, revocations: list[Revocation]) -> None: ...


class PublishCurrent(Protocol):
    def __call__(self, as_of_ms: int) -> None: ...


class _Source:
    """One kind of Keycloak event (admin or user) read from a cursor: the newest time seen, and the ids of the
    events already handled within the overlap before it."""

    def __init__(self, kind: str, fetch: EventPage, revocation: Callable[[Mapping[str, Any]], Revocation | None],
                 start_ms: int, max_pages: int | None = None, oldest_ms: Callable[[], int] | None = None,
                 max_seconds: float | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.kind, self.fetch, self.revocation = kind, fetch, revocation
        self.start_ms = self.newest_ms = start_ms
        self.seen: dict[str, int] = {}  # id -> time
        # A best-effort source (error events): at most MAX_PAGES a round, never before OLDEST_MS(); it never holds
        # back the word that the watch is current.
        self.max_pages, self.oldest_ms = max_pages, oldest_ms
        self.max_seconds, self.monotonic = max_seconds, monotonic
        self.left_behind = False  # the last round stopped before the end (a budget spent)

    @property
    def best_effort(self) -> bool:
        return self.max_pages is not None

    def fresh(self) -> list[Mapping[str, Any]]:
        """The events not handled yet, oldest first: at most MAX_FRESH of them, the rest next round (counting only
        those, so that a round whose overlap holds more handled events than that still gets past them).

        Pages move by time: each starts at the last time of the page before, and the ids already taken are dropped.
        Keycloak orders by time alone, so the events of one millisecond may come in another order from one request
        to the next, and paging by position could skip one at a page's edge. A page that is all one millisecond
        moves on by position within it."""
        # A best-effort source that stopped on its budget goes on where it stopped: read from the overlap again, a
        # flood denser than its budget would fill every round with events already handled.
        overlap = 0 if self.best_effort and self.left_behind else OVERLAP_MS
        since, first = max(self.start_ms, self.newest_ms - overlap), 0
        floor = self.oldest_ms() if self.oldest_ms is not None else since
        if floor > since:
            # Only a source left behind has events it is skipping; one that read to the end last round merely has
            # had none lately (its cursor stays where the last event was), and saying so every round is noise.
            if self.left_behind:
                log.warning("keycloak_events_skipped", kind=self.kind, skipped_from_ms=since, read_from_ms=floor)
            since = floor
        taken = set(self.seen)
        found: list[Mapping[str, Any]] = []
        pages, self.left_behind, started = 0, True, self.monotonic()
        while len(found) < MAX_FRESH and not self._budget_spent(pages, started):
            events = self.fetch(since, first, PAGE)
            pages += 1
            for event in events:
                key = str(event.get("id"))
                if key not in taken:
                    taken.add(key)
                    found.append(event)
            if len(events) < PAGE:
                self.left_behind = False
                break
            last = events[-1].get("time")
            if isinstance(last, int) and not isinstance(last, bool) and last > since:
                since, first = last, 0
            else:
                first += PAGE
        return found

    def _budget_spent(self, pages: int, started: float) -> bool:
        if pages == 0:
            return False
        if self.max_pages is not None and pages >= self.max_pages:
            return True
        return self.max_seconds is not None and self.monotonic() - started >= self.max_seconds

    def revocations(self, events: list[Mapping[str, Any]]) -> list[Revocation]:
        made = []
        for event in events:
            try:
                revocation = self.revocation(event)
            except ValueError as error:  # Keycloak's own record without an id or a time: nothing to place it by
                log.warning("keycloak_event_unreadable", kind=self.kind, error=str(error))
                continue
            if revocation is not None:
                made.append(revocation)
        return made

    def handled(self, events: list[Mapping[str, Any]]) -> None:
        for event in events:
            moment = event.get("time")
            if isinstance(moment, int) and not isinstance(moment, bool):
                self.seen[str(event.get("id"))] = moment
                self.newest_ms = max(self.newest_ms, moment)
        horizon = self.newest_ms - OVERLAP_MS
        self.seen = {event_id: moment for event_id, moment in self.seen.items() if moment >= horizon}


class RevocationWatcher:
    """A worker (`ServiceRuntime.start_worker`) of the audit service."""

    def __init__(self, admin_events: EventPage, user_events: EventPage, triggers: Triggers, publish: Publish,
                 publish_current: PublishCurrent, lookback_seconds: float, poll_seconds: float = 1.0,
                 heartbeat_seconds: float = HEARTBEAT_SECONDS, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, error_events: EventPage | None = None) -> None:
        start_ms = int((clock() - lookback_seconds) * 1000)
        self.sources: tuple[_Source, ...] = (
            _Source("admin", admin_events, lambda event: revocation_of(event, triggers), start_ms),
            _Source("user", user_events, lambda event: revocation_of_user_event(event, triggers), start_ms),
        )
        if error_events is not None:
            self.sources += (_Source("error", error_events, lambda event: revocation_of_user_event(event, triggers),
                                     start_ms, ERROR_PAGES,
                                     lambda: int((clock() - ERROR_EVENTS_WORTH_SECONDS) * 1000),
                                     ERROR_READ_SECONDS, monotonic),)
        self.publish = publish
        self.publish_current = publish_current
        self.poll_seconds = poll_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self._clock = clock
        self._monotonic = monotonic
        self._said_current_at = float("-inf")  # monotonic

    def run(self, stop: Any) -> None:
        while not stop.is_set():
            self.run_once()
            stop.wait(self.poll_seconds)

    def close(self) -> None:
        """Nothing held between rounds."""

    def run_once(self) -> list[Revocation]:
        """Read the admin and user events not handled yet, publish the revocations they make; return those. Nothing
        counts as handled before every revocation of the round was published. Then, when it is due, say that every
        change before the round began was published."""
        began_ms = int(self._clock() * 1000)
        fresh = [(source, source.fresh()) for source in self.sources]
        revocations = [revocation for source, events in fresh for revocation in source.revocations(events)]
        if revocations:
            self.publish(revocations)
            for revocation in revocations:
                log.info("access_revocation_published", subject=revocation.subject or "*",
                         session=revocation.session or "-", cause=revocation.cause,
                         keycloak_event_id=revocation.keycloak_event_id, revoked_at_ms=revocation.revoked_at_ms)
        as_of_ms = began_ms
        for source, events in fresh:
            source.handled(events)
            if source.best_effort:
                if source.left_behind:
                    log.warning("keycloak_events_left_for_next_round", kind=source.kind, read=len(events),
                                published_up_to_ms=source.newest_ms)
                continue
            if len(events) >= MAX_FRESH:
                # The round left events for the next (a flood, a bulk change): every change was published only up to
                # the last one it read, not up to when it began. A watch that keeps falling behind so stops saying it
                # is current, and the services fail closed, instead of leaving a revocation unread behind the flood.
                as_of_ms = min(as_of_ms, source.newest_ms)
                log.warning("keycloak_events_left_for_next_round", kind=source.kind, read=len(events),
                            published_up_to_ms=source.newest_ms)
        if self._monotonic() - self._said_current_at >= self.heartbeat_seconds:
            self.publish_current(as_of_ms)
            self._said_current_at = self._monotonic()
        return revocations


def keycloak_events(admin: Any, user_event_types: list[str], monotonic: Callable[[], float] = time.monotonic,
                    error_event_types: list[str] | tuple[()] = ()) -> tuple[EventPage, EventPage, EventPage]:
    """The realm's admin events, its user events of USER_EVENT_TYPES and those of ERROR_EVENT_TYPES (a source of
    their own: see the module's docstring), over python-keycloak's KeycloakAdmin (a client-credentials connection to
    the realm), each a page at a time, oldest first.

    A realm that does not record those user events (imported before they were turned on, or turned off since: a
    change no trigger sees) answers the query with nothing, which would read as "nobody signed out". So the realm's
    events settings are asked first, and again every RECORDING_CHECK_SECONDS: without them, UserEventsNotRecordedError
    (the worker fails, and the audit service's health says so). So too for the admin events themselves (turned off,
    the realm answers with none, and the watch would go on saying it is current): AdminEventsNotRecordedError."""
    checked_at = [float("-inf")]

    def refused(error: KeycloakError) -> Exception:
        if error.response_code == 403:
            return AdminEventsRefusedError(
                "Keycloak refuses the audit service the realm's events (it lacks realm-management's view-events "
                "role): the realm was imported before token revocation; `bastion up` adds what it lacks")
        return error

    def admin_events(since_ms: int, first: int, count: int) -> list[Mapping[str, Any]]:
        ensure_recorded_lately()
        try:
            events: list[Mapping[str, Any]] = admin.get_admin_events(
                {"dateFrom": since_ms, "direction": "asc", "first": first, "max": count})
        except KeycloakError as error:
            raise refused(error) from None
        return events

    def ensure_recorded() -> None:
        try:
            config = raise_error_from_response(admin.connection.raw_get(
                URL_ADMIN_EVENTS_CONFIG.format(**{"realm-name": admin.connection.realm_name})), KeycloakGetError)
        except KeycloakError as error:
            raise refused(error) from None
        if not isinstance(config, dict) or config.get("adminEventsEnabled") is not True:
            raise AdminEventsNotRecordedError(
                "the realm does not record admin events (roles taken away, users disabled would never be "
                "published): they were turned off; `bastion up` turns them on again")
        wanted = sorted({*user_event_types, *error_event_types})
        if not wanted:
            return
        recorded = config.get("enabledEventTypes")
        # An empty list with events on is Keycloak's default: the types it saves by default, sign-outs among them,
        # refresh errors not.
        recording = set(recorded) if isinstance(recorded, list) and recorded else SAVED_BY_DEFAULT
        missing = sorted(set(wanted) - recording)
        if config.get("eventsEnabled") is not True or missing:
            raise UserEventsNotRecordedError(
                f"the realm does not record the user events {missing or wanted} the revocation triggers "
                "read (sign-outs or a refresh token's reuse would never be published): the realm was imported "
                "before they were, or they were turned off; `bastion up` adds them again")

    def ensure_recorded_lately() -> None:
        if monotonic() - checked_at[0] >= RECORDING_CHECK_SECONDS:
            ensure_recorded()
            checked_at[0] = monotonic()

    def events_of(types: list[str] | tuple[()]) -> EventPage:
        def user_events(since_ms: int, first: int, count: int) -> list[Mapping[str, Any]]:
            if not types:
                return []
            ensure_recorded_lately()
            try:
                events: list[Mapping[str, Any]] = admin.get_events(
                    {"type": list(types), "dateFrom": since_ms, "direction": "asc", "first": first, "max": count})
            except KeycloakError as error:
                raise refused(error) from None
            return events

        return user_events

    return admin_events, events_of(user_event_types), events_of(error_event_types)


class KafkaRevocationPublisher:
    """Publishes revocations on identity.revocations.v1, each a signed envelope (idempotent producer, acks=all)."""

    def __init__(self, kafka_config: dict[str, Any], key: FollowedSigningKey, timeout: float = 10.0) -> None:
        self.producer = Producer({**kafka_config, "enable.idempotence": True, "acks": "all"})
        self.key = key
        self.timeout = timeout

    def __call__(self, revocations: list[Revocation]) -> None:
        key = self.key.current()
        self._send([seal(key, TOPIC, revocation.message(), aggregate_id=revocation.subject or "everyone",
                         sequence=revocation.revoked_at_ms,
                         correlation_id=f"keycloak-{revocation.keycloak_event_id}"[:128],
                         event_id=revocation.event_id)
                    for revocation in revocations], "revocations")

    def current(self, as_of_ms: int) -> None:
        """Say that every change before AS_OF_MS was published (after the round's revocations: one partition, one
        idempotent producer, so in that order)."""
        current = RevocationsCurrent()
        current.as_of.FromMilliseconds(as_of_ms)
        self._send([seal(self.key.current(), TOPIC, current, aggregate_id="realm-watch", sequence=as_of_ms,
                         correlation_id="revocation-watch")], "words that the watch is current")

    def _send(self, envelopes: list[Envelope], what: str) -> None:
        failures: list[KafkaError] = []

        def delivered(error: KafkaError | None, _message: Any) -> None:
            if error is not None:
                failures.append(error)

        for envelope in envelopes:
            self.producer.produce(TOPIC, value=envelope.SerializeToString(), key=envelope.aggregate_id.encode(),
                                  on_delivery=delivered)
        left = self.producer.flush(self.timeout)
        if failures or left:
            raise RevocationNotPublishedError(f"{len(failures) + left} of {len(envelopes)} {what} were not published "
                                              f"on {TOPIC}: {[str(f) for f in failures][:3]}")
