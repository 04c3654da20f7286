"""Fixtures shared by the unit tests (a module that needs another shape of one defines its own)."""

from pathlib import Path

import pytest

from bastion.devstack.catalog import load_services
from bastion.events.keys import KeyRing

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
