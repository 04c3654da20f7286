"""The accounts handlers on PostgreSQL: concurrent opposite transfers never deadlock, never go negative and
conserve money; the database itself refuses a negative balance; a stale fencing token moves nothing; every
change writes its event to the outbox in the same transaction. Each test has its own schema."""

import random
import threading
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.exc import IntegrityError

from bastion.devstack.components.postgres import Postgres
from bastion.devstack.context import StackContext
from bastion.events.keys import KeyRing
from bastion.events.outbox import Outbox
from bastion.events.storage import outbox
from services.accounts.adapters.postgres import PostgresUnitOfWork, accounts, create_schema
from services.accounts.domain import AccountsError, InsufficientFundsError, StaleFencingTokenError
from services.accounts.fakes import MemoryPersonalData
from services.accounts.handlers import AccountsHandlers, Caller

TELLER = Caller("tina", frozenset({"teller"}))
SUPPORT = Caller("sam", frozenset({"support"}))


@pytest.fixture()
def engine(postgres: Postgres, ctx: StackContext, unique: str) -> Iterator[Engine]:
    base = create_engine(postgres.sqlalchemy_url("accounts", ctx.credentials.postgres["accounts"], "accounts"),
                         pool_size=12, max_overflow=4)
    schema = f"it_accounts_{unique}"
    with base.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    scoped = base.execution_options(schema_translate_map={None: schema})
    create_schema(scoped)
    yield scoped
    with base.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    base.dispose()


@pytest.fixture()
def bank(engine: Engine, tmp_path: object) -> AccountsHandlers:
    ring = KeyRing(tmp_path / "keys")  # type: ignore[operator]
    ring.ensure(["accounts"])
    return AccountsHandlers(PostgresUnitOfWork(engine, Outbox(ring.signing_key("accounts"))), MemoryPersonalData())


def test_concurrent_opposite_transfers_conserve_money_and_never_go_negative(bank: AccountsHandlers,
                                                                            engine: Engine) -> None:
    owners = [Caller(name, frozenset({"customer"})) for name in ("alice", "bob", "carol", "dave")]
    ids = [bank.open_account(owner, "EUR").account_id for owner in owners]
    for account_id in ids:
        bank.deposit(TELLER, account_id, 1_000, f"fund-{account_id}")
    token = iter(range(1, 10**6))
    lock = threading.Lock()
    applied, refused, crashed = [], [], []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for n in range(25):
            source, target = rng.sample(ids, 2)
            with lock:
                fencing = next(token)
            try:
                bank.apply_transfer(f"t-{seed}-{n}", source, target, rng.randint(1, 400), "EUR", fencing,
                                    f"key-{seed}-{n}-{uuid.uuid4().hex[:8]}")
                applied.append(1)
            except AccountsError:
                refused.append(1)  # insufficient funds, or a token overtaken by a later one: both are fine
            except Exception as error:  # a deadlock or any other failure fails the test below
                crashed.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads), "a transfer hung"
    assert crashed == []
    with engine.connect() as conn:
        balances = conn.execute(select(accounts.c.balance_minor)).scalars().all()
        events = conn.execute(select(func.count()).select_from(outbox)).scalar_one()
    assert sum(balances) == 4_000 and min(balances) >= 0
    assert len(applied) + len(refused) == 200 and applied
    assert events == 4 + 4 + len(applied), "opened, deposited, and one event per applied transfer"


def test_the_database_refuses_a_negative_balance(bank: AccountsHandlers, engine: Engine) -> None:
    account_id = bank.open_account(Caller("alice", frozenset({"customer"})), "EUR").account_id
    with pytest.raises(IntegrityError, match="balance_never_negative"), engine.begin() as conn:
        conn.execute(accounts.update().where(accounts.c.account_id == account_id).values(balance_minor=-1))


def test_a_stale_fencing_token_moves_nothing(bank: AccountsHandlers) -> None:
    source = bank.open_account(Caller("alice", frozenset({"customer"})), "EUR").account_id
    target = bank.open_account(Caller("bob", frozenset({"customer"})), "EUR").account_id
    bank.deposit(TELLER, source, 500, f"fund-{source}")
    bank.apply_transfer("second", source, target, 100, "EUR", 8, "key-second-holder")
    with pytest.raises(StaleFencingTokenError):
        bank.apply_transfer("paused", source, target, 100, "EUR", 7, "key-paused-holder")
    assert bank.get_account(SUPPORT, source).balance_minor == 400
    assert bank.get_account(SUPPORT, target).balance_minor == 100


def test_a_refused_transfer_is_refused_again_for_its_key_after_the_funds_arrive(bank: AccountsHandlers) -> None:
    """The refusal is committed with its key although the transfer is not: the same key gets the same answer."""
    source = bank.open_account(Caller("alice", frozenset({"customer"})), "EUR").account_id
    target = bank.open_account(Caller("bob", frozenset({"customer"})), "EUR").account_id
    key = f"key-refused-{source[-8:]}"
    with pytest.raises(InsufficientFundsError):
        bank.apply_transfer("refused", source, target, 100, "EUR", 1, key)
    bank.deposit(TELLER, source, 500, f"fund-{source}")
    with pytest.raises(InsufficientFundsError):
        bank.apply_transfer("refused", source, target, 100, "EUR", 2, key)
    assert bank.get_account(SUPPORT, source).balance_minor == 500
    assert bank.get_account(SUPPORT, target).balance_minor == 0


def test_the_same_deposit_sent_twice_at_once_is_applied_once_and_both_get_its_answer(bank: AccountsHandlers,
                                                                                     engine: Engine) -> None:
    """A teller's client retrying while the first attempt is still running: the row lock orders the two, and the
    second sees the first's idempotency key once it holds the lock (never a unique violation, INTERNAL)."""
    for round_ in range(5):
        account_id = bank.open_account(Caller("alice", frozenset({"customer"})), "EUR").account_id
        key = f"twice-{uuid.uuid4().hex[:12]}"
        start = threading.Barrier(2)
        outcomes: list[object] = []

        def deposit(account_id: str = account_id, key: str = key, start: threading.Barrier = start,
                    outcomes: list[object] = outcomes) -> None:
            start.wait()
            try:
                outcomes.append(bank.deposit(TELLER, account_id, 250, key).balance_minor)
            except Exception as error:  # the outcome under test, whatever it is
                outcomes.append(error)

        threads = [threading.Thread(target=deposit) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert outcomes == [250, 250], f"round {round_}: {outcomes}"
        assert bank.get_account(SUPPORT, account_id).balance_minor == 250


def test_one_key_sent_at_once_for_two_accounts_is_a_conflict_for_one_of_them(bank: AccountsHandlers) -> None:
    """Different rows, so no lock orders them: the key's primary key does, and the loser is told the key was used
    for another request (FAILED_PRECONDITION), not an internal error; its account is untouched."""
    for round_ in range(5):
        accounts_ = [bank.open_account(Caller(name, frozenset({"customer"})), "EUR").account_id
                     for name in ("alice", "bob")]
        key = f"shared-{uuid.uuid4().hex[:12]}"
        start = threading.Barrier(2)
        outcomes: dict[str, object] = {}

        def deposit(account_id: str, key: str = key, start: threading.Barrier = start,
                    outcomes: dict[str, object] = outcomes) -> None:
            start.wait()
            try:
                outcomes[account_id] = bank.deposit(TELLER, account_id, 100, key).balance_minor
            except Exception as error:  # the outcome under test, whatever it is
                outcomes[account_id] = error

        threads = [threading.Thread(target=deposit, args=(account_id,)) for account_id in accounts_]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(type(outcome).__name__ for outcome in outcomes.values()) == \
            ["IdempotencyConflictError", "int"], f"round {round_}: {outcomes}"
        assert sorted(bank.get_account(SUPPORT, account_id).balance_minor for account_id in accounts_) == [0, 100]


def test_accounts_are_listed_a_page_at_a_time_in_id_order_on_postgresql(bank: AccountsHandlers) -> None:
    alice, bob = Caller("alice", frozenset({"customer"})), Caller("bob", frozenset({"customer"}))
    alices = sorted(bank.open_account(alice, "EUR").account_id for _ in range(5))
    bobs = bank.open_account(bob, "EUR").account_id
    seen, token = [], ""
    while True:
        page, token = bank.list_accounts(SUPPORT, 2, token)
        seen += [account.account_id for account in page]
        if not token:
            break
    assert seen == sorted([*alices, bobs])
    first, token = bank.list_accounts(alice, 4)
    rest, last = bank.list_accounts(alice, 4, token)
    assert [account.account_id for account in first + rest] == alices and last == ""
