"""Generated secrets: created once, 0600, never overwritten, every principal covered."""

import json
import stat
from pathlib import Path

import pytest

from bastion.devstack.errors import DevstackError
from bastion.devstack.secrets import SecretNeeds, ensure_credentials, load_credentials

NEEDS = SecretNeeds(
    users=["alice", "bob"], keycloak_clients=["accounts"], kafka_principals=["admin", "accounts"],
    postgres_roles=["bastion_admin", "accounts"], redis_users=["admin", "accounts"],
)


def test_credentials_file_is_private_and_has_contract_shape(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    ensure_credentials(path, NEEDS)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert set(data["users"]) == {"alice", "bob"}
    assert set(data["keycloak_clients"]) == {"accounts"}
    assert set(data["kafka"]) == {"admin", "accounts"}
    assert set(data["postgres"]) == {"bastion_admin", "accounts"}
    assert set(data["redis"]) == {"admin", "accounts"}
    assert set(data["keycloak_admin"]) == {"admin"}


def test_secrets_are_random_and_stable_across_runs(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    first = ensure_credentials(path, NEEDS)
    second = ensure_credentials(path, NEEDS)
    assert first == second
    assert first.users["alice"] != first.users["bob"]
    assert len(first.users["alice"]) >= 32
    other = ensure_credentials(tmp_path / "other.json", NEEDS)
    assert other.users["alice"] != first.users["alice"]


def test_new_principal_gets_a_secret_without_touching_the_others(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    first = ensure_credentials(path, NEEDS)
    grown = SecretNeeds(**{**NEEDS.__dict__, "users": ["alice", "bob", "carol"]})
    second = ensure_credentials(path, grown)
    assert second.users["alice"] == first.users["alice"]
    assert second.users["carol"]
    assert load_credentials(path) == second, "the new secret is kept, not made again at each run"


def test_a_principal_no_longer_needed_keeps_its_secret(tmp_path: Path) -> None:
    """Its data may still exist (a database role, a Kafka principal), and it may come back."""
    path = tmp_path / "credentials.json"
    first = ensure_credentials(path, NEEDS)
    ensure_credentials(path, SecretNeeds(**{**NEEDS.__dict__, "postgres_roles": ["bastion_admin"]}))
    assert load_credentials(path).postgres["accounts"] == first.postgres["accounts"]


def test_credentials_of_an_install_not_set_up_name_the_command_that_makes_them(tmp_path: Path) -> None:
    with pytest.raises(DevstackError, match="no credentials file") as refused:
        load_credentials(tmp_path / "credentials.json")
    assert "make setup" in refused.value.remedy
