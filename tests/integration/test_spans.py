"""Recorded spans on the running platform (bastion/grpc/spans.py): a transfer whose caller sampled its trace leaves
one tree of spans across payments and accounts, and notifications' processing of the events it caused joins it
(the events carry, signed, the span that caused them), in each service's `logs/SERVICE.spans.jsonl`; a transfer
its caller did not sample leaves none."""

import time
import uuid
from typing import Any

from bastion.devstack.context import StackContext
from bastion.grpc.spans import recorded_spans
from bastion.payments.v1 import payments_pb2
from tests.integration.bank import Bank

TRANSFER, APPLY = "bastion.payments.v1.Payments/Transfer", "bastion.accounts.v1.Accounts/ApplyTransfer"


def spans_of(ctx: StackContext, service: str, trace_id: str) -> list[dict[str, Any]]:
    return recorded_spans(ctx.layout.log_dir, [service], trace_id)


def transfer(bank: Bank, source: str, target: str, trace_id: str, parent: str, flags: str, correlation: str) -> None:
    request = payments_pb2.TransferRequest(idempotency_key=f"spans-{uuid.uuid4()}", from_account_id=source,
                                           to_account_id=target, amount_minor=10, currency="EUR")
    metadata = (*bank.as_user("alice", correlation), ("traceparent", f"00-{trace_id}-{parent}-{flags}"))
    bank.payments.Transfer(request, metadata=metadata, timeout=30)


def test_a_sampled_transfer_leaves_one_tree_of_spans_across_payments_and_accounts(stack: Any, ctx: StackContext
                                                                                  ) -> None:
    bank = Bank.connect(ctx)
    source, target = bank.open_account("alice", amount=500), bank.open_account("bob")
    unsampled, sampled, caller = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex[:16]
    correlation = f"it-spans-{uuid.uuid4().hex[:12]}"
    transfer(bank, source, target, unsampled, caller, "00", correlation + "-unsampled")
    transfer(bank, source, target, sampled, caller, "01", correlation)

    deadline = time.monotonic() + 30  # the SDK exports in batches, every few seconds
    while True:
        payments, accounts = spans_of(ctx, "payments", sampled), spans_of(ctx, "accounts", sampled)
        processed = spans_of(ctx, "notifications", sampled)
        topics = {span["attributes"].get("messaging.destination.name") for span in processed}
        if (payments and accounts and len(topics) == 2) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    [served] = payments
    [applied] = [span for span in accounts if span["name"] == APPLY]
    assert served["name"] == TRANSFER and served["kind"] == "SpanKind.SERVER"
    assert served["parent_id"] == f"0x{caller}", "a child of the caller's span"
    assert applied["parent_id"] == served["context"]["span_id"], "accounts' span is a child of payments' span"
    assert served["attributes"]["bastion.correlation_id"] == applied["attributes"]["bastion.correlation_id"] == \
        correlation
    assert served["attributes"]["rpc.grpc.status_code"] == applied["attributes"]["rpc.grpc.status_code"] == 0
    assert applied["attributes"]["bastion.peer_service"] == "payments"
    assert served["resource"]["attributes"]["service.name"] == "payments"
    # notifications consumes both topics: each event's processing is a child of the span of the call that caused it
    causes = {span["attributes"]["messaging.destination.name"]: span["parent_id"] for span in processed}
    assert all(span["kind"] == "SpanKind.CONSUMER" for span in processed)
    assert causes == {"payments.events.v1": served["context"]["span_id"],
                      "accounts.events.v1": applied["context"]["span_id"]}, processed
    # The SDK exports spans in the order they ended: the unsampled transfer, made first, would be there by now.
    assert spans_of(ctx, "payments", unsampled) == [] and spans_of(ctx, "accounts", unsampled) == []
    assert spans_of(ctx, "notifications", unsampled) == []
