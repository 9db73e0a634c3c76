"""
The cloud: a long-running TCP server that stores every reading gateways
forward, prints each on its console the first time it is stored, and
acknowledges a batch only once it is committed.

L{CloudStore} decides and stores; L{CloudProtocol} only translates lines to
calls on it and answers to lines.
"""

from __future__ import annotations

import datetime
import sqlite3
from collections import Counter
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from meter import wire
from meter.database import CLOUD_DATABASE, Database, RowInsert, Schema, execute_script, insert_telling_new, upgrade

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


def console_text(columns: wire.BatchColumns) -> str:
    """
    The console lines of records, as the report prints them
    (C{192.168.1.4 - 02:00 - 17 - 35%}), each ending in a line feed.  The
    record text is canonical, so its fields are printed as they came.
    """
    # One join of the fields and the text between them: no string a line.
    count = len(columns)
    parts = [" - "] * (8 * count)
    parts[0::8] = columns.ips
    times = {stamp: stamp[11:] for stamp in set(columns.stamps)}
    parts[2::8] = map(times.__getitem__, columns.stamps)
    parts[4::8] = columns.temperatures
    parts[6::8] = columns.humidities
    parts[7::8] = ["%\n"] * count
    return "".join(parts)


_INSERT = RowInsert("INSERT INTO readings", 6, "ON CONFLICT DO NOTHING")


class CloudStore:
    """
    Stores batches exactly once.

    A reading is unique by (device, time taken): a batch sent again is stored
    once and acknowledged again.  A batch is stored whole or not at all.
    """

    log = Logger()

    def __init__(self, database: Database, console: Callable[[str], None], clock):
        """
        @param console: called with the console text of each batch's newly
            stored readings (L{console_text}), once per batch.
        """
        self._database = database
        self._console = console
        self._clock = clock
        #: Counters for the logs: batches, readings new and duplicate, refusals.
        self.counters: Counter[str] = Counter()

    def store(self, batch: wire.Batch, peer: str) -> Deferred:
        """
        Commit C{batch}; the Deferred fires with the L{wire.BatchAck} to send,
        after the commit.
        """
        received = self._clock.seconds()
        columns = batch.columns()
        d = self._database.run(_insert(columns, received))

        def committed(new_at: list[int] | None) -> wire.BatchAck:
            new = columns if new_at is None else columns.pick(new_at)
            if new:
                self._console(console_text(new))
            count = len(columns)
            duplicates = count - len(new)
            self.counters["batches"] += 1
            self.counters["readings_new"] += len(new)
            self.counters["readings_duplicate"] += duplicates
            self.log.info(
                "batch {batch_id} from {peer}: {count} readings committed ({new} new, {dup} duplicate) "
                "in {ms:.1f} ms; acknowledged at={at:.6f}",
                batch_id=batch.batch_id,
                peer=peer,
                count=count,
                new=len(new),
                dup=duplicates,
                ms=(self._clock.seconds() - received) * 1000,
                at=self._clock.seconds(),
            )
            return wire.BatchAck(batch.batch_id, "ok", new=len(new), dup=duplicates)

        def failed(failure) -> wire.BatchAck:
            # Not committed: refuse the whole batch so the gateway keeps it.
            self.counters["store_failures"] += 1
            self.log.failure("batch {batch_id} from {peer} not stored", failure, batch_id=batch.batch_id, peer=peer)
            return wire.BatchAck(batch.batch_id, "bad", reason=f"not stored: {failure.getErrorMessage()}")

        return d.addCallbacks(committed, failed)


class CloudProtocol(wire.LineProtocol, TimeoutMixin):
    """
    One gateway connection: newline-delimited messages of L{meter.wire}.
    """

    MAX_LENGTH = wire.MAX_LINE
    log = Logger()

    def __init__(self, store: CloudStore, idle_timeout: float, clock):
        self._store = store
        self._idle_timeout = idle_timeout
        # TimeoutMixin schedules through this attribute; use the injected clock.
        self.callLater = clock.callLater

    def connectionMade(self):
        self._peer = _describe(self.transport.getPeer())
        wire.without_nagle(self.transport)
        self.setTimeout(self._idle_timeout)
        self.log.info("gateway {peer} connected", peer=self._peer)

    def connectionLost(self, reason):
        self.setTimeout(None)
        self.log.info("gateway {peer} disconnected: {why}", peer=self._peer, why=reason.getErrorMessage())

    def timeoutConnection(self):
        self.log.warn("gateway {peer} silent for {t:g} s: closing", peer=self._peer, t=self._idle_timeout)
        self._store.counters["idle_timeouts"] += 1
        self.transport.abortConnection()

    def lineReceived(self, line: bytes):
        self.resetTimeout()
        try:
            message = wire.decode(line)
        except wire.WireError as e:
            self._refuse(line, e)
            return
        if isinstance(message, wire.Batch):
            self._store.store(message, self._peer).addCallback(self._answer)
        elif isinstance(message, wire.Ping):
            self._answer(wire.Pong(message.seq))
        else:
            self._store.counters["unexpected"] += 1
            self.log.warn("gateway {peer} sent a {kind}, which a cloud never takes", peer=self._peer, kind=type(message).__name__)

    def _answer(self, message) -> None:
        if self.transport.connected:
            self.sendLine(wire.encode(message))

    def _refuse(self, line: bytes, error: wire.WireError) -> None:
        self._store.counters[f"refused_{error.code}"] += 1
        self.log.warn("gateway {peer}: refused line of {size} bytes: {error}", peer=self._peer, size=len(line), error=str(error))
        answer = wire.refusal(line, error)
        if isinstance(answer, wire.BatchAck):
            self._answer(answer)
        else:
            # Not even a batch we could name: the stream is not ours.
            self.transport.loseConnection()

    def lineLengthExceeded(self, line):
        self._store.counters["refused_size"] += 1
        self.log.warn("gateway {peer}: line longer than {max} bytes: closing", peer=self._peer, max=self.MAX_LENGTH)
        self.transport.loseConnection()


class CloudFactory(Factory):
    def __init__(self, store: CloudStore, idle_timeout: float, clock):
        self._store = store
        self._idle_timeout = idle_timeout
        self._clock = clock

    def buildProtocol(self, addr):
        return CloudProtocol(self._store, self._idle_timeout, self._clock)


def _describe(address) -> str:
    host = getattr(address, "host", None)
    return f"{host}:{address.port}" if host is not None else str(address)


def query_readings(connection: sqlite3.Connection, device_ip: str | None = None):
    """
    Rows of stored readings, oldest first: (device_ip, taken_at, temperature,
    humidity), optionally of one device address.
    """
    sql = "SELECT device_ip, taken_at, temperature_c, humidity_pct FROM readings"
    args: tuple = ()
    if device_ip is not None:
        sql += " WHERE device_ip = ?"
        args = (device_ip,)
    sql += " ORDER BY taken_at, device_ip"
    for ip, taken_at, temperature, humidity in connection.execute(sql, args):
        yield ip, datetime.datetime.fromisoformat(taken_at), temperature, humidity
