"""
A daemon's listening port that cannot be bound ends the start with one line
naming the address, the cause and the setting that changes it, rather than
twistd's traceback of forty lines.
"""

from __future__ import annotations

import errno
import os

from twisted.application.service import IService, MultiService, Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

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



def url(address, path: str) -> str:
    """
    Where C{path} is served on a listening port's C{address}.
    """
    if isinstance(address, IPv6Address):
        return f"http://[{address.host}]:{address.port}{path}"
    if isinstance(address, IPv4Address):
        return f"http://{address.host}:{address.port}{path}"
    return f"{address}{path}"


class SiteService(Service):
    """
    Serves the web C{site} on the endpoint C{description} from the daemon's
    start to its stop: the monitoring pages, the cloud's web API.  A port
    that cannot be bound ends the start with one line naming the address,
    the cause and the settings that change it (a L{StartRefused}); once
    bound it logs C{"<label> on <url>"}, where a port the kernel chose
    becomes known.

    @param name: the daemon, as its lines start (C{"meter-cloud"}).
    @param served: what the site serves, for the refusal (C{"metrics"}).
    @param setting: the option and key that choose the endpoint.
    @param label: the first word of the line once bound (C{"metrics"}).
    @param path: the path that line's URL shows (C{"/metrics"}).
    """

    def __init__(self, description: str, site, reactor, name: str, served: str, setting: str, label: str, path: str):
        self._description = description
        self._site = site
        self._reactor = reactor
        self._name = name
        self._served = served
        self._setting = setting
        self._label = label
        self._path = path
        #: The listening port, while there is one.
        self.port = None
        self._listening = False

    def privilegedStartService(self):
        # Bound where the daemon's other listeners are bound: before twistd
        # drops privileges.
        Service.privilegedStartService(self)
        self._listen()

    def startService(self):
        if not self._listening:
            self._listen()
        Service.startService(self)

    def _listen(self) -> None:
        self._listening = True
        listening = serverFromString(self._reactor, self._description).listen(self._site)
        if not listening.called:
            # An endpoint that binds later (none of the usual ones does):
            # its outcome is logged when it comes.
            listening.addCallbacks(self._bound, self._failed_later)
            return
        outcome: list = []
        listening.addBoth(outcome.append)
        if isinstance(outcome[0], Failure):
            raise StartRefused(self.refusal(outcome[0].value))
        self._bound(outcome[0])

    def refusal(self, e: Exception) -> str:
        """
        The one line a daemon ends with when this site's port cannot be
        bound.
        """
        if isinstance(e, CannotListenError):
            address = f"{e.interface or '*'}:{e.port}"
            cause = getattr(e.socketError, "strerror", None) or str(e.socketError)
        else:
            address, cause = self._description, str(e)
        return (
            f"{self._name}: cannot serve {self._served} on {address}: {cause} "
            f"({self._setting} chooses the endpoint; \"\" turns it off)"
        )

    def _bound(self, port) -> None:
        self.port = port
        log.info("{label} on {url}", label=self._label, url=url(port.getHost(), self._path), description=self._description)

    def _failed_later(self, failure: Failure) -> None:
        log.error("{refusal}", refusal=self.refusal(failure.value))

    def stopService(self):
        Service.stopService(self)
        port, self.port = self.port, None
        self._listening = False
        if port is not None:
            return port.stopListening()
