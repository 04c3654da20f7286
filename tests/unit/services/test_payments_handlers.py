"""The payments use case on in-memory adapters: ownership, validation, idempotency (also concurrent), limits,
the fenced lock, accounts' refusals recorded as FAILED, and the step-up check of large transfers."""

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pytest

from bastion import pages
from bastion.grpc.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from bastion.payments.v1 import events_pb2
from bastion.resilience.locks import LockBusyError
from services.accounts.domain import MAX_MINOR
from services.accounts.handlers import Caller as AccountsCaller
from services.payments.domain import (
    AccountLockUnavailableError,
    DailyLimitExceededError,
    IdempotencyConflictError,
    InvalidTransferError,
    Limits,
    Payment,
    PaymentPendingError,
    PaymentRefusedError,
    PaymentStatus,
    SourceAccountNotFoundError,
    TokenNotActiveError,
    Transfer,
    VelocityLimitExceededError,
)
from services.payments.fakes import MemoryAccountsGateway, MemoryIntrospection, MemoryLocks, MemoryUnitOfWork
from services.payments.handlers import PAYMENT_PAGES, Caller, PaymentsHandlers

T = TypeVar("T")
ALICE = Caller("alice", access_token="alice-token")
BOB = Caller("bob", access_token="bob-token")
LIMITS = Limits(daily_minor=10_000, velocity_count=5, velocity_window=dt.timedelta(seconds=60),
                step_up_above_minor=5_000)


@dataclass
class Clock:
    now: dt.datetime = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


@dataclass
class World:
    uow: MemoryUnitOfWork = field(default_factory=MemoryUnitOfWork)
    accounts: MemoryAccountsGateway = field(default_factory=MemoryAccountsGateway)
    locks: MemoryLocks = field(default_factory=MemoryLocks)
    introspection: MemoryIntrospection = field(default_factory=lambda: MemoryIntrospection(active={"alice-token"}))
    clock: Clock = field(default_factory=Clock)

    def __post_init__(self) -> None:
        self.payments = PaymentsHandlers(self.uow, self.accounts, self.locks, self.introspection, LIMITS, self.clock)
        self.alice = self.accounts.open_account("alice", 20_000)
        self.bob = self.accounts.open_account("bob")

    def transfer(self, amount: int, key: str = "key-0001-abcd", caller: Caller = ALICE, source: str = "",
                 target: str = "") -> Payment:
        command = Transfer(source or self.alice, target or self.bob, amount, "EUR", key)
        return run(self.payments.transfer(caller, command))

    def events(self) -> list[type[Any]]:
        return [type(event) for event, _ in self.uow.events.emitted]


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


@pytest.fixture()
def world() -> World:
    return World()


def test_a_transfer_moves_money_under_the_source_lock_and_emits_one_event(world: World) -> None:
    payment = world.transfer(300)
    assert (payment.status, payment.amount_minor, payment.initiated_by) == (PaymentStatus.COMPLETED, 300, "alice")
    assert (world.accounts.balance(world.alice), world.accounts.balance(world.bob)) == (19_700, 300)
    assert world.locks.taken == [f"account:{world.alice}"]
    assert world.accounts.store.accounts.rows[world.alice].last_fencing_token == 1
    [(event, aggregate)] = world.uow.events.emitted
    assert isinstance(event, events_pb2.PaymentCompleted) and aggregate == payment.payment_id
    assert (event.from_account_id, event.to_account_id, event.amount_minor) == (world.alice, world.bob, 300)
    assert world.uow.payments.rows == {payment.payment_id: payment}


def test_the_same_request_twice_is_one_payment(world: World) -> None:
    first, second = world.transfer(300), world.transfer(300)
    assert first == second
    assert world.accounts.balance(world.alice) == 19_700
    assert world.accounts.calls == [first.payment_id]
    assert world.events() == [events_pb2.PaymentCompleted]


def test_the_same_request_twice_at_once_debits_once_and_answers_the_same(world: World) -> None:
    command = Transfer(world.alice, world.bob, 300, "EUR", "key-concurrent-1")

    async def both() -> tuple[Payment, Payment]:
        return await asyncio.gather(world.payments.transfer(ALICE, command), world.payments.transfer(ALICE, command))

    first, second = run(both())
    assert first == second and first.status is PaymentStatus.COMPLETED
    assert world.accounts.balance(world.alice) == 19_700
    assert world.events() == [events_pb2.PaymentCompleted]


def test_a_reused_key_with_another_request_conflicts(world: World) -> None:
    world.transfer(300)
    with pytest.raises(IdempotencyConflictError) as error:
        world.transfer(301)
    assert error.value.status == grpc.StatusCode.FAILED_PRECONDITION
    assert world.accounts.balance(world.alice) == 19_700


def test_another_customers_account_is_not_found(world: World) -> None:
    with pytest.raises(SourceAccountNotFoundError) as error:
        world.transfer(300, caller=BOB)
    assert error.value.status == grpc.StatusCode.NOT_FOUND
    with pytest.raises(NotFoundError):
        world.transfer(300, source="acc-does-not-exist")
    assert world.accounts.balance(world.alice) == 20_000 and world.accounts.calls == []


@pytest.mark.parametrize(
    ("amount", "currency", "key", "same_account"),
    [(0, "EUR", "key-0001-abcd", False), (-1, "EUR", "key-0001-abcd", False),
     (MAX_MINOR + 1, "EUR", "key-0001-abcd", False), (100, "XXX", "key-0001-abcd", False),
     (100, "EUR", "short", False), (100, "EUR", "key with spaces", False), (100, "EUR", "key-0001-abcd", True)],
)
def test_invalid_transfers_are_refused_before_anything_happens(world: World, amount: int, currency: str, key: str,
                                                               same_account: bool) -> None:
    command = Transfer(world.alice, world.alice if same_account else world.bob, amount, currency, key)
    with pytest.raises(InvalidTransferError) as error:
        run(world.payments.transfer(ALICE, command))
    assert error.value.status == grpc.StatusCode.INVALID_ARGUMENT
    assert world.locks.taken == [] and world.uow.payments.rows == {}


def test_the_daily_limit_counts_the_sources_utc_day(world: World) -> None:
    world.transfer(4_000, "key-day-0001")
    world.transfer(4_000, "key-day-0002")
    with pytest.raises(DailyLimitExceededError) as error:
        world.transfer(2_001, "key-day-0003")
    assert error.value.status == grpc.StatusCode.FAILED_PRECONDITION
    assert world.transfer(2_000, "key-day-0004").status is PaymentStatus.COMPLETED  # exactly the limit
    world.clock.now = dt.datetime(2030, 1, 2, 0, 0, tzinfo=dt.UTC)
    assert world.transfer(1, "key-day-0005").status is PaymentStatus.COMPLETED
    assert world.accounts.balance(world.alice) == 20_000 - 10_001


def test_the_velocity_limit_counts_recent_transfers(world: World) -> None:
    for n in range(5):
        world.transfer(1, f"key-fast-{n:04}")
    with pytest.raises(VelocityLimitExceededError):
        world.transfer(1, "key-fast-0005")
    world.clock.now += dt.timedelta(seconds=61)
    assert world.transfer(1, "key-fast-0006").status is PaymentStatus.COMPLETED


def test_no_lock_no_transfer(world: World) -> None:
    world.locks.unavailable = True
    with pytest.raises(AccountLockUnavailableError) as error:
        world.transfer(300)
    assert error.value.status == grpc.StatusCode.UNAVAILABLE
    assert world.accounts.calls == [] and world.accounts.balance(world.alice) == 20_000
    assert world.uow.payments.rows == {}


@pytest.mark.parametrize("refusal", ["insufficient", "frozen", "lock-taken-over"])
def test_a_refusal_by_accounts_is_recorded_as_failed_and_answered_again(world: World, refusal: str) -> None:
    if refusal == "insufficient":
        world.alice = world.accounts.open_account("alice", 299)
    if refusal == "frozen":
        world.accounts.bank.freeze_account(AccountsCaller("sam", frozenset({"support"})), world.bob, "investigation")
    if refusal == "lock-taken-over":  # a later holder of the lock got token 10 accepted; ours will be 1
        world.accounts.bank.apply_transfer("other", world.alice, world.bob, 1, "EUR", 10, "key-other-holder")
    with pytest.raises(PaymentRefusedError) as error:
        world.transfer(300)
    assert error.value.status == grpc.StatusCode.FAILED_PRECONDITION
    [payment] = world.uow.payments.rows.values()
    assert payment.status is PaymentStatus.FAILED and payment.reason == str(error.value)
    [(event, aggregate)] = world.uow.events.emitted
    assert isinstance(event, events_pb2.PaymentFailed) and aggregate == payment.payment_id
    assert event.reason == payment.reason
    with pytest.raises(PaymentRefusedError) as again:
        world.transfer(300)
    assert str(again.value) == payment.reason
    assert len(world.accounts.calls) == 1


def test_an_unknown_outcome_stays_pending_counts_and_a_retry_settles_it(world: World) -> None:
    world.accounts.unavailable = True
    with pytest.raises(UnavailableError):
        world.transfer(4_000)
    [pending] = world.uow.payments.rows.values()
    assert pending.status is PaymentStatus.PENDING and world.uow.events.emitted == []
    world.accounts.unavailable = False
    world.transfer(4_000, "key-other-0001")
    with pytest.raises(DailyLimitExceededError):  # the pending 4000 may have moved: it counts
        world.transfer(4_000, "key-other-0002")
    settled = world.transfer(4_000)
    assert settled.payment_id == pending.payment_id and settled.status is PaymentStatus.COMPLETED
    assert world.accounts.balance(world.alice) == 12_000


def test_a_large_transfer_needs_an_active_token(world: World) -> None:
    world.introspection.active.clear()
    with pytest.raises(TokenNotActiveError) as error:
        world.transfer(5_001)
    assert error.value.status == grpc.StatusCode.PERMISSION_DENIED
    world.introspection.reachable = False
    with pytest.raises(UnavailableError):
        world.transfer(5_001)
    assert world.accounts.calls == [] and world.uow.payments.rows == {}
    assert world.transfer(5_000).status is PaymentStatus.COMPLETED  # at the threshold: no online check
    world.introspection.reachable, world.introspection.active = True, {"alice-token"}
    world.clock.now += dt.timedelta(days=1)
    assert world.transfer(5_001, "key-large-0001").status is PaymentStatus.COMPLETED


def test_a_pending_payment_is_settled_by_the_reconciler_once(world: World) -> None:
    world.accounts.unavailable = True
    with pytest.raises(UnavailableError):
        world.transfer(4_000)
    assert run(world.payments.settle_pending(dt.timedelta(minutes=1))) == []  # still unavailable, too young
    world.clock.now += dt.timedelta(minutes=2)
    assert run(world.payments.settle_pending(dt.timedelta(minutes=1))) == []  # accounts still away: kept
    world.accounts.unavailable = False
    [settled] = run(world.payments.settle_pending(dt.timedelta(minutes=1)))
    assert settled.status is PaymentStatus.COMPLETED and world.events() == [events_pb2.PaymentCompleted]
    assert run(world.payments.settle_pending(dt.timedelta(minutes=1))) == []
    assert world.accounts.balance(world.alice) == 16_000
    assert world.transfer(4_000).payment_id == settled.payment_id  # the customer's retry gets the same answer


def test_payments_the_reconciler_cannot_settle_do_not_keep_newer_ones_waiting(world: World) -> None:
    """A round takes a bounded number of pending payments; the next goes on after the last one it tried, so as many
    payments as a round takes, failing every time, cannot hold back a newer one for ever."""
    world.accounts.unavailable = True
    pending = []
    for n in range(3):
        with pytest.raises(UnavailableError):
            world.transfer(100 + n, f"key-stuck-000{n}")
        world.clock.now += dt.timedelta(seconds=1)
    pending = sorted(world.uow.payments.rows.values(), key=lambda payment: payment.created_at)
    world.accounts.unavailable = False
    stuck = {payment.payment_id for payment in pending[:2]}
    apply_transfer = world.accounts.apply_transfer

    async def failing_for_the_stuck(payment_id: str, *args: Any) -> None:
        if payment_id in stuck:
            raise UnavailableError("accounts failed: INTERNAL")
        await apply_transfer(payment_id, *args)

    world.accounts.apply_transfer = failing_for_the_stuck  # type: ignore[method-assign]
    world.clock.now += dt.timedelta(minutes=2)
    assert run(world.payments.settle_pending(dt.timedelta(minutes=1), limit=2)) == []
    [settled] = run(world.payments.settle_pending(dt.timedelta(minutes=1), limit=2))
    assert settled.payment_id == pending[2].payment_id and settled.status is PaymentStatus.COMPLETED
    assert run(world.payments.settle_pending(dt.timedelta(minutes=1), limit=2)) == [], "back to the oldest"
    stuck.clear()
    assert len(run(world.payments.settle_pending(dt.timedelta(minutes=1), limit=2))) == 2, "none after them: " \
        "from the oldest again, in the same round"


def test_a_round_after_one_that_took_exactly_the_last_pending_starts_again_from_the_oldest(world: World) -> None:
    """Exactly LIMIT payments pending: a round takes them all, and the next found none after the last of them and
    tried nothing at all, a round wasted while they waited."""
    world.accounts.unavailable = True
    for n in range(2):
        with pytest.raises(UnavailableError):
            world.transfer(100 + n, f"key-exact-000{n}")
        world.clock.now += dt.timedelta(seconds=1)
    world.clock.now += dt.timedelta(minutes=2)
    assert run(world.payments.settle_pending(dt.timedelta(minutes=1), limit=2)) == []  # accounts still away
    world.accounts.unavailable = False
    settled = run(world.payments.settle_pending(dt.timedelta(minutes=1), limit=2))
    assert [payment.status for payment in settled] == [PaymentStatus.COMPLETED] * 2
    assert run(world.payments.settle_pending(dt.timedelta(minutes=1), limit=2)) == [], "none pending: nothing to do"


def test_a_pending_payment_that_accounts_refuses_is_settled_as_failed(world: World) -> None:
    world.accounts.unavailable = True
    with pytest.raises(UnavailableError):
        world.transfer(4_000)
    world.accounts.unavailable = False
    world.accounts.bank.freeze_account(AccountsCaller("sam", frozenset({"support"})), world.alice, "under review")
    world.clock.now += dt.timedelta(minutes=2)
    [settled] = run(world.payments.settle_pending(dt.timedelta(minutes=1)))
    assert settled.status is PaymentStatus.FAILED and world.events() == [events_pb2.PaymentFailed]
    assert world.accounts.balance(world.alice) == 20_000


def test_the_velocity_limit_counts_transfers_spread_over_the_window(world: World) -> None:
    start = world.clock.now
    for n in range(5):
        world.clock.now = start + dt.timedelta(seconds=10 * n)
        world.transfer(1, f"key-spread-{n:04}")
    world.clock.now = start + dt.timedelta(seconds=50)
    with pytest.raises(VelocityLimitExceededError):
        world.transfer(1, "key-spread-0005")
    world.clock.now = start + dt.timedelta(seconds=61)  # the first one left the window
    assert world.transfer(1, "key-spread-0006").status is PaymentStatus.COMPLETED


@pytest.mark.parametrize(("first", "second"), [
    (("bob", 300, "EUR"), ("carol", 300, "EUR")),     # another destination
    (("bob", 300, "EUR"), ("bob", 300, "USD")),       # another currency
    (("bob", 13, "EUR"), ("acc-21", 3, "EUR")),       # fields that run together: "acc-2"+"13" == "acc-21"+"3"
])
def test_a_reused_key_with_any_field_of_the_request_changed_conflicts(
        world: World, first: tuple[str, int, str], second: tuple[str, int, str]) -> None:
    accounts = {"bob": world.bob, "carol": world.accounts.open_account("carol")}
    assert world.bob == "acc-2"
    target, amount, currency = first
    run(world.payments.transfer(ALICE, Transfer(world.alice, accounts[target], amount, currency, "key-reused-01")))
    target, amount, currency = second
    with pytest.raises(IdempotencyConflictError):
        run(world.payments.transfer(ALICE, Transfer(world.alice, accounts.get(target, target), amount, currency,
                                                    "key-reused-01")))
    assert len(world.accounts.calls) == 1


@pytest.mark.parametrize("side", ["source", "target"])
def test_account_ids_longer_than_a_uuid_are_refused_before_anything_happens(world: World, side: str) -> None:
    too_long = "a" * 37
    with pytest.raises(InvalidTransferError):
        world.transfer(300, **{side: too_long})  # type: ignore[arg-type]
    assert world.locks.taken == [] and world.uow.payments.rows == {} and world.accounts.calls == []


def test_account_ids_as_long_as_a_uuid_are_accepted(world: World) -> None:
    world.accounts.bank.new_id = lambda: str(uuid.uuid4())  # what the accounts service really hands out
    carol = world.accounts.open_account("carol")
    assert len(carol) == 36
    assert world.transfer(300, target=carol).status is PaymentStatus.COMPLETED


def busy_lock(resource: str) -> AbstractAsyncContextManager[int]:
    @asynccontextmanager
    async def hold() -> AsyncIterator[int]:
        raise LockBusyError(f"{resource} is locked by another operation")
        yield 0  # pragma: no cover

    return hold()


def test_a_source_account_locked_too_long_by_another_operation_is_unavailable(world: World) -> None:
    payments = PaymentsHandlers(world.uow, world.accounts, busy_lock, world.introspection, LIMITS, world.clock)
    with pytest.raises(AccountLockUnavailableError) as error:
        run(payments.transfer(ALICE, Transfer(world.alice, world.bob, 300, "EUR", "key-busy-0001")))
    assert error.value.status == grpc.StatusCode.UNAVAILABLE
    assert world.accounts.calls == [] and world.uow.payments.rows == {}


class BothAskFirst:
    """World's locks, granted only once two operations asked for one: both have read the payments first."""

    def __init__(self, world: World) -> None:
        self.world, self.asked, self.both = world, 0, asyncio.Event()

    def __call__(self, resource: str) -> AbstractAsyncContextManager[int]:
        @asynccontextmanager
        async def hold() -> AsyncIterator[int]:
            self.asked += 1
            if self.asked == 2:
                self.both.set()
            await asyncio.wait_for(self.both.wait(), timeout=5)
            async with self.world.locks(resource) as token:
                yield token

        return hold()


def test_the_same_request_twice_at_once_calls_accounts_once(world: World) -> None:
    payments = PaymentsHandlers(world.uow, world.accounts, BothAskFirst(world), world.introspection, LIMITS,
                                world.clock)
    command = Transfer(world.alice, world.bob, 300, "EUR", "key-concurrent-2")

    async def both() -> tuple[Payment, Payment]:
        return await asyncio.gather(payments.transfer(ALICE, command), payments.transfer(ALICE, command))

    first, second = run(both())
    assert first == second and first.status is PaymentStatus.COMPLETED
    assert world.accounts.calls == [first.payment_id], "the second found it completed under the lock"


def test_two_different_requests_with_one_key_at_once_conflict(world: World) -> None:
    payments = PaymentsHandlers(world.uow, world.accounts, BothAskFirst(world), world.introspection, LIMITS,
                                world.clock)

    async def both() -> tuple[Payment | BaseException, Payment | BaseException]:
        return await asyncio.gather(
            payments.transfer(ALICE, Transfer(world.alice, world.bob, 300, "EUR", "key-concurrent-3")),
            payments.transfer(ALICE, Transfer(world.alice, world.bob, 301, "EUR", "key-concurrent-3")),
            return_exceptions=True)

    outcomes = run(both())
    assert sorted(type(outcome).__name__ for outcome in outcomes) == ["IdempotencyConflictError", "Payment"]
    assert world.accounts.balance(world.alice) + world.accounts.balance(world.bob) == 20_000
    assert len(world.accounts.calls) == 1


def test_an_unknown_outcome_tells_the_caller_to_retry_with_the_same_key(world: World) -> None:
    world.accounts.unavailable = True
    with pytest.raises(PaymentPendingError, match="same idempotency key") as error:
        world.transfer(300)
    assert error.value.status == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("answer", [ResourceExhaustedError("rate limit of 30000 calls per 60s exceeded"),
                                    PermissionDeniedError("ApplyTransfer needs one of service:payments")])
def test_an_answer_of_accounts_that_is_no_refusal_leaves_the_payment_pending_and_says_so(
        world: World, answer: Exception) -> None:
    """accounts turned the call away before applying anything, but not as a refusal of this transfer: the payment
    stays PENDING and the reconciler applies it later, so the caller must hear that it is pending (and to retry with
    the same key), not an error that reads as final and invites paying again with a new key."""
    async def turned_away(*args: object) -> None:
        raise answer

    apply_transfer = world.accounts.apply_transfer
    world.accounts.apply_transfer = turned_away  # type: ignore[method-assign]
    with pytest.raises(PaymentPendingError, match="same idempotency key") as error:
        world.transfer(300)
    assert error.value.status == grpc.StatusCode.UNAVAILABLE
    [pending] = world.uow.payments.rows.values()
    assert pending.status is PaymentStatus.PENDING and world.uow.events.emitted == []
    world.accounts.apply_transfer = apply_transfer  # type: ignore[method-assign]
    world.clock.now += dt.timedelta(minutes=2)
    [settled] = run(world.payments.settle_pending(dt.timedelta(minutes=1)))
    assert settled.status is PaymentStatus.COMPLETED and world.accounts.balance(world.alice) == 19_700


def test_a_fault_calling_accounts_leaves_the_payment_pending_and_its_text_never_reaches_the_caller(
        world: World) -> None:
    async def faulty(*args: object) -> None:
        raise KeyError("postgresql://payments:s3cret@db/payments")

    world.accounts.apply_transfer = faulty  # type: ignore[method-assign]
    with pytest.raises(PaymentPendingError, match="same idempotency key") as error:
        world.transfer(300)
    assert "s3cret" not in str(error.value) and "the call to accounts failed" in str(error.value)
    [pending] = world.uow.payments.rows.values()
    assert pending.status is PaymentStatus.PENDING and world.uow.events.emitted == []


@pytest.mark.parametrize("refusal", ["no such destination", "destination full"])
def test_accounts_refusing_the_destination_is_recorded_as_failed(world: World, refusal: str) -> None:
    target = "acc-does-not-exist"
    if refusal == "destination full":  # crediting would take it beyond the largest amount (INVALID_ARGUMENT)
        target = world.accounts.open_account("carol", MAX_MINOR)
    with pytest.raises(PaymentRefusedError):
        world.transfer(300, target=target)
    [payment] = world.uow.payments.rows.values()
    assert payment.status is PaymentStatus.FAILED and world.events() == [events_pb2.PaymentFailed]
    assert run(world.payments.settle_pending(dt.timedelta(0))) == [], "nothing left for the reconciler"


def test_a_long_refusal_is_recorded_cut_to_what_the_store_keeps(world: World) -> None:
    async def refuse(*args: object) -> None:
        raise FailedPreconditionError("refused: " + "x" * 2_000)

    world.accounts.apply_transfer = refuse  # type: ignore[method-assign,assignment]
    with pytest.raises(PaymentRefusedError):
        world.transfer(300)
    [payment] = world.uow.payments.rows.values()
    assert payment.status is PaymentStatus.FAILED
    assert len(payment.reason) == 500, "payments.reason is String(500) in PostgreSQL"


def test_the_reconciler_leaves_alone_a_payment_the_customer_settled_meanwhile(world: World) -> None:
    world.accounts.unavailable = True
    with pytest.raises(UnavailableError):
        world.transfer(4_000)
    world.accounts.unavailable = False
    world.clock.now += dt.timedelta(minutes=2)
    command = Transfer(world.alice, world.bob, 4_000, "EUR", "key-0001-abcd")

    def customer_retries_first(resource: str) -> AbstractAsyncContextManager[int]:
        @asynccontextmanager
        async def hold() -> AsyncIterator[int]:
            await world.payments.transfer(ALICE, command)  # the customer's retry, just before the reconciler
            async with world.locks(resource) as token:
                yield token

        return hold()

    reconciler = PaymentsHandlers(world.uow, world.accounts, customer_retries_first, world.introspection, LIMITS,
                                  world.clock)
    assert run(reconciler.settle_pending(dt.timedelta(minutes=1))) == []
    assert len(world.accounts.calls) == 2, "the first (unavailable) attempt and the customer's retry only"
    assert world.events() == [events_pb2.PaymentCompleted]


class BothReachAccounts:
    """The accounts gateway, letting apply_transfer through only once two attempts are at it."""

    def __init__(self, world: World) -> None:
        self.accounts, self.arrived, self.both = world.accounts, 0, asyncio.Event()

    async def owner_of(self, account_id: str) -> str:
        return await self.accounts.owner_of(account_id)

    async def apply_transfer(self, *args: Any) -> None:
        self.arrived += 1
        if self.arrived == 2:
            self.both.set()
        await asyncio.wait_for(self.both.wait(), timeout=5)
        await self.accounts.apply_transfer(*args)


def test_two_attempts_that_both_reach_an_outcome_emit_one_event(world: World) -> None:
    """The lease was lost (the lock no longer excludes): the customer's retry and the reconciler both apply
    the pending payment; accounts applies its key once, and the outcome and its event are recorded once."""
    world.accounts.unavailable = True
    with pytest.raises(UnavailableError):
        world.transfer(4_000)
    world.accounts.unavailable = False
    world.clock.now += dt.timedelta(minutes=2)
    tokens = iter(range(100, 200))

    def lost_lock(resource: str) -> AbstractAsyncContextManager[int]:
        @asynccontextmanager
        async def hold() -> AsyncIterator[int]:
            yield next(tokens)

        return hold()

    payments = PaymentsHandlers(world.uow, BothReachAccounts(world), lost_lock, world.introspection, LIMITS,
                                world.clock)
    command = Transfer(world.alice, world.bob, 4_000, "EUR", "key-0001-abcd")

    async def both() -> tuple[Payment, list[Payment]]:
        return await asyncio.gather(payments.transfer(ALICE, command),
                                    payments.settle_pending(dt.timedelta(minutes=1)))

    paid, _ = run(both())
    assert paid.status is PaymentStatus.COMPLETED and world.accounts.balance(world.alice) == 16_000
    assert world.events() == [events_pb2.PaymentCompleted]


def test_customers_see_only_their_own_payments(world: World) -> None:
    payment = world.transfer(300)
    assert run(world.payments.get_payment(ALICE, payment.payment_id)) == payment
    with pytest.raises(NotFoundError):
        run(world.payments.get_payment(BOB, payment.payment_id))
    assert run(world.payments.list_payments(ALICE)) == ([payment], "")
    assert run(world.payments.list_payments(BOB)) == ([], "")


@pytest.mark.parametrize("side", ["source", "target"])
@pytest.mark.parametrize("bad", ["acc\x001", "acc-1\r\n", "\u202eacc"])
def test_an_account_id_with_a_nul_or_control_character_is_refused_before_anything_happens(
        world: World, side: str, bad: str) -> None:
    """A NUL reaching PostgreSQL fails the payments row's insert (or accounts' query) in the driver: INTERNAL."""
    with pytest.raises(InvalidTransferError, match=f"{'from' if side == 'source' else 'to'}_account_id") as error:
        world.transfer(300, **{side: bad})
    assert error.value.status == grpc.StatusCode.INVALID_ARGUMENT
    assert world.locks.taken == [] and world.uow.payments.rows == {} and world.accounts.calls == []


@pytest.mark.parametrize("bad", ["pay\x001", "", "p" * 37, "pay-1\n"])
def test_a_payment_id_no_payment_can_have_is_an_invalid_argument_naming_it(world: World, bad: str) -> None:
    """A NUL reaching PostgreSQL fails the query in the driver: INTERNAL instead of the caller's INVALID_ARGUMENT."""
    with pytest.raises(InvalidArgumentError, match="payment_id"):
        run(world.payments.get_payment(ALICE, bad))


def test_a_customer_pages_through_their_payments_newest_first(world: World) -> None:
    made = []
    for n in range(3):
        made.append(world.transfer(100 + n, key=f"key-page-{n:04d}"))
        world.clock.now += dt.timedelta(seconds=61)
    first, token = run(world.payments.list_payments(ALICE, 2))
    rest, last = run(world.payments.list_payments(ALICE, 2, token))
    assert first + rest == made[::-1] and token and last == ""
    assert run(world.payments.list_payments(ALICE, 3)) == (made[::-1], ""), "a full last page: no next token"
    assert run(world.payments.list_payments(BOB, 2, token)) == ([], ""), "a token is a place, not a grant"


@pytest.mark.parametrize(("size", "token", "named"), [
    (501, "", "page_size"),
    (0, "bm90LWEtdG9rZW4=", "page_token"),
    (0, pages.page_token(PAYMENT_PAGES, "yesterday", "p-1"), "page_token"),   # not a time
    (0, pages.page_token(PAYMENT_PAGES, "2030-01-01T00:00:00", "p-1"), "page_token"),  # a time without its zone
    (0, pages.page_token(PAYMENT_PAGES, "2030-01-01T00:00:00+00:00", "p" * 37), "page_token"),  # id too long
    (0, pages.page_token("account", "acc-1"), "page_token"),  # accounts' token
])
def test_a_bad_page_request_is_an_invalid_argument_naming_the_field(world: World, size: int, token: str,
                                                                   named: str) -> None:
    with pytest.raises(InvalidArgumentError, match=named):
        run(world.payments.list_payments(ALICE, size, token))
