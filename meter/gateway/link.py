"""
The gateway's attempts to reach the cloud: why each one failed, said in one
warning line naming the address and the cause, the same cause not repeated
at every attempt; and the wait between attempts, which grows on every kind
of failure until a connection authenticates.

Twisted's ClientService counts failed attempts only until a TCP connection
is made: a TLS handshake that then fails (a certificate of another CA, a
plain-TCP peer) would start its count again, and the gateway would retry
about once a second for ever.  L{CloudLink} keeps its own count, which only
an authenticated connection (the cloud answered over TLS) ends.
"""

from __future__ import annotations

import datetime
import hashlib
import random
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence
from weakref import WeakKeyDictionary

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import error
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from meter.clocktext import local_time
from meter.gateway.failover import CloudNodes
from meter.gateway.metrics import GatewayMetrics

#: A cause is said again, with the count of attempts meanwhile, at most
#: this often, seconds.
REPEAT_EVERY = 600.0

#: Causes remembered at once (the oldest said is forgotten first): a peer
#: alternating between a few ways to fail is not a new cause each time.
MAX_CAUSES = 16

#: OpenSSL's words for bytes that are not a TLS record: the peer answered
#: in plain text.
_NOT_TLS = ("wrong version number", "packet length too long", "unknown protocol", "http request", "record layer failure")

#: TLS alerts by which a cloud refuses this gateway's certificate.
_CERTIFICATE_REFUSED = ("unknown ca", "bad certificate", "certificate unknown", "unsupported certificate",
                        "certificate required", "certificate expired", "certificate revoked", "decrypt error")


def address_text(host: str, port: int) -> str:
    """
    HOST:PORT, or [HOST]:PORT for an IPv6 address.
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class CloudLink:
    """
    The attempts to reach the cloud at C{address} (one C{HOST:PORT} text,
    or the list of the cloud's nodes: L{meter.gateway.failover}): the retry
    policy of the gateway's ClientService (L{retry_delay}), told of each
    failed attempt with its cause (L{failed}), of each authenticated
    connection (L{authenticated}) and of the loss of one (L{lost}).  With
    several nodes, each failed attempt and each loss moves to the next
    node, and the wait grows once a whole round of the list failed.
    """

    log = Logger()

    def __init__(
        self,
        address: str | Sequence[str],
        clock,
        max_delay: float,
        initial_delay: float = 0.5,
        jitter: Callable[[], float] = random.random,
        repeat_every: float = REPEAT_EVERY,
        metrics: GatewayMetrics | None = None,
    ):
        self.nodes = CloudNodes((address,) if isinstance(address, str) else address)
        self._clock = clock
        self._policy = backoffPolicy(initialDelay=initial_delay, maxDelay=max_delay, jitter=jitter)
        self._repeat_every = repeat_every
        self._metrics = metrics if metrics is not None else GatewayMetrics()
        #: Attempts failed in a row since the last authenticated connection.
        self.failures = 0
        #: The wait decided at the last failure, for the retry that follows.
        self._delay: float | None = None
        #: Each cause said since the last authenticated connection (with
        #: several nodes, each node's), keyed by node and cause: the time of
        #: its last line, and the attempts failing so since without one.
        self._causes: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()
        self._stopped = False

    @property
    def address(self) -> str:
        """
        The address of the node connected to, or tried next.
        """
        return self.nodes.current

    @property
    def node(self) -> str:
        """
        The node connected to, or tried next, for a log line: its address
        and, with several nodes, which of them it is.
        """
        return self.nodes.describe()

    def failed(self, cause: str) -> None:
        """
        An attempt failed (the TCP connection, the TLS handshake, or the
        cloud's first answer): one warning line naming the address and
        C{cause} (with several nodes, the node failed over to), unless a
        line said the same cause of the same node less than
        C{repeat_every} seconds ago; then the attempt is counted into that
        cause's next line.
        """
        if self._stopped:
            # The gateway is stopping and closed the connection itself.
            return
        self.failures += 1
        self._delay = delay = self._policy(self.nodes.rounds(self.failures))
        address = self.address
        moved_to = self._move_on()
        now = self._clock.seconds()
        said_at, unsaid = self._causes.pop((address, cause), (None, 0))
        if said_at is not None and now - said_at < self._repeat_every:
            self._causes[(address, cause)] = (said_at, unsaid + 1)
            return
        same = ""
        if unsaid:
            # This attempt and the unsaid ones since the cause's last line.
            same = f" (again, {unsaid + 1} attempts since {local_time(said_at)})"
        self._causes[(address, cause)] = (now, 0)
        if len(self._causes) > MAX_CAUSES * len(self.nodes):
            self._causes.popitem(last=False)
        if moved_to is None:
            self.log.warn(
                "cannot reach the cloud at {address}: {cause}{same}; next attempt in {delay:.1f} s",
                address=address, cause=cause, same=same, delay=delay, failures=self.failures,
            )
        else:
            self.log.warn(
                "failing over from {address} to {node}: {cause}{same}; next attempt in {delay:.1f} s",
                address=address, node=moved_to, cause=cause, same=same, delay=delay, failures=self.failures,
            )

    def lost(self, cause: str) -> None:
        """
        An authenticated connection ended (lost, or closed by this side for
        C{cause}: a batch not acknowledged, a ping not answered).  With one
        node it is retried after the shortest wait (the protocol said the
        loss); with several, the next node is, and one line says so.
        """
        if self._stopped:
            return
        self.failures += 1
        self._delay = delay = self._policy(self.nodes.rounds(self.failures))
        address = self.address
        moved_to = self._move_on()
        if moved_to is not None:
            self.log.warn(
                "failing over from {address} to {node}: {cause}; next attempt in {delay:.1f} s",
                address=address, node=moved_to, cause=cause, delay=delay, failures=self.failures,
            )

    def _move_on(self) -> str | None:
        """
        With several nodes, move to the next and count a failover: the next
        node, described; C{None} with one node.
        """
        if len(self.nodes) == 1:
            return None
        self.nodes.advance()
        self._metrics.cloud_failovers += 1
        return self.nodes.describe()

    def authenticated(self) -> None:
        """
        A connection authenticated: the next loss is retried after the
        shortest wait, and the next failure is said whatever it is.
        """
        self.failures = 0
        self._delay = None
        self._causes.clear()

    def stop(self) -> None:
        """
        The gateway stops: connections it closes now are no failed attempts.
        """
        self._stopped = True

    def retry_delay(self, attempt: int) -> float:
        """
        The ClientService's retry policy: the wait decided by L{failed} or
        L{lost}, or, after a loss no one reported, the backoff's next.
        (ClientService's own C{attempt} restarts at every TCP connection:
        unused.)
        """
        delay, self._delay = self._delay, None
        if delay is None:
            self.failures += 1
            delay = self._policy(self.nodes.rounds(self.failures))
        return delay


@implementer(IStreamClientEndpoint)
class ReportingEndpoint:
    """
    An endpoint telling C{link} why each connection attempt failed.  A
    connection that is made is the protocol's to report on.
    """

    def __init__(self, endpoint, link: CloudLink, connect_timeout: float):
        self._endpoint = endpoint
        self._link = link
        self._connect_timeout = connect_timeout

    def connect(self, factory):
        return self._endpoint.connect(factory).addErrback(self._failed)

    def _failed(self, failure: Failure) -> Failure:
        # Cancelled: the gateway is stopping, no attempt failed.
        if not failure.check(CancelledError, error.ConnectingCancelledError):
            self._link.failed(connect_failure(failure, self._connect_timeout))
        return failure


def connect_failure(failure: Failure, connect_timeout: float) -> str:
    """
    Why a TCP connection could not be made, in an operator's words.
    """
    if failure.check(error.ConnectionRefusedError):
        return "connection refused (nothing listens there: is the cloud running, is [gateway] cloud right?)"
    if failure.check(error.TimeoutError):
        return f"no answer to the TCP connection within {connect_timeout:g} s ([gateway] connect_timeout)"
    if failure.check(error.TCPTimedOutError):
        return "the TCP connection timed out"
    if failure.check(error.NoRouteError):
        return "no route to the host"
    if failure.check(error.DNSLookupError):
        return "cannot resolve the host name"
    reason = failure.value
    os_error = getattr(reason, "osError", None)
    if isinstance(os_error, OSError) and os_error.strerror:
        return os_error.strerror[:1].lower() + os_error.strerror[1:]
    return failure.getErrorMessage()


# -- what TLS found ----------------------------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
class PeerCertificates:
    """
    The gateway's TLS options (C{creator}), keeping each connection's
    OpenSSL object so the certificates a refused cloud presented can still
    be named after the handshake failed (the transport then gives none).
    """

    def __init__(self, creator):
        self._creator = creator
        self._connections: WeakKeyDictionary = WeakKeyDictionary()

    def clientConnectionForTLS(self, tlsProtocol):
        connection = self._creator.clientConnectionForTLS(tlsProtocol)
        self._connections[tlsProtocol] = connection
        return connection

    def presented(self, transport) -> list[x509.Certificate]:
        """
        The chain the peer of C{transport} presented, its own certificate
        first; empty if it presented none (or the transport is not TLS).
        """
        connection = self._connections.get(transport)
        chain = connection.get_peer_cert_chain() if connection is not None else None
        return [certificate.to_cryptography() for certificate in chain or []]


def name_of(name: x509.Name) -> str:
    common = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return f"CN={common[0].value}" if common else name.rfc4514_string()


def fingerprint(certificate: x509.Certificate) -> str:
    """
    The start of a certificate's SHA-256 fingerprint: two CAs of the same
    name (every suite's is "meter CA") are told apart by it.
    """
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()[:16]


def describe_authorities(authorities: list[x509.Certificate], path: Path) -> str:
    """
    The CAs of C{path} (the gateway's ca.crt) as a verification message
    names them.
    """
    if not authorities:
        return f"a CA of {path}"
    return " or ".join(f"{name_of(ca.subject)} (SHA-256 {fingerprint(ca)})" for ca in authorities) + f" of {path}"


def _signed_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def describe_presented(
    chain: list[x509.Certificate], authorities: list[x509.Certificate], path: Path, now: datetime.datetime
) -> str:
    """
    What the cloud presented: its certificate's subject and names, its
    issuer (with the issuer's fingerprint when the issuer's certificate is
    known, or saying it is none of the C{authorities} of C{path}), and its
    validity if it is outside it at C{now}.
    """
    if not chain:
        return "no certificate"
    leaf = chain[0]
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    text = name_of(leaf.subject) + (f" (names {', '.join(names)})" if names else "")
    text += f" issued by {name_of(leaf.issuer)}"
    # By signature, not by name: every suite's CA has the same name, and a
    # peer may send the certificate of another CA of that name.
    signers = [c for c in [*authorities, *chain[1:]] if _signed_by(leaf, c)]
    if signers:
        text += f" (SHA-256 {fingerprint(signers[0])})"
    else:
        text += f", which is not a CA of {path}"
    if now > leaf.not_valid_after_utc:
        text += f", expired {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    elif now < leaf.not_valid_before_utc:
        text += f", not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    return text


class Expectation:
    """
    What the gateway expects of the cloud's certificate: C{name}, signed by
    a CA of the file C{path} (the gateway's ca.crt); C{presented} gives the
    chain a connection's peer presented.
    """

    def __init__(self, name: str, path: Path, presented: Callable[[object], list]):
        self.name = name
        self.path = path
        try:
            self._authorities = x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError):
            self._authorities = []
        self.authorities = describe_authorities(self._authorities, path)
        self.presented = presented

    def found(self, transport, now: float) -> str:
        return describe_presented(
            self.presented(transport), self._authorities, self.path,
            datetime.datetime.fromtimestamp(now, datetime.timezone.utc),
        )


def tls_failure(
    reason: Failure, handshake_done: bool, transport, expected: Expectation | None, now: float, tls: bool = True
) -> str:
    """
    Why a connection ended before it authenticated, from the C{reason} it
    ended with, in an operator's words: when the gateway refused the cloud's
    certificate, what it expected and what it found (at Unix time C{now}).
    Without C{tls}, the cloud closed before answering the gateway's first
    ping in plain text.
    """
    why = reason.getErrorMessage().rstrip(".")
    if not tls:
        return (
            f"the cloud closed the connection before answering in plain text ({why}): "
            "a cloud expecting TLS ([gateway] tls = false, [cloud] tls = true?)"
        )
    value = reason.value
    if type(value).__name__ == "VerificationError":  # service_identity's: the name does not match
        found = expected.found(transport, now) if expected is not None else "another name"
        wanted = expected.name if expected is not None else "the configured name"
        return (
            f"TLS certificate verification failed: expected the name {wanted} ([gateway] cloud_name), "
            f"found {found}"
        )
    text = _openssl_text(value)
    if text is not None:
        lowered = text.lower()
        if "certificate verify failed" in lowered:
            found = expected.found(transport, now) if expected is not None else "a certificate it does not trust"
            wanted = (
                f"a certificate for {expected.name} issued by {expected.authorities}" if expected is not None
                else "a certificate of the suite's CA"
            )
            return f"TLS certificate verification failed: expected {wanted}; found {found}"
        if any(words in lowered for words in _NOT_TLS):
            return (
                "the peer answered in plain text, not TLS: a plain-TCP peer where TLS was expected "
                "(a cloud with [cloud] tls = false?)"
            )
        alerts = [words for words in _CERTIFICATE_REFUSED if words in lowered]
        if alerts:
            return (
                f"the cloud refused this gateway's certificate (TLS alert: {alerts[0]}): "
                "is gateway.crt signed by a CA the cloud trusts?"
            )
        return f"TLS handshake failed: {text}"
    if not handshake_done:
        return (
            f"the peer closed the connection during the TLS handshake ({why}): "
            "a plain-TCP peer where TLS was expected (a cloud with [cloud] tls = false?)"
        )
    return f"the cloud closed the connection before answering over TLS ({why})"


def _openssl_text(value) -> str | None:
    """
    The reasons of an OpenSSL error, joined; C{None} for any other error.
    """
    if type(value).__module__ != "OpenSSL.SSL":
        return None
    reasons = []
    for entry in value.args[0] if value.args and isinstance(value.args[0], list) else []:
        if isinstance(entry, tuple) and entry and entry[-1] not in reasons:
            reasons.append(entry[-1])
    return ", ".join(reasons) or str(value)


# -- the service ---------------------------------------------------------------


def _without_retry_lines(event: dict) -> None:
    # ClientService's "Scheduling retry N to connect <endpoint object at
    # 0x...> in 0.7632769550452702 seconds": CloudLink says it for people.
    if not (event.get("log_format") or "").startswith("Scheduling retry"):
        globalLogPublisher(event)


class CloudClientService(ClientService):
    """
    Twisted's reconnecting client to the cloud, retrying when C{link} says
    (L{CloudLink.retry_delay}), without its own line at each retry.
    """

    _log = Logger(namespace="meter.gateway.link.CloudClientService", observer=_without_retry_lines)

    def __init__(self, endpoint, factory, link: CloudLink, clock, retry_policy: Callable[[int], float] | None = None):
        """
        @param retry_policy: C{link.retry_delay}, or a wrapper of it (one
            counting the retries).
        """
        super().__init__(endpoint, factory, retryPolicy=retry_policy or link.retry_delay, clock=clock)
        self._link = link

    def stopService(self):
        self._link.stop()
        return super().stopService()
