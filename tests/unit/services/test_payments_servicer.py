"""The payments gRPC servicer (services/payments/adapters/grpc.py) on a stand-in for its handlers: who it takes the
caller for (an end user by username, a service by its client, with the bearer token a large transfer is checked
with), that it refuses a call without both, and that each request and reply carries every field across."""

import datetime as dt
from collections.abc import Awaitable
from typing import Any

import pytest

from bastion.grpc.errors import UnauthenticatedError
from bastion.grpc.tokens import Principal
from bastion.payments.v1 import payments_pb2
from services.payments.adapters.grpc import PaymentsServicer
from services.payments.domain import Payment, PaymentStatus, Transfer
from services.payments.handlers import Caller
from tests.unit.services.admitted import admitted

ALICE = Principal("sub-alice", "alice", "bastion-cli", frozenset({"customer"}), "jti-1", 2_000_000_000)
NO_USERNAME = Principal("sub-job", None, "settlement-job", frozenset(), None, 2_000_000_000)
PAYMENT = Payment(payment_id="p-1", idempotency_key="key-1", fingerprint="f" * 64, from_account_id="acc-1",
                  to_account_id="acc-2", amount_minor=250, currency="EUR", initiated_by="alice",
                  status=PaymentStatus.FAILED, created_at=dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
                  reason="insufficient funds")
REPLIED = payments_pb2.Payment(payment_id="p-1", from_account_id="acc-1", to_account_id="acc-2", amount_minor=250,
                               currency="EUR", status="FAILED", reason="insufficient funds", initiated_by="alice")


class Handlers:
    """PaymentsHandlers as the servicer calls them: keeps who asked for what, answers with PAYMENT."""

    def __init__(self, *found: Payment) -> None:
        self.found = list(found) or [PAYMENT]
        self.asked: list[tuple[str, Caller, object]] = []

    async def transfer(self, caller: Caller, command: Transfer) -> Payment:
        self.asked.append(("transfer", caller, command))
        return self.found[0]

    async def get_payment(self, caller: Caller, payment_id: str) -> Payment:
        self.asked.append(("get_payment", caller, payment_id))
        return self.found[0]

    async def list_payments(self, caller: Caller, page_size: int = 0, page_token: str = ""
                            ) -> tuple[list[Payment], str]:
        self.asked.append(("list_payments", caller, (page_size, page_token)))
        return self.found, "next-page"


def as_(principal: Principal | None, bearer: str | None, rpc: Awaitable[Any]) -> Any:
    """Run RPC as the interceptor would have admitted it: PRINCIPAL and its BEARER token in the call's context."""
    return admitted(principal, rpc, "/bastion.payments.v1.Payments/Test", bearer=bearer, peer="web")


def test_a_transfer_request_reaches_the_handler_whole_in_the_users_name_and_the_payment_comes_back_whole() -> None:
    handlers = Handlers()
    request = payments_pb2.TransferRequest(from_account_id="acc-1", to_account_id="acc-2", amount_minor=250,
                                           currency="EUR", idempotency_key="key-1")
    reply = as_(ALICE, "access-of-alice", PaymentsServicer(handlers).Transfer(request, None))  # type: ignore[arg-type]
    assert handlers.asked == [("transfer", Caller("alice", "access-of-alice"),
                               Transfer("acc-1", "acc-2", 250, "EUR", "key-1"))]
    assert handlers.asked[0][1].access_token == "access-of-alice", "the token a large transfer is checked with"
    assert reply.payment == REPLIED


def test_a_payment_is_asked_for_by_its_id_and_every_payment_listed_comes_back() -> None:
    other = Payment(**{**PAYMENT.__dict__, "payment_id": "p-2", "status": PaymentStatus.COMPLETED, "reason": ""})
    handlers = Handlers(PAYMENT, other)
    servicer = PaymentsServicer(handlers)  # type: ignore[arg-type]
    found = as_(ALICE, "access-of-alice", servicer.GetPayment(payments_pb2.GetPaymentRequest(payment_id="p-1"),
                                                               None))  # type: ignore[arg-type]
    listed = as_(ALICE, "access-of-alice", servicer.ListPayments(
        payments_pb2.ListPaymentsRequest(page_size=7, page_token="page-2"), None))  # type: ignore[arg-type]
    assert found.payment == REPLIED and [payment.payment_id for payment in listed.payments] == ["p-1", "p-2"]
    assert listed.next_page_token == "next-page"
    assert [(what, caller.username, argument) for what, caller, argument in handlers.asked] == \
        [("get_payment", "alice", "p-1"), ("list_payments", "alice", (7, "page-2"))]


def test_a_caller_without_a_username_is_named_by_its_client() -> None:
    handlers = Handlers()
    as_(NO_USERNAME, "token-of-job", PaymentsServicer(handlers).ListPayments(  # type: ignore[arg-type]
        payments_pb2.ListPaymentsRequest(), None))  # type: ignore[arg-type]
    assert handlers.asked[0][1] == Caller("settlement-job", "token-of-job")


@pytest.mark.parametrize(("principal", "bearer"), [(None, "access-of-alice"), (ALICE, None), (ALICE, ""),
                                                   (None, None)])
def test_a_call_without_both_an_authenticated_principal_and_its_token_is_refused_before_the_handler(
        principal: Principal | None, bearer: str | None) -> None:
    handlers = Handlers()
    servicer = PaymentsServicer(handlers)  # type: ignore[arg-type]
    for rpc in (servicer.ListPayments(payments_pb2.ListPaymentsRequest(), None),  # type: ignore[arg-type]
                servicer.GetPayment(payments_pb2.GetPaymentRequest(payment_id="p-1"), None)):  # type: ignore[arg-type]
        with pytest.raises(UnauthenticatedError):
            as_(principal, bearer, rpc)
    assert handlers.asked == []
