"""
The messages of both hops as frozen values, the limits of their sizes, and
the ids that name them.  L{meter.wire.codec} writes and reads them.
"""

from __future__ import annotations

import datetime
import os
from typing import Union

import attrs

from meter.reading import Reading
from meter.wire.batch import BatchColumns, batch_records, decode_batch_records
from meter.wire.day import day_records, decode_day_records
from meter.wire.values import record_count

VERSION = 1
MAGIC = b"meter/"

#: The largest UDP payload an IPv4 datagram can carry.
MAX_DATAGRAM = 65507
#: The default ceiling of one device datagram: fits a 1280-byte IPv6 MTU.
DEFAULT_CHUNK_BYTES = 1200
#: The most readings one message may carry (a day of per-minute readings).
MAX_READINGS = 24 * 60
#: The most readings one batch to the cloud carries.
MAX_BATCH_READINGS = 5000
#: The longest line either side accepts on TCP; a full batch fits easily.
MAX_LINE = 1 << 20


def new_id() -> str:
    """
    A fresh transfer or batch id: 16 lowercase hex digits, random, so ids
    of a restarted sender do not repeat earlier ones.
    """
    return os.urandom(8).hex()


def _day_records_text(value, chunk) -> str:
    """
    A chunk's records as canonical C{DAY} record text: text is taken as it
    is (the decoder checked it), readings are formatted, and must be of the
    chunk's device, address and day, or the chunk could not carry them.
    """
    if isinstance(value, str):
        return value
    return day_records(value, chunk.device_id, chunk.device_ip, chunk.day)


@attrs.frozen
class DayChunk:
    """
    Device -> gateway: part C{part} of C{parts} of one device's day.

    @ivar xfer: the transfer id, 16 lowercase hex digits, the same for every
        part of one day's sending and for every retransmission of it.  With
        C{part} it is the message id the gateway acknowledges and
        deduplicates by.
    @ivar sent_at: when the device first sent this transfer, in whole Unix
        seconds (the gateway's replay window reads it).
    @ivar records: the readings as canonical C{DAY} record text
        (C{HH:MM,t,h;...}).  Given a sequence of L{Reading}s instead, the
        chunk formats them.  The text is the value: the gateway checks it and
        spools it as it came, without making an object of each reading.
    """

    device_id: int
    device_ip: str
    day: datetime.date
    xfer: str
    part: int
    parts: int
    sent_at: int
    records: str = attrs.field(converter=attrs.Converter(_day_records_text, takes_self=True))

    @property
    def count(self) -> int:
        """
        How many readings the chunk carries.
        """
        return record_count(self.records)

    @property
    def readings(self) -> tuple[Reading, ...]:
        return decode_day_records(self.records, self.count, self.device_id, self.device_ip, self.day)

    @property
    def message_id(self) -> tuple[int, str, int]:
        return (self.device_id, self.xfer, self.part)


@attrs.frozen
class DayAck:
    """
    Gateway -> device: the answer to one L{DayChunk}.

    @ivar status: C{ok} (the chunk is durable at the gateway), C{busy} (the
        gateway cannot take it now; retry later) or C{bad} (it will never be
        accepted; C{reason} says why).
    @ivar retry_after_ms: with C{busy} only, the gateway's hint: how many
        milliseconds the device should wait before it sends again (C{None}:
        no hint, the device retries on its own timers).
    """

    xfer: str
    part: int
    status: str
    reason: str = ""
    retry_after_ms: int | None = None


def _batch_records_text(value) -> str:
    if isinstance(value, str):
        return value
    return batch_records(value)


@attrs.frozen
class Batch:
    """
    Gateway -> cloud: readings of any devices and days, all or nothing.

    @ivar records: the readings as canonical C{BATCH} record text
        (C{id,ip,YYYY-MM-DDTHH:MM,t,h;...}); given a sequence of L{Reading}s
        instead, the batch formats them.
    @ivar checked_columns: the records' fields when the batch was decoded
        from the wire (the decoder split and checked them), so the cloud
        stores them without splitting again; C{None} otherwise.  Not part of
        the batch's value: it only repeats C{records}.
    """

    batch_id: str
    records: str = attrs.field(converter=_batch_records_text)
    checked_columns: BatchColumns | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def count(self) -> int:
        return record_count(self.records)

    @property
    def readings(self) -> tuple[Reading, ...]:
        return decode_batch_records(self.records, self.count)

    def columns(self) -> BatchColumns:
        """
        The records' fields: device ids, addresses, timestamps,
        temperatures and humidities, as text.
        """
        if self.checked_columns is not None:
            return self.checked_columns
        return BatchColumns.of(self.records)


@attrs.frozen
class BatchAck:
    """
    Cloud -> gateway: the answer to one L{Batch}.

    @ivar status: C{ok} once every reading is committed (C{new} were stored
        now, C{dup} had been stored before), or C{bad} with a C{reason}; then
        nothing of the batch was stored.
    """

    batch_id: str
    status: str
    reason: str = ""
    new: int = 0
    dup: int = 0


@attrs.frozen
class Ping:
    """
    Either side of the TCP hop: are you there?  Answered by L{Pong}.
    """

    seq: int


@attrs.frozen
class Pong:
    seq: int


Message = Union[DayChunk, DayAck, Batch, BatchAck, Ping, Pong]

#: The statuses each acknowledgement may carry.
STATUSES = {DayAck: ("ok", "busy", "bad"), BatchAck: ("ok", "bad")}
