"""The canonical signed bytes of an envelope, and Ed25519 signing and verification over them.

The signature never covers the protobuf wire encoding (which is not canonical): it covers the bytes that
`signed_bytes` builds, field by field, in a fixed order with explicit lengths. tests/vectors/envelope-v1.json
pins them, so any change to this function is a visible, deliberate break.
"""

import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bastion.events.errors import RejectReason, VerificationError
from bastion.events.v1.envelope_pb2 import Envelope

DOMAIN_TAG = b"bastion.events.v1.Envelope\x00"
SIGNATURE_BYTES = 64


def _text(number: int, value: str) -> bytes:
    return _blob(number, value.encode("utf-8"))


def _blob(number: int, value: bytes) -> bytes:
    return struct.pack(">BI", number, len(value)) + value


def signed_bytes(envelope: Envelope) -> bytes:
    """Every field but the signature (13), each as (field number, big-endian length or fixed width, value),
    in field-number order."""
    return b"".join(
        [
            DOMAIN_TAG,
            _text(1, envelope.event_id),
            _text(2, envelope.event_type),
            struct.pack(">BI", 3, envelope.schema_version),
            _text(4, envelope.producer),
            _text(5, envelope.key_id),
            _text(6, envelope.aggregate_id),
            struct.pack(">BQ", 7, envelope.sequence),
            struct.pack(">BqI", 8, envelope.occurred_at.seconds, envelope.occurred_at.nanos),
            _text(9, envelope.correlation_id),
            _text(10, envelope.causation_id),
            _text(11, envelope.topic),
            _blob(12, envelope.payload),
            struct.pack(">BqI", 14, envelope.published_at.seconds, envelope.published_at.nanos),
        ]
    )


def sign(envelope: Envelope, key: Ed25519PrivateKey) -> None:
    """Set the envelope's signature (the key id must already be set: it is signed too)."""
    envelope.signature = key.sign(signed_bytes(envelope))


def verify_signature(envelope: Envelope, key: Ed25519PublicKey) -> None:
    """Raise VerificationError(BAD_SIGNATURE) unless the signature is valid for this key."""
    if len(envelope.signature) != SIGNATURE_BYTES:
        raise VerificationError(RejectReason.BAD_SIGNATURE, "signature is not 64 bytes")
    try:
        key.verify(envelope.signature, signed_bytes(envelope))
    except InvalidSignature:
        raise VerificationError(RejectReason.BAD_SIGNATURE, "signature does not verify") from None
