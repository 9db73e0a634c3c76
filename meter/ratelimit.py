"""
Per-source token buckets: how many datagrams (or log lines) one source may
cause per second, bounded in memory however many sources there are.
"""

from __future__ import annotations

from collections import OrderedDict


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


class LimitedWarnings:
    """
    Warnings about bad input, at most a few a minute per source (a flood, or
    a captured datagram replayed in a loop, must not flood the log too); the
    next line that goes says how many were left out.
    """

    def __init__(self, log, clock, rate: float = 1 / 6, burst: float = 5):
        """
        @param log: the L{twisted.logger.Logger} the warnings go to.
        """
        self._log = log
        self.limit = PerSource(clock, rate, burst)

    def warn(self, source, format: str, **fields) -> None:
        if not self.limit.allow(source):
            return
        suppressed = self.limit.take_suppressed(source)
        if suppressed:
            format += " ({suppressed} similar lines from this source left out)"
        self._log.warn(format, suppressed=suppressed, **fields)
