"""
The cloud on its monitoring endpoint (L{meter.monitoring.web}): its
counters and gauges as Prometheus families, and whether it is ready to
store gateways' batches.

Everything is read when Prometheus scrapes, on the reactor thread, from
L{CloudMetrics}, the factory's admission (the connections) and the
readings database (its commit times and failures).  docs/monitoring.md
describes every family.
"""

from __future__ import annotations

from meter.cloud.metrics import CloudMetrics
from meter.monitoring import exposition as families, web


class CloudExposition:
    """
    The cloud's collector (for a L{prometheus_client.CollectorRegistry})
    and its readiness.

    @param factory: the gateways' L{meter.cloud.CloudFactory}: listening
        while C{numPorts}; its C{admission} knows the connections.
    @param readings: the readings store, whose C{database} (a
        L{meter.database.Database}, None until it is open) times its
        commits and says why its transactions fail.
    """

    def __init__(self, metrics: CloudMetrics, factory, readings):
        self._metrics = metrics
        self._factory = factory
        self._readings = readings

    def ready(self) -> str | None:
        """
        Why the cloud cannot store a batch now, or None.
        """
        database = self._readings.database
        if database is None:
            return "store not open"
        # A database server (PostgreSQL) the cloud is reconnecting to.
        unreachable = getattr(database, "unreachable", None)
        if unreachable is not None:
            return f"store unreachable: {unreachable}"
        if database.failing is not None:
            return f"store failing: {database.failing}"
        if not self._factory.numPorts:
            return "not listening"
        return None

    def collect(self):
        m = self._metrics
        connections = self._factory.admission.gauges()
        yield families.counter(
            "meter_cloud_readings_stored_total", "Readings stored for the first time.", m.readings_new
        )
        yield families.counter(
            "meter_cloud_readings_duplicate_total",
            "Readings of committed batches that were stored already (a batch sent again): stored once.",
            m.readings_duplicate,
        )
        yield families.counters(
            "meter_cloud_batches_total",
            "Batches by outcome: stored (committed and acknowledged ok), failed (the commit failed: refused, the "
            "gateway sends it again).",
            "result",
            {"stored": m.batches, "failed": m.store_failures},
        )
        yield families.counters(
            "meter_cloud_lines_refused_total",
            "Lines from gateways refused, by the code of the refusal (docs/protocol.md; size: over the length limit).",
            "code",
            dict(sorted(m.refused.items())),
        )
        yield families.counter(
            "meter_cloud_messages_unexpected_total", "Valid messages of a kind a cloud never takes.", m.unexpected
        )
        yield families.counter(
            "meter_cloud_transaction_failures_total", "Database transactions that failed (batches refused, the "
            "console lines not written).", m.transaction_failures
        )
        yield families.counter(
            "meter_cloud_console_failures_total", "Committed batches whose console lines could not be written.",
            m.console_failures,
        )
        yield families.counter(
            "meter_cloud_answer_failures_total", "Batches whose acknowledgement could not be made or written: the "
            "connection is closed and the gateway sends them again.", m.answer_failures,
        )
        yield families.gauge(
            "meter_cloud_gateways_connected", "Gateway connections authenticated and open.",
            connections["gateways_connected"],
        )
        yield families.gauge(
            "meter_cloud_connections_unauthenticated", "Connections not authenticated yet (TLS handshake under way).",
            connections["unauthenticated"],
        )
        yield families.counters(
            "meter_cloud_connections_closed_total",
            "Connections the cloud closed or refused, by reason: idle_timeout, handshake_timeout, evicted (a "
            "stranger making room), failed (a stranger that failed or left), limit (refused at the connection "
            "limit).",
            "reason",
            {
                "idle_timeout": m.idle_timeouts,
                "handshake_timeout": m.handshake_timeouts,
                "evicted": m.unauthenticated_evicted,
                "failed": m.unauthenticated_failed,
                "limit": m.connections_refused,
            },
        )
        yield families.counter(
            "meter_cloud_accept_failures_total",
            "Connections the listener could not accept (no descriptor left) or closed at once to recover.",
            m.accept_failures,
        )
        database = self._readings.database
        # A database server's (PostgreSQL's); an SQLite file has none.
        yield families.counters(
            "meter_cloud_database_connection_failures_total",
            "Connections to the database server that failed: lost (the server restarted or went away while "
            "connected) or refused (an attempt to connect that failed); each is retried with backoff. Always 0 "
            "on SQLite.",
            "kind",
            {"lost": getattr(database, "losses", 0), "refused": getattr(database, "connect_failures", 0)},
        )
        if database is not None:
            yield families.histogram(
                "meter_cloud_commit_seconds", "Seconds each database transaction took to commit, its fsync included.",
                database.commit_seconds,
            )


def monitor(parent, description: str, reactor, exposition: CloudExposition) -> None:
    """
    Serve C{exposition} on the endpoint C{description} (C{[cloud] metrics})
    as a child of C{parent}, unless it is empty.
    """
    service = web.serve(description, families.registry(exposition), exposition.ready, reactor, "cloud")
    if service is not None:
        service.setServiceParent(parent)
