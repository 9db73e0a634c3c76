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
from twisted.internet.interfaces import IHandshakeListener, INegotiated
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from meter import ratelimit, wire
from meter.database import CLOUD_DATABASE, Database, RowInsert, Schema, execute_script, insert_telling_new, upgrade
from meter.retry import Failures

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
        # The gateway retries a batch refused for a failed commit, so there
        # is no retry here; the failures are counted and logged a few a minute.
        self._failures = Failures(self, clock, self.counters)

    def store(self, batch: wire.Batch, peer: str) -> Deferred:
        """
        Commit C{batch}; the Deferred fires with the L{wire.BatchAck} to send,
        after the commit.
        """
        received = self._clock.seconds()
        columns = batch.columns()
        d = self._database.run(_insert(columns, received))

        def committed(new_at: list[int] | None) -> wire.BatchAck:
            self._failures.succeeded("storing a batch")
            new = columns if new_at is None else columns.pick(new_at)
            if new:
                try:
                    self._console(console_text(new))
                    self._failures.succeeded("printing stored readings")
                except Exception:
                    # The readings are committed: the gateway must hear so,
                    # or it would send them again and again.
                    self._failures.failed(
                        "printing stored readings", "console_failures", Failure(),
                        "{count} readings of batch {batch_id} stored, not printed on the console", retried=False,
                        count=len(new), batch_id=batch.batch_id,
                    )
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
            # Not committed: refuse the whole batch so the gateway keeps it
            # and sends it again later.
            self._failures.failed(
                "storing a batch", "store_failures", failure, "batch {batch_id} from {peer} not stored, refused", retried=False,
                batch_id=batch.batch_id, peer=peer,
            )
            return wire.BatchAck(batch.batch_id, "bad", reason=f"store: not stored: {failure.getErrorMessage()}")

        return d.addCallbacks(committed, failed)


#: Descriptors kept for all but connections (the database and its journal,
#: the log, the listener, the reactor's own) and for the connections the
#: listener accepts in one go before those it evicts are closed: a quarter
#: of the limit, at least this many.
RESERVED_DESCRIPTORS = 64

#: The most unauthenticated connections derived from the descriptor limit:
#: each holds a TLS state of some tens of kilobytes.
MAX_UNAUTHENTICATED = 4096


def connection_limits(descriptors: int, max_unauthenticated: int = 0) -> tuple[int, int]:
    """
    The most connections the cloud keeps open, and the most of those not
    authenticated yet, with C{descriptors} file descriptors.

    @param max_unauthenticated: as configured; 0 derives it: half the
        connections, so that strangers can never take what gateways need, at
        most L{MAX_UNAUTHENTICATED}.
    """
    connections = max(2, descriptors - max(RESERVED_DESCRIPTORS, descriptors // 4))
    if max_unauthenticated <= 0:
        max_unauthenticated = max(1, min(MAX_UNAUTHENTICATED, connections // 2))
    return connections, max_unauthenticated


class Admission:
    """
    Which connections have authenticated, and bounds on those that have not.

    A connection is a stranger until its TLS handshake completes, which
    includes the check of its certificate against the suite's CA (in plain
    text, until its first valid line).  Each stranger holds a descriptor:
    left unbounded, connections that stay silent or stop inside the
    handshake take them all and keep the gateways out.  So a stranger gets
    C{handshake_timeout} seconds; at most C{max_unauthenticated} strangers
    are kept, the oldest closed to make room for a newcomer; and at most
    C{max_connections} connections all told, again the oldest stranger closed
    first.  An authenticated gateway is never closed for a stranger: when
    every connection has authenticated, the newcomer is refused.

    Strangers are not logged one by one: L{ratelimit.Summary} reports their
    counts in a line a minute at most.
    """

    log = Logger()

    def __init__(
        self,
        clock,
        counters: Counter,
        handshake_timeout: float = 5.0,
        max_unauthenticated: int = 1024,
        max_connections: int = 4096,
        report_period: float = 60.0,
    ):
        self._clock = clock
        self._counters = counters
        self.handshake_timeout = handshake_timeout
        self.max_unauthenticated = max_unauthenticated
        self.max_connections = max_connections
        #: Strangers, oldest first, each with its handshake timer (or None).
        self._strangers: dict[CloudProtocol, object] = {}
        self._authenticated: set[CloudProtocol] = set()
        self._summary = ratelimit.Summary(clock, self._log_strangers, report_period)
        #: Whether connections authenticate with TLS, for the log's words.
        self.tls = True

    def arrived(self, protocol: CloudProtocol, timed: bool) -> bool:
        """
        A connection is made: make room for it, or refuse it (aborted).

        @param timed: give it L{handshake_timeout} seconds to authenticate
            (a TLS connection; in plain text the idle timeout applies).
        @return: whether it was admitted.
        """
        self.tls = timed
        while self._strangers and (
            len(self._strangers) >= self.max_unauthenticated or self._count() >= self.max_connections
        ):
            self._close(next(iter(self._strangers)), "evicted", "unauthenticated_evicted")
        if self._count() >= self.max_connections:
            self._counters["connections_refused"] += 1
            self._summary.add("refused")
            protocol.transport.abortConnection()
            return False
        timer = None
        if timed:
            timer = self._clock.callLater(
                self.handshake_timeout, self._close, protocol, "timeouts", "handshake_timeouts"
            )
        self._strangers[protocol] = timer
        return True

    def authenticated(self, protocol: CloudProtocol) -> None:
        timer = self._strangers.pop(protocol, None)
        if timer is not None and timer.active():
            timer.cancel()
        self._authenticated.add(protocol)

    def expired(self, protocol: CloudProtocol) -> None:
        """
        A stranger's own deadline passed (in plain text: its idle timeout
        before any valid line).
        """
        if protocol in self._strangers:
            self._close(protocol, "timeouts", "idle_timeouts")

    def left(self, protocol: CloudProtocol, detail: str) -> bool:
        """
        A connection is lost; C{detail} names its peer and why.

        @return: whether it had authenticated (the caller logs it); a
            stranger is only counted.
        """
        if protocol in self._authenticated:
            self._authenticated.discard(protocol)
            return True
        if protocol in self._strangers:
            timer = self._strangers.pop(protocol)
            if timer is not None and timer.active():
                timer.cancel()
            self._counters["unauthenticated_failed"] += 1
            self._summary.add("failed", last=detail)
        return False

    def accept_failed(self) -> None:
        """
        The listener could not accept a connection (no descriptor left), or
        closed one at once to recover.
        """
        self._counters["accept_failures"] += 1
        self._summary.add("accepts")

    def stop(self) -> None:
        self._summary.stop()
        for timer in self._strangers.values():
            if timer is not None and timer.active():
                timer.cancel()

    def _count(self) -> int:
        return len(self._strangers) + len(self._authenticated)

    def _close(self, protocol: CloudProtocol, kind: str, counter: str) -> None:
        timer = self._strangers.pop(protocol)
        if timer is not None and timer.active():
            timer.cancel()
        self._counters[counter] += 1
        self._summary.add(kind)
        protocol.transport.abortConnection()

    def _log_strangers(self, counts: Counter, latest: dict) -> None:
        closed = counts["timeouts"] + counts["evicted"] + counts["failed"]
        last = f"; last: {latest['last']}" if "last" in latest else ""
        self.log.warn(
            "{closed} connections closed before {what} ({timeouts} handshake timeouts, {evicted} evicted for newer "
            "ones, {failed} failed or closed by the peer{last}), {refused} refused at the connection limit, "
            "{accepts} accept failures (descriptor limit); one such line a minute at most",
            closed=closed,
            what="completing TLS" if self.tls else "a first valid line",
            timeouts=counts["timeouts"],
            evicted=counts["evicted"],
            failed=counts["failed"],
            last=last,
            refused=counts["refused"],
            accepts=counts["accepts"],
        )


@implementer(IHandshakeListener)
class CloudProtocol(wire.LineProtocol, TimeoutMixin):
    """
    One gateway connection: newline-delimited messages of L{meter.wire}.

    Over TLS the connection authenticates when its handshake completes (the
    TLS options require a certificate the suite's CA signed); in plain text,
    with its first valid line.  Until then it is a stranger of L{Admission}.
    """

    MAX_LENGTH = wire.MAX_LINE
    log = Logger()

    def __init__(self, store: CloudStore, idle_timeout: float, clock, admission: Admission | None = None):
        self._store = store
        self._idle_timeout = idle_timeout
        self._admission = admission if admission is not None else Admission(clock, store.counters)
        self._authenticated = False
        #: Why a stranger is closed by this side, for its count.
        self._why: str | None = None
        # TimeoutMixin schedules through this attribute; use the injected clock.
        self.callLater = clock.callLater

    def connectionMade(self):
        self._peer = _describe(self.transport.getPeer())
        wire.without_nagle(self.transport)
        self.setTimeout(self._idle_timeout)
        # A TLS transport provides INegotiated; the handshake starts after
        # this returns, and handshakeCompleted follows it.  In plain text a
        # stranger's deadline is the idle timeout: a gateway with nothing to
        # send says its first line at its heartbeat, later than a handshake
        # timeout of a few seconds.
        self._admission.arrived(self, timed=INegotiated.providedBy(self.transport))

    def handshakeCompleted(self):
        # The TLS options verified the chain to the suite's CA (and the
        # certificate's purpose) before the handshake could complete.
        certificate = self.transport.getPeerCertificate()
        if certificate is None:
            self._why = "no client certificate"
            self.transport.abortConnection()
            return
        subject = certificate.get_subject().commonName
        self._authenticate(f"certificate CN={subject}")

    def _authenticate(self, how: str) -> None:
        self._authenticated = True
        self._admission.authenticated(self)
        self.log.info("gateway {peer} connected ({how})", peer=self._peer, how=how)

    def connectionLost(self, reason):
        self.setTimeout(None)
        why = self._why or reason.getErrorMessage()
        if self._admission.left(self, f"{self._peer}: {why}"):
            self.log.info("gateway {peer} disconnected: {why}", peer=self._peer, why=why)

    def timeoutConnection(self):
        if not self._authenticated:
            self._admission.expired(self)
            return
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
            if not self._authenticated:
                self._authenticate("plain text: a valid first line")
            self._store.store(message, self._peer).addCallback(self._answer)
        elif isinstance(message, wire.Ping):
            if not self._authenticated:
                self._authenticate("plain text: a valid first line")
            self._answer(wire.Pong(message.seq))
        else:
            self._store.counters["unexpected"] += 1
            self._warn("gateway {peer} sent a {kind}, which a cloud never takes", kind=type(message).__name__)

    def _warn(self, format: str, **fields) -> None:
        """
        Log a gateway's fault; a stranger's is only kept as the reason it
        goes, for L{Admission}'s count (strangers cost no line each).
        """
        if self._authenticated:
            self.log.warn(format, peer=self._peer, **fields)
        else:
            # The count names the peer itself.
            self._why = format.removeprefix("gateway {peer}").lstrip(": ").format(**fields)

    def _answer(self, message) -> None:
        if self.transport.connected:
            self.sendLine(wire.encode(message))

    def _refuse(self, line: bytes, error: wire.WireError) -> None:
        self._store.counters[f"refused_{error.code}"] += 1
        self._warn("gateway {peer}: refused line of {size} bytes: {error}", size=len(line), error=str(error))
        answer = wire.refusal(line, error)
        if isinstance(answer, wire.BatchAck):
            self._answer(answer)
        else:
            # Not even a batch we could name: the stream is not ours.
            self.transport.loseConnection()

    def lineLengthExceeded(self, line):
        self._store.counters["refused_size"] += 1
        self._warn("gateway {peer}: line longer than {max} bytes: closing", max=self.MAX_LENGTH)
        self.transport.loseConnection()


class CloudFactory(Factory):
    def __init__(
        self,
        store: CloudStore,
        idle_timeout: float,
        clock,
        handshake_timeout: float = 5.0,
        max_unauthenticated: int = 1024,
        max_connections: int = 4096,
    ):
        self._store = store
        self._idle_timeout = idle_timeout
        self._clock = clock
        self.admission = Admission(clock, store.counters, handshake_timeout, max_unauthenticated, max_connections)

    def buildProtocol(self, addr):
        return CloudProtocol(self._store, self._idle_timeout, self._clock, self.admission)

    def stopFactory(self):
        self.admission.stop()


def _describe(address) -> str:
    host = getattr(address, "host", None)
    return f"{host}:{address.port}" if host is not None else str(address)


def query_readings(connection: sqlite3.Connection, device_ip: str | None = None):
    """
    Rows of stored readings, oldest first: (device_id, device_ip, taken_at,
    temperature, humidity), optionally of one device address.  The device id
    comes first: it is what a reading is keyed by (with its time); the
    address is what the console shows.
    """
    sql = "SELECT device_id, device_ip, taken_at, temperature_c, humidity_pct FROM readings"
    args: tuple = ()
    if device_ip is not None:
        sql += " WHERE device_ip = ?"
        args = (device_ip,)
    sql += " ORDER BY taken_at, device_id"
    for device_id, ip, taken_at, temperature, humidity in connection.execute(sql, args):
        yield device_id, ip, datetime.datetime.fromisoformat(taken_at), temperature, humidity
