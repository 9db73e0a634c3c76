"""
Strangers cannot lock the gateway out of the cloud.

A connection is a stranger until it completes the TLS handshake, whose
options check the peer's certificate against the suite's CA (in plain text:
until its first valid line).  The cloud bounds strangers: a handshake
timeout, a cap with the oldest closed first to make room, a limit on all
connections derived from the raised descriptor limit; it never closes an
authenticated gateway for a stranger; it logs strangers and accept failures
only as counts, a line a minute; and it says "gateway connected" only after
the handshake.  The gateway likewise says "connected to the cloud" only once
the cloud has answered it over TLS.

Unit tests drive CloudProtocol and CloudClientProtocol on StringTransports
(one posing as a TLS transport) with a task.Clock; the end-to-end test runs
the real cloud daemon, with a low descriptor limit, against hundreds of
stranger connections and then the real gateway.
"""

from __future__ import annotations

import datetime
import errno
import select
import socket
import time

import pytest
from twisted.internet import task, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import INegotiated
from twisted.internet.protocol import Factory
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogPublisher, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from meter import cloud, gateway, wire
from meter.cloud import tap as cloud_tap
from meter.gateway.metrics import GatewayMetrics
from meter.tools.processes import Daemon, twistd
from meter.ratelimit import Summary
from meter.testing import MemoryReadingStore
from meter.tools.suite import Suite

TIMEOUT = 5.0
IDLE = 120.0


class FakeCertificate:
    def __init__(self, common_name: str):
        self._subject = type("Subject", (), {"commonName": common_name})()

    def get_subject(self):
        return self._subject


@implementer(INegotiated)
class FakeTLSTransport(StringTransport):
    """
    A StringTransport posing as a TLS one (TLSMemoryBIOProtocol provides
    INegotiated), whose peer presents a certificate of C{common_name}.
    """

    negotiatedProtocol = None

    def __init__(self, port: int, common_name: str | None = "meter-gateway"):
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
        self._common_name = common_name

    def getPeerCertificate(self):
        return None if self._common_name is None else FakeCertificate(self._common_name)


class Events(list):
    """
    Log events of the loggers under test, as text.
    """

    def __call__(self, event):
        self.append(formatEvent(event))

    def matching(self, text: str) -> list[str]:
        return [line for line in self if text in line]


class Cloud:
    def __init__(self, max_unauthenticated=1024, max_connections=4096):
        self.clock = task.Clock()
        self.events = Events()
        self.store = cloud.CloudStore(MemoryReadingStore(), lambda text: None, self.clock)
        self.factory = cloud.CloudFactory(
            self.store, IDLE, self.clock, handshake_timeout=TIMEOUT,
            max_unauthenticated=max_unauthenticated, max_connections=max_connections,
        )
        self.factory.admission.log = Logger(observer=self.events)
        self.ports = iter(range(40000, 50000))

    def connect(self, tls: bool = True, common_name: str | None = "meter-gateway"):
        port = next(self.ports)
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        protocol.log = Logger(observer=self.events)
        if tls:
            transport = FakeTLSTransport(port, common_name)
        else:
            transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
        protocol.makeConnection(transport)
        return protocol, transport

    def gateway(self):
        protocol, transport = self.connect()
        protocol.handshakeCompleted()
        return protocol, transport

    def lose(self, protocol, reason=ConnectionDone("Bye.")):
        protocol.connectionLost(Failure(reason))


# -- the handshake timeout ---------------------------------------------------


def test_a_stranger_that_does_not_complete_tls_is_closed_after_the_handshake_timeout():
    c = Cloud()
    protocol, transport = c.connect()
    c.clock.advance(TIMEOUT - 0.001)
    assert not transport.disconnected
    c.clock.advance(0.001)
    assert transport.disconnected  # aborted: nothing more is waited for
    c.lose(protocol, ConnectionLost())
    assert c.store.metrics.handshake_timeouts == 1
    assert c.store.metrics.unauthenticated_failed == 0  # counted once, as a timeout
    assert c.clock.getDelayedCalls() == []


def test_a_gateway_is_logged_as_connected_only_after_the_handshake_with_its_certificate_name():
    c = Cloud()
    protocol, transport = c.connect()
    assert c.events.matching("connected") == []
    protocol.handshakeCompleted()
    assert c.events.matching("connected") == ["gateway 127.0.0.1:40000 connected (certificate CN=meter-gateway)"]
    c.clock.advance(IDLE - 1)  # the handshake timer is gone; the idle timeout stays
    assert not transport.disconnected
    protocol.dataReceived(wire.encode(wire.Ping(1)) + b"\n")
    assert transport.value() == wire.encode(wire.Pong(1)) + b"\n"
    c.lose(protocol)
    assert c.events.matching("disconnected") == ["gateway 127.0.0.1:40000 disconnected: Connection was closed cleanly: Bye.."]
    assert c.clock.getDelayedCalls() == []


def test_a_handshake_without_a_certificate_does_not_make_a_gateway():
    # The TLS options require one; should they ever not, no gateway without.
    c = Cloud()
    protocol, transport = c.connect(common_name=None)
    protocol.handshakeCompleted()
    assert transport.disconnected
    c.lose(protocol, ConnectionLost())
    assert c.events.matching("gateway") == []
    assert c.store.metrics.unauthenticated_failed == 1
    assert "no client certificate" in c.events[-1]


# -- the cap and the connection limit -----------------------------------------


def test_over_the_cap_the_oldest_stranger_is_closed_first():
    c = Cloud(max_unauthenticated=3)
    strangers = [c.connect() for _ in range(3)]
    assert not any(transport.disconnected for _, transport in strangers)
    newest = c.connect()
    assert [transport.disconnected for _, transport in strangers] == [True, False, False]
    assert not newest[1].disconnected
    assert c.store.metrics.unauthenticated_evicted == 1
    # The evicted one's loss is not counted again, and its timer is gone.
    c.lose(strangers[0][0], ConnectionLost())
    assert c.store.metrics.unauthenticated_failed == 0
    assert len(c.clock.getDelayedCalls()) == 3 * 2  # each remaining stranger: handshake and idle timers


def test_an_authenticated_gateway_is_never_closed_for_strangers():
    c = Cloud(max_unauthenticated=2, max_connections=4)
    protocol, gateway_transport = c.gateway()
    strangers = [c.connect() for _ in range(50)]
    assert not gateway_transport.disconnected
    assert sum(not transport.disconnected for _, transport in strangers) == 2  # the newest two
    assert [not t.disconnected for _, t in strangers[-2:]] == [True, True]
    assert c.store.metrics.unauthenticated_evicted == 48
    # and the gateway is served
    protocol.dataReceived(wire.encode(wire.Ping(7)) + b"\n")
    assert gateway_transport.value() == wire.encode(wire.Pong(7)) + b"\n"


def test_near_the_connection_limit_the_oldest_stranger_makes_room():
    c = Cloud(max_unauthenticated=10, max_connections=3)
    _, first_gateway = c.gateway()
    (_, old), (_, young) = c.connect(), c.connect()
    _, newest = c.connect()
    assert (first_gateway.disconnected, old.disconnected, young.disconnected, newest.disconnected) == (
        False, True, False, False,
    )
    assert c.store.metrics.unauthenticated_evicted == 1


def test_when_every_connection_is_a_gateway_a_newcomer_is_refused():
    c = Cloud(max_unauthenticated=10, max_connections=2)
    gateways = [c.gateway() for _ in range(2)]
    protocol, newcomer = c.connect()
    assert newcomer.disconnected
    assert not any(transport.disconnected for _, transport in gateways)
    assert c.store.metrics.connections_refused == 1
    c.lose(protocol, ConnectionLost())  # its loss is not counted again
    assert c.store.metrics.unauthenticated_failed == 0
    # once a gateway goes, a newcomer is admitted
    c.lose(gateways[0][0])
    assert not c.connect()[1].disconnected


def test_the_limits_derive_from_the_descriptor_limit():
    # A quarter (at least 64) kept for the database, the log and an accept
    # burst; strangers may take half of the rest, at most 4096.
    assert cloud.connection_limits(128) == (64, 32)
    assert cloud.connection_limits(1024) == (768, 384)
    assert cloud.connection_limits(1_048_576) == (786_432, 4096)
    assert cloud.connection_limits(1024, 100) == (768, 100)
    assert cloud.connection_limits(10) == (2, 1)


# -- plain text ----------------------------------------------------------------


def test_in_plain_text_a_first_valid_line_authenticates():
    # No handshake: the idle timeout bounds a silent stranger (a quiet
    # gateway says its first line at its heartbeat, after 15 s).
    c = Cloud(max_unauthenticated=1)
    protocol, transport = c.connect(tls=False)
    c.clock.advance(TIMEOUT * 2)
    assert not transport.disconnected
    assert c.events.matching("connected") == []
    protocol.dataReceived(wire.encode(wire.Ping(1)) + b"\n")
    assert c.events.matching("connected") == ["gateway 127.0.0.1:40000 connected (plain text: a valid first line)"]
    stranger, stranger_transport = c.connect(tls=False)
    other, _ = c.connect(tls=False)
    assert stranger_transport.disconnected  # the cap of one: the older stranger goes, the gateway stays
    assert not transport.disconnected


def test_in_plain_text_a_silent_stranger_goes_at_the_idle_timeout_as_a_count():
    c = Cloud()
    protocol, transport = c.connect(tls=False)
    c.clock.advance(IDLE)
    assert transport.disconnected
    assert c.store.metrics.idle_timeouts == 1
    assert c.events.matching("silent") == []  # a gateway's line, not a stranger's


def test_a_strangers_garbage_is_counted_with_its_reason_not_logged_a_line_each():
    c = Cloud()
    for _ in range(20):
        protocol, transport = c.connect(tls=False)
        protocol.dataReceived(b"GET / HTTP/1.1\n")
        assert transport.disconnecting
        c.lose(protocol)
    assert sum(c.store.metrics.refused.values()) == 20
    assert c.store.metrics.unauthenticated_failed == 20
    assert c.events.matching("refused line") == [c.events[0]]  # only as the summary's last reason
    assert len(c.events) == 1


# -- the log: counts a minute --------------------------------------------------


def test_strangers_are_logged_as_counts_at_most_a_line_a_minute():
    c = Cloud(max_unauthenticated=10)
    for _ in range(100):
        protocol, _ = c.connect()
    c.clock.advance(TIMEOUT)  # the last ten time out
    for _ in range(30):  # and thirty fail their handshake
        protocol, _ = c.connect()
        c.lose(protocol, ConnectionLost("certificate verify failed"))
    (first,) = c.events  # the first stranger's eviction, at once
    assert first.startswith("1 connections closed before completing TLS (0 handshake timeouts, 1 evicted")
    c.clock.advance(60)
    assert len(c.events) == 2
    assert c.events[1].startswith(
        "129 connections closed before completing TLS (10 handshake timeouts, 89 evicted for newer ones, "
        "30 failed or closed by the peer; last: 127.0.0.1:40129: "
    )
    assert "certificate verify failed" in c.events[1]
    assert "0 refused at the connection limit, 0 accept failures (descriptor limit)" in c.events[1]
    assert c.events.matching("gateway") == []  # no line for any stranger
    c.clock.advance(600)
    assert len(c.events) == 2 and c.clock.getDelayedCalls() == []  # quiet: nothing scheduled


def test_the_summary_reports_what_is_pending_at_stop():
    clock = task.Clock()
    reports = []
    summary = Summary(clock, lambda counts, latest: reports.append((dict(counts), latest)), period=60)
    summary.add("a")
    summary.add("a", last="x")
    summary.add("b", 3)
    assert reports == [({"a": 1}, {})]
    summary.stop()
    assert reports == [({"a": 1}, {}), ({"a": 1, "b": 3}, {"last": "x"})]
    assert clock.getDelayedCalls() == []


# -- accept failures -----------------------------------------------------------


class FakeClient:
    def close(self):
        pass


class FullListener:
    """
    A listening socket whose accept() fails as when the process has no
    descriptor left (EMFILE), then hands over the waiting connection (to
    Twisted's recovery, which has freed its reserved descriptor), then has
    no more (EAGAIN).
    """

    def __init__(self):
        self.calls = 0

    def accept(self):
        self.calls += 1
        if self.calls == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        if self.calls == 2:
            return FakeClient(), ("127.0.0.1", 5555)
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")


def quieted_port():
    """
    A tcp.Port (not listening) as the cloud's listener makes it, logging to
    a publisher of its own; the events that reach it, and the accept
    failures counted.
    """
    forwarded, counted = [], []
    port = tcp.Port(0, Factory(), interface="127.0.0.1")
    port._logger = Logger(namespace="twisted.internet.tcp.Port", observer=LogPublisher(forwarded.append))
    cloud_tap.AcceptFailuresCounted(None, lambda: counted.append(1))._quiet(port)
    return port, forwarded, counted


def test_accept_failures_are_counted_not_logged_a_line_each():
    # Twisted's tcp.Port.doRead itself, its accept() failing EMFILE: it
    # frees its reserved descriptor, accepts and closes the connection, and
    # logs each; the cloud counts them.
    tcp._reservedFD.reserve()  # as any listening port has done
    port, forwarded, counted = quieted_port()
    for _ in range(100):
        port.socket = FullListener()
        port.numberAccepts = 1
        port.doRead()
    assert len(counted) == 100
    assert [formatEvent(e) for e in forwarded] == []


def test_an_accept_failure_without_recovery_is_counted_and_other_lines_still_go():
    port, forwarded, counted = quieted_port()
    # What tcp.Port logs when it has no reserved descriptor left to free.
    port._logger.info("Could not accept new connection ({acceptError})", acceptError="EMFILE")
    port._logger.info("something else")
    assert len(counted) == 1
    assert [formatEvent(e) for e in forwarded] == ["something else"]


def test_the_listener_is_wrapped_with_its_port():
    listened = []

    class Endpoint:
        def listen(self, factory):
            listened.append(factory)
            port = tcp.Port(0, factory, interface="127.0.0.1")
            return succeed(port)

    factory = Factory()
    ports = []
    cloud_tap.AcceptFailuresCounted(Endpoint(), lambda: None).listen(factory).addCallback(ports.append)
    assert listened == [factory]
    assert isinstance(ports[0]._logger.observer.__self__, cloud_tap.AcceptFailuresCounted)


# -- the gateway's side --------------------------------------------------------

HEARTBEAT = 15.0


class FakeUplink:
    def __init__(self):
        self.metrics = GatewayMetrics()
        self.senders = []

    def connected(self, sender):
        self.senders.append(sender)
        sender.send(wire.Ping(99))  # stands for the first batch

    def disconnected(self, sender):
        if sender in self.senders:
            self.senders.remove(sender)

    def ack_received(self, ack):
        pass


def gateway_client(tls: bool = True):
    clock = task.Clock()
    uplink = FakeUplink()
    events = Events()
    factory = gateway.CloudClientFactory(uplink, clock, HEARTBEAT)
    factory.link.log = Logger(observer=events)
    protocol = factory.buildProtocol(None)
    protocol.log = Logger(observer=events)
    transport = FakeTLSTransport(8001, "meter-cloud") if tls else StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, uplink, clock, events


def test_the_gateway_says_connected_only_once_the_cloud_answered_over_tls():
    protocol, transport, uplink, clock, events = gateway_client()
    assert events.matching("connected") == []
    assert uplink.senders == [] and transport.value() == b""  # nothing sent before the handshake
    protocol.handshakeCompleted()
    # In TLS 1.3 the cloud checks this side's certificate after this side's
    # handshake completed: a ping asks for the proof.
    assert transport.value() == wire.encode(wire.Ping(1)) + b"\n"
    assert events.matching("connected") == [] and uplink.senders == []
    transport.clear()
    protocol.dataReceived(wire.encode(wire.Pong(1)) + b"\n")
    (line,) = events.matching("connected to the cloud")
    assert line.endswith("(TLS, certificate CN=meter-cloud)")
    assert uplink.senders == [protocol]
    assert transport.value() == wire.encode(wire.Ping(99)) + b"\n"


def test_the_gateway_gives_up_a_handshake_that_does_not_complete():
    protocol, transport, uplink, clock, events = gateway_client()
    clock.advance(HEARTBEAT - 0.001)
    assert not transport.disconnected
    clock.advance(0.001)
    assert transport.disconnected
    assert uplink.metrics.handshake_timeouts == 1
    protocol.connectionLost(Failure(ConnectionLost()))
    assert events.matching("connected to") == []
    assert events.matching(f"cannot reach the cloud at the cloud: no TLS handshake within {HEARTBEAT:g} s")
    assert clock.getDelayedCalls() == []


def test_a_refused_gateway_certificate_is_never_called_connected():
    # The cloud closes after this side's handshake completed (TLS 1.3).
    protocol, transport, uplink, clock, events = gateway_client()
    protocol.handshakeCompleted()
    protocol.connectionLost(Failure(ConnectionLost("tlsv13 alert certificate required")))
    assert events.matching("connected to") == []
    assert events.matching("the cloud closed the connection before answering over TLS")
    assert uplink.senders == []


def test_in_plain_text_the_gateway_is_connected_once_the_cloud_answered_a_ping():
    protocol, transport, uplink, clock, events = gateway_client(tls=False)
    # A cloud expecting TLS would never answer: nothing else leaves before.
    assert transport.value() == wire.encode(wire.Ping(1)) + b"\n"
    assert events.matching("connected") == [] and uplink.senders == []
    protocol.dataReceived(wire.encode(wire.Pong(1)) + b"\n")
    assert events.matching("(plain text)") and uplink.senders == [protocol]


def test_in_plain_text_a_cloud_that_closes_before_answering_is_a_failed_attempt():
    protocol, transport, uplink, clock, events = gateway_client(tls=False)
    protocol.connectionLost(Failure(ConnectionLost()))
    (line,) = events.matching("cannot reach the cloud")
    assert "a cloud expecting TLS ([gateway] tls = false, [cloud] tls = true?)" in line
    assert uplink.senders == []


# -- end to end ----------------------------------------------------------------

#: The cloud's descriptor limits, soft and hard: small, so the strangers
#: are few.  It raises the soft one to the hard one.
SOFT, HARD = 128, 256
STRANGERS = 400


def partial_client_hello() -> bytes:
    """
    The start of a TLS record announcing a ClientHello of 512 bytes, and
    only its first 40: the cloud waits inside the handshake for the rest.
    """
    return b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc\x03\x03" + bytes(29)


def open_strangers(port: int, count: int, deadline: float) -> list[socket.socket]:
    """
    C{count} connections to 127.0.0.1:C{port}, every other one sending a
    partial ClientHello, the rest silent; each connect waited for until
    C{deadline} at most (a full listener leaves them in its queue).
    """
    sockets = []
    try:
        for i in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(s)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
        pending = list(sockets)
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], pending, [], max(0.0, min(1.0, deadline - time.monotonic())))
            for s in writable:
                pending.remove(s)
        for i, s in enumerate(sockets):
            if i % 2 and s not in pending and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                try:
                    s.send(partial_client_hello())
                except OSError:
                    pass  # closed by the cloud already
        return sockets
    except BaseException:
        for s in sockets:
            s.close()
        raise


def yesterday() -> datetime.date:
    return datetime.date.fromtimestamp(time.time()) - datetime.timedelta(days=1)


@pytest.mark.e2e
def test_strangers_do_not_lock_the_gateway_out(tmp_path):
    # The cloud starts with descriptor limits of 128 (soft) and 256 (hard);
    # 400 strangers connect, half silent, half stopping inside the TLS
    # handshake, and stay.  Their idle timeout is far beyond the test: only
    # the bounds on strangers can make room.  Then the real gateway connects,
    # and once it has, 400 more strangers come; its devices' readings all
    # arrive over its one connection, and the cloud's log holds a bounded
    # number of lines about strangers.
    suite = Suite(tmp_path, devices=4, readings=24, cloud={"idle_timeout": 3600.0})
    command = ["prlimit", f"--nofile={SOFT}:{HARD}", "--", *twistd("meter-cloud", "--config", str(suite.config))]
    cloud_daemon = Daemon("cloud", command, cwd=suite.root)
    suite.daemons.append(cloud_daemon)
    strangers: list[socket.socket] = []
    try:
        cloud_daemon.wait_for(r"Factory \(TLS\) starting on")
        assert cloud_daemon.all_matching(rf"descriptor limit {HARD} \(raised from {SOFT}\): at most 192 connections, 96 ")
        strangers += open_strangers(suite.cloud_port, STRANGERS, time.monotonic() + 30)
        gateway_daemon = suite.start_gateway()
        gateway_daemon.wait_for(r"connected to the cloud at .* \(TLS, certificate CN=meter-cloud\)", 30)
        cloud_daemon.wait_for(r"gateway 127\.0\.0\.1:\d+ connected \(certificate CN=meter-gateway\)")
        strangers += open_strangers(suite.cloud_port, STRANGERS, time.monotonic() + 30)
        devices = [suite.start_device(device_id) for device_id in suite.fleet]
        for device in devices:
            assert device.wait(30) == 0, device.tail()
        suite.wait_stored(4 * 24, cloud_daemon, timeout=60)
        assert suite.stored() == suite.expected_rows(yesterday())
        # never closed for a stranger
        assert len(gateway_daemon.all_matching(r"connected to the cloud")) == 1
        assert not gateway_daemon.all_matching(r"connection to the cloud lost")
    finally:
        for s in strangers:
            s.close()
        suite.stop()
    # The log's lines (the console's readings aside): a start, a batch, a
    # stop, and the strangers' counts.
    lines = [match.string for match in cloud_daemon.all_matching(r"^\d{4}-\d\d-\d\dT")]
    about_strangers = [line for line in lines if "closed before completing TLS" in line]
    assert 1 <= len(about_strangers) <= 3, about_strangers
    assert not [line for line in lines if "EMFILE" in line or "Too many open files" in line]
    assert len(lines) < 40, "\n".join(lines)
