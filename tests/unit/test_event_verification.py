"""The verification pipeline, steps 1 to 5: each attack is refused with its own reason, in pipeline order."""

import datetime as dt
import stat
from pathlib import Path

import pytest
from google.protobuf.message import Message

from bastion.accounts.v1.events_pb2 import AccountOpened, MoneyDeposited
from bastion.devstack.event_access import load_policy
from bastion.events.catalog import SCHEMAS
from bastion.events.envelopes import republish, seal
from bastion.events.errors import KeyNotFoundError, RejectReason, VerificationError
from bastion.events.keys import Followed, KeyRing, TrustStore
from bastion.events.signing import sign
from bastion.events.trust import TrustPolicy, load_trust_policy
from bastion.events.v1.envelope_pb2 import Envelope
from bastion.events.verify import EnvelopeVerifier, FreshnessWindow, parse_payload
from bastion.payments.v1.events_pb2 import PaymentCompleted
from tests.unit.conftest import SERVICES as PLATFORM_SERVICES

INFRA = Path(__file__).resolve().parents[2] / "infra"
SERVICES = set(PLATFORM_SERVICES)
NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
TOPIC = "accounts.events.v1"


@pytest.fixture()
def verifier(ring: KeyRing) -> EnvelopeVerifier:
    access = load_policy(INFRA / "event-access.yaml", SERVICES)
    return EnvelopeVerifier(ring.trust_store(), load_trust_policy(INFRA / "event-trust.yaml", access),
                            FreshnessWindow(), clock=lambda: NOW)


def opened(producer_ring: KeyRing, producer: str = "accounts", payload: Message | None = None,
           occurred_at: dt.datetime = NOW, topic: str = TOPIC) -> Envelope:
    return seal(producer_ring.signing_key(producer), topic, payload or AccountOpened(account_id="a1", owner="alice",
                currency="EUR"), aggregate_id="a1", sequence=1, correlation_id="c1", occurred_at=occurred_at)


def refused(verifier: EnvelopeVerifier, raw: bytes, topic: str = TOPIC) -> RejectReason:
    with pytest.raises(VerificationError) as error:
        verifier.verify(raw, topic)
    return error.value.reason


def test_a_valid_event_verifies(verifier: EnvelopeVerifier, ring: KeyRing) -> None:
    event = verifier.verify(opened(ring).SerializeToString(), TOPIC)
    assert isinstance(event.payload, AccountOpened) and event.payload.owner == "alice"


def test_tampered_payload(verifier: EnvelopeVerifier, ring: KeyRing) -> None:
    envelope = opened(ring)
    envelope.payload = AccountOpened(account_id="a1", owner="mallory", currency="EUR").SerializeToString()
    assert refused(verifier, envelope.SerializeToString()) == RejectReason.BAD_SIGNATURE


def test_key_unknown_to_the_trust_store(verifier: EnvelopeVerifier, tmp_path: Path) -> None:
    rogue = KeyRing(tmp_path / "rogue")
    rogue.ensure(["accounts"])
    assert refused(verifier, opened(rogue).SerializeToString()) == RejectReason.UNKNOWN_KEY


def test_producer_a_signed_with_producer_b_key(verifier: EnvelopeVerifier, ring: KeyRing) -> None:
    """payments signs, then claims to be accounts: either the key id or the signature gives it away."""
    forged = opened(ring, producer="payments")
    forged.producer = "accounts"
    assert refused(verifier, forged.SerializeToString()) == RejectReason.UNKNOWN_KEY
    forged.key_id = ring.signing_key("accounts").key_id
    assert refused(verifier, forged.SerializeToString()) == RejectReason.BAD_SIGNATURE


def test_unknown_producer(verifier: EnvelopeVerifier, tmp_path: Path) -> None:
    rogue = KeyRing(tmp_path / "rogue")
    rogue.ensure(["mallory"])
    assert refused(verifier, opened(rogue, producer="mallory").SerializeToString()) == RejectReason.UNKNOWN_PRODUCER


def test_event_type_its_producer_may_not_emit(verifier: EnvelopeVerifier, ring: KeyRing) -> None:
    forged = opened(ring, producer="payments", payload=MoneyDeposited(account_id="a1", amount_minor=10**9))
    assert refused(verifier, forged.SerializeToString()) == RejectReason.NOT_AUTHORISED


def test_event_signed_for_another_topic(verifier: EnvelopeVerifier, ring: KeyRing) -> None:
    envelope = opened(ring, producer="payments", payload=PaymentCompleted(payment_id="p1"), topic="payments.events.v1")
    assert refused(verifier, envelope.SerializeToString(), topic=TOPIC) == RejectReason.TOPIC_MISMATCH


def test_stale_and_future_events(verifier: EnvelopeVerifier, ring: KeyRing) -> None:
    old = opened(ring, occurred_at=NOW - dt.timedelta(minutes=6))
    assert refused(verifier, old.SerializeToString()) == RejectReason.STALE
    future = opened(ring, occurred_at=NOW + dt.timedelta(minutes=2))
    assert refused(verifier, future.SerializeToString()) == RejectReason.FROM_THE_FUTURE
    within_skew = opened(ring, occurred_at=NOW + dt.timedelta(seconds=10))
    verifier.verify(within_skew.SerializeToString(), TOPIC)


def test_freshness_is_measured_against_the_broker_append_time(verifier: EnvelopeVerifier, ring: KeyRing) -> None:
    backlog = opened(ring, occurred_at=NOW - dt.timedelta(hours=2))
    verifier.verify(backlog.SerializeToString(), TOPIC, broker_time=NOW - dt.timedelta(hours=2, seconds=-1))


def test_unknown_fields_in_envelope_or_payload(verifier: EnvelopeVerifier, ring: KeyRing) -> None:
    extra_field = b"\xa2\x06\x03bad"  # field 100, length-delimited
    assert refused(verifier, opened(ring).SerializeToString() + extra_field) == RejectReason.UNKNOWN_FIELDS
    payload = AccountOpened(account_id="a1", owner="alice", currency="EUR").SerializeToString() + extra_field
    envelope = seal(ring.signing_key("accounts"), TOPIC, AccountOpened(), "a1", 1, "c1", occurred_at=NOW)
    envelope.payload = payload
    sign(envelope, ring.signing_key("accounts").private_key)
    assert refused(verifier, envelope.SerializeToString()) == RejectReason.UNKNOWN_FIELDS


def test_truncated_and_oversized_messages(verifier: EnvelopeVerifier, ring: KeyRing) -> None:
    raw = opened(ring).SerializeToString()
    assert refused(verifier, raw[: len(raw) // 2]) in (RejectReason.MALFORMED,)
    assert refused(verifier, b"\x00" * (64 * 1024 + 1)) == RejectReason.TOO_LARGE
    assert refused(verifier, b"") == RejectReason.MALFORMED


@pytest.mark.parametrize("field", ["occurred_at", "published_at"])
def test_a_timestamp_no_datetime_holds_is_malformed_not_a_crash(verifier: EnvelopeVerifier, ring: KeyRing,
                                                                 field: str) -> None:
    envelope = opened(ring)
    getattr(envelope, field).seconds = 2**40  # year 36812: valid protobuf, beyond datetime
    assert refused(verifier, envelope.SerializeToString()) == RejectReason.MALFORMED


def test_previous_schema_version_is_upcast_on_read(verifier: EnvelopeVerifier, ring: KeyRing) -> None:
    old = seal(ring.signing_key("accounts"), TOPIC, MoneyDeposited(account_id="a1", amount_minor=500), "a1", 2, "c1",
               occurred_at=NOW)
    old.schema_version = 1
    sign(old, ring.signing_key("accounts").private_key)
    event = verifier.verify(old.SerializeToString(), TOPIC)
    assert isinstance(event.payload, MoneyDeposited)
    assert (event.payload.amount_minor, event.payload.currency) == (500, "EUR")


def test_rotation_keeps_old_events_verifiable_until_retired(verifier: EnvelopeVerifier, ring: KeyRing) -> None:
    before = opened(ring)
    old_key = ring.signing_key("accounts").key_id
    new_key = ring.rotate("accounts")
    assert ring.signing_key("accounts").key_id == new_key != old_key
    rotated = EnvelopeVerifier(ring.trust_store(), verifier.policy, clock=lambda: NOW)
    rotated.verify(before.SerializeToString(), TOPIC)
    rotated.verify(opened(ring).SerializeToString(), TOPIC)
    ring.retire("accounts", old_key)
    retired = EnvelopeVerifier(ring.trust_store(), verifier.policy, clock=lambda: NOW)
    assert refused(retired, before.SerializeToString()) == RejectReason.UNKNOWN_KEY
    with pytest.raises(KeyNotFoundError, match="active key"):
        ring.retire("accounts", new_key)


def test_private_keys_are_owner_only_and_a_missing_one_is_named(ring: KeyRing, tmp_path: Path) -> None:
    key_files = list((ring.folder / "private").rglob("*.pem"))
    assert len(key_files) == len(SERVICES)
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in key_files)
    with pytest.raises(KeyNotFoundError, match="'mallory'"):
        ring.signing_key("mallory")


def test_an_event_that_waited_in_the_outbox_is_fresh_once_republished(
    verifier: EnvelopeVerifier, ring: KeyRing
) -> None:
    """Written two hours ago, relayed now (Kafka was down): fresh. Replayed unchanged later: stale."""
    waited = opened(ring, occurred_at=NOW - dt.timedelta(hours=2))
    [relayed] = republish([waited.SerializeToString()], ring.signing_key("accounts"), now=NOW)
    verifier.verify(relayed, TOPIC, broker_time=NOW + dt.timedelta(seconds=1))
    assert refused_at(verifier, relayed, NOW + dt.timedelta(minutes=6)) == RejectReason.STALE
    tampered = Envelope.FromString(relayed)
    tampered.published_at.FromDatetime(NOW + dt.timedelta(hours=1))
    assert refused_at(verifier, tampered.SerializeToString(), NOW + dt.timedelta(hours=1)) == RejectReason.BAD_SIGNATURE


def refused_at(verifier: EnvelopeVerifier, raw: bytes, broker_time: dt.datetime) -> RejectReason:
    with pytest.raises(VerificationError) as error:
        verifier.verify(raw, TOPIC, broker_time=broker_time)
    return error.value.reason


def test_a_rotated_key_is_learnt_by_reloading_the_trust_store_at_most_once_per_gap(ring: KeyRing) -> None:
    """Before the next look at the file is due, an unknown key id reads the trust store again at once."""
    access = load_policy(INFRA / "event-access.yaml", SERVICES)
    loads: list[int] = []

    def load() -> TrustStore:
        loads.append(1)
        return ring.trust_store()

    trust = Followed(ring.trust_store_file, load, check_seconds=3600)
    verifier = EnvelopeVerifier(trust, load_trust_policy(INFRA / "event-trust.yaml", access),
                                clock=lambda: NOW, min_reload_seconds=60)
    ring.rotate("accounts")
    verifier.verify(opened(ring).SerializeToString(), TOPIC)
    assert len(loads) == 2
    rogue = KeyRing(ring.folder.parent / "rogue")
    rogue.ensure(["accounts"])
    for _ in range(5):
        assert refused(verifier, opened(rogue).SerializeToString()) == RejectReason.UNKNOWN_KEY
    assert len(loads) == 2, "unknown keys cannot make the consumer reload on every record"


def test_rows_stored_before_a_key_rotation_are_published_under_the_new_key(ring: KeyRing) -> None:
    """The relay signs with the producer's current key: rows written before `keys rotate` name it too, so a
    mixed backlog is one batch that verifies, not a relay stuck on it."""
    before = opened(ring).SerializeToString()
    ring.rotate("accounts")
    after = opened(ring, payload=MoneyDeposited(account_id="a1", amount_minor=5, currency="EUR")).SerializeToString()
    access = load_policy(INFRA / "event-access.yaml", SERVICES)
    verifier = EnvelopeVerifier(ring.trust_store(), load_trust_policy(INFRA / "event-trust.yaml", access),
                                FreshnessWindow(), clock=lambda: NOW)
    current = ring.signing_key("accounts")
    for raw in republish([before, after], current, now=NOW):
        assert verifier.verify(raw, TOPIC).envelope.key_id == current.key_id


def test_the_relay_publishes_only_its_own_producers_rows(ring: KeyRing) -> None:
    with pytest.raises(ValueError, match="cannot be published by 'payments'"):
        republish([opened(ring).SerializeToString()], ring.signing_key("payments"), now=NOW)


UNKNOWN_FIELD = b"\xa2\x06\x03bad"  # field 100, length-delimited: no message of ours has it


def nested(field_tag: bytes, inner: bytes) -> bytes:
    """A length-delimited field with INNER bytes; appended to an envelope, it merges into that sub-message."""
    return field_tag + bytes([len(inner)]) + inner


def test_unknown_fields_inside_nested_messages_are_found(verifier: EnvelopeVerifier, ring: KeyRing) -> None:
    """The batch proof is not signed, so whatever rides inside it is refused at step 1, as inside a timestamp."""
    [relayed] = republish([opened(ring).SerializeToString()], ring.signing_key("accounts"), now=NOW)
    in_batch = relayed + nested(b"\x7a", UNKNOWN_FIELD)  # field 15, Envelope.batch
    in_timestamp = relayed + nested(b"\x42", UNKNOWN_FIELD)  # field 8, Envelope.occurred_at
    assert verifier.verify(relayed, TOPIC)
    assert refused(verifier, in_batch) == RejectReason.UNKNOWN_FIELDS
    assert refused(verifier, in_timestamp) == RejectReason.UNKNOWN_FIELDS


@pytest.mark.parametrize("nanos", [-1, 1_000_000_000])
def test_a_timestamp_with_nanoseconds_out_of_range_is_malformed(
    verifier: EnvelopeVerifier, ring: KeyRing, nanos: int
) -> None:
    envelope = opened(ring)
    envelope.occurred_at.nanos = nanos  # refused at step 1, before the signature (which no longer matches) is read
    with pytest.raises(VerificationError, match="occurred_at is out of range") as error:
        verifier.verify(envelope.SerializeToString(), TOPIC)
    assert error.value.reason == RejectReason.MALFORMED


def _resigned(ring: KeyRing, envelope: Envelope) -> bytes:
    sign(envelope, ring.signing_key("accounts").private_key)
    return envelope.SerializeToString()


@pytest.mark.parametrize("field", ["signature", "key_id", "aggregate_id", "topic", "occurred_at", "published_at",
                                   "sequence"])
def test_each_mandatory_field_missing_is_malformed_at_step_one(verifier: EnvelopeVerifier, ring: KeyRing,
                                                               field: str) -> None:
    """Signed by a genuine producer or not, an envelope lacking a mandatory field is refused at step 1 as
    malformed: never verified further, and never dropped later as a replay (sequence 0)."""
    envelope = opened(ring)
    envelope.ClearField(field)  # type: ignore[arg-type]
    raw = envelope.SerializeToString() if field == "signature" else _resigned(ring, envelope)
    with pytest.raises(VerificationError, match="missing fields") as error:
        verifier.verify(raw, TOPIC)
    assert error.value.reason == RejectReason.MALFORMED


def test_the_freshness_window_is_five_minutes_back_and_thirty_seconds_ahead_to_the_microsecond(
    verifier: EnvelopeVerifier, ring: KeyRing
) -> None:
    published = NOW + dt.timedelta(milliseconds=500)  # a fraction of a second: nanoseconds count too
    raw = opened(ring, occurred_at=published).SerializeToString()
    micro = dt.timedelta(microseconds=1)
    verifier.verify(raw, TOPIC, broker_time=published + dt.timedelta(minutes=5))
    assert refused_at(verifier, raw, published + dt.timedelta(minutes=5) + micro) == RejectReason.STALE
    verifier.verify(raw, TOPIC, broker_time=published - dt.timedelta(seconds=30))
    assert refused_at(verifier, raw, published - dt.timedelta(seconds=30) - micro) == RejectReason.FROM_THE_FUTURE


@pytest.mark.parametrize("event_type, version", [
    ("bastion.accounts.v1.MoneyDeposited", 0), ("bastion.accounts.v1.MoneyDeposited", 3),
    ("bastion.accounts.v1.AccountOpened", 0), ("bastion.accounts.v1.AccountOpened", 2),
])
def test_a_schema_version_the_catalog_does_not_have_is_an_unknown_type(verifier: EnvelopeVerifier, ring: KeyRing,
                                                                       event_type: str, version: int) -> None:
    """Neither read as the current version nor a crash: refused, whatever key signed it."""
    envelope = opened(ring)
    envelope.event_type, envelope.schema_version = event_type, version
    assert refused(verifier, _resigned(ring, envelope)) == RejectReason.UNKNOWN_TYPE


def test_a_signed_payload_that_does_not_parse_as_its_type_is_malformed(verifier: EnvelopeVerifier,
                                                                        ring: KeyRing) -> None:
    envelope = opened(ring)
    envelope.payload = b"\x0a\xff"  # field 1, 255 bytes announced, none there
    with pytest.raises(VerificationError, match="payload is not a") as error:
        verifier.verify(_resigned(ring, envelope), TOPIC)
    assert error.value.reason == RejectReason.MALFORMED


def test_a_type_the_policy_allows_but_the_catalog_does_not_know_is_refused_not_a_crash(ring: KeyRing) -> None:
    unknown = "bastion.accounts.v1.AccountRenamed"
    lax = EnvelopeVerifier(ring.trust_store(), TrustPolicy({TOPIC: {"accounts": frozenset({unknown})}}),
                           clock=lambda: NOW)
    envelope = opened(ring)
    envelope.event_type = unknown
    assert refused(lax, _resigned(ring, envelope)) == RejectReason.UNKNOWN_TYPE


def test_every_schema_version_the_catalog_accepts_reads_as_the_current_message() -> None:
    """A version bump without its upcaster would make every older event of the type crash the consumer."""
    for event_type, schema in SCHEMAS.items():
        for version in range(1, schema.current_version + 1):
            payload = parse_payload(Envelope(event_type=event_type, schema_version=version, payload=b""))
            assert isinstance(payload, schema.message), (event_type, version)


def test_an_envelope_of_exactly_the_size_limit_is_not_too_large(verifier: EnvelopeVerifier) -> None:
    assert refused(verifier, b"\x00" * (64 * 1024)) == RejectReason.MALFORMED  # at the limit: parsed, not cut off
