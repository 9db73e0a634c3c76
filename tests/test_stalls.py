"""
No silent stall: a spool or database transaction that fails (a full disk, a
lock held by another process) leaves no state stuck, is logged with its
cause a bounded number of times, counted, and retried on a timer until it
succeeds; and late parts leave in a few batches.

The unit tests run the real Intake, Uplink, Spool and Database on a
task.Clock (the Database commits on the clock's turns) over a real SQLite
file, and make transactions fail for real: another connection holds the
write lock (BEGIN IMMEDIATE), as another process would.  The end-to-end
tests run the real daemons against a spool locked by another process and
against files on a small tmpfs that fills.
"""

from __future__ import annotations

import datetime
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.internet import task
from twisted.logger import Logger, formatEvent

from meter import wire
from meter.cloud import CloudStore, open_database
from meter.database import Database, connect
from meter.gateway import Intake, Uplink
from meter.reading import Reading
from meter.spool import Spool
from tests.harness import Suite

DAY = datetime.date(2026, 3, 1)
NOW = 1772400000.0
FLEET = {1: "192.168.1.2", 2: "192.168.1.3"}


def day_chunk(device_id=1, part=1, parts=1, n=0, minutes=1, day=DAY):
    ip = FLEET.get(device_id, f"192.168.2.{device_id}")
    # Minutes of their own for each part (up to 1440 readings a day).
    first = (part - 1) * minutes
    readings = tuple(
        Reading(device_id, ip, datetime.datetime(day.year, day.month, day.day, at // 60, at % 60), 20.0, 30.0)
        for at in range(first, first + minutes)
    )
    return wire.DayChunk(device_id, ip, day, f"{device_id:08x}{n:08x}", part, parts, int(NOW), readings)


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

    def abort(self) -> None:
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
        self.spool = Spool(self.database)
        self.events: list[dict] = []
        log = Logger(observer=self.events.append)
        self.delivered: list[int] = []
        ids = (f"{i:016x}" for i in range(1, 10**6))
        self.uplink = Uplink(
            self.spool, self.clock, batch_readings, 30.0, self.delivered.append, new_batch_id=lambda: next(ids),
            window=window, max_retry_delay=8.0, late_linger=late_linger,
        )
        self.uplink.log = log
        self.intake = Intake(
            fleet, self.spool, self.clock, deadline, self.uplink.kick, on_late=self.uplink.late_arrived,
            max_retry_delay=8.0,
        )
        self.intake.log = log
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
    assert g.receive(chunk) == wire.DayAck(chunk.xfer, 1, "busy", "spool write failed")
    assert g.intake.counters["spool_failures"] == 1
    assert g.intake.counters["transaction_failures"] == 1
    g.locker.release()
    assert g.receive(chunk).status == "ok"
    assert "spooling a chunk succeeded again after 1 failures over 0.0 s" in g.logged()


def test_a_failed_take_is_retried_with_backoff_until_it_succeeds(gw):
    g = gw(fleet={1: FLEET[1]})
    g.receive(day_chunk(1))  # the whole fleet: the round closes
    g.locker.lock()
    g.uplink.connected(g.sender)
    g.settle()
    assert g.uplink.counters["take_failures"] == 1
    assert g.sender.sent == []
    # Retried after 0.25 s, then twice as long each time, at most 8 s.
    for delay in (0.25, 0.5, 1, 2, 4, 8, 8):
        g.clock.advance(delay - 0.001)
        before = g.uplink.counters["take_failures"]
        g.clock.advance(0.001)
        assert g.uplink.counters["take_failures"] == before + 1
    assert g.uplink.counters["transaction_failures"] == 8
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


def test_an_acknowledged_batch_whose_removal_failed_keeps_its_slot_and_is_removed_later(gw):
    g = gw(fleet={1: FLEET[1]}, batch_readings=1)
    for part in (1, 2):
        assert g.receive(day_chunk(1, part=part, parts=2)).status == "ok"
    g.uplink.connected(g.sender)
    g.settle()
    (first,) = g.sender.sent
    g.locker.lock()
    g.ack(first)
    assert g.uplink.counters["remove_failures"] == 1
    assert g.delivered == []
    # Its readings are not taken again meanwhile, not even by a new connection.
    g.uplink.kick()
    g.uplink.disconnected(g.sender)
    g.sender = Sender()
    g.uplink.connected(g.sender)
    g.settle()
    assert g.sender.sent == []
    g.clock.advance(0.25)
    assert g.uplink.counters["remove_failures"] == 2
    g.locker.release()
    g.clock.advance(0.5)
    assert g.delivered == [1]
    (second,) = g.sender.sent
    assert second.readings == day_chunk(1, part=2, parts=2).readings
    g.ack(second)
    assert g.delivered == [1, 1]
    assert "removing a delivered batch from the spool succeeded again after 2 failures over 0.8 s" in g.logged()
    assert g.intake.counters["transaction_failures"] == 0
    assert g.uplink.counters["transaction_failures"] == 2


def test_a_round_whose_close_failed_is_closed_later_and_forwarded_only_then(gw):
    g = gw(deadline=60.0)
    g.uplink.connected(g.sender)
    assert g.receive(day_chunk(1)).status == "ok"
    g.locker.lock()
    g.clock.advance(60)
    assert g.intake.counters["close_failures"] == 1
    assert "round 2026-03-01 not closed in the spool, not forwarded yet: OperationalError: database is locked; " \
           "retry in 0.25 s" in g.logged()
    # Closed in memory (a late part counts as late) but not in the spool:
    # nothing leaves yet.
    g.locker.release()
    assert g.receive(day_chunk(2)).status == "ok"
    assert g.intake.counters["late_devices"] == 1
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
    assert g.intake.counters["close_failures"] == 1
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
            assert g.receive(day_chunk(1, part=1, parts=1, n=second * 50 + n)).status == "busy"
        g.clock.advance(1)
    assert g.intake.counters["spool_failures"] == 3000
    lines = [line for line in g.logged() if "chunk not spooled, answered busy" in line]
    # Three at once, then one every ten seconds.
    assert 3 <= len(lines) <= 10, len(lines)
    assert lines[-1].endswith("similar failures left out of the log)")
    assert lines[0] == "device 1: chunk not spooled, answered busy: OperationalError: database is locked"


# -- late data in few batches -------------------------------------------------


def late_day(g: Gateway, device_id: int, parts: int, every: float) -> None:
    """
    Device C{device_id}'s day in C{parts} parts of 4 readings, one every
    C{every} seconds, the cloud acknowledging each batch as it is sent.
    """
    for part in range(1, parts + 1):
        assert g.receive(day_chunk(device_id, part=part, parts=parts, minutes=4)).status == "ok"
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


def test_late_parts_trickling_wait_for_the_linger(gw):
    g = gw(fleet={1: FLEET[1], 2: FLEET[2]}, batch_readings=100, window=4, late_linger=1.0)
    g.uplink.connected(g.sender)
    g.receive(day_chunk(1))
    g.clock.advance(60)
    g.ack_all()
    late_day(g, 2, parts=30, every=0.1)
    # 120 readings over 3 s: a batch a second (the parts of a linger), not
    # a batch a part.
    assert [len(b.readings) for b in g.sender.sent[1:]] == [44, 44, 32]


def test_without_linger_each_late_part_goes_alone(gw):
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
    database = Database(connection, clock)
    printed: list[str] = []
    store = CloudStore(database, printed.append, clock)
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
    assert acks[0].reason == "not stored: database is locked"
    assert store.counters["store_failures"] == 100
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

    store = CloudStore(Database(connection, clock), console, clock)
    events: list[dict] = []
    store.log = Logger(observer=events.append)
    acks = []
    store.store(wire.Batch("0123456789abcdef", day_chunk(1).readings), "gateway").addCallback(acks.append)
    clock.advance(0)
    assert [ack.status for ack in acks] == ["ok"]
    assert store.counters["console_failures"] == 1
    assert any("stored, not printed on the console: OSError" in formatEvent(e) for e in events)
