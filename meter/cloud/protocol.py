"""
The cloud's side of a gateway connection: L{CloudProtocol} translates lines
to calls on L{meter.cloud.store.CloudStore} and answers to lines;
L{Admission} bounds the connections that have not authenticated yet.
"""

from __future__ import annotations

from collections import Counter

from twisted.internet.interfaces import IHandshakeListener, INegotiated
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from meter import ratelimit, wire
from meter.cloud.metrics import CloudMetrics
from meter.cloud.store import CloudStore


#: Descriptors kept for all but connections (the database and its journal,
#: the log, the listener, the reactor's own) and for the connections the
#: listener accepts in one go before those it evicts are closed: a quarter
#: of the limit, at least this many.
RESERVED_DESCRIPTORS = 64

#: The most unauthenticated connections derived from the descriptor limit:
#: each holds a TLS state of some tens of kilobytes.
MAX_UNAUTHENTICATED = 4096


def connection_limits(descriptors: int, max_unauthenticated: int = 0) -> tuple[int, int]:
    """
    The most connections the cloud keeps open, and the most of those not
    authenticated yet, with C{descriptors} file descriptors.

    @param max_unauthenticated: as configured; 0 derives it: half the
        connections, so that strangers can never take what gateways need, at
        most L{MAX_UNAUTHENTICATED}.
    """
    connections = max(2, descriptors - max(RESERVED_DESCRIPTORS, descriptors // 4))
    if max_unauthenticated <= 0:
        max_unauthenticated = max(1, min(MAX_UNAUTHENTICATED, connections // 2))
    return connections, max_unauthenticated


class Admission:
    """
    Which connections have authenticated, and bounds on those that have not.

    A connection is a stranger until its TLS handshake completes, which
    includes the check of its certificate against the suite's CA (in plain
    text, until its first valid line).  Each stranger holds a descriptor:
    left unbounded, connections that stay silent or stop inside the
    handshake take them all and keep the gateways out.  So a stranger gets
    C{handshake_timeout} seconds; at most C{max_unauthenticated} strangers
    are kept, the oldest closed to make room for a newcomer; and at most
    C{max_connections} connections all told, again the oldest stranger closed
    first.  An authenticated gateway is never closed for a stranger: when
    every connection has authenticated, the newcomer is refused.

    Strangers are not logged one by one: L{ratelimit.Summary} reports their
    counts in a line a minute at most.
    """

    log = Logger()

    def __init__(
        self,
        clock,
        metrics: CloudMetrics,
        handshake_timeout: float = 5.0,
        max_unauthenticated: int = 1024,
        max_connections: int = 4096,
        report_period: float = 60.0,
    ):
        self._clock = clock
        self._metrics = metrics
        self.handshake_timeout = handshake_timeout
        self.max_unauthenticated = max_unauthenticated
        self.max_connections = max_connections
        #: Strangers, oldest first, each with its handshake timer (or None).
        self._strangers: dict[CloudProtocol, object] = {}
        self._authenticated: set[CloudProtocol] = set()
        self._summary = ratelimit.Summary(clock, self._log_strangers, report_period)
        #: Whether connections authenticate with TLS, for the log's words.
        self.tls = True

    def arrived(self, protocol: CloudProtocol, timed: bool) -> bool:
        """
        A connection is made: make room for it, or refuse it (aborted).

        @param timed: give it L{handshake_timeout} seconds to authenticate
            (a TLS connection; in plain text the idle timeout applies).
        @return: whether it was admitted.
        """
        self.tls = timed
        while self._strangers and (
            len(self._strangers) >= self.max_unauthenticated or self._count() >= self.max_connections
        ):
            self._metrics.unauthenticated_evicted += 1
            self._close(next(iter(self._strangers)), "evicted")
        if self._count() >= self.max_connections:
            self._metrics.connections_refused += 1
            self._summary.add("refused")
            protocol.transport.abortConnection()
            return False
        timer = None
        if timed:
            timer = self._clock.callLater(self.handshake_timeout, self._handshake_timed_out, protocol)
        self._strangers[protocol] = timer
        return True

    def authenticated(self, protocol: CloudProtocol) -> None:
        timer = self._strangers.pop(protocol, None)
        if timer is not None and timer.active():
            timer.cancel()
        self._authenticated.add(protocol)

    def expired(self, protocol: CloudProtocol) -> None:
        """
        A stranger's own deadline passed (in plain text: its idle timeout
        before any valid line).
        """
        if protocol in self._strangers:
            self._metrics.idle_timeouts += 1
            self._close(protocol, "timeouts")

    def left(self, protocol: CloudProtocol, detail: str) -> bool:
        """
        A connection is lost; C{detail} names its peer and why.

        @return: whether it had authenticated (the caller logs it); a
            stranger is only counted.
        """
        if protocol in self._authenticated:
            self._authenticated.discard(protocol)
            return True
        if protocol in self._strangers:
            timer = self._strangers.pop(protocol)
            if timer is not None and timer.active():
                timer.cancel()
            self._metrics.unauthenticated_failed += 1
            self._summary.add("failed", last=detail)
        return False

    def gauges(self) -> dict[str, int]:
        """
        The connections now: gateways authenticated, strangers not yet.
        """
        return {"gateways_connected": len(self._authenticated), "unauthenticated": len(self._strangers)}

    def accept_failed(self) -> None:
        """
        The listener could not accept a connection (no descriptor left), or
        closed one at once to recover.
        """
        self._metrics.accept_failures += 1
        self._summary.add("accepts")

    def stop(self) -> None:
        self._summary.stop()
        for timer in self._strangers.values():
            if timer is not None and timer.active():
                timer.cancel()

    def _count(self) -> int:
        return len(self._strangers) + len(self._authenticated)

    def _handshake_timed_out(self, protocol: CloudProtocol) -> None:
        self._metrics.handshake_timeouts += 1
        self._close(protocol, "timeouts")

    def _close(self, protocol: CloudProtocol, kind: str) -> None:
        """
        Close a stranger, counted in the summary's C{kind}; its own metric is
        the caller's.
        """
        timer = self._strangers.pop(protocol)
        if timer is not None and timer.active():
            timer.cancel()
        self._summary.add(kind)
        protocol.transport.abortConnection()

    def _log_strangers(self, counts: Counter, latest: dict) -> None:
        closed = counts["timeouts"] + counts["evicted"] + counts["failed"]
        last = f"; last: {latest['last']}" if "last" in latest else ""
        self.log.warn(
            "{closed} connections closed before {what} ({timeouts} handshake timeouts, {evicted} evicted for newer "
            "ones, {failed} failed or closed by the peer{last}), {refused} refused at the connection limit, "
            "{accepts} accept failures (descriptor limit); one such line a minute at most",
            closed=closed,
            what="completing TLS" if self.tls else "a first valid line",
            timeouts=counts["timeouts"],
            evicted=counts["evicted"],
            failed=counts["failed"],
            last=last,
            refused=counts["refused"],
            accepts=counts["accepts"],
        )


@implementer(IHandshakeListener)
class CloudProtocol(wire.LineProtocol, TimeoutMixin):
    """
    One gateway connection: newline-delimited messages of L{meter.wire}.

    Over TLS the connection authenticates when its handshake completes (the
    TLS options require a certificate the suite's CA signed); in plain text,
    with its first valid line.  Until then it is a stranger of L{Admission}.
    """

    MAX_LENGTH = wire.MAX_LINE
    log = Logger()

    def __init__(self, store: CloudStore, idle_timeout: float, clock, admission: Admission | None = None):
        self._store = store
        self._idle_timeout = idle_timeout
        self._metrics = store.metrics
        self._admission = admission if admission is not None else Admission(clock, store.metrics)
        self._authenticated = False
        #: Why a stranger is closed by this side, for its count.
        self._why: str | None = None
        # TimeoutMixin schedules through this attribute; use the injected clock.
        self.callLater = clock.callLater

    def connectionMade(self):
        self._peer = _describe(self.transport.getPeer())
        wire.without_nagle(self.transport)
        self.setTimeout(self._idle_timeout)
        # A TLS transport provides INegotiated; the handshake starts after
        # this returns, and handshakeCompleted follows it.  In plain text a
        # stranger's deadline is the idle timeout: a gateway with nothing to
        # send says its first line at its heartbeat, later than a handshake
        # timeout of a few seconds.
        self._admission.arrived(self, timed=INegotiated.providedBy(self.transport))

    def handshakeCompleted(self):
        # The TLS options verified the chain to the suite's CA (and the
        # certificate's purpose) before the handshake could complete.
        certificate = self.transport.getPeerCertificate()
        if certificate is None:
            self._why = "no client certificate"
            self.transport.abortConnection()
            return
        subject = certificate.get_subject().commonName
        self._authenticate(f"certificate CN={subject}")

    def _authenticate(self, how: str) -> None:
        self._authenticated = True
        self._admission.authenticated(self)
        self.log.info("gateway {peer} connected ({how})", peer=self._peer, how=how)

    def connectionLost(self, reason):
        self.setTimeout(None)
        why = self._why or reason.getErrorMessage()
        if self._admission.left(self, f"{self._peer}: {why}"):
            self.log.info("gateway {peer} disconnected: {why}", peer=self._peer, why=why)

    def timeoutConnection(self):
        if not self._authenticated:
            self._admission.expired(self)
            return
        self.log.warn("gateway {peer} silent for {t:g} s: closing", peer=self._peer, t=self._idle_timeout)
        self._metrics.idle_timeouts += 1
        self.transport.abortConnection()

    def lineReceived(self, line: bytes):
        self.resetTimeout()
        try:
            message = wire.decode(line)
        except wire.WireError as e:
            self._refuse(line, e)
            return
        if isinstance(message, wire.Batch):
            if not self._authenticated:
                self._authenticate("plain text: a valid first line")
            self._store.store(message, self._peer).addCallback(self._answer).addErrback(self._unanswered, message.batch_id)
        elif isinstance(message, wire.Ping):
            if not self._authenticated:
                self._authenticate("plain text: a valid first line")
            self._answer(wire.Pong(message.seq))
        else:
            self._metrics.unexpected += 1
            self._warn("gateway {peer} sent a {kind}, which a cloud never takes", kind=type(message).__name__)

    def _warn(self, format: str, **fields) -> None:
        """
        Log a gateway's fault; a stranger's is only kept as the reason it
        goes, for L{Admission}'s count (strangers cost no line each).
        """
        if self._authenticated:
            self.log.warn(format, peer=self._peer, **fields)
        else:
            # The count names the peer itself.
            self._why = format.removeprefix("gateway {peer}").lstrip(": ").format(**fields)

    def _answer(self, message) -> None:
        if self.transport.connected:
            self.sendLine(wire.encode(message))

    def _unanswered(self, failure, batch_id: str) -> None:
        # The store answers every batch, stored or refused; this is a fault
        # of the cloud's own.  Silence would leave the gateway waiting out
        # its acknowledgement timeout with the batch in flight: closing
        # makes it send again at once, and the store keeps the readings once.
        self._metrics.answer_failures += 1
        self.log.failure(
            "gateway {peer}: batch {batch_id} not acknowledged: closing the connection, the gateway sends it again",
            failure, peer=self._peer, batch_id=batch_id,
        )
        if self.transport.connected:
            self.transport.abortConnection()

    def _refuse(self, line: bytes, error: wire.WireError) -> None:
        self._metrics.refused[error.code] += 1
        self._warn("gateway {peer}: refused line of {size} bytes: {error}", size=len(line), error=str(error))
        answer = wire.refusal(line, error)
        if isinstance(answer, wire.BatchAck):
            self._answer(answer)
        else:
            # Not even a batch we could name: the stream is not ours.
            self.transport.loseConnection()

    def lineLengthExceeded(self, line):
        self._metrics.refused["size"] += 1
        self._warn("gateway {peer}: line longer than {max} bytes: closing", max=self.MAX_LENGTH)
        self.transport.loseConnection()


class CloudFactory(Factory):
    #: No "Starting/Stopping factory <object at 0x...>" lines: an object's
    #: address says nothing to an operator.
    noisy = False

    def __init__(
        self,
        store: CloudStore,
        idle_timeout: float,
        clock,
        handshake_timeout: float = 5.0,
        max_unauthenticated: int = 1024,
        max_connections: int = 4096,
    ):
        self._store = store
        self._idle_timeout = idle_timeout
        self._clock = clock
        self.admission = Admission(clock, store.metrics, handshake_timeout, max_unauthenticated, max_connections)

    def buildProtocol(self, addr):
        return CloudProtocol(self._store, self._idle_timeout, self._clock, self.admission)

    def stopFactory(self):
        self.admission.stop()


def _describe(address) -> str:
    host = getattr(address, "host", None)
    return f"{host}:{address.port}" if host is not None else str(address)

