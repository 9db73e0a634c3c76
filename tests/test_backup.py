"""
`meter backup` and `meter restore` (meter/tools/backup.py): a copy taken
while the real daemon runs holds its data, and a daemon started on the
restored copy serves it.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meter import database
from meter.cloud import VERSIONS as CLOUD_VERSIONS
from meter.gateway.spool import VERSIONS as SPOOL_VERSIONS
from meter.tools.backup import BackupError, backup, restore


def meter(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meter.tools.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def identity(path: Path) -> tuple[int, int, str]:
    with sqlite3.connect(path) as connection:
        return (
            connection.execute("PRAGMA application_id").fetchone()[0],
            connection.execute("PRAGMA user_version").fetchone()[0],
            connection.execute("PRAGMA journal_mode").fetchone()[0],
        )


def cloud_database(path: Path, rows: int) -> None:
    database.prepare(path, CLOUD_VERSIONS)
    with sqlite3.connect(path) as connection:
        connection.executemany(
            "INSERT INTO readings (device_id, device_ip, taken_at, temperature_c, humidity_pct, stored_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(1, "192.168.1.2", f"2026-11-30T{hour:02d}:00", 17.0, 35.0, 0.0) for hour in range(rows)],
        )


def test_backup_of_a_cloud_database_is_a_checked_single_file(tmp_path):
    source = tmp_path / "cloud.sqlite"
    cloud_database(source, 3)
    copy = backup(source, tmp_path / "backups" / "cloud-1.sqlite")
    assert copy.summary() == f"{tmp_path}/backups/cloud-1.sqlite: cloud database, schema version {CLOUD_VERSIONS.version}, 3 readings"
    assert identity(tmp_path / "backups" / "cloud-1.sqlite") == (database.CLOUD_DATABASE, CLOUD_VERSIONS.version, "delete")
    assert sorted(p.name for p in (tmp_path / "backups").iterdir()) == ["cloud-1.sqlite"]


def test_backup_never_replaces_a_file(tmp_path):
    source = tmp_path / "cloud.sqlite"
    cloud_database(source, 1)
    (tmp_path / "old.sqlite").write_bytes(b"an older backup")
    with pytest.raises(BackupError, match="old.sqlite exists: not replaced"):
        backup(source, tmp_path / "old.sqlite")
    assert (tmp_path / "old.sqlite").read_bytes() == b"an older backup"


def test_backup_refuses_what_is_no_meter_file(tmp_path):
    with sqlite3.connect(tmp_path / "other.sqlite") as connection:
        connection.execute("CREATE TABLE t (x)")
    with pytest.raises(BackupError, match=r"other.sqlite: not a gateway spool or a cloud database \(application_id 0x0\)"):
        backup(tmp_path / "other.sqlite", tmp_path / "copy.sqlite")
    with pytest.raises(BackupError, match="missing.sqlite: no such file"):
        backup(tmp_path / "missing.sqlite", tmp_path / "copy.sqlite")
    assert not (tmp_path / "copy.sqlite").exists()


def test_restore_refuses_a_file_a_daemon_holds(tmp_path):
    cloud_database(tmp_path / "cloud.sqlite", 2)
    backup(tmp_path / "cloud.sqlite", tmp_path / "backup.sqlite")
    # A daemon's lock on its file: meter.database.hold's flock, from
    # another open file (as another process has).
    held = os.open(tmp_path / "cloud.sqlite", os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BackupError, match="cloud.sqlite is in use by a running meter daemon: stop it first"):
            restore(tmp_path / "backup.sqlite", tmp_path / "cloud.sqlite", replace=True)
    finally:
        os.close(held)


def test_restore_replaces_only_when_asked_and_keeps_the_old_file_aside(tmp_path):
    cloud_database(tmp_path / "cloud.sqlite", 2)
    backup(tmp_path / "cloud.sqlite", tmp_path / "backup.sqlite")
    cloud_database(tmp_path / "now.sqlite", 5)
    with pytest.raises(BackupError, match="now.sqlite exists: pass --replace"):
        restore(tmp_path / "backup.sqlite", tmp_path / "now.sqlite")
    copy, aside = restore(
        tmp_path / "backup.sqlite", tmp_path / "now.sqlite", replace=True, now=datetime.datetime(2026, 12, 1, 4, 30)
    )
    assert copy.readings == 2
    assert aside == tmp_path / "now.sqlite.before-restore-20261201T043000"
    with sqlite3.connect(aside) as connection:
        assert connection.execute("SELECT count(*) FROM readings").fetchone() == (5,)
    with sqlite3.connect(tmp_path / "now.sqlite") as connection:
        assert connection.execute("SELECT count(*) FROM readings").fetchone() == (2,)


def test_restore_refuses_a_backup_of_a_newer_meter(tmp_path):
    cloud_database(tmp_path / "cloud.sqlite", 1)
    with sqlite3.connect(tmp_path / "cloud.sqlite") as connection:
        connection.execute(f"PRAGMA user_version = {CLOUD_VERSIONS.version + 1}")
    with pytest.raises(BackupError, match="newer than this meter's"):
        restore(tmp_path / "cloud.sqlite", tmp_path / "restored.sqlite")
    assert not (tmp_path / "restored.sqlite").exists()


def test_spool_backed_up_while_the_gateway_runs_is_forwarded_from_its_restored_copy(make_suite, tmp_path):
    """
    A gateway holds a device's day it could not forward (no cloud); its
    spool is backed up while it runs, restored to a new place, and a
    gateway started on the restored copy forwards the day to a cloud,
    which then holds every reading once.  The cloud's database, backed up
    while the cloud runs, holds them too.
    """
    suite = make_suite(devices=1)
    gateway = suite.start_gateway()
    device = suite.start_device(1)
    assert device.wait(60) == 0, device.tail()
    day = datetime.date.fromtimestamp(time.time()) - datetime.timedelta(days=1)

    made = meter("backup", str(suite.spool), str(tmp_path / "spool-backup.sqlite"))
    assert made.returncode == 0, made.stderr
    assert made.stdout.endswith(
        "gateway spool, schema version 4, 4 readings not yet acknowledged by the cloud\n"
    ), made.stdout
    assert identity(tmp_path / "spool-backup.sqlite")[:2] == (database.GATEWAY_SPOOL, SPOOL_VERSIONS.version)

    # The running gateway's own file is not for restoring over.
    refused = meter("restore", "--replace", str(tmp_path / "spool-backup.sqlite"), str(suite.spool))
    assert refused.returncode == 1
    assert refused.stderr == f"meter restore: {suite.spool} is in use by a running meter daemon: stop it first\n"
    # And the backup left it working: the gateway still takes a day.
    again = suite.start_device(1, name="device 1 again")
    assert again.wait(60) == 0, again.tail()

    restored = tmp_path / "elsewhere" / "spool.sqlite"
    done = meter("restore", str(tmp_path / "spool-backup.sqlite"), str(restored))
    assert done.returncode == 0, done.stderr
    gateway.stop()

    cloud = suite.start_cloud()
    suite.start_gateway("--spool", str(restored), connected=True)
    suite.wait_stored(4, cloud)
    assert suite.stored() == suite.expected_rows(day)

    made = meter("backup", str(suite.db), str(tmp_path / "cloud-backup.sqlite"))
    assert made.returncode == 0, made.stderr
    with sqlite3.connect(tmp_path / "cloud-backup.sqlite") as connection:
        rows = connection.execute(
            "SELECT device_id, device_ip, taken_at, temperature_c, humidity_pct FROM readings ORDER BY taken_at"
        ).fetchall()
    assert rows == suite.expected_rows(day)
