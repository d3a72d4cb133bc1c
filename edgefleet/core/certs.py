"""A private certificate authority for a small deployment or a test: the CA, the cloud's
server certificate, and device certificates signed from their requests (mutual TLS).

Keys are ECDSA P-256 (fast to make and to handshake on small devices). Private keys are
written 0600 into folders made 0700; a file is written whole or not at all.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.core.errors import InvalidArgument

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
CA_DAYS = 3650
SERVER_DAYS = 825  # what public CAs and browsers accept for a leaf at most
DEVICE_DAYS = 825


@dataclass(frozen=True)
class TlsFiles:
    """Where `init_ca` put things (folder/ca.pem, ...)."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.folder / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.folder / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.folder / SERVER_KEY


def write_secret(path: Path, data: bytes) -> None:
    """Write a file readable by its owner only (0600), atomically, in a 0700 folder."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def default_names() -> list[str]:
    """Names a server certificate made on this machine should carry: loopback, the host
    name and the fully qualified one."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()]
    return list(dict.fromkeys(n for n in names if n))


def _alt_names(names: Iterable[str]) -> list[x509.GeneralName]:
    found: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            found.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            found.append(x509.DNSName(name))
    return found


def init_ca(folder: Path, names: Iterable[str] = (), *, days: int = SERVER_DAYS) -> TlsFiles:
    """Make a CA and a server certificate for `names` (plus this machine's own) in `folder`.

    Refuses to overwrite an existing CA: devices trust it, and a new one would lock them out.
    """
    files = TlsFiles(folder)
    if files.ca_key.exists() or files.ca_cert.exists():
        raise InvalidArgument(
            f"{folder} already holds a CA ({CA_CERT}); devices trust it, so it is not "
            "replaced: use another folder, or delete it knowingly"
        )
    ca_key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet private CA")])
    now = _now()
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    write_secret(files.ca_key, _key_pem(ca_key))
    write_public(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    server_key = ec.generate_private_key(ec.SECP256R1())
    all_names = [*names, *default_names()]
    server_cert = _leaf(
        ca_cert, ca_key, server_key.public_key(), all_names[0], all_names, days, server=True
    )
    write_secret(files.server_key, _key_pem(server_key))
    write_public(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    return files


def _leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    common_name: str,
    names: Iterable[str],
    days: int,
    *,
    server: bool,
) -> x509.Certificate:
    now = _now()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_alt_names(names)), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def device_key_and_request(device_id: str) -> tuple[bytes, bytes]:
    """A new key for a device and the certificate request naming it (PEM each)."""
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id or "device")]))
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), request.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class CertificateAuthority:
    """The cloud's CA, which signs devices' certificate requests at enrollment."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, cert_file: Path, key_file: Path) -> CertificateAuthority:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InvalidArgument(f"{key_file} is not an EC private key")
        return cls(cert, key)

    def sign_device(self, request_pem: bytes, device_id: str, days: int = DEVICE_DAYS) -> bytes:
        """A client certificate for `device_id` (whatever name the request asked for)."""
        if len(request_pem) > 16 << 10:
            raise InvalidArgument("a certificate request is at most 16 KiB")
        try:
            request = x509.load_pem_x509_csr(request_pem)
        except ValueError as err:
            raise InvalidArgument(f"the certificate request does not parse: {err}") from None
        if not request.is_signature_valid:
            raise InvalidArgument("the certificate request's signature is not valid")
        public_key = request.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise InvalidArgument("a device certificate request must carry an EC key")
        cert = _leaf(self.cert, self.key, public_key, device_id, [device_id], days, server=False)
        return cert.public_bytes(serialization.Encoding.PEM)


def common_name(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def issue_server_certificate(
    authority: CertificateAuthority, names: Iterable[str], days: int = SERVER_DAYS
) -> tuple[bytes, bytes]:
    """A new key and a server certificate for `names` signed by `authority` (PEM each): for
    another server the devices reach with the same trust, e.g. an MQTT broker."""
    listed = list(dict.fromkeys(names))
    if not listed:
        raise InvalidArgument("a server certificate needs at least one host name or address")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf(
        authority.cert, authority.key, key.public_key(), listed[0], listed, days, server=True
    )
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)
