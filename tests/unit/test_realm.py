"""The realm import: every client's tokens carry only the scopes and claims the services read (no profile or email
scope a caller could ask for), with the username every service names its principal by, and only declared roles."""

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from bastion.devstack.errors import DevstackError
from bastion.devstack.identities import Identities, load_identities, parse_identities
from bastion.devstack.realm import TOKEN_SCOPES, render_realm
from bastion.devstack.secrets import Credentials
from bastion.revocations.triggers import load_triggers
from tests.unit.conftest import SERVICES

FILE = Path(__file__).resolve().parents[2] / "infra" / "keycloak" / "identities.yaml"


def credentials(ids: Identities) -> Credentials:
    return Credentials(users={u.username: f"pw-{u.username}" for u in ids.users},
                       keycloak_clients={name: f"secret-{name}" for name in ids.service_calls},
                       keycloak_admin={}, kafka={}, postgres={}, redis={})


def realm() -> dict[str, Any]:
    ids = load_identities(FILE)
    return render_realm(ids, credentials(ids))


def test_every_client_gets_the_basic_and_roles_scopes_only() -> None:
    clients = realm()["clients"]
    assert {c["clientId"] for c in clients} == {*SERVICES, "bastion-cli"}
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


def clients_by_id() -> dict[str, dict[str, Any]]:
    return {client["clientId"]: client for client in realm()["clients"]}


def audiences(client: dict[str, Any]) -> list[str]:
    return [m["config"]["included.client.audience"] for m in client["protocolMappers"]
            if m["protocolMapper"] == "oidc-audience-mapper"]


def test_a_token_s_audience_is_exactly_the_services_its_client_calls() -> None:
    ids = load_identities(FILE)
    clients = clients_by_id()
    for name, calls in ids.service_calls.items():
        assert audiences(clients[name]) == list(calls), name
    assert audiences(clients[ids.cli_client]) == list(ids.cli_audiences)
    narrower = dataclasses.replace(ids, cli_audiences=("accounts",))
    [cli] = [c for c in render_realm(narrower, credentials(ids))["clients"] if c["clientId"] == ids.cli_client]
    assert audiences(cli) == ["accounts"]
    for client in clients.values():
        for mapper in client["protocolMappers"]:
            if mapper["protocolMapper"] == "oidc-audience-mapper":
                assert (mapper["config"]["access.token.claim"], mapper["config"]["id.token.claim"]) == ("true", "false")


def test_no_client_has_a_browser_flow_a_redirect_or_a_device_grant() -> None:
    for client in realm()["clients"]:
        assert (client["standardFlowEnabled"], client["implicitFlowEnabled"]) == (False, False), client["clientId"]
        assert (client["redirectUris"], client["webOrigins"]) == ([], []), client["clientId"]
        assert client["attributes"] == {"oauth2.device.authorization.grant.enabled": "false",
                                        "oidc.ciba.grant.enabled": "false"}, client["clientId"]


def test_service_clients_are_confidential_with_their_own_secret_and_no_password_grant() -> None:
    ids = load_identities(FILE)
    clients = clients_by_id()
    for name in ids.service_calls:
        client = clients[name]
        assert (client["publicClient"], client["clientAuthenticatorType"], client["secret"]) == (
            False, "client-secret", f"secret-{name}")
        assert (client["serviceAccountsEnabled"], client["directAccessGrantsEnabled"]) == (True, False), name
    cli = clients[ids.cli_client]
    assert (cli["publicClient"], cli["serviceAccountsEnabled"], cli["directAccessGrantsEnabled"]) == (True, False, True)


def test_users_hold_exactly_their_declared_roles_and_a_password_they_keep() -> None:
    ids = load_identities(FILE)
    users = {user["username"]: user for user in realm()["users"] if "serviceAccountClientId" not in user}
    assert set(users) == set(ids.user_names)
    for declared in ids.users:
        user = users[declared.username]
        assert user["realmRoles"] == list(declared.roles), declared.username
        assert user["credentials"] == [{"type": "password", "value": f"pw-{declared.username}", "temporary": False}]
        assert (user["enabled"], user["requiredActions"]) == (True, [])
    assert realm()["scopeMappings"] == [{"client": ids.cli_client, "roles": list(ids.roles)}]
    assert [role["name"] for role in realm()["roles"]["realm"]] == list(ids.roles)


def test_the_realm_requires_tls_locks_out_guessing_and_keeps_tokens_and_sessions_short() -> None:
    rendered = realm()
    assert {key: rendered[key] for key in (
        "sslRequired", "registrationAllowed", "resetPasswordAllowed", "loginWithEmailAllowed", "duplicateEmailsAllowed",
        "editUsernameAllowed", "bruteForceProtected", "permanentLockout", "failureFactor", "passwordPolicy",
        "accessTokenLifespan", "ssoSessionIdleTimeout", "ssoSessionMaxLifespan", "revokeRefreshToken",
        "refreshTokenMaxReuse", "rememberMe")} == {
        "sslRequired": "all", "registrationAllowed": False, "resetPasswordAllowed": False,
        "loginWithEmailAllowed": False, "duplicateEmailsAllowed": False,
        "editUsernameAllowed": False,  # the username is the principal every service and the audit log name
        "bruteForceProtected": True, "permanentLockout": False, "failureFactor": 5,
        "passwordPolicy": "length(12) and notUsername(undefined)",
        "accessTokenLifespan": load_identities(FILE).access_token_lifespan_seconds,
        "ssoSessionIdleTimeout": 1800, "ssoSessionMaxLifespan": 36000, "revokeRefreshToken": True,
        "refreshTokenMaxReuse": 0, "rememberMe": False}


def test_the_username_reaches_no_token_but_the_access_token() -> None:
    for client in realm()["clients"]:
        [mapper] = [m for m in client["protocolMappers"] if m["name"] == "username"]
        assert mapper["config"]["userinfo.token.claim"] == "false", client["clientId"]


def test_only_the_audit_service_account_may_read_the_realms_admin_events_and_nothing_more() -> None:
    rendered = realm()
    accounts = {user["serviceAccountClientId"]: user for user in rendered["users"] if "serviceAccountClientId" in user}
    assert {name: user["clientRoles"] for name, user in accounts.items()} == {
        "audit": {"realm-management": ["view-events"]}}
    assert all("credentials" not in user and "realmRoles" not in user for user in accounts.values())
    assert rendered["clientScopeMappings"] == {"realm-management": [{"client": "audit", "roles": ["view-events"]}]}
    assert (rendered["adminEventsEnabled"], rendered["adminEventsDetailsEnabled"]) == (True, False)


def test_the_realm_records_exactly_the_user_events_the_revocation_triggers_read() -> None:
    triggers = load_triggers(FILE.parents[1] / "revocation-triggers.yaml")
    rendered = realm()
    assert rendered["eventsEnabled"] is True
    assert sorted(rendered["enabledEventTypes"]) == triggers.user_event_types == ["LOGOUT", "REFRESH_TOKEN_ERROR"]


def test_a_service_may_not_be_granted_a_role_that_changes_the_realm() -> None:
    raw = yaml.safe_load(FILE.read_text())
    raw["service_clients"]["payments"]["realm_management"] = ["view-events", "manage-users"]
    with pytest.raises(DevstackError, match="client payments: realm_management role 'manage-users'"):
        parse_identities(raw)
