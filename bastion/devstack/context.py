"""What every component of the devstack needs to know: settings, paths, secrets, PKI and the catalog."""

from dataclasses import dataclass
from pathlib import Path

from bastion.devstack.catalog import ServiceEntry
from bastion.devstack.distributions import Distribution
from bastion.devstack.layout import StateLayout
from bastion.devstack.pki import DevPki
from bastion.devstack.secrets import Credentials
from bastion.settings import DevstackSettings


@dataclass(frozen=True)
class StackContext:
    settings: DevstackSettings
    layout: StateLayout
    credentials: Credentials
    pki: DevPki
    services: list[ServiceEntry]
    distributions: dict[str, Distribution]

    @property
    def service_names(self) -> list[str]:
        return [service.name for service in self.services]

    @property
    def ca_file(self) -> Path:
        return self.pki.ca_file

    def distribution_dir(self, name: str) -> Path:
        """The verified cache folder of a pinned distribution (filled by `bastion setup`)."""
        dist = self.distributions[name]
        return self.settings.cache_dir / f"{dist.name}-{dist.version}"
