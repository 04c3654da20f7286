"""The realm import: every client's tokens carry only the scopes and claims the services read (no profile or email
scope a caller could ask for), with the username every service names its principal by, and only declared roles."""

from pathlib import Path
from typing import Any

from bastion.devstack.identities import load_identities
from bastion.devstack.realm import TOKEN_SCOPES, render_realm
from bastion.devstack.secrets import Credentials

FILE = Path(__file__).resolve().parents[2] / "infra" / "keycloak" / "identities.yaml"


def realm() -> dict[str, Any]:
    ids = load_identities(FILE)
    credentials = Credentials(users={u.username: f"pw-{u.username}" for u in ids.users},
                              keycloak_clients={name: f"secret-{name}" for name in ids.service_calls},
                              keycloak_admin={}, kafka={}, postgres={}, redis={})
    return render_realm(ids, credentials)


def test_every_client_gets_the_basic_and_roles_scopes_only() -> None:
    clients = realm()["clients"]
    assert {c["clientId"] for c in clients} == {"accounts", "payments", "notifications", "audit", "bastion-cli"}
    for client in clients:
        assert client["defaultClientScopes"] == list(TOKEN_SCOPES) == ["basic", "roles"], client["clientId"]
        assert client["optionalClientScopes"] == [], client["clientId"]
        assert client["fullScopeAllowed"] is False, client["clientId"]


def test_every_client_puts_the_username_into_access_tokens_only() -> None:
    for client in realm()["clients"]:
        [mapper] = [m for m in client["protocolMappers"] if m["config"].get("claim.name") == "preferred_username"]
        assert mapper["protocolMapper"] == "oidc-usermodel-attribute-mapper"
        assert mapper["config"]["user.attribute"] == "username"
        assert (mapper["config"]["access.token.claim"], mapper["config"]["id.token.claim"]) == ("true", "false")


def test_no_mapper_adds_personal_data() -> None:
    for client in realm()["clients"]:
        claims = {m["config"].get("claim.name") for m in client["protocolMappers"]}
        assert not claims & {"email", "name", "given_name", "family_name", "email_verified"}, client["clientId"]
