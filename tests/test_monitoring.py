"""
The monitoring endpoint: the histogram value, the kernel's UDP drops, the
gateway's and the cloud's collectors and readiness (on their real parts
with a Clock), the HTTP pages on a real port, and a real run's /metrics and
/readyz (the twistd plugins as child processes).
"""

from __future__ import annotations

import datetime
import math
import os
import re
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor, task
from twisted.logger import Logger
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, ResponseDone
from twisted.web.http_headers import Headers

from meter import config, testing, wire
from meter.cloud import Admission, CloudMetrics
from meter.cloud.exposition import CloudExposition
from meter.database import Database, connect
from meter.gateway import Intake, Uplink
from meter.gateway.exposition import GatewayExposition
from meter.gateway.failover import CloudNodes
from meter.gateway.metrics import GatewayMetrics
from meter.gateway.shedding import Shedding
from meter.monitoring import exposition, udp, web
from meter.monitoring.histogram import COMMIT_SECONDS, Histogram
from meter.testing import MemorySpool
from meter.tools.processes import monitoring_url

ROOT = Path(__file__).resolve().parent.parent
DAY = datetime.date(2026, 3, 1)
NOW = 1772400000.0
FLEET = {1: "192.168.1.2", 2: "192.168.1.3"}
QUIET = Logger(observer=lambda event: None)


def samples(text: str) -> dict[tuple, float]:
    """
    Every sample of an exposition, parsed by prometheus_client's own parser:
    (name, ((label, value), ...)) -> value.
    """
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def scraped(collector) -> dict[tuple, float]:
    return samples(generate_latest(exposition.registry(collector)).decode())


# -- the histogram -------------------------------------------------------------


def test_a_histogram_counts_a_value_equal_to_a_bound_in_that_bounds_bucket():
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(value)
    assert h.counts == [2, 2, 1]
    assert h.cumulative() == [(0.1, 2), (1.0, 4), (math.inf, 5)]
    assert (h.count, h.sum) == (5, pytest.approx(4.65))


# -- the kernel's drops ----------------------------------------------------------

UDP_TABLE = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 1636: 0100007F:9369 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 520620 2 00000000565529bc 0
 2839: 0100007F:2715 00000000:0000 07 00000000:00034000 00:00000000 00000000     0        0 520792 2 0000000006e82707 1312
"""


def test_receive_drops_are_read_from_the_line_of_the_sockets_inode(tmp_path):
    (tmp_path / "udp").write_text(UDP_TABLE)
    (tmp_path / "udp6").write_text(UDP_TABLE.splitlines()[0] + "\n")
    tables = (tmp_path / "udp6", tmp_path / "udp")
    assert udp.receive_drops(520792, tables) == 1312
    assert udp.receive_drops(520620, tables) == 0
    assert udp.receive_drops(4242, tables) is None
    assert udp.receive_drops(520792, (tmp_path / "missing",)) is None


def test_receive_drops_of_a_real_socket_are_found():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        assert udp.receive_drops(udp.socket_inode(s.fileno())) == 0


def overflowed(family: int, host: str) -> socket.socket:
    """
    A bound UDP socket whose receive buffer overflowed: the kernel dropped
    some of 100 datagrams sent to it and never read.
    """
    full = socket.socket(family, socket.SOCK_DGRAM)
    full.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    full.bind((host, 0))
    with socket.socket(family, socket.SOCK_DGRAM) as sender:
        for _ in range(100):
            sender.sendto(b"x" * 1000, full.getsockname()[:2])
    return full


@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_the_kernels_monitoring_interface_tells_a_sockets_drops_as_proc_does(family, host):
    if not udp.TABLES[0].exists():
        pytest.skip("no /proc/net/udp to compare with")
    # Sockets of other ports around it, which the answer must leave out.
    others = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(50)]
    try:
        for other in others:
            other.bind((host, 0))
        with overflowed(family, host) as full:
            inode = udp.socket_inode(full.fileno())
            told = udp.diag_drops(family, full.getsockname()[1], inode)
            assert told == udp.receive_drops(inode) > 0
            assert udp.socket_drops(full.fileno()) == told
            # Another socket's inode on that port: not this one's answer.
            assert udp.diag_drops(family, full.getsockname()[1], udp.socket_inode(others[0].fileno())) is None
    finally:
        for other in others:
            other.close()


def test_the_drops_are_read_from_proc_where_the_monitoring_interface_cannot_be_used(tmp_path):
    def refused(family, port, inode):
        raise PermissionError("not permitted")

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        line = UDP_TABLE.splitlines()[2].replace("520792", str(udp.socket_inode(s.fileno())))
        (tmp_path / "udp").write_text(UDP_TABLE.splitlines()[0] + "\n" + line + "\n")
        assert udp.socket_drops(s.fileno(), (tmp_path / "udp",), ask=refused) == 1312


# -- the database's commit times and failures -------------------------------------


def test_the_database_times_each_commit_and_says_why_its_transactions_fail(tmp_path):
    clock = task.Clock()
    ticks = iter([10.0, 10.004, 20.0, 30.0, 30.5])
    path = tmp_path / "file.sqlite"
    db = Database(connect(path), clock, timer=lambda: next(ticks))
    outcomes = []
    db.run(lambda c: c.execute("CREATE TABLE t (x)")).addBoth(outcomes.append)
    clock.advance(0)
    assert db.commit_seconds.counts[COMMIT_SECONDS.index(0.005)] == 1
    assert db.failing is None

    other = connect(path)
    other.execute("BEGIN IMMEDIATE")
    db.run(lambda c: c.execute("INSERT INTO t VALUES (1)")).addBoth(outcomes.append)
    clock.advance(0)
    assert db.failing == "OperationalError: database is locked"
    assert db.commit_seconds.count == 1  # a failed transaction is not a commit time

    other.execute("ROLLBACK")
    db.run(lambda c: c.execute("INSERT INTO t VALUES (2)")).addBoth(outcomes.append)
    clock.advance(0)
    assert db.failing is None
    assert (db.commit_seconds.count, db.commit_seconds.sum) == (2, pytest.approx(0.504))
    assert [type(o).__name__ for o in outcomes] == ["Cursor", "Failure", "Cursor"]
    other.close()


# -- the gateway's collector and readiness ---------------------------------------


class FakeSender:
    def __init__(self):
        self.sent: list = []

    def send(self, message) -> None:
        self.sent.append(message)

    def abort(self, cause=None) -> None:
        pass


class FakeDatabase:
    """
    What the collectors read of a L{Database}.
    """

    def __init__(self):
        self.failing = None
        self.commit_seconds = Histogram(COMMIT_SECONDS)


class FakePort:
    """
    The UDP port as the collector sees it: its protocol counts it in
    C{numPorts} while it listens and knows the receive buffer it was
    granted, and its socket has an inode.
    """

    def __init__(self):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.numPorts = 1
        self.receive_buffer = 1 << 20
        self.transport = self

    def fileno(self) -> int:
        return self.socket.fileno()


class GatewayParts:
    """
    A gateway's intake and uplink over a memory spool, counting into one
    L{GatewayMetrics} on a Clock, and its exposition; the kernel's drops
    at the port are 7.
    """

    def __init__(self, spool_limit=8):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.metrics = GatewayMetrics()
        self.spool = MemorySpool(self.clock)
        self.uplink = Uplink(self.spool, self.clock, 100, 30.0, lambda count: None, log=QUIET, metrics=self.metrics)
        self.intake = Intake(
            FLEET, self.spool, self.clock, 60.0, self.uplink.send_next, spool_limit=spool_limit, log=QUIET,
            metrics=self.metrics,
        )
        self.database = FakeDatabase()
        self.port = FakePort()
        self.descriptors: list[int] = []
        self.nodes = CloudNodes(["127.0.0.1:8001", "127.0.0.1:8002"])
        self.shedding = Shedding(self.metrics)
        self.exposition = GatewayExposition(
            self.metrics, self.intake, self.uplink, self.spool, self.database, self.port, spool_limit,
            drops=lambda descriptor: self.descriptors.append(descriptor) or 7, nodes=self.nodes, shedding=self.shedding,
            clock=self.clock,
        )

    def report(self, device_id: int) -> wire.DayAck:
        chunk = testing.day_chunk(device_id, day=DAY, sent_at=NOW, minutes=range(4), fleet=FLEET)
        answers = []
        self.intake.chunk_received(chunk, f"{chunk.device_ip}:5000").addBoth(answers.append)
        self.clock.advance(0)
        return answers[0]

    def close(self) -> None:
        self.port.socket.close()


@pytest.fixture
def parts():
    parts = GatewayParts()
    yield parts
    parts.close()


def test_the_gateway_collector_reads_what_a_run_counted(parts):
    before = scraped(parts.exposition)
    assert before[("meter_gateway_readings_acknowledged_total", ())] == 0
    assert before[("meter_gateway_uplink_up", ())] == 0

    assert [parts.report(d).status for d in FLEET] == ["ok", "ok"]
    sender = FakeSender()
    parts.uplink.connected(sender)
    parts.clock.advance(0)
    (batch,) = sender.sent
    during = scraped(parts.exposition)
    assert during[("meter_gateway_readings_acknowledged_total", ())] == 8
    assert during[("meter_gateway_spool_readings", ())] == 8
    assert during[("meter_gateway_batches_in_flight", ())] == 1
    assert during[("meter_gateway_uplink_up", ())] == 1
    assert during[("meter_gateway_readings_forwarded_total", ())] == 0

    parts.clock.advance(0.3)  # the cloud answers 0.3 s later, on the uplink's clock
    parts.uplink.ack_received(wire.BatchAck(batch.batch_id, "ok", new=8, dup=0))
    parts.clock.advance(0)
    after = scraped(parts.exposition)
    assert after[("meter_gateway_readings_forwarded_total", ())] == 8
    assert after[("meter_gateway_spool_readings", ())] == 0
    assert after[("meter_gateway_spool_limit_readings", ())] == 8
    assert after[("meter_gateway_batches_in_flight", ())] == 0
    assert after[("meter_gateway_datagrams_total", (("result", "stored"),))] == 2
    assert after[("meter_gateway_batches_total", (("result", "acknowledged"),))] == 1
    assert after[("meter_gateway_rounds_closed_total", ())] == 1
    assert after[("meter_gateway_round_devices_missing", ())] == 0
    assert after[("meter_gateway_batch_ack_seconds_bucket", (("le", "0.25"),))] == 0
    assert after[("meter_gateway_batch_ack_seconds_bucket", (("le", "0.5"),))] == 1
    assert after[("meter_gateway_batch_ack_seconds_bucket", (("le", "+Inf"),))] == 1
    assert after[("meter_gateway_batch_ack_seconds_count", ())] == 1
    assert after[("meter_gateway_batch_ack_seconds_sum", ())] == pytest.approx(0.3)
    assert after[("meter_gateway_receive_buffer_drops_total", ())] == 7
    assert after[("meter_gateway_receive_buffer_bytes", ())] == 1 << 20
    assert parts.descriptors[-1] == parts.port.fileno()
    assert after[("meter_build_info", (("version", exposition.version()),))] == 1
    assert ("process_cpu_seconds_total", ()) in after


def test_the_gateway_collector_sorts_each_datagram_count_by_its_result_and_code(parts):
    m = parts.metrics
    m.datagrams, m.chunks, m.duplicates, m.dropped_flood, m.dropped_bad_tag = 20, 5, 2, 3, 1
    m.unknown_device, m.refused_minute, m.refused_spool_full, m.refused_overloaded, m.spool_failures = 1, 1, 2, 1, 1
    m.decoder_refused = {"range": 2, "minute": 1}
    m.close_failures, m.take_failures, m.transaction_failures = 2, 1, 4
    s = scraped(parts.exposition)

    def result(name):
        return s[("meter_gateway_datagrams_total", (("result", name),))]

    assert s[("meter_gateway_datagrams_received_total", ())] == 20
    assert (result("stored"), result("duplicate"), result("refused"), result("undecodable"), result("busy")) == (
        5, 2, 2, 3, 4,
    )
    assert (result("dropped_flood"), result("dropped_bad_tag"), result("dropped_no_tag")) == (3, 1, 0)

    def refusals(code):
        return s[("meter_gateway_refusals_total", (("code", code),))]

    assert [refusals(c) for c in ("fleet", "minute", "range", "spool_full", "overloaded", "spool")] == [1, 2, 2, 2, 1, 1]
    steps = {labels[0][1]: v for (name, labels), v in s.items() if name == "meter_gateway_transaction_failures_total"}
    assert sum(steps.values()) == m.transaction_failures
    assert (steps["close_round"], steps["take_batch"], steps["spool_chunk"]) == (2, 1, 1)


def test_the_gateway_collector_shows_the_shedding(parts):
    quiet = scraped(parts.exposition)
    assert (quiet[("meter_gateway_shedding", ())], quiet[("meter_gateway_shed_episodes_total", ())]) == (0, 0)
    for _ in range(30):
        parts.clock.advance(0.01)
        parts.shedding.observe(parts.clock.seconds(), 0.150)
    parts.shedding.shed(parts.clock.seconds(), 1, 0.150)
    parts.shedding.shed(parts.clock.seconds(), 2, 0.150)
    s = scraped(parts.exposition)
    assert (s[("meter_gateway_shedding", ())], s[("meter_gateway_shed_episodes_total", ())]) == (1, 1)
    assert s[("meter_gateway_queue_delay_seconds", ())] == pytest.approx(0.150)
    assert s[("meter_gateway_shed_hint_seconds", ())] > 0.5
    assert s[("meter_gateway_shed_devices_waiting", ())] == 2
    assert s[("meter_gateway_shed_total", (("result", "busy"),))] == 2
    assert s[("meter_gateway_datagrams_total", (("result", "busy"),))] == 2
    assert s[("meter_gateway_refusals_total", (("code", "shed"),))] == 2


def test_the_gateway_is_ready_until_its_spool_is_full_and_again_once_it_drains(parts):
    assert parts.exposition.ready() is None
    parts.report(1)
    assert parts.exposition.ready() is None
    parts.report(2)
    assert parts.exposition.ready() == "spool full: 8 of 8 readings"
    sender = FakeSender()
    parts.uplink.connected(sender)
    parts.clock.advance(0)
    parts.uplink.ack_received(wire.BatchAck(sender.sent[0].batch_id, "ok", new=8, dup=0))
    parts.clock.advance(0)
    assert parts.exposition.ready() is None


def test_the_gateway_is_not_ready_while_its_spool_fails_or_its_port_is_closed(parts):
    parts.database.failing = "OperationalError: database or disk is full"
    assert parts.exposition.ready() == "spool failing: OperationalError: database or disk is full"
    parts.database.failing = None
    parts.port.numPorts = 0
    assert parts.exposition.ready() == "not listening"
    assert ("meter_gateway_receive_buffer_drops_total", ()) not in scraped(parts.exposition)


def test_the_last_closed_round_says_how_many_devices_it_missed(parts):
    parts.report(1)
    parts.clock.advance(60)  # the deadline
    assert scraped(parts.exposition)[("meter_gateway_round_devices_missing", ())] == 1
    assert parts.intake.gauges()["round_devices_missing"] == 1


def test_the_histogram_is_not_in_the_stats_line():
    assert not any("batch_ack" in key for key in GatewayMetrics().counts())


# -- the cloud's collector and readiness ------------------------------------------


class FakeFactory:
    def __init__(self, admission):
        self.admission = admission
        self.numPorts = 1


class FakeReadings:
    def __init__(self):
        self.database = FakeDatabase()


def test_the_cloud_collector_reads_its_counts_connections_and_commit_times():
    clock = task.Clock()
    metrics = CloudMetrics()
    admission = Admission(clock, metrics)
    readings = FakeReadings()
    cloud = CloudExposition(metrics, FakeFactory(admission), readings)
    metrics.stored(16, 0)
    metrics.stored(2, 14)
    metrics.store_failures = metrics.transaction_failures = 1
    metrics.refused["range"] += 3
    metrics.idle_timeouts = 2
    gateway, stranger = object(), object()
    admission.authenticated(gateway)
    assert admission.arrived(stranger, timed=False)
    readings.database.commit_seconds.observe(0.003)
    s = scraped(cloud)
    assert s[("meter_cloud_readings_stored_total", ())] == 18
    assert s[("meter_cloud_readings_duplicate_total", ())] == 14
    assert s[("meter_cloud_batches_total", (("result", "stored"),))] == 2
    assert s[("meter_cloud_batches_total", (("result", "failed"),))] == 1
    assert s[("meter_cloud_lines_refused_total", (("code", "range"),))] == 3
    assert s[("meter_cloud_transaction_failures_total", ())] == 1
    assert s[("meter_cloud_connections_closed_total", (("reason", "idle_timeout"),))] == 2
    assert s[("meter_cloud_gateways_connected", ())] == 1
    assert s[("meter_cloud_connections_unauthenticated", ())] == 1
    assert s[("meter_cloud_commit_seconds_bucket", (("le", "0.0025"),))] == 0
    assert s[("meter_cloud_commit_seconds_bucket", (("le", "0.005"),))] == 1
    assert s[("meter_build_info", (("version", exposition.version()),))] == 1
    assert ("process_resident_memory_bytes", ()) in s


def test_the_cloud_is_ready_with_its_store_open_and_writable_and_listening():
    readings = FakeReadings()
    factory = FakeFactory(Admission(task.Clock(), CloudMetrics()))
    cloud = CloudExposition(CloudMetrics(), factory, readings)
    assert cloud.ready() is None
    readings.database.failing = "OperationalError: disk I/O error"
    assert cloud.ready() == "store failing: OperationalError: disk I/O error"
    readings.database = None
    assert cloud.ready() == "store not open"
    readings.database = FakeDatabase()
    factory.numPorts = 0
    assert cloud.ready() == "not listening"


# -- the HTTP pages on a real port ------------------------------------------------


class Collector:
    """
    A collector whose one counter the test sets.
    """

    def __init__(self):
        self.value = 0

    def collect(self):
        yield exposition.counter("meter_test_events_total", "Events of the test.", self.value)


@pytest.fixture
def served():
    collector = Collector()
    state = {"why": None}
    service = web.serve("tcp:0:interface=127.0.0.1", exposition.registry(collector), lambda: state["why"], reactor, "gateway")
    service.privilegedStartService()
    service.startService()
    yield service, collector, state
    if service.running:
        service.stopService()


class Body(Protocol):
    def __init__(self):
        self.parts: list[bytes] = []
        self.done = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason) -> None:
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


async def get(service, path: str, accept: bytes | None = None) -> tuple[int, bytes, bytes]:
    host = service.port.getHost()
    headers = Headers({b"accept": [accept]}) if accept else None
    response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{host.port}{path}".encode(), headers)
    body = Body()
    response.deliverBody(body)
    return response.code, await body.done, response.headers.getRawHeaders(b"content-type")[0]


@pytest_twisted.ensureDeferred
async def test_the_pages_answer_over_http_from_the_reactor_thread(served):
    service, collector, state = served
    collector.value = 5
    code, body, content_type = await get(service, "/metrics")
    assert (code, content_type) == (200, b"text/plain; version=0.0.4; charset=utf-8")
    assert samples(body.decode())[("meter_test_events_total", ())] == 5
    collector.value = 6  # read again at each scrape
    assert samples((await get(service, "/metrics"))[1].decode())[("meter_test_events_total", ())] == 6
    code, body, content_type = await get(service, "/metrics", accept=b"application/openmetrics-text")
    assert code == 200 and content_type.startswith(b"application/openmetrics-text") and body.endswith(b"# EOF\n")
    assert (await get(service, "/healthz"))[:2] == (200, b"ok\n")
    assert (await get(service, "/readyz"))[:2] == (200, b"ready\n")
    state["why"] = "spool full: 8 of 8 readings"
    assert (await get(service, "/readyz"))[:2] == (503, b"spool full: 8 of 8 readings\n")
    assert (await get(service, "/nothing"))[0] == 404
    await service.stopService()
    assert service.port is None


@pytest_twisted.ensureDeferred
async def test_a_failing_collector_fails_the_scrape_not_the_daemon(served):
    service, collector, state = served
    collector.value = "not a number"
    code, body, _ = await get(service, "/metrics")
    assert (code, body) == (500, b"collecting the metrics failed: see the daemon's log\n")
    collector.value = 1
    assert (await get(service, "/metrics"))[0] == 200


def test_a_port_in_use_ends_the_start_with_one_line_naming_it_and_the_settings():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        service = web.serve(f"tcp:{port}:interface=127.0.0.1", exposition.registry(Collector()), lambda: None,
                            reactor, "cloud")
        with pytest.raises(SystemExit) as raised:
            service.privilegedStartService()
    # An Exception too, which a daemonizing twistd reports to the command
    # that launched it (meter.listening.StartRefused).
    assert isinstance(raised.value, Exception)
    assert str(raised.value) == (
        f"meter-cloud: cannot serve metrics on 127.0.0.1:{port}: Address already in use "
        '(--metrics or [cloud] metrics chooses the endpoint; "" turns it off)'
    )


def test_an_empty_endpoint_turns_the_monitoring_off():
    assert web.serve("", exposition.registry(Collector()), lambda: None, reactor, "gateway") is None


# -- the configuration ----------------------------------------------------------------


def test_the_metrics_endpoints_are_checked_and_may_be_empty():
    settings = config.from_raw({"gateway": {"metrics": ""}, "cloud": {"metrics": r"tcp6:0:interface=\:\:1"}}, "test")
    assert (settings.gateway["metrics"], settings.cloud["metrics"]) == ("", r"tcp6:0:interface=\:\:1")
    with pytest.raises(config.ConfigError, match=r"^test \[gateway\] metrics: expected a Twisted endpoint"):
        config.from_raw({"gateway": {"metrics": "tcpp:9"}}, "test")
    shipped = config.load(ROOT / "etc" / "meter.toml")
    assert {shipped.gateway["metrics"], shipped.cloud["metrics"]} == {
        "tcp:9182:interface=127.0.0.1", "tcp:9181:interface=127.0.0.1",
    }


# -- the rules file ---------------------------------------------------------------------

RULES = ROOT / "etc" / "prometheus" / "meter-rules.yml"


def documented() -> set[str]:
    """
    The metric names docs/monitoring.md describes, each in a table row.
    """
    text = (ROOT / "docs" / "monitoring.md").read_text()
    return set(re.findall(r"^\| `([a-z_]+)`", text, re.MULTILINE))


def exposed(collector) -> set[str]:
    """
    The names of the families C{collector} yields (a counter's with its
    C{_total}), whatever their values.
    """
    names = set()
    for family in collector.collect():
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_the_gateway_names_the_cloud_node_it_uses_and_counts_its_failovers(parts):
    def node_series(scrape):
        return {key: value for key, value in scrape.items() if key[0] == "meter_gateway_cloud_node"}

    before = scraped(parts.exposition)
    assert node_series(before) == {("meter_gateway_cloud_node", (("node", "127.0.0.1:8001"), ("position", "1"))): 1}
    assert before[("meter_gateway_cloud_nodes", ())] == 2
    assert before[("meter_gateway_cloud_failovers_total", ())] == 0
    parts.nodes.advance()
    parts.metrics.cloud_failovers += 1
    after = scraped(parts.exposition)
    assert node_series(after) == {("meter_gateway_cloud_node", (("node", "127.0.0.1:8002"), ("position", "2"))): 1}
    assert after[("meter_gateway_cloud_failovers_total", ())] == 1


def test_every_metric_of_both_daemons_is_documented(parts):
    cloud = CloudExposition(CloudMetrics(), FakeFactory(Admission(task.Clock(), CloudMetrics())), FakeReadings())
    names = exposed(parts.exposition) | exposed(cloud) | {"meter_build_info"}
    assert names - documented() == set()
    assert documented() - names == set()


def test_the_rules_file_alerts_on_what_the_issue_names_with_documented_metrics():
    yaml = pytest.importorskip("yaml")
    rules = yaml.safe_load(RULES.read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert set(alerts) >= {
        "MeterUplinkDown", "MeterSpoolGrowing", "MeterDevicesMissing", "MeterReceiveBufferDrops",
        "MeterTransactionFailures",
    }
    names = documented()
    for name, rule in alerts.items():
        assert rule["expr"] and rule["labels"]["severity"] and rule["annotations"]["summary"], name
        for metric in re.findall(r"\bmeter_[a-z_]+", rule["expr"]):
            base = re.sub(r"_(bucket|count|sum)$", "", metric)
            assert base in names, f"{name} uses {metric}, which no daemon exposes"


def test_promtool_checks_the_rules_file():
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -- a real run ---------------------------------------------------------------------------


def scrape(base: str, path: str) -> tuple[int, str]:
    """
    GET C{path} of a daemon's monitoring endpoint (from the test process,
    not the daemons'): its status and text.
    """
    try:
        with urllib.request.urlopen(base + path, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metrics_of(base: str) -> dict[tuple, float]:
    status, text = scrape(base, "/metrics")
    assert status == 200, text
    return samples(text)


@pytest.mark.e2e
def test_a_real_runs_metrics_agree_with_what_it_sent(make_suite):
    suite = make_suite(4)
    cloud = suite.start_cloud()
    gateway = suite.start_gateway(connected=True)
    gateway_url, cloud_url = monitoring_url(gateway), monitoring_url(cloud)

    before = metrics_of(gateway_url)
    assert before[("meter_gateway_uplink_up", ())] == 1
    assert before[("meter_gateway_readings_acknowledged_total", ())] == 0
    assert metrics_of(cloud_url)[("meter_cloud_gateways_connected", ())] == 1
    assert scrape(gateway_url, "/healthz") == (200, "ok\n")
    assert scrape(gateway_url, "/readyz") == (200, "ready\n")
    assert scrape(cloud_url, "/readyz") == (200, "ready\n")

    devices = [suite.start_device(device_id) for device_id in suite.fleet]
    for device in devices:
        assert device.wait(30) == 0, device.tail()
    during = metrics_of(gateway_url)  # every device acknowledged: the 16 readings are the gateway's
    assert during[("meter_gateway_readings_acknowledged_total", ())] == 16
    assert during[("meter_gateway_datagrams_total", (("result", "stored"),))] == 4

    suite.wait_stored(16, cloud)
    gateway.wait_for(r"readings delivered; 0 left in the spool")
    after = metrics_of(gateway_url)
    acknowledged = after[("meter_gateway_readings_acknowledged_total", ())]
    forwarded = after[("meter_gateway_readings_forwarded_total", ())]
    spooled = after[("meter_gateway_spool_readings", ())]
    assert (acknowledged, forwarded, spooled) == (16, 16, 0)
    assert acknowledged - forwarded - spooled == 0  # nothing lost
    assert after[("meter_gateway_round_devices_missing", ())] == 0
    assert after[("meter_gateway_batches_in_flight", ())] == 0
    assert after[("meter_gateway_batch_ack_seconds_count", ())] == after[
        ("meter_gateway_batches_total", (("result", "acknowledged"),))
    ] >= 1
    assert after[("meter_gateway_datagrams_received_total", ())] == 4
    assert sum(v for (name, _), v in after.items() if name == "meter_gateway_transaction_failures_total") == 0
    assert after[("meter_gateway_receive_buffer_drops_total", ())] == 0
    assert ("process_cpu_seconds_total", ()) in after

    stored = metrics_of(cloud_url)
    assert stored[("meter_cloud_readings_stored_total", ())] == 16 == suite.count_stored()
    assert stored[("meter_cloud_readings_duplicate_total", ())] == 0
    assert stored[("meter_cloud_batches_total", (("result", "stored"),))] == after[
        ("meter_gateway_batches_total", (("result", "acknowledged"),))
    ]
    assert stored[("meter_cloud_commit_seconds_count", ())] >= 1
    assert stored[("meter_build_info", (("version", exposition.version()),))] == 1


@pytest.mark.e2e
def test_readyz_turns_503_when_the_spool_is_full_and_200_once_it_drains(make_suite):
    suite = make_suite(2, spool_limit=8)
    gateway = suite.start_gateway()  # the cloud is away
    url = monitoring_url(gateway)
    assert scrape(url, "/readyz") == (200, "ready\n")
    for device in [suite.start_device(device_id) for device_id in suite.fleet]:
        assert device.wait(30) == 0, device.tail()
    assert scrape(url, "/readyz") == (503, "spool full: 8 of 8 readings\n")
    assert scrape(url, "/healthz") == (200, "ok\n")
    full = metrics_of(url)
    assert (full[("meter_gateway_spool_readings", ())], full[("meter_gateway_spool_limit_readings", ())]) == (8, 8)
    assert full[("meter_gateway_uplink_up", ())] == 0

    cloud = suite.start_cloud()
    gateway.wait_for(r"readings delivered; 0 left in the spool", 60)
    assert scrape(url, "/readyz") == (200, "ready\n")
    suite.wait_stored(8, cloud)


@pytest.mark.e2e
@pytest.mark.parametrize("role, plugin", [("gateway", "meter-gateway"), ("cloud", "meter-cloud")])
def test_a_metrics_port_in_use_ends_the_daemon_with_one_line(make_suite, role, plugin):
    suite = make_suite(2)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        daemon = suite.start(role, plugin, "--metrics", f"tcp:{port}:interface=127.0.0.1")
        assert daemon.wait(30) != 0
    assert not daemon.all_matching("Traceback"), daemon.tail(60)
    assert daemon.all_matching(
        re.escape(f"meter-{role}: cannot serve metrics on 127.0.0.1:{port}: Address already in use "
                  f'(--metrics or [{role}] metrics chooses the endpoint; "" turns it off)') + "$"
    ), daemon.tail()


@pytest.mark.e2e
def test_an_empty_metrics_endpoint_serves_nothing(make_suite):
    suite = make_suite(2)
    cloud = suite.start_cloud("--metrics", "")
    gateway = suite.start_gateway("--metrics", "", connected=True)
    for daemon in (cloud, gateway):
        assert not daemon.all_matching("metrics on"), daemon.tail()


@pytest.mark.e2e
def test_the_kernels_drops_at_a_stalled_gateways_socket_are_counted(make_suite):
    suite = make_suite(2)
    gateway = suite.start_gateway()
    url = monitoring_url(gateway)
    before = metrics_of(url)
    assert before[("meter_gateway_receive_buffer_drops_total", ())] == 0
    # 16 MiB where the gateway may go past net.core.rmem_max (root, with
    # CAP_NET_ADMIN), else the cap.
    granted = before[("meter_gateway_receive_buffer_bytes", ())]
    cap = int(open("/proc/sys/net/core/rmem_max").read())
    assert granted == 16 << 20 or granted == min(16 << 20, cap)
    # Far more than the gateway's receive buffer holds while nobody reads
    # it: 16 MiB asked for, which the kernel doubles for its bookkeeping,
    # and a 1,200-byte datagram takes about 2.3 KB of it.
    sent = 40000
    os.kill(gateway.pid, signal.SIGSTOP)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(sent):
                s.sendto(b"x" * 1200, ("127.0.0.1", suite.gateway_port))
    finally:
        os.kill(gateway.pid, signal.SIGCONT)
    after = metrics_of(url)
    drops = after[("meter_gateway_receive_buffer_drops_total", ())]
    print(f"{sent} sent, {drops:g} dropped by the kernel")  # shown with pytest -rP
    assert 0 < drops < sent
    assert after[("meter_gateway_datagrams_received_total", ())] + drops <= sent
