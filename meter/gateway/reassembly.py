"""
The reassembly of each device's transfer: which of its chunks have arrived,
so the gateway knows when a device has reported its whole day.  Bounded in
time and in number: a transfer still missing chunks is given up (expired)
after a timeout, and the oldest first when too many are in progress.
"""

from __future__ import annotations

import datetime
from typing import Iterator

from twisted.logger import Logger

from meter import wire
from meter.gateway.metrics import GatewayMetrics
from meter.gateway.spool import StoredChunk


#: The reassembly of one device's day, which chunks have arrived: a plain
#: tuple C{(day, parts, received, count, first_seen)}, C{received} the parts
#: arrived as one bit each and C{count} how many, replaced rather than
#: changed.  Why not an object: the gateway holds one a device, and the
#: cyclic garbage collector stops tracking a plain tuple of numbers and
#: dates (never an instance of a class, not even of a named tuple), so its
#: full passes, which stall the reactor, do not grow with the fleet.
Transfer = tuple
#: The fields of a L{Transfer}, by position.
DAY, PARTS, RECEIVED, COUNT, FIRST_SEEN = range(5)


def with_part(transfer: Transfer, part: int) -> Transfer:
    """
    C{transfer} with part C{part} arrived too.
    """
    day, parts, received, count, first_seen = transfer
    bit = 1 << part
    if received & bit:
        return transfer
    return (day, parts, received | bit, count + 1, first_seen)


class Reassembly:
    """
    The transfers the gateway knows, by C{(device_id, xfer)}, and the
    bounds on those still missing chunks.

    @param timeout: seconds after its first chunk at which a transfer still
        missing chunks expires, or None for never.
    @param most: how many transfers may be missing chunks at once, or None
        for no bound.
    """

    def __init__(self, clock, metrics: GatewayMetrics, log: Logger, timeout: float | None = None, most: int | None = None):
        self._clock = clock
        self._metrics = metrics
        self._log = log
        self._timeout = timeout
        self._most = most
        self.transfers: dict[tuple[int, str], Transfer] = {}
        #: The transfers still missing chunks, oldest first: what the time and
        #: memory bounds on reassembly expire (see L{_expire}).
        self.incomplete: dict[tuple[int, str], None] = {}
        self._expiry = None

    def chunk_arrived(self, chunk: wire.DayChunk) -> bool:
        """
        C{chunk}, a chunk of its transfer, is committed: whether the transfer
        is now complete.
        """
        key = (chunk.device_id, chunk.xfer)
        transfer = self.transfers.get(key)
        if transfer is None:
            transfer = (chunk.day, chunk.parts, 1 << chunk.part, 1, self._clock.seconds())
        else:
            transfer = with_part(transfer, chunk.part)
        self.transfers[key] = transfer
        if transfer[COUNT] < transfer[PARTS]:
            if key not in self.incomplete:
                self.incomplete[key] = None
                self._bound()
            return False
        self.incomplete.pop(key, None)
        return True

    def recover(self, chunks: tuple[StoredChunk, ...]) -> None:
        """
        Resume the transfers of the chunks the spool holds; those still
        missing chunks expire as if the gateway had not stopped.
        """
        for stored in chunks:
            key = (stored.device_id, stored.xfer)
            transfer = self.transfers.get(key)
            if transfer is None:
                transfer = (stored.day, stored.parts, 0, 0, stored.received_at)
            elif stored.received_at < transfer[FIRST_SEEN]:
                transfer = (*transfer[:FIRST_SEEN], stored.received_at)
            self.transfers[key] = with_part(transfer, stored.part)
        for key, transfer in sorted(self.transfers.items(), key=lambda item: item[1][FIRST_SEEN]):
            if transfer[COUNT] < transfer[PARTS]:
                self.incomplete[key] = None
        self._bound()

    def complete(self) -> Iterator[tuple[int, datetime.date]]:
        """
        The device and day of every complete transfer.
        """
        for (device_id, _), transfer in self.transfers.items():
            if transfer[COUNT] == transfer[PARTS]:
                yield device_id, transfer[DAY]

    def forget(self, key: tuple[int, str]) -> None:
        """
        Forget transfer C{key} (its device's day is forgotten): if it was
        still missing chunks, it counts as expired.
        """
        self.transfers.pop(key, None)
        if key in self.incomplete:
            del self.incomplete[key]
            self._metrics.expired_reassemblies += 1

    def stop(self) -> None:
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None

    def _bound(self) -> None:
        """
        Keep at most C{most} transfers in reassembly (the oldest go first),
        and expire each C{timeout} seconds after its first chunk arrived.
        """
        if self._most is not None:
            while len(self.incomplete) > self._most:
                self._expire(next(iter(self.incomplete)), f"more than {self._most} in progress")
        self._arm()

    def _arm(self) -> None:
        if self._timeout is None or not self.incomplete:
            return
        if self._expiry is not None and self._expiry.active():
            return
        oldest = self.transfers[next(iter(self.incomplete))]
        delay = max(0.0, oldest[FIRST_SEEN] + self._timeout - self._clock.seconds())
        self._expiry = self._clock.callLater(delay, self._expire_old)

    def _expire_old(self) -> None:
        self._expiry = None
        cutoff = self._clock.seconds() - self._timeout
        while self.incomplete:
            key = next(iter(self.incomplete))
            if self.transfers[key][FIRST_SEEN] > cutoff:
                break
            self._expire(key, f"incomplete after {self._timeout:g} s")
        self._arm()

    def _expire(self, key: tuple[int, str], why: str) -> None:
        """
        Stop reassembling transfer C{key}: forget which of its chunks arrived.

        Only bookkeeping goes.  Every chunk that was acknowledged is durable
        in the spool and its readings are forwarded with their day whatever
        happens here; what is lost is only the knowledge that the device
        reported completely (its round then closes at its deadline).  The
        message ids of its chunks and the minutes they held stay with their
        device's day (bounded, and forgotten by age), so a late
        retransmission is still recognised and a late chunk still checked.
        """
        del self.incomplete[key]
        transfer = self.transfers.pop(key)
        device_id, xfer = key
        self._metrics.expired_reassemblies += 1
        self._log.warn(
            "reassembly of device {device}'s transfer {xfer} of {day} expired ({why}) with {n} of {parts} chunks: "
            "the chunks received stay spooled and are forwarded",
            device=device_id,
            xfer=xfer,
            day=transfer[DAY],
            why=why,
            n=transfer[COUNT],
            parts=transfer[PARTS],
        )
