"""The canonical signed bytes and Ed25519 signatures: pinned by test vectors, and every change detected."""

import json
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from bastion.events.envelopes import new_event_ids
from bastion.events.errors import RejectReason, VerificationError
from bastion.events.signing import sign, signed_bytes, verify_signature
from bastion.events.v1.envelope_pb2 import Envelope

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "envelope-v1.json").read_text())
KEY = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(VECTORS["private_key_seed_hex"]))


def vector_envelope() -> Envelope:
    fields = dict(VECTORS["envelope"])
    seconds, nanos = fields.pop("occurred_at_seconds"), fields.pop("occurred_at_nanos")
    published_seconds, published_nanos = fields.pop("published_at_seconds"), fields.pop("published_at_nanos")
    envelope = Envelope(**{k: v for k, v in fields.items() if k != "payload_hex"},
                        payload=bytes.fromhex(fields["payload_hex"]))
    envelope.occurred_at.seconds, envelope.occurred_at.nanos = seconds, nanos
    envelope.published_at.seconds, envelope.published_at.nanos = published_seconds, published_nanos
    return envelope


def test_vectors_pin_the_signed_bytes_and_the_signature() -> None:
    envelope = vector_envelope()
    assert signed_bytes(envelope).hex() == VECTORS["signed_bytes_hex"]
    sign(envelope, KEY)
    assert envelope.signature.hex() == VECTORS["signature_hex"]
    verify_signature(envelope, KEY.public_key())


text = st.text(max_size=40)
envelopes = st.builds(
    Envelope,
    event_id=text, event_type=text, schema_version=st.integers(0, 2**32 - 1), producer=text, key_id=text,
    aggregate_id=text, sequence=st.integers(0, 2**64 - 1), correlation_id=text, causation_id=text, topic=text,
    payload=st.binary(max_size=200), traceparent=st.sampled_from(["", f"00-{'a' * 32}-{'b' * 16}-01"]) | text,
)


@given(envelopes, st.integers(-(2**40), 2**40), st.integers(0, 999_999_999))
def test_encode_decode_round_trip_keeps_the_signature_valid(envelope: Envelope, seconds: int, nanos: int) -> None:
    envelope.occurred_at.seconds, envelope.occurred_at.nanos = seconds, nanos
    sign(envelope, KEY)
    decoded = Envelope.FromString(envelope.SerializeToString())
    assert decoded == envelope
    verify_signature(decoded, KEY.public_key())


SIGNED_FIELDS = ["event_id", "event_type", "schema_version", "producer", "key_id", "aggregate_id", "sequence",
                 "occurred_at", "correlation_id", "causation_id", "topic", "payload", "published_at", "traceparent"]


def _tamper(envelope: Envelope, field: str, data: st.DataObject) -> None:
    if field in ("schema_version", "sequence"):
        current = getattr(envelope, field)
        setattr(envelope, field, data.draw(st.integers(0, 2**32 - 1).filter(lambda v: v != current)))
    elif field in ("occurred_at", "published_at"):
        stamp = getattr(envelope, field)
        stamp.nanos = (stamp.nanos + data.draw(st.integers(1, 999))) % 1_000_000_000
    elif field == "payload":
        current = envelope.payload
        envelope.payload = data.draw(st.binary(max_size=50).filter(lambda v: v != current))
    else:
        current = getattr(envelope, field)
        setattr(envelope, field, data.draw(text.filter(lambda v: v != current)))


@given(envelopes, st.sampled_from(SIGNED_FIELDS), st.data())
def test_any_change_to_a_signed_field_is_detected(envelope: Envelope, field: str, data: st.DataObject) -> None:
    envelope.occurred_at.seconds = 1_800_000_000
    sign(envelope, KEY)
    _tamper(envelope, field, data)
    with pytest.raises(VerificationError) as refused:
        verify_signature(envelope, KEY.public_key())
    assert refused.value.reason == RejectReason.BAD_SIGNATURE


@given(envelopes, st.integers(0, 63), st.integers(0, 7))
def test_any_flipped_signature_bit_is_detected(envelope: Envelope, byte: int, bit: int) -> None:
    sign(envelope, KEY)
    flipped = bytearray(envelope.signature)
    flipped[byte] ^= 1 << bit
    envelope.signature = bytes(flipped)
    with pytest.raises(VerificationError, match="does not verify"):
        verify_signature(envelope, KEY.public_key())


def test_truncated_or_missing_signature_is_refused() -> None:
    envelope = vector_envelope()
    sign(envelope, KEY)
    envelope.signature = envelope.signature[:32]
    with pytest.raises(VerificationError, match="not 64 bytes"):
        verify_signature(envelope, KEY.public_key())


def test_another_key_does_not_verify() -> None:
    envelope = vector_envelope()
    sign(envelope, Ed25519PrivateKey.generate())
    with pytest.raises(VerificationError, match="does not verify"):
        verify_signature(envelope, KEY.public_key())


def test_the_traced_vector_pins_where_the_trace_context_goes_in_the_signed_bytes() -> None:
    traced = vector_envelope()
    traced.traceparent = VECTORS["traced"]["traceparent"]
    assert signed_bytes(traced).hex() == VECTORS["traced"]["signed_bytes_hex"]
    sign(traced, KEY)
    assert traced.signature.hex() == VECTORS["traced"]["signature_hex"]
    verify_signature(traced, KEY.public_key())


def test_trace_context_is_signed_when_set_and_absent_from_the_signed_bytes_otherwise() -> None:
    """Field 16 joined the envelope later: without it the signed bytes are the pinned vector's, so every envelope
    signed before still verifies; with it, adding, changing or removing it breaks the signature."""
    envelope = vector_envelope()
    assert signed_bytes(envelope) == bytes.fromhex(VECTORS["signed_bytes_hex"])
    traced = vector_envelope()
    traced.traceparent = f"00-{'a' * 32}-{'b' * 16}-01"
    assert signed_bytes(traced).startswith(signed_bytes(envelope)) and signed_bytes(traced) != signed_bytes(envelope)
    for before, after in ((envelope, traced.traceparent), (traced, ""), (traced, f"00-{'a' * 32}-{'c' * 16}-01")):
        copy = Envelope()
        copy.CopyFrom(before)
        sign(copy, KEY)
        copy.traceparent = after
        with pytest.raises(VerificationError, match="does not verify"):
            verify_signature(copy, KEY.public_key())


def test_length_prefixes_make_field_boundaries_unambiguous() -> None:
    a, b = vector_envelope(), vector_envelope()
    a.event_type, a.producer = "ab", "c"
    b.event_type, b.producer = "a", "bc"
    assert signed_bytes(a) != signed_bytes(b)


def test_event_ids_made_in_bulk_are_distinct_version_4_uuids() -> None:
    ids = new_event_ids(2_000)
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert new_event_ids(0) == []
