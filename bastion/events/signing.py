"""The canonical signed bytes of an envelope, and Ed25519 signing and verification over them.

The signature never covers the protobuf wire encoding (which is not canonical): it covers the bytes that
`signed_bytes` builds, field by field, in a fixed order with explicit lengths. tests/vectors/envelope-v1.json
pins them, so any change to this function is a visible, deliberate break.

An envelope is signed in one of two ways (docs/decisions.md, "One signature per relay batch"):
- alone (`sign`): the signature is Ed25519 over `signed_bytes(envelope)`;
- in a batch (`sign_batch`, what the outbox relay does): the signature is Ed25519 over
  `batch_signed_bytes(count, root)`, the root of the RFC 9162 Merkle tree whose leaves are the signed bytes
  of the batch's envelopes in order, and each envelope carries its inclusion proof (`Envelope.batch`).
  One Ed25519 operation then covers hundreds of events; a consumer checks each event's path (a few
  hashes) and verifies each distinct root once (`SignatureChecker`). tests/vectors/envelope-batch-v1.json
  pins these bytes.
A relay batch may also travel whole, one Kafka record per partition (`sign_bundle`, an `EnvelopeBundle`, what
the relay does): there the leaves are the envelopes' serialized bytes exactly as carried, not their canonical
signed bytes, and the signature covers `bundle_signed_bytes(count, root)` under a domain tag of its own. The
consumer holds every leaf and recomputes the root (`SignatureChecker.verify_bundle`), and never rebuilds any
bytes: it hashes what it received, then parses it. `bundles_of_one` cuts a bundle into one-envelope bundles
with their inclusion proofs, each verifying alone, for whoever keeps or forwards one envelope.
tests/vectors/envelope-bundle-v1.json pins these bytes.
Either way, changing any signed field, the payload, the proof or the signature makes verification fail.
"""

import struct
from collections import OrderedDict
from collections.abc import Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bastion.events import merkle
from bastion.events.errors import RejectReason, VerificationError
from bastion.events.v1.envelope_pb2 import Envelope, EnvelopeBundle

DOMAIN_TAG = b"bastion.events.v1.Envelope\x00"
BATCH_TAG = b"bastion.events.v1.Batch\x00"
BUNDLE_TAG = b"bastion.events.v1.Bundle\x00"
SIGNATURE_BYTES = 64
MAX_BATCH = 1 << 16

_length = struct.Struct(">BI").pack
_number = struct.Struct(">BQ").pack
_instant = struct.Struct(">BqI").pack
_count = struct.Struct(">I").pack


def signed_bytes(envelope: Envelope) -> bytes:
    """Every field but the signature (13) and the batch proof (15), each as (field number, big-endian length
    or fixed width, value), in field-number order. Strings are UTF-8; lengths are 4 bytes. The trace context (16)
    is there only when set, so an envelope without one has the signed bytes it always had."""
    event_id = envelope.event_id.encode()
    event_type = envelope.event_type.encode()
    producer = envelope.producer.encode()
    key_id = envelope.key_id.encode()
    aggregate_id = envelope.aggregate_id.encode()
    correlation_id = envelope.correlation_id.encode()
    causation_id = envelope.causation_id.encode()
    topic = envelope.topic.encode()
    payload = envelope.payload
    occurred, published = envelope.occurred_at, envelope.published_at
    return b"".join((
        DOMAIN_TAG,
        _length(1, len(event_id)), event_id,
        _length(2, len(event_type)), event_type,
        _length(3, envelope.schema_version),
        _length(4, len(producer)), producer,
        _length(5, len(key_id)), key_id,
        _length(6, len(aggregate_id)), aggregate_id,
        _number(7, envelope.sequence),
        _instant(8, occurred.seconds, occurred.nanos),
        _length(9, len(correlation_id)), correlation_id,
        _length(10, len(causation_id)), causation_id,
        _length(11, len(topic)), topic,
        _length(12, len(payload)), payload,
        _instant(14, published.seconds, published.nanos),
        *((_length(16, len(traceparent)), traceparent) if (traceparent := envelope.traceparent.encode()) else ()),
    ))


def batch_signed_bytes(leaf_count: int, root: bytes) -> bytes:
    """What a batch signature covers: its own domain tag, the number of leaves, the Merkle root."""
    return BATCH_TAG + _count(leaf_count) + root


def bundle_signed_bytes(leaf_count: int, root: bytes) -> bytes:
    """What a bundle signature covers: the bundle's domain tag (never a batch's), the number of leaves, the root
    of the tree whose leaves are the serialized envelopes."""
    return BUNDLE_TAG + _count(leaf_count) + root


def sign(envelope: Envelope, key: Ed25519PrivateKey) -> None:
    """Sign the envelope alone (the key id must already be set: it is signed too); any batch proof goes."""
    envelope.ClearField("batch")
    envelope.signature = key.sign(signed_bytes(envelope))


def _check_batch(envelopes: Sequence[Envelope]) -> None:
    if not 0 < len(envelopes) <= MAX_BATCH:
        raise ValueError(f"a signed batch holds 1 to {MAX_BATCH} envelopes, not {len(envelopes)}")
    if len({(envelope.producer, envelope.key_id) for envelope in envelopes}) != 1:
        raise ValueError("a signed batch is one producer's, under one key id")


def sign_batch(envelopes: Sequence[Envelope], key: Ed25519PrivateKey) -> None:
    """Sign ENVELOPES together, in this order: one Ed25519 signature over the root of their Merkle tree,
    and in each envelope that signature and its inclusion proof."""
    _check_batch(envelopes)
    root, paths = merkle.inclusion_proofs([merkle.leaf_hash(signed_bytes(envelope)) for envelope in envelopes])
    signature = key.sign(batch_signed_bytes(len(envelopes), root))
    for index, (envelope, path) in enumerate(zip(envelopes, paths, strict=True)):
        envelope.signature = signature
        proof = envelope.batch
        proof.Clear()
        proof.leaf_index = index
        proof.leaf_count = len(envelopes)
        proof.path.extend(path)


def sign_bundle(bundle: EnvelopeBundle, key: Ed25519PrivateKey) -> None:
    """Sign the bundle's envelopes (serialized, without signature or proof, all one producer's under one key id:
    the caller builds them so, `envelopes.bundle`) together, in their order."""
    members = bundle.envelopes
    if not 0 < len(members) <= MAX_BATCH:
        raise ValueError(f"a signed bundle holds 1 to {MAX_BATCH} envelopes, not {len(members)}")
    root = merkle.tree_root([merkle.leaf_hash(member) for member in members])
    bundle.ClearField("proof")
    bundle.signature = key.sign(bundle_signed_bytes(len(members), root))


def bundles_of_one(bundle: EnvelopeBundle) -> list[EnvelopeBundle]:
    """The bundle cut into one bundle per envelope, each with the signature and the envelope's inclusion proof:
    each verifies alone (`SignatureChecker.verify_bundle`) if and only if the whole one does."""
    members = bundle.envelopes
    _, paths = merkle.inclusion_proofs([merkle.leaf_hash(member) for member in members])
    alone = []
    for index, (member, path) in enumerate(zip(members, paths, strict=True)):
        one = EnvelopeBundle(envelopes=[member], signature=bundle.signature)
        one.proof.leaf_index = index
        one.proof.leaf_count = len(members)
        one.proof.path.extend(path)
        alone.append(one)
    return alone


class SignatureChecker:
    """Checks envelope signatures, alone or in batches, remembering what it already established.

    - A batch root whose signature verified is remembered (up to MAX_ROOTS, least recently used first out),
      so the other events of the batch cost their path only. The memory holds (producer, key id, signature,
      signed bytes) and the public key that verified them: an event matches it only if its own leaf and path
      lead to exactly that root and the key it is checked against is that key.
    - Inner nodes computed along paths are remembered too (up to MAX_NODES, then forgotten at once): a node
      is a pure function of its two children, so a remembered one is the same value computed again.
    Call `forget` when the trust store changes, so no key that was withdrawn is still believed.
    """

    def __init__(self, max_roots: int = 4096, max_nodes: int = 1 << 16) -> None:
        self.max_roots = max_roots
        self.max_nodes = max_nodes
        self._roots: OrderedDict[tuple[str, str, bytes, bytes], Ed25519PublicKey] = OrderedDict()
        self._nodes: dict[bytes, bytes] = {}
        self.signature_checks = 0

    def forget(self) -> None:
        self._roots.clear()

    def _node(self, left: bytes, right: bytes) -> bytes:
        children = left + right
        parent = self._nodes.get(children)
        if parent is None:
            if len(self._nodes) >= self.max_nodes:
                self._nodes.clear()
            parent = self._nodes[children] = merkle.node_hash(left, right)
        return parent

    def verify(self, envelope: Envelope, key: Ed25519PublicKey) -> None:
        """Raise VerificationError(BAD_SIGNATURE) unless the envelope's signature is valid for KEY, the
        public key of (envelope.producer, envelope.key_id)."""
        if len(envelope.signature) != SIGNATURE_BYTES:
            raise VerificationError(RejectReason.BAD_SIGNATURE, "signature is not 64 bytes")
        if not envelope.HasField("batch"):
            self._check(key, envelope.signature, signed_bytes(envelope))
            return
        proof = envelope.batch
        if not 0 < proof.leaf_count <= MAX_BATCH:
            raise VerificationError(RejectReason.BAD_SIGNATURE, f"a batch of {proof.leaf_count} cannot be signed")
        try:
            root = merkle.root_from_proof(merkle.leaf_hash(signed_bytes(envelope)), proof.leaf_index,
                                          proof.leaf_count, proof.path, self._node)
        except merkle.ProofError as error:
            raise VerificationError(RejectReason.BAD_SIGNATURE, f"batch proof: {error}") from None
        message = batch_signed_bytes(proof.leaf_count, root)
        remembered = (envelope.producer, envelope.key_id, envelope.signature, message)
        believed = self._roots.get(remembered)
        if believed is not None and (believed is key or believed == key):
            self._roots.move_to_end(remembered)
            return
        self._check(key, envelope.signature, message)
        self._roots[remembered] = key
        if len(self._roots) > self.max_roots:
            self._roots.popitem(last=False)

    def verify_bundle(self, bundle: EnvelopeBundle, members: Sequence[Envelope], key: Ed25519PublicKey) -> None:
        """Raise VerificationError(BAD_SIGNATURE) unless the bundle's signature is valid for KEY over the root of
        its serialized envelopes in order (or, with a proof, of the bundle its one envelope was cut from).
        MEMBERS are those envelopes parsed: all one producer's under one key id (KEY's), none signed alone."""
        leaves = [merkle.leaf_hash(member) for member in bundle.envelopes]
        if not 0 < len(leaves) <= MAX_BATCH:
            raise VerificationError(RejectReason.BAD_SIGNATURE, f"a bundle of {len(leaves)} cannot be signed")
        if len(bundle.signature) != SIGNATURE_BYTES:
            raise VerificationError(RejectReason.BAD_SIGNATURE, "signature is not 64 bytes")
        producer, key_id = members[0].producer, members[0].key_id
        for member in members:
            if member.producer != producer or member.key_id != key_id:
                raise VerificationError(RejectReason.BAD_SIGNATURE, "a bundle is one producer's, under one key id")
            if member.signature or member.HasField("batch"):
                raise VerificationError(RejectReason.BAD_SIGNATURE, "an envelope of a bundle carries a signature")
        if not bundle.HasField("proof"):
            self._check(key, bundle.signature, bundle_signed_bytes(len(leaves), merkle.tree_root(leaves)))
            return
        proof = bundle.proof
        if len(leaves) != 1 or not 0 < proof.leaf_count <= MAX_BATCH:
            raise VerificationError(RejectReason.BAD_SIGNATURE, "a proof places one envelope in a bundle")
        try:
            root = merkle.root_from_proof(leaves[0], proof.leaf_index, proof.leaf_count, proof.path, self._node)
        except merkle.ProofError as error:
            raise VerificationError(RejectReason.BAD_SIGNATURE, f"bundle proof: {error}") from None
        self._check(key, bundle.signature, bundle_signed_bytes(proof.leaf_count, root))

    def _check(self, key: Ed25519PublicKey, signature: bytes, message: bytes) -> None:
        self.signature_checks += 1
        try:
            key.verify(signature, message)
        except InvalidSignature:
            raise VerificationError(RejectReason.BAD_SIGNATURE, "signature does not verify") from None


def verify_signature(envelope: Envelope, key: Ed25519PublicKey) -> None:
    """Raise VerificationError(BAD_SIGNATURE) unless the signature is valid for this key (nothing remembered)."""
    SignatureChecker(max_roots=0, max_nodes=0).verify(envelope, key)
