"""
The read side of the cloud's SQLite database (L{IReadingQueries}), for the
web API.

Why a pool of its own, and connections of its own: ingest commits on the
reactor thread (L{meter.database}), and must never wait for a reader.  In
WAL mode readers do not block the writer, so each query runs on a read-only
connection (C{mode=ro}) of a thread of this small pool, and its result
comes back to the reactor as a Deferred.  Not the reactor's default pool,
which name resolution shares, and not adbapi, whose connections would be
writable and shared with anything else using it.
"""

from __future__ import annotations

import datetime
import math
import sqlite3
import threading
from pathlib import Path
from urllib.parse import quote

from twisted.application.service import Service
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from meter.cloud.interfaces import Bucket, Cursor, FleetDevice, IReadingQueries, ReadingsQuery, Series
from meter.cloud.sql import SQLITE, SELECT_READINGS, minute_bound, where
from meter.reading import Reading

_parse = datetime.datetime.fromisoformat


def minute_text(moment: datetime.datetime) -> str:
    """
    A bound as the stored text: the first whole minute at or after
    C{moment} (readings are taken on whole minutes).
    """
    return SQLITE.moment(minute_bound(moment))


#: The primary key's order: a page is read from where the last ended, never
#: sorted (an order by time across devices would sort the whole range for
#: every page).
_ORDER = " ORDER BY device_id, taken_at"


def series_width(since: datetime.datetime, until: datetime.datetime, points: int) -> int:
    """
    The width in seconds (whole minutes, at least one) of the buckets that
    cover [since, until) in at most C{points}.
    """
    span = (until - since).total_seconds()
    return max(60, math.ceil(span / points / 60) * 60)


@implementer(IReadingQueries)
class SQLiteReadingQueries(Service):
    """
    Queries of the cloud database at C{path}, on C{threads} threads of
    their own, each with a read-only connection; a service, so its threads
    start and stop with the cloud.

    @param reactor: where the results are delivered.
    """

    def __init__(self, path: Path, reactor, threads: int = 2):
        self._path = Path(path)
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="meter-web-queries")
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def startService(self):
        Service.startService(self)
        self._pool.start()

    def stopService(self):
        Service.stopService(self)
        with self._lock:
            connections, self._connections = self._connections, []
        # A long query (the whole fleet over a year) ends at once, failing,
        # rather than hold up the cloud's stop while the pool joins its
        # threads.
        for connection in connections:
            connection.interrupt()
        self._pool.stop()
        for connection in connections:
            connection.close()

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            uri = f"file:{quote(str(self._path.absolute()))}?mode=ro"
            # check_same_thread off only so that stopService may close it
            # once its thread has ended; it is used on its own thread alone.
            connection = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            # A reader never waits long: the writer holds no lock a WAL
            # reader needs, save for a checkpoint's brief moments.
            connection.execute("PRAGMA busy_timeout=1000")
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def _run(self, work, *args):
        def in_thread():
            return work(self._connection(), *args)

        return deferToThreadPool(self._reactor, self._pool, in_thread)

    # -- IReadingQueries ---------------------------------------------------

    def fleet(self):
        return self._run(_fleet)

    def fleet_json(self, stale_before: datetime.date):
        return self._run(_fleet_json, stale_before)

    def device(self, device_id: int):
        return self._run(_device, device_id)

    def address_range(self, device_ip: str):
        return self._run(_address_range, device_ip)

    def page(self, query: ReadingsQuery, limit: int):
        return self._run(_page, query, limit)

    def next_cursor(self, query: ReadingsQuery, limit: int):
        return self._run(_next_cursor, query, limit)

    def series(self, device_id, device_ip, since, until, points):
        return self._run(_series, device_id, device_ip, since, until, points)


# -- the queries, each on a connection of the pool's -----------------------


def _fleet(connection: sqlite3.Connection) -> list[FleetDevice]:
    return [
        FleetDevice(device_id, ip, _parse(first), _parse(last), count)
        for device_id, ip, first, last, count in connection.execute(
            "SELECT device_id, device_ip, first_reading, last_reading, readings FROM devices ORDER BY device_id"
        )
    ]


#: One device's object of /api/v1/devices, made by SQLite: the times are
#: stored as the API shows them (whole minutes), so compared as text.
_FLEET_JSON = (
    "SELECT json_object('device_id', device_id, 'device_ip', device_ip, 'first_reading', first_reading,"
    " 'last_reading', last_reading, 'readings', readings,"
    " 'stale', json(CASE WHEN last_reading < ? THEN 'true' ELSE 'false' END))"
    " FROM devices ORDER BY device_id"
)


def _fleet_json(connection: sqlite3.Connection, stale_before: datetime.date) -> str:
    return "[" + ",".join(text for (text,) in connection.execute(_FLEET_JSON, (stale_before.isoformat(),))) + "]"


def _device(connection: sqlite3.Connection, device_id: int) -> FleetDevice | None:
    row = connection.execute(
        "SELECT device_id, device_ip, first_reading, last_reading, readings FROM devices WHERE device_id = ?",
        (device_id,),
    ).fetchone()
    if row is None:
        return None
    device_id, ip, first, last, count = row
    return FleetDevice(device_id, ip, _parse(first), _parse(last), count)


def _address_range(connection: sqlite3.Connection, device_ip: str):
    # The readings have no index by address: each device that ever had it,
    # its readings in the key's order from either end, the first stored
    # with the address.
    ends = []
    for least in (True, False):
        (end,) = connection.execute(
            f"SELECT {'min' if least else 'max'}((SELECT taken_at FROM readings AS r"
            " WHERE r.device_id = a.device_id AND r.device_ip = a.device_ip"
            f" ORDER BY taken_at{'' if least else ' DESC'} LIMIT 1))"
            " FROM device_addresses AS a WHERE a.device_ip = ?",
            (device_ip,),
        ).fetchone()
        if end is None:
            return None
        ends.append(_parse(end))
    return ends[0], ends[1]


def _page(connection: sqlite3.Connection, query: ReadingsQuery, limit: int) -> list[Reading]:
    clause, args = where(SQLITE, query)
    rows = connection.execute(SELECT_READINGS + clause + _ORDER + " LIMIT ?", [*args, limit])
    # Checked when they were stored.
    return [Reading.checked(number, ip, _parse(taken), t, h) for number, ip, taken, t, h in rows]


def _next_cursor(connection: sqlite3.Connection, query: ReadingsQuery, limit: int) -> Cursor | None:
    clause, args = where(SQLITE, query)
    rows = connection.execute(
        "SELECT device_id, taken_at FROM readings" + clause + _ORDER + " LIMIT 2 OFFSET ?", [*args, limit - 1]
    ).fetchall()
    if len(rows) < 2:
        return None
    return Cursor(rows[0][0], _parse(rows[0][1]))


def _series(connection, device_id, device_ip, since, until, points) -> Series:
    query = ReadingsQuery(device_id=device_id, device_ip=device_ip, since=since, until=until)
    clause, args = where(SQLITE, query)
    (count,) = connection.execute("SELECT count(*) FROM readings" + clause, args).fetchone()
    if count <= points:
        rows = connection.execute(
            "SELECT taken_at, temperature_c, humidity_pct FROM readings" + clause + " ORDER BY taken_at", args
        )
        return Series(count, None, tuple(Bucket(_parse(at), 1, (t, t, t), (h, h, h)) for at, t, h in rows))
    width = series_width(since, until, points)
    origin = since.replace(second=0, microsecond=0)
    rows = connection.execute(
        "SELECT (CAST(strftime('%s', taken_at) AS INTEGER) - ?) / ? AS bucket, count(*),"
        " min(temperature_c), avg(temperature_c), max(temperature_c),"
        " min(humidity_pct), avg(humidity_pct), max(humidity_pct)"
        " FROM readings" + clause + " GROUP BY bucket ORDER BY bucket",
        [int(origin.replace(tzinfo=datetime.timezone.utc).timestamp()), width, *args],
    )
    step = datetime.timedelta(seconds=width)
    return Series(
        count,
        width,
        tuple(
            Bucket(origin + bucket * step, n, (t_min, t_mean, t_max), (h_min, h_mean, h_max))
            for bucket, n, t_min, t_mean, t_max, h_min, h_mean, h_max in rows
        ),
    )
