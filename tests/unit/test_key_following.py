"""Running services follow the key ring: a retired key is refused by a verifier that was built before the
retirement, and a rotated key signs a producer's next batch, both within one look at the trust store's file and
without a restart. A trust store that cannot be read stops verification instead of leaving the old keys
believed."""

import base64
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bastion.access.v1.decision_pb2 import AccessDecision
from bastion.accounts.v1.events_pb2 import AccountOpened
from bastion.devstack.event_access import load_policy
from bastion.events.envelopes import bundle, seal
from bastion.events.errors import KeyNotFoundError, RejectReason, TrustStoreUnavailableError, VerificationError
from bastion.events.keys import FOLLOW_CHECK_SECONDS, KeyRing
from bastion.events.trust import load_trust_policy
from bastion.events.verify import EnvelopeVerifier
from bastion.grpc.audit import TOPIC as DECISIONS_TOPIC
from bastion.grpc.audit import DecisionSealer
from tests.unit.conftest import SERVICES as PLATFORM_SERVICES

INFRA = Path(__file__).resolve().parents[2] / "infra"
SERVICES = set(PLATFORM_SERVICES)
TOPIC = "accounts.events.v1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def look_again(self) -> None:
        self.now += FOLLOW_CHECK_SECONDS


@pytest.fixture()
def clock() -> Clock:
    return Clock()


def verifier_of(ring: KeyRing, clock: Clock) -> EnvelopeVerifier:
    access = load_policy(INFRA / "event-access.yaml", SERVICES)
    return EnvelopeVerifier(ring.followed_trust_store(clock=clock),
                            load_trust_policy(INFRA / "event-trust.yaml", access))


def opened(ring: KeyRing, sequence: int = 1) -> bytes:
    """An AccountOpened as accounts' relay publishes it now, signed with accounts' active key."""
    envelope = seal(ring.signing_key("accounts"), TOPIC, AccountOpened(account_id="a1", owner="alice", currency="EUR"),
                    aggregate_id="a1", sequence=sequence, correlation_id="c1")
    return envelope.SerializeToString()


def test_a_key_retired_while_a_verifier_runs_is_refused_from_its_next_look_on(ring: KeyRing, clock: Clock) -> None:
    verifier = verifier_of(ring, clock)
    leaked = opened(ring)
    verifier.verify(leaked, TOPIC)  # remembered by the signature checker, too
    old_key = ring.signing_key("accounts").key_id
    ring.rotate("accounts")
    ring.retire("accounts", old_key)
    verifier.verify(leaked, TOPIC)  # the bound: until the next look, what the file said at the last one
    clock.look_again()
    with pytest.raises(VerificationError) as refusal:
        verifier.verify(leaked, TOPIC)
    assert refusal.value.reason == RejectReason.UNKNOWN_KEY and "retired" in refusal.value.detail
    assert verifier.verify(opened(ring, sequence=2), TOPIC).envelope.key_id != old_key  # the new key verifies


def test_without_following_the_retirement_would_go_unnoticed(ring: KeyRing, clock: Clock) -> None:
    """The control's counterpart: a verifier holding the trust store it started with keeps believing the key."""
    access = load_policy(INFRA / "event-access.yaml", SERVICES)
    fixed = EnvelopeVerifier(ring.trust_store(), load_trust_policy(INFRA / "event-trust.yaml", access))
    leaked = opened(ring)
    old_key = ring.signing_key("accounts").key_id
    ring.rotate("accounts")
    ring.retire("accounts", old_key)
    assert fixed.verify(leaked, TOPIC).envelope.key_id == old_key


def test_a_trust_store_that_cannot_be_read_stops_verification_until_it_can(ring: KeyRing, clock: Clock) -> None:
    verifier = verifier_of(ring, clock)
    event = opened(ring)
    verifier.verify(event, TOPIC)
    good = ring.trust_store_file.read_text()
    ring.trust_store_file.write_text(good[: len(good) // 2])  # cut short by a careless edit
    clock.look_again()
    for _ in range(3):  # not a verdict on the event (no VerificationError), and on every call, not once a look
        with pytest.raises(TrustStoreUnavailableError, match=r"trust-store\.json cannot be read"):
            verifier.verify(event, TOPIC)
    ring.trust_store_file.write_text(good)
    assert verifier.verify(event, TOPIC).envelope.aggregate_id == "a1"


def test_a_trust_store_that_is_gone_stops_verification_until_it_is_back(ring: KeyRing, clock: Clock) -> None:
    """A deleted file is a trust store that cannot be read, not one that trusts nobody: read as empty, every event
    would get a verdict (refused, unknown producer: dead-lettered, and kept as refused in the audit log for good)."""
    verifier = verifier_of(ring, clock)
    event = opened(ring)
    verifier.verify(event, TOPIC)
    good = ring.trust_store_file.read_text()
    ring.trust_store_file.unlink()  # a reset or a careless clean-up while the services run
    clock.look_again()
    for _ in range(3):
        with pytest.raises(TrustStoreUnavailableError, match=r"trust-store\.json cannot be read: FileNotFoundError"):
            verifier.verify(event, TOPIC)
    with pytest.raises(TrustStoreUnavailableError, match="FileNotFoundError"):
        ring.followed_trust_store(clock=clock)  # and a service starting meanwhile fails at start-up, naming it
    ring.trust_store_file.write_text(good)
    assert verifier.verify(event, TOPIC).envelope.aggregate_id == "a1"


def test_a_followed_signing_key_signs_with_the_rotated_key_from_the_next_look(ring: KeyRing, clock: Clock) -> None:
    key = ring.followed_signing_key("accounts", clock=clock)
    old_key = key.current().key_id
    new_key = ring.rotate("accounts")
    assert key.current().key_id == old_key
    clock.look_again()
    assert key.current().key_id == new_key
    stored = [AccountOpened(account_id="a1", owner="alice", currency="EUR")]
    envelope = seal(ring.signing_key("accounts"), TOPIC, stored[0], "a1", 1, "c1").SerializeToString()
    relayed = bundle([envelope], key.current())
    verifier = verifier_of(ring, clock)
    [outcome] = verifier.verify_bundle(relayed.SerializeToString(), TOPIC).outcomes
    assert not isinstance(outcome, VerificationError) and outcome.envelope.key_id == new_key


def test_a_rotated_key_whose_private_half_is_missing_stops_signing(ring: KeyRing, clock: Clock) -> None:
    key = ring.followed_signing_key("accounts", clock=clock)
    new_key = ring.rotate("accounts")
    next((ring.folder / "private" / "accounts").glob(f"*{new_key.split('/')[1]}.pem")).unlink()
    clock.look_again()
    with pytest.raises(KeyNotFoundError, match="is missing"):
        key.current()  # the relay's batch fails and its rows wait; nothing is signed with a key the ring dropped


def test_access_decisions_are_sealed_with_the_key_the_ring_names_now(ring: KeyRing, clock: Clock) -> None:
    sealer = DecisionSealer(ring.followed_signing_key("accounts", clock=clock))
    verifier = verifier_of(ring, clock)
    decision = AccessDecision(principal="alice", method="/bastion.accounts.v1.Accounts/GetAccount",
                              correlation_id="c1")
    old_key = ring.signing_key("accounts").key_id
    [(before, _, _)] = sealer.bundles([(decision, 0)])
    new_key = ring.rotate("accounts")
    clock.look_again()
    [(after, _, _)] = sealer.bundles([(decision, 0)])
    seen = []
    for sealed in (before, after):
        [outcome] = verifier.verify_bundle(sealed, DECISIONS_TOPIC, check_freshness=False).outcomes
        assert not isinstance(outcome, VerificationError), outcome
        seen.append(outcome.envelope.key_id)
    assert seen == [old_key, new_key]


def test_the_trust_store_file_is_replaced_whole(ring: KeyRing) -> None:
    before = ring.trust_store_file.stat().st_ino
    ring.rotate("payments")
    assert ring.trust_store_file.stat().st_ino != before
    assert [path.name for path in ring.folder.iterdir() if path.name.endswith(".partial")] == []


def test_reading_the_file_costs_nothing_between_looks(ring: KeyRing, clock: Clock) -> None:
    loads = []
    trust = ring.followed_trust_store(clock=clock)
    original = trust._load

    def counted():  # type: ignore[no-untyped-def]
        loads.append(1)
        return original()

    trust._load = counted
    for _ in range(100):
        trust.current()
    clock.look_again()
    trust.current()  # the file did not change: looked at, not read
    assert loads == []
    ring.rotate("payments")
    clock.look_again()
    trust.current()
    assert loads == [1]
    clock.look_again()
    trust.current()  # unchanged since it was read: looked at, not read again
    ring.rotate("payments")
    for _ in range(100):
        trust.current()  # changed, but not even looked at before the next look
    assert loads == [1]
    clock.look_again()
    trust.current()
    assert loads == [1, 1]
    ring.rotate("payments")
    trust.reload()  # read at once, as a verifier meeting an unknown key does
    clock.look_again()
    trust.current()  # the file holds what was read: not read again
    assert loads == [1, 1, 1]


@pytest.mark.parametrize("edit", ["in place, at a later time", "replaced, its time kept"])
def test_a_change_that_keeps_the_files_size_is_noticed(ring: KeyRing, clock: Clock, edit: str) -> None:
    """A key's public half swapped by hand: the file keeps its size, and either keeps its inode (edited in place)
    or its modification time (a copy made with its times kept, moved over it). Either is read again."""
    trust = ring.followed_trust_store(clock=clock)
    key_id = ring.signing_key("accounts").key_id
    before = ring.trust_store_file.stat()
    text = ring.trust_store_file.read_text()
    old_public = trust.current().public_key("accounts", key_id).public_bytes_raw()
    new_public = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    edited = text.replace(base64.b64encode(old_public).decode(), base64.b64encode(new_public).decode())
    assert edited != text and len(edited) == len(text)
    if edit == "in place, at a later time":
        with ring.trust_store_file.open("r+") as file:
            file.write(edited)
        os.utime(ring.trust_store_file, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        assert ring.trust_store_file.stat().st_ino == before.st_ino
    else:
        copy = ring.folder / "copy.json"
        copy.write_text(edited)
        os.utime(copy, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.replace(copy, ring.trust_store_file)
        assert ring.trust_store_file.stat().st_mtime_ns == before.st_mtime_ns
    clock.look_again()
    assert trust.current().public_key("accounts", key_id).public_bytes_raw() == new_public


def test_a_ring_whose_trust_store_is_gone_refuses_to_start_a_new_one(ring: KeyRing) -> None:
    """`bastion setup` or `keys rotate` after the file was lost would otherwise mint new keys into an empty store:
    every event and checkpoint the old keys signed would be refused for good."""
    before = ring.signing_key("accounts").key_id
    good = ring.trust_store_file.read_text()
    ring.trust_store_file.unlink()
    for change in (lambda: ring.ensure(["accounts"]), lambda: ring.rotate("accounts")):
        with pytest.raises(TrustStoreUnavailableError, match="missing, though this ring holds private keys"):
            change()
    assert not ring.trust_store_file.exists(), "nothing written"
    ring.trust_store_file.write_text(good)
    assert ring.signing_key("accounts").key_id == before


def test_a_new_ring_starts_with_an_empty_trust_store(tmp_path: Path) -> None:
    fresh = KeyRing(tmp_path / "fresh")
    fresh.ensure(["accounts"])
    assert fresh.trust_store().public_key("accounts", fresh.signing_key("accounts").key_id) is not None
