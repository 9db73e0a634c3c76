"""
End to end: the three real twistd plugins as child processes on free
loopback ports, a fleet of six devices, the cloud's console and database.
"""

from __future__ import annotations

import datetime
import re
import time

import pytest

from meter.tools.processes import CONSOLE_LINE

pytestmark = pytest.mark.e2e


@pytest.fixture
def suite(make_suite):
    return make_suite(6)


def test_six_devices_day_reaches_console_and_database(suite):
    cloud = suite.start_cloud()
    gateway = suite.start_gateway()
    gateway.wait_for("connected to the cloud")
    devices = [suite.start_device(device_id) for device_id in suite.fleet]
    for device in devices:
        assert device.wait(30) == 0, device.tail()
    day = datetime.date.fromtimestamp(time.time()) - datetime.timedelta(days=1)

    console = [m.group(0) for m in cloud.collect(CONSOLE_LINE, 6 * 4)]
    expected_console = sorted(
        f"{address} - {at[-5:]} - {temperature:g} - {humidity:g}%"
        for _, address, at, temperature, humidity in suite.expected_rows(day)
    )
    assert sorted(console) == expected_console
    gateway.wait_for(r"round \S+ complete: every expected device reported")
    cloud.wait_for("acknowledged at ")
    assert suite.stored() == suite.expected_rows(day)
    # The gateway logs what the report's console said.
    assert gateway.all_matching(r"device 3 \(127\.0\.0\.1:\d+\) reported \S+ in 1 chunks: [1-6] of 6 devices")
    assert gateway.all_matching(r"forwarding batch \w+ of 24 readings")
    assert gateway.all_matching(r"batch \w+ acknowledged by the cloud")
    # The receive buffer of [gateway] receive_buffer_mb, or a warning that
    # the kernel capped it (the tests run as root, which may go past the cap).
    assert gateway.all_matching(r"receive buffer (16 MiB$|[\d.]+ MiB, not the 16 MiB)")


def test_bad_option_is_refused_before_binding(suite):
    daemon = suite.start("gateway", "meter-gateway", "--deadline", "soon")
    assert daemon.wait(20) != 0
    assert daemon.all_matching(r"--deadline: expected a number")
    assert not suite.spool.exists()


def test_once_device_without_gateway_exits_non_zero(suite):
    device = suite.start_device(1, "--gateway", "127.0.0.1:9")
    # ack_timeout 0.5 s, 4 retransmissions: gives up after about 20 s at most.
    assert device.wait(40) == 1
    assert device.all_matching(r"meter-device 1: day not delivered: no acknowledgement")


@pytest.mark.parametrize(
    "survey, refusal",
    [
        ("08:00 - 20 - 30%\n# again\n08:00 - 21 - 31%\n", ":3: time 08:00 already read at line 1"),
        # float() would read 1e1; a survey's number is digits, an optional
        # minus and point (docs/protocol.md, "Survey files").
        ("08:00 - 20 - 30%\n\n12:00 - 1e1 - 31%\n", ":3: temperature '1e1' is not a number"),
    ],
    ids=["time twice", "exponent"],
)
def test_once_device_refuses_its_survey_naming_file_and_line_and_sends_nothing(suite, survey, refusal):
    path = suite.surveys / "device1.txt"
    path.write_text(survey)
    device = suite.start_device(1)
    assert device.wait(20) == 1
    assert device.all_matching(rf"^meter-device 1: cannot read the day's survey: {re.escape(str(path) + refusal)}")
    assert device.all_matching(r"sending \d+ readings") == []
