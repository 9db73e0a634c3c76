"""
One SQLite connection with group commits, on the reactor thread.

Both the gateway's spool and the cloud's store write through this.  Work
submitted before the reactor's next turn, or while a commit is under way,
goes into the next transaction together with everything else that arrived
meanwhile, so one fsync serves many acknowledgements under load, and an idle
system still commits each piece of work at once.  With a commit interval,
transactions also begin at most once an interval: work arriving sooner
after the last one began waits out the rest of the interval, with all that
arrives meanwhile.  A turn of the reactor holds only the datagrams that
arrived since the last, a few at a few thousand a second, so without the
interval nearly every datagram had an fsync'd commit of its own; with
it, the fsyncs a second are bounded whatever the load, at the price of at
most one interval more before an acknowledgement.  A piece of work's Deferred
fires only after the transaction holding it is committed: callers
acknowledge from there, so an acknowledgement always means the data is on
disk.

Why the reactor thread: the data is there already, and a transaction is
short (a turn's datagrams at the gateway, a few batches at the cloud).  A
thread of the database's own would take each group off the reactor and hand
its results back, and fight the reactor for the GIL around every SQLite
step; on two cores that costs more CPU and a longer acknowledgement tail
than the overlap gains (the figures: docs/performance.md).  The price: a
slow disk stalls the reactor for its fsync, while the kernel queues what
arrives.  A lock, though, is never waited for (see L{connect}): a
transaction that finds the database locked by another process fails at
once, and its callers answer busy or retry later.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from meter.monitoring.histogram import COMMIT_SECONDS, Histogram

Work = Callable[[sqlite3.Connection], Any]
#: Work done for many items at once: returns one result per item, in order.
ManyWork = Callable[[sqlite3.Connection, list], list]


def connect(path: Path, cache_mb: float | None = None) -> sqlite3.Connection:
    """
    A connection tuned for a durable write-ahead log: WAL with synchronous
    FULL survives power loss, not only a process crash.

    @param cache_mb: the connection's page cache in megabytes (SQLite's
        default, 2 MB, if None): a large table's inserts read its B-tree's
        interior pages every time, from the operating system's cache when
        they do not fit here.
    """
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(str(path), isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    # No waiting for another process's lock: SQLite waits on the thread
    # running the statement, the reactor's, which would answer nothing
    # meanwhile.  A locked database fails the transaction at once; devices
    # are answered busy and retry, and the daemons retry their own steps.
    connection.execute("PRAGMA busy_timeout=0")
    if cache_mb is not None:
        connection.execute(f"PRAGMA cache_size=-{int(cache_mb * 1024)}")
    return connection


@contextlib.contextmanager
def immediate_transaction(connection: sqlite3.Connection):
    """
    A write transaction around the block: begun at once (C{IMMEDIATE}, so
    it never fails half-way for want of the write lock), committed if the
    block ends normally, rolled back if anything escapes it.
    """
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


class Unusable(Exception):
    """
    A database file a daemon cannot work with.  The message is the cause
    alone (C{locked by another process}); the caller names the file.
    """


#: The C{PRAGMA application_id} of each kind of meter file ("MTgs", "MTcd"
#: in ASCII), so a file says what it is whichever daemon or tool opens it.
GATEWAY_SPOOL = 0x4D546773
CLOUD_DATABASE = 0x4D546364
KINDS = {GATEWAY_SPOOL: "gateway spool", CLOUD_DATABASE: "cloud database"}

#: The tables, with the columns each must have, that a file of each kind
#: written before its kind had versions may hold: such a file is adopted
#: as it is found.  Fixed: later versions are steps from these.
UNVERSIONED: dict[int, dict[str, frozenset[str]]] = {
    GATEWAY_SPOOL: {
        "chunks": frozenset({"seq", "day", "device_id", "device_ip", "records", "n"}),
        "parts": frozenset({"device_id", "xfer", "part", "parts", "day", "received_at"}),
        "rounds": frozenset({"day", "opened_at", "closed_at"}),
        # The spool of one row a reading, moved into chunks when adopted.
        "readings": frozenset({"seq", "day", "device_id", "device_ip", "taken_at", "temperature_c", "humidity_pct"}),
    },
    CLOUD_DATABASE: {
        "readings": frozenset({"device_id", "device_ip", "taken_at", "temperature_c", "humidity_pct", "stored_at"}),
    },
}

#: How long start-up waits for another process's write transaction to end
#: before it calls the file locked.  Start-up only, before the reactor runs;
#: the connections the daemons then work with have the busy timeout of
#: L{connect}.
START_LOCK_WAIT = 2.0


@attrs.frozen
class Schema:
    """
    The versions of one kind of file: C{steps[n]} takes a file at version
    C{n} to C{n + 1}, inside the transaction that then records the new
    version.  C{steps[0]} makes version 1 of an empty file and adopts a
    file of L{UNVERSIONED}'s shape, so it creates only what is missing.

    A change to the schema is a new step at the end; the steps before it
    never change, as files at each of their versions exist.
    """

    application_id: int
    steps: tuple[Callable[[sqlite3.Connection], None], ...]

    @property
    def kind(self) -> str:
        return KINDS[self.application_id]

    @property
    def version(self) -> int:
        return len(self.steps)


def execute_script(connection: sqlite3.Connection, script: str) -> None:
    """
    Run the statements of C{script} one by one, inside the transaction
    under way (C{executescript} would commit it first).
    """
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            connection.execute(statement)
            statement = ""
    if statement.strip():
        raise ValueError(f"incomplete statement at the end of a script: {statement.strip()[:60]!r}")


def _tables(connection: sqlite3.Connection) -> dict[str, set[str]]:
    names = [
        name
        for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
        )
    ]
    return {name: {column for (column,) in connection.execute("SELECT name FROM pragma_table_info(?)", (name,))} for name in names}


def _misfit(tables: dict[str, set[str]], shape: dict[str, frozenset[str]], kind: str) -> str | None:
    """
    Why C{tables} are not those of a file of C{shape}, or None if they are.
    """
    for name, columns in tables.items():
        if name not in shape:
            return f"it holds a table {name}, which a {kind} has not"
        missing = shape[name] - columns
        if missing:
            return f"its table {name} lacks the column(s) {', '.join(sorted(missing))}"
    return None


def _version(connection: sqlite3.Connection, schema: Schema) -> int:
    """
    The version of the file open on C{connection} as a file of C{schema}:
    0 for an empty file or an unversioned one of the right shape.  Reads
    only; raises L{Unusable} for a file of another kind or a newer version.
    """
    (application_id,) = connection.execute("PRAGMA application_id").fetchone()
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    if application_id not in (0, schema.application_id):
        if application_id in KINDS:
            raise Unusable(f"it is a {KINDS[application_id]}, not a {schema.kind}")
        raise Unusable(f"not a meter file (its application_id is {application_id:#x})")
    if version:
        if not application_id:
            raise Unusable(f"not a meter file (user_version {version} without a meter application_id)")
        if version > schema.version:
            raise Unusable(
                f"its schema is version {version}, newer than this meter's {schema.version} (written by a newer meter)"
            )
        return version
    tables = _tables(connection)
    if not tables:
        return 0
    misfit = _misfit(tables, UNVERSIONED[schema.application_id], schema.kind)
    if misfit is None:
        return 0
    for other, shape in UNVERSIONED.items():
        if other != schema.application_id and _misfit(tables, shape, KINDS[other]) is None:
            raise Unusable(f"it is a {KINDS[other]} (unversioned), not a {schema.kind}")
    raise Unusable(f"not a {schema.kind}: {misfit}")


def upgrade(connection: sqlite3.Connection, schema: Schema) -> None:
    """
    Bring the file open on C{connection} to C{schema}'s version: a file of
    another kind or of a newer version is refused (L{Unusable}) before
    anything is written; an older one takes the steps from its version to
    the current one and records its kind and version, all in one
    transaction.
    """
    if _version(connection, schema) == schema.version:
        return
    with immediate_transaction(connection):
        # Again under the write lock: another process may have moved it on.
        version = _version(connection, schema)
        for step in schema.steps[version:]:
            step(connection)
        connection.execute(f"PRAGMA application_id = {schema.application_id:d}")
        connection.execute(f"PRAGMA user_version = {schema.version:d}")


def prepare(path: Path, schema: Schema) -> None:
    """
    Make sure a daemon can work with the file at C{path} (creating it if
    missing) as a file of C{schema}, or raise L{Unusable} with the cause:
    not a file, not SQLite, corrupt (C{PRAGMA quick_check}), of another
    kind or a newer version, locked by another process, read-only (the file,
    its folder where the write-ahead log must go, or the filesystem).  The
    file is left at C{schema}'s version, in WAL mode.

    Blocking, and may wait L{START_LOCK_WAIT} for a lock: for start-up,
    before the reactor runs and before any socket is bound.
    """
    if path.exists() and not path.is_file():
        raise Unusable("not a regular file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Unusable(f"cannot create its folder {path.parent}: {e.strerror}") from None
    connection = None
    try:
        connection = sqlite3.connect(str(path), isolation_level=None, timeout=START_LOCK_WAIT)
        _version(connection, schema)
        # Its first three problems, on one line.
        problems = [" ".join(problem.split()) for (problem,) in connection.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            raise Unusable(f"corrupt: PRAGMA quick_check says {'; '.join(problems)}")
        connection.execute("PRAGMA journal_mode=WAL")
        upgrade(connection, schema)
        # The version written once more, and committed: proof that the file
        # and the write-ahead log beside it take a write.
        with immediate_transaction(connection):
            connection.execute(f"PRAGMA user_version = {schema.version:d}")
    except sqlite3.Error as e:
        raise Unusable(_cause(e, path)) from None
    finally:
        if connection is not None:
            connection.close()


#: The files this process holds (see L{hold}): open for as long as it runs.
_HELD: dict[Path, int] = {}


def hold(path: Path) -> None:
    """
    Take an exclusive C{flock} on the file at C{path} for the life of this
    process, or raise L{Unusable} if another process holds one: a second
    daemon started on a file a running one works with is refused, where
    SQLite's own locks would let both go on (they last a transaction only).

    Why C{flock}: it belongs to the open file, so it passes to the process
    twistd forks into, and it is apart from the POSIX locks SQLite takes.
    The descriptor is never closed while the process runs.
    """
    path = path.absolute()
    if path in _HELD:
        return
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise Unusable(f"cannot open it to lock it: {e.strerror}") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise Unusable("in use by another process (a meter daemon is running on it)") from None
    _HELD[path] = descriptor


def claim(path: Path, schema: Schema) -> None:
    """
    L{hold} the file at C{path} and L{prepare} it for C{schema}: what a
    daemon does before it starts.  The lock comes first where the file
    exists, so a daemon started on a running one's file is refused before
    its checks write to the file (and take the write lock the running one
    needs); a new file is made by L{prepare}, then held.
    """
    if path.exists():
        hold(path)
        prepare(path, schema)
    else:
        prepare(path, schema)
        hold(path)


def _cause(error: sqlite3.Error, path: Path) -> str:
    """
    What a failure to open or write the file at C{path} says to an operator.
    """
    code = getattr(error, "sqlite_errorcode", None)
    primary = None if code is None else code & 0xFF
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return f"locked by another process (a write transaction held longer than {START_LOCK_WAIT:g} s)"
    if primary == sqlite3.SQLITE_NOTADB:
        return "not an SQLite database"
    if primary == sqlite3.SQLITE_CORRUPT:
        return f"corrupt: {error}"
    if primary in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
        # SQLite says only "disk I/O error" when the write-ahead log's shared
        # memory file cannot grow on a full disk.
        room = _room(path)
        if primary == sqlite3.SQLITE_FULL or room is not None and room < _LEAST_ROOM:
            return "the disk is full" if room is None else f"the disk is full ({room} bytes free)"
    if primary in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        reason = _read_only(path)
        if reason is not None:
            return f"read-only: {reason}"
    return str(error)


#: Less free space than this on the file's filesystem, and an I/O error
#: is put down to a full disk: a few pages of the log and its index.
_LEAST_ROOM = 256 * 1024


def _room(path: Path) -> int | None:
    """
    The bytes free on the filesystem holding C{path}, less those kept for
    root.
    """
    try:
        stat = os.statvfs(path.absolute().parent)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def _read_only(path: Path) -> str | None:
    """
    Why the file at C{path} cannot be written, if the filesystem says so.
    """
    folder = path.absolute().parent
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        return "its filesystem is mounted read-only"
    if path.exists() and not os.access(path, os.W_OK):
        return "the file is not writable"
    if not os.access(folder, os.W_OK):
        return f"its folder {folder} is not writable, so SQLite cannot create its write-ahead log (-wal, -shm) there"
    for suffix in ("-wal", "-shm"):
        companion = path.with_name(path.name + suffix)
        if companion.exists() and not os.access(companion, os.W_OK):
            return f"{companion} is not writable"
    return None


#: The most parameters one statement may hold in any SQLite since 3.32.
_MOST_PARAMETERS = 32766


@functools.lru_cache(maxsize=64)
def _values_statement(head: str, width: int, tail: str, rows: int) -> str:
    row = "(" + ",".join("?" * width) + ")"
    return f"{head} VALUES {','.join([row] * rows)} {tail}".rstrip()


@attrs.frozen
class RowInsert:
    """
    An C{INSERT} of many rows in a few statements of many rows each
    (C{head VALUES (?, ...), (?, ...), ... tail}), not one step a row.

    Why: C{executemany} steps SQLite once a row, through the sqlite3
    module's per-row work (and a release and retake of the GIL); a
    statement of thousands of rows steps once (the cloud's cost a reading:
    docs/performance.md).
    """

    #: The statement up to C{VALUES}, e.g. C{INSERT OR IGNORE INTO parts}.
    head: str
    #: Values a row.
    width: int
    #: What follows the rows, e.g. C{ON CONFLICT DO NOTHING}.
    tail: str = ""

    def statement(self, rows: int) -> str:
        return _values_statement(self.head, self.width, self.tail, rows)

    def run(self, connection: sqlite3.Connection, values: list) -> None:
        """
        Insert the rows whose values, row after row, are C{values}.
        """
        # Blocks of powers of two: a few statement texts, each prepared once
        # and then found in the connection's statement cache.
        most = min(4096, _MOST_PARAMETERS // self.width)
        rows = len(values) // self.width
        start = 0
        while rows:
            block = min(most, 1 << (rows.bit_length() - 1))
            end = start + block * self.width
            connection.execute(self.statement(block), values[start:end])
            start = end
            rows -= block


def insert_telling_new(connection: sqlite3.Connection, insert: RowInsert, values: list) -> list[bool]:
    """
    Insert the rows whose values, row after row, are C{values} with
    C{insert} (one that skips a row stored before: C{OR IGNORE},
    C{ON CONFLICT DO NOTHING}); which of them were new.

    The common case, every row new, takes L{RowInsert.run}; if any was
    stored before, its changes are undone and the rows go one by one, to
    learn which.
    """
    rows = len(values) // insert.width
    connection.execute("SAVEPOINT telling_new")
    before = connection.total_changes
    insert.run(connection, values)
    if connection.total_changes - before == rows:
        new = [True] * rows
    else:
        connection.execute("ROLLBACK TO telling_new")
        one, width = insert.statement(1), insert.width
        new = [connection.execute(one, values[at:at + width]).rowcount == 1 for at in range(0, len(values), width)]
    connection.execute("RELEASE telling_new")
    return new


class Database:
    """
    Runs work against one connection, many pieces per transaction, one
    transaction at a time, on the reactor thread in the reactor turn after
    the work was submitted, or, within C{commit_interval} of the last
    transaction's start, once the interval is over.

    Each piece runs inside its own savepoint: a piece that raises rolls back
    only its own changes and fails only its own Deferred.  Items given to
    L{run_many} one after another make one piece together.
    """

    def __init__(
        self,
        connection: sqlite3.Connection,
        reactor,
        timer: Callable[[], float] = time.perf_counter,
        commit_interval: float = 0.0,
    ):
        """
        @param timer: the clock the transactions are timed with, in
            seconds (a fake one in tests).
        @param commit_interval: the least time, in seconds on the reactor's
            clock, from the start of one transaction to the start of the
            next (0: the reactor's next turn, whenever the last ended).
        """
        if commit_interval < 0:
            raise ValueError(f"commit_interval must be 0 or more, not {commit_interval!r}")
        self._connection = connection
        self._reactor = reactor
        self._timer = timer
        self._commit_interval = commit_interval
        #: When the last transaction began, on the reactor's clock (None:
        #: none yet), from which the next waits out the commit interval.
        self._last_began: float | None = None
        #: Pieces for the next transaction, each (work, [Deferred, ...],
        #: [item, ...] for L{run_many} or None for L{run}).
        self._pending: list[tuple[Callable, list[Deferred], list | None]] = []
        self._committing = False
        self._idle: list[Deferred] = []
        #: Transactions committed and pieces of work done, for the logs.
        self.commits = 0
        self.pieces = 0
        #: How long each committed transaction took, its fsync included.
        self.commit_seconds = Histogram(COMMIT_SECONDS)
        #: The cause of the last transaction's failure, until one commits
        #: again: the database cannot be written for now (a full disk, a
        #: lock held by another process), whatever its callers retry.
        self.failing: str | None = None

    def stop(self) -> Deferred:
        """
        Finish all submitted work, then close the connection.
        """
        return self.flush().addCallback(lambda _: self._connection.close())

    def flush(self) -> Deferred:
        """
        A Deferred that fires once everything submitted so far is committed.
        """
        d = Deferred()
        if not self._committing and not self._pending:
            d.callback(None)
        else:
            self._idle.append(d)
        return d

    def run(self, work: Work) -> Deferred:
        """
        Run C{work(connection)} in the next transaction; the Deferred fires
        with its result after the commit, or fails with its exception.
        """
        d = Deferred()
        self._pending.append((work, [d], None))
        if not self._committing:
            self._commit_next()
        return d

    def run_many(self, work: ManyWork, item) -> Deferred:
        """
        Run C{work(connection, items)} in the next transaction, for C{item}
        and the items submitted with the same C{work} right before or after
        it (with no other work between them); the Deferred fires with the
        result for C{item} after the commit.  If C{work} raises, its changes
        are rolled back and every item's Deferred fails.

        For work that costs less done for many items at once: a few
        statements for a burst of chunks instead of three for each.
        """
        d = Deferred()
        last = self._pending[-1] if self._pending else None
        if last is not None and last[0] is work and last[2] is not None:
            last[1].append(d)
            last[2].append(item)
        else:
            self._pending.append((work, [d], [item]))
        if not self._committing:
            self._commit_next()
        return d

    def _commit_next(self) -> None:
        self._committing = True
        # Not at once: the rest of this turn's work (the other datagrams of
        # one read from the socket, the other batches of one read) joins the
        # same transaction, and, within the commit interval of the last
        # transaction's start, what the next turns bring too.
        delay = 0.0
        if self._commit_interval and self._last_began is not None:
            delay = max(0.0, self._last_began + self._commit_interval - self._reactor.seconds())
        self._reactor.callLater(delay, self._commit)

    def _commit(self) -> None:
        self._last_began = self._reactor.seconds()
        pieces, deferreds = self._take_group()
        started = self._timer()
        try:
            outcome = self._transaction(pieces)
        except Exception:
            outcome = Failure()
            self.failing = f"{outcome.type.__name__}: {outcome.getErrorMessage()}"
        else:
            self.commit_seconds.observe(self._timer() - started)
            self.failing = None
        self._committed(outcome, deferreds)

    def _take_group(self) -> tuple[list[tuple[Callable, list | None]], list[list[Deferred]]]:
        """
        The pending pieces, now the next transaction's: what to run, and
        the Deferreds to fire for each.
        """
        group, self._pending = self._pending, []
        return [(work, items) for work, _, items in group], [deferreds for _, deferreds, _ in group]

    def _transaction(self, pieces: list[tuple[Callable, list | None]]) -> list[tuple[bool, Any]]:
        """
        Run the pieces in one transaction: for each, C{(True, [result for
        each of its Deferreds])} or C{(False, Failure)}.
        """
        connection = self._connection
        results: list[tuple[bool, Any]] = []
        with immediate_transaction(connection):
            for work, items in pieces:
                connection.execute("SAVEPOINT piece")
                try:
                    if items is None:
                        result = [work(connection)]
                    else:
                        result = work(connection, items)
                        if len(result) != len(items):
                            raise RuntimeError(f"{work!r} gave {len(result)} results for {len(items)} items")
                except Exception:
                    if not connection.in_transaction:
                        # SQLite rolled the whole transaction back (a full
                        # disk, an I/O error): the group fails, with this
                        # cause rather than the savepoint's absence.
                        raise
                    connection.execute("ROLLBACK TO piece")
                    results.append((False, Failure()))
                else:
                    results.append((True, result))
                connection.execute("RELEASE piece")
        return results

    def _committed(self, outcome, deferreds: list[list[Deferred]]) -> None:
        # Still committing while the callbacks run: work they submit (a chunk
        # committed closes its round, which asks for a batch) must queue for
        # the next group, not start a second transaction beside this one.
        if isinstance(outcome, Failure):
            # The commit itself failed (disk full, I/O error): nothing of the
            # group is durable, so every piece fails.
            for piece in deferreds:
                for d in piece:
                    d.errback(outcome)
        else:
            self.commits += 1
            for piece, (ok, value) in zip(deferreds, outcome):
                self.pieces += len(piece)
                if ok:
                    for d, result in zip(piece, value):
                        d.callback(result)
                else:
                    for d in piece:
                        d.errback(value)
        self._committing = False
        if self._pending:
            self._commit_next()
        else:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)
