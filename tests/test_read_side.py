"""
Which database the web API reads: [cloud] read_db (a replica) if set, else
[cloud] db, PostgreSQL or SQLite as it is; a read_db beside an SQLite db is
refused at start, and a bad read_db is refused without its password.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock

from meter import config
from meter.cloud.pgqueries import PostgresReadingQueries
from meter.cloud.queries import SQLiteReadingQueries
from meter.cloud.tap import read_side
from meter.postgres import PostgresLocation

PRIMARY = "postgresql://meter@db.example/meter"
REPLICA = "postgresql://meter_read:s3cret@replica.example/meter"


def cloud(**settings) -> dict:
    return config.from_raw({"cloud": settings}, "meter.toml").cloud


def test_read_db_is_empty_or_a_postgresql_uri():
    assert cloud()["read_db"] is None
    assert cloud(read_db=REPLICA)["read_db"] == PostgresLocation(REPLICA)
    with pytest.raises(config.ConfigError, match=r"\[cloud\] read_db: expected a postgresql:// URI"):
        cloud(read_db="var/replica.sqlite")
    with pytest.raises(config.ConfigError) as refused:
        cloud(read_db="postgresql://meter_read:s3cret@replica.example/meter?nosuch=1")
    assert "[cloud] read_db" in str(refused.value) and "s3cret" not in str(refused.value)


def test_the_api_reads_read_db_if_set_else_db():
    queries = read_side(cloud(db=PRIMARY, read_db=REPLICA), Clock())
    assert isinstance(queries, PostgresReadingQueries) and queries.location == PostgresLocation(REPLICA)
    queries = read_side(cloud(db=PRIMARY), Clock())
    assert isinstance(queries, PostgresReadingQueries) and queries.location == PostgresLocation(PRIMARY)
    queries = read_side(cloud(db="var/cloud.sqlite"), Clock())
    assert isinstance(queries, SQLiteReadingQueries) and queries._path == Path("var/cloud.sqlite")


def test_a_replica_of_an_sqlite_db_is_refused():
    with pytest.raises(SystemExit, match=r"read_db is set, but db is an SQLite file"):
        read_side(cloud(db="var/cloud.sqlite", read_db=REPLICA), Clock())
