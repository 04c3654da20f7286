"""The payments gRPC servicer: parse the request, call the handler, translate back. Nothing else."""

import grpc

from bastion.grpc.context import current_call
from bastion.grpc.errors import UnauthenticatedError
from bastion.payments.v1 import payments_pb2, payments_pb2_grpc
from services.payments.domain import Payment, Transfer
from services.payments.handlers import Caller, PaymentsHandlers


def _caller() -> Caller:
    call = current_call.get()
    if call.principal is None or not call.bearer:  # the interceptor admits no call without them
        raise UnauthenticatedError("no authenticated caller")
    return Caller(call.principal.username or call.principal.client_id, call.bearer)


def _payment(payment: Payment) -> payments_pb2.Payment:
    return payments_pb2.Payment(
        payment_id=payment.payment_id, from_account_id=payment.from_account_id,
        to_account_id=payment.to_account_id, amount_minor=payment.amount_minor, currency=payment.currency,
        status=payment.status.value, reason=payment.reason, initiated_by=payment.initiated_by)


class PaymentsServicer(payments_pb2_grpc.PaymentsServicer):
    def __init__(self, handlers: PaymentsHandlers) -> None:
        self.handlers = handlers

    async def Transfer(self, request: payments_pb2.TransferRequest, context: grpc.aio.ServicerContext
                       ) -> payments_pb2.TransferResponse:
        payment = await self.handlers.transfer(_caller(), Transfer(
            from_account_id=request.from_account_id, to_account_id=request.to_account_id,
            amount_minor=request.amount_minor, currency=request.currency, idempotency_key=request.idempotency_key))
        return payments_pb2.TransferResponse(payment=_payment(payment))

    async def GetPayment(self, request: payments_pb2.GetPaymentRequest, context: grpc.aio.ServicerContext
                         ) -> payments_pb2.GetPaymentResponse:
        return payments_pb2.GetPaymentResponse(payment=_payment(await self.handlers.get_payment(
            _caller(), request.payment_id)))

    async def ListPayments(self, request: payments_pb2.ListPaymentsRequest, context: grpc.aio.ServicerContext
                           ) -> payments_pb2.ListPaymentsResponse:
        found, next_page = await self.handlers.list_payments(_caller(), request.page_size, request.page_token)
        return payments_pb2.ListPaymentsResponse(payments=[_payment(p) for p in found], next_page_token=next_page)
