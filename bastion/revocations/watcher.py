"""The audit service's watch on the realm: Keycloak's admin events in, signed AccessRevoked events out.

Every POLL seconds it asks Keycloak (as the audit service account, which holds only realm-management's
`view-events`) for the admin events since the last ones it saw, in time order, and publishes a revocation for each
one a trigger of infra/revocation-triggers.yaml matches. It starts LOOKBACK seconds back, so a restart publishes
again what it may have missed (harmless: a revocation only ends tokens issued before the change it records), and
it reads a few seconds back each round, because an event Keycloak stamped earlier may become visible after a later
one. A round whose revocations cannot all be published fails: the worker is made again and reads them again.
"""

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import structlog
from confluent_kafka import KafkaError, Producer
from keycloak.exceptions import KeycloakError

from bastion.events.envelopes import seal
from bastion.events.keys import FollowedSigningKey
from bastion.revocations.feed import TOPIC
from bastion.revocations.triggers import Revocation, Trigger, revocation_of

log = structlog.get_logger(__name__)

AdminEvents = Callable[[int, int, int], list[Mapping[str, Any]]]  # (from epoch ms, first, max) -> oldest first
OVERLAP_MS = 5_000
PAGE = 100
MAX_PAGES = 50  # a round reads at most this many pages; the rest is read next round


class AdminEventsRefusedError(Exception):
    """Keycloak does not let this service account read the realm's admin events."""


class RevocationNotPublishedError(Exception):
    """Kafka did not take every revocation of a round."""


class Publish(Protocol):
    def __call__(self, revocations: list[Revocation]) -> None: ...


class RevocationWatcher:
    """A worker (`ServiceRuntime.start_worker`) of the audit service."""

    def __init__(self, admin_events: AdminEvents, triggers: tuple[Trigger, ...], publish: Publish,
                 lookback_seconds: float, poll_seconds: float = 1.0, clock: Callable[[], float] = time.time) -> None:
        self.admin_events = admin_events
        self.triggers = triggers
        self.publish = publish
        self.poll_seconds = poll_seconds
        self._newest_ms = int((clock() - lookback_seconds) * 1000)
        self._start_ms = self._newest_ms
        self._seen: dict[str, int] = {}  # id -> time of the events of the overlap already handled

    def run(self, stop: Any) -> None:
        while not stop.is_set():
            self.run_once()
            stop.wait(self.poll_seconds)

    def close(self) -> None:
        """Nothing held between rounds."""

    def run_once(self) -> list[Revocation]:
        """Read the admin events not handled yet, publish the revocations they make; return those."""
        since = max(self._start_ms, self._newest_ms - OVERLAP_MS)
        fresh: list[Mapping[str, Any]] = []
        for page in range(MAX_PAGES):
            events = self.admin_events(since, page * PAGE, PAGE)
            fresh += [event for event in events if str(event.get("id")) not in self._seen]
            if len(events) < PAGE:
                break
        revocations = []
        for event in fresh:
            try:
                revocation = revocation_of(event, self.triggers)
            except ValueError as error:  # Keycloak's own record without an id or a time: nothing to place it by
                log.warning("admin_event_unreadable", error=str(error))
                continue
            if revocation is not None:
                revocations.append(revocation)
        if revocations:
            self.publish(revocations)
            for revocation in revocations:
                log.info("access_revocation_published", subject=revocation.subject or "*", cause=revocation.cause,
                         keycloak_event_id=revocation.keycloak_event_id, revoked_at_ms=revocation.revoked_at_ms)
        for event in fresh:
            moment = event.get("time")
            if isinstance(moment, int) and not isinstance(moment, bool):
                self._seen[str(event.get("id"))] = moment
                self._newest_ms = max(self._newest_ms, moment)
        horizon = self._newest_ms - OVERLAP_MS
        self._seen = {event_id: moment for event_id, moment in self._seen.items() if moment >= horizon}
        return revocations


def keycloak_admin_events(admin: Any) -> AdminEvents:
    """AdminEvents over python-keycloak's KeycloakAdmin (a client-credentials connection to the realm)."""

    def fetch(since_ms: int, first: int, count: int) -> list[Mapping[str, Any]]:
        try:
            events: list[Mapping[str, Any]] = admin.get_admin_events(
                {"dateFrom": since_ms, "direction": "asc", "first": first, "max": count})
        except KeycloakError as error:
            if error.response_code == 403:
                raise AdminEventsRefusedError(
                    "Keycloak refuses the audit service the realm's admin events (it lacks realm-management's "
                    "view-events role): the realm was imported before token revocation; `bastion reset` imports it "
                    "again") from None
            raise
        return events

    return fetch


class KafkaRevocationPublisher:
    """Publishes revocations on identity.revocations.v1, each a signed envelope (idempotent producer, acks=all)."""

    def __init__(self, kafka_config: dict[str, Any], key: FollowedSigningKey, timeout: float = 10.0) -> None:
        self.producer = Producer({**kafka_config, "enable.idempotence": True, "acks": "all"})
        self.key = key
        self.timeout = timeout

    def __call__(self, revocations: list[Revocation]) -> None:
        key = self.key.current()
        failures: list[KafkaError] = []

        def delivered(error: KafkaError | None, _message: Any) -> None:
            if error is not None:
                failures.append(error)

        for revocation in revocations:
            envelope = seal(key, TOPIC, revocation.message(), aggregate_id=revocation.subject or "everyone",
                            sequence=revocation.revoked_at_ms,
                            correlation_id=f"keycloak-{revocation.keycloak_event_id}"[:128],
                            event_id=revocation.event_id)
            self.producer.produce(TOPIC, value=envelope.SerializeToString(), key=envelope.aggregate_id.encode(),
                                  on_delivery=delivered)
        left = self.producer.flush(self.timeout)
        if failures or left:
            raise RevocationNotPublishedError(f"{len(failures) + left} of {len(revocations)} revocations were not "
                                              f"published on {TOPIC}: {[str(f) for f in failures][:3]}")
