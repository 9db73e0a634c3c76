"""
When a day's readings leave the gateway (C{[gateway] forward}): with
C{"round"} when the round closes, with C{"device"} as soon as each device's
transfer is complete.  The intake and the uplink wired as the gateway wires
them, on the memory spool and a Clock; the SQLite spool's cost of finding
ready chunks, and its upgrade; and the real plugins end to end.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import sqlite3
import time

import pytest
from twisted.internet import task
from twisted.logger import Logger, formatEvent

from meter import database, testing, wire
from meter.database import GATEWAY_SPOOL, Database, Schema
from meter.gateway import Intake, Uplink
from meter.gateway.spool import VERSIONS, Spool
from meter.testing import MemorySpool

DAY = datetime.date(2026, 3, 1)
NOW = 1772400000.0
FLEET = {1: "192.168.1.2", 2: "192.168.1.3", 3: "192.168.1.4", 4: "192.168.1.5"}

day_chunk = functools.partial(testing.day_chunk, day=DAY, sent_at=NOW, fleet=FLEET)


class FakeSender:
    def __init__(self):
        self.sent: list[wire.Batch] = []

    def send(self, message) -> None:
        self.sent.append(message)

    def abort(self, cause=None) -> None:
        raise AssertionError(f"aborted: {cause}")

    def devices(self) -> list[int]:
        return [r.device_id for batch in self.sent for r in batch.readings]


class Gateway:
    """
    An intake and an uplink over one spool, wired as meter.gateway.tap wires
    them, connected to a fake cloud; each step lets the spool commit.
    """

    def __init__(
        self, forward="device", spool=None, clock=None, batch_readings=100, late_linger=1.0, deadline=60.0, window=4,
    ):
        self.clock = clock or task.Clock()
        if clock is None:
            self.clock.advance(NOW)
        self.spool = spool if spool is not None else MemorySpool(self.clock)
        self.events: list[dict] = []
        log = Logger(observer=self.events.append)
        self.uplink = Uplink(
            self.spool, self.clock, batch_readings, 30.0, lambda count: None, window=window, late_linger=late_linger, log=log,
        )
        self.intake = Intake(
            FLEET, self.spool, self.clock, deadline, self.uplink.send_next, on_late=self.uplink.late_arrived,
            forward=forward, log=log, metrics=self.uplink.metrics,
        )
        self.cloud = FakeSender()
        self.uplink.connected(self.cloud)
        self.clock.advance(0)

    def send(self, chunk) -> None:
        d = self.intake.chunk_received(chunk, f"{chunk.device_ip}:5000")
        self.clock.advance(0)
        self.clock.advance(0)  # the devices made ready commit in the next turn
        assert d.result.status == "ok", d.result

    def report(self, *device_ids: int, minutes=(480,)) -> None:
        for device_id in device_ids:
            self.send(day_chunk(device_id, minutes=minutes))

    def ack_all(self) -> None:
        for batch in self.cloud.sent:
            if batch.batch_id in self.uplink._in_flight:
                self.uplink.ack_received(wire.BatchAck(batch.batch_id, "ok", "", new=len(batch.readings)))
        self.clock.advance(0)

    def round_open(self) -> bool:
        return self.spool.round(DAY).closed_at is None

    def logged(self) -> list[str]:
        return [formatEvent(event) for event in self.events]


def test_a_devices_day_leaves_after_the_linger_while_its_round_is_open():
    g = Gateway()
    g.report(1)
    assert g.cloud.sent == []  # a partial batch lingers for more
    g.clock.advance(1.0)
    assert g.cloud.devices() == [1]
    assert g.round_open()
    g.ack_all()
    assert g.spool.depth == 0


def test_full_batches_go_at_once():
    g = Gateway(batch_readings=2)
    g.report(1)
    assert g.cloud.sent == []
    g.report(2)
    assert g.cloud.devices() == [1, 2]
    g.report(3)
    assert g.cloud.devices() == [1, 2]
    g.clock.advance(1.0)
    assert g.cloud.devices() == [1, 2, 3]
    assert g.round_open()


def test_a_full_batch_sent_leaves_the_rest_lingering_without_taking_it():
    # What lingers is less than a batch: taking it would only drop it.
    g = Gateway(batch_readings=2)
    taken = g.spool.submitted["take_batch"]
    g.report(1, 2, 3)
    assert g.cloud.devices() == [1, 2]
    assert g.spool.submitted["take_batch"] == taken + 1
    g.clock.advance(1.0)
    assert g.cloud.devices() == [1, 2, 3]


def test_a_batch_no_further_chunk_fits_in_is_full_and_goes_at_once():
    # Days of 2 readings, batches of at most 3: a batch holds one day, and
    # it is full when the next day waits behind it, whatever the linger.
    g = Gateway(batch_readings=3, window=1)
    g.report(1, 2, 3, minutes=(480, 481))
    assert g.cloud.devices() == [1, 1]  # the window is full
    g.clock.advance(1.0)  # the linger ends, with days still waiting
    g.clock.advance(0.5)
    g.report(4, minutes=(480, 481))  # a new linger
    g.ack_all()
    assert g.cloud.devices() == [1, 1, 2, 2]
    g.ack_all()
    assert g.cloud.devices() == [1, 1, 2, 2, 3, 3]
    g.ack_all()
    # The last day alone is not full: it waits for the linger.
    assert g.cloud.devices() == [1, 1, 2, 2, 3, 3]
    g.clock.advance(1.0)
    assert g.cloud.devices() == [1, 1, 2, 2, 3, 3, 4, 4]


def test_the_round_still_closes_naming_the_missing_devices_and_sends_the_rest():
    g = Gateway()
    g.report(1)
    g.send(day_chunk(2, part=1, parts=2))  # an incomplete transfer waits for its round
    g.clock.advance(1.0)
    assert g.cloud.devices() == [1]
    g.ack_all()
    g.clock.advance(59.0)
    assert not g.round_open()
    assert any("devices that did not report: 2 (192.168.1.3), 3 (192.168.1.4), 4 (192.168.1.5)" in line
               for line in g.logged())
    assert g.cloud.devices() == [1, 2]
    assert g.intake.metrics.rounds_incomplete == 1


def test_with_forward_round_nothing_leaves_before_the_round_closes():
    g = Gateway(forward="round")
    g.report(1, 2, 3)
    g.clock.advance(30.0)
    assert g.cloud.sent == []
    assert g.spool.submitted["devices_ready"] == 0
    g.report(4)
    assert g.cloud.devices() == [1, 2, 3, 4]


def test_a_day_sent_again_in_a_new_transfer_leaves_again():
    # The cloud stores it once; the spool does not make readings unique.
    g = Gateway()
    g.report(1)
    g.clock.advance(1.0)
    g.ack_all()
    g.send(day_chunk(1, xfer=1))
    g.clock.advance(1.0)
    assert g.cloud.devices() == [1, 1]


def test_a_day_not_made_ready_leaves_with_its_round():
    g = Gateway()
    g.spool.fail_next("devices_ready")
    g.report(1)
    g.clock.advance(1.0)
    assert g.cloud.sent == []
    assert g.intake.metrics.ready_failures == 1
    assert any("a device's day not made ready in the spool: it leaves when its round closes" in line
               for line in g.logged())
    g.clock.advance(59.0)
    assert g.cloud.devices() == [1]


def restarted(before: Gateway) -> Gateway:
    """
    A gateway started on what C{before}'s spool committed, as after a crash.
    """
    before.intake.stop()
    before.uplink.stop()
    spool = before.spool.reopened()
    state = spool.recover()
    before.clock.advance(0)
    after = Gateway(spool=spool, clock=before.clock)
    after.intake.recover(state.result)
    after.clock.advance(0)
    return after


def send_large_round(g: Gateway) -> int:
    """
    Every device of the fleet reports its day in as many chunks as make
    the round one chunk a device larger than a slice of its close; the
    number of chunks.
    """
    from meter.gateway.rounds import CLOSE_CHUNKS

    parts = CLOSE_CHUNKS // len(FLEET) + 1
    for device_id in FLEET:
        for part in range(1, parts + 1):
            g.send(day_chunk(device_id, part=part, parts=parts))
    return parts * len(FLEET)


class SecondCloseFails(MemorySpool):
    """
    A memory spool whose second close of a round fails: the one that was
    to make the round's second slice ready.
    """

    closes = 0

    def close_round(self, day, now, most=None):
        self.closes += 1
        if self.closes == 2:
            self.fail_next("close_round")
        return super().close_round(day, now, most)


def gateway_failing_the_second_close() -> Gateway:
    clock = task.Clock()
    clock.advance(NOW)
    return Gateway(forward="round", spool=SecondCloseFails(clock), clock=clock, batch_readings=500)


def forward_all(g: Gateway) -> list[int]:
    """
    Acknowledge batches until nothing is left to send; the devices of the
    readings the cloud got.
    """
    for _ in range(100):
        if g.spool.depth == 0:
            break
        g.ack_all()
        g.clock.advance(1.0)
    return g.cloud.devices()


def test_a_round_larger_than_a_slice_is_made_ready_a_slice_a_transaction():
    g = Gateway(forward="round", batch_readings=500)
    chunks = send_large_round(g)
    assert not g.round_open()
    # The close made ready the first slice, and each slice asked for the
    # next in a transaction of its own, until one found nothing left.
    assert g.spool.submitted["close_round"] == 3
    devices = forward_all(g)
    assert len(devices) == chunks
    assert sorted(set(devices)) == sorted(FLEET)


def test_the_rest_of_a_closed_round_is_made_ready_after_a_failure_and_after_a_restart():
    g = gateway_failing_the_second_close()
    chunks = send_large_round(g)
    assert not g.round_open()
    assert any("round 2026-03-01 not closed in the spool, or not all of its readings made ready" in line
               for line in g.logged())
    # Retried on a timer, once the spool takes it.
    g.clock.advance(5.0)
    assert len(forward_all(g)) == chunks
    # A gateway stopped between two slices: the next start makes the rest
    # ready.
    again = gateway_failing_the_second_close()
    send_large_round(again)
    assert again.spool.contents.waiting({DAY.isoformat()})  # the second slice not made ready
    again = restarted(again)
    assert len(forward_all(again)) == chunks


def test_after_a_crash_complete_transfers_leave_and_incomplete_ones_wait():
    g = Gateway()
    # The gateway stops after device 1's day is committed and before the
    # spool took that it is ready.
    g.spool.fail_next("devices_ready")
    g.report(1)
    g.send(day_chunk(2, part=1, parts=2))
    again = restarted(g)
    again.clock.advance(1.0)
    assert again.cloud.devices() == [1]
    assert again.round_open()
    # The incomplete transfer resumes: its last chunk makes it ready.
    again.send(day_chunk(2, part=2, parts=2, minutes=(481,)))
    again.clock.advance(1.0)
    assert again.cloud.devices() == [1, 2, 2]


# -- the SQLite spool ---------------------------------------------------------


def spool_on(path, clock) -> tuple[Spool, Database]:
    connection, recovered = Spool.open(path)
    db = Database(connection, clock)
    return Spool(db, recovered.depth), db


def fill(spool: Spool, clock, chunks) -> None:
    for chunk in chunks:
        spool.add_chunk(chunk, NOW)
    clock.advance(0)


def steps(db: Database, d_of) -> int:
    """
    The SQLite virtual machine's steps one spool operation took: what grows
    with the rows a statement walks.
    """
    count = [0]

    def step():
        count[0] += 1
        return 0

    db._connection.set_progress_handler(step, 1)
    try:
        d = d_of()
        db._reactor.advance(0)
        assert d.called
    finally:
        db._connection.set_progress_handler(None, 1)
    return count[0]


def test_finding_ready_chunks_does_not_walk_the_waiting_ones(tmp_path):
    # Millions of readings may wait for their transfer or their round:
    # taking the next batch, and making one device's day ready, must not
    # cost more as they grow.
    clock = task.Clock()
    spool, db = spool_on(tmp_path / "spool.sqlite", clock)
    waiting = functools.partial(testing.day_chunk, day=DAY, sent_at=NOW, ip="10.0.0.1", parts=2)
    fill(spool, clock, [waiting(d) for d in range(100, 600)])
    fill(spool, clock, [day_chunk(1)])
    small = steps(db, lambda: spool.devices_ready([(1, DAY)])), steps(db, lambda: spool.take_batch(100))
    fill(spool, clock, [waiting(d) for d in range(1000, 6000)])
    fill(spool, clock, [day_chunk(2)])
    large = steps(db, lambda: spool.devices_ready([(2, DAY)])), steps(db, lambda: spool.take_batch(100))
    # Ten times the waiting chunks: the same work, give or take the depth
    # of an index.
    assert large[0] < small[0] * 1.5 and large[1] < small[1] * 1.5, (small, large)


def test_a_version_3_spool_is_upgraded_with_closed_rounds_ready_in_order(tmp_path):
    path = tmp_path / "spool.sqlite"
    database.prepare(path, Schema(GATEWAY_SPOOL, VERSIONS.steps[:3]))
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as connection:
        connection.execute("INSERT INTO rounds VALUES ('2026-03-01', 1.0, 2.0), ('2026-03-02', 3.0, NULL)")
        connection.executemany(
            "INSERT INTO chunks (seq, day, device_id, device_ip, records, n) VALUES (?, ?, ?, '192.168.1.2', ?, 1)",
            [(1, "2026-03-02", 1, "08:00,20,30"), (2, "2026-03-01", 1, "08:00,21,30"), (3, "2026-03-01", 2, "08:00,22,30")],
        )
        assert connection.execute("PRAGMA user_version").fetchone() == (3,)
    clock = task.Clock()
    spool, db = spool_on(path, clock)
    with contextlib.closing(sqlite3.connect(path)) as connection:
        assert connection.execute("PRAGMA user_version").fetchone() == (VERSIONS.version,)
    d = spool.take_batch(100)
    clock.advance(0)
    assert [(r.device_id, r.taken_at.day, r.temperature_c) for r in d.result.readings] == [(1, 1, 21.0), (2, 1, 22.0)]
    d = spool.devices_ready([(1, datetime.date(2026, 3, 2))])
    clock.advance(0)
    assert d.result == 1
    d = spool.take_batch(100, after=3)
    clock.advance(0)
    assert [(r.device_id, r.taken_at.day) for r in d.result.readings] == [(1, 2)]


# -- end to end ---------------------------------------------------------------


@pytest.mark.e2e
def test_with_forward_device_a_devices_day_reaches_the_cloud_before_its_round_closes(make_suite):
    suite = make_suite(2, deadline=600.0, forward="device", late_linger=0.2)
    cloud = suite.start_cloud()
    gateway = suite.start_gateway()
    gateway.wait_for("connected to the cloud")
    assert suite.start_device(1).wait(30) == 0
    day = datetime.date.fromtimestamp(time.time()) - datetime.timedelta(days=1)
    suite.wait_stored(4, cloud)
    assert suite.stored() == suite.expected_rows(day, [1])
    # Stored while device 2 has not reported: the round is open.
    assert gateway.all_matching(r"round \S+ (complete|closed)") == []
    assert suite.start_device(2).wait(30) == 0
    gateway.wait_for(r"round \S+ complete: every expected device reported")
    suite.wait_stored(8, cloud)
    assert suite.stored() == suite.expected_rows(day)
