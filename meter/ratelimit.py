"""
Per-source token buckets: how many datagrams (or log lines) one source may
cause per second, bounded in memory however many sources there are.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

from twisted.logger import LogLevel


class PerSource:
    """
    A token bucket per source: C{rate} tokens a second, at most C{burst}
    saved.  At most C{max_sources} buckets are kept; the one used longest
    ago is forgotten first (it would be full again by now, or nearly).
    """

    def __init__(self, clock, rate: float, burst: float, max_sources: int = 4096):
        self._clock = clock
        self.rate = rate
        self._burst = burst
        self._max_sources = max_sources
        self._buckets: OrderedDict[object, tuple[float, float]] = OrderedDict()
        #: How many times allow() said no, per source, since the last take_suppressed().
        self.suppressed: dict[object, int] = {}

    def allow(self, source) -> bool:
        now = self._clock.seconds()
        tokens, last = self._buckets.pop(source, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        elif len(self.suppressed) < self._max_sources or source in self.suppressed:
            self.suppressed[source] = self.suppressed.get(source, 0) + 1
        self._buckets[source] = (tokens, now)
        if len(self._buckets) > self._max_sources:
            self._buckets.popitem(last=False)
        return allowed

    def take_suppressed(self, source) -> int:
        """
        How many were refused for C{source} since last asked (for a log line
        saying "and N more").
        """
        return self.suppressed.pop(source, 0)


class LimitedLines:
    """
    Log lines that a source may cause without end (bad input, a device
    sending its day again, every chunk refused while the spool is full): at
    most C{burst} at once and then C{rate} a second per source, and the next
    line that goes says how many were left out.
    """

    def __init__(self, log, clock, rate: float, burst: float, level: LogLevel, left_out: str):
        """
        @param log: the L{twisted.logger.Logger} the lines go to.
        @param left_out: what the count of lines left out is called, e.g.
            C{"similar lines from this source left out"}.
        """
        self._log = log
        self._level = level
        self._left_out = f" ({{suppressed}} {left_out})"
        self.limit = PerSource(clock, rate, burst)

    def line(self, source, format: str, **fields) -> None:
        if not self.limit.allow(source):
            return
        suppressed = self.limit.take_suppressed(source)
        if suppressed:
            format += self._left_out
        self._log.emit(self._level, format, suppressed=suppressed, **fields)


class LimitedWarnings(LimitedLines):
    """
    Warnings about bad input, at most a few a minute per source: a flood,
    or a captured datagram replayed in a loop, must not flood the log too.
    """

    def __init__(self, log, clock, rate: float = 1 / 6, burst: float = 5):
        super().__init__(log, clock, rate, burst, LogLevel.warn, "similar lines from this source left out")

    warn = LimitedLines.line


class Summary:
    """
    Events counted by kind and reported as one line at most once a
    C{period}: an event after a quiet period at once, those that follow it
    within the period together at its end.  A flood costs a line a period,
    a lone event is not held back, and nothing is scheduled while all is
    quiet.
    """

    def __init__(self, clock, emit, period: float = 60.0):
        """
        @param emit: called with the counts by kind (a L{Counter}) and the
            latest details given to L{add} since the last report; it logs them.
        """
        self._clock = clock
        self._emit = emit
        self.period = period
        self._counts: Counter[str] = Counter()
        self._latest: dict = {}
        self._reported: float | None = None
        self._timer = None

    def add(self, kind: str, count: int = 1, **latest) -> None:
        self._counts[kind] += count
        self._latest.update(latest)
        if self._timer is not None:
            return
        now = self._clock.seconds()
        if self._reported is None or now - self._reported >= self.period:
            self._report()
        else:
            self._timer = self._clock.callLater(self._reported + self.period - now, self._report)

    def _report(self) -> None:
        self._timer = None
        if not self._counts:
            return
        counts, latest = self._counts, self._latest
        self._counts, self._latest = Counter(), {}
        self._reported = self._clock.seconds()
        self._emit(counts, latest)

    def stop(self) -> None:
        """
        Report what is pending now.
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._report()
