"""
The one value the whole suite carries: a soil reading, and its checks.
(A device reads its readings from survey files: L{meter.device.survey}.)
"""

from __future__ import annotations

import datetime
import decimal
import math

import attrs

#: Most decimals a value may have: a sensor's resolution is far coarser.
MAX_DECIMALS = 6

#: Physical bounds of the sensor (the operating range of common soil probes).
TEMPERATURE_RANGE = (-40.0, 85.0)
HUMIDITY_RANGE = (0.0, 100.0)


class ReadingError(ValueError):
    """
    A reading's value is impossible: the message says which field and why.
    """


def check_temperature(value: float) -> float:
    if not math.isfinite(value):
        raise ReadingError(f"temperature {value!r} is not a finite number")
    low, high = TEMPERATURE_RANGE
    if not low <= value <= high:
        raise ReadingError(f"temperature {format_number(value)} outside {low:g}..{high:g} °C")
    return value


def check_humidity(value: float) -> float:
    if not math.isfinite(value):
        raise ReadingError(f"humidity {value!r} is not a finite number")
    low, high = HUMIDITY_RANGE
    if not low <= value <= high:
        raise ReadingError(f"humidity {format_number(value)}% outside {low:g}..{high:g} %")
    return value


#: Texts of numbers already formatted.  Sensor values repeat a lot (a
#: resolution of 0.1 gives a few thousand distinct values), and every reading
#: is formatted at least twice on its way; bounded so odd inputs cannot grow
#: it without limit.
_FORMATTED: dict[float, str] = {}
_FORMATTED_MAX = 1 << 16


def format_number(value: float) -> str:
    """
    The shortest text that reads back as C{value}, without a needless C{.0}:
    C{17.0} prints as C{17} and C{17.25} as C{17.25}, as a survey writes them.
    Zero is C{0} whatever its sign: C{-0} would be a second text of one value.
    """
    text = _FORMATTED.get(value)
    if text is not None and type(value) is float:
        return text
    text = _format_number(value)
    if len(_FORMATTED) < _FORMATTED_MAX and type(value) is float and value == value:
        _FORMATTED[value] = text
    return text


def _format_number(value: float) -> str:
    if value == 0:
        return "0"
    text = repr(float(value))
    if "e" in text:
        # repr writes magnitudes below 1e-4 as 1e-05, a form the wire does
        # not have: the same shortest digits, written out positionally.
        text = format(decimal.Decimal(text), "f")
    if text.endswith(".0"):
        return text[:-2]
    return text


def _validate_temperature(instance, attribute, value):
    check_temperature(value)


def _validate_humidity(instance, attribute, value):
    check_humidity(value)


@attrs.frozen
class Reading:
    """
    One measurement of one device.

    @ivar device_id: the device's number in the fleet (1 is the report's
        device 1).
    @ivar device_ip: the device's address, its identity on the console.
    @ivar taken_at: the date the readings cover plus the time of day, to the
        minute, with no time zone (the fleet's local time, as in the report).
    @ivar temperature_c: degrees Celsius, -40..85.
    @ivar humidity_pct: relative soil humidity, 0..100.
    """

    device_id: int
    device_ip: str
    taken_at: datetime.datetime
    temperature_c: float = attrs.field(validator=_validate_temperature)
    humidity_pct: float = attrs.field(validator=_validate_humidity)

    def console_line(self) -> str:
        """
        The cloud console's line for this reading, as the report prints it:
        C{192.168.1.4 - 02:00 - 17 - 35%}.
        """
        taken_at = self.taken_at
        return (
            f"{self.device_ip} - {HHMM[taken_at.hour * 60 + taken_at.minute]} - "
            f"{format_number(self.temperature_c)} - {format_number(self.humidity_pct)}%"
        )

    @classmethod
    def checked(cls, device_id: int, device_ip: str, taken_at: datetime.datetime, temperature_c: float, humidity_pct: float) -> "Reading":
        """
        A reading of values the caller has already checked (the codec checks
        every value it decodes): the same value, without checking the ranges
        a second time on the hot path.
        """
        reading = object.__new__(cls)
        _set = object.__setattr__
        _set(reading, "device_id", device_id)
        _set(reading, "device_ip", device_ip)
        _set(reading, "taken_at", taken_at)
        _set(reading, "temperature_c", temperature_c)
        _set(reading, "humidity_pct", humidity_pct)
        return reading


class MinuteStamps(dict):
    """
    ISO 8601 texts (C{YYYY-MM-DDTHH:MM}) of times, each formatted once: a
    batch of a fleet's readings shares its minutes.  Use one per batch.
    """

    def __missing__(self, taken_at: datetime.datetime) -> str:
        # isoformat, not strftime: %Y does not pad a year before 1000 to four digits.
        stamp = self[taken_at] = taken_at.isoformat(timespec="minutes")
        return stamp


#: "HH:MM" of each minute of a day, by minute of the day.
HHMM = tuple(f"{minute // 60:02d}:{minute % 60:02d}" for minute in range(24 * 60))
