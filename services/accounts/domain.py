"""The rules of accounts and money, pure: no I/O, no framework. Money is an integer count of minor units of
an ISO 4217 currency; a balance never goes below zero; a frozen account neither sends nor receives."""

import re
from dataclasses import dataclass, replace

from email_validator import EmailNotValidError, validate_email

from bastion.grpc.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

MAX_MINOR = 2**63 - 1  # the largest amount PostgreSQL's bigint and protobuf's int64 both hold
# The currencies the bank keeps accounts in (ISO 4217 alphabetic codes).
CURRENCIES = frozenset({"EUR", "USD", "GBP", "CHF", "JPY", "SEK", "NOK", "DKK", "PLN", "CZK"})
IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9._:-]{8,100}")


class AccountsError(Exception):
    """Base of the accounts service's errors."""


class InvalidAmountError(AccountsError, InvalidArgumentError):
    pass


class UnknownCurrencyError(AccountsError, InvalidArgumentError):
    pass


class InvalidRequestError(AccountsError, InvalidArgumentError):
    pass


class AccountNotFoundError(AccountsError, NotFoundError):
    pass


class AccountFrozenError(AccountsError, FailedPreconditionError):
    pass


class InsufficientFundsError(AccountsError, FailedPreconditionError):
    pass


class CurrencyMismatchError(AccountsError, FailedPreconditionError):
    pass


class StaleFencingTokenError(AccountsError, FailedPreconditionError):
    """The caller's lock was taken over by a later holder: its write must not happen."""


class IdempotencyConflictError(AccountsError, FailedPreconditionError):
    """The same idempotency key came back with a different request."""


@dataclass(frozen=True)
class Account:
    account_id: str
    owner: str
    currency: str
    balance_minor: int
    frozen: bool = False
    # The highest fencing token a transfer from this account was accepted with.
    last_fencing_token: int = 0


def check_amount(amount_minor: int) -> None:
    if amount_minor <= 0:
        raise InvalidAmountError(f"amount_minor must be positive, got {amount_minor}")
    if amount_minor > MAX_MINOR:
        raise InvalidAmountError("amount_minor is beyond the largest amount an account can hold")


def check_currency(currency: str) -> None:
    if currency not in CURRENCIES:
        # The caller's text, quoted escaped and cut short: a status message is a trailer (a client refuses one over
        # its metadata limit, 8 KiB by default, and sees no INVALID_ARGUMENT) and a log line.
        shown = currency if len(currency) <= 8 else currency[:8] + "..."
        raise UnknownCurrencyError(f"currency {shown!r} is not one of {', '.join(sorted(CURRENCIES))}")


def notification_email(text: str) -> str | None:
    """The owner's notification address in its normalised form, or None when none was given. Syntax only (no DNS:
    the services reach nothing outside the platform); the text itself is never put in the message."""
    if not text:
        return None
    try:
        return validate_email(text, check_deliverability=False, allow_smtputf8=False).normalized
    except EmailNotValidError:
        raise InvalidRequestError("notification_email is not an e-mail address (name@domain, at most 254 "
                                  "characters of ASCII)") from None


MAX_ACCOUNT_ID = 36  # the accounts.account_id column


def check_account_id(name: str, account_id: str) -> None:
    """An id the database can be asked about: PostgreSQL text cannot hold a NUL (the driver fails the query, INTERNAL),
    and no id this service issues is empty, longer than its column or holds a control character. Said of the
    syntax alone, so it tells nobody whether an id exists."""
    if not 0 < len(account_id) <= MAX_ACCOUNT_ID or not account_id.isprintable():
        raise InvalidRequestError(f"{name} must be 1 to {MAX_ACCOUNT_ID} printable characters")


def check_fencing_token(token: int) -> None:
    """The token is kept with the source account (bigint): a larger one (the field is uint64) would fail the write,
    INTERNAL, rather than be refused."""
    if token > MAX_MINOR:
        raise InvalidRequestError(f"fencing_token must be at most {MAX_MINOR}")


def check_idempotency_key(key: str) -> None:
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidRequestError("idempotency_key must be 8 to 100 characters of letters, digits and ._:-")


def open_account(account_id: str, owner: str, currency: str) -> Account:
    check_currency(currency)
    return Account(account_id=account_id, owner=owner, currency=currency, balance_minor=0)


def deposit(account: Account, amount_minor: int) -> Account:
    check_amount(amount_minor)
    if account.frozen:
        raise AccountFrozenError(f"account {account.account_id} is frozen")
    if account.balance_minor + amount_minor > MAX_MINOR:
        raise InvalidAmountError("the deposit would take the balance beyond the largest amount an account holds")
    return replace(account, balance_minor=account.balance_minor + amount_minor)


def freeze(account: Account) -> Account:
    return replace(account, frozen=True)


def apply_transfer(source: Account, target: Account, amount_minor: int, currency: str,
                   fencing_token: int) -> tuple[Account, Account]:
    """Debit SOURCE and credit TARGET, or refuse; the caller persists both in one transaction."""
    check_amount(amount_minor)
    check_currency(currency)
    if source.account_id == target.account_id:
        raise InvalidRequestError("source and destination accounts must differ")
    if fencing_token <= source.last_fencing_token:
        raise StaleFencingTokenError(
            f"fencing token {fencing_token} is not newer than {source.last_fencing_token}: the lock was lost"
        )
    for account in (source, target):
        if account.currency != currency:
            raise CurrencyMismatchError(f"account {account.account_id} is in {account.currency}, not {currency}")
        if account.frozen:
            raise AccountFrozenError(f"account {account.account_id} is frozen")
    if source.balance_minor < amount_minor:
        raise InsufficientFundsError(f"account {source.account_id} has insufficient funds")
    if target.balance_minor + amount_minor > MAX_MINOR:
        raise InvalidAmountError("the transfer would take the destination beyond the largest amount")
    debited = replace(source, balance_minor=source.balance_minor - amount_minor, last_fencing_token=fencing_token)
    credited = replace(target, balance_minor=target.balance_minor + amount_minor)
    return debited, credited
