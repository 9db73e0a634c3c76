"""
twistd -n meter-cloud: wires the cloud's store and TCP listener.
"""

from __future__ import annotations

import resource

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from meter import cloud, database, secrets
from meter.database import connect
from meter.options import MeterOptions


class Options(MeterOptions):
    role = "cloud"
    synopsis = "[options]"
    longdesc = "The cloud: accepts gateways' batches over TCP, stores each reading once in SQLite and prints it."
    overrides = {"listen": "listen", "db": "db"}
    optParameters = MeterOptions.optParameters + [
        ["listen", "l", None, "Twisted endpoint to listen on (config: [cloud] listen)"],
        ["db", "d", None, "SQLite database of readings (config: [cloud] db)"],
    ]


    def _check(self) -> None:
        self.tls = secrets.server_tls(self.config.security["dir"]) if self.config.cloud["tls"] else None


class CloudService(MultiService):
    """
    Opens the database, then listens; at stop, stops listening, then
    finishes the pending commits and closes the database.
    """

    log = Logger()

    def __init__(self, settings: dict, tls, reactor, console=None):
        MultiService.__init__(self)
        self._settings = settings
        self._tls = tls
        self._reactor = reactor
        self._console = console or cloud.write_console
        self.readings: cloud.SQLiteReadingStore | None = None
        self.store: cloud.CloudStore | None = None

    def startService(self):
        path = self._settings["db"]
        try:
            connection = connect(path)
            cloud.open_database(connection)
        except Exception as e:
            raise SystemExit(f"meter-cloud: cannot open database {path}: {e}") from None
        # Commits on the reactor thread: with a thread of their own the cloud
        # took ~40% more CPU a reading (see meter.database).
        self.readings = cloud.SQLiteReadingStore(connection, self._reactor)
        self.log.info("readings database {path}", path=path)
        self.store = cloud.CloudStore(self.readings, self._console, self._reactor)
        descriptors, how = raise_descriptor_limit()
        max_connections, max_unauthenticated = cloud.connection_limits(
            descriptors, self._settings["max_unauthenticated"]
        )
        self.log.info(
            "descriptor limit {descriptors} ({how}): at most {connections} connections, {strangers} of them not "
            "authenticated yet, each for {timeout:g} s at most",
            descriptors=descriptors,
            how=how,
            connections=max_connections,
            strangers=max_unauthenticated,
            timeout=self._settings["handshake_timeout"],
        )
        factory = cloud.CloudFactory(
            self.store,
            self._settings["idle_timeout"],
            self._reactor,
            handshake_timeout=self._settings["handshake_timeout"],
            max_unauthenticated=max_unauthenticated,
            max_connections=max_connections,
        )
        admission = factory.admission
        if self._tls is not None:
            # TLS wraps whatever endpoint is configured; the TLS options
            # require a client certificate signed by the suite's CA.
            factory = TLSMemoryBIOFactory(self._tls, False, factory)
            self.log.info("listening on {listen} with TLS, gateways need a certificate of the suite's CA", listen=self._settings["listen"])
        else:
            self.log.warn("listening on {listen} in PLAIN TEXT ([cloud] tls = false)", listen=self._settings["listen"])
        listener = strports.service(self._settings["listen"], factory)
        listener.endpoint = AcceptFailuresCounted(listener.endpoint, admission.accept_failed)
        listener.setServiceParent(self)
        MultiService.startService(self)

    def stopService(self):
        d = MultiService.stopService(self)
        d.addCallback(lambda _: self.readings.database.stop())
        d.addCallback(lambda _: self.log.info("cloud stopped: {metrics}", metrics=self.store.metrics))
        return d


def raise_descriptor_limit() -> tuple[int, str]:
    """
    Raise the soft limit of open descriptors to the hard one: each
    connection holds one, and the common soft default of 1,024 is far below
    what the system allows.  The limit in force, and how it came to be.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return soft, "the hard limit"
    if hard == resource.RLIM_INFINITY:
        # Linux refuses an unlimited number of descriptors: keep the soft one.
        return soft, "the hard limit is unlimited"
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        return soft, f"not raised to the hard limit {hard}: {e}"
    return hard, f"raised from {soft}"


#: What twisted.internet.tcp.Port logs each time accept() fails for want of
#: a descriptor, or it closes a connection at once to recover: a line a
#: connection in a flood.  Counted instead.
_ACCEPT_FAILURES = ("Could not accept new connection", "EMFILE recovery: Closed socket")
#: Its other lines of the same recovery, a pair each time: dropped.
_ACCEPT_RECOVERY = ("EMFILE encountered", "Re-reserving EMFILE recovery")


@implementer(IStreamServerEndpoint)
class AcceptFailuresCounted:
    """
    An endpoint whose listening port counts its accept failures (calling
    C{counted} for each) instead of logging a line each.
    """

    def __init__(self, endpoint, counted):
        self._endpoint = endpoint
        self._counted = counted
        self._forward = globalLogPublisher

    def listen(self, factory):
        return self._endpoint.listen(factory).addCallback(self._quiet)

    def _quiet(self, port):
        # tcp.Port logs its accept() events through its _logger (buffered
        # while it accepts, so no descriptor is needed meanwhile); any other
        # kind of port is left as it is.
        logger = getattr(port, "_logger", None)
        if isinstance(logger, Logger):
            self._forward = logger.observer
            port._logger = Logger(namespace=logger.namespace, observer=self._observe)
        return port

    def _observe(self, event) -> None:
        text = event.get("log_format") or ""
        if text.startswith(_ACCEPT_FAILURES):
            self._counted()
        elif not text.startswith(_ACCEPT_RECOVERY):
            self._forward(event)


def makeService(options: Options):
    from twisted.internet import reactor

    # Here, before twistd logs, forks or binds anything: a database that
    # cannot work, or that a running cloud holds, ends the start with one
    # line naming it and the cause.
    path = options.config.cloud["db"]
    try:
        database.claim(path, cloud.VERSIONS)
    except database.Unusable as e:
        raise SystemExit(f"meter-cloud: cannot open database {path}: {e}") from None
    return CloudService(options.config.cloud, options.tls, reactor)
