"""The notifications use cases on in-memory adapters: who is told what, own-only listing, the resumable
stream, and the owner's e-mail kept only as ciphertext under a key outside the store."""

import asyncio
import dataclasses
import datetime as dt
import stat
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import Message
from structlog.testing import capture_logs

from bastion.access.v1.decision_pb2 import SecurityAlert
from bastion.accounts.v1.events_pb2 import AccountFrozen, AccountOpened, MoneyDeposited, TransferApplied
from bastion.devstack.layout import write_private
from bastion.events.field_crypto import DataKeyRing, FieldIntegrityError, encrypt_field, field_context
from bastion.events.v1.envelope_pb2 import Envelope
from bastion.events.verify import VerifiedEvent
from bastion.payments.v1.events_pb2 import PaymentCompleted, PaymentFailed
from services.notifications.adapters.at_rest import (
    AtRestCipher,
    AtRestIntegrityError,
    AtRestKeyError,
    associated_data,
)
from services.notifications.domain import Draft, InvalidRequestError, Notification, SealedEmail, StreamExpiredError
from services.notifications.fakes import MemoryNotifications, MemoryUnitOfWork
from services.notifications.handlers import (
    ACCOUNTS_TOPIC,
    OWNER_EMAIL,
    Caller,
    NotificationsHandlers,
    NotificationStream,
)

ALICE = Caller("alice", frozenset({"customer"}))
BOB = Caller("bob", frozenset({"customer"}))
ALICE_EMAIL = "alice.liddell@bastion.local"


@dataclasses.dataclass
class World:
    uow: MemoryUnitOfWork
    handlers: NotificationsHandlers
    accounts_keys: DataKeyRing
    cipher: AtRestCipher

    def apply(
        self, payload: Message, aggregate_id: str = "agg", producer: str = "accounts", event_id: str = ""
    ) -> list[Notification]:
        """As the verifying consumer does: the effect inside one transaction."""
        envelope = Envelope(
            event_id=event_id or str(uuid.uuid4()),
            event_type=payload.DESCRIPTOR.full_name,
            aggregate_id=aggregate_id,
            sequence=1,
            correlation_id="test",
            producer=producer,
        )
        with self.uow() as tx:
            return self.handlers.on_event(tx, VerifiedEvent(envelope, payload))

    def open(self, account_id: str, owner: str, email: str | None = None) -> list[Notification]:
        payload = AccountOpened(account_id=account_id, owner=owner, currency="EUR")
        if email is not None:
            context = field_context(OWNER_EMAIL, account_id)
            payload.owner_email.CopyFrom(encrypt_field(self.accounts_keys, ACCOUNTS_TOPIC, context, email))
        return self.apply(payload, account_id)


@pytest.fixture()
def world(tmp_path: Path) -> World:
    issuer = DataKeyRing(tmp_path / "data" / "issuer")
    issuer.ensure([ACCOUNTS_TOPIC])
    for service in ("accounts", "notifications"):
        issuer.export_to(tmp_path / "data" / service, ACCOUNTS_TOPIC)
    uow = MemoryUnitOfWork()
    cipher = AtRestCipher.generate(tmp_path / "state" / "notifications-at-rest.key")
    handlers = NotificationsHandlers(uow, DataKeyRing(tmp_path / "data" / "notifications"), cipher)
    return World(uow, handlers, DataKeyRing(tmp_path / "data" / "accounts"), cipher)


def told(notifications: list[Notification]) -> list[tuple[str, str]]:
    return [(n.recipient, n.kind) for n in notifications]


def test_account_opened_tells_its_owner(world: World) -> None:
    world.handlers.clock = lambda: dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    [notice] = world.open("acc-1", "alice")
    assert notice.created_at == dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC), "the handler's clock, not the wall's"
    assert (notice.recipient, notice.kind, notice.sequence) == ("alice", "account_opened", 1)
    assert notice.text == "Your account acc-1 in EUR is open."


def test_a_deposit_tells_the_owner_of_the_account(world: World) -> None:
    world.open("acc-1", "alice")
    [notice] = world.apply(MoneyDeposited(account_id="acc-1", amount_minor=1005, currency="EUR", balance_minor=2010))
    assert told([notice]) == [("alice", "money_deposited")] and notice.sequence == 2
    assert notice.text == "10.05 EUR was deposited into your account acc-1; the balance is 20.10 EUR."


def test_a_transfer_tells_both_owners(world: World) -> None:
    world.open("acc-1", "alice")
    world.open("acc-2", "bob")
    notices = world.apply(TransferApplied(transfer_id="t1", from_account_id="acc-1", to_account_id="acc-2",
                                          amount_minor=300, currency="EUR"))
    assert told(notices) == [("alice", "transfer_sent"), ("bob", "transfer_received")]
    assert len({n.notification_id for n in notices}) == 2, "each notification has its own id"
    assert [n.text for n in notices] == [
        "3.00 EUR left your account acc-1 for account acc-2.",
        "3.00 EUR arrived in your account acc-2 from account acc-1.",
    ]


def test_payments_tell_the_initiator(world: World) -> None:
    world.open("acc-1", "alice")
    world.open("acc-2", "bob")
    completed = world.apply(PaymentCompleted(payment_id="p1", from_account_id="acc-1", to_account_id="acc-2",
                                             amount_minor=5, currency="JPY", initiated_by="alice"))
    failed = world.apply(PaymentFailed(payment_id="p2", from_account_id="acc-1", to_account_id="acc-2",
                                       amount_minor=5, currency="EUR", reason="daily limit exceeded"))
    assert told(completed) == [("alice", "payment_completed")]
    assert completed[0].text == "Your payment p1 of 5 JPY to account acc-2 is complete.", "the yen has no minor unit"
    assert told(failed) == [("alice", "payment_failed")] and failed[0].text.endswith("daily limit exceeded")


def test_a_transfer_that_arrives_before_its_targets_account_opened_waits_for_it(world: World) -> None:
    world.open("acc-1", "alice")
    with capture_logs() as logs:
        early = world.apply(TransferApplied(transfer_id="t-1", from_account_id="acc-1", to_account_id="acc-2",
                                            amount_minor=500, currency="EUR"))
        deposit = world.apply(MoneyDeposited(account_id="acc-2", amount_minor=7, balance_minor=507, currency="EUR"))
    assert told(early) == [("alice", "transfer_sent")] and deposit == []
    assert [e["account_id"] for e in logs if e["event"] == "notification_deferred_until_owner_known"] == [
        "acc-2", "acc-2"]
    opened = world.open("acc-2", "bob")
    assert told(opened) == [("bob", "account_opened"), ("bob", "transfer_received"), ("bob", "money_deposited")]
    assert [n.sequence for n in opened] == [1, 2, 3]
    assert opened[1].event_id != opened[0].event_id  # each keeps the event that caused it
    assert world.open("acc-2", "bob")[1:] == []  # taken once


def test_a_frozen_account_is_not_announced_to_its_owner(world: World) -> None:
    world.open("acc-1", "alice")
    assert world.apply(AccountFrozen(account_id="acc-1", reason="investigation")) == []


def test_listing_is_own_only_and_pages_by_sequence(world: World) -> None:
    world.open("acc-1", "alice")
    world.open("acc-2", "bob")
    for n in range(3):
        world.apply(MoneyDeposited(account_id="acc-1", amount_minor=n + 1, currency="EUR"))
    assert {n.recipient for n in world.handlers.list_notifications(ALICE)} == {"alice"}
    assert [n.kind for n in world.handlers.list_notifications(BOB)] == ["account_opened"]
    assert [n.sequence for n in world.handlers.list_notifications(ALICE, after_sequence=1, limit=2)] == [2, 3]


@pytest.mark.parametrize(("after", "limit", "field"), [(-1, 10, "after_sequence"), (0, 0, "limit"), (0, 501, "limit")])
def test_bad_pages_are_invalid(world: World, after: int, limit: int, field: str) -> None:
    with pytest.raises(InvalidRequestError, match=f"^{field} must"):
        world.handlers.list_notifications(ALICE, after, limit)


def test_the_stream_yields_the_backlog_then_new_notifications(world: World) -> None:
    world.open("acc-1", "alice")
    world.apply(MoneyDeposited(account_id="acc-1", amount_minor=1, currency="EUR"))

    async def scenario() -> list[int]:
        stream = aiter(NotificationStream(world.handlers, ALICE, poll_seconds=0.01))
        seen = [(await anext(stream)).sequence, (await anext(stream)).sequence]
        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)
        assert not waiting.done(), "the stream waits for a new notification"
        world.apply(MoneyDeposited(account_id="acc-1", amount_minor=2, currency="EUR"))
        seen.append((await asyncio.wait_for(waiting, 2)).sequence)
        return seen

    assert asyncio.run(scenario()) == [1, 2, 3]


def test_a_reconnected_stream_resumes_after_the_last_sequence_without_gaps_or_duplicates(world: World) -> None:
    world.open("acc-1", "alice")
    world.open("acc-2", "bob")
    for n in range(4):
        world.apply(MoneyDeposited(account_id="acc-1", amount_minor=n + 1, currency="EUR"))

    async def read(after: int, count: int) -> list[int]:
        stream = NotificationStream(world.handlers, ALICE, after_sequence=after, poll_seconds=0.01, page=2)
        seen: list[int] = []
        async for notice in stream:
            assert notice.recipient == "alice"
            seen.append(notice.sequence)
            if len(seen) == count:
                break
        return seen

    first = asyncio.run(read(0, 2))
    world.apply(MoneyDeposited(account_id="acc-1", amount_minor=9, currency="EUR"))  # while disconnected
    assert first + asyncio.run(read(first[-1], 4)) == [1, 2, 3, 4, 5, 6]


def test_the_owners_email_is_stored_only_as_ciphertext_and_opens_with_the_key(world: World) -> None:
    world.open("acc-1", "alice", ALICE_EMAIL)
    sealed = world.uow.notifications.emails["alice"]
    assert ALICE_EMAIL.encode() not in sealed.blob and b"alice.liddell" not in sealed.blob
    assert sealed.key_id == world.cipher.key_id
    assert world.handlers.email_of("alice") == ALICE_EMAIL
    assert world.handlers.email_of("bob") is None


def test_a_different_key_cannot_open_the_email(world: World, tmp_path: Path) -> None:
    world.open("acc-1", "alice", ALICE_EMAIL)
    sealed = world.uow.notifications.emails["alice"]
    other = AtRestCipher.generate(tmp_path / "other.key")
    with pytest.raises(AtRestKeyError, match="sealed under key"):
        other.decrypt(sealed, "alice")
    with pytest.raises(AtRestIntegrityError):  # even when the row is made to claim the other key's id
        other.decrypt(SealedEmail(other.key_id, sealed.blob), "alice")


@pytest.mark.parametrize("tamper", ["flip", "truncate", "truncate_into_the_nonce", "other_row"])
def test_a_tampered_or_moved_ciphertext_is_refused(world: World, tamper: str) -> None:
    world.open("acc-1", "alice", ALICE_EMAIL)
    sealed = world.uow.notifications.emails["alice"]
    recipient, blob = "alice", sealed.blob
    if tamper == "flip":
        blob = blob[:-1] + bytes([blob[-1] ^ 1])
    elif tamper == "truncate":
        blob = blob[:20]
    elif tamper == "truncate_into_the_nonce":
        blob = blob[:4]
    else:
        recipient = "bob"  # alice's sealed address copied into bob's row
    with pytest.raises(AtRestIntegrityError):
        world.cipher.decrypt(SealedEmail(sealed.key_id, blob), recipient)


def test_the_at_rest_key_is_private_never_replaced_and_a_missing_one_is_named(tmp_path: Path) -> None:
    key_file = tmp_path / "at-rest.key"
    with pytest.raises(AtRestKeyError, match=str(key_file)):
        AtRestCipher(key_file)
    AtRestCipher.generate(key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_bytes()) == 32, "AES-256"
    with pytest.raises(AtRestKeyError, match="refusing"):
        AtRestCipher.generate(key_file)
    key_file.chmod(0o644)
    with pytest.raises(AtRestKeyError, match="0600"):
        AtRestCipher(key_file)


@pytest.mark.parametrize("mode", [0o640, 0o620, 0o610, 0o604, 0o602], ids=oct)
def test_an_at_rest_key_that_group_or_others_can_reach_is_refused(tmp_path: Path, mode: int) -> None:
    """Writable is as bad as readable: whoever can replace the key can make the service seal under theirs."""
    key_file = tmp_path / "at-rest.key"
    AtRestCipher.generate(key_file)
    key_file.chmod(mode)
    with pytest.raises(AtRestKeyError, match="0600"):
        AtRestCipher(key_file)


@pytest.mark.parametrize("length", [0, 16, 31, 33])
def test_an_at_rest_key_of_another_length_is_refused(tmp_path: Path, length: int) -> None:
    """16 or 24 bytes would pass for an AES key and quietly weaken it to AES-128 or AES-192."""
    key_file = tmp_path / "at-rest.key"
    write_private(key_file, bytes(length))
    with pytest.raises(AtRestKeyError, match="is not a 32-byte AES key"):
        AtRestCipher(key_file)


def test_a_sealed_address_is_a_nonce_then_aes_gcm_under_the_documented_aad(tmp_path: Path) -> None:
    """Every row already written was sealed this way: a change of layout would make them all unreadable."""
    key_file = tmp_path / "at-rest.key"
    cipher = AtRestCipher.generate(key_file)
    sealed = cipher.encrypt(ALICE_EMAIL, "alice")
    aad = b"bastion.notifications.recipients.email\x00" + b"\x00\x00\x00\x05alice" + b"\x00\x00\x00\x18"
    aad += cipher.key_id.encode()  # "at-rest/" and 16 hex digits: 24 bytes
    assert associated_data("alice", cipher.key_id) == aad
    assert len(sealed.blob) == 12 + len(ALICE_EMAIL) + 16
    nonce, ciphertext = sealed.blob[:12], sealed.blob[12:]
    assert AESGCM(key_file.read_bytes()).decrypt(nonce, ciphertext, aad) == ALICE_EMAIL.encode()


def test_the_key_id_is_derived_from_the_key_and_stable(tmp_path: Path) -> None:
    """Rows name their key by this id: a new derivation would strand them all; it must not reveal the key."""
    key_file = tmp_path / "at-rest.key"
    write_private(key_file, bytes(range(32)))
    assert AtRestCipher(key_file).key_id == "at-rest/2ff28e54e0d1fe2c"


def test_sealing_the_same_address_twice_uses_a_fresh_nonce(tmp_path: Path) -> None:
    """A GCM nonce repeated under one key gives away the XOR of the plaintexts and lets tags be forged."""
    cipher = AtRestCipher.generate(tmp_path / "at-rest.key")
    first, second = cipher.encrypt(ALICE_EMAIL, "alice"), cipher.encrypt(ALICE_EMAIL, "alice")
    assert first.blob[:12] != second.blob[:12] and first.blob != second.blob


@pytest.mark.parametrize("text", ["", "a", ALICE_EMAIL, "zoë@exämple.org"])
def test_any_text_opens_as_it_was_sealed(tmp_path: Path, text: str) -> None:
    cipher = AtRestCipher.generate(tmp_path / "at-rest.key")
    assert cipher.decrypt(cipher.encrypt(text, "alice"), "alice") == text


def test_without_the_data_key_the_notification_is_made_but_no_email_kept(world: World) -> None:
    world.handlers.data_keys = None
    with capture_logs() as logs:
        assert told(world.open("acc-1", "alice", ALICE_EMAIL)) == [("alice", "account_opened")]
    assert world.uow.notifications.emails == {}
    assert any(e["event"] == "owner_email_not_readable" for e in logs)


def test_a_tampered_event_field_fails_the_event_and_changes_nothing(world: World) -> None:
    context = field_context(OWNER_EMAIL, "acc-1")
    field = encrypt_field(world.accounts_keys, ACCOUNTS_TOPIC, context, ALICE_EMAIL)
    field.ciphertext = bytes([field.ciphertext[0] ^ 1]) + field.ciphertext[1:]
    with pytest.raises(FieldIntegrityError):
        world.apply(AccountOpened(account_id="acc-1", owner="alice", currency="EUR", owner_email=field), "acc-1")
    assert world.uow.notifications.owners == {} and world.uow.notifications.rows == []


def test_a_security_alert_is_told_to_each_recipient_once_and_to_nobody_else(world: World) -> None:
    world.handlers.alert_recipients = ("ada", "zoe")
    alert = SecurityAlert(rule="permission-probing", severity="warning", counted_by="principal", key="alice", count=5)
    notifications = world.apply(alert, producer="audit", event_id="alert-event-1")
    assert told(notifications) == [("ada", "security_alert"), ("zoe", "security_alert")]
    assert {n.event_id for n in notifications} == {"alert-event-1"}, "traced to the alert"
    assert notifications[0].text.startswith("Security alert (warning) permission-probing: principal 'alice' refused 5")
    assert world.handlers.list_notifications(ALICE) == [], "alice, the caller the alert names, is not told"
    with capture_logs() as logs:
        assert world.apply(alert, producer="payments") == [], "an alert of another producer is nobody's news"
    assert [line["event"] for line in logs] == ["security_alert_ignored"]
    world.handlers.alert_recipients = ()
    assert world.apply(alert, producer="audit") == []


def test_a_transfer_between_two_owners_is_stored_in_name_order_whichever_way_it_goes(world: World) -> None:
    world.open("acc-1", "alice")
    world.open("acc-2", "bob")
    notices = world.apply(
        TransferApplied(
            transfer_id="t1", from_account_id="acc-2", to_account_id="acc-1", amount_minor=300, currency="EUR"
        )
    )
    # Each append locks its recipient's row: the same order for every consumer, so two cannot deadlock.
    assert told(notices) == [("alice", "transfer_received"), ("bob", "transfer_sent")]
    assert told(world.uow.notifications.rows[-2:]) == told(notices)


def test_a_completed_payment_tells_whoever_initiated_it_or_else_the_owner_of_the_source(world: World) -> None:
    world.open("acc-1", "alice")
    world.open("acc-2", "bob")
    named = world.apply(
        PaymentCompleted(
            payment_id="p1",
            from_account_id="acc-1",
            to_account_id="acc-2",
            amount_minor=5,
            currency="EUR",
            initiated_by="carol",
        )
    )
    unnamed = world.apply(
        PaymentCompleted(
            payment_id="p2", from_account_id="acc-1", to_account_id="acc-2", amount_minor=5, currency="EUR"
        )
    )
    assert (told(named), told(unnamed)) == ([("carol", "payment_completed")], [("alice", "payment_completed")])


def test_the_reason_a_payment_failed_is_told_bounded(world: World) -> None:
    world.open("acc-1", "alice")
    [failed] = world.apply(
        PaymentFailed(
            payment_id="p1",
            from_account_id="acc-1",
            to_account_id="acc-2",
            amount_minor=5,
            currency="EUR",
            reason="r" * 300,
        )
    )
    assert failed.text.endswith("failed: " + "r" * 200)


def test_an_account_opened_for_nobody_tells_nobody_and_claims_the_account_for_nobody(world: World) -> None:
    assert world.apply(AccountOpened(account_id="acc-1", owner="", currency="EUR"), "acc-1") == []
    assert world.uow.notifications.owners == {} and world.uow.notifications.deferred == []
    world.open("acc-1", "alice")
    assert told(world.apply(MoneyDeposited(account_id="acc-1", amount_minor=1, currency="EUR"))) == [
        ("alice", "money_deposited")
    ]


@dataclasses.dataclass
class OpenedMeanwhile(MemoryNotifications):
    """Another consumer commits an AccountOpened of LATE_OWNERS between this consumer's owner lookup and its defer."""

    late_owners: dict[str, str] = dataclasses.field(default_factory=dict)

    def defer(self, draft: Draft, event_id: str, created_at: dt.datetime) -> str | None:
        self.owners.update(self.late_owners)
        return super().defer(draft, event_id, created_at)


def test_an_owner_who_became_known_while_deferring_is_told_at_once(world: World) -> None:
    world.uow.notifications = OpenedMeanwhile(late_owners={"acc-2": "bob"})
    world.open("acc-1", "alice")
    with capture_logs() as logs:
        notices = world.apply(
            TransferApplied(
                transfer_id="t1", from_account_id="acc-1", to_account_id="acc-2", amount_minor=300, currency="EUR"
            )
        )
    assert told(notices) == [("alice", "transfer_sent"), ("bob", "transfer_received")]
    assert world.uow.notifications.deferred == [] and logs == []


def test_pages_of_one_and_of_the_largest_size_are_valid(world: World) -> None:
    world.open("acc-1", "alice")
    world.apply(MoneyDeposited(account_id="acc-1", amount_minor=1, currency="EUR"))
    assert [n.sequence for n in world.handlers.list_notifications(ALICE, 0, 1)] == [1]
    assert [n.sequence for n in world.handlers.list_notifications(ALICE, 0, 500)] == [1, 2]


def test_a_stream_that_outlives_its_token_ends_and_says_where_to_resume(world: World) -> None:
    world.open("acc-1", "alice")
    world.apply(MoneyDeposited(account_id="acc-1", amount_minor=1, currency="EUR"))
    expires_at = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    now = [expires_at - dt.timedelta(seconds=1)]
    world.handlers.clock = lambda: now[0]

    async def scenario() -> list[int]:
        stream = aiter(NotificationStream(world.handlers, ALICE, poll_seconds=0.01, expires_at=expires_at))
        seen = [(await anext(stream)).sequence, (await anext(stream)).sequence]
        now[0] = expires_at  # the token's last instant is already past its lifetime
        with pytest.raises(StreamExpiredError, match="after_sequence=2 "):
            await asyncio.wait_for(anext(stream), 2)
        return seen

    assert asyncio.run(scenario()) == [1, 2]


def test_a_backlog_comes_page_after_page_at_once_and_an_idle_stream_polls_once_per_interval(world: World) -> None:
    world.open("acc-1", "alice")
    for n in range(4):
        world.apply(MoneyDeposited(account_id="acc-1", amount_minor=n + 1, currency="EUR"))
    polls: list[dt.datetime] = []

    def clock() -> dt.datetime:  # the stream reads the clock once per poll, to check the token's expiry
        polls.append(dt.datetime.now(dt.UTC))
        return polls[-1]

    world.handlers.clock = clock

    async def scenario() -> list[int]:
        stream = aiter(
            NotificationStream(
                world.handlers, ALICE, poll_seconds=30, page=2, expires_at=dt.datetime(9999, 1, 1, tzinfo=dt.UTC)
            )
        )
        backlog = [(await asyncio.wait_for(anext(stream), 2)).sequence for _ in range(5)]
        idle = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.2)
        idle.cancel()
        return backlog

    assert asyncio.run(scenario()) == [1, 2, 3, 4, 5]
    assert len(polls) == 3, "pages of 2, 2 and 1, then a wait of poll_seconds before the next poll"
