"""
twistd -n meter-cloud: wires the cloud's store and TCP listener.
"""

from __future__ import annotations

import sys

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.logger import Logger

from meter import cloud
from meter.dbthread import DatabaseThread, connect
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


class CloudService(MultiService):
    """
    Opens the database, then listens; at stop, stops listening, then
    finishes the pending commits and closes the database.
    """

    log = Logger()

    def __init__(self, settings: dict, reactor, console=None):
        MultiService.__init__(self)
        self._settings = settings
        self._reactor = reactor
        self._console = console or _console_line
        self.database: DatabaseThread | None = None
        self.store: cloud.CloudStore | None = None

    def startService(self):
        path = self._settings["db"]
        try:
            connection = connect(path)
            cloud.open_database(connection)
        except Exception as e:
            raise SystemExit(f"meter-cloud: cannot open database {path}: {e}") from None
        self.database = DatabaseThread(connection, self._reactor, name="meter-cloud-db")
        self.database.start()
        self.log.info("readings database {path}", path=path)
        self.store = cloud.CloudStore(self.database, self._console, self._reactor)
        factory = cloud.CloudFactory(self.store, self._settings["idle_timeout"], self._reactor)
        strports.service(self._settings["listen"], factory).setServiceParent(self)
        if self._settings["listen"].startswith(("tcp:", "tcp6:", "unix:")):
            self.log.warn("listening on {listen} in PLAIN TEXT (no TLS)", listen=self._settings["listen"])
        else:
            self.log.info("listening on {listen}", listen=self._settings["listen"])
        MultiService.startService(self)

    def stopService(self):
        d = MultiService.stopService(self)
        d.addCallback(lambda _: self.database.stop())
        d.addCallback(lambda _: self.log.info("cloud stopped: {counters}", counters=dict(self.store.counters)))
        return d


def _console_line(line: str) -> None:
    # The console is the process's real stdout, not twistd's log: the line
    # must read exactly as the report prints it, with no log prefix.
    out = sys.__stdout__
    out.write(line + "\n")
    out.flush()


def makeService(options: Options):
    from twisted.internet import reactor

    return CloudService(options.config.cloud, reactor)
