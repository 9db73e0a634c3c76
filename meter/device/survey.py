"""
The survey files a device reads its readings from.

A survey file is the report's format, one reading a line::

    08:00 - 20 - 30%

(time of day, temperature in degrees Celsius, relative soil humidity).  The
file holds the previous 24 hours; the device stamps the readings with the
date of the day they cover.  docs/protocol.md gives its grammar.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

from meter.reading import MAX_DECIMALS, Reading, ReadingError, check_humidity, check_temperature


class SurveyError(ValueError):
    """
    A survey file cannot be read: the message names the file and the line.
    """


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
    """
    The readings of survey file C{path}, stamped with C{day}.

    @raise SurveyError: naming C{path}, if it cannot be read, is not a
        survey, or holds no reading: a survey file holds the previous 24
        hours, so an empty one is a sensor or a copy gone wrong, and sending
        it would report a day without readings as if it were measured.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SurveyError(f"{path}: cannot read survey: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise SurveyError(f"{path}: cannot read survey: {e}") from None
    readings = parse_survey(text, str(path), device_id, device_ip, day)
    if not readings:
        raise SurveyError(f"{path}: no readings in it (an empty day is not sent)")
    return readings
