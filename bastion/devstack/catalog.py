"""The platform's services as declared in infra/services.yaml."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bastion.devstack.errors import DevstackError


@dataclass(frozen=True)
class ServiceEntry:
    name: str
    grpc_port: int
    # HTTPS with client certificates, serving the service's Prometheus counters (bastion.metrics_endpoint).
    metrics_port: int
    # The service keeps the append-only audit log (bastion.audit): its database belongs to the admin, not to it.
    append_only_log: bool = False


def load_services(path: Path) -> list[ServiceEntry]:
    raw: dict[str, Any] = yaml.safe_load(path.read_text())
    services = raw.get("services") or {}
    if not services:
        raise DevstackError(f"{path} declares no services", "list the platform services under `services:`")
    try:
        return [ServiceEntry(name, int(entry["grpc_port"]), int(entry["metrics_port"]),
                             bool(entry.get("append_only_log", False)))
                for name, entry in services.items()]
    except (KeyError, TypeError, ValueError) as error:
        raise DevstackError(f"{path}: a service entry is incomplete ({error!r})",
                            "give every service a grpc_port and a metrics_port") from None
