"""The accounts service as `bastion up` runs it: real gRPC over mTLS with real Keycloak tokens.

Every RPC of the service is also refused without a token and without a client certificate (generated from
the descriptor, so a new RPC is covered without anyone writing a test)."""

import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from bastion.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from bastion.devstack.context import StackContext
from bastion.grpc.channels import call_metadata, channel_credentials
from tests.integration.forgeries import code_of
from tests.integration.grpc_harness import service_token, tls_of, user_token


def target(ctx: StackContext) -> str:
    return ctx.grpc_address("accounts")


@pytest.fixture(scope="module")
def as_cli(stack: Any, ctx: StackContext) -> Iterator[accounts_pb2_grpc.AccountsStub]:
    channel = grpc.secure_channel(target(ctx), channel_credentials(tls_of(ctx, "cli")))
    yield accounts_pb2_grpc.AccountsStub(channel)
    channel.close()


def token(ctx: StackContext, user: str) -> tuple[tuple[str, str], ...]:
    return call_metadata(user_token(ctx, user)["access_token"], f"it-{uuid.uuid4()}")


def test_open_deposit_and_read_with_object_level_checks(ctx: StackContext, as_cli: Any) -> None:
    opened = as_cli.OpenAccount(accounts_pb2.OpenAccountRequest(currency="EUR"), metadata=token(ctx, "alice"),
                                timeout=10).account
    assert (opened.owner, opened.balance_minor) == ("alice", 0)
    key = f"deposit-{uuid.uuid4()}"
    deposit = accounts_pb2.DepositRequest(account_id=opened.account_id, amount_minor=2500, idempotency_key=key)
    assert as_cli.Deposit(deposit, metadata=token(ctx, "tina"), timeout=10).account.balance_minor == 2500
    assert as_cli.Deposit(deposit, metadata=token(ctx, "tina"), timeout=10).account.balance_minor == 2500
    mine = as_cli.GetAccount(accounts_pb2.GetAccountRequest(account_id=opened.account_id),
                             metadata=token(ctx, "alice"), timeout=10).account
    assert mine.balance_minor == 2500
    assert code_of(lambda: as_cli.GetAccount(accounts_pb2.GetAccountRequest(account_id=opened.account_id),
                                               metadata=token(ctx, "bob"), timeout=10)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: as_cli.FreezeAccount(
        accounts_pb2.FreezeAccountRequest(account_id=opened.account_id, reason="x"), metadata=token(ctx, "bob"),
        timeout=10)) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: as_cli.Deposit(deposit, metadata=token(ctx, "alice"), timeout=10)) == \
        grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("amount", [0, -5, 2**63 - 1 + 0])
def test_bad_amounts_are_invalid_argument(ctx: StackContext, as_cli: Any, amount: int) -> None:
    opened = as_cli.OpenAccount(accounts_pb2.OpenAccountRequest(currency="EUR"), metadata=token(ctx, "alice"),
                                timeout=10).account
    if amount > 0:  # the largest int64 is a valid amount once; twice overflows the balance
        request = accounts_pb2.DepositRequest(account_id=opened.account_id, amount_minor=amount,
                                              idempotency_key=f"big-{uuid.uuid4()}")
        as_cli.Deposit(request, metadata=token(ctx, "tina"), timeout=10)
        request.idempotency_key = f"big-{uuid.uuid4()}"
    else:
        request = accounts_pb2.DepositRequest(account_id=opened.account_id, amount_minor=amount,
                                              idempotency_key=f"bad-{uuid.uuid4()}")
    with pytest.raises(grpc.RpcError) as refused:
        as_cli.Deposit(request, metadata=token(ctx, "tina"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "amount" in refused.value.details()


def test_only_the_payments_identity_may_apply_a_transfer(ctx: StackContext, as_cli: Any) -> None:
    source = as_cli.OpenAccount(accounts_pb2.OpenAccountRequest(currency="EUR"), metadata=token(ctx, "alice"),
                                timeout=10).account
    target_account = as_cli.OpenAccount(accounts_pb2.OpenAccountRequest(currency="EUR"), metadata=token(ctx, "bob"),
                                        timeout=10).account
    as_cli.Deposit(accounts_pb2.DepositRequest(account_id=source.account_id, amount_minor=1000,
                                               idempotency_key=f"fund-{uuid.uuid4()}"),
                   metadata=token(ctx, "tina"), timeout=10)
    request = accounts_pb2.ApplyTransferRequest(
        transfer_id=str(uuid.uuid4()), from_account_id=source.account_id, to_account_id=target_account.account_id,
        amount_minor=300, currency="EUR", fencing_token=1, idempotency_key=f"transfer-{uuid.uuid4()}")
    assert code_of(lambda: as_cli.ApplyTransfer(request, metadata=token(ctx, "alice"), timeout=10)) == \
        grpc.StatusCode.PERMISSION_DENIED
    as_notifications = accounts_pb2_grpc.AccountsStub(
        grpc.secure_channel(target(ctx), channel_credentials(tls_of(ctx, "notifications"))))
    assert code_of(lambda: as_notifications.ApplyTransfer(
        request, metadata=call_metadata(service_token(ctx, "payments")), timeout=10)) == \
        grpc.StatusCode.PERMISSION_DENIED
    as_payments = accounts_pb2_grpc.AccountsStub(
        grpc.secure_channel(target(ctx), channel_credentials(tls_of(ctx, "payments"))))
    applied = as_payments.ApplyTransfer(request, metadata=call_metadata(service_token(ctx, "payments")), timeout=10)
    assert (applied.from_balance_minor, applied.to_balance_minor) == (700, 300)
    request.fencing_token, request.idempotency_key = 1, f"transfer-{uuid.uuid4()}"
    assert code_of(lambda: as_payments.ApplyTransfer(
        request, metadata=call_metadata(service_token(ctx, "payments")), timeout=10)) == \
        grpc.StatusCode.FAILED_PRECONDITION, "a fencing token that is not newer is refused"
