"""Building signed envelopes: the producer side of the signed-events kit."""

import datetime as dt
import os
import uuid
from collections.abc import Sequence

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from bastion.events.catalog import SCHEMAS
from bastion.events.keys import SigningKey
from bastion.events.signing import sign, sign_batch, sign_bundle
from bastion.events.v1.envelope_pb2 import Envelope, EnvelopeBundle


def new_event_ids(count: int) -> list[str]:
    """COUNT random (version 4) UUIDs as text, from one read of the OS's random source: `uuid.uuid4()` reads
    it once per id, which was the largest cost of building an envelope where many are built at once."""
    random = bytearray(os.urandom(16 * count))
    ids = []
    for start in range(0, 16 * count, 16):
        random[start + 6] = random[start + 6] & 0x0F | 0x40  # version 4
        random[start + 8] = random[start + 8] & 0x3F | 0x80  # RFC 4122 variant
        text = random[start:start + 16].hex()
        ids.append(f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}")
    return ids


def envelope_for(
    key: SigningKey,
    topic: str,
    payload: Message,
    aggregate_id: str,
    sequence: int,
    correlation_id: str,
    causation_id: str = "",
    occurred_at: dt.datetime | None = None,
    event_id: str | None = None,
    traceparent: str = "",
) -> Envelope:
    """An envelope for PAYLOAD at the current schema version of its type, not signed yet (see `seal`, or
    `signing.sign_batch` for several at once)."""
    event_type = str(payload.DESCRIPTOR.full_name)
    envelope = Envelope(
        event_id=event_id or str(uuid.uuid4()),
        event_type=event_type,
        schema_version=SCHEMAS[event_type].current_version,
        producer=key.producer,
        key_id=key.key_id,
        aggregate_id=aggregate_id,
        sequence=sequence,
        correlation_id=correlation_id,
        causation_id=causation_id,
        topic=topic,
        payload=payload.SerializeToString(deterministic=True),
        traceparent=traceparent,
    )
    envelope.occurred_at.FromDatetime(occurred_at or dt.datetime.now(dt.UTC))
    envelope.published_at.CopyFrom(envelope.occurred_at)
    return envelope


def seal(
    key: SigningKey,
    topic: str,
    payload: Message,
    aggregate_id: str,
    sequence: int,
    correlation_id: str,
    causation_id: str = "",
    occurred_at: dt.datetime | None = None,
    event_id: str | None = None,
) -> Envelope:
    """A signed envelope for PAYLOAD at the current schema version of its type."""
    envelope = envelope_for(key, topic, payload, aggregate_id, sequence, correlation_id, causation_id,
                            occurred_at, event_id)
    sign(envelope, key.private_key)
    return envelope


def _stamped(envelope: Envelope, key: SigningKey, published: Timestamp) -> None:
    if envelope.producer != key.producer:
        raise ValueError(f"an outbox row of {envelope.producer!r} cannot be published by {key.producer!r}")
    envelope.key_id = key.key_id
    envelope.published_at.CopyFrom(published)


def bundle(stored: Sequence[bytes], key: SigningKey, now: dt.datetime | None = None) -> EnvelopeBundle:
    """The stored envelopes, in this order, as the relay hands them to Kafka in one record: one bundle, published
    now and signed by their producer's current key (`signing.sign_bundle`), as `republish` does for envelopes
    sent one by one."""
    return bundle_of([Envelope.FromString(raw) for raw in stored], key, now)


def bundle_of(members: Sequence[Envelope], key: SigningKey, now: dt.datetime | None = None) -> EnvelopeBundle:
    """`bundle` of envelopes already parsed from their stored bytes (each is stamped in place)."""
    published = Timestamp()
    published.FromDatetime(now or dt.datetime.now(dt.UTC))
    serialized = []
    for member in members:
        member.ClearField("signature")
        member.ClearField("batch")
        _stamped(member, key, published)
        serialized.append(member.SerializeToString())
    signed = EnvelopeBundle(envelopes=serialized)
    sign_bundle(signed, key.private_key)
    return signed


def republish(stored: Sequence[bytes], key: SigningKey, now: dt.datetime | None = None) -> list[bytes]:
    """The stored envelopes as the relay hands them to Kafka, in this order: published now and signed together
    by their producer's current key, one signature over the batch's Merkle root (`signing.sign_batch`). Rows
    stored before a key rotation name the key that signs them now (the key id is signed too)."""
    published = Timestamp()
    published.FromDatetime(now or dt.datetime.now(dt.UTC))
    envelopes = [Envelope.FromString(raw) for raw in stored]
    for envelope in envelopes:
        _stamped(envelope, key, published)
    sign_batch(envelopes, key.private_key)
    return [envelope.SerializeToString() for envelope in envelopes]
