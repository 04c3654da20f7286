"""The payments service's Keycloak introspection: a session is active only when Keycloak says so; when Keycloak
cannot be asked, large transfers are refused (fail closed), never let through."""

import asyncio
from typing import Any

import grpc
import pytest
from keycloak.exceptions import KeycloakConnectionError, KeycloakPostError

from bastion.grpc.errors import UnavailableError, status_for
from services.payments.adapters.gateways import KeycloakIntrospection


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


@pytest.mark.parametrize("answer", [{"active": False}, {}, {"active": None}])
def test_a_revoked_or_unknown_session_is_not_active(answer: dict[str, Any]) -> None:
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
