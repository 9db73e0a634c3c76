"""
The records of a C{BATCH} message: readings of any devices and days, each
C{id,ip,YYYY-MM-DDTHH:MM,temperature,humidity}, separated by C{;}.

A batch of 5,000 is checked column by column (L{batch_columns}): its shape
by one pass over its bytes, then each distinct value of each column once.
What that fast check does not take goes through the field checks of
L{decode_batch_records}, which give the exact verdict and the error's words
(the property tests compare the two).
"""

from __future__ import annotations

import itertools
import zlib
from typing import Iterator

import attrs

from meter.reading import MinuteStamps, Reading, format_number
from meter.wire import values
from meter.wire.values import WireError


@attrs.frozen
class BatchColumns:
    """
    The fields of a batch's records as text, column by column: the
    C{index}th record is C{devices[index]}, C{ips[index]}, and so on.

    Columns, not a tuple a record: the cloud makes each column's values and
    console lines with one C-level pass over a list, not a Python loop over
    records.
    """

    devices: list[str]
    ips: list[str]
    stamps: list[str]
    temperatures: list[str]
    humidities: list[str]
    #: Whether every field is known canonical and valid (L{batch_columns}
    #: made them), so that a store may take the texts as they are.
    checked: bool = attrs.field(default=False, eq=False, kw_only=True)

    @classmethod
    def of(cls, text: str) -> BatchColumns:
        """
        The columns of a C{;}-separated batch record text, split, not checked.
        """
        flat = text.replace(";", ",").split(",") if text else []
        return cls(flat[0::5], flat[1::5], flat[2::5], flat[3::5], flat[4::5])

    def __len__(self) -> int:
        return len(self.devices)

    def pick(self, indexes: list[int]) -> BatchColumns:
        """
        The records at C{indexes}, in that order.
        """
        return BatchColumns(
            *([column[index] for index in indexes] for column in self.fields()), checked=self.checked
        )

    def fields(self) -> tuple[list[str], list[str], list[str], list[str], list[str]]:
        return self.devices, self.ips, self.stamps, self.temperatures, self.humidities


def batch_records(readings) -> str:
    """
    The C{BATCH} record text of C{readings}.
    """
    stamps = MinuteStamps()
    return ";".join(
        f"{reading.device_id},{reading.device_ip},{stamps[reading.taken_at]},"
        f"{format_number(reading.temperature_c)},{format_number(reading.humidity_pct)}"
        for reading in readings
    )


def batch_records_of_day(day_records: str, day: str, device_id: int, device_ip: str) -> str:
    """
    A chunk's C{DAY} records (C{HH:MM,t,h;...}) as C{BATCH} records
    (C{id,ip,YYYY-MM-DDTHH:MM,t,h;...}): every record gains the same prefix,
    so string operations in C do it without splitting the records apart.
    """
    prefix = f"{device_id},{device_ip},{day}T"
    return prefix + day_records.replace(";", ";" + prefix)


def checksum(records: str) -> str:
    """
    The C{sum=} of a batch: the CRC-32 of its record text, 8 hex digits.
    """
    return f"{zlib.crc32(records.encode('ascii')):08x}"


def decode_batch_records(text: str, count: int) -> tuple[Reading, ...]:
    """
    The C{count} readings of a record text, checked field by field.

    @raise WireError: if the text is not C{count} canonical records, no
        device twice at one minute.
    """
    readings = []
    seen = set()
    for fields in values.split_records(text, count):
        if len(fields) != 5:
            raise WireError("record", f"record {','.join(fields)!r} is not id,ip,stamp,temperature,humidity")
        device, ip, stamp, temperature, humidity = fields
        taken_at = values.stamp(stamp)
        device_id = values.device_id(device)
        key = (device_id, taken_at)
        if key in seen:
            raise WireError("minute", f"device {device_id} at {stamp} twice in one batch")
        seen.add(key)
        readings.append(
            Reading.checked(
                device_id, values.address(ip), taken_at, values.temperature(temperature), values.humidity(humidity)
            )
        )
    return tuple(readings)


#: Every character a batch record's fields hold on the fast path: digits,
#: the hex digits and separators of addresses, and the punctuation of times
#: and numbers.  With them deleted, a batch of well-formed records leaves
#: only its separators.
_FIELD_CHARACTERS = b"0123456789abcdef.:-T"
#: The separators of one record and the one after it.
_RECORD_SHAPE = b",,,,;"


def batch_columns(text: str, count: int) -> BatchColumns:
    """
    A batch's records split into their fields, checked as
    L{decode_batch_records} would.

    @raise WireError: as L{decode_batch_records} does.
    """
    if count and values.record_count(text) == count:
        shape = text.encode("ascii").translate(None, _FIELD_CHARACTERS)
        if shape == (_RECORD_SHAPE * count)[:-1]:
            # Exactly five fields a record, each made of field characters.
            columns = BatchColumns.of(text)
            if _columns_ok(columns, count):
                return attrs.evolve(columns, checked=True)
    decode_batch_records(text, count)
    return attrs.evolve(BatchColumns.of(text), checked=True)


def _columns_ok(columns: BatchColumns, count: int) -> bool:
    """
    Whether every field of C{columns} is valid and no device has two
    readings of one minute.  Each distinct value is checked once, and a value
    checked before (a fleet repeats its devices, addresses, minutes and
    readings) costs only a look-up in its cache.
    """
    try:
        for column, cache, check in (
            (columns.devices, values.DEVICE_IDS, values.device_id),
            (columns.ips, values.ADDRESSES, values.address),
            (columns.stamps, values.STAMPS, values.stamp),
            (columns.temperatures, values.TEMPERATURES, values.temperature),
            (columns.humidities, values.HUMIDITIES, values.humidity),
        ):
            # set.difference(dict) looks each of the set's values up in the
            # dict; "set - dict.keys()" would walk the whole cache instead.
            for text in set(column).difference(cache.entries):
                check(text)
    except WireError:
        return False
    return _no_minute_twice(columns.devices, columns.stamps, count)


def _no_minute_twice(devices: list[str], stamps: list[str], count: int) -> bool:
    """
    Whether no device has two readings of one minute.  The texts are
    canonical, so equal texts are equal values and unequal texts unequal
    ones.

    A gateway's batch nearly always holds each device's readings in one
    run (its chunks side by side), so each run's stamps are compared among
    themselves: a step a run, not a string made a reading.  A device in two
    runs takes the whole check.
    """
    devices_seen = set()
    for device, start, end in device_runs(devices):
        if device in devices_seen:
            # Every stamp is 16 characters long, so a device and a stamp
            # joined name one pair (strings, not tuples: no garbage collector
            # work for 5,000 objects).
            return len(set(map(str.__add__, devices, stamps))) == count
        devices_seen.add(device)
        if len(set(stamps[start:end])) != end - start:
            return False
    return True


def device_runs(devices: list) -> Iterator[tuple[object, int, int]]:
    """
    Each run of one device in a batch's C{devices} column, as the device
    and the run's C{start} and C{end} positions: a batch holds a device's
    readings side by side (its chunks), so work a run is a Python step for
    dozens of readings.
    """
    start = 0
    for device, run in itertools.groupby(devices):
        end = start + len(list(run))
        yield device, start, end
        start = end
