"""
The API's query parameters, read strictly: each bad form is refused with a
message naming the parameter (400), never guessed at.
"""

from __future__ import annotations

import datetime
import re

import attrs

from meter.cloud.interfaces import Cursor
from meter.wire.values import device_address


class BadParameter(ValueError):
    """
    A query parameter the API refuses: C{parameter} names it (None for the
    query as a whole), the message says why.
    """

    def __init__(self, parameter: str | None, message: str):
        ValueError.__init__(self, message)
        self.parameter = parameter
        self.message = message


#: The most readings one request of /api/v1/readings returns (the rest by
#: its cursor), and how many when it does not say.
MOST_READINGS = 1_000_000
DEFAULT_READINGS = 10_000
#: The most points of a series, and how many when the request does not say.
MOST_POINTS = 5_000
DEFAULT_POINTS = 500
FORMATS = ("json", "csv", "senml")

#: A date, maybe a time of day; a zone is refused (the readings have none).
_MOMENT = re.compile(r"^\d{4}-\d\d-\d\d(?P<time>T\d\d:\d\d(:\d\d)?)?(?P<zone>Z|[+-]\d\d:?\d\d)?$")
_CURSOR = re.compile(r"^(?P<device_id>[1-9]\d{0,9})_(?P<taken_at>\d{4}-\d\d-\d\dT\d\d:\d\d)$")
_MOST_DEVICE_ID = 2**31 - 1


def arguments(request_args: dict[bytes, list[bytes]], allowed: tuple[str, ...]) -> dict[str, str]:
    """
    The query's parameters as text, each given once and each one of
    C{allowed}: an unknown one is refused (a typo such as C{form=} would
    otherwise be silently ignored), as is one given twice.
    """
    found: dict[str, str] = {}
    for raw_name, values in request_args.items():
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise BadParameter(None, "a parameter name is not UTF-8") from None
        if name not in allowed:
            raise BadParameter(name, f"unknown parameter {name!r}; this path takes {', '.join(allowed)}")
        if len(values) != 1:
            raise BadParameter(name, f"{name} given {len(values)} times; give it once")
        try:
            found[name] = values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise BadParameter(name, f"{name} is not UTF-8") from None
    return found


@attrs.frozen
class Device:
    """
    C{device=}: a device id, or an address the readings were taken at.
    """

    device_id: int | None
    device_ip: str | None


def device(text: str) -> Device:
    if text.isascii() and text.isdigit():
        number = int(text)
        if not 1 <= number <= _MOST_DEVICE_ID:
            raise BadParameter("device", f"device id {text} out of range 1..{_MOST_DEVICE_ID}")
        return Device(number, None)
    try:
        return Device(None, device_address(text))
    except ValueError:
        raise BadParameter("device", f"expected a device id (3) or address (192.168.1.4), got {text!r}") from None


def moment(name: str, text: str, end: bool) -> datetime.datetime:
    """
    C{from=} or C{to=}: a date or a date and time, in the devices' local
    time as stored.  A date alone as C{to} takes in that whole day.
    """
    shape = _MOMENT.match(text)
    if shape is not None and shape.group("zone"):
        raise BadParameter(name, f"{text!r} has a zone: readings are in their device's local time, give it without one")
    try:
        if shape is None:
            raise ValueError
        value = datetime.datetime.fromisoformat(text)
        if end and shape.group("time") is None:
            value += datetime.timedelta(days=1)
    except (ValueError, OverflowError):
        raise BadParameter(name, f"expected a date (2026-11-30) or a date and time (2026-11-30T08:00), got {text!r}") from None
    return value


def whole(name: str, text: str, low: int, high: int) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise BadParameter(name, f"expected a whole number {low}..{high}, got {text!r}")
    number = int(text)
    if not low <= number <= high:
        raise BadParameter(name, f"{number} out of range {low}..{high}")
    return number


def cursor_text(cursor: Cursor) -> str:
    """
    A cursor as C{after=} takes it: the device and time of the last
    reading returned (C{3_2026-03-01T08:00}).
    """
    return f"{cursor.device_id}_{cursor.taken_at.isoformat(timespec='minutes')}"


def cursor(text: str) -> Cursor:
    shape = _CURSOR.match(text)
    try:
        if shape is None:
            raise ValueError
        device_id = int(shape.group("device_id"))
        if device_id > _MOST_DEVICE_ID:
            raise ValueError
        return Cursor(device_id, datetime.datetime.fromisoformat(shape.group("taken_at")))
    except ValueError:
        raise BadParameter("after", f"not a cursor of this API (the next of a previous answer): {text!r}") from None


def time_range(args: dict[str, str]) -> tuple[datetime.datetime | None, datetime.datetime | None]:
    since = moment("from", args["from"], False) if "from" in args else None
    until = moment("to", args["to"], True) if "to" in args else None
    if since is not None and until is not None:
        # A date alone as to takes in its day: from 2026-03-02 to 2026-03-01
        # is an empty range by the bounds, and a mistake all the same.
        to_date = "T" not in args["to"]
        if since > until or (to_date and since.date() > until.date() - datetime.timedelta(days=1)):
            raise BadParameter("from", f"from {args['from']} is after to {args['to']}")
    return since, until
