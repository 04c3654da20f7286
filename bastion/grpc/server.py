"""The server factory: mutual TLS from the dev CA, the security interceptor, health, reflection in dev only."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bastion.grpc.audit import AccessAudit
from bastion.grpc.interceptor import SecurityInterceptor
from bastion.grpc.policy import MethodPolicy
from bastion.grpc.ratelimit import RedisRateLimiter
from bastion.grpc.spans import SpanRecorder
from bastion.grpc.tokens import TokenValidator

MAX_MESSAGE_BYTES = 1 << 20


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class ServerSecurity:
    service: str
    tls: TlsFiles
    validator: TokenValidator
    policy: MethodPolicy
    audit: AccessAudit
    limiter: RedisRateLimiter | None = None
    spans: SpanRecorder | None = None  # recorded spans of sampled calls (bastion/grpc/spans.py)


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """Mutual TLS: a client without a certificate from the dev CA never reaches a handler."""
    return grpc.ssl_server_credentials(
        [(tls.key.read_bytes(), tls.cert.read_bytes())], root_certificates=tls.ca.read_bytes(),
        require_client_auth=True,
    )


async def start_server(
    security: ServerSecurity,
    register: Callable[[grpc.aio.Server], None],
    descriptors: list[ServiceDescriptor],
    port: int = 0,
    host: str = "127.0.0.1",
    dev_profile: bool = False,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    health_servicer: health.aio.HealthServicer | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start a secured server; returns it with the bound port (port 0 picks a free one). Pass HEALTH_SERVICER
    to change the health status later (ServiceRuntime does, from its workers' health)."""
    for descriptor in descriptors:
        security.policy.check_complete(descriptor)
    server = grpc.aio.server(
        interceptors=[SecurityInterceptor(security.service, security.validator, security.policy, security.audit,
                                          security.limiter, security.spans)],
        options=[("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.max_send_message_length", max_message_bytes)],
    )
    register(server)
    health_servicer = health_servicer or health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [descriptor.full_name for descriptor in descriptors]
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if dev_profile:
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_secure_port(f"{host}:{port}", server_credentials(security.tls))
    await server.start()
    return server, bound
