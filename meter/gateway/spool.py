"""
The gateway's durable spool: a SQLite file holding every reading the gateway
has acknowledged to a device and the cloud has not yet acknowledged.

A chunk is acknowledged to its device only once it is committed here, and a
reading leaves only once the cloud acknowledged the batch holding it, so a
crash at any instant loses nothing.  Opening an existing spool never
reinitialises it: the file records its kind and schema version (see
L{meter.database.Schema}), and an older spool takes the steps to the current
version as it is opened (a spool written one row a reading has its readings
moved into chunks).

A chunk is stored as one row holding its record text, so taking a datagram
costs one row, not one per reading.  The spool therefore does not make
readings unique by device and minute: a day sent again in a new transfer is
stored and forwarded again, and the cloud, whose key is the device and the
minute, stores it once and counts the rest as duplicates.  A chunk spooled
again under the same message id is still a no-op.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Iterable

import attrs
from zope.interface import implementer

from meter import wire
from meter.database import GATEWAY_SPOOL, Database, RowInsert, Schema, connect, execute_script, insert_telling_new, upgrade
from meter.gateway.interfaces import ISpool
from meter.reading import Reading, format_number

#: Version 1 of the spool, the first step of L{VERSIONS}.  Fixed: a later
#: change is a step of its own after it.
SCHEMA = """
-- One row a chunk: its readings as the canonical DAY record text the device
-- sent (HH:MM,temperature,humidity;...), n of them.
CREATE TABLE IF NOT EXISTS chunks (
    seq       INTEGER PRIMARY KEY,
    day       TEXT    NOT NULL,
    device_id INTEGER NOT NULL,
    device_ip TEXT    NOT NULL,
    records   TEXT    NOT NULL,
    n         INTEGER NOT NULL
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
class StoredChunk:
    """
    The spool's record of a chunk it took (its row in the C{parts} table):
    its message id (device, transfer, C{part}), its transfer's number of
    chunks C{parts}, its day, when it arrived and its content digest.
    """

    device_id: int
    xfer: str
    part: int
    parts: int
    day: datetime.date
    received_at: float
    digest: bytes | None = None


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
    chunks: tuple[StoredChunk, ...]
    depth: int


@attrs.frozen
class SpooledBatch:
    """
    The next batch for the cloud, as the spool holds it: the readings of
    whole chunks as C{BATCH} record text, and the chunks' sequence numbers,
    by which they are removed once the cloud acknowledged them.
    """

    seqs: tuple[int, ...]
    records: str
    count: int
    #: The place of its last chunk in the order chunks became ready (see
    #: L{Spool.take_batch}): the next batch starts after it.
    last: int = 0
    #: Whether ready chunks were left behind it (it was full): nothing more
    #: is ready now if not.
    more: bool = False

    @property
    def readings(self) -> tuple[Reading, ...]:
        return wire.Batch("0" * 16, self.records).readings


def content_digest(body: bytes) -> bytes:
    """
    The digest of a C{DAY} message's unsealed bytes (as L{wire.encode} makes
    them): what tells a retransmission (the same bytes) from a message id
    sent again with other content.  A device holding the key could craft a
    collision of a short digest only to confuse its own data, but 16 bytes
    of BLAKE2b leave it no chance of that either.
    """
    return hashlib.blake2b(body, digest_size=16).digest()


def chunk_digest(chunk: wire.DayChunk) -> bytes:
    """
    The L{content_digest} of C{chunk} as L{wire.encode} writes it: that of
    the datagram a device sends, when the device writes canonical text.
    """
    return content_digest(wire.encode(chunk))


_ADD_CHUNK = "INSERT INTO chunks (day, device_id, device_ip, records, n) VALUES (?, ?, ?, ?, ?)"


def _migrate(connection: sqlite3.Connection) -> None:
    """
    Move the readings of a spool written one row a reading into chunks, one
    a device and day, in their order.
    """
    if connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'readings'").fetchone() is None:
        return
    groups: dict[tuple[str, int, str], list[str]] = {}
    for day, device_id, device_ip, taken_at, temperature, humidity in connection.execute(
        "SELECT day, device_id, device_ip, taken_at, temperature_c, humidity_pct FROM readings ORDER BY seq"
    ):
        groups.setdefault((day, device_id, device_ip), []).append(
            f"{taken_at[11:16]},{format_number(temperature)},{format_number(humidity)}"
        )
    connection.executemany(
        _ADD_CHUNK,
        [(day, device_id, device_ip, ";".join(records), len(records)) for (day, device_id, device_ip), records in groups.items()],
    )
    connection.execute("DROP TABLE readings")


def _version_1(connection: sqlite3.Connection) -> None:
    """
    The tables of L{SCHEMA}, made where missing: an empty file, or a spool
    of a gateway from before versions (a spool of one row a reading has its
    readings moved into chunks).
    """
    execute_script(connection, SCHEMA)
    _migrate(connection)


def _version_2(connection: sqlite3.Connection) -> None:
    """
    Each chunk's content digest (L{content_digest}), so a message id sent
    again with other content is told from a retransmission; C{NULL} in the
    rows spooled before it, which are taken as retransmissions as before.
    """
    connection.execute("ALTER TABLE parts ADD COLUMN digest BLOB")


def _version_3(connection: sqlite3.Connection) -> None:
    """
    Chunks the cloud refused for good (a reading it will never take, as a
    cloud of another release may): set aside with the reason, out of the
    way of the chunks behind them, kept for the operator.  Keyed by a row
    id of its own: a chunk's C{seq} is used again once the spool has
    drained, so two chunks set aside may have had the same one.
    """
    connection.execute(
        "CREATE TABLE refused ("
        " id INTEGER PRIMARY KEY, seq INTEGER NOT NULL, day TEXT NOT NULL, device_id INTEGER NOT NULL,"
        " device_ip TEXT NOT NULL, records TEXT NOT NULL, n INTEGER NOT NULL, reason TEXT NOT NULL,"
        " refused_at REAL NOT NULL)"
    )


def _version_4(connection: sqlite3.Connection) -> None:
    """
    Each chunk's place in the order chunks became ready to leave (C{ready},
    NULL while it waits), indexed both ways, so taking the next batch and
    making a round's or a device's chunks ready are index look-ups, not a
    scan of the spool, however much it holds.  The chunks of rounds closed
    already are ready, in their order.
    """
    connection.execute("ALTER TABLE chunks ADD COLUMN ready INTEGER")
    connection.execute("CREATE INDEX chunks_ready ON chunks (ready) WHERE ready IS NOT NULL")
    connection.execute("CREATE INDEX chunks_waiting ON chunks (day, device_id) WHERE ready IS NULL")
    connection.execute("UPDATE chunks SET ready = seq WHERE day IN (SELECT day FROM rounds WHERE closed_at IS NOT NULL)")


#: The spool's versions (see L{meter.database.Schema}): each step takes a
#: spool from the version before it to the next.
VERSIONS = Schema(GATEWAY_SPOOL, (_version_1, _version_2, _version_3, _version_4))


def _next_ready(connection: sqlite3.Connection) -> int:
    """
    Where the chunks made ready now start in the ready order: C{ready} is
    this plus a number above 0 (each chunk's C{seq}, or its place among
    those made ready together), above every chunk ready already, so a
    batch in flight never has a chunk made ready after it placed before
    its end.
    """
    (last,) = connection.execute("SELECT max(ready) FROM chunks WHERE ready IS NOT NULL").fetchone()
    return last or 0


def _ready_if_round_closed(connection: sqlite3.Connection, after_seq: int) -> None:
    """
    Make ready the chunks added above C{after_seq} whose day's round the
    spool holds closed: a late chunk leaves without waiting for anything.
    """
    connection.execute(
        "UPDATE chunks SET ready = ? + seq WHERE seq > ? AND ready IS NULL"
        " AND day IN (SELECT day FROM rounds WHERE closed_at IS NOT NULL)",
        (_next_ready(connection), after_seq),
    )


def _ready_days(connection: sqlite3.Connection, days: list[str], most: int | None = None) -> int:
    """
    Make ready the chunks of C{days} (ISO dates) not ready yet, every one
    or C{most} of them: the earliest day's first, by device, then as
    spooled.  That is the order of the index of waiting chunks, so a slice
    of a large day is found without sorting the rest of it; how many
    readings became ready.

    They leave in that order too: the cloud's readings are keyed by device,
    and a batch of neighbouring devices lands on neighbouring pages of its
    B-tree, where devices in the order they reported land on pages all
    over it (half the cloud's store work a reading: C{bench/cloud_store.py
    --order}).  Only the slice is numbered, so the cost stays a slice's.
    """
    rows = connection.execute(
        "UPDATE chunks SET ready = ? + slice.place FROM"
        " (SELECT seq, row_number() OVER (ORDER BY day, device_id, seq) AS place FROM"
        "  (SELECT seq, day, device_id FROM chunks WHERE ready IS NULL AND day IN (SELECT value FROM json_each(?))"
        "   ORDER BY day, device_id, seq LIMIT ?)) AS slice"
        " WHERE chunks.seq = slice.seq"
        " RETURNING n",
        (_next_ready(connection), json.dumps(days), -1 if most is None else most),
    ).fetchall()
    return sum(n for (n,) in rows)


_ADD_ROUND = "INSERT OR IGNORE INTO rounds VALUES (?, ?, ?)"
# OR IGNORE: a chunk spooled again (its message id no longer in the
# gateway's memory, as after a forget the spool failed) is a no-op, not an
# error.
_ADD_PART = RowInsert("INSERT OR IGNORE INTO parts", 7)


def _add_chunks(connection: sqlite3.Connection, items: list[tuple]) -> list[int]:
    """
    Work for the spool's L{Database}: spool the chunks that arrived together,
    C{(round row, part row, chunk row)} each, in three statements
    rather than three a chunk; the readings each added (0 for a chunk spooled
    already).
    """
    rounds = {}
    for round_row, _, _ in items:
        rounds.setdefault(round_row[0], round_row)
    connection.executemany(_ADD_ROUND, rounds.values())
    new = insert_telling_new(connection, _ADD_PART, [value for _, part, _ in items for value in part])
    chunks = [row for (_, _, row), fresh in zip(items, new) if fresh and row[4]]
    if chunks:
        (last_seq,) = connection.execute("SELECT coalesce(max(seq), 0) FROM chunks").fetchone()
        connection.executemany(_ADD_CHUNK, chunks)
        _ready_if_round_closed(connection, last_seq)
    return [row[4] if fresh else 0 for (_, _, row), fresh in zip(items, new)]


def _recovered(connection: sqlite3.Connection) -> Recovered:
    rounds = tuple(
        StoredRound(datetime.date.fromisoformat(day), opened_at, closed_at)
        for day, opened_at, closed_at in connection.execute(
            "SELECT day, opened_at, closed_at FROM rounds ORDER BY day"
        )
    )
    parts = tuple(
        StoredChunk(device_id, xfer, part, parts, datetime.date.fromisoformat(day), received_at, digest)
        for device_id, xfer, part, parts, day, received_at, digest in connection.execute(
            "SELECT device_id, xfer, part, parts, day, received_at, digest FROM parts ORDER BY device_id, xfer, part"
        )
    )
    (depth,) = connection.execute("SELECT coalesce(sum(n), 0) FROM chunks").fetchone()
    return Recovered(rounds, parts, depth)


def batch_of(rows: Iterable[tuple[int, str, int, str, str, int, int]], limit: int) -> SpooledBatch:
    """
    The next batch for the cloud from the ready chunks C{rows} (C{seq, day,
    device_id, device_ip, records, n, ready}, in their ready order):
    whole chunks up to C{limit} readings (a chunk of more than C{limit}
    readings goes alone).

    A device and minute appears once in a batch (the cloud refuses a
    batch that repeats one): a reading of a day spooled twice whose first
    copy is in the batch already is left out, and goes, as a duplicate,
    with its chunk in a later batch if the chunk is not in this one.
    """
    seqs: list[int] = []
    parts: list[str] = []
    #: The times already in the batch, by device and day.
    times: dict[tuple[int, str], set[str]] = {}
    count = 0
    last = 0
    more = False
    for seq, day, device_id, device_ip, records, n, ready in rows:
        if count and count + n > limit:
            more = True
            break
        chunk_records = records.split(";")
        chunk_times = {record[:5] for record in chunk_records}
        taken = times.setdefault((device_id, day), set())
        if not taken.isdisjoint(chunk_times):
            # Rare: the day was spooled twice (sent again in a new
            # transfer), or a device repeated a time across chunks.  Keep
            # the first reading of each minute; a chunk with nothing left
            # waits for a later batch.
            kept = []
            for record in chunk_records:
                if record[:5] not in taken:
                    taken.add(record[:5])
                    kept.append(record)
            if not kept:
                continue
            records = ";".join(kept)
        else:
            taken |= chunk_times
        seqs.append(seq)
        parts.append(wire.batch_records_of_day(records, day, device_id, device_ip))
        last = ready
        count += n
        if count >= limit:
            more = True
            break
    batch = ";".join(parts)
    return SpooledBatch(tuple(seqs), batch, wire.record_count(batch), last, more)


@implementer(ISpool)
class Spool:
    """
    The spool's operations.  Each returns a Deferred that fires after its
    transaction is committed (see L{Database}).

    @param depth: the readings the file holds as it was opened
        (L{Recovered.depth}); the spool keeps count from there.
    """

    def __init__(self, database: Database, depth: int = 0):
        self._database = database
        self.depth = depth
        self.removed = 0

    @staticmethod
    def open(path: Path) -> tuple[sqlite3.Connection, Recovered]:
        """
        Open (creating if missing) the spool at C{path}, at the current
        version, and read what it holds.  Blocking: called once at start,
        before the reactor serves.  Raises L{meter.database.Unusable} for a
        file of another kind or a newer version (see also
        L{meter.database.prepare}, the start-up checks).
        """
        connection = connect(path)
        try:
            upgrade(connection, VERSIONS)
        except BaseException:
            connection.close()
            raise
        return connection, _recovered(connection)

    def add_chunk(self, chunk: wire.DayChunk, now: float, round_closed: bool = False, digest: bytes | None = None):
        """
        Record C{chunk}'s message id with its content digest (C{digest}, its
        L{chunk_digest} if not given) and its
        readings, and its day's round where the spool has none: open, or
        closed if C{round_closed} (the gateway closed it and the spool has
        forgotten it since).  Fires with the number of readings that were
        new to the spool: all of the chunk's, or none if a chunk with its
        message id is spooled already.
        """
        day = chunk.day.isoformat()
        item = (
            (day, now, now if round_closed else None),
            (chunk.device_id, chunk.xfer, chunk.part, chunk.parts, day, now, digest if digest is not None else chunk_digest(chunk)),
            (day, chunk.device_id, chunk.device_ip, chunk.records, chunk.count),
        )
        return self._database.run_many(_add_chunks, item).addCallback(self._added)

    def _added(self, new: int) -> int:
        self.depth += new
        return new

    def _left(self, count: int) -> int:
        self.depth -= count
        self.removed += count
        return count

    def recover(self):
        return self._database.run(_recovered)

    def close_round(self, day: datetime.date, now: float, most: int | None = None):
        """
        Close C{day}'s round: its readings may leave (the chunks of the
        day not ready yet become ready, every one or C{most} of them; see
        L{_ready_days}); fires with how many readings became ready.  A round the
        spool does not hold yet (every write of its chunks failed so far)
        is added closed, so a chunk of it spooled later is forwarded.
        """
        text = day.isoformat()

        def work(connection: sqlite3.Connection) -> int:
            connection.execute(
                "INSERT INTO rounds VALUES (?, ?, ?) ON CONFLICT (day) DO UPDATE SET closed_at = ?"
                " WHERE closed_at IS NULL",
                (text, now, now, now),
            )
            return _ready_days(connection, [text], most)

        return self._database.run(work)

    def devices_ready(self, devices):
        """
        Make ready the chunks spooled for each device and day of C{devices}
        (C{(device_id, day)} pairs: their transfers are complete), before
        their round closes; fires with how many readings became ready.
        """
        rows = [(device_id, day.isoformat()) for device_id, day in devices]

        def work(connection: sqlite3.Connection) -> int:
            start = _next_ready(connection)
            ready = 0
            for device_id, day in rows:
                for (n,) in connection.execute(
                    "UPDATE chunks SET ready = ? + seq WHERE day = ? AND device_id = ? AND ready IS NULL RETURNING n",
                    (start, day, device_id),
                ):
                    ready += n
            return ready

        return self._database.run(work)

    def days_ready(self, days, most: int | None = None):
        """
        Make ready the chunks of C{days} not ready yet, their rounds open
        or not (a full spool forwards what it holds): every one, or C{most}
        of them (see L{_ready_days}); fires with how many readings became
        ready.
        """
        texts = sorted({day.isoformat() for day in days})
        return self._database.run(lambda connection: _ready_days(connection, texts, most))

    def take_batch(self, limit: int, after: int = 0):
        """
        Fires with the L{SpooledBatch} readings of the ready chunks placed
        after C{after} in the order they became ready (see L{batch_of}):
        the next batch for the cloud.  They stay in the spool.  With nothing
        ready, C{count} is 0.  An index look-up, whatever the spool holds.
        """

        def work(connection: sqlite3.Connection) -> SpooledBatch:
            cursor = connection.execute(
                "SELECT seq, day, device_id, device_ip, records, n, ready FROM chunks WHERE ready > ? ORDER BY ready",
                (after,),
            )
            try:
                return batch_of(cursor, limit)
            finally:
                cursor.close()

        return self._database.run(work)

    def remove(self, seqs):
        """
        Remove the chunks of readings the cloud acknowledged (by their
        C{seq}s); fires with how many readings went.
        """
        unique = sorted(set(seqs))

        def work(connection: sqlite3.Connection) -> int:
            removed = connection.execute(
                "DELETE FROM chunks WHERE seq IN (SELECT value FROM json_each(?)) RETURNING n",
                (json.dumps(unique),),
            ).fetchall()
            return sum(n for (n,) in removed)

        return self._database.run(work).addCallback(self._left)

    def set_aside(self, seqs, reason: str, now: float):
        """
        Move the chunks of a batch the cloud refused for good (by their
        C{seq}s) into the C{refused} table with C{reason}; fires with how
        many readings went.  They leave the spool's depth, not the file.
        """
        unique = json.dumps(sorted(set(seqs)))

        def work(connection: sqlite3.Connection) -> int:
            connection.execute(
                "INSERT INTO refused (seq, day, device_id, device_ip, records, n, reason, refused_at)"
                " SELECT seq, day, device_id, device_ip, records, n, ?, ? FROM chunks"
                " WHERE seq IN (SELECT value FROM json_each(?))",
                (reason, now, unique),
            )
            removed = connection.execute(
                "DELETE FROM chunks WHERE seq IN (SELECT value FROM json_each(?)) RETURNING n", (unique,)
            ).fetchall()
            return sum(n for (n,) in removed)

        return self._database.run(work).addCallback(self._left)

    def forget_before(self, before: float):
        """
        Drop the message ids of every device and day whose last chunk
        arrived before C{before} (on the gateway's clock, as C{received_at}),
        and the rounds closed before it that hold no readings any more: they
        bound how far back a duplicate is recognised.  Age on the gateway's
        own clock decides, never a day a device named.
        """

        def work(connection: sqlite3.Connection) -> None:
            connection.execute(
                "DELETE FROM parts WHERE (device_id, day) IN"
                " (SELECT device_id, day FROM parts GROUP BY device_id, day HAVING max(received_at) < ?)",
                (before,),
            )
            connection.execute(
                "DELETE FROM rounds WHERE closed_at < ?"
                " AND NOT EXISTS (SELECT 1 FROM chunks WHERE chunks.day = rounds.day)",
                (before,),
            )

        return self._database.run(work)
