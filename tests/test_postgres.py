"""
The cloud's PostgreSQL store against a real server (the session's
throwaway cluster, tests/conftest.py): its schema made once by nodes
starting together, its partitions made for any month, a batch sent to two
nodes at once stored once, and its connection lost and regained with the
server restarted, stopped or not up yet.  The IReadingStore contract runs
over it in tests/contracts/test_reading_store.py.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import threading

import psycopg
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.logger import globalLogPublisher

from meter import config, wire
from meter.cloud import postgres
from meter.cloud.postgres import PostgresReadingStore
from meter.postgres import ConnectionRunner, PostgresLocation, Unreachable
from meter.retry import Backoff
from meter.tools import pgcluster


#: The longest a test waits for a store to connect: a bound, so that a
#: store that never connects fails the test instead of hanging it.
CONNECT_BOUND = 30.0


def connected(*nodes: PostgresReadingStore) -> defer.Deferred:
    return defer.gatherResults([node.runner.when_connected().addTimeout(CONNECT_BOUND, reactor) for node in nodes])


def columns(*records: str) -> wire.BatchColumns:
    return wire.BatchColumns.of(";".join(records))


def day_of(device: int, day: str, count: int = 24) -> list[str]:
    return [f"{device},10.0.0.{device},{day}T{hour:02d}:00,{hour}.5,{50 + hour}" for hour in range(count)]


def rows(uri: str, sql: str = "SELECT device_id, device_ip, taken_at, temperature_c, humidity_pct FROM readings "
                              "ORDER BY device_id, taken_at") -> list[tuple]:
    with psycopg.connect(uri) as connection:
        return connection.execute(sql).fetchall()


@pytest.fixture
def stores(postgres_database):
    """
    Make stores on the test's database (quick to retry: the tests wait for
    reconnections); all stopped at the end.
    """
    made: list[PostgresReadingStore] = []

    def make(uri: str = postgres_database) -> PostgresReadingStore:
        store = PostgresReadingStore(PostgresLocation.parse(uri), reactor)
        store.runner._backoff = Backoff(0.05, 0.5)
        store.start()
        made.append(store)
        return store

    yield make
    for store in made:
        pytest_twisted.blockon(store.stop())


# -- where the database is -----------------------------------------------------


def test_a_uri_is_told_without_its_password():
    location = PostgresLocation.parse("postgresql://meter:s3cret@db.example:5433/readings")
    assert location.where == "db.example:5433/readings"
    assert "s3cret" not in str(location) and "s3cret" not in repr(location)
    assert PostgresLocation.parse("postgresql://postgres@/meter?host=/run/pg").where == "/run/pg/meter"


def test_a_bad_uri_is_refused_without_its_password():
    with pytest.raises(config.ConfigError) as refused:
        config.from_raw({"cloud": {"db": "postgresql://meter:s3cret@db.example:notaport/x?nosuch=1"}}, "meter.toml")
    assert "[cloud] db" in str(refused.value) and "s3cret" not in str(refused.value)


def test_cloud_db_is_a_path_or_a_postgresql_uri():
    assert config.from_raw({"cloud": {"db": "var/c.sqlite"}}, "t").cloud["db"] == Path("var/c.sqlite")
    uri = "postgresql://postgres@/meter?host=/tmp/s"
    assert config.from_raw({"cloud": {"db": uri}}, "t").cloud["db"] == PostgresLocation(uri)


# -- schema and partitions -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_nodes_starting_together_make_the_schema_once(stores, postgres_database):
    nodes = [stores() for _ in range(4)]
    await connected(*nodes)
    assert rows(postgres_database, "SELECT version FROM meter_schema ORDER BY version") == [
        (version,) for version in range(1, postgres.VERSION + 1)
    ]
    results = await defer.gatherResults([node.add(columns(*day_of(n + 1, "2026-03-01")), 1.0) for n, node in enumerate(nodes)])
    assert results == [None] * 4
    assert len(rows(postgres_database)) == 4 * 24


@pytest_twisted.ensureDeferred
async def test_a_store_of_version_1_is_upgraded_and_found_by_address(stores, postgres_database):
    # Version 1 as a node of that version left it: readings with their
    # address index, device 1 moved from 10.0.0.1 to 10.0.0.9.
    with psycopg.connect(postgres_database, autocommit=True) as connection:
        with connection.transaction():
            connection.execute("CREATE TABLE meter_schema (version integer NOT NULL)")
            connection.execute(postgres.VERSION_1)
            connection.execute("INSERT INTO meter_schema (version) VALUES (1)")
        postgres.ensure_partitions(connection, [datetime.date(2026, 3, 1)], set())
        connection.execute(
            "INSERT INTO readings VALUES (1, '10.0.0.1', '2026-03-01T08:00', 1, 1, 1), (1, '10.0.0.9', '2026-03-01T09:00', 2, 2, 1),"
            " (2, '10.0.0.2', '2026-03-01T08:00', 3, 3, 1)"
        )
    store = stores()
    await connected(store)
    assert rows(postgres_database, "SELECT max(version) FROM meter_schema") == [(postgres.VERSION,)]
    assert rows(postgres_database, "SELECT device_ip, device_id FROM device_addresses ORDER BY 1, 2") == [
        ("10.0.0.1", 1), ("10.0.0.2", 2), ("10.0.0.9", 1),
    ]
    assert rows(postgres_database, "SELECT indexname FROM pg_indexes WHERE indexname LIKE 'readings%by_ip%'") == []
    # Readings stored after the upgrade, by both ways, found by address too.
    await store.add(columns("1,10.0.0.1,2026-03-01T10:00,4,4"), 2.0)
    await store.add(columns("1,10.0.0.1,2026-03-01T10:00,4,4", "2,10.0.0.9,2026-03-01T10:00,5,5"), 3.0)
    assert [(r.device_id, r.taken_at.hour) for r in await store.readings(device_ip="10.0.0.1")] == [(1, 8), (1, 10)]
    assert [(r.device_id, r.taken_at.hour) for r in await store.readings(device_ip="10.0.0.9")] == [(1, 9), (2, 10)]
    assert [(r.device_id, r.taken_at.hour) for r in await store.readings(device_ip="10.0.0.2")] == [(2, 8)]


@pytest_twisted.ensureDeferred
async def test_partitions_are_made_ahead_and_for_any_month(stores, postgres_database):
    store = stores()
    await connected(store)
    today = datetime.date.today()
    made = {name for (name,) in rows(postgres_database, "SELECT relname FROM pg_class WHERE relname ~ '^readings_[0-9]'")}
    assert postgres.partition_name(today) in made
    assert postgres.partition_name(postgres.next_month(today)) in made
    # A batch of a month long gone and one far ahead, from two nodes at once.
    other = stores()
    old, ahead = day_of(1, "2019-01-31", 3), day_of(2, "2031-12-01", 3)
    assert await defer.gatherResults([store.add(columns(*old, *ahead), 1.0), other.add(columns(*ahead, *old), 1.0)]) in (
        [None, []],
        [[], None],
    )
    placed = rows(postgres_database, "SELECT tableoid::regclass::text, count(*) FROM readings GROUP BY 1 ORDER BY 1")
    assert placed == [("readings_2019_01", 3), ("readings_2031_12", 3)]


@pytest_twisted.ensureDeferred
async def test_a_newer_schema_is_refused(stores, postgres_database):
    with psycopg.connect(postgres_database, autocommit=True) as connection:
        connection.execute("CREATE TABLE meter_schema (version integer NOT NULL)")
        connection.execute("INSERT INTO meter_schema VALUES (99)")
    store = stores()
    with pytest.raises(Unreachable, match="newer than this meter's"):
        await store.add(columns(*day_of(1, "2026-03-01", 1)), 1.0)
    assert not store.runner.connected


# -- several nodes -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_same_batches_sent_to_two_nodes_are_stored_and_new_once(stores, postgres_database):
    one, two = stores(), stores()
    batches = [columns(*day_of(device, "2026-03-02"), *day_of(device + 1, "2026-03-02")) for device in range(1, 20)]
    outcomes = await defer.gatherResults([node.add(batch, 1.0) for batch in batches for node in (one, two)])
    new = 0
    for batch, outcome in zip([b for b in batches for _ in (one, two)], outcomes):
        new += len(batch) if outcome is None else len(outcome)
    assert new == 20 * 24
    assert len(rows(postgres_database)) == 20 * 24
    # The summaries agree with the readings.
    assert rows(postgres_database, "SELECT device_id, readings FROM devices ORDER BY 1") == [(d, 24) for d in range(1, 21)]


async def test_a_node_frozen_inside_its_transaction_holds_the_batch_only_until_the_server_ends_its_session(
    stores, postgres_database
):
    # Node one takes a batch's rows and freezes before COMMIT (a SIGSTOP, a
    # paused VM); the gateway sends that batch to node two, whose insert
    # waits on one's locks until the server ends one's session.
    one = PostgresReadingStore(PostgresLocation.parse(postgres_database), reactor)
    one.frozen_session_timeout = "1s"
    one.start()
    two = stores()
    inserted, thawed = threading.Event(), threading.Event()
    day = datetime.date.today().isoformat()  # a month whose partition the store made ahead

    def freeze(connection):
        with connection.transaction():
            connection.execute(
                "INSERT INTO readings (device_id, device_ip, taken_at, temperature_c, humidity_pct, stored_at) "
                "VALUES (1, '10.0.0.1', %s, 0.5, 50, 1.0)",
                (f"{day}T00:00",),
            )
            inserted.set()
            thawed.wait(CONNECT_BOUND)

    try:
        await connected(one, two)
        frozen = one.runner.run(freeze)
        frozen.addErrback(lambda failure: None)  # its session is ended under it
        assert await threads.deferToThread(inserted.wait, CONNECT_BOUND)
        try:
            outcome = await two.add(columns(*day_of(1, day)), 2.0).addTimeout(CONNECT_BOUND, reactor)
        finally:
            thawed.set()
        assert outcome is None  # every reading new at node two: one's insert never committed
        assert len(rows(postgres_database)) == 24
    finally:
        thawed.set()
        await one.stop()


# -- the connection lost and regained ----------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "immediate"])
@pytest_twisted.ensureDeferred
async def test_a_restarted_server_is_reconnected_to(stores, postgres_database, postgres_cluster, mode):
    store = stores()
    assert await store.add(columns(*day_of(1, "2026-03-03")), 1.0) is None
    postgres_cluster.restart(mode)
    # The batch that finds the connection gone fails, nothing of it stored...
    with pytest.raises((psycopg.OperationalError, Unreachable)):
        await store.add(columns(*day_of(2, "2026-03-03")), 2.0)
    # ...and the store connects again by itself.
    await connected(store)
    assert store.runner.losses == 1
    assert await store.add(columns(*day_of(2, "2026-03-03"), *day_of(1, "2026-03-03")), 3.0) == list(range(24))
    assert len(rows(postgres_database)) == 48


@pytest_twisted.ensureDeferred
async def test_a_server_not_up_yet_is_waited_for(stores):
    cluster = pgcluster.Cluster.create()
    try:
        cluster.start()
        uri = cluster.create_database("late")
        cluster.stop()
        store = stores(uri)
        with pytest.raises(Unreachable, match=r"cannot reach the database at .*/late: "):
            await store.add(columns(*day_of(1, "2026-03-04")), 1.0)
        assert store.runner.unreachable is not None and not store.runner.connected
        cluster.start()
        await connected(store)
        assert store.runner.unreachable is None and store.runner.connect_failures >= 1
        assert await store.add(columns(*day_of(1, "2026-03-04")), 2.0) is None
        assert len(rows(uri)) == 24
        await store.stop()
    finally:
        cluster.destroy()


@pytest_twisted.ensureDeferred
async def test_work_given_after_stop_fails_and_stop_waits_for_work_given_before(stores, postgres_database):
    store = stores()
    added = store.add(columns(*day_of(1, "2026-03-05")), 1.0)
    await store.stop()
    assert added.called and await added is None
    with pytest.raises(Unreachable):
        await store.add(columns(*day_of(2, "2026-03-05")), 1.0)


@pytest_twisted.ensureDeferred
async def test_batches_given_together_share_a_transaction_and_fail_alone(stores, postgres_database):
    store = stores()
    await connected(store)
    await store.add(columns(*day_of(1, "2026-03-06")), 1.0)
    commits = store.runner.commit_seconds.count
    given = [
        store.add(columns(*day_of(2, "2026-03-06")), 2.0),
        store.add(columns(*day_of(1, "2026-03-06", 2), *day_of(3, "2026-03-06", 2)), 2.0),
        store.add(columns("x,10.0.0.9,2026-03-06T00:00,1,1"), 2.0),
        store.add(columns(*day_of(2, "2026-03-06")), 2.0),
        store.add(columns(*day_of(4, "2027-01-06", 1)), 2.0),
    ]
    outcomes = await defer.DeferredList(given, consumeErrors=True)
    assert [ok for ok, _ in outcomes] == [True, True, False, True, True]
    assert outcomes[2][1].check(ValueError)
    assert [value for ok, value in outcomes if ok] == [None, [2, 3], [], None]
    # Given while another was under way, they shared transactions.
    assert store.runner.commit_seconds.count - commits < len(given)
    assert len(rows(postgres_database)) == 24 + 24 + 2 + 1
    assert rows(postgres_database, "SELECT device_id, readings FROM devices ORDER BY 1") == [(1, 24), (2, 24), (3, 2), (4, 1)]


@pytest_twisted.ensureDeferred
async def test_a_server_restarted_while_idle_is_reconnected_to_before_the_next_batch(postgres_database, postgres_cluster):
    runner = ConnectionRunner(PostgresLocation.parse(postgres_database), reactor, check_every=0.05,
                              backoff=Backoff(0.05, 0.5))
    lost = defer.Deferred()

    def observe(event):
        if event.get("log_format", "").startswith("lost the connection") and not lost.called:
            lost.callback(event["cause"])

    globalLogPublisher.addObserver(observe)
    try:
        runner.start()
        await runner.when_connected().addTimeout(CONNECT_BOUND, reactor)
        postgres_cluster.restart("fast")
        # No work given: the idle check finds the connection gone...
        await lost.addTimeout(CONNECT_BOUND, reactor)
        assert runner.losses == 1
        # ...and the runner connects again, so the next work succeeds.
        await runner.when_connected().addTimeout(CONNECT_BOUND, reactor)
        assert await runner.run(lambda connection: connection.execute("SELECT 7").fetchone()) == (7,)
    finally:
        globalLogPublisher.removeObserver(observe)
        await runner.stop()


@pytest_twisted.ensureDeferred
async def test_readings_of_the_last_month_of_year_9999_are_stored_without_failing_their_group(stores, postgres_database):
    store = stores()
    await connected(store)
    given = [
        store.add(columns(*day_of(1, "2026-03-06", 2)), 1.0),
        store.add(columns("2,10.0.0.2,9999-12-31T23:59,1.5,50"), 1.0),
        store.add(columns(*day_of(3, "2026-03-06", 2)), 1.0),
    ]
    outcomes = await defer.DeferredList(given, consumeErrors=True)
    assert outcomes == [(True, None), (True, None), (True, None)]
    assert rows(postgres_database, "SELECT device_id, taken_at::text FROM readings WHERE device_id = 2") == [
        (2, "9999-12-31 23:59:00")
    ]


@pytest_twisted.ensureDeferred
async def test_a_partition_dropped_by_retention_is_made_again_for_a_late_batch(stores, postgres_database):
    store = stores()
    await connected(store)
    await store.add(columns(*day_of(1, "2025-01-06", 2)), 1.0)
    with psycopg.connect(postgres_database, autocommit=True) as connection:
        connection.execute("ALTER TABLE readings DETACH PARTITION readings_2025_01")
        connection.execute("DROP TABLE readings_2025_01")
    late = columns(*day_of(2, "2025-01-07", 2))
    # The first sending may fail (the node still knew the partition); the
    # gateway sends it again, and that one is stored.
    first = await defer.DeferredList([store.add(late, 2.0)], consumeErrors=True)
    if not first[0][0]:
        assert await store.add(late, 3.0) is None
    assert rows(postgres_database, "SELECT device_id, count(*) FROM readings GROUP BY 1 ORDER BY 1") == [(2, 2)]
