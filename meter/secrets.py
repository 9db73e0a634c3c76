"""
The suite's secrets, in one folder:

    ca.crt, ca.key            a small certificate authority
    cloud.crt, cloud.key      the cloud's TLS certificate (DNS name meter-cloud)
    gateway.crt, gateway.key  the gateway's TLS client certificate
    devices/device<N>.key     each device's HMAC-SHA256 key, 32 random bytes in hex

`meter certs DIR` creates whatever is missing, never replacing a file.  A
daemon with `[security] generate = true` (the loopback default) creates the
whole set at start only when the folder holds none of it, so a fresh checkout
runs with no set-up; a folder that holds some of it is provisioned, and a
missing file is then an error at start naming it.  Generating into a
provisioned folder would make a new CA that no other host trusts.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import stat
from pathlib import Path

from meter.files import sync_folder

#: The name the cloud's certificate carries and the gateway verifies.
CLOUD_NAME = "meter-cloud"
KEY_BYTES = 32
#: The suite's files besides the device keys, by name in the folder.
TLS_FILES = ("ca.crt", "ca.key", "cloud.crt", "cloud.key", "gateway.crt", "gateway.key")
#: TLS 1.2 only with an ephemeral key exchange and an AEAD cipher; TLS 1.3's
#: suites all are.  Certificates are ECDSA, so only ECDHE-ECDSA suites can
#: actually be chosen.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!PSK:!aNULL"


class SecretError(ValueError):
    """
    A secret is missing, unreadable, unsafe or inconsistent: the message
    names the file.
    """


def device_key_path(folder: Path, device_id: int) -> Path:
    return folder / "devices" / f"device{device_id}.key"


def present(folder: Path) -> list[Path]:
    """
    The suite's files that exist in C{folder}: the TLS files and any
    device key, whatever the fleet.
    """
    found = [folder / name for name in TLS_FILES if os.path.lexists(folder / name)]
    devices = folder / "devices"
    if devices.is_dir():
        found += sorted(devices.glob("device*.key"))
    return found


#: Missing files named in one refusal, at most: a fleet of thousands
#: provisioned nowhere would otherwise make a line of megabytes.
MISSING_NAMED = 10


def _missing(paths: list[Path]) -> SecretError:
    names = ", ".join(str(path) for path in paths[:MISSING_NAMED])
    if len(paths) > MISSING_NAMED:
        names += f" and {len(paths) - MISSING_NAMED} more files"
    return SecretError(
        f"missing {names}: provision {'them' if len(paths) > 1 else 'it'} from the host where "
        f"`meter certs` made the suite's secrets ([security] generate creates secrets only in a "
        f"folder that holds none of them)"
    )


def require(folder: Path, paths: list[Path]) -> None:
    """
    Refuse, naming every one of C{paths} that does not exist (once any
    process creating secrets in C{folder} is done).
    """
    _wait_for_writer(folder)
    missing = [path for path in paths if not os.path.lexists(path)]
    if missing:
        raise _missing(missing)


def read_private(path: Path) -> bytes:
    """
    The bytes of a key file that only its owner may read.
    """
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise SecretError(f"{path}: not a regular file")
        if mode & 0o077:
            raise SecretError(
                f"{path}: mode {stat.S_IMODE(mode):04o} lets group or others at this key: chmod 600 {path}"
            )
        return path.read_bytes()
    except FileNotFoundError:
        raise _missing([path]) from None
    except OSError as e:
        raise SecretError(f"cannot read {path}: {e.strerror}") from None


def read_device_key(folder: Path, device_id: int) -> bytes:
    path = device_key_path(folder, device_id)
    text = read_private(path)
    try:
        key = bytes.fromhex(text.decode("ascii").strip())
    except ValueError:  # UnicodeDecodeError included
        raise SecretError(f"{path}: not a hex key") from None
    if len(key) < KEY_BYTES:
        raise SecretError(f"{path}: key of {len(key)} bytes, at least {KEY_BYTES} needed")
    return key


def read_fleet_keys(folder: Path, fleet) -> dict[int, bytes]:
    """
    The key of every device of C{fleet}; refuses naming every missing key
    file at once.
    """
    require(folder, [device_key_path(folder, device_id) for device_id in fleet])
    return {device_id: read_device_key(folder, device_id) for device_id in fleet}


def _write_new(
    path: Path, data: bytes, mode: int = 0o600, sync: bool = True, owner: tuple[int, int] | None = None
) -> None:
    """
    Write C{path} only if it does not exist yet, atomically: a reader never
    sees a half-written secret, and an existing file is never replaced.
    The data goes to a temporary file opened with O_EXCL, then link(2)
    gives it its name, which fails with EEXIST like O_EXCL would.  Without
    C{sync} the caller fsyncs the folder once it wrote them all.
    With C{owner} (uid, gid) the file is theirs before it has its name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise SecretError(f"{path} exists: not replaced") from None
    finally:
        os.unlink(temporary)
    if sync:
        sync_folder(path.parent)


@contextlib.contextmanager
def _locked(folder: Path):
    # One writer at a time: the certificates must all be signed by the one
    # CA that ends up on disk.
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _wait_for_writer(folder: Path) -> None:
    """
    Wait until no process is creating secrets in C{folder}: a writer takes
    the lock before it writes its first file, so a reader that found some
    files waits here for the rest.  A folder with no lock file had no
    writer (it was provisioned).
    """
    try:
        fd = os.open(folder / ".lock", os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def generate(folder: Path, fleet) -> list[Path]:
    """
    What a daemon does with C{[security] generate = true}: when C{folder}
    holds none of the suite's files, create them all (the CA, both
    certificates, a key for each device of C{fleet}); when it holds any,
    create nothing.  The files created.  If creating fails part way, the
    files this call made are removed again, so the folder is left as found.
    """
    if present(folder):
        _wait_for_writer(folder)
        return []
    created: list[Path] = []
    with _locked(folder):
        if present(folder):
            return []
        try:
            _create(folder, fleet, created)
        except BaseException:
            for path in created:
                path.unlink(missing_ok=True)
            raise
    return created


def create(folder: Path, fleet) -> list[Path]:
    """
    C{meter certs}: create what is missing in C{folder}: the CA, the
    cloud's and gateway's certificates, and a key for each device of
    C{fleet}.  Existing files are kept, never replaced; a certificate whose
    key is missing (or the reverse), or one to sign without C{ca.key}, is
    refused.  The files created.
    """
    created: list[Path] = []
    with _locked(folder):
        _create(folder, fleet, created)
    return created


def create_device_keys(folder: Path, device_ids) -> tuple[list[Path], list[Path]]:
    """
    C{meter fleet add}: a key for each of C{device_ids} in C{folder} that
    has none, never replacing one (a key kept belongs to a device already
    holding it, or to an earlier add that stopped part way).  The files
    created and the files kept.  One fsync of the folder for them all, so
    thousands take seconds.
    """
    created: list[Path] = []
    kept: list[Path] = []
    with _locked(folder):
        # Run as root in the service user's folder: a new key is the user's
        # like the keys there, or the gateway (mode 0600) could not read it,
        # on SIGHUP nor at its next start.
        owner = _keys_owner(folder) if os.geteuid() == 0 else None
        try:
            for device_id in device_ids:
                path = device_key_path(folder, device_id)
                if os.path.lexists(path):
                    kept.append(path)
                    continue
                _write_new(path, os.urandom(KEY_BYTES).hex().encode() + b"\n", sync=False, owner=owner)
                created.append(path)
        finally:
            if created:
                sync_folder(created[0].parent)
    return created, kept


def _keys_owner(folder: Path) -> tuple[int, int] | None:
    """
    The owner and group of the keys C{folder} holds: its gateway's key's,
    else a device key's; None if it holds neither.
    """
    devices = folder / "devices"
    try:
        with os.scandir(devices) as entries:
            device_key = next((Path(e.path) for e in entries if e.name.endswith(".key")), None)
    except OSError:
        device_key = None
    for path in (folder / "gateway.key", device_key):
        if path is None:
            continue
        try:
            status = os.stat(path)
        except OSError:
            continue
        return status.st_uid, status.st_gid
    return None


def _create(folder: Path, fleet, created: list[Path]) -> None:
    for device_id in fleet:
        path = device_key_path(folder, device_id)
        if not os.path.lexists(path):
            _write_new(path, os.urandom(KEY_BYTES).hex().encode() + b"\n")
            created.append(path)
    _create_certificates(folder, created)


def _create_certificates(folder: Path, created: list[Path]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    pem_key = lambda key: key.private_bytes(  # noqa: E731
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meter"), x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def unpaired(first: Path, second: Path) -> None:
        # Replacing the half that exists would leave whatever else relies on
        # it (a host holding the old certificate) trusting another key.
        have, missing = (first, second) if os.path.lexists(first) else (second, first)
        raise SecretError(f"{have} exists without {missing}: not replaced (restore {missing}, or remove {have} to make a new pair)")

    ca_cert_path, ca_key_path = folder / "ca.crt", folder / "ca.key"
    ca_cert = ca_key = None
    if os.path.lexists(ca_cert_path) and os.path.lexists(ca_key_path):
        key_pem, cert_pem = read_private(ca_key_path), _read(ca_cert_path)
        try:
            ca_key = serialization.load_pem_private_key(key_pem, None)
            ca_cert = x509.load_pem_x509_certificate(cert_pem)
        except (ValueError, TypeError) as e:
            raise SecretError(f"{ca_cert_path} or {ca_key_path}: not a PEM certificate and key: {e}") from None
    elif os.path.lexists(ca_key_path):
        unpaired(ca_key_path, ca_cert_path)
    elif not os.path.lexists(ca_cert_path):
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
        _write_new(ca_key_path, pem_key(ca_key))
        created.append(ca_key_path)
        _write_new(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        created.append(ca_cert_path)

    for role, usage, names in (
        ("cloud", ExtendedKeyUsageOID.SERVER_AUTH, [x509.DNSName(CLOUD_NAME)]),
        ("gateway", ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("meter-gateway")]),
    ):
        cert_path, key_path = folder / f"{role}.crt", folder / f"{role}.key"
        if os.path.lexists(cert_path) and os.path.lexists(key_path):
            continue
        if os.path.lexists(cert_path) or os.path.lexists(key_path):
            unpaired(cert_path, key_path)
        if ca_key is None:
            raise SecretError(
                f"cannot make {cert_path}: {ca_key_path} is missing ({ca_cert_path} is kept; "
                f"run meter certs where ca.key is kept)"
            )
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
        _write_new(key_path, pem_key(key))
        created.append(key_path)
        _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        created.append(cert_path)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SecretError(f"cannot read {path}: {e.strerror}") from None


def tls_files(folder: Path, role: str) -> list[Path]:
    """
    What the host of C{role} ("cloud" or "gateway") needs for TLS: the CA's
    certificate, its own certificate and its key.
    """
    return [folder / "ca.crt", folder / f"{role}.crt", folder / f"{role}.key"]


def _own_certificate(folder: Path, role: str):
    """
    C{role}'s certificate and key, and the CAs it trusts, as Twisted's
    types, once checked to belong together: the key is the certificate's
    and a CA of C{ca.crt} signed the certificate.  C{ca.crt} may hold more
    than one CA (the old and the new one while a CA is replaced).  A folder
    mixing two CAs is refused here rather than at every handshake.
    """
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from twisted.internet import ssl

    ca_path, cert_path, key_path = tls_files(folder, role)
    require(folder, [ca_path, cert_path, key_path])
    key_pem, cert_pem, ca_pem = read_private(key_path), _read(cert_path), _read(ca_path)
    try:
        key = serialization.load_pem_private_key(key_pem, None)
    except (ValueError, TypeError) as e:
        raise SecretError(f"{key_path}: not an unencrypted PEM private key: {e}") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise SecretError(f"{cert_path}: not a PEM certificate: {e}") from None
    try:
        authorities = x509.load_pem_x509_certificates(ca_pem)
    except ValueError as e:
        raise SecretError(f"{ca_path}: not a PEM certificate: {e}") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise SecretError(f"{key_path} is not the key of {cert_path}")

    def signed_by(authority) -> bool:
        try:
            cert.verify_directly_issued_by(authority)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    if not any(map(signed_by, authorities)):
        raise SecretError(
            f"{cert_path} is not signed by {ca_path}: the folder mixes two CAs, and the peer would refuse the handshake"
        )
    trusted = [ssl.Certificate.loadPEM(authority.public_bytes(serialization.Encoding.PEM)) for authority in authorities]
    return ssl.PrivateCertificate.loadPEM(key_pem + cert_pem), ssl.trustRootFromCertificates(trusted)


def tls_policy() -> dict:
    """
    The protocol versions and cipher suites both ends accept, as
    L{twisted.internet.ssl.CertificateOptions} arguments.
    """
    from twisted.internet import ssl

    return {
        "raiseMinimumTo": ssl.TLSVersion.TLSv1_2,
        "acceptableCiphers": ssl.AcceptableCiphers.fromOpenSSLCipherString(CIPHERS),
    }


def server_tls(folder: Path):
    """
    The cloud's TLS options: its certificate, and only clients whose
    certificate the suite's CA signed.
    """
    from twisted.internet import ssl

    own, authorities = _own_certificate(folder, "cloud")
    return ssl.CertificateOptions(
        privateKey=own.privateKey.original,
        certificate=own.original,
        trustRoot=authorities,
        **tls_policy(),
    )


def client_tls(folder: Path, server_name: str = CLOUD_NAME):
    """
    The gateway's TLS options: its client certificate, and a cloud whose
    certificate the suite's CA signed for C{server_name}.
    """
    from twisted.internet import ssl

    own, authorities = _own_certificate(folder, "gateway")
    return ssl.optionsForClientTLS(
        server_name, trustRoot=authorities, clientCertificate=own, extraCertificateOptions=tls_policy()
    )
