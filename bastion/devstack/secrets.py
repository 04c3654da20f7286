"""The generated secrets of a dev install: created once at setup, kept in a 0600 JSON file, never in git."""

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.devstack.errors import DevstackError
from bastion.devstack.layout import write_private

SECRET_BYTES = 24


def new_secret() -> str:
    """A random URL-safe secret with 192 bits of entropy."""
    return secrets.token_urlsafe(SECRET_BYTES)


@dataclass(frozen=True)
class Credentials:
    """Every secret of the dev install. The JSON shape is a contract (docs/contracts.md)."""

    users: dict[str, str]
    keycloak_clients: dict[str, str]
    keycloak_admin: dict[str, str]
    kafka: dict[str, str]
    postgres: dict[str, str]
    redis: dict[str, str]

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Credentials":
        data: dict[str, Any] = json.loads(text)
        return cls(**{name: dict(data.get(name, {})) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class SecretNeeds:
    """Which principals need a secret, taken from the declarative files under infra/."""

    users: Iterable[str]
    keycloak_clients: Iterable[str]
    kafka_principals: Iterable[str]
    postgres_roles: Iterable[str]
    redis_users: Iterable[str]


def ensure_credentials(path: Path, needs: SecretNeeds) -> Credentials:
    """Load the credentials file, adding a fresh secret for every principal that has none yet.

    Existing secrets are never changed, so running setup twice is safe and data stays reachable.
    """
    current = Credentials.from_json(path.read_text()) if path.exists() else Credentials({}, {}, {}, {}, {}, {})
    wanted = {
        "users": needs.users,
        "keycloak_clients": needs.keycloak_clients,
        "keycloak_admin": ["admin"],
        "kafka": needs.kafka_principals,
        "postgres": needs.postgres_roles,
        "redis": needs.redis_users,
    }
    merged: dict[str, dict[str, str]] = {}
    for section, names in wanted.items():
        existing: dict[str, str] = getattr(current, section)
        merged[section] = {name: existing.get(name) or new_secret() for name in names}
        merged[section].update({k: v for k, v in existing.items() if k not in merged[section]})
    updated = Credentials(**merged)
    if updated != current or not path.exists():
        write_private(path, updated.to_json())
    return updated


def load_credentials(path: Path) -> Credentials:
    """Read the credentials of an existing install; a missing file names the command that creates it."""
    if not path.exists():
        raise DevstackError(f"no credentials file at {path}", "run `make setup` (or `bastion setup`) first")
    return Credentials.from_json(path.read_text())
