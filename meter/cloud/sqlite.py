"""
The cloud's readings in SQLite: the schema and its versions, the insert of
a batch's records, the queries.
"""

from __future__ import annotations

import datetime
import sqlite3

from twisted.internet import defer
from zope.interface import implementer

from meter import wire
from meter.cloud.interfaces import DeviceSummary, IReadingStore, ReadingsQuery
from meter.cloud.sql import SQLITE, readings_by_time
from meter.wire.batch import device_runs
from meter.database import CLOUD_DATABASE, Database, RowInsert, Schema, execute_script, insert_telling_new, upgrade
from meter.reading import Reading

#: Version 1 of the database, the first step of L{VERSIONS}.  Fixed: a
#: later change is a step of its own after it.
SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    device_id     INTEGER NOT NULL,
    device_ip     TEXT    NOT NULL,
    taken_at      TEXT    NOT NULL,  -- ISO 8601, YYYY-MM-DDTHH:MM
    temperature_c REAL    NOT NULL,
    humidity_pct  REAL    NOT NULL,
    stored_at     REAL    NOT NULL,  -- Unix seconds of the commit's batch
    PRIMARY KEY (device_id, taken_at)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS readings_by_ip ON readings (device_ip, taken_at);
"""


def _version_1(connection: sqlite3.Connection) -> None:
    """
    The table and index of L{SCHEMA}, made where missing: an empty file, or
    a database of a cloud from before versions.
    """
    execute_script(connection, SCHEMA)


#: Version 2: a summary row a device, kept by the transaction that stores
#: its readings, so the fleet is listed without reading the readings (a
#: year of a large fleet is tens of millions of rows).  Fixed.
DEVICES = """
CREATE TABLE IF NOT EXISTS devices (
    device_id     INTEGER PRIMARY KEY,
    device_ip     TEXT    NOT NULL,  -- the address of its latest reading
    first_reading TEXT    NOT NULL,  -- ISO 8601, as readings.taken_at
    last_reading  TEXT    NOT NULL,
    readings      INTEGER NOT NULL
);
INSERT INTO devices (device_id, device_ip, first_reading, last_reading, readings)
SELECT device_id,
       (SELECT latest.device_ip FROM readings AS latest
        WHERE latest.device_id = r.device_id ORDER BY latest.taken_at DESC LIMIT 1),
       min(taken_at), max(taken_at), count(*)
FROM readings AS r GROUP BY device_id;
"""


def _version_2(connection: sqlite3.Connection) -> None:
    """
    The C{devices} summary table, filled from the readings stored so far.
    """
    execute_script(connection, DEVICES)


#: Version 3: the readings lose their index on address and time, whose
#: upkeep was two fifths of the insert's CPU a reading (a second B-tree,
#: its leaves random in a large fleet); every address a device's readings
#: were stored with is kept once instead, in C{device_addresses}, written by
#: the transaction that stores the readings, and a query by address reads
#: the readings of the devices that ever had it by the key
#: (L{meter.cloud.sql.SQLITE}), as on PostgreSQL.  Fixed.
DEVICE_ADDRESSES = """
CREATE TABLE IF NOT EXISTS device_addresses (
    device_ip TEXT    NOT NULL,
    device_id INTEGER NOT NULL,
    PRIMARY KEY (device_ip, device_id)
) WITHOUT ROWID;
INSERT OR IGNORE INTO device_addresses (device_ip, device_id) SELECT DISTINCT device_ip, device_id FROM readings;
DROP INDEX IF EXISTS readings_by_ip;
"""


def _version_3(connection: sqlite3.Connection) -> None:
    """
    The C{device_addresses} table, filled from the readings stored so far,
    in place of the readings' index by address.
    """
    execute_script(connection, DEVICE_ADDRESSES)


#: The database's versions (see L{meter.database.Schema}): each step takes
#: a database from the version before it to the next.
VERSIONS = Schema(CLOUD_DATABASE, (_version_1, _version_2, _version_3))


def open_database(connection: sqlite3.Connection) -> None:
    """
    Bring the database open on C{connection} to the current version; raises
    L{meter.database.Unusable} for a file of another kind or a newer version
    (see also L{meter.database.prepare}, the start-up checks).
    """
    upgrade(connection, VERSIONS)


_INSERT = RowInsert("INSERT INTO readings", 6, "ON CONFLICT DO NOTHING")

#: A device's summary grown by some new readings of it: the address is the
#: one of its latest reading, old or new.  (Every right-hand side reads the
#: row as it was before the update.)
UPDATE_DEVICES = """
INSERT INTO devices (device_id, device_ip, first_reading, last_reading, readings) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (device_id) DO UPDATE SET
    device_ip = CASE WHEN excluded.last_reading >= last_reading THEN excluded.device_ip ELSE device_ip END,
    first_reading = min(first_reading, excluded.first_reading),
    last_reading = max(last_reading, excluded.last_reading),
    readings = readings + excluded.readings
"""


def device_summaries(devices, ips, stamps) -> list[tuple[int, str, str, str, int]]:
    """
    The rows of L{UPDATE_DEVICES} for some new readings, given as columns
    (device ids as text or numbers, addresses, ISO minutes): one a device,
    its address that of its latest reading among them.

    A batch holds a device's readings in runs (its chunks): each run is
    measured with C-level passes (its length, the least and greatest
    stamp), not a Python step a reading.
    """
    summary: dict = {}
    for device, start, end in device_runs(devices):
        part = stamps[start:end]
        first, last = min(part), max(part)
        ip = ips[start + part.index(last)]
        row = summary.get(device)
        if row is None:
            summary[device] = [ip, first, last, end - start]
        else:
            row[3] += end - start
            if first < row[1]:
                row[1] = first
            if last >= row[2]:
                row[2] = last
                row[0] = ip
    return [(int(device), ip, first, last, count) for device, (ip, first, last, count) in summary.items()]


_ADD_ADDRESSES = RowInsert("INSERT OR IGNORE INTO device_addresses", 2)


def address_pairs(devices, ips) -> list:
    """
    The values of L{_ADD_ADDRESSES} for some new readings, given as columns
    (device ids as text or numbers, addresses): each pair of address and
    device once, row after row.

    A device's run of readings (its chunks) nearly always has one address:
    a C-level count tells, not a Python step a reading.
    """
    pairs: dict = {}
    for device, start, end in device_runs(devices):
        ip = ips[start]
        if ips[start:end].count(ip) == end - start:
            pairs[(ip, device)] = None
        else:
            pairs.update(dict.fromkeys(zip(ips[start:end], devices[start:end])))
    values: list = []
    for ip, device in pairs:
        values.append(ip)
        values.append(int(device))
    return values


def _insert(columns: wire.BatchColumns, stored_at: float):
    """
    Work for the database: insert the records C{columns} (a batch's records
    split, see L{wire.Batch.columns}), skipping those stored before; return
    the positions of the new ones, or C{None} if all are new.
    """

    def work(connection: sqlite3.Connection) -> list[int] | None:
        # The fields were checked by the decoder: canonical numbers in range.
        # The numbers are made here, not by SQLite's column affinity: its
        # text-to-real conversion misses by an ulp on some six-decimal values.
        # Row after row, column by column: one C-level pass a column.
        values: list = [stored_at] * (6 * len(columns))
        values[0::6] = map(int, columns.devices)
        values[1::6] = columns.ips
        values[2::6] = columns.stamps
        values[3::6] = map(float, columns.temperatures)
        values[4::6] = map(float, columns.humidities)
        # Which readings are new, for the console: all of them unless the
        # batch was sent again.
        new = insert_telling_new(connection, _INSERT, values)
        if all(new):
            stored, outcome = columns, None
        else:
            outcome = [index for index, fresh in enumerate(new) if fresh]
            stored = columns.pick(outcome)
        # In the same transaction: the summary and the addresses never
        # disagree with the readings a reader sees.
        connection.executemany(UPDATE_DEVICES, device_summaries(stored.devices, stored.ips, stored.stamps))
        _ADD_ADDRESSES.run(connection, address_pairs(stored.devices, stored.ips))
        return outcome

    return work


@implementer(IReadingStore)
class SQLiteReadingStore:
    """
    Readings in the C{readings} table of an SQLite database at
    L{VERSIONS}' version.

    Writes go through L{database} (group commits on the reactor thread);
    queries read the connection at once, on the same thread, between those
    commits, so they see only what is committed.
    """

    def __init__(self, connection: sqlite3.Connection, reactor=None):
        """
        @param reactor: runs the commits of L{add}; a store only queried
            (C{meter readings}) needs none.
        """
        self._connection = connection
        #: The group commits, for those who wait for them (L{Database.flush},
        #: L{Database.stop}).
        self.database = Database(connection, reactor)

    def add(self, columns: wire.BatchColumns, stored_at: float) -> defer.Deferred:
        return self.database.run(_insert(columns, stored_at))

    def readings(
        self,
        device_id: int | None = None,
        device_ip: str | None = None,
        since: datetime.datetime | None = None,
        until: datetime.datetime | None = None,
        limit: int | None = None,
    ) -> defer.Deferred:
        sql, args = readings_by_time(SQLITE, ReadingsQuery(device_id, device_ip, since, until), limit)
        parse = datetime.datetime.fromisoformat
        return defer.execute(
            lambda: [
                # Checked when they were stored.
                Reading.checked(number, ip, parse(taken_at), temperature, humidity)
                for number, ip, taken_at, temperature, humidity in self._connection.execute(sql, args)
            ]
        )

    def devices(self) -> defer.Deferred:
        parse = datetime.datetime.fromisoformat
        sql = "SELECT device_id, min(taken_at), max(taken_at), count(*) FROM readings GROUP BY device_id ORDER BY device_id"
        return defer.execute(
            lambda: [
                DeviceSummary(device_id, parse(first), parse(last), count)
                for device_id, first, last, count in self._connection.execute(sql)
            ]
        )
