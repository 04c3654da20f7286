"""The payments service as `bastion up` runs it, calling accounts through the client kit: a transfer moves
money once under a fenced lock, idempotently, only from the caller's own account."""

import uuid
from typing import Any

import grpc
import pytest

from bastion.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from bastion.devstack.context import StackContext
from bastion.grpc.channels import call_metadata, channel_credentials
from bastion.payments.v1 import payments_pb2, payments_pb2_grpc
from tests.integration.grpc_harness import tls_of, user_token


def stubs(ctx: StackContext) -> tuple[Any, Any]:
    credentials = channel_credentials(tls_of(ctx, "cli"))
    accounts = accounts_pb2_grpc.AccountsStub(grpc.secure_channel(ctx.grpc_address("accounts"), credentials))
    payments = payments_pb2_grpc.PaymentsStub(grpc.secure_channel(ctx.grpc_address("payments"), credentials))
    return accounts, payments


def as_user(ctx: StackContext, user: str) -> tuple[tuple[str, str], ...]:
    return call_metadata(user_token(ctx, user)["access_token"], f"it-{uuid.uuid4()}")


def open_funded(ctx: StackContext, accounts: Any, owner: str, amount: int) -> str:
    account_id = str(accounts.OpenAccount(accounts_pb2.OpenAccountRequest(currency="EUR"),
                                          metadata=as_user(ctx, owner), timeout=10).account.account_id)
    if amount:
        accounts.Deposit(accounts_pb2.DepositRequest(account_id=account_id, amount_minor=amount,
                                                     idempotency_key=f"fund-{uuid.uuid4()}"),
                         metadata=as_user(ctx, "tina"), timeout=10)
    return account_id


def balance(ctx: StackContext, accounts: Any, account_id: str) -> int:
    reply = accounts.GetAccount(accounts_pb2.GetAccountRequest(account_id=account_id), metadata=as_user(ctx, "sam"),
                                timeout=10)
    return int(reply.account.balance_minor)


def test_alice_pays_bob_once_even_when_she_asks_twice(stack: Any, ctx: StackContext) -> None:
    accounts, payments = stubs(ctx)
    alice, bob = open_funded(ctx, accounts, "alice", 1000), open_funded(ctx, accounts, "bob", 0)
    request = payments_pb2.TransferRequest(idempotency_key=f"pay-{uuid.uuid4()}", from_account_id=alice,
                                           to_account_id=bob, amount_minor=300, currency="EUR")
    first = payments.Transfer(request, metadata=as_user(ctx, "alice"), timeout=20).payment
    again = payments.Transfer(request, metadata=as_user(ctx, "alice"), timeout=20).payment
    assert first.status == "COMPLETED" and again.payment_id == first.payment_id
    assert (balance(ctx, accounts, alice), balance(ctx, accounts, bob)) == (700, 300)
    mine = payments.ListPayments(payments_pb2.ListPaymentsRequest(), metadata=as_user(ctx, "alice"), timeout=10)
    assert first.payment_id in [p.payment_id for p in mine.payments]
    with pytest.raises(grpc.RpcError) as refused:
        payments.GetPayment(payments_pb2.GetPaymentRequest(payment_id=first.payment_id),
                            metadata=as_user(ctx, "bob"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(("who", "amount", "code"), [
    ("bob", 100, grpc.StatusCode.NOT_FOUND),            # not bob's account
    ("alice", 0, grpc.StatusCode.INVALID_ARGUMENT),
    ("alice", -5, grpc.StatusCode.INVALID_ARGUMENT),
    ("alice", 5000, grpc.StatusCode.FAILED_PRECONDITION),  # insufficient funds, refused by accounts
    ("tina", 100, grpc.StatusCode.PERMISSION_DENIED),   # tellers do not make transfers
])
def test_refused_transfers_move_nothing(stack: Any, ctx: StackContext, who: str, amount: int,
                                        code: grpc.StatusCode) -> None:
    accounts, payments = stubs(ctx)
    alice, bob = open_funded(ctx, accounts, "alice", 1000), open_funded(ctx, accounts, "bob", 0)
    request = payments_pb2.TransferRequest(idempotency_key=f"pay-{uuid.uuid4()}", from_account_id=alice,
                                           to_account_id=bob, amount_minor=amount, currency="EUR")
    with pytest.raises(grpc.RpcError) as refused:
        payments.Transfer(request, metadata=as_user(ctx, who), timeout=20)
    assert refused.value.code() == code, refused.value.details()
    assert (balance(ctx, accounts, alice), balance(ctx, accounts, bob)) == (1000, 0)
