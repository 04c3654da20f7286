"""Brings a realm imported by an earlier release up to what the services rely on now.

Keycloak imports the realm only when it does not exist (`--import-realm` skips an existing one), so an install set
up before token revocation has a realm that records no events and an audit service account that may not read them:
the audit service's watch would fail until `bastion reset`, which deletes every datum of the install. Instead, each
`bastion up` (the Keycloak component's bootstrap) applies, as the Keycloak admin, the settings the rendered realm
(`bastion/devstack/realm.py`) has and the running one lacks: the event settings, and the realm-management roles of
`realm_management` in infra/keycloak/identities.yaml with the scope mappings that let them into the tokens. It only
adds what is missing: it never takes a role away or turns recording off (a realm that records Keycloak's default
event types, an empty list, is given the list of those types and the ones revocation needs).
"""

from typing import Any

from bastion.devstack.identities import Identities
from bastion.revocations.triggers import SAVED_BY_DEFAULT

EVENT_SETTINGS = ("adminEventsEnabled", "adminEventsDetailsEnabled", "eventsEnabled", "eventsExpiration")
REALM_MANAGEMENT = "realm-management"
# The user event types Keycloak records when a realm with events on names none (`EventType.isSaveByDefault`, 26.4):
# the sign-ins and their failures among them, which an operator who turned events on meant to keep.
KEYCLOAK_SAVED_BY_DEFAULT = frozenset({
    "LOGIN", "LOGIN_ERROR", "REGISTER", "REGISTER_ERROR", "LOGOUT", "LOGOUT_ERROR", "CODE_TO_TOKEN",
    "CODE_TO_TOKEN_ERROR", "CLIENT_LOGIN", "CLIENT_LOGIN_ERROR", "FEDERATED_IDENTITY_LINK",
    "FEDERATED_IDENTITY_LINK_ERROR", "REMOVE_FEDERATED_IDENTITY", "REMOVE_FEDERATED_IDENTITY_ERROR", "UPDATE_EMAIL",
    "UPDATE_EMAIL_ERROR", "UPDATE_PROFILE", "UPDATE_PROFILE_ERROR", "UPDATE_PASSWORD", "UPDATE_PASSWORD_ERROR",
    "UPDATE_TOTP", "UPDATE_TOTP_ERROR", "VERIFY_EMAIL", "VERIFY_EMAIL_ERROR", "VERIFY_PROFILE", "VERIFY_PROFILE_ERROR",
    "REMOVE_TOTP", "REMOVE_TOTP_ERROR", "GRANT_CONSENT", "GRANT_CONSENT_ERROR", "UPDATE_CONSENT",
    "UPDATE_CONSENT_ERROR", "REVOKE_GRANT", "REVOKE_GRANT_ERROR", "SEND_VERIFY_EMAIL", "SEND_VERIFY_EMAIL_ERROR",
    "SEND_RESET_PASSWORD", "SEND_RESET_PASSWORD_ERROR", "SEND_IDENTITY_PROVIDER_LINK",
    "SEND_IDENTITY_PROVIDER_LINK_ERROR", "RESET_PASSWORD", "RESET_PASSWORD_ERROR", "RESTART_AUTHENTICATION",
    "RESTART_AUTHENTICATION_ERROR", "IDENTITY_PROVIDER_LINK_ACCOUNT", "IDENTITY_PROVIDER_LINK_ACCOUNT_ERROR",
    "IDENTITY_PROVIDER_FIRST_LOGIN", "IDENTITY_PROVIDER_FIRST_LOGIN_ERROR", "IDENTITY_PROVIDER_POST_LOGIN",
    "IDENTITY_PROVIDER_POST_LOGIN_ERROR", "IMPERSONATE", "IMPERSONATE_ERROR", "CUSTOM_REQUIRED_ACTION",
    "CUSTOM_REQUIRED_ACTION_ERROR", "EXECUTE_ACTIONS", "EXECUTE_ACTIONS_ERROR", "EXECUTE_ACTION_TOKEN",
    "EXECUTE_ACTION_TOKEN_ERROR", "CLIENT_REGISTER", "CLIENT_REGISTER_ERROR", "CLIENT_UPDATE", "CLIENT_UPDATE_ERROR",
    "CLIENT_DELETE", "CLIENT_DELETE_ERROR", "CLIENT_INITIATED_ACCOUNT_LINKING",
    "CLIENT_INITIATED_ACCOUNT_LINKING_ERROR",
    "TOKEN_EXCHANGE", "TOKEN_EXCHANGE_ERROR", "OAUTH2_DEVICE_AUTH", "OAUTH2_DEVICE_AUTH_ERROR",
    "OAUTH2_DEVICE_VERIFY_USER_CODE", "OAUTH2_DEVICE_VERIFY_USER_CODE_ERROR", "OAUTH2_DEVICE_CODE_TO_TOKEN",
    "OAUTH2_DEVICE_CODE_TO_TOKEN_ERROR", "AUTHREQID_TO_TOKEN", "AUTHREQID_TO_TOKEN_ERROR", "PERMISSION_TOKEN",
    "DELETE_ACCOUNT", "DELETE_ACCOUNT_ERROR", "USER_DISABLED_BY_PERMANENT_LOCKOUT",
    "USER_DISABLED_BY_TEMPORARY_LOCKOUT",
})


def missing_event_settings(current: dict[str, Any], rendered: dict[str, Any]) -> dict[str, Any]:
    """The part of a realm update that gives CURRENT the event settings of RENDERED: {} when it has them."""
    update = {name: rendered[name] for name in EVENT_SETTINGS if current.get(name) != rendered[name]}
    wanted_types = set(rendered["enabledEventTypes"])
    recorded = set(current.get("enabledEventTypes") or [])
    if current.get("eventsEnabled") and not recorded:
        # An empty list with events on records Keycloak's default types, and refresh errors are not among them: the
        # list then names those types and the ones revocation needs (the sign-ins and their failures still recorded).
        recorded = set(SAVED_BY_DEFAULT)
        if not wanted_types <= recorded:
            update["enabledEventTypes"] = sorted(KEYCLOAK_SAVED_BY_DEFAULT | wanted_types)
    elif not wanted_types <= recorded:
        update["enabledEventTypes"] = sorted(recorded | wanted_types)
    attributes = current.get("attributes") or {}
    for name, value in rendered["attributes"].items():
        if attributes.get(name) != value:
            update.setdefault("attributes", dict(attributes))[name] = value
    return update


def upgrade_realm(admin: Any, identities: Identities, rendered: dict[str, Any]) -> list[str]:
    """Apply to the running realm (through python-keycloak's KeycloakAdmin ADMIN, connected to it) what it lacks of
    RENDERED; return what was done, in words, for the progress line."""
    done = []
    update = missing_event_settings(admin.get_realm(identities.realm), rendered)
    if update:
        admin.update_realm(identities.realm, update)
        done.append(f"realm event settings {sorted(update)}")
    if not identities.realm_management:
        return done
    management = admin.get_client_id(REALM_MANAGEMENT)
    for client_id, roles in identities.realm_management.items():
        client = admin.get_client_id(client_id)
        account = admin.get_client_service_account_user(client)
        held = {role["name"] for role in admin.get_client_roles_of_user(account["id"], management)}
        missing = [admin.get_client_role(management, name) for name in roles if name not in held]
        if missing:
            admin.assign_client_role(account["id"], management, missing)
            done.append(f"{client_id}'s service account: {REALM_MANAGEMENT} {sorted(r['name'] for r in missing)}")
        mapped = {role["name"] for role in admin.get_client_roles_of_client_scope(client, management)}
        unmapped = [admin.get_client_role(management, name) for name in roles if name not in mapped]
        if unmapped:
            admin.assign_client_roles_to_client_scope(client, management, unmapped)
            done.append(f"{client_id}'s tokens may carry {REALM_MANAGEMENT} {sorted(r['name'] for r in unmapped)}")
    return done
