"""A realm imported by an earlier release is brought up to what the services rely on
(bastion/devstack/realm_upgrade.py): only what it lacks is added, nothing is taken away or turned off."""

from typing import Any

from bastion.devstack.identities import load_identities
from bastion.devstack.realm_upgrade import missing_event_settings, upgrade_realm
from tests.unit.test_realm import FILE, realm


class Keycloak:
    """KeycloakAdmin as realm_upgrade uses it, over one realm's settings and the audit client's roles."""

    def __init__(self, settings: dict[str, Any], held: set[str], mapped: set[str]) -> None:
        self.settings, self.held, self.mapped = settings, held, mapped
        self.updates: list[dict[str, Any]] = []

    def get_realm(self, _name: str) -> dict[str, Any]:
        return self.settings

    def update_realm(self, _name: str, update: dict[str, Any]) -> None:
        self.updates.append(update)
        self.settings = {**self.settings, **update}

    def get_client_id(self, client_id: str) -> str:
        return f"uuid-{client_id}"

    def get_client_service_account_user(self, client: str) -> dict[str, str]:
        return {"id": f"account-of-{client}"}

    def get_client_role(self, _client: str, name: str) -> dict[str, str]:
        return {"name": name, "id": f"role-{name}"}

    def get_client_roles_of_user(self, _user: str, _client: str) -> list[dict[str, str]]:
        return [{"name": name} for name in self.held]

    def assign_client_role(self, _user: str, _client: str, roles: list[dict[str, str]]) -> None:
        self.held |= {role["name"] for role in roles}

    def get_client_roles_of_client_scope(self, _client: str, _owner: str) -> list[dict[str, str]]:
        return [{"name": name} for name in self.mapped]

    def assign_client_roles_to_client_scope(self, _client: str, _owner: str, roles: list[dict[str, str]]) -> None:
        self.mapped |= {role["name"] for role in roles}


OLD_REALM = {"realm": "bastion", "enabled": True, "adminEventsEnabled": False, "eventsEnabled": False,
             "enabledEventTypes": [], "attributes": {"frontendUrl": ""}}


def test_a_realm_imported_before_revocation_gets_its_event_settings_and_the_audit_role_and_nothing_else() -> None:
    keycloak = Keycloak(dict(OLD_REALM), held=set(), mapped=set())
    done = upgrade_realm(keycloak, load_identities(FILE), realm())
    assert len(done) == 3
    [update] = keycloak.updates
    assert (update["adminEventsEnabled"], update["adminEventsDetailsEnabled"], update["eventsEnabled"]) == (
        True, False, True)
    assert update["enabledEventTypes"] == ["LOGOUT", "REFRESH_TOKEN_ERROR"] and update["eventsExpiration"] == 86400
    assert update["attributes"] == {"frontendUrl": "", "adminEventsExpiration": "86400"}  # others kept
    assert (keycloak.held, keycloak.mapped) == ({"view-events"}, {"view-events"})
    assert upgrade_realm(keycloak, load_identities(FILE), realm()) == []  # once is enough
    assert len(keycloak.updates) == 1


def test_a_realm_as_rendered_is_left_alone() -> None:
    rendered = realm()
    keycloak = Keycloak({**rendered}, held={"view-events"}, mapped={"view-events"})
    assert upgrade_realm(keycloak, load_identities(FILE), rendered) == [] and keycloak.updates == []


def test_event_types_recorded_already_are_kept_and_recording_everything_needs_nothing() -> None:
    rendered = realm()
    current = {name: rendered[name] for name in ("adminEventsEnabled", "adminEventsDetailsEnabled", "eventsEnabled",
                                                 "eventsExpiration", "attributes")}
    assert missing_event_settings({**current, "enabledEventTypes": ["LOGIN"]}, rendered) == {
        "enabledEventTypes": ["LOGIN", "LOGOUT", "REFRESH_TOKEN_ERROR"]}
    # On with no type named: Keycloak's default types, which leave refresh errors out (measured on 26.x). They are
    # named then, with refresh errors: the sign-ins and their failures the operator recorded are recorded still.
    [named] = missing_event_settings({**current, "enabledEventTypes": []}, rendered).values()
    assert {"LOGIN", "LOGIN_ERROR", "UPDATE_PASSWORD", "LOGOUT", "REFRESH_TOKEN_ERROR"} <= set(named)
    assert named == sorted(named) and "REFRESH_TOKEN" not in named
    assert missing_event_settings({**current, "enabledEventTypes": ["LOGOUT", "REFRESH_TOKEN_ERROR", "LOGIN"]},
                                  rendered) == {}
