"""
The uplink: moves the ready readings (those of closed rounds, and with
C{[gateway] forward = "device"} those of each device whose transfer is
complete) from the spool to the cloud, a window of batches at a time, and
removes each batch from the spool once the cloud acknowledged it.
"""

from __future__ import annotations

from typing import Callable, Protocol

import attrs
from twisted.logger import Logger

from meter import wire
from meter.gateway.interfaces import ISpool
from meter.gateway.metrics import GatewayMetrics
from meter.gateway.spool import SpooledBatch
from meter.ratelimit import LimitedWarnings
from meter.retry import Backoff, Failures


#: The codes of a cloud's refusal that name something in the batch itself,
#: which sending it again cannot change (docs/protocol.md).  Any other
#: refusal (the cloud's database failing, a cloud of another version) may
#: pass and is retried.
REFUSED_FOR_GOOD = frozenset({"field", "value", "range", "count", "record", "minute", "checksum"})


def refused_for_good(reason: str) -> bool:
    """
    Whether a refusal's C{reason} says the batch will never be stored.
    """
    return reason.partition(":")[0] in REFUSED_FOR_GOOD


class BatchSender(Protocol):
    """
    What the uplink needs of a connection to the cloud.
    """

    def send(self, message) -> None: ...

    def abort(self, cause: str | None = None) -> None: ...


class Uplink:
    """
    Forwards ready readings from the spool to the cloud, up to C{window}
    batches in flight at once, and removes a batch's readings from the spool
    once the cloud acknowledged it.

    A batch the cloud does not acknowledge within C{ack_timeout} (or that it
    refuses) stays in the spool and is sent again; one the cloud refuses for
    good (L{refused_for_good}) is set aside in the spool's C{refused} table,
    so the batches behind it go on.

    A spool transaction that fails (taking a batch, removing an acknowledged
    one) is retried on a timer with backoff up to C{max_retry_delay}
    seconds; an acknowledged batch stays in the window until its removal
    succeeds.

    Readings of chunks that arrive after their round closed, and devices'
    days ready before their round closes (see L{late_arrived}), linger: for
    C{late_linger} seconds from the first of them a batch goes only if it
    is full, so days arriving one by one leave in full batches rather than
    one batch a chunk or a device.
    """

    log = Logger()

    def __init__(
        self,
        spool: ISpool,
        clock,
        batch_readings: int,
        ack_timeout: float,
        on_delivered: Callable[[int], None],
        retry_delay: float = 5.0,
        new_batch_id: Callable[[], str] = wire.new_id,
        window: int = 1,
        max_retry_delay: float = 30.0,
        late_linger: float = 0.0,
        log: Logger | None = None,
        metrics: GatewayMetrics | None = None,
    ):
        """
        @param on_delivered: called with the number of readings that left
            the spool, delivered.
        @param log: where the uplink's lines go (by default its own logger).
        @param metrics: what the uplink counts into (the role's, shared with
            the intake; by default its own).
        """
        if log is not None:
            self.log = log
        self._spool = spool
        self._clock = clock
        self._batch_readings = batch_readings
        self._ack_timeout = ack_timeout
        self._on_delivered = on_delivered
        self._retry_delay = retry_delay
        self._new_batch_id = new_batch_id
        self._window = window
        self._sender: BatchSender | None = None
        #: Batches sent and not yet removed from the spool, oldest first.
        self._in_flight: dict[str, _InFlight] = {}
        self._fetching = False
        self._retry = None
        self._late_linger = late_linger
        #: The end of the linger for late readings, while one runs.
        self._linger = None
        #: Readings of late chunks spooled since the linger started, not yet
        #: sent: once they fill a batch, it goes.
        self._late_readings = 0
        self._stopped = False
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        self._failures = Failures(self, clock, self.metrics, max_retry_delay)
        self._refusals = LimitedWarnings(self.log, clock)
        self._refused_backoff = Backoff(retry_delay, max(retry_delay, max_retry_delay))

    def gauges(self) -> dict[str, int]:
        """
        The link now: up or not (1 or 0), and the batches sent and not yet
        acknowledged.
        """
        return {
            "uplink_up": int(self._sender is not None),
            "batches_in_flight": sum(1 for flight in self._in_flight.values() if not flight.acknowledged),
        }

    def connected(self, sender: BatchSender) -> None:
        self._sender = sender
        self.send_next()

    def disconnected(self, sender: BatchSender) -> None:
        if sender is not self._sender:
            return
        self._sender = None
        # Unacknowledged batches are sent again on the next connection, from
        # the spool; acknowledged ones are being removed and stay tracked
        # until they are, so they are not taken again meanwhile.
        for batch_id, flight in list(self._in_flight.items()):
            if not flight.acknowledged:
                self.metrics.batches_resent += 1
                self._cancel(flight)
                del self._in_flight[batch_id]

    def stop(self) -> None:
        # Work still in the spool's queue may fail after this: it is not
        # retried (a delivered batch not removed is sent again at the next
        # start, and the cloud stores it once).
        self._stopped = True
        for flight in self._in_flight.values():
            self._cancel(flight)
        for timer in (self._retry, self._linger):
            if timer is not None and timer.active():
                timer.cancel()

    def late_arrived(self, count: int) -> None:
        """
        C{count} readings became ready on their own, not with their round:
        a chunk arrived after its round closed, or a device's day is
        complete (C{[gateway] forward = "device"}).  They go with the batch
        that fills, or when the linger they start (or join) ends.
        """
        if self._late_linger <= 0:
            self.send_next()
            return
        self._late_readings += count
        if self._linger is None:
            self._linger = self._clock.callLater(self._late_linger, self._linger_ended)
        if self._late_readings >= self._batch_readings:
            self.send_next()

    def _linger_ended(self) -> None:
        self._linger = None
        self._late_readings = 0
        self.send_next()

    def send_next(self) -> None:
        """
        Ready readings may be waiting: fetch the next batch if the window has
        room.
        """
        if self._sender is None or len(self._in_flight) >= self._window or self._fetching:
            return
        if self._retry is not None and self._retry.active():
            return
        if any(flight.removal_failed for flight in self._in_flight.values()):
            # A fetch now would see the readings of the batch whose removal
            # failed and send them again; the retried removal calls
            # send_next once it succeeds.
            return
        self._fetching = True
        after = self._next_start()
        self._spool.take_batch(self._batch_readings, after).addCallbacks(
            self._send, self._take_failed, callbackArgs=(after,)
        )

    def _take_failed(self, failure) -> None:
        self._fetching = False
        delay = self._failures.failed(
            "taking a batch from the spool", "take_failures", failure, "no batch taken from the spool"
        )
        if self._stopped:
            return
        if self._retry is None or not self._retry.active():
            self._retry = self._clock.callLater(delay, self.send_next)

    def _next_start(self) -> int:
        """
        Where the next batch starts in the spool's ready order: after the
        newest batch still waiting for its acknowledgement.  An acknowledged batch needs
        no skipping: its removal was queued in the spool's database before
        any later fetch, which therefore no longer sees its readings; if
        that removal fails, no fetch starts until it is made again, and a
        fetch taken in its transaction is dropped (see L{_send}).  After
        a reconnection nothing waits, so the batches that lost their
        acknowledgement are sent again first.  A chunk made ready later is
        placed after every ready one (L{ISpool.take_batch}), so it is never
        behind the window; only a chunk a batch left out (it repeated a
        device and minute of the batch) waits for the window to drain.
        """
        return max((f.last for f in self._in_flight.values() if not f.acknowledged), default=0)

    def _send(self, spooled: SpooledBatch, after: int) -> None:
        self._fetching = False
        self._failures.succeeded("taking a batch from the spool")
        if any(flight.removal_failed for flight in self._in_flight.values()):
            # Taken in the transaction whose removal of an acknowledged
            # batch failed, so it may hold that batch's readings.
            return
        if not spooled.count:
            # The window moved while this fetch ran (a batch left it): what
            # lies before the new start has not been looked at yet.
            if after != self._next_start():
                self.send_next()
            return
        if self._sender is None or len(self._in_flight) >= self._window:
            return
        if self._linger is not None and not spooled.more and self._late_readings < self._batch_readings:
            # Days ready on their own are still arriving, and this batch
            # has room for more: wait for it to fill, at most until the
            # linger ends (which calls send_next).  A batch the next chunk
            # did not fit in (more) is full, though it may hold fewer than
            # batch_readings.
            return
        self._late_readings = max(0, self._late_readings - spooled.count)
        batch = wire.Batch(self._new_batch_id(), spooled.records)
        flight = _InFlight(batch, spooled.seqs, spooled.last, self._clock.seconds())
        flight.timer = self._clock.callLater(self._ack_timeout, self._ack_timed_out, flight)
        self._in_flight[batch.batch_id] = flight
        self.metrics.batches_sent += 1
        self.log.info(
            "forwarding batch {batch_id} of {count} readings to the cloud",
            batch_id=batch.batch_id,
            count=spooled.count,
        )
        self._sender.send(batch)
        if spooled.more and (self._linger is None or self._late_readings >= self._batch_readings):
            # Otherwise nothing more was ready, or only less than a batch
            # of days still lingering: what becomes ready says so (a round
            # closing, late_arrived, the linger's end, an acknowledgement),
            # rather than a fetch that would take a batch only to drop it.
            self.send_next()

    def ack_received(self, ack: wire.BatchAck) -> None:
        flight = self._in_flight.get(ack.batch_id)
        if flight is None or flight.acknowledged:
            self.metrics.stray_acks += 1
            self.log.warn("acknowledgement of unknown batch {batch_id}", batch_id=ack.batch_id)
            return
        self._cancel(flight)
        elapsed = (self._clock.seconds() - flight.sent_at) * 1000
        if ack.status != "ok" and refused_for_good(ack.reason):
            # Sent again, it would be refused again, and every batch behind
            # it would wait: it goes out of the way, kept in the spool file.
            self.metrics.batches_set_aside += 1
            flight.acknowledged = True
            flight.set_aside = ack.reason
            self._refusals.warn(
                "cloud",
                "the cloud refused batch {batch_id} for good: {reason}; its readings are set aside in the spool's "
                "refused table (docs/reliability.md)",
                batch_id=ack.batch_id,
                reason=ack.reason,
            )
            self._remove(flight)
            return
        if ack.status != "ok":
            self.metrics.batches_refused += 1
            del self._in_flight[ack.batch_id]
            # One retry for the whole window (a cloud whose disk is full
            # refuses every batch in flight), later after each refusal.
            if self._retry is None or not self._retry.active():
                delay = self._refused_backoff.next()
                if not self._stopped:
                    self._retry = self._clock.callLater(delay, self.send_next)
            else:
                delay = self._retry.getTime() - self._clock.seconds()
            # A few lines a minute, for the same reason.
            self._refusals.warn(
                "cloud",
                "the cloud refused batch {batch_id}: {reason}; its readings stay spooled, retry in {delay:g} s",
                batch_id=ack.batch_id,
                reason=ack.reason,
                delay=round(delay, 3),
            )
            return
        self._refused_backoff.reset()
        flight.acknowledged = True
        self.metrics.batches_acknowledged += 1
        self.metrics.batch_ack_seconds.observe(self._clock.seconds() - flight.sent_at)
        self.log.info(
            "batch {batch_id} acknowledged by the cloud after {ms:.1f} ms: {new} new, {dup} already stored",
            batch_id=ack.batch_id,
            ms=elapsed,
            new=ack.new,
            dup=ack.dup,
        )
        self._remove(flight)

    def _remove(self, flight: _InFlight) -> None:
        """
        Remove acknowledged C{flight}'s readings from the spool; it stays in
        the window until they are gone, so they are not taken again.
        """
        flight.timer = None
        if flight.set_aside is None:
            removed = self._spool.remove(flight.seqs)
        else:
            removed = self._spool.set_aside(flight.seqs, flight.set_aside, self._clock.seconds())
        removed.addCallbacks(self._removed, self._remove_failed, callbackArgs=(flight,), errbackArgs=(flight,))

    def _removed(self, count: int, flight: _InFlight) -> None:
        self._failures.succeeded("removing a delivered batch from the spool")
        flight.removal_failed = False
        del self._in_flight[flight.batch.batch_id]
        if flight.set_aside is None:
            self.metrics.readings_forwarded += count
            self._on_delivered(count)
        else:
            self.metrics.readings_set_aside += count
        self.send_next()

    def _remove_failed(self, failure, flight: _InFlight) -> None:
        flight.removal_failed = True
        delay = self._failures.failed(
            "removing a delivered batch from the spool", "remove_failures", failure,
            "batch {batch_id}, delivered, not removed from the spool", batch_id=flight.batch.batch_id,
        )
        if self._stopped:
            return
        flight.timer = self._clock.callLater(delay, self._remove, flight)

    def _ack_timed_out(self, flight: _InFlight) -> None:
        flight.timer = None
        self.metrics.ack_timeouts += 1
        self.log.warn(
            "batch {batch_id} not acknowledged within {t:g} s: reconnecting to the cloud",
            batch_id=flight.batch.batch_id,
            t=self._ack_timeout,
        )
        if self._sender is not None:
            self._sender.abort(
                f"batch {flight.batch.batch_id} not acknowledged within {self._ack_timeout:g} s ([gateway] ack_timeout)"
            )

    @staticmethod
    def _cancel(flight: _InFlight) -> None:
        if flight.timer is not None and flight.timer.active():
            flight.timer.cancel()
        flight.timer = None


@attrs.define
class _InFlight:
    batch: wire.Batch
    seqs: tuple[int, ...]
    #: Its last chunk's place in the spool's ready order.
    last: int
    sent_at: float
    timer: object = None
    acknowledged: bool = False
    #: Its removal from the spool failed and waits for a retry.
    removal_failed: bool = False
    #: Why the cloud refused it for good, if it did: it is set aside, not
    #: removed.
    set_aside: str | None = None
