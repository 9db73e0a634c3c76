"""
The one value the whole suite carries: a soil reading, and the survey files
a device reads them from.

A survey file is the report's format, one reading a line::

    08:00 - 20 - 30%

(time of day, temperature in degrees Celsius, relative soil humidity).  The
file holds the previous 24 hours; the device stamps the readings with the
date of the day they cover.  docs/protocol.md gives its grammar.
"""

from __future__ import annotations

import datetime
import decimal
import math
import re
from pathlib import Path

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


_HHMM = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])\Z")


def parse_hhmm(text: str) -> datetime.time:
    match = _HHMM.match(text)
    if match is None:
        raise ReadingError(f"time {text!r} is not HH:MM (00:00 to 23:59)")
    return datetime.time(int(match.group(1)), int(match.group(2)))


#: A survey's number: ASCII digits, an optional minus, an optional point
#: with digits on both sides; no plus, exponent, NaN, infinity or
#: digit group separator (which float() would all take).
_SURVEY_NUMBER = re.compile(r"-?[0-9]+(?:\.([0-9]+))?\Z")


def parse_number(text: str, what: str) -> float:
    match = _SURVEY_NUMBER.match(text)
    if match is None:
        raise ReadingError(f"{what} {text!r} is not a number (digits, an optional '-' and '.')")
    # The wire carries at most six decimals (docs/protocol.md): refuse here,
    # naming the file and line, what the gateway would refuse later.
    decimals = match.group(1) or ""
    if len(decimals) > MAX_DECIMALS:
        raise ReadingError(f"{what} {text!r} has more than {MAX_DECIMALS} decimals")
    # + 0.0: -0 is zero, one value with one text on the wire.
    return float(text) + 0.0


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


class SurveyError(ValueError):
    """
    A survey file cannot be read: the message names the file and the line.
    """


#: A reading's line: time, temperature and humidity with a per cent sign,
#: separated by dashes with spaces or tabs on both sides.
_SURVEY_LINE = re.compile(r"[ \t]*(\S+)[ \t]+-[ \t]+(\S+)[ \t]+-[ \t]+(\S+?)[ \t]*%[ \t]*\Z", re.ASCII)

#: A day has at most one reading a minute; a longer file is not a survey.
MAX_SURVEY_READINGS = 24 * 60


def parse_survey(
    text: str, source: str, device_id: int, device_ip: str, day: datetime.date
) -> tuple[Reading, ...]:
    """
    Read a survey file's text into readings stamped with C{day}, in the
    file's order (docs/protocol.md, "Survey files", is the grammar).

    Lines end with LF or CR LF.  Lines of spaces and tabs only, and lines
    whose first other character is C{#}, are skipped.  Two readings at the
    same time of day are refused: the cloud keeps one reading per device and
    minute, so the second one could never be stored.

    @param source: the file's name, for error messages.
    @raise SurveyError: naming C{source} and the line number.
    """
    readings = []
    seen: dict[datetime.time, int] = {}
    for number, line in enumerate(text.split("\n"), start=1):
        if line.endswith("\r"):
            line = line[:-1]
        content = line.strip(" \t")
        if not content or content.startswith("#"):
            continue
        where = f"{source}:{number}"
        match = _SURVEY_LINE.match(line)
        if match is None:
            raise SurveyError(f"{where}: expected 'HH:MM - temperature - humidity%', got {content!r}")
        try:
            at = parse_hhmm(match.group(1))
            temperature = check_temperature(parse_number(match.group(2), "temperature"))
            humidity = check_humidity(parse_number(match.group(3), "humidity"))
        except ReadingError as e:
            raise SurveyError(f"{where}: {e}") from None
        if at in seen:
            raise SurveyError(f"{where}: time {at:%H:%M} already read at line {seen[at]}")
        seen[at] = number
        if len(readings) >= MAX_SURVEY_READINGS:
            raise SurveyError(f"{where}: more than {MAX_SURVEY_READINGS} readings in one day")
        readings.append(
            Reading(device_id, device_ip, datetime.datetime.combine(day, at), temperature, humidity)
        )
    return tuple(readings)


def survey_path(surveys: Path, device_id: int) -> Path:
    """
    The survey file of device C{device_id}: C{surveys} itself if it is a file,
    else C{device<N>.txt} in that folder.
    """
    if surveys.is_dir():
        return surveys / f"device{device_id}.txt"
    return surveys


def load_survey(path: Path, device_id: int, device_ip: str, day: datetime.date) -> tuple[Reading, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SurveyError(f"{path}: cannot read survey: {e}") from None
    return parse_survey(text, str(path), device_id, device_ip, day)
