"""The dev PKI: names, usages, lifetimes, renewal, and refusal of certificates from another CA."""

import datetime as dt
import ipaddress
import socket
import ssl
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from bastion.devstack.layout import write_private
from bastion.devstack.pki import DevPki, create_ca, issue_certificate
from bastion.grpc.names import server_name, spiffe_id


@pytest.fixture()
def pki(tmp_path: Path) -> DevPki:
    return DevPki(tmp_path / "pki", leaf_days=7, reissue_when_days_left=2)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def install_ca(pki: DevPki, days: int) -> x509.Certificate:
    """A CA of DAYS left, as an earlier `bastion setup` would have left it in the folder."""
    ca = create_ca(days=days)
    key = ca.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(pki.folder / "ca-key.pem", key)
    pki.ca_file.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    return ca.cert


def test_leaf_carries_loopback_names_its_own_server_name_and_spiffe_identity(pki: DevPki) -> None:
    pki.ensure(["payments"])
    cert = load(pki.paths("payments").cert)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "payments.bastion.local"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://bastion.local/service/payments"]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=7, minutes=5)
    assert cert.not_valid_before_utc < dt.datetime.now(dt.UTC) - dt.timedelta(minutes=4), "a clock a bit behind"
    cert.verify_directly_issued_by(load(pki.ca_file))


def test_a_leaf_is_an_end_entity_that_cannot_sign_certificates(pki: DevPki) -> None:
    """A stolen service key must not become a CA of the platform's trust domain."""
    pki.ensure(["payments"])
    cert = load(pki.paths("payments").cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical, "a verifier must not ignore it"
    assert usage.value.digital_signature and not usage.value.key_cert_sign and not usage.value.crl_sign


def test_private_keys_are_owner_only(pki: DevPki) -> None:
    pki.ensure(["kafka"])
    for key in (pki.paths("kafka").key, pki.folder / "ca-key.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_ensure_is_idempotent_and_renews_near_expiry(tmp_path: Path) -> None:
    pki = DevPki(tmp_path, leaf_days=7, reissue_when_days_left=2)
    assert pki.ensure(["a", "b"]) == ["a", "b"]
    assert pki.ensure(["a", "b"]) == []
    near_expiry = DevPki(tmp_path, leaf_days=7, reissue_when_days_left=8)
    assert near_expiry.ensure(["a"]) == ["a"]


@pytest.mark.parametrize(("days", "replaced"), [(20, True), (60, False)])
def test_a_ca_within_30_days_of_its_end_is_replaced_and_every_leaf_reissued(
    pki: DevPki, days: int, replaced: bool
) -> None:
    pki.folder.mkdir(parents=True)
    old = install_ca(pki, days)
    pki.ensure(["a"])
    assert (load(pki.ca_file).serial_number != old.serial_number) is replaced
    assert pki.ensure(["b"]) == ["b"], "the CA is not replaced again"
    load(pki.paths("a").cert).verify_directly_issued_by(load(pki.ca_file))


def test_a_ca_whose_key_is_lost_is_replaced(pki: DevPki) -> None:
    pki.ensure(["a"])
    (pki.folder / "ca-key.pem").unlink()
    assert pki.ensure(["a"]) == ["a"]
    assert stat.S_IMODE((pki.folder / "ca-key.pem").stat().st_mode) == 0o600
    load(pki.paths("a").cert).verify_directly_issued_by(load(pki.ca_file))


def _leaf_of_another_ca_with_the_same_name(pki: DevPki) -> None:
    pki.write("a", *issue_certificate(create_ca(), "a", 7))


def _leaf_naming_another_component(pki: DevPki) -> None:
    pki.write("a", *issue_certificate(pki.authority(), "b", 7))


def _leaf_whose_key_is_lost(pki: DevPki) -> None:
    pki.paths("a").key.unlink()


def _leaf_without_its_server_name(pki: DevPki) -> None:
    """As issued before clients asked each server for its own name: an install upgraded gets it at `bastion up`."""
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
             x509.UniformResourceIdentifier(spiffe_id("a"))]
    pki.write("a", *issue_certificate(pki.authority(), "a", 7, alternative_names=names))


@pytest.mark.parametrize(
    "spoil",
    [_leaf_of_another_ca_with_the_same_name, _leaf_naming_another_component, _leaf_whose_key_is_lost,
     _leaf_without_its_server_name],
    ids=["another-ca-of-the-same-name", "another-component", "key-lost", "no-server-name"],
)
def test_a_leaf_that_cannot_serve_its_component_is_reissued(pki: DevPki, spoil: Callable[[DevPki], None]) -> None:
    pki.ensure(["a"])
    spoil(pki)
    assert pki.ensure(["a"]) == ["a"]
    cert = load(pki.paths("a").cert)
    cert.verify_directly_issued_by(load(pki.ca_file))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe_id("a")]
    assert server_name("a") in sans.get_values_for_type(x509.DNSName)
    assert pki.paths("a").key.exists()


def test_certificate_of_another_ca_is_reissued(tmp_path: Path) -> None:
    pki = DevPki(tmp_path, leaf_days=7, reissue_when_days_left=2)
    pki.ensure(["a"])
    (tmp_path / "ca.pem").unlink()
    assert pki.ensure(["a"]) == ["a"]
    load(pki.paths("a").cert).verify_directly_issued_by(load(pki.ca_file))


def test_spiffe_id_shape() -> None:
    assert spiffe_id("audit") == "spiffe://bastion.local/service/audit"


def _serve_once(context: ssl.SSLContext, listener: socket.socket) -> None:
    conn, _ = listener.accept()
    try:
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)
    except (ssl.SSLError, OSError):
        pass


def _handshake(server_pki: DevPki, client_ca: Path, hostname: str) -> None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    paths = server_pki.paths("kafka")
    server_ctx.load_cert_chain(paths.cert, paths.key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = threading.Thread(target=_serve_once, args=(server_ctx, listener), daemon=True)
        thread.start()
        client_ctx = ssl.create_default_context(cafile=str(client_ca))
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=5) as raw,
                client_ctx.wrap_socket(raw, server_hostname=hostname) as tls,
            ):
                tls.sendall(b"x")
        finally:
            thread.join(timeout=5)


def test_tls_handshake_verifies_against_dev_ca_with_hostname_checks(pki: DevPki) -> None:
    pki.ensure(["kafka"])
    _handshake(pki, pki.ca_file, "localhost")
    _handshake(pki, pki.ca_file, "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(pki, pki.ca_file, "example.com")


def test_certificate_from_another_ca_is_refused(pki: DevPki, tmp_path: Path) -> None:
    pki.ensure(["kafka"])
    other = DevPki(tmp_path / "other", leaf_days=7, reissue_when_days_left=2)
    other.ensure(["kafka"])
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        _handshake(other, pki.ca_file, "localhost")


def test_ca_is_constrained_to_sign_leaves_only() -> None:
    ca = create_ca()
    constraints = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0


def test_the_ca_key_signs_certificates_and_nothing_else() -> None:
    """Not TLS handshakes nor data: a CA key used for anything else is a CA key exposed to more than signing."""
    usage = create_ca().cert.extensions.get_extension_for_class(x509.KeyUsage)
    value = usage.value
    assert usage.critical and value.key_cert_sign
    assert not value.digital_signature and not value.content_commitment and not value.key_encipherment
    assert not value.data_encipherment and not value.key_agreement


def test_the_ca_lives_one_year() -> None:
    cert = create_ca().cert
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=365, minutes=5)


def test_a_leaf_names_its_own_ca_as_issuer() -> None:
    ca = create_ca("Another dev CA")
    cert, _ = issue_certificate(ca, "cli", 1)
    assert cert.issuer == ca.cert.subject
    cert.verify_directly_issued_by(ca.cert)


def test_an_empty_list_of_names_leaves_the_san_extension_out() -> None:
    """What tests use to show that a dev-CA certificate with no SAN at all is refused: it must really have none."""
    cert, _ = issue_certificate(create_ca(), "cli", 1, alternative_names=[])
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
