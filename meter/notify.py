"""
systemd's readiness protocol (sd_notify(3)), of our own: a daemon started
by a unit of C{Type=notify} says C{READY=1} once it serves (its ports bound,
its spool or store open) and C{STOPPING=1} when it begins to stop.

The service manager passes the address to tell in C{NOTIFY_SOCKET}: a path,
or an abstract socket name after C{@}.  Each message is one datagram of
C{KEY=value} lines.  Without C{NOTIFY_SOCKET} (run by hand, by the tests'
runner) nothing is sent.  A message that cannot be sent is logged once and
never stops the daemon: it serves whether or not its manager hears.
"""

from __future__ import annotations

import os
import socket
from typing import Mapping

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer


class Notifier:
    """
    Sends state changes to the service manager at C{address} (the value of
    C{NOTIFY_SOCKET}), or nowhere if it is C{None}.
    """

    log = Logger()

    def __init__(self, address: str | None):
        self.address = address or None
        self._failed = False

    @classmethod
    def from_environment(cls, environment: Mapping[str, str] = os.environ) -> "Notifier":
        return cls(environment.get("NOTIFY_SOCKET"))

    def _target(self) -> str:
        address = self.address
        if address.startswith("@"):
            return "\0" + address[1:]
        if address.startswith("/"):
            return address
        # systemd also knows vsock: addresses, for virtual machines; a
        # daemon of ours runs on the host of its manager.
        raise OSError("not a Unix socket address (a path, or @name)")

    def send(self, *assignments: str) -> bool:
        """
        Send C{assignments} (C{"READY=1"}, C{"STATUS=..."}) in one datagram;
        whether it left.  Never blocks: a manager that does not read its
        queue is a failure like any other.
        """
        if self.address is None:
            return False
        message = "\n".join(assignments).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.setblocking(False)
                s.sendto(message, self._target())
        except OSError as e:
            if not self._failed:
                self._failed = True
                self.log.warn(
                    "cannot tell the service manager at NOTIFY_SOCKET={address} {message}: {why} "
                    "(the daemon runs on; further failures are not logged)",
                    address=self.address,
                    message=assignments[0] if assignments else "",
                    why=e.strerror or str(e),
                )
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")


@implementer(IStreamServerEndpoint)
class _Watched:
    """
    An endpoint that reports to C{listened} the outcome of its listening.
    """

    def __init__(self, endpoint, listened: Deferred):
        self._endpoint = endpoint
        self._listened = listened

    def listen(self, factory):
        d = self._endpoint.listen(factory)

        def report(result):
            if not self._listened.called:
                # The failure itself goes on to the endpoint's service,
                # which reports it; here only "not ready" is kept.
                self._listened.callback(None if isinstance(result, Failure) else result)
            return result

        return d.addBoth(report)


class ReadinessService(Service):
    """
    Says C{READY=1} once it has started, the endpoints it L{watch}es listen
    and the reactor runs: placed last in its parent, after the services
    that bind ports and open files, whose C{startService} runs before its
    own.  Says C{STOPPING=1} when it stops: the first of its parent's
    services to stop, as a parent stops them in reverse.

    Why wait for the reactor: twistd starts the services before the
    reactor runs, and the reactor installs its signal handlers as it
    starts.  A manager told "ready" sooner may send its SIGTERM while the
    signal's default action still kills the process, with no clean stop.
    """

    def __init__(self, notifier: Notifier, reactor, status: str = ""):
        self.notifier = notifier
        self._reactor = reactor
        self._status = status
        self._listening: list[Deferred] = []

    def watch(self, endpoint):
        """
        C{endpoint}, reporting its listening to this service: C{READY=1}
        waits for it, and is not sent if it fails.
        """
        listened = Deferred()
        self._listening.append(listened)
        return _Watched(endpoint, listened)

    def startService(self):
        Service.startService(self)
        self._reactor.callWhenRunning(lambda: gatherResults(self._listening).addCallback(self._ready))

    def _ready(self, ports) -> None:
        if None in ports:
            # A listener failed: the daemon is not ready, and its own
            # service said why.
            return
        if self.running:
            self.notifier.ready(self._status)

    def stopService(self):
        Service.stopService(self)
        self.notifier.stopping()
