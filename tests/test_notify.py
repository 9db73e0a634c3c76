"""
The readiness protocol (meter/notify.py): the messages on a real Unix
datagram socket, and READY=1 from the real twistd plugins only once their
ports are bound.
"""

from __future__ import annotations

import errno
import os
import socket

import pytest
from twisted.internet.defer import fail, succeed
from twisted.internet.testing import MemoryReactor
from twisted.logger import Logger

from meter.notify import Notifier, ReadinessService


@pytest.fixture
def manager(tmp_path):
    """
    A service manager's notification socket: a Unix datagram socket bound
    in the test's folder.
    """
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(60)
        yield path, s


def test_without_notify_socket_nothing_is_sent():
    notifier = Notifier.from_environment({})
    assert notifier.address is None
    assert notifier.ready("serving") is False


def test_ready_status_and_stopping_arrive_as_datagrams(manager):
    path, s = manager
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(path)})
    assert notifier.ready("listening on UDP 127.0.0.1:10005")
    assert s.recv(4096) == b"READY=1\nSTATUS=listening on UDP 127.0.0.1:10005"
    assert notifier.status("1 reading in the spool")
    assert s.recv(4096) == b"STATUS=1 reading in the spool"
    assert notifier.stopping()
    assert s.recv(4096) == b"STOPPING=1"


def test_abstract_socket_address():
    name = f"meter-test-notify-{os.getpid()}-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(60)
        assert Notifier(f"@{name}").ready()
        assert s.recv(4096) == b"READY=1"


def test_a_failing_send_is_logged_once_and_not_raised(tmp_path):
    events = []
    notifier = Notifier(str(tmp_path / "nobody-listens.sock"))
    notifier.log = Logger(observer=events.append)
    assert notifier.ready() is False
    assert notifier.stopping() is False
    assert len(events) == 1
    assert "NOTIFY_SOCKET=" in events[0]["log_format"]
    assert events[0]["why"] == os.strerror(errno.ENOENT)


def test_an_address_that_is_no_unix_socket_is_a_failure_logged():
    events = []
    notifier = Notifier("vsock:2:1234")
    notifier.log = Logger(observer=events.append)
    assert notifier.ready() is False
    assert events[0]["why"] == "not a Unix socket address (a path, or @name)"


class Endpoint:
    def __init__(self, outcome):
        self.outcome = outcome

    def listen(self, factory):
        return self.outcome


def test_ready_waits_for_the_watched_listeners_and_stopping_comes_at_stop(manager):
    path, s = manager
    reactor = MemoryReactor()
    readiness = ReadinessService(Notifier(str(path)), reactor, "up")
    watched = readiness.watch(Endpoint(succeed("port")))
    assert watched.listen(None).result == "port"
    readiness.startService()
    # Not before the reactor runs (and has its signal handlers).
    s.setblocking(False)
    with pytest.raises(BlockingIOError):
        s.recv(4096)
    s.settimeout(60)
    reactor.run()
    assert s.recv(4096) == b"READY=1\nSTATUS=up"
    readiness.stopService()
    assert s.recv(4096) == b"STOPPING=1"


def test_no_ready_when_a_listener_failed(manager):
    path, s = manager
    reactor = MemoryReactor()
    readiness = ReadinessService(Notifier(str(path)), reactor)
    d = readiness.watch(Endpoint(fail(OSError(errno.EADDRINUSE, "in use")))).listen(None)
    d.addErrback(lambda failure: None)  # the endpoint's own service reports it
    readiness.startService()
    reactor.run()
    readiness.stopService()
    # The one message: the stop.
    assert s.recv(4096) == b"STOPPING=1"


def _port_taken(kind: int, port: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def test_real_daemons_say_ready_once_their_ports_are_bound(make_suite, manager):
    """
    The real twistd plugins, each with NOTIFY_SOCKET: READY=1 arrives when
    its port is already bound (binding it again fails), and STOPPING=1 when
    it is stopped.
    """
    path, s = manager
    suite = make_suite(devices=1)
    env = {"NOTIFY_SOCKET": str(path)}

    cloud = suite.start("cloud", "meter-cloud", env=env)
    assert s.recv(4096).split(b"\n")[0] == b"READY=1"
    assert _port_taken(socket.SOCK_STREAM, suite.cloud_port)
    with socket.create_connection(("127.0.0.1", suite.cloud_port), timeout=30):
        pass
    assert suite.db.exists()

    gateway = suite.start("gateway", "meter-gateway", env=env)
    assert s.recv(4096).split(b"\n")[0] == b"READY=1"
    assert _port_taken(socket.SOCK_DGRAM, suite.gateway_port)
    assert suite.spool.exists()

    device = suite.start("device 1", "meter-device", "--id", "1", env=env)
    assert s.recv(4096) == b"READY=1\nSTATUS=device 1"
    device.stop()
    assert s.recv(4096) == b"STOPPING=1"
    gateway.stop()
    assert s.recv(4096) == b"STOPPING=1"
    cloud.stop()
    assert s.recv(4096) == b"STOPPING=1"
