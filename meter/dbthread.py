"""
One SQLite connection on one thread, with group commits.

Both the gateway's spool and the cloud's store write through this.  Work
submitted while a commit is under way waits and then goes into the next
transaction together with everything else that arrived meanwhile, so one
fsync serves many acknowledgements under load, and an idle system still
commits each piece of work at once.  A piece of work's Deferred fires only
after the transaction holding it is committed: callers acknowledge from
there, so an acknowledgement always means the data is on disk.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

Work = Callable[[sqlite3.Connection], Any]
#: Work done for many items at once: returns one result per item, in order.
ManyWork = Callable[[sqlite3.Connection, list], list]


def connect(path: Path) -> sqlite3.Connection:
    """
    A connection tuned for a durable write-ahead log: WAL with synchronous
    FULL survives power loss, not only a process crash.
    """
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    # The connection is opened on one thread and then used only by the
    # database thread; sqlite3 checks the opening thread unless told not to.
    connection = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA busy_timeout=5000")
    return connection


class DatabaseThread:
    """
    Runs work on a single thread against one connection, many pieces per
    transaction.

    Each piece runs inside its own savepoint: a piece that raises rolls back
    only its own changes and fails only its own Deferred.  Items given to
    L{run_many} one after another make one piece together.
    """

    def __init__(self, connection: sqlite3.Connection, reactor, name: str = "meter-db"):
        self._connection = connection
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=name)
        #: Pieces for the next transaction: (work, Deferred), or, for
        #: L{run_many}, (work, [Deferred, ...], [item, ...]).
        self._pending: list[tuple] = []
        self._committing = False
        self._idle: list[Deferred] = []
        #: Transactions committed and pieces of work done, for the logs.
        self.commits = 0
        self.pieces = 0

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> Deferred:
        """
        Finish all submitted work, then stop the thread and close the
        connection.
        """
        d = self.flush()

        def stopped(_):
            self._pool.stop()
            self._connection.close()

        return d.addCallback(stopped)

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
        self._pending.append((work, d))
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

        For work that costs less done for many items at once: one
        C{executemany} for a burst of chunks instead of statements for each.
        """
        d = Deferred()
        last = self._pending[-1] if self._pending else None
        if last is not None and len(last) == 3 and last[0] is work:
            last[1].append(d)
            last[2].append(item)
        else:
            self._pending.append((work, [d], [item]))
        if not self._committing:
            self._commit_next()
        return d

    def _commit_next(self) -> None:
        group, self._pending = self._pending, []
        self._committing = True
        pieces = [piece[0] if len(piece) == 2 else (piece[0], piece[2]) for piece in group]
        done = deferToThreadPool(self._reactor, self._pool, self._transaction, pieces)
        done.addBoth(self._committed, [piece[1] for piece in group])

    def _transaction(self, pieces: list) -> list[tuple[bool, Any]]:
        connection = self._connection
        results: list[tuple[bool, Any]] = []
        connection.execute("BEGIN IMMEDIATE")
        try:
            for piece in pieces:
                connection.execute("SAVEPOINT piece")
                try:
                    if isinstance(piece, tuple):
                        work, items = piece
                        result = work(connection, items)
                        if len(result) != len(items):
                            raise RuntimeError(f"{work!r} gave {len(result)} results for {len(items)} items")
                    else:
                        result = piece(connection)
                except Exception:
                    connection.execute("ROLLBACK TO piece")
                    results.append((False, Failure()))
                else:
                    results.append((True, result))
                connection.execute("RELEASE piece")
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        return results

    def _committed(self, outcome, deferreds: list) -> None:
        # Still committing while the callbacks run: work they submit (a chunk
        # committed closes its round, which asks for a batch) must queue for
        # the next group, not start a second transaction beside this one.
        if isinstance(outcome, Failure):
            # The commit itself failed (disk full, I/O error): nothing of the
            # group is durable, so every piece fails.
            for d in deferreds:
                for each in d if isinstance(d, list) else (d,):
                    each.errback(outcome)
        else:
            self.commits += 1
            for d, (ok, result) in zip(deferreds, outcome):
                if not isinstance(d, list):
                    self.pieces += 1
                    if ok:
                        d.callback(result)
                    else:
                        d.errback(result)
                    continue
                self.pieces += len(d)
                if ok:
                    for each, item_result in zip(d, result):
                        each.callback(item_result)
                else:
                    for each in d:
                        each.errback(result)
        self._committing = False
        if self._pending:
            self._commit_next()
        else:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)
