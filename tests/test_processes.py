"""
meter.tools.processes: the one daemon runner, whose output is read from a
pipe (the tests, the demo, the lab) or from the log file it writes (the
bench); one body of tests runs over both.
"""

from __future__ import annotations

import sys

import pytest

from meter.tools.processes import Daemon, DaemonError, Daemons

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
