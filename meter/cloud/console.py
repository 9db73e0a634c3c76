"""
The cloud's console: each reading stored, one line each, as the report
prints them (C{192.168.1.4 - 02:00 - 17 - 35%}), and a header line naming
the day whenever the day of the lines changes
(C{--- readings of 2026-11-30 (the devices' local time) ---}): the report's
line carries a time of day only.
"""

from __future__ import annotations

import sys

from meter import wire


def console_text(columns: wire.BatchColumns) -> str:
    """
    The console lines of records, as the report prints them
    (C{192.168.1.4 - 02:00 - 17 - 35%}), each ending in a line feed.  The
    record text is canonical, so its fields are printed as they came.
    """
    # One join of the fields and the text between them: no string a line.
    count = len(columns)
    parts = [" - "] * (8 * count)
    parts[0::8] = columns.ips
    times = {stamp: stamp[11:] for stamp in set(columns.stamps)}
    parts[2::8] = map(times.__getitem__, columns.stamps)
    parts[4::8] = columns.temperatures
    parts[6::8] = columns.humidities
    parts[7::8] = ["%\n"] * count
    return "".join(parts)


def day_header(day: str) -> str:
    """
    The line above the readings of C{day} (C{YYYY-MM-DD}): no reading's
    line looks like it.
    """
    return f"--- readings of {day} (the devices' local time) ---\n"


class DayHeaders:
    """
    The console's text of each batch (as L{console_text}) with a
    L{day_header} wherever the day of the lines changes from the line before,
    across batches: a day's round, forwarded in many batches, has one
    header; a late day printed among another day's lines gets its own.
    """

    def __init__(self) -> None:
        #: The day of the last line printed.
        self._day: str | None = None

    def text(self, columns: wire.BatchColumns) -> str:
        body = console_text(columns)
        stamps = columns.stamps
        days = {stamp[:10] for stamp in set(stamps)}
        if len(days) == 1:
            # A batch holds one day, as a round is forwarded: no work a line.
            (day,) = days
            if day == self._day:
                return body
            self._day = day
            return day_header(day) + body
        parts = []
        for stamp, line in zip(stamps, body.splitlines(keepends=True)):
            day = stamp[:10]
            if day != self._day:
                self._day = day
                parts.append(day_header(day))
            parts.append(line)
        return "".join(parts)


def write_console(text: str) -> None:
    """
    Write C{text} to the process's real stdout, not twistd's log: the lines
    must read exactly as the report prints them, with no log prefix.  One
    write and one flush per batch.
    """
    out = sys.__stdout__
    out.write(text)
    out.flush()
