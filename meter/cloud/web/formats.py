"""
How a stream of readings is written: JSON (an envelope holding the rows and
the next cursor), CSV (the columns of C{meter readings}), SenML JSON (RFC
8428).  Each is a head, pages of rows, a tail: a page is written as soon as
it is read, so a long answer never sits in memory.
"""

from __future__ import annotations

import datetime
import json

from meter.reading import format_number

COLUMNS = ("device_id", "device_ip", "taken_at", "temperature_c", "humidity_pct")

_EPOCH = datetime.datetime(1970, 1, 1)


def wall_seconds(moment: datetime.datetime) -> int:
    """
    A naive time (a device's local time) as seconds since 1970-01-01T00:00
    of the same clock: the wall time read as if it were UTC.  The readings
    carry no zone, so this is the one conversion that neither invents an
    offset nor moves a reading across a day.
    """
    return int((moment - _EPOCH).total_seconds())


def minutes(moment: datetime.datetime) -> str:
    return moment.isoformat(timespec="minutes")


class JsonRows:
    content_type = b"application/json"

    def __init__(self) -> None:
        self._first = True

    def head(self) -> bytes:
        return b'{"readings":['

    def rows(self, readings) -> bytes:
        # Made by hand, not by json.dumps a row: a third of the cost.  The
        # addresses and times are checked text without quotes or escapes.
        text = ",".join(
            f'{{"device_id":{r.device_id},"device_ip":"{r.device_ip}","taken_at":"{minutes(r.taken_at)}",'
            f'"temperature_c":{format_number(r.temperature_c)},"humidity_pct":{format_number(r.humidity_pct)}}}'
            for r in readings
        )
        if not text:
            return b""
        if not self._first:
            text = "," + text
        self._first = False
        return text.encode("utf-8")

    def tail(self, next_cursor: str | None) -> bytes:
        return ('],"next":' + json.dumps(next_cursor) + "}\n").encode("utf-8")


class CsvRows:
    content_type = b"text/csv; charset=utf-8"

    def head(self) -> bytes:
        return (",".join(COLUMNS) + "\n").encode("ascii")

    def rows(self, readings) -> bytes:
        return "".join(
            f"{r.device_id},{r.device_ip},{minutes(r.taken_at)},{format_number(r.temperature_c)},"
            f"{format_number(r.humidity_pct)}\n"
            for r in readings
        ).encode("utf-8")

    def tail(self, next_cursor: str | None) -> bytes:
        return b""


def base_name(device_ip: str) -> str:
    """
    A device's SenML base name: its address as a URN (RFC 9039's C{urn:dev}
    family), ending with a colon so that C{bn + n} reads
    C{urn:dev:ip:192.168.1.4:temperature}.
    """
    return f"urn:dev:ip:{device_ip}:"


class SenmlRows:
    """
    RFC 8428 SenML JSON: two records a reading (C{temperature} in C{Cel},
    C{humidity} in C{%RH}), C{t} in seconds (L{wall_seconds}), the base
    name set again whenever the device changes from the record before.
    """

    content_type = b"application/senml+json"

    def __init__(self) -> None:
        self._first = True
        self._name: str | None = None

    def head(self) -> bytes:
        return b"["

    def rows(self, readings) -> bytes:
        parts = []
        for r in readings:
            name = base_name(r.device_ip)
            bn = ""
            if name != self._name:
                bn = f'"bn":"{name}",'
                self._name = name
            t = wall_seconds(r.taken_at)
            parts.append(
                f'{{{bn}"n":"temperature","u":"Cel","v":{format_number(r.temperature_c)},"t":{t}}},'
                f'{{"n":"humidity","u":"%RH","v":{format_number(r.humidity_pct)},"t":{t}}}'
            )
        if not parts:
            return b""
        text = ",".join(parts)
        if not self._first:
            text = "," + text
        self._first = False
        return text.encode("utf-8")

    def tail(self, next_cursor: str | None) -> bytes:
        return b"]\n"


FORMATTERS = {"json": JsonRows, "csv": CsvRows, "senml": SenmlRows}
