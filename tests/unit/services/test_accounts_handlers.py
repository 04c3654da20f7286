"""The accounts use cases on in-memory adapters: ownership, idempotency, freezing, and fenced transfers."""

from typing import Any

import pytest

from bastion.accounts.v1 import events_pb2
from bastion.grpc.errors import InvalidArgumentError
from services.accounts import domain
from services.accounts.domain import (
    MAX_MINOR,
    Account,
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
TINA = Caller("tina", frozenset({"teller"}))
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
        bank.deposit(TINA, account.account_id, amount, f"fund-{account.account_id}")
    return account.account_id


def test_open_account_is_the_callers_and_emits_an_event(bank: AccountsHandlers, uow: MemoryUnitOfWork) -> None:
    account = bank.open_account(ALICE, "EUR")
    assert (account.owner, account.currency, account.balance_minor) == ("alice", "EUR", 0)
    [(event, aggregate)] = uow.events.emitted
    assert isinstance(event, events_pb2.AccountOpened) and aggregate == account.account_id
    assert (event.account_id, event.owner, event.currency) == (account.account_id, "alice", "EUR")


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
    with pytest.raises(UnknownCurrencyError, match="currency 'XXX' is not one of"):
        bank.open_account(ALICE, "XXX")


def test_another_customer_gets_not_found_support_sees_it(bank: AccountsHandlers) -> None:
    account_id = funded(bank, ALICE, 0)
    with pytest.raises(AccountNotFoundError):
        bank.get_account(BOB, account_id)
    with pytest.raises(AccountNotFoundError):
        bank.get_account(BOB, "acc-does-not-exist")
    assert bank.get_account(SAM, account_id).owner == "alice"
    assert [a.account_id for a in bank.list_accounts(BOB)[0]] == []
    assert [a.account_id for a in bank.list_accounts(SAM)[0]] == [account_id]


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
    event, aggregate = uow.events.emitted[-1]
    assert isinstance(event, events_pb2.TransferApplied) and aggregate == source, "keyed by the debited account"
    assert (
        event.transfer_id,
        event.from_account_id,
        event.to_account_id,
        event.amount_minor,
        event.currency,
        event.fencing_token,
        event.idempotency_key,
    ) == ("t1", source, target, 300, "EUR", 1, KEY)


def test_the_same_transfer_twice_moves_money_once(bank: AccountsHandlers) -> None:
    source, target = funded(bank, ALICE, 1000), funded(bank, BOB, 0)
    bank.apply_transfer("t1", source, target, 300, "EUR", 1, KEY)
    again, _ = bank.apply_transfer("t1", source, target, 300, "EUR", 2, KEY)
    assert again.balance_minor == 700
    with pytest.raises(IdempotencyConflictError):
        bank.apply_transfer("t1", source, target, 999, "EUR", 3, KEY)


@pytest.mark.parametrize("stale", [6, 7])
def test_a_stale_fencing_token_is_rejected_and_nothing_moves(bank: AccountsHandlers, stale: int) -> None:
    source, target = funded(bank, ALICE, 1000), funded(bank, BOB, 0)
    bank.apply_transfer("t2", source, target, 100, "EUR", fencing_token=7, idempotency_key="key-second-holder")
    with pytest.raises(StaleFencingTokenError, match="not newer than 7"):
        bank.apply_transfer("t1", source, target, 100, "EUR", fencing_token=stale, idempotency_key="key-paused-holder")
    assert bank.get_account(SAM, source).balance_minor == 900


def test_a_fencing_token_beyond_the_columns_bigint_is_refused_before_anything_is_read(
        bank: AccountsHandlers, uow: MemoryUnitOfWork) -> None:
    source, target = funded(bank, ALICE, 1000), funded(bank, BOB, 0)
    before = dict(uow.accounts.rows)
    with pytest.raises(InvalidRequestError, match="fencing_token must be at most"):
        bank.apply_transfer("t1", source, target, 100, "EUR", MAX_MINOR + 1, KEY)
    assert uow.accounts.rows == before and KEY not in uow.accounts.keys, "nothing remembered for the key either"
    bank.apply_transfer("t1", source, target, 100, "EUR", MAX_MINOR, KEY)  # the largest a bigint holds is fine
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


def test_a_refused_transfer_keeps_its_answer_for_its_key_even_once_it_could_be_applied(
        bank: AccountsHandlers, uow: MemoryUnitOfWork) -> None:
    """Two attempts of one payment (a retry, the reconciler, a holder whose lease ran out and the one that took the
    lock over) get one answer: refused for want of funds, the same key is refused again after a deposit, so payments
    never records the payment FAILED while an attempt of it moved the money."""
    source, target = funded(bank, ALICE, 100), funded(bank, BOB, 0)
    with pytest.raises(InsufficientFundsError) as first:
        bank.apply_transfer("t1", source, target, 300, "EUR", 1, KEY)
    bank.deposit(TINA, source, 1000, "fund-again-0001")
    events = len(uow.events.emitted)
    with pytest.raises(InsufficientFundsError) as again:
        bank.apply_transfer("t1", source, target, 300, "EUR", 2, KEY)
    assert str(again.value) == str(first.value)
    assert (bank.get_account(SAM, source).balance_minor, bank.get_account(SAM, target).balance_minor) == (1100, 0)
    assert len(uow.events.emitted) == events, "no TransferApplied"
    with pytest.raises(IdempotencyConflictError):
        bank.apply_transfer("t1", source, target, 301, "EUR", 3, KEY)  # another request is still another request
    bank.apply_transfer("t2", source, target, 300, "EUR", 4, "key-0002-abcd")  # a new key is a new decision


def test_a_paused_holders_refusal_is_the_answer_for_the_payment_the_lock_taker_applies_again(
        bank: AccountsHandlers) -> None:
    source, target = funded(bank, ALICE, 1000), funded(bank, BOB, 0)
    bank.apply_transfer("other", source, target, 100, "EUR", fencing_token=8, idempotency_key="key-other-payment")
    with pytest.raises(StaleFencingTokenError, match="not newer than 8"):
        bank.apply_transfer("t1", source, target, 200, "EUR", fencing_token=7, idempotency_key=KEY)
    with pytest.raises(StaleFencingTokenError, match="not newer than 8"):
        bank.apply_transfer("t1", source, target, 200, "EUR", fencing_token=9, idempotency_key=KEY)
    assert bank.get_account(SAM, source).balance_minor == 900


@pytest.mark.parametrize("record", [b"SomeLaterRefusal\nwhatever it said", b"\xffInsufficient\xfe"],
                         ids=["written by a later release", "not even text"])
def test_an_earlier_answer_that_cannot_be_read_refuses_the_transfer(bank: AccountsHandlers, uow: MemoryUnitOfWork,
                                                                    record: bytes) -> None:
    """Refused, never applied now; and a damaged record (not UTF-8) is no fault answered INTERNAL either: that would
    leave the payment pending, count against accounts' breaker and fail again every reconciler round."""
    source, target = funded(bank, ALICE, 100), funded(bank, BOB, 0)
    with pytest.raises(InsufficientFundsError):
        bank.apply_transfer("t1", source, target, 300, "EUR", 1, KEY)
    fingerprint, _ = uow.accounts.keys[KEY]
    uow.accounts.keys[KEY] = (fingerprint, record)
    bank.deposit(TINA, source, 1000, "fund-again-0001")
    with pytest.raises(IdempotencyConflictError, match="earlier answer cannot be read"):
        bank.apply_transfer("t1", source, target, 300, "EUR", 2, KEY)
    assert bank.get_account(SAM, source).balance_minor == 1100


@pytest.mark.parametrize("key", ["short", "x" * 7, "x" * 101, "has space", "deposit-0001\n", "dépôt-0001", ""])
def test_an_idempotency_key_is_refused_unless_it_is_8_to_100_safe_characters(key: str) -> None:
    with pytest.raises(InvalidRequestError, match="idempotency_key must be 8 to 100 characters"):
        check_idempotency_key(key)
    for good in ("deposit-0001:a.b_c", "x" * 8, "x" * 100):
        check_idempotency_key(good)


def test_a_customer_sees_and_lists_exactly_their_own_accounts(bank: AccountsHandlers) -> None:
    mine, theirs, also_mine = funded(bank, ALICE, 0), funded(bank, BOB, 0), funded(bank, ALICE, 0)
    assert bank.get_account(ALICE, mine).account_id == mine
    assert [a.account_id for a in bank.list_accounts(ALICE)[0]] == sorted([mine, also_mine])
    with pytest.raises(AccountNotFoundError):
        bank.get_account(ALICE, theirs)


@pytest.mark.parametrize("name", ["ALICE", "malice", "alice2"])
def test_a_name_that_only_resembles_the_owners_is_another_customer(bank: AccountsHandlers, name: str) -> None:
    lookalike = Caller(name, frozenset({"customer"}))
    alices, theirs = funded(bank, ALICE, 0), funded(bank, lookalike, 0)
    with pytest.raises(AccountNotFoundError):
        bank.get_account(lookalike, alices)
    with pytest.raises(AccountNotFoundError):
        bank.get_account(ALICE, theirs)
    assert bank.get_account(lookalike, theirs).owner == name, "owned under the exact name the caller has"


@pytest.mark.parametrize(
    ("roles", "is_service", "sees_all"),
    [
        ({"support"}, False, True),
        ({"auditor"}, False, True),
        (set(), True, True),
        ({"customer"}, False, False),
        ({"customer", "teller"}, False, False),
        ({"customer", "admin"}, False, False),
        ({"service"}, False, False),  # a realm role that merely bears the name: the user is no service
        ({"customer", "service", "services"}, False, False),
    ],
)
def test_only_support_auditors_and_calling_services_see_every_account(
    bank: AccountsHandlers, roles: set[str], is_service: bool, sees_all: bool
) -> None:
    account_id = funded(bank, ALICE, 0)
    caller = Caller("someone", frozenset(roles), is_service=is_service)
    if sees_all:
        assert bank.get_account(caller, account_id).owner == "alice"
        assert [a.account_id for a in bank.list_accounts(caller)[0]] == [account_id]
    else:
        with pytest.raises(AccountNotFoundError):
            bank.get_account(caller, account_id)
        assert bank.list_accounts(caller) == ([], "")


def test_a_deposit_adds_to_the_balance_and_announces_the_new_one_once(
    bank: AccountsHandlers, uow: MemoryUnitOfWork
) -> None:
    account_id = funded(bank, ALICE, 1000)
    assert bank.deposit(TINA, account_id, 250, KEY).balance_minor == 1250
    assert uow.accounts.lock_orders[-1] == [account_id], "the row is locked: concurrent writes to it wait"
    assert bank.get_account(ALICE, account_id).balance_minor == 1250
    event, aggregate = uow.events.emitted[-1]
    assert isinstance(event, events_pb2.MoneyDeposited) and aggregate == account_id
    assert (event.account_id, event.amount_minor, event.currency, event.balance_minor, event.idempotency_key) == (
        account_id,
        250,
        "EUR",
        1250,
        KEY,
    )
    announced = len(uow.events.emitted)
    bank.deposit(TINA, account_id, 250, KEY)
    assert len(uow.events.emitted) == announced, "a repeated request is not announced again"


def test_a_frozen_account_takes_no_deposit(bank: AccountsHandlers, uow: MemoryUnitOfWork) -> None:
    account_id = funded(bank, ALICE, 100)
    bank.freeze_account(SAM, account_id, "investigation")
    with pytest.raises(AccountFrozenError):
        bank.deposit(TINA, account_id, 50, KEY)
    assert uow.accounts.rows[account_id].balance_minor == 100 and KEY not in uow.accounts.keys


def test_a_balance_may_reach_the_largest_amount_and_no_deposit_takes_it_beyond(bank: AccountsHandlers) -> None:
    account_id = funded(bank, ALICE, MAX_MINOR - 10)
    assert bank.deposit(TINA, account_id, 10, "key-to-the-top").balance_minor == MAX_MINOR
    with pytest.raises(InvalidAmountError, match="beyond the largest amount"):
        bank.deposit(TINA, account_id, 1, KEY)
    assert bank.get_account(SAM, account_id).balance_minor == MAX_MINOR


def test_a_deposit_into_an_unknown_account_is_not_found_and_leaves_no_trace(
    bank: AccountsHandlers, uow: MemoryUnitOfWork
) -> None:
    with pytest.raises(AccountNotFoundError):
        bank.deposit(TINA, "acc-does-not-exist", 100, KEY)
    assert uow.accounts.keys == {} and uow.events.emitted == []


def test_a_bad_amount_is_invalid_before_the_key_or_the_account_is_looked_at(bank: AccountsHandlers) -> None:
    account_id = funded(bank, ALICE, 0)
    bank.deposit(TINA, account_id, 500, KEY)
    with pytest.raises(InvalidAmountError, match="amount_minor"):
        bank.deposit(TINA, account_id, 0, KEY)  # not an idempotency conflict: the request itself is wrong
    with pytest.raises(InvalidAmountError, match="amount_minor"):
        bank.deposit(TINA, "acc-does-not-exist", -1, "key-unknown-account")


@pytest.mark.parametrize("amount", [0, -1])
def test_the_deposit_rule_itself_refuses_an_amount_that_is_not_positive(amount: int) -> None:
    with pytest.raises(InvalidAmountError, match="amount_minor must be positive"):
        domain.deposit(Account("acc-1", "alice", "EUR", 100), amount)


def test_a_malformed_idempotency_key_is_refused_before_any_money_moves(
    bank: AccountsHandlers, uow: MemoryUnitOfWork
) -> None:
    source, target = funded(bank, ALICE, 1000), funded(bank, BOB, 0)
    before, keys = dict(uow.accounts.rows), dict(uow.accounts.keys)
    with pytest.raises(InvalidRequestError, match="idempotency_key"):
        bank.deposit(TINA, source, 100, "short")
    with pytest.raises(InvalidRequestError, match="idempotency_key"):
        bank.apply_transfer("t1", source, target, 100, "EUR", 1, "short")
    assert uow.accounts.rows == before and uow.accounts.keys == keys


def test_a_deposit_key_reused_for_another_account_conflicts(bank: AccountsHandlers) -> None:
    first, second = funded(bank, ALICE, 0), funded(bank, BOB, 0)
    bank.deposit(TINA, first, 500, KEY)
    with pytest.raises(IdempotencyConflictError):
        bank.deposit(TINA, second, 500, KEY)
    assert bank.get_account(SAM, second).balance_minor == 0


def test_another_teller_reusing_a_deposit_key_is_refused_never_answered_with_the_first_tellers_deposit(
        bank: AccountsHandlers) -> None:
    # The same account, amount and key from another teller is another request: answering it as a repeat of the
    # first would tell the second teller "deposited" while no money moved.
    account_id = funded(bank, ALICE, 0)
    bank.deposit(TINA, account_id, 500, KEY)
    with pytest.raises(IdempotencyConflictError, match="used for a different request"):
        bank.deposit(Caller("teo", frozenset({"teller"})), account_id, 500, KEY)
    assert bank.get_account(SAM, account_id).balance_minor == 500
    assert bank.deposit(TINA, account_id, 500, KEY).balance_minor == 500, "the first teller's repeat is a repeat"


@pytest.mark.parametrize("change", ["source", "target", "amount", "currency"])
def test_a_transfer_key_reused_for_another_transfer_conflicts_and_moves_nothing(
    bank: AccountsHandlers, uow: MemoryUnitOfWork, change: str
) -> None:
    source, target, other = funded(bank, ALICE, 1000), funded(bank, BOB, 0), funded(bank, ALICE, 1000)
    bank.apply_transfer("t1", source, target, 300, "EUR", 1, KEY)
    changed: dict[str, dict[str, Any]] = {
        "source": {"from_account_id": other},
        "target": {"to_account_id": other},
        "amount": {"amount_minor": 301},
        "currency": {"currency": "USD"},
    }
    same: dict[str, Any] = {"from_account_id": source, "to_account_id": target, "amount_minor": 300, "currency": "EUR"}
    before = dict(uow.accounts.rows)
    with pytest.raises(IdempotencyConflictError):
        bank.apply_transfer("t2", fencing_token=2, idempotency_key=KEY, **(same | changed[change]))
    assert uow.accounts.rows == before


@pytest.mark.parametrize("reason", ["", "   ", "\n\t"])
def test_freezing_needs_a_reason(bank: AccountsHandlers, uow: MemoryUnitOfWork, reason: str) -> None:
    account_id = funded(bank, ALICE, 0)
    with pytest.raises(InvalidRequestError, match="reason"):
        bank.freeze_account(SAM, account_id, reason)
    assert not uow.accounts.rows[account_id].frozen
    assert not any(isinstance(event, events_pb2.AccountFrozen) for event, _ in uow.events.emitted)


def test_freezing_an_unknown_account_is_not_found(bank: AccountsHandlers, uow: MemoryUnitOfWork) -> None:
    with pytest.raises(AccountNotFoundError):
        bank.freeze_account(SAM, "acc-does-not-exist", "investigation")
    assert uow.events.emitted == []


def test_a_freeze_is_recorded_in_an_event_with_its_reason_bounded(
    bank: AccountsHandlers, uow: MemoryUnitOfWork
) -> None:
    account_id = funded(bank, ALICE, 0)
    assert bank.freeze_account(SAM, account_id, "r" * 600).frozen
    assert uow.accounts.lock_orders[-1] == [account_id], "the row is locked: a transfer from it waits"
    event, aggregate = uow.events.emitted[-1]
    assert isinstance(event, events_pb2.AccountFrozen) and aggregate == account_id
    assert (event.account_id, event.reason) == (account_id, "r" * 500)


@pytest.mark.parametrize("amount", [0, -50, MAX_MINOR + 1])
def test_a_transfer_of_an_amount_that_is_not_positive_or_too_large_is_invalid(
    bank: AccountsHandlers, uow: MemoryUnitOfWork, amount: int
) -> None:
    source, target = funded(bank, ALICE, 100), funded(bank, BOB, 100)
    before = dict(uow.accounts.rows)
    with pytest.raises(InvalidAmountError, match="amount_minor"):
        bank.apply_transfer("t", source, target, amount, "EUR", 1, KEY)
    assert uow.accounts.rows == before


def test_a_transfer_in_an_unknown_currency_is_invalid_and_names_it(bank: AccountsHandlers) -> None:
    source, target = funded(bank, ALICE, 100), funded(bank, BOB, 0)
    with pytest.raises(UnknownCurrencyError, match="'XXX'"):
        bank.apply_transfer("t", source, target, 50, "XXX", 1, KEY)


def test_a_transfer_from_an_account_in_another_currency_is_refused(
    bank: AccountsHandlers, uow: MemoryUnitOfWork
) -> None:
    source, target = funded(bank, ALICE, 100, currency="USD"), funded(bank, BOB, 0)
    before = dict(uow.accounts.rows)
    with pytest.raises(CurrencyMismatchError, match=f"account {source} is in USD"):
        bank.apply_transfer("t", source, target, 50, "EUR", 1, KEY)
    assert uow.accounts.rows == before


def test_the_whole_balance_may_be_sent_and_the_destination_may_reach_the_largest_amount(
    bank: AccountsHandlers,
) -> None:
    source, target = funded(bank, ALICE, 1000), funded(bank, BOB, MAX_MINOR - 1000)
    debited, credited = bank.apply_transfer("t", source, target, 1000, "EUR", 1, KEY)
    assert (debited.balance_minor, credited.balance_minor) == (0, MAX_MINOR)


def test_opposite_transfers_lock_the_same_rows_in_the_same_order(bank: AccountsHandlers, uow: MemoryUnitOfWork) -> None:
    first, second = funded(bank, ALICE, 1000), funded(bank, BOB, 1000)
    bank.apply_transfer("t1", first, second, 100, "EUR", 1, "key-forward-1")
    bank.apply_transfer("t2", second, first, 100, "EUR", 1, "key-backward-1")
    assert uow.accounts.lock_orders[-2:] == [sorted([first, second])] * 2


def test_the_idempotency_key_is_read_only_once_the_rows_are_locked(bank: AccountsHandlers,
                                                                  uow: MemoryUnitOfWork) -> None:
    """Read before the lock, a key the same request is committing meanwhile is missed, and inserting it again
    fails (tests/integration/test_accounts_postgres.py shows it on PostgreSQL); read after, it is the same request."""
    source, target = funded(bank, ALICE, 500), funded(bank, BOB, 0)
    uow.accounts.steps.clear()
    bank.deposit(TINA, source, 100, "key-deposit-0001")
    assert uow.accounts.steps == ["lock", "remembered"]
    uow.accounts.steps.clear()
    bank.apply_transfer("t-1", source, target, 50, "EUR", 1, "key-transfer-0001")
    assert uow.accounts.steps == ["lock", "remembered"]


@pytest.mark.parametrize("bad", ["acc\x001", "", "a" * 37, "acc-1\n", "\u202eacc"])
def test_an_account_id_no_account_can_have_is_an_invalid_argument_naming_it(bank: AccountsHandlers,
                                                                            uow: MemoryUnitOfWork, bad: str) -> None:
    """A NUL reaching PostgreSQL fails the query in the driver (INTERNAL, not the caller's INVALID_ARGUMENT)."""
    source = funded(bank, ALICE, 100)
    emitted = len(uow.events.emitted)
    for attempt in (lambda: bank.get_account(SAM, bad), lambda: bank.deposit(TINA, bad, 5, "key-bad-id-1"),
                    lambda: bank.freeze_account(SAM, bad, "fraud")):
        with pytest.raises(InvalidRequestError, match="account_id"):
            attempt()
    with pytest.raises(InvalidRequestError, match="to_account_id"):
        bank.apply_transfer("t-1", source, bad, 5, "EUR", 1, "key-bad-id-2")
    with pytest.raises(InvalidRequestError, match="from_account_id"):
        bank.apply_transfer("t-1", bad, source, 5, "EUR", 1, "key-bad-id-3")
    assert len(uow.events.emitted) == emitted


def test_an_unknown_currency_is_quoted_cut_short_in_the_refusal(bank: AccountsHandlers) -> None:
    """The message is the status's trailer and a log line: a 100 KB currency must not come back whole."""
    with pytest.raises(UnknownCurrencyError) as refused:
        bank.open_account(ALICE, "E" * 100_000)
    assert "currency 'EEEEEEEE...'" in str(refused.value) and len(str(refused.value)) < 200
    with pytest.raises(UnknownCurrencyError, match=r"currency 'XX\\x00' is not one of"):
        bank.open_account(ALICE, "XX\x00")


def test_support_pages_through_every_account_in_id_order_and_a_customer_only_through_theirs(
        bank: AccountsHandlers) -> None:
    alices = [funded(bank, ALICE, 0) for _ in range(5)]
    bobs = funded(bank, BOB, 0)
    seen, token, pages_read = [], "", 0
    while True:
        page, token = bank.list_accounts(SAM, 2, token)
        seen += [a.account_id for a in page]
        pages_read += 1
        if not token:
            break
    assert seen == sorted([*alices, bobs]) and pages_read == 3
    first, token = bank.list_accounts(ALICE, 3)
    rest, last = bank.list_accounts(ALICE, 3, token)
    assert [a.account_id for a in first + rest] == sorted(alices) and last == ""
    assert bank.list_accounts(BOB, 1) == ([bank.get_account(BOB, bobs)], ""), "a full last page: no next token"


def test_another_customers_page_token_shows_nothing_of_theirs(bank: AccountsHandlers) -> None:
    """A token is only a place in the order: with it, bob still sees his own accounts alone."""
    funded(bank, ALICE, 0)
    funded(bank, ALICE, 0)
    _, alices_token = bank.list_accounts(SAM, 1)
    assert bank.list_accounts(BOB, 1, alices_token) == ([], "")


@pytest.mark.parametrize(("size", "token", "named"), [
    (501, "", "page_size"), (-1, "", "page_size"), (0, "not-a-token", "page_token"),
])
def test_a_bad_page_request_is_an_invalid_argument_naming_the_field(
        bank: AccountsHandlers, size: int, token: str, named: str) -> None:
    with pytest.raises(InvalidArgumentError, match=named):
        bank.list_accounts(SAM, size, token)
