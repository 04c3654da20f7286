"""Reads identity.revocations.v1 into a service's RevokedTokens.

Each service reads the topic as a witness (infra/event-access.yaml: READ by assigned partitions under a group of its
own, nothing committed): from LOOKBACK seconds ago, which covers every token still alive, to its end and on. Every
record passes the signed-events pipeline (signature, producer authorised for the type on this topic, schema,
freshness against the broker's append time); a refused one is logged, counted and recorded (the service's signed
EventRejected, through its outbox into the audit log, as a verifying consumer's refusals are) and changes nothing.
Replaying a revocation is harmless: it can only end tokens issued before the change it records, which already were.

Once a second the feed asks the broker where the topic ends: when everything up to there was read, the set is
current as of that moment (`RevokedTokens.confirm_current`). A broker that cannot be asked leaves it ageing, and
the services then refuse tokens (fail closed) once it is older than their limit.

The watch also says every few seconds that it is alive (`RevocationsCurrent`: every change before then was
published): the feed hands its time, or the broker's time of the record when that is earlier, to
`RevokedTokens.watched`. A topic read to its end while nobody watches the realm would otherwise read as "nothing
revoked".
"""

import datetime as dt
import time
from collections.abc import Callable
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from bastion.access.v1.decision_pb2 import AccessRevoked, RevocationsCurrent
from bastion.events.consumer import Refusal, broker_time, claimed_envelope, safe_claim
from bastion.events.errors import RejectReason, VerificationError
from bastion.events.metrics import EVENTS_APPLIED, EVENTS_REJECTED, REVOCATIONS_WATCHED_UNTIL
from bastion.events.verify import EnvelopeVerifier, VerifiedEvent, check_authorised, is_bundle
from bastion.revocations.revoked import RevokedTokens

log = structlog.get_logger(__name__)

TOPIC = "identity.revocations.v1"
# A revocation dated further than this after the broker took it counts as dated then: a producer's clock may be off
# (dropping it would fail open), but one dated years ahead would shut its subject out for years.
MAX_AHEAD = dt.timedelta(minutes=1)


# A record refused only because its key is not known here yet may be the audit service's first under a key it has
# just rotated to (this service looks at the trust store file every couple of seconds, and asks it again at once at
# most every half minute): it is tried again for this long before it counts as refused, and meanwhile the set is
# not confirmed current, so a genuine revocation is never dropped while later words of the watch verify.
UNKNOWN_KEY_RETRY_SECONDS = 15.0

RecordRefusals = Callable[[Message, list[Refusal]], None]  # the service's EventRejected records, for the audit log


class RevocationFeed:
    """A worker (`ServiceRuntime.start_worker`): reads the topic into REVOKED until STOP is set."""

    def __init__(self, consumer: str, kafka_config: dict[str, Any], group: str, verifier: EnvelopeVerifier,
                 revoked: RevokedTokens, lookback_seconds: float, check_every_seconds: float = 1.0,
                 make_consumer: Callable[[dict[str, Any]], Any] = Consumer,
                 monotonic: Callable[[], float] = time.monotonic, clock: Callable[[], float] = time.time,
                 record_refusals: RecordRefusals | None = None) -> None:
        self.name = consumer
        self.record_refusals = record_refusals
        self.verifier = verifier
        self.revoked = revoked
        self.lookback_seconds = lookback_seconds
        self.check_every_seconds = check_every_seconds
        self._monotonic = monotonic
        self._clock = clock
        self._consumer = make_consumer({**kafka_config, "group.id": group, "enable.auto.commit": False,
                                        "enable.partition.eof": False, "auto.offset.reset": "earliest"})
        self._next: dict[int, int] = {}  # partition -> the offset to read next
        # (partition, offset) -> when it was first refused for an unknown key, and the record, to be tried again
        self._key_not_known: dict[tuple[int, int], tuple[float, Message]] = {}

    def run(self, stop: Any) -> None:
        self._assign()
        last_check = float("-inf")
        while not stop.is_set():
            message = self._consumer.poll(0.2)
            if message is not None:
                self.take(message)
            if self._monotonic() - last_check >= self.check_every_seconds:
                last_check = self._monotonic()
                self.try_unknown_keys_again()
                self._confirm_if_read_to_end(last_check)

    def close(self) -> None:
        self._consumer.close()

    def _assign(self) -> None:
        metadata = self._consumer.list_topics(TOPIC, timeout=10).topics[TOPIC]
        if metadata.error is not None:
            raise KafkaException(metadata.error)
        if not metadata.partitions:  # nothing to read would be confirmed current at once
            raise KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION, f"{TOPIC} has no partitions"))
        # The ends are asked first: a revocation appended after the broker answered "nothing that recent" below is
        # then still read, where an end asked afterwards would start past it.
        ends = {partition: self._consumer.get_watermark_offsets(TopicPartition(TOPIC, partition), timeout=10)[1]
                for partition in metadata.partitions}
        since_ms = int((self._clock() - self.lookback_seconds) * 1000)
        wanted = [TopicPartition(TOPIC, partition, since_ms) for partition in metadata.partitions]
        starts = self._consumer.offsets_for_times(wanted, timeout=10)
        assigned = []
        for start in starts:
            if start.error is not None:  # a partition the broker could not place: reading it from the end would
                raise KafkaException(start.error)  # skip the revocations of the lookback
            offset = start.offset
            if offset < 0:  # nothing that recent: read from the end as it was before the question
                offset = ends[start.partition]
            self._next[start.partition] = offset
            assigned.append(TopicPartition(TOPIC, start.partition, offset))
        self._consumer.assign(assigned)
        log.info("revocation_feed_assigned", consumer=self.name, partitions=len(assigned),
                 lookback_seconds=self.lookback_seconds)

    def _confirm_if_read_to_end(self, asked_at: float) -> None:
        if self._key_not_known:  # read, but not judged yet
            return
        for partition, next_offset in self._next.items():
            try:
                _, end = self._consumer.get_watermark_offsets(TopicPartition(TOPIC, partition), timeout=5)
            except KafkaException as error:  # the broker is away: the set ages, and the services fail closed
                log.warning("revocation_feed_unconfirmed", consumer=self.name, error=str(error))
                return
            if next_offset > end:  # the log is not the one read (the topic made again, or truncated): what it
                # holds now was never read, and being past its end would confirm it current
                raise KafkaException(KafkaError(KafkaError._STATE, f"{TOPIC} [{partition}] ends at {end}, before "
                                                                   f"offset {next_offset} already read"))
            if next_offset < end:
                return
        self.revoked.confirm_current(asked_at)

    def take(self, message: Message) -> None:
        """Apply one record of the topic (or refuse it: logged, counted and recorded, nothing applied)."""
        error = message.error()
        if error is not None:
            if error.fatal():
                raise KafkaException(error)  # the worker is made again and reads from the lookback on
            # librdkafka reconnects by itself (a broker away for a while): meanwhile the set ages unconfirmed.
            log.warning("revocation_feed_kafka_error", consumer=self.name, error=error.str())
            return
        partition, offset = message.partition(), message.offset()
        self._next[partition] = max(self._next.get(partition, 0), offset + 1)
        self._judge(message, None)

    def try_unknown_keys_again(self) -> None:
        """Judge again the records refused for a key not known yet (the trust store may know it now)."""
        waiting, self._key_not_known = self._key_not_known, {}
        for since, message in waiting.values():
            self._judge(message, since)

    def _judge(self, message: Message, key_unknown_since: float | None) -> None:
        partition, offset = message.partition(), message.offset()
        raw: bytes = message.value() or b""
        received = broker_time(message)
        bundled = is_bundle(message.headers())
        refusals: list[Refusal] = []
        try:
            verified = self.verifier.verify_bundle(raw, TOPIC, received) if bundled else None
            outcomes = verified.outcomes if verified is not None else [self.verifier.verify(raw, TOPIC, received)]
        except VerificationError as refused:
            outcomes, refusals = [], [Refusal(raw, refused, bundled=bundled)]
        for item, outcome in enumerate(outcomes):
            try:
                if isinstance(outcome, VerificationError):
                    raise outcome
                self._apply(outcome, received)
            except VerificationError as refused:
                refusals.append(Refusal(verified.alone(item), refused, item, bundled=True) if verified is not None
                                else Refusal(raw, refused))
        if self._may_know_the_key_later(refusals, key_unknown_since):
            since = self._monotonic() if key_unknown_since is None else key_unknown_since
            self._key_not_known[(partition, offset)] = (since, message)
            if key_unknown_since is None:
                log.info("revocation_key_not_known_yet", consumer=self.name, partition=partition, offset=offset,
                         retry_seconds=UNKNOWN_KEY_RETRY_SECONDS)
            return
        for refusal in refusals:
            EVENTS_REJECTED.labels(self.name, TOPIC, str(refusal.error.reason)).inc()
            claimed = claimed_envelope(refusal.raw, refusal.bundled)
            log.warning("revocation_refused", consumer=self.name, partition=partition, offset=offset,
                        item=refusal.item, reason=str(refusal.error.reason), detail=refusal.error.detail,
                        claimed_producer=safe_claim(claimed.producer),
                        correlation_id=safe_claim(claimed.correlation_id))
        if refusals and self.record_refusals is not None:
            # A record that cannot be written fails the worker: made again, it reads the lookback and tries again.
            self.record_refusals(message, refusals)

    def _may_know_the_key_later(self, refusals: list[Refusal], key_unknown_since: float | None) -> bool:
        """Whether the whole record was refused only for its unknown key, claims a producer that may publish its type
        here (the audit service: anything else is refused at once), and is within the time it is tried again."""
        if len(refusals) != 1 or refusals[0].item is not None or refusals[0].error.reason != RejectReason.UNKNOWN_KEY:
            return False
        try:
            check_authorised(claimed_envelope(refusals[0].raw, refusals[0].bundled), TOPIC, self.verifier.policy)
        except VerificationError:
            return False
        return key_unknown_since is None or self._monotonic() - key_unknown_since < UNKNOWN_KEY_RETRY_SECONDS

    def _apply(self, event: VerifiedEvent, received: dt.datetime | None) -> None:
        if isinstance(event.payload, RevocationsCurrent):
            self._watched(event.payload, received)
            return
        revoked = event.payload
        if not isinstance(revoked, AccessRevoked):
            raise VerificationError(RejectReason.MALFORMED, f"{event.envelope.event_type} is not a revocation")
        if revoked.everyone == bool(revoked.subject or revoked.session_id):
            raise VerificationError(RejectReason.MALFORMED, "a revocation names a subject or a session, or "
                                                            "everyone: not both, not neither")
        revoked_at_ms = revoked.revoked_at.ToMilliseconds()
        reference = received or dt.datetime.now(dt.UTC)
        if revoked_at_ms <= 0:
            raise VerificationError(RejectReason.MALFORMED, "the revocation is not dated")
        latest_ms = int((reference + MAX_AHEAD).timestamp() * 1000)
        if revoked_at_ms > latest_ms:
            # Keycloak's clock ahead of the broker's, or a date no clock gives: the revocation still counts (dropping
            # it would fail open), up to the latest time it can honestly have.
            log.warning("revocation_dated_ahead", consumer=self.name, revoked_at_ms=revoked_at_ms,
                        applied_at_ms=latest_ms)
            revoked_at_ms = latest_ms
        self.revoked.revoke(revoked.subject or None, revoked_at_ms, revoked.session_id or None)
        EVENTS_APPLIED.labels(self.name, TOPIC).inc()
        log.info("token_access_revoked", consumer=self.name, subject=revoked.subject or "*",
                 session=revoked.session_id or "-", cause=revoked.cause,
                 revoked_at_ms=revoked_at_ms, correlation_id=event.envelope.correlation_id)

    def _watched(self, current: RevocationsCurrent, received: dt.datetime | None) -> None:
        as_of_ms = current.as_of.ToMilliseconds()
        if as_of_ms <= 0:
            raise VerificationError(RejectReason.MALFORMED, "the watch's word that it is alive is not dated")
        # Never later than the broker took it (or than now): a date ahead would keep a watch that died alive.
        reference = received or dt.datetime.now(dt.UTC)
        as_of_ms = min(as_of_ms, int(reference.timestamp() * 1000))
        REVOCATIONS_WATCHED_UNTIL.labels(self.name).set(self.revoked.watched(as_of_ms))
