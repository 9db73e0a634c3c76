"""
`meter readings` for people: the database found from the configuration,
filters by device (id or address) and time, a limit, clear refusals, and
an end that stays quiet when its reader goes (`| head`).
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from meter import config
from meter.cloud import open_database
from meter.database import connect
from meter.gateway.spool import Spool
from meter.tools import cli

ROWS = [
    (1, "192.168.1.2", "2026-11-29T23:00", 10.0, 30.0),
    (1, "192.168.1.2", "2026-11-30T08:00", 11.0, 31.0),
    (2, "192.168.1.3", "2026-11-30T08:00", 12.0, 32.0),
    (2, "192.168.1.3", "2026-11-30T12:00", 13.0, 33.0),
    (1, "192.168.1.2", "2026-12-01T00:00", 14.0, 34.0),
]


def cloud_database(path: Path, rows=ROWS) -> Path:
    connection = connect(path)
    open_database(connection)
    with connection:
        connection.executemany("INSERT INTO readings VALUES (?, ?, ?, ?, ?, 1.0)", rows)
        # Each address a device's readings were stored with, as the store keeps them.
        connection.execute("INSERT INTO device_addresses SELECT DISTINCT device_ip, device_id FROM readings")
    connection.close()
    return path


def csv_rows(capsys, *args: str) -> list[str]:
    assert cli.main(["readings", *args, "--format", "csv"]) == 0
    return capsys.readouterr().out.splitlines()[1:]


@pytest.fixture
def in_repository(tmp_path, monkeypatch) -> Path:
    """
    A folder laid out as the repository root: etc/meter.toml naming the
    cloud's database var/cloud.sqlite, which holds L{ROWS}.
    """
    (tmp_path / "etc").mkdir()
    (tmp_path / "var").mkdir()
    (tmp_path / "etc" / "meter.toml").write_text(config.render({"cloud": {"db": "var/cloud.sqlite"}}, config.DEFAULT_FLEET))
    cloud_database(tmp_path / "var" / "cloud.sqlite")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_database_is_found_from_the_configuration(in_repository, capsys):
    assert len(csv_rows(capsys)) == 5
    # --config names another file; --db still wins over both.
    other = cloud_database(in_repository / "other.sqlite", ROWS[:1])
    (in_repository / "other.toml").write_text(config.render({"cloud": {"db": str(other)}}, config.DEFAULT_FLEET))
    assert len(csv_rows(capsys, "--config", "other.toml")) == 1
    assert len(csv_rows(capsys, "--config", "other.toml", "--db", "var/cloud.sqlite")) == 5


def test_a_device_by_id_or_by_address(in_repository, capsys):
    assert csv_rows(capsys, "--device", "2") == ["2,192.168.1.3,2026-11-30T08:00,12,32", "2,192.168.1.3,2026-11-30T12:00,13,33"]
    assert csv_rows(capsys, "--device", "192.168.1.3") == csv_rows(capsys, "--device", "2")
    assert csv_rows(capsys, "--device", "9") == []


def test_from_and_to_by_date_take_whole_days_and_by_time_end_before_it(in_repository, capsys):
    day = csv_rows(capsys, "--from", "2026-11-30", "--to", "2026-11-30")
    assert [row.split(",")[2] for row in day] == ["2026-11-30T08:00", "2026-11-30T08:00", "2026-11-30T12:00"]
    assert [row.split(",")[2] for row in csv_rows(capsys, "--from", "2026-11-30T08:00", "--to", "2026-11-30T12:00")] == [
        "2026-11-30T08:00", "2026-11-30T08:00"]
    assert len(csv_rows(capsys, "--to", "2026-11-30 08:00")) == 1


def test_a_limit_shows_the_first_and_says_there_are_more(in_repository, capsys):
    assert cli.main(["readings", "--limit", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in out[1:3]] == ["2026-11-29T23:00", "2026-11-30T08:00"]
    assert out[-1] == "(2 readings; more beyond --limit)"
    assert cli.main(["readings", "--limit", "5"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "(5 readings)"


@pytest.mark.parametrize(
    "args, refusal",
    [
        (("--from", "2026-11-30T08:00+01:00"),
         "--from: '2026-11-30T08:00+01:00' has a zone: readings are stamped in their device's local time, give it without one"),
        (("--to", "30.11.2026"), "--to: expected a date (2026-11-30) or a date and time (2026-11-30T08:00), got '30.11.2026'"),
        (("--from", "2026-11-30+01:00"), "--from: '2026-11-30+01:00' has a zone"),
        (("--device", "gateway"), "--device: device address 'gateway' is not an IP address"),
        (("--limit", "-1"), "--limit: expected 0 or more, got -1"),
    ],
)
def test_a_bad_filter_is_named(in_repository, capsys, args, refusal):
    assert cli.main(["readings", *args]) == 2
    assert capsys.readouterr().err.startswith(f"meter readings: {refusal}")


def test_no_database_names_where_it_was_looked_for(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["readings"]) == 2
    assert capsys.readouterr().err == (
        "meter readings: no database at var/cloud.sqlite ([cloud] db of embedded defaults) "
        "(run where the cloud runs, or give --db PATH or --config FILE)\n"
    )
    assert cli.main(["readings", "--db", "nowhere.sqlite"]) == 2
    assert capsys.readouterr().err == "meter readings: no database at nowhere.sqlite (--db)\n"


def test_a_database_that_is_not_the_clouds_is_named(tmp_path, capsys):
    spool = tmp_path / "spool.sqlite"
    connection, _ = Spool.open(spool)
    connection.close()
    assert cli.main(["readings", "--db", str(spool)]) == 2
    assert capsys.readouterr().err == f"meter readings: {spool} is a gateway spool, not the cloud's database (--db)\n"
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE t (x)")
    assert cli.main(["readings", "--db", str(other)]) == 2
    assert capsys.readouterr().err == (
        f"meter readings: {other} is not a meter cloud database (--db): no such table: readings\n"
    )
    text = tmp_path / "notes.txt"
    text.write_text("not a database at all, but long enough to be read as one's header " * 10)
    assert cli.main(["readings", "--db", str(text)]) == 2
    assert capsys.readouterr().err.startswith(f"meter readings: {text} is not a meter cloud database (--db): file is not a database")


def test_a_reader_that_goes_away_ends_it_quietly(tmp_path):
    rows = [(n % 50 + 1, f"10.0.0.{n % 50 + 1}", f"2026-11-{1 + n // 1440:02d}T{n % 1440 // 60:02d}:{n % 60:02d}", 1.0, 2.0)
            for n in range(20000)]
    db = cloud_database(tmp_path / "cloud.sqlite", rows)
    # `meter readings ... | head -1`: the reader closes after one line.
    process = subprocess.Popen(
        [sys.executable, "-m", "meter.tools.cli", "readings", "--db", str(db)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert process.stdout.readline().startswith(b"device_id")
    process.stdout.close()
    assert process.stderr.read() == b""
    assert process.wait(60) == 141


# -- a PostgreSQL database -------------------------------------------------------


@pytest.fixture
def postgres_cloud(postgres_database) -> str:
    """
    The URI of a PostgreSQL database holding L{ROWS}, its schema made by
    the cloud's own upgrade.
    """
    import datetime

    import psycopg

    from meter.cloud import postgres

    with psycopg.connect(postgres_database, autocommit=True) as connection:
        postgres.upgrade(connection)
        known: set = set()
        postgres.ensure_partitions(connection, [datetime.date(2026, 11, 1), datetime.date(2026, 12, 1)], known)
        with connection.cursor() as cursor:
            cursor.executemany("INSERT INTO readings VALUES (%s, %s, %s, %s, %s, 1.0)", ROWS)
            # Each address a device's readings were stored with, as the store keeps them.
            cursor.execute("INSERT INTO device_addresses SELECT DISTINCT device_ip, device_id FROM readings")
    return postgres_database


def test_a_postgresql_database_by_uri(postgres_cloud, capsys):
    assert csv_rows(capsys, "--db", postgres_cloud) == [
        "1,192.168.1.2,2026-11-29T23:00,10,30",
        "1,192.168.1.2,2026-11-30T08:00,11,31",
        "2,192.168.1.3,2026-11-30T08:00,12,32",
        "2,192.168.1.3,2026-11-30T12:00,13,33",
        "1,192.168.1.2,2026-12-01T00:00,14,34",
    ]
    assert csv_rows(capsys, "--db", postgres_cloud, "--device", "192.168.1.3", "--to", "2026-11-30T12:00") == [
        "2,192.168.1.3,2026-11-30T08:00,12,32",
    ]
    assert cli.main(["readings", "--db", postgres_cloud, "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "(2 readings; more beyond --limit)"
    assert "2026-11-30T08:00" in out and "2026-12-01" not in out


def test_a_postgresql_database_from_the_configuration(postgres_cloud, tmp_path, capsys):
    settings = tmp_path / "meter.toml"
    settings.write_text(config.render({"cloud": {"db": postgres_cloud}}, config.DEFAULT_FLEET))
    assert len(csv_rows(capsys, "--config", str(settings))) == 5


def test_a_postgresql_database_that_is_not_the_clouds_or_is_not_there_is_named(postgres_database, postgres_cluster, capsys):
    assert cli.main(["readings", "--db", postgres_database]) == 2
    name = postgres_database.split("/")[3].split("?")[0]
    assert capsys.readouterr().err == (
        f"meter readings: postgresql {postgres_cluster.socket_dir}/{name} holds no meter cloud database "
        "(no meter_schema table) (--db)\n"
    )
    missing = postgres_cluster.uri("nowhere")
    assert cli.main(["readings", "--db", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"meter readings: cannot read postgresql {postgres_cluster.socket_dir}/nowhere: ")
    assert 'database "nowhere" does not exist' in err
    assert cli.main(["readings", "--db", "postgresql://u:secret@/x?host=/nonexistent-meter-dir&connect_timeout=1"]) == 2
    err = capsys.readouterr().err
    assert "cannot read postgresql /nonexistent-meter-dir/x" in err and "secret" not in err
