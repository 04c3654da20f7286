"""The removed-role lab, fed what a running stack would answer: it holds only when the token issued before the role
was taken away is refused as revoked; an answer, another refusal or a Keycloak that cannot make the scene is not."""

import types
from typing import Any

import grpc
import pytest

from bastion.labs import tokens
from bastion.labs.base import Evidence
from bastion.labs.platform import Answer, LabSetupError
from tests.unit.labs.fakes import RpcError
from tests.unit.test_event_verification import INFRA, SERVICES

REVOKED = "invalid token: revoked: access was revoked after this token was issued: sign in again"


class Admin:
    """KeycloakAdmin as the lab uses it: remembers what was done to the realm."""

    def __init__(self, failing: str = "") -> None:
        self.done: list[str] = []
        self.failing = failing

    def _do(self, what: str) -> None:
        if what == self.failing:
            raise RuntimeError(f"{what} refused")
        self.done.append(what)

    def create_user(self, _user: dict[str, Any]) -> str:
        self._do("create")
        return "user-1"

    def get_realm_role(self, name: str) -> dict[str, str]:
        return {"name": name}

    def assign_realm_roles(self, _user_id: str, _roles: list[Any]) -> None:
        self._do("assign")

    def delete_realm_roles_of_user(self, _user_id: str, _roles: list[Any]) -> None:
        self._do("take-away")

    def delete_user(self, _user_id: str) -> None:
        self._do("delete")


class Accounts:
    """The accounts stub: serves until the role is taken away, then answers AFTER (None: still serves)."""

    def __init__(self, admin: Admin, after: RpcError | None) -> None:
        self.admin, self.after = admin, after
        self.calls = 0

    def ListAccounts(self, _request: Any, metadata: Any, timeout: float) -> Any:
        self.calls += 1
        if "take-away" in self.admin.done and self.after is not None:
            raise self.after
        return types.SimpleNamespace(accounts=[])


class Session:
    def __init__(self) -> None:
        self.ctx = types.SimpleNamespace(
            settings=types.SimpleNamespace(public_host="localhost", keycloak_port=1, infra_dir=INFRA),
            service_names=sorted(SERVICES),
            credentials=types.SimpleNamespace(keycloak_admin={"admin": "pw"}), ca_file="ca.pem")

    def channel(self, _service: str) -> None:
        return None

    def keycloak(self, _client: str) -> Any:
        return types.SimpleNamespace(token=lambda _user, _password: {"access_token": "a.b.c"})

    def watch(self) -> Any:
        return types.SimpleNamespace(log_lines=lambda *a, **k: ["call_refused ... revoked"],
                                     audit_entries=lambda *a, **k: [])


def run(monkeypatch: pytest.MonkeyPatch, admin: Admin, after: RpcError | None) -> tuple[list[Evidence], Accounts]:
    accounts = Accounts(admin, after)
    monkeypatch.setattr(tokens, "KeycloakAdmin", lambda **_k: admin)
    monkeypatch.setattr(tokens.accounts_pb2_grpc, "AccountsStub", lambda _channel: accounts)
    monkeypatch.setattr(tokens.time, "sleep", lambda _seconds: None)
    monkeypatch.setattr(tokens, "REVOKED_WITHIN", 0.05)
    return list(tokens.removed_role(Session())), accounts  # type: ignore[arg-type]


def verdicts(evidence: list[Evidence]) -> list[bool | None]:
    return [item.held for item in evidence]


def test_it_holds_when_the_old_token_is_refused_as_revoked_and_the_lab_user_is_removed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    admin = Admin()
    evidence, _ = run(monkeypatch, admin, RpcError(grpc.StatusCode.UNAUTHENTICATED, REVOKED))
    assert verdicts(evidence) == [None, None, True, None]
    assert admin.done == ["create", "assign", "take-away", "delete"]


@pytest.mark.parametrize("after", [
    None,  # the removed role still counts
    RpcError(grpc.StatusCode.PERMISSION_DENIED, "method not allowed"),  # another check
    RpcError(grpc.StatusCode.UNAUTHENTICATED, "invalid token: expired: the token has expired"),
    RpcError(grpc.StatusCode.UNAVAILABLE, "token revocations unavailable: request refused"),
])
def test_it_does_not_hold_on_an_answer_or_another_refusal(monkeypatch: pytest.MonkeyPatch,
                                                          after: RpcError | None) -> None:
    admin = Admin()
    evidence, accounts = run(monkeypatch, admin, after)
    assert verdicts(evidence)[2] is False
    assert accounts.calls >= 2 and admin.done[-1] == "delete"


@pytest.mark.parametrize("failing", ["create", "assign", "take-away"])
def test_a_keycloak_that_cannot_set_the_scene_stops_the_lab_as_not_run(monkeypatch: pytest.MonkeyPatch,
                                                                        failing: str) -> None:
    admin = Admin(failing)
    with pytest.raises(LabSetupError):
        run(monkeypatch, admin, None)
    if failing == "take-away":
        assert admin.done[-1] == "delete"  # the lab's user is removed all the same


def test_revoked_session_holds_on_the_introspections_refusal_or_the_sessions_revocation_only() -> None:
    denied, unauthenticated = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED
    ended = "invalid token: revoked: the session this token was issued in has ended: sign in again"
    inactive = "a transfer above 1000.00 needs an active session: sign in again"
    assert tokens._session_refusal(Answer(denied, inactive), denied) is True
    assert tokens._session_refusal(Answer(unauthenticated, ended), denied) is True
    assert tokens._session_refusal(Answer(unauthenticated, ended), unauthenticated) is True
    # the small transfer must meet the revocation, not introspection (which it never asks)
    assert tokens._session_refusal(Answer(denied, inactive), unauthenticated) is False
    assert tokens._session_refusal(Answer(unauthenticated, REVOKED), unauthenticated) is False  # another revocation
    assert tokens._session_refusal(Answer(unauthenticated, "invalid token: expired"), denied) is False
    assert tokens._session_refusal(Answer(denied, "method not allowed"), denied) is False
    assert tokens._session_refusal(Answer(grpc.StatusCode.OK), denied) is False
