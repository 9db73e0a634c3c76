"""
Delivers one day's chunks to the gateway, after CoAP (RFC 7252 section
4.8): the first timeout is random between C{ack_timeout} and C{ack_timeout *
ack_random_factor}, doubled on each of at most C{max_retransmit}
retransmissions; the day is delivered only once every chunk is acknowledged.

A busy answer with a retry-after hint (an overloaded gateway shedding load)
pauses the whole day's sending for the hint and a random fifth more, so the
devices it sends away do not come back in step; then the chunks not yet
acknowledged go again, on fresh timers.  Those sends are not
retransmissions: the gateway answered, so the CoAP budget, which bounds a
silent path, is not spent.  What bounds the waiting instead is
C{max_busy_wait}: a day whose pauses would pass it fails, and the device
sends it again later.
"""

from __future__ import annotations

import random
from typing import Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from meter import wire
from meter.device.metrics import DeviceMetrics


class DeliveryFailed(Exception):
    """
    The day was not delivered: the gateway refused it or never answered (or,
    from L{meter.device.delivery}, the day's survey could not be read).
    """


@attrs.frozen
class Retransmission:
    """
    CoAP's transmission parameters (RFC 7252 section 4.8), configurable.
    """

    ack_timeout: float = 2.0
    ack_random_factor: float = 1.5
    max_retransmit: int = 4
    #: The most seconds one attempt at a day pauses on busy hints in all.
    max_busy_wait: float = 300.0

    def span(self) -> float:
        """
        The longest a sender keeps trying one chunk (CoAP's MAX_TRANSMIT_WAIT).
        """
        return self.ack_timeout * (2 ** (self.max_retransmit + 1) - 1) * self.ack_random_factor


#: A pause on a hint lasts the hint times 1 to this, drawn at random: the
#: gateway spreads the devices it sends away over time, the jitter keeps
#: those given one slot from coming back at one instant.
BUSY_JITTER = 1.2
#: The shortest pause, whatever the hint: a gateway hinting a millisecond
#: must not draw a device's chunks back without end.
MIN_BUSY_PAUSE = 0.1


@attrs.define
class _Outstanding:
    chunk: wire.DayChunk
    datagram: bytes
    timeout: float
    retransmissions: int = 0
    timer: object = None
    #: The gateway's reason when it last answered busy: a give-up then says
    #: the gateway was there but full, not unreachable.
    busy_reason: str = ""


class DaySender:
    """
    Delivers one day's chunks: sends at most C{window} unacknowledged at a
    time, retransmits each on its own timer, and fires C{done} once every
    chunk is acknowledged (or fails it with L{DeliveryFailed}).
    """

    log = Logger()

    def __init__(
        self,
        chunks: list[wire.DayChunk],
        send: Callable[[bytes], None],
        clock,
        retransmission: Retransmission = Retransmission(),
        rng: random.Random | None = None,
        window: int = 8,
        metrics: DeviceMetrics | None = None,
    ):
        self._waiting = list(reversed(chunks))
        self._send = send
        self._clock = clock
        self._params = retransmission
        self._rng = rng or random.Random()
        self._window = window
        self._outstanding: dict[int, _Outstanding] = {}
        self._total = len(chunks)
        self._acknowledged = 0
        #: While the gateway's hint holds the sending: when it ends, and
        #: the timer that resumes it.
        self._paused_until: float | None = None
        self._resume = None
        #: Seconds paused on hints so far, against C{max_busy_wait}.
        self._busy_waited = 0.0
        self.done: Deferred = Deferred()
        self.metrics = metrics if metrics is not None else DeviceMetrics()

    def start(self) -> Deferred:
        self._fill()
        return self.done

    def ack_received(self, ack: wire.DayAck) -> None:
        pending = self._outstanding.get(ack.part)
        if pending is None or pending.chunk.xfer != ack.xfer:
            self.metrics.stray_acks += 1
            return
        if ack.status == "busy":
            self.metrics.busy_answers += 1
            pending.busy_reason = ack.reason or "busy"
            if ack.retry_after_ms is not None:
                self._pause(ack)
                return
            # The gateway is alive but cannot take the chunk now (its spool is
            # full): keep it and let the backoff timer try again.
            self.log.warn("gateway busy ({reason}): will retry part {part}", reason=ack.reason, part=ack.part)
            return
        self._cancel(pending)
        del self._outstanding[ack.part]
        if ack.status == "bad":
            self._fail(f"gateway refused part {ack.part}/{self._total}: {ack.reason}")
            return
        self._acknowledged += 1
        self._fill()

    def _pause(self, ack: wire.DayAck) -> None:
        """
        The gateway is overloaded and said when to come back: hold the
        whole window until then (the latest of its hints), its timers
        stopped, unless that would take this attempt's pauses past
        C{max_busy_wait}.
        """
        self.metrics.busy_hints += 1
        now = self._clock.seconds()
        until = now + max(ack.retry_after_ms / 1000, MIN_BUSY_PAUSE) * self._rng.uniform(1.0, BUSY_JITTER)
        paused_until = self._paused_until
        if paused_until is not None and until <= paused_until:
            return
        waited = self._busy_waited + until - (now if paused_until is None else paused_until)
        if waited > self._params.max_busy_wait:
            self._fail(
                f"gateway busy ({ack.reason or 'no reason given'}) for part {ack.part}/{self._total}: its hints "
                f"would hold the day {waited:.1f} s, more than max_busy_wait ({self._params.max_busy_wait:g} s)"
            )
            return
        self._busy_waited = waited
        if paused_until is None:
            self.log.info(
                "gateway busy ({reason}): pausing the day's sending for {seconds:.3f} s as it asks",
                reason=ack.reason,
                seconds=until - now,
            )
        self._paused_until = until
        for pending in self._outstanding.values():
            self._cancel(pending)
        if self._resume is not None and self._resume.active():
            self._resume.reset(until - now)
        else:
            self._resume = self._clock.callLater(until - now, self._resumed)

    def _resumed(self) -> None:
        """
        The pause is over: send the chunks not yet acknowledged again, each
        on a fresh first timeout, then fill the window.
        """
        self._resume = None
        self._paused_until = None
        for pending in list(self._outstanding.values()):
            pending.timeout = self._params.ack_timeout * self._rng.uniform(1.0, self._params.ack_random_factor)
            self.metrics.resent_after_busy += 1
            self._transmit(pending)
        self._fill()

    def _fill(self) -> None:
        if self.done.called:
            return
        while self._paused_until is None and self._waiting and len(self._outstanding) < self._window:
            chunk = self._waiting.pop()
            timeout = self._params.ack_timeout * self._rng.uniform(1.0, self._params.ack_random_factor)
            pending = _Outstanding(chunk, wire.encode(chunk), timeout)
            self._outstanding[chunk.part] = pending
            self._transmit(pending)
        if not self._outstanding and not self._waiting:
            # Every chunk acknowledged, perhaps during a pause: nothing
            # left to resume.
            if self._resume is not None and self._resume.active():
                self._resume.cancel()
            self._resume = None
            self.done.callback(self._total)

    def _transmit(self, pending: _Outstanding) -> None:
        self._send(pending.datagram)
        pending.timer = self._clock.callLater(pending.timeout, self._timed_out, pending)

    def _timed_out(self, pending: _Outstanding) -> None:
        pending.timer = None
        if pending.retransmissions >= self._params.max_retransmit:
            if pending.busy_reason:
                self._fail(
                    f"gateway busy ({pending.busy_reason}) for part {pending.chunk.part}/{self._total} "
                    f"after {pending.retransmissions + 1} transmissions"
                )
            else:
                self._fail(
                    f"no acknowledgement for part {pending.chunk.part}/{self._total} after "
                    f"{pending.retransmissions + 1} transmissions"
                )
            return
        pending.retransmissions += 1
        pending.timeout *= 2
        self.metrics.retransmissions += 1
        self.log.info(
            "no acknowledgement for part {part}/{parts}: retransmission {n} of {max}",
            part=pending.chunk.part,
            parts=self._total,
            n=pending.retransmissions,
            max=self._params.max_retransmit,
        )
        self._transmit(pending)

    def _fail(self, why: str) -> None:
        for pending in self._outstanding.values():
            self._cancel(pending)
        self._outstanding.clear()
        self._waiting.clear()
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        self._resume = None
        if not self.done.called:
            self.done.errback(DeliveryFailed(why))

    @staticmethod
    def _cancel(pending: _Outstanding) -> None:
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        pending.timer = None
