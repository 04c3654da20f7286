"""The dev PKI: a local CA and, per component, a short-lived certificate carrying its SPIFFE identity.

Leaf certificates are re-issued when they near expiry, when the CA changed, or when their names no longer
match, so `make setup` and `bastion up` can run any number of times.
"""

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bastion.devstack.layout import write_private
from bastion.grpc.names import server_name, spiffe_id

CA_DAYS = 365
CA_REISSUE_DAYS_LEFT = 30
ORGANIZATION = "Bastion dev install"


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class IssuedPaths:
    cert: Path
    key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _subject(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def create_ca(common_name: str = "Bastion dev CA", days: int = CA_DAYS) -> CertificateAuthority:
    """A fresh self-signed CA that may only sign end-entity certificates (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _subject(common_name)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert, key)


def issue_certificate(
    ca: CertificateAuthority, name: str, days: int,
    alternative_names: Sequence[x509.GeneralName] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf for component NAME, usable as TLS server and client: SANs localhost, 127.0.0.1, the DNS name only
    NAME's certificate holds (`server_name`: what the kit's clients ask a server for), SPIFFE URI.
    ALTERNATIVE_NAMES replaces those SANs (an empty list leaves the extension out): tests use it to show that
    a dev-CA certificate without exactly one Bastion identity is refused."""
    if alternative_names is None:
        alternative_names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                             x509.DNSName(server_name(name)), x509.UniformResourceIdentifier(spiffe_id(name))]
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if alternative_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(alternative_names)), critical=False)
    return builder.sign(ca.key, hashes.SHA256()), key


class DevPki:
    """The PKI folder of a dev install: ca.pem, ca-key.pem, and NAME.pem / NAME-key.pem per component."""

    def __init__(self, folder: Path, leaf_days: int, reissue_when_days_left: int) -> None:
        self.folder = folder
        self.leaf_days = leaf_days
        self.reissue_when_days_left = reissue_when_days_left

    @property
    def ca_file(self) -> Path:
        return self.folder / "ca.pem"

    def paths(self, name: str) -> IssuedPaths:
        return IssuedPaths(self.folder / f"{name}.pem", self.folder / f"{name}-key.pem")

    def authority(self) -> CertificateAuthority:
        """The dev CA (created if the folder has none yet)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return self._ensure_ca()[0]

    def write(self, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> IssuedPaths:
        """Store a leaf as NAME.pem and NAME-key.pem (the key readable by its owner only)."""
        paths = self.paths(name)
        write_private(paths.key, _key_pem(key))
        paths.cert.write_bytes(_pem(cert))
        return paths

    def ensure(self, names: list[str]) -> list[str]:
        """Make sure the CA and every named leaf are present and fresh; return the names (re)issued."""
        self.folder.mkdir(parents=True, exist_ok=True)
        ca, ca_renewed = self._ensure_ca()
        issued = []
        for name in names:
            if ca_renewed or self._needs_leaf(ca, name):
                cert, key = issue_certificate(ca, name, self.leaf_days)
                self.write(name, cert, key)
                issued.append(name)
        return issued

    def _ensure_ca(self) -> tuple[CertificateAuthority, bool]:
        key_file = self.folder / "ca-key.pem"
        if self.ca_file.exists() and key_file.exists():
            cert = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            fresh = cert.not_valid_after_utc - _now() > dt.timedelta(days=CA_REISSUE_DAYS_LEFT)
            if fresh and isinstance(key, ec.EllipticCurvePrivateKey):
                return CertificateAuthority(cert, key), False
        ca = create_ca()
        write_private(key_file, _key_pem(ca.key))
        self.ca_file.write_bytes(_pem(ca.cert))
        return ca, True

    def _needs_leaf(self, ca: CertificateAuthority, name: str) -> bool:
        paths = self.paths(name)
        if not (paths.cert.exists() and paths.key.exists()):
            return True
        cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
        if cert.issuer != ca.cert.subject:
            return True
        try:
            cert.verify_directly_issued_by(ca.cert)
        except (ValueError, TypeError, InvalidSignature):
            return True
        left = cert.not_valid_after_utc - _now()
        if left < dt.timedelta(days=self.reissue_when_days_left):
            return True
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return (spiffe_id(name) not in sans.get_values_for_type(x509.UniformResourceIdentifier)
                or server_name(name) not in sans.get_values_for_type(x509.DNSName))
