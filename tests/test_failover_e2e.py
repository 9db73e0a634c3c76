"""
Several cloud nodes behind one gateway, end to end: the real twistd
plugins (two meter-cloud nodes, one meter-gateway given both with
--cloud A,B) and a fleet in `meter loadgen`.  A node is SIGKILLed; the
gateway fails over to the other, sends there what the killed node never
acknowledged, and every reading is stored exactly once (the rows compared
exactly).  The killed node comes back and the gateway can return to it.

With PostgreSQL (both nodes on one database, the session's throwaway
cluster of tests/conftest.py) the kill lands in the middle of forwarding;
with SQLite (a database per node) the first node is killed before the day
starts, so the whole day goes to the second.
"""

from __future__ import annotations

import random
import signal
import re
import sqlite3
import time

import pytest

from meter.device import previous_day
from meter.tools.processes import CLOUD_LISTENING, CONSOLE_LINE, Daemon, DaemonError, free_port
from meter.tools.suite import Suite, loadgen_summary

pytestmark = pytest.mark.e2e

DAY = previous_day(time.time())


def start_node(suite: Suite, name: str, port: int, *args: str) -> Daemon:
    """
    Another meter-cloud node of C{suite}'s cloud, listening on C{port}: the
    suite's configuration (its secrets, so the same certificate name), with
    C{args} (another --db for SQLite).
    """
    node = suite.start(name, "meter-cloud", "--listen", f"tcp:{port}:interface=127.0.0.1", *args)
    node.wait_for(CLOUD_LISTENING, 30)
    return node


def connected_to(gateway: Daemon, port: int, position: int, timeout: float = 30.0) -> None:
    gateway.wait_for(rf"connected to the cloud at 127\.0\.0\.1:{port} \(node {position} of 2\) from ", timeout)


def rows(path) -> list[tuple]:
    with sqlite3.connect(path) as connection:
        return connection.execute(
            "SELECT device_id, device_ip, taken_at, temperature_c, humidity_pct FROM readings ORDER BY device_id, taken_at"
        ).fetchall()


def drained(suite: Suite, gateway: Daemon) -> None:
    """
    Wait until the gateway's spool holds nothing: each acknowledged batch
    removed (the rows may be stored a moment before).
    """
    for _ in range(1000):
        with sqlite3.connect(suite.spool) as spool:
            (held,) = spool.execute("SELECT count(*) FROM chunks").fetchone()
        if not held:
            return
        gateway.wait_for(r"readings delivered; \d+ left in the spool", 30)
    raise AssertionError("the spool never emptied")


def gateway_stats(gateway: Daemon) -> dict:
    line = gateway.all_matching(r"gateway stats: (.*)")[-1].group(1)
    print("gateway stats:", line)
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", line)}


def test_a_day_goes_to_the_second_node_when_the_first_is_killed_and_the_first_can_come_back(make_suite):
    suite = make_suite(50, 96, batch_readings=500, stats_interval=1.0)
    port_a, port_b = suite.cloud_port, free_port()
    db_b = suite.root / "cloud-b.sqlite"
    a = suite.start_cloud()
    b = start_node(suite, "cloud B", port_b, "--db", str(db_b))
    gateway = suite.start_gateway("--cloud", f"127.0.0.1:{port_a},127.0.0.1:{port_b}")
    assert gateway.all_matching(rf"cloud 127\.0\.0\.1:{port_a}, 127\.0\.0\.1:{port_b}, deadline")
    connected_to(gateway, port_a, 1)

    a.kill()
    gateway.wait_for(
        rf"failing over from 127\.0\.0\.1:{port_a} to 127\.0\.0\.1:{port_b} \(node 2 of 2\): connection lost", 20
    )
    connected_to(gateway, port_b, 2)
    summary = loadgen_summary(suite.start_fleet(DAY, "1-50"))
    assert summary["delivered"] == 50, summary
    gateway.wait_for(rf"round {DAY} complete: every expected device reported", 30)
    deadline = time.monotonic() + 60
    while len(rows(db_b)) < 50 * 96 and time.monotonic() < deadline:
        b.wait_for(r"readings committed", 30)
    # The whole day on the second node, once; nothing reached the first.
    assert rows(db_b) == suite.expected_rows(DAY)
    assert rows(suite.db) == []

    # The first node comes back: the gateway stays where it is connected,
    # and goes back to it once the second is killed in turn.
    a = suite.start_cloud()
    b.kill()
    gateway.wait_for(
        rf"failing over from 127\.0\.0\.1:{port_b} to 127\.0\.0\.1:{port_a} \(node 1 of 2\): connection lost", 20
    )
    connected_to(gateway, port_a, 1)
    gateway.wait_for(r"gateway stats: .*\bcloud_failovers=2\b", 10)
    gateway.stop()
    stats = gateway_stats(gateway)
    assert stats["spool_depth"] == 0 and stats["cloud_failovers"] == 2, stats
    assert rows(db_b) == suite.expected_rows(DAY) and rows(suite.db) == []


@pytest.fixture
def shared_database(request):
    """
    A new database on the session's PostgreSQL cluster (tests/conftest.py),
    for both nodes.
    """
    return request.getfixturevalue("postgres_database")


def test_a_node_killed_mid_forwarding_the_gateway_fails_over_and_every_reading_is_stored_once(
    make_suite, shared_database
):
    """
    Two nodes on one PostgreSQL database; 100 devices x 96 readings, in
    batches of whole chunks of 48 (200 batches).  Node A is SIGKILLed after
    a random number of batches: the gateway fails over to B and sends there
    what A had not acknowledged.  B is SIGKILLed in turn, a few batches
    later, while A is still down: the gateway goes round the list, both
    refusing, until A is started again, comes back to A and finishes.  The
    database holds every reading exactly once, and the nodes' consoles
    printed none twice.
    """
    rng = random.Random(19)
    suite = make_suite(100, 96, batch_readings=10, ack_timeout=5.0, stats_interval=1.0, postgres=shared_database)
    port_a, port_b = suite.cloud_port, free_port()
    a = suite.start_cloud()
    b = start_node(suite, "cloud B", port_b)
    nodes = [a, b]
    gateway = suite.start_gateway("--cloud", f"127.0.0.1:{port_a},127.0.0.1:{port_b}")
    connected_to(gateway, port_a, 1)
    summary = loadgen_summary(suite.start_fleet(DAY, "1-100"))
    assert summary["delivered"] == 100, summary

    try:
        a.collect(r"readings committed", rng.randint(5, 60), timeout=30)
    except DaemonError as e:
        raise DaemonError(f"{e}\nand the gateway{gateway.tail(40)}") from None
    a.kill()
    gateway.wait_for(rf"failing over from 127\.0\.0\.1:{port_a} to 127\.0\.0\.1:{port_b} \(node 2 of 2\): ", 20)
    connected_to(gateway, port_b, 2)
    # B's first batches since it connected: killed mid-forwarding too.
    b.collect(r"readings committed", rng.randint(5, 20), timeout=30)
    b.kill()
    gateway.wait_for(rf"failing over from 127\.0\.0\.1:{port_b} to 127\.0\.0\.1:{port_a} \(node 1 of 2\): ", 20)
    # Both down: the gateway goes round the list, the wait capped by
    # max_backoff (1 s in the suite).
    gateway.wait_for(
        rf"failing over from 127\.0\.0\.1:{port_a} to 127\.0\.0\.1:{port_b} \(node 2 of 2\): connection refused", 20
    )
    assert suite.count_stored() < 100 * 96, "B finished the day before it was killed: nothing was left to fail over"
    a = suite.start_cloud()  # A comes back, on its port
    nodes.append(a)
    connected_to(gateway, port_a, 1)

    suite.wait_stored(100 * 96, a)
    expected = suite.expected_rows(DAY)
    stored = suite.stored()
    assert len(stored) == len(expected) == 100 * 96
    assert stored == expected
    drained(suite, gateway)
    gateway.stop()
    stats = gateway_stats(gateway)
    assert stats["cloud_failovers"] >= 3 and stats["spool_depth"] == 0, stats
    # A node may have stored a batch and been killed before acknowledging
    # it: sent again to the other node, it is stored once (counted there as
    # duplicates) and printed by no console twice.
    lines = []
    for node in nodes:
        node.stop() if node.process.poll() is None else node.wait(5)
        lines += [m.group(0) for m in node.all_matching(CONSOLE_LINE)]
        committed = node.all_matching(r"readings committed \((\d+) new, (\d+) duplicate\)")
        print(f"{node.name}: {len(committed)} batches, {sum(int(m.group(1)) for m in committed)} new, "
              f"{sum(int(m.group(2)) for m in committed)} duplicate readings")
    assert len(lines) == len(set(lines))


def test_a_node_frozen_mid_forwarding_is_left_for_the_next_after_the_ack_timeout(make_suite, shared_database):
    """
    Node A is frozen (SIGSTOP) in the middle of forwarding: it stops
    acknowledging without closing anything.  The gateway gives its batch
    up after ack_timeout, fails over to B and finishes the day there while
    A stays frozen; every reading is stored once.  A is then thawed and
    nothing breaks.
    """
    suite = make_suite(100, 96, batch_readings=10, ack_timeout=2.0, stats_interval=1.0, postgres=shared_database)
    port_a, port_b = suite.cloud_port, free_port()
    a = suite.start_cloud()
    b = start_node(suite, "cloud B", port_b)
    gateway = suite.start_gateway("--cloud", f"127.0.0.1:{port_a},127.0.0.1:{port_b}")
    connected_to(gateway, port_a, 1)
    summary = loadgen_summary(suite.start_fleet(DAY, "1-100"))
    assert summary["delivered"] == 100, summary
    a.collect(r"readings committed", 20, timeout=30)
    a.process.send_signal(signal.SIGSTOP)
    try:
        gateway.wait_for(
            rf"failing over from 127\.0\.0\.1:{port_a} to 127\.0\.0\.1:{port_b} \(node 2 of 2\): batch \w+ not "
            r"acknowledged within 2 s \(\[gateway\] ack_timeout\)", 30
        )
        connected_to(gateway, port_b, 2)
        suite.wait_stored(100 * 96, b, timeout=90)
        assert suite.stored() == suite.expected_rows(DAY)
        drained(suite, gateway)
    finally:
        a.process.send_signal(signal.SIGCONT)
    # Thawed, A finds its connection gone; B's rows stand.
    assert a.process.poll() is None
    assert suite.stored() == suite.expected_rows(DAY)
    gateway.stop()
    stats = gateway_stats(gateway)
    # Frozen inside its transaction, A holds its batch's rows until the
    # server ends its session (10 s); B's insert of them waits as long, so
    # with this test's 2-s ack timeout the gateway may leave B meanwhile and
    # come back to it.
    assert stats["cloud_failovers"] >= 1 and stats["ack_timeouts"] >= 1 and stats["spool_depth"] == 0, stats
