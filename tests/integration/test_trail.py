"""`bastion trail`: one request followed through the running platform by its correlation id: the access decisions
of the caller's call and of the calls it made downstream, the events they caused, and the log line of a refusal,
in time order; an id nothing carries is exit status 1."""

import time
import uuid
from typing import Any

import grpc
import pytest

from bastion.accounts.v1 import accounts_pb2
from bastion.devstack.context import StackContext
from bastion.payments.v1 import payments_pb2
from tests.integration.bank import Bank
from tests.integration.conftest import bastion

WIDE = {"COLUMNS": "400"}


def test_a_transfer_and_a_refusal_are_followed_across_services_and_the_audit_log(stack: Any, ctx: StackContext
                                                                                ) -> None:
    bank = Bank.connect(ctx)
    correlation_id = f"it-trail-{uuid.uuid4().hex[:12]}"
    source = bank.open_account("alice", amount=500, correlation_id=correlation_id)
    target = bank.open_account("bob", correlation_id=correlation_id)
    request = payments_pb2.TransferRequest(idempotency_key=f"trail-{uuid.uuid4()}", from_account_id=source,
                                           to_account_id=target, amount_minor=100, currency="EUR")
    trace_id = uuid.uuid4().hex  # sampled: payments and accounts record their spans, which the trail shows too
    sampled = ("traceparent", f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01")
    bank.payments.Transfer(request, metadata=(*bank.as_user("alice", correlation_id), sampled), timeout=30)
    with pytest.raises(grpc.RpcError):
        bank.accounts.Deposit(accounts_pb2.DepositRequest(account_id=target, amount_minor=1,
                                                          idempotency_key=f"trail-{uuid.uuid4()}"),
                              metadata=bank.as_user("bob", correlation_id), timeout=10)
    expected = ["/bastion.payments.v1.Payments/Transfer: allow", "/bastion.accounts.v1.Accounts/ApplyTransfer: allow",
                "bastion.payments.v1.PaymentCompleted", "bastion.accounts.v1.TransferApplied",
                "/bastion.accounts.v1.Accounts/Deposit: deny", "call_refused",
                "span bastion.payments.v1.Payments/Transfer", "span bastion.accounts.v1.Accounts/ApplyTransfer",
                "call to accounts bastion.accounts.v1.Accounts/ApplyTransfer"]
    deadline = time.monotonic() + 30
    while True:
        result = bastion("trail", correlation_id, env=WIDE, timeout=120)
        missing = [text for text in expected if text not in result.stdout]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert result.returncode == 0 and not missing, (missing, result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    refused_line = next(line for line in lines if "call_refused" in line)
    assert "accounts.log" in refused_line and correlation_id in refused_line
    position = {text: next(i for i, line in enumerate(lines) if text in line) for text in expected}
    assert position["/bastion.payments.v1.Payments/Transfer: allow"] < position["bastion.payments.v1.PaymentCompleted"]
    assert position["span bastion.payments.v1.Payments/Transfer"] < \
        position["call to accounts bastion.accounts.v1.Accounts/ApplyTransfer"] < \
        position["span bastion.accounts.v1.Accounts/ApplyTransfer"], "a span is placed at its start"
    assert f"trace {trace_id}" in lines[position["span bastion.accounts.v1.Accounts/ApplyTransfer"]]


def test_an_id_nothing_carries_is_exit_status_one(stack: Any) -> None:
    result = bastion("trail", f"it-nobody-{uuid.uuid4().hex[:12]}", "--minutes", "5", env=WIDE)
    assert result.returncode == 1
    assert "no service logged it and no audit record of the last 5 minutes has it" in result.stderr
    whole = bastion("trail", f"it-nobody-{uuid.uuid4().hex[:12]}", env=WIDE)
    assert whole.returncode == 1 and "no audit record in the audit log has it" in whole.stderr
