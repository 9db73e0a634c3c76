"""
The daemons as child processes: start a twistd plugin, wait for a line of
its output, stop it.  Used by `meter demo`, `meter lab` and the end-to-end
tests, which all run the real plugins rather than importing them.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

#: A line of the cloud's console: `192.168.1.4 - 02:00 - 17 - 35%`.
CONSOLE_LINE = re.compile(r"^(\S+) - (\d\d:\d\d) - (-?[0-9.]+) - ([0-9.]+)%$")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """
    A port on 127.0.0.1 free at the time of asking, for TCP or UDP: where
    the tests and the bench start their daemons.
    """
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def twistd(plugin: str, *args: str) -> list[str]:
    """
    The command line of C{twistd -n <plugin> <args>} with this Python.
    """
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [str(script), "-n", plugin, *args]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", plugin, *args]


class DaemonError(RuntimeError):
    """
    A daemon did not do what was awaited of it; the message quotes its last
    output.
    """


class Daemon:
    """
    One child process whose output (stdout and stderr merged) is read line
    by line on a thread, so it can be waited on with a deadline and never
    blocks the child on a full pipe.
    """

    def __init__(self, name: str, command: Sequence[str], cwd: Path | None = None, env: dict | None = None):
        self.name = name
        self.command = list(command)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._cursor = 0
        self.process = subprocess.Popen(
            self.command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"{name}-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _next_line(self, deadline: float) -> str | None:
        """
        The next unseen line, or C{None} when the output ended; raises
        L{DaemonError} at the deadline.
        """
        while True:
            if self._cursor < len(self.lines):
                self._cursor += 1
                return self.lines[self._cursor - 1]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                raise TimeoutError from None
            if line is None:
                self._queue.put(None)
                return None
            self.lines.append(line)

    def wait_for(self, pattern: str | re.Pattern, timeout: float = 20.0) -> re.Match:
        """
        Read on until a line matches C{pattern} (searched, not anchored).
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

    def collect(self, pattern: str | re.Pattern, count: int, timeout: float = 20.0) -> list[re.Match]:
        """
        Read on until C{count} more lines match C{pattern}.
        """
        return [self.wait_for(pattern, timeout) for _ in range(count)]

    def all_matching(self, pattern: str | re.Pattern) -> list[re.Match]:
        """
        Every line read so far that matches C{pattern}, without waiting.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        self._drain()
        return [m for m in map(regex.search, self.lines) if m is not None]

    def _drain(self) -> None:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is None:
                self._queue.put(None)
                return
            self.lines.append(line)

    def wait(self, timeout: float = 30.0) -> int:
        """
        Wait for the process to exit by itself; its exit status.
        """
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DaemonError(f"{self.name} still running after {timeout:g} s{self.tail()}") from None
        self._reader.join(5)
        self._drain()
        return status

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """
        Stop the process (and its children): C{sig}, then SIGKILL if it is
        still there after C{timeout}.  Its exit status.
        """
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._reader.join(5)
        self._drain()
        return self.process.returncode

    def kill(self) -> int | None:
        """
        SIGKILL: the crash a daemon must survive.
        """
        return self.stop(signal.SIGKILL)

    def tail(self, count: int = 15) -> str:
        self._drain()
        if not self.lines:
            return " (no output)"
        return "; its last output:\n    " + "\n    ".join(self.lines[-count:])
