"""
Failures an operator causes end in one readable line and a non-zero exit,
never in a traceback: a configuration error, a device's survey missing, bad
or empty with --once, a port already in use.  The real twistd plugins as
subprocesses (meter.tools.suite.Suite), as an operator runs them.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess

import pytest
from twisted.internet.error import CannotListenError

from meter.listening import cannot_listen
from meter.tools.processes import twistd

pytestmark = pytest.mark.e2e


@pytest.fixture
def suite(make_suite):
    return make_suite(2)


def only_line(daemon, timeout: float = 30) -> str:
    """
    The one line C{daemon} printed before it exited non-zero.
    """
    assert daemon.wait(timeout) != 0, daemon.tail()
    assert len(daemon.lines) == 1, daemon.tail()
    return daemon.lines[0]


def last_line(daemon, timeout: float = 30) -> str:
    """
    The last line C{daemon} printed before it exited non-zero, no
    traceback before it.
    """
    assert daemon.wait(timeout) != 0, daemon.tail()
    assert not [line for line in daemon.lines if "Traceback" in line or "File \"" in line], daemon.tail()
    return daemon.lines[-1]


# -- configuration errors: the error alone, not after twistd's usage text --------


def test_a_bad_value_in_the_file_is_one_line_naming_the_file_and_key(suite):
    suite.config.write_text(suite.config.read_text().replace("deadline = 30.0", 'deadline = "soon"'))
    line = only_line(suite.start("gateway", "meter-gateway"))
    assert line == f"meter-gateway: {suite.config} [gateway] deadline: expected a number, got 'soon'"


def test_an_unknown_key_is_one_line_naming_the_file_and_key(suite):
    suite.config.write_text(suite.config.read_text().replace("[cloud]\n", "[cloud]\nlisten_on = 3\n"))
    line = only_line(suite.start("cloud", "meter-cloud"))
    assert line.startswith(f"meter-cloud: {suite.config} [cloud] listen_on: unknown key (known: listen, db, ")


def test_a_file_that_is_not_toml_is_one_line_naming_it(suite):
    suite.config.write_text("[device\n")
    line = only_line(suite.start("device 1", "meter-device", "--id", "1"))
    assert line == f"meter-device: {suite.config}: not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 8)"


def test_a_bad_option_value_is_one_line_naming_the_option(suite):
    line = only_line(suite.start("gateway", "meter-gateway", "--deadline", "-1"))
    assert line == "meter-gateway: --deadline: expected a number above 0, got '-1'"


def test_a_device_outside_the_fleet_is_one_line(suite):
    line = only_line(suite.start("device 9", "meter-device", "--id", "9", "--once"))
    assert line == f"meter-device: --id 9: not a device of [fleet] in {suite.config} (devices: 1, 2)"


# -- a device's survey with --once -------------------------------------------------


def test_once_with_a_missing_survey_is_one_line_naming_the_file(suite):
    path = suite.surveys / "device1.txt"
    path.unlink()
    line = only_line(suite.start_device(1))
    assert line == f"meter-device 1: cannot read the day's survey: {path}: cannot read survey: No such file or directory"


def test_once_with_a_bad_survey_is_one_line_naming_the_file_and_line(suite):
    path = suite.surveys / "device1.txt"
    path.write_text("08:00 - 20 - 30%\nnoon - 21 - 30%\n")
    line = only_line(suite.start_device(1))
    assert line == f"meter-device 1: cannot read the day's survey: {path}:2: time 'noon' is not HH:MM (00:00 to 23:59)"


@pytest.mark.parametrize("text", ["", "# the sensor wrote nothing\n\n"], ids=["empty", "comments only"])
def test_once_with_an_empty_survey_is_refused_not_sent_as_no_readings(suite, text):
    path = suite.surveys / "device1.txt"
    path.write_text(text)
    line = only_line(suite.start_device(1))
    assert line == f"meter-device 1: cannot read the day's survey: {path}: no readings in it (an empty day is not sent)"


def test_a_daily_device_with_an_empty_survey_says_so_and_sends_nothing(suite):
    gateway = suite.start_gateway()
    (suite.surveys / "device1.txt").write_text("")
    device = suite.start("device 1", "meter-device", "--id", "1")
    device.wait_for(r"device 1: cannot read the day's survey: .*device1\.txt: no readings in it \(an empty day is not sent\)")
    device.wait_for(r"device 1: next send at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \w+")
    assert not device.all_matching(r"sending \d+ readings")
    device.stop()
    gateway.stop()
    assert not gateway.all_matching(r"reported|round \S+ opened")
    # lines for people: no object reprs, no protocol start and stop lines
    for daemon in (device, gateway):
        assert not daemon.all_matching(r"object at 0x|Starting protocol|Stopping protocol"), daemon.tail()


# -- a port already in use ------------------------------------------------------


@contextlib.contextmanager
def holding(kind: int, port: int):
    """
    Another process's socket on 127.0.0.1:C{port} (a listening one for TCP).
    """
    with socket.socket(socket.AF_INET, kind) as held:
        held.bind(("127.0.0.1", port))
        if kind == socket.SOCK_STREAM:
            held.listen()
        yield


def test_the_gateways_udp_port_in_use_is_one_line_naming_it_and_the_setting(suite):
    with holding(socket.SOCK_DGRAM, suite.gateway_port):
        gateway = suite.start("gateway", "meter-gateway")
        line = last_line(gateway)
    assert line.endswith(
        f"meter-gateway: cannot listen on UDP 127.0.0.1:{suite.gateway_port}: address already in use (another process "
        f"listens there); choose another with --listen or [gateway] listen in {suite.config}"
    ), gateway.tail()


def test_the_clouds_tcp_port_in_use_is_one_line_naming_it_and_the_setting(suite):
    with holding(socket.SOCK_STREAM, suite.cloud_port):
        cloud = suite.start("cloud", "meter-cloud")
        line = last_line(cloud)
    assert line.endswith(
        f"meter-cloud: cannot listen on TCP 127.0.0.1:{suite.cloud_port}: address already in use (another process "
        f"listens there); choose another with --listen or [cloud] listen in {suite.config}"
    ), cloud.tail()


def test_detached_a_port_in_use_is_said_by_the_launching_command_with_a_non_zero_exit(suite):
    # Without -n, twistd starts the services in its detached child, whose
    # standard error goes nowhere: the command that launched it must say why
    # the start failed, and end (a bare SystemExit left it waiting for ever).
    command = [arg for arg in twistd("meter-gateway", "--config", str(suite.config)) if arg != "-n"]
    with holding(socket.SOCK_DGRAM, suite.gateway_port):
        launched = subprocess.run(command, cwd=suite.root, capture_output=True, text=True, timeout=30)
    assert launched.returncode == 1, launched.stderr
    assert f"meter-gateway: cannot listen on UDP 127.0.0.1:{suite.gateway_port}" in launched.stderr, launched.stderr


def test_a_port_in_use_named_by_the_option_names_the_option_too(suite):
    with holding(socket.SOCK_STREAM, suite.cloud_port):
        cloud = suite.start("cloud", "meter-cloud", "--listen", f"tcp:{suite.cloud_port}:interface=127.0.0.1")
        assert re.search(r"choose another with --listen or \[cloud\] listen in ", last_line(cloud))


def test_cannot_listen_says_the_cause_for_other_errors_too():
    import errno

    refused = CannotListenError("::1", 80, OSError(errno.EACCES, "Permission denied"))
    assert cannot_listen("meter-cloud", "TCP", refused, "--listen or [cloud] listen in etc/meter.toml") == (
        "meter-cloud: cannot listen on TCP [::1]:80: permission denied (ports below 1024 need privileges); "
        "choose another with --listen or [cloud] listen in etc/meter.toml"
    )
