"""
A meter suite on loopback: a temporary configuration with free ports, the
fleet's survey files and secrets, and the real twistd plugins started as
child processes (L{meter.tools.processes}); the fleet itself is driven by
`meter loadgen`.  The end-to-end and fault tests and the bench run on it.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
import sqlite3
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

from meter import config, secrets
from meter.tools.processes import Daemon, DaemonError, Daemons, free_port

#: A test device's settings: a lost datagram is sent again within half a
#: second, so a test of losses takes seconds.
QUICK_DEVICE = {"ack_timeout": 0.5}

#: The daemons' monitoring endpoints: a port the kernel picks, which each
#: daemon logs (L{meter.tools.processes.monitoring_url}).
ANY_PORT = "tcp:0:interface=127.0.0.1"


def lan_address(device_id: int) -> str:
    """
    Device C{device_id}'s address on the report's LAN, 192.168.1.<id + 1>.
    """
    return f"192.168.1.{device_id + 1}"


def label_address(device_id: int) -> str:
    """
    Device C{device_id}'s address label for fleets beyond a LAN: 10.0.0.0
    plus its id.  Only data: nothing is sent to it.
    """
    return str(ipaddress.IPv4Address(0x0A000000 + device_id))


def survey_text(device_id: int, count: int = 4) -> str:
    """
    C{count} readings of a day for device C{device_id}, in the report's
    format, for devices beyond the repository's four survey files.
    """
    step = (24 * 60) // count
    lines = []
    for i in range(count):
        minute = i * step
        temperature = 10 + (device_id * 7 + i) % 20
        humidity = 20 + (device_id * 3 + i * 5) % 60
        lines.append(f"{minute // 60:02d}:{minute % 60:02d} - {temperature}.5 - {humidity}%")
    return "\n".join(lines) + "\n"


def write_device_keys(folder: Path, fleet: Iterable[int]) -> None:
    """
    The fleet's HMAC keys, written as secrets.create writes them but without
    an fsync each (a scratch folder: ten thousand fsyncs would take longer
    than the bench).
    """
    (folder / "devices").mkdir(parents=True, exist_ok=True)
    for device_id in fleet:
        path = secrets.device_key_path(folder, device_id)
        if not path.exists():
            path.write_text(os.urandom(secrets.KEY_BYTES).hex() + "\n")
            path.chmod(0o600)


def loadgen_summary(loadgen: Daemon, timeout: float = 90.0) -> dict:
    """
    The JSON summary of a `meter loadgen` run (as L{Suite.start_fleet}
    starts it), once it exited.
    """
    loadgen.wait(timeout)
    summary = json.loads(Path(loadgen.command[loadgen.command.index("--json") + 1]).read_text())
    print(f"{loadgen.name}:", json.dumps(summary))  # the figures, shown with pytest -rP
    return summary


class Suite(Daemons):
    """
    The files and daemons of one meter suite under C{root}, on free
    127.0.0.1 ports: devices 1..C{devices} at C{addresses}, each with a
    survey file of C{readings} readings (none if C{None}), the cloud's
    database and the gateway's spool.

    The secrets are made by the first daemon to start, as on a first start
    on loopback (in C{root}/var/secrets), or with C{keys} before any starts,
    in C{root}/secrets: the device keys without an fsync each, for fleets of
    thousands.  C{gateway} settings (the keywords), C{device} settings (in
    place of L{QUICK_DEVICE}; C{{}} for the configuration's defaults) and
    C{cloud} settings are laid over the suite's own.  With C{logs} each
    daemon's output goes to <name>.log in C{root} rather than a pipe.
    With C{postgres} (a C{postgresql://} URI) the cloud stores into that
    database rather than an SQLite file.
    """

    def __init__(
        self, root: Path, devices: int, readings: int | None = 4, *, addresses: Callable[[int], str] = lan_address,
        keys: bool = False, logs: bool = False, deadline: float = 30.0, device: Mapping = QUICK_DEVICE,
        cloud: Mapping | None = None, postgres: str | None = None, **gateway,
    ):
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(root / "meter.toml", cwd=root, logs=logs)
        self.root = root
        self.fleet = {i: addresses(i) for i in range(1, devices + 1)}
        self.readings = readings
        self.cloud_port = free_port(socket.SOCK_STREAM)
        self.gateway_port = free_port(socket.SOCK_DGRAM)
        self.db = root / "cloud.sqlite"
        self.postgres = postgres
        self.spool = root / "spool.sqlite"
        self.surveys = root / "surveys"
        if readings is not None:
            self.surveys.mkdir(exist_ok=True)
            for device_id in self.fleet:
                (self.surveys / f"device{device_id}.txt").write_text(survey_text(device_id, readings))
        self.secrets = root / "secrets"
        settings = {
            "cloud": {
                "listen": f"tcp:{self.cloud_port}:interface=127.0.0.1", "db": postgres or str(self.db), "metrics": ANY_PORT,
                "web": ANY_PORT,
                **(cloud or {}),
            },
            "gateway": {
                "listen": f"127.0.0.1:{self.gateway_port}",
                "cloud": f"127.0.0.1:{self.cloud_port}",
                "spool": str(self.spool),
                "metrics": ANY_PORT,
                "deadline": deadline,
                "max_backoff": 1.0,
                # Every device of the suite sends from 127.0.0.1: one source
                # address for the whole fleet, so its flood limit is lifted.
                "source_rate": 1e6,
                "source_burst": 1e6,
                **gateway,
            },
            "device": {
                "gateway": f"127.0.0.1:{self.gateway_port}",
                **({"surveys": str(self.surveys)} if readings is not None else {}),
                **device,
            },
        }
        if keys:
            write_device_keys(self.secrets, self.fleet)
            secrets.create(self.secrets, {})  # the CA and the TLS certificates
            settings["security"] = {"dir": str(self.secrets), "generate": False}
        self.config.write_text(config.render(settings, self.fleet))
        self._fleets = 0

    def loadgen_command(self, summary: Path, *args: str) -> list[str]:
        """
        `meter loadgen` with the suite's configuration, quiet, writing its
        JSON summary to C{summary}.
        """
        return [sys.executable, "-m", "meter.tools.cli", "loadgen", "--config", str(self.config), "--quiet",
                "--json", str(summary), *args]

    def start_fleet(self, day: datetime.date, devices: str, *args: str) -> Daemon:
        """
        Devices C{devices} (ids C{"first-last"}, or one id) sending C{day}
        from their survey files, all in one `meter loadgen` process (the
        real device code), optionally behind its lossy relay: C{args} are
        loadgen's.  See L{loadgen_summary} for the outcome.
        """
        first, _, last = str(devices).partition("-")
        count = int(last or first) - int(first) + 1
        self._fleets += 1
        name = f"fleet {self._fleets}"
        command = self.loadgen_command(
            self.root / f"{name.replace(' ', '-')}.json", "--day", day.isoformat(), "--first-id", first,
            "--devices", str(count), "--surveys", str(self.surveys), "--spread", "0", *args,
        )
        return self.run(name, command)

    def stored(self) -> list[tuple]:
        """
        Every row of the cloud's database: (device_id, device_ip, taken_at,
        temperature, humidity), in key order.
        """
        sql = "SELECT device_id, device_ip, taken_at, temperature_c, humidity_pct FROM readings ORDER BY device_id, taken_at"
        if self.postgres is not None:
            return [
                (device, ip, taken_at.isoformat(timespec="minutes"), temperature, humidity)
                for device, ip, taken_at, temperature, humidity in self._postgres_rows(sql)
            ]
        with sqlite3.connect(self.db) as connection:
            return connection.execute(sql).fetchall()

    def count_stored(self) -> int:
        if self.postgres is not None:
            return self._postgres_rows("SELECT count(*) FROM readings")[0][0]
        with sqlite3.connect(self.db) as connection:
            return connection.execute("SELECT count(*) FROM readings").fetchone()[0]

    def _postgres_rows(self, sql: str) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.postgres, connect_timeout=5) as connection:
            if connection.execute("SELECT to_regclass('readings')").fetchone()[0] is None:
                # Not made yet: the cloud has not connected.
                return [(0,)] if sql.startswith("SELECT count") else []
            return connection.execute(sql).fetchall()

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

    def wait_stored(self, count: int, cloud: Daemon, timeout: float = 60.0) -> None:
        """
        Wait until the cloud's database holds C{count} readings: checked at
        each batch C{cloud} reports committed, so no polling interval.
        """
        deadline = time.monotonic() + timeout
        while True:
            have = self.count_stored() if self.postgres is not None or self.db.exists() else 0
            if have >= count:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DaemonError(f"the cloud stored {have} of {count} readings within {timeout:g} s{cloud.tail()}")
            cloud.wait_for(r"readings committed", remaining)
