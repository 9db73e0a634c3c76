"""
One PostgreSQL connection with a thread of its own.

psycopg's calls block (the network, the server's fsync at COMMIT), so they
never run on the reactor thread: each piece of work is queued to the
connection's thread, which runs the pieces one after another, and its result
comes back to the reactor as a Deferred.  One thread a connection, so a
connection is never used by two threads and the order of work is the order
it was given.  (Not twisted.enterprise.adbapi: its pool does not reconnect
a lost connection reliably, twisted #4964.)

A lost connection (the server restarted, the network cut) fails the work
that found it, and the runner connects again with backoff, logging the
cause once and then a line a minute at most while it lasts; meanwhile work
fails at once with L{Unreachable}, so its caller refuses and retries (a
gateway keeps a refused batch).  Nothing needs a restart.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from meter.monitoring.histogram import COMMIT_SECONDS, Histogram
from meter.postgres.location import PostgresLocation
from meter.retry import Backoff

#: Seconds between two log lines about the same outage after its first.
LOG_EVERY = 60.0


class Unreachable(Exception):
    """
    The database cannot be reached now; the message says why.  The runner
    is connecting again meanwhile.
    """


class Unusable(Exception):
    """
    Raised by a runner's C{prepare} for a database it cannot work with (a
    schema of a newer version): its message says all, no traceback.
    """


def describe(error: BaseException) -> str:
    """
    An exception as one line: its class and its first line of message.
    """
    message = " ".join(str(error).split()) or type(error).__name__
    if len(message) > 300:
        message = message[:299] + "…"
    return message if isinstance(error, Unreachable) else f"{type(error).__name__}: {message}"


class ConnectionRunner:
    """
    Runs work on one connection to the database at C{location}, on a
    thread of its own; see the module's docstring.

    @ivar failing: why the database cannot be used now (the last cause of
        a failed connection, or of a lost one), until connected again; None
        while connected.
    @ivar connected: whether a connection is open now.
    @ivar losses: connections lost after they were made.
    @ivar connect_failures: attempts to connect that failed.
    @ivar commit_seconds: how long each piece of work took on the thread,
        its commit included.
    """

    log = Logger()

    def __init__(
        self,
        location: PostgresLocation,
        reactor,
        *,
        name: str = "database",
        prepare: Callable[[Any], None] | None = None,
        backoff: Backoff | None = None,
        connect_timeout: float = 5.0,
        autocommit: bool = True,
        timer: Callable[[], float] = time.perf_counter,
    ):
        """
        @param name: what the thread and the log lines call it.
        @param prepare: called on the thread with each new connection before
            any work (set the session, check the schema); if it raises, the
            connection counts as failed and is tried again later.
        @param autocommit: the connection's mode; work opens its own
            transactions (C{with connection.transaction():}).
        """
        self.location = location
        self._reactor = reactor
        self._name = name
        self._prepare = prepare
        self._backoff = backoff if backoff is not None else Backoff(0.25, 30.0)
        self._connect_timeout = connect_timeout
        self._autocommit = autocommit
        self._timer = timer
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Used on the thread only: the connection, and why there is none.
        self._connection = None
        self._cause = "not connected yet"
        self._retry = None
        self._stopping = False
        self.connected = False
        self.failing: str | None = "not connected yet"
        self.losses = 0
        self.connect_failures = 0
        self.commit_seconds = Histogram(COMMIT_SECONDS)
        self._waiting: list[Deferred] = []
        # The outage being logged: (failures, when the first happened, when last logged)
        self._outage: tuple[int, float, float] | None = None

    @property
    def unreachable(self) -> str | None:
        """
        Why there is no connection now, or None while connected.
        """
        return None if self.connected else self.failing

    def when_connected(self) -> Deferred:
        """
        A Deferred that fires once a connection is open: at once if one is.
        """
        if self.connected:
            return succeed(None)
        d = Deferred()
        self._waiting.append(d)
        return d

    # -- on the reactor thread -------------------------------------------------

    def start(self) -> None:
        """
        Start the thread and the first attempt to connect.
        """
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name=f"meter-postgres-{self._name}", daemon=True)
        self._thread.start()
        self._jobs.put((self._connect, None))

    def run(self, work: Callable[[Any], Any]) -> Deferred:
        """
        Run C{work(connection)} on the thread, after the work given before
        it; the Deferred fires with its result on the reactor thread, or
        fails with its exception (L{Unreachable} if there is no connection).
        """
        d = Deferred()
        if self._thread is None or self._stopping:
            d.errback(Unreachable(f"the connection to the {self._name} is closed"))
            return d
        self._jobs.put((work, d))
        return d

    def stop(self) -> Deferred:
        """
        Finish the work given so far, close the connection and end the
        thread; the Deferred fires once done.
        """
        d = Deferred()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._thread is None or self._stopping:
            d.callback(None)
            return d
        self._stopping = True
        self._jobs.put((None, d))
        return d

    def _connected(self) -> None:
        if self._outage is not None:
            count, since, _ = self._outage
            self.log.info(
                "connected to the {name} at {where} again after {count} failed attempts over {seconds:.1f} s",
                name=self._name, where=self.location.where, count=count, seconds=self._reactor.seconds() - since,
            )
        else:
            self.log.info("connected to the {name} at {where}", name=self._name, where=self.location.where)
        self._outage = None
        self._backoff.reset()
        self.connected = True
        self.failing = None
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def _disconnected(self, cause: str, lost: bool) -> None:
        """
        The connection failed or was lost: say so (rate-limited) and try
        again after the next delay.
        """
        self.connected = False
        self.failing = cause
        if lost:
            self.losses += 1
        else:
            self.connect_failures += 1
        if self._stopping:
            return
        delay = self._backoff.next()
        now = self._reactor.seconds()
        if self._outage is None:
            self._outage = (1, now, now)
            self._log_outage(cause, delay, lost, 0)
        else:
            count, since, logged = self._outage
            if now - logged >= LOG_EVERY:
                self._log_outage(cause, delay, lost, count)
                logged = now
            self._outage = (count + 1, since, logged)
        self._retry = self._reactor.callLater(delay, self._reconnect)

    def _log_outage(self, cause: str, delay: float, lost: bool, failures: int) -> None:
        what = "lost the connection to" if lost else "cannot reach"
        line = what + " the {name} at {where}: {cause}; retrying in {delay:g} s"
        if failures:
            line += " ({failures} failed attempts so far)"
        self.log.error(line, name=self._name, where=self.location.where, cause=cause, delay=delay, failures=failures)

    def _reconnect(self) -> None:
        self._retry = None
        if not self._stopping:
            self._jobs.put((self._connect, None))

    # -- on the connection's thread --------------------------------------------

    def _serve(self) -> None:
        while True:
            work, d = self._jobs.get()
            if work is None:
                self._close()
                self._reactor.callFromThread(self._ended, d)
                return
            if d is None:
                work()
                continue
            self._reactor.callFromThread(self._fire, d, self._attempt(work))

    def _ended(self, d: Deferred) -> None:
        self.connected = False
        self._thread = None
        d.callback(None)

    @staticmethod
    def _fire(d: Deferred, outcome) -> None:
        if isinstance(outcome, Failure):
            d.errback(outcome)
        else:
            d.callback(outcome)

    def _attempt(self, work):
        import psycopg

        connection = self._connection
        if connection is None:
            return Failure(Unreachable(f"cannot reach the {self._name} at {self.location.where}: {self._cause}"))
        started = self._timer()
        try:
            result = work(connection)
        except Exception as e:
            failure = Failure()
            if connection.broken or connection.closed or isinstance(e, psycopg.OperationalError) and _lost(connection):
                self._close()
                self._cause = describe(e)
                self._reactor.callFromThread(self._disconnected, self._cause, True)
            elif not self._autocommit and not connection.closed:
                connection.rollback()
            return failure
        self._reactor.callFromThread(self.commit_seconds.observe, self._timer() - started)
        return result

    def _connect(self) -> None:
        import psycopg

        self._close()
        try:
            connection = psycopg.connect(
                self.location.uri, autocommit=self._autocommit, connect_timeout=max(1, round(self._connect_timeout))
            )
        except Exception as e:
            self._cause = describe(e)
            self._reactor.callFromThread(self._disconnected, self._cause, False)
            return
        try:
            if self._prepare is not None:
                self._prepare(connection)
        except Exception as e:
            connection.close()
            failure = Failure()
            if not isinstance(e, (psycopg.OperationalError, Unusable)):
                # A fault in the code: its traceback.
                self._reactor.callFromThread(self.log.failure, "preparing a connection failed", failure)
            self._cause = str(e) if isinstance(e, Unusable) else describe(e)
            self._reactor.callFromThread(self._disconnected, self._cause, False)
            return
        self._cause = None
        self._connection = connection
        self._reactor.callFromThread(self._connected)

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                pass


def _lost(connection) -> bool:
    """
    Whether the connection is unusable after an operational error: the
    server went away (the driver marks it broken or closed), or it no
    longer answers a trivial query.
    """
    if connection.broken or connection.closed:
        return True
    try:
        connection.execute("SELECT 1")
    except Exception:
        return True
    return False
