"""
The cloud's readings in PostgreSQL: the schema and its versions, the
monthly partitions of the readings, and the store of batches behind
L{IReadingStore}, for any number of cloud nodes in front of one database.

Nearly every batch is new to the database, so a batch is first COPYed
straight into the readings, its devices' summaries updated by one statement
of one row a device: if that succeeds every reading was new.  If a reading
of it is stored already (a batch sent again, or sent to two nodes), or the
batch holds a key twice, the COPY fails, its savepoint undoes it, and the
batch is staged with COPY into a temporary table and moved with one
C{INSERT ... SELECT ... ON CONFLICT (device_id, taken_at) DO NOTHING
RETURNING}: the rows it returns are the readings new to the database,
whichever node stored the others, so each is printed once across the
nodes.  Why two ways: COPY inserts a page of rows at a time and checks no
conflict row by row; the staged insert took the server 6.5 µs of CPU a
reading, the COPY 3.5 µs (bench/overhead.py's batches alone), 2.1 µs
without an index by address (schema version 2).  The devices' summaries,
and the addresses each device's readings were stored with
(C{device_addresses}), are updated in the same transaction; the Deferred
fires after its COMMIT, with C{synchronous_commit} on.
"""

from __future__ import annotations

import datetime
import itertools
from typing import Callable

import psycopg
from twisted.application.service import Service
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from meter import wire
from meter.cloud.interfaces import DeviceSummary, IReadingStore, ReadingsQuery
from meter.cloud.sql import POSTGRESQL, readings_by_time
from meter.postgres import ConnectionRunner, PostgresLocation, Unusable
from meter.reading import Reading

#: The key of the session-level advisory lock held while the schema is
#: checked and upgraded: nodes starting together upgrade one at a time,
#: the others then find it done.  ("meter" in ASCII.)
SCHEMA_LOCK = 0x6D65746572
#: The key of the transaction-level advisory lock held while partitions are
#: made: two nodes never make the same one at once.
PARTITION_LOCK = SCHEMA_LOCK + 1

#: Version 1.  Fixed: a later change is a step of its own after it.
#: Times are the devices' local time, naive (C{timestamp}), as on the wire.
#: The key (device_id, taken_at) serves the queries by device and time; the
#: index on address and time those by address.  Partitions are made by
#: L{ensure_partitions}, one a month of the time taken.
VERSION_1 = """
CREATE TABLE readings (
    device_id     integer          NOT NULL,
    device_ip     text             NOT NULL,
    taken_at      timestamp        NOT NULL,
    temperature_c double precision NOT NULL,
    humidity_pct  double precision NOT NULL,
    stored_at     double precision NOT NULL,  -- Unix seconds the batch was received
    PRIMARY KEY (device_id, taken_at)
) PARTITION BY RANGE (taken_at);
CREATE INDEX readings_by_ip ON readings (device_ip, taken_at);
CREATE TABLE devices (
    device_id     integer   PRIMARY KEY,
    device_ip     text      NOT NULL,  -- the address of its latest reading
    first_reading timestamp NOT NULL,
    last_reading  timestamp NOT NULL,
    readings      bigint    NOT NULL
);
"""

#: Version 2: the readings lose their index on address and time, which was
#: a third of the server's CPU a reading stored (3.3 -> 2.1 µs); every
#: address a device's readings were stored with is kept once instead, in
#: C{device_addresses}, and a query by address reads the readings of the
#: devices that ever had it by the key (L{meter.cloud.sql.POSTGRESQL}).  A
#: reading keeps the address it was stored with, so a device whose address
#: changed is found under each, with the readings of each.  Every node must
#: run this version before readings are stored again: an older node's
#: readings would miss their address here.
VERSION_2 = """
CREATE TABLE device_addresses (
    device_ip text    NOT NULL,
    device_id integer NOT NULL,
    PRIMARY KEY (device_ip, device_id)
);
INSERT INTO device_addresses (device_ip, device_id) SELECT DISTINCT device_ip, device_id FROM readings;
DROP INDEX readings_by_ip;
"""

#: The steps: C{STEPS[n]} takes the schema from version C{n} to C{n + 1}.
STEPS: tuple[str, ...] = (VERSION_1, VERSION_2)
VERSION = len(STEPS)


class SchemaError(Unusable):
    """
    The database holds a schema this code cannot work with.
    """


def upgrade(connection) -> int:
    """
    Bring the database on C{connection} (autocommit) to L{VERSION} under
    L{SCHEMA_LOCK}: each missing step in a transaction of its own that
    records its version.  Returns the version found.
    """
    connection.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
    try:
        with connection.transaction():
            connection.execute("CREATE TABLE IF NOT EXISTS meter_schema (version integer NOT NULL)")
            row = connection.execute("SELECT max(version) FROM meter_schema").fetchone()
        found = row[0] or 0
        if found > VERSION:
            raise SchemaError(f"the database's schema is version {found}, newer than this meter's ({VERSION})")
        for version in range(found, VERSION):
            with connection.transaction():
                connection.execute(STEPS[version])
                connection.execute("INSERT INTO meter_schema (version) VALUES (%s)", (version + 1,))
        return found
    finally:
        connection.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))


def month_start(moment: datetime.date) -> datetime.date:
    return datetime.date(moment.year, moment.month, 1)


def next_month(month: datetime.date) -> datetime.date:
    return datetime.date(month.year + (month.month == 12), month.month % 12 + 1, 1)


def partition_name(month: datetime.date) -> str:
    return f"readings_{month.year:04d}_{month.month:02d}"


def existing_partitions(connection) -> set[str]:
    rows = connection.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'readings'::regclass"
    ).fetchall()
    return {name for (name,) in rows}


def ensure_partitions(connection, months, known: set[str]) -> None:
    """
    Make the partitions of C{months} (first days of months) missing from
    C{known} (the partitions seen so far, grown here), in a transaction of
    their own under L{PARTITION_LOCK}: another node may be making the
    same, and C{IF NOT EXISTS} alone races.
    """
    missing = sorted(month for month in months if partition_name(month) not in known)
    if not missing:
        return
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
        present = existing_partitions(connection)
        for month in missing:
            name = partition_name(month)
            if name not in present:
                # December 9999 has no next month in Python; its readings are
                # valid on the wire all the same.
                until = "(MAXVALUE)" if month.year == 9999 and month.month == 12 else f"('{next_month(month).isoformat()}')"
                connection.execute(
                    f"CREATE TABLE {name} PARTITION OF readings FOR VALUES FROM ('{month.isoformat()}') TO {until}"
                )
                present.add(name)
    known.update(present)


#: Months of partitions made ahead of the current one, and kept behind it.
MONTHS_AHEAD = 3
MONTHS_BEHIND = 1


def months_around(today: datetime.date, behind: int = MONTHS_BEHIND, ahead: int = MONTHS_AHEAD) -> list[datetime.date]:
    month = month_start(today)
    for _ in range(behind):
        month = month_start(month - datetime.timedelta(days=1))
    months = []
    for _ in range(behind + 1 + ahead):
        months.append(month)
        month = next_month(month)
    return months


#: The batch, staged: a temporary table of the session, emptied at each
#: commit (or rollback).
STAGING = """
CREATE TEMPORARY TABLE IF NOT EXISTS staging (
    position      integer          NOT NULL,
    device_id     integer          NOT NULL,
    device_ip     text             NOT NULL,
    taken_at      timestamp        NOT NULL,
    temperature_c double precision NOT NULL,
    humidity_pct  double precision NOT NULL
) ON COMMIT DELETE ROWS
"""

#: A batch none of whose readings is stored yet, straight into the readings.
_COPY_NEW = "COPY readings (device_id, device_ip, taken_at, temperature_c, humidity_pct, stored_at) FROM STDIN"

#: The summaries of the devices of a batch COPYed whole: one row a device
#: (L{meter.cloud.sqlite.device_summaries}), in the devices' order; and the
#: batch's pairs of address and device, each once, in the key's order.
SUMMARIZE_NEW = """
WITH addresses AS (
    INSERT INTO device_addresses (device_ip, device_id)
    SELECT * FROM unnest(%s::text[], %s::integer[])
    ON CONFLICT DO NOTHING
)
INSERT INTO devices AS d (device_id, device_ip, first_reading, last_reading, readings)
SELECT * FROM unnest(%s::integer[], %s::text[], %s::timestamp[], %s::timestamp[], %s::bigint[])
ON CONFLICT (device_id) DO UPDATE SET
    device_ip = CASE WHEN excluded.last_reading >= d.last_reading THEN excluded.device_ip ELSE d.device_ip END,
    first_reading = least(d.first_reading, excluded.first_reading),
    last_reading = greatest(d.last_reading, excluded.last_reading),
    readings = d.readings + excluded.readings
"""

#: The staged readings new to the database inserted, the first of a key
#: when the batch holds it twice, in the key's order (so that two nodes
#: inserting overlapping batches take the keys' locks in the same order and
#: wait for each other rather than deadlock); the summaries of their devices
#: updated (the address of a device is that of its latest reading, old or
#: new); how many were new, and, when not all, their positions.
INSERT = """
WITH inserted AS (
    INSERT INTO readings (device_id, device_ip, taken_at, temperature_c, humidity_pct, stored_at)
    SELECT DISTINCT ON (device_id, taken_at) device_id, device_ip, taken_at, temperature_c, humidity_pct, %(stored_at)s
    FROM staging ORDER BY device_id, taken_at, position
    ON CONFLICT (device_id, taken_at) DO NOTHING
    RETURNING device_id, device_ip, taken_at
), summaries AS (
    INSERT INTO devices AS d (device_id, device_ip, first_reading, last_reading, readings)
    SELECT device_id, (array_agg(device_ip ORDER BY taken_at DESC))[1], min(taken_at), max(taken_at), count(*)
    FROM inserted GROUP BY device_id ORDER BY device_id
    ON CONFLICT (device_id) DO UPDATE SET
        device_ip = CASE WHEN excluded.last_reading >= d.last_reading THEN excluded.device_ip ELSE d.device_ip END,
        first_reading = least(d.first_reading, excluded.first_reading),
        last_reading = greatest(d.last_reading, excluded.last_reading),
        readings = d.readings + excluded.readings
), addresses AS (
    INSERT INTO device_addresses (device_ip, device_id)
    SELECT DISTINCT device_ip, device_id FROM inserted ORDER BY device_ip, device_id
    ON CONFLICT DO NOTHING
)
SELECT count(*),
       CASE WHEN count(*) = %(count)s THEN NULL ELSE
           (SELECT array_agg(s.position ORDER BY s.position) FROM staging AS s
            JOIN (SELECT DISTINCT device_id, taken_at FROM inserted) AS i USING (device_id, taken_at)
            WHERE NOT EXISTS (SELECT 1 FROM staging AS e WHERE e.device_id = s.device_id
                              AND e.taken_at = s.taken_at AND e.position < s.position))
       END
FROM inserted
"""



def _checked(columns: wire.BatchColumns) -> tuple[list[str], list[str], list[str]]:
    """
    The batch's numbers as COPY's text format takes them, checked as Python
    reads them (and its times): a record the decoder would not have passed
    fails here with L{ValueError}, before anything reaches the database.

    Columns the decoder checked (L{wire.batch_columns}) are taken as they
    are: each field is its value's canonical text (a decimal integer, a
    shortest decimal number, C{YYYY-MM-DDTHH:MM}), which the server reads
    as the value Python reads, and checking them again was ~1.3 µs of the
    cloud's CPU a reading.
    """
    if columns.checked:
        return columns.devices, columns.temperatures, columns.humidities
    devices = [str(int(device)) for device in columns.devices]
    temperatures = [repr(float(value)) for value in columns.temperatures]
    humidities = [repr(float(value)) for value in columns.humidities]
    for stamp in columns.stamps:
        datetime.datetime.fromisoformat(stamp)
    return devices, temperatures, humidities


def _copy_text(columns: wire.BatchColumns, checked) -> str:
    """
    The batch as COPY's text format for the staging table, each row with
    its position.
    """
    devices, temperatures, humidities = checked
    lines = map("\t".join, zip(map(str, range(len(devices))), devices, columns.ips, columns.stamps, temperatures, humidities))
    return "\n".join(lines) + "\n"


def _readings_text(columns: wire.BatchColumns, checked, stored_at: float) -> str:
    """
    The batch as COPY's text format for the readings, C{stored_at} in each row.
    """
    devices, temperatures, humidities = checked
    stored = repr(float(stored_at))
    lines = map("\t".join, zip(devices, columns.ips, columns.stamps, temperatures, humidities, itertools.repeat(stored)))
    return "\n".join(lines) + "\n"


def _summaries(columns: wire.BatchColumns) -> list[list]:
    """
    L{SUMMARIZE_NEW}'s arrays for a batch all of whose readings are new.
    """
    from meter.cloud.sqlite import device_summaries

    # By id, as the staged statement takes the summaries' locks.
    rows = sorted(device_summaries(columns.devices, columns.ips, columns.stamps))
    # A device's readings come in runs of one address: a set of the pairs,
    # C-level, rather than a Python step a reading.
    addresses = sorted({(ip, int(device)) for ip, device in set(zip(columns.ips, columns.devices))})
    return [[ip for ip, _ in addresses], [device for _, device in addresses]] + (
        [list(column) for column in zip(*rows)] if rows else [[], [], [], [], []]
    )


def batch_months(columns: wire.BatchColumns) -> set[datetime.date]:
    return {datetime.date(int(prefix[:4]), int(prefix[5:7]), 1) for prefix in {stamp[:7] for stamp in columns.stamps}}


_COPY = "COPY staging (position, device_id, device_ip, taken_at, temperature_c, humidity_pct) FROM STDIN"


def _copy_new(connection, cursor, columns: wire.BatchColumns, checked, stored_at: float) -> bool:
    """
    COPY a batch straight into the readings and update its devices'
    summaries, in a savepoint: True once done (every reading was new), False
    when undone because a reading of it is stored already or it holds a key
    twice (or another node's overlapping batch, inserting at once, took the
    keys' locks in another order: the server ends one of the two).
    """
    try:
        with connection.transaction():
            with cursor.copy(_COPY_NEW) as copy:
                copy.write(_readings_text(columns, checked, stored_at))
            cursor.execute(SUMMARIZE_NEW, _summaries(columns))
    except (psycopg.errors.UniqueViolation, psycopg.errors.DeadlockDetected):
        if connection.broken or connection.closed:
            raise
        return False
    return True


def _store_group(connection, batches: list[tuple[wire.BatchColumns, float]], partitions: set[str]) -> list:
    """
    Work for the runner: store C{batches} in one transaction, each in a
    savepoint of its own (a batch that fails fails alone); for each, C{(True,
    None or the positions of its new readings)} or C{(False, Failure)}.
    Raises, with nothing committed, if the transaction itself fails.
    """
    results: list = [None] * len(batches)
    texts: list = [None] * len(batches)
    for index, (columns, _) in enumerate(batches):
        try:
            texts[index] = _checked(columns)
            # Per batch: a partition one batch cannot have fails that batch
            # alone, not the others of the group.
            ensure_partitions(connection, batch_months(columns), partitions)
        except Exception:
            if connection.broken or connection.closed:
                raise
            results[index] = (False, Failure())
    with connection.transaction(), connection.cursor() as cursor:
        for index, (columns, stored_at) in enumerate(batches):
            if results[index] is not None:
                continue
            try:
                if _copy_new(connection, cursor, columns, texts[index], stored_at):
                    results[index] = (True, None)
                    continue
                with connection.transaction():
                    with cursor.copy(_COPY) as copy:
                        copy.write(_copy_text(columns, texts[index]))
                    cursor.execute(INSERT, {"stored_at": stored_at, "count": len(columns)})
                    new, positions = cursor.fetchone()
                    # Empty for the next batch of the group (a commit empties it too).
                    cursor.execute("DELETE FROM staging")
            except psycopg.Error:
                if connection.broken or connection.closed:
                    raise
                results[index] = (False, Failure())
                # Its partition may have been dropped since it was seen (an
                # operator's retention): looked for again when it is sent
                # again, rather than failing it until the next reconnection.
                partitions.difference_update(partition_name(month) for month in batch_months(columns))
            else:
                results[index] = (True, None if new == len(columns) else positions or [])
    return results


@implementer(IReadingStore)
class PostgresReadingStore(Service):
    """
    Readings in a PostgreSQL database at L{VERSION}, written through one
    L{ConnectionRunner} (its thread); see the module's docstring.

    L{start} (or the service's start) connects, again and again while the
    database cannot be reached, bringing its schema to L{VERSION} at each
    connection; L{stop} finishes the work given and closes.  Started after
    twistd forks: a thread does not survive a fork.
    """

    #: How long the server lets this store's session sit inside a
    #: transaction without a word before ending it (see L{_prepare}): the
    #: store's own transactions never pause, and under the gateway's
    #: default ack timeout (30 s), so another node's insert of a frozen
    #: node's batch is acknowledged before the gateway gives up on it too.
    frozen_session_timeout = "10s"

    def __init__(self, location: PostgresLocation, reactor, today: Callable[[], datetime.date] | None = None):
        """
        @param today: the current date, for the partitions made ahead (the
            reactor's clock in local time if not given).
        """
        self.location = location
        self._reactor = reactor
        self._today = today or (lambda: datetime.datetime.fromtimestamp(reactor.seconds()).date())
        #: The partitions known to exist: read at each connection, grown by
        #: the batches.  Touched on the runner's thread only.
        self._partitions: set[str] = set()
        #: Batches for the next transaction: (columns, stored_at, Deferred).
        self._pending: list[tuple[wire.BatchColumns, float, defer.Deferred]] = []
        self._committing = False
        self.runner = ConnectionRunner(location, reactor, name="database", prepare=self._prepare)

    @property
    def database(self) -> ConnectionRunner:
        return self.runner

    def start(self) -> None:
        self.runner.start()

    def stop(self) -> defer.Deferred:
        return self.runner.stop()

    def startService(self):
        Service.startService(self)
        self.start()

    def stopService(self):
        Service.stopService(self)
        return self.stop()

    def _prepare(self, connection) -> None:
        # Acknowledgements mean durable, whatever the server's default.
        connection.execute("SET synchronous_commit = on")
        # A node frozen inside a transaction (SIGSTOP, a paused VM) keeps the
        # rows of its batch locked; the gateway sends that batch to another
        # node, whose insert waits on those locks until the server ends the
        # frozen session.
        connection.execute(f"SET idle_in_transaction_session_timeout = '{self.frozen_session_timeout}'")
        upgrade(connection)
        connection.execute(STAGING)
        self._partitions = existing_partitions(connection)
        ensure_partitions(connection, months_around(self._today()), self._partitions)

    def add(self, columns: wire.BatchColumns, stored_at: float) -> defer.Deferred:
        if not len(columns):
            return defer.succeed(None)
        d = defer.Deferred()
        self._pending.append((columns, stored_at, d))
        if not self._committing:
            self._commit_next()
        return d

    def _commit_next(self) -> None:
        """
        One transaction for every batch given while the one before was
        under way: under load one COMMIT (and the server's fsync) serves
        many batches, and an idle cloud commits each batch at once.
        """
        group, self._pending = self._pending, []
        self._committing = True
        batches = [(columns, stored_at) for columns, stored_at, _ in group]
        self.runner.run(lambda connection: _store_group(connection, batches, self._partitions), timed=True).addBoth(
            self._committed, [d for _, _, d in group]
        )

    def _committed(self, outcome, deferreds: list[defer.Deferred]) -> None:
        if isinstance(outcome, Failure):
            # Nothing of the group committed (the connection lost, the
            # COMMIT refused): every batch fails, and is sent again.
            for d in deferreds:
                d.errback(outcome)
        else:
            for d, (ok, value) in zip(deferreds, outcome):
                if ok:
                    d.callback(value)
                else:
                    d.errback(value)
        self._committing = False
        if self._pending:
            self._commit_next()

    def readings(self, device_id=None, device_ip=None, since=None, until=None, limit=None) -> defer.Deferred:
        sql, args = readings_by_time(POSTGRESQL, ReadingsQuery(device_id, device_ip, since, until), limit)

        def work(connection):
            # Checked when they were stored.
            return [Reading.checked(*row) for row in connection.execute(sql, args).fetchall()]

        return self.runner.run(work)

    def devices(self) -> defer.Deferred:
        sql = "SELECT device_id, first_reading, last_reading, readings FROM devices ORDER BY device_id"

        def work(connection):
            return [DeviceSummary(*row) for row in connection.execute(sql).fetchall()]

        return self.runner.run(work)
