"""Every TLS endpoint of the stack verifies against the dev CA with hostname checks on, and not otherwise: Kafka's,
Redis's and Keycloak's, and each service's gRPC and metrics endpoints (PostgreSQL negotiates TLS inside its own
protocol: `test_datastores.py` covers it)."""

import socket
import ssl
from pathlib import Path

import pytest

from bastion.devstack.catalog import load_services
from bastion.devstack.context import StackContext
from bastion.devstack.pki import DevPki
from bastion.devstack.stack import Stack
from bastion.settings import PROJECT_ROOT

SERVICES = load_services(PROJECT_ROOT / "infra" / "services.yaml")
COMPONENTS = ["kafka", "kafka-controller", "keycloak", "keycloak-management", "redis"]
ENDPOINTS = COMPONENTS + [f"{service.name}-{kind}" for service in SERVICES for kind in ("grpc", "metrics")]


def endpoints(ctx: StackContext) -> dict[str, int]:
    s = ctx.settings
    ports = {"kafka": s.kafka_port, "kafka-controller": s.kafka_controller_port, "keycloak": s.keycloak_port,
             "keycloak-management": s.keycloak_management_port, "redis": s.redis_port}
    for service in SERVICES:
        ports[f"{service.name}-grpc"] = s.service_port(service.grpc_port)
        ports[f"{service.name}-metrics"] = s.service_port(service.metrics_port)
    return ports


def handshake(ctx: StackContext, port: int, cafile: Path, hostname: str,
              newest: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED) -> ssl.SSLObject | ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(cafile))
    context.maximum_version = newest
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    client = ctx.pki.paths("cli")
    context.load_cert_chain(client.cert, client.key)  # the controller listener wants a client certificate
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=hostname) as tls,
    ):
        return tls


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_server_certificate_verifies_against_the_dev_ca(stack: Stack, ctx: StackContext, endpoint: str) -> None:
    port = endpoints(ctx)[endpoint]
    handshake(ctx, port, ctx.ca_file, "localhost")
    handshake(ctx, port, ctx.ca_file, "127.0.0.1")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_hostname_mismatch_is_refused(ctx: StackContext, endpoint: str) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(ctx, endpoints(ctx)[endpoint], ctx.ca_file, "bank.example.com")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_client_trusting_another_ca_refuses_the_server(ctx: StackContext, endpoint: str, tmp_path: Path) -> None:
    other = DevPki(tmp_path, leaf_days=1, reissue_when_days_left=0)
    other.ensure([])
    with pytest.raises(ssl.SSLCertVerificationError, match=r"unable to get local issuer|self-signed certificate in"):
        handshake(ctx, endpoints(ctx)[endpoint], other.ca_file, "localhost")


@pytest.mark.parametrize("endpoint", COMPONENTS)
def test_kafka_keycloak_and_redis_speak_tls_1_3_only(ctx: StackContext, endpoint: str) -> None:
    with pytest.raises(ssl.SSLError, match=r"(?i)protocol.version|unsupported.protocol") as refused:
        handshake(ctx, endpoints(ctx)[endpoint], ctx.ca_file, "localhost", newest=ssl.TLSVersion.TLSv1_2)
    assert not isinstance(refused.value, ssl.SSLCertVerificationError), "refused for the version, not the certificate"
