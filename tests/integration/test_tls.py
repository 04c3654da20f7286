"""Every TLS endpoint of the stack verifies against the dev CA with hostname checks on, and not otherwise."""

import socket
import ssl
from pathlib import Path

import pytest

from bastion.devstack.context import StackContext
from bastion.devstack.pki import DevPki


def endpoints(ctx: StackContext) -> dict[str, int]:
    s = ctx.settings
    return {"kafka": s.kafka_port, "kafka-controller": s.kafka_controller_port, "keycloak": s.keycloak_port,
            "keycloak-management": s.keycloak_management_port}


def handshake(ctx: StackContext, port: int, cafile: Path, hostname: str) -> ssl.SSLObject | ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(cafile))
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    client = ctx.pki.paths("cli")
    context.load_cert_chain(client.cert, client.key)  # the controller listener wants a client certificate
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=hostname) as tls,
    ):
        return tls


@pytest.mark.parametrize("endpoint", ["kafka", "kafka-controller", "keycloak", "keycloak-management"])
def test_server_certificate_verifies_against_the_dev_ca(ctx: StackContext, endpoint: str) -> None:
    port = endpoints(ctx)[endpoint]
    handshake(ctx, port, ctx.ca_file, "localhost")
    handshake(ctx, port, ctx.ca_file, "127.0.0.1")


@pytest.mark.parametrize("endpoint", ["kafka", "kafka-controller", "keycloak", "keycloak-management"])
def test_hostname_mismatch_is_refused(ctx: StackContext, endpoint: str) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(ctx, endpoints(ctx)[endpoint], ctx.ca_file, "bank.example.com")


@pytest.mark.parametrize("endpoint", ["kafka", "kafka-controller", "keycloak", "keycloak-management"])
def test_client_trusting_another_ca_refuses_the_server(ctx: StackContext, endpoint: str, tmp_path: Path) -> None:
    other = DevPki(tmp_path, leaf_days=1, reissue_when_days_left=0)
    other.ensure([])
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        handshake(ctx, endpoints(ctx)[endpoint], other.ca_file, "localhost")
