"""
The web site served on C{[cloud] web} from the cloud's start to its stop.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import error
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure

from meter.monitoring.web import url

log = Logger()


class WebService(Service):
    """
    Serves C{site} on the endpoint C{description}.  A port that cannot be
    bound ends the start with one line naming the address, the cause and
    the setting; once bound it logs C{web on http://HOST:PORT/} (a port
    chosen by the kernel is known only there).
    """

    def __init__(self, description: str, site, reactor, setting: str = "--web or [cloud] web"):
        self._description = description
        self._site = site
        self._reactor = reactor
        self._setting = setting
        #: The listening port, while there is one.
        self.port = None
        self._listening = False

    def privilegedStartService(self):
        # Bound where the daemon's other listeners are: before twistd drops
        # privileges.
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
            listening.addCallbacks(self._bound, lambda failure: log.error("{refusal}", refusal=self.refusal(failure.value)))
            return
        outcome: list = []
        listening.addBoth(outcome.append)
        if isinstance(outcome[0], Failure):
            raise SystemExit(self.refusal(outcome[0].value))
        self._bound(outcome[0])

    def refusal(self, e: Exception) -> str:
        if isinstance(e, error.CannotListenError):
            address = f"{e.interface or '*'}:{e.port}"
            cause = getattr(e.socketError, "strerror", None) or str(e.socketError)
        else:
            address, cause = self._description, str(e)
        return f"meter-cloud: cannot serve the web API on {address}: {cause} ({self._setting} chooses the endpoint; \"\" turns it off)"

    def _bound(self, port) -> None:
        self.port = port
        log.info("web on {url}", url=url(port.getHost(), "/"))

    def stopService(self):
        Service.stopService(self)
        port, self.port = self.port, None
        self._listening = False
        if port is not None:
            return port.stopListening()


def serve(description: str, site, reactor) -> WebService | None:
    """
    The web service on C{description}, or None when it is empty (off).
    """
    if not description:
        return None
    return WebService(description, site, reactor)
