"""
twistd -n meter-gateway: wires the spool, the intake behind the UDP port,
and the uplink behind a reconnecting TCP client.
"""

from __future__ import annotations

from twisted.application.internet import ClientService, UDPServer, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.logger import Logger

from meter import gateway
from meter.dbthread import DatabaseThread
from meter.options import MeterOptions
from meter.spool import Spool
from meter.wire import MAX_DATAGRAM


class Options(MeterOptions):
    role = "gateway"
    synopsis = "[options]"
    longdesc = (
        "The gateway: takes the devices' days over UDP, keeps them in a durable spool and forwards each day "
        "to the cloud over TCP once every expected device has reported or the deadline passed."
    )
    overrides = {"listen": "listen", "cloud": "cloud", "deadline": "deadline", "spool": "spool"}
    optParameters = MeterOptions.optParameters + [
        ["listen", "l", None, "UDP HOST:PORT to take devices' datagrams on (config: [gateway] listen)"],
        ["cloud", None, None, "TCP HOST:PORT of the cloud (config: [gateway] cloud)"],
        ["deadline", None, None, "seconds after a day's first report to forward it anyway (config: [gateway] deadline)"],
        ["spool", None, None, "SQLite spool file (config: [gateway] spool)"],
    ]


class GatewayService(MultiService):
    """
    Opens the spool and resumes what it holds before the UDP port opens, so
    no device is acknowledged before the gateway knows its past.
    """

    log = Logger()

    def __init__(self, settings: dict, fleet: dict[int, str], reactor):
        MultiService.__init__(self)
        self._settings = settings
        self._fleet = fleet
        self._reactor = reactor

    def startService(self):
        s = self._settings
        try:
            connection, recovered = Spool.open(s["spool"])
        except Exception as e:
            raise SystemExit(f"meter-gateway: cannot open spool {s['spool']}: {e}") from None
        self.database = DatabaseThread(connection, self._reactor, name="meter-spool")
        self.database.start()
        spool = Spool(self.database)
        self.uplink = gateway.Uplink(
            spool, self._reactor, s["batch_readings"], s["ack_timeout"], on_delivered=self._delivered
        )
        self.intake = gateway.Intake(self._fleet, spool, self._reactor, s["deadline"], self.uplink.kick)
        self.intake.recover(recovered)

        host, port = s["listen"]
        UDPServer(
            port, gateway.GatewayProtocol(self.intake), interface=host, maxPacketSize=MAX_DATAGRAM
        ).setServiceParent(self)
        cloud_host, cloud_port = s["cloud"]
        endpoint_type = TCP6ClientEndpoint if ":" in cloud_host else TCP4ClientEndpoint
        endpoint = endpoint_type(self._reactor, cloud_host, cloud_port, timeout=s["connect_timeout"])
        ClientService(
            endpoint,
            gateway.CloudClientFactory(self.uplink, self._reactor, s["heartbeat"]),
            retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=s["max_backoff"]),
            clock=self._reactor,
        ).setServiceParent(self)
        self.log.info(
            "gateway for {n} devices: UDP {host}:{port}, cloud {cloud_host}:{cloud_port}, deadline {deadline:g} s, "
            "spool {spool}",
            n=len(self._fleet),
            host=host,
            port=port,
            cloud_host=cloud_host,
            cloud_port=cloud_port,
            deadline=s["deadline"],
            spool=s["spool"],
        )
        MultiService.startService(self)

    def _delivered(self, count: int) -> None:
        self.intake.delivered(count)
        self.log.info("{count} readings delivered; {depth} left in the spool", count=count, depth=self.intake.depth)

    def stopService(self):
        d = MultiService.stopService(self)

        def stopped(_):
            self.intake.stop()
            self.uplink.stop()
            return self.database.stop()

        d.addCallback(stopped)
        d.addCallback(
            lambda _: self.log.info(
                "gateway stopped: {intake}; uplink {uplink}",
                intake=dict(self.intake.counters),
                uplink=dict(self.uplink.counters),
            )
        )
        return d


def makeService(options: Options):
    from twisted.internet import reactor

    return GatewayService(options.config.gateway, options.config.fleet, reactor)
