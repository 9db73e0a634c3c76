"""
In-memory implementations of meter's storage interfaces, for tests of the
code that uses them and for anyone embedding meter: each behaves as the real
SQLite implementation does, which the contract tests in tests/contracts/
prove by running one test body over both.  Then what the tests share: a
cloud store on SQLite with its protocol, the fleet's test keys, and a builder
of the chunks of a day.
"""

from __future__ import annotations

import datetime
import json
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import attrs
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from meter import cloud, wire
from meter.cloud.interfaces import (
    Bucket, Cursor, DeviceSummary, FleetDevice, IReadingQueries, IReadingStore, ReadingsQuery, Series,
)
from meter.cloud.queries import minute_text, series_width
from meter.gateway.interfaces import ISpool
from meter.database import connect
from meter.gateway.spool import Recovered, SpooledBatch, StoredChunk, StoredRound, batch_of, chunk_digest
from meter.reading import Reading
from meter.wire import BatchColumns

# -- the gateway's spool (meter.gateway.interfaces.ISpool) ---------------------


@attrs.define
class SpoolContents:
    """
    What a L{MemorySpool} holds, committed: the tables of the SQLite spool
    (L{meter.gateway.spool.SCHEMA}), row for row.
    """

    #: seq -> (seq, day, device_id, device_ip, records, n)
    chunks: dict[int, tuple[int, str, int, str, str, int]] = attrs.Factory(dict)
    #: (device_id, xfer, part) -> its chunk row
    parts: dict[tuple[int, str, int], StoredChunk] = attrs.Factory(dict)
    #: day -> [opened_at, closed_at or None]
    rounds: dict[str, list] = attrs.Factory(dict)
    #: (seq, day, device_id, device_ip, records, n, reason, refused_at), in
    #: the order they were set aside (a seq may stand twice: it is used
    #: again once the spool has drained)
    refused: list[tuple] = attrs.Factory(list)
    #: seq -> its place in the order chunks became ready, for the ready ones
    ready: dict[int, int] = attrs.Factory(dict)

    def copy(self) -> SpoolContents:
        return SpoolContents(
            dict(self.chunks), dict(self.parts), {day: list(row) for day, row in self.rounds.items()}, list(self.refused),
            dict(self.ready),
        )

    def waiting(self, days: set[str]) -> list[int]:
        """
        The chunks of C{days} (ISO dates) not ready yet: the earliest day's
        first, by device, then in the order spooled (the SQLite spool's
        index of waiting chunks).
        """
        chunks = self.chunks
        return sorted(
            (seq for seq in chunks if chunks[seq][1] in days and seq not in self.ready),
            key=lambda seq: (chunks[seq][1], chunks[seq][2], seq),
        )

    def make_ready(self, seqs) -> int:
        """
        Place the chunks C{seqs} not ready yet after every ready one, in
        the order given, as the SQLite spool does (its C{ready} column);
        how many readings became ready.
        """
        start = max(self.ready.values(), default=0)
        count = 0
        for seq in seqs:
            if seq in self.chunks and seq not in self.ready:
                count += self.chunks[seq][5]
                start += 1
                self.ready[seq] = start
        return count


#: What a failed commit of a L{MemorySpool} fails with unless told otherwise:
#: what SQLite says when the disk fails.
DISK_ERROR = sqlite3.OperationalError("disk I/O error")


@implementer(ISpool)
class MemorySpool:
    """
    The gateway's spool in memory, committing as L{meter.database.Database}
    commits the SQLite L{meter.gateway.spool.Spool}: what is submitted is
    committed together in the next turn of C{clock} (a C{callLater(0)}),
    and each operation's Deferred fires after that commit.  A test commits
    by advancing its C{task.Clock} (C{clock.advance(0)}); until then, the
    work waits as it would for a slow disk.

    For tests that need the spool to misbehave:
      - L{fail_next}: the next operations fail at their commit, changing
        nothing, as a transaction SQLite rolled back (a full disk);
      - L{hold} and L{release}: commits wait, whatever the clock does,
        until released (a disk stalled through a deadline);
      - L{reopened}: a spool over what this one committed, as a gateway
        restarted after a crash finds its file.

    For tests that look inside: L{contents} (committed rows), L{round},
    and L{submitted} (how many times each operation was asked for: what
    shows the intake spared the spool a write).
    """

    def __init__(self, clock, contents: SpoolContents | None = None):
        self._clock = clock
        self.contents = contents if contents is not None else SpoolContents()
        self.depth = sum(row[5] for row in self.contents.chunks.values())
        self.removed = 0
        self.submitted: Counter[str] = Counter()
        #: Work for the next commit: (operation, its change, its Deferred, the error it fails with or None).
        self._pending: list[tuple[str, Callable[[SpoolContents], tuple[Any, int]], Deferred, Exception | None]] = []
        self._committing = False
        self._held = False
        #: (operation or None for any, error), one a failure to come.
        self._failures: list[tuple[str | None, Exception]] = []

    # -- failure injection and inspection -------------------------------------

    def fail_next(self, operation: str | None = None, times: int = 1, error: Exception = DISK_ERROR) -> None:
        """
        Make the next C{times} calls of C{operation} (a method name of
        L{ISpool}, or None for any) fail at their commit with C{error},
        changing nothing.
        """
        self._failures.extend([(operation, error)] * times)

    def hold(self) -> None:
        """
        Hold every commit from now until L{release}.
        """
        self._held = True

    def release(self) -> None:
        """
        Commit what waits, now, and let later commits go as the clock turns.
        """
        self._held = False
        if self._pending:
            self._commit()

    def reopened(self, clock=None) -> MemorySpool:
        """
        A spool holding what this one committed (work still waiting is lost,
        as in a crash), on C{clock} (by default this one's).
        """
        return MemorySpool(clock if clock is not None else self._clock, self.contents.copy())

    def round(self, day: datetime.date) -> StoredRound | None:
        """
        C{day}'s round as committed, if the spool holds one.
        """
        row = self.contents.rounds.get(day.isoformat())
        return None if row is None else StoredRound(day, row[0], row[1])

    # -- ISpool ---------------------------------------------------------------

    def add_chunk(
        self, chunk: wire.DayChunk, now: float, round_closed: bool = False, digest: bytes | None = None
    ) -> Deferred:
        day = chunk.day.isoformat()
        digest = digest if digest is not None else chunk_digest(chunk)
        part = StoredChunk(chunk.device_id, chunk.xfer, chunk.part, chunk.parts, chunk.day, now, digest)
        row = (day, chunk.device_id, chunk.device_ip, chunk.records, chunk.count)

        def change(contents: SpoolContents) -> tuple[int, int]:
            round_row = contents.rounds.setdefault(day, [now, now if round_closed else None])
            key = (part.device_id, part.xfer, part.part)
            if key in contents.parts:
                return 0, 0
            contents.parts[key] = part
            if row[4]:
                # As SQLite numbers an INTEGER PRIMARY KEY: one above the
                # highest in the table.
                seq = max(contents.chunks, default=0) + 1
                contents.chunks[seq] = (seq, *row)
                if round_row[1] is not None:
                    contents.make_ready([seq])
            return row[4], row[4]

        return self._submit("add_chunk", change)

    def close_round(self, day: datetime.date, now: float, most: int | None = None) -> Deferred:
        def change(contents: SpoolContents) -> tuple[int, int]:
            row = contents.rounds.setdefault(day.isoformat(), [now, now])
            if row[1] is None:
                row[1] = now
            return contents.make_ready(contents.waiting({day.isoformat()})[:most]), 0

        return self._submit("close_round", change)

    def devices_ready(self, devices) -> Deferred:
        wanted = {(device_id, day.isoformat()) for device_id, day in devices}

        def change(contents: SpoolContents) -> tuple[int, int]:
            return contents.make_ready(
                seq for seq in sorted(contents.chunks) if (contents.chunks[seq][2], contents.chunks[seq][1]) in wanted
            ), 0

        return self._submit("devices_ready", change)

    def days_ready(self, days, most: int | None = None) -> Deferred:
        wanted = {day.isoformat() for day in days}

        def change(contents: SpoolContents) -> tuple[int, int]:
            return contents.make_ready(contents.waiting(wanted)[:most]), 0

        return self._submit("days_ready", change)

    def take_batch(self, limit: int, after: int = 0) -> Deferred:
        def change(contents: SpoolContents) -> tuple[SpooledBatch, int]:
            places = sorted((place, seq) for seq, place in contents.ready.items() if place > after)
            return batch_of([(*contents.chunks[seq], place) for place, seq in places], limit), 0

        return self._submit("take_batch", change)

    def remove(self, seqs) -> Deferred:
        unique = sorted(set(seqs))

        def change(contents: SpoolContents) -> tuple[int, int]:
            count = sum(contents.chunks.pop(seq)[5] for seq in unique if seq in contents.chunks)
            for seq in unique:
                contents.ready.pop(seq, None)
            return count, -count

        return self._submit("remove", change)

    def set_aside(self, seqs, reason: str, now: float) -> Deferred:
        unique = sorted(set(seqs))

        def change(contents: SpoolContents) -> tuple[int, int]:
            count = 0
            for seq in unique:
                row = contents.chunks.pop(seq, None)
                contents.ready.pop(seq, None)
                if row is not None:
                    contents.refused.append((*row, reason, now))
                    count += row[5]
            return count, -count

        return self._submit("set_aside", change)

    def forget_before(self, before: float) -> Deferred:
        def change(contents: SpoolContents) -> tuple[None, int]:
            last: dict[tuple[int, datetime.date], float] = {}
            for part in contents.parts.values():
                key = (part.device_id, part.day)
                last[key] = max(last.get(key, part.received_at), part.received_at)
            for key, part in list(contents.parts.items()):
                if last[(part.device_id, part.day)] < before:
                    del contents.parts[key]
            held = {row[1] for row in contents.chunks.values()}
            for day, (_, closed_at) in list(contents.rounds.items()):
                if closed_at is not None and closed_at < before and day not in held:
                    del contents.rounds[day]
            return None, 0

        return self._submit("forget_before", change)

    def recover(self) -> Deferred:
        def change(contents: SpoolContents) -> tuple[Recovered, int]:
            rounds = tuple(
                StoredRound(datetime.date.fromisoformat(day), opened_at, closed_at)
                for day, (opened_at, closed_at) in sorted(contents.rounds.items())
            )
            parts = tuple(contents.parts[key] for key in sorted(contents.parts))
            return Recovered(rounds, parts, sum(row[5] for row in contents.chunks.values())), 0

        return self._submit("recover", change)

    # -- the group commit ------------------------------------------------------

    def _submit(self, operation: str, change: Callable[[SpoolContents], tuple[Any, int]]) -> Deferred:
        self.submitted[operation] += 1
        error = None
        for at, (failing, failure) in enumerate(self._failures):
            if failing is None or failing == operation:
                error = failure
                del self._failures[at]
                break
        d = Deferred()
        self._pending.append((operation, change, d, error))
        if not self._committing:
            self._committing = True
            self._clock.callLater(0, self._commit)
        return d

    def _commit(self) -> None:
        if self._held:
            return
        group, self._pending = self._pending, []
        # Every change first, then the answers, as one transaction's.
        outcomes = [(d, None, error) if error is not None else (d, change(self.contents), None) for _, change, d, error in group]
        for d, outcome, error in outcomes:
            if error is not None:
                d.errback(Failure(error))
            else:
                result, grown = outcome
                self.depth += grown
                self.removed -= min(grown, 0)
                d.callback(result)
        self._committing = False
        if self._pending:
            self._committing = True
            self._clock.callLater(0, self._commit)


# -- the cloud's reading store (meter.cloud.interfaces.IReadingStore) ----------


@implementer(IReadingStore, IReadingQueries)
class MemoryReadingStore:
    """
    Readings in a dict, as L{meter.cloud.sqlite.SQLiteReadingStore} keeps
    them in SQLite: unique by (device id, time taken), numbers as the
    decoder checked their text.  Every Deferred has fired when returned.
    """

    def __init__(self) -> None:
        #: (device id, ISO minute taken) -> (address, temperature, humidity,
        #: Unix seconds stored)
        self.rows: dict[tuple[int, str], tuple[str, float, float, float]] = {}

    def add(self, columns: BatchColumns, stored_at: float) -> Deferred:
        return defer.execute(self._add, columns, stored_at)

    def _add(self, columns: BatchColumns, stored_at: float) -> list[int] | None:
        rows = self.rows
        fresh: dict[tuple[int, str], tuple[str, float, float, float]] = {}
        new: list[int] = []
        records = zip(columns.devices, columns.ips, columns.stamps, columns.temperatures, columns.humidities)
        for index, (device, ip, stamp, temperature, humidity) in enumerate(records):
            key = (int(device), stamp)
            if key not in rows and key not in fresh:
                fresh[key] = (ip, float(temperature), float(humidity), stored_at)
                new.append(index)
        # Only once every record is read: all of them or none.
        rows.update(fresh)
        return None if len(new) == len(columns) else new

    def readings(
        self,
        device_id: int | None = None,
        device_ip: str | None = None,
        since: datetime.datetime | None = None,
        until: datetime.datetime | None = None,
        limit: int | None = None,
    ) -> Deferred:
        parse = datetime.datetime.fromisoformat
        found = []
        for (number, stamp), (ip, temperature, humidity, _) in self.rows.items():
            taken_at = parse(stamp)
            if (
                (device_id is None or number == device_id)
                and (device_ip is None or ip == device_ip)
                and (since is None or taken_at >= since)
                and (until is None or taken_at < until)
            ):
                found.append(Reading.checked(number, ip, taken_at, temperature, humidity))
        found.sort(key=lambda reading: (reading.taken_at, reading.device_id))
        return succeed(found if limit is None else found[:limit])

    def devices(self) -> Deferred:
        stamps: dict[int, list[str]] = {}
        for number, stamp in self.rows:
            stamps.setdefault(number, []).append(stamp)
        parse = datetime.datetime.fromisoformat
        return succeed(
            [DeviceSummary(number, parse(min(own)), parse(max(own)), len(own)) for number, own in sorted(stamps.items())]
        )

    # -- IReadingQueries: as meter.cloud.queries answers them --------------

    def _fleet(self) -> list[FleetDevice]:
        latest: dict[int, tuple[str, str]] = {}
        first: dict[int, str] = {}
        counts: Counter[int] = Counter()
        for (number, stamp), (ip, _, _, _) in self.rows.items():
            counts[number] += 1
            if number not in first or stamp < first[number]:
                first[number] = stamp
            if number not in latest or stamp >= latest[number][0]:
                latest[number] = (stamp, ip)
        parse = datetime.datetime.fromisoformat
        return [
            FleetDevice(number, latest[number][1], parse(first[number]), parse(latest[number][0]), counts[number])
            for number in sorted(counts)
        ]

    def fleet(self) -> Deferred:
        return succeed(self._fleet())

    def fleet_json(self, stale_before: datetime.date) -> Deferred:
        from meter.cloud.web.api import device_json

        return succeed(json.dumps([device_json(d, stale_before) for d in self._fleet()], separators=(",", ":")))

    def device(self, device_id: int) -> Deferred:
        return succeed(next((d for d in self._fleet() if d.device_id == device_id), None))

    def address_range(self, device_ip: str) -> Deferred:
        stamps = sorted(stamp for (_, stamp), row in self.rows.items() if row[0] == device_ip)
        parse = datetime.datetime.fromisoformat
        return succeed((parse(stamps[0]), parse(stamps[-1])) if stamps else None)

    def _selected(self, query: ReadingsQuery) -> list[Reading]:
        since = None if query.since is None else minute_text(query.since)
        until = None if query.until is None else minute_text(query.until)
        after = None if query.after is None else (query.after.device_id, query.after.taken_at.isoformat(timespec="minutes"))
        found = []
        for (number, stamp), (ip, temperature, humidity, _) in self.rows.items():
            if (
                (query.device_id is None or number == query.device_id)
                and (query.device_ip is None or ip == query.device_ip)
                and (since is None or stamp >= since)
                and (until is None or stamp < until)
                and (after is None or (number, stamp) > after)
            ):
                found.append((number, stamp, ip, temperature, humidity))
        found.sort()
        parse = datetime.datetime.fromisoformat
        return [Reading.checked(number, ip, parse(stamp), t, h) for number, stamp, ip, t, h in found]

    def page(self, query: ReadingsQuery, limit: int) -> Deferred:
        return succeed(self._selected(query)[:limit])

    def next_cursor(self, query: ReadingsQuery, limit: int) -> Deferred:
        found = self._selected(query)
        if len(found) <= limit:
            return succeed(None)
        last = found[limit - 1]
        return succeed(Cursor(last.device_id, last.taken_at))

    def series(self, device_id, device_ip, since, until, points) -> Deferred:
        found = self._selected(ReadingsQuery(device_id, device_ip, since, until))
        if len(found) <= points:
            return succeed(Series(len(found), None, tuple(
                Bucket(r.taken_at, 1, (r.temperature_c,) * 3, (r.humidity_pct,) * 3) for r in found
            )))
        width = series_width(since, until, points)
        origin = since.replace(second=0, microsecond=0)
        groups: dict[int, list[Reading]] = {}
        for r in found:
            groups.setdefault(int((r.taken_at - origin).total_seconds()) // width, []).append(r)

        def spread(values: list[float]) -> tuple[float, float, float]:
            return min(values), sum(values) / len(values), max(values)

        return succeed(Series(len(found), width, tuple(
            Bucket(
                origin + datetime.timedelta(seconds=bucket * width), len(group),
                spread([r.temperature_c for r in group]), spread([r.humidity_pct for r in group]),
            )
            for bucket, group in sorted(groups.items())
        )))


# -- a cloud store on SQLite, for the tests of the store and its protocol ----


class SQLiteCloud:
    """
    A L{meter.cloud.CloudStore} on the real SQLite reading store at
    C{path}, driven by C{reactor} (the store's commits) and a
    L{task.Clock} at C{now} (its timers), its console kept as lines; for
    tests of the store and of the protocol in front of it.
    """

    def __init__(self, path: Path, reactor, now: float = 1772400000, schema: bool = True) -> None:
        self.path = path
        connection = connect(path)
        if schema:
            cloud.open_database(connection)
        self.readings = cloud.SQLiteReadingStore(connection, reactor)
        self.database = self.readings.database
        self.console: list[str] = []
        self.clock = task.Clock()
        self.clock.advance(now)
        self.store = cloud.CloudStore(self.readings, self.print, self.clock)

    def print(self, text: str) -> None:
        assert text.endswith("\n")
        self.console.extend(text.splitlines())

    def count(self) -> int:
        """
        The readings committed, as another connection sees them.
        """
        with sqlite3.connect(str(self.path)) as other:
            return other.execute("SELECT count(*) FROM readings").fetchone()[0]

    def connect(self, idle: float = 120.0, peer: IPv4Address = IPv4Address("TCP", "10.0.0.1", 5555)):
        """
        A CloudProtocol of the store, its idle timeout C{idle}, connected
        to a StringTransport from C{peer}: (protocol, transport).
        """
        protocol = cloud.CloudFactory(self.store, idle, self.clock).buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        return protocol, transport


# -- the fleet's keys --------------------------------------------------------


def device_key(device_id: int) -> bytes:
    """
    The key the tests give device C{device_id} (1 to 255): its number, 32
    times over.
    """
    return bytes([device_id]) * 32


def device_keys(device_ids) -> dict[int, bytes]:
    """
    The L{device_key} of each of C{device_ids}, by device id.
    """
    return {device_id: device_key(device_id) for device_id in device_ids}


# -- a chunk of a device's day -----------------------------------------------


def day_chunk(
    device_id: int = 1,
    xfer: int | str = 0,
    *,
    day: datetime.date,
    sent_at: float,
    part: int = 1,
    parts: int = 1,
    minutes: Iterable[int] | None = None,
    temperature: float | Callable[[int], float] = 20.0,
    humidity: float = 30.0,
    readings: Iterable[Reading] | None = None,
    ip: str | None = None,
    fleet: Mapping[int, str] = {},
    stranger_ip: str = "10.9.9.9",
) -> wire.DayChunk:
    """
    Chunk C{part} of C{parts} of device C{device_id}'s C{day}, sent at
    C{sent_at} (Unix seconds) in transfer C{xfer}: a transfer id, or a
    number making one of the device's own.

    Its readings are C{readings}, or one at each of C{minutes} (minutes of
    the day; by default one, at 08:00 plus the chunk's number less one, so
    the chunks of a transfer hold minutes of their own), at C{temperature}
    (degrees, or a function of the minute) and C{humidity}.  Its address
    is C{ip}, or the device's in C{fleet}, or C{stranger_ip} for a device
    not in it.
    """
    if ip is None:
        ip = fleet.get(device_id, stranger_ip)
    if isinstance(xfer, int):
        xfer = f"{device_id:08x}{xfer:08x}"
    if readings is None:
        if minutes is None:
            minutes = (480 + part - 1,)
        readings = [
            Reading(
                device_id,
                ip,
                datetime.datetime.combine(day, datetime.time(m // 60, m % 60)),
                temperature(m) if callable(temperature) else temperature,
                humidity,
            )
            for m in minutes
        ]
    return wire.DayChunk(device_id, ip, day, xfer, part, parts, int(sent_at), tuple(readings))
