"""
Each day's round: open from the day's first report until every expected
device has reported or its deadline passes; then closed, in memory and in
the spool, and its readings may leave for the cloud.  With C{[gateway]
forward = "device"} a device's day may leave before that, as soon as its
transfer is complete; the round still closes and names the missing devices.
"""

from __future__ import annotations

import datetime
from typing import Callable

import attrs
from twisted.logger import Logger, LogLevel

from meter import wire
from meter.gateway.interfaces import ISpool
from meter.gateway.metrics import GatewayMetrics
from meter.gateway.spool import StoredRound
from meter.ratelimit import LimitedLines, PerSource
from meter.retry import Failures

#: The lines saying that a device reported a round's day: this many at once,
#: then this many a second, each saying how many were left out before it.
#: A fleet of any size reporting over minutes has each device's line; one
#: reporting at once (100,000 devices in a minute) would spend a sixth of the
#: gateway's CPU on them (a log event costs as much as the rest of a
#: datagram's handling) and fill its log, for what the round's count and its
#: closing line (every device, or the devices missing) say as well.
REPORTED_LINES_BURST = 200
REPORTED_LINES_RATE = 20.0
#: Seconds between two releases of the open rounds by a full spool: each is
#: a transaction, and the chunks refused meanwhile ask for one each.
RELEASE_EVERY = 1.0
#: The most chunks one release makes ready: a transaction on the reactor
#: thread, which held it 0.7-1.1 s for a whole 5,000,000-reading spool
#: (52,000 chunks).  This many a second outpaces any cloud.
RELEASE_CHUNKS = 5000
#: The most chunks one transaction makes ready as a round closes (see
#: L{ISpool.close_round}); the rest follow in transactions of as many, each
#: in a reactor turn of its own.  A 100,000-device round (200,000 chunks)
#: closed in one transaction holds the reactor thread ~2 s, while its
#: datagrams wait and devices are answered busy; a slice of this many
#: takes under 20 ms (bench/close_cost.py).
CLOSE_CHUNKS = 1000


@attrs.define
class Round:
    """
    One day's collection: open from the day's first report until every
    expected device has reported or the deadline passes.
    """

    day: datetime.date
    opened_at: float
    closed: bool = False
    reported: set[int] = attrs.Factory(set)
    timer: object = None
    #: When it closed, on the gateway's clock: it is forgotten some time
    #: later (see L{Rounds.forget_before}).
    closed_at: float | None = None


class Rounds:
    """
    The rounds the gateway holds, by day, and their deadlines.

    @param on_ready: called when a round is closed in the spool: its
        readings may leave.
    @param on_late: called with the number of readings of a chunk spooled
        under a round closed already: they may leave.
    @param on_closed: called when a round closes, in memory (the gateway
        then forgets what is old).
    @param report: logs a line about what a device sends again, rate-limited
        per device.
    @param forward: C{"round"}: a day's readings leave when its round
        closes; C{"device"}: each device's as soon as its transfer is
        complete (made ready in the spool, then L{on_late} is called with
        their number), and the rest when the round closes.
    """

    def __init__(
        self,
        fleet: dict[int, str],
        spool: ISpool,
        clock,
        deadline: float,
        metrics: GatewayMetrics,
        log: Logger,
        on_ready: Callable[[], None],
        on_late: Callable[[int], None],
        on_closed: Callable[[], None],
        report: Callable[..., None],
        max_retry_delay: float = 30.0,
        forward: str = "round",
    ):
        self._fleet = fleet
        self._spool = spool
        self._clock = clock
        self._deadline = deadline
        self._metrics = metrics
        self.log = log
        self._on_ready = on_ready
        self._on_late = on_late
        self._on_closed = on_closed
        self._report = report
        self._each_device = forward == "device"
        self._reported_lines = LimitedLines(
            log, clock, REPORTED_LINES_RATE, REPORTED_LINES_BURST, LogLevel.info, "lines of devices reporting left out"
        )
        self._late_lines = PerSource(clock, REPORTED_LINES_RATE, REPORTED_LINES_BURST)
        self.rounds: dict[datetime.date, Round] = {}
        #: Rounds closed in memory whose close the spool has not taken yet,
        #: or whose chunks it has not all made ready yet: day -> the timer
        #: of the next attempt.
        self._closing: dict[datetime.date, object] = {}
        self._stopped = False
        self._failures = Failures(self, clock, metrics, max_retry_delay)
        #: Devices of the fleet missing from the round closed last (0
        #: until one closes in this process).
        self.last_closed_missing = 0
        #: When the open rounds were last released by a full spool, and
        #: whether that release is being committed.
        self._released_at: float | None = None
        self._releasing = False
        self._released_lines = LimitedLines(log, clock, 1 / 6, 3, LogLevel.warn, "similar lines left out")

    def open(self, day: datetime.date, device_id: int) -> None:
        """
        Open C{day}'s round, at its first report (by C{device_id}).
        """
        round_ = self.rounds[day] = Round(day, self._clock.seconds())
        self.log.info("round {day} opened by device {device}", day=day, device=device_id)
        self._arm(round_)

    def chunk_arrived(self, chunk: wire.DayChunk, peer: str, complete: bool) -> None:
        """
        C{chunk} is committed, and its transfer C{complete} or not: its
        device may have reported its day, and the round may close.
        """
        round_ = self.rounds.get(chunk.day)
        if round_ is None:
            # Its round, closed long ago, was forgotten (as another round
            # closed) while this chunk was being committed: its readings are
            # spooled under a closed round, so they may go.
            self._on_late(chunk.count)
            return
        if not complete:
            if round_.closed:
                # Its readings are spooled under a closed round: they may go.
                self._on_late(chunk.count)
            return
        # One line a device a day, what the report's gateway printed for
        # each device (each datagram only with log_datagrams).
        reported = {"device": chunk.device_id, "peer": peer, "day": chunk.day, "parts": chunk.parts}
        if round_.closed:
            self._metrics.late_devices += 1
            # A few a device, and at most as many in all as the reports on
            # time: a fleet that overflowed the spool reports late by the
            # thousand (the counter counts each).
            if self._late_lines.allow(chunk.day):
                self._report(
                    chunk.device_id,
                    "late device {device} ({peer}) reported {day} in {parts} chunks after its round closed: "
                    "forwarding its readings now",
                    **reported,
                )
            self._on_late(chunk.count)
            return
        if self._each_device:
            self._ready([(chunk.device_id, chunk.day)])
        if chunk.device_id in round_.reported:
            self._report(chunk.device_id, "device {device} ({peer}) reported {day} again in {parts} chunks", **reported)
            return
        round_.reported.add(chunk.device_id)
        self._reported_lines.line(
            chunk.day,
            "device {device} ({peer}) reported {day} in {parts} chunks: {n} of {total} devices",
            n=len(round_.reported),
            total=len(self._fleet),
            **reported,
        )
        if self._everyone_reported(round_):
            self._close(round_, "every expected device reported")

    def set_fleet(self, fleet: dict[int, str]) -> None:
        """
        Expect C{fleet} from now on (a reload).  An open round keeps its
        deadline and the devices that reported; a device added reports into
        it like the others.  A round that waited only for devices removed
        closes at once, complete: they are no longer expected, and the
        readings of those that reported need not wait out the deadline for
        a device that will never be counted.
        """
        self._fleet = fleet
        # A copy: closing a round forgets old rounds.
        for round_ in list(self.rounds.values()):
            if not round_.closed and self._everyone_reported(round_):
                self._close(round_, "every expected device reported (the fleet was reloaded)")

    def recover(self, stored: tuple[StoredRound, ...], complete) -> None:
        """
        Resume the rounds the spool holds, with the devices that reported
        (C{complete}: the device and day of each complete transfer): open
        rounds get their deadline back, closing at once if it passed while
        the gateway was down.
        """
        for round_ in stored:
            self.rounds[round_.day] = Round(
                round_.day, round_.opened_at, closed=round_.closed_at is not None, closed_at=round_.closed_at
            )
        ready = []
        for device_id, day in complete:
            round_ = self.rounds.get(day)
            if round_ is not None:
                round_.reported.add(device_id)
                if not round_.closed:
                    ready.append((device_id, day))
        if self._each_device and ready:
            # Made ready already unless the gateway stopped between a
            # transfer's last chunk and the spool's taking that: once more
            # is a no-op for the others.
            self._ready(ready)
        # A copy: closing a round forgets old rounds.
        for round_ in list(self.rounds.values()):
            if round_.closed:
                # Its chunks are made ready a slice at a time: the gateway
                # may have stopped between two slices.
                self._close_in_spool(round_.day, round_.closed_at, first=False)
            else:
                self.log.info(
                    "resuming open round {day}: {n} of {total} devices reported",
                    day=round_.day,
                    n=len(round_.reported),
                    total=len(self._fleet),
                )
                if self._everyone_reported(round_):
                    self._close(round_, "every expected device reported")
                else:
                    self._arm(round_)

    def forget_before(self, now: float, cutoff: float, admissible: datetime.date | None) -> None:
        """
        Forget the rounds closed before C{cutoff} whose day is before
        C{admissible}, the first a chunk taken now may name (None: any day
        may be named).

        A closed round is kept while a chunk of its day can still be taken:
        a late chunk then finds its round closed and is forwarded, where a
        round made anew would wait for a deadline and report every device
        missing.
        """
        for day, round_ in list(self.rounds.items()):
            if not round_.closed:
                continue
            if round_.closed_at is None:
                # Closed since the last pass (closing does not stamp it).
                round_.closed_at = now
            elif round_.closed_at < cutoff and (admissible is None or day < admissible):
                del self.rounds[day]

    def stop(self) -> None:
        for round_ in self.rounds.values():
            if round_.timer is not None and round_.timer.active():
                round_.timer.cancel()
        # A close not yet in the spool is not lost: the next start finds the
        # round open past its deadline (or complete) and closes it again.
        self._stopped = True
        for retry in self._closing.values():
            if retry.active():
                retry.cancel()
        self._closing.clear()

    def _ready(self, devices: list[tuple[int, datetime.date]]) -> None:
        """
        Make the days of C{devices} ready in the spool, then have them sent.
        A failure only delays them: they leave when their round closes,
        which makes every chunk of its day ready, and a restart makes the
        complete transfers ready again.
        """
        self._spool.devices_ready(devices).addCallbacks(self._made_ready, self._ready_failed)

    def _made_ready(self, count: int) -> None:
        self._failures.succeeded("making a device's day ready")
        if count:
            self._on_late(count)

    def _ready_failed(self, failure) -> None:
        self._failures.failed(
            "making a device's day ready", "ready_failures", failure,
            "a device's day not made ready in the spool: it leaves when its round closes", retried=False,
        )

    def spool_full(self) -> None:
        """
        The spool refused a chunk for want of room.  Room is made only as
        readings leave for the cloud, and a round's wait for them until it
        closes, a minute of refusals for a fleet that overflows the spool,
        so the readings of the open rounds leave now, L{RELEASE_CHUNKS}
        chunks at a time, at most once a L{RELEASE_EVERY}: their rounds
        stay open and close as they would.
        """
        now = self._clock.seconds()
        if self._stopped or self._releasing or (
            self._released_at is not None and now - self._released_at < RELEASE_EVERY
        ):
            return
        days = sorted(day for day, round_ in self.rounds.items() if not round_.closed)
        if not days:
            return
        self._releasing, self._released_at = True, now
        self._spool.days_ready(days, RELEASE_CHUNKS).addCallbacks(
            self._released, self._release_failed, callbackArgs=(days,)
        )

    def _released(self, count: int, days: list[datetime.date]) -> None:
        self._releasing = False
        self._failures.succeeded("forwarding the open rounds")
        if count:
            self._metrics.rounds_released += 1
            # A release a second while the spool stays full: a few lines, then
            # one every few seconds, with the count of the others.
            self._released_lines.line(
                None,
                "spool full: forwarding {count} readings it holds of the open rounds ({days}) "
                "before they close, to make room",
                count=count,
                days=", ".join(day.isoformat() for day in days),
            )
            self._on_late(count)

    def _release_failed(self, failure) -> None:
        self._releasing = False
        self._failures.failed(
            "forwarding the open rounds", "ready_failures", failure,
            "the open rounds' readings not made ready in the spool: asked again while it is full", retried=False,
        )

    def _everyone_reported(self, round_: Round) -> bool:
        # Counting first: comparing the sets costs as much as the fleet is
        # large, and this is asked each time a device reports.
        return len(round_.reported) >= len(self._fleet) and self._fleet.keys() <= round_.reported

    def _arm(self, round_: Round) -> None:
        delay = max(0.0, round_.opened_at + self._deadline - self._clock.seconds())
        round_.timer = self._clock.callLater(delay, self._deadline_passed, round_)

    def _deadline_passed(self, round_: Round) -> None:
        round_.timer = None
        if not round_.closed:
            self._close(round_, f"deadline of {self._deadline:g} s passed")

    def _close(self, round_: Round, why: str) -> None:
        round_.closed = True
        if round_.timer is not None and round_.timer.active():
            round_.timer.cancel()
        round_.timer = None
        missing = sorted(self._fleet.keys() - round_.reported)
        self.last_closed_missing = len(missing)
        if missing:
            self._metrics.rounds_incomplete += 1
            self.log.warn(
                "round {day} closed: {why}; devices that did not report: {missing}",
                day=round_.day,
                why=why,
                missing=", ".join(f"{d} ({self._fleet[d]})" for d in missing),
            )
        else:
            self.log.info("round {day} complete: {why}", day=round_.day, why=why)
        self._metrics.rounds_closed += 1
        self._close_in_spool(round_.day, self._clock.seconds())
        self._on_closed()

    def _close_in_spool(self, day: datetime.date, at: float, first: bool = True) -> None:
        """
        Close C{day}'s round in the spool, retrying until the spool takes it.

        The round stays closed in memory meanwhile: the decision is made
        (its deadline passed, or every device reported) and is not taken
        twice.  Its readings cannot leave early, as only a round closed in
        the spool is forwarded, and a restart before the spool took the
        close finds the round open and closes it again for the same reason.
        A large round's chunks are made ready a slice at a time, each slice
        closing it again (C{first} is False for those); a restart between
        two finds it closed and closes it again at its stored time.  The
        first close wakes the uplink whatever it made ready (with
        C{forward = "device"} the days may be ready already and a batch
        lingering), the later ones only if they made some ready.
        """
        pending = self._closing.pop(day, None)
        if pending is not None and pending.active():
            pending.cancel()
        if self._stopped:
            return
        self._spool.close_round(day, at, CLOSE_CHUNKS).addCallbacks(
            self._closed_in_spool, self._close_failed, callbackArgs=(day, at, first), errbackArgs=(day, at)
        )

    def _closed_in_spool(self, count: int, day: datetime.date, at: float, first: bool = True) -> None:
        self._failures.succeeded("closing a round")
        if self._stopped:
            return
        if first or count:
            self._on_ready()
        if count:
            # Chunks of the day may be left: closing again (the round keeps
            # its time) makes the next slice ready, in a transaction of its
            # own, until one finds none.
            self._close_in_spool(day, at, first=False)

    def _close_failed(self, failure, day: datetime.date, at: float) -> None:
        delay = self._failures.failed(
            "closing a round", "close_failures", failure,
            "round {day} not closed in the spool, or not all of its readings made ready: not forwarded yet",
            day=day,
        )
        if self._stopped:
            return
        self._closing[day] = self._clock.callLater(delay, self._close_in_spool, day, at)

