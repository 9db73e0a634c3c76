"""
The cloud's console says which day its lines belong to: a header line
whenever the day changes, the report's lines unchanged.
"""

from __future__ import annotations

import pytest
from twisted.internet import task

from meter import cloud, wire
from meter.testing import MemoryReadingStore
from meter.tools import cli
from meter.tools.processes import CONSOLE_DAY, CONSOLE_LINE


def columns(*records: str) -> wire.BatchColumns:
    return wire.BatchColumns.of(";".join(records))


A = "3,192.168.1.4,2026-11-30T02:00,17,35"
B = "1,192.168.1.2,2026-11-30T08:00,20,30"
C = "1,192.168.1.2,2026-12-01T00:00,21,31"
HEADER_30 = "--- readings of 2026-11-30 (the devices' local time) ---"
HEADER_01 = "--- readings of 2026-12-01 (the devices' local time) ---"


def test_a_header_only_when_the_day_changes_across_batches():
    headers = cloud.DayHeaders()
    assert headers.text(columns(A)).splitlines() == [HEADER_30, "192.168.1.4 - 02:00 - 17 - 35%"]
    assert headers.text(columns(B)).splitlines() == ["192.168.1.2 - 08:00 - 20 - 30%"]
    assert headers.text(columns(C)).splitlines() == [HEADER_01, "192.168.1.2 - 00:00 - 21 - 31%"]


def test_a_batch_of_several_days_gets_a_header_at_each_change():
    headers = cloud.DayHeaders()
    assert headers.text(columns(A, C, B)).splitlines() == [
        HEADER_30, "192.168.1.4 - 02:00 - 17 - 35%",
        HEADER_01, "192.168.1.2 - 00:00 - 21 - 31%",
        HEADER_30, "192.168.1.2 - 08:00 - 20 - 30%",
    ]


def test_the_header_is_no_reading_line_and_has_a_pattern_of_its_own():
    assert not CONSOLE_LINE.match(HEADER_30)
    assert CONSOLE_DAY.match(HEADER_30).group(1) == "2026-11-30"
    assert cloud.day_header("2026-11-30") == HEADER_30 + "\n"


def test_the_store_prints_through_its_console_format_only_what_is_new():
    printed: list[str] = []
    clock = task.Clock()
    store = cloud.CloudStore(MemoryReadingStore(), printed.append, clock, console_format=cloud.DayHeaders().text)
    store.store(wire.Batch("b1", ";".join((A, B))), "gw")
    # Sent again with one more reading: only that one is printed.
    store.store(wire.Batch("b2", ";".join((A, B, C))), "gw")
    assert "".join(printed).splitlines() == [
        HEADER_30, "192.168.1.4 - 02:00 - 17 - 35%", "192.168.1.2 - 08:00 - 20 - 30%",
        HEADER_01, "192.168.1.2 - 00:00 - 21 - 31%",
    ]


@pytest.mark.e2e
def test_the_demo_shows_the_day_header_above_its_lines(make_suite, monkeypatch, tmp_path, capsys):
    suite = make_suite(4)
    monkeypatch.chdir(suite.root)
    assert cli.main(["demo", "--config", str(suite.config), "--dir", str(tmp_path / "demo")]) == 0
    shown = capsys.readouterr().out.splitlines()
    start = shown.index("The cloud's console:")
    assert CONSOLE_DAY.match(shown[start + 1].strip())
    assert sum(bool(CONSOLE_LINE.match(line.strip())) for line in shown) == 16
