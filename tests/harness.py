"""
A meter suite on loopback for end-to-end and fault tests: a temporary
configuration with free ports, survey files for a fleet, and the real twistd
plugins started as child processes (see L{meter.processes}).
"""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

from meter import config
from meter.processes import Daemon, twistd


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """
    A port on 127.0.0.1 free at the time of asking, for TCP or UDP.
    """
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def survey_text(device_id: int, count: int) -> str:
    """
    C{count} distinct readings of a day for device C{device_id}, in the
    report's format, at evenly spaced minutes.
    """
    step = (24 * 60) // count
    lines = []
    for i in range(count):
        minute = i * step
        temperature = 10 + (device_id * 7 + i) % 20
        humidity = 20 + (device_id * 3 + i * 5) % 60
        lines.append(f"{minute // 60:02d}:{minute % 60:02d} - {temperature}.5 - {humidity}%")
    return "\n".join(lines) + "\n"


class Suite:
    """
    The files and daemons of one test's meter suite, under C{root}.
    """

    def __init__(self, root: Path, devices: int, readings: int = 4, **gateway):
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
            "cloud": {"listen": f"tcp:{self.cloud_port}:interface=127.0.0.1", "db": str(self.db)},
            "gateway": {
                "listen": f"127.0.0.1:{self.gateway_port}",
                "cloud": f"127.0.0.1:{self.cloud_port}",
                "spool": str(self.spool),
                "deadline": 30.0,
                "max_backoff": 1.0,
                **gateway,
            },
            "device": {
                "gateway": f"127.0.0.1:{self.gateway_port}",
                "surveys": str(self.surveys),
                "ack_timeout": 0.5,
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

    def stop(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()
