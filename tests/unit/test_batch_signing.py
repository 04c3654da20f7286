"""One signature per batch: the RFC 9162 Merkle tree, the pinned batch vector, and every change detected,
including changes to the proof, with and without a remembered root."""

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from bastion.events import merkle
from bastion.events.errors import RejectReason, VerificationError
from bastion.events.signing import (
    SignatureChecker,
    batch_signed_bytes,
    sign,
    sign_batch,
    signed_bytes,
    verify_signature,
)
from bastion.events.v1.envelope_pb2 import Envelope
from tests.unit.test_signing import KEY, SIGNED_FIELDS, _tamper, envelopes, vector_envelope

BATCH = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "envelope-batch-v1.json").read_text())

# The reference data of Certificate Transparency (RFC 6962 section 2.1, the trees of google/certificate-transparency
# and transparency-dev/merkle): eight leaf inputs, the root of the first n of them, and two audit paths.
CT_LEAVES = [bytes.fromhex(x) for x in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                        "606162636465666768696a6b6c6d6e6f"]]
CT_ROOTS = ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"]
CT_PATH_0_OF_8 = ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                  "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                  "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]


def reference_root(leaves: list[bytes]) -> bytes:
    """RFC 6962's MTH, written as the RFC states it."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return merkle.node_hash(reference_root(leaves[:k]), reference_root(leaves[k:]))


def test_the_tree_is_the_one_of_certificate_transparency() -> None:
    hashes = [merkle.leaf_hash(leaf) for leaf in CT_LEAVES]
    for size, expected in enumerate(CT_ROOTS, start=1):
        root, paths = merkle.inclusion_proofs(hashes[:size])
        assert root.hex() == expected
        for index, path in enumerate(paths):
            assert merkle.root_from_proof(hashes[index], index, size, path) == root
    assert [p.hex() for p in merkle.inclusion_proofs(hashes)[1][0]] == CT_PATH_0_OF_8


@given(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=70))
def test_every_leaf_proves_its_place_and_no_other(leaves: list[bytes]) -> None:
    """(The same path may fit a tree of another size: the size is signed with the root, see below.)"""
    root, paths = merkle.inclusion_proofs(leaves)
    assert root == reference_root(leaves)
    size = len(leaves)
    for index, path in enumerate(paths):
        assert merkle.root_from_proof(leaves[index], index, size, path) == root
        for other in range(size):  # the same path never proves another place (unless the leaves are equal)
            try:
                claimed = merkle.root_from_proof(leaves[index], other, size, path)
            except merkle.ProofError:
                continue
            assert claimed != root or other == index or leaves[other] == leaves[index]


@pytest.mark.parametrize("index, size, length, problem", [
    (3, 3, 2, "outside"), (0, 4, 1, "shorter"), (0, 4, 3, "longer"), (0, 1, 1, "longer"),
])
def test_paths_that_cannot_fit_the_tree_are_refused(index: int, size: int, length: int, problem: str) -> None:
    with pytest.raises(merkle.ProofError, match=problem):
        merkle.root_from_proof(bytes(32), index, size, [bytes(32)] * length)


def batch_vector() -> list[Envelope]:
    envelopes = []
    for sequence, event_id in enumerate(BATCH["event_ids"], start=1):
        envelope = vector_envelope()
        envelope.sequence, envelope.event_id = sequence, event_id
        envelopes.append(envelope)
    return envelopes


def test_the_vector_pins_leaves_root_signed_bytes_signature_and_wire_bytes() -> None:
    batch = batch_vector()
    leaves = [merkle.leaf_hash(signed_bytes(envelope)) for envelope in batch]
    assert [leaf.hex() for leaf in leaves] == BATCH["leaf_hashes_hex"]
    root, _ = merkle.inclusion_proofs(leaves)
    assert root.hex() == BATCH["root_hex"]
    assert batch_signed_bytes(len(batch), root).hex() == BATCH["batch_signed_bytes_hex"]
    sign_batch(batch, KEY)
    assert {envelope.signature.hex() for envelope in batch} == {BATCH["signature_hex"]}
    assert [[p.hex() for p in envelope.batch.path] for envelope in batch] == BATCH["paths_hex"]
    assert [envelope.SerializeToString().hex() for envelope in batch] == BATCH["envelopes_hex"]
    for raw in BATCH["envelopes_hex"]:
        verify_signature(Envelope.FromString(bytes.fromhex(raw)), KEY.public_key())


def refused(envelope: Envelope, checker: SignatureChecker | None = None) -> str:
    with pytest.raises(VerificationError) as refusal:
        (checker or SignatureChecker()).verify(envelope, KEY.public_key())
    assert refusal.value.reason == RejectReason.BAD_SIGNATURE
    return refusal.value.detail


def signed_batch(batch: list[Envelope]) -> tuple[list[Envelope], SignatureChecker]:
    """BATCH signed together, and a checker that already believes its root."""
    for number, envelope in enumerate(batch):
        envelope.occurred_at.seconds = 1_800_000_000
        envelope.producer, envelope.key_id = batch[0].producer, batch[0].key_id
        envelope.event_id = f"{number}:{envelope.event_id}"  # event ids are unique: no two leaves are equal
    sign_batch(batch, KEY)
    checker = SignatureChecker()
    for envelope in batch:
        checker.verify(Envelope.FromString(envelope.SerializeToString()), KEY.public_key())
    assert checker.signature_checks == 1
    return batch, checker


batches = st.lists(envelopes, min_size=1, max_size=9)


@given(batches, st.sampled_from(SIGNED_FIELDS), st.data())
def test_any_change_to_a_signed_field_of_a_batched_event_is_detected(
    batch: list[Envelope], field: str, data: st.DataObject
) -> None:
    batch, checker = signed_batch(batch)
    victim = batch[data.draw(st.integers(0, len(batch) - 1))]
    _tamper(victim, field, data)
    refused(victim)
    refused(victim, checker)  # the root is remembered: the changed leaf no longer leads to it


@given(batches, st.data())
def test_any_change_to_the_proof_is_detected(batch: list[Envelope], data: st.DataObject) -> None:
    batch, checker = signed_batch(batch)
    victim = batch[data.draw(st.integers(0, len(batch) - 1))]
    proof = victim.batch
    change = data.draw(st.sampled_from(["index", "count", "path byte", "path dropped", "path added"]))
    if change == "index":
        proof.leaf_index = data.draw(st.integers(0, 2**32 - 1).filter(lambda v: v != proof.leaf_index))
    elif change == "count":
        proof.leaf_count = data.draw(st.integers(0, 2**32 - 1).filter(lambda v: v != proof.leaf_count))
    elif change == "path added":
        proof.path.insert(data.draw(st.integers(0, len(proof.path))), data.draw(st.binary(min_size=32, max_size=32)))
    elif not proof.path:
        victim.ClearField("batch")  # a batch of one has no path: strip the proof altogether instead
    elif change == "path byte":
        entry = data.draw(st.integers(0, len(proof.path) - 1))
        flipped = bytearray(proof.path[entry])
        flipped[data.draw(st.integers(0, 31))] ^= 1 << data.draw(st.integers(0, 7))
        proof.path[entry] = bytes(flipped)
    else:
        del proof.path[data.draw(st.integers(0, len(proof.path) - 1))]
    refused(victim)
    refused(victim, checker)


@given(batches, st.integers(0, 63), st.integers(0, 7))
def test_any_flipped_bit_of_the_batch_signature_is_detected(batch: list[Envelope], byte: int, bit: int) -> None:
    batch, checker = signed_batch(batch)
    flipped = bytearray(batch[0].signature)
    flipped[byte] ^= 1 << bit
    batch[0].signature = bytes(flipped)
    assert refused(batch[0], checker) == "signature does not verify"


def test_a_batch_signature_is_not_a_signature_of_the_event_alone() -> None:
    """Strip the proof from a batch of one: the leaf is the event's signed bytes, but the signature covers
    the batch's own tag, count and root, never the signed bytes themselves."""
    [envelope] = batch_vector()[:1]
    sign_batch([envelope], KEY)
    envelope.ClearField("batch")
    assert refused(envelope) == "signature does not verify"
    single = batch_vector()[0]
    sign(single, KEY)
    single.batch.leaf_count = 1  # and a lone signature does not pass for a batch of one
    assert refused(single) == "signature does not verify"


def test_signing_alone_drops_a_stale_proof() -> None:
    batch = batch_vector()
    sign_batch(batch, KEY)
    sign(batch[1], KEY)
    assert not batch[1].HasField("batch")
    verify_signature(batch[1], KEY.public_key())


def test_another_key_does_not_verify_a_batch_even_after_its_root_was_believed() -> None:
    batch, checker = signed_batch(batch_vector())
    other = Ed25519PrivateKey.generate()
    with pytest.raises(VerificationError, match="does not verify"):
        checker.verify(batch[0], other.public_key())  # same (producer, key id), another key: checked again
    checker.verify(batch[0], KEY.public_key())
    assert checker.signature_checks == 2  # the root believed under KEY is still believed under KEY
    checker.forget()
    checker.verify(batch[0], KEY.public_key())
    assert checker.signature_checks == 3


def test_one_signature_check_per_root_while_remembered() -> None:
    checker = SignatureChecker(max_roots=1)
    first, second = batch_vector(), batch_vector()
    for envelope in second:
        envelope.correlation_id = "another batch"
    sign_batch(first, KEY)
    sign_batch(second, KEY)
    for envelope in first + first + second + first:
        checker.verify(envelope, KEY.public_key())
    assert checker.signature_checks == 3  # first, second, first again (only one root is remembered)


def test_a_batch_is_one_producers_under_one_key() -> None:
    batch = batch_vector()
    batch[1].key_id = "accounts/another-key"
    with pytest.raises(ValueError, match="one producer's"):
        sign_batch(batch, KEY)


@pytest.mark.parametrize("size", [0, 2**16 + 1])
def test_a_batch_has_a_size_limit(size: int) -> None:
    with pytest.raises(ValueError, match="1 to 65536"):
        sign_batch([Envelope()] * size, KEY)
    envelope = vector_envelope()
    sign(envelope, KEY)
    envelope.batch.leaf_count = size
    assert "cannot be signed" in refused(envelope)


@pytest.mark.parametrize("length", [0, 31, 33])
def test_a_path_entry_that_is_not_a_hash_is_refused(length: int) -> None:
    leaves = [merkle.leaf_hash(bytes([n])) for n in range(4)]
    _, paths = merkle.inclusion_proofs(leaves)
    bent = [paths[1][0][:length] if length <= 32 else paths[1][0] + b"\x00", paths[1][1]]
    with pytest.raises(merkle.ProofError, match="not a SHA-256 hash"):
        merkle.root_from_proof(leaves[1], 1, 4, bent)


def test_a_batch_of_exactly_the_size_limit_is_signed_and_verifies() -> None:
    batch = [Envelope(event_id=str(n), producer="accounts", key_id="accounts/k") for n in range(2**16)]
    sign_batch(batch, KEY)
    assert batch[-1].batch.leaf_count == 2**16 and len(batch[-1].batch.path) == 16
    verify_signature(batch[-1], KEY.public_key())
