"""
Times written for people in log lines: a local clock time with its zone,
never a raw count of seconds since 1970.  A program that needs the number
takes it from the log event's fields.
"""

from __future__ import annotations

import datetime


def local_time(seconds: float, tz: datetime.tzinfo | None = None) -> str:
    """
    Unix time C{seconds} as the clock on the wall reads it in C{tz}
    (C{None}: the system's time zone), with the zone's abbreviation:
    C{2026-12-02 00:07:13 CET}.
    """
    return _in_zone(seconds, tz).strftime("%Y-%m-%d %H:%M:%S %Z")


def utc_time(seconds: float) -> str:
    """
    Unix time C{seconds} in UTC, to the second: C{2026-12-01 23:07:13 UTC}.
    """
    return local_time(seconds, datetime.timezone.utc)


def iso_time(seconds: float, tz: datetime.tzinfo | None = None) -> str:
    """
    Unix time C{seconds} in ISO 8601 with microseconds and the offset of
    C{tz} (C{None}: the system's time zone): C{2026-12-02T00:07:13.250000+01:00}.
    Exact to the microsecond, so a program may read it back
    (C{datetime.datetime.fromisoformat}) to time an interval.
    """
    return _in_zone(seconds, tz).isoformat(timespec="microseconds")


def _in_zone(seconds: float, tz: datetime.tzinfo | None) -> datetime.datetime:
    if tz is None:
        # astimezone() without an argument: the system's zone, with its name.
        return datetime.datetime.fromtimestamp(seconds).astimezone()
    return datetime.datetime.fromtimestamp(seconds, tz)
