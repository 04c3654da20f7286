"""Bundles: a relay batch as one Kafka record, signed once over the Merkle root of its envelopes' bytes, pinned by
tests/vectors/envelope-bundle-v1.json. Any change to any envelope, their order or number, or the signature is
refused for the whole bundle; steps 4 and 5 refuse one envelope at a time; every envelope can be cut out as a
bundle of one that verifies alone."""

import datetime as dt
import json
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from bastion.accounts.v1.events_pb2 import AccountOpened
from bastion.events import merkle
from bastion.events.envelopes import bundle, envelope_for, republish
from bastion.events.errors import RejectReason, VerificationError
from bastion.events.keys import KeyRing
from bastion.events.signing import (
    BATCH_TAG,
    SignatureChecker,
    batch_signed_bytes,
    bundle_signed_bytes,
    bundles_of_one,
    sign_bundle,
)
from bastion.events.v1.envelope_pb2 import Envelope, EnvelopeBundle
from bastion.events.verify import (
    BUNDLE_CONTENT,
    BUNDLE_HEADER,
    EnvelopeVerifier,
    VerifiedEvent,
    decode_bundle,
    is_bundle,
)
from bastion.payments.v1.events_pb2 import PaymentCompleted
from tests.unit.test_event_verification import NOW, TOPIC, verifier  # noqa: F401  (fixture; `ring` is in conftest.py)
from tests.unit.test_signing import KEY, SIGNED_FIELDS, _tamper, envelopes

VECTOR = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "envelope-bundle-v1.json").read_text())


def bundle_of(members: list[Envelope]) -> EnvelopeBundle:
    signed = EnvelopeBundle(envelopes=[member.SerializeToString() for member in members])
    sign_bundle(signed, KEY)
    return signed


def check(signed: EnvelopeBundle) -> None:
    """The bundle's signature, over the envelopes as carried (parsed only to see who signed them; a part that
    does not even parse is refused too: step 1 refuses it first in a consumer)."""
    decoded = EnvelopeBundle.FromString(signed.SerializeToString())
    try:
        members = [Envelope.FromString(member) for member in decoded.envelopes]
    except DecodeError:
        raise VerificationError(RejectReason.MALFORMED, "an envelope does not parse") from None
    SignatureChecker().verify_bundle(decoded, members, KEY.public_key())


def refused_bundle(signed: EnvelopeBundle) -> str:
    members = [Envelope.FromString(member) for member in signed.envelopes]
    with pytest.raises(VerificationError) as refusal:
        SignatureChecker().verify_bundle(signed, members, KEY.public_key())
    assert refusal.value.reason == RejectReason.BAD_SIGNATURE
    return refusal.value.detail


def test_the_vector_pins_leaves_root_signed_bytes_and_signature() -> None:
    members = [bytes.fromhex(member) for member in VECTOR["members_hex"]]
    leaves = [merkle.leaf_hash(member) for member in members]
    assert [leaf.hex() for leaf in leaves] == VECTOR["leaf_hashes_hex"]
    root = merkle.tree_root(leaves)
    assert root.hex() == VECTOR["root_hex"]
    assert bundle_signed_bytes(len(members), root).hex() == VECTOR["bundle_signed_bytes_hex"]
    signed = EnvelopeBundle(envelopes=members)
    sign_bundle(signed, KEY)
    assert signed.signature.hex() == VECTOR["signature_hex"]
    assert signed.SerializeToString().hex() == VECTOR["bundle_hex"]
    decoded, members = decode_bundle(bytes.fromhex(VECTOR["bundle_hex"]))  # steps 1 to 3, as a consumer runs them
    SignatureChecker().verify_bundle(decoded, members, KEY.public_key())


def test_a_bundle_signature_is_never_a_batch_signature() -> None:
    """Same leaves, same count: the domain tags keep a bundle root from passing for a batch root, and back."""
    root = bytes.fromhex(VECTOR["root_hex"])
    assert bundle_signed_bytes(3, root) != batch_signed_bytes(3, root)
    assert batch_signed_bytes(3, root).startswith(BATCH_TAG)


def signed_members(batch: list[Envelope]) -> list[Envelope]:
    for number, envelope in enumerate(batch):
        envelope.producer, envelope.key_id = batch[0].producer, batch[0].key_id
        envelope.event_id = f"{number}:{envelope.event_id}"  # no two leaves are equal
    return batch


batches = st.lists(envelopes, min_size=1, max_size=9).map(signed_members)


@given(batches, st.sampled_from(SIGNED_FIELDS), st.data())
def test_any_change_to_any_field_of_any_envelope_refuses_the_bundle(
    batch: list[Envelope], field: str, data: st.DataObject
) -> None:
    signed = bundle_of(batch)
    victim = data.draw(st.integers(0, len(batch) - 1))
    changed = Envelope.FromString(signed.envelopes[victim])
    _tamper(changed, field, data)
    signed.envelopes[victim] = changed.SerializeToString()
    refused_bundle(signed)


@given(batches, st.data())
def test_any_changed_byte_of_an_envelope_refuses_the_bundle(batch: list[Envelope], data: st.DataObject) -> None:
    """The leaves are the bytes as carried: even a change that parses to the same envelope is refused."""
    signed = bundle_of(batch)
    victim = data.draw(st.integers(0, len(batch) - 1))
    changed = bytearray(signed.envelopes[victim])
    if data.draw(st.booleans()) or not changed:
        changed += data.draw(st.binary(min_size=1, max_size=8))
    else:
        changed[data.draw(st.integers(0, len(changed) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    signed.envelopes[victim] = bytes(changed)
    with pytest.raises(VerificationError):
        check(signed)


@given(batches, st.data())
def test_envelopes_reordered_dropped_or_added_refuse_the_bundle(batch: list[Envelope], data: st.DataObject) -> None:
    signed = bundle_of(batch)
    members = list(signed.envelopes)
    change = data.draw(st.sampled_from(["swap", "drop", "add"] if len(members) > 1 else ["add"]))
    if change == "swap":
        first = data.draw(st.integers(0, len(members) - 2))
        members[first], members[first + 1] = members[first + 1], members[first]
    elif change == "drop":
        del members[data.draw(st.integers(0, len(members) - 1))]
    else:
        members.insert(data.draw(st.integers(0, len(members))), members[data.draw(st.integers(0, len(members) - 1))])
    del signed.envelopes[:]
    signed.envelopes.extend(members)
    refused_bundle(signed)


@given(batches, st.integers(0, 63), st.integers(0, 7))
def test_any_flipped_bit_of_the_bundle_signature_is_refused(batch: list[Envelope], byte: int, bit: int) -> None:
    signed = bundle_of(batch)
    flipped = bytearray(signed.signature)
    flipped[byte] ^= 1 << bit
    signed.signature = bytes(flipped)
    assert refused_bundle(signed) == "signature does not verify"


@given(batches, st.data())
def test_each_envelope_cut_out_verifies_alone_and_only_unchanged(batch: list[Envelope], data: st.DataObject) -> None:
    signed = bundle_of(batch)
    alone = bundles_of_one(signed)
    for one in alone:
        check(EnvelopeBundle.FromString(one.SerializeToString()))
    victim = alone[data.draw(st.integers(0, len(alone) - 1))]
    change = data.draw(st.sampled_from(["envelope", "index", "count", "path"]))
    if change == "envelope":
        changed = Envelope.FromString(victim.envelopes[0])
        _tamper(changed, data.draw(st.sampled_from(SIGNED_FIELDS)), data)
        victim.envelopes[0] = changed.SerializeToString()
    elif change == "index":
        victim.proof.leaf_index = data.draw(st.integers(0, 2**32 - 1).filter(lambda v: v != victim.proof.leaf_index))
    elif change == "count":
        victim.proof.leaf_count = data.draw(st.integers(0, 2**32 - 1).filter(lambda v: v != victim.proof.leaf_count))
    else:
        victim.proof.path.append(bytes(32))
    refused_bundle(victim)


def test_an_envelope_appended_to_a_bundle_of_one_is_refused_with_it() -> None:
    """A proof vouches for one envelope: anything appended beside it (here the bundle's own next envelope, same
    producer and key) would otherwise ride on that envelope's proof and signature."""
    signed = bundle_of(_vector_batch())
    first, second = bundles_of_one(signed)[:2]
    check(first)
    first.envelopes.append(second.envelopes[0])
    refused_bundle(first)


def test_a_bundle_is_one_producers_without_signatures_of_its_envelopes() -> None:
    def with_change(index: int, change: str) -> EnvelopeBundle:
        signed = bundle_of(signed_members([envelope for envelope in _vector_batch()]))
        member = Envelope.FromString(signed.envelopes[index])
        if change == "key":
            member.key_id = "accounts/another-key"
        elif change == "signature":
            member.signature = signed.signature
        else:
            member.batch.leaf_count = 3
        signed.envelopes[index] = member.SerializeToString()
        return signed

    assert refused_bundle(with_change(1, "key")) == "a bundle is one producer's, under one key id"
    assert refused_bundle(with_change(2, "signature")) == "an envelope of a bundle carries a signature"
    assert refused_bundle(with_change(0, "proof")) == "an envelope of a bundle carries a signature"
    short = bundle_of(_vector_batch())
    short.signature = short.signature[:63]
    assert refused_bundle(short) == "signature is not 64 bytes"
    two = bundle_of(_vector_batch())
    two.proof.leaf_count = 3
    assert refused_bundle(two) == "a proof places one envelope in a bundle"


def _vector_batch() -> list[Envelope]:
    return [Envelope.FromString(bytes.fromhex(member)) for member in VECTOR["members_hex"]]


def test_decoding_refuses_an_empty_bundle_unknown_fields_oversize_and_malformed_envelopes() -> None:
    def reason(raw: bytes, **limits: int) -> tuple[RejectReason, str]:
        with pytest.raises(VerificationError) as refusal:
            decode_bundle(raw, **limits)
        return refusal.value.reason, refusal.value.detail

    raw = bundle_of(_vector_batch()).SerializeToString()
    assert len(decode_bundle(raw)[1]) == 3
    assert reason(EnvelopeBundle(signature=bytes(64)).SerializeToString()) == (
        RejectReason.MALFORMED, "the bundle holds no envelope")
    assert reason(raw + b"\x20\x01")[0] == RejectReason.UNKNOWN_FIELDS  # field 4 of the bundle
    signed = bundle_of(_vector_batch())
    signed.envelopes[1] = signed.envelopes[1] + b"\x80\x02\x01"  # field 32 of an envelope inside
    assert reason(signed.SerializeToString()) == (
        RejectReason.UNKNOWN_FIELDS, "envelope 1 of the bundle: the envelope carries fields this schema does not know")
    assert reason(raw, max_bytes=len(raw) - 1)[0] == RejectReason.TOO_LARGE
    too_large, detail = reason(raw, max_envelope_bytes=100)
    assert too_large == RejectReason.TOO_LARGE and detail.startswith("envelope 0 of the bundle: ")
    assert detail.endswith("bytes is over the 100-byte limit")
    signed = bundle_of(_vector_batch())
    signed.envelopes[2] = b"\xff\xff"
    assert reason(signed.SerializeToString())[0] == RejectReason.MALFORMED
    member = _vector_batch()[2]
    member.event_id = "not-a-uuid"
    signed.envelopes[2] = member.SerializeToString()
    assert reason(signed.SerializeToString()) == (RejectReason.MALFORMED,
                                                  "envelope 2 of the bundle: event_id is not a UUID")
    assert reason(raw[:-5])[0] == RejectReason.MALFORMED  # truncated


def test_only_the_bundle_header_marks_a_bundle() -> None:
    assert is_bundle([(BUNDLE_HEADER, BUNDLE_CONTENT)])
    assert not is_bundle(None) and not is_bundle([]) and not is_bundle([(BUNDLE_HEADER, b"bundle-v2")])
    assert not is_bundle([("content", BUNDLE_CONTENT), (BUNDLE_HEADER, None)])


def relay_bundle(keys: KeyRing, members: list[Envelope], now: dt.datetime = NOW) -> bytes:
    return bundle([member.SerializeToString() for member in members], keys.signing_key("accounts"), now)\
        .SerializeToString()


def opened_event(keys: KeyRing, sequence: int, payload: object | None = None, topic: str = TOPIC) -> Envelope:
    return envelope_for(keys.signing_key("accounts"), topic, payload or AccountOpened(  # type: ignore[arg-type]
        account_id=f"a{sequence}", owner="alice", currency="EUR"), f"a{sequence}", 1, f"c{sequence}", occurred_at=NOW)


def test_steps_four_and_five_refuse_one_envelope_and_keep_the_others(
    verifier: EnvelopeVerifier, ring: KeyRing  # noqa: F811
) -> None:
    members = [opened_event(ring, 1), opened_event(ring, 2, PaymentCompleted(payment_id="p1")),
               opened_event(ring, 3), opened_event(ring, 4, topic="payments.events.v1")]
    verified = verifier.verify_bundle(relay_bundle(ring, members), TOPIC)
    first, unauthorised, third, elsewhere = verified.outcomes
    assert isinstance(first, VerifiedEvent) and isinstance(third, VerifiedEvent)
    assert isinstance(first.payload, AccountOpened) and first.payload.account_id == "a1"
    assert isinstance(unauthorised, VerificationError) and unauthorised.reason == RejectReason.NOT_AUTHORISED
    assert isinstance(elsewhere, VerificationError) and elsewhere.reason == RejectReason.TOPIC_MISMATCH
    kept = EnvelopeBundle.FromString(third.alone())  # what a consumer stores or forwards: verifies alone
    assert kept.proof.leaf_index == 2 and kept.proof.leaf_count == 4 and len(kept.envelopes) == 1
    [again] = verifier.verify_bundle(third.alone(), TOPIC).outcomes
    assert isinstance(again, VerifiedEvent) and again.event_id == third.event_id
    assert again.alone() == third.alone(), "a bundle of one is kept as it came"


def test_stale_envelopes_are_refused_one_by_one(verifier: EnvelopeVerifier, ring: KeyRing) -> None:  # noqa: F811
    raw = relay_bundle(ring, [opened_event(ring, 1), opened_event(ring, 2)], now=NOW - dt.timedelta(hours=1))
    outcomes = verifier.verify_bundle(raw, TOPIC).outcomes
    assert [outcome.reason for outcome in outcomes if isinstance(outcome, VerificationError)] == [
        RejectReason.STALE, RejectReason.STALE]
    assert all(isinstance(outcome, VerifiedEvent)
               for outcome in verifier.verify_bundle(raw, TOPIC, check_freshness=False).outcomes)


def test_a_bundle_under_an_unknown_key_or_tampered_is_refused_whole(
    verifier: EnvelopeVerifier, ring: KeyRing, tmp_path: Path  # noqa: F811
) -> None:
    rogue = KeyRing(tmp_path / "rogue")
    rogue.ensure(["accounts"])
    with pytest.raises(VerificationError) as refusal:
        verifier.verify_bundle(relay_bundle(rogue, [opened_event(rogue, 1)]), TOPIC)
    assert refusal.value.reason == RejectReason.UNKNOWN_KEY
    signed = EnvelopeBundle.FromString(relay_bundle(ring, [opened_event(ring, 1), opened_event(ring, 2)]))
    changed = Envelope.FromString(signed.envelopes[1])
    changed.payload = AccountOpened(account_id="a2", owner="mallory", currency="EUR").SerializeToString()
    signed.envelopes[1] = changed.SerializeToString()
    with pytest.raises(VerificationError) as refusal:
        verifier.verify_bundle(signed.SerializeToString(), TOPIC)
    assert refusal.value.reason == RejectReason.BAD_SIGNATURE
    with pytest.raises(ValueError, match="cannot be published by"):
        bundle([opened_event(ring, 1).SerializeToString()], ring.signing_key("payments"))


TRACED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_the_trace_context_travels_signed_through_a_bundle_and_a_republished_batch(
    verifier: EnvelopeVerifier, ring: KeyRing  # noqa: F811
) -> None:
    traced = envelope_for(ring.signing_key("accounts"), TOPIC, AccountOpened(account_id="a1", owner="alice",
                                                                             currency="EUR"),
                          "a1", 1, "c1", occurred_at=NOW, traceparent=TRACED)
    assert traced.traceparent == TRACED
    [bundled] = verifier.verify_bundle(relay_bundle(ring, [traced]), TOPIC).outcomes
    assert isinstance(bundled, VerifiedEvent) and bundled.envelope.traceparent == TRACED
    [relayed] = republish([traced.SerializeToString()], ring.signing_key("accounts"), now=NOW)
    assert verifier.verify(relayed, TOPIC).envelope.traceparent == TRACED
    grafted = Envelope.FromString(relayed)
    grafted.traceparent = TRACED.replace("00f067aa0ba902b7", "1111111111111111")  # onto another parent span
    with pytest.raises(VerificationError) as refused:
        verifier.verify(grafted.SerializeToString(), TOPIC)
    assert refused.value.reason == RejectReason.BAD_SIGNATURE


def test_a_bundle_over_the_kafka_record_limit_is_too_large_by_default(verifier: EnvelopeVerifier) -> None:  # noqa: F811
    """The default cap is Kafka's largest record (1 MB): a bigger bundle is refused before it is parsed."""
    with pytest.raises(VerificationError) as refusal:
        decode_bundle(b"\x00" * 1_000_001)
    assert refusal.value.reason == RejectReason.TOO_LARGE
    with pytest.raises(VerificationError) as refusal:
        verifier.verify_bundle(b"\x00" * 1_000_001, TOPIC)
    assert refusal.value.reason == RejectReason.TOO_LARGE
    with pytest.raises(VerificationError) as refusal:
        decode_bundle(b"\x00" * 1_000_000)
    assert refusal.value.reason == RejectReason.MALFORMED  # at the limit: parsed, not cut off


def test_the_freshness_of_a_bundle_is_measured_against_the_broker_append_time(
    verifier: EnvelopeVerifier, ring: KeyRing  # noqa: F811
) -> None:
    """As for a lone envelope: a backlog read late is fresh when the broker appended it in time."""
    appended = NOW - dt.timedelta(hours=2)
    raw = relay_bundle(ring, [opened_event(ring, 1), opened_event(ring, 2)], now=appended)
    outcomes = verifier.verify_bundle(raw, TOPIC, broker_time=appended + dt.timedelta(seconds=1)).outcomes
    assert all(isinstance(outcome, VerifiedEvent) for outcome in outcomes), outcomes
    stale = verifier.verify_bundle(raw, TOPIC, broker_time=NOW).outcomes
    assert [o.reason for o in stale if isinstance(o, VerificationError)] == [RejectReason.STALE] * 2


def test_an_envelope_of_a_bundle_cannot_claim_another_producer_under_the_signers_key_id(
    verifier: EnvelopeVerifier, ring: KeyRing  # noqa: F811
) -> None:
    """accounts signs a bundle on payments' topic whose second envelope claims to come from payments (with
    accounts' own key id, so the key ids agree): the bundle is refused whole, not read as payments' event."""
    key = ring.signing_key("accounts")
    topic = "payments.events.v1"
    genuine = envelope_for(key, topic, AccountOpened(account_id="a1", owner="alice", currency="EUR"), "a1", 1, "c1",
                           occurred_at=NOW)
    forged = envelope_for(key, topic, PaymentCompleted(payment_id="p1"), "p1", 1, "c2", occurred_at=NOW)
    forged.producer = "payments"
    signed = EnvelopeBundle(envelopes=[genuine.SerializeToString(), forged.SerializeToString()])
    sign_bundle(signed, key.private_key)
    with pytest.raises(VerificationError, match="one producer's") as refusal:
        verifier.verify_bundle(signed.SerializeToString(), topic)
    assert refusal.value.reason == RejectReason.BAD_SIGNATURE


def test_signing_a_bundle_of_one_again_drops_its_stale_proof() -> None:
    one = bundles_of_one(bundle_of(_vector_batch()))[1]
    sign_bundle(one, KEY)
    assert not one.HasField("proof")
    check(one)


@pytest.mark.parametrize("size, signed", [(0, False), (2**16, True), (2**16 + 1, False)])
def test_a_bundle_has_the_size_limit_of_a_batch(size: int, signed: bool) -> None:
    members = EnvelopeBundle(envelopes=[b"\x0a\x01" + bytes([n % 256]) for n in range(size)])
    if signed:
        sign_bundle(members, KEY)
        assert len(members.signature) == 64
    else:
        with pytest.raises(ValueError, match="1 to 65536"):
            sign_bundle(members, KEY)
