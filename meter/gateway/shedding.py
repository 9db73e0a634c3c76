"""
Load shedding: when more devices report than the gateway can take, it
answers the chunks of new transfers C{busy} with a retry-after hint, early
and cheaply (before they are decoded), while the transfers already under
way go on, so the days it has begun complete and the load it takes stays
near its capacity instead of collapsing under retransmissions.

The signal is the time each datagram waited in the kernel's receive queue
(its sojourn), from the kernel's receive timestamp (C{SO_TIMESTAMPNS},
read with C{recvmsg} by L{meter.stamps.StampedPort}), controlled as CoDel controls a
router's queue (Nichols and Jacobson, RFC 8289): a queue whose sojourn
stays above C{target} for a whole C{interval} is a standing queue, the
gateway is over its capacity, and it sheds until a datagram's sojourn falls
below C{target} again.  A short burst, which the queue absorbs, never
sheds.  docs/performance.md says why this signal and what it costs.

The hint is a slot on a calendar: each chunk answered busy reserves the
time the gateway takes for one chunk at the rate it was measured to commit
chunks (per CPU second), so the devices it sends away come back spread at
that rate, not all at once, and a device back at its slot is let in even
while the gateway still sheds.  The device adds its own jitter.

Everything here takes the time as an argument: the controller is a pure
function of the datagrams' times and the CPU time it is given (tests drive
it with made-up ones).
"""

from __future__ import annotations

import math
import time
from typing import Callable

from twisted.application.internet import UDPServer
from twisted.logger import Logger

from meter.gateway.metrics import GatewayMetrics
from meter.stamps import StampedPort, stamps_available

#: The shortest hint: a device sent away comes back no sooner, so a flapping
#: controller does not draw its chunks back at once.
MIN_HINT = 0.5
#: The rate (chunks a second) hints are sized by until the gateway has
#: measured its own.
INITIAL_RATE = 1000.0
#: The lowest rate hints are sized by: a gateway measured nearly stalled
#: must not promise slots it cannot keep.
MIN_RATE = 50.0
#: The weight of the latest interval in the measured rate.
RATE_WEIGHT = 0.3
#: The fewest chunks committed in an interval for it to measure the rate.
MIN_CHUNKS = 10
#: Seconds without shedding that end an overload period (one log line at
#: its start and one at its end, however often the controller flaps).
QUIET = 5.0


class Shedding:
    """
    The shedding controller of one gateway.

    @ivar shedding: whether new transfers are answered busy now.
    @ivar queue_delay: the least sojourn of the last full interval, seconds:
        the standing queue (0 while the queue empties).
    @ivar rate: the chunks the gateway commits a CPU second, as measured
        (L{INITIAL_RATE} until it has been): what it can take a second
        with a core of its own.
    """

    log = Logger()

    def __init__(
        self,
        metrics: GatewayMetrics,
        target: float = 0.1,
        interval: float = 0.1,
        max_hint: float = 60.0,
        log: Logger | None = None,
        enabled: bool = True,
        cpu: Callable[[], float] = time.process_time,
    ):
        """
        @param enabled: whether the gateway sheds at all; if not, it only
            measures its queue, and its backstop answers busy without a
            hint, as before shedding existed.
        @param cpu: the process's CPU seconds so far, read once an interval:
            the rate is the chunks committed per CPU second.
        """
        self._metrics = metrics
        self._cpu = cpu
        self.enabled = enabled
        self.target = target
        self.interval = interval
        self.max_hint = max_hint
        if log is not None:
            self.log = log
        self.shedding = False
        #: Whether transfers let in are noted (see L{opened}): from the
        #: first datagram over target to the end of an overload period.
        self.alert = False
        self.queue_delay = 0.0
        self.rate = INITIAL_RATE
        #: When the sojourn went above target and stayed there, or None.
        self._above_since: float | None = None
        #: The interval being measured: its end, its least sojourn, and the
        #: chunks committed when it began.
        self._interval_end: float | None = None
        self._interval_start = 0.0
        self._least = math.inf
        self._chunks_before = 0
        self._cpu_before = 0.0
        #: The next free slot of the calendar (see the module's doc).
        self._next_slot = 0.0
        #: When each device sent away may come back, by device id.
        self._due: dict[int, float] = {}
        #: Transfers let in lately, as (device id, xfer), in two
        #: generations swapped every L{GENERATION} seconds: what tells a
        #: transfer under way whose first chunk is still being committed.
        self._opened: set[tuple[int, str]] = set()
        self._opened_before: set[tuple[int, str]] = set()
        self._generation_end = 0.0
        #: The overload period being logged: its start and the counts then.
        self._period_start: float | None = None
        self._period_counts = (0, 0)
        self._stopped_at = 0.0

    #: Seconds a transfer let in counts as under way without its chunk
    #: committed: far longer than a commit takes even at the backstop.
    GENERATION = 10.0

    # -- every datagram ---------------------------------------------------------

    def observe(self, now: float, sojourn: float) -> None:
        """
        A datagram was read at C{now} after waiting C{sojourn} seconds in
        the kernel's queue.
        """
        if sojourn < self._least:
            self._least = sojourn
        if self._interval_end is None or now >= self._interval_end:
            self._next_interval(now)
        if sojourn < self.target:
            if self._above_since is not None:
                self._above_since = None
                if self.shedding:
                    self.shedding = False
                    self._stopped_at = now
                self.alert = self._period_start is not None
            return
        if self._above_since is None:
            self._above_since = now
            self.alert = True
        elif not self.shedding and now - self._above_since >= self.interval and self.enabled:
            self._start(now)

    def tick(self, now: float) -> None:
        """
        Time passes without datagrams, perhaps: close the interval due, so
        the gauges and the log follow a gateway that went quiet.
        """
        if self._interval_end is not None and now >= self._interval_end:
            self._next_interval(now)

    def opened(self, now: float, device_id: int, xfer: str) -> None:
        """
        A chunk of transfer C{xfer} of C{device_id} was let in while
        L{alert}: its transfer is under way from now on, even before the
        chunk is committed (and its transfer known to the reassembly).

        Only noted while alert: a chunk let in before the queue first stood
        over target is committed long before shedding can start, an
        interval later, so the gateway keeps nothing of this kind in normal
        operation.
        """
        if now >= self._generation_end:
            self._opened_before = self._opened
            self._opened = set()
            self._generation_end = now + self.GENERATION
        self._opened.add((device_id, xfer))

    def under_way(self, key: tuple[int, str]) -> bool:
        """
        Whether transfer C{key} was let in lately (see L{opened}).
        """
        return key in self._opened or key in self._opened_before

    def shed(self, now: float, device_id: int, sojourn: float) -> int | None:
        """
        A chunk of a new transfer of C{device_id} arrived while shedding:
        the hint to answer it busy with, in whole milliseconds, or None if
        it is let in (its device is back at the slot it was given, and the
        queue is not twice the target long).
        """
        due = self._due.get(device_id)
        if due is not None and due <= now and sojourn < 2 * self.target:
            del self._due[device_id]
            self._metrics.shed_returned += 1
            return None
        slot = max(self._next_slot, now + max(MIN_HINT, sojourn))
        self._next_slot = slot + 1.0 / self.rate
        hint = min(slot - now, self.max_hint)
        self._due[device_id] = now + hint
        self._metrics.shed += 1
        return math.ceil(hint * 1000)

    def hint(self, now: float) -> int | None:
        """
        The hint, in whole milliseconds, for a chunk answered busy by the
        backstop (too many chunks wait for their commit): the wait the
        calendar holds, at least L{MIN_HINT}; None if shedding is off.
        """
        if not self.enabled:
            return None
        return math.ceil(min(max(self._next_slot - now, MIN_HINT), self.max_hint) * 1000)

    # -- the controller ------------------------------------------------------------

    def _start(self, now: float) -> None:
        self.shedding = True
        self._metrics.shed_episodes += 1
        if self._period_start is None:
            self._period_start = now
            self._period_counts = (self._metrics.shed, self._metrics.shed_returned)
            self.log.warn(
                "SHEDDING LOAD: datagrams waited over {target:g} ms in the receive queue for {interval:g} ms; "
                "chunks of new transfers are answered busy with a retry-after hint (transfers under way go on)",
                target=self.target * 1000,
                interval=self.interval * 1000,
                queue_delay=self.queue_delay,
            )

    def _next_interval(self, now: float) -> None:
        """
        Close the interval being measured: its least sojourn is the queue
        delay, and the chunks committed in it against the CPU time spent
        measure the gateway's rate.

        Per CPU second, not per second: the chunks committed a second
        measure the rate only while the gateway is saturated, and while it
        sheds, what it commits is what it let in, not what it could take; a
        rate measured low would leave it idle while the devices it sent
        away wait for their slots.  The CPU time also covers the shed
        datagrams and the forwarding, so it errs low by their share.
        """
        chunks = self._metrics.chunks
        cpu = self._cpu()
        if self._interval_end is not None:
            if self._least == math.inf:
                # Not a datagram in the interval: no queue.
                self.queue_delay = 0.0
                self._above_since = None
                if self.shedding:
                    self.shedding = False
                    self._stopped_at = now
            else:
                self.queue_delay = self._least
            committed, spent = chunks - self._chunks_before, cpu - self._cpu_before
            if committed >= MIN_CHUNKS and spent > 0:
                measured = max(MIN_RATE, committed / spent)
                self.rate += RATE_WEIGHT * (measured - self.rate)
        self._interval_start = now
        self._interval_end = now + self.interval
        self._least = math.inf
        self._chunks_before = chunks
        self._cpu_before = cpu
        if not self.shedding:
            if self._due and now >= self._next_slot:
                # Every slot given has passed: whoever did not come back
                # comes as a new transfer.
                self._due.clear()
            if self._period_start is not None and now - self._stopped_at >= QUIET:
                self._period_ended(now)
                self.alert = self._above_since is not None
                self._opened, self._opened_before = set(), set()

    def _period_ended(self, now: float) -> None:
        shed_before, returned_before = self._period_counts
        self.log.info(
            "stopped shedding load after {seconds:.1f} s: {shed} chunks answered busy with a hint, "
            "{returned} let in back at their slot; the gateway commits {rate:.0f} chunks a CPU second",
            seconds=self._stopped_at - self._period_start,
            shed=self._metrics.shed - shed_before,
            returned=self._metrics.shed_returned - returned_before,
            rate=self.rate,
        )
        self._period_start = None

    def stats_gauges(self) -> dict[str, int]:
        """
        What the stats line shows of the controller, as whole numbers.
        """
        return {
            "shedding": int(self.shedding),
            "queue_delay_ms": round(self.queue_delay * 1000),
            "shed_rate": round(self.rate),
        }

    def gauges(self, now: float) -> dict[str, float]:
        """
        What /metrics shows of the controller.
        """
        return {
            "shedding": int(self.shedding),
            "queue_delay_seconds": self.queue_delay,
            "hint_seconds": max(0.0, self._next_slot - now) if self.shedding else 0.0,
            "rate": self.rate,
            "devices_sent_away": len(self._due),
        }


# -- the kernel's receive timestamps ---------------------------------------------


class StampedUDPServer(UDPServer):
    """
    A L{UDPServer} whose port is a L{StampedPort}, on a reactor that can
    (Linux, a reactor with file descriptors); elsewhere a plain port, and
    the gateway then sheds only at its backstop.
    """

    def _getPort(self):
        from twisted.internet import reactor as default

        reactor = self.reactor or default
        port, protocol = self.args
        if not stamps_available(reactor):
            return reactor.listenUDP(port, protocol, **self.kwargs)
        listening = StampedPort(port, protocol, reactor=reactor, **self.kwargs)
        listening.startListening()
        return listening

