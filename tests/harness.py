"""
A meter suite on loopback for end-to-end and fault tests: a temporary
configuration with free ports, survey files for a fleet, and the real twistd
plugins started as child processes (see L{meter.tools.processes}).
"""

from __future__ import annotations

import datetime
import socket
import sqlite3
import sys
import time
from pathlib import Path

from meter import config
from meter.tools.lab import survey_text
from meter.tools.processes import Daemon, DaemonError, free_port, twistd

#: The fleet-in-one-process driver of the fault tests.
FLEET = Path(__file__).resolve().parent / "fleet.py"


class Suite:
    """
    The files and daemons of one test's meter suite, under C{root}.
    """

    def __init__(
        self, root: Path, devices: int, readings: int = 4, *, device: dict | None = None, cloud: dict | None = None,
        **gateway,
    ):
        self.root = root
        self.fleet = {i: f"192.168.1.{i + 1}" for i in range(1, devices + 1)}
        self.readings = readings
        self.cloud_port = free_port(socket.SOCK_STREAM)
        self.gateway_port = free_port(socket.SOCK_DGRAM)
        self.db = root / "cloud.sqlite"
        self.spool = root / "spool.sqlite"
        self.surveys = root / "surveys"
        self.surveys.mkdir()
        for device_id in self.fleet:
            (self.surveys / f"device{device_id}.txt").write_text(survey_text(device_id, readings))
        settings = {
            "cloud": {"listen": f"tcp:{self.cloud_port}:interface=127.0.0.1", "db": str(self.db), **(cloud or {})},
            "gateway": {
                "listen": f"127.0.0.1:{self.gateway_port}",
                "cloud": f"127.0.0.1:{self.cloud_port}",
                "spool": str(self.spool),
                "deadline": 30.0,
                "max_backoff": 1.0,
                # Every test device sends from 127.0.0.1: one source address
                # for the whole fleet, so its flood limit is lifted here.
                "source_rate": 1e6,
                "source_burst": 1e6,
                **gateway,
            },
            "device": {
                "gateway": f"127.0.0.1:{self.gateway_port}",
                "surveys": str(self.surveys),
                "ack_timeout": 0.5,
                **(device or {}),
            },
        }
        self.config = root / "meter.toml"
        self.config.write_text(config.render(settings, self.fleet))
        self.daemons: list[Daemon] = []

    def start(self, name: str, plugin: str, *args: str) -> Daemon:
        daemon = Daemon(name, twistd(plugin, "--config", str(self.config), *args), cwd=self.root)
        self.daemons.append(daemon)
        return daemon

    def start_cloud(self) -> Daemon:
        cloud = self.start("cloud", "meter-cloud")
        cloud.wait_for(r"Factory (\(TLS\) )?starting on")
        return cloud

    def start_gateway(self) -> Daemon:
        gateway = self.start("gateway", "meter-gateway")
        gateway.wait_for("GatewayProtocol starting on")
        return gateway

    def start_device(self, device_id: int, *args: str) -> Daemon:
        return self.start(f"device {device_id}", "meter-device", "--id", str(device_id), "--once", *args)

    def stored(self) -> list[tuple]:
        """
        Every row of the cloud's database: (device_id, device_ip, taken_at,
        temperature, humidity), in key order.
        """
        with sqlite3.connect(self.db) as connection:
            return connection.execute(
                "SELECT device_id, device_ip, taken_at, temperature_c, humidity_pct FROM readings"
                " ORDER BY device_id, taken_at"
            ).fetchall()

    def count_stored(self) -> int:
        with sqlite3.connect(self.db) as connection:
            return connection.execute("SELECT count(*) FROM readings").fetchone()[0]

    def expected_rows(self, day: datetime.date, devices=None) -> list[tuple]:
        """
        The rows L{stored} must hold once C{devices} (default: the whole
        fleet) delivered C{day}: each reading of their survey files, once.
        """
        rows = []
        for device_id in self.fleet if devices is None else devices:
            for line in survey_text(device_id, self.readings).splitlines():
                hhmm, temperature, humidity = line.rstrip("%").split(" - ")
                rows.append(
                    (device_id, self.fleet[device_id], f"{day.isoformat()}T{hhmm}", float(temperature), float(humidity))
                )
        return sorted(rows)

    def start_fleet(self, day: datetime.date, devices, *args: str) -> Daemon:
        """
        Devices C{devices} (ids, e.g. C{"1-200"}) in one process, running
        tests/fleet.py (the real device code; optionally behind its lossy
        relay): see its docstring for C{args}.
        """
        command = [sys.executable, str(FLEET), "--config", str(self.config), "--day", day.isoformat(),
                   "--devices", str(devices), *args]
        daemon = Daemon("fleet", command, cwd=self.root)
        self.daemons.append(daemon)
        return daemon

    def wait_stored(self, count: int, cloud: Daemon, timeout: float = 60.0) -> None:
        """
        Wait until the cloud's database holds C{count} readings: checked at
        each batch C{cloud} reports committed, so no polling interval.
        """
        deadline = time.monotonic() + timeout
        while True:
            have = self.count_stored() if self.db.exists() else 0
            if have >= count:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DaemonError(f"the cloud stored {have} of {count} readings within {timeout:g} s{cloud.tail()}")
            cloud.wait_for(r"readings committed", remaining)

    def stop(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()
