"""
What the gateway says when it cannot reach the cloud: one warning line per
cause, naming the cloud's address and the cause (connection refused, a
timeout, a certificate refused with what was expected and what was found, a
plain-TCP peer where TLS was expected), the same cause not said again at
every attempt; and the wait between attempts growing on every kind of
failure until a connection authenticates.

Unit tests drive meter.gateway.link and the CloudClientProtocol with
Twisted's fakes (a task.Clock, a fake endpoint, the real ClientService);
end-to-end tests run the real twistd plugins (meter.tools.suite.Suite).
"""

from __future__ import annotations

import hashlib
import re
import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import error, task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from meter import wire
from meter.gateway import CloudClientFactory
from meter.gateway.metrics import GatewayMetrics
from meter.gateway.link import CloudClientService, CloudLink, ReportingEndpoint, tls_failure

from test_strangers import FakeTLSTransport
from test_tls import rogue_folder

ADDRESS = "127.0.0.1:8001"
HEARTBEAT = 15.0


class Events(list):
    """
    A log observer keeping each event's text.
    """

    def __call__(self, event):
        self.append(formatEvent(event))


def no_jitter() -> float:
    return 0.0


def quiet_link(clock, max_delay: float = 30.0, repeat_every: float = 600.0) -> tuple[CloudLink, Events]:
    link = CloudLink(ADDRESS, clock, max_delay, jitter=no_jitter, repeat_every=repeat_every)
    events = Events()
    link.log = Logger(observer=events)
    return link, events


# -- the link: one line a cause, a growing wait -------------------------------


def test_each_failure_is_one_line_naming_the_address_the_cause_and_the_wait():
    link, events = quiet_link(task.Clock())
    link.failed("connection refused")
    assert events == [f"cannot reach the cloud at {ADDRESS}: connection refused; next attempt in 0.8 s"]
    assert link.retry_delay(1) == 0.75


def test_the_same_cause_again_is_counted_not_said_until_repeat_every_passed():
    clock = task.Clock()
    link, events = quiet_link(clock, repeat_every=600.0)
    for _ in range(20):
        link.failed("connection refused")
        clock.advance(link.retry_delay(1))
    assert len(events) == 1
    clock.advance(600)
    link.failed("connection refused")
    assert len(events) == 2
    assert re.fullmatch(
        rf"cannot reach the cloud at {ADDRESS}: connection refused \(again, 20 attempts since "
        r"1970-01-01 \d\d:\d\d:\d\d \w+\); next attempt in 30\.0 s",
        events[1],
    ), events[1]


def test_each_distinct_cause_is_said_at_once_and_alternating_ones_are_not_repeated():
    link, events = quiet_link(task.Clock())
    for cause in ["connection refused", "TLS handshake failed: x", "connection refused", "TLS handshake failed: x",
                  "no route to the host", "connection refused"]:
        link.failed(cause)
    assert [line.split(": ", 1)[1].split(";")[0] for line in events] == [
        "connection refused", "TLS handshake failed: x", "no route to the host"
    ]
    # once a connection authenticated, the next failure is said whatever it is
    link.authenticated()
    link.failed("connection refused")
    assert len(events) == 4


def test_the_wait_grows_on_every_failure_until_a_connection_authenticates():
    link, events = quiet_link(task.Clock(), max_delay=30.0)
    waits = []
    for cause in ["connection refused", "TLS certificate verification failed", "the peer answered in plain text"] * 3:
        link.failed(cause)
        waits.append(link.retry_delay(1))  # ClientService's own count restarts at each TCP connection: ignored
    assert waits == [min(0.5 * 1.5**n, 30.0) for n in range(1, 10)]
    link.authenticated()
    # A lost authenticated connection is retried after the shortest wait.
    assert link.retry_delay(1) == 0.75
    link.failed("connection refused")
    assert link.retry_delay(2) == 0.5 * 1.5**2


# -- the real ClientService with a fake endpoint ------------------------------


@implementer(IStreamClientEndpoint)
class HandshakeRefusingEndpoint:
    """
    Connects at once over TCP (a StringTransport), and the TLS handshake
    then fails: what ClientService sees of a cloud of another CA.
    """

    def __init__(self):
        self.attempts = 0
        self.protocols = []

    def connect(self, factory):
        self.attempts += 1
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(FakeTLSTransport(8001, "meter-cloud"))
        self.protocols.append(protocol)
        return succeed(protocol)

    def refuse_handshake(self):
        protocol = self.protocols[-1]
        protocol.connectionLost(Failure(SSL.Error([("SSL routines", "", "certificate verify failed")])))


class FakeUplink:
    def __init__(self):
        self.metrics = GatewayMetrics()

    def connected(self, sender):
        pass

    def disconnected(self, sender):
        pass


def cloud_client(endpoint, clock, uplink=None):
    link, events = quiet_link(clock)
    factory = CloudClientFactory(uplink or FakeUplink(), clock, HEARTBEAT, link)
    service = CloudClientService(ReportingEndpoint(endpoint, link, 5.0), factory, link, clock)
    return service, link, events


def test_a_refused_tls_handshake_makes_the_wait_grow_though_tcp_connected():
    clock = task.Clock()
    endpoint = HandshakeRefusingEndpoint()
    service, link, events = cloud_client(endpoint, clock)
    service.startService()
    waits = []
    for _ in range(6):
        # The TCP connection is made, then the handshake is refused.
        endpoint.refuse_handshake()
        (call,) = clock.getDelayedCalls()
        waits.append(round(call.getTime() - clock.seconds(), 6))
        clock.advance(call.getTime() - clock.seconds())
    assert endpoint.attempts == 7
    assert waits == [round(min(0.5 * 1.5**n, 30.0), 6) for n in range(1, 7)]
    # one line for six attempts failing the same way
    assert len(events) == 1 and "TLS certificate verification failed" in events[0]
    service.stopService()


def test_a_connection_the_stopping_gateway_closes_is_no_failure():
    clock = task.Clock()
    endpoint = HandshakeRefusingEndpoint()
    service, link, events = cloud_client(endpoint, clock)
    service.startService()
    service.stopService()  # in the handshake
    endpoint.protocols[-1].connectionLost(Failure(error.ConnectionDone()))
    assert events == [] and link.failures == 0


@implementer(IStreamClientEndpoint)
class FailingEndpoint:
    def __init__(self, *failures):
        self._failures = list(failures)

    def connect(self, factory):
        return fail(self._failures.pop(0))


@pytest.mark.parametrize(
    "failure, cause",
    [
        (error.ConnectionRefusedError(), "connection refused (nothing listens there: is the cloud running, is [gateway] cloud right?)"),
        (error.TimeoutError(), "no answer to the TCP connection within 5 s ([gateway] connect_timeout)"),
        (error.NoRouteError(), "no route to the host"),
    ],
)
def test_a_failed_connection_is_one_warning_naming_the_cause(failure, cause):
    clock = task.Clock()
    service, link, events = cloud_client(FailingEndpoint(failure, failure), clock)
    service.startService()
    assert events == [f"cannot reach the cloud at {ADDRESS}: {cause}; next attempt in 0.8 s"]
    service.stopService()


def test_stopping_while_connecting_says_nothing():
    clock = task.Clock()

    @implementer(IStreamClientEndpoint)
    class Pending:
        def connect(self, factory):
            return Deferred()

    service, link, events = cloud_client(Pending(), clock)
    service.startService()
    service.stopService()
    assert events == []


# -- the protocol: why an attempt ended before it authenticated ---------------


def test_connected_names_both_ends_as_host_port_and_ends_the_backoff():
    clock = task.Clock()
    protocol, link, events = client(clock, FakeTLSTransport(8001, "meter-cloud"))
    protocol.log = link.log
    link.failed("connection refused")
    link.retry_delay(1)
    protocol.handshakeCompleted()
    protocol.dataReceived(wire.encode(wire.Pong(1)) + b"\n")
    assert events[-1] == "connected to the cloud at 127.0.0.1:8001 from 10.0.0.1:12345 (TLS, certificate CN=meter-cloud)"
    assert link.failures == 0
    assert link.retry_delay(1) == 0.75


class RecordingUplink(FakeUplink):
    def __init__(self):
        super().__init__()
        self.senders = []

    def connected(self, sender):
        self.senders.append(sender)


@pytest.mark.parametrize(
    "answer, what",
    [
        (b"HTTP/1.1 400 Bad Request\r\n", "a line that is not the meter protocol ("),
        (wire.encode(wire.BatchAck("0123456789abcdef", "ok", new=1, dup=0)) + b"\n", "a BatchAck before the answer to its first ping"),
    ],
    ids=["another protocol", "not a pong"],
)
def test_a_peer_answering_the_first_ping_with_anything_but_a_pong_is_a_failed_attempt(answer, what):
    # A plain-text peer of another protocol answers the gateway's ping with
    # a line of its own: it is no cloud, so no batch goes to it and the
    # wait keeps growing, as for any other failed attempt.
    clock = task.Clock()
    link, events = quiet_link(clock)
    uplink = RecordingUplink()
    link.failed("connection refused")
    link.retry_delay(1)
    protocol = CloudClientFactory(uplink, clock, HEARTBEAT, link).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(answer)
    assert uplink.senders == [] and transport.disconnecting
    protocol.connectionLost(Failure(error.ConnectionAborted()))
    assert link.failures == 2
    assert events[-1].startswith(f"cannot reach the cloud at {ADDRESS}: the peer sent {what}"), events[-1]
    assert events[-1].endswith("not a meter cloud (is [gateway] cloud right?); next attempt in 1.1 s"), events[-1]


def client(clock, transport=None):
    link, events = quiet_link(clock)
    protocol = CloudClientFactory(FakeUplink(), clock, HEARTBEAT, link).buildProtocol(None)
    protocol.makeConnection(transport or StringTransport())
    return protocol, link, events


@pytest.mark.parametrize(
    "reason, done, cause",
    [
        (SSL.Error([("SSL routines", "", "wrong version number")]), False,
         "the peer answered in plain text, not TLS: a plain-TCP peer where TLS was expected (a cloud with [cloud] tls = false?)"),
        (error.ConnectionDone(), False,
         "the peer closed the connection during the TLS handshake (Connection was closed cleanly): a plain-TCP peer "
         "where TLS was expected (a cloud with [cloud] tls = false?)"),
        (SSL.Error([("SSL routines", "", "tlsv1 alert unknown ca")]), True,
         "the cloud refused this gateway's certificate (TLS alert: unknown ca): is gateway.crt signed by a CA the cloud trusts?"),
        (error.ConnectionDone(), True,
         "the cloud closed the connection before answering over TLS (Connection was closed cleanly)"),
    ],
)
def test_why_a_tls_attempt_failed(reason, done, cause):
    assert tls_failure(Failure(reason), done, None, None, 0.0) == cause


def test_a_handshake_that_never_completes_is_one_line():
    clock = task.Clock()
    protocol, link, events = client(clock, FakeTLSTransport(8001, "meter-cloud"))
    clock.advance(HEARTBEAT)
    protocol.connectionLost(Failure(error.ConnectionAborted()))
    assert events == [
        f"cannot reach the cloud at {ADDRESS}: no TLS handshake within 15 s ([gateway] heartbeat): a peer that does "
        "not speak TLS, or one too busy to answer; next attempt in 0.8 s"
    ]


# -- end to end ------------------------------------------------------------------

CANNOT_REACH = r"\[meter\.gateway\.link\.CloudLink#warn\] cannot reach the cloud at 127\.0\.0\.1:{port}: "


def fingerprint_of(path: Path) -> str:
    (certificate,) = x509.load_pem_x509_certificates(path.read_bytes())
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()[:16]


def attempts_seen(gateway, count: int) -> None:
    """
    Wait until the gateway's stats count C{count} attempts to reconnect.
    """
    pattern = re.compile(r"forwarding_retries=(\d+)")
    while True:
        match = gateway.wait_for(pattern, 30)
        if int(match.group(1)) >= count:
            return


def said(gateway, port: int) -> list[str]:
    return [m.string.split("cannot reach the cloud at ", 1)[1] for m in gateway.all_matching(CANNOT_REACH.format(port=port))]


@pytest.mark.e2e
def test_no_cloud_is_one_line_connection_refused(make_suite):
    suite = make_suite(stats_interval=0.5)
    gateway = suite.start_gateway()
    attempts_seen(gateway, 3)
    assert said(gateway, suite.cloud_port) == [
        f"127.0.0.1:{suite.cloud_port}: connection refused (nothing listens there: is the cloud running, is [gateway] "
        "cloud right?); next attempt in " + said(gateway, suite.cloud_port)[0].rsplit("next attempt in ", 1)[1]
    ]
    # no object reprs, no factory start and stop lines, no retry line of ClientService's
    assert not gateway.all_matching(r"object at 0x|Starting factory|Stopping factory|Scheduling retry")


@pytest.mark.e2e
def test_a_cloud_of_another_ca_is_one_line_saying_what_was_expected_and_found(make_suite):
    suite = make_suite(stats_interval=0.5)
    suite.start_cloud().stop()  # makes the suite's secrets, then goes
    rogue = rogue_folder(suite, "rogue-cloud", "cloud")
    cloud = suite.start("cloud", "meter-cloud", "--secrets", str(rogue))
    cloud.wait_for(r"\(TLS\) starting on")
    gateway = suite.start_gateway()
    attempts_seen(gateway, 3)
    own = suite.root / "var" / "secrets" / "ca.crt"
    (line,) = said(gateway, suite.cloud_port)
    # The rogue sends no certificate of its CA (the name of the suite's)
    assert line.startswith(
        f"127.0.0.1:{suite.cloud_port}: TLS certificate verification failed: expected a certificate for meter-cloud "
        f"issued by CN=meter CA (SHA-256 {fingerprint_of(own)}) of {own}; found CN=meter-cloud (names meter-cloud) "
        f"issued by CN=meter CA, which is not a CA of {own}; next attempt in "
    ), line
    assert not gateway.all_matching(r"connected to the cloud")


@pytest.mark.e2e
def test_a_cloud_certificate_for_another_name_is_one_line_naming_both(make_suite):
    suite = make_suite(stats_interval=0.5, cloud_name="meter-cloud.example")
    suite.start_cloud()
    gateway = suite.start_gateway()
    attempts_seen(gateway, 3)
    (line,) = said(gateway, suite.cloud_port)
    own = suite.root / "var" / "secrets" / "ca.crt"
    assert line.startswith(
        f"127.0.0.1:{suite.cloud_port}: TLS certificate verification failed: expected the name meter-cloud.example "
        f"([gateway] cloud_name), found CN=meter-cloud (names meter-cloud) issued by CN=meter CA "
        f"(SHA-256 {fingerprint_of(own)}); next attempt in "
    ), line


@pytest.mark.e2e
def test_a_plain_tcp_cloud_is_one_line_saying_so(make_suite):
    suite = make_suite(stats_interval=0.5, cloud={"tls": False})
    suite.start_cloud()
    gateway = suite.start_gateway()
    attempts_seen(gateway, 3)
    lines = said(gateway, suite.cloud_port)
    assert lines and all("a plain-TCP peer where TLS was expected (a cloud with [cloud] tls = false?)" in line for line in lines), lines
    # at most the two ways a plain-TCP cloud ends a TLS hello, each said once
    assert len(lines) <= 2, lines


@pytest.mark.e2e
def test_a_cloud_that_does_not_answer_the_tcp_handshake_is_one_line_naming_the_timeout(make_suite):
    # A listening socket whose queue of connections is full and never
    # accepted: Linux drops the next SYNs, as a host behind a firewall
    # dropping packets would.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)
        port = silent.getsockname()[1]
        queued = []
        try:
            for _ in range(4):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                queued.append(s)
            suite = make_suite(stats_interval=0.5, cloud=None, connect_timeout=1.0)
            gateway = suite.start_gateway("--cloud", f"127.0.0.1:{port}")
            attempts_seen(gateway, 2)
            (line,) = said(gateway, port)
            assert line.startswith(
                f"127.0.0.1:{port}: no answer to the TCP connection within 1 s ([gateway] connect_timeout); next attempt in "
            ), line
        finally:
            for s in queued:
                s.close()
