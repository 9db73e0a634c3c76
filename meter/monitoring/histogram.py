"""
A histogram as a plain value: observing is a bisect and two additions,
done by the role's code once per event it times (a batch acknowledged, a
transaction committed), never per datagram.  The exposition turns it into
Prometheus' cumulative buckets at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left

import attrs


@attrs.define
class Histogram:
    """
    How many observations fell at or below each of C{bounds} (seconds,
    ascending), and above the last; their sum and count.
    """

    bounds: tuple[float, ...]
    #: Observations per bucket, not cumulative: C{counts[i]} holds those in
    #: (C{bounds[i - 1]}, C{bounds[i]}], the last one those above every bound.
    counts: list[int] = attrs.field()
    sum: float = 0.0

    @counts.default
    def _empty(self) -> list[int]:
        return [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's
        # bucket, as Prometheus' "le" (less or equal) says.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """
        Each bound with the observations at or below it, ending with
        infinity and the count of all.
        """
        total = 0
        buckets = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            total += count
            buckets.append((bound, total))
        return buckets


#: Seconds from a batch sent to its acknowledgement: a commit at the cloud
#: takes milliseconds, a cloud catching up seconds, and beyond the ack
#: timeout (30 s by default) the batch is sent again.
BATCH_ACK_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: Seconds of one SQLite transaction and its fsync: a fraction of a
#: millisecond on a fast disk, up to seconds on a slow or busy one.
COMMIT_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
