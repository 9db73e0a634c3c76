"""
Start-up refuses a spool or database that cannot work, naming the file and
the cause, before any socket is bound: meter.database.prepare and the
schema versions on real SQLite files, then the real twistd plugins' exits.

Tests run as root, whom file modes do not stop: a read-only file is made
with C{chattr +i}, a read-only filesystem with a read-only bind mount, each
undone in a finally.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from meter import cloud, database
from meter.gateway import spool
from meter.database import CLOUD_DATABASE, GATEWAY_SPOOL, Schema, Unusable, connect, prepare
from meter.tools.processes import free_port
from meter.gateway.spool import Spool
from meter.tools.suite import Suite

SPOOL = spool.VERSIONS
CLOUD = cloud.VERSIONS

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("chattr") is None, reason="needs root and chattr")


# -- files in every state --------------------------------------------------


def pragmas(path: Path) -> tuple[int, int]:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return (
            connection.execute("PRAGMA application_id").fetchone()[0],
            connection.execute("PRAGMA user_version").fetchone()[0],
        )


def tables(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return [name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]


def write_script(path: Path, script: str) -> None:
    """
    A file written as an older meter wrote it: its schema and rows, in WAL
    mode, with no version.
    """
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.executescript(script)


UNVERSIONED_SPOOL_ROWS = """
INSERT INTO chunks (day, device_id, device_ip, records, n) VALUES ('2024-05-01', 3, '192.168.1.4', '02:00,17,35', 1);
INSERT INTO parts VALUES (3, 'x1', 1, 1, '2024-05-01', 100.0);
INSERT INTO rounds VALUES ('2024-05-01', 100.0, NULL);
"""

#: A spool of one row a reading, as the first gateways wrote it.
ONE_ROW_A_READING_SPOOL = """
CREATE TABLE readings (
    seq INTEGER PRIMARY KEY, day TEXT NOT NULL, device_id INTEGER NOT NULL, device_ip TEXT NOT NULL,
    taken_at TEXT NOT NULL, temperature_c REAL NOT NULL, humidity_pct REAL NOT NULL, UNIQUE (device_id, taken_at)
);
INSERT INTO readings (day, device_id, device_ip, taken_at, temperature_c, humidity_pct)
    VALUES ('2024-05-01', 3, '192.168.1.4', '2024-05-01T02:00', 17, 35),
           ('2024-05-01', 3, '192.168.1.4', '2024-05-01T03:00', 17.5, 36);
"""


def cloud_file(path: Path, versioned: bool = True) -> Path:
    write_script(path, cloud.SCHEMA + "INSERT INTO readings VALUES (3, '192.168.1.4', '2024-05-01T02:00', 17, 35, 1.0);")
    if versioned:
        prepare(path, CLOUD)
    return path


def spool_file(path: Path, versioned: bool = True) -> Path:
    write_script(path, spool.SCHEMA + UNVERSIONED_SPOOL_ROWS)
    if versioned:
        prepare(path, SPOOL)
    return path


def not_sqlite(path: Path) -> Path:
    path.write_text("day,device,reading\n" * 300)
    return path


def bulky(path: Path, role: str = "cloud") -> Path:
    """
    A file of C{role} (current version) with a few hundred pages of rows.
    """
    (spool_file if role == "gateway" else cloud_file)(path)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as connection:
        connection.execute("BEGIN")
        if role == "gateway":
            connection.executemany(
                "INSERT INTO chunks (day, device_id, device_ip, records, n) VALUES ('2024-05-01', ?, '192.168.1.2', ?, 96)",
                [(device, ";".join(["02:00,17,35"] * 96)) for device in range(10, 1000)],
            )
        else:
            connection.executemany(
                "INSERT INTO readings VALUES (?, '192.168.1.2', ?, 17, 35, 1.0)",
                [(device, f"2024-05-01T{m // 60:02}:{m % 60:02}") for device in range(10, 15) for m in range(1440)],
            )
        connection.execute("COMMIT")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


def garbage_pages(path: Path, role: str = "cloud") -> Path:
    """
    A file whose pages past the first few are overwritten with garbage, as
    a failing disk leaves it.
    """
    bulky(path, role)
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(4096 * 3)
        f.write(bytes(range(256)) * (min(size - 4096 * 3, 4096 * 8) // 256))
    return path


def freed_pages(path: Path, role: str = "cloud") -> Path:
    """
    A file whose header miscounts its free pages (9999): SQLite opens it and
    reads every row, only C{PRAGMA quick_check} finds the damage.
    """
    bulky(path, role)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as connection:
        connection.execute(f"DELETE FROM {'chunks' if role == 'gateway' else 'readings'} WHERE device_id >= 10")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert connection.execute("PRAGMA freelist_count").fetchone()[0] > 0
    with path.open("r+b") as f:
        f.seek(36)  # the header's count of free pages
        f.write((9999).to_bytes(4, "big"))
    return path


def stat_of(path: Path) -> tuple:
    """
    What changes if a file is written: its bytes, and its companions.
    """
    companions = sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))
    return path.read_bytes(), companions


# -- versions ---------------------------------------------------------------


def test_a_new_spool_is_made_at_the_current_version_in_wal_mode(tmp_path):
    path = tmp_path / "var" / "spool.sqlite"
    prepare(path, SPOOL)
    assert pragmas(path) == (GATEWAY_SPOOL, SPOOL.version)
    assert tables(path) == ["chunks", "parts", "refused", "rounds"]
    with contextlib.closing(sqlite3.connect(path)) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_new_cloud_database_is_made_at_the_current_version(tmp_path):
    path = tmp_path / "cloud.sqlite"
    prepare(path, CLOUD)
    assert pragmas(path) == (CLOUD_DATABASE, CLOUD.version)


def test_an_unversioned_spool_of_the_right_shape_is_adopted_with_its_rows(tmp_path):
    path = spool_file(tmp_path / "spool.sqlite", versioned=False)
    assert pragmas(path) == (0, 0)
    prepare(path, SPOOL)
    assert pragmas(path) == (GATEWAY_SPOOL, SPOOL.version)
    connection, recovered = Spool.open(path)
    connection.close()
    assert recovered.depth == 1
    assert [(p.device_id, p.xfer) for p in recovered.chunks] == [(3, "x1")]
    assert [r.day.isoformat() for r in recovered.rounds] == ["2024-05-01"]


def test_a_spool_of_one_row_a_reading_is_adopted_with_its_readings_in_chunks(tmp_path):
    path = tmp_path / "spool.sqlite"
    write_script(path, ONE_ROW_A_READING_SPOOL)
    prepare(path, SPOOL)
    assert pragmas(path) == (GATEWAY_SPOOL, SPOOL.version)
    assert tables(path) == ["chunks", "parts", "refused", "rounds"]
    with contextlib.closing(sqlite3.connect(path)) as connection:
        assert connection.execute("SELECT day, device_id, records, n FROM chunks").fetchall() == [
            ("2024-05-01", 3, "02:00,17,35;03:00,17.5,36", 2)
        ]


def test_an_unversioned_cloud_database_is_adopted_with_its_rows(tmp_path):
    path = cloud_file(tmp_path / "cloud.sqlite", versioned=False)
    prepare(path, CLOUD)
    assert pragmas(path) == (CLOUD_DATABASE, CLOUD.version)
    with contextlib.closing(sqlite3.connect(path)) as connection:
        assert connection.execute("SELECT device_id, device_ip FROM readings").fetchall() == [(3, "192.168.1.4")]


def test_open_database_and_spool_open_adopt_an_unversioned_file(tmp_path):
    # The in-process openers take the same steps as start-up.
    path = cloud_file(tmp_path / "cloud.sqlite", versioned=False)
    connection = connect(path)
    cloud.open_database(connection)
    connection.close()
    assert pragmas(path) == (CLOUD_DATABASE, CLOUD.version)
    path = spool_file(tmp_path / "spool.sqlite", versioned=False)
    Spool.open(path)[0].close()
    assert pragmas(path) == (GATEWAY_SPOOL, SPOOL.version)


def test_a_version_step_takes_a_file_from_its_version_to_the_next_only(tmp_path):
    # The steps of the spool's versions, and one more: a file at the
    # current version takes only the new step.
    path = spool_file(tmp_path / "spool.sqlite")
    taken = []

    def counted(step):
        def run(connection):
            taken.append(step)
            step(connection)

        return run

    def add_a_column(connection):
        connection.execute("ALTER TABLE parts ADD COLUMN probe BLOB")

    later = Schema(GATEWAY_SPOOL, tuple(map(counted, SPOOL.steps + (add_a_column,))))
    prepare(path, later)
    assert taken == [add_a_column]
    assert pragmas(path) == (GATEWAY_SPOOL, SPOOL.version + 1)
    with contextlib.closing(sqlite3.connect(path)) as connection:
        assert "probe" in {c for (c,) in connection.execute("SELECT name FROM pragma_table_info('parts')")}
    # At its version, nothing more is done.
    prepare(path, later)
    assert taken == [add_a_column]
    # A new file takes every step, in order.
    prepare(tmp_path / "new.sqlite", later)
    assert taken == [add_a_column, *SPOOL.steps, add_a_column]


def test_a_failing_step_leaves_the_file_at_its_version_untouched(tmp_path):
    path = spool_file(tmp_path / "spool.sqlite")

    def add_a_column_and_fail(connection):
        connection.execute("ALTER TABLE parts ADD COLUMN probe BLOB")
        raise sqlite3.OperationalError("the step fails half-way")

    with pytest.raises(Unusable, match="the step fails half-way"):
        prepare(path, Schema(GATEWAY_SPOOL, SPOOL.steps + (add_a_column_and_fail,)))
    assert pragmas(path) == (GATEWAY_SPOOL, SPOOL.version)
    with contextlib.closing(sqlite3.connect(path)) as connection:
        assert "probe" not in {c for (c,) in connection.execute("SELECT name FROM pragma_table_info('parts')")}


def test_a_file_of_a_newer_version_is_refused_naming_both_versions_and_left_alone(tmp_path):
    path = spool_file(tmp_path / "spool.sqlite")
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute(f"PRAGMA user_version = {SPOOL.version + 1}")
    before = stat_of(path)
    with pytest.raises(Unusable, match=f"its schema is version {SPOOL.version + 1}, newer than this meter's {SPOOL.version}"):
        prepare(path, SPOOL)
    with pytest.raises(Unusable, match="newer than this meter's"):
        Spool.open(path)
    assert stat_of(path) == before


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "unversioned"])
def test_the_gateway_refuses_a_cloud_database_before_writing_to_it(tmp_path, versioned):
    path = cloud_file(tmp_path / "cloud.sqlite", versioned)
    before = stat_of(path)
    expected = "it is a cloud database" + ("" if versioned else r" \(unversioned\)") + ", not a gateway spool"
    with pytest.raises(Unusable, match=expected):
        prepare(path, SPOOL)
    with pytest.raises(Unusable, match=expected):
        Spool.open(path)
    assert stat_of(path) == before
    # A versioned cloud database has its devices summary (version 2).
    assert tables(path) == (["device_addresses", "devices", "readings"] if versioned else ["readings"])


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "unversioned"])
def test_the_cloud_refuses_a_gateway_spool_before_writing_to_it(tmp_path, versioned):
    path = spool_file(tmp_path / "spool.sqlite", versioned)
    before = stat_of(path)
    expected = "it is a gateway spool" + ("" if versioned else r" \(unversioned\)") + ", not a cloud database"
    with pytest.raises(Unusable, match=expected):
        prepare(path, CLOUD)
    connection = connect(path)
    try:
        with pytest.raises(Unusable, match=expected):
            cloud.open_database(connection)
    finally:
        connection.close()
    assert stat_of(path) == before


def test_an_sqlite_file_of_neither_kind_is_refused_naming_its_table(tmp_path):
    path = tmp_path / "other.sqlite"
    write_script(path, "CREATE TABLE invoices (id INTEGER PRIMARY KEY);")
    with pytest.raises(Unusable, match="not a gateway spool: it holds a table invoices, which a gateway spool has not"):
        prepare(path, SPOOL)
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("PRAGMA application_id = 1234")
    with pytest.raises(Unusable, match="not a meter file"):
        prepare(path, CLOUD)
    path = tmp_path / "rounds.sqlite"
    write_script(path, "CREATE TABLE rounds (day TEXT);")
    with pytest.raises(Unusable, match="^not a gateway spool: its table rounds lacks the column.s. closed_at, opened_at$"):
        prepare(path, SPOOL)


def test_a_script_runs_inside_the_transaction_under_way(tmp_path):
    # executescript would commit first; a step's statements must not.
    with contextlib.closing(sqlite3.connect(tmp_path / "x.sqlite", isolation_level=None)) as connection:
        connection.execute("BEGIN")
        database.execute_script(connection, "-- a comment; with a semicolon\nCREATE TABLE a (x);\nCREATE TABLE b (y);\n")
        assert connection.in_transaction
        connection.execute("ROLLBACK")
        assert connection.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)


# -- files that cannot work ---------------------------------------------------


def test_a_file_that_is_not_sqlite_is_refused(tmp_path):
    path = not_sqlite(tmp_path / "spool.sqlite")
    with pytest.raises(Unusable, match="^not an SQLite database$"):
        prepare(path, SPOOL)


def test_a_folder_is_refused(tmp_path):
    (tmp_path / "spool.sqlite").mkdir()
    with pytest.raises(Unusable, match="^not a regular file$"):
        prepare(tmp_path / "spool.sqlite", SPOOL)


def test_a_database_with_garbage_pages_is_refused_as_corrupt(tmp_path):
    path = garbage_pages(tmp_path / "cloud.sqlite")
    with pytest.raises(Unusable, match="^corrupt: "):
        prepare(path, CLOUD)


def test_damage_sqlite_reads_past_is_found_by_quick_check(tmp_path):
    path = freed_pages(tmp_path / "cloud.sqlite")
    with contextlib.closing(sqlite3.connect(path)) as connection:
        assert connection.execute("SELECT count(*) FROM readings").fetchone() == (1,)
    with pytest.raises(Unusable, match=r"^corrupt: PRAGMA quick_check says .*Main freelist: size is \d+ but should be 9999$"):
        prepare(path, CLOUD)


@contextlib.contextmanager
def holding_lock(path: Path, begin: str):
    """
    Another process holding a transaction begun with C{begin} on C{path}.
    """
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), begin], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.stdin.close()
        holder.wait(10)


HOLDER = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute(sys.argv[2])
connection.execute("PRAGMA user_version")
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("begin", ["BEGIN IMMEDIATE", "BEGIN EXCLUSIVE"])
def test_a_file_locked_by_another_process_is_refused_as_locked(tmp_path, begin):
    path = spool_file(tmp_path / "spool.sqlite")
    with holding_lock(path, begin):
        with pytest.raises(Unusable, match="^locked by another process"):
            prepare(path, SPOOL)


def test_a_rollback_journal_file_locked_exclusively_is_refused_as_locked(tmp_path):
    # Not in WAL mode, an exclusive lock stops even a reader.
    path = tmp_path / "spool.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.executescript(spool.SCHEMA)
    with holding_lock(path, "BEGIN EXCLUSIVE"):
        with pytest.raises(Unusable, match="^locked by another process"):
            prepare(path, SPOOL)


@contextlib.contextmanager
def immutable(path: Path):
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@contextlib.contextmanager
def read_only_mount(folder: Path):
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@needs_root
@pytest.mark.parametrize("make", [spool_file, lambda path: None], ids=["existing", "new"])
def test_a_file_on_a_read_only_filesystem_is_refused(tmp_path, make):
    folder = tmp_path / "ro"
    folder.mkdir()
    make(folder / "spool.sqlite")
    with read_only_mount(folder):
        with pytest.raises(Unusable, match="^read-only: its filesystem is mounted read-only$"):
            prepare(folder / "spool.sqlite", SPOOL)


@needs_root
def test_a_read_only_file_is_refused(tmp_path):
    path = spool_file(tmp_path / "spool.sqlite")
    with immutable(path):
        with pytest.raises(Unusable, match="^read-only: the file is not writable$"):
            prepare(path, SPOOL)


@needs_root
def test_a_wal_file_in_a_read_only_folder_is_refused(tmp_path):
    # The file itself is writable, but its write-ahead log cannot be made.
    folder = tmp_path / "ro"
    folder.mkdir()
    path = spool_file(folder / "spool.sqlite")
    assert sorted(p.name for p in folder.iterdir()) == ["spool.sqlite"]
    with immutable(folder):
        with pytest.raises(Unusable, match=f"^read-only: its folder {folder} is not writable, so SQLite cannot create its write-ahead log"):
            prepare(path, SPOOL)


# -- the daemons' exits --------------------------------------------------------


@pytest.fixture
def suite(make_suite):
    return make_suite(2)


ROLES = {
    # role: (plugin, option naming its file, what the message calls it)
    "gateway": ("meter-gateway", "--spool", "spool"),
    "cloud": ("meter-cloud", "--db", "database"),
}


def refused(suite: Suite, role: str, path: Path, cause: str, *args: str) -> None:
    """
    The real plugin started on C{path} exits non-zero with exactly one line,
    naming the file and C{cause} (a regular expression), and binds nothing.
    """
    plugin, option, noun = ROLES[role]
    daemon = suite.start(role, plugin, option, str(path), *args)
    assert daemon.wait(30) != 0
    assert len(daemon.lines) == 1, daemon.tail()
    assert re.fullmatch(f"{plugin}: cannot open {noun} {re.escape(str(path))}: {cause}", daemon.lines[0]), daemon.lines


@pytest.mark.e2e
@pytest.mark.parametrize("role", ROLES)
def test_the_daemons_refuse_a_file_that_is_not_sqlite(suite, role):
    refused(suite, role, not_sqlite(suite.root / "file.sqlite"), "not an SQLite database")


@pytest.mark.e2e
@pytest.mark.parametrize("role", ROLES)
def test_the_daemons_refuse_a_file_with_garbage_pages(suite, role):
    refused(suite, role, garbage_pages(suite.root / "file.sqlite", role), "corrupt: .*")


@pytest.mark.e2e
@pytest.mark.parametrize("role", ROLES)
def test_the_daemons_refuse_damage_sqlite_reads_past(suite, role):
    path = freed_pages(suite.root / "file.sqlite", role)
    refused(suite, role, path, r"corrupt: PRAGMA quick_check says .*Main freelist: size is \d+ but should be 9999")


@pytest.mark.e2e
def test_the_gateway_refuses_a_cloud_database_and_leaves_it_alone(suite):
    path = cloud_file(suite.root / "cloud.sqlite", versioned=False)
    before = stat_of(path)
    refused(suite, "gateway", path, r"it is a cloud database \(unversioned\), not a gateway spool")
    assert stat_of(path) == before


@pytest.mark.e2e
def test_the_cloud_refuses_a_gateway_spool_and_leaves_it_alone(suite):
    path = spool_file(suite.root / "spool.sqlite")
    before = stat_of(path)
    refused(suite, "cloud", path, "it is a gateway spool, not a cloud database")
    assert stat_of(path) == before


@pytest.mark.e2e
@pytest.mark.parametrize("role", ROLES)
def test_the_daemons_refuse_a_file_of_a_newer_version(suite, role):
    path = (spool_file if role == "gateway" else cloud_file)(suite.root / "file.sqlite")
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("PRAGMA user_version = 99")
    known = (SPOOL if role == "gateway" else CLOUD).version
    refused(suite, role, path, rf"its schema is version 99, newer than this meter's {known} \(written by a newer meter\)")


@pytest.mark.e2e
@pytest.mark.parametrize("role", ROLES)
def test_the_daemons_refuse_a_locked_file(suite, role):
    path = (spool_file if role == "gateway" else cloud_file)(suite.root / "file.sqlite")
    with holding_lock(path, "BEGIN IMMEDIATE"):
        refused(suite, role, path, r"locked by another process \(.*\)")


@pytest.mark.e2e
@needs_root
@pytest.mark.parametrize("role", ROLES)
def test_the_daemons_refuse_a_read_only_file(suite, role):
    path = (spool_file if role == "gateway" else cloud_file)(suite.root / "file.sqlite")
    with immutable(path):
        refused(suite, role, path, "read-only: the file is not writable")


@pytest.mark.e2e
@needs_root
@pytest.mark.parametrize("role", ROLES)
def test_the_daemons_refuse_a_wal_file_in_a_read_only_folder(suite, role):
    folder = suite.root / "ro"
    folder.mkdir()
    path = (spool_file if role == "gateway" else cloud_file)(folder / "file.sqlite")
    with immutable(folder):
        refused(suite, role, path, f"read-only: its folder {folder} is not writable, .*")


@pytest.mark.e2e
@needs_root
@pytest.mark.parametrize("role", ROLES)
def test_the_daemons_refuse_a_file_on_a_read_only_filesystem(suite, role):
    folder = suite.root / "ro"
    folder.mkdir()
    path = (spool_file if role == "gateway" else cloud_file)(folder / "file.sqlite")
    with read_only_mount(folder):
        refused(suite, role, path, "read-only: its filesystem is mounted read-only")


@pytest.mark.e2e
def test_a_second_gateway_on_a_running_gateways_spool_is_refused(suite):
    # SQLite's locks last a transaction: between two, a second daemon would
    # open the file and work beside the first.
    first = suite.start_gateway()
    other_port = free_port(socket.SOCK_DGRAM)
    refused(suite, "gateway", suite.spool, r"in use by another process \(a meter daemon is running on it\)",
            "--listen", f"127.0.0.1:{other_port}")
    assert first.process.poll() is None


@pytest.mark.e2e
def test_a_second_cloud_on_a_running_clouds_database_is_refused(suite):
    first = suite.start_cloud()
    other_port = free_port(socket.SOCK_STREAM)
    refused(suite, "cloud", suite.db, r"in use by another process \(a meter daemon is running on it\)",
            "--listen", f"tcp:{other_port}:interface=127.0.0.1")
    assert first.process.poll() is None


@contextlib.contextmanager
def full_disk(folder: Path):
    """
    A small tmpfs at C{folder}, for the test to fill; unmounted after.
    """
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(folder)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def fill(folder: Path) -> None:
    descriptor = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for _ in range(1024):  # 4 MB at most, far past the tmpfs's 512 KB
            os.write(descriptor, b"x" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    else:
        raise AssertionError("the tmpfs did not fill")
    finally:
        os.close(descriptor)


@needs_root
@pytest.mark.parametrize("existing", [True, False], ids=["existing", "new"])
def test_a_file_on_a_full_disk_is_refused(tmp_path, existing):
    folder = tmp_path / "small"
    folder.mkdir()
    with full_disk(folder):
        path = folder / "spool.sqlite"
        if existing:
            prepare(path, SPOOL)
        fill(folder)
        with pytest.raises(Unusable, match=r"^the disk is full( \(\d+ bytes free\))?$"):
            prepare(path, SPOOL)


@pytest.mark.e2e
@needs_root
@pytest.mark.parametrize("role", ROLES)
def test_the_daemons_refuse_a_file_on_a_full_disk(suite, role):
    folder = suite.root / "small"
    folder.mkdir()
    with full_disk(folder):
        path = folder / "file.sqlite"
        prepare(path, SPOOL if role == "gateway" else CLOUD)
        fill(folder)
        refused(suite, role, path, r"the disk is full \(\d+ bytes free\)")


def test_a_file_another_process_holds_is_refused_before_anything_is_written(tmp_path):
    # A newer meter started beside a running one must not upgrade the
    # running one's file, nor take the write lock it needs, before it is
    # refused.
    path = tmp_path / "spool.sqlite"
    prepare(path, SPOOL)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys; d = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(d, fcntl.LOCK_EX);"
         " print('held', flush=True); sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        newer = Schema(GATEWAY_SPOOL, SPOOL.steps + (lambda c: c.execute("CREATE TABLE later (x)"),))
        with pytest.raises(Unusable, match=r"in use by another process"):
            database.claim(path, newer)
        assert pragmas(path) == (GATEWAY_SPOOL, SPOOL.version)
        assert "later" not in tables(path)
    finally:
        holder.stdin.close()
        holder.wait(10)
