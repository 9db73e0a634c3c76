"""
The gateway's two protocols, which only translate: datagrams from devices
into calls on the L{meter.gateway.intake.Intake}, and lines from the cloud
into calls on the L{meter.gateway.uplink.Uplink}.
"""

from __future__ import annotations

import platform
import socket
import sys

from twisted.internet.interfaces import IHandshakeListener, INegotiated
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from meter import wire
from meter.gateway.intake import Intake
from meter.gateway.shedding import Shedding
from meter.gateway.link import CloudLink, Expectation, address_text, tls_failure
from meter.gateway.uplink import Uplink
from meter.ratelimit import LimitedLines, LimitedWarnings, PerSource


#: The reasons of the busy answers to an overloaded gateway's chunks:
#: shed (a new transfer while the queue stands), and overloaded (the
#: backstop, whatever the transfer).
SHED_REASON = "shed: the gateway takes no new transfer now"
OVERLOADED_REASON = "overloaded: too many chunks wait for the spool"


_LINUX = sys.platform.startswith("linux")
#: Linux's SO_RCVBUFFORCE (Python names only SO_RCVBUF): 33 on most
#: architectures (asm-generic/socket.h, and MIPS), another number on these.
_RCVBUFFORCE = 33 if _LINUX and not platform.machine().startswith(("parisc", "sparc", "alpha")) else None


def size_receive_buffer(sock, wanted: int) -> int:
    """
    Ask for a receive buffer of C{wanted} bytes on C{sock}: beyond the
    kernel's cap (C{net.core.rmem_max}) if the process may
    (C{SO_RCVBUFFORCE}, CAP_NET_ADMIN), else up to the cap.  Returns the
    size granted, in the same terms (Linux reports double the size asked,
    the rest being its bookkeeping).
    """
    forced = False
    if _RCVBUFFORCE is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, _RCVBUFFORCE, wanted)
            forced = True
        except OSError:
            pass  # not permitted: the capped size below
    if not forced:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return granted // 2 if _LINUX else granted


class GatewayProtocol(DatagramProtocol):
    """
    The devices' side: one UDP port for the gateway's whole life.

    A datagram is authenticated before anything else is done with it: its
    claimed device must have a key and its tag must verify under that key,
    or it is dropped unanswered (an answer would let anyone use the gateway
    to reflect traffic).  Every answer is sealed with the device's key, so a
    forged acknowledgement cannot make a device drop its data.
    """

    log = Logger()
    #: No "Starting/Stopping protocol <object at 0x...>" lines: an object's
    #: address says nothing to an operator.
    noisy = False

    def __init__(
        self,
        intake: Intake,
        keys: dict[int, bytes],
        clock,
        source_rate: float = 200.0,
        source_burst: float = 400.0,
        receive_buffer: int = 16 << 20,
        log_datagrams: bool = False,
        shedding: Shedding | None = None,
    ):
        self._intake = intake
        self._clock = clock
        self._admission = intake.admission
        self._metrics = intake.metrics
        self._log_datagrams = log_datagrams
        self._keys = keys
        self._receive_buffer = receive_buffer
        #: The receive buffer the kernel granted, in bytes (None before the
        #: port listens, or on a port without a socket).
        self.receive_buffer: int | None = None
        # A flood from one address is cut off before any work is spent on
        # it, so the other devices keep being served.
        self._per_source = PerSource(clock, source_rate, source_burst)
        # Warnings about bad input: a few a minute per source, then a count.
        self._warnings = LimitedWarnings(self.log, clock)
        #: The kinds of fault whose traceback was logged, and the lines of
        #: the rest: a few a minute in all, not per source, since one fault
        #: (the port refusing writes) may hit every device at once.
        self._traced: set[type] = set()
        self._unanswered_lines = LimitedLines(self.log, clock, 1 / 6, 5, LogLevel.warn, "similar lines left out")
        self.shedding = shedding if shedding is not None else Shedding(self._metrics)
        #: The kernel's receive time of the datagram being handled, set by a
        #: L{meter.stamps.StampedPort} (None: not known).
        self.arrived: float | None = None
        self._tick = None

    def set_keys(self, keys: dict[int, bytes]) -> None:
        """
        Authenticate with C{keys} from the next datagram on (a reload).  A
        chunk being committed is answered under the key it came with.
        """
        self._keys = keys

    def startProtocol(self):
        # A fleet reporting at once must not overflow the kernel's queue.
        sock = getattr(self.transport, "socket", None)
        if sock is None:
            return
        self.receive_buffer = got = size_receive_buffer(sock, self._receive_buffer)
        mib = 1 << 20
        if got < self._receive_buffer:
            # The kernel caps the size silently: say so, or a gateway that
            # drops datagrams under load would look sized when it is not.
            self.log.warn(
                "receive buffer {got:g} MiB, not the {wanted:g} MiB of [gateway] receive_buffer_mb: the kernel caps "
                "it at net.core.rmem_max without CAP_NET_ADMIN; raise the cap (etc/sysctl.d/60-meter-gateway.conf) "
                "or the gateway drops datagrams sooner under load",
                got=got / mib, wanted=self._receive_buffer / mib, receive_buffer=got,
            )
        else:
            self.log.info("receive buffer {got:g} MiB", got=got / mib, receive_buffer=got)

    def stopProtocol(self):
        if self._tick is not None and self._tick.running:
            self._tick.stop()
        self._tick = None

    def _follow(self) -> None:
        """
        While the shedding controller is alert, let it follow the time
        between datagrams too, so it ends an overload period (and logs it)
        when the datagrams stop; nothing is scheduled otherwise.
        """
        if self._tick is None:
            self._tick = LoopingCall(self._ticked)
            self._tick.clock = self._clock
            self._tick.start(1.0, now=False)

    def _ticked(self) -> None:
        self.shedding.tick(self._clock.seconds())
        if not self.shedding.alert:
            self._tick.stop()
            self._tick = None

    def datagramReceived(self, data: bytes, addr):
        peer = f"{addr[0]}:{addr[1]}"
        metrics = self._metrics
        metrics.datagrams += 1
        # Every datagram's wait in the kernel's queue, before anything else:
        # the signal the gateway sheds load by (meter.gateway.shedding).
        now = self._clock.seconds()
        arrived = self.arrived
        sojourn = now - arrived if arrived is not None else 0.0
        shedding = self.shedding
        shedding.observe(now, sojourn)
        if shedding.alert and self._tick is None:
            self._follow()
        if not self._per_source.allow(addr[0]):
            metrics.dropped_flood += 1
            self._warnings.warn(addr[0], "dropping datagrams from {peer}: over its limit of {rate:g} a second", peer=peer, rate=self._per_source.rate)
            return
        try:
            body, tag = wire.split_tag(data)
        except wire.WireError as e:
            metrics.dropped_no_tag += 1
            self._drop(peer, len(data), str(e))
            return
        device_id = wire.claimed_device(body)
        key = self._keys.get(device_id)
        if key is None:
            metrics.dropped_unknown_device += 1
            # Two faults with two remedies: a device to add to [fleet], or
            # a device of [fleet] whose key file the gateway did not load.
            if self._admission.in_fleet(device_id):
                detail = f"device {device_id} in [fleet] has no key loaded"
            else:
                detail = f"device {device_id} is not in [fleet]"
            self._drop(peer, len(data), detail)
            return
        if not wire.tag_ok(body, tag, key):
            metrics.dropped_bad_tag += 1
            self._drop(peer, len(data), f"tag does not verify under device {device_id}'s key")
            return
        seen = wire.peek_day_id(body)
        if seen is not None:
            xfer, part, sent_at = seen
            if self._admission.acknowledged_before(device_id, xfer, part, sent_at, peer, body):
                # A retransmission of a stored chunk (its ack was lost or
                # late): answer again without decoding it a second time.
                self._reply(wire.DayAck(xfer, part, "ok"), key, addr)
                return
            if shedding.shedding:
                transfer = (device_id, xfer)
                if transfer not in self._intake.reassembly.transfers and not shedding.under_way(transfer):
                    # A new transfer while the queue stands: answered
                    # before it is decoded, with the time to come back.
                    hint = shedding.shed(now, device_id, sojourn)
                    if hint is not None:
                        self._reply(wire.DayAck(xfer, part, "busy", SHED_REASON, hint), key, addr)
                        return
            if self._admission.overloaded():
                # The backstop: more chunks wait for their commit than the
                # spool can take in a device's first timeout: refuse new
                # work now, cheaply, rather than acknowledge late and draw
                # every device's retransmissions.  The device keeps the
                # chunk.
                metrics.refused_overloaded += 1
                self._reply(wire.DayAck(xfer, part, "busy", OVERLOADED_REASON, shedding.hint(now)), key, addr)
                return
            if shedding.alert:
                shedding.opened(now, device_id, xfer)
        try:
            message = wire.decode(body, max_size=wire.MAX_DATAGRAM)
        except wire.WireError as e:
            refused = metrics.decoder_refused
            refused[e.code] = refused.get(e.code, 0) + 1
            self._warnings.warn(addr[0], "refused datagram of {size} bytes from {peer}: {error}", size=len(data), peer=peer, error=str(e))
            answer = wire.refusal(body, e)
            if isinstance(answer, wire.DayAck):
                self._reply(answer, key, addr)
            return
        if not isinstance(message, wire.DayChunk):
            metrics.unexpected += 1
            self.log.warn("{peer} sent a {kind}, which a gateway never takes", peer=peer, kind=type(message).__name__)
            return
        self._intake.chunk_received(message, peer, body).addCallback(
            self._answer, message, key, addr, peer, len(data)
        ).addErrback(self._unanswered, message, peer)

    def _unanswered(self, failure, chunk: wire.DayChunk, peer: str) -> None:
        # The intake answers every chunk, stored or not; this is a fault of
        # the gateway's own.  The device retransmits without an answer, so
        # nothing is lost: count it, and log the traceback of each kind of
        # fault once, then a few lines a minute.
        self._metrics.answer_failures += 1
        fields = dict(device=chunk.device_id, peer=peer, part=chunk.part, parts=chunk.parts)
        if failure.type not in self._traced:
            self._traced.add(failure.type)
            self.log.failure(
                "device {device} ({peer}): chunk {part}/{parts} not answered; the device sends it again", failure, **fields
            )
        else:
            self._unanswered_lines.line(
                "unanswered", "device {device} ({peer}): chunk {part}/{parts} not answered: {error}; the device sends it again",
                error=f"{failure.type.__name__}: {failure.getErrorMessage()}", **fields,
            )

    def _drop(self, peer: str, size: int, detail: str) -> None:
        self._warnings.warn(peer.rpartition(":")[0], "dropped datagram of {size} bytes from {peer}: {detail}", size=size, peer=peer, detail=detail)

    def _reply(self, ack: wire.DayAck, key: bytes, addr) -> None:
        """
        Send C{ack}, sealed with the device's C{key}, to C{addr}.
        """
        self.transport.write(wire.seal(wire.encode(ack), key), addr)

    def _answer(self, ack: wire.DayAck, chunk: wire.DayChunk, key: bytes, addr, peer: str, size: int) -> None:
        # The key the chunk came with: a reload meanwhile may have removed
        # the device or changed its key.
        self._reply(ack, key, addr)
        if not self._log_datagrams:
            # A log line costs as much as the rest of a datagram's handling:
            # by default the intake logs each device's day once it is whole.
            return
        # One line for both events.
        self.log.info(
            "received {size} bytes from device {device} ({peer}): part {part}/{parts} of {day}, {n} readings; "
            "sent {status} to device {device} for part {part}/{parts}",
            size=size,
            device=chunk.device_id,
            peer=peer,
            part=chunk.part,
            parts=chunk.parts,
            day=chunk.day,
            n=chunk.count,
            status=ack.status,
        )


@implementer(IHandshakeListener)
class CloudClientProtocol(wire.LineProtocol):
    """
    The cloud's side: hands acknowledgements to the uplink, and pings the
    cloud when the line has been silent for C{heartbeat} seconds, so a
    half-open connection is noticed and replaced.

    Over TLS the link is up, and the uplink sends, once the cloud has
    answered a first ping through it: in TLS 1.3 this side's handshake
    completes before the cloud has checked this side's certificate, so only
    an answer shows that both checks passed.  A handshake that does not
    complete within C{heartbeat} seconds is given up.  In plain text too the
    link is up once the cloud answered a first ping: a cloud expecting TLS
    never answers it, and no batch leaves in clear towards it.

    A connection lost before the link is up is a failed attempt: C{link}
    is told why (L{meter.gateway.link.tls_failure}), in the words of what
    C{expected} the cloud to present.
    """

    MAX_LENGTH = 64 * 1024
    log = Logger()

    def __init__(self, uplink: Uplink, clock, heartbeat: float, link: CloudLink, expected: Expectation | None = None):
        self._uplink = uplink
        self._clock = clock
        self._heartbeat = heartbeat
        self._link = link
        self._expected = expected
        self._timer = None
        self._pings = 0
        self._handshake_done = False
        self._up = False
        self._how = "plain text"
        #: Why this side gave the attempt up, if it did.
        self._cause: str | None = None

    def connectionMade(self):
        wire.without_nagle(self.transport)
        self._heard()
        # A TLS transport provides INegotiated; handshakeCompleted follows.
        if not INegotiated.providedBy(self.transport):
            self._handshake_done = True
            self._ping()

    def handshakeCompleted(self):
        self._handshake_done = True
        certificate = self.transport.getPeerCertificate()
        subject = certificate.get_subject().commonName if certificate is not None else None
        self._how = f"TLS, certificate CN={subject}"
        self._ping()

    def _link_up(self) -> None:
        self._up = True
        self._link.authenticated()
        self.log.info(
            "connected to the cloud at {peer}{position} from {local} ({how})",
            peer=host_port(self.transport.getPeer()),
            position=self._link.nodes.which(),
            local=host_port(self.transport.getHost()),
            how=self._how,
        )
        self._uplink.connected(self)

    def connectionLost(self, reason):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._up:
            why = reason.getErrorMessage()
            self.log.info("connection to the cloud lost: {why}", why=why)
            self._link.lost(self._cause or f"connection lost ({why.rstrip('.')})")
        else:
            tls = INegotiated.providedBy(self.transport)
            self._link.failed(
                self._cause
                or tls_failure(reason, self._handshake_done, self.transport, self._expected, self._clock.seconds(), tls)
            )
        self._uplink.disconnected(self)

    def send(self, message) -> None:
        self.sendLine(wire.encode(message))

    def abort(self, cause: str | None = None) -> None:
        """
        Close the connection now; C{cause}, why (said when failing over).
        """
        # The first cause: two batches may time out at once.
        if cause is not None and self._cause is None:
            self._cause = cause
        self.transport.abortConnection()

    def _heard(self) -> None:
        self._pings = 0
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._heartbeat)
        else:
            self._timer = self._clock.callLater(self._heartbeat, self._silent)

    def _silent(self) -> None:
        if not self._handshake_done:
            self._cause = (
                f"no TLS handshake within {self._heartbeat:g} s ([gateway] heartbeat): "
                "a peer that does not speak TLS, or one too busy to answer"
            )
            self._uplink.metrics.handshake_timeouts += 1
            self.abort()
            return
        if self._pings >= 1:
            if self._up:
                self.log.warn("the cloud did not answer a ping within {t:g} s: reconnecting", t=self._heartbeat)
                self._cause = f"the cloud did not answer a ping within {self._heartbeat:g} s ([gateway] heartbeat)"
            else:
                self._cause = f"the cloud did not answer a first ping within {self._heartbeat:g} s ([gateway] heartbeat)"
            self._uplink.metrics.heartbeat_failures += 1
            self.abort()
            return
        self._ping()

    def _ping(self) -> None:
        self._pings += 1
        self.send(wire.Ping(self._pings))
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._heartbeat)
        else:
            self._timer = self._clock.callLater(self._heartbeat, self._silent)

    def lineReceived(self, line: bytes):
        self._heard()
        try:
            message = wire.decode(line, max_size=self.MAX_LENGTH)
        except wire.WireError as e:
            self._uplink.metrics.refused_from_cloud += 1
            if not self._up:
                self._not_the_cloud(f"a line that is not the meter protocol ({e})")
                return
            self.log.warn("refused a line from the cloud: {error}", error=str(e))
            return
        if not self._up:
            # Only the answer to the first ping shows a cloud: a peer of
            # another protocol (an HTTP server answering "400 Bad Request")
            # is a failed attempt, its backoff kept and no batch sent to it.
            if not isinstance(message, wire.Pong):
                self._not_the_cloud(f"a {type(message).__name__} before the answer to its first ping")
                return
            self._link_up()
            return
        if isinstance(message, wire.BatchAck):
            self._uplink.ack_received(message)
        elif not isinstance(message, wire.Pong):
            self.log.warn("the cloud sent a {kind}: ignored", kind=type(message).__name__)

    def _not_the_cloud(self, what: str) -> None:
        self._cause = f"the peer sent {what}: not a meter cloud (is [gateway] cloud right?)"
        self.abort()

    def lineLengthExceeded(self, line):
        if not self._up:
            self._not_the_cloud(f"a line over {self.MAX_LENGTH} bytes before the answer to its first ping")
            return
        self.log.warn("the cloud sent a line over {max} bytes: reconnecting", max=self.MAX_LENGTH)
        self.abort(f"the cloud sent a line over {self.MAX_LENGTH} bytes")


class CloudClientFactory(Factory):
    #: No "Starting/Stopping factory <object at 0x...>" pair at every
    #: connection attempt.
    noisy = False

    def __init__(
        self, uplink: Uplink, clock, heartbeat: float, link: CloudLink | None = None, expected: Expectation | None = None
    ):
        self._uplink = uplink
        self._clock = clock
        self._heartbeat = heartbeat
        self.link = link if link is not None else CloudLink("the cloud", clock, 30.0)
        self._expected = expected

    def buildProtocol(self, addr):
        return CloudClientProtocol(self._uplink, self._clock, self._heartbeat, self.link, self._expected)


def host_port(address) -> str:
    """
    A Twisted address as HOST:PORT ([HOST]:PORT for IPv6), not its repr.
    """
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None:
        return str(address)
    return address_text(host, port)
