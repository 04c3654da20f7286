"""In-memory adapters of the payments ports, for unit tests of the handlers (same behaviour, no database,
no Redis, no accounts service, no Keycloak)."""

import asyncio
import datetime as dt
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field

from google.protobuf.message import Message

from bastion.grpc.errors import NotFoundError, UnavailableError
from bastion.resilience.locks import LockUnavailableError
from services.accounts.fakes import MemoryPersonalData
from services.accounts.fakes import MemoryUnitOfWork as MemoryAccountsUnitOfWork
from services.accounts.handlers import AccountsHandlers, Caller
from services.payments.domain import IdempotencyConflictError, Payment, PaymentStatus, utc_day
from services.payments.handlers import PaymentPlace, payment_place

TELLER = Caller("teller", frozenset({"teller"}))


@dataclass
class MemoryPayments:
    rows: dict[str, Payment] = field(default_factory=dict)

    def by_idempotency_key(self, idempotency_key: str) -> Payment | None:
        return next((p for p in self.rows.values() if p.idempotency_key == idempotency_key), None)

    def add(self, payment: Payment) -> None:
        if self.by_idempotency_key(payment.idempotency_key) is not None:
            raise IdempotencyConflictError("this idempotency key was used for a different request")
        self.rows[payment.payment_id] = payment

    def settle(self, payment: Payment) -> bool:
        if self.rows[payment.payment_id].status is not PaymentStatus.PENDING:
            return False
        self.rows[payment.payment_id] = payment
        return True

    def sent_on(self, account_id: str, day: dt.date) -> int:
        return sum(p.amount_minor for p in self.rows.values()
                   if p.from_account_id == account_id and utc_day(p.created_at) == day
                   and p.status in (PaymentStatus.PENDING, PaymentStatus.COMPLETED))

    def count_since(self, account_id: str, since: dt.datetime) -> int:
        return sum(1 for p in self.rows.values() if p.from_account_id == account_id and p.created_at >= since)

    def by_id(self, payment_id: str) -> Payment | None:
        return self.rows.get(payment_id)

    def initiated_by(self, username: str, limit: int, before: PaymentPlace | None = None) -> list[Payment]:
        return sorted((p for p in self.rows.values() if p.initiated_by == username
                       and (before is None or payment_place(p) < before)), key=payment_place, reverse=True)[:limit]

    def pending_before(self, cutoff: dt.datetime, limit: int, after: PaymentPlace | None = None) -> list[Payment]:
        return sorted((p for p in self.rows.values() if p.status is PaymentStatus.PENDING and p.created_at < cutoff
                       and (after is None or payment_place(p) > after)), key=payment_place)[:limit]


@dataclass
class MemoryEvents:
    emitted: list[tuple[Message, str]] = field(default_factory=list)

    def emit(self, payload: Message, aggregate_id: str) -> None:
        self.emitted.append((payload, aggregate_id))


@dataclass
class MemoryUnitOfWork:
    """One transaction at a time (the handlers run them on worker threads); commits on success, rolls back
    (restores the rows and events) on error, as the database does."""

    payments: MemoryPayments = field(default_factory=MemoryPayments)
    events: MemoryEvents = field(default_factory=MemoryEvents)
    _serial: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextmanager
    def __call__(self) -> Iterator["MemoryUnitOfWork"]:
        with self._serial:
            rows, emitted = dict(self.payments.rows), list(self.events.emitted)
            try:
                yield self
            except BaseException:
                self.payments.rows, self.events.emitted = rows, emitted
                raise


@dataclass
class MemoryLocks:
    """Locks per resource with a fencing counter per resource, as FencedLock keeps them in Redis."""

    unavailable: bool = False
    fences: dict[str, int] = field(default_factory=dict)
    taken: list[str] = field(default_factory=list)
    _held: dict[str, asyncio.Lock] = field(default_factory=dict, repr=False)

    def __call__(self, resource: str) -> AbstractAsyncContextManager[int]:
        return self._hold(resource)

    @asynccontextmanager
    async def _hold(self, resource: str) -> AsyncIterator[int]:
        if self.unavailable:
            raise LockUnavailableError(f"lock service unreachable for {resource}")
        async with self._held.setdefault(resource, asyncio.Lock()):
            self.fences[resource] = self.fences.get(resource, 0) + 1
            self.taken.append(resource)
            yield self.fences[resource]


@dataclass
class MemoryAccountsGateway:
    """The accounts service's own handlers on its in-memory adapters, so balances, frozen accounts, fencing
    tokens and idempotency keys behave exactly as accounts enforces them; `unavailable` simulates an outage."""

    store: MemoryAccountsUnitOfWork = field(default_factory=MemoryAccountsUnitOfWork)
    unavailable: bool = False
    calls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bank = AccountsHandlers(self.store, MemoryPersonalData(),
                                     new_id=lambda: f"acc-{len(self.store.accounts.rows) + 1}")

    def open_account(self, owner: str, balance_minor: int = 0, currency: str = "EUR") -> str:
        account_id = self.bank.open_account(Caller(owner, frozenset({"customer"})), currency).account_id
        if balance_minor:
            self.bank.deposit(TELLER, account_id, balance_minor, f"fund-{account_id}")
        return account_id

    def balance(self, account_id: str) -> int:
        return self.store.accounts.rows[account_id].balance_minor

    async def owner_of(self, account_id: str) -> str:
        await asyncio.sleep(0)  # a real call yields to the event loop; let concurrent transfers interleave
        account = self.store.accounts.get(account_id)
        if account is None:
            raise NotFoundError("account not found")
        return account.owner

    async def apply_transfer(self, transfer_id: str, from_account_id: str, to_account_id: str, amount_minor: int,
                             currency: str, fencing_token: int, idempotency_key: str) -> None:
        await asyncio.sleep(0)
        self.calls.append(transfer_id)
        if self.unavailable:
            raise UnavailableError("accounts is unavailable (circuit open): try again later")
        self.bank.apply_transfer(transfer_id, from_account_id, to_account_id, amount_minor, currency,
                                 fencing_token, idempotency_key)


@dataclass
class MemoryIntrospection:
    active: set[str] = field(default_factory=set)
    reachable: bool = True

    async def introspect(self, token: str) -> bool:
        if not self.reachable:
            raise UnavailableError("the identity provider cannot be reached: try again later")
        return token in self.active
