"""Event labs: signed events altered in transit, emitted by a producer not trusted for their type, carrying
fields their schema does not know, or replayed; and a principal writing to a topic it has no ACL for.

The lab plays the producer's relay with the producer's own signing key from the install's key ring, injects into
the target's route for the topic (the platform topic by default), and reads the verdicts of the topic's
verifying consumers from the dead-letter topic, as an investigator would."""

import re
import time
import uuid
from collections.abc import Iterator

from confluent_kafka import KafkaError
from confluent_kafka.admin import AdminClient
from google.protobuf.message import DecodeError

from bastion.accounts.v1.events_pb2 import MoneyDeposited
from bastion.events.envelopes import seal
from bastion.events.inbox import Admission
from bastion.events.keys import SigningKey
from bastion.events.signing import sign
from bastion.events.v1.envelope_pb2 import Envelope, EnvelopeBundle
from bastion.events.verify import is_bundle
from bastion.labs.bank import Bank, euros
from bastion.labs.base import Evidence
from bastion.labs.platform import (
    TIMEOUT,
    DeadLetters,
    LabSetupError,
    Session,
    TopicTail,
    Watch,
    new_correlation_id,
)
from bastion.notifications.v1 import notifications_pb2, notifications_pb2_grpc

ACCOUNTS_TOPIC = "accounts.events.v1"
PAYMENTS_TOPIC = "payments.events.v1"
# A field number no schema of the platform uses, length-delimited, carrying three bytes.
UNKNOWN_FIELD = b"\xa2\x06\x03lab"
NOTIFICATIONS_PAGE = 500
DEPOSITED = str(MoneyDeposited.DESCRIPTOR.full_name)
DROP_REASON = re.compile(r'reason"?\s*[=:]\s*"?([a-z_]+)')  # of an event_dropped line, as rendered or as JSON


def forged_deposit(session: Session, producer: str, platform_topic: str, amount: int, correlation_id: str,
                   sequence: int = 1, key: SigningKey | None = None, account: str | None = None) -> Envelope:
    """A MoneyDeposited as PRODUCER's relay would hand it to Kafka (signed with KEY, by default PRODUCER's active
    key), for the target's route of PLATFORM_TOPIC, into ACCOUNT, by default a new one nobody has (its aggregate's
    event SEQUENCE): even an accepted forgery would touch nobody's data."""
    account = account or str(uuid.uuid4())
    payload = MoneyDeposited(account_id=account, amount_minor=amount, currency="EUR", balance_minor=amount,
                             idempotency_key=f"lab-{uuid.uuid4()}")
    route = session.target.event_routes[platform_topic]
    return seal(key or session.signing_key(producer), route.topic, payload, account, sequence, correlation_id)


def inject(session: Session, platform_topic: str, principal: str, record: bytes, expected: str,
            correlation_id: str) -> Iterator[Evidence]:
    """Write RECORD to the route of PLATFORM_TOPIC as Kafka PRINCIPAL; each verifying consumer of the route must
    dead-letter it with reason EXPECTED."""
    route = session.target.event_routes[platform_topic]
    watch = session.watch()
    dead = DeadLetters(session, route.topic)
    try:
        delivery = session.publish(principal, route.topic, record)
        if delivery.error is not None:
            raise LabSetupError(f"{principal} could not write to {route.topic}: {delivery.error.str()}")
        yield Evidence("published", f"{route.topic} at {delivery.source}, as Kafka principal {principal}")
        wait = session.target.verdict_wait_seconds
        verdicts = dead.verdicts(delivery.source, route.consumers, wait)
    finally:
        dead.close()
    for consumer in route.consumers:
        headers = verdicts.get(consumer)
        if headers is None:
            yield Evidence(f"verdict of {consumer}", f"no dead letter within {wait:.0f}s: the event was not refused",
                           False)
            continue
        reason = headers.get("bastion-reject-reason", "")
        detail = headers.get("bastion-reject-detail", "")
        yield Evidence(f"{consumer} dead-lettered it to {dead.topic}", f"bastion-reject-reason {reason}: {detail}",
                       reason == expected)
    yield from _context(watch, route.consumers, correlation_id)


def _context(watch: Watch, consumers: tuple[str, ...], correlation_id: str) -> Iterator[Evidence]:
    """Each refusal is also logged by its consumer and kept in the audit log as a rejection record."""
    for consumer in consumers:
        for line in watch.log_lines(consumer, "event_rejected", correlation_id)[:1]:
            yield Evidence(f"{consumer}.log", line)
    for entry in watch.audit_entries(correlation_id, count=len(consumers)):
        yield Evidence("audit trail", str(entry))


def tampered_event(session: Session) -> Iterator[Evidence]:
    correlation_id = new_correlation_id("tampered-event")
    envelope = forged_deposit(session, "accounts", ACCOUNTS_TOPIC, 100, correlation_id)
    tampered = Envelope()
    tampered.CopyFrom(envelope)
    changed = MoneyDeposited.FromString(envelope.payload)
    changed.amount_minor = changed.balance_minor = 100_000_000
    tampered.payload = changed.SerializeToString(deterministic=True)
    yield Evidence("the tampered copy", f"MoneyDeposited of {euros(100)} rewritten to {euros(100_000_000)}, "
                   "accounts' signature over the original left in place")
    yield from inject(session, ACCOUNTS_TOPIC, "accounts", tampered.SerializeToString(), "bad_signature",
                       correlation_id)


def foreign_event_type(session: Session) -> Iterator[Evidence]:
    correlation_id = new_correlation_id("foreign-event-type")
    envelope = forged_deposit(session, "payments", PAYMENTS_TOPIC, 100_000_000, correlation_id)
    yield Evidence("the event", f"{envelope.event_type} of {euros(100_000_000)}, validly signed with payments' key "
                   f"{envelope.key_id[:12]}…, on payments' own topic")
    yield from inject(session, PAYMENTS_TOPIC, "payments", envelope.SerializeToString(), "not_authorised",
                       correlation_id)


def unknown_schema(session: Session) -> Iterator[Evidence]:
    correlation_id = new_correlation_id("unknown-schema")
    envelope = forged_deposit(session, "accounts", ACCOUNTS_TOPIC, 100, correlation_id)
    envelope.payload = envelope.payload + UNKNOWN_FIELD
    sign(envelope, session.signing_key("accounts").private_key)
    yield Evidence("the event", "a MoneyDeposited whose payload carries a field its schema does not know, "
                   "signed by accounts over those very bytes")
    yield from inject(session, ACCOUNTS_TOPIC, "accounts", envelope.SerializeToString(), "unknown_fields",
                       correlation_id)


def topic_without_acl(session: Session) -> Iterator[Evidence]:
    visible = AdminClient(session.kafka_config("notifications")).list_topics(timeout=10).topics
    yield Evidence("notifications' SCRAM credentials (calibration)", f"authenticated: {len(visible)} topics visible")
    topic = session.target.event_routes[PAYMENTS_TOPIC].topic
    delivery = session.publish("notifications", topic, b"lab: a forged payment event")
    if delivery.error is None:
        yield Evidence(f"notifications producing to {topic}", f"accepted at {delivery.source}", False)
        return
    yield Evidence(f"notifications producing to {topic}", f"{delivery.error.name()}: {delivery.error.str()}",
                   delivery.error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED)


def replayed_event(session: Session) -> Iterator[Evidence]:
    """A genuine MoneyDeposited the accounts service published, captured from the topic and published again:
    the verifying consumer of notifications must drop it (inbox) and bob must not be told twice."""
    bank = Bank(session, "replayed-event")
    correlation_id = new_correlation_id("replayed-event")
    account = bank.open_account("bob")
    route = session.target.event_routes[ACCOUNTS_TOPIC]
    inbox = notifications_pb2_grpc.NotificationsStub(session.channel("notifications"))  # type: ignore[no-untyped-call]
    last_seen = last_notification(session, inbox)
    capture = TopicTail(session, route.topic)
    watch_from_start = session.watch()
    try:
        bank.deposit(account, 100, correlation_id)
        raw, headers, envelope = first_event(capture, account, DEPOSITED, session.target.verdict_wait_seconds)
    finally:
        capture.close()
    yield Evidence("captured", f"the genuine {envelope.event_type} of {euros(100)} into bob's account, event "
                   f"{envelope.event_id}, as the accounts service published it")
    told = times_told(session, inbox, envelope.event_id, last_seen, wait=True)
    if told != 1:
        raise LabSetupError(f"bob's notification of the genuine deposit did not arrive ({told} found)")
    yield Evidence("bob's notifications (calibration)", "told once of the genuine deposit")
    watch = session.watch()
    delivery = session.publish("accounts", route.topic, raw, key=account.encode(), headers=headers)
    if delivery.error is not None:
        raise LabSetupError(f"accounts could not write to {route.topic}: {delivery.error.str()}")
    carried = "the same record (the relay's bundle that carried it)" if headers else "the same bytes"
    yield Evidence("replayed", f"{carried} published again to {route.topic} at {delivery.source}")
    dropped = watch.log_lines("notifications", "event_dropped", envelope.event_id,
                              wait_seconds=session.target.verdict_wait_seconds)
    # The inbox recognising the event id is the defence: a drop for another reason (its sequence, say) is another.
    reasons = [found.group(1) for line in dropped if (found := DROP_REASON.search(line))]
    yield Evidence("notifications.log", dropped[0] if dropped else
                   f"no event_dropped line for the replay within {session.target.verdict_wait_seconds:.0f}s",
                   str(Admission.DUPLICATE) in reasons)
    told = times_told(session, inbox, envelope.event_id, last_seen, wait=False)
    yield Evidence("bob's notifications after the replay", f"told {told} time(s) of that deposit", told == 1)
    kept = watch_from_start.audit_entries(correlation_id, count=2, kind="event")
    if len(kept) >= 2:
        yield Evidence("audit trail", f"seq {kept[0].seq} (genuine) and seq {kept[1].seq} (replay): both kept as "
                       "evidence; the audit log records what was seen and applies nothing")


def last_notification(session: Session, inbox: notifications_pb2_grpc.NotificationsStub,
                      lab: str = "replayed-event") -> int:
    """The sequence of bob's newest notification (0 if none)."""
    last = 0
    while True:
        page = inbox.ListNotifications(
            notifications_pb2.ListNotificationsRequest(after_sequence=last, limit=NOTIFICATIONS_PAGE),
            metadata=session.as_user("bob", new_correlation_id(lab)), timeout=TIMEOUT).notifications
        if not page:
            return last
        last = page[-1].sequence
        if len(page) < NOTIFICATIONS_PAGE:
            return int(last)


def times_told(session: Session, inbox: notifications_pb2_grpc.NotificationsStub, event_id: str, after: int,
               wait: bool, lab: str = "replayed-event") -> int:
    """How many of bob's notifications after AFTER came from EVENT_ID (waiting for the first if WAIT)."""
    deadline = time.monotonic() + (session.target.verdict_wait_seconds if wait else 0)
    while True:
        page = inbox.ListNotifications(
            notifications_pb2.ListNotificationsRequest(after_sequence=after, limit=NOTIFICATIONS_PAGE),
            metadata=session.as_user("bob", new_correlation_id(lab)), timeout=TIMEOUT).notifications
        count = sum(1 for notification in page if notification.event_id == event_id)
        if count or time.monotonic() >= deadline:
            return count
        time.sleep(0.3)


def first_event(tail: TopicTail, aggregate_id: str, event_type: str, wait_seconds: float
                ) -> tuple[bytes, list[tuple[str, bytes]], Envelope]:
    """The first EVENT_TYPE of AGGREGATE_ID on TAIL's topic: the record that carried it (its bytes and headers;
    the relay sends bundles of envelopes) and the envelope."""
    for message in tail.records(wait_seconds):
        headers = [(name, value) for name, value in message.headers() or [] if value is not None]
        try:
            carried = EnvelopeBundle.FromString(message.value()).envelopes if is_bundle(headers) else [message.value()]
            envelopes = [Envelope.FromString(serialized) for serialized in carried]
        except DecodeError:  # not an envelope (another lab's junk, say): not the record we wait for
            continue
        for envelope in envelopes:
            if envelope.aggregate_id == aggregate_id and envelope.event_type == event_type:
                return bytes(message.value()), headers, envelope
    raise LabSetupError(f"no {event_type} of {aggregate_id} appeared within {wait_seconds:.0f}s")
