"""
twistd -n meter-gateway: wires the spool, the intake behind the UDP port,
and the uplink behind a reconnecting TCP client.
"""

from __future__ import annotations

import signal
from pathlib import Path

from twisted.application.service import MultiService
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from meter import config, database, gateway, secrets
from meter.gateway import exposition, shedding
from meter.database import Database
from meter.listening import NamedListener, StartRefused
from meter.notify import Notifier, ReadinessService
from meter.options import MeterOptions
from meter.gateway import link
from meter.gateway.failover import NodeEndpoint
from meter.gateway.fleet import FleetReload, file_loader
from meter.gateway.intake import settle_collector
from meter.gateway.metrics import GatewayMetrics, render
from meter.gateway.spool import VERSIONS, Spool
from meter.wire import MAX_DATAGRAM


class Options(MeterOptions):
    role = "gateway"
    synopsis = "[options]"
    longdesc = (
        "The gateway: takes the devices' days over UDP, keeps them in a durable spool and forwards each day "
        "to the cloud over TCP once every expected device has reported or the deadline passed."
    )
    overrides = {"listen": "listen", "cloud": "cloud", "deadline": "deadline", "spool": "spool", "metrics": "metrics"}
    optParameters = MeterOptions.optParameters + [
        ["listen", "l", None, "UDP HOST:PORT to take devices' datagrams on (config: [gateway] listen)"],
        ["cloud", None, None, "TCP HOST:PORT of the cloud, or its nodes' separated by commas (config: [gateway] cloud)"],
        ["deadline", None, None, "seconds after a day's first report to forward it anyway (config: [gateway] deadline)"],
        ["spool", None, None, "SQLite spool file (config: [gateway] spool)"],
        ["metrics", None, None, "Twisted endpoint of /metrics, /healthz, /readyz; \"\" for none (config: [gateway] metrics)"],
    ]


    def _check(self) -> None:
        # Every missing file at once, device keys included: the gateway never
        # invents a device's key (the device would not hold it), and runs
        # only once it can answer its whole fleet.
        folder, tls = self.config.security["dir"], self.config.gateway["tls"]
        keys = [secrets.device_key_path(folder, device_id) for device_id in self.config.fleet]
        secrets.require(folder, (secrets.tls_files(folder, "gateway") if tls else []) + keys)
        self.keys = secrets.read_fleet_keys(folder, self.config.fleet)
        self.tls = self.expected = None
        if tls:
            # Kept, to say what the cloud presented when it is refused.
            self.tls = link.PeerCertificates(secrets.client_tls(folder, self.config.gateway["cloud_name"]))
            self.expected = link.Expectation(
                self.config.gateway["cloud_name"], (folder / "ca.crt").absolute(), self.tls.presented
            )


class GatewayService(MultiService):
    """
    Opens the spool and resumes what it holds before the UDP port opens, so
    no device is acknowledged before the gateway knows its past.

    Why the tree is built in L{startService}, not in L{makeService}: the
    spool's SQLite connection must be opened in the process that uses it,
    and twistd forks (to run as a daemon) after C{makeService} returns; an
    SQLite connection must not cross a fork.  Everything else hangs from
    the open spool: the intake and the uplink start from what it holds,
    and the UDP port, the cloud client and the stats timer serve them.
    """

    log = Logger()

    def __init__(
        self, settings: dict, fleet: dict[int, str], keys: dict[int, bytes], tls, reactor, source: str = "the configuration",
        expected: link.Expectation | None = None, load_fleet=None, fleet_source: str = "",
    ):
        """
        @param source: where the settings came from, to name in messages.
        @param expected: what the cloud's certificate must be, to say what
            it was instead.
        @param load_fleet: reads the fleet and its keys again, on SIGHUP
            (see L{file_loader}); None: no reload.
        @param fleet_source: the file it reads, for the log.
        """
        MultiService.__init__(self)
        #: Where the settings came from, to name in messages.
        self._source = source
        #: What the cloud's certificate must be, to say what it was instead.
        self._expected = expected
        self._settings = settings
        self._fleet = fleet
        self._keys = keys
        self._tls = tls
        self._reactor = reactor
        self._load_fleet = load_fleet
        self._fleet_source = fleet_source
        self._hangup_before = None

    def startService(self):
        s = self._settings
        try:
            connection, recovered = Spool.open(s["spool"])
        except Exception as e:
            raise StartRefused(f"meter-gateway: cannot open spool {s['spool']}: {e}") from None
        # Commits on the reactor thread: meter.database says why.
        self.database = Database(connection, self._reactor, commit_interval=s["commit_interval"])
        self.spool = spool = Spool(self.database, recovered.depth)
        self.metrics = GatewayMetrics()
        self.uplink = gateway.Uplink(
            spool,
            self._reactor,
            s["batch_readings"],
            s["ack_timeout"],
            on_delivered=self._delivered,
            window=s["batches_in_flight"],
            max_retry_delay=s["max_backoff"],
            late_linger=s["late_linger"],
            metrics=self.metrics,
        )
        self.intake = gateway.Intake(
            self._fleet, spool, self._reactor, s["deadline"], self.uplink.send_next, check_source=s["check_source"],
            on_late=self.uplink.late_arrived, max_retry_delay=s["max_backoff"],
            replay_window=s["replay_window"],
            spool_limit=s["spool_limit"],
            reassembly_timeout=s["reassembly_timeout"],
            max_reassemblies=s["max_reassemblies"],
            max_transfers_per_day=s["max_transfers_per_day"],
            max_parts_per_day=s["max_parts_per_day"],
            metrics=self.metrics,
            forward=s["forward"],
            # Old devices take a hinted answer for none: shed = false is
            # the way to answer them without hints (docs/protocol.md).
            max_hint=s["shed_max_hint"] if s["shed"] else None,
        )
        self.intake.recover(recovered)

        host, port = s["listen"]
        shedder = shedding.Shedding(
            self.metrics, s["shed_target"], s["shed_interval"], s["shed_max_hint"], enabled=s["shed"]
        )
        self.protocol = protocol = gateway.GatewayProtocol(
            self.intake, self._keys, self._reactor, s["source_rate"], s["source_burst"], log_datagrams=s["log_datagrams"],
            shedding=shedder, receive_buffer=round(s["receive_buffer_mb"] * (1 << 20)),
        )
        NamedListener(
            # Its kernel receive timestamps measure the queue shedding reads.
            shedding.StampedUDPServer(port, protocol, interface=host, maxPacketSize=MAX_DATAGRAM, reactor=self._reactor),
            "meter-gateway",
            "UDP",
            f"--listen or [gateway] listen in {self._source}",
        ).setServiceParent(self)

        def swap(fleet: dict[int, str], keys: dict[int, bytes]) -> bool:
            if not self.running:
                return False  # read while the gateway stopped: nothing to serve
            self.intake.set_fleet(fleet)
            protocol.set_keys(keys)
            return True

        self.fleet_reload = FleetReload(
            self._load_fleet, swap, self._fleet, self._keys, self._fleet_source,
            run=lambda load: deferToThreadPool(self._reactor, self._reactor.getThreadPool(), load),
        )
        if self._load_fleet is not None:
            # The handler runs between two bytecodes of whatever the reactor
            # thread is doing: it only asks the reactor to reload between
            # two events, so no datagram sees half a fleet.
            self._hangup_before = signal.signal(
                signal.SIGHUP, lambda signum, frame: self._reactor.callFromThread(self.fleet_reload.reload)
            )
        # One endpoint per cloud node, tried in the order of [gateway] cloud
        # (meter.gateway.failover).
        endpoints = []
        # On a gateway with an interface on each side, connect from the cloud's side.
        bind = (s["cloud_source"], 0) if s["cloud_source"] else None
        for cloud_host, cloud_port in s["cloud"]:
            endpoint_type = TCP6ClientEndpoint if ":" in cloud_host else TCP4ClientEndpoint
            endpoint = endpoint_type(
                self._reactor, cloud_host, cloud_port, timeout=s["connect_timeout"], bindAddress=bind
            )
            if self._tls is not None:
                # One name for every node: they share the cloud's certificate.
                endpoint = wrapClientTLS(self._tls, endpoint)
            endpoints.append(endpoint)
        if self._tls is None:
            self.log.warn("connecting to the cloud in PLAIN TEXT ([gateway] tls = false)")
        self.cloud_link = cloud_link = link.CloudLink(
            [link.address_text(host, port) for host, port in s["cloud"]], self._reactor, s["max_backoff"],
            metrics=self.metrics,
        )
        link.CloudClientService(
            link.ReportingEndpoint(NodeEndpoint(cloud_link.nodes, endpoints), cloud_link, s["connect_timeout"]),
            gateway.CloudClientFactory(self.uplink, self._reactor, s["heartbeat"], cloud_link, self._expected),
            cloud_link,
            self._reactor,
            retry_policy=self._counted(cloud_link.retry_delay),
        ).setServiceParent(self)
        exposition.monitor(self, s["metrics"], self._reactor, exposition.GatewayExposition(
            self.metrics, self.intake, self.uplink, spool, self.database, protocol, s["spool_limit"],
            nodes=cloud_link.nodes, shedding=shedder, clock=self._reactor,
        ))
        self.log.info(
            "gateway for {n} devices: UDP {host}:{port}, cloud {cloud}, deadline {deadline:g} s, "
            "spool {spool}",
            n=len(self._fleet),
            host=host,
            port=port,
            cloud=", ".join(cloud_link.nodes.addresses),
            deadline=s["deadline"],
            spool=s["spool"],
        )
        self._stats = LoopingCall(self.log_stats)
        self._stats.clock = self._reactor
        self._stats.start(s["stats_interval"], now=False)
        # What exists now (the modules, the state recovered from the spool)
        # lives as long as the process: out of the collector's full passes,
        # which otherwise scan it all and stall the reactor, and so every
        # device's acknowledgement, while they run (docs/performance.md).
        settle_collector()
        # Last: READY=1 once the spool is open and the UDP port bound.
        ReadinessService(Notifier.from_environment(), self._reactor, f"UDP {host}:{port}").setServiceParent(self)
        MultiService.startService(self)

    def _counted(self, policy):
        """
        C{policy}, counting each reconnection it schedules (after a failed
        attempt or a lost connection) as a forwarding retry.
        """

        def retry(attempt: int) -> float:
            self.metrics.cloud_retries += 1
            return policy(attempt)

        return retry

    def log_stats(self) -> None:
        """
        One line of the gateway's gauges and counts, as logfmt: spool depth
        first, then reassemblies, duplicates, failures, forwarding retries
        and the rest (see L{meter.gateway.metrics}).
        """
        gauges = {**self.intake.gauges(), **self.protocol.shedding.stats_gauges()}
        # The text for a person; the gauges and counts, as numbers, for a
        # program reading the log's events.
        self.log.info("gateway stats: {stats}", stats=render(gauges, self.metrics), gauges=gauges, counts=self.metrics.counts())

    def _delivered(self, count: int) -> None:
        self.log.info("{count} readings delivered; {depth} left in the spool", count=count, depth=self.spool.depth)

    def stopService(self):
        if self._hangup_before is not None:
            signal.signal(signal.SIGHUP, self._hangup_before)
            self._hangup_before = None
        if self._stats.running:
            self._stats.stop()
        d = MultiService.stopService(self)

        def stopped(_):
            self.log_stats()
            self.intake.stop()
            self.uplink.stop()
            return self.database.stop()

        d.addCallback(stopped)
        d.addCallback(
            lambda _: self.log.info("gateway stopped: {stats}", stats=render({}, self.metrics), counts=self.metrics.counts())
        )
        return d


def makeService(options: Options):
    from twisted.internet import reactor

    # Here, before twistd logs, forks or binds anything: a spool that cannot
    # work, or that a running gateway holds, ends the start with one line
    # naming it and the cause.
    path = options.config.gateway["spool"]
    try:
        database.claim(path, VERSIONS)
    except database.Unusable as e:
        raise SystemExit(f"meter-gateway: cannot open spool {path}: {e}") from None
    # Absolute: a daemon may change its folder after this.
    if options["config"] is not None:
        source = Path(options["config"]).absolute()
    else:
        source = config.DEFAULT_CONFIG.absolute() if config.DEFAULT_CONFIG.exists() else None
    load_fleet = file_loader(source, options.given, options.config.security["dir"].absolute())
    return GatewayService(
        options.config.gateway, options.config.fleet, options.keys, options.tls, reactor, options.config.source,
        options.expected, load_fleet=load_fleet,
        fleet_source=str(source) if source is not None else "the embedded defaults",
    )
