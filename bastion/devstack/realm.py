"""Renders the Keycloak realm import from infra/keycloak/identities.yaml plus the generated secrets.

Every client has `fullScopeAllowed: false`, so a token carries only the roles and audiences declared here:
no `account` audience, no default roles. Audience mappers put into `aud` exactly the services a token is for.

Tokens carry only what the services read (docs/decisions.md, "Access tokens carry only what the services
read"): the `basic` scope (`sub`), the `roles` scope (`realm_access`), and the username as `preferred_username`.
No profile or email scope: a user's name and email address are not sent to every service on every call, and
the token stays small (gRPC sends custom metadata in full with each call; it never enters HPACK's table).
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


# The user events the realm records: those infra/revocation-triggers.yaml turns into revocations (a unit test holds
# the two together).
REVOCATION_USER_EVENTS = ("LOGOUT", "REFRESH_TOKEN_ERROR")

# The client scopes every client's tokens get; none are optional, so a caller cannot ask for more.
TOKEN_SCOPES = ("basic", "roles")


def _username_mapper() -> dict[str, Any]:
    """`preferred_username` in access tokens only: the principal's name in the services and the audit."""
    return {
        "name": "username",
        "protocol": "openid-connect",
        "protocolMapper": "oidc-usermodel-attribute-mapper",
        "consentRequired": False,
        "config": {
            "user.attribute": "username",
            "claim.name": "preferred_username",
            "jsonType.label": "String",
            "access.token.claim": "true",
            "id.token.claim": "false",
            "userinfo.token.claim": "false",
            "introspection.token.claim": "true",
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
        "defaultClientScopes": list(TOKEN_SCOPES),
        "optionalClientScopes": [],
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
            "protocolMappers": [_username_mapper(), *(_audience_mapper(target) for target in calls)],
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
        "protocolMappers": [_username_mapper(), *(_audience_mapper(t) for t in identities.cli_audiences)],
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
    service_accounts = [
        {
            "username": f"service-account-{name}",
            "enabled": True,
            "serviceAccountClientId": name,
            "clientRoles": {"realm-management": list(roles)},
        }
        for name, roles in identities.realm_management.items()
    ]
    # With fullScopeAllowed off, a role reaches a client's tokens only through a scope mapping.
    realm_management_scopes = [{"client": name, "roles": list(roles)}
                               for name, roles in identities.realm_management.items()]
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
        # Admin events, and the user events of REVOCATION_USER_EVENTS, are what the audit service turns into token
        # revocations (infra/revocation-triggers.yaml); kept a day, far longer than any token they revoke lives. No
        # representations: just what changed. No other user event is recorded (no log of every sign-in).
        "adminEventsEnabled": True,
        "adminEventsDetailsEnabled": False,
        "attributes": {"adminEventsExpiration": "86400"},
        "eventsEnabled": True,
        "enabledEventTypes": list(REVOCATION_USER_EVENTS),
        "eventsExpiration": 86400,
        "refreshTokenMaxReuse": 0,
        "roles": {"realm": [{"name": name, "description": text} for name, text in identities.roles.items()]},
        "clients": [*service_clients, cli_client],
        # The CLI client may carry every realm role; which ones a token holds depends on the user.
        "scopeMappings": [{"client": identities.cli_client, "roles": list(identities.roles)}],
        "users": [*users, *service_accounts],
        "clientScopeMappings": {"realm-management": realm_management_scopes} if realm_management_scopes else {},
    }
