"""The payments service's outward adapters: accounts over gRPC (through the client kit), Keycloak's online
token introspection, and fenced Redis locks."""

import asyncio
from contextlib import AbstractAsyncContextManager

import redis.asyncio as aioredis
from keycloak import KeycloakOpenID

from bastion.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from bastion.grpc.client import Downstream
from bastion.grpc.errors import UnavailableError
from bastion.resilience.locks import FencedLock
from services.payments.handlers import LockFactory


class GrpcAccounts:
    """accounts.v1.Accounts as the payments service identity (mTLS certificate and service token)."""

    def __init__(self, downstream: Downstream) -> None:
        self.downstream = downstream
        self.stub = accounts_pb2_grpc.AccountsStub(downstream.channel)  # type: ignore[no-untyped-call]

    async def owner_of(self, account_id: str) -> str:
        reply = await self.downstream.call(self.stub.GetAccount, accounts_pb2.GetAccountRequest(account_id=account_id))
        return str(reply.account.owner)

    async def apply_transfer(self, transfer_id: str, from_account_id: str, to_account_id: str, amount_minor: int,
                             currency: str, fencing_token: int, idempotency_key: str) -> None:
        await self.downstream.call(self.stub.ApplyTransfer, accounts_pb2.ApplyTransferRequest(
            transfer_id=transfer_id, from_account_id=from_account_id, to_account_id=to_account_id,
            amount_minor=amount_minor, currency=currency, fencing_token=fencing_token,
            idempotency_key=idempotency_key))


class KeycloakIntrospection:
    """Asks Keycloak whether the user's session is still active (a revoked one is refused at once)."""

    def __init__(self, client: KeycloakOpenID) -> None:
        self.client = client

    async def introspect(self, token: str) -> bool:
        try:
            answer = await asyncio.to_thread(self.client.introspect, token)
        except Exception as error:  # any failure to ask means we cannot know: refuse (fail closed)
            raise UnavailableError("token introspection unavailable: large transfers are refused") from error
        # Only JSON true is active (RFC 7662): a string "false", a 1 or an answer of another shape is not.
        return isinstance(answer, dict) and answer.get("active") is True


def redis_locks(client: aioredis.Redis, ttl_seconds: float = 10.0) -> LockFactory:
    """A LockFactory: the fenced lock of a resource, in the payments service's Redis key space."""

    def lock(resource: str) -> AbstractAsyncContextManager[int]:
        return FencedLock(client, "payments", resource, ttl_seconds=ttl_seconds)

    return lock
