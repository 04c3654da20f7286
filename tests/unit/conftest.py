"""Fixtures shared by the unit tests (a module that needs another shape of one defines its own)."""

from pathlib import Path

import pytest

from bastion.devstack.catalog import load_services
from bastion.devstack.context import StackContext
from bastion.devstack.distributions import Distribution
from bastion.devstack.layout import StateLayout
from bastion.devstack.pki import DevPki
from bastion.devstack.secrets import Credentials, new_secret
from bastion.events.keys import KeyRing
from bastion.settings import DevstackSettings

# The platform's services as infra/services.yaml declares them: a test that loads the infra/ files with the known
# services takes them from here, so a fifth service declared there needs no test edited by hand.
SERVICES = tuple(sorted(entry.name for entry in load_services(Path(__file__).resolve().parents[2] / "infra" /
                                                               "services.yaml")))


@pytest.fixture()
def ring(tmp_path: Path) -> KeyRing:
    """A key ring in a scratch folder with a signing key for each of the platform's services."""
    ring = KeyRing(tmp_path / "keys")
    ring.ensure(list(SERVICES))
    return ring


@pytest.fixture()
def stack_context(tmp_path: Path) -> StackContext:
    """A dev install's context in a scratch state folder, nothing started: the four services of infra/services.yaml,
    a generated secret for every principal the components use, and stand-in certificate files (no CA is made)."""
    settings = DevstackSettings(state_dir=tmp_path / "state", cache_dir=tmp_path / "cache")
    layout = StateLayout(settings.state_dir)
    layout.ensure()
    services = load_services(settings.infra_dir / "services.yaml")
    names = [service.name for service in services]
    credentials = Credentials(
        users={}, keycloak_clients={name: new_secret() for name in names}, keycloak_admin={"admin": new_secret()},
        kafka={name: new_secret() for name in ["admin", *names]},
        postgres={name: new_secret() for name in ["bastion_admin", "keycloak", *names]},
        redis={name: new_secret() for name in ["admin", *names]})
    pki = DevPki(layout.pki_dir, 7, 2)
    for name in ["ca", "kafka", "keycloak", "postgres", "redis", "cli"]:
        (pki.folder / f"{name}.pem").write_text(f"-----BEGIN CERTIFICATE----- {name}\n")
        (pki.folder / f"{name}-key.pem").write_text(f"-----BEGIN PRIVATE KEY----- {name}\n")
    keycloak = Distribution("keycloak", "26.0.0", [], {})
    return StackContext(settings=settings, layout=layout, credentials=credentials, pki=pki, services=services,
                        distributions={"keycloak": keycloak})
