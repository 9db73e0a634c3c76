"""
Retry-after hints for the devices a full spool answers busy.

A spool at its limit makes room only as fast as readings leave it for the
cloud.  A device answered busy without a hint retries on its own timers,
so a fleet reporting into a full spool comes back all at once, again and
again, until its retransmissions fill the receive queue.  Each device
refused is instead given a slot on a calendar: the time the spool takes to
make room for its day at the rate readings were measured to leave it, so
the devices come back spread at that rate.  A spool nothing leaves (the
cloud unreachable, a round holding its readings) sends them away for the
longest hint.

Everything here takes the time as an argument (tests drive it with
made-up times).
"""

from __future__ import annotations

import math

#: The shortest hint, as the shedding controller's.
MIN_HINT = 0.5
#: The rate (readings a second) slots are sized by until one is measured,
#: and the longest hint meanwhile (seconds): the devices refused first come
#: back soon, to slots sized by the rate measured by then.
INITIAL_RATE = 1000.0
UNMEASURED_MAX_HINT = 5.0
#: A rate measured below this (readings a second) is nothing leaving.
STALLED = 1.0
#: Seconds over which the rate readings leave at is measured.
WINDOW = 1.0
#: The weight of the latest window in the rate.
WEIGHT = 0.3
#: Seconds without a hint after which the rate is measured afresh.
QUIET = 5.0


class RoomCalendar:
    """
    Slots for the devices a full spool refuses, at the rate readings leave
    it.

    @param max_hint: the longest hint, in seconds.
    """

    def __init__(self, max_hint: float = 60.0):
        self.max_hint = max_hint
        #: Readings a second measured leaving the spool (None: not yet).
        self.rate: float | None = None
        self._measured_at: float | None = None
        self._removed = 0
        self._next_slot = 0.0

    def hint(self, now: float, removed: int, readings: int) -> int:
        """
        The hint, in whole milliseconds, for a device refused at C{now}
        that brings C{readings}, the spool having let C{removed} readings
        leave since it was opened.
        """
        self._measure(now, removed)
        if self.rate is not None and self.rate < STALLED:
            return math.ceil(self.max_hint * 1000)
        if self.rate is None:
            rate, longest = INITIAL_RATE, min(self.max_hint, UNMEASURED_MAX_HINT)
        else:
            rate, longest = self.rate, self.max_hint
        slot = max(self._next_slot, now)
        # Slots past the longest hint are not kept: they would only push
        # every later device further out.
        self._next_slot = min(slot + readings / rate, now + longest)
        return math.ceil(min(max(slot - now, MIN_HINT), longest) * 1000)

    def _measure(self, now: float, removed: int) -> None:
        if self._measured_at is None or now - self._measured_at > QUIET:
            self._measured_at, self._removed, self.rate = now, removed, None
            self._next_slot = now
            return
        elapsed = now - self._measured_at
        if elapsed < WINDOW:
            return
        latest = (removed - self._removed) / elapsed
        self.rate = latest if self.rate is None else (1 - WEIGHT) * self.rate + WEIGHT * latest
        self._measured_at, self._removed = now, removed
