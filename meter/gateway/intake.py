"""
The intake: what each device chunk gets, from its admission to its answer
once it is durable, and what the gateway remembers and forgets of it.  The
jobs are each an object of its own, all on one clock: L{Admission} (the
rules, and the message ids), L{Reassembly} (the chunks of each transfer),
L{Rounds} (each day's round and its deadline); the intake passes a chunk
from one to the next, resumes them from what the spool holds after a
restart, and forgets with them what is old.
"""

from __future__ import annotations

import gc
from typing import Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger, LogLevel

from meter import wire
from meter.gateway.admission import Admission, admissible_from
from meter.gateway.interfaces import ISpool
from meter.gateway.metrics import GatewayMetrics
from meter.gateway.reassembly import Reassembly
from meter.gateway.rounds import Rounds
from meter.gateway.spool import Recovered, chunk_digest, content_digest
from meter.ratelimit import LimitedLines
from meter.retry import Failures

#: How long (seconds, on the gateway's clock) the gateway remembers a
#: device's day after its last chunk arrived (its message ids, so a duplicate
#: is recognised, and what it counts against the device's daily bounds) and
#: a round after it closed: a device retries for about a minute, so two days
#: is ample.
REMEMBER = 2 * 86400.0


#: Passes of the cyclic collector's middle generation between two full
#: passes (CPython's default is 10; a middle pass comes every 10 young ones).  A full pass stalls the reactor for as long as
#: it scans, and the gateway's large dicts (its message ids, the devices'
#: books) are scanned whole by each, tens of milliseconds at 100,000 devices;
#: the intake makes no cyclic garbage of its own, so full passes are made
#: rare, not stopped: what does become cyclic garbage is still collected.
FULL_COLLECTION_EVERY = 100


def settle_collector() -> None:
    """
    Set the cyclic garbage collector for a gateway that has started: what
    exists now (the modules, the state recovered from the spool) lives as
    long as the process, so it leaves the collector's passes (C{gc.freeze}),
    and full passes come every L{FULL_COLLECTION_EVERY} young ones.
    """
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


class Intake:
    """
    Decides what each device chunk gets, and when a day's round closes.

    @param fleet: device id -> device address, the devices expected each day.
    @param on_ready: called when readings may have become ready to forward.
    @param on_late: called with the number of readings of a chunk that arrived
        after its round closed (default: L{on_ready} is called).
    @param max_retry_delay: the longest wait, in seconds, before a failed
        spool transaction (closing a round) is tried again.
    @param log: where the intake's lines go (by default its own logger).
    @param metrics: what the intake counts into (the role's, shared with the
        uplink and the protocols; by default its own).
    @param forward: when a day's readings may leave (L{Rounds}): C{"round"}
        or C{"device"} (C{on_late} is then called as each device's day is
        ready).
    """

    log = Logger()

    def __init__(
        self,
        fleet: dict[int, str],
        spool: ISpool,
        clock,
        deadline: float,
        on_ready: Callable[[], None],
        on_late: Callable[[int], None] | None = None,
        max_retry_delay: float = 30.0,
        spool_limit: int | None = None,
        check_source: bool = False,
        replay_window: float | None = None,
        reassembly_timeout: float | None = None,
        max_reassemblies: int | None = None,
        max_committing: int = 2000,
        max_transfers_per_day: int = 24,
        max_parts_per_day: int = 4096,
        remember: float = REMEMBER,
        log: Logger | None = None,
        metrics: GatewayMetrics | None = None,
        forward: str = "round",
        max_hint: float | None = 60.0,
    ):
        """
        @param max_hint: the longest retry-after hint a full spool gives,
            in seconds (None: it gives none).
        """
        if log is not None:
            self.log = log
        self._spool = spool
        self._clock = clock
        self._remember = remember
        self._replay_window = replay_window
        self._on_ready = on_ready
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        #: Lines about what devices send again: a few a device, then one a
        #: minute with a count (see L{_report}).
        self._report_lines = LimitedLines(
            self.log, clock, 1 / 60, 5, LogLevel.info, "similar lines about this device left out"
        )
        self.reassembly = Reassembly(clock, self.metrics, self.log, reassembly_timeout, max_reassemblies)
        self.admission = Admission(
            fleet, spool, clock, self.reassembly, self.metrics, self.log, self._report,
            check_source=check_source,
            replay_window=replay_window,
            spool_limit=spool_limit,
            max_committing=max_committing,
            max_transfers_per_day=max_transfers_per_day,
            max_parts_per_day=max_parts_per_day,
            # Rounds is made next; a full spool is only met later.
            on_spool_full=lambda: self.rounds.spool_full(),
            max_hint=max_hint,
        )
        self.rounds = Rounds(
            fleet, spool, clock, deadline, self.metrics, self.log,
            on_ready=on_ready,
            on_late=on_late if on_late is not None else lambda count: on_ready(),
            on_closed=self._forget_old,
            report=self._report,
            max_retry_delay=max_retry_delay,
            forward=forward,
        )
        #: The rounds by day, looked up for every chunk.
        self._rounds = self.rounds.rounds
        self._forget_retry = None
        self._stopped = False
        self._failures = Failures(self, clock, self.metrics, max_retry_delay)

    def set_fleet(self, fleet: dict[int, str]) -> None:
        """
        Expect C{fleet} (device id -> address) from the next chunk on: an
        open round goes on, now waiting for the devices of C{fleet}, and
        one left waiting only for removed devices closes as complete (see
        L{Rounds.set_fleet}).
        """
        self.admission.set_fleet(fleet)
        self.rounds.set_fleet(fleet)

    # -- start and stop ------------------------------------------------------

    def recover(self, state: Recovered) -> None:
        """
        Resume from what the spool holds: the message ids and each device's
        days, the transfers in reassembly, the rounds (open ones get their
        deadline back, closing at once if it passed while the gateway was
        down).
        """
        self.admission.recover(state.chunks)
        self.reassembly.recover(state.chunks)
        self.rounds.recover(state.rounds, self.reassembly.complete())
        self.log.info(
            "spool holds {depth} readings, {rounds} rounds, {ids} message ids",
            depth=state.depth,
            rounds=len(self.rounds.rounds),
            ids=len(self.admission.acknowledged),
        )
        if state.depth:
            self._on_ready()

    def stop(self) -> None:
        self.rounds.stop()
        self.reassembly.stop()
        self._stopped = True
        if self._forget_retry is not None and self._forget_retry.active():
            self._forget_retry.cancel()
        self._forget_retry = None

    def gauges(self) -> dict[str, int]:
        """
        What the intake holds now, for the periodic stats line: the spool's
        depth, the transfers in reassembly, the message ids and the devices'
        days remembered, and the devices missing from the last round closed.
        """
        return {
            "spool_depth": self._spool.depth,
            "reassemblies": len(self.reassembly.incomplete),
            "message_ids": len(self.admission.acknowledged),
            "device_days": len(self.admission.days),
            "round_devices_missing": self.rounds.last_closed_missing,
        }

    # -- a chunk arrives -----------------------------------------------------

    def chunk_received(self, chunk: wire.DayChunk, peer: str, body: bytes | None = None) -> Deferred:
        """
        Handle one device chunk; the Deferred fires with the L{wire.DayAck}
        to send back (C{ok} only once the chunk is durable).

        @param body: the unsealed datagram the chunk was decoded from, if
            it was: the decoder takes only the canonical text, so its digest
            is the chunk's content digest, without encoding the chunk again.
        """
        digest = content_digest(body) if body is not None else chunk_digest(chunk)
        answer = self.admission.admit(chunk, peer, digest)
        if answer is not None:
            return answer
        round_ = self._rounds.get(chunk.day)
        # Every chunk makes sure its round is in the spool (INSERT OR IGNORE),
        # as the gateway knows it: if the write of the day's first chunk
        # failed, the round exists in memory only; a round closed long ago
        # may be forgotten by the spool and not by the gateway.  Either way
        # its readings would otherwise never leave the spool.
        # maybeDeferred: the chunk counts as being committed already, so
        # even a spool that raises at once must reach _not_committed.
        d = maybeDeferred(
            self._spool.add_chunk,
            chunk, self._clock.seconds(), round_closed=round_ is not None and round_.closed, digest=digest,
        )
        if round_ is None:
            self.rounds.open(chunk.day, chunk.device_id)
        return d.addCallbacks(self._committed, self._not_committed, callbackArgs=(chunk, peer), errbackArgs=(chunk,))

    def _committed(self, new: int, chunk: wire.DayChunk, peer: str) -> wire.DayAck:
        ack = wire.DayAck(chunk.xfer, chunk.part, "ok")
        try:
            self._failures.succeeded("spooling a chunk")
            self.admission.acknowledge(chunk)
            self.metrics.chunks += 1
            self.metrics.readings += new
            complete = self.reassembly.chunk_arrived(chunk)
            if complete and chunk.parts > 1:
                self.admission.transfer_complete(chunk.device_id, chunk.xfer)
            self.rounds.chunk_arrived(chunk, peer, complete)
        except BaseException:
            # The chunk is durable, whatever failed after: the duplicates
            # waiting for its commit are answered ok, and it stops counting
            # as being committed.  The fault itself goes on to the caller
            # (the protocol counts and logs it; the device sends the chunk
            # again and is answered from the admission's record).
            self.admission.answer(chunk, ack)
            raise
        return self.admission.answer(chunk, ack)

    def _not_committed(self, failure, chunk: wire.DayChunk) -> wire.DayAck:
        # Before the answer is made: the chunk gives back what it took of
        # its device's day and transfer.
        self.admission.not_committed(chunk)
        # The device keeps the chunk and sends it again: nothing to retry here.
        self._failures.failed(
            "spooling a chunk", "spool_failures", failure, "device {device}: chunk not spooled, answered busy", retried=False,
            device=chunk.device_id,
        )
        return self.admission.answer(chunk, wire.DayAck(chunk.xfer, chunk.part, "busy", "spool: write failed"))

    def _report(self, device_id: int, format: str, **fields) -> None:
        """
        Log a line about what a device sends again (a duplicate, its day
        again, late), at most a few a device and then one a minute, saying
        how many were left out: a device may send its day as often as its
        bounds allow, and the log must not grow with it.
        """
        self._report_lines.line(device_id, format, **fields)

    # -- memory --------------------------------------------------------------

    def _forget_old(self) -> None:
        """
        Bound memory and the spool: drop the rounds closed, and the devices'
        days last heard from, more than L{REMEMBER} seconds ago on the
        gateway's own clock (never by a day a device named).  Runs as each
        round closes, which happens at least daily while devices report.
        """
        now = self._clock.seconds()
        cutoff = now - self._remember
        self.rounds.forget_before(now, cutoff, admissible_from(now, self._replay_window))
        for key in self.admission.forget_before(cutoff):
            self.reassembly.forget(key)
        self._spool.forget_before(cutoff).addCallbacks(self._forgotten, self._not_forgotten)

    def _forgotten(self, _) -> None:
        self._failures.succeeded("forgetting old message ids")

    def _not_forgotten(self, failure) -> None:
        # Forgetting again later loses nothing: the spool keeps some old
        # message ids and empty rounds a little longer.
        delay = self._failures.failed(
            "forgetting old message ids", "forget_failures", failure,
            "old message ids and rounds not forgotten in the spool",
        )
        if self._stopped:
            return
        if self._forget_retry is None or not self._forget_retry.active():
            self._forget_retry = self._clock.callLater(delay, self._forget_old)
