"""
The read side of the cloud's PostgreSQL database (L{IReadingQueries}), for
the web API: the same answers as L{meter.cloud.queries} gives of SQLite
(tests/contracts/test_reading_queries.py runs one body over both).

Why connections of its own: the store's connections commit batches, and a
reader must never wait for them nor make them wait.  Each query runs on a
connection of this service's own runners (L{meter.cloud.pgrunner}: one
thread a connection, reconnected with backoff), read-only
(C{default_transaction_read_only}), so the web API can neither write nor
hold a lock a batch's insert needs.  It may be another server than the
store's: C{[cloud] read_db}, a streaming replica, takes the dashboards' load
off the primary (docs/cloud-tier.md).
"""

from __future__ import annotations

import itertools
import threading

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from meter.cloud.interfaces import Bucket, Cursor, FleetDevice, IReadingQueries, ReadingsQuery, Series
from meter.cloud.queries import series_width
from meter.cloud.sql import POSTGRESQL, SELECT_READINGS, readings_by_time, where
from meter.reading import Reading

log = Logger()


#: The primary key's order: each partition's index is read in order and the
#: partitions merged, never sorted.
_ORDER = " ORDER BY device_id, taken_at"
_SUMMARY = "SELECT device_id, device_ip, first_reading, last_reading, readings FROM devices"


def fleet(connection) -> list[FleetDevice]:
    return [FleetDevice(*row) for row in connection.execute(_SUMMARY + " ORDER BY device_id")]


#: One device's object of /api/v1/devices, made by the server.
_FLEET_JSON = (
    "SELECT json_build_object('device_id', device_id, 'device_ip', device_ip,"
    " 'first_reading', to_char(first_reading, 'YYYY-MM-DD\"T\"HH24:MI'),"
    " 'last_reading', to_char(last_reading, 'YYYY-MM-DD\"T\"HH24:MI'), 'readings', readings,"
    " 'stale', last_reading < %s)::text FROM devices ORDER BY device_id"
)


def fleet_json(connection, stale_before) -> str:
    return "[" + ",".join(text for (text,) in connection.execute(_FLEET_JSON, (stale_before,))) + "]"


def device(connection, device_id: int) -> FleetDevice | None:
    row = connection.execute(_SUMMARY + " WHERE device_id = %s", (device_id,)).fetchone()
    return None if row is None else FleetDevice(*row)


def address_range(connection, device_ip: str):
    # The readings have no index by address: each device that ever had it,
    # its readings in the key's order from either end, the first stored
    # with the address.
    ends = []
    for direction in ("", " DESC"):
        (end,) = connection.execute(
            f"SELECT {'min' if not direction else 'max'}(r.taken_at) FROM device_addresses AS a,"
            " LATERAL (SELECT taken_at FROM readings WHERE device_id = a.device_id AND device_ip = a.device_ip"
            f" ORDER BY taken_at{direction} LIMIT 1) AS r WHERE a.device_ip = %s",
            (device_ip,),
        ).fetchone()
        if end is None:
            return None
        ends.append(end)
    return ends[0], ends[1]


def page(connection, query: ReadingsQuery, limit: int) -> list[Reading]:
    clause, args = where(POSTGRESQL, query)
    rows = connection.execute(SELECT_READINGS + clause + _ORDER + " LIMIT %s", [*args, limit])
    # Checked when they were stored.
    return [Reading.checked(*row) for row in rows]


def next_cursor(connection, query: ReadingsQuery, limit: int) -> Cursor | None:
    clause, args = where(POSTGRESQL, query)
    rows = connection.execute(
        "SELECT device_id, taken_at FROM readings" + clause + _ORDER + " LIMIT 2 OFFSET %s", [*args, limit - 1]
    ).fetchall()
    if len(rows) < 2:
        return None
    return Cursor(*rows[0])


def series(connection, device_id, device_ip, since, until, points) -> Series:
    clause, args = where(POSTGRESQL, ReadingsQuery(device_id=device_id, device_ip=device_ip, since=since, until=until))
    # One snapshot for the count and the buckets: a batch committed between
    # them would make the buckets disagree with the count.
    with connection.transaction():
        connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        (count,) = connection.execute("SELECT count(*) FROM readings" + clause, args).fetchone()
        if count <= points:
            rows = connection.execute(
                "SELECT taken_at, temperature_c, humidity_pct FROM readings" + clause + " ORDER BY taken_at", args
            )
            return Series(count, None, tuple(Bucket(at, 1, (t, t, t), (h, h, h)) for at, t, h in rows))
        width = series_width(since, until, points)
        origin = since.replace(second=0, microsecond=0)
        # date_bin: the start of the bucket of C{width} seconds from
        # C{origin} each reading falls in, computed by the server, so only
        # the buckets cross the wire.
        rows = connection.execute(
            "SELECT date_bin(make_interval(secs => %s), taken_at, %s) AS bucket, count(*),"
            " min(temperature_c), avg(temperature_c), max(temperature_c),"
            " min(humidity_pct), avg(humidity_pct), max(humidity_pct)"
            " FROM readings" + clause + " GROUP BY bucket ORDER BY bucket",
            [width, origin, *args],
        )
        return Series(
            count,
            width,
            tuple(
                Bucket(start, n, (t_min, t_mean, t_max), (h_min, h_mean, h_max))
                for start, n, t_min, t_mean, t_max, h_min, h_mean, h_max in rows
            ),
        )


def readings(connection, device_id=None, device_ip=None, since=None, until=None, limit=None) -> list[Reading]:
    """
    The readings as L{meter.cloud.interfaces.IReadingStore.readings} lists
    them (by time taken, then device id), read on C{connection} at once:
    for C{meter readings}, which blocks as it reads.
    """
    sql, args = readings_by_time(POSTGRESQL, ReadingsQuery(device_id, device_ip, since, until), limit)
    return [Reading.checked(*row) for row in connection.execute(sql, args)]


def schema_version(connection) -> int | None:
    """
    The version of the cloud's schema in the database on C{connection}, or
    None if it holds none (not a meter cloud database, or one never
    started).
    """
    row = connection.execute("SELECT to_regclass('meter_schema') IS NOT NULL").fetchone()
    if not row[0]:
        return None
    return connection.execute("SELECT max(version) FROM meter_schema").fetchone()[0]


def read_only(connection) -> None:
    """
    A new connection of the queries: every transaction read-only, so the
    web API can never write, whatever a query says.
    """
    connection.execute("SET default_transaction_read_only = on")


def _cancel(connection) -> None:
    """
    Ask the server to cancel what C{connection} runs (from any thread): a
    request on a connection of its own, a few milliseconds on loopback.
    """
    import psycopg

    if connection.closed:
        return
    try:
        # cancel_safe (psycopg 3.2) is bounded and never blocks on the
        # connection's own lock; cancel is what 3.1 has.
        cancel = getattr(connection, "cancel_safe", None)
        cancel(timeout=5.0) if cancel is not None else connection.cancel()
    except psycopg.Error as e:
        # Gone already, or the server unreachable: nothing runs there then.
        log.info("could not cancel a query at stop: {cause}", cause=e)


@implementer(IReadingQueries)
class PostgresReadingQueries(Service):
    """
    Queries of the cloud's PostgreSQL database at C{location}, on
    C{connections} connections of their own, each with its thread
    (L{meter.postgres.ConnectionRunner}); a service, so they open and close
    with the cloud.  A query goes to the next connection in turn: a long
    one (a year's export) holds up only the queries queued behind it on
    that connection, never ingest.

    @param reactor: where the results are delivered.
    """

    def __init__(self, location, reactor, connections: int = 2):
        from meter.postgres import ConnectionRunner

        self.location = location
        self._runners = [
            ConnectionRunner(location, reactor, name=f"read database ({index + 1})", prepare=self._prepare)
            for index in range(connections)
        ]
        self._turns = itertools.cycle(self._runners)
        # The open connections, so that a stop can cancel what they run.
        self._connections: list = []
        self._lock = threading.Lock()

    def _prepare(self, connection) -> None:
        read_only(connection)
        with self._lock:
            self._connections = [c for c in self._connections if not c.closed] + [connection]

    def startService(self):
        Service.startService(self)
        for runner in self._runners:
            runner.start()

    def stopService(self):
        Service.stopService(self)
        with self._lock:
            connections, self._connections = self._connections, []
        # A long query (the whole fleet over a year) ends at once, failing,
        # rather than hold up the cloud's stop while its runner finishes it.
        for connection in connections:
            _cancel(connection)
        return defer.gatherResults([runner.stop() for runner in self._runners], consumeErrors=True)

    def _run(self, work, *args):
        return next(self._turns).run(lambda connection: work(connection, *args))

    # -- IReadingQueries ---------------------------------------------------

    def fleet(self):
        return self._run(fleet)

    def fleet_json(self, stale_before):
        return self._run(fleet_json, stale_before)

    def device(self, device_id: int):
        return self._run(device, device_id)

    def address_range(self, device_ip: str):
        return self._run(address_range, device_ip)

    def page(self, query: ReadingsQuery, limit: int):
        return self._run(page, query, limit)

    def next_cursor(self, query: ReadingsQuery, limit: int):
        return self._run(next_cursor, query, limit)

    def series(self, device_id, device_ip, since, until, points):
        return self._run(series, device_id, device_ip, since, until, points)
