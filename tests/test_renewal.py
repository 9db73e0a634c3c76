"""
Certificate renewal (meter/renewal.py, `meter certs DIR`): a certificate
near its end is issued again by the same CA for the same key, replacing
the file atomically, and the real cloud and gateway connect with it.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from meter import renewal, secrets

UTC = datetime.timezone.utc


def meter(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meter.tools.cli", *args], capture_output=True, text=True, timeout=120)


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def contents(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.fixture
def folder(tmp_path) -> Path:
    folder = tmp_path / "secrets"
    secrets.create(folder, {1: "192.168.1.2"})
    return folder


def test_nothing_is_renewed_far_from_expiry(folder):
    before = contents(folder)
    assert renewal.renew(folder) == []
    assert contents(folder) == before


def test_a_certificate_near_its_end_is_renewed_with_the_same_ca_and_key(folder):
    now = datetime.datetime(2026, 12, 1, 4, 30, tzinfo=UTC)
    # Issued to end in 5 days: inside the 30-day window.
    renewal.renew(folder, force=True, now=now, validity=datetime.timedelta(days=5))
    before = contents(folder)
    old_cloud = certificate(folder / "cloud.crt")
    assert old_cloud.not_valid_after_utc == now + datetime.timedelta(days=5)

    renewed = renewal.renew(folder, now=now)

    assert [r.path.name for r in renewed] == ["cloud.crt", "gateway.crt"]
    after = contents(folder)
    changed = {name for name in after if after[name] != before[name]}
    assert changed == {"cloud.crt", "gateway.crt"}  # the CA, the keys, the device keys untouched
    assert set(after) == set(before)  # no temporary file left
    ca = certificate(folder / "ca.crt")
    for role in ("cloud", "gateway"):
        new, old = certificate(folder / f"{role}.crt"), x509.load_pem_x509_certificate(before[f"{role}.crt"])
        new.verify_directly_issued_by(ca)
        assert new.not_valid_after_utc == now + renewal.VALIDITY
        assert new.subject == old.subject and new.public_key() == old.public_key()
        assert list(new.extensions) == list(old.extensions)
        assert new.serial_number != old.serial_number
    assert renewal.describe(renewed[0]) == (
        f"renewed {folder}/cloud.crt: valid until 2029-03-05 04:30 UTC (was 2026-12-06 04:30 UTC); same CA, same key"
    )
    # Both still load as each daemon loads them.
    secrets.server_tls(folder)
    secrets.client_tls(folder)


def test_renewal_without_the_ca_key_is_refused_naming_it(folder):
    (folder / "ca.key").unlink()
    before = contents(folder)
    with pytest.raises(secrets.SecretError, match=r"cannot renew .*cloud.crt, .*gateway.crt: .*ca.key is missing"):
        renewal.renew(folder, force=True)
    assert contents(folder) == before


def test_a_renewed_certificate_never_outlives_its_ca(folder):
    ca_end = certificate(folder / "ca.crt").not_valid_after_utc
    now = ca_end - datetime.timedelta(days=10)
    (renewed, _) = renewal.renew(folder, now=now)
    assert renewed.expires_at == ca_end
    assert "renewal keeps the CA" in renewal.ca_expiring(folder, renewal.RENEW_WITHIN, now)


def test_meter_certs_renews_what_expires_soon_and_the_real_daemons_connect_with_it(make_suite):
    """
    The suite's certificates, issued to end in 3 days, are renewed by
    `meter certs DIR` (its 30-day window), the CA byte for byte the same;
    the real cloud and gateway then deliver a day over TLS with them.
    """
    suite = make_suite(devices=1, keys=True)
    folder = suite.secrets
    renewal.renew(folder, force=True, validity=datetime.timedelta(days=3))
    ca_before = (folder / "ca.crt").read_bytes(), (folder / "ca.key").read_bytes()

    kept = meter("certs", str(folder), "--config", str(suite.config), "--renew-within", "1")
    assert kept.returncode == 0, kept.stderr
    assert "renewed" not in kept.stdout

    done = meter("certs", str(folder), "--config", str(suite.config))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"renewed {folder}/cloud.crt: valid until ")
    assert lines[1].startswith(f"renewed {folder}/gateway.crt: valid until ")
    assert ((folder / "ca.crt").read_bytes(), (folder / "ca.key").read_bytes()) == ca_before
    ca = certificate(folder / "ca.crt")
    for role in ("cloud", "gateway"):
        cert = certificate(folder / f"{role}.crt")
        cert.verify_directly_issued_by(ca)
        assert cert.not_valid_after_utc - datetime.datetime.now(UTC) > datetime.timedelta(days=800)

    cloud = suite.start_cloud()
    suite.start_gateway(connected=True)
    assert suite.start_device(1).wait(60) == 0
    suite.wait_stored(4, cloud)
