"""The rules of notifications, pure: which verified event tells whom what. No I/O, no framework.

A recipient's notifications carry a sequence (1, 2, 3, ... per recipient, no gaps) so that a stream can
resume exactly after the last one a client saw."""

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.message import Message

from bastion.access.v1.decision_pb2 import SecurityAlert
from bastion.accounts.v1 import events_pb2 as accounts_events
from bastion.audit.alerts import how_often
from bastion.grpc.errors import InvalidArgumentError, ResourceExhaustedError, UnauthenticatedError
from bastion.payments.v1 import events_pb2 as payments_events

MAX_PAGE = 500
MAX_REASON = 200
MAX_ALERT_TEXT = 200  # of each text an alert carries: a key may be what a refused event claimed about itself
# ISO 4217 minor-unit exponents that differ from the usual 2.
EXPONENTS = {"JPY": 0}


class NotificationsError(Exception):
    """Base of the notifications service's errors."""


class InvalidRequestError(NotificationsError, InvalidArgumentError):
    pass


class StreamExpiredError(NotificationsError, UnauthenticatedError):
    """A stream outlived the access token it was opened with."""


class TooManyStreamsError(NotificationsError, ResourceExhaustedError):
    """The caller already holds as many open streams as one person needs."""


@dataclass(frozen=True)
class Notification:
    notification_id: str
    recipient: str
    sequence: int
    kind: str
    text: str
    created_at: dt.datetime
    # The event that caused it, to trace a notification back to its signed origin.
    event_id: str


@dataclass(frozen=True)
class Draft:
    """A notification before it is stored (and numbered) in its recipient's sequence. A draft for the owner of
    an account not known yet has no recipient but that ACCOUNT_ID: it waits for the account's AccountOpened."""

    recipient: str
    kind: str
    text: str
    account_id: str = ""

    def to(self, recipient: str) -> "Draft":
        return Draft(recipient, self.kind, self.text, self.account_id)


@dataclass(frozen=True)
class SealedEmail:
    """An address encrypted at rest: the id of the key it was sealed under, and nonce || ciphertext."""

    key_id: str
    blob: bytes


def check_page(after_sequence: int, limit: int) -> None:
    if after_sequence < 0:
        raise InvalidRequestError(f"after_sequence must not be negative, got {after_sequence}")
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequestError(f"limit must be between 1 and {MAX_PAGE}, got {limit}")


def money(amount_minor: int, currency: str) -> str:
    exponent = EXPONENTS.get(currency, 2)
    if exponent == 0:
        return f"{amount_minor} {currency}"
    units, minor = divmod(amount_minor, 10**exponent)
    return f"{units}.{minor:0{exponent}d} {currency}"


def accounts_concerned(payload: Message) -> list[str]:
    """The accounts whose owners an event may concern: the handler looks their owners up."""
    if isinstance(payload, accounts_events.MoneyDeposited):
        return [payload.account_id]
    if isinstance(payload, accounts_events.TransferApplied):
        return [payload.from_account_id, payload.to_account_id]
    if isinstance(payload, payments_events.PaymentCompleted | payments_events.PaymentFailed):
        return [payload.from_account_id]
    return []


def drafts_for(payload: Message, owners: Mapping[str, str]) -> list[Draft]:
    """The notifications PAYLOAD gives rise to, given the known OWNERS of the accounts concerned. For an account
    whose owner is not known yet the draft has no recipient: events of different accounts travel in different
    partitions, so a transfer may arrive before the AccountOpened of its target.

    AccountFrozen notifies nobody on purpose: telling a suspect that support froze the account would tip
    them off during an investigation."""
    if isinstance(payload, accounts_events.AccountOpened):
        return [Draft(payload.owner, "account_opened",
                      f"Your account {payload.account_id} in {payload.currency} is open.")] if payload.owner else []
    if isinstance(payload, accounts_events.MoneyDeposited):
        return _to_owner(owners, payload.account_id, "money_deposited",
                         f"{money(payload.amount_minor, payload.currency)} was deposited into your account "
                         f"{payload.account_id}; the balance is {money(payload.balance_minor, payload.currency)}.")
    if isinstance(payload, accounts_events.TransferApplied):
        amount = money(payload.amount_minor, payload.currency)
        source, target = payload.from_account_id, payload.to_account_id
        return [
            *_to_owner(owners, source, "transfer_sent", f"{amount} left your account {source} for account {target}."),
            *_to_owner(owners, target, "transfer_received",
                       f"{amount} arrived in your account {target} from account {source}."),
        ]
    if isinstance(payload, payments_events.PaymentCompleted):
        text = (f"Your payment {payload.payment_id} of {money(payload.amount_minor, payload.currency)} "
                f"to account {payload.to_account_id} is complete.")
        if payload.initiated_by:
            return [Draft(payload.initiated_by, "payment_completed", text)]
        return _to_owner(owners, payload.from_account_id, "payment_completed", text)
    if isinstance(payload, payments_events.PaymentFailed):
        # PaymentFailed names no initiator: a customer only pays from an own account, so it is the source's owner.
        return _to_owner(owners, payload.from_account_id, "payment_failed",
                         f"Your payment {payload.payment_id} of {money(payload.amount_minor, payload.currency)} "
                         f"to account {payload.to_account_id} failed: {payload.reason[:MAX_REASON]}")
    return []


def alert_drafts(alert: SecurityAlert, recipients: tuple[str, ...]) -> list[Draft]:
    """A security alert of the audit service, told to each of RECIPIENTS (infra/alert-recipients.yaml)."""
    key = _printable(alert.key)
    text = (f"Security alert ({_printable(alert.severity)}) {_printable(alert.rule)}: {_printable(alert.counted_by)} "
            f"{key!r} refused {how_often(alert.count)} within {alert.window_seconds}s, audit log entries "
            f"{alert.first_seq} to {alert.last_seq} (`bastion audit alerts`). {_printable(alert.description)}")
    return [Draft(recipient, "security_alert", text) for recipient in recipients]


def _printable(text: str) -> str:
    """TEXT bounded and without control characters, fit for a notification."""
    return "".join(char if char.isprintable() else "\ufffd" for char in text[:MAX_ALERT_TEXT])


def _to_owner(owners: Mapping[str, str], account_id: str, kind: str, text: str) -> list[Draft]:
    return [Draft(owners.get(account_id, ""), kind, text, account_id)]
