"""The payments service's gateways: Keycloak introspection (a session is active only when Keycloak says so; when
Keycloak cannot be asked, large transfers are refused: fail closed, never let through), accounts through the client
kit, and its fenced locks."""

import asyncio
import threading
from typing import Any

import grpc
import pytest
from keycloak.exceptions import KeycloakConnectionError, KeycloakPostError

from bastion.accounts.v1 import accounts_pb2
from bastion.grpc.errors import UnavailableError, status_for
from bastion.resilience.locks import FencedLock
from services.payments.adapters.gateways import GrpcAccounts, KeycloakIntrospection, redis_locks


class Keycloak:
    """A KeycloakOpenID stand-in: answers introspection with ANSWER, or raises ERROR."""

    def __init__(self, answer: dict[str, Any] | None = None, error: Exception | None = None) -> None:
        self.answer, self.error = answer, error
        self.asked: list[str] = []

    def introspect(self, token: str) -> dict[str, Any]:
        self.asked.append(token)
        if self.error is not None:
            raise self.error
        return self.answer or {}


TOKEN = "a-token"  # a stand-in the fake Keycloak only records


def introspect(keycloak: Keycloak) -> bool:
    return asyncio.run(KeycloakIntrospection(keycloak).introspect(TOKEN))  # type: ignore[arg-type]


def test_an_active_session_is_active() -> None:
    keycloak = Keycloak({"active": True, "sub": "alice"})
    assert introspect(keycloak) is True
    assert keycloak.asked == [TOKEN]


@pytest.mark.parametrize("answer", [{"active": False}, {}, {"active": None}, {"active": "false"}, {"active": "true"},
                                    {"active": 1}, ["active"], "active"])
def test_a_revoked_or_unknown_session_or_an_answer_of_another_shape_is_not_active(answer: Any) -> None:
    assert introspect(Keycloak(answer)) is False


@pytest.mark.parametrize("error", [
    KeycloakConnectionError("Can't connect to server"),
    KeycloakPostError("500: internal server error", response_code=500),
    TimeoutError("read timed out"),
    ValueError("the answer is not JSON"),
])
def test_keycloak_out_of_reach_refuses_instead_of_allowing(error: Exception) -> None:
    with pytest.raises(UnavailableError) as refused:
        introspect(Keycloak(error=error))
    code, message = status_for(refused.value, "corr-1")
    assert code == grpc.StatusCode.UNAVAILABLE
    assert message == "token introspection unavailable: large transfers are refused"


def test_keycloak_is_asked_off_the_event_loop() -> None:
    """Introspection is a blocking HTTP call: on the loop's thread it would stall every other call meanwhile."""
    threads: list[str] = []

    class Blocking(Keycloak):
        def introspect(self, token: str) -> dict[str, Any]:
            threads.append(threading.current_thread().name)
            return {"active": True}

    async def ask() -> tuple[bool, str]:
        return await KeycloakIntrospection(Blocking()).introspect(TOKEN), threading.current_thread().name  # type: ignore[arg-type]

    active, loop_thread = asyncio.run(ask())
    assert active is True and threads and threads[0] != loop_thread


# accounts.v1.Accounts as payments calls it: through the client kit (Downstream.call), one stub method a call.

class Channel:
    """A gRPC channel as the generated stub uses it: each stub method is its path here."""

    def unary_unary(self, path: str, **_options: object) -> str:
        return path


class Downstream:
    """The client kit's Downstream: keeps each call (the stub method's path, the request) and answers REPLY."""

    channel = Channel()

    def __init__(self, reply: object = None) -> None:
        self.reply = reply
        self.calls: list[tuple[str, object]] = []

    async def call(self, method: str, request: object) -> object:
        self.calls.append((method, request))
        return self.reply


def test_the_owner_of_an_account_is_what_accounts_says_of_that_account() -> None:
    downstream = Downstream(accounts_pb2.GetAccountResponse(account=accounts_pb2.Account(account_id="acc-1",
                                                                                        owner="alice")))
    owner = asyncio.run(GrpcAccounts(downstream).owner_of("acc-1"))  # type: ignore[arg-type]
    assert owner == "alice"
    assert downstream.calls == [("/bastion.accounts.v1.Accounts/GetAccount",
                                 accounts_pb2.GetAccountRequest(account_id="acc-1"))]


def test_a_transfer_is_applied_with_every_field_of_the_payment_and_its_fencing_token() -> None:
    downstream = Downstream(accounts_pb2.ApplyTransferResponse())
    asyncio.run(GrpcAccounts(downstream).apply_transfer(  # type: ignore[arg-type]
        "p-1", "acc-1", "acc-2", 250, "EUR", 17, "key-1"))
    assert downstream.calls == [("/bastion.accounts.v1.Accounts/ApplyTransfer", accounts_pb2.ApplyTransferRequest(
        transfer_id="p-1", from_account_id="acc-1", to_account_id="acc-2", amount_minor=250, currency="EUR",
        fencing_token=17, idempotency_key="key-1"))]


class Redis:
    """The one call FencedLock makes when it is made: `lock(name, timeout=...)`."""

    def __init__(self) -> None:
        self.locks: list[tuple[str, object]] = []

    def lock(self, name: str, **options: object) -> object:
        self.locks.append((name, options["timeout"]))
        return object()


def test_a_payments_lock_lives_in_the_payments_key_space_with_a_ten_second_lease() -> None:
    redis = Redis()
    locks = redis_locks(redis)  # type: ignore[arg-type]
    first = locks("acc-1")
    assert isinstance(first, FencedLock) and first.fence_key == "payments:fence:acc-1"
    redis_locks(redis, ttl_seconds=3.0)("acc-2")  # type: ignore[arg-type]
    assert redis.locks == [("payments:lock:acc-1", 10.0), ("payments:lock:acc-2", 3.0)]
