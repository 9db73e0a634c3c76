"""
The daemons' logs (meter/logs.py): JSON lines with no record separator,
a log file of its own for each daemon run detached, and the cloud's
console lines kept in a file when its standard output goes nowhere.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from twisted.logger import Logger, eventFromJSON

from meter import logs
from meter.cloud.console_file import ConsoleFile, console_path
from meter.tools.processes import CONSOLE_DAY, _FileOutput, twistd


def test_json_line_is_one_line_of_json_without_record_separator():
    lines = []
    log = Logger(namespace="meter.test", observer=lambda event: lines.append(logs.json_line(event)))
    log.warn("cloud {address} unreachable:\n{why}", address="127.0.0.1:8001", why="connection refused")
    (line,) = lines
    assert line.endswith("\n") and line.count("\n") == 1
    assert "\x1e" not in line
    record = json.loads(line)
    assert record["address"] == "127.0.0.1:8001"
    assert record["log_text"] == "cloud 127.0.0.1:8001 unreachable:\nconnection refused"
    assert record["log_namespace"] == "meter.test"
    assert eventFromJSON(line)["why"] == "connection refused"


@pytest.mark.parametrize(
    "given, expected",
    [
        ({"nodaemon": True, "logfile": None}, None),
        ({"nodaemon": False, "logfile": None}, "meter-gateway.log"),
        ({"nodaemon": False, "logfile": "/var/log/gw.log"}, "/var/log/gw.log"),
        ({"nodaemon": False, "logfile": None, "syslog": True}, None),
    ],
)
def test_a_daemon_gets_its_own_log_file(given, expected):
    logs.configure(given, "text", "meter-gateway.log")
    assert given["logfile"] == expected
    assert "logger" not in given


@pytest.fixture
def sigusr1():
    """
    Whatever a test installs on SIGUSR1 (a log file's rotation) is undone.
    """
    previous = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, previous)


def test_json_format_sets_twistds_observer(tmp_path, sigusr1):
    parent = {"nodaemon": False, "logfile": None}
    logs.configure(parent, "json", str(tmp_path / "meter-cloud.log"))
    assert parent["logger"] == "meter.logs.json_observer"
    observer = logs.json_observer()
    Logger(observer=observer).info("hello {who}", who="operator")
    (line,) = (tmp_path / "meter-cloud.log").read_text().splitlines()
    assert json.loads(line)["log_text"] == "hello operator"


def test_json_format_with_syslog_is_refused():
    # twistd would call the JSON observer with no file to write to, and end
    # its detached start in a traceback.
    parent = {"nodaemon": False, "logfile": None, "syslog": True}
    with pytest.raises(ValueError, match="--log-format json .* not with twistd's --syslog"):
        logs.configure(parent, "json", "meter-cloud.log")


def test_log_format_refuses_other_values():
    with pytest.raises(ValueError, match="--log-format: expected one of text, json, got 'yaml'"):
        logs.log_format("yaml")


def test_foreground_json_log_is_json_lines(make_suite):
    """
    The real plugins with --log-format json (the suite's logs=True): every
    line of their output is a JSON object but the cloud's console lines,
    and their day's header, and no byte is a record separator.
    """
    suite = make_suite(devices=1, logs=True)
    cloud = suite.start_cloud()
    suite.start_gateway(connected=True)
    device = suite.start_device(1)
    assert device.wait(60) == 0
    suite.wait_stored(4, cloud)
    suite.stop()
    for name in ("cloud", "gateway", "device-1"):
        raw = (suite.root / f"{name}.log").read_bytes()
        assert b"\x1e" not in raw
        lines = raw.decode().splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        assert records, name
        others = [line for line in lines if not line.startswith("{")]
        if name == "cloud":
            header, *readings = others
            assert CONSOLE_DAY.match(header), others
            assert len(readings) == 4 and all(line.startswith("192.168.1.2 - ") for line in readings), others
        else:
            assert others == []


def test_console_path():
    db = Path("var/cloud.sqlite")
    assert console_path(None, db, daemon=False) is None
    assert console_path(None, db, daemon=True) == Path("var/cloud-console.log")
    assert console_path(Path("-"), db, daemon=True) is None
    assert console_path(Path("/srv/console.txt"), db, daemon=False) == Path("/srv/console.txt")


def test_console_file_follows_a_rotation(tmp_path):
    path = tmp_path / "console.log"
    console = ConsoleFile(path)
    console.write("192.168.1.2 - 02:00 - 17 - 35%\n")
    path.rename(tmp_path / "console.log.1")
    console.write("192.168.1.2 - 09:00 - 19 - 32%\n")
    console.close()
    assert (tmp_path / "console.log.1").read_text() == "192.168.1.2 - 02:00 - 17 - 35%\n"
    assert path.read_text() == "192.168.1.2 - 09:00 - 19 - 32%\n"


class _Running:
    """
    A process to L{_FileOutput} that never ends: the daemons are not our
    children (twistd detaches them), and are stopped by their pids.
    """

    def poll(self):
        return None


def _read_until(path: Path, count: int, timeout: float = 60.0) -> list[str]:
    output = _FileOutput(path, _Running())
    lines: list[str] = []
    try:
        while len(lines) < count:
            new = output.read(timeout)
            assert new, f"{path}: {len(lines)} of {count} lines within {timeout:g} s: {lines}"
            lines += new
    finally:
        output.close()
    return lines


def _stop(pidfile: Path) -> None:
    """
    SIGTERM to the pid in C{pidfile}, and wait until that process is gone.
    """
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text())
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        readable, _, _ = select.select([handle], [], [], 30)
        if not readable:
            os.kill(pid, signal.SIGKILL)
            select.select([handle], [], [], 30)
    finally:
        os.close(handle)


def test_daemons_started_from_one_folder_each_write_their_own_log(make_suite, tmp_path):
    """
    The cloud, the gateway and a device run detached (no -n) from one
    folder: three log files (the gateway's in JSON), no shared twistd.log,
    and the cloud's console lines in the file beside its database.
    """
    suite = make_suite(devices=1)
    notify = tmp_path / "notify.sock"
    root = suite.root
    started = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(notify))
        manager.settimeout(60)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify)}
        try:
            for plugin, args, pidfile in [
                ("meter-cloud", [], "meter-cloud.pid"),
                ("meter-gateway", ["--log-format", "json"], "meter-gateway.pid"),
                ("meter-device", ["--id", "1"], "meter-device-1.pid"),
            ]:
                command = [arg for arg in twistd(plugin, "--config", str(suite.config), *args) if arg != "-n"]
                started.append(root / pidfile)
                launched = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=60)
                assert launched.returncode == 0, launched.stderr
                # Detached: READY=1 from the daemon once it serves.
                assert manager.recv(4096).startswith(b"READY=1")
                assert (root / pidfile).exists()
            console = _read_until(root / "cloud-console.log", 5)
        finally:
            for pidfile in reversed(started):
                _stop(pidfile)
    header, *readings = console
    assert CONSOLE_DAY.match(header), console
    assert len(readings) == 4 and all(line.startswith("192.168.1.2 - ") for line in readings), console
    assert not (root / "twistd.log").exists()
    cloud_log = (root / "meter-cloud.log").read_text()
    assert "console lines appended to" in cloud_log and "cloud stopped" in cloud_log
    assert "meter.gateway" not in cloud_log and "meter.device" not in cloud_log
    gateway_records = [json.loads(line) for line in (root / "meter-gateway.log").read_text().splitlines()]
    assert any(record["log_text"].startswith("gateway for 1 devices") for record in gateway_records)
    assert any(record["log_text"].startswith("gateway stopped") for record in gateway_records)
    device_log = (root / "meter-device-1.log").read_text()
    assert "device 1 (192.168.1.2) sending 4 readings" in device_log
    assert "meter.gateway" not in device_log and "meter.cloud" not in device_log
