"""The identity declaration (infra/keycloak/identities.yaml): realm roles, users, clients, audiences."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bastion.devstack.errors import DevstackError


@dataclass(frozen=True)
class User:
    username: str
    roles: tuple[str, ...]
    first_name: str
    last_name: str
    email: str


@dataclass(frozen=True)
class Identities:
    realm: str
    access_token_lifespan_seconds: int
    roles: dict[str, str]
    users: tuple[User, ...]
    service_calls: dict[str, tuple[str, ...]]
    cli_client: str
    cli_audiences: tuple[str, ...]
    # Roles of Keycloak's own `realm-management` client a service account holds (what it may do with the realm).
    realm_management: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def user_names(self) -> list[str]:
        return [user.username for user in self.users]


MAX_ACCESS_TOKEN_SECONDS = 300
# What a service may be granted of the realm's administration: reading its admin events (the audit service, which
# turns them into token revocations). Nothing that changes the realm.
REALM_MANAGEMENT_ROLES = frozenset({"view-events"})


def parse_identities(raw: dict[str, Any], services: set[str] | None = None) -> Identities:
    users = tuple(
        User(name, tuple(entry["roles"]), entry["first_name"], entry["last_name"], entry["email"])
        for name, entry in raw["users"].items()
    )
    identities = Identities(
        realm=raw["realm"],
        access_token_lifespan_seconds=int(raw["access_token_lifespan_seconds"]),
        roles=dict(raw["roles"]),
        users=users,
        service_calls={name: tuple(entry.get("calls") or ()) for name, entry in raw["service_clients"].items()},
        cli_client=raw["cli_client"]["name"],
        cli_audiences=tuple(raw["cli_client"]["audiences"]),
        realm_management={name: tuple(entry["realm_management"]) for name, entry in raw["service_clients"].items()
                          if entry.get("realm_management")},
    )
    problems = []
    if identities.access_token_lifespan_seconds > MAX_ACCESS_TOKEN_SECONDS:
        problems.append(f"access tokens must live {MAX_ACCESS_TOKEN_SECONDS}s or less")
    for user in users:
        problems += [f"user {user.username}: unknown role {r!r}" for r in user.roles if r not in identities.roles]
    clients = set(identities.service_calls)
    for name, calls in identities.service_calls.items():
        problems += [f"client {name}: calls unknown service {c!r}" for c in calls if c not in clients]
    for name, roles in identities.realm_management.items():
        problems += [f"client {name}: realm_management role {r!r} is not one a service may hold "
                     f"({sorted(REALM_MANAGEMENT_ROLES)})" for r in roles if r not in REALM_MANAGEMENT_ROLES]
    cli = identities.cli_client
    problems += [f"{cli}: unknown audience {a!r}" for a in identities.cli_audiences if a not in clients]
    if services is not None and clients != services:
        problems.append(f"service_clients {sorted(clients)} differ from infra/services.yaml {sorted(services)}")
    if problems:
        raise DevstackError("infra/keycloak/identities.yaml: " + "; ".join(problems), "fix the file and retry")
    return identities


def load_identities(path: Path, services: set[str] | None = None) -> Identities:
    return parse_identities(yaml.safe_load(path.read_text()), services)
