"""
twistd -n meter-cloud: builds the cloud's service tree (the readings
database, the store, the TCP listener).
"""

from __future__ import annotations

import resource
from pathlib import Path

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.defer import succeed
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from zope.interface import implementer

from meter import cloud, database, logs, secrets
from meter.cloud import exposition, web
from meter.cloud.web import dashboard as dashboard_files
from meter.cloud.queries import SQLiteReadingQueries
from meter.cloud.console_file import ConsoleFile, console_path
from meter.cloud.postgres import PostgresReadingStore
from meter.database import connect
from meter.notify import Notifier, ReadinessService
from meter.listening import NamedListener, StartRefused
from meter.options import MeterOptions
from meter.postgres import PostgresLocation

log = Logger()


class Options(MeterOptions):
    role = "cloud"
    synopsis = "[options]"
    longdesc = (
        "The cloud: accepts gateways' batches over TCP, stores each reading once in SQLite or PostgreSQL and prints it."
    )
    overrides = {"listen": "listen", "db": "db", "metrics": "metrics", "web": "web"}
    optParameters = MeterOptions.optParameters + [
        ["listen", "l", None, "Twisted endpoint to listen on (config: [cloud] listen)"],
        ["db", "d", None, "database of readings: an SQLite file or a postgresql:// URI (config: [cloud] db)"],
        ["metrics", None, None, "Twisted endpoint of /metrics, /healthz, /readyz; \"\" for none (config: [cloud] metrics)"],
        ["web", None, None, "Twisted endpoint of the dashboard and the API; \"\" for none (config: [cloud] web)"],
    ]


    def _check(self) -> None:
        self.tls = secrets.server_tls(self.config.security["dir"]) if self.config.cloud["tls"] else None
        token_file = self.config.cloud["web_token_file"]
        try:
            self.web_token = None if token_file is None or not self.config.cloud["web"] else web.read_token(token_file)
        except web.TokenError as e:
            raise usage.UsageError(str(e)) from None


@implementer(cloud.IReadingStore)
class ReadingsDatabase(Service):
    """
    The SQLite database of readings, an L{cloud.IReadingStore} while the
    service runs; at stop, its pending commits finish and it is closed.
    """

    def __init__(self, path: Path, reactor, cache_mb: float | None = None):
        """
        @param cache_mb: the SQLite page cache, in megabytes (C{[cloud]
            cache_mb}; SQLite's default if None).
        """
        self._path = path
        self._reactor = reactor
        self._cache_mb = cache_mb
        self._store: cloud.SQLiteReadingStore | None = None

    def startService(self):
        # Opened here, not in makeService: twistd forks to daemonize between
        # the two, and an SQLite connection must not be carried across a
        # fork (the child holds none of the parent's POSIX locks).
        try:
            connection = connect(self._path, self._cache_mb)
            cloud.open_database(connection)
        except Exception as e:
            raise StartRefused(f"meter-cloud: cannot open database {self._path}: {e}") from None
        # Commits on the reactor thread: meter.database says why.
        self._store = cloud.SQLiteReadingStore(connection, self._reactor)
        log.info("readings database {path}", path=self._path)
        Service.startService(self)

    def stopService(self):
        Service.stopService(self)
        return self._store.database.stop()

    @property
    def database(self) -> database.Database | None:
        """
        The open database's transactions, or None before it is open.
        """
        return None if self._store is None else self._store.database

    def add(self, columns, stored_at):
        return self._store.add(columns, stored_at)

    def readings(self, device_id=None, device_ip=None, since=None, until=None, limit=None):
        return self._store.readings(device_id, device_ip, since, until, limit)

    def devices(self):
        return self._store.devices()


class CloudService(MultiService):
    """
    The cloud: its children start in order (the database, then the
    listener) and stop in reverse, each once the one before it has stopped:
    no batch is taken after the database begins to close.
    """

    def __init__(self, metrics: cloud.CloudMetrics):
        MultiService.__init__(self)
        self.metrics = metrics

    def stopService(self):
        Service.stopService(self)
        d = succeed(None)
        for service in reversed(list(self)):
            d.addCallback(lambda _, service=service: service.stopService())
            # A child that fails to stop is logged, and the next still
            # stops: the database must be flushed and closed whatever the
            # listener did.
            d.addErrback(lambda failure: log.failure("a part of the cloud did not stop cleanly", failure))
        d.addCallback(lambda _: log.info("cloud stopped: {metrics}", metrics=self.metrics))
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


def read_side(settings, reactor):
    """
    The web API's queries: of C{[cloud] read_db} if set (a replica), else
    of C{[cloud] db}, PostgreSQL or SQLite as it is.
    """
    from meter.cloud.pgqueries import PostgresReadingQueries

    db, read_db = settings["db"], settings["read_db"]
    if read_db is not None:
        if not isinstance(db, PostgresLocation):
            raise SystemExit("meter-cloud: [cloud] read_db is set, but db is an SQLite file: a replica to read is "
                             "for a PostgreSQL db (set read_db = \"\")")
        log.info("the web API reads {where}", where=str(read_db))
        return PostgresReadingQueries(read_db, reactor)
    if isinstance(db, PostgresLocation):
        return PostgresReadingQueries(db, reactor)
    return SQLiteReadingQueries(db, reactor)


def makeService(options: Options) -> CloudService:
    """
    The cloud's service tree: the readings database, then the listener of
    gateway connections over the store that serves them.
    """
    from twisted.internet import reactor

    settings = options.config.cloud
    path = settings["db"]
    metrics = cloud.CloudMetrics()
    service = CloudService(metrics)
    if isinstance(path, PostgresLocation):
        # A database server: any number of clouds share it, and it may be
        # down now.  The cloud starts anyway, connects with backoff (saying
        # why it cannot), and refuses batches until it is connected: the
        # gateways keep them meanwhile.
        readings = PostgresReadingStore(path, reactor)
        log.info("readings database {where}", where=str(path))
        # No file beside the database for a daemon's console lines: one in
        # the folder the cloud runs in.
        console_beside = Path("cloud.sqlite")
    else:
        # Here, before twistd logs, forks or binds anything: a database that
        # cannot work, or that a running cloud holds, ends the start with one
        # line naming it and the cause.
        try:
            database.claim(path, cloud.VERSIONS)
        except database.Unusable as e:
            raise SystemExit(f"meter-cloud: cannot open database {path}: {e}") from None
        readings = ReadingsDatabase(path, reactor, settings["cache_mb"])
        console_beside = path
    readings.setServiceParent(service)
    # A daemon's standard output goes nowhere: its console lines go to a file.
    console_file = console_path(settings["console"], console_beside, logs.daemonized(options))
    try:
        console = cloud.write_console if console_file is None else ConsoleFile(console_file).write
    except OSError as e:
        raise SystemExit(f"meter-cloud: cannot open console file {console_file}: {e.strerror} ([cloud] console)") from None
    if console_file is not None:
        log.info("console lines appended to {path}", path=str(console_file))
    store = cloud.CloudStore(readings, console, reactor, metrics, console_format=cloud.DayHeaders().text)

    descriptors, how = raise_descriptor_limit()
    max_connections, max_unauthenticated = cloud.connection_limits(descriptors, settings["max_unauthenticated"])
    log.info(
        "descriptor limit {descriptors} ({how}): at most {connections} connections, {strangers} of them not "
        "authenticated yet, each for {timeout:g} s at most",
        descriptors=descriptors,
        how=how,
        connections=max_connections,
        strangers=max_unauthenticated,
        timeout=settings["handshake_timeout"],
    )
    factory = cloud.CloudFactory(
        store,
        settings["idle_timeout"],
        reactor,
        handshake_timeout=settings["handshake_timeout"],
        max_unauthenticated=max_unauthenticated,
        max_connections=max_connections,
    )
    admission = factory.admission
    exposition.monitor(service, settings["metrics"], reactor, exposition.CloudExposition(metrics, factory, readings))
    if settings["web"]:
        # Its queries on read connections and threads of their own: ingest
        # (on the reactor thread for SQLite, on the store's connection for
        # PostgreSQL) never waits for a reader.
        queries = read_side(settings, reactor)
        queries.setServiceParent(service)
        site = web.WebSite(web.resource_tree(queries, web.STATIC, reactor), options.web_token)
        web.serve(settings["web"], site, reactor).setServiceParent(service)
        absent = dashboard_files.missing(web.STATIC)
        if absent is not None:
            log.warn("{why}", why=absent)
    if options.tls is not None:
        # TLS wraps whatever endpoint is configured; the TLS options
        # require a client certificate signed by the suite's CA.
        factory = TLSMemoryBIOFactory(options.tls, False, factory)
        log.info("listening on {listen} with TLS, gateways need a certificate of the suite's CA", listen=settings["listen"])
    else:
        log.warn("listening on {listen} in PLAIN TEXT ([cloud] tls = false)", listen=settings["listen"])
    listener = strports.service(settings["listen"], factory)
    listener.endpoint = AcceptFailuresCounted(listener.endpoint, admission.accept_failed)
    # Last: READY=1 once the database is open and the listener bound; a
    # port in use ends the start with one line naming the setting.
    readiness = ReadinessService(Notifier.from_environment(), reactor, f"listening on {settings['listen']}")
    listener.endpoint = readiness.watch(listener.endpoint)
    named = NamedListener(listener, "meter-cloud", "TCP", f"--listen or [cloud] listen in {options.config.source}")
    named.setServiceParent(service)
    readiness.setServiceParent(service)
    return service
