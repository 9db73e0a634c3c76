"""
The suite's secrets, in one folder:

    ca.crt, ca.key            a small certificate authority
    cloud.crt, cloud.key      the cloud's TLS certificate (DNS name meter-cloud)
    gateway.crt, gateway.key  the gateway's TLS client certificate
    devices/device<N>.key     each device's HMAC-SHA256 key, 32 random bytes in hex

`meter certs DIR` creates whatever is missing; with `[security] generate =
true` (the loopback default) a daemon does the same at start, so a fresh
checkout runs with no set-up.  In production, provision the folder instead
(each device holding only its own key) and set `generate = false`: a missing
file is then an error at start.
"""

from __future__ import annotations

import datetime
import fcntl
import os
from pathlib import Path

#: The name the cloud's certificate carries and the gateway verifies.
CLOUD_NAME = "meter-cloud"
KEY_BYTES = 32


class SecretError(ValueError):
    """
    A secret is missing or unreadable: the message names the file.
    """


def device_key_path(folder: Path, device_id: int) -> Path:
    return folder / "devices" / f"device{device_id}.key"


def read_device_key(folder: Path, device_id: int) -> bytes:
    path = device_key_path(folder, device_id)
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise SecretError(f"no key for device {device_id} at {path}: {getattr(e, 'strerror', e)} "
                          f"(create the fleet's keys with: meter certs {folder})") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise SecretError(f"{path}: not a hex key") from None
    if len(key) < 16:
        raise SecretError(f"{path}: key of {len(key)} bytes, at least 16 needed")
    return key


def read_fleet_keys(folder: Path, fleet) -> dict[int, bytes]:
    return {device_id: read_device_key(folder, device_id) for device_id in fleet}


def _write_new(path: Path, data: bytes, mode: int = 0o600) -> None:
    """
    Write C{path} only if it does not exist yet, atomically: a reader never
    sees a half-written secret, and of two writers one wins and the other
    keeps the winner's file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(temporary)


def create(folder: Path, fleet) -> list[Path]:
    """
    Create what is missing in C{folder}: the CA, the cloud's and gateway's
    certificates, and a key for each device of C{fleet}.  Existing files are
    kept.  The files created.
    """
    folder.mkdir(parents=True, exist_ok=True)
    created = []
    # One process at a time: the certificates must all be signed by the one
    # CA that ends up on disk.
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for device_id in fleet:
            path = device_key_path(folder, device_id)
            if not path.exists():
                _write_new(path, os.urandom(KEY_BYTES).hex().encode() + b"\n")
                created.append(path)
        created += _create_certificates(folder)
    return created


def _create_certificates(folder: Path) -> list[Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    created = []
    now = datetime.datetime.now(datetime.timezone.utc)
    pem_key = lambda key: key.private_bytes(  # noqa: E731
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meter"), x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_cert_path, ca_key_path = folder / "ca.crt", folder / "ca.key"
    if ca_cert_path.exists() and ca_key_path.exists():
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name("meter CA"))
            .issuer_name(name("meter CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        for path in (ca_cert_path, ca_key_path):
            path.unlink(missing_ok=True)
        _write_new(ca_key_path, pem_key(ca_key))
        _write_new(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        created += [ca_key_path, ca_cert_path]

    for role, usage, names in (
        ("cloud", ExtendedKeyUsageOID.SERVER_AUTH, [x509.DNSName(CLOUD_NAME)]),
        ("gateway", ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("meter-gateway")]),
    ):
        cert_path, key_path = folder / f"{role}.crt", folder / f"{role}.key"
        if cert_path.exists() and key_path.exists():
            continue
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(f"meter-{role}"))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        for path in (cert_path, key_path):
            path.unlink(missing_ok=True)
        _write_new(key_path, pem_key(key))
        _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        created += [key_path, cert_path]
    return created


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SecretError(f"cannot read {path}: {e.strerror} (create it with: meter certs {path.parent})") from None


def server_tls(folder: Path):
    """
    The cloud's TLS options: its certificate, and only clients whose
    certificate the suite's CA signed.
    """
    from twisted.internet import ssl

    own = ssl.PrivateCertificate.loadPEM(_read(folder / "cloud.key") + _read(folder / "cloud.crt"))
    authority = ssl.Certificate.loadPEM(_read(folder / "ca.crt"))
    return own.options(authority)


def client_tls(folder: Path, server_name: str = CLOUD_NAME):
    """
    The gateway's TLS options: its client certificate, and a cloud whose
    certificate the suite's CA signed for C{server_name}.
    """
    from twisted.internet import ssl

    own = ssl.PrivateCertificate.loadPEM(_read(folder / "gateway.key") + _read(folder / "gateway.crt"))
    authority = ssl.Certificate.loadPEM(_read(folder / "ca.crt"))
    return ssl.optionsForClientTLS(server_name, trustRoot=authority, clientCertificate=own)
