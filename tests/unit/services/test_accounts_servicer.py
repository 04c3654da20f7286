"""The accounts gRPC servicer on in-memory adapters: whom it takes the authenticated principal for (an end user by
username and roles, a calling service by its client), and that each reply carries what the handler returned."""

import threading
from collections.abc import Awaitable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import pytest

from bastion.accounts.v1 import accounts_pb2
from bastion.grpc.errors import UnauthenticatedError
from bastion.grpc.tokens import Principal
from services.accounts.adapters.grpc import AccountsServicer
from services.accounts.domain import AccountFrozenError, AccountNotFoundError
from services.accounts.fakes import MemoryPersonalData, MemoryUnitOfWork
from services.accounts.handlers import AccountsHandlers
from tests.unit.services.admitted import admitted

EXPIRES = 2_000_000_000


def user(username: str, *roles: str) -> Principal:
    return Principal(f"sub-{username}", username, "bastion-cli", frozenset(roles), "jti-1", EXPIRES)


ALICE, BOB, SAM, TINA = (
    user("alice", "customer"),
    user("bob", "customer"),
    user("sam", "support"),
    user("tina", "teller"),
)
# A client-credentials token: Keycloak names it service-account-<client>, with the realm's default roles only.
PAYMENTS = Principal(
    "sub-payments",
    "service-account-payments",
    "payments",
    frozenset({"default-roles-bastion", "offline_access"}),
    None,
    EXPIRES,
)


def as_(principal: Principal | None, rpc: Awaitable[Any]) -> Any:
    """Run RPC as the interceptor would have admitted it: PRINCIPAL in the call's context."""
    return admitted(principal, rpc, "/bastion.accounts.v1.Accounts/Test")


@dataclass
class ThreadNotingUnitOfWork(MemoryUnitOfWork):
    """Notes the thread each transaction runs on: database I/O must never block the server's event loop."""

    threads: list[threading.Thread] = field(default_factory=list)

    def __call__(self) -> AbstractContextManager[MemoryUnitOfWork]:  # type: ignore[override]
        self.threads.append(threading.current_thread())
        return super().__call__()


@pytest.fixture()
def personal() -> MemoryPersonalData:
    return MemoryPersonalData()


@pytest.fixture()
def uow() -> ThreadNotingUnitOfWork:
    return ThreadNotingUnitOfWork()


@pytest.fixture()
def servicer(uow: ThreadNotingUnitOfWork, personal: MemoryPersonalData) -> AccountsServicer:
    ids = iter(f"acc-{n}" for n in range(100))
    return AccountsServicer(AccountsHandlers(uow, personal, new_id=lambda: next(ids)))


def open_account(servicer: AccountsServicer, owner: Principal, balance: int = 0) -> str:
    account_id: str = as_(
        owner, servicer.OpenAccount(accounts_pb2.OpenAccountRequest(currency="EUR"), None)
    ).account.account_id
    if balance:
        as_(
            TINA,
            servicer.Deposit(
                accounts_pb2.DepositRequest(
                    account_id=account_id, amount_minor=balance, idempotency_key=f"fund-{account_id}"
                ),
                None,
            ),
        )
    return account_id


def test_an_account_is_opened_in_the_callers_username_and_only_they_read_it(
    servicer: AccountsServicer, personal: MemoryPersonalData
) -> None:
    request = accounts_pb2.OpenAccountRequest(currency="EUR", notification_email="alice@example.com")
    opened = as_(ALICE, servicer.OpenAccount(request, None)).account
    assert (opened.owner, opened.currency, opened.balance_minor, opened.frozen) == ("alice", "EUR", 0, False)
    assert [plaintext for _, _, plaintext in personal.sealed.values()] == ["alice@example.com"]
    read = as_(ALICE, servicer.GetAccount(accounts_pb2.GetAccountRequest(account_id=opened.account_id), None))
    assert read.account == opened
    with pytest.raises(AccountNotFoundError):
        as_(BOB, servicer.GetAccount(accounts_pb2.GetAccountRequest(account_id=opened.account_id), None))
    assert list(as_(BOB, servicer.ListAccounts(accounts_pb2.ListAccountsRequest(), None)).accounts) == []


def test_a_calling_service_is_known_by_its_client_and_sees_any_account(servicer: AccountsServicer) -> None:
    account_id = open_account(servicer, ALICE)
    read = as_(PAYMENTS, servicer.GetAccount(accounts_pb2.GetAccountRequest(account_id=account_id), None))
    assert read.account.owner == "alice"


def test_a_user_whose_realm_role_is_named_service_is_no_calling_service(servicer: AccountsServicer) -> None:
    """Being a service comes from the service-account token the policy admitted, never from a role's name."""
    account_id = open_account(servicer, ALICE)
    mallory = user("mallory", "customer", "service")
    with pytest.raises(AccountNotFoundError):
        as_(mallory, servicer.GetAccount(accounts_pb2.GetAccountRequest(account_id=account_id), None))
    assert list(as_(mallory, servicer.ListAccounts(accounts_pb2.ListAccountsRequest(), None)).accounts) == []


def test_a_call_without_an_authenticated_principal_is_unauthenticated(servicer: AccountsServicer) -> None:
    with pytest.raises(UnauthenticatedError):
        as_(None, servicer.ListAccounts(accounts_pb2.ListAccountsRequest(), None))


def test_a_frozen_account_is_shown_frozen(servicer: AccountsServicer) -> None:
    account_id = open_account(servicer, ALICE)
    reply = as_(
        SAM,
        servicer.FreezeAccount(accounts_pb2.FreezeAccountRequest(account_id=account_id, reason="investigation"), None),
    )
    assert reply.account.frozen
    assert as_(ALICE, servicer.GetAccount(accounts_pb2.GetAccountRequest(account_id=account_id), None)).account.frozen


def test_an_applied_transfer_answers_the_new_balance_of_each_side(servicer: AccountsServicer) -> None:
    source, target = open_account(servicer, ALICE, 1000), open_account(servicer, BOB)
    request = accounts_pb2.ApplyTransferRequest(
        transfer_id="t1",
        from_account_id=source,
        to_account_id=target,
        amount_minor=300,
        currency="EUR",
        fencing_token=1,
        idempotency_key="transfer-0001",
    )
    applied = as_(PAYMENTS, servicer.ApplyTransfer(request, None))
    assert (applied.transfer_id, applied.from_balance_minor, applied.to_balance_minor) == ("t1", 700, 300)


def test_every_rpc_does_its_database_work_off_the_event_loop(
    servicer: AccountsServicer, uow: ThreadNotingUnitOfWork
) -> None:
    source, target = open_account(servicer, ALICE, 1000), open_account(servicer, BOB)
    as_(ALICE, servicer.GetAccount(accounts_pb2.GetAccountRequest(account_id=source), None))
    as_(ALICE, servicer.ListAccounts(accounts_pb2.ListAccountsRequest(), None))
    as_(SAM, servicer.FreezeAccount(accounts_pb2.FreezeAccountRequest(account_id=target, reason="review"), None))
    with pytest.raises(AccountFrozenError):
        as_(
            PAYMENTS,
            servicer.ApplyTransfer(
                accounts_pb2.ApplyTransferRequest(
                    transfer_id="t1",
                    from_account_id=source,
                    to_account_id=target,
                    amount_minor=1,
                    currency="EUR",
                    fencing_token=1,
                    idempotency_key="transfer-0001",
                ),
                None,
            ),
        )
    assert len(uow.threads) == 7 and threading.main_thread() not in uow.threads


def test_a_page_is_asked_for_with_its_size_and_token_and_the_next_token_comes_back(
        servicer: AccountsServicer) -> None:
    opened = [open_account(servicer, ALICE) for _ in range(3)]
    first = as_(SAM, servicer.ListAccounts(accounts_pb2.ListAccountsRequest(page_size=2), None))
    rest = as_(SAM, servicer.ListAccounts(accounts_pb2.ListAccountsRequest(
        page_size=2, page_token=first.next_page_token), None))
    assert [a.account_id for a in [*first.accounts, *rest.accounts]] == sorted(opened)
    assert first.next_page_token and rest.next_page_token == ""
