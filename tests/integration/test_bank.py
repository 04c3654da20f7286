"""The bank as `bastion up` runs it (issue 5's acceptance list): the whole flow down to bob's stream, money
conserved under 200 concurrent transfers, idempotency under concurrency, and who may do what to whose account."""

import concurrent.futures
import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from keycloak import KeycloakOpenID

from bastion.accounts.v1 import accounts_pb2
from bastion.accounts.v1 import events_pb2 as account_events
from bastion.devstack.context import StackContext
from bastion.grpc.channels import call_metadata
from bastion.notifications.v1 import notifications_pb2
from bastion.payments.v1 import events_pb2 as payment_events
from bastion.payments.v1 import payments_pb2
from tests.integration.bank import Bank, channel, signed_events
from tests.integration.grpc_harness import user_token

DEADLINE = 20.0


@pytest.fixture(scope="module")
def bank(stack: Any, ctx: StackContext) -> Bank:
    return Bank.connect(ctx)


def transfer(bank: Bank, who: str, source: str, target: str, amount: int, key: str = "") -> Any:
    request = payments_pb2.TransferRequest(idempotency_key=key or f"pay-{uuid.uuid4()}", from_account_id=source,
                                           to_account_id=target, amount_minor=amount, currency="EUR")
    return bank.payments.Transfer(request, metadata=bank.as_user(who), timeout=DEADLINE).payment


def test_the_whole_flow_reaches_bobs_stream_and_every_step_is_a_signed_event(bank: Bank) -> None:
    correlation = f"it-flow-{uuid.uuid4()}"
    bob_stream = bank.notifications.StreamNotifications(
        notifications_pb2.StreamNotificationsRequest(after_sequence=0), metadata=bank.as_user("bob"), timeout=60)
    alice_account = bank.open_account("alice")
    bob_account = bank.open_account("bob")
    bank.deposit(alice_account, 5_000)
    payment = bank.payments.Transfer(payments_pb2.TransferRequest(
        idempotency_key=f"pay-{uuid.uuid4()}", from_account_id=alice_account, to_account_id=bob_account,
        amount_minor=1_250, currency="EUR"), metadata=bank.as_user("alice", correlation), timeout=DEADLINE).payment
    assert payment.status == "COMPLETED"

    received = None
    for reply in bob_stream:  # bob's backlog first (earlier tests), then the new ones as they are stored
        if reply.notification.kind == "transfer_received" and alice_account in reply.notification.text:
            received = reply.notification
            break
    bob_stream.cancel()
    assert received is not None and bob_account in received.text and "12.50 EUR" in received.text

    ours = {alice_account, bob_account, payment.payment_id}
    events = signed_events(bank.ctx, ["accounts.events.v1", "payments.events.v1"],
                           lambda event: event.envelope.aggregate_id in ours, count=5)
    kinds = sorted(type(event.payload).__name__ for event in events)
    assert kinds == ["AccountOpened", "AccountOpened", "MoneyDeposited", "PaymentCompleted", "TransferApplied"]
    by_type = {type(event.payload): event for event in events}
    assert by_type[account_events.TransferApplied].envelope.producer == "accounts"
    assert by_type[payment_events.PaymentCompleted].envelope.producer == "payments"
    assert received.event_id == by_type[account_events.TransferApplied].event_id
    # The correlation id of alice's call travels through payments and accounts into both events.
    assert {by_type[account_events.TransferApplied].envelope.correlation_id,
            by_type[payment_events.PaymentCompleted].envelope.correlation_id} == {correlation}


def notifications_of(bank: Bank, user: str) -> list[Any]:
    """All of USER's notifications, page after page."""
    found: list[Any] = []
    while True:
        page = bank.notifications.ListNotifications(notifications_pb2.ListNotificationsRequest(
            after_sequence=found[-1].sequence if found else 0, limit=500), metadata=bank.as_user(user),
            timeout=10).notifications
        found += page
        if len(page) < 500:
            return found


def wait_for_notifications(bank: Bank, user: str, wanted: Callable[[list[Any]], bool]) -> list[Any]:
    """USER's notifications once WANTED holds of them (the consumer works asynchronously)."""
    deadline = time.monotonic() + 60
    while not wanted(found := notifications_of(bank, user)):
        assert time.monotonic() < deadline, f"{user}'s notifications never got there"
        time.sleep(0.5)
    return found


def test_a_stream_resumes_after_the_last_sequence_seen_without_a_gap(bank: Bank) -> None:
    account = bank.open_account("bob")
    for _ in range(3):
        bank.deposit(account, 100)
    listed = wait_for_notifications(bank, "bob", lambda found: sum(
        account in n.text and n.kind == "money_deposited" for n in found) == 3)
    sequences = [n.sequence for n in listed]
    assert sequences == list(range(1, len(sequences) + 1))
    resume_after = sequences[-1] - 2
    stream = bank.notifications.StreamNotifications(
        notifications_pb2.StreamNotificationsRequest(after_sequence=resume_after), metadata=bank.as_user("bob"),
        timeout=30)
    resumed = [next(stream).notification for _ in range(2)]
    stream.cancel()
    assert [n.sequence for n in resumed] == [resume_after + 1, resume_after + 2]
    assert [n.notification_id for n in resumed] == [n.notification_id for n in listed[-2:]]


def test_nobody_reads_another_customers_notifications_and_staff_have_no_inbox(bank: Bank) -> None:
    alice_only = bank.open_account("alice")
    wait_for_notifications(bank, "alice", lambda found: any(alice_only in n.text for n in found))
    assert all(alice_only not in n.text for n in notifications_of(bank, "bob"))
    with pytest.raises(grpc.RpcError) as refused:
        bank.notifications.ListNotifications(notifications_pb2.ListNotificationsRequest(),
                                             metadata=bank.as_user("tina"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_200_concurrent_transfers_conserve_money_and_apply_each_success_once(bank: Bank) -> None:
    accounts = [bank.open_account(owner, 10_000) for owner in ("alice", "alice", "bob", "bob")]
    owner = dict(zip(accounts, ("alice", "alice", "bob", "bob"), strict=True))
    tokens = {who: bank.as_user(who) for who in ("alice", "bob")}  # one token each: the test is about money
    rng = random.Random(7)
    plan = [(source, rng.choice([a for a in accounts if a != source]), rng.randint(1, 900))
            for source in (rng.choice(accounts) for _ in range(200))]

    def one(step: tuple[str, str, int]) -> tuple[str, Any]:
        source, target, amount = step
        request = payments_pb2.TransferRequest(idempotency_key=f"pay-{uuid.uuid4()}", from_account_id=source,
                                               to_account_id=target, amount_minor=amount, currency="EUR")
        for _ in range(10):  # UNAVAILABLE leaves the outcome open: ask again with the same key until it is known
            try:
                return "ok", bank.payments.Transfer(request, metadata=tokens[owner[source]], timeout=DEADLINE).payment
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    return error.code().name, error.details()
                time.sleep(1)
        return "UNSETTLED", request.idempotency_key

    with concurrent.futures.ThreadPoolExecutor(max_workers=40) as pool:
        outcomes = list(pool.map(one, plan))
    done = [payment for status, payment in outcomes if status == "ok"]
    refused = {status for status, _ in outcomes if status != "ok"}
    # Insufficient funds is a legitimate refusal; anything else (a hang, an internal error) is not.
    assert refused <= {"FAILED_PRECONDITION"}, outcomes
    assert len(done) >= 150
    balances = {account: bank.balance(account) for account in accounts}
    assert all(balance >= 0 for balance in balances.values())
    assert sum(balances.values()) == 40_000
    expected = {account: 10_000 for account in accounts}
    for payment in done:
        expected[payment.from_account_id] -= payment.amount_minor
        expected[payment.to_account_id] += payment.amount_minor
    assert balances == expected  # every success applied exactly once, every refusal not at all
    applied = signed_events(bank.ctx, ["accounts.events.v1"], lambda event: isinstance(
        event.payload, account_events.TransferApplied) and event.payload.from_account_id in owner, count=len(done))
    assert sorted(e.payload.transfer_id for e in applied) == sorted(p.payment_id for p in done)


def test_the_same_key_twice_in_a_row_and_twice_at_once_is_one_debit_and_one_answer(bank: Bank) -> None:
    source, target = bank.open_account("alice", 1_000), bank.open_account("bob")
    key = f"pay-{uuid.uuid4()}"
    first = transfer(bank, "alice", source, target, 100, key)
    assert transfer(bank, "alice", source, target, 100, key) == first
    together = f"pay-{uuid.uuid4()}"
    start = threading.Barrier(2)

    def at_once() -> Any:
        start.wait()
        return transfer(bank, "alice", source, target, 200, together)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(lambda _: at_once(), range(2)))
    assert answers[0] == answers[1] and answers[0].status == "COMPLETED"
    assert (bank.balance(source), bank.balance(target)) == (700, 300)
    with pytest.raises(grpc.RpcError) as conflict:
        transfer(bank, "alice", source, target, 999, key)
    assert conflict.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "idempotency key" in (conflict.value.details() or "")


def test_bob_cannot_read_freeze_or_debit_alices_account(bank: Bank) -> None:
    alice_account, bob_account = bank.open_account("alice", 1_000), bank.open_account("bob")
    refusals = {
        "read": lambda: bank.accounts.GetAccount(accounts_pb2.GetAccountRequest(account_id=alice_account),
                                                 metadata=bank.as_user("bob"), timeout=10),
        "freeze": lambda: bank.accounts.FreezeAccount(accounts_pb2.FreezeAccountRequest(
            account_id=alice_account, reason="mine now"), metadata=bank.as_user("bob"), timeout=10),
        "debit": lambda: transfer(bank, "bob", alice_account, bob_account, 100),
        "deposit": lambda: bank.accounts.Deposit(accounts_pb2.DepositRequest(
            account_id=bob_account, amount_minor=100, idempotency_key=f"dep-{uuid.uuid4()}"),
            metadata=bank.as_user("bob"), timeout=10),
        "apply": lambda: bank.accounts.ApplyTransfer(accounts_pb2.ApplyTransferRequest(
            transfer_id=str(uuid.uuid4()), from_account_id=alice_account, to_account_id=bob_account,
            amount_minor=100, currency="EUR", fencing_token=10**12, idempotency_key=f"apply-{uuid.uuid4()}"),
            metadata=bank.as_user("bob"), timeout=10),
    }
    codes = {}
    for name, attempt in refusals.items():
        with pytest.raises(grpc.RpcError) as refused:
            attempt()
        codes[name] = refused.value.code()
    assert codes == {"read": grpc.StatusCode.NOT_FOUND, "freeze": grpc.StatusCode.PERMISSION_DENIED,
                     "debit": grpc.StatusCode.NOT_FOUND, "deposit": grpc.StatusCode.PERMISSION_DENIED,
                     "apply": grpc.StatusCode.PERMISSION_DENIED}
    assert (bank.balance(alice_account), bank.balance(bob_account)) == (1_000, 0)


def test_a_frozen_account_cannot_send(bank: Bank) -> None:
    source, target = bank.open_account("alice", 1_000), bank.open_account("bob")
    bank.accounts.FreezeAccount(accounts_pb2.FreezeAccountRequest(account_id=source, reason="fraud review"),
                                metadata=bank.as_user("sam"), timeout=10)
    with pytest.raises(grpc.RpcError) as refused:
        transfer(bank, "alice", source, target, 100)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "frozen" in (refused.value.details() or "")
    assert (bank.balance(source), bank.balance(target)) == (1_000, 0)


def raw_transfer(source: str, target: str, amount_varint: bytes) -> bytes:
    """A TransferRequest written by hand, so the amount can be any varint on the wire, even one no int64 holds."""
    def text(number: int, value: str) -> bytes:
        data = value.encode()
        return varint(number << 3 | 2) + varint(len(data)) + data

    return (text(1, f"pay-{uuid.uuid4()}") + text(2, source) + text(3, target)
            + varint(4 << 3) + amount_varint + text(5, "EUR"))


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint of an unsigned VALUE (up to 10 bytes)."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@pytest.mark.parametrize(("label", "wire_amount"), [
    ("zero", varint(0)),
    ("negative", varint(2**64 - 5)),              # how int64 -5 travels
    ("beyond int64", varint(2**63)),              # parses as -2**63: negative, refused
    ("far beyond int64", varint(2**64 - 1)),      # the largest varint: parses as -1
])
def test_amounts_of_zero_negative_or_beyond_int64_are_invalid(bank: Bank, label: str, wire_amount: bytes) -> None:
    source, target = bank.open_account("alice", 1_000), bank.open_account("bob")
    call = channel(bank.ctx, "payments").unary_unary("/bastion.payments.v1.Payments/Transfer")
    with pytest.raises(grpc.RpcError) as refused:
        call(raw_transfer(source, target, wire_amount), metadata=bank.as_user("alice"), timeout=DEADLINE)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, label
    assert "amount" in (refused.value.details() or "")
    assert (bank.balance(source), bank.balance(target)) == (1_000, 0)


def test_a_deposit_that_would_overflow_the_balance_is_refused(bank: Bank) -> None:
    account = bank.open_account("alice", 2**62)
    with pytest.raises(grpc.RpcError) as refused:
        bank.deposit(account, 2**62)
    assert refused.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
    assert bank.balance(account) == 2**62


def test_after_a_sign_out_a_large_transfer_is_refused_at_once_and_any_call_within_seconds(bank: Bank) -> None:
    source, target = bank.open_account("alice", 300_000), bank.open_account("bob")
    signed_in = user_token(bank.ctx, "alice")
    metadata = call_metadata(signed_in["access_token"], f"it-{uuid.uuid4()}")

    def send(amount: int) -> Any:
        request = payments_pb2.TransferRequest(idempotency_key=f"pay-{uuid.uuid4()}", from_account_id=source,
                                               to_account_id=target, amount_minor=amount, currency="EUR")
        return bank.payments.Transfer(request, metadata=metadata, timeout=DEADLINE).payment

    assert send(150_000).status == "COMPLETED"  # above the step-up threshold: checked online, active
    keycloak = KeycloakOpenID(server_url=f"https://localhost:{bank.ctx.settings.keycloak_port}/",
                              realm_name="bastion", client_id="bastion-cli", verify=str(bank.ctx.ca_file))
    keycloak.logout(signed_in["refresh_token"])  # the session ends; the access token itself is still unexpired
    with pytest.raises(grpc.RpcError) as refused:
        send(150_000)
    # At once: introspection finds the session gone (or the session's revocation reached payments even sooner).
    said = (refused.value.code(), refused.value.details() or "")
    assert (said[0], "active session" in said[1]) == (grpc.StatusCode.PERMISSION_DENIED, True) or \
        (said[0], "session this token was issued in has ended" in said[1]) == (grpc.StatusCode.UNAUTHENTICATED, True)
    # Within seconds, for any amount: the sign-out is published as the session's revocation (bastion/revocations).
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            bank.payments.ListPayments(payments_pb2.ListPaymentsRequest(), metadata=metadata, timeout=DEADLINE)
        except grpc.RpcError:
            break
        time.sleep(0.2)
    with pytest.raises(grpc.RpcError) as small:
        send(1_000)
    assert small.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "the session this token was issued in has ended" in (small.value.details() or "")
    assert (bank.balance(source), bank.balance(target)) == (150_000, 150_000)


def test_one_caller_cannot_hold_more_than_a_few_streams_open(bank: Bank) -> None:
    bank.open_account("bob")  # at least one notification, so every stream yields at once
    wait_for_notifications(bank, "bob", bool)

    def open_stream() -> Any:
        stream = bank.notifications.StreamNotifications(notifications_pb2.StreamNotificationsRequest(),
                                                        metadata=bank.as_user("bob"), timeout=30)
        next(stream)  # the server is inside the handler: the stream counts
        return stream

    streams = [open_stream() for _ in range(5)]
    try:
        with pytest.raises(grpc.RpcError) as refused:
            open_stream()
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "open streams" in (refused.value.details() or "")
    finally:
        for stream in streams:
            stream.cancel()
    deadline = time.monotonic() + 10
    while True:  # closed streams are counted out as their handlers end
        try:
            open_stream().cancel()
            break
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
            time.sleep(0.5)
