"""
The gateway <-> cloud hop over TLS with mutual authentication, end to end:
the real twistd plugins (meter.tools.suite.Suite) on loopback.

- the default suite runs over TLS and delivers;
- a gateway whose certificate another CA signed is refused by the cloud, and
  so is one presenting the cloud's own certificate (it is for servers only);
- a cloud whose certificate another CA signed, or whose certificate does not
  carry the name the gateway expects, is refused by the gateway;
- a plain-text gateway gets nothing from a TLS cloud;
- with plain TCP configured on both sides explicitly it works, and the
  cloud says PLAIN TEXT when it starts.

In each refusal nothing reaches the cloud's database, though the devices'
readings are safe in the gateway's spool.
"""

from __future__ import annotations

import datetime
import shutil
import socket
import ssl
import time
import warnings
from pathlib import Path

import pytest

from meter import secrets
from meter.tools.suite import Suite

pytestmark = pytest.mark.e2e


def yesterday() -> datetime.date:
    return datetime.date.fromtimestamp(time.time()) - datetime.timedelta(days=1)


# What the daemons log when the hop works.  The refusal tests check that
# none of it appears; test_the_default_suite_delivers_over_tls proves each
# is what a working hop does log, so none of those absence checks can pass
# merely because a message was reworded or a log went uncaptured.  (The
# plain-text tests prove the same of PLAIN_TEXT.)
GATEWAY_CONNECTED = r"connected to the cloud at"
CLOUD_ACCEPTED = r"gateway 127\.0\.0\.1:\d+ connected"
GATEWAY_ACKNOWLEDGED = r"batch \w+ acknowledged by the cloud"
CLOUD_COMMITTED = r"readings committed"
PLAIN_TEXT = r"PLAIN TEXT"
TLS = r"\(TLS\)"


def deliver(suite: Suite) -> None:
    """
    Every device of the suite hands its day to the gateway (which answers
    from its spool, whatever becomes of the cloud hop).
    """
    devices = [suite.start_device(device_id) for device_id in suite.fleet]
    for device in devices:
        assert device.wait(30) == 0, device.tail()


def rogue_folder(suite: Suite, name: str, role: str) -> Path:
    """
    A secrets folder holding the suite's device keys, a C{role} ("cloud"
    or "gateway") certificate and key that ANOTHER CA signed, and a ca.crt
    trusting both CAs: the rogue daemon trusts the suite, the suite does not
    trust it.
    """
    own = suite.root / "var" / "secrets"
    other = suite.root / f"{name}-other-ca"
    secrets.create(other, suite.fleet)
    rogue = suite.root / name
    shutil.copytree(own, rogue, ignore=shutil.ignore_patterns(".lock", "ca.*", "cloud.*", "gateway.*"))
    for suffix in ("crt", "key"):
        shutil.copy2(other / f"{role}.{suffix}", rogue / f"{role}.{suffix}")
    (rogue / "ca.crt").write_bytes((own / "ca.crt").read_bytes() + (other / "ca.crt").read_bytes())
    return rogue


def test_the_default_suite_delivers_over_tls(make_suite):
    suite = make_suite()
    cloud = suite.start_cloud()
    assert cloud.all_matching(r"with TLS, gateways need a certificate of the suite's CA")
    assert cloud.all_matching(r"\(TLS\) starting on")
    gateway = suite.start_gateway()
    assert not gateway.all_matching(PLAIN_TEXT)
    deliver(suite)
    suite.wait_stored(2 * 4, cloud)
    assert suite.stored() == suite.expected_rows(yesterday())
    for pattern in [GATEWAY_CONNECTED, GATEWAY_ACKNOWLEDGED]:
        gateway.wait_for(pattern)
    for pattern in [CLOUD_ACCEPTED, CLOUD_COMMITTED, TLS]:
        assert cloud.all_matching(pattern), pattern
    # the secrets were made where [security] dir says, keys readable only by their owner
    folder = suite.root / "var" / "secrets"
    for path in [folder / "ca.key", folder / "cloud.key", folder / "gateway.key", folder / "devices" / "device1.key"]:
        assert path.stat().st_mode & 0o077 == 0, path


def test_a_gateway_certified_by_another_ca_is_refused_by_the_cloud(make_suite):
    suite = make_suite()
    cloud = suite.start_cloud()
    rogue = rogue_folder(suite, "rogue-gateway", "gateway")
    gateway = suite.start("gateway", "meter-gateway", "--secrets", str(rogue))
    gateway.wait_for("GatewayProtocol starting on")
    deliver(suite)  # the devices' keys are the suite's: the gateway takes their days
    gateway.wait_for(r"round \S+ complete: every expected device reported")
    # The cloud refuses the handshake, again at each attempt; it counts the
    # stranger, naming the last one's peer and reason.
    cloud.wait_for(r"connections closed before completing TLS .*last: 127\.0\.0\.1:\d+: .*(certificate|unknown ca|alert)", 20)
    gateway.seen_or_wait(r"cannot reach the cloud at 127\.0\.0\.1:\d+: the cloud refused this gateway's certificate", 20)
    assert not gateway.all_matching(GATEWAY_CONNECTED)
    assert not cloud.all_matching(CLOUD_ACCEPTED)
    assert not gateway.all_matching(GATEWAY_ACKNOWLEDGED)
    assert not cloud.all_matching(CLOUD_COMMITTED)
    assert suite.count_stored() == 0
    # The days wait in the spool: the same gateway with its rightful
    # certificate delivers them.
    gateway.stop()
    suite.start_gateway()
    suite.wait_stored(2 * 4, cloud)
    assert suite.stored() == suite.expected_rows(yesterday())


def test_the_clouds_certificate_does_not_make_a_gateway(make_suite):
    # Signed by the suite's CA, but for servers only (extended key usage):
    # whoever took it from the cloud's host cannot pose as a gateway.
    suite = make_suite()
    cloud = suite.start_cloud()
    own = suite.root / "var" / "secrets"
    rogue = suite.root / "stolen"
    shutil.copytree(own, rogue, ignore=shutil.ignore_patterns(".lock"))
    for suffix in ("crt", "key"):
        shutil.copy(own / f"cloud.{suffix}", rogue / f"gateway.{suffix}")
    gateway = suite.start("gateway", "meter-gateway", "--secrets", str(rogue))
    gateway.wait_for("GatewayProtocol starting on")
    deliver(suite)
    cloud.wait_for(r"connections closed before completing TLS .*last: 127\.0\.0\.1:\d+: .*certificate verify failed", 20)
    gateway.seen_or_wait(r"cannot reach the cloud at 127\.0\.0\.1:\d+: .*unsupported certificate", 20)
    assert not gateway.all_matching(GATEWAY_CONNECTED)
    assert not cloud.all_matching(CLOUD_COMMITTED)
    assert suite.count_stored() == 0

def test_a_cloud_certified_by_another_ca_is_refused_by_the_gateway(make_suite):
    suite = make_suite()
    suite.start_cloud().stop()  # makes the suite's secrets, then goes
    rogue = rogue_folder(suite, "rogue-cloud", "cloud")
    cloud = suite.start("cloud", "meter-cloud", "--secrets", str(rogue))
    cloud.wait_for(r"\(TLS\) starting on")
    gateway = suite.start_gateway()
    deliver(suite)
    gateway.wait_for(r"round \S+ complete: every expected device reported")
    gateway.seen_or_wait(r"cannot reach the cloud at 127\.0\.0\.1:\d+: TLS certificate verification failed", 20)
    assert not gateway.all_matching(GATEWAY_ACKNOWLEDGED)
    assert not cloud.all_matching(CLOUD_COMMITTED)
    assert suite.count_stored() == 0


def test_a_cloud_certificate_for_another_name_is_refused_by_the_gateway(make_suite):
    # The cloud's certificate is the suite CA's, for meter-cloud; this
    # gateway expects another name, as if the cloud were an impostor holding
    # some other certificate of the same CA.
    suite = make_suite(cloud_name="meter-cloud.example")
    cloud = suite.start_cloud()
    gateway = suite.start_gateway()
    deliver(suite)
    gateway.wait_for(r"round \S+ complete: every expected device reported")
    gateway.seen_or_wait(r"cannot reach the cloud at 127\.0\.0\.1:\d+: .*expected the name meter-cloud\.example", 20)
    assert not gateway.all_matching(GATEWAY_ACKNOWLEDGED)
    assert not cloud.all_matching(CLOUD_COMMITTED)
    assert suite.count_stored() == 0


def test_a_plain_text_gateway_gets_nothing_from_a_tls_cloud(make_suite):
    suite = make_suite(tls=False)
    cloud = suite.start_cloud()
    gateway = suite.start_gateway()
    assert gateway.all_matching(r"connecting to the cloud in PLAIN TEXT \(\[gateway\] tls = false\)")
    deliver(suite)
    # The gateway pings first: the cloud, expecting TLS, never answers, and
    # no batch leaves in clear.
    cloud.wait_for(r"connections closed before completing TLS", 20)
    gateway.seen_or_wait(
        r"cannot reach the cloud at 127\.0\.0\.1:\d+: the cloud closed the connection before answering in plain "
        r"text \(.*\): a cloud expecting TLS \(\[gateway\] tls = false, \[cloud\] tls = true\?\)", 40
    )
    assert not gateway.all_matching(r"forwarding batch|connected to the cloud")
    assert not cloud.all_matching(CLOUD_COMMITTED)
    assert suite.count_stored() == 0


def test_plain_tcp_when_configured_on_both_sides(make_suite):
    suite = make_suite(tls=False, cloud={"tls": False})
    cloud = suite.start_cloud()
    assert cloud.all_matching(r"listening on tcp:\d+:interface=127\.0\.0\.1 in PLAIN TEXT \(\[cloud\] tls = false\)")
    assert not cloud.all_matching(TLS)
    gateway = suite.start_gateway()
    assert gateway.all_matching(r"connecting to the cloud in PLAIN TEXT \(\[gateway\] tls = false\)")
    deliver(suite)
    suite.wait_stored(2 * 4, cloud)
    assert suite.stored() == suite.expected_rows(yesterday())


# -- the TLS policy: 1.2 with ECDHE and an AEAD cipher, or 1.3 -----------------


def client_context(folder: Path, version: ssl.TLSVersion, ciphers: str | None = None) -> ssl.SSLContext:
    """
    An ssl-module client holding the gateway's certificate that offers only
    C{version} and, below 1.3, only C{ciphers}.  Its own policy is lowered
    as far as OpenSSL goes (security level 0), so a refusal is the peer's.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(folder / "ca.crt")
    context.load_cert_chain(folder / "gateway.crt", folder / "gateway.key")
    context.set_ciphers((ciphers or "ALL") + ":@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1, on purpose
        context.minimum_version = context.maximum_version = version
    return context


#: (protocol version, the client's only cipher suites, accepted by the suite)
OFFERS = [
    (ssl.TLSVersion.TLSv1_1, "ECDHE-ECDSA-AES128-SHA", False),
    (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA256", False),
    (ssl.TLSVersion.TLSv1_2, "AES128-GCM-SHA256:AES256-GCM-SHA384:DHE-RSA-AES128-GCM-SHA256", False),
    (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256", True),
    (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES256-GCM-SHA384", True),
    (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-CHACHA20-POLY1305", True),
    (ssl.TLSVersion.TLSv1_3, None, True),
]
OFFER_IDS = ["tls1.1", "tls1.2-cbc", "tls1.2-no-ecdhe", "tls1.2-aes128gcm", "tls1.2-aes256gcm", "tls1.2-chacha20", "tls1.3"]


@pytest.fixture(scope="module")
def tls_cloud(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls-policy")
    suite = Suite(root, devices=1, readings=4)
    suite.start_cloud()
    yield suite
    suite.stop()


@pytest.mark.parametrize("version, ciphers, accepted", OFFERS, ids=OFFER_IDS)
def test_the_cloud_accepts_tls_1_2_with_ecdhe_and_aead_or_1_3_only(tls_cloud, version, ciphers, accepted):
    context = client_context(tls_cloud.root / "var" / "secrets", version, ciphers)
    with socket.create_connection(("127.0.0.1", tls_cloud.cloud_port), timeout=20) as raw:
        if not accepted:
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                context.wrap_socket(raw, server_hostname=secrets.CLOUD_NAME)
            return
        with context.wrap_socket(raw, server_hostname=secrets.CLOUD_NAME) as tls:
            assert tls.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
            if ciphers is not None:
                assert tls.cipher()[0] == ciphers


def server_object(folder: Path, version: ssl.TLSVersion, ciphers: str | None):
    """
    An in-memory ssl-module server holding the cloud's certificate that
    offers only C{version} and C{ciphers}; its two memory BIOs.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cloud.crt", folder / "cloud.key")
    context.set_ciphers((ciphers or "ALL") + ":@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    return context.wrap_bio(incoming, outgoing, server_side=True), incoming, outgoing


def handshake_with_the_gateways_options(folder: Path, version: ssl.TLSVersion, ciphers: str | None):
    """
    A handshake in memory between the gateway's TLS transport (Twisted's
    TLS protocol with the options meter.secrets.client_tls makes) and an
    ssl-module server: the protocol version and cipher agreed.  The server
    raises its SSLError if the two have nothing in common.
    """
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.testing import StringTransport
    from twisted.protocols.tls import TLSMemoryBIOFactory

    client = TLSMemoryBIOFactory(secrets.client_tls(folder), True, Factory.forProtocol(Protocol)).buildProtocol(None)
    transport = StringTransport()
    client.makeConnection(transport)
    server, incoming, outgoing = server_object(folder, version, ciphers)
    for _ in range(10):  # a handshake takes a few flights
        incoming.write(transport.value())
        transport.clear()
        try:
            server.do_handshake()
        except ssl.SSLWantReadError:
            pass
        answer = outgoing.read()
        if not answer and not transport.value():
            break
        client.dataReceived(answer)
    assert not transport.disconnecting
    return client._tlsConnection.get_protocol_version_name(), client._tlsConnection.get_cipher_name()


@pytest.mark.parametrize("version, ciphers, accepted", OFFERS, ids=OFFER_IDS)
def test_the_gateway_accepts_tls_1_2_with_ecdhe_and_aead_or_1_3_only(tmp_path, version, ciphers, accepted):
    secrets.create(tmp_path, {1: "192.168.1.2"})
    if not accepted:
        with pytest.raises(ssl.SSLError):
            handshake_with_the_gateways_options(tmp_path, version, ciphers)
        return
    agreed, cipher = handshake_with_the_gateways_options(tmp_path, version, ciphers)
    assert agreed == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    if ciphers is not None:
        assert cipher == ciphers
