"""
A day in chunks: one device's day cut into L{DayChunk}s whose sealed
datagrams fit a size.
"""

from __future__ import annotations

import datetime
from typing import Iterable

from meter.reading import Reading
from meter.wire.codec import encode
from meter.wire.day import check_belong, day_record
from meter.wire.messages import DEFAULT_CHUNK_BYTES, MAX_READINGS, DayChunk
from meter.wire.sealing import TAG_LENGTH
from meter.wire.values import MAX_UINT32


def split_day(
    device_id: int,
    device_ip: str,
    day: datetime.date,
    readings: tuple[Reading, ...],
    xfer: str,
    sent_at: int,
    max_bytes: int = DEFAULT_CHUNK_BYTES,
) -> list[DayChunk]:
    """
    Cut one device's day into L{DayChunk}s whose sealed datagrams (see
    L{meter.wire.sealing.seal}) are at most C{max_bytes} long each.  A day with
    no readings is one empty chunk, so the gateway still learns the device
    reported.
    """
    texts = day_chunk_records(device_id, device_ip, day, readings, max_bytes)
    return day_chunks(device_id, device_ip, day, texts, xfer, sent_at)


def day_chunks(
    device_id: int, device_ip: str, day: datetime.date, texts: list[str], xfer: str, sent_at: int
) -> list[DayChunk]:
    """
    The chunks of a day cut by L{day_chunk_records} into C{texts}, sent as transfer
    C{xfer} started at C{sent_at}.
    """
    parts = len(texts)
    return [
        DayChunk(device_id, device_ip, day, xfer, index, parts, sent_at, text)
        for index, text in enumerate(texts, start=1)
    ]


def day_chunk_records(
    device_id: int,
    device_ip: str,
    day: datetime.date,
    readings: tuple[Reading, ...],
    max_bytes: int = DEFAULT_CHUNK_BYTES,
) -> list[str]:
    """
    The record texts of the chunks L{split_day} cuts a day into, whatever
    their transfer id and start time: formatting the readings is the cost
    of cutting a day, and a load generator pays it before it starts the
    clock.

    @raise ValueError: if a reading is not of this device and day, or
        C{max_bytes} cannot hold one reading.
    """
    check_belong(readings, device_id, device_ip, day)
    return pack_records(map(day_record, readings), chunk_room(device_id, device_ip, day, max_bytes), max_bytes)


def chunk_room(device_id: int, device_ip: str, day: datetime.date, max_bytes: int) -> int:
    """
    The bytes of record text a chunk of C{max_bytes} of this device and day
    holds: the header's length depends on the part numbers, the start time
    and the reading count only through their digits, so the widest forms
    are reserved and every chunk's header fits.
    """
    # The count (n=) is not a field of its own: the encoder counts the
    # records.  So the widest count is written by giving it records that
    # are all separators, MAX_READINGS empty ones, whose bytes come off again.
    widest_records = ";" * (MAX_READINGS - 1)
    widest = DayChunk(device_id, device_ip, day, "0" * 16, MAX_READINGS, MAX_READINGS, MAX_UINT32, widest_records)
    header = len(encode(widest)) - len(widest_records)
    return max_bytes - header - TAG_LENGTH


def pack_records(records: Iterable[str], room: int, max_bytes: int) -> list[str]:
    """
    C{records} (day record texts, in order) joined by C{;} into as few
    chunk texts of at most C{room} bytes as they fit in, in order.

    @raise ValueError: if one record does not fit in C{room} (C{max_bytes}
        is the chunk size named in the error).
    """
    groups: list[list[str]] = [[]]
    used = 0
    for record in records:
        size = len(record) + (1 if groups[-1] else 0)
        if used + size > room:
            if not groups[-1]:
                raise ValueError(f"chunk size {max_bytes} cannot hold one reading")
            groups.append([])
            size = len(record)
            used = 0
        groups[-1].append(record)
        used += size
    return [";".join(group) for group in groups]
