"""The accounts use cases on in-memory adapters: ownership, idempotency, freezing, and fenced transfers."""

import pytest

from bastion.accounts.v1 import events_pb2
from services.accounts.domain import (
    MAX_MINOR,
    AccountFrozenError,
    AccountNotFoundError,
    CurrencyMismatchError,
    IdempotencyConflictError,
    InsufficientFundsError,
    InvalidAmountError,
    InvalidRequestError,
    StaleFencingTokenError,
    UnknownCurrencyError,
    check_idempotency_key,
)
from services.accounts.fakes import MemoryPersonalData, MemoryUnitOfWork
from services.accounts.handlers import OWNER_EMAIL, AccountsHandlers, Caller

ALICE = Caller("alice", frozenset({"customer"}))
BOB = Caller("bob", frozenset({"customer"}))
SAM = Caller("sam", frozenset({"support"}))
KEY = "key-0001-abcd"


@pytest.fixture()
def uow() -> MemoryUnitOfWork:
    return MemoryUnitOfWork()


@pytest.fixture()
def personal() -> MemoryPersonalData:
    return MemoryPersonalData()


@pytest.fixture()
def bank(uow: MemoryUnitOfWork, personal: MemoryPersonalData) -> AccountsHandlers:
    ids = iter(f"acc-{n}" for n in range(100))
    return AccountsHandlers(uow, personal, new_id=lambda: next(ids))


def funded(bank: AccountsHandlers, caller: Caller, amount: int, currency: str = "EUR") -> str:
    account = bank.open_account(caller, currency)
    if amount:
        bank.deposit(Caller("tina", frozenset({"teller"})), account.account_id, amount, f"fund-{account.account_id}")
    return account.account_id


def test_open_account_is_the_callers_and_emits_an_event(bank: AccountsHandlers, uow: MemoryUnitOfWork) -> None:
    account = bank.open_account(ALICE, "EUR")
    assert (account.owner, account.currency, account.balance_minor) == ("alice", "EUR", 0)
    [(event, aggregate)] = uow.events.emitted
    assert isinstance(event, events_pb2.AccountOpened) and aggregate == account.account_id


def test_a_notification_address_leaves_only_sealed_in_the_event(
    bank: AccountsHandlers, uow: MemoryUnitOfWork, personal: MemoryPersonalData
) -> None:
    account = bank.open_account(ALICE, "EUR", "Alice@Example.COM")
    [(event, _)] = uow.events.emitted
    assert isinstance(event, events_pb2.AccountOpened) and event.HasField("owner_email")
    assert b"example.com" not in event.SerializeToString().lower(), "the address is nowhere in the event in clear"
    sealed_for = personal.reveal(event.owner_email)
    assert sealed_for == (OWNER_EMAIL, account.account_id, "Alice@example.com"), "normalised, bound to the account"
    assert "example.com" not in repr(uow.accounts.rows).lower(), "accounts keeps no copy"


def test_no_address_no_field(bank: AccountsHandlers, uow: MemoryUnitOfWork, personal: MemoryPersonalData) -> None:
    bank.open_account(ALICE, "EUR")
    [(event, _)] = uow.events.emitted
    assert not event.HasField("owner_email") and personal.sealed == {}


@pytest.mark.parametrize("address", [
    "alice", "alice@", "@example.com", "a b@example.com", "alice@example.com\n", "ålice@example.com",
    "a" * 250 + "@example.com", "alice@@example.com", "alice@localhost", "Alice <alice@example.com>",
])
def test_a_notification_address_that_is_not_one_is_refused_and_nothing_is_opened(
    bank: AccountsHandlers, uow: MemoryUnitOfWork, personal: MemoryPersonalData, address: str
) -> None:
    with pytest.raises(InvalidRequestError, match="notification_email is not an e-mail address") as refusal:
        bank.open_account(ALICE, "EUR", address)
    assert address.strip() not in str(refusal.value) or not address.strip(), "the text is not echoed"
    assert uow.accounts.rows == {} and uow.events.emitted == [] and personal.sealed == {}


def test_unknown_currency_is_refused(bank: AccountsHandlers) -> None:
    with pytest.raises(UnknownCurrencyError, match="'XXX'"):
        bank.open_account(ALICE, "XXX")


def test_another_customer_gets_not_found_support_sees_it(bank: AccountsHandlers) -> None:
    account_id = funded(bank, ALICE, 0)
    with pytest.raises(AccountNotFoundError):
        bank.get_account(BOB, account_id)
    with pytest.raises(AccountNotFoundError):
        bank.get_account(BOB, "acc-does-not-exist")
    assert bank.get_account(SAM, account_id).owner == "alice"
    assert [a.account_id for a in bank.list_accounts(BOB)] == []
    assert [a.account_id for a in bank.list_accounts(SAM)] == [account_id]


@pytest.mark.parametrize("amount", [0, -1, MAX_MINOR + 1])
def test_bad_amounts_are_invalid(bank: AccountsHandlers, amount: int) -> None:
    account_id = funded(bank, ALICE, 0)
    with pytest.raises(InvalidAmountError):
        bank.deposit(SAM, account_id, amount, KEY)


def test_deposit_is_idempotent_and_a_reused_key_with_another_request_conflicts(bank: AccountsHandlers) -> None:
    account_id = funded(bank, ALICE, 0)
    assert bank.deposit(SAM, account_id, 500, KEY).balance_minor == 500
    assert bank.deposit(SAM, account_id, 500, KEY).balance_minor == 500
    with pytest.raises(IdempotencyConflictError):
        bank.deposit(SAM, account_id, 900, KEY)


def test_transfer_locks_in_sorted_order_and_moves_money(bank: AccountsHandlers, uow: MemoryUnitOfWork) -> None:
    source, target = funded(bank, ALICE, 1000), funded(bank, BOB, 0)
    debited, credited = bank.apply_transfer("t1", source, target, 300, "EUR", fencing_token=1, idempotency_key=KEY)
    assert (debited.balance_minor, credited.balance_minor) == (700, 300)
    assert uow.accounts.lock_orders[-1] == sorted([source, target])
    assert isinstance(uow.events.emitted[-1][0], events_pb2.TransferApplied)


def test_the_same_transfer_twice_moves_money_once(bank: AccountsHandlers) -> None:
    source, target = funded(bank, ALICE, 1000), funded(bank, BOB, 0)
    bank.apply_transfer("t1", source, target, 300, "EUR", 1, KEY)
    again, _ = bank.apply_transfer("t1", source, target, 300, "EUR", 2, KEY)
    assert again.balance_minor == 700
    with pytest.raises(IdempotencyConflictError):
        bank.apply_transfer("t1", source, target, 999, "EUR", 3, KEY)


def test_a_stale_fencing_token_is_rejected_and_nothing_moves(bank: AccountsHandlers) -> None:
    source, target = funded(bank, ALICE, 1000), funded(bank, BOB, 0)
    bank.apply_transfer("t2", source, target, 100, "EUR", fencing_token=7, idempotency_key="key-second-holder")
    with pytest.raises(StaleFencingTokenError):
        bank.apply_transfer("t1", source, target, 100, "EUR", fencing_token=6, idempotency_key="key-paused-holder")
    assert bank.get_account(SAM, source).balance_minor == 900


@pytest.mark.parametrize(
    ("setup", "error"),
    [("insufficient", InsufficientFundsError), ("frozen", AccountFrozenError), ("currency", CurrencyMismatchError),
     ("same", InvalidRequestError)],
)
def test_transfers_that_break_a_rule_change_nothing(bank: AccountsHandlers, uow: MemoryUnitOfWork, setup: str,
                                                     error: type[Exception]) -> None:
    source = funded(bank, ALICE, 100)
    target = funded(bank, BOB, 0, currency="USD" if setup == "currency" else "EUR")
    if setup == "frozen":
        bank.freeze_account(SAM, source, "investigation")
    amount = 500 if setup == "insufficient" else 50
    before = dict(uow.accounts.rows)
    with pytest.raises(error):
        bank.apply_transfer("t", source, source if setup == "same" else target, amount, "EUR", 1, KEY)
    assert uow.accounts.rows == before


@pytest.mark.parametrize("key", ["short", "x" * 101, "has space", "deposit-0001\n", "dépôt-0001", ""])
def test_an_idempotency_key_is_refused_unless_it_is_8_to_100_safe_characters(key: str) -> None:
    with pytest.raises(InvalidRequestError, match="idempotency_key must be 8 to 100 characters"):
        check_idempotency_key(key)
    check_idempotency_key("deposit-0001:a.b_c")
