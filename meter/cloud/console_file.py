"""
Where the cloud's console lines go (C{[cloud] console}): standard output in
the foreground, and a file beside the database when the cloud runs as a
daemon, whose standard output goes nowhere.
"""

from __future__ import annotations

import os
from pathlib import Path


#: C{[cloud] console} for standard output whether or not the cloud runs as a
#: daemon.
STANDARD_OUTPUT = Path("-")


def console_path(setting: Path | None, db: Path, daemon: bool) -> Path | None:
    """
    The file the console lines go to, or C{None} for standard output:
    C{setting} if one is given, else (as a daemon) C{<db>-console.log}
    beside the database C{db}.
    """
    if setting == STANDARD_OUTPUT:
        return None
    if setting is not None:
        return setting
    if daemon:
        return db.with_name(f"{db.stem}-console.log")
    return None


class ConsoleFile:
    """
    Console lines appended to a file, one write and one flush a batch, as on
    standard output.  A file moved away (by logrotate, say) is followed by a
    new one of the same name: one C{stat} a batch notices it.
    """

    def __init__(self, path: Path):
        self.path = path
        self._file = None
        self._identity: tuple[int, int] | None = None
        self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        status = os.fstat(self._file.fileno())
        self._identity = (status.st_dev, status.st_ino)

    def _moved(self) -> bool:
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (status.st_dev, status.st_ino) != self._identity

    def write(self, text: str) -> None:
        if self._moved():
            self._file.close()
            self._open()
        self._file.write(text)
        self._file.flush()

    def close(self) -> None:
        self._file.close()

