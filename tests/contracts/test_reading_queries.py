"""
The contract of meter.cloud.interfaces.IReadingQueries, the read side the web
API asks: one test body run over the in-memory store of meter.testing, over
the SQLite queries (meter.cloud.queries, on read-only connections and
threads of their own) of a database the real SQLite store writes, and over
the PostgreSQL queries (meter.cloud.pgqueries) of a database of a real
server (the session's throwaway cluster) the PostgreSQL store writes.
"""

from __future__ import annotations

import datetime
import json
import sqlite3

import pytest
import pytest_twisted
from twisted.internet import reactor
from zope.interface.verify import verifyObject

from meter import wire
from meter.cloud import SQLiteReadingStore, open_database
from meter.cloud.interfaces import Bucket, Cursor, FleetDevice, IReadingQueries, ReadingsQuery
from meter.cloud.pgqueries import PostgresReadingQueries
from meter.cloud.postgres import PostgresReadingStore
from meter.cloud.queries import SQLiteReadingQueries
from meter.cloud.web.api import device_json
from meter.database import connect
from meter.postgres import PostgresLocation
from meter.reading import Reading
from meter.testing import MemoryReadingStore


class Both:
    """
    A store to add readings to and the queries that read them.
    """

    def __init__(self, store, queries):
        self.add = store.add
        self.queries = queries


@pytest_twisted.async_yield_fixture(params=["memory", "sqlite", "postgresql"])
async def both(request, tmp_path):
    if request.param == "postgresql":
        location = PostgresLocation.parse(request.getfixturevalue("postgres_database"))
        store = PostgresReadingStore(location, reactor)
        store.start()
        # The schema made (the store's first connection makes it).
        await store.devices()
        queries = PostgresReadingQueries(location, reactor)
        verifyObject(IReadingQueries, queries)
        queries.startService()
        yield Both(store, queries)
        await queries.stopService()
        await store.stop()
    elif request.param == "memory":
        store = MemoryReadingStore()
        verifyObject(IReadingQueries, store)
        yield Both(store, store)
    else:
        path = tmp_path / "cloud.sqlite"
        connection = connect(path)
        open_database(connection)
        store = SQLiteReadingStore(connection, reactor)
        queries = SQLiteReadingQueries(path, reactor)
        verifyObject(IReadingQueries, queries)
        queries.startService()
        yield Both(store, queries)
        queries.stopService()
        await store.database.stop()


def columns(*records: str) -> wire.BatchColumns:
    return wire.BatchColumns.of(";".join(records))


def at(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


A = "3,192.168.1.4,2026-03-01T02:00,17,35"
B = "1,192.168.1.2,2026-03-01T08:00,20,30"
B2 = "2,192.168.1.3,2026-03-01T08:00,21,31"
C = "1,192.168.1.2,2026-03-01T12:00,25.5,33.25"
D = "1,192.168.1.7,2026-03-02T00:00,0.000001,100"  # device 1 moved


def day(device_id: int, ip: str, date: str, every: int = 15, temperature=lambda m: 10 + m / 100) -> list[str]:
    """
    A device's readings of a day, one every C{every} minutes.
    """
    return [
        f"{device_id},{ip},{date}T{m // 60:02d}:{m % 60:02d},{temperature(m):g},{50 + (m % 7)}"
        for m in range(0, 1440, every)
    ]


@pytest_twisted.ensureDeferred
async def test_an_empty_store_has_no_fleet(both):
    assert await both.queries.fleet() == []
    assert await both.queries.device(1) is None
    assert await both.queries.address_range("192.168.1.2") is None
    assert await both.queries.page(ReadingsQuery(), 10) == []
    assert await both.queries.next_cursor(ReadingsQuery(), 10) is None


@pytest_twisted.ensureDeferred
async def test_the_fleet_summarizes_each_device_with_its_latest_address(both):
    await both.add(columns(C, A), 1.0)
    await both.add(columns(D, B), 2.0)
    await both.add(columns(A, B), 3.0)  # duplicates: counted once
    assert await both.queries.fleet() == [
        FleetDevice(1, "192.168.1.7", at("2026-03-01T08:00"), at("2026-03-02T00:00"), 3),
        FleetDevice(3, "192.168.1.4", at("2026-03-01T02:00"), at("2026-03-01T02:00"), 1),
    ]
    assert await both.queries.device(3) == FleetDevice(3, "192.168.1.4", at("2026-03-01T02:00"), at("2026-03-01T02:00"), 1)
    assert await both.queries.device(2) is None


@pytest_twisted.ensureDeferred
async def test_the_fleets_json_made_by_the_database_says_what_the_summary_does(both):
    assert json.loads(await both.queries.fleet_json(datetime.date(2026, 3, 2))) == []
    await both.add(columns(C, A, B2), 1.0)
    await both.add(columns(D, B, "4,fd00::5,2026-03-01T23:59,1,2"), 2.0)
    stale_before = datetime.date(2026, 3, 2)
    fleet = json.loads(await both.queries.fleet_json(stale_before))
    assert fleet == [device_json(device, stale_before) for device in await both.queries.fleet()]
    assert [(d["device_id"], d["last_reading"], d["stale"]) for d in fleet] == [
        (1, "2026-03-02T00:00", False), (2, "2026-03-01T08:00", True), (3, "2026-03-01T02:00", True),
        (4, "2026-03-01T23:59", True),
    ]
    assert fleet[0] == {"device_id": 1, "device_ip": "192.168.1.7", "first_reading": "2026-03-01T08:00",
                        "last_reading": "2026-03-02T00:00", "readings": 3, "stale": False}
    assert fleet[3]["device_ip"] == "fd00::5"


@pytest_twisted.ensureDeferred
async def test_an_older_reading_arriving_late_keeps_the_latest_address(both):
    await both.add(columns(D), 1.0)
    await both.add(columns(B), 2.0)
    assert await both.queries.fleet() == [FleetDevice(1, "192.168.1.7", at("2026-03-01T08:00"), at("2026-03-02T00:00"), 2)]


@pytest_twisted.ensureDeferred
async def test_a_batch_partly_stored_before_counts_only_the_new(both):
    await both.add(columns(B), 1.0)
    await both.add(columns(A, B, C), 2.0)
    assert [(d.device_id, d.count) for d in await both.queries.fleet()] == [(1, 2), (3, 1)]


@pytest_twisted.ensureDeferred
async def test_the_range_of_an_address(both):
    await both.add(columns(A, B, C, D), 1.0)
    assert await both.queries.address_range("192.168.1.2") == (at("2026-03-01T08:00"), at("2026-03-01T12:00"))
    assert await both.queries.address_range("10.0.0.1") is None


@pytest_twisted.ensureDeferred
async def test_pages_follow_the_cursor_device_by_device(both):
    await both.add(columns(A, B, B2, C, D), 1.0)
    everything = await both.queries.page(ReadingsQuery(), 100)
    assert [(r.device_id, r.taken_at.day, r.taken_at.hour) for r in everything] == [
        (1, 1, 8), (1, 1, 12), (1, 2, 0), (2, 1, 8), (3, 1, 2),
    ]
    seen: list[Reading] = []
    query = ReadingsQuery()
    for _ in range(10):
        page = await both.queries.page(query, 2)
        seen.extend(page)
        if len(page) < 2:
            break
        query = ReadingsQuery(after=Cursor(page[-1].device_id, page[-1].taken_at))
    assert seen == everything
    # After a device's last reading comes the next device's first, whenever.
    assert await both.queries.page(ReadingsQuery(after=Cursor(1, at("2026-03-02T00:00"))), 1) == everything[3:4]
    # A range and a cursor together.
    query = ReadingsQuery(since=at("2026-03-01T08:00"), until=at("2026-03-01T12:00"), after=Cursor(1, at("2026-03-01T08:00")))
    assert await both.queries.page(query, 10) == everything[3:4]


@pytest_twisted.ensureDeferred
async def test_a_page_of_a_device_in_a_range(both):
    await both.add(columns(A, B, B2, C, D), 1.0)
    query = ReadingsQuery(device_id=1, since=at("2026-03-01T08:00"), until=at("2026-03-02T00:00"))
    assert [r.taken_at.hour for r in await both.queries.page(query, 10)] == [8, 12]
    assert [r.device_id for r in await both.queries.page(ReadingsQuery(device_ip="192.168.1.3"), 10)] == [2]


@pytest_twisted.ensureDeferred
async def test_the_next_cursor_is_the_last_of_the_page_when_more_follow(both):
    await both.add(columns(A, B, B2, C), 1.0)
    assert await both.queries.next_cursor(ReadingsQuery(), 2) == Cursor(1, at("2026-03-01T12:00"))
    assert await both.queries.next_cursor(ReadingsQuery(), 3) == Cursor(2, at("2026-03-01T08:00"))
    assert await both.queries.next_cursor(ReadingsQuery(), 4) is None
    assert await both.queries.next_cursor(ReadingsQuery(device_id=1), 1) == Cursor(1, at("2026-03-01T08:00"))


@pytest_twisted.ensureDeferred
async def test_a_series_of_few_readings_is_one_point_a_reading(both):
    await both.add(columns(A, B, C, D), 1.0)
    series = await both.queries.series(1, None, at("2026-03-01T00:00"), at("2026-03-03T00:00"), 3)
    assert series.readings == 3
    assert series.width is None
    assert series.buckets == (
        Bucket(at("2026-03-01T08:00"), 1, (20.0, 20.0, 20.0), (30.0, 30.0, 30.0)),
        Bucket(at("2026-03-01T12:00"), 1, (25.5, 25.5, 25.5), (33.25, 33.25, 33.25)),
        Bucket(at("2026-03-02T00:00"), 1, (0.000001, 0.000001, 0.000001), (100.0, 100.0, 100.0)),
    )


@pytest_twisted.ensureDeferred
async def test_a_series_of_many_readings_is_downsampled_to_min_mean_max(both):
    await both.add(columns(*day(5, "10.0.0.5", "2026-03-01")), 1.0)
    # 96 readings into at most 10 buckets: 144 minutes wide, from 00:00.
    series = await both.queries.series(5, None, at("2026-03-01T00:00"), at("2026-03-02T00:00"), 10)
    assert series.readings == 96
    assert series.width == 144 * 60
    assert len(series.buckets) == 10
    first = series.buckets[0]
    # 00:00 to 02:15 (02:24 excluded): ten readings.
    assert first.start == at("2026-03-01T00:00")
    assert first.count == 10
    assert first.temperature[0] == 10.0
    assert first.temperature[2] == 11.35
    assert first.temperature[1] == pytest.approx(sum(10 + m / 100 for m in range(0, 144, 15)) / 10)
    assert first.humidity == (50.0, pytest.approx(sum(50 + m % 7 for m in range(0, 144, 15)) / 10), 56.0)
    assert sum(b.count for b in series.buckets) == 96
    assert [b.start for b in series.buckets] == [at("2026-03-01T00:00") + datetime.timedelta(minutes=144 * i) for i in range(10)]


@pytest_twisted.ensureDeferred
async def test_a_series_leaves_empty_buckets_out_and_reads_by_address_too(both):
    await both.add(columns(*day(5, "10.0.0.5", "2026-03-01"), *day(5, "10.0.0.5", "2026-03-03")), 1.0)
    series = await both.queries.series(None, "10.0.0.5", at("2026-03-01T00:00"), at("2026-03-04T00:00"), 3)
    assert series.width == 86400
    assert [(b.start.day, b.count) for b in series.buckets] == [(1, 96), (3, 96)]


def old_database(path, version: int, rows: list[tuple]):
    """
    A cloud database at schema C{version} (its steps alone) holding
    C{rows} (device, address, minute, temperature, humidity) as readings.
    """
    from meter.cloud.sqlite import VERSIONS

    with sqlite3.connect(str(path)) as old:
        for step in VERSIONS.steps[:version]:
            step(old)
        old.executemany("INSERT INTO readings VALUES (?, ?, ?, ?, ?, 1.0)", rows)
        old.execute(f"PRAGMA application_id = {VERSIONS.application_id:d}")
        old.execute(f"PRAGMA user_version = {version:d}")
    return path


@pytest_twisted.ensureDeferred
async def test_the_summary_of_a_database_from_before_it_is_filled_by_the_upgrade(tmp_path):
    # A version-1 database holding readings: the upgrade to version 2
    # fills the devices table from them.
    path = old_database(
        tmp_path / "old.sqlite", 1,
        [(1, "192.168.1.2", "2026-03-01T08:00", 20, 30), (1, "192.168.1.7", "2026-03-02T00:00", 1, 2),
         (3, "192.168.1.4", "2026-03-01T02:00", 17, 35)],
    )
    connection = connect(path)
    open_database(connection)
    connection.close()
    queries = SQLiteReadingQueries(path, reactor)
    queries.startService()
    try:
        assert await queries.fleet() == [
            FleetDevice(1, "192.168.1.7", at("2026-03-01T08:00"), at("2026-03-02T00:00"), 2),
            FleetDevice(3, "192.168.1.4", at("2026-03-01T02:00"), at("2026-03-01T02:00"), 1),
        ]
    finally:
        queries.stopService()


@pytest_twisted.ensureDeferred
async def test_a_database_from_before_the_addresses_finds_its_readings_by_address_after_the_upgrade(tmp_path):
    # A version-2 database, its readings indexed by address: the upgrade to
    # version 3 keeps each address a device's readings were stored with in
    # device_addresses, and drops the index.
    path = old_database(
        tmp_path / "old.sqlite", 2,
        [(1, "192.168.1.2", "2026-03-01T08:00", 20, 30), (1, "192.168.1.7", "2026-03-02T00:00", 1, 2),
         (3, "192.168.1.2", "2026-03-03T02:00", 17, 35)],
    )
    connection = connect(path)
    open_database(connection)
    assert connection.execute("SELECT name FROM sqlite_master WHERE name = 'readings_by_ip'").fetchall() == []
    assert connection.execute("SELECT device_ip, device_id FROM device_addresses ORDER BY 1, 2").fetchall() == [
        ("192.168.1.2", 1), ("192.168.1.2", 3), ("192.168.1.7", 1),
    ]
    connection.close()
    queries = SQLiteReadingQueries(path, reactor)
    queries.startService()
    try:
        assert [(r.device_id, r.taken_at.day) for r in await queries.page(ReadingsQuery(device_ip="192.168.1.2"), 10)] == [
            (1, 1), (3, 3),
        ]
        assert await queries.address_range("192.168.1.2") == (at("2026-03-01T08:00"), at("2026-03-03T02:00"))
        assert await queries.address_range("192.168.1.7") == (at("2026-03-02T00:00"), at("2026-03-02T00:00"))
        assert await queries.address_range("192.168.1.9") is None
    finally:
        queries.stopService()


@pytest_twisted.ensureDeferred
async def test_the_sqlite_queries_read_on_a_connection_that_cannot_write(tmp_path):
    path = tmp_path / "cloud.sqlite"
    connection = connect(path)
    open_database(connection)
    connection.close()
    queries = SQLiteReadingQueries(path, reactor)
    queries.startService()
    try:
        def write(connection):
            connection.execute("DELETE FROM readings")

        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            await queries._run(write)
    finally:
        queries.stopService()


@pytest_twisted.ensureDeferred
async def test_the_sqlite_queries_run_on_threads_of_their_own_and_never_hold_up_ingest(tmp_path):
    import threading

    path = tmp_path / "cloud.sqlite"
    connection = connect(path)
    open_database(connection)
    store = SQLiteReadingStore(connection, reactor)
    # One thread, so the transaction below stays open on the connection the
    # next query uses.
    queries = SQLiteReadingQueries(path, reactor, threads=1)
    queries.startService()
    try:
        await store.add(columns(A), 1.0)
        thread = await queries._run(lambda connection: threading.current_thread())
        assert thread is not threading.main_thread()
        assert "meter-web-queries" in thread.name

        def begin(connection):
            # A reader in the middle of a long query: its snapshot is held.
            connection.execute("BEGIN")
            return connection.execute("SELECT count(*) FROM readings").fetchone()[0]

        assert await queries._run(begin) == 1
        # The writer commits meanwhile, on the reactor thread, without waiting
        # (its busy timeout is 0: a lock would fail the commit at once).
        assert await store.add(columns(B, C), 2.0) is None
        assert await queries._run(lambda connection: connection.execute("SELECT count(*) FROM readings").fetchone()[0]) == 1
        await queries._run(lambda connection: connection.execute("COMMIT"))
        assert len(await queries.page(ReadingsQuery(), 10)) == 3
    finally:
        queries.stopService()
        await store.database.stop()


@pytest_twisted.async_yield_fixture
async def postgres_pair(postgres_database):
    """
    A PostgreSQL store and queries of one connection over its database.
    """
    location = PostgresLocation.parse(postgres_database)
    store = PostgresReadingStore(location, reactor)
    store.start()
    await store.devices()
    queries = PostgresReadingQueries(location, reactor, connections=1)
    queries.startService()
    yield store, queries
    await queries.stopService()
    await store.stop()


@pytest_twisted.ensureDeferred
async def test_the_postgresql_queries_read_on_a_connection_that_cannot_write(postgres_pair):
    import psycopg

    store, queries = postgres_pair
    await store.add(columns(A), 1.0)

    def write(connection):
        connection.execute("DELETE FROM readings")

    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        await queries._run(write)
    assert len(await queries.page(ReadingsQuery(), 10)) == 1


@pytest_twisted.ensureDeferred
async def test_the_postgresql_queries_run_on_a_thread_of_their_own_and_never_hold_up_ingest(postgres_pair):
    import threading

    store, queries = postgres_pair
    await store.add(columns(A), 1.0)
    thread = await queries._run(lambda connection: threading.current_thread())
    assert thread is not threading.main_thread()
    assert thread is not await store.runner.run(lambda connection: threading.current_thread())

    def begin(connection):
        # A reader in the middle of a long query: its snapshot and its
        # locks on the tables are held.
        connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        return connection.execute("SELECT count(*) FROM readings").fetchone()[0]

    assert await queries._run(begin) == 1
    # The store commits meanwhile, on its own connection, without waiting.
    assert await store.add(columns(B, C), 2.0) is None
    assert await queries._run(lambda connection: connection.execute("SELECT count(*) FROM readings").fetchone()[0]) == 1
    await queries._run(lambda connection: connection.execute("COMMIT"))
    assert len(await queries.page(ReadingsQuery(), 10)) == 3
    assert [d.count for d in await queries.fleet()] == [2, 1]


@pytest_twisted.ensureDeferred
async def test_the_postgresql_queries_connect_again_after_a_restart(postgres_pair, postgres_cluster):
    import psycopg

    from meter.postgres import Unreachable

    store, queries = postgres_pair
    await store.add(columns(A, B), 1.0)
    assert len(await queries.fleet()) == 2
    postgres_cluster.restart("immediate")
    # The query that finds the connection gone fails (the API answers 503)...
    with pytest.raises((psycopg.OperationalError, Unreachable)):
        await queries.fleet()
    # ...and the queries' connection comes back by itself, no restart of
    # the cloud needed.
    (runner,) = queries._runners
    await runner.when_connected()
    assert [d.device_id for d in await queries.fleet()] == [1, 3]


@pytest_twisted.ensureDeferred
async def test_a_long_postgresql_query_is_cancelled_at_stop(postgres_pair, postgres_database):
    import psycopg
    from twisted.internet.task import deferLater

    store, queries = postgres_pair
    # A query as long as a year's export: pg_sleep, which a stop that waited
    # for it would let finish (and succeed) 20 s later.
    long = queries._run(lambda connection: connection.execute("SELECT pg_sleep(20)").fetchone())
    outcome: list = []
    long.addBoth(outcome.append)
    # Wait until the server runs it (asked on a connection of the test's).
    with psycopg.connect(postgres_database, autocommit=True) as watcher:
        for _ in range(500):
            (running,) = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'SELECT pg_sleep%'"
            ).fetchone()
            if running:
                break
            await deferLater(reactor, 0.01, lambda: None)
    assert running == 1 and not outcome
    await queries.stopService()
    (failure,) = outcome
    assert failure.check(psycopg.errors.QueryCanceled)


@pytest_twisted.ensureDeferred
async def test_readings_keep_the_address_they_were_stored_with(both):
    # Device 1 moves to the address device 2 had, device 2 to another; the
    # second batch holds a reading stored already (PostgreSQL's staged way).
    await both.add(columns("1,10.0.0.1,2026-03-01T08:00,1,1", "2,10.0.0.2,2026-03-01T08:00,2,2"), 1.0)
    await both.add(columns("1,10.0.0.1,2026-03-01T08:00,1,1", "1,10.0.0.2,2026-03-01T12:00,3,3",
                           "2,10.0.0.3,2026-03-01T13:00,4,4"), 2.0)
    # A batch all new (PostgreSQL's COPY): device 1 back at its first address.
    await both.add(columns("1,10.0.0.1,2026-03-02T08:00,5,5"), 3.0)

    async def stored_with(ip):
        return [(r.device_id, r.taken_at.day, r.taken_at.hour) for r in await both.queries.page(ReadingsQuery(device_ip=ip), 10)]

    assert await stored_with("10.0.0.1") == [(1, 1, 8), (1, 2, 8)]
    assert await stored_with("10.0.0.2") == [(1, 1, 12), (2, 1, 8)]
    assert await stored_with("10.0.0.3") == [(2, 1, 13)]
    assert await stored_with("10.0.0.4") == []
    assert await both.queries.address_range("10.0.0.2") == (at("2026-03-01T08:00"), at("2026-03-01T12:00"))
    assert await both.queries.address_range("10.0.0.1") == (at("2026-03-01T08:00"), at("2026-03-02T08:00"))
    assert await both.queries.next_cursor(ReadingsQuery(device_ip="10.0.0.2"), 1) == Cursor(1, at("2026-03-01T12:00"))
    query = ReadingsQuery(device_id=1, device_ip="10.0.0.2")
    assert [r.taken_at.hour for r in await both.queries.page(query, 10)] == [12]
    series = await both.queries.series(None, "10.0.0.1", at("2026-03-01T00:00"), at("2026-03-03T00:00"), 2)
    assert series.readings == 2
