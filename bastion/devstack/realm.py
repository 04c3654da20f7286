"""Renders the Keycloak realm import from infra/keycloak/identities.yaml plus the generated secrets.

Every client has `fullScopeAllowed: false`, so a token carries only the roles and audiences declared here:
no `account` audience, no default roles. Audience mappers put into `aud` exactly the services a token is for.
"""

from typing import Any

from bastion.devstack.identities import Identities
from bastion.devstack.secrets import Credentials


def _audience_mapper(service: str) -> dict[str, Any]:
    return {
        "name": f"audience-{service}",
        "protocol": "openid-connect",
        "protocolMapper": "oidc-audience-mapper",
        "consentRequired": False,
        "config": {
            "included.client.audience": service,
            "access.token.claim": "true",
            "id.token.claim": "false",
            "introspection.token.claim": "true",
            "lightweight.claim": "false",
        },
    }


def _no_browser_flows() -> dict[str, Any]:
    return {
        "enabled": True,
        "protocol": "openid-connect",
        "standardFlowEnabled": False,
        "implicitFlowEnabled": False,
        "frontchannelLogout": False,
        "fullScopeAllowed": False,
        "redirectUris": [],
        "webOrigins": [],
        "attributes": {"oauth2.device.authorization.grant.enabled": "false", "oidc.ciba.grant.enabled": "false"},
    }


def render_realm(identities: Identities, credentials: Credentials) -> dict[str, Any]:
    """The realm representation Keycloak imports at its first start."""
    service_clients = [
        {
            **_no_browser_flows(),
            "clientId": name,
            "name": f"{name} service",
            "publicClient": False,
            "clientAuthenticatorType": "client-secret",
            "secret": credentials.keycloak_clients[name],
            "serviceAccountsEnabled": True,
            "directAccessGrantsEnabled": False,
            "protocolMappers": [_audience_mapper(target) for target in calls],
        }
        for name, calls in identities.service_calls.items()
    ]
    cli_client = {
        **_no_browser_flows(),
        "clientId": identities.cli_client,
        "name": "Bastion command line and demo",
        "publicClient": True,
        "serviceAccountsEnabled": False,
        "directAccessGrantsEnabled": True,
        "protocolMappers": [_audience_mapper(target) for target in identities.cli_audiences],
    }
    users = [
        {
            "username": user.username,
            "enabled": True,
            "emailVerified": True,
            "email": user.email,
            "firstName": user.first_name,
            "lastName": user.last_name,
            "credentials": [{"type": "password", "value": credentials.users[user.username], "temporary": False}],
            "realmRoles": list(user.roles),
            "requiredActions": [],
        }
        for user in identities.users
    ]
    return {
        "realm": identities.realm,
        "enabled": True,
        "sslRequired": "all",
        "registrationAllowed": False,
        "resetPasswordAllowed": False,
        "rememberMe": False,
        "loginWithEmailAllowed": False,
        "duplicateEmailsAllowed": False,
        "editUsernameAllowed": False,
        "bruteForceProtected": True,
        "permanentLockout": False,
        "failureFactor": 5,
        "waitIncrementSeconds": 60,
        "maxFailureWaitSeconds": 900,
        "minimumQuickLoginWaitSeconds": 60,
        "quickLoginCheckMilliSeconds": 1000,
        "maxDeltaTimeSeconds": 43200,
        "passwordPolicy": "length(12) and notUsername(undefined)",
        "accessTokenLifespan": identities.access_token_lifespan_seconds,
        "ssoSessionIdleTimeout": 1800,
        "ssoSessionMaxLifespan": 36000,
        "revokeRefreshToken": True,
        "refreshTokenMaxReuse": 0,
        "roles": {"realm": [{"name": name, "description": text} for name, text in identities.roles.items()]},
        "clients": [*service_clients, cli_client],
        # The CLI client may carry every realm role; which ones a token holds depends on the user.
        "scopeMappings": [{"client": identities.cli_client, "roles": list(identities.roles)}],
        "users": users,
    }
