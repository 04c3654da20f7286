"""The payments use case: a transfer, checked (ownership, step-up for large amounts, limits) and applied by
accounts under a fenced lock on the source account; its outcome and event are recorded in one transaction."""

import asyncio
import datetime as dt
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager, AsyncExitStack
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import structlog
from google.protobuf.message import Message

from bastion import pages
from bastion.grpc.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, RequestError
from bastion.payments.v1 import events_pb2
from bastion.resilience import locks
from services.payments import domain
from services.payments.domain import (
    AccountLockUnavailableError,
    Limits,
    Payment,
    PaymentNotFoundError,
    PaymentPendingError,
    PaymentRefusedError,
    PaymentStatus,
    SourceAccountNotFoundError,
    TokenNotActiveError,
    Transfer,
)

log = structlog.get_logger(__name__)
TOPIC = "payments.events.v1"
# What accounts answers when it will not apply this transfer as asked; anything else (unavailable, timed out)
# leaves the outcome unknown, so the payment stays PENDING until a retry with the same key settles it.
REFUSALS = (FailedPreconditionError, NotFoundError, InvalidArgumentError)
T = TypeVar("T")
# A payment's place in the orders the reconciler and ListPayments read payments in: creation, then id.
PaymentPlace = tuple[dt.datetime, str]
PAYMENT_PAGES = "payment"  # the kind of ListPayments' page tokens: the place of the last payment served


def payment_place(payment: Payment) -> PaymentPlace:
    return payment.created_at, payment.payment_id


def _listed_before(page_token: str) -> PaymentPlace | None:
    """The place a ListPayments page token stands for: a creation time with its zone, and a payment id."""
    key = pages.token_key(page_token, PAYMENT_PAGES, 2)
    if key is None:
        return None
    created_at, payment_id = key
    try:
        when = dt.datetime.fromisoformat(created_at)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None or len(payment_id) > domain.MAX_PAYMENT_ID:
        raise pages.InvalidPageError("page_token is not one this service issued")
    return when, payment_id


@dataclass(frozen=True)
class Caller:
    """The end user asking, with the access token a large transfer is checked with."""

    username: str
    access_token: str = field(repr=False)


class PaymentsRepository(Protocol):
    def by_idempotency_key(self, idempotency_key: str) -> Payment | None: ...
    def add(self, payment: Payment) -> None: ...
    def settle(self, payment: Payment) -> bool:
        """Record PAYMENT's outcome if it is still PENDING; False if another attempt settled it first."""
        ...
    def sent_on(self, account_id: str, day: dt.date) -> int: ...
    def count_since(self, account_id: str, since: dt.datetime) -> int: ...
    def by_id(self, payment_id: str) -> Payment | None: ...
    def initiated_by(self, username: str, limit: int, before: "PaymentPlace | None" = None) -> list[Payment]:
        """At most LIMIT payments USERNAME initiated, newest first (by creation, then id); only those before
        BEFORE."""
        ...
    def pending_before(self, cutoff: dt.datetime, limit: int, after: "PaymentPlace | None" = None) -> list[Payment]:
        """PENDING payments created before CUTOFF, oldest first (by creation, then id); only those after AFTER."""
        ...


class EventSink(Protocol):
    def emit(self, payload: Message, aggregate_id: str) -> None: ...


class UnitOfWork(Protocol):
    # Read-only, so an adapter may hold a narrower type (MemoryPayments, PostgresPayments).
    @property
    def payments(self) -> PaymentsRepository: ...
    @property
    def events(self) -> EventSink: ...


UnitOfWorkFactory = Callable[[], AbstractContextManager[UnitOfWork]]
# Given a resource name, an async context manager that holds its lock and yields a fencing token
# (bastion.resilience.locks.FencedLock fits); it raises the kit's lock errors when it cannot lock.
LockFactory = Callable[[str], AbstractAsyncContextManager[int]]
Clock = Callable[[], dt.datetime]


class AccountsGateway(Protocol):
    """The accounts service; its errors arrive as the kit's error classes (as `Downstream.call` raises them)."""

    async def owner_of(self, account_id: str) -> str: ...

    async def apply_transfer(self, transfer_id: str, from_account_id: str, to_account_id: str, amount_minor: int,
                             currency: str, fencing_token: int, idempotency_key: str) -> None: ...


class TokenIntrospection(Protocol):
    """Online introspection of an access token; raises UnavailableError when the identity provider cannot
    be reached."""

    async def introspect(self, token: str) -> bool: ...


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class PaymentsHandlers:
    def __init__(self, unit_of_work: UnitOfWorkFactory, accounts: AccountsGateway, lock: LockFactory,
                 introspection: TokenIntrospection, limits: Limits, clock: Clock = utc_now) -> None:
        self.unit_of_work = unit_of_work
        self.accounts = accounts
        self.lock = lock
        self.introspection = introspection
        self.limits = limits
        self.clock = clock
        # Where the reconciler's next round goes on: after the last payment the previous round tried, back to the
        # oldest once a round reached the end (or found nothing after it: _pending_round). Always from the oldest,
        # payments that cannot be settled (as many as a round takes) would keep every newer one waiting for ever.
        self._settle_after: PaymentPlace | None = None

    async def transfer(self, caller: Caller, command: Transfer) -> Payment:
        domain.validate(command)
        if await self.accounts.owner_of(command.from_account_id) != caller.username:
            raise SourceAccountNotFoundError("account not found")
        if domain.needs_step_up(self.limits, command.amount_minor) and not await self.introspection.introspect(
                caller.access_token):
            raise TokenNotActiveError("this transfer needs an active session: sign in again")
        fingerprint = domain.fingerprint(command, caller.username)
        earlier = await self._transaction(lambda uow: uow.payments.by_idempotency_key(command.idempotency_key))
        if earlier is not None and domain.replay(earlier, fingerprint).status is PaymentStatus.COMPLETED:
            return earlier
        async with AsyncExitStack() as stack:
            fencing_token = await self._lock_source(stack, command.from_account_id)
            payment = await self._transaction(lambda uow: self._begin(uow, command, caller.username, fingerprint))
            if payment.status is PaymentStatus.COMPLETED:
                return payment
            return await self._apply(payment, fencing_token)

    async def _lock_source(self, stack: AsyncExitStack, account_id: str) -> int:
        try:
            return await stack.enter_async_context(self.lock(f"account:{account_id}"))
        except (locks.LockUnavailableError, locks.LockBusyError) as error:
            raise AccountLockUnavailableError("the source account cannot be locked now: try again later") from error

    def _begin(self, uow: UnitOfWork, command: Transfer, initiated_by: str, fingerprint: str) -> Payment:
        """Under the lock: the earlier attempt with this key, or a new PENDING payment within the limits."""
        earlier = uow.payments.by_idempotency_key(command.idempotency_key)
        if earlier is not None:
            return domain.replay(earlier, fingerprint)
        now = self.clock()
        domain.check_limits(self.limits, command.amount_minor,
                            uow.payments.sent_on(command.from_account_id, domain.utc_day(now)),
                            uow.payments.count_since(command.from_account_id, now - self.limits.velocity_window))
        payment = domain.start(command, initiated_by, fingerprint, now)
        uow.payments.add(payment)
        return payment

    async def _apply(self, payment: Payment, fencing_token: int) -> Payment:
        try:
            await self.accounts.apply_transfer(payment.payment_id, payment.from_account_id, payment.to_account_id,
                                               payment.amount_minor, payment.currency, fencing_token,
                                               payment.idempotency_key)
        except REFUSALS as refusal:
            failed = domain.fail(payment, str(refusal))
            await self._transaction(lambda uow: self._record(uow, failed, events_pb2.PaymentFailed(
                payment_id=failed.payment_id, from_account_id=failed.from_account_id,
                to_account_id=failed.to_account_id, amount_minor=failed.amount_minor, currency=failed.currency,
                reason=failed.reason)))
            raise PaymentRefusedError(failed.reason) from refusal
        except Exception as unknown:
            # accounts may or may not have applied it: the payment stays PENDING and the caller must not pay
            # again with a new key (the reconciler settles this one); the same key returns the outcome. Any answer
            # that is no refusal (rate limited, permission denied...) leaves it PENDING too, so it must be said so.
            # Only an answer of the error table is quoted: a fault's own text may hold what no caller should read.
            if isinstance(unknown, RequestError):
                why = str(unknown)
            else:
                log.exception("transfer_outcome_unknown", payment_id=payment.payment_id)
                why = "the call to accounts failed"
            raise PaymentPendingError(
                f"payment {payment.payment_id} is pending: its outcome is not known yet ({why}); retry with the "
                "same idempotency key to learn it, never with a new one") from unknown
        completed = domain.complete(payment)
        await self._transaction(lambda uow: self._record(uow, completed, events_pb2.PaymentCompleted(
            payment_id=completed.payment_id, from_account_id=completed.from_account_id,
            to_account_id=completed.to_account_id, amount_minor=completed.amount_minor, currency=completed.currency,
            initiated_by=completed.initiated_by)))
        return completed

    async def settle_pending(self, older_than: dt.timedelta, limit: int = 100) -> list[Payment]:
        """Settle payments left PENDING older than OLDER_THAN (accounts timed out or was away, or this process
        died between the PENDING row and the outcome): call ApplyTransfer again, under a fresh lock, with the
        payment's own idempotency key. accounts applies a key at most once, so this either learns the first
        outcome or applies the transfer the customer asked for now. One still unsettled is tried next round."""
        stuck = await self._pending_round(self.clock() - older_than, limit)
        settled: list[Payment] = []
        for payment in stuck:
            try:
                async with AsyncExitStack() as stack:
                    fencing_token = await self._lock_source(stack, payment.from_account_id)
                    current = await self._reread(payment)
                    if current is None or current.status is not PaymentStatus.PENDING:
                        continue  # a retry by the customer settled it meanwhile
                    settled.append(await self._apply(current, fencing_token))
            except PaymentRefusedError:
                settled.append(await self._reread(payment) or payment)
            except Exception as error:  # one payment that cannot be settled must not hold back the others
                log.warning("pending_payment_not_settled", payment_id=payment.payment_id,
                            error=type(error).__name__, detail=str(error))
        return settled

    async def _pending_round(self, cutoff: dt.datetime, limit: int) -> list[Payment]:
        """This round's payments: those after the last one the previous round tried, or from the oldest again when
        none is left after it (a previous round that took exactly LIMIT, the last ones). Otherwise that round would
        try nothing while payments wait."""
        after = self._settle_after
        stuck = await self._transaction(lambda uow: uow.payments.pending_before(cutoff, limit, after))
        if not stuck and after is not None:
            stuck = await self._transaction(lambda uow: uow.payments.pending_before(cutoff, limit, None))
        self._settle_after = payment_place(stuck[-1]) if len(stuck) == limit else None
        return stuck

    async def _reread(self, payment: Payment) -> Payment | None:
        payment_id = payment.payment_id
        return await self._transaction(lambda uow: uow.payments.by_id(payment_id))

    @staticmethod
    def _record(uow: UnitOfWork, payment: Payment, event: Message) -> None:
        """The outcome and its event, once: a second attempt that reaches an outcome too (the reconciler and a
        customer's retry, after a lost lock) finds the payment settled and emits nothing."""
        if uow.payments.settle(payment):
            uow.events.emit(event, payment.payment_id)

    async def get_payment(self, caller: Caller, payment_id: str) -> Payment:
        """One of the caller's own payments; anyone else's is NOT_FOUND, so ids reveal nothing."""
        domain.check_payment_id(payment_id)
        payment = await self._transaction(lambda uow: uow.payments.by_id(payment_id))
        if payment is None or payment.initiated_by != caller.username:
            raise PaymentNotFoundError("payment not found")
        return payment

    async def list_payments(self, caller: Caller, page_size: int = 0, page_token: str = ""
                            ) -> tuple[list[Payment], str]:
        """A page of the caller's own payments, newest first (what a customer looks for), and the token of the next
        page ("" after the last)."""
        size = pages.page_size(page_size)
        before = _listed_before(page_token)
        rows = await self._transaction(lambda uow: uow.payments.initiated_by(caller.username, size + 1, before))
        page, more = pages.page_of(rows, size)
        if not more:
            return page, ""
        created_at, payment_id = payment_place(page[-1])
        return page, pages.page_token(PAYMENT_PAGES, created_at.isoformat(), payment_id)

    async def _transaction(self, work: Callable[[UnitOfWork], T]) -> T:
        """WORK in one transaction, on a worker thread: the event loop must stay free to extend the lock."""

        def run() -> T:
            with self.unit_of_work() as uow:
                return work(uow)

        return await asyncio.to_thread(run)
