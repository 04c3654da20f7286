"""Keycloak: HTTPS only, realm `bastion` with the contract's roles, users, clients and audiences."""

import json
import ssl
import urllib.request
from typing import Any

import jwt
import pytest
from keycloak import KeycloakAuthenticationError, KeycloakOpenID, KeycloakPostError

from bastion.devstack.components.keycloak import Keycloak
from bastion.devstack.context import StackContext

SERVICES = {"accounts", "payments", "notifications", "audit"}
USER_ROLES = {"alice": "customer", "bob": "customer", "tina": "teller", "sam": "support", "ada": "auditor"}


def openid(keycloak: Keycloak, ctx: StackContext, client_id: str, secret: str | None = None) -> KeycloakOpenID:
    return KeycloakOpenID(
        server_url=f"https://{ctx.settings.public_host}:{ctx.settings.keycloak_port}/",
        realm_name="bastion", client_id=client_id, client_secret_key=secret, verify=str(ctx.ca_file),
    )


def verified_claims(keycloak: Keycloak, ctx: StackContext, token: str, audience: str | None) -> dict[str, Any]:
    """Check the signature against the realm's JWKS, the issuer, the audience and the expiry."""
    context = ssl.create_default_context(cafile=str(ctx.ca_file))
    jwks_url = f"{keycloak.issuer}/protocol/openid-connect/certs"
    client = jwt.PyJWKClient(jwks_url, ssl_context=context)
    key = client.get_signing_key_from_jwt(token)
    options = {"verify_aud": audience is not None, "require": ["exp", "iat", "iss"]}
    claims: dict[str, Any] = jwt.decode(
        token, key, algorithms=["RS256"], issuer=keycloak.issuer, audience=audience, options=options  # type: ignore[arg-type]
    )
    return claims


def audiences(claims: dict[str, Any]) -> set[str]:
    aud = claims.get("aud", [])
    return {aud} if isinstance(aud, str) else set(aud)


def test_discovery_names_the_contract_issuer(keycloak: Keycloak, ctx: StackContext) -> None:
    context = ssl.create_default_context(cafile=str(ctx.ca_file))
    url = f"{keycloak.issuer}/.well-known/openid-configuration"
    with urllib.request.urlopen(url, context=context, timeout=10) as response:  # noqa: S310
        document = json.load(response)
    assert document["issuer"] == f"https://localhost:{ctx.settings.keycloak_port}/realms/bastion"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_each_service_gets_a_client_credentials_token(keycloak: Keycloak, ctx: StackContext, service: str) -> None:
    token = openid(keycloak, ctx, service, ctx.credentials.keycloak_clients[service]).token(
        grant_type="client_credentials"
    )
    claims = verified_claims(keycloak, ctx, token["access_token"], None)
    assert claims["azp"] == service
    assert claims["typ"] == "Bearer"
    assert claims["exp"] - claims["iat"] <= 300


def test_service_token_names_only_the_services_it_calls(keycloak: Keycloak, ctx: StackContext) -> None:
    token = openid(keycloak, ctx, "payments", ctx.credentials.keycloak_clients["payments"]).token(
        grant_type="client_credentials"
    )
    claims = verified_claims(keycloak, ctx, token["access_token"], "accounts")
    assert audiences(claims) == {"accounts"}
    with pytest.raises(jwt.InvalidAudienceError):
        verified_claims(keycloak, ctx, token["access_token"], "audit")


@pytest.mark.parametrize("user", sorted(USER_ROLES))
def test_demo_user_password_grant_carries_roles_and_audiences(keycloak: Keycloak, ctx: StackContext, user: str) -> None:
    token = openid(keycloak, ctx, "bastion-cli").token(user, ctx.credentials.users[user])
    claims = verified_claims(keycloak, ctx, token["access_token"], "payments")
    assert claims["preferred_username"] == user
    assert claims["realm_access"]["roles"] == [USER_ROLES[user]]
    assert audiences(claims) == SERVICES
    assert claims["exp"] - claims["iat"] <= 300


# What an access token may carry: the JOSE/OIDC bookkeeping, the principal (`sub`, `preferred_username`, `azp`,
# `realm_access`) and the audiences. Nothing personal beyond the username (bastion/devstack/realm.py).
TOKEN_CLAIMS = {"exp", "iat", "jti", "iss", "aud", "sub", "typ", "azp", "sid", "scope", "realm_access",
                "preferred_username"}
# Keycloak adds its `service_account` scope to clients with a service account: the client and its caller's address.
SERVICE_TOKEN_CLAIMS = TOKEN_CLAIMS | {"client_id", "clientHost", "clientAddress"}
PERSONAL_CLAIMS = {"email", "email_verified", "name", "given_name", "family_name", "address", "phone_number"}


def test_a_user_token_carries_no_personal_data(keycloak: Keycloak, ctx: StackContext) -> None:
    token = openid(keycloak, ctx, "bastion-cli").token("alice", ctx.credentials.users["alice"])
    claims = verified_claims(keycloak, ctx, token["access_token"], "accounts")
    assert set(claims) <= TOKEN_CLAIMS, f"unexpected claims: {sorted(set(claims) - TOKEN_CLAIMS)}"
    assert not set(claims) & PERSONAL_CLAIMS
    assert claims["preferred_username"] == "alice"


def test_asking_for_the_profile_or_email_scope_is_refused(keycloak: Keycloak, ctx: StackContext) -> None:
    with pytest.raises(KeycloakPostError) as refused:
        openid(keycloak, ctx, "bastion-cli").token("alice", ctx.credentials.users["alice"],
                                                   scope="openid profile email")
    assert refused.value.response_code == 400
    assert b"invalid_scope" in refused.value.error_message


def test_a_service_token_names_its_service_account(keycloak: Keycloak, ctx: StackContext) -> None:
    token = openid(keycloak, ctx, "payments", ctx.credentials.keycloak_clients["payments"]).token(
        grant_type="client_credentials"
    )
    claims = verified_claims(keycloak, ctx, token["access_token"], "accounts")
    assert set(claims) <= SERVICE_TOKEN_CLAIMS, f"unexpected claims: {sorted(set(claims) - SERVICE_TOKEN_CLAIMS)}"
    assert claims["preferred_username"] == "service-account-payments"


def test_a_replayed_refresh_token_is_refused_and_ends_the_session(keycloak: Keycloak, ctx: StackContext) -> None:
    """Refresh tokens rotate and each works once. A stolen copy replayed after its owner used it gets nothing,
    and Keycloak then ends the client's session: the owner's newer refresh token is refused too."""
    cli = openid(keycloak, ctx, "bastion-cli")
    first = cli.token("bob", ctx.credentials.users["bob"])
    second = cli.refresh_token(first["refresh_token"])
    assert second["refresh_token"] != first["refresh_token"]
    assert verified_claims(keycloak, ctx, second["access_token"], "accounts")["preferred_username"] == "bob"
    for replayed in (first["refresh_token"], second["refresh_token"]):
        with pytest.raises(KeycloakPostError) as refused:
            cli.refresh_token(replayed)
        assert refused.value.response_code == 400 and b"invalid_grant" in refused.value.error_message


def test_wrong_client_secret_fails(keycloak: Keycloak, ctx: StackContext) -> None:
    with pytest.raises(KeycloakAuthenticationError) as refused:
        openid(keycloak, ctx, "accounts", "not-the-secret").token(grant_type="client_credentials")
    assert refused.value.response_code == 401


def test_wrong_user_password_fails(keycloak: Keycloak, ctx: StackContext) -> None:
    with pytest.raises(KeycloakAuthenticationError) as refused:
        openid(keycloak, ctx, "bastion-cli").token("sam", "not-the-password-of-sam")
    assert b"invalid_grant" in refused.value.error_message


def test_service_client_cannot_use_the_password_grant(keycloak: Keycloak, ctx: StackContext) -> None:
    client = openid(keycloak, ctx, "accounts", ctx.credentials.keycloak_clients["accounts"])
    with pytest.raises(Exception, match="unauthorized_client"):
        client.token("alice", ctx.credentials.users["alice"])


def test_plain_http_is_not_served(ctx: StackContext) -> None:
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://localhost:{ctx.settings.keycloak_port}/realms/bastion", timeout=5)
