"""The dev PKI: names, usages, lifetimes, renewal, and refusal of certificates from another CA."""

import datetime as dt
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from bastion.devstack.pki import DevPki, create_ca, spiffe_id


@pytest.fixture()
def pki(tmp_path: Path) -> DevPki:
    return DevPki(tmp_path / "pki", leaf_days=7, reissue_when_days_left=2)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_leaf_carries_loopback_names_and_spiffe_identity(pki: DevPki) -> None:
    pki.ensure(["payments"])
    cert = load(pki.paths("payments").cert)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://bastion.local/service/payments"]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=7, minutes=5)
    cert.verify_directly_issued_by(load(pki.ca_file))


def test_a_leaf_is_an_end_entity_that_cannot_sign_certificates(pki: DevPki) -> None:
    """A stolen service key must not become a CA of the platform's trust domain."""
    pki.ensure(["payments"])
    cert = load(pki.paths("payments").cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and not usage.crl_sign


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
