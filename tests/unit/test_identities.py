"""The identity declaration: the shipped file holds the contract's roles, users and clients; bad files fail."""

from pathlib import Path
from typing import Any

import pytest
import yaml

from bastion.devstack.errors import DevstackError
from bastion.devstack.identities import load_identities, parse_identities
from tests.unit.conftest import SERVICES as PLATFORM_SERVICES

FILE = Path(__file__).resolve().parents[2] / "infra" / "keycloak" / "identities.yaml"
SERVICES = set(PLATFORM_SERVICES)


def test_shipped_identities_match_the_contract() -> None:
    ids = load_identities(FILE, SERVICES)
    assert ids.realm == "bastion"
    assert set(ids.roles) == {"customer", "teller", "support", "auditor", "admin"}
    roles = {u.username: set(u.roles) for u in ids.users}
    assert roles == {"alice": {"customer"}, "bob": {"customer"}, "tina": {"teller"}, "sam": {"support"},
                     "ada": {"auditor"}}
    assert ids.cli_client == "bastion-cli"
    assert ids.access_token_lifespan_seconds <= 300


def raw() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(FILE.read_text())
    return data


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda d: d.update(access_token_lifespan_seconds=3600), "300s or less"),
        (lambda d: d["users"]["alice"].update(roles=["root"]), "unknown role 'root'"),
        (lambda d: d["service_clients"]["payments"].update(calls=["bank"]), "unknown service 'bank'"),
        (lambda d: d["cli_client"].update(audiences=["account"]), "unknown audience 'account'"),
        (lambda d: d["service_clients"].pop("audit"), "differ from infra/services.yaml"),
        (lambda d: d["service_clients"].update(ghost={"calls": []}), "differ from infra/services.yaml"),
    ],
)
def test_bad_declarations_are_refused(edit: Any, problem: str) -> None:
    data = raw()
    edit(data)
    with pytest.raises(DevstackError, match=problem):
        parse_identities(data, SERVICES)
