"""Steps 1 to 5 of the consumer verification pipeline (docs/events.md), pure and in order:
size and parse (unknown fields rejected), producer and key known, signature, producer authorised for the
type on the topic, freshness. Steps 6 and 7 (inbox, sequence) need the consumer's database: see `inbox`.

A Kafka record holds one envelope (`verify`) or a bundle of them (`verify_bundle`, record header
`bastion-content: bundle-v1`): steps 1 to 3 then hold for the bundle as a whole, which one signature covers,
and steps 4 and 5 for each envelope in it.
"""

import datetime as dt
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from bastion.events.catalog import SCHEMAS
from bastion.events.errors import RejectReason, VerificationError
from bastion.events.keys import TrustSource, TrustStore
from bastion.events.signing import SignatureChecker, bundles_of_one
from bastion.events.trust import TrustPolicy
from bastion.events.v1.envelope_pb2 import Envelope, EnvelopeBundle

MAX_ENVELOPE_BYTES = 64 * 1024
# Kafka's default largest record (message.max.bytes, 1 MB with its overhead): the relay cuts bundles below it.
MAX_BUNDLE_BYTES = 1_000_000
BUNDLE_HEADER = "bastion-content"
BUNDLE_CONTENT = b"bundle-v1"


@dataclass(frozen=True)
class VerifiedEvent:
    envelope: Envelope
    payload: Message
    # Set for an envelope that arrived in a bundle: the bundle and its place there (the envelope carries no
    # signature of its own, see `alone`).
    bundle: "BundleOrigin | None" = None
    index: int = 0

    @property
    def event_id(self) -> str:
        return self.envelope.event_id

    def alone(self) -> bytes:
        """What verifies this event alone, to keep or forward: the envelope itself, or for an envelope of a bundle
        a bundle of one with the signature and its inclusion proof (read it with `verify_bundle`)."""
        if self.bundle is None:
            return self.envelope.SerializeToString()
        return self.bundle.alone(self.index)


@dataclass
class BundleOrigin:
    """The verified bundle an event came in, to cut it out alone. It holds no reference to the events (no cycle:
    a bundle's events are freed as soon as the consumer is done with them, not at the next garbage collection)."""

    bundle: EnvelopeBundle
    _alone: list[bytes] | None = None

    def alone(self, index: int) -> bytes:
        """Envelope INDEX as a bundle of one that verifies alone (the record itself if it is one already)."""
        if self.bundle.HasField("proof"):
            return self.bundle.SerializeToString()
        if self._alone is None:  # paths for every envelope at once, only when one is needed
            self._alone = [one.SerializeToString() for one in bundles_of_one(self.bundle)]
        return self._alone[index]


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature verified, and what became of each of its envelopes (steps 4 and 5)."""

    origin: BundleOrigin
    outcomes: list[VerifiedEvent | VerificationError]

    def alone(self, index: int) -> bytes:
        return self.origin.alone(index)


@dataclass(frozen=True)
class FreshnessWindow:
    max_age: dt.timedelta = dt.timedelta(minutes=5)
    max_skew: dt.timedelta = dt.timedelta(seconds=30)


_MESSAGE_FIELDS: dict[Descriptor, tuple[tuple[str, bool], ...]] = {}


def _message_fields(descriptor: Descriptor) -> tuple[tuple[str, bool], ...]:
    """(name, repeated) of the message-typed fields of DESCRIPTOR (maps left out), worked out once per type."""
    fields = _MESSAGE_FIELDS.get(descriptor)
    if fields is None:
        fields = _MESSAGE_FIELDS[descriptor] = tuple(
            (field.name, field.is_repeated) for field in descriptor.fields
            if field.message_type is not None and not field.message_type.GetOptions().map_entry
        )
    return fields


def _has_unknown_fields(message: Message) -> bool:
    """True if MESSAGE or any message inside it carries fields its schema does not know."""
    if len(UnknownFieldSet(message)):
        return True
    for name, repeated in _message_fields(message.DESCRIPTOR):  # type: ignore[arg-type]
        if repeated:
            if any(_has_unknown_fields(child) for child in getattr(message, name)):
                return True
        elif message.HasField(name) and _has_unknown_fields(getattr(message, name)):
            return True
    return False


# google.protobuf.Timestamp's own range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_TIMESTAMP_SECONDS = range(-62_135_596_800, 253_402_300_800)
_NANOS = range(1_000_000_000)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)


def _nanoseconds(moment: dt.datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND * 1000


def parse_envelope(raw: bytes, max_bytes: int = MAX_ENVELOPE_BYTES) -> Envelope:
    """Step 1: size limit, strict parse, no unknown fields, mandatory fields (the signature among them) present."""
    envelope = decode_envelope(raw, max_bytes)
    if not envelope.signature:
        raise VerificationError(RejectReason.MALFORMED, "missing fields: signature")
    return envelope


def decode_envelope(raw: bytes, max_bytes: int = MAX_ENVELOPE_BYTES) -> Envelope:
    """Step 1 without asking for a signature: what any envelope must be, signed or not. Consumers call
    `parse_envelope`; the benchmark's unsigned baseline calls this."""
    envelope = _parsed_strictly(Envelope(), raw, max_bytes, "envelope")
    check_envelope_fields(envelope)
    return envelope


Parsed = TypeVar("Parsed", Envelope, EnvelopeBundle)


def _parsed_strictly(message: Parsed, raw: bytes, max_bytes: int, what: str) -> Parsed:
    """RAW parsed into MESSAGE: within MAX_BYTES, a valid protobuf, no field its schema does not know."""
    if len(raw) > max_bytes:
        raise VerificationError(RejectReason.TOO_LARGE, f"{len(raw)} bytes is over the {max_bytes}-byte limit")
    try:
        message.ParseFromString(raw)
    except DecodeError as error:
        raise VerificationError(RejectReason.MALFORMED, f"not an {what}: {error}") from None
    if _has_unknown_fields(message):
        raise VerificationError(RejectReason.UNKNOWN_FIELDS, f"the {what} carries fields this schema does not know")
    return message


def check_envelope_fields(envelope: Envelope) -> None:
    """The fields every envelope must have, well formed: a UUID event id, the mandatory texts, both timestamps
    within google.protobuf.Timestamp's range, a sequence from 1."""
    try:
        uuid.UUID(envelope.event_id)
    except ValueError:
        raise VerificationError(RejectReason.MALFORMED, "event_id is not a UUID") from None
    missing = [name for name in ("event_type", "producer", "key_id", "aggregate_id", "topic")
               if not getattr(envelope, name)]
    timestamps = envelope.HasField("occurred_at") and envelope.HasField("published_at")
    if missing or not timestamps or envelope.sequence == 0:
        absent = ", ".join(missing) or "occurred_at, published_at or sequence"
        raise VerificationError(RejectReason.MALFORMED, f"missing fields: {absent}")
    for name, stamp in (("occurred_at", envelope.occurred_at), ("published_at", envelope.published_at)):
        # A Timestamp beyond year 9999 parses, but no datetime holds it: refuse it here, not crash later.
        if stamp.seconds not in _TIMESTAMP_SECONDS or stamp.nanos not in _NANOS:
            raise VerificationError(RejectReason.MALFORMED, f"{name} is out of range")


def decode_bundle(raw: bytes, max_bytes: int = MAX_BUNDLE_BYTES,
                  max_envelope_bytes: int = MAX_ENVELOPE_BYTES) -> tuple[EnvelopeBundle, list[Envelope]]:
    """Step 1 for a bundle: size limits (the bundle's, and each envelope's as if it came alone), strict parse of
    the bundle and of each envelope in it, no unknown fields anywhere, every envelope well formed
    (`check_envelope_fields`). Returns the bundle and its envelopes parsed. A bundle is one producer's record: if
    any part of it is not, the whole of it is refused."""
    bundle = _parsed_strictly(EnvelopeBundle(), raw, max_bytes, "envelope bundle")
    if not bundle.envelopes:
        raise VerificationError(RejectReason.MALFORMED, "the bundle holds no envelope")
    members = []
    for index, serialized in enumerate(bundle.envelopes):
        try:
            members.append(decode_envelope(serialized, max_envelope_bytes))
        except VerificationError as error:
            raise VerificationError(error.reason, f"envelope {index} of the bundle: {error.detail}") from None
    return bundle, members


def is_bundle(headers: list[tuple[str, bytes | None]] | None) -> bool:
    """Whether a record's headers say it holds a bundle (unsigned, like every header: a wrong one only makes
    the parse fail, and the record is refused as malformed)."""
    return any(name == BUNDLE_HEADER and value == BUNDLE_CONTENT for name, value in headers or ())


def parse_payload(envelope: Envelope) -> Message:
    """The payload, checked against the schema of its type and version, upcast to the current version."""
    schema = SCHEMAS.get(envelope.event_type)
    if schema is None:
        raise VerificationError(RejectReason.UNKNOWN_TYPE, f"no schema for {envelope.event_type!r}")
    if not 1 <= envelope.schema_version <= schema.current_version:
        raise VerificationError(
            RejectReason.UNKNOWN_TYPE, f"{envelope.event_type} has no schema version {envelope.schema_version}"
        )
    payload = schema.message()
    try:
        payload.ParseFromString(envelope.payload)
    except DecodeError as error:
        raise VerificationError(RejectReason.MALFORMED, f"payload is not a {envelope.event_type}: {error}") from None
    if _has_unknown_fields(payload):
        raise VerificationError(RejectReason.UNKNOWN_FIELDS, f"the {envelope.event_type} payload has unknown fields")
    for version in range(envelope.schema_version, schema.current_version):
        payload = schema.upcasters[version](payload)
    return payload


class EnvelopeVerifier:
    """Everything a consumer checks before an event may have any effect."""

    def __init__(
        self,
        trust: TrustSource,
        policy: TrustPolicy,
        window: FreshnessWindow = FreshnessWindow(),
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        max_bytes: int = MAX_ENVELOPE_BYTES,
        min_reload_seconds: float = 30.0,
    ) -> None:
        self.trust = trust
        self.min_reload_seconds = min_reload_seconds
        self._last_reload = float("-inf")
        self._believed = trust.current()
        self.policy = policy
        self.window = window
        self.clock = clock
        self.max_bytes = max_bytes
        self.signatures = SignatureChecker()

    @property
    def trust_store(self) -> TrustStore:
        """The public keys as the trust source says now (a followed trust store reads its file again when it
        changed): a retired key is refused from the next event on."""
        store = self.trust.current()
        if store is not self._believed:
            self._believed = store
            self.signatures.forget()
        return store

    def _public_key(self, envelope: Envelope) -> Ed25519PublicKey:
        """The producer's key; an unknown one also reads the trust store again at once (at most once per
        MIN_RELOAD_SECONDS), so a producer that rotated its key is believed before the next look at the file."""
        try:
            return self.trust_store.public_key(envelope.producer, envelope.key_id)
        except VerificationError as error:
            now = time.monotonic()
            if now - self._last_reload < self.min_reload_seconds:
                raise
            if error.reason not in (RejectReason.UNKNOWN_KEY, RejectReason.UNKNOWN_PRODUCER):
                raise
            self._last_reload = now
            self.trust.reload()
            return self.trust_store.public_key(envelope.producer, envelope.key_id)

    def verify(
        self, raw: bytes, topic: str, broker_time: dt.datetime | None = None, check_freshness: bool = True
    ) -> VerifiedEvent:
        """Run steps 1 to 5; raise VerificationError naming the first step that failed.

        Freshness is measured against the broker's append time when there is one (topics use
        LogAppendTime, which producers cannot set): a backlog read late is still fresh, while an old event
        re-published by an attacker is not. CHECK_FRESHNESS is off only for events the consumer itself held
        back after they passed every step on arrival.
        """
        envelope = parse_envelope(raw, self.max_bytes)
        key = self._public_key(envelope)
        self.signatures.verify(envelope, key)
        check_authorised(envelope, topic, self.policy)
        payload = parse_payload(envelope)
        if check_freshness:
            check_fresh(envelope, broker_time or self.clock(), self.window)
        return VerifiedEvent(envelope, payload)


    def verify_bundle(self, raw: bytes, topic: str, broker_time: dt.datetime | None = None,
                      check_freshness: bool = True) -> VerifiedBundle:
        """Steps 1 to 3 for the bundle as a whole (raise VerificationError naming the first that failed), then
        steps 4 and 5 for each of its envelopes: each outcome is a VerifiedEvent or the VerificationError that
        refused that envelope alone. CHECK_FRESHNESS is off only for a reader of history, or for an envelope
        the consumer itself held back after it passed every step (as in `verify`)."""
        bundle, members = decode_bundle(raw, max_envelope_bytes=self.max_bytes)
        key = self._public_key(members[0])  # a bundle is one producer's under one key: checked next
        self.signatures.verify_bundle(bundle, members, key)
        reference = broker_time or self.clock()
        origin = BundleOrigin(bundle)
        outcomes: list[VerifiedEvent | VerificationError] = []
        for index, member in enumerate(members):
            try:
                check_authorised(member, topic, self.policy)
                payload = parse_payload(member)
                if check_freshness:
                    check_fresh(member, reference, self.window)
            except VerificationError as error:
                outcomes.append(error)
                continue
            outcomes.append(VerifiedEvent(member, payload, origin, index))
        return VerifiedBundle(origin, outcomes)


def check_authorised(envelope: Envelope, topic: str, policy: TrustPolicy) -> None:
    """Step 4: read from the topic it was signed for, by a producer allowed to emit its type there."""
    if envelope.topic != topic:
        raise VerificationError(RejectReason.TOPIC_MISMATCH, f"signed for {envelope.topic!r} but read from {topic!r}")
    policy.check(topic, envelope.producer, envelope.event_type)


def check_fresh(envelope: Envelope, reference: dt.datetime, window: FreshnessWindow) -> None:
    """Step 5: published within WINDOW of REFERENCE (the broker's append time, or the clock); compared in
    integer nanoseconds."""
    published = envelope.published_at.seconds * 1_000_000_000 + envelope.published_at.nanos
    now = _nanoseconds(reference)
    if published < now - window.max_age // _MICROSECOND * 1000:
        late = dt.timedelta(microseconds=(now - published) // 1000)
        raise VerificationError(RejectReason.STALE, f"published {late} before it reached Kafka")
    if published > now + window.max_skew // _MICROSECOND * 1000:
        early = dt.timedelta(microseconds=(published - now) // 1000)
        raise VerificationError(RejectReason.FROM_THE_FUTURE, f"published {early} in the future")
