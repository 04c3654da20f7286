"""A platform service (accounts, payments, ...) as a devstack component: `python -m services.NAME.server`,
healthy when its gRPC health check answers SERVING over mutual TLS."""

import importlib.util
import sys
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bastion.devstack.components.base import Component
from bastion.devstack.context import StackContext
from bastion.devstack.process import LaunchSpec
from bastion.grpc.channels import blocking_channel
from bastion.grpc.server import TlsFiles
from bastion.settings import PROJECT_ROOT


def is_built(name: str) -> bool:
    """True once the service has a server module (services arrive one issue at a time)."""
    try:
        return importlib.util.find_spec(f"services.{name}.server") is not None
    except ModuleNotFoundError:  # not even the service's package yet
        return False


class ServiceProcess(Component):
    """Subclassed per service by `service_component`, so each kind has its own `name`."""

    @property
    def grpc_port(self) -> int:
        return self.ctx.grpc_port(self.name)

    @property
    def metrics_port(self) -> int:
        return self.ctx.metrics_port(self.name)

    def ports(self) -> list[int]:
        return [self.grpc_port, self.metrics_port]

    def launch_spec(self) -> LaunchSpec:
        # The service reads the same BASTION_* settings as this process: pass them on explicitly.
        env = {f"BASTION_{key.upper()}": str(value)
               for key, value in self.ctx.settings.model_dump().items() if value is not None}
        return LaunchSpec(argv=[sys.executable, "-m", f"services.{self.name}.server"], env=env, cwd=PROJECT_ROOT)

    def probe(self) -> bool:
        client = self.ctx.pki.paths("cli")
        target = f"{self.ctx.settings.public_host}:{self.grpc_port}"
        with blocking_channel(target, TlsFiles(client.cert, client.key, self.ctx.ca_file), self.name) as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                                   timeout=2)
            except grpc.RpcError:
                return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    def describe(self) -> dict[str, Any]:
        return {"grpc": f"{self.ctx.settings.public_host}:{self.grpc_port}",
                "metrics": f"https://{self.ctx.settings.public_host}:{self.metrics_port}/metrics"}


def service_component(name: str) -> type[ServiceProcess]:
    return type(f"{name.title()}Service", (ServiceProcess,), {"name": name})


def built_services(ctx_or_names: StackContext | list[str]) -> list[str]:
    names = ctx_or_names.service_names if isinstance(ctx_or_names, StackContext) else ctx_or_names
    return [name for name in names if is_built(name)]
