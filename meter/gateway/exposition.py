"""
The gateway on its monitoring endpoint (L{meter.monitoring.web}): its
counters, gauges and histograms as Prometheus families, and whether it is
ready to take the devices' days.

Everything is read when Prometheus scrapes, on the reactor thread, from
the objects that count (L{GatewayMetrics}) and those that hold the state
(the intake, the uplink, the spool's database, the UDP port): the
per-datagram path keeps its plain attribute increments.  docs/monitoring.md
describes every family.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client.core import GaugeMetricFamily

from meter.gateway.failover import CloudNodes
from meter.gateway.metrics import GatewayMetrics
from meter.gateway.shedding import Shedding
from meter.monitoring import exposition as families, udp, web

#: The admission's refusals (each answered C{bad}, or C{busy} for the last
#: two) by the counter that counts them, with the code the device's answer
#: starts with (docs/protocol.md).
ADMISSION_CODES = {
    "unknown_device": "fleet",
    "wrong_address": "address",
    "wrong_source": "source",
    "refused_replay": "replay",
    "refused_day": "day",
    "inconsistent_chunks": "transfer",
    "refused_limit": "limit",
    "refused_minute": "minute",
    "refused_conflict": "conflict",
    "refused_spool_full": "spool_full",
    "refused_overloaded": "overloaded",
    "shed": "shed",
}

#: The admission's refusals answered C{busy} (the device retries them).
BUSY = ("refused_spool_full", "refused_overloaded", "spool_failures", "shed")

#: The spool steps whose failures are counted, by their counter.
STEPS = {
    "spool_failures": "spool_chunk",
    "close_failures": "close_round",
    "forget_failures": "forget_ids",
    "take_failures": "take_batch",
    "remove_failures": "remove_batch",
    "ready_failures": "ready_devices",
}


class GatewayExposition:
    """
    The gateway's collector (for a L{prometheus_client.CollectorRegistry})
    and its readiness.

    @param intake: its C{gauges()} (the spool's depth, the transfers in
        reassembly, the message ids and device days remembered, the devices
        missing from the last round).
    @param uplink: its C{gauges()} (the link up or not, the batches in flight).
    @param database: the spool's L{meter.database.Database}: its commit
        times, and the cause of its failing transactions.
    @param protocol: the UDP port's protocol: listening while C{numPorts},
        and its C{transport} is the port whose kernel drops are read.
    @param drops: the kernel's drops at a socket, given its descriptor
        (L{udp.socket_drops}).
    @param nodes: the cloud's nodes, and the one connected to or tried next.
    @param shedding: the load shedding controller, and C{clock}, the time
        its gauges are read at (None: its gauges read 0).
    """

    def __init__(
        self, metrics: GatewayMetrics, intake, uplink, spool, database, protocol, spool_limit: int,
        drops: Callable[[int], int | None] = udp.socket_drops, nodes: CloudNodes | None = None,
        shedding: Shedding | None = None, clock=None,
    ):
        self._shedding = shedding
        self._clock = clock
        self._metrics = metrics
        self._intake = intake
        self._uplink = uplink
        self._spool = spool
        self._database = database
        self._protocol = protocol
        self._spool_limit = spool_limit
        self._drops = drops
        self._nodes = nodes

    def ready(self) -> str | None:
        """
        Why the gateway cannot take a device's chunk now, or None.
        """
        if not self._protocol.numPorts:
            return "not listening"
        if self._database.failing is not None:
            return f"spool failing: {self._database.failing}"
        depth = self._spool.depth
        if depth >= self._spool_limit:
            return f"spool full: {depth} of {self._spool_limit} readings"
        return None

    def receive_drops(self) -> int | None:
        port = self._protocol.transport if self._protocol.numPorts else None
        if port is None:
            return None
        try:
            return self._drops(port.fileno())
        except (OSError, ValueError):
            return None

    def collect(self):
        m = self._metrics
        gauges = self._intake.gauges()
        link = self._uplink.gauges()
        refused = sum(getattr(m, name) for name in ADMISSION_CODES if name not in BUSY)
        yield families.counter(
            "meter_gateway_datagrams_received_total", "Datagrams received on the UDP port, whatever they held.",
            m.datagrams,
        )
        yield families.counters(
            "meter_gateway_datagrams_total",
            "Datagrams by what became of them: stored, duplicate (acknowledged again), refused (answered bad), "
            "undecodable (answered bad), busy (answered busy, the device retries), unexpected, or dropped "
            "unanswered (flood, no_tag, unknown_device, bad_tag).",
            "result",
            {
                "stored": m.chunks,
                "duplicate": m.duplicates,
                "refused": refused,
                "undecodable": sum(m.decoder_refused.values()),
                "busy": sum(getattr(m, name) for name in BUSY),
                "unexpected": m.unexpected,
                "dropped_flood": m.dropped_flood,
                "dropped_no_tag": m.dropped_no_tag,
                "dropped_unknown_device": m.dropped_unknown_device,
                "dropped_bad_tag": m.dropped_bad_tag,
            },
        )
        yield families.counter(
            "meter_gateway_answer_failures_total",
            "Chunks whose answer could not be made or sent, a fault of the gateway's own: the device sends them again.",
            m.answer_failures,
        )
        codes = {code: getattr(m, name) for name, code in ADMISSION_CODES.items()}
        codes["spool"] = m.spool_failures
        for code, count in m.decoder_refused.items():
            codes[code] = codes.get(code, 0) + count
        yield families.counters(
            "meter_gateway_refusals_total",
            "Chunks answered bad or busy, by the code the answer starts with (docs/protocol.md).",
            "code",
            codes,
        )
        shed = self._shedding.gauges(self._clock.seconds()) if self._shedding is not None else {}
        yield families.gauge(
            "meter_gateway_shedding",
            "1 while the gateway sheds load (new transfers answered busy with a retry-after hint), else 0.",
            shed.get("shedding", 0),
        )
        yield families.gauge(
            "meter_gateway_queue_delay_seconds",
            "The least time a datagram waited in the kernel's receive queue over the last shed_interval: the "
            "standing queue shedding is decided by.",
            shed.get("queue_delay_seconds", 0.0),
        )
        yield families.gauge(
            "meter_gateway_shed_hint_seconds",
            "While shedding, the retry-after hint the next new transfer gets, seconds; else 0.",
            shed.get("hint_seconds", 0.0),
        )
        yield families.gauge(
            "meter_gateway_shed_rate_chunks",
            "Chunks the gateway commits a CPU second, as measured: the rate the hints space the devices sent away at.",
            shed.get("rate", 0.0),
        )
        yield families.gauge(
            "meter_gateway_shed_devices_waiting",
            "Devices sent away with a hint whose slot has not come or who have not come back yet.",
            shed.get("devices_sent_away", 0),
        )
        yield families.counters(
            "meter_gateway_shed_total",
            "Chunks of new transfers while shedding: busy (answered busy with a retry-after hint, before decoding), "
            "returned (the device came back at its slot and was let in).",
            "result",
            {"busy": m.shed, "returned": m.shed_returned},
        )
        yield families.counter(
            "meter_gateway_shed_episodes_total", "Times the gateway started shedding load.", m.shed_episodes
        )
        yield families.counter(
            "meter_gateway_readings_acknowledged_total",
            "Readings new to the spool, each acknowledged to its device once committed.",
            m.readings,
        )
        yield families.counter(
            "meter_gateway_readings_forwarded_total",
            "Readings the cloud acknowledged, removed from the spool: delivered.",
            m.readings_forwarded,
        )
        yield families.counter(
            "meter_gateway_readings_set_aside_total",
            "Readings of batches the cloud refused for good, kept in the spool's refused table.",
            m.readings_set_aside,
        )
        yield families.gauge(
            "meter_gateway_spool_readings", "Readings in the spool: acknowledged to devices, not yet to the cloud.",
            gauges["spool_depth"],
        )
        yield families.gauge(
            "meter_gateway_spool_limit_readings", "Most readings the spool holds; beyond it devices are answered busy.",
            self._spool_limit,
        )
        yield families.gauge(
            "meter_gateway_reassemblies", "Transfers of several chunks waiting for the rest.", gauges["reassemblies"]
        )
        yield families.gauge(
            "meter_gateway_message_ids", "Message ids remembered to recognise a chunk sent again.", gauges["message_ids"]
        )
        yield families.gauge(
            "meter_gateway_device_days", "Devices' days remembered against their daily bounds.", gauges["device_days"]
        )
        yield families.gauge(
            "meter_gateway_round_devices_missing",
            "Devices of the fleet that had not reported when the last round closed (0 before any closes).",
            gauges["round_devices_missing"],
        )
        yield families.counter("meter_gateway_rounds_closed_total", "Rounds closed, complete or at their deadline.",
                               m.rounds_closed)
        yield families.counter("meter_gateway_rounds_incomplete_total",
                               "Rounds closed at their deadline with devices missing.", m.rounds_incomplete)
        yield families.counter("meter_gateway_late_devices_total",
                               "Devices whose whole day arrived after its round closed.", m.late_devices)
        yield families.counter("meter_gateway_rounds_released_total",
                               "Times a full spool forwarded the open rounds' readings before they closed.",
                               m.rounds_released)
        yield families.counter("meter_gateway_reassemblies_expired_total",
                               "Transfers given up while missing chunks.", m.expired_reassemblies)
        yield families.gauge("meter_gateway_uplink_up", "1 while the gateway is connected to the cloud, else 0.",
                             link["uplink_up"])
        if self._nodes is not None:
            node = GaugeMetricFamily(
                "meter_gateway_cloud_node",
                "The cloud node the gateway is connected to (or tries next): 1, labelled with its address and its "
                "position in [gateway] cloud.",
                labels=["node", "position"],
            )
            node.add_metric([self._nodes.current, str(self._nodes.position + 1)], 1)
            yield node
            yield families.gauge("meter_gateway_cloud_nodes", "Cloud nodes in [gateway] cloud.", len(self._nodes))
        yield families.counter("meter_gateway_cloud_failovers_total",
                               "Moves to the next cloud node of [gateway] cloud (a failed attempt, a lost connection, "
                               "a batch or a ping not answered), with several nodes.", m.cloud_failovers)
        yield families.gauge("meter_gateway_batches_in_flight", "Batches sent to the cloud, not yet acknowledged.",
                             link["batches_in_flight"])
        yield families.counter("meter_gateway_batches_sent_total", "Batches sent to the cloud.", m.batches_sent)
        yield families.counters(
            "meter_gateway_batches_total",
            "Batches sent, by what the cloud did: acknowledged (stored), refused (sent again later), set_aside "
            "(refused for good), resent (connection lost first), ack_timeout (no answer in time).",
            "result",
            {
                "acknowledged": m.batches_acknowledged,
                "refused": m.batches_refused,
                "set_aside": m.batches_set_aside,
                "resent": m.batches_resent,
                "ack_timeout": m.ack_timeouts,
            },
        )
        yield families.histogram(
            "meter_gateway_batch_ack_seconds", "Seconds from a batch sent to the cloud's acknowledgement of it.",
            m.batch_ack_seconds,
        )
        yield families.counter("meter_gateway_cloud_reconnects_total",
                               "Connections to the cloud scheduled again after a failure or a loss.", m.cloud_retries)
        yield families.counter("meter_gateway_cloud_handshake_timeouts_total",
                               "TLS handshakes with the cloud that did not complete in time.", m.handshake_timeouts)
        yield families.counter("meter_gateway_cloud_heartbeat_failures_total",
                               "Pings the cloud did not answer in time.", m.heartbeat_failures)
        yield families.counter("meter_gateway_cloud_lines_refused_total",
                               "Lines from the cloud the decoder refused.", m.refused_from_cloud)
        yield families.counter("meter_gateway_stray_acks_total", "Acknowledgements of batches not in flight.",
                               m.stray_acks)
        yield families.counters(
            "meter_gateway_transaction_failures_total",
            "Spool transactions that failed, by step (each is retried, or its chunk answered busy).",
            "step",
            {step: getattr(m, name) for name, step in STEPS.items()},
        )
        yield families.histogram(
            "meter_gateway_spool_commit_seconds", "Seconds each spool transaction took to commit, its fsync included.",
            self._database.commit_seconds,
        )
        if self._protocol.receive_buffer is not None:
            yield families.gauge(
                "meter_gateway_receive_buffer_bytes",
                "The UDP socket's receive buffer the kernel granted, bytes ([gateway] receive_buffer_mb, or less where "
                "net.core.rmem_max capped it).",
                self._protocol.receive_buffer,
            )
        drops = self.receive_drops()
        if drops is not None:
            yield families.counter(
                "meter_gateway_receive_buffer_drops_total",
                "Datagrams the kernel dropped at the UDP socket, its receive buffer full: never seen by the gateway.",
                drops,
            )


def monitor(parent, description: str, reactor, exposition: GatewayExposition) -> None:
    """
    Serve C{exposition} on the endpoint C{description} (C{[gateway] metrics})
    as a child of C{parent}, unless it is empty.
    """
    service = web.serve(description, families.registry(exposition), exposition.ready, reactor, "gateway")
    if service is not None:
        service.setServiceParent(parent)
