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
from meter.cloud.interfaces import DeviceSummary, IReadingStore
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


#: The database's versions (see L{meter.database.Schema}): each step takes
#: a database from the version before it to the next.
VERSIONS = Schema(CLOUD_DATABASE, (_version_1,))


def open_database(connection: sqlite3.Connection) -> None:
    """
    Bring the database open on C{connection} to the current version; raises
    L{meter.database.Unusable} for a file of another kind or a newer version
    (see also L{meter.database.prepare}, the start-up checks).
    """
    upgrade(connection, VERSIONS)


_INSERT = RowInsert("INSERT INTO readings", 6, "ON CONFLICT DO NOTHING")


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
            return None
        return [index for index, fresh in enumerate(new) if fresh]

    return work


def minute_bound(moment: datetime.datetime) -> datetime.datetime:
    """
    The first whole minute at or after C{moment}.  Readings are taken on
    whole minutes, so a reading is at or after C{moment} exactly when it is
    at or after this minute: a bound as a stored timestamp's text.
    """
    if moment.second or moment.microsecond:
        return moment.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
    return moment


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
        conditions: list[str] = []
        args: list = []
        for condition, value in (
            ("device_id = ?", device_id),
            ("device_ip = ?", device_ip),
            ("taken_at >= ?", None if since is None else minute_bound(since).isoformat(timespec="minutes")),
            ("taken_at < ?", None if until is None else minute_bound(until).isoformat(timespec="minutes")),
        ):
            if value is not None:
                conditions.append(condition)
                args.append(value)
        sql = "SELECT device_id, device_ip, taken_at, temperature_c, humidity_pct FROM readings"
        if conditions:
            sql += " WHERE " + " AND ".join(conditions)
        sql += " ORDER BY taken_at, device_id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
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
