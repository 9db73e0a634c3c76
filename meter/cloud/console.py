"""
The cloud's console: each reading stored, one line each, as the report
prints them (C{192.168.1.4 - 02:00 - 17 - 35%}).
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


def write_console(text: str) -> None:
    """
    Write C{text} to the process's real stdout, not twistd's log: the lines
    must read exactly as the report prints them, with no log prefix.  One
    write and one flush per batch.
    """
    out = sys.__stdout__
    out.write(text)
    out.flush()
