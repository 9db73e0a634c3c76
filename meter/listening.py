"""
A daemon's listening port that cannot be bound ends the start with one line
naming the address, the cause and the setting that changes it, rather than
twistd's traceback of forty lines.
"""

from __future__ import annotations

import errno
import os

from twisted.application.service import IService, MultiService
from twisted.internet.error import CannotListenError

#: What an operator can do about the common causes.
_HINTS = {
    errno.EADDRINUSE: "another process listens there",
    errno.EACCES: "ports below 1024 need privileges",
    errno.EADDRNOTAVAIL: "no interface of this host has that address",
}


def cannot_listen(name: str, kind: str, error: CannotListenError, setting: str) -> str:
    """
    The line that ends the start of daemon C{name} (C{"meter-cloud"}) when
    its C{kind} (C{"TCP"}, C{"UDP"}) port cannot be bound, e.g.::

        meter-cloud: cannot listen on TCP 127.0.0.1:8001: address already in use
        (another process listens there); choose another with --listen or
        [cloud] listen in etc/meter.toml

    @param setting: the option and key that change the address.
    """
    interface = error.interface or "*"
    address = f"[{interface}]:{error.port}" if ":" in interface else f"{interface}:{error.port}"
    cause = error.socketError
    number = getattr(cause, "errno", None)
    if number is not None:
        reason = os.strerror(number)
        reason = reason[:1].lower() + reason[1:]
        if number in _HINTS:
            reason += f" ({_HINTS[number]})"
    else:
        reason = str(cause)
    return f"{name}: cannot listen on {kind} {address}: {reason}; choose another with {setting}"


class StartRefused(SystemExit, Exception):
    """
    A daemon's start ended by what the operator can change (a port in use,
    a spool that cannot be opened), raised from C{startService} or
    C{privilegedStartService} with its one line.

    A SystemExit: twistd in the foreground ends with the line alone, no
    traceback.  An Exception too: a daemonizing twistd (no C{-n}) starts
    the services in its detached child, which reports to the launching
    command through a status pipe only what it catches as an Exception.  A
    bare SystemExit passes that by, and the launching command, which holds
    the pipe's write end open itself, waits for ever.  Caught, the line's
    start is printed by the launching command, which exits 1, and the whole
    line is in the daemon's log file.
    """


class NamedListener(MultiService):
    """
    Runs one listening service, C{listener}; if its port cannot be bound (at
    privileged start or at start, whichever binds it), the start ends with
    the line of L{cannot_listen} and a non-zero exit.

    A L{StartRefused}, which twistd lets through as that one line; any
    other error keeps its traceback, being no operator's doing.
    """

    def __init__(self, listener: IService, name: str, kind: str, setting: str):
        MultiService.__init__(self)
        self.listener = listener
        self._name = name
        self._kind = kind
        self._setting = setting
        listener.setServiceParent(self)

    def privilegedStartService(self):
        try:
            MultiService.privilegedStartService(self)
        except CannotListenError as e:
            raise StartRefused(cannot_listen(self._name, self._kind, e, self._setting)) from None

    def startService(self):
        try:
            MultiService.startService(self)
        except CannotListenError as e:
            raise StartRefused(cannot_listen(self._name, self._kind, e, self._setting)) from None
