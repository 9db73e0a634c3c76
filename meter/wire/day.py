"""
The records of a C{DAY} message: one device's readings of one day, each
C{HH:MM,temperature,humidity}, separated by C{;}.

A record is checked field by field by L{decode_day_records}, in Python, one
call a value.  A chunk of 70 readings is checked by L{check_day_records}
instead, by one regular expression over all its records, which the re engine
runs in C: the pattern accepts only canonical numbers inside the sensor's
range, so a match means exactly what the field checks would have said (the
property tests compare the two).  It accepts a subset: anything it does not
take goes through the field checks, which give the exact verdict and the
error's words.
"""

from __future__ import annotations

import datetime
import re

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


_DECIMALS = r"(?:\.[0-9]{0,5}[1-9])?"
#: Below zero: -0.000001 to -39.999999, and -40; never -0.
_NEGATIVE_TEXT = rf"-(?:0\.[0-9]{{0,5}}[1-9]|(?:[1-9]|[1-3][0-9]){_DECIMALS}|40)"
_TEMPERATURE_TEXT = rf"(?:{_NEGATIVE_TEXT}|(?:[1-7]?[0-9]|8[0-4]){_DECIMALS}|85)"
_HUMIDITY_TEXT = rf"(?:[1-9]?[0-9]{_DECIMALS}|100)"
_HHMM_TEXT = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]"
#: One day record, as a whole ';'-separated item, its time grouped.
_DAY_RECORD = re.compile(rf"(?<![^;])({_HHMM_TEXT}),{_TEMPERATURE_TEXT},{_HUMIDITY_TEXT}(?![^;])")


def check_day_records(text: str, count: int, device_id: int, device_ip: str, day: datetime.date) -> None:
    """
    Check a chunk's record text as L{decode_day_records} would, without
    making its readings.

    @raise WireError: as L{decode_day_records} does.
    """
    # Each match is one whole record, so as many matches as records means
    # every record matched; their times must then all differ.
    if count == 0 or values.record_count(text) != count:
        decode_day_records(text, count, device_id, device_ip, day)
        return
    times = _DAY_RECORD.findall(text)
    if len(times) != count or len(set(times)) != count:
        decode_day_records(text, count, device_id, device_ip, day)
