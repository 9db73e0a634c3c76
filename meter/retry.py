"""
A failed step (a spool or database transaction) is retried on a timer with
exponential backoff until it succeeds, and the operator is told without the
log being flooded: a full disk fails every transaction, and a line (let
alone a traceback) for each would fill what room is left.
"""

from __future__ import annotations

import sqlite3
import sys

from twisted.python.failure import Failure

from meter.ratelimit import PerSource

#: Failures whose message says all there is to say (a full disk, a lock, a
#: read-only file): logged as one line with their cause.  Anything else is a
#: fault in the code, whose traceback is logged the first time.
EXPECTED = (sqlite3.Error, OSError)


def expected(kind: type) -> bool:
    """
    Whether a failure of type C{kind} is one of L{EXPECTED}, or an error
    the PostgreSQL server reported (its driver loaded only by a cloud that
    stores there).
    """
    if issubclass(kind, EXPECTED):
        return True
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and issubclass(kind, psycopg.Error)


class Backoff:
    """
    The delays between retries of one step: C{initial}, doubled after each
    failure up to C{maximum}, back to C{initial} after a success.
    """

    def __init__(self, initial: float = 0.25, maximum: float = 30.0):
        self._initial = min(initial, maximum)
        self._maximum = maximum
        self._next = self._initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self._maximum)
        return delay

    def reset(self) -> None:
        self._next = self._initial


class Failures:
    """
    The failed steps of one component.  Each failure is counted (in
    C{counters["transaction_failures"]} and in the step's own counter),
    logged with its cause at most C{burst} lines and then one line every
    1/C{rate} seconds per step (the next line says how many were left out),
    and given the delay before its retry.  The first success of a step that
    had failed is logged once, with how many failures it ended.
    """

    def __init__(self, owner, clock, counters, maximum: float = 30.0, rate: float = 1 / 10, burst: float = 3):
        """
        @param owner: the component, whose C{log} (a L{twisted.logger.Logger})
            the lines go to, looked up at each line.
        @param counters: the component's metrics, counted by name
            (C{counters[name] += 1}): C{transaction_failures} and each
            step's counter must be among its fields.
        @param maximum: the longest delay between retries, seconds.
        """
        self._owner = owner
        self._clock = clock
        self._counters = counters
        self._maximum = maximum
        self._limit = PerSource(clock, rate, burst)
        self._backoffs: dict[str, Backoff] = {}
        #: step -> (failures since its last success, when the first of them happened)
        self._failing: dict[str, tuple[int, float]] = {}
        self._traced: set[tuple[str, type]] = set()

    def failed(self, step: str, counter: str, failure: Failure, what: str, retried: bool = True, **fields) -> float:
        """
        Step C{step} failed with C{failure}: count it in C{counter}, log
        C{what} (a format string of C{fields}) with the cause if the rate
        allows, and return how many seconds to wait before retrying.

        @param retried: whether the caller retries after the delay returned
            (the line says when); a step retried by someone else (a device
            answered busy, a gateway whose batch is refused) says nothing.
        """
        self._counters["transaction_failures"] += 1
        self._counters[counter] += 1
        count, since = self._failing.get(step, (0, self._clock.seconds()))
        self._failing[step] = (count + 1, since)
        delay = self._backoffs.setdefault(step, Backoff(maximum=self._maximum)).next()
        if self._limit.allow(step):
            suppressed = self._limit.take_suppressed(step)
            line = what + (": {cause}; retry in {delay:g} s" if retried else ": {cause}")
            if suppressed:
                line += " ({suppressed} similar failures left out of the log)"
            cause = f"{failure.type.__name__}: {failure.getErrorMessage()}"
            if not expected(failure.type) and (step, failure.type) not in self._traced:
                # A fault in the code: its traceback once, then its message.
                self._traced.add((step, failure.type))
                self._owner.log.failure(line, failure, cause=cause, delay=delay, suppressed=suppressed, **fields)
            else:
                self._owner.log.error(line, cause=cause, delay=delay, suppressed=suppressed, **fields)
        return delay

    def succeeded(self, step: str) -> None:
        """
        Step C{step} succeeded: its backoff starts again from the shortest
        delay, and if it had failed, one line says it recovered.
        """
        failing = self._failing.pop(step, None)
        if failing is None:
            return
        self._backoffs[step].reset()
        self._limit.take_suppressed(step)
        count, since = failing
        self._owner.log.info(
            "{step} succeeded again after {count} failures over {seconds:.1f} s",
            step=step,
            count=count,
            seconds=self._clock.seconds() - since,
        )

    def failing(self, step: str) -> bool:
        return step in self._failing
