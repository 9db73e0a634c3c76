"""
Delivers one day's chunks to the gateway, after CoAP (RFC 7252 section
4.8): the first timeout is random between C{ack_timeout} and C{ack_timeout *
ack_random_factor}, doubled on each of at most C{max_retransmit}
retransmissions; the day is delivered only once every chunk is acknowledged.
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

    def span(self) -> float:
        """
        The longest a sender keeps trying one chunk (CoAP's MAX_TRANSMIT_WAIT).
        """
        return self.ack_timeout * (2 ** (self.max_retransmit + 1) - 1) * self.ack_random_factor


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
            # The gateway is alive but cannot take the chunk now (its spool is
            # full): keep it and let the backoff timer try again.
            self.metrics.busy_answers += 1
            pending.busy_reason = ack.reason or "busy"
            self.log.warn("gateway busy ({reason}): will retry part {part}", reason=ack.reason, part=ack.part)
            return
        self._cancel(pending)
        del self._outstanding[ack.part]
        if ack.status == "bad":
            self._fail(f"gateway refused part {ack.part}/{self._total}: {ack.reason}")
            return
        self._acknowledged += 1
        self._fill()

    def _fill(self) -> None:
        if self.done.called:
            return
        while self._waiting and len(self._outstanding) < self._window:
            chunk = self._waiting.pop()
            timeout = self._params.ack_timeout * self._rng.uniform(1.0, self._params.ack_random_factor)
            pending = _Outstanding(chunk, wire.encode(chunk), timeout)
            self._outstanding[chunk.part] = pending
            self._transmit(pending)
        if not self._outstanding and not self._waiting:
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
        if not self.done.called:
            self.done.errback(DeliveryFailed(why))

    @staticmethod
    def _cancel(pending: _Outstanding) -> None:
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        pending.timer = None
