"""
No silent stall: a spool or database transaction that fails (a full disk, a
lock held by another process) leaves no state stuck, is logged with its
cause a bounded number of times, counted, and retried on a timer until it
succeeds; and late chunks leave in a few batches.

The unit tests run the real Intake, Uplink, Spool and Database on a
task.Clock (the Database commits on the clock's turns) over a real SQLite
file, and make transactions fail for real: another connection holds the
write lock (BEGIN IMMEDIATE), as another process would.  The end-to-end
tests run the real daemons against a spool locked by another process and
against files on a small tmpfs that fills.
"""

from __future__ import annotations

import datetime
import functools
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.internet import task
from twisted.logger import Logger, formatEvent

from meter import testing, wire
from meter.cloud import CloudStore, SQLiteReadingStore, open_database
from meter.database import Database, connect
from meter.device import previous_day
from meter.gateway import Intake, Uplink
from meter.tools.processes import CONSOLE_LINE
from meter.reading import Reading
from meter.gateway.spool import Spool
from meter.tools.suite import Suite, loadgen_summary

DAY = datetime.date(2026, 3, 1)
NOW = 1772400000.0
FLEET = {1: "192.168.1.2", 2: "192.168.1.3"}


day_chunk = functools.partial(testing.day_chunk, day=DAY, sent_at=NOW, fleet=FLEET)


class Locker:
    """
    Another connection to the same file holding SQLite's write lock, as
    another process would.
    """

    def __init__(self, path: Path):
        self._connection = sqlite3.connect(str(path), isolation_level=None)

    def lock(self) -> None:
        self._connection.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self._connection.execute("ROLLBACK")


class Sender:
    """
    The cloud's side of the uplink: records batches, acknowledges on demand.
    """

    def __init__(self):
        self.sent: list[wire.Batch] = []
        self.aborted = 0

    def send(self, message) -> None:
        self.sent.append(message)

    def abort(self, cause=None) -> None:
        self.aborted += 1


class Gateway:
    """
    An Intake and an Uplink over a real spool, all on one task.Clock.
    """

    def __init__(
        self, path: Path, fleet=FLEET, deadline=60.0, batch_readings=100, window=1, late_linger=0.0, now=NOW
    ):
        self.clock = task.Clock()
        self.clock.advance(now)
        self.path = path
        connection, recovered = Spool.open(path)
        self.database = Database(connection, self.clock)
        self.spool = Spool(self.database, recovered.depth)
        self.events: list[dict] = []
        log = Logger(observer=self.events.append)
        self.delivered: list[int] = []
        ids = (f"{i:016x}" for i in range(1, 10**6))
        self.uplink = Uplink(
            self.spool, self.clock, batch_readings, 30.0, self.delivered.append, new_batch_id=lambda: next(ids),
            window=window, max_retry_delay=8.0, late_linger=late_linger, log=log,
        )
        self.intake = Intake(
            fleet, self.spool, self.clock, deadline, self.uplink.send_next, on_late=self.uplink.late_arrived,
            max_retry_delay=8.0, log=log,
        )
        self.intake.recover(recovered)
        self.sender = Sender()
        self.locker = Locker(path)

    def settle(self) -> None:
        """
        Run what is due now: the pending commits and what they start.
        """
        self.clock.advance(0)

    def receive(self, chunk) -> wire.DayAck:
        d = self.intake.chunk_received(chunk, f"{chunk.device_ip}:5000")
        self.settle()
        out = []
        d.addBoth(out.append)
        return out[0]

    def ack(self, batch: wire.Batch) -> None:
        self.uplink.ack_received(wire.BatchAck(batch.batch_id, "ok", new=len(batch.readings)))
        self.settle()

    def ack_all(self) -> None:
        """
        Acknowledge every batch sent and not yet acknowledged, and those
        that follows, until no more come.
        """
        done = 0
        while done < len(self.sender.sent):
            self.ack(self.sender.sent[done])
            done += 1

    def logged(self) -> list[str]:
        return [formatEvent(event) for event in self.events]

    def failures(self) -> list[str]:
        return [line for line in self.logged() if " not " in line and ("database is locked" in line)]

    def sent_readings(self) -> list[Reading]:
        return [reading for batch in self.sender.sent for reading in batch.readings]


@pytest.fixture
def gw(tmp_path):
    made = []

    def make(**kw) -> Gateway:
        gateway = Gateway(tmp_path / f"spool{len(made)}.sqlite", **kw)
        made.append(gateway)
        return gateway

    yield make
    for gateway in made:
        gateway.intake.stop()
        gateway.uplink.stop()


# -- a failed transaction never stops the pipeline ---------------------------


def test_the_connection_never_waits_for_a_lock(tmp_path):
    path = tmp_path / "x.sqlite"
    connection = connect(path)
    assert connection.execute("PRAGMA busy_timeout").fetchone() == (0,)
    locker = Locker(path)
    connection.execute("CREATE TABLE t (x)")
    locker.lock()
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        connection.execute("BEGIN IMMEDIATE")
    locker.release()


def test_a_locked_spool_answers_busy_at_once_and_takes_the_retry(gw):
    g = gw()
    g.locker.lock()
    chunk = day_chunk(1)
    assert g.receive(chunk) == wire.DayAck(chunk.xfer, 1, "busy", "spool: write failed")
    assert g.intake.metrics.spool_failures == 1
    assert g.intake.metrics.transaction_failures == 1
    g.locker.release()
    assert g.receive(chunk).status == "ok"
    assert "spooling a chunk succeeded again after 1 failures over 0.0 s" in g.logged()


def test_a_failed_take_is_retried_with_backoff_until_it_succeeds(gw):
    g = gw(fleet={1: FLEET[1]})
    g.receive(day_chunk(1))  # the whole fleet: the round closes
    g.locker.lock()
    g.uplink.connected(g.sender)
    g.settle()
    assert g.uplink.metrics.take_failures == 1
    assert g.sender.sent == []
    # Retried after 0.25 s, then twice as long each time, at most 8 s.
    for delay in (0.25, 0.5, 1, 2, 4, 8, 8):
        g.clock.advance(delay - 0.001)
        before = g.uplink.metrics.take_failures
        g.clock.advance(0.001)
        assert g.uplink.metrics.take_failures == before + 1
    assert g.uplink.metrics.transaction_failures == 8
    g.locker.release()
    g.clock.advance(8)
    assert [r.device_id for r in g.sent_readings()] == [1]
    g.ack_all()
    assert g.delivered == [1]
    logged = g.logged()
    assert "taking a batch from the spool succeeded again after 8 failures over 31.8 s" in logged
    # Three lines at once, then one every ten seconds: not one a failure.
    lines = [line for line in logged if line.startswith("no batch taken from the spool: OperationalError: database is locked")]
    assert 3 <= len(lines) <= 5, lines
    assert lines[0] == "no batch taken from the spool: OperationalError: database is locked; retry in 0.25 s"


def test_a_batch_the_cloud_refuses_for_good_is_set_aside_and_the_rest_go_on(gw):
    # A cloud of another release may refuse what this gateway spooled (a
    # value it no longer takes): sent again, it would be refused again and
    # block every batch behind it.
    g = gw(fleet={1: FLEET[1]}, batch_readings=1)
    for part in (1, 2):
        assert g.receive(day_chunk(1, part=part, parts=2)).status == "ok"
    g.uplink.connected(g.sender)
    g.settle()
    (first,) = g.sender.sent
    g.uplink.ack_received(wire.BatchAck(first.batch_id, "bad", "value: device address '::ffff:102:304' is IPv4-mapped"))
    g.settle()
    (_, second) = g.sender.sent
    assert second.readings == day_chunk(1, part=2, parts=2).readings
    g.ack(second)
    assert g.delivered == [1]  # the one set aside was not delivered...
    assert g.spool.depth == 0  # ...but neither counts in the depth
    assert (g.uplink.metrics.batches_set_aside, g.uplink.metrics.readings_set_aside) == (1, 1)
    with sqlite3.connect(g.path) as connection:
        assert connection.execute("SELECT count(*) FROM chunks").fetchone() == (0,)
        (kept,) = connection.execute("SELECT device_id, records, reason FROM refused").fetchall()
    assert kept == (1, "08:00,20,30", "value: device address '::ffff:102:304' is IPv4-mapped")
    assert g.uplink.metrics.batches_refused == 0
    assert any("refused batch 0000000000000001 for good" in line for line in g.logged())


def test_a_refusal_that_may_pass_is_retried_not_set_aside(gw):
    g = gw(fleet={1: FLEET[1]}, batch_readings=1)
    assert g.receive(day_chunk(1)).status == "ok"
    g.uplink.connected(g.sender)
    g.settle()
    for reason in ("store: not stored: disk I/O error", "version: version 1, this side speaks 2"):
        g.uplink.ack_received(wire.BatchAck(g.sender.sent[-1].batch_id, "bad", reason))
        g.clock.advance(30)
    assert len(g.sender.sent) == 3
    assert g.uplink.metrics.batches_set_aside == 0


def test_an_acknowledged_batch_whose_removal_failed_keeps_its_slot_and_is_removed_later(gw):
    g = gw(fleet={1: FLEET[1]}, batch_readings=1)
    for part in (1, 2):
        assert g.receive(day_chunk(1, part=part, parts=2)).status == "ok"
    g.uplink.connected(g.sender)
    g.settle()
    (first,) = g.sender.sent
    g.locker.lock()
    g.ack(first)
    assert g.uplink.metrics.remove_failures == 1
    assert g.delivered == []
    # Its readings are not taken again meanwhile, not even by a new connection.
    g.uplink.send_next()
    g.uplink.disconnected(g.sender)
    g.sender = Sender()
    g.uplink.connected(g.sender)
    g.settle()
    assert g.sender.sent == []
    g.clock.advance(0.25)
    assert g.uplink.metrics.remove_failures == 2
    g.locker.release()
    g.clock.advance(0.5)
    assert g.delivered == [1]
    (second,) = g.sender.sent
    assert second.readings == day_chunk(1, part=2, parts=2).readings
    g.ack(second)
    assert g.delivered == [1, 1]
    assert "removing a delivered batch from the spool succeeded again after 2 failures over 0.8 s" in g.logged()
    assert g.intake.metrics.transaction_failures == 0
    assert g.uplink.metrics.transaction_failures == 2


def test_work_failing_after_a_stop_is_not_retried(gw):
    g = gw(fleet={1: FLEET[1]})
    g.receive(day_chunk(1))
    g.uplink.connected(g.sender)
    g.settle()
    (batch,) = g.sender.sent
    g.locker.lock()
    g.uplink.ack_received(wire.BatchAck(batch.batch_id, "ok", new=1))
    g.uplink.stop()
    g.settle()
    assert g.uplink.metrics.remove_failures == 1
    assert g.clock.getDelayedCalls() == []


def test_a_round_whose_close_failed_is_closed_later_and_forwarded_only_then(gw):
    g = gw(deadline=60.0)
    g.uplink.connected(g.sender)
    assert g.receive(day_chunk(1)).status == "ok"
    g.locker.lock()
    g.clock.advance(60)
    assert g.intake.metrics.close_failures == 1
    assert "round 2026-03-01 not closed in the spool, or not all of its readings made ready: not forwarded yet: " \
           "OperationalError: database is locked; retry in 0.25 s" in g.logged()
    # Closed in memory (a late part counts as late) but not in the spool:
    # nothing leaves yet.
    g.locker.release()
    assert g.receive(day_chunk(2)).status == "ok"
    assert g.intake.metrics.late_devices == 1
    g.settle()
    assert g.sender.sent == []
    g.clock.advance(0.25)
    assert sorted(r.device_id for r in g.sent_readings()) == [1, 2]
    assert "closing a round succeeded again after 1 failures over 0.2 s" in g.logged()


def test_a_close_lost_to_a_stop_is_made_again_at_the_next_start(gw, tmp_path):
    g = gw(deadline=60.0)
    assert g.receive(day_chunk(1)).status == "ok"
    g.locker.lock()
    g.clock.advance(60)
    assert g.intake.metrics.close_failures == 1
    g.intake.stop()
    assert g.clock.getDelayedCalls() == []
    g.locker.release()
    # The same file, reopened: the round is open, its deadline long passed.
    restarted = Gateway(g.path, deadline=60.0, now=NOW + 120)
    try:
        restarted.uplink.connected(restarted.sender)
        restarted.settle()
        assert [r.device_id for r in restarted.sent_readings()] == [1]
    finally:
        restarted.intake.stop()
        restarted.uplink.stop()


def test_a_round_every_write_of_which_failed_is_closed_for_its_chunks_to_come(gw):
    # The day's only chunk so far was answered busy, so the spool holds no
    # round for it when its deadline closes it; the chunk spooled after
    # that must still be forwarded.
    g = gw(deadline=60.0)
    g.uplink.connected(g.sender)
    g.locker.lock()
    chunk = day_chunk(1)
    assert g.receive(chunk).status == "busy"
    g.locker.release()
    g.clock.advance(60)
    assert g.receive(chunk).status == "ok"
    assert [r.device_id for r in g.sent_readings()] == [1]


def test_a_failing_spool_logs_a_bounded_number_of_lines(gw):
    g = gw()
    g.locker.lock()
    for second in range(60):
        for n in range(50):
            assert g.receive(day_chunk(1, part=1, parts=1, xfer=second * 50 + n)).status == "busy"
        g.clock.advance(1)
    assert g.intake.metrics.spool_failures == 3000
    lines = [line for line in g.logged() if "chunk not spooled, answered busy" in line]
    # Three at once, then one every ten seconds.
    assert 3 <= len(lines) <= 10, len(lines)
    assert lines[-1].endswith("similar failures left out of the log)")
    assert lines[0] == "device 1: chunk not spooled, answered busy: OperationalError: database is locked"


# -- late data in few batches -------------------------------------------------


def late_day(g: Gateway, device_id: int, parts: int, every: float) -> None:
    """
    Device C{device_id}'s day in C{parts} chunks of 4 readings, one every
    C{every} seconds, the cloud acknowledging each batch as it is sent.
    """
    for part in range(1, parts + 1):
        assert g.receive(day_chunk(device_id, part=part, parts=parts, minutes=range(4 * part - 4, 4 * part))).status == "ok"
        g.ack_all()
        g.clock.advance(every)
    g.clock.advance(2)
    g.ack_all()


def test_a_late_day_leaves_in_few_batches(gw):
    g = gw(fleet={1: FLEET[1], 2: FLEET[2]}, batch_readings=100, window=4, late_linger=1.0)
    g.uplink.connected(g.sender)
    g.receive(day_chunk(1))
    g.clock.advance(60)  # the deadline: device 2 is late
    g.ack_all()
    assert len(g.sender.sent) == 1
    late_day(g, 2, parts=200, every=0.01)
    batches = g.sender.sent[1:]
    # 800 readings in 2 s: full batches, and what a linger's end found.
    assert [len(b.readings) for b in batches] == [100] * 4 + [4] + [100] * 3 + [96]
    assert sum(g.delivered) == 801


def test_late_chunks_trickling_wait_for_the_linger(gw):
    g = gw(fleet={1: FLEET[1], 2: FLEET[2]}, batch_readings=100, window=4, late_linger=1.0)
    g.uplink.connected(g.sender)
    g.receive(day_chunk(1))
    g.clock.advance(60)
    g.ack_all()
    late_day(g, 2, parts=30, every=0.1)
    # 120 readings over 3 s: a batch a second (the chunks of a linger), not
    # a batch a chunk.
    assert [len(b.readings) for b in g.sender.sent[1:]] == [44, 44, 32]


def test_without_linger_each_late_chunk_goes_alone(gw):
    g = gw(fleet={1: FLEET[1], 2: FLEET[2]}, batch_readings=100, window=4, late_linger=0.0)
    g.uplink.connected(g.sender)
    g.receive(day_chunk(1))
    g.clock.advance(60)
    g.ack_all()
    late_day(g, 2, parts=30, every=0.1)
    assert len(g.sender.sent[1:]) == 30


# -- the cloud's store ---------------------------------------------------------


def test_the_cloud_refuses_a_batch_it_could_not_store_and_logs_it_bounded(tmp_path):
    clock = task.Clock()
    path = tmp_path / "cloud.sqlite"
    connection = connect(path)
    open_database(connection)
    printed: list[str] = []
    store = CloudStore(SQLiteReadingStore(connection, clock), printed.append, clock)
    events: list[dict] = []
    store.log = Logger(observer=events.append)
    locker = Locker(path)
    locker.lock()
    acks = []
    batch = wire.Batch("0123456789abcdef", day_chunk(1).readings)
    for n in range(100):
        store.store(batch, "gateway").addCallback(acks.append)
        clock.advance(1)
    assert {ack.status for ack in acks} == {"bad"}
    assert acks[0].reason == "store: not stored: database is locked"
    assert store.metrics.store_failures == 100
    lines = [formatEvent(e) for e in events]
    assert 3 <= len(lines) <= 15, lines
    assert lines[0] == "batch 0123456789abcdef from gateway not stored, refused: OperationalError: database is locked"
    locker.release()
    store.store(batch, "gateway").addCallback(acks.append)
    clock.advance(0)
    assert acks[-1].status == "ok" and printed


def test_a_console_that_fails_does_not_keep_the_acknowledgement(tmp_path):
    clock = task.Clock()
    connection = connect(tmp_path / "cloud.sqlite")
    open_database(connection)

    def console(text: str) -> None:
        raise OSError(28, "No space left on device")

    store = CloudStore(SQLiteReadingStore(connection, clock), console, clock)
    events: list[dict] = []
    store.log = Logger(observer=events.append)
    acks = []
    store.store(wire.Batch("0123456789abcdef", day_chunk(1).readings), "gateway").addCallback(acks.append)
    clock.advance(0)
    assert [ack.status for ack in acks] == ["ok"]
    assert store.metrics.console_failures == 1
    assert any("stored, not printed on the console: OSError" in formatEvent(e) for e in events)


# -- the real daemons: a lock held by another process, a disk that fills ------

#: The day the fleets send (they are told which day), and a second one.
#: Days the gateway takes from a transfer sent now (it refuses a day far
#: from the chunk's send time): the day before yesterday, and yesterday.
E2E_NEXT = previous_day(time.time())
E2E_DAY = E2E_NEXT - datetime.timedelta(days=1)

#: Devices that keep retrying for a while: a busy answer keeps a chunk, and
#: a device that gives up sends its day again.
PATIENT = ("--ack-timeout", "0.2", "--max-retransmit", "4", "--attempts", "40", "--retry-after", "0.2",
           "--timeout", "150")

#: Another process holding the write lock of a SQLite file until told.
LOCK_HOLDER = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
connection.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
connection.execute("ROLLBACK")
"""


class LockHolder:
    def __init__(self, path: Path):
        self.process = subprocess.Popen(
            [sys.executable, "-c", LOCK_HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout.readline().strip() == "locked"

    def release(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("\n")
            self.process.stdin.flush()
        assert self.process.wait(30) == 0


@pytest.fixture
def small_disk(tmp_path):
    """
    Make a folder that is a tmpfs of a given size (unmounted at the end).
    """
    mounts = []

    def make(name: str, size: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
        mounts.append(folder)
        return folder

    yield make
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """
    Fill the file system of C{folder} to the last block; the filler file.
    """
    filler = folder / "filler"
    block = b"\0" * 4096
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for _ in range(1 << 20):  # 4 GiB, more than any disk of these tests
            os.write(fd, block)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def fleet_summary(fleet) -> dict:
    return loadgen_summary(fleet, 160)


def counters_of(gateway) -> dict[str, int]:
    """
    The counts in the gateway's last stats line (logfmt).
    """
    lines = gateway.all_matching(r"gateway stats: (.*)")
    if not lines:
        return {}
    line = lines[-1].group(1)
    print("gateway stats:", line)
    counters: dict[str, int] = {}
    for key, value in re.findall(r"(\w+)=(\d+)", line):
        counters[key] = int(value)
    return counters


def assert_stored(suite: Suite, days) -> None:
    expected = sorted(row for day in days for row in suite.expected_rows(day))
    assert suite.stored() == expected


@pytest.mark.e2e
def test_a_spool_locked_by_another_process(make_suite):
    """
    Another process holds the spool's write lock: a device is answered busy
    within its first timeout (not left to time out), the round's close, the
    taking of batches and the removal of delivered ones fail and are
    retried; once the lock goes, everything arrives exactly once, with no
    restart.
    """
    suite = make_suite(5, 96, deadline=3.0, batch_readings=100, device={"ack_timeout": 2.0, "max_retransmit": 0})
    gateway = suite.start_gateway()
    lock = LockHolder(suite.spool)
    try:
        # One transmission, no retransmission: the device learns the gateway
        # is busy only if it is answered within its first timeout.
        device = suite.start_device(1)
        assert device.wait(30) == 1, device.tail()
        assert device.all_matching(r"gateway busy \(spool: write failed\) for part \d/\d after 1 transmissions"), \
            device.tail()
        fleet = suite.start_fleet(E2E_DAY, "1-5", *PATIENT)
        gateway.wait_for(r"device \d: chunk not spooled, answered busy: OperationalError: database is locked", 20)
        # Closed in memory; its close in the spool fails (the lines about it
        # are rate-limited per step: the device's round of yesterday may
        # have had them).
        gateway.wait_for(rf"round {E2E_DAY} closed: deadline of 3 s passed", 20)
        gateway.seen_or_wait(r"round \S+ not closed in the spool, or not all of its readings made ready: "
                             r"not forwarded yet: .*database is locked")
        cloud = suite.start_cloud()
        gateway.wait_for(r"no batch taken from the spool: OperationalError: database is locked", 20)
    finally:
        lock.release()
    summary = fleet_summary(fleet)
    assert summary["delivered"] == 5 and summary["busy_answers"] > 0, summary
    suite.wait_stored(5 * 96, cloud)
    gateway.wait_for(r"closing a round succeeded again after \d+ failures", 20)

    # Delivered batches whose removal fails: the cloud is stopped while the
    # gateway sends, then acknowledges them while the spool is locked.
    os.kill(cloud.process.pid, signal.SIGSTOP)
    try:
        second = suite.start_fleet(E2E_NEXT, "1-5")
        assert fleet_summary(second)["delivered"] == 5
        gateway.wait_for(r"forwarding batch \w+ of \d+ readings", 20)
        lock = LockHolder(suite.spool)
    finally:
        os.kill(cloud.process.pid, signal.SIGCONT)
    try:
        gateway.wait_for(r"batch \w+, delivered, not removed from the spool: .*database is locked", 20)
    finally:
        lock.release()
    gateway.wait_for(r"removing a delivered batch from the spool succeeded again after \d+ failures", 20)
    suite.wait_stored(10 * 96, cloud)
    gateway.wait_for(r"readings delivered; 0 left in the spool", 30)
    gateway.stop()
    assert_stored(suite, (E2E_DAY, E2E_NEXT))
    counters = counters_of(gateway)
    for step in ("spool", "close", "take", "remove"):
        assert counters[f"{step}_failures"] > 0, counters
    failures = gateway.all_matching(r"database is locked")
    print(len(failures), "lines about the lock, for", counters["transaction_failures"], "failures")
    assert len(failures) < 40
    assert int(gateway.all_matching(r"transaction_failures=(\d+)")[-1].group(1)) == counters["transaction_failures"]


@pytest.mark.e2e
def test_the_gateways_spool_on_a_full_disk(small_disk, make_suite):
    """
    The spool's disk fills while devices send: they are answered busy and
    retry, the gateway logs a few lines about it (not one a datagram) and
    counts every failure; once room is freed every reading arrives exactly
    once, with no restart.
    """
    disk = small_disk("spool-disk", "4m")
    suite = make_suite(20, 96, spool=str(disk / "spool.sqlite"), deadline=30.0, stats_interval=1.0)
    cloud = suite.start_cloud()
    gateway = suite.start_gateway()
    gateway.wait_for("connected to the cloud")
    filler = fill(disk)
    fleet = suite.start_fleet(E2E_DAY, "1-20", *PATIENT)
    gateway.wait_for(r"chunk not spooled, answered busy: OperationalError: database or disk is full", 20)
    # Let the failures pile up: a few hundred busy answers.
    for _ in range(60):
        if counters_of(gateway).get("spool_failures", 0) >= 200:
            break
        gateway.wait_for(r"gateway stats: ", 5)
    filler.unlink()
    summary = fleet_summary(fleet)
    assert summary["delivered"] == 20 and summary["busy_answers"] > 0, summary
    suite.wait_stored(20 * 96, cloud)
    gateway.wait_for(r"readings delivered; 0 left in the spool", 30)
    gateway.stop()
    assert_stored(suite, (E2E_DAY,))
    counters = counters_of(gateway)
    lines = gateway.all_matching(r"disk is full")
    print(len(lines), "lines about the full disk, for", counters["spool_failures"], "failures")
    assert counters["spool_failures"] >= 200
    assert len(lines) < 20
    assert not gateway.all_matching(r"Traceback")


@pytest.mark.e2e
def test_the_clouds_database_on_a_full_disk(small_disk, make_suite):
    """
    The cloud's disk fills: it refuses each batch it cannot store, counts
    and logs a few lines about it; the gateway keeps the batches and sends
    them again, and once room is freed every reading is stored and printed
    exactly once, with no restart and no reconnection.
    """
    disk = small_disk("cloud-disk", "4m")
    suite = make_suite(20, 96, cloud={"db": str(disk / "cloud.sqlite")}, batch_readings=200)
    suite.db = disk / "cloud.sqlite"
    cloud = suite.start_cloud()
    gateway = suite.start_gateway()
    gateway.wait_for("connected to the cloud")
    filler = fill(disk)
    fleet = suite.start_fleet(E2E_DAY, "1-20")
    assert fleet_summary(fleet)["delivered"] == 20
    cloud.wait_for(r"not stored, refused: OperationalError: database or disk is full", 20)
    # The gateway sends them again (every 5 s) and they are refused again.
    gateway.collect(r"the cloud refused batch", 2, 20)
    cloud.wait_for(r"not stored, refused", 20)
    filler.unlink()
    suite.wait_stored(20 * 96, cloud)
    gateway.wait_for(r"readings delivered; 0 left in the spool", 30)
    gateway.stop()
    cloud.stop()
    assert_stored(suite, (E2E_DAY,))
    printed = [m.group(0) for m in cloud.all_matching(CONSOLE_LINE)]
    assert len(printed) == len(set(printed)) == 20 * 96
    assert cloud.all_matching(r"storing a batch succeeded again after \d+ failures")
    failures = int(cloud.all_matching(r"cloud stopped: .*\bstore_failures=(\d+)")[-1].group(1))
    lines = cloud.all_matching(r"disk is full")
    print(len(lines), "lines about the full disk, for", failures, "failures")
    assert failures >= 2 and len(lines) < 20
    assert not cloud.all_matching(r"Traceback")
    assert len(gateway.all_matching(r"connected to the cloud")) == 1


@pytest.mark.e2e
def test_a_late_day_is_forwarded_in_few_batches(make_suite):
    """
    A device reporting after its round closed: its day's chunks leave
    together once they stop coming (a linger of 1 s), not a batch a chunk.
    """
    suite = make_suite(4, 1440, deadline=2.0)
    cloud = suite.start_cloud()
    gateway = suite.start_gateway()
    gateway.wait_for("connected to the cloud")
    assert fleet_summary(suite.start_fleet(E2E_DAY, "1-3"))["delivered"] == 3
    gateway.wait_for(rf"round {E2E_DAY} closed: deadline of 2 s passed", 20)
    suite.wait_stored(3 * 1440, cloud)
    before = len(gateway.all_matching(r"forwarding batch"))
    summary = fleet_summary(suite.start_fleet(E2E_DAY, "4"))
    assert summary["delivered"] == 1 and summary["chunks"] >= 17, summary
    gateway.wait_for(rf"late device 4 \(\S+\) reported {E2E_DAY}", 20)
    suite.wait_stored(4 * 1440, cloud)
    gateway.wait_for(r"readings delivered; 0 left in the spool", 30)
    gateway.stop()
    assert_stored(suite, (E2E_DAY,))
    late = len(gateway.all_matching(r"forwarding batch")) - before
    print(f"{summary['chunks']} late parts in {late} batches")
    assert late <= 2
