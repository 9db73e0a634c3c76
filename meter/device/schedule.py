"""
When a device sends which day: at start, then once a day at C{send_at}
(local time) plus the device's offset into the fleet's sending window, and
after a failure again every few minutes until the next daily send.

Local time is the one the device's clock reads in its time zone: the
functions here take that zone (C{None}, the system's own), so tests pin it
and stay deterministic across daylight saving changes.
"""

from __future__ import annotations

import datetime
from typing import Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from meter.clocktext import local_time
from meter.device.sender import DeliveryFailed

#: After a failed send, try again this much later (at most until the next
#: daily send).
RETRY_AFTER = 300.0


def previous_day(now: float, tz: datetime.tzinfo | None = None) -> datetime.date:
    """
    The day a send at Unix time C{now} reports: yesterday, local time in
    C{tz} (C{None}: the system's time zone).
    """
    return datetime.datetime.fromtimestamp(now, tz).date() - datetime.timedelta(days=1)


def next_send(now: float, send_at: datetime.time, offset: float, tz: datetime.tzinfo | None = None) -> float:
    """
    The Unix time of the next daily send after C{now}: today's or tomorrow's
    C{send_at} (local time in C{tz}; C{None}: the system's time zone), plus
    this device's C{offset} seconds.
    """
    today = datetime.datetime.fromtimestamp(now, tz).date()
    for day in (today, today + datetime.timedelta(days=1)):
        at = datetime.datetime.combine(day, send_at, tz).timestamp() + offset
        if at > now:
            return at
    return datetime.datetime.combine(today + datetime.timedelta(days=2), send_at, tz).timestamp() + offset


def offset_for(device_id: int, spread: float) -> float:
    """
    This device's offset into the fleet's sending window: deterministic and
    spread evenly (a multiplicative hash), so a large fleet does not fire in
    the same second and a device always sends at the same time.
    """
    if spread <= 0:
        return 0.0
    return ((device_id * 2654435761) % 2**32) / 2**32 * spread


class DailySchedule:
    """
    Decides when to send which day, on C{clock}, and calls C{send(day)} for
    it: a L{Deferred} that fires once the day is delivered or fails with
    L{DeliveryFailed}.

    L{start} sends at once.  After a delivery the next send is the next
    daily one (L{next_send}); after a failure it is C{retry_after} seconds
    later, but never after that daily send.  Each send reports the previous
    day of the moment it starts (L{previous_day}): the survey file holds the
    last 24 hours, so a failure that lasts until the next daily send moves on
    to the new day.

    With C{once}, L{start} sends once and nothing is planned: L{finished}
    fires with the send's result, or fails with its L{DeliveryFailed}.

    @ivar next_at: the Unix time of the planned send, or C{None} while a send
        is in flight (and after L{stop}).
    """

    log = Logger()

    def __init__(
        self,
        clock,
        send: Callable[[datetime.date], Any],
        send_at: datetime.time,
        offset: float = 0.0,
        *,
        tz: datetime.tzinfo | None = None,
        retry_after: float = RETRY_AFTER,
        once: bool = False,
        name: str = "device",
    ):
        self._clock = clock
        self._send = send
        self._send_at = send_at
        self._offset = offset
        self._tz = tz
        self._retry_after = retry_after
        self._once = once
        self._name = name
        self._call = None
        self._stopped = False
        self.next_at: float | None = None
        self.finished: Deferred = Deferred()

    def start(self) -> None:
        self._stopped = False
        self._send_now()

    def stop(self) -> None:
        """
        Send no more: cancels the planned send; a send in flight may still
        end, but its outcome plans nothing and, with C{once}, does not fire
        L{finished}.
        """
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.next_at = None

    def _send_now(self) -> None:
        self._call = None
        self.next_at = None
        day = previous_day(self._clock.seconds(), self._tz)
        maybeDeferred(self._send, day).addCallbacks(self._delivered, self._failed)

    def _delivered(self, result) -> None:
        if self._stopped:
            return
        if self._once:
            self.finished.callback(result)
        else:
            self._plan(retry=False)

    def _failed(self, failure) -> None:
        failure.trap(DeliveryFailed)
        self.log.error("{name}: {why}", name=self._name, why=failure.getErrorMessage())
        if self._stopped:
            return
        if self._once:
            self.finished.errback(failure)
        else:
            self._plan(retry=True)

    def _plan(self, retry: bool) -> None:
        now = self._clock.seconds()
        at = next_send(now, self._send_at, self._offset, self._tz)
        if retry:
            at = min(at, now + self._retry_after)
        # The clock time, in the device's zone, is what an operator checks
        # against send_at; the seconds to wait are the event's fields.
        self.log.info(
            "{name}: next send at {when}", name=self._name, when=local_time(at, self._tz), at=at, s=at - now
        )
        self.next_at = at
        self._call = self._clock.callLater(at - now, self._send_now)
