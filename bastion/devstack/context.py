"""What every component of the devstack needs to know: settings, paths, secrets, PKI and the catalog."""

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.devstack.catalog import ServiceEntry
from bastion.devstack.distributions import Distribution
from bastion.devstack.errors import DevstackError
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

    def service(self, name: str) -> ServiceEntry:
        """NAME's entry in infra/services.yaml."""
        for service in self.services:
            if service.name == name:
                return service
        raise DevstackError(f"no service {name!r} in infra/services.yaml",
                            f"the declared services are {', '.join(self.service_names)}")

    def grpc_port(self, name: str) -> int:
        """The port service NAME serves gRPC on in this install."""
        return self.settings.service_port(self.service(name).grpc_port)

    def metrics_port(self, name: str) -> int:
        """The port service NAME serves its metrics on (HTTPS, client certificates) in this install."""
        return self.settings.service_port(self.service(name).metrics_port)

    def grpc_address(self, name: str) -> str:
        """host:port of service NAME's gRPC endpoint, as clients dial it (the name on its certificate)."""
        return f"{self.settings.public_host}:{self.grpc_port(name)}"

    def redis_options(self, user: str, password: str) -> dict[str, Any]:
        """How to reach Redis as USER: keyword arguments of redis.Redis and redis.asyncio.Redis. TLS 1.3, the
        server's certificate checked against the dev CA and its name (the one on its certificate); the ACL user
        and password."""
        return {"host": self.settings.public_host, "port": self.settings.redis_port, "username": user,
                "password": password, "ssl": True, "ssl_ca_certs": str(self.ca_file), "ssl_check_hostname": True,
                "ssl_min_version": ssl.TLSVersion.TLSv1_3}

    def distribution_dir(self, name: str) -> Path:
        """The verified cache folder of a pinned distribution (filled by `bastion setup`)."""
        dist = self.distributions[name]
        return self.settings.cache_dir / f"{dist.name}-{dist.version}"
