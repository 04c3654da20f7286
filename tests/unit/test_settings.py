"""The devstack's settings (bastion/settings.py): secure defaults, read once and never changed after."""

import ipaddress

import pytest
from pydantic import ValidationError

from bastion.settings import DevstackSettings


@pytest.fixture()
def defaults(monkeypatch: pytest.MonkeyPatch) -> DevstackSettings:
    """The settings of an environment that sets none of them."""
    for name in DevstackSettings.model_fields:
        monkeypatch.delenv(f"BASTION_{name.upper()}", raising=False)
    return DevstackSettings()


def test_by_default_every_component_listens_on_loopback_only(defaults: DevstackSettings) -> None:
    assert ipaddress.ip_address(defaults.bind_host).is_loopback


def test_the_settings_read_at_start_cannot_be_changed_afterwards(defaults: DevstackSettings) -> None:
    with pytest.raises(ValidationError, match="frozen"):
        defaults.bind_host = "192.0.2.1"  # type: ignore[misc]


def test_a_leaf_certificate_is_reissued_before_it_expires_not_at_every_start(defaults: DevstackSettings) -> None:
    assert 0 < defaults.reissue_when_days_left < defaults.leaf_certificate_days


def test_the_dev_install_is_the_dev_profile_until_the_environment_says_otherwise(
        defaults: DevstackSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    assert defaults.dev_profile
    monkeypatch.setenv("BASTION_DEV_PROFILE", "false")
    assert not DevstackSettings().dev_profile
