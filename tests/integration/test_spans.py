"""Recorded spans on the running platform (bastion/grpc/spans.py): a transfer whose caller sampled its trace leaves
one tree of spans across payments and accounts (payments' call, its calls to accounts, accounts' calls), and the way
of the events it caused joins it (the events carry, signed, the span that caused them): each producer's outbox relay
publishing them, notifications' processing and the audit service's recording, in each service's
`logs/SERVICE.spans.jsonl`; a transfer its caller did not sample leaves none."""

import time
import uuid
from typing import Any

from bastion.devstack.context import StackContext
from bastion.grpc.spans import recorded_spans
from bastion.payments.v1 import payments_pb2
from tests.integration.bank import Bank

TRANSFER, APPLY = "bastion.payments.v1.Payments/Transfer", "bastion.accounts.v1.Accounts/ApplyTransfer"
GET_ACCOUNT = "bastion.accounts.v1.Accounts/GetAccount"


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
        processed, recorded = spans_of(ctx, "notifications", sampled), spans_of(ctx, "audit", sampled)
        expected = [(payments, "SERVER"), (payments, "CLIENT"), (accounts, "SERVER"), (payments, "PRODUCER"),
                    (accounts, "PRODUCER"), (processed, "CONSUMER"), (recorded, "CONSUMER")]
        topics = [{span["attributes"].get("messaging.destination.name") for span in processed},
                  {span["attributes"].get("messaging.destination.name") for span in recorded}]
        if (all(of_kind(spans, kind) for spans, kind in expected) and all(len(seen) == 2 for seen in topics)) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    [served] = of_kind(payments, "SERVER")
    [applied] = [span for span in of_kind(accounts, "SERVER") if span["name"] == APPLY]
    assert served["name"] == TRANSFER
    assert served["parent_id"] == f"0x{caller}", "a child of the caller's span"
    # payments' calls to accounts are CLIENT spans of its call, and accounts' spans their children
    calls = {span["name"]: span for span in of_kind(payments, "CLIENT")}
    assert set(calls) == {GET_ACCOUNT, APPLY}, calls
    assert all(call["parent_id"] == served["context"]["span_id"] and call["status"]["status_code"] == "UNSET"
               and {"rpc.grpc.status_code": 0, "server.address": "accounts"}.items() <= call["attributes"].items()
               and call["attributes"]["bastion.attempts"] >= 1 for call in calls.values()), calls
    assert applied["parent_id"] == calls[APPLY]["context"]["span_id"], "accounts' span is a child of payments' call"
    assert calls[APPLY]["start_time"] <= applied["start_time"]
    assert served["attributes"]["bastion.correlation_id"] == applied["attributes"]["bastion.correlation_id"] == \
        correlation
    assert served["attributes"]["rpc.grpc.status_code"] == applied["attributes"]["rpc.grpc.status_code"] == 0
    assert applied["attributes"]["bastion.peer_service"] == "payments"
    assert served["resource"]["attributes"]["service.name"] == "payments"
    cause = {"payments.events.v1": served["context"]["span_id"], "accounts.events.v1": applied["context"]["span_id"]}
    # each producer's relay publishing the events its call caused: children of that call's span
    for producer, topic in ((payments, "payments.events.v1"), (accounts, "accounts.events.v1")):
        published = of_kind(producer, "PRODUCER")
        assert published and all(span["name"] == f"send {topic}" and span["parent_id"] == cause[topic]
                                 and span["attributes"]["bastion.correlation_id"] == correlation
                                 and span["status"]["status_code"] == "UNSET" for span in published), published
    # notifications and the audit service consume both topics: each event's processing (notifications' handler,
    # the log's append) is a child of the span of the call that caused it
    for consumer in (processed, recorded):
        assert of_kind(consumer, "CONSUMER") == consumer, consumer
        assert {span["attributes"]["messaging.destination.name"]: span["parent_id"] for span in consumer} == cause
    assert {span["attributes"]["bastion.event_id"] for span in recorded} == \
        {span["attributes"]["bastion.event_id"] for span in [*payments, *accounts] if span["kind"] == KIND["PRODUCER"]}
    # The SDK exports spans in the order they ended: the unsampled transfer, made first, would be there by now.
    for service in ("payments", "accounts", "notifications", "audit"):
        assert spans_of(ctx, service, unsampled) == []


KIND = {kind: f"SpanKind.{kind}" for kind in ("SERVER", "CLIENT", "PRODUCER", "CONSUMER")}


def of_kind(spans: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [span for span in spans if span["kind"] == KIND[kind]]
