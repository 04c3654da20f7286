"""Transport labs: connections without a dev-CA client certificate, clients that skip TLS, and the stack
reached from the network instead of loopback."""

import ipaddress
import socket
import ssl
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
from confluent_kafka.admin import AdminClient

from bastion.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from bastion.devstack.pki import DevPki
from bastion.grpc.channels import call_metadata, channel_credentials
from bastion.grpc.server import TlsFiles
from bastion.labs.base import Evidence
from bastion.labs.platform import Answer, LabSetupError, Session, answer, new_correlation_id

# Kafka's ApiVersions request (key 18, version 0), framed as a client would send it in the clear.
API_VERSIONS = struct.pack(">hhih", 18, 0, 1, 7) + b"lab-raw"
TLS_ALERT = 21  # the first byte of a TLS alert record


def _list_accounts(channel: grpc.Channel, token: str, correlation_id: str) -> Answer:
    stub = accounts_pb2_grpc.AccountsStub(channel)  # type: ignore[no-untyped-call]
    return answer(lambda: stub.ListAccounts(accounts_pb2.ListAccountsRequest(),
                                            metadata=call_metadata(token, correlation_id), timeout=10))


def no_client_certificate(session: Session) -> Iterator[Evidence]:
    address = session.target.addresses["accounts"]
    token = session.user_token("alice")
    calibration = _list_accounts(session.channel("accounts"), token, new_correlation_id("no-client-cert"))
    if not calibration.ok:
        raise LabSetupError(f"accounts refused the bastion command's certificate ({calibration}): is it running?")
    yield Evidence("the bastion command's dev-CA certificate + alice's token (calibration)", "OK")
    watch = session.watch()
    ca = session.ctx.ca_file.read_bytes()
    with tempfile.TemporaryDirectory(prefix="bastion-lab-") as folder:
        rogue = DevPki(Path(folder), leaf_days=1, reissue_when_days_left=0)
        rogue.ensure(["cli"])  # a CA of the attacker's own, and a `cli` certificate it signed
        attempts = {
            "TLS without a client certificate": grpc.ssl_channel_credentials(root_certificates=ca),
            "a client certificate from another CA": channel_credentials(
                TlsFiles(rogue.paths("cli").cert, rogue.paths("cli").key, session.ctx.ca_file)),
        }
        for what, credentials in attempts.items():
            with grpc.secure_channel(address, credentials) as channel:
                result = _list_accounts(channel, token, new_correlation_id("no-client-cert"))
            yield _unavailable(what, result)
    with grpc.insecure_channel(address) as channel:
        yield _unavailable("plaintext HTTP/2, no TLS at all", _list_accounts(channel, token,
                                                                            new_correlation_id("no-client-cert")))
    refused = watch.log_lines("accounts", "call_refused", "no-client-cert", wait_seconds=0)
    yield Evidence("accounts log", "no call_refused line: the handshake failed before any interceptor or handler ran"
                   if not refused else f"{len(refused)} call_refused line(s): the calls got past TLS")


def _unavailable(what: str, result: Answer) -> Evidence:
    if result.ok:
        return Evidence(what, "OK: answered without a dev-CA client certificate", False)
    return Evidence(what, str(result), result.code == grpc.StatusCode.UNAVAILABLE)


def plaintext_broker(session: Session) -> Iterator[Evidence]:
    settings = session.ctx.settings
    metadata = _client_listener_answers(session)
    yield Evidence("a SASL_SSL client with the admin's password (calibration)", f"OK: {metadata} topics listed")
    frame = struct.pack(">i", len(API_VERSIONS)) + API_VERSIONS
    with socket.create_connection((settings.bind_host, settings.kafka_port), timeout=5) as conn:
        conn.sendall(frame)
        try:
            reply = conn.recv(4096)
        except (ConnectionResetError, TimeoutError):
            reply = b""
    spoke_kafka = reply != b"" and reply[0] != TLS_ALERT
    yield Evidence("a Kafka ApiVersions request in the clear to the client listener",
                   f"answered in Kafka's protocol ({len(reply)} bytes)" if spoke_kafka else
                   f"no Kafka answer: {'a TLS alert' if reply else 'the connection closed'}", not spoke_kafka)
    yield Evidence("a TLS client without a certificate at the controller listener", *_controller_verdict(session))


def _client_listener_answers(session: Session) -> int:
    topics = AdminClient(session.kafka_config("admin")).list_topics(timeout=10).topics
    return len(topics)


def _controller_verdict(session: Session) -> tuple[str, bool]:
    """Under TLS 1.3 the server checks the client certificate after the handshake: a refusal arrives as an alert
    on the first read, while an accepted client sees the controller wait for the rest of its request."""
    settings = session.ctx.settings
    context = ssl.create_default_context(cafile=str(session.ctx.ca_file))
    try:
        with (
            socket.create_connection((settings.bind_host, settings.kafka_controller_port), timeout=3) as raw,
            context.wrap_socket(raw, server_hostname=settings.public_host) as tls,
        ):
            tls.sendall(b"\x00")
            tls.recv(1)
    except TimeoutError:
        return "accepted: the controller waited for the rest of the request", False
    except ssl.SSLCertVerificationError as error:
        # This side refused the listener's certificate before the controller was asked for anything.
        raise LabSetupError(f"the lab did not trust the certificate on the controller's port ({error}): "
                            "the lab cannot tell") from None
    except (ssl.SSLError, ConnectionResetError) as error:
        return f"refused: {type(error).__name__}: {error}", True
    return "accepted: the connection stayed open", False


def _listeners(session: Session) -> dict[str, int]:
    settings = session.ctx.settings
    ports = {"postgres": settings.postgres_port, "redis": settings.redis_port, "kafka": settings.kafka_port,
             "kafka controller": settings.kafka_controller_port, "keycloak": settings.keycloak_port,
             "keycloak management": settings.keycloak_management_port}
    ports.update({name: int(address.rsplit(":", 1)[1]) for name, address in session.target.addresses.items()})
    return ports


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def network_exposure(session: Session) -> Iterator[Evidence]:
    listeners = _listeners(session)
    closed = sorted(name for name, port in listeners.items() if not _connects(session.ctx.settings.bind_host, port))
    if closed:
        raise LabSetupError(f"not listening on {session.ctx.settings.bind_host}: {', '.join(closed)}")
    yield Evidence(f"{len(listeners)} listeners on {session.ctx.settings.bind_host} (calibration)", "all accept")
    # IPv6 too: a listener bound to `::` would answer there while every IPv4 address looked closed.
    outside = sorted({address.address for addresses in psutil.net_if_addrs().values() for address in addresses
                      if address.family in (socket.AF_INET, socket.AF_INET6)
                      and not ipaddress.ip_address(address.address).is_loopback})
    if not outside:
        raise LabSetupError("this machine has no network address but loopback: there is no outside to probe from")
    for host in outside:
        reached = sorted(f"{name} ({port})" for name, port in listeners.items() if _connects(host, port))
        yield Evidence(f"every listener at this machine's address {host}",
                       f"reachable: {', '.join(reached)}" if reached else "connection refused on every port",
                       not reached)
