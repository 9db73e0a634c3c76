"""
The lab: the report's two subnets in network namespaces, with the real
twistd plugins inside (see meter/tools/lab.py and docs/lab.md).

The namespace tests need root, iproute2 and nftables; without them they are
skipped with the reason, except under CI as root, where the project installs
the tools (Makefile: lab-tools) and a missing one is a failure.  Every test
tears its lab down and checks that `ip netns list` shows nothing of it.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from meter.tools import lab as lab_module
from meter.gateway import peer_host
from meter.tools.lab import Lab, LabError
from meter.tools.processes import CONSOLE_LINE, Daemon

REPO_SURVEYS = Path(__file__).resolve().parent.parent / "surveys"
RECEIVED = re.compile(r"device (\d+) \(([0-9.]+):\d+\) reported ")


# -- anywhere ----------------------------------------------------------------


def test_peer_host_compares_with_fleet_addresses():
    assert peer_host("192.168.1.3:40001") == "192.168.1.3"
    assert peer_host("::ffff:192.168.1.3:40001") == "192.168.1.3"
    assert peer_host("[::1]:40001") == "::1"
    assert peer_host("::1:40001") == "::1"


def test_fleet_size_is_bounded_by_the_lan():
    with pytest.raises(LabError, match="from 1 to 253"):
        Lab(devices=254, workdir=Path("/nonexistent"))
    with pytest.raises(LabError, match="from 1 to 253"):
        Lab(devices=0, workdir=Path("/nonexistent"))
    with pytest.raises(LabError, match="--loss"):
        Lab(loss=101, workdir=Path("/nonexistent"))
    lab = Lab(devices=253, workdir=Path("/nonexistent"), run_id="abc123")
    assert lab.fleet[1] == "192.168.1.2" and lab.fleet[253] == "192.168.1.254"
    assert lab.gateway_ns == "mlab-abc123-gw" and lab.device_ns(7) == "mlab-abc123-d7"


def test_lab_needs_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "needs root" in lab_module.unavailable()


def test_loss_rules_drop_udp_both_ways_in_the_bridge():
    rules = Lab(loss=20, workdir=Path("/nonexistent")).loss_rules()
    assert rules.startswith("table bridge mlab {")
    assert rules.count("numgen random mod 100 < 20 counter drop") == 2
    assert 'iifname == "gw"' in rules and 'iifname != "gw"' in rules


# -- in namespaces -----------------------------------------------------------


@pytest.fixture(scope="module")
def lab_runs():
    reason = lab_module.unavailable()
    if reason is not None:
        if os.environ.get("CI") and os.geteuid() == 0:
            pytest.fail(f"CI runs as root, so the lab tests must run: {reason}")
        pytest.skip(reason)


def netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def root_links() -> set[str]:
    return lab_module._link_names(None)


@pytest.fixture
def make_lab(lab_runs, tmp_path):
    """
    Build labs for the test; tear them down after it and check nothing of
    them is left.
    """
    labs: list[Lab] = []
    before = root_links()

    def make(**kwargs) -> Lab:
        lab = Lab(workdir=tmp_path / f"lab{len(labs)}", **kwargs)
        labs.append(lab)
        lab.build()
        return lab

    yield make
    for lab in labs:
        lab.teardown()
        lab.teardown()  # idempotent
        assert lab.prefix not in netns_list()
    assert root_links() == before


def expected_console(lab: Lab) -> list[str]:
    return sorted(
        f"{address} - {line}"
        for device_id, address in lab.fleet.items()
        for line in (lab.surveys / f"device{device_id}.txt").read_text().splitlines()
    )


def daemon(lab: Lab, name: str) -> Daemon:
    return next(d for d in lab.daemons if d.name == name)


def test_day_of_four_devices_crosses_the_two_subnets(make_lab):
    lab = make_lab(devices=4)
    # The topology: nothing routes out, the gateway does not forward.
    for name in lab.all_ns():
        assert lab_module.command("ip", "-n", name, "route", "show", "default").strip() == ""
    assert lab_module.command("ip", "netns", "exec", lab.gateway_ns, "cat", "/proc/sys/net/ipv4/ip_forward").strip() == "0"
    gateway_addresses = lab_module.command("ip", "-n", lab.gateway_ns, "-brief", "address")
    assert "192.168.1.1/24" in gateway_addresses and "10.10.10.1/24" in gateway_addresses
    assert (lab.surveys / "device1.txt").read_text() == (REPO_SURVEYS / "device1.txt").read_text()

    result = lab.run()

    assert len(result.console) == 16
    assert all(CONSOLE_LINE.match(line) for line in result.console)
    assert sorted(result.console) == expected_console(lab)
    assert {CONSOLE_LINE.match(line).group(1) for line in result.console} == set(lab.fleet.values())
    gateway, cloud = daemon(lab, "gateway"), daemon(lab, "cloud")
    # The gateway saw each device's real source address.
    sources = {int(m.group(1)): m.group(2) for m in gateway.all_matching(RECEIVED)}
    assert sources == lab.fleet
    # It listens on its LAN address only, and reached the cloud from 10.10.10.1.
    sockets = lab_module.command("ip", "netns", "exec", lab.gateway_ns, "ss", "-uan")
    assert re.search(r"192\.168\.1\.1:10005\s", sockets), sockets
    assert cloud.all_matching(r"gateway 10\.10\.10\.1:\d+ connected")
    assert gateway.all_matching(r"connected to the cloud at 10\.10\.10\.2:\d+ from 10\.10\.10\.1:\d+ ")


def test_device_forging_another_address_is_refused(make_lab):
    lab = make_lab(devices=4)
    lab.start_cloud()
    gateway = lab.start_gateway()
    # Device 2's host (192.168.1.3) claims to be device 3 (192.168.1.4).
    forger = lab.start_device(3, host=2)
    assert forger.wait(30) == 1, forger.tail()
    assert forger.all_matching(r"gateway refused part 1/1: source: device 3 sends from 192\.168\.1\.4, not from 192\.168\.1\.3")
    gateway.wait_for(r"refused chunk from 192\.168\.1\.3:\d+: source: device 3 sends from 192\.168\.1\.4")
    # The real device 3 is taken.
    real = lab.start_device(3)
    assert real.wait(30) == 0, real.tail()
    assert any(m.group(2) == "192.168.1.4" for m in gateway.all_matching(RECEIVED) if m.group(1) == "3")
    gateway.stop()
    assert gateway.all_matching(r"\bwrong_source=1\b")


def test_twenty_percent_loss_twenty_devices_every_reading_once(make_lab):
    lab = make_lab(devices=20, loss=20)
    result = lab.run()

    assert len(result.console) == 80 == len(set(result.console)) == result.stored
    assert sorted(result.console) == expected_console(lab)
    with sqlite3.connect(lab.db) as connection:
        rows = connection.execute(
            "SELECT device_ip, taken_at, COUNT(*) FROM readings GROUP BY device_ip, taken_at"
        ).fetchall()
    assert len(rows) == 80
    assert all(count == 1 for _, _, count in rows)
    assert {ip for ip, _, _ in rows} == set(lab.fleet.values())
    # The LAN did drop datagrams, and the devices made up for them.
    seen = {direction: counts[0] for direction, counts in result.loss.items()}
    dropped = sum(counts[1] for counts in result.loss.values())
    assert seen["to_gateway"] >= 20 and seen["to_devices"] >= 1
    assert dropped > 0
    assert sum(result.retransmissions.values()) > 0


# -- the command -------------------------------------------------------------


def meter_lab(tmp_path: Path, *args: str) -> Daemon:
    return Daemon("meter lab", [sys.executable, "-m", "meter.tools.cli", "lab", "--dir", str(tmp_path / "lab"), *args])


def test_command_tears_down_on_ctrl_c(lab_runs, tmp_path):
    command = meter_lab(tmp_path, "--keep", "60")
    try:
        run_id = command.wait_for(r"^lab ([0-9a-f]{6}):").group(1)
        command.wait_for(r"16 readings from 4 devices", timeout=60)
        command.wait_for(r"stays up for 60 s")
        assert len(re.findall(rf"^mlab-{run_id}-", netns_list(), re.M)) == 7
        command.stop(signal.SIGINT, timeout=30)
        assert command.process.returncode == 0, command.tail()
        assert command.all_matching(rf"lab {run_id} torn down")
        assert f"mlab-{run_id}-" not in netns_list()
    finally:
        command.stop()


def test_down_removes_a_killed_run(lab_runs, tmp_path):
    command = meter_lab(tmp_path, "--keep", "60")
    run_id = None
    try:
        run_id = command.wait_for(r"^lab ([0-9a-f]{6}):").group(1)
        command.wait_for(r"stays up for 60 s", timeout=60)
        pids = [int(p) for ns in lab_module.namespaces(f"mlab-{run_id}-") for p in lab_module._pids(ns)]
        assert len(pids) == 2  # the cloud and the gateway
        command.kill()  # no teardown: the namespaces and daemons stay
        assert len(re.findall(rf"^mlab-{run_id}-", netns_list(), re.M)) == 7
        down = subprocess.run(
            [sys.executable, "-m", "meter.tools.cli", "lab", "--down", run_id], capture_output=True, text=True, timeout=60
        )
        assert down.returncode == 0, down.stderr
        assert "removed 7 namespaces" in down.stdout
        assert f"mlab-{run_id}-" not in netns_list()
        for pid in pids:
            assert not running(pid)
    finally:
        command.stop()
        if run_id is not None:
            lab_module.down(run_id)


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
