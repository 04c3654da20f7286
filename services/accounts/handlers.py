"""The accounts use cases: a command and the ports in, a result or a domain error out. Object-level checks
(whose account is this?) live here, fed by the caller's identity."""

import hashlib
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import Message

from bastion import pages
from bastion.accounts.v1 import events_pb2
from bastion.events.v1.envelope_pb2 import EncryptedField
from services.accounts import domain
from services.accounts.domain import Account, AccountNotFoundError, IdempotencyConflictError

TOPIC = "accounts.events.v1"
# Realm roles that may see every account (support investigates, auditors audit).
SEES_ALL = frozenset({"support", "auditor"})


@dataclass(frozen=True)
class Caller:
    """Who asks: an end user (username and realm roles) or a calling service the method policy admitted by its
    certificate and service-account token (payments reads who owns a source account). Being a service is a fact
    about the caller, never a role: no realm role, whatever its name, makes a user one."""

    username: str
    roles: frozenset[str]
    is_service: bool = False

    @property
    def sees_all(self) -> bool:
        return self.is_service or bool(self.roles & SEES_ALL)


class AccountsRepository(Protocol):
    def add(self, account: Account) -> None: ...
    def get(self, account_id: str) -> Account | None: ...
    def lock_in_order(self, account_ids: list[str]) -> dict[str, Account]: ...
    def save(self, account: Account) -> None: ...
    def listed(self, owner: str | None, after: str | None, limit: int) -> list[Account]:
        """At most LIMIT accounts of OWNER (of everyone when None) in account id order, after the id AFTER."""
        ...
    def remembered(self, idempotency_key: str) -> tuple[str, bytes] | None: ...
    def remember(self, idempotency_key: str, fingerprint: str, response: bytes) -> None: ...


class EventSink(Protocol):
    def emit(self, payload: Message, aggregate_id: str) -> None: ...


class UnitOfWork(Protocol):
    @property
    def accounts(self) -> AccountsRepository: ...
    @property
    def events(self) -> EventSink: ...


UnitOfWorkFactory = Callable[[], AbstractContextManager[UnitOfWork]]


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()


# What a transfer can be refused for once both accounts exist: remembered with its key, so the same key always gets
# the same answer (an applied transfer is remembered with an empty record).
REMEMBERED_REFUSALS = (domain.InvalidAmountError, domain.UnknownCurrencyError, domain.InvalidRequestError,
                       domain.AccountFrozenError, domain.InsufficientFundsError, domain.CurrencyMismatchError,
                       domain.StaleFencingTokenError)
_REFUSAL_BY_NAME: dict[str, type[domain.AccountsError]] = {kind.__name__: kind for kind in REMEMBERED_REFUSALS}


def _refusal_record(error: domain.AccountsError) -> bytes:
    return f"{type(error).__name__}\n{error}".encode()


def _remembered_refusal(record: bytes) -> domain.AccountsError:
    unreadable = IdempotencyConflictError("this idempotency key's earlier answer cannot be read")
    try:
        name, _, message = record.decode().partition("\n")
    except UnicodeDecodeError:  # damaged: refused like an unknown record, not a fault answered INTERNAL
        return unreadable
    kind = _REFUSAL_BY_NAME.get(name)
    if kind is None:  # written by a later release, or damaged: refuse rather than apply the transfer now
        return unreadable
    return kind(message)


def _visible(account: Account | None, caller: Caller) -> Account:
    """The account if the caller may see it; otherwise NOT_FOUND, so nobody learns which ids exist."""
    if account is None or (account.owner != caller.username and not caller.sees_all):
        raise AccountNotFoundError("account not found")
    return account


class PersonalData(Protocol):
    """Seals a personal field of an event for the readers entitled to it (infra/personal-data.yaml)."""

    def seal(self, field_name: str, aggregate_id: str, plaintext: str) -> EncryptedField: ...


OWNER_EMAIL = "bastion.accounts.v1.AccountOpened.owner_email"
ACCOUNT_PAGES = "account"  # the kind of ListAccounts' page tokens: the last account id served


class AccountsHandlers:
    def __init__(self, unit_of_work: UnitOfWorkFactory, personal_data: PersonalData,
                 new_id: Callable[[], str] = lambda: str(uuid.uuid4())) -> None:
        self.unit_of_work = unit_of_work
        self.personal_data = personal_data
        self.new_id = new_id

    def open_account(self, caller: Caller, currency: str, notification_email: str = "") -> Account:
        """A new account of the caller. The notification address is not kept here: it leaves only sealed, in the
        AccountOpened event, for the services entitled to read it (notifications)."""
        email = domain.notification_email(notification_email)
        account = domain.open_account(self.new_id(), caller.username, currency)
        opened = events_pb2.AccountOpened(account_id=account.account_id, owner=account.owner,
                                          currency=account.currency)
        if email is not None:
            opened.owner_email.CopyFrom(self.personal_data.seal(OWNER_EMAIL, account.account_id, email))
        with self.unit_of_work() as uow:
            uow.accounts.add(account)
            uow.events.emit(opened, account.account_id)
        return account

    def get_account(self, caller: Caller, account_id: str) -> Account:
        domain.check_account_id("account_id", account_id)
        with self.unit_of_work() as uow:
            return _visible(uow.accounts.get(account_id), caller)

    def list_accounts(self, caller: Caller, page_size: int = 0, page_token: str = "") -> tuple[list[Account], str]:
        """A page of the accounts the caller may see (its own; every account for support, auditors and services),
        and the token of the next page ("" after the last)."""
        size = pages.page_size(page_size)
        key = pages.token_key(page_token, ACCOUNT_PAGES, 1)
        with self.unit_of_work() as uow:
            rows = uow.accounts.listed(None if caller.sees_all else caller.username, key[0] if key else None,
                                       size + 1)
        page, more = pages.page_of(rows, size)
        return page, pages.page_token(ACCOUNT_PAGES, page[-1].account_id) if more else ""

    def deposit(self, caller: Caller, account_id: str, amount_minor: int, idempotency_key: str) -> Account:
        domain.check_idempotency_key(idempotency_key)
        domain.check_amount(amount_minor)
        domain.check_account_id("account_id", account_id)
        # A repeat is the same caller's: another teller's deposit with the key is another request (a conflict).
        fingerprint = _fingerprint("deposit", caller.username, account_id, amount_minor)
        with self.unit_of_work() as uow:
            # The row lock first, then the key: the same deposit sent again while the first is running waits for
            # the lock, and by then the first's key is committed and read (READ COMMITTED: each statement sees what
            # was committed before it began) as the same request, never inserted twice.
            account = uow.accounts.lock_in_order([account_id]).get(account_id)
            earlier = uow.accounts.remembered(idempotency_key)
            if earlier is not None:
                return self._same_request(earlier, fingerprint, uow, account_id)
            if account is None:
                raise AccountNotFoundError("account not found")
            updated = domain.deposit(account, amount_minor)
            uow.accounts.save(updated)
            uow.accounts.remember(idempotency_key, fingerprint, b"")
            uow.events.emit(events_pb2.MoneyDeposited(account_id=account_id, amount_minor=amount_minor,
                                                      currency=updated.currency, balance_minor=updated.balance_minor,
                                                      idempotency_key=idempotency_key), account_id)
            return updated

    def _same_request(self, earlier: tuple[str, bytes], fingerprint: str, uow: UnitOfWork, account_id: str
                      ) -> Account:
        if earlier[0] != fingerprint:
            raise IdempotencyConflictError("this idempotency key was used for a different request")
        account = uow.accounts.get(account_id)
        if account is None:
            raise AccountNotFoundError("account not found")
        return account

    def freeze_account(self, caller: Caller, account_id: str, reason: str) -> Account:
        if not reason.strip():
            raise domain.InvalidRequestError("a reason is required to freeze an account")
        domain.check_account_id("account_id", account_id)
        with self.unit_of_work() as uow:
            account = uow.accounts.lock_in_order([account_id]).get(account_id)
            if account is None:
                raise AccountNotFoundError("account not found")
            frozen = domain.freeze(account)
            uow.accounts.save(frozen)
            uow.events.emit(events_pb2.AccountFrozen(account_id=account_id, reason=reason[:500]), account_id)
            return frozen

    def apply_transfer(self, transfer_id: str, from_account_id: str, to_account_id: str, amount_minor: int,
                       currency: str, fencing_token: int, idempotency_key: str) -> tuple[Account, Account]:
        """Debit and credit in one transaction: rows locked in sorted id order (no deadlock between two
        opposite transfers), the fencing token checked, the idempotency key recorded, the event emitted."""
        domain.check_idempotency_key(idempotency_key)
        domain.check_account_id("from_account_id", from_account_id)
        domain.check_account_id("to_account_id", to_account_id)
        domain.check_fencing_token(fencing_token)
        fingerprint = _fingerprint("transfer", from_account_id, to_account_id, amount_minor, currency)
        with self.unit_of_work() as uow:
            locked = uow.accounts.lock_in_order(sorted({from_account_id, to_account_id}))  # then the key, as deposit
            earlier = uow.accounts.remembered(idempotency_key)
            if earlier is not None:
                self._same_request(earlier, fingerprint, uow, from_account_id)
                if earlier[1]:
                    raise _remembered_refusal(earlier[1])
                source, target = uow.accounts.get(from_account_id), uow.accounts.get(to_account_id)
                if source is None or target is None:
                    raise AccountNotFoundError("account not found")
                return source, target
            source, target = locked.get(from_account_id), locked.get(to_account_id)
            if source is None or target is None:
                raise AccountNotFoundError("account not found")
            try:
                debited, credited = domain.apply_transfer(source, target, amount_minor, currency, fencing_token)
            except REMEMBERED_REFUSALS as error:
                # Kept with the key (committed as the unit of work ends): two attempts of one payment, say a
                # holder whose lease ran out and the one that took the lock over, then get one answer, never one
                # refused (recorded FAILED by payments) and the other applied.
                uow.accounts.remember(idempotency_key, fingerprint, _refusal_record(error))
                refused = error
            else:
                uow.accounts.save(debited)
                uow.accounts.save(credited)
                uow.accounts.remember(idempotency_key, fingerprint, b"")
                uow.events.emit(events_pb2.TransferApplied(
                    transfer_id=transfer_id, from_account_id=from_account_id, to_account_id=to_account_id,
                    amount_minor=amount_minor, currency=currency, fencing_token=fencing_token,
                    idempotency_key=idempotency_key), from_account_id)
                return debited, credited
        raise refused
