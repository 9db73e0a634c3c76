"""
Several cloud nodes behind one gateway ([gateway] cloud as a list): the
gateway connects to one at a time, fails over to the next, round robin,
when the node refuses, times out, fails the handshake, loses the connection
or stops acknowledging, sends its unacknowledged batches there again, and
waits longer only once a whole round of the list failed.

Unit tests with Twisted's fakes: a task.Clock, an endpoint per node that
refuses, times out or accepts (a StringTransport, the node's answers
written by the test), the real ClientService, CloudClientProtocol, Uplink
and the memory spool.  The end-to-end tests, with the real plugins, are in
tests/test_failover_e2e.py.
"""

from __future__ import annotations

import pytest
from twisted.internet import error, task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from meter import wire
from meter.gateway import CloudClientFactory, Uplink
from meter.gateway.failover import CloudNodes, NodeEndpoint
from meter.gateway.link import CloudClientService, CloudLink, ReportingEndpoint
from meter.gateway.metrics import GatewayMetrics
from meter.testing import MemorySpool
from test_gateway import spooled_chunk

HEARTBEAT = 15.0
ACK_TIMEOUT = 5.0
A, B, C = "127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"


class Events(list):
    def __call__(self, event):
        self.append(formatEvent(event))

    def matching(self, text: str) -> list[str]:
        return [line for line in self if text in line]


class NodeTransport(StringTransport):
    """
    A connection to a node: what the gateway writes is kept; aborting it
    ends it in the next turn of the clock, as a TCP connection would.
    """

    def __init__(self, clock, host: str, port: int):
        super().__init__(peerAddress=IPv4Address("TCP", host, port), hostAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self._clock = clock
        self.ended = False

    def abortConnection(self):
        self.end(error.ConnectionAborted())

    def loseConnection(self):
        self.end(error.ConnectionDone())

    def end(self, reason: Exception) -> None:
        if not self.ended:
            self.ended = True
            self._clock.callLater(0, self.protocol.connectionLost, Failure(reason))


@implementer(IStreamClientEndpoint)
class FakeNode:
    """
    One cloud node: it refuses (C{"refuse"}), times out (C{"timeout"}), or
    accepts (C{"accept"}) each connection; the test answers the gateway's
    lines through L{serve}.
    """

    def __init__(self, clock, address: str, mode: str = "accept"):
        self.clock = clock
        self.address = address
        self.mode = mode
        #: The time of each attempt.
        self.attempts: list[float] = []
        self.transports: list[NodeTransport] = []
        self._read: dict[int, int] = {}

    def connect(self, factory):
        self.attempts.append(self.clock.seconds())
        if self.mode == "refuse":
            return fail(error.ConnectionRefusedError())
        if self.mode == "timeout":
            return fail(error.TimeoutError())
        host, _, port = self.address.rpartition(":")
        protocol = factory.buildProtocol(None)
        transport = NodeTransport(self.clock, host, int(port))
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.transports.append(transport)
        return succeed(protocol)

    @property
    def connection(self) -> NodeTransport:
        return self.transports[-1]

    def received(self) -> list:
        """
        The messages the gateway sent on the current connection not yet read.
        """
        transport = self.connection
        data = transport.value()
        start = self._read.get(id(transport), 0)
        self._read[id(transport)] = len(data)
        return [wire.decode(line) for line in data[start:].split(b"\n") if line]

    def serve(self, ack: bool = True) -> list[wire.Batch]:
        """
        Answer what the gateway sent: a pong to each ping, and (with
        C{ack}) an acknowledgement of each batch; the batches.
        """
        batches = []
        for message in self.received():
            if isinstance(message, wire.Ping):
                self.reply(wire.Pong(message.seq))
            elif isinstance(message, wire.Batch):
                batches.append(message)
                if ack:
                    self.reply(wire.BatchAck(message.batch_id, "ok", new=len(message.readings), dup=0))
        return batches

    def reply(self, message) -> None:
        self.connection.protocol.dataReceived(wire.encode(message) + b"\n")


def no_jitter() -> float:
    return 0.0


class Gateway:
    """
    The gateway's cloud side over C{nodes}: the real ClientService, link,
    protocol and uplink, over a memory spool of C{chunks} one-reading
    chunks of a closed round, batches of C{batch_readings}.
    """

    def __init__(self, *modes: str, chunks: int = 0, batch_readings: int = 2, window: int = 2, max_delay: float = 30.0):
        self.clock = clock = task.Clock()
        self.events = Events()
        self.metrics = GatewayMetrics()
        addresses = [A, B, C][: len(modes)]
        self.nodes = [FakeNode(clock, address, mode) for address, mode in zip(addresses, modes)]
        self.link = CloudLink(addresses, clock, max_delay, jitter=no_jitter, metrics=self.metrics)
        self.link.log = Logger(observer=self.events)
        self.spool = MemorySpool(clock)
        self.readings = {}
        for seq in range(1, chunks + 1):
            chunk = spooled_chunk(seq)
            self.spool.add_chunk(chunk, 0.0, round_closed=True)
            self.readings[seq] = chunk.readings[0]
        clock.advance(0)
        self.uplink = Uplink(self.spool, clock, batch_readings, ACK_TIMEOUT, lambda count: None, window=window,
                             metrics=self.metrics)
        self.uplink.log = Logger(observer=self.events)
        factory = CloudClientFactory(self.uplink, clock, HEARTBEAT, self.link)
        self.service = CloudClientService(
            ReportingEndpoint(NodeEndpoint(self.link.nodes, self.nodes), self.link, 5.0), factory, self.link, clock
        )

    def start(self) -> None:
        self.service.startService()
        self.clock.advance(0)

    def stop(self) -> None:
        self.service.stopService()
        self.clock.advance(0)

    def attempts(self) -> list[tuple[float, str]]:
        """
        Every attempt, in order: (time, node address).
        """
        return sorted((at, node.address) for node in self.nodes for at in node.attempts)

    def wait(self) -> float:
        """
        The wait until the next attempt (the one delayed call of the
        ClientService's), and that attempt made.
        """
        (retry,) = self.clock.getDelayedCalls()
        wait = retry.getTime() - self.clock.seconds()
        self.clock.advance(wait)
        return wait

    def up(self, node: FakeNode) -> None:
        """
        C{node} answers the first ping: the link is up on it.
        """
        node.serve()
        self.clock.advance(0)


def advance_until_attempts(gateway: Gateway, count: int, limit: float = 1000.0) -> None:
    """
    Advance the clock to each next timer until C{count} attempts were made.
    """
    clock = gateway.clock
    for _ in range(1000):
        if len(gateway.attempts()) >= count:
            return
        calls = [call.getTime() for call in clock.getDelayedCalls()]
        assert calls and min(calls) - clock.seconds() <= limit, "no attempt scheduled"
        clock.advance(max(0.0, min(calls) - clock.seconds()))
    raise AssertionError("no more attempts")


def waits(gateway: Gateway) -> list[float]:
    at = [time for time, _ in gateway.attempts()]
    return [round(later - earlier, 6) for earlier, later in zip(at, at[1:])]


# -- the order of attempts and the waits ---------------------------------------


def test_attempts_go_round_robin_and_the_wait_grows_once_a_round_failed():
    g = Gateway("refuse", "refuse", "refuse")
    g.start()
    advance_until_attempts(g, 10)
    assert [address for _, address in g.attempts()] == [A, B, C] * 3 + [A]
    # 0.5 * 1.5 ** round: the same wait across a round of the list
    assert waits(g) == [0.75, 0.75, 0.75, 1.125, 1.125, 1.125, 1.6875, 1.6875, 1.6875]
    # the tenth attempt failed too
    assert g.link.failures == 10
    assert g.metrics.cloud_failovers == 10
    # Each node's refusal said once, naming where the gateway goes next.
    assert len(g.events) == 3
    assert g.events[0] == (
        f"failing over from {A} to {B} (node 2 of 3): connection refused (nothing listens there: is the cloud "
        "running, is [gateway] cloud right?); next attempt in 0.8 s"
    )
    assert g.events[2].startswith(f"failing over from {C} to {A} (node 1 of 3): connection refused")
    g.stop()


def test_the_wait_of_a_list_is_capped_by_max_backoff():
    g = Gateway("refuse", "refuse", max_delay=2.0)
    g.start()
    advance_until_attempts(g, 12)
    assert max(waits(g)) == 2.0
    assert waits(g)[:4] == [0.75, 0.75, 1.125, 1.125]


@pytest.mark.parametrize(
    "mode, cause",
    [
        ("refuse", "connection refused (nothing listens there"),
        ("timeout", "no answer to the TCP connection within 5 s ([gateway] connect_timeout)"),
    ],
)
def test_a_node_down_fails_over_to_the_next_which_gets_the_batches(mode, cause):
    g = Gateway(mode, "accept", chunks=3)
    g.start()
    assert [address for _, address in g.attempts()] == [A]
    assert g.events == [g.events[0]] and g.events[0].startswith(f"failing over from {A} to {B} (node 2 of 2): {cause}")
    assert g.wait() == 0.75
    a, b = g.nodes
    g.up(b)
    assert g.uplink.gauges()["uplink_up"] == 1
    batches = b.serve()
    g.clock.advance(0)
    batches += b.serve()
    g.clock.advance(0)
    assert sorted(map(repr, (r for batch in batches for r in batch.readings))) == sorted(map(repr, g.readings.values()))
    assert g.spool.depth == 0
    assert g.link.failures == 0 and g.metrics.cloud_failovers == 1
    g.stop()


def test_a_tls_failure_on_a_node_fails_over():
    g = Gateway("accept", "accept")
    g.start()
    a, b = g.nodes
    # The connection ends before the node answered the first ping.
    a.connection.protocol.connectionLost(Failure(error.ConnectionLost("handshake failed")))
    g.clock.advance(0)
    assert g.events[-1].startswith(f"failing over from {A} to {B} (node 2 of 2): ")
    g.wait()
    g.up(b)
    assert [address for _, address in g.attempts()] == [A, B]
    assert g.uplink.gauges()["uplink_up"] == 1
    g.stop()


# -- no acknowledgement, a lost connection ---------------------------------------


def test_a_node_that_stops_acknowledging_is_left_and_the_batches_go_to_the_next():
    g = Gateway("accept", "accept", chunks=4, window=2)
    g.start()
    a, b = g.nodes
    g.up(a)
    unanswered = a.serve(ack=False)
    assert len(unanswered) == 2  # the window: two batches of two readings
    g.clock.advance(ACK_TIMEOUT)
    g.clock.advance(0)
    (line,) = g.events.matching("failing over")
    assert line == (
        f"failing over from {A} to {B} (node 2 of 2): batch {unanswered[0].batch_id} not acknowledged within 5 s "
        "([gateway] ack_timeout); next attempt in 0.8 s"
    )
    # both batches of the window timed out at once: one failover, for the first
    assert g.metrics.ack_timeouts == 2 and g.metrics.batches_resent == 2 and g.metrics.cloud_failovers == 1
    assert g.uplink.gauges()["uplink_up"] == 0
    assert g.wait() == 0.75
    g.up(b)
    resent = b.serve()
    # The same readings, in new batches, on the next node: none lost, and
    # none left for a third sending (the spool is empty once acknowledged).
    assert sorted(repr(r) for batch in resent for r in batch.readings) == sorted(
        repr(r) for batch in unanswered for r in batch.readings
    )
    g.clock.advance(0)
    assert g.spool.depth == 0
    assert b.serve() == []
    g.stop()


def test_a_lost_connection_fails_over_and_the_list_comes_back_to_the_first_node():
    g = Gateway("accept", "accept", chunks=2, batch_readings=1, window=1)
    g.start()
    a, b = g.nodes
    g.up(a)
    (first,) = a.serve()
    g.clock.advance(0)
    # Node A is lost (killed): the gateway moves to B, which is down too.
    a.connection.end(error.ConnectionLost())
    b.mode = "refuse"
    g.clock.advance(0)
    assert g.events.matching("failing over")[-1] == (
        f"failing over from {A} to {B} (node 2 of 2): connection lost (Connection to the other side was lost in a "
        "non-clean fashion); next attempt in 0.8 s"
    )
    g.wait()  # B refuses: back to A, in the same round
    assert g.events[-1].startswith(f"failing over from {B} to {A} (node 1 of 2): connection refused")
    assert g.wait() == 0.75
    assert [address for _, address in g.attempts()] == [A, B, A]
    g.up(a)
    (second,) = a.serve()
    g.clock.advance(0)
    assert [first.readings, second.readings] == [(g.readings[1],), (g.readings[2],)]
    assert g.spool.depth == 0 and g.link.failures == 0
    assert g.metrics.cloud_failovers == 2
    g.stop()


def test_connected_names_the_node_and_its_position():
    g = Gateway("refuse", "accept")
    g.protocol_events = Events()
    from meter.gateway.protocol import CloudClientProtocol

    before = CloudClientProtocol.log
    CloudClientProtocol.log = Logger(observer=g.protocol_events)
    try:
        g.start()
        g.wait()
        g.up(g.nodes[1])
    finally:
        CloudClientProtocol.log = before
    assert g.protocol_events == [f"connected to the cloud at {B} (node 2 of 2) from 127.0.0.1:40000 (plain text)"]
    g.stop()


def test_one_node_is_retried_as_before_without_failing_over():
    g = Gateway("refuse")
    g.start()
    advance_until_attempts(g, 4)
    assert waits(g) == [0.75, 1.125, 1.6875]
    assert g.events[0].startswith(f"cannot reach the cloud at {A}: connection refused")
    assert g.metrics.cloud_failovers == 0
    g.stop()


def test_stopping_the_gateway_is_no_failover():
    g = Gateway("accept", "accept")
    g.start()
    g.up(g.nodes[0])
    g.stop()
    g.clock.advance(0)
    assert g.metrics.cloud_failovers == 0 and g.link.nodes.position == 0
    assert not g.events.matching("failing over")


def test_cloud_nodes_describe_their_position():
    nodes = CloudNodes([A, B, C])
    assert nodes.describe() == f"{A} (node 1 of 3)"
    assert nodes.advance() == 1 and nodes.current == B
    assert [nodes.rounds(f) for f in range(1, 8)] == [1, 1, 1, 2, 2, 2, 3]
    assert CloudNodes([A]).describe() == A
    with pytest.raises(ValueError):
        NodeEndpoint(nodes, [object()])
