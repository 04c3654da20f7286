"""The platform's clients check the server's name, not only its CA: each one, configured as the platform configures
it, meets a server whose certificate is from the right CA but for another name, and refuses it. The same server
with a certificate for `localhost` gets past the TLS handshake (the control that shows what failed was the name).

No stack: a throw-away dev CA, and a small TLS server in a thread (for PostgreSQL, after its SSLRequest).
"""

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import psycopg
import pytest
import redis
from confluent_kafka.admin import AdminClient
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from redis.backoff import NoBackoff
from redis.retry import Retry

from bastion.devstack.components.postgres import Postgres
from bastion.devstack.context import StackContext
from bastion.devstack.kafka_admin import client_config
from bastion.devstack.pki import DevPki, IssuedPaths, issue_certificate
from bastion.grpc.channels import blocking_channel, channel_credentials
from bastion.grpc.server import TlsFiles, server_credentials

HOST = "localhost"  # the name every platform client asks for


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    pki = DevPki(tmp_path_factory.mktemp("pki"), leaf_days=1, reissue_when_days_left=0)
    pki.ensure(["cli", "right"])  # leaves for localhost and 127.0.0.1
    cert, key = issue_certificate(pki.authority(), "wrong", 1, alternative_names=[x509.DNSName("bank.example.com")])
    pki.write("wrong", cert, key)
    return pki


def server_context(paths: IssuedPaths) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(paths.cert, paths.key)
    return context


@contextmanager
def tls_server(paths: IssuedPaths, prelude: Callable[[socket.socket], None] = lambda _: None) -> Iterator[int]:
    """A loopback server that runs PRELUDE on each connection, then the TLS handshake, then hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    context, stop = server_context(paths), threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            with raw:
                raw.settimeout(5)
                try:
                    prelude(raw)
                    with context.wrap_socket(raw, server_side=True):
                        pass
                except (OSError, ssl.SSLError):
                    pass  # the client gave up: that is what the tests look for

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def health_status(pki: DevPki, serving_as: str, channel: Callable[[str, TlsFiles], grpc.Channel]) -> Any:
    """The health status a gRPC server presenting SERVING_AS's certificate answers over CHANNEL(target, the cli's
    TLS files); the status code of the failure when the call fails."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)  # type: ignore[no-untyped-call]
    paths = pki.paths(serving_as)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(TlsFiles(paths.cert, paths.key, pki.ca_file)))
    server.start()
    cli = pki.paths("cli")
    try:
        with channel(f"{HOST}:{port}", TlsFiles(cli.cert, cli.key, pki.ca_file)) as opened:
            stub = health_pb2_grpc.HealthStub(opened)  # type: ignore[no-untyped-call]
            return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
    except grpc.RpcError as error:
        return error.code()
    finally:
        server.stop(0)


def test_grpc_channels_refuse_a_server_certificate_for_another_name(pki: DevPki) -> None:
    def by_address(target: str, tls: TlsFiles) -> grpc.Channel:
        return grpc.secure_channel(target, channel_credentials(tls))

    assert health_status(pki, "right", by_address) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(pki, "wrong", by_address) == grpc.StatusCode.UNAVAILABLE


def test_a_grpc_channel_to_one_service_refuses_another_components_certificate_of_the_same_ca(pki: DevPki) -> None:
    """Every leaf names localhost: a channel that asked for the address alone would take notifications (say, a
    compromised one listening where accounts should be) for accounts. The kit's channels ask for the service's own
    name (`server_name`), which only its certificate carries."""
    pki.ensure(["accounts", "notifications"])

    def calling(service: str) -> Callable[[str, TlsFiles], grpc.Channel]:
        return lambda target, tls: blocking_channel(target, tls, service)

    assert health_status(pki, "accounts", calling("accounts")) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(pki, "notifications", calling("accounts")) == grpc.StatusCode.UNAVAILABLE
    assert health_status(pki, "notifications", calling("notifications")) == health_pb2.HealthCheckResponse.SERVING


def test_postgres_connections_refuse_a_server_certificate_for_another_name(pki: DevPki) -> None:
    """PostgreSQL's clients ask for its own name (postgres.bastion.local, connecting to the public host's address):
    another component's leaf of the same CA, which also names localhost, is refused like a foreign name."""
    pki.ensure(["postgres", "accounts"])

    def answer_ssl_request(raw: socket.socket) -> None:
        raw.recv(8)  # SSLRequest: length 8, code 80877103
        raw.sendall(b"S")

    def failure_with(name: str) -> str:
        with tls_server(pki.paths(name), answer_ssl_request) as port:
            ctx = SimpleNamespace(settings=SimpleNamespace(public_host=HOST, postgres_port=port),
                                  ca_file=pki.ca_file)
            conninfo = Postgres(ctx).conninfo("accounts", "not-a-real-password")  # type: ignore[arg-type]
            with pytest.raises(psycopg.OperationalError) as refused:
                psycopg.connect(conninfo)
            return str(refused.value)

    assert "does not match host name" in failure_with("wrong")
    assert "does not match host name" in failure_with("accounts"), "a dev-CA leaf naming localhost, not postgres"
    assert "does not match host name" not in failure_with("postgres")  # past TLS: the server hung up after it


def test_kafka_clients_refuse_a_broker_certificate_for_another_name(pki: DevPki) -> None:
    def errors_with(name: str, seconds: float) -> list[str]:
        """librdkafka's errors within SECONDS, or until a handshake failure is reported."""
        seen: list[str] = []
        with tls_server(pki.paths(name)) as port:
            config = client_config(f"{HOST}:{port}", str(pki.ca_file), "accounts", "not-a-real-password")
            admin = AdminClient({**config, "error_cb": lambda error: seen.append(error.str()),
                                 "reconnect.backoff.ms": 100})
            deadline = time.monotonic() + seconds
            while not any("SSL handshake failed" in e for e in seen) and time.monotonic() < deadline:
                admin.poll(0.2)
        return seen

    wrong = errors_with("wrong", 10)
    assert any("SSL handshake failed" in error and "certificate verify failed" in error for error in wrong), wrong
    assert not any("SSL handshake failed" in error for error in errors_with("right", 2))


def test_redis_clients_refuse_a_server_certificate_for_another_name(pki: DevPki) -> None:
    def failure_with(name: str) -> str:
        with tls_server(pki.paths(name)) as port:
            ctx = SimpleNamespace(settings=SimpleNamespace(public_host=HOST, redis_port=port), ca_file=pki.ca_file)
            options = StackContext.redis_options(ctx, "accounts", "not-a-real-password")  # type: ignore[arg-type]
            with pytest.raises(redis.ConnectionError) as refused:
                redis.Redis(**options, socket_timeout=5, retry=Retry(NoBackoff(), 0)).ping()
            return str(refused.value)

    assert "certificate verify failed" in failure_with("wrong")
    assert "certificate verify failed" not in failure_with("right")  # past TLS: the server hung up after it


def test_the_clients_are_configured_to_check_names(pki: DevPki, tmp_path: Path) -> None:
    """What the three tests above rely on, named: a change to any of these settings must come with a reason."""
    assert client_config("localhost:1", "ca.pem", "u", "p")["ssl.endpoint.identification.algorithm"] == "https"
    ctx = SimpleNamespace(settings=SimpleNamespace(public_host=HOST, postgres_port=1), ca_file=pki.ca_file)
    assert "sslmode=verify-full" in Postgres(ctx).conninfo("accounts", "x")  # type: ignore[arg-type]
    assert "host=postgres.bastion.local" in Postgres(ctx).conninfo("accounts", "x")  # type: ignore[arg-type]
