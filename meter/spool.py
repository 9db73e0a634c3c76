"""
The gateway's durable spool: a SQLite file holding every reading the gateway
has acknowledged to a device and the cloud has not yet acknowledged.

A chunk is acknowledged to its device only once it is committed here, and a
reading leaves only once the cloud acknowledged the batch holding it, so a
crash at any instant loses nothing.  Opening an existing spool never
reinitialises it: the schema is created only where it is missing.
"""

from __future__ import annotations

import datetime
import sqlite3
from pathlib import Path

import attrs

from meter import wire
from meter.dbthread import DatabaseThread, connect
from meter.reading import HHMM, Reading

SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    seq           INTEGER PRIMARY KEY,
    day           TEXT    NOT NULL,
    device_id     INTEGER NOT NULL,
    device_ip     TEXT    NOT NULL,
    taken_at      TEXT    NOT NULL,
    temperature_c REAL    NOT NULL,
    humidity_pct  REAL    NOT NULL,
    UNIQUE (device_id, taken_at)
);
-- Every chunk acknowledged: the deduplication record of message ids and
-- the reassembly state of each transfer.
CREATE TABLE IF NOT EXISTS parts (
    device_id   INTEGER NOT NULL,
    xfer        TEXT    NOT NULL,
    part        INTEGER NOT NULL,
    parts       INTEGER NOT NULL,
    day         TEXT    NOT NULL,
    received_at REAL    NOT NULL,
    PRIMARY KEY (device_id, xfer, part)
) WITHOUT ROWID;
-- One row a day the gateway has seen: open until every device reported or
-- the deadline passed, then its readings may leave for the cloud.
CREATE TABLE IF NOT EXISTS rounds (
    day       TEXT PRIMARY KEY,
    opened_at REAL NOT NULL,
    closed_at REAL
);
"""


@attrs.frozen
class StoredPart:
    device_id: int
    xfer: str
    part: int
    parts: int
    day: datetime.date
    received_at: float


@attrs.frozen
class StoredRound:
    day: datetime.date
    opened_at: float
    closed_at: float | None


@attrs.frozen
class Recovered:
    """
    What an opened spool holds: the gateway resumes from this after a restart.
    """

    rounds: tuple[StoredRound, ...]
    parts: tuple[StoredPart, ...]
    depth: int


@attrs.frozen
class Spooled:
    """
    A reading in the spool, with the sequence number it is removed by.
    """

    seq: int
    reading: Reading


def _reading(row) -> Reading:
    device_id, device_ip, taken_at, temperature, humidity = row
    # Checked when the chunk was decoded, before it was spooled.
    return Reading.checked(device_id, device_ip, datetime.datetime.fromisoformat(taken_at), temperature, humidity)


class Spool:
    """
    The spool's operations.  Each returns a Deferred that fires after its
    transaction is committed (see L{DatabaseThread}).
    """

    def __init__(self, database: DatabaseThread):
        self._database = database

    @staticmethod
    def open(path: Path) -> tuple[sqlite3.Connection, Recovered]:
        """
        Open (creating if missing) the spool at C{path} and read what it
        holds.  Blocking: called once at start, before the reactor serves.
        """
        connection = connect(path)
        connection.executescript(SCHEMA)
        rounds = tuple(
            StoredRound(datetime.date.fromisoformat(day), opened_at, closed_at)
            for day, opened_at, closed_at in connection.execute(
                "SELECT day, opened_at, closed_at FROM rounds ORDER BY day"
            )
        )
        parts = tuple(
            StoredPart(device_id, xfer, part, parts, datetime.date.fromisoformat(day), received_at)
            for device_id, xfer, part, parts, day, received_at in connection.execute(
                "SELECT device_id, xfer, part, parts, day, received_at FROM parts"
            )
        )
        (depth,) = connection.execute("SELECT count(*) FROM readings").fetchone()
        return connection, Recovered(rounds, parts, depth)

    def add_chunk(self, chunk: wire.DayChunk, now: float, open_round: bool):
        """
        Record C{chunk}'s message id and its readings, and open its day's
        round if C{open_round}.  Fires with the number of readings that were
        new to the spool (a day sent again in a new transfer is not doubled).
        """
        day = chunk.day.isoformat()
        # A chunk's readings are all of its day: only the minute varies.
        stamp = day + "T"
        rows = [
            (
                day,
                r.device_id,
                r.device_ip,
                stamp + HHMM[r.taken_at.hour * 60 + r.taken_at.minute],
                r.temperature_c,
                r.humidity_pct,
            )
            for r in chunk.readings
        ]

        def work(connection: sqlite3.Connection) -> int:
            if open_round:
                connection.execute("INSERT OR IGNORE INTO rounds VALUES (?, ?, NULL)", (day, now))
            # OR IGNORE: a part spooled again (its message id was forgotten
            # when its reassembly expired) is a no-op, not an error.
            connection.execute(
                "INSERT OR IGNORE INTO parts VALUES (?, ?, ?, ?, ?, ?)",
                (chunk.device_id, chunk.xfer, chunk.part, chunk.parts, day, now),
            )
            before = connection.total_changes
            connection.executemany(
                "INSERT OR IGNORE INTO readings (day, device_id, device_ip, taken_at, temperature_c, humidity_pct)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            return connection.total_changes - before

        return self._database.run(work)

    def close_round(self, day: datetime.date, now: float):
        def work(connection: sqlite3.Connection) -> None:
            connection.execute(
                "UPDATE rounds SET closed_at = ? WHERE day = ? AND closed_at IS NULL", (now, day.isoformat())
            )

        return self._database.run(work)

    def take_batch(self, limit: int, after: int = 0):
        """
        Fires with up to C{limit} L{Spooled} readings of closed rounds, oldest
        first, whose sequence numbers are above C{after}: the next batch for
        the cloud.  They stay in the spool.
        """

        def work(connection: sqlite3.Connection) -> list[Spooled]:
            rows = connection.execute(
                "SELECT seq, device_id, device_ip, taken_at, temperature_c, humidity_pct FROM readings"
                " WHERE seq > ? AND day IN (SELECT day FROM rounds WHERE closed_at IS NOT NULL)"
                " ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
            return [Spooled(row[0], _reading(row[1:])) for row in rows]

        return self._database.run(work)

    def remove(self, seqs: list[int]):
        """
        Remove readings the cloud acknowledged; fires with how many went.
        """

        def work(connection: sqlite3.Connection) -> int:
            before = connection.total_changes
            connection.executemany("DELETE FROM readings WHERE seq = ?", [(seq,) for seq in seqs])
            return connection.total_changes - before

        return self._database.run(work)

    def forget_before(self, day: datetime.date):
        """
        Drop message ids and finished rounds older than C{day}: they bound
        how far back a duplicate is recognised.  Rounds still holding
        readings are kept.
        """

        def work(connection: sqlite3.Connection) -> None:
            cutoff = day.isoformat()
            connection.execute("DELETE FROM parts WHERE day < ?", (cutoff,))
            connection.execute(
                "DELETE FROM rounds WHERE day < ? AND closed_at IS NOT NULL"
                " AND NOT EXISTS (SELECT 1 FROM readings WHERE readings.day = rounds.day)",
                (cutoff,),
            )

        return self._database.run(work)
