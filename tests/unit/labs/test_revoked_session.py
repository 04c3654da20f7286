"""The revoked-session lab, fed what a running stack would answer: each service reads the session's revocation on
its own, so the small transfer's verdict must wait for payments (where it goes), not for another service."""

import types
from typing import Any

import grpc
import pytest

from bastion.labs import tokens
from bastion.labs.base import Evidence
from tests.unit.labs.fakes import RpcError

ENDED = "invalid token: revoked: the session this token was issued in has ended: sign in again"


class Stack:
    """Accounts reads the sign-out's revocation at once; payments only after KNOWN_AFTER more calls."""

    def __init__(self, known_after: int) -> None:
        self.signed_out = False
        self.known_after = known_after
        self.payments_calls = 0
        self.balance = 0

    def payments_knows(self) -> bool:
        if not self.signed_out:
            return False
        self.payments_calls += 1
        return self.payments_calls > self.known_after


class Bank:
    stack: Stack

    def __init__(self, _session: Any, _lab: str) -> None:
        stack = self.stack

        def list_accounts(_request: Any, metadata: Any, timeout: float) -> Any:
            if stack.signed_out:
                raise RpcError(grpc.StatusCode.UNAUTHENTICATED, ENDED)
            return types.SimpleNamespace(accounts=[])

        def transfer(amount: int, metadata: Any, timeout: float) -> Any:
            if stack.payments_knows():
                raise RpcError(grpc.StatusCode.UNAUTHENTICATED, ENDED)
            if stack.signed_out and amount >= tokens.STEP_UP_AMOUNT:
                raise RpcError(grpc.StatusCode.PERMISSION_DENIED, "this transfer needs an active session")
            stack.balance -= amount
            return types.SimpleNamespace(payment=types.SimpleNamespace(status="COMPLETED"))

        def list_payments(_request: Any, metadata: Any, timeout: float) -> Any:
            if stack.payments_knows():
                raise RpcError(grpc.StatusCode.UNAUTHENTICATED, ENDED)
            return types.SimpleNamespace(payments=[])

        self.accounts = types.SimpleNamespace(ListAccounts=list_accounts)
        self.payments = types.SimpleNamespace(Transfer=transfer, ListPayments=list_payments)

    def open_account(self, _owner: str, amount: int = 0) -> str:
        self.stack.balance += amount
        return "account"

    def transfer_request(self, _source: str, _target: str, amount: int) -> int:
        return amount

    def balance(self, _account: str) -> int:
        return self.stack.balance


class Session:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def user_tokens(self, _user: str) -> dict[str, str]:
        return {"access_token": "a.b.c", "refresh_token": "r"}

    def sign_out(self, _refresh_token: str) -> None:
        self.stack.signed_out = True


def run(monkeypatch: pytest.MonkeyPatch, known_after: int) -> list[Evidence]:
    stack = Stack(known_after)
    monkeypatch.setattr(Bank, "stack", stack, raising=False)
    monkeypatch.setattr(tokens, "Bank", Bank)
    monkeypatch.setattr(tokens.time, "sleep", lambda _seconds: None)
    return list(tokens.revoked_session(Session(stack)))  # type: ignore[arg-type]


@pytest.mark.parametrize("known_after", [0, 1, 3])
def test_the_small_transfer_is_sent_once_payments_refuses_the_session_not_when_accounts_does(
        monkeypatch: pytest.MonkeyPatch, known_after: int) -> None:
    evidence = run(monkeypatch, known_after)
    assert [item.held for item in evidence] == [None, None, True, True, True], [str(e) for e in evidence]
