"""
Renewal of the cloud's and the gateway's TLS certificates (`meter certs
DIR`, docs/operations.md): a certificate that expires within the window
(30 days unless told otherwise), or every one when forced, is issued again
by the CA of the folder, for the same names, uses and key, valid for
another L{VALIDITY}.

The CA is never changed: C{ca.crt} and C{ca.key} are read, never written,
so every host keeps trusting the renewed certificates without a change.
The leaf's key is kept too: the renewed certificate is for the same public
key, so the key file is not touched and no host ever holds a certificate
and key that do not belong together, whichever it reads first.

A renewed certificate is the one file that is ever replaced (everything
else in the folder is written once, L{meter.secrets}): written under a
temporary name, synced, then renamed over the old one, so a daemon reading
it at any moment reads the old one or the new one, whole.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import attrs

from meter.files import sync_folder
from meter import secrets

#: How long a certificate (re)issued here is valid, as when first made.
VALIDITY = datetime.timedelta(days=825)
#: A certificate that expires within this is renewed by `meter certs`.
RENEW_WITHIN = datetime.timedelta(days=30)
#: The certificates renewed: the CA's own is not.
ROLES = ("cloud", "gateway")


@attrs.frozen
class Renewed:
    """
    A certificate issued again: its file, and the end of its validity
    before and after.
    """

    path: Path
    expired_at: datetime.datetime
    expires_at: datetime.datetime


def _utc(stamp: datetime.datetime) -> str:
    return stamp.strftime("%Y-%m-%d %H:%M UTC")


def describe(renewed: Renewed) -> str:
    return (
        f"renewed {renewed.path}: valid until {_utc(renewed.expires_at)} (was {_utc(renewed.expired_at)}); "
        f"same CA, same key"
    )


def _load_certificate(path: Path):
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(secrets._read(path))
    except ValueError as e:
        raise secrets.SecretError(f"{path}: not a PEM certificate: {e}") from None


def expiry(path: Path) -> datetime.datetime:
    """
    When the certificate at C{path} stops being valid (UTC).
    """
    return _load_certificate(path).not_valid_after_utc


def _replace(path: Path, data: bytes, mode: int = 0o644) -> None:
    """
    Replace C{path} by C{data} atomically: a temporary file beside it,
    synced, renamed over it, and the folder synced.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.renew.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    sync_folder(path.parent)


def renew(
    folder: Path,
    within: datetime.timedelta = RENEW_WITHIN,
    force: bool = False,
    now: datetime.datetime | None = None,
    validity: datetime.timedelta = VALIDITY,
) -> list[Renewed]:
    """
    Issue again each of the cloud's and gateway's certificates in C{folder}
    that expires within C{within} of C{now} (all of them with C{force}),
    signed by the folder's CA, for the same key; valid for C{validity},
    but never beyond the CA's own end.  What was renewed.

    Refused (L{secrets.SecretError}, naming the file) if a certificate due
    cannot be renewed: C{ca.key} is not here, the certificate is not the
    CA's, or its key is not the certificate's.
    """
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization

    now = now or datetime.datetime.now(datetime.timezone.utc)
    renewed: list[Renewed] = []
    with secrets._locked(folder):
        due = []
        for role in ROLES:
            cert_path = folder / f"{role}.crt"
            if not os.path.lexists(cert_path):
                continue
            cert = _load_certificate(cert_path)
            if force or cert.not_valid_after_utc - now <= within:
                due.append((role, cert_path, cert))
        if not due:
            return []
        ca_cert_path, ca_key_path = folder / "ca.crt", folder / "ca.key"
        if not os.path.lexists(ca_key_path):
            raise secrets.SecretError(
                f"cannot renew {', '.join(str(path) for _, path, _ in due)}: {ca_key_path} is missing "
                f"(run meter certs where ca.key is kept, then copy the renewed certificates to their hosts)"
            )
        ca_key = serialization.load_pem_private_key(secrets.read_private(ca_key_path), None)
        ca_cert = _load_certificate(ca_cert_path)
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if ca_key.public_key().public_bytes(*spki) != ca_cert.public_key().public_bytes(*spki):
            raise secrets.SecretError(f"{ca_key_path} is not the key of {ca_cert_path}")
        for role, cert_path, cert in due:
            try:
                cert.verify_directly_issued_by(ca_cert)
            except (ValueError, TypeError, InvalidSignature):
                raise secrets.SecretError(
                    f"cannot renew {cert_path}: not signed by {ca_cert_path} (renewal keeps the CA; "
                    f"make a new pair with meter certs after removing {cert_path} and its key)"
                ) from None
            key_path = folder / f"{role}.key"
            key = serialization.load_pem_private_key(secrets.read_private(key_path), None)
            if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
                raise secrets.SecretError(f"cannot renew {cert_path}: {key_path} is not its key")
            builder = (
                x509.CertificateBuilder()
                .subject_name(cert.subject)
                .issuer_name(ca_cert.subject)
                .public_key(cert.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(min(now + validity, ca_cert.not_valid_after_utc))
            )
            # The same names, uses and constraints as the certificate it
            # replaces: peers check these, not the dates.
            for extension in cert.extensions:
                builder = builder.add_extension(extension.value, extension.critical)
            new = builder.sign(ca_key, hashes.SHA256())
            _replace(cert_path, new.public_bytes(serialization.Encoding.PEM))
            renewed.append(Renewed(cert_path, cert.not_valid_after_utc, new.not_valid_after_utc))
    return renewed


def ca_expiring(folder: Path, within: datetime.timedelta, now: datetime.datetime | None = None) -> str | None:
    """
    A warning if the folder's CA expires within C{within}: renewal keeps
    the CA, so a CA near its end needs replacing (docs/operations.md).
    """
    path = folder / "ca.crt"
    if not path.exists():
        return None
    now = now or datetime.datetime.now(datetime.timezone.utc)
    ends = expiry(path)
    if ends - now > within:
        return None
    return (
        f"{path} expires {_utc(ends)}: renewal keeps the CA, and no certificate it signs outlives it; "
        f"roll out a new CA (docs/operations.md, Certificate renewal)"
    )
