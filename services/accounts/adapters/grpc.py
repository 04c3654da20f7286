"""The accounts gRPC servicer: parse the request, call the handler (in a worker thread: it does database I/O),
translate back. Nothing else."""

import asyncio

import grpc

from bastion.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from bastion.grpc.context import current_call
from bastion.grpc.errors import UnauthenticatedError
from services.accounts.domain import Account
from services.accounts.handlers import AccountsHandlers, Caller


def _caller() -> Caller:
    principal = current_call.get().principal
    if principal is None:  # the interceptor admits no call without one
        raise UnauthenticatedError("no authenticated caller")
    if principal.is_service_account:  # admitted by a `services:` rule of the method policy
        return Caller(principal.client_id, frozenset(), is_service=True)
    return Caller(principal.username or principal.client_id, principal.roles)


def _account(account: Account) -> accounts_pb2.Account:
    return accounts_pb2.Account(account_id=account.account_id, owner=account.owner, currency=account.currency,
                                balance_minor=account.balance_minor, frozen=account.frozen)


class AccountsServicer(accounts_pb2_grpc.AccountsServicer):
    def __init__(self, handlers: AccountsHandlers) -> None:
        self.handlers = handlers

    async def OpenAccount(self, request: accounts_pb2.OpenAccountRequest, context: grpc.aio.ServicerContext
                          ) -> accounts_pb2.OpenAccountResponse:
        account = await asyncio.to_thread(self.handlers.open_account, _caller(), request.currency,
                                          request.notification_email)
        return accounts_pb2.OpenAccountResponse(account=_account(account))

    async def GetAccount(self, request: accounts_pb2.GetAccountRequest, context: grpc.aio.ServicerContext
                         ) -> accounts_pb2.GetAccountResponse:
        account = await asyncio.to_thread(self.handlers.get_account, _caller(), request.account_id)
        return accounts_pb2.GetAccountResponse(account=_account(account))

    async def ListAccounts(self, request: accounts_pb2.ListAccountsRequest, context: grpc.aio.ServicerContext
                           ) -> accounts_pb2.ListAccountsResponse:
        found, next_page = await asyncio.to_thread(self.handlers.list_accounts, _caller(), request.page_size,
                                                   request.page_token)
        return accounts_pb2.ListAccountsResponse(accounts=[_account(a) for a in found], next_page_token=next_page)

    async def Deposit(self, request: accounts_pb2.DepositRequest, context: grpc.aio.ServicerContext
                      ) -> accounts_pb2.DepositResponse:
        account = await asyncio.to_thread(self.handlers.deposit, _caller(), request.account_id, request.amount_minor,
                                          request.idempotency_key)
        return accounts_pb2.DepositResponse(account=_account(account))

    async def FreezeAccount(self, request: accounts_pb2.FreezeAccountRequest, context: grpc.aio.ServicerContext
                            ) -> accounts_pb2.FreezeAccountResponse:
        account = await asyncio.to_thread(self.handlers.freeze_account, _caller(), request.account_id,
                                          request.reason)
        return accounts_pb2.FreezeAccountResponse(account=_account(account))

    async def ApplyTransfer(self, request: accounts_pb2.ApplyTransferRequest, context: grpc.aio.ServicerContext
                            ) -> accounts_pb2.ApplyTransferResponse:
        debited, credited = await asyncio.to_thread(
            self.handlers.apply_transfer, request.transfer_id, request.from_account_id, request.to_account_id,
            request.amount_minor, request.currency, request.fencing_token, request.idempotency_key)
        return accounts_pb2.ApplyTransferResponse(transfer_id=request.transfer_id,
                                                  from_balance_minor=debited.balance_minor,
                                                  to_balance_minor=credited.balance_minor)
