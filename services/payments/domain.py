"""The rules of payments, pure: what a valid transfer is, what a payment record holds, and the limits a
source account's transfers must stay within. Amounts and currencies follow the accounts service's rules."""

import datetime as dt
import enum
import hashlib
import uuid
from dataclasses import dataclass, replace

from bastion.grpc.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from services.accounts.domain import AccountsError, check_amount, check_currency, check_idempotency_key

MAX_ACCOUNT_ID = 36
MAX_PAYMENT_ID = 36  # the payments.payment_id column (a UUID)
MAX_REASON = 500
# Payment ids are derived from the idempotency key, so a retried request names the same transfer in accounts.
PAYMENT_ID_NAMESPACE = uuid.UUID("6f1d3c52-2b8e-4c61-9a57-0d6c0b7e4a19")


class PaymentsError(Exception):
    """Base of the payments service's errors."""


class InvalidTransferError(PaymentsError, InvalidArgumentError):
    pass


class InvalidRequestError(PaymentsError, InvalidArgumentError):
    pass


class SourceAccountNotFoundError(PaymentsError, NotFoundError):
    """The source account does not exist or is not the caller's: both look the same from outside."""


class PaymentNotFoundError(PaymentsError, NotFoundError):
    pass


class LimitExceededError(PaymentsError, FailedPreconditionError):
    pass


class DailyLimitExceededError(LimitExceededError):
    pass


class VelocityLimitExceededError(LimitExceededError):
    pass


class IdempotencyConflictError(PaymentsError, FailedPreconditionError):
    """The same idempotency key came back with a different request."""


class PaymentRefusedError(PaymentsError, FailedPreconditionError):
    """Accounts refused the transfer (insufficient funds, frozen account, lost lock...): recorded as FAILED."""


class TokenNotActiveError(PaymentsError, PermissionDeniedError):
    """A large transfer needs a token the identity provider still reports active (not revoked, not logged out)."""


class PaymentPendingError(PaymentsError, UnavailableError):
    """The payment is recorded but its outcome at accounts is not known yet (it timed out or was away)."""


class AccountLockUnavailableError(PaymentsError, UnavailableError):
    """The source account could not be locked: the transfer is refused rather than run unlocked."""


class PaymentStatus(enum.StrEnum):
    # PENDING is written before accounts is called, so an interrupted transfer still counts against the limits
    # and a retry with the same key finishes it (accounts applies a given key once).
    PENDING = "PENDING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


@dataclass(frozen=True)
class Transfer:
    """Move AMOUNT_MINOR of CURRENCY from one account to another, once per IDEMPOTENCY_KEY."""

    from_account_id: str
    to_account_id: str
    amount_minor: int
    currency: str
    idempotency_key: str


@dataclass(frozen=True)
class Payment:
    payment_id: str
    idempotency_key: str
    fingerprint: str
    from_account_id: str
    to_account_id: str
    amount_minor: int
    currency: str
    initiated_by: str
    status: PaymentStatus
    created_at: dt.datetime
    reason: str = ""


@dataclass(frozen=True)
class Limits:
    """Per source account: money sent per UTC day, transfers per window, and the amount above which a
    transfer needs an online check of the caller's token."""

    daily_minor: int
    velocity_count: int
    velocity_window: dt.timedelta
    step_up_above_minor: int


def validate(transfer: Transfer) -> None:
    try:
        check_amount(transfer.amount_minor)
        check_currency(transfer.currency)
        check_idempotency_key(transfer.idempotency_key)
    except AccountsError as error:
        raise InvalidTransferError(str(error)) from error
    for name in ("from_account_id", "to_account_id"):
        # Printable too: a NUL fails the payments row's insert in the driver (INTERNAL) and, sent to accounts, its
        # query too, an INTERNAL answer the circuit breaker counts as accounts failing, so one customer could open it.
        value = getattr(transfer, name)
        if not 0 < len(value) <= MAX_ACCOUNT_ID or not value.isprintable():
            raise InvalidTransferError(f"{name} must be 1 to {MAX_ACCOUNT_ID} printable characters")
    if transfer.from_account_id == transfer.to_account_id:
        raise InvalidTransferError("source and destination accounts must differ")


def check_payment_id(payment_id: str) -> None:
    """PostgreSQL text cannot hold a NUL: the driver fails the query (INTERNAL). No payment id is empty, longer than
    its column or holds a control character; said of the syntax alone, so it tells nobody whether an id exists."""
    if not 0 < len(payment_id) <= MAX_PAYMENT_ID or not payment_id.isprintable():
        raise InvalidRequestError(f"payment_id must be 1 to {MAX_PAYMENT_ID} printable characters")


def fingerprint(transfer: Transfer, initiated_by: str) -> str:
    """What makes two requests the same request; the key itself is excluded, it is what they share."""
    parts = (initiated_by, transfer.from_account_id, transfer.to_account_id, transfer.amount_minor, transfer.currency)
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()


def payment_id_for(idempotency_key: str) -> str:
    return str(uuid.uuid5(PAYMENT_ID_NAMESPACE, idempotency_key))


def needs_step_up(limits: Limits, amount_minor: int) -> bool:
    return amount_minor > limits.step_up_above_minor


def utc_day(moment: dt.datetime) -> dt.date:
    return moment.astimezone(dt.UTC).date()


def check_limits(limits: Limits, amount_minor: int, sent_today_minor: int, recent_transfers: int) -> None:
    """SENT_TODAY_MINOR: completed and pending amounts of the source's UTC day; RECENT_TRANSFERS: its
    transfers of any status within the velocity window."""
    if recent_transfers >= limits.velocity_count:
        raise VelocityLimitExceededError(
            f"at most {limits.velocity_count} transfers per {int(limits.velocity_window.total_seconds())}s "
            "from one account: try again later")
    if sent_today_minor + amount_minor > limits.daily_minor:
        raise DailyLimitExceededError("this transfer would exceed the account's daily transfer limit")


def start(transfer: Transfer, initiated_by: str, request_fingerprint: str, now: dt.datetime) -> Payment:
    return Payment(payment_id=payment_id_for(transfer.idempotency_key), idempotency_key=transfer.idempotency_key,
                   fingerprint=request_fingerprint, from_account_id=transfer.from_account_id,
                   to_account_id=transfer.to_account_id, amount_minor=transfer.amount_minor,
                   currency=transfer.currency, initiated_by=initiated_by, status=PaymentStatus.PENDING,
                   created_at=now)


def complete(payment: Payment) -> Payment:
    return replace(payment, status=PaymentStatus.COMPLETED)


def fail(payment: Payment, reason: str) -> Payment:
    return replace(payment, status=PaymentStatus.FAILED, reason=reason[:MAX_REASON])


def replay(earlier: Payment, request_fingerprint: str) -> Payment:
    """The answer the first request got, for a request that reuses its key: the payment, or its refusal."""
    if earlier.fingerprint != request_fingerprint:
        raise IdempotencyConflictError("this idempotency key was used for a different request")
    if earlier.status is PaymentStatus.FAILED:
        raise PaymentRefusedError(earlier.reason)
    return earlier
