"""
The cloud's policy for each batch: store it once, print what is new,
answer the gateway only after the commit.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from meter import wire
from meter.clocktext import iso_time
from meter.cloud.console import console_text
from meter.cloud.interfaces import IReadingStore
from meter.cloud.metrics import CloudMetrics
from meter.retry import Failures


class CloudStore:
    """
    Stores batches exactly once.

    A reading is unique by (device, time taken): a batch sent again is stored
    once and acknowledged again.  A batch is stored whole or not at all.
    """

    log = Logger()

    def __init__(
        self, readings: IReadingStore, console: Callable[[str], None], clock, metrics: CloudMetrics | None = None,
        console_format: Callable[[wire.BatchColumns], str] = console_text,
    ):
        """
        @param readings: where the readings are kept.
        @param console: called with the console text of each batch's newly
            stored readings (L{console_text}), once per batch.
        @param metrics: the cloud's counts, which the protocol and admission
            of connections served by this store add to as well; a new one
            if not given.
        @param console_format: makes the console text of the new readings
            (the daemon's adds the day's header lines, L{DayHeaders}).
        """
        self._readings = readings
        self._console = console
        self._console_format = console_format
        self._clock = clock
        self.metrics = CloudMetrics() if metrics is None else metrics
        # The gateway retries a batch refused for a failed commit, so there
        # is no retry here; the failures are counted and logged a few a minute.
        self._failures = Failures(self, clock, self.metrics)

    def store(self, batch: wire.Batch, peer: str) -> Deferred:
        """
        Commit C{batch}; the Deferred fires with the L{wire.BatchAck} to send,
        after the commit.
        """
        received = self._clock.seconds()
        columns = batch.columns()
        d = self._readings.add(columns, received)

        def committed(new_at: list[int] | None) -> wire.BatchAck:
            self._failures.succeeded("storing a batch")
            new = columns if new_at is None else columns.pick(new_at)
            if new:
                try:
                    self._console(self._console_format(new))
                    self._failures.succeeded("printing stored readings")
                except Exception:
                    # The readings are committed: the gateway must hear so,
                    # or it would send them again and again.
                    self._failures.failed(
                        "printing stored readings", "console_failures", Failure(),
                        "{count} readings of batch {batch_id} stored, not printed on the console", retried=False,
                        count=len(new), batch_id=batch.batch_id,
                    )
            count = len(columns)
            duplicates = count - len(new)
            self.metrics.stored(len(new), duplicates)
            self.log.info(
                "batch {batch_id} from {peer}: {count} readings committed ({new} new, {dup} duplicate) "
                "in {ms:.1f} ms; acknowledged at {when}",
                batch_id=batch.batch_id,
                peer=peer,
                count=count,
                new=len(new),
                dup=duplicates,
                ms=(self._clock.seconds() - received) * 1000,
                at=self._clock.seconds(),
                when=iso_time(self._clock.seconds()),
            )
            return wire.BatchAck(batch.batch_id, "ok", new=len(new), dup=duplicates)

        def failed(failure) -> wire.BatchAck:
            # Not committed: refuse the whole batch so the gateway keeps it
            # and sends it again later.
            self._failures.failed(
                "storing a batch", "store_failures", failure, "batch {batch_id} from {peer} not stored, refused", retried=False,
                batch_id=batch.batch_id, peer=peer,
            )
            return wire.BatchAck(batch.batch_id, "bad", reason=f"store: not stored: {failure.getErrorMessage()}")

        return d.addCallbacks(committed, failed)
