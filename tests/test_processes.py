"""
meter.tools.processes: the one daemon runner, whose output is read from a
pipe (the tests, the demo, the lab) or from the log file it writes (the
bench); one body of tests runs over both.
"""

from __future__ import annotations

import datetime
import resource
import socket
import sys

import pytest

from meter.clocktext import iso_time
from meter.tools.processes import Daemon, DaemonError, Daemons, _ephemeral_floor, free_port, stamp

#: A child that prints three lines, then exits, or with "linger" waits to
#: be stopped.
CHILD = """
import sys, time
for line in ("first", "second 2", "third 3"):
    print(line, flush=True)
if sys.argv[1:] == ["linger"]:
    time.sleep(60)
"""


@pytest.fixture(params=["pipe", "log file"])
def start(request, tmp_path):
    started: list[Daemon] = []

    def start(*args: str) -> Daemon:
        log = tmp_path / f"child{len(started)}.log" if request.param == "log file" else None
        daemon = Daemon("child", [sys.executable, "-c", CHILD, *args], cwd=tmp_path, log=log)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def test_waits_consume_lines_in_order(start):
    child = start()
    assert child.wait(20) == 0
    assert child.wait_for(r"second (\d)").group(1) == "2"
    assert child.new_lines() == ["third 3"]
    assert child.new_lines() == []
    assert [m.group(0) for m in child.all_matching(r"\d")] == ["2", "3"]


def test_stats_of_a_running_daemon(start):
    child = start("linger")
    child.wait_for("first")
    stats = child.stats()
    assert stats["cpu_s"] >= 0 and stats["peak_rss_mb"] >= stats["rss_mb"] > 0


def test_seen_or_wait_takes_a_line_already_read(start):
    child = start("linger")
    child.wait_for("third")
    child.seen_or_wait("first", timeout=0)


def test_a_line_never_printed_is_reported_with_the_output(start):
    child = start()
    with pytest.raises(DaemonError, match=r"child exited \(0\) before printing /fourth/; its last output:\n    first"):
        child.wait_for("fourth", 10)


def test_a_line_not_printed_in_time(start):
    child = start("linger")
    with pytest.raises(DaemonError, match=r"child printed no /fourth/ within 0.2 s"):
        child.wait_for("fourth", 0.2)
    assert child.stop() != 0  # SIGTERM


def test_wait_returns_the_exit_status_and_every_line(start):
    child = start()
    assert child.wait(20) == 0
    assert child.lines == ["first", "second 2", "third 3"]


def test_daemons_stop_in_reverse_and_write_logs(tmp_path):
    daemons = Daemons(None, cwd=tmp_path, logs=True)
    first = daemons.run("first one", [sys.executable, "-c", CHILD, "linger"])
    second = daemons.run("second", [sys.executable, "-c", CHILD, "linger"])
    first.wait_for("third")
    assert list(daemons) == [first, second]
    assert daemons.stop() == []
    assert first.process.returncode is not None and second.process.returncode is not None
    assert (tmp_path / "first-one.log").read_text().splitlines() == ["first", "second 2", "third 3"]
    assert first.final is not None and "peak_rss_mb" in first.final


#: A child that logs through the observer twistd gets with --logger when a
#: suite keeps its logs, then prints a plain line (as the cloud's console).
RECORDING_CHILD = """
from twisted.logger import Logger, globalLogBeginner
from meter.tools.processes import json_records
globalLogBeginner.beginLoggingTo([json_records()], redirectStandardIO=False)
log = Logger(namespace="child")
log.info("batch {batch_id} committed in {ms:.1f} ms", batch_id="ab", ms=1.25)
log.info("batch {batch_id} committed in {ms:.1f} ms", batch_id="cd", ms=2.5)
print("192.168.1.2 - 08:00 - 20 - 30%", flush=True)
"""


@pytest.mark.parametrize("output", ["pipe", "log file"])
def test_json_log_records_give_their_fields_and_their_text(tmp_path, output):
    log = tmp_path / "child.log" if output == "log file" else None
    daemon = Daemon("child", [sys.executable, "-c", RECORDING_CHILD], cwd=tmp_path, log=log)
    assert daemon.wait() == 0
    assert [(e["batch_id"], e["ms"]) for e in daemon.records_of("batch {batch_id} committed")] == [
        ("ab", 1.25), ("cd", 2.5)
    ]
    assert daemon.wait_for(r"batch cd committed in 2\.5 ms").group(0)
    assert daemon.all_matching(r"^192\.168\.1\.2 - 08:00 - 20 - 30%$")
    assert [e["batch_id"] for e in daemon.new_records("batch")] == ["ab", "cd"]
    assert daemon.new_records("batch") == []


@pytest.mark.parametrize("zone", [None, datetime.timezone(datetime.timedelta(hours=-3, minutes=-30))])
def test_a_logged_time_reads_back_to_the_microsecond(zone):
    # The demo and the lab time a run from the first device's send to the
    # cloud's last acknowledgement, as the daemons log them for people.
    assert stamp(iso_time(1772400000.123456, zone)) == 1772400000.123456


def test_a_free_port_is_never_one_a_bind_to_port_zero_can_take():
    # The suite asks for the cloud's port, then the cloud binds its web port
    # to port 0 before its own: a port in the kernel's ephemeral range could
    # be handed to the web port in between.
    floor = _ephemeral_floor()
    taken = []
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as ephemeral:
        ephemeral.bind(("127.0.0.1", 0))
        assert ephemeral.getsockname()[1] >= floor
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM) * 50:
            port = free_port(kind)
            assert 1024 <= port < floor
            taken.append(port)
    assert len(set(taken)) == len(taken)


def test_a_port_in_use_is_not_handed_out():
    floor = _ephemeral_floor()
    # Hold most of the range free_port draws from, as far as the descriptor
    # limit lets: what it returns is still bindable.
    room = min(11000, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200)
    held = []
    try:
        for port in range(max(1024, floor - 12000), floor):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
            if len(held) >= room:
                break
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))
    finally:
        for s in held:
            s.close()
