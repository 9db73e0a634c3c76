"""
Where a daemon's log goes, and in which form: twistd's options, set by the
plugins' C{--log-format} and by where they run.

  - C{text} (the default): twistd's own lines, C{<time> [<source>] <text>}.
  - C{json}: one JSON object a line (the event's fields, as
    L{twisted.logger.eventAsJSON} writes them, and its text as
    C{log_text}), with no record-separator byte before it: what journald
    and Loki take line by line, and what a program reads back with
    L{twisted.logger.eventFromJSON}.

In the foreground (C{twistd -n}) the log goes to standard output (journald
under systemd).  A daemon (no C{-n}) writes its own file, C{meter-<role>.log}
or C{meter-device-<id>.log} in the folder it starts in, unless C{--logfile}
names another: twistd's default, C{twistd.log}, would be shared by every
daemon started from one folder, their lines interleaved.  The file is
rotated by twistd: at 1 MB, and on SIGUSR1.
"""

from __future__ import annotations

import signal
import sys
from typing import IO, Callable

from twisted.logger import FileLogObserver, ILogObserver, eventAsJSON, formatEvent
from twisted.python.logfile import LogFile

FORMATS = ("text", "json")


def json_line(event: dict) -> str:
    """
    C{event} as one line of JSON: its fields and its text.
    """
    return eventAsJSON({**event, "log_text": formatEvent(event)}) + "\n"


def json_lines(out: IO[str]) -> ILogObserver:
    """
    An observer writing each event to C{out} as one line of JSON.
    """
    return FileLogObserver(out, json_line)


def log_format(value: str) -> str:
    """
    The C{--log-format} option's value, checked.
    """
    if value not in FORMATS:
        raise ValueError(f"--log-format: expected one of {', '.join(FORMATS)}, got {value!r}")
    return value


def daemonized(options) -> bool:
    """
    Whether twistd runs the plugin whose C{options} these are as a daemon
    (its standard output then goes nowhere).
    """
    parent = getattr(options, "parent", None)
    return parent is not None and not parent.get("nodaemon")


def configure(parent, log_format: str, own_file: str) -> None:
    """
    Set twistd's options C{parent} for a daemon's log: its own file
    C{own_file} when it runs as a daemon and no other destination was
    given, and with C{json} an observer writing JSON lines there (an
    explicit C{--logger} wins).

    @raise ValueError: C{json} with twistd's C{--syslog}.
    """
    if parent is None:
        return
    if log_format == "json" and parent.get("syslog") and not parent.get("logger"):
        # twistd's --logger replaces its syslog observer: the JSON lines would
        # have no file to go to.
        raise ValueError("--log-format json writes to a file or standard output, not with twistd's --syslog")
    nodaemon = bool(parent.get("nodaemon"))
    if not nodaemon and not parent.get("logfile") and not parent.get("syslog"):
        parent["logfile"] = own_file
    if log_format == "json" and not parent.get("logger"):
        # twistd takes an observer factory by its name alone and calls it
        # with no arguments: where it writes is kept here for it.  One
        # twistd a process, so one destination.
        _json_destination[:] = [parent.get("logfile"), nodaemon]
        parent["logger"] = f"{__name__}.json_observer"


#: The C{--logfile} and C{--nodaemon} of this process's twistd, for
#: L{json_observer}.
_json_destination: list = [None, True]


def json_observer() -> ILogObserver:
    """
    twistd's C{--logger} for C{--log-format json}: what twistd's file
    observer would be for its C{--logfile} (standard output for C{-} or, in
    the foreground, for none; a rotated file otherwise), writing JSON
    lines.
    """
    logfile, nodaemon = _json_destination
    if logfile == "-" and not nodaemon:
        sys.exit("Daemons cannot log to stdout, exiting!")
    if logfile == "-" or (nodaemon and not logfile):
        return json_lines(sys.stdout)
    output = LogFile.fromFullPath(logfile)
    _rotate_on_sigusr1(output.rotate)
    return json_lines(output)


def _rotate_on_sigusr1(rotate: Callable[[], None]) -> None:
    # As twistd does for its own file: only if nothing else claimed it.
    if signal.getsignal(signal.SIGUSR1):
        return

    def rotate_log(signum, frame):
        from twisted.internet import reactor

        reactor.callFromThread(rotate)

    signal.signal(signal.SIGUSR1, rotate_log)
