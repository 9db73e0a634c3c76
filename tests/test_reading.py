"""
meter.reading: the Reading value, its checks and its console line.
"""

from __future__ import annotations

import datetime

import pytest

from meter.reading import Reading, ReadingError, format_number


def at(hhmm: str) -> datetime.datetime:
    hour, minute = map(int, hhmm.split(":"))
    return datetime.datetime(2026, 3, 1, hour, minute)


# -- the value --------------------------------------------------------------


@pytest.mark.parametrize(
    "temperature, humidity",
    [(85.5, 30), (-41, 30), (20, 100.01), (20, -0.5), (float("nan"), 30), (20, float("inf"))],
)
def test_reading_refuses_impossible_values(temperature, humidity):
    with pytest.raises(ReadingError):
        Reading(1, "192.168.1.2", at("08:00"), temperature, humidity)


def test_reading_is_frozen():
    reading = Reading(1, "192.168.1.2", at("08:00"), 20.0, 30.0)
    with pytest.raises(AttributeError):
        reading.temperature_c = 21.0


def test_console_line_is_the_reports_format():
    reading = Reading(3, "192.168.1.4", at("02:00"), 17.0, 35.0)
    assert reading.console_line() == "192.168.1.4 - 02:00 - 17 - 35%"


def test_console_line_keeps_fractions_and_signs():
    reading = Reading(1, "192.168.1.2", at("23:05"), -3.5, 32.25)
    assert reading.console_line() == "192.168.1.2 - 23:05 - -3.5 - 32.25%"


@pytest.mark.parametrize(
    "value, text",
    [
        (17, "17"),
        (17.0, "17"),
        (17.25, "17.25"),
        (0, "0"),
        (-40, "-40"),
        (100.0, "100"),
        (0.1, "0.1"),
        (-3.5, "-3.5"),
        (0.00001, "0.00001"),  # never an exponent: the wire has none
        (-0.000025, "-0.000025"),
        (-0.0, "0"),  # one text for zero: the wire refuses -0
    ],
)
def test_format_number(value, text):
    assert format_number(value) == text
