"""Fixtures shared by the unit tests (a module that needs another shape of one defines its own)."""

from pathlib import Path

import pytest

from bastion.events.keys import KeyRing

SERVICES = ("accounts", "audit", "notifications", "payments")


@pytest.fixture()
def ring(tmp_path: Path) -> KeyRing:
    """A key ring in a scratch folder with a signing key for each of the four services."""
    ring = KeyRing(tmp_path / "keys")
    ring.ensure(list(SERVICES))
    return ring
