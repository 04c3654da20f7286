"""Bundles: a relay batch as one Kafka record, under the batch signature of the pinned vector. Any change to any
envelope, their order or number, or the signature is refused for the whole bundle; steps 4 and 5 refuse one
envelope at a time; every envelope can be turned back into one that verifies alone."""

import datetime as dt
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.accounts.v1.events_pb2 import AccountOpened
from bastion.events.envelopes import bundle, envelope_for
from bastion.events.errors import RejectReason, VerificationError
from bastion.events.keys import KeyRing
from bastion.events.signing import SignatureChecker, sign_bundle, verify_signature, with_proofs
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
from tests.unit.test_batch_signing import BATCH, batch_vector
from tests.unit.test_event_verification import NOW, TOPIC, ring, verifier  # noqa: F401  (fixtures)
from tests.unit.test_signing import KEY, SIGNED_FIELDS, _tamper, envelopes


def bundle_of(members: list[Envelope]) -> EnvelopeBundle:
    signed = EnvelopeBundle()
    signed.envelopes.extend(members)
    sign_bundle(signed, KEY)
    return signed


def refused_bundle(signed: EnvelopeBundle) -> str:
    with pytest.raises(VerificationError) as refusal:
        SignatureChecker().verify_bundle(signed, KEY.public_key())
    assert refusal.value.reason == RejectReason.BAD_SIGNATURE
    return refusal.value.detail


def test_a_bundle_carries_the_pinned_batch_signature_and_gives_back_the_pinned_envelopes() -> None:
    signed = bundle_of(batch_vector())
    assert signed.signature.hex() == BATCH["signature_hex"]
    SignatureChecker().verify_bundle(EnvelopeBundle.FromString(signed.SerializeToString()), KEY.public_key())
    assert [envelope.SerializeToString().hex() for envelope in with_proofs(signed)] == BATCH["envelopes_hex"]
    assert not any(member.signature or member.HasField("batch") for member in signed.envelopes)


def signed_members(batch: list[Envelope]) -> list[Envelope]:
    for number, envelope in enumerate(batch):
        envelope.producer, envelope.key_id = batch[0].producer, batch[0].key_id
        envelope.event_id = f"{number}:{envelope.event_id}"  # no two leaves are equal
    return batch


batches = st.lists(envelopes, min_size=1, max_size=9).map(signed_members)


@given(batches, st.sampled_from(SIGNED_FIELDS), st.data())
def test_any_change_to_a_signed_field_of_any_envelope_refuses_the_bundle(
    batch: list[Envelope], field: str, data: st.DataObject
) -> None:
    signed = bundle_of(batch)
    _tamper(signed.envelopes[data.draw(st.integers(0, len(batch) - 1))], field, data)
    refused_bundle(signed)


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
def test_each_envelope_given_back_verifies_alone_and_only_unchanged(batch: list[Envelope], data: st.DataObject) -> None:
    signed = bundle_of(batch)
    alone = with_proofs(signed)
    for envelope in alone:
        verify_signature(Envelope.FromString(envelope.SerializeToString()), KEY.public_key())
    victim = alone[data.draw(st.integers(0, len(alone) - 1))]
    _tamper(victim, data.draw(st.sampled_from(SIGNED_FIELDS)), data)
    with pytest.raises(VerificationError, match=r"does not verify|batch proof"):
        verify_signature(victim, KEY.public_key())


def test_a_bundle_is_one_producers_without_signatures_of_its_envelopes() -> None:
    signed = bundle_of(batch_vector())
    signed.envelopes[1].key_id = "accounts/another-key"
    assert refused_bundle(signed) == "a bundle is one producer's, under one key id"
    signed = bundle_of(batch_vector())
    signed.envelopes[2].signature = signed.signature
    assert refused_bundle(signed) == "an envelope of a bundle carries a signature"
    signed = bundle_of(batch_vector())
    signed.envelopes[0].batch.leaf_count = 3
    assert refused_bundle(signed) == "an envelope of a bundle carries a signature"
    signed = bundle_of(batch_vector())
    signed.signature = signed.signature[:63]
    assert refused_bundle(signed) == "signature is not 64 bytes"
    with pytest.raises(ValueError, match="one producer's"):
        bundle_of([batch_vector()[0], envelope_for_other_producer()])


def envelope_for_other_producer() -> Envelope:
    envelope = batch_vector()[0]
    envelope.producer = "payments"
    return envelope


def test_decoding_refuses_an_empty_bundle_unknown_fields_oversize_and_malformed_envelopes() -> None:
    def reason(raw: bytes, **limits: int) -> tuple[RejectReason, str]:
        with pytest.raises(VerificationError) as refusal:
            decode_bundle(raw, **limits)
        return refusal.value.reason, refusal.value.detail

    raw = bundle_of(batch_vector()).SerializeToString()
    assert len(decode_bundle(raw).envelopes) == 3
    assert reason(EnvelopeBundle(signature=bytes(64)).SerializeToString()) == (
        RejectReason.MALFORMED, "the bundle holds no envelope")
    assert reason(raw + b"\x18\x01")[0] == RejectReason.UNKNOWN_FIELDS  # field 3 of the bundle
    signed = bundle_of(batch_vector())
    signed.envelopes[1].MergeFromString(b"\x80\x02\x01")  # field 32 of an envelope inside
    assert reason(signed.SerializeToString())[0] == RejectReason.UNKNOWN_FIELDS
    assert reason(raw, max_bytes=len(raw) - 1)[0] == RejectReason.TOO_LARGE
    assert reason(raw, max_envelope_bytes=100) == (
        RejectReason.TOO_LARGE, "envelope 0 of the bundle is over the 100-byte limit")
    signed = bundle_of(batch_vector())
    signed.envelopes[2].event_id = "not-a-uuid"
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
    members = [opened_event(ring, 1), opened_event(ring, 2, PaymentCompleted(payment_id="p1")), opened_event(ring, 3),
               opened_event(ring, 4, topic="payments.events.v1")]
    verified = verifier.verify_bundle(relay_bundle(ring, members), TOPIC)
    first, unauthorised, third, elsewhere = verified.outcomes
    assert isinstance(first, VerifiedEvent) and isinstance(third, VerifiedEvent)
    assert isinstance(first.payload, AccountOpened) and first.payload.account_id == "a1"
    assert isinstance(unauthorised, VerificationError) and unauthorised.reason == RejectReason.NOT_AUTHORISED
    assert isinstance(elsewhere, VerificationError) and elsewhere.reason == RejectReason.TOPIC_MISMATCH
    kept = third.signed_envelope()  # what a consumer stores or forwards: it verifies alone, as any envelope does
    assert kept.HasField("batch") and kept.batch.leaf_index == 2 and kept.batch.leaf_count == 4
    assert verifier.verify(kept.SerializeToString(), TOPIC).event_id == third.event_id


def test_stale_envelopes_are_refused_one_by_one(verifier: EnvelopeVerifier, ring: KeyRing) -> None:  # noqa: F811
    raw = relay_bundle(ring, [opened_event(ring, 1), opened_event(ring, 2)], now=NOW - dt.timedelta(hours=1))
    outcomes = verifier.verify_bundle(raw, TOPIC).outcomes
    assert [outcome.reason for outcome in outcomes if isinstance(outcome, VerificationError)] == [
        RejectReason.STALE, RejectReason.STALE]


def test_a_bundle_under_an_unknown_key_or_tampered_is_refused_whole(
    verifier: EnvelopeVerifier, ring: KeyRing, tmp_path: Path  # noqa: F811
) -> None:
    rogue = KeyRing(tmp_path / "rogue")
    rogue.ensure(["accounts"])
    with pytest.raises(VerificationError) as refusal:
        verifier.verify_bundle(relay_bundle(rogue, [opened_event(rogue, 1)]), TOPIC)
    assert refusal.value.reason == RejectReason.UNKNOWN_KEY
    signed = EnvelopeBundle.FromString(relay_bundle(ring, [opened_event(ring, 1), opened_event(ring, 2)]))
    signed.envelopes[1].payload = AccountOpened(account_id="a2", owner="mallory", currency="EUR").SerializeToString()
    with pytest.raises(VerificationError) as refusal:
        verifier.verify_bundle(signed.SerializeToString(), TOPIC)
    assert refusal.value.reason == RejectReason.BAD_SIGNATURE
    with pytest.raises(ValueError, match="cannot be published by"):
        bundle([opened_event(ring, 1).SerializeToString()], ring.signing_key("payments"))
