"""
twistd -n meter-cloud: wires the cloud's store and TCP listener.
"""

from __future__ import annotations

import sys

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from meter import cloud, secrets
from meter.database import Database, connect
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
        self._console = console or _console
        self.database: Database | None = None
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
        self.database = Database(connection, self._reactor)
        self.log.info("readings database {path}", path=path)
        self.store = cloud.CloudStore(self.database, self._console, self._reactor)
        factory = cloud.CloudFactory(self.store, self._settings["idle_timeout"], self._reactor)
        if self._tls is not None:
            # TLS wraps whatever endpoint is configured; the TLS options
            # require a client certificate signed by the suite's CA.
            factory = TLSMemoryBIOFactory(self._tls, False, factory)
            self.log.info("listening on {listen} with TLS, gateways need a certificate of the suite's CA", listen=self._settings["listen"])
        else:
            self.log.warn("listening on {listen} in PLAIN TEXT ([cloud] tls = false)", listen=self._settings["listen"])
        strports.service(self._settings["listen"], factory).setServiceParent(self)
        MultiService.startService(self)

    def stopService(self):
        d = MultiService.stopService(self)
        d.addCallback(lambda _: self.database.stop())
        d.addCallback(lambda _: self.log.info("cloud stopped: {counters}", counters=dict(self.store.counters)))
        return d


def _console(text: str) -> None:
    # The console is the process's real stdout, not twistd's log: the lines
    # must read exactly as the report prints them, with no log prefix.  One
    # write and one flush per batch.
    out = sys.__stdout__
    out.write(text)
    out.flush()


def makeService(options: Options):
    from twisted.internet import reactor

    return CloudService(options.config.cloud, options.tls, reactor)
