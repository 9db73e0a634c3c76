"""
The daemons as child processes: start a twistd plugin, wait for a line of
its output, stop it.  The one daemon runner of `meter demo`, `meter lab`,
the loopback suite (L{meter.tools.suite}: the end-to-end tests and the
bench), which all run the real plugins rather than importing them.
"""

from __future__ import annotations

import datetime
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

from twisted.logger import eventFromJSON, formatEvent

from meter.logs import json_lines

#: A line of the cloud's console: `192.168.1.4 - 02:00 - 17 - 35%`.
CONSOLE_LINE = re.compile(r"^(\S+) - (\d\d:\d\d) - (-?[0-9.]+) - ([0-9.]+)%$")
#: The cloud console's header above the lines of a day (never a CONSOLE_LINE).
CONSOLE_DAY = re.compile(r"^--- readings of (\d{4}-\d\d-\d\d) \(the devices' local time\) ---$")

#: What the cloud logs once it listens (with TLS or without).
CLOUD_LISTENING = re.compile(r"Factory (\(TLS\) )?starting on")
#: What the gateway logs once its UDP port is open.
GATEWAY_LISTENING = re.compile(r"GatewayProtocol starting on")
#: What the gateway logs once its uplink reached the cloud.
UPLINK_CONNECTED = re.compile(r"connected to the cloud")

#: What a daemon logs once its monitoring endpoint listens.
METRICS_ON = re.compile(r"metrics on (http://\S+)/metrics$")
#: What the cloud logs once its web service listens.
WEB_ON = re.compile(r"web on (http://\S+)/$")

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stamp(text: str) -> float:
    """
    A time a daemon wrote in a log line (L{meter.clocktext.iso_time}) as
    Unix time, to time what happened between two lines.
    """
    return datetime.datetime.fromisoformat(text).timestamp()


#: The ports free_port handed out in this process, never handed out twice.
_HANDED_OUT: set[int] = set()


def _ephemeral_floor() -> int:
    """
    The lowest port the kernel picks for a bind to port 0 (its
    C{ip_local_port_range}); 32768 where that cannot be read.
    """
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """
    A port on 127.0.0.1 free at the time of asking, for TCP or UDP: where
    the tests and the bench start their daemons.

    It is taken below the kernel's ephemeral range, so that nothing bound to
    port 0 in the meantime (a daemon's web or metrics port on C{tcp:0}, a
    client's source port) can take it before the daemon binds it; and it is
    never handed out twice by one process.
    """
    floor = _ephemeral_floor()
    low = max(1024, floor - 12000)
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(low, floor)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise OSError(f"no free port on 127.0.0.1 between {low} and {floor}")


def twistd(plugin: str, *args: str, records: bool = False) -> list[str]:
    """
    The command line of C{twistd -n <plugin> <args>} with this Python; with
    C{records}, its log is written as JSON records (C{--log-format json},
    L{meter.logs}), so a program reading the log takes the figures from the
    fields rather than from the text.
    """
    records_option = ["--log-format", "json"] if records else []
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [str(script), "-n", plugin, *records_option, *args]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", plugin, *records_option, *args]


def json_records():
    """
    A log observer for twistd's C{--logger}, or a process of its own: every
    event as one JSON object a line on the process's real standard output,
    as C{--log-format json} writes them.  (The real standard output: twistd
    sends C{sys.stdout} into the log itself.)
    """
    return json_lines(sys.__stdout__)


class DaemonError(RuntimeError):
    """
    A daemon did not do what was awaited of it; the message quotes its last
    output.
    """


class _PipeOutput:
    """
    A child's output read from a pipe line by line on a thread, so it can be
    waited on with a deadline and never blocks the child on a full pipe.
    """

    def __init__(self, stream, name: str):
        self._stream = stream
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, name=f"{name}-output", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def read(self, wait: float) -> list[str] | None:
        """
        The lines that arrived, waiting up to C{wait} seconds for a first
        one; C{None} once the output ended and every line was read.
        """
        try:
            item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
        except queue.Empty:
            return []
        lines: list[str] = []
        while item is not None:
            lines.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return lines
        self._queue.put(None)
        return lines or None

    def close(self) -> None:
        self._thread.join(5)


class _FileOutput:
    """
    A child's output written straight to a log file, read back as it grows:
    the bench's daemons, whose output read through a pipe by the bench
    would cost CPU on the cores the daemons are measured on.
    """

    #: How often a wait looks at the file again: a file, unlike a pipe,
    #: cannot be waited on.
    POLL = 0.01

    def __init__(self, path: Path, process: subprocess.Popen):
        self._file = open(path, "rb")
        self._process = process
        self._partial = b""
        self._ended = False

    def read(self, wait: float) -> list[str] | None:
        if self._ended:
            return None
        deadline = time.monotonic() + wait
        while True:
            exited = self._process.poll() is not None
            data = self._file.read()
            if data:
                raw = (self._partial + data).split(b"\n")
                self._partial = raw.pop()
                if raw:
                    return [line.decode("utf-8", "replace") for line in raw]
            if exited:
                self._ended = True
                rest, self._partial = self._partial, b""
                return [rest.decode("utf-8", "replace")] if rest else None
            if time.monotonic() >= deadline:
                return []
            time.sleep(self.POLL)

    def close(self) -> None:
        self._file.close()


class Daemon:
    """
    One child process (in a session of its own, so stopping it stops its
    children) whose output, stdout and stderr merged, is read line by line:
    from a pipe, or with C{log} from the file it writes.
    """

    def __init__(
        self, name: str, command: Sequence[str], cwd: Path | None = None, env: dict | None = None,
        log: Path | None = None,
    ):
        self.name = name
        self.command = list(command)
        self.log = log
        #: Every line read so far (a JSON record as its text).
        self.lines: list[str] = []
        #: Every JSON log record read so far, as its event (see
        #: L{json_records}), and how many L{new_records} consumed.
        self.records: list[dict] = []
        self._records_cursor = 0
        #: How many of L{lines} a wait or L{new_lines} consumed.
        self._cursor = 0
        self._ended = False
        #: CPU and memory just before L{stop} signalled it (see L{stats}).
        self.final: dict | None = None
        sink = open(log, "wb") if log is not None else subprocess.PIPE
        try:
            self.process = subprocess.Popen(
                self.command,
                cwd=cwd,
                env={**os.environ, **env} if env else None,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                text=log is None,
                bufsize=1 if log is None else -1,
                start_new_session=True,
            )
        finally:
            if log is not None:
                sink.close()  # the child holds its own copy
        self.pid = self.process.pid
        self._output = _PipeOutput(self.process.stdout, name) if log is None else _FileOutput(log, self.process)

    def _take(self, wait: float) -> None:
        if self._ended:
            return
        lines = self._output.read(wait)
        if lines is None:
            self._ended = True
            return
        for line in lines:
            if line.startswith('{"'):
                try:
                    event = eventFromJSON(line)
                except ValueError:
                    pass
                else:
                    self.records.append(event)
                    line = formatEvent(event)
            self.lines.append(line)

    def _drain(self) -> None:
        before = -1
        while not self._ended and before != len(self.lines):
            before = len(self.lines)
            self._take(0)

    def _next_line(self, deadline: float) -> str | None:
        """
        The next unconsumed line, or C{None} when the output ended; raises
        L{TimeoutError} at the deadline.
        """
        while self._cursor >= len(self.lines):
            if self._ended:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self._take(remaining)
        self._cursor += 1
        return self.lines[self._cursor - 1]

    def wait_for(self, pattern: str | re.Pattern, timeout: float = 20.0) -> re.Match:
        """
        Read on until a line matches C{pattern} (searched, not anchored);
        the lines after it stay unconsumed.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        try:
            while True:
                line = self._next_line(deadline)
                if line is None:
                    raise DaemonError(f"{self.name} exited ({self.process.wait()}) before printing /{regex.pattern}/{self.tail()}")
                match = regex.search(line)
                if match is not None:
                    return match
        except TimeoutError:
            raise DaemonError(f"{self.name} printed no /{regex.pattern}/ within {timeout:g} s{self.tail()}") from None

    def seen_or_wait(self, pattern: str | re.Pattern, timeout: float = 20.0) -> None:
        """
        Wait for a line matching C{pattern}, unless one was read already
        (a restarted gateway may log it while it recovers, before its port
        opens).
        """
        if not self.all_matching(pattern):
            self.wait_for(pattern, timeout)

    def collect(self, pattern: str | re.Pattern, count: int, timeout: float = 20.0) -> list[re.Match]:
        """
        Read on until C{count} more lines match C{pattern}.
        """
        return [self.wait_for(pattern, timeout) for _ in range(count)]

    def new_lines(self) -> list[str]:
        """
        The lines read since the last call or wait, without waiting; they
        count as consumed.
        """
        self._drain()
        lines = self.lines[self._cursor:]
        self._cursor = len(self.lines)
        return lines

    def records_of(self, log_format: str) -> list[dict]:
        """
        Every JSON log record read so far whose format starts with
        C{log_format}, without waiting.
        """
        self._drain()
        return [event for event in self.records if event.get("log_format", "").startswith(log_format)]

    def new_records(self, log_format: str) -> list[dict]:
        """
        The JSON log records read since the last call whose format starts
        with C{log_format}, without waiting; every record read counts as
        consumed.
        """
        self._drain()
        records = self.records[self._records_cursor:]
        self._records_cursor = len(self.records)
        return [event for event in records if event.get("log_format", "").startswith(log_format)]

    def all_matching(self, pattern: str | re.Pattern) -> list[re.Match]:
        """
        Every line read so far that matches C{pattern}, without waiting.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        self._drain()
        return [m for m in map(regex.search, self.lines) if m is not None]

    def wait(self, timeout: float = 30.0) -> int:
        """
        Wait for the process to exit by itself; its exit status.
        """
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DaemonError(f"{self.name} still running after {timeout:g} s{self.tail()}") from None
        self._finish()
        return status

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """
        Stop the process (and its children): C{sig}, then SIGKILL if it is
        still there after C{timeout}.  Its exit status.
        """
        if self.process.poll() is None:
            try:
                self.final = self.stats()
            except OSError:
                pass
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._finish()
        return self.process.returncode

    def _finish(self) -> None:
        if isinstance(self._output, _PipeOutput):
            self._output.close()
        self._drain()
        if isinstance(self._output, _FileOutput):
            self._output.close()

    def kill(self) -> int | None:
        """
        SIGKILL: the crash a daemon must survive.
        """
        return self.stop(signal.SIGKILL)

    def stats(self) -> dict:
        """
        CPU seconds (user + system, all threads) and resident memory so far.
        """
        return proc_stats(self.pid)

    def tail(self, count: int = 15) -> str:
        self._drain()
        if not self.lines:
            return " (no output)"
        return "; its last output:\n    " + "\n    ".join(self.lines[-count:])


def monitoring_url(daemon: Daemon, timeout: float = 20.0) -> str:
    """
    The base URL of C{daemon}'s monitoring endpoint (C{http://HOST:PORT}),
    from the line it logs once it listens: a port chosen by the kernel is
    known only there.
    """
    seen = daemon.all_matching(METRICS_ON)
    match = seen[-1] if seen else daemon.wait_for(METRICS_ON, timeout)
    return match.group(1)


def web_url(daemon: Daemon, timeout: float = 20.0) -> str:
    """
    The base URL of the cloud's web service (C{http://HOST:PORT}), from
    the line it logs once it listens.
    """
    seen = daemon.all_matching(WEB_ON)
    match = seen[-1] if seen else daemon.wait_for(WEB_ON, timeout)
    return match.group(1)


def proc_stats(pid: int) -> dict:
    """
    Process C{pid}'s CPU seconds (user + system) and its resident memory,
    now and at its peak, in MB, from /proc.
    """
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


class Daemons:
    """
    The daemons of one suite, started in order and stopped in reverse: the
    twistd plugins with one configuration file, run from C{cwd}, each behind
    an optional command C{prefix} (the lab's C{ip netns exec <namespace>}),
    their output in C{cwd}/<name>.log with C{logs}.
    """

    def __init__(self, config: Path | None, cwd: Path | None = None, logs: bool = False):
        self.config = config
        self.cwd = cwd
        self.logs = logs
        self.daemons: list[Daemon] = []

    def __iter__(self) -> Iterator[Daemon]:
        return iter(self.daemons)

    def run(self, name: str, command: Sequence[str], env: dict | None = None) -> Daemon:
        """
        Start any command as one of the suite's processes.
        """
        log = (self.cwd or Path.cwd()) / (name.replace(" ", "-") + ".log") if self.logs else None
        daemon = Daemon(name, command, cwd=self.cwd, env=env, log=log)
        self.daemons.append(daemon)
        return daemon

    def start(self, name: str, plugin: str, *args: str, prefix: Sequence[str] = (), env: dict | None = None) -> Daemon:
        """
        Start C{twistd -n plugin} with the suite's configuration and C{args}.
        """
        configured = ("--config", str(self.config)) if self.config is not None else ()
        # A suite that keeps log files (the bench's) reads figures from the
        # daemons' log records.
        return self.run(name, [*prefix, *twistd(plugin, *configured, *args, records=self.logs)], env)

    def start_cloud(self, *args: str, prefix: Sequence[str] = (), timeout: float = 30.0) -> Daemon:
        """
        The cloud, once it listens.
        """
        cloud = self.start("cloud", "meter-cloud", *args, prefix=prefix)
        cloud.wait_for(CLOUD_LISTENING, timeout)
        return cloud

    def start_gateway(
        self, *args: str, prefix: Sequence[str] = (), connected: bool = False, timeout: float = 60.0
    ) -> Daemon:
        """
        The gateway, once its port is open (and, with C{connected}, once it
        reached the cloud).
        """
        gateway = self.start("gateway", "meter-gateway", *args, prefix=prefix)
        gateway.wait_for(GATEWAY_LISTENING, timeout)
        if connected:
            gateway.wait_for(UPLINK_CONNECTED, timeout)
        return gateway

    def start_device(self, device_id: int, *args: str, prefix: Sequence[str] = (), name: str | None = None) -> Daemon:
        """
        Device C{device_id} sending its day once (C{--once}), not awaited.
        """
        return self.start(name or f"device {device_id}", "meter-device", "--id", str(device_id), "--once", *args,
                          prefix=prefix)

    def stop(self) -> list[str]:
        """
        Stop every daemon, the last started first, each even if another
        could not be; what went wrong.
        """
        errors = []
        for daemon in reversed(self.daemons):
            try:
                daemon.stop()
            except Exception as e:  # noqa: BLE001 - stop the others all the same
                errors.append(f"stopping {daemon.name}: {e}")
        return errors
