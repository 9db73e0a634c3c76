"""
The bench's meter suite: a temporary configuration on free loopback ports
for a fleet of N devices (their addresses are only labels in the data:
nothing is ever sent to them), the fleet's secrets, and the real twistd
plugins as child processes whose output goes to a log file (a pipe read by
this process would cost CPU on the same two cores).
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from meter import config, secrets
from meter.tools.processes import free_port, twistd

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def label_address(device_id: int) -> str:
    """
    Device C{device_id}'s address label: 10.0.0.0 plus its id.  Only data:
    the bench sends nothing to it.
    """
    return str(ipaddress.IPv4Address(0x0A000000 + device_id))


def fleet_of(devices: int, labels=label_address) -> dict[int, str]:
    return {device_id: labels(device_id) for device_id in range(1, devices + 1)}


def write_device_keys(folder: Path, fleet) -> None:
    """
    The fleet's HMAC keys, written as secrets.create writes them but without
    an fsync each (a scratch folder: ten thousand fsyncs would take longer
    than the bench).
    """
    keys = folder / "devices"
    keys.mkdir(parents=True, exist_ok=True)
    for device_id in fleet:
        path = secrets.device_key_path(folder, device_id)
        if not path.exists():
            path.write_text(os.urandom(secrets.KEY_BYTES).hex() + "\n")
            path.chmod(0o600)


class Workspace:
    """
    One scenario's folder: meter.toml, secrets/, the cloud's database, the
    gateway's spool, and the daemons' logs.
    """

    def __init__(self, root: Path, fleet: dict[int, str], gateway: dict | None = None, device: dict | None = None,
                 cloud: dict | None = None):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.fleet = fleet
        self.cloud_port = free_port(socket.SOCK_STREAM)
        self.gateway_port = free_port(socket.SOCK_DGRAM)
        self.db = root / "cloud.sqlite"
        self.spool = root / "spool.sqlite"
        self.secrets = root / "secrets"
        write_device_keys(self.secrets, fleet)
        secrets.create(self.secrets, {})  # the CA and the TLS certificates
        settings = {
            "cloud": {"listen": f"tcp:{self.cloud_port}:interface=127.0.0.1", "db": str(self.db), **(cloud or {})},
            "gateway": {
                "listen": f"127.0.0.1:{self.gateway_port}",
                "cloud": f"127.0.0.1:{self.cloud_port}",
                "spool": str(self.spool),
                "deadline": 60.0,
                "max_backoff": 1.0,
                # The whole simulated fleet sends from 127.0.0.1: one source
                # address, so its flood limit is lifted (as tests/harness.py does).
                "source_rate": 1e6,
                "source_burst": 1e6,
                **(gateway or {}),
            },
            "device": {"gateway": f"127.0.0.1:{self.gateway_port}", **(device or {})},
            "security": {"dir": str(self.secrets), "generate": False},
        }
        self.config = root / "meter.toml"
        self.config.write_text(config.render(settings, fleet))
        self.daemons: list[LoggedDaemon] = []

    def start(self, name: str, plugin: str, *args: str, env: dict | None = None) -> LoggedDaemon:
        daemon = LoggedDaemon(name, twistd(plugin, "--config", str(self.config), *args), self.root,
                              self.root / f"{name}.log", env)
        self.daemons.append(daemon)
        return daemon

    def start_cloud(self, env: dict | None = None) -> LoggedDaemon:
        cloud = self.start("cloud", "meter-cloud", env=env)
        cloud.wait_for(r"Factory (\(TLS\) )?starting on", 30)
        return cloud

    def start_gateway(self, env: dict | None = None) -> LoggedDaemon:
        gateway = self.start("gateway", "meter-gateway", env=env)
        gateway.wait_for("GatewayProtocol starting on", 60)
        gateway.wait_for("connected to the cloud", 30)
        return gateway

    def stop(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()


class LoggedDaemon:
    """
    A child process writing to a log file, which is read incrementally to
    wait for lines; its CPU time and peak memory from /proc.
    """

    def __init__(self, name: str, command: list[str], cwd: Path, log: Path, env: dict | None = None):
        self.name = name
        self.log_path = log
        self._log = open(log, "wb")
        self.process = subprocess.Popen(
            command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, env={**os.environ, **(env or {})},
        )
        self.pid = self.process.pid
        self._reader = open(log, "rb")
        self._partial = b""
        self._unread: list[str] = []
        self.final: dict | None = None

    def new_lines(self) -> list[str]:
        """
        The complete lines written since the last call (or not consumed by
        L{wait_for}).
        """
        lines, self._unread = self._unread, []
        data = self._reader.read()
        if data:
            data = self._partial + data
            raw = data.split(b"\n")
            self._partial = raw.pop()
            lines += [line.decode("utf-8", "replace") for line in raw]
        return lines

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """
        Read on until a line matches; the lines after it stay unread.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            lines = self.new_lines()
            for index, line in enumerate(lines):
                match = regex.search(line)
                if match is not None:
                    self._unread = lines[index + 1:]
                    return match
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}) before /{pattern}/{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no /{pattern}/ within {timeout:g} s{self.tail()}")
            time.sleep(0.01)

    def all_matching(self, pattern: str) -> list[re.Match]:
        regex = re.compile(pattern)
        with open(self.log_path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        return [m for m in map(regex.search, text.splitlines()) if m is not None]

    def tail(self, count: int = 12) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-count:]
        except OSError:
            return ""
        return ":\n    " + "\n    ".join(lines)

    def stats(self) -> dict:
        """
        CPU seconds (user + system, all threads) and resident memory so far.
        """
        return proc_stats(self.pid)

    def stop(self, timeout: float = 20.0) -> None:
        if self.process.poll() is None:
            try:
                self.final = self.stats()
            except OSError:
                pass
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


def proc_stats(pid: int) -> dict:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # Fields after the command: state is 3rd overall, utime 14th, stime 15th.
    utime, stime = int(fields[11]), int(fields[12])
    status = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                status[key] = int(value.split()[0]) / 1024
    return {
        "cpu_s": round((utime + stime) / CLOCK_TICKS, 2),
        "rss_mb": round(status.get("VmRSS", 0.0), 1),
        "peak_rss_mb": round(status.get("VmHWM", 0.0), 1),
    }


def loadgen_command(workspace: Workspace, json_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "meter.tools.cli", "loadgen", "--config", str(workspace.config), "--quiet",
            "--json", str(json_path), *args]
