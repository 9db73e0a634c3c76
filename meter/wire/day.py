"""
The records of a C{DAY} message: one device's readings of one day, each
C{HH:MM,temperature,humidity}, separated by C{;}.

A record is checked field by field by L{decode_day_records}, in Python, one
call a value.  A chunk of 70 readings is checked by L{check_day_records}
instead, by column: its records split into times, temperatures and
humidities at once, each distinct value looked up among the values checked
before (a fleet repeats its minutes and readings) and checked by the same
value checks if new, so it accepts exactly what the field checks accept
(the property tests compare the two).  It accepts a subset: anything it
does not take goes through the field checks, which give the exact verdict
and the error's words.
"""

from __future__ import annotations

import datetime

from meter.reading import Reading, format_number
from meter.wire import values
from meter.wire.values import WireError


def day_record(reading: Reading) -> str:
    return (
        f"{reading.taken_at:%H:%M},{format_number(reading.temperature_c)},"
        f"{format_number(reading.humidity_pct)}"
    )


def check_belong(readings, device_id: int, device_ip: str, day: datetime.date) -> None:
    """
    @raise ValueError: if a reading is not of this device, address and day,
        so a chunk of theirs could not carry it.
    """
    for reading in readings:
        if reading.device_id != device_id or reading.device_ip != device_ip or reading.taken_at.date() != day:
            raise ValueError(f"{reading!r} does not belong in a chunk of device {device_id} on {day}")


def day_records(readings, device_id: int, device_ip: str, day: datetime.date) -> str:
    """
    The C{DAY} record text of C{readings}, which must be of this device,
    address and day.
    """
    check_belong(readings, device_id, device_ip, day)
    return ";".join(map(day_record, readings))


def decode_day_records(text: str, count: int, device_id: int, device_ip: str, day: datetime.date) -> tuple[Reading, ...]:
    """
    The C{count} readings of a record text, checked field by field.

    @raise WireError: if the text is not C{count} canonical records of
        distinct minutes.
    """
    readings = []
    seen = set()
    times = values.DAY_TIMES.entries.get(day)
    if times is None:
        times = values.DAY_TIMES.remember(day, [None] * (24 * 60))
    minute_of = values.MINUTE_OF
    for fields in values.split_records(text, count):
        if len(fields) != 3:
            raise WireError("record", f"record {','.join(fields)!r} is not HH:MM,temperature,humidity")
        hhmm, temperature, humidity = fields
        minute = minute_of.get(hhmm)
        if minute is None:
            raise WireError("value", f"time {hhmm!r} is not HH:MM")
        if minute in seen:
            raise WireError("minute", f"time {hhmm} twice in one message")
        seen.add(minute)
        taken_at = times[minute]
        if taken_at is None:
            taken_at = times[minute] = datetime.datetime(day.year, day.month, day.day, minute // 60, minute % 60)
        readings.append(
            Reading.checked(device_id, device_ip, taken_at, values.temperature(temperature), values.humidity(humidity))
        )
    return tuple(readings)


#: Every character a record's fields hold on the fast path: digits and the
#: punctuation of times and numbers.  With them deleted, well-formed records
#: leave only their separators.
_FIELD_CHARACTERS = b"0123456789.:-"
#: The separators of one record and the one after it.
_RECORD_SHAPE = b",,;"


def check_day_records(text: str, count: int, device_id: int, device_ip: str, day: datetime.date) -> None:
    """
    Check a chunk's record text as L{decode_day_records} would, without
    making its readings.

    @raise WireError: as L{decode_day_records} does.
    """
    if count and text.isascii() and values.record_count(text) == count:
        shape = text.encode("ascii").translate(None, _FIELD_CHARACTERS)
        if shape == (_RECORD_SHAPE * count)[:-1] and _columns_ok(text.replace(";", ",").split(","), count):
            return
    decode_day_records(text, count, device_id, device_ip, day)


def _columns_ok(fields: list[str], count: int) -> bool:
    """
    Whether the fields of C{count} records, three a record, are valid
    times, all distinct, and valid temperatures and humidities.  Each
    distinct value is checked once, and one checked before costs only a
    look-up in its cache.
    """
    times = set(fields[0::3])
    if len(times) != count or times.difference(values.MINUTE_OF):
        return False
    try:
        # set.difference(dict) looks each of the set's values up in the
        # dict; "set - dict.keys()" would walk the whole cache instead.
        for text in set(fields[1::3]).difference(values.TEMPERATURES.entries):
            values.temperature(text)
        for text in set(fields[2::3]).difference(values.HUMIDITIES.entries):
            values.humidity(text)
    except WireError:
        return False
    return True
