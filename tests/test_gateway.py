"""
meter.gateway: the Intake's round logic (on the memory spool, committing on
the test's Clock, and on a real Spool for integration), the Uplink (a fake
sender and a Clock), the
GatewayProtocol on a FakeDatagramTransport and the CloudClientProtocol on a
StringTransport.
"""

from __future__ import annotations

import datetime
import errno
import functools
import gc
import random
import socket
import sqlite3
import sys

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import FakeDatagramTransport, StringTransport
from twisted.logger import Logger, capturedLogs, formatEvent
from twisted.python.failure import Failure

from meter import gateway, testing, wire
from meter.clocktext import utc_time
from meter.database import Database
from meter.gateway import Intake, Uplink
from meter.gateway.metrics import GatewayMetrics
from meter.gateway.protocol import size_receive_buffer
from meter.gateway.shedding import Shedding
from meter.reading import Reading
from meter.gateway.spool import Recovered, Spool, StoredChunk, StoredRound
from meter.testing import MemorySpool, device_keys

DAY = datetime.date(2026, 3, 1)
NOW = 1772400000.0
FLEET = {1: "192.168.1.2", 2: "192.168.1.3", 3: "192.168.1.4", 4: "192.168.1.5"}
KEYS = device_keys(range(1, 60))


def xfer_of(device_id: int, n: int = 0) -> str:
    return f"{device_id:08x}{n:08x}"


day_chunk = functools.partial(testing.day_chunk, day=DAY, sent_at=NOW, fleet=FLEET)


def result_of(d: Deferred):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


class IntakeHarness:
    def __init__(self, fleet=FLEET, deadline=60.0, spool=None, **kw):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.spool = spool if spool is not None else MemorySpool(self.clock)
        self.ready: list[float] = []
        self.events: list[dict] = []
        self.intake = Intake(
            fleet, self.spool, self.clock, deadline, lambda: self.ready.append(self.clock.seconds()),
            log=Logger(observer=self.events.append), **kw,
        )

    def receive(self, chunk, peer=None) -> wire.DayAck:
        """
        Hand C{chunk} to the intake and let the spool commit: the answer.
        """
        d = self.intake.chunk_received(chunk, peer or f"{chunk.device_ip}:5000")
        self.clock.advance(0)
        return result_of(d)

    def closed(self) -> list[tuple[datetime.date, float]]:
        """
        The rounds the spool holds closed, with when they closed.
        """
        return [(r.day, r.closed_at) for r in rounds_of(self.spool) if r.closed_at is not None]

    def added(self) -> int:
        """
        How many chunks the intake handed to the spool.
        """
        return self.spool.submitted["add_chunk"]

    def report(self, *device_ids, **kw) -> None:
        for device_id in device_ids:
            ack = self.receive(day_chunk(device_id, **kw))
            assert ack.status == "ok", ack

    def logged(self) -> list[str]:
        return [formatEvent(event) for event in self.events]


def rounds_of(spool: MemorySpool) -> list[StoredRound]:
    return [r for r in (spool.round(datetime.date.fromisoformat(day)) for day in sorted(spool.contents.rounds))]


def ok(chunk) -> wire.DayAck:
    return wire.DayAck(chunk.xfer, chunk.part, "ok")


# -- a round ----------------------------------------------------------------


def test_all_devices_reporting_closes_the_round():
    h = IntakeHarness()
    h.report(1, 2, 3)
    assert h.closed() == []
    assert h.ready == []
    h.clock.advance(10)
    h.report(4)
    assert h.closed() == [(DAY, NOW + 10)]
    assert h.ready == [NOW + 10]
    assert h.clock.getDelayedCalls() == []  # the deadline is cancelled
    assert h.intake.metrics.rounds_closed == 1
    assert h.intake.metrics.rounds_incomplete == 0
    assert "round 2026-03-01 complete: every expected device reported" in h.logged()
    assert h.spool.depth == 4


def test_every_chunk_makes_sure_its_round_is_spooled():
    h = IntakeHarness()
    h.report(1)
    assert h.spool.round(DAY) == StoredRound(DAY, NOW, None)
    h.clock.advance(60)
    assert h.closed() == [(DAY, NOW + 60)]
    # The spool lost the round (its first write failed, or it forgot the
    # round): a chunk of the day brings it back as the gateway knows it.
    del h.spool.contents.rounds[DAY.isoformat()]
    h.report(2)
    assert h.spool.round(DAY) == StoredRound(DAY, NOW + 60, NOW + 60)


def test_the_deadline_closes_the_round_naming_the_missing_devices():
    h = IntakeHarness()
    h.report(1)
    h.clock.advance(30)
    h.report(2)  # the deadline counts from the day's first report
    h.clock.advance(30 - 0.001)
    assert h.closed() == []
    h.clock.advance(0.001)
    assert h.closed() == [(DAY, NOW + 60)]
    assert h.ready == [NOW + 60]
    assert (
        "round 2026-03-01 closed: deadline of 60 s passed; devices that did not report: "
        "3 (192.168.1.4), 4 (192.168.1.5)"
    ) in h.logged()
    assert h.intake.metrics.rounds_incomplete == 1


def test_a_late_device_is_forwarded_at_once():
    h = IntakeHarness()
    h.report(1)
    h.clock.advance(60)
    assert len(h.ready) == 1
    closes = h.spool.submitted["close_round"]
    h.clock.advance(5)
    h.report(3)
    assert h.ready == [NOW + 60, NOW + 65]
    assert h.closed() == [(DAY, NOW + 60)]
    assert h.spool.submitted["close_round"] == closes  # not closed again
    assert h.intake.metrics.late_devices == 1


def test_a_device_reporting_twice_is_counted_once():
    h = IntakeHarness(fleet={1: FLEET[1], 2: FLEET[2]})
    h.report(1)
    h.report(1, xfer=1)  # the same day again, in a new transfer
    assert h.added() == 2
    assert h.closed() == []
    # The spool stores the day again (one row a chunk; it does not look
    # inside): the cloud, keyed by device and minute, stores it once.
    assert h.spool.depth == 2
    assert [line for line in h.logged() if " reported " in line] == ["device 1 (192.168.1.2:5000) reported 2026-03-01 in 1 chunks: 1 of 2 devices",
        "device 1 (192.168.1.2:5000) reported 2026-03-01 again in 1 chunks",
    ]
    h.report(2)
    assert h.closed() == [(DAY, NOW)]
    assert h.logged()[-2:] == [
        "device 2 (192.168.1.3:5000) reported 2026-03-01 in 1 chunks: 2 of 2 devices",
        "round 2026-03-01 complete: every expected device reported",
    ]


def test_a_fleet_reporting_at_once_logs_a_bounded_number_of_device_lines():
    # A line a device, until a fleet reports faster than the lines' rate: the
    # rest are counted into the next line that goes, and every device is
    # still counted in the round.
    from meter.gateway.rounds import REPORTED_LINES_BURST

    size = REPORTED_LINES_BURST + 50
    fleet = {d: f"10.0.{d >> 8}.{d & 255}" for d in range(1, size + 2)}
    h = IntakeHarness(fleet=fleet)
    h.report(*range(1, size + 1), fleet=fleet)
    lines = [line for line in h.logged() if " reported " in line]
    assert len(lines) == REPORTED_LINES_BURST
    assert lines[-1].endswith(f": {REPORTED_LINES_BURST} of {size + 1} devices")
    h.clock.advance(1.0)  # time for REPORTED_LINES_RATE more lines
    h.report(size + 1, fleet=fleet)
    assert h.logged()[-2:] == [
        f"device {size + 1} (10.0.{(size + 1) >> 8}.{(size + 1) & 255}:5000) reported 2026-03-01 in 1 chunks: "
        f"{size + 1} of {size + 1} devices (50 lines of devices reporting left out)",
        "round 2026-03-01 complete: every expected device reported",
    ]


def test_rounds_of_different_days_are_separate():
    h = IntakeHarness(fleet={1: FLEET[1], 2: FLEET[2]})
    other = DAY + datetime.timedelta(days=1)
    h.report(1)
    h.report(2, day=other, xfer=1)
    assert h.closed() == []
    h.report(2)
    assert h.closed() == [(DAY, NOW)]
    h.clock.advance(60)
    assert h.closed() == [(DAY, NOW), (other, NOW + 60)]


# -- duplicates -------------------------------------------------------------


def test_a_duplicate_is_acknowledged_again_without_spooling():
    h = IntakeHarness()
    chunk = day_chunk(1)
    assert h.receive(chunk) == ok(chunk)
    assert h.receive(chunk) == ok(chunk)
    assert h.added() == 1
    assert h.intake.metrics.duplicates == 1
    assert h.spool.depth == 1


def test_a_duplicate_during_the_commit_gets_the_same_answer_after_it():
    h = IntakeHarness()
    chunk = day_chunk(1)
    first = h.intake.chunk_received(chunk, "192.168.1.2:5000")
    second = h.intake.chunk_received(chunk, "192.168.1.2:5000")
    assert not first.called and not second.called
    assert h.added() == 1
    h.clock.advance(0)  # the commit
    assert result_of(first) == result_of(second) == ok(chunk)
    assert h.intake.metrics.duplicates == 1
    assert h.spool.depth == 1


def test_a_failed_spool_write_is_busy_and_the_retry_is_spooled():
    h = IntakeHarness()
    h.spool.fail_next("add_chunk")
    chunk = day_chunk(1)
    assert h.receive(chunk) == wire.DayAck(chunk.xfer, 1, "busy", "spool: write failed")
    assert h.intake.metrics.spool_failures == 1
    assert h.spool.depth == 0
    # the device retries: spooled this time
    assert h.receive(chunk) == ok(chunk)
    assert h.added() == 2


def test_a_fault_after_the_commit_still_answers_the_waiters_and_frees_what_the_chunk_held():
    # on_late is the uplink's (late_arrived): a fault there, after the
    # chunk is durable, must not strand the duplicates waiting for its
    # commit, nor keep the chunk counted as waiting for its commit (the
    # backstop) or its readings as coming (the spool's room).
    faults = [RuntimeError("the uplink failed")]

    def late(count):
        if faults:
            raise faults.pop()

    fleet = {1: FLEET[1], 2: FLEET[2], 3: FLEET[3]}
    h = IntakeHarness(fleet=fleet, on_late=late, spool_limit=3, max_committing=1)
    h.report(1)
    h.clock.advance(60)  # the round closes without devices 2 and 3
    chunk = day_chunk(2)
    first = h.intake.chunk_received(chunk, "192.168.1.3:5000")
    waiting = h.intake.chunk_received(chunk, "192.168.1.3:5000")
    h.clock.advance(0)  # the commit
    assert result_of(waiting) == ok(chunk)
    assert result_of(first).check(RuntimeError)  # the protocol counts and logs it
    assert not h.intake.admission.overloaded()
    # Room for one more reading: the spool holds 2 of 3.
    assert h.receive(day_chunk(3)) == ok(day_chunk(3))
    assert h.spool.depth == 3


def test_waiters_of_a_failed_commit_are_told_busy():
    h = IntakeHarness()
    h.spool.fail_next("add_chunk")
    chunk = day_chunk(1)
    first = h.intake.chunk_received(chunk, "p")
    second = h.intake.chunk_received(chunk, "p")
    h.clock.advance(0)
    busy = wire.DayAck(chunk.xfer, 1, "busy", "spool: write failed")
    assert result_of(first) == result_of(second) == busy


# -- refusals ---------------------------------------------------------------


def test_an_unknown_device_is_refused():
    h = IntakeHarness()
    chunk = day_chunk(9, ip="10.0.0.9")
    assert h.receive(chunk) == wire.DayAck(chunk.xfer, 1, "bad", "fleet: device 9 is not in this gateway's fleet")
    assert h.added() == 0
    assert h.clock.getDelayedCalls() == []  # no round opened
    assert h.intake.metrics.unknown_device == 1


def test_a_device_claiming_another_address_is_refused():
    h = IntakeHarness()
    chunk = day_chunk(1, ip="10.0.0.9")
    assert h.receive(chunk) == wire.DayAck(chunk.xfer, 1, "bad", "address: device 1 is 192.168.1.2, not 10.0.0.9")
    assert h.added() == 0
    assert h.intake.metrics.wrong_address == 1


def test_a_full_spool_says_busy_until_readings_are_delivered():
    h = IntakeHarness(spool_limit=5)
    four = tuple(Reading(1, FLEET[1], datetime.datetime(2026, 3, 1, hour, 0), 20, 30) for hour in range(4))
    assert h.receive(day_chunk(1, readings=four)).status == "ok"
    assert h.spool.depth == 4
    two = tuple(Reading(2, FLEET[2], datetime.datetime(2026, 3, 1, hour, 0), 20, 30) for hour in range(2))
    chunk = day_chunk(2, readings=two)
    # With a hint (meter.gateway.room): the shortest, as nothing was
    # measured leaving yet.
    assert h.receive(chunk) == wire.DayAck(
        chunk.xfer, 1, "busy", "spool_full: the spool is at its limit of 5 readings", 500
    )
    assert h.added() == 1
    assert h.intake.metrics.refused_spool_full == 1
    # The round is open, and its readings may leave all the same, to make room.
    assert not h.intake.rounds.rounds[DAY].closed
    assert h.ready == [NOW]  # the uplink is told
    assert h.intake.metrics.rounds_released == 1
    assert (
        "spool full: forwarding 4 readings it holds of the open rounds (2026-03-01) before they close, "
        "to make room" in h.logged()
    )
    d = h.spool.take_batch(100)
    h.clock.advance(0)
    batch = result_of(d)
    assert batch.count == 4
    h.spool.remove(batch.seqs)
    h.clock.advance(0)
    assert h.spool.depth == 0
    assert h.receive(chunk) == ok(chunk)


def test_a_full_spool_releases_the_open_rounds_once_a_second_and_retries_a_failure():
    h = IntakeHarness(spool_limit=2)
    h.report(1, 2)
    refused = day_chunk(3)
    h.spool.fail_next("days_ready")
    assert h.receive(refused).status == "busy"
    assert h.intake.metrics.ready_failures == 1
    assert any("the open rounds' readings not made ready in the spool" in line for line in h.logged())
    # Refused again within the second: no other transaction is asked for.
    assert h.receive(refused).status == "busy"
    assert h.spool.submitted["days_ready"] == 1
    h.clock.advance(1)
    assert h.receive(refused).status == "busy"
    assert h.spool.submitted["days_ready"] == 2
    assert h.intake.metrics.rounds_released == 1
    assert h.ready == [NOW + 1]
    # Nothing more to release: no line, and the round closes as it would.
    h.clock.advance(1)
    h.receive(refused)
    assert h.intake.metrics.rounds_released == 1
    h.clock.advance(58)
    assert h.closed() == [(DAY, NOW + 60)]


def test_without_hints_a_full_spool_answers_plain_busy():
    # [gateway] shed = false: no hint in any answer, for devices older than hints.
    h = IntakeHarness(spool_limit=1, max_hint=None)
    h.report(1)
    chunk = day_chunk(2)
    assert h.receive(chunk) == wire.DayAck(chunk.xfer, 1, "busy", "spool_full: the spool is at its limit of 1 readings")


def test_a_transfer_changing_its_shape_is_refused():
    h = IntakeHarness()
    h.receive(day_chunk(1, part=1, parts=2))
    chunk = day_chunk(1, part=2, parts=3)
    assert h.receive(chunk) == wire.DayAck(
        chunk.xfer, 2, "bad", f"transfer: transfer {chunk.xfer} was 2 chunks of 2026-03-01, now 3 chunks of 2026-03-01"
    )
    assert h.intake.metrics.inconsistent_chunks == 1


def test_check_source_refuses_a_chunk_from_another_address():
    h = IntakeHarness(check_source=True)
    chunk = day_chunk(1)
    assert h.receive(chunk, "10.0.0.9:5000") == wire.DayAck(
        chunk.xfer, 1, "bad", "source: device 1 sends from 192.168.1.2, not from 10.0.0.9"
    )
    assert h.receive(chunk, "::ffff:192.168.1.2:5000") == ok(chunk)  # IPv4-mapped is the same address
    assert h.intake.metrics.wrong_source == 1


def test_without_check_source_any_source_address_is_taken():
    h = IntakeHarness()
    chunk = day_chunk(1)
    assert h.receive(chunk, "10.0.0.9:5000") == ok(chunk)


@pytest.mark.parametrize("offset, status", [(-600, "ok"), (600, "ok"), (-601, "bad"), (601, "bad")])
def test_replay_window(offset, status):
    h = IntakeHarness(replay_window=600.0)
    chunk = day_chunk(1, sent_at=int(NOW) + offset)
    ack = h.receive(chunk)
    assert ack.status == status
    if status == "bad":
        assert ack.reason == (
            f"replay: the gateway's clock minus ts ({utc_time(int(NOW) + offset)}) is {-offset:+d} s "
            "(positive: the transfer started that long ago), outside the replay window of 600 s"
        )
        assert h.added() == 0


# -- multi-chunk transfers ---------------------------------------------------


def test_a_transfer_completes_only_when_every_chunk_arrived_in_any_order():
    h = IntakeHarness(fleet={1: FLEET[1]})
    for part in (3, 1):
        chunk = day_chunk(1, part=part, parts=3)
        assert h.receive(chunk) == ok(chunk)
        assert h.closed() == []
    assert h.receive(day_chunk(1, part=1, parts=3)).status == "ok"  # a duplicate does not complete it
    assert h.closed() == []
    h.receive(day_chunk(1, part=2, parts=3))
    assert h.closed() == [(DAY, NOW)]
    assert h.spool.depth == 3


def test_chunks_of_a_closed_round_are_forwarded_as_they_arrive():
    h = IntakeHarness(fleet={1: FLEET[1], 2: FLEET[2]})
    h.report(2)
    h.clock.advance(60)
    assert len(h.ready) == 1
    h.receive(day_chunk(1, part=1, parts=2))
    assert len(h.ready) == 2


def test_an_expired_reassembly_is_forgotten_and_its_chunks_still_recognised():
    h = IntakeHarness(fleet={1: FLEET[1], 2: FLEET[2]}, reassembly_timeout=30.0)
    chunk = day_chunk(1, part=1, parts=2)
    h.receive(chunk)
    assert h.intake.gauges()["reassemblies"] == 1
    h.clock.advance(30)
    assert h.intake.metrics.expired_reassemblies == 1
    assert h.intake.gauges()["reassemblies"] == 0
    # its message ids stay with the device's day: a duplicate, not spooled
    assert h.receive(chunk) == ok(chunk)
    assert h.added() == 1
    assert h.intake.metrics.duplicates == 1


def test_at_most_max_reassemblies_are_kept_oldest_expiring_first():
    h = IntakeHarness(max_reassemblies=1)
    first = day_chunk(1, part=1, parts=2)
    h.receive(first)
    h.receive(day_chunk(2, part=1, parts=2))
    assert h.intake.metrics.expired_reassemblies == 1
    assert h.intake.gauges()["reassemblies"] == 1
    # device 1's transfer was the one forgotten: its chunk, sent again, is
    # recognised by its message id
    assert h.receive(first) == ok(first)
    assert h.added() == 2


# -- a fleet of 50 ----------------------------------------------------------


def test_a_fleet_of_50_devices():
    fleet = {device_id: f"10.0.{device_id}.1" for device_id in range(1, 51)}
    h = IntakeHarness(fleet=fleet)
    order = list(fleet)
    random.Random(5).shuffle(order)
    for device_id in order[:-1]:
        assert h.receive(day_chunk(device_id, fleet=fleet)).status == "ok"
    assert h.closed() == []
    h.receive(day_chunk(order[-1], fleet=fleet))
    assert h.closed() == [(DAY, NOW)]
    assert h.ready == [NOW]
    assert h.spool.depth == 50
    assert h.intake.metrics.chunks == 50


# -- memory of old days -----------------------------------------------------


def test_closing_a_round_forgets_what_is_two_days_old_on_the_gateways_clock():
    h = IntakeHarness(fleet={1: FLEET[1]})
    old_chunk = day_chunk(1)
    h.receive(old_chunk)
    assert h.spool.submitted["forget_before"] == 1  # as the round closed
    assert h.intake.gauges()["message_ids"] == 1
    h.clock.advance(gateway.REMEMBER + 1)
    later = DAY + datetime.timedelta(days=2)
    h.report(1, xfer=1, day=later, sent_at=int(h.clock.seconds()))
    assert h.spool.submitted["forget_before"] == 2
    assert h.intake.gauges()["message_ids"] == 1
    assert h.intake.gauges()["device_days"] == 1
    # the old day's message id is forgotten, by the gateway and the spool
    # alike: a copy is stored again
    assert sorted(key[0:2] for key in h.spool.contents.parts) == [(1, xfer_of(1, 1))]
    h.receive(old_chunk)
    assert h.added() == 3
    assert h.spool.depth == 3


def test_forgetting_a_day_forgets_every_part_of_each_of_its_transfers():
    h = IntakeHarness(fleet={1: FLEET[1], 2: FLEET[2]})
    for part in (1, 2, 3):
        h.receive(day_chunk(1, part=part, parts=3))
    h.receive(day_chunk(1, xfer=1, part=2, parts=2))
    h.receive(day_chunk(2))
    assert h.intake.gauges()["message_ids"] == 5
    h.clock.advance(gateway.REMEMBER + 1)
    later = DAY + datetime.timedelta(days=2)
    h.report(1, 2, xfer=2, day=later, sent_at=int(h.clock.seconds()))
    assert h.intake.gauges()["message_ids"] == 2
    assert h.intake.gauges()["device_days"] == 2


def test_the_books_of_a_devices_day_are_not_scanned_by_full_garbage_collections():
    # One set of books a device: were they objects the cyclic collector
    # tracks, each of its full passes, which stall the reactor, would take
    # longer the larger the fleet (docs/performance.md).
    h = IntakeHarness()
    h.report(1)
    h.receive(day_chunk(2, part=1, parts=2))
    h.receive(day_chunk(2, xfer=1, part=1, parts=2))
    # A pass untracks a tuple whose items are untracked by then, a level of
    # tuples in tuples a pass: the two young generations' passes must untrack
    # the books before they reach the old generation, which only full passes
    # scan.
    gc.collect(0)
    gc.collect(1)
    books = [*h.intake.admission.days.values(), *h.intake.reassembly.transfers.values()]
    assert len(books) == 5
    assert [book for book in books if gc.is_tracked(book)] == []
    assert [key for key in h.intake.admission.acknowledged if gc.is_tracked(key)] == []


def work_to_take(h: IntakeHarness, chunks) -> int:
    """
    The lines of Python run and the functions called (C ones included) while
    the intake takes C{chunks} and commits them: a count of work, not a time.
    A loop counts a line each time round.
    """
    steps = 0

    def line(frame, event, arg):
        nonlocal steps
        steps += 1
        return line

    def call(frame, event, arg):
        nonlocal steps
        if event == "c_call":
            steps += 1

    sys.settrace(line)
    sys.setprofile(call)
    try:
        for chunk in chunks:
            h.receive(chunk)
    finally:
        sys.setprofile(None)
        sys.settrace(None)
    return steps


def test_a_devices_day_costs_the_same_work_in_a_fleet_of_any_size():
    # No step of a datagram's way may grow with the fleet (a scan of the
    # devices, of the round, of the transfers in reassembly): the chunks of
    # one device's day take as many steps after 400 devices as after 4,000.
    work = []
    for size in (400, 4000):
        fleet = {d: f"10.0.{d >> 8}.{d & 255}" for d in range(1, size + 3)}
        h = IntakeHarness(fleet=fleet, reassembly_timeout=600.0, max_reassemblies=10000)
        for device_id in range(1, size + 1):
            for part in (1, 2):
                h.receive(day_chunk(device_id, part=part, parts=2, fleet=fleet))
        chunks = [day_chunk(size + 1, part=part, parts=2, fleet=fleet) for part in (1, 2)]
        work.append(work_to_take(h, chunks))
        assert h.intake.metrics.chunks == 2 * size + 2
    assert work[0] == work[1]


def test_a_started_gateway_makes_full_collections_rare():
    # Each full pass scans the gateway's large dicts whole, stalling the
    # reactor: they come every FULL_COLLECTION_EVERY middle passes, not 10.
    before = gc.get_threshold()
    try:
        gateway.intake.settle_collector()
        assert gc.get_threshold() == (before[0], before[1], gateway.intake.FULL_COLLECTION_EVERY)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_stop_cancels_the_deadlines():
    h = IntakeHarness(reassembly_timeout=30.0)
    h.receive(day_chunk(1, part=1, parts=2))
    assert len(h.clock.getDelayedCalls()) == 2
    h.intake.stop()
    assert h.clock.getDelayedCalls() == []


def test_stats():
    h = IntakeHarness()
    h.report(1)
    h.receive(day_chunk(2, part=1, parts=2))
    gauges = h.intake.gauges()
    assert (gauges["spool_depth"], gauges["reassemblies"], gauges["message_ids"], h.intake.metrics.chunks) == (2, 1, 2, 2)


# -- recovery after a restart -----------------------------------------------


def recovered(rounds=(), chunks=(), depth=0) -> Recovered:
    return Recovered(tuple(rounds), tuple(chunks), depth)


def stored_chunk(device_id, day=DAY, received_at=NOW - 90, n=0, part=1, parts=1) -> StoredChunk:
    return StoredChunk(device_id, xfer_of(device_id, n), part, parts, day, received_at)


def test_recover_closes_a_round_whose_deadline_passed_while_down():
    h = IntakeHarness()
    h.intake.recover(recovered([StoredRound(DAY, NOW - 100, None)], [stored_chunk(1)], depth=1))
    assert h.ready == [NOW]  # the spool holds readings
    assert h.closed() == []
    h.clock.advance(0)
    assert h.closed() == [(DAY, NOW)]
    assert "devices that did not report: 2 (192.168.1.3), 3 (192.168.1.4), 4 (192.168.1.5)" in h.logged()[-1]


def test_recover_rearms_an_open_rounds_deadline():
    h = IntakeHarness()
    h.intake.recover(recovered([StoredRound(DAY, NOW - 10, None)], [stored_chunk(1, received_at=NOW - 10)], depth=1))
    h.clock.advance(50 - 0.001)
    assert h.closed() == []
    h.clock.advance(0.001)
    assert h.closed() == [(DAY, NOW + 50)]


def test_recover_closes_a_round_every_device_had_reported():
    h = IntakeHarness()
    h.intake.recover(recovered([StoredRound(DAY, NOW - 10, None)], [stored_chunk(d) for d in FLEET], depth=4))
    h.clock.advance(0)
    assert h.closed() == [(DAY, NOW)]
    assert h.clock.getDelayedCalls() == []


def test_recover_with_an_old_closed_round_still_spooled():
    # The cloud was down for days: an old closed round still holds readings
    # when the gateway restarts with a complete round not yet closed.
    old = DAY - datetime.timedelta(days=5)
    h = IntakeHarness(fleet={1: FLEET[1]})
    h.intake.recover(
        recovered(
            [StoredRound(old, NOW - 5 * 86400, NOW - 5 * 86400 + 60), StoredRound(DAY, NOW - 10, None)],
            [stored_chunk(1)],
            depth=2,
        )
    )
    h.clock.advance(0)
    assert h.closed() == [(DAY, NOW)]


def test_recover_leaves_closed_rounds_closed():
    h = IntakeHarness()
    h.intake.recover(recovered([StoredRound(DAY, NOW - 100, NOW - 40)], [stored_chunk(1)], depth=0))
    # What of the closed round is not ready yet is made ready (a stop may
    # have come between two slices of its close): nothing here.
    assert h.spool.submitted["close_round"] == 1
    h.clock.advance(0)
    assert h.clock.getDelayedCalls() == []  # no deadline
    assert h.ready == []  # nothing spooled, nothing to forward
    h.report(2)  # a late device of the closed round
    assert h.ready == [NOW]
    assert h.spool.submitted["close_round"] == 1  # it stays closed: no new deadline
    assert h.closed() == [(DAY, NOW - 40)]  # at its own time, as recovery closed it again
    assert h.clock.getDelayedCalls() == []


def test_devices_reporting_late_by_the_thousand_log_a_bounded_number_of_lines():
    from meter.gateway.rounds import REPORTED_LINES_BURST

    fleet = {device_id: f"10.0.{device_id // 250}.{device_id % 250 + 2}" for device_id in range(1, 401)}
    h = IntakeHarness(fleet=fleet)
    assert h.receive(testing.day_chunk(1, day=DAY, sent_at=NOW, fleet=fleet)).status == "ok"
    h.clock.advance(60)
    h.events.clear()
    for device_id in range(2, 401):
        assert h.receive(testing.day_chunk(device_id, day=DAY, sent_at=NOW, fleet=fleet)).status == "ok"
    late = [line for line in h.logged() if line.startswith("late device")]
    assert len(late) == REPORTED_LINES_BURST
    assert h.intake.metrics.late_devices == 399
    h.clock.advance(1)
    h.receive(testing.day_chunk(2, xfer=1, day=DAY, sent_at=NOW + 61, fleet=fleet))
    assert len([line for line in h.logged() if line.startswith("late device")]) == REPORTED_LINES_BURST + 1


def test_recover_remembers_acknowledged_message_ids():
    h = IntakeHarness()
    h.intake.recover(recovered([StoredRound(DAY, NOW - 10, None)], [stored_chunk(1)], depth=1))
    chunk = day_chunk(1)
    assert h.receive(chunk) == ok(chunk)
    assert h.added() == 0
    assert h.intake.metrics.duplicates == 1


def test_recover_resumes_a_partial_transfer():
    h = IntakeHarness(fleet={1: FLEET[1]})
    h.intake.recover(recovered([StoredRound(DAY, NOW - 10, None)], [stored_chunk(1, part=1, parts=2)], depth=1))
    assert h.closed() == []
    assert h.receive(day_chunk(1, part=2, parts=2)).status == "ok"
    assert h.closed() == [(DAY, NOW)]


# -- the uplink -------------------------------------------------------------


class FakeSender:
    def __init__(self):
        self.sent: list = []
        self.aborted = 0

    def send(self, message) -> None:
        self.sent.append(message)

    def abort(self, cause=None) -> None:
        self.aborted += 1


def spooled_chunk(seq: int) -> wire.DayChunk:
    """
    The chunk the uplink tests spool as number C{seq}: one reading of
    device 1, at minute C{seq} of the day.
    """
    return day_chunk(1, xfer=seq, readings=(Reading(1, FLEET[1], datetime.datetime(2026, 3, 1, 0, seq), 20.0, 30.0),))


class UplinkHarness:
    """
    An Uplink over a memory spool holding C{count} chunks of one reading
    each (sequence numbers 1 to C{count}) of a closed round; each step lets
    the spool commit.
    """

    def __init__(self, count=5, batch_readings=2, ack_timeout=30.0, retry_delay=5.0, window=1):
        self.clock = task.Clock()
        self.spool = MemorySpool(self.clock)
        self.all: dict[int, Reading] = {}
        self.fill(count)
        self.delivered: list[int] = []
        ids = (f"{i:016x}" for i in range(1, 1000))
        self.uplink = Uplink(
            self.spool, self.clock, batch_readings, ack_timeout, self.delivered.append, retry_delay, lambda: next(ids),
            window=window,
        )
        self.uplink.log = Logger(observer=lambda event: None)
        self.sender = FakeSender()

    def fill(self, count: int) -> None:
        for seq in range(len(self.all) + 1, len(self.all) + count + 1):
            chunk = spooled_chunk(seq)
            self.spool.add_chunk(chunk, 0.0, round_closed=True)
            self.all[seq] = chunk.readings[0]
        self.clock.advance(0)

    def readings(self, *seqs):
        return tuple(self.all[seq] for seq in seqs)

    def removed(self) -> list[int]:
        """
        The sequence numbers of the chunks gone from the spool.
        """
        return sorted(self.all.keys() - self.spool.contents.chunks.keys())

    def connect(self, sender) -> None:
        self.uplink.connected(sender)
        self.clock.advance(0)

    def send_next(self) -> None:
        self.uplink.send_next()
        self.clock.advance(0)

    def ack(self, batch, status="ok", reason=""):
        self.uplink.ack_received(wire.BatchAck(batch.batch_id, status, reason, new=len(batch.readings) if status == "ok" else 0))
        self.clock.advance(0)


def test_uplink_sends_one_batch_at_a_time():
    h = UplinkHarness()
    h.connect(h.sender)
    assert h.sender.sent == [wire.Batch(f"{1:016x}", h.readings(1, 2))]
    h.send_next()
    h.send_next()
    assert len(h.sender.sent) == 1
    assert h.spool.submitted["take_batch"] == 1


def test_uplink_removes_readings_only_after_the_ack():
    h = UplinkHarness()
    h.connect(h.sender)
    assert h.removed() == []
    h.ack(h.sender.sent[0])
    assert h.removed() == [1, 2]
    assert h.delivered == [2]
    assert h.sender.sent[1] == wire.Batch(f"{2:016x}", h.readings(3, 4))
    h.ack(h.sender.sent[1])
    assert h.sender.sent[2].readings == h.readings(5)
    h.ack(h.sender.sent[2])
    assert h.removed() == [1, 2, 3, 4, 5]
    assert h.delivered == [2, 2, 1]
    assert len(h.sender.sent) == 3  # the spool is empty
    assert h.uplink.metrics.batches_acknowledged == 3
    assert h.clock.getDelayedCalls() == []


def test_uplink_without_a_connection_sends_nothing():
    h = UplinkHarness()
    h.send_next()
    assert h.spool.submitted["take_batch"] == 0


def test_uplink_with_an_empty_spool_sends_when_told_later():
    h = UplinkHarness(count=0)
    h.connect(h.sender)
    assert h.sender.sent == []
    h.fill(1)
    h.send_next()
    assert [b.readings for b in h.sender.sent] == [h.readings(1)]


def test_an_unacknowledged_batch_aborts_the_connection():
    h = UplinkHarness(ack_timeout=30.0)
    h.connect(h.sender)
    h.clock.advance(29.999)
    assert h.sender.aborted == 0
    h.clock.advance(0.001)
    assert h.sender.aborted == 1
    assert h.uplink.metrics.ack_timeouts == 1
    assert h.removed() == []


def test_a_batch_lost_with_its_connection_is_sent_again_after_reconnecting():
    h = UplinkHarness()
    h.connect(h.sender)
    lost = h.sender.sent[0]
    h.uplink.disconnected(h.sender)
    assert h.clock.getDelayedCalls() == []  # its ack timer went with it
    assert h.uplink.metrics.batches_resent == 1
    again = FakeSender()
    h.connect(again)
    (batch,) = again.sent
    assert batch.readings == lost.readings
    assert batch.batch_id != lost.batch_id
    # an ack of the lost batch arriving late is stray
    h.ack(lost)
    assert h.removed() == []
    assert h.uplink.metrics.stray_acks == 1
    h.ack(batch)
    assert h.removed() == [1, 2]


def test_a_disconnect_after_the_ack_does_not_resend():
    h = UplinkHarness(count=2)
    h.connect(h.sender)
    h.spool.hold()
    h.ack(h.sender.sent[0])
    h.uplink.disconnected(h.sender)
    assert h.uplink.metrics.batches_resent == 0
    h.spool.release()  # the removal is committed
    assert h.delivered == [2]
    again = FakeSender()
    h.connect(again)
    assert again.sent == []


def test_refusals_of_a_whole_window_make_one_retry():
    # A cloud that cannot store refuses every batch in flight: one timer
    # retries them all, and stop leaves none behind.
    h = UplinkHarness(count=6, window=3)
    h.connect(h.sender)
    assert len(h.sender.sent) == 3
    for batch in list(h.sender.sent):
        h.ack(batch, "bad", "store: not stored: disk I/O error")
    assert len(h.clock.getDelayedCalls()) == 1
    h.clock.advance(5)
    assert len(h.sender.sent) == 6
    for batch in h.sender.sent[3:]:
        h.ack(batch, "bad", "store: not stored: disk I/O error")
    h.uplink.stop()
    assert [c for c in h.clock.getDelayedCalls() if c.active()] == []


def test_a_refused_batch_stays_spooled_and_is_retried_after_a_growing_delay():
    h = UplinkHarness(retry_delay=5.0)
    h.connect(h.sender)
    h.ack(h.sender.sent[0], "bad", "not stored: disk I/O error")
    assert h.removed() == []
    assert h.uplink.metrics.batches_refused == 1
    h.send_next()  # no retry before the delay
    h.clock.advance(4.999)
    assert len(h.sender.sent) == 1
    h.clock.advance(0.001)
    assert len(h.sender.sent) == 2
    assert h.sender.sent[1].readings == h.sender.sent[0].readings
    # a reconnection during the delay does not hurry it either
    # a second refusal waits twice as long; a reconnection meanwhile does
    # not hurry it
    h.ack(h.sender.sent[1], "bad", "again")
    other = FakeSender()
    h.uplink.disconnected(h.sender)
    h.connect(other)
    assert other.sent == []
    h.clock.advance(9.999)
    assert other.sent == []
    h.clock.advance(0.001)
    assert len(other.sent) == 1
    # an acknowledgement starts the delays again from the first
    h.ack(other.sent[0], "ok")
    h.ack(other.sent[1], "bad", "once more")
    h.clock.advance(5)
    assert len(other.sent) == 3


def test_a_stray_ack_is_ignored():
    h = UplinkHarness()
    h.connect(h.sender)
    h.uplink.ack_received(wire.BatchAck("ffffffffffffffff", "ok", new=2))
    assert h.removed() == []
    assert h.uplink.metrics.stray_acks == 1
    h.clock.advance(30)
    assert h.sender.aborted == 1  # still waiting for the real ack


def test_a_second_ack_of_the_same_batch_is_stray():
    h = UplinkHarness(count=2)
    h.connect(h.sender)
    h.spool.hold()
    h.ack(h.sender.sent[0])
    h.ack(h.sender.sent[0])
    h.spool.release()
    assert h.spool.submitted["remove"] == 1
    assert h.removed() == [1, 2]
    assert h.uplink.metrics.stray_acks == 1


def test_disconnect_of_an_old_connection_is_ignored():
    h = UplinkHarness()
    old = FakeSender()
    h.connect(old)
    h.uplink.disconnected(old)
    h.connect(h.sender)
    h.uplink.disconnected(old)
    assert h.uplink.metrics.batches_resent == 1
    h.ack(h.sender.sent[0])
    assert h.removed() == [1, 2]


def test_uplink_stop_cancels_its_timers():
    h = UplinkHarness()
    h.connect(h.sender)
    h.uplink.stop()
    assert h.clock.getDelayedCalls() == []
    h = UplinkHarness()
    h.connect(h.sender)
    h.ack(h.sender.sent[0], "bad", "x")
    h.uplink.stop()
    assert h.clock.getDelayedCalls() == []


# -- the devices' UDP protocol ----------------------------------------------

DEVICE_ADDR = ("192.168.1.2", 5000)


class ProtocolHarness:
    def __init__(self, **kw):
        self.intake = IntakeHarness()
        self.protocol = gateway.GatewayProtocol(self.intake.intake, KEYS, self.intake.clock, **kw)
        self.protocol.log = Logger(observer=lambda event: None)
        self.transport = FakeDatagramTransport()
        self.protocol.makeConnection(self.transport)

    def receive(self, data: bytes, addr=None) -> None:
        """
        Hand C{data} to the protocol and let the spool commit.
        """
        self.protocol.datagramReceived(data, addr or DEVICE_ADDR)
        self.intake.clock.advance(0)

    def answers(self, device_id=1):
        return [(wire.decode(wire.unseal(data, KEYS[device_id])), addr) for data, addr in self.transport.written]


def test_a_good_chunk_gets_an_ok_dayack_after_its_commit():
    h = ProtocolHarness()
    h.intake.spool.hold()
    chunk = day_chunk(1)
    h.receive(wire.seal(wire.encode(chunk), KEYS[1]), DEVICE_ADDR)
    assert h.transport.written == []
    h.intake.spool.release()  # the commit
    assert h.answers() == [(ok(chunk), DEVICE_ADDR)]


@pytest.mark.parametrize("log_datagrams", [False, True])
def test_each_datagram_is_logged_only_when_asked(log_datagrams):
    h = ProtocolHarness(log_datagrams=log_datagrams)
    events = []
    h.protocol.log = Logger(observer=events.append)
    chunk = day_chunk(1)
    datagram = wire.seal(wire.encode(chunk), KEYS[1])
    h.receive(datagram, DEVICE_ADDR)
    assert h.answers() == [(ok(chunk), DEVICE_ADDR)]
    expected = (
        f"received {len(datagram)} bytes from device 1 ({DEVICE_ADDR[0]}:{DEVICE_ADDR[1]}): part 1/1 of 2026-03-01, "
        "1 readings; sent ok to device 1 for part 1/1"
    )
    assert [formatEvent(event) for event in events] == ([expected] if log_datagrams else [])
    # the intake logs the device's day either way
    assert any(line.startswith("device 1 (") and " reported 2026-03-01 in 1 chunks" in line for line in h.intake.logged())


@pytest.mark.parametrize(
    "data, counter",
    [
        (b"hello", "dropped_no_tag"),
        (wire.encode(day_chunk(1)), "dropped_no_tag"),
        (wire.seal(wire.encode(day_chunk(1)), KEYS[2]), "dropped_bad_tag"),
        (wire.seal(b"garbage", KEYS[1]), "dropped_unknown_device"),
        (wire.seal(wire.encode(wire.Ping(1)), KEYS[1]), "dropped_unknown_device"),
        (wire.seal(wire.encode(day_chunk(99, ip="10.0.0.99")), bytes(32)), "dropped_unknown_device"),
    ],
    ids=["garbage", "unsealed", "wrong key", "sealed garbage", "ping", "no such device"],
)
def test_unauthenticated_datagrams_get_no_answer(data, counter):
    h = ProtocolHarness()
    h.receive(data, DEVICE_ADDR)
    assert h.transport.written == []
    assert h.intake.intake.metrics[counter] == 1
    assert h.intake.added() == 0


def test_a_bad_chunk_with_a_readable_id_gets_a_bad_dayack():
    h = ProtocolHarness()
    body = wire.encode(day_chunk(1, part=2, parts=3)).replace(b"08:01,20,30", b"08:01,86,30")
    h.receive(wire.seal(body, KEYS[1]), DEVICE_ADDR)
    assert h.answers() == [
        (wire.DayAck(xfer_of(1), 2, "bad", "range: temperature 86 outside -40..85 °C"), DEVICE_ADDR)
    ]
    assert h.intake.intake.metrics.decoder_refused["range"] == 1
    assert h.intake.added() == 0


def test_a_chunk_of_another_version_gets_a_sealed_bad_dayack_naming_the_version():
    # Not dropped as a stranger's: its tag verifies under the device's key,
    # so the device learns why its day is never taken.
    h = ProtocolHarness()
    body = wire.encode(day_chunk(1)).replace(b"meter/1 ", b"meter/2 ", 1)
    h.receive(wire.seal(body, KEYS[1]), DEVICE_ADDR)
    assert h.answers() == [(wire.DayAck(xfer_of(1), 1, "bad", "version: version '2', this side speaks 1"), DEVICE_ADDR)]
    assert h.intake.intake.metrics.decoder_refused["version"] == 1
    assert h.intake.added() == 0


def test_a_refused_chunk_gets_a_sealed_bad_dayack():
    h = ProtocolHarness()
    chunk = day_chunk(1, ip="10.0.0.9")
    h.receive(wire.seal(wire.encode(chunk), KEYS[1]), DEVICE_ADDR)
    assert h.answers() == [(wire.DayAck(chunk.xfer, 1, "bad", "address: device 1 is 192.168.1.2, not 10.0.0.9"), DEVICE_ADDR)]


def test_a_flooding_source_is_cut_off_and_others_still_served():
    h = ProtocolHarness(source_rate=1.0, source_burst=2.0)
    datagrams = [wire.seal(wire.encode(day_chunk(1, xfer=n)), KEYS[1]) for n in range(3)]
    for data in datagrams:
        h.receive(data, DEVICE_ADDR)
    assert len(h.transport.written) == 2
    assert h.intake.intake.metrics.dropped_flood == 1
    h.receive(wire.seal(wire.encode(day_chunk(2)), KEYS[2]), ("192.168.1.3", 5000))
    assert len(h.transport.written) == 3
    h.intake.clock.advance(1)  # a token back
    h.receive(datagrams[2], DEVICE_ADDR)
    assert len(h.transport.written) == 4


# -- the cloud connection ---------------------------------------------------

HEARTBEAT = 15.0


class ClientHarness:
    def __init__(self, count=0):
        self.uplink = UplinkHarness(count=count)
        self.clock = self.uplink.clock
        self.protocol = gateway.CloudClientFactory(self.uplink.uplink, self.clock, HEARTBEAT).buildProtocol(None)
        self.protocol.log = Logger(observer=lambda event: None)
        self.transport = StringTransport()
        self.no_delay: list[bool] = []
        self.transport.setTcpNoDelay = self.no_delay.append
        self.protocol.makeConnection(self.transport)
        # The link is up once the cloud answered its first ping.
        assert self.lines() == [wire.Ping(1)]
        self.transport.clear()
        self.protocol.dataReceived(wire.encode(wire.Pong(1)) + b"\n")
        self.clock.advance(0)  # the first batch is taken from the spool

    def lines(self):
        return [wire.decode(line) for line in self.transport.value().splitlines()]


def test_the_client_turns_nagle_off_on_its_connection():
    # Else each batch's last segment waits for the cloud's delayed ACK
    # (wire.without_nagle).
    assert ClientHarness().no_delay == [True]


def test_the_client_sends_batches_as_lines():
    h = ClientHarness(count=2)
    assert h.transport.value() == wire.encode(wire.Batch(f"{1:016x}", h.uplink.readings(1, 2))) + b"\n"


def test_the_client_hands_acks_to_the_uplink():
    h = ClientHarness(count=2)
    h.protocol.dataReceived(wire.encode(wire.BatchAck(f"{1:016x}", "ok", new=2)) + b"\n")
    h.clock.advance(0)
    assert h.uplink.removed() == [1, 2]


def test_the_client_pings_after_a_silence():
    h = ClientHarness()
    h.clock.advance(HEARTBEAT - 0.001)
    assert h.transport.value() == b""
    h.clock.advance(0.001)
    assert h.transport.value() == b"meter/1 PING seq=1\n"
    h.protocol.dataReceived(b"meter/1 PONG seq=1\n")
    h.clock.advance(HEARTBEAT)
    assert h.lines() == [wire.Ping(1), wire.Ping(1)]
    assert not h.transport.disconnected


def test_the_client_aborts_when_a_ping_is_unanswered():
    h = ClientHarness()
    h.clock.advance(HEARTBEAT)
    assert h.lines() == [wire.Ping(1)]
    h.clock.advance(HEARTBEAT - 0.001)
    assert not h.transport.disconnected
    h.clock.advance(0.001)
    assert h.transport.disconnected
    assert h.uplink.uplink.metrics.heartbeat_failures == 1


def test_any_line_from_the_cloud_postpones_the_ping():
    h = ClientHarness()
    h.clock.advance(HEARTBEAT - 1)
    h.protocol.dataReceived(b"meter/1 PONG seq=7\n")
    h.clock.advance(HEARTBEAT - 1)
    assert h.transport.value() == b""


def test_garbage_from_the_cloud_is_counted_not_fatal():
    h = ClientHarness()
    h.protocol.dataReceived(b"nonsense\n")
    assert h.uplink.uplink.metrics.refused_from_cloud == 1
    assert not h.transport.disconnected


def test_an_overlong_line_from_the_cloud_aborts():
    h = ClientHarness()
    h.protocol.dataReceived(b"x" * (h.protocol.MAX_LENGTH + 1))
    assert h.transport.disconnected


def test_connection_lost_stops_the_heartbeat_and_tells_the_uplink():
    h = ClientHarness(count=2)
    h.protocol.connectionLost(Failure(ConnectionDone()))
    assert h.clock.getDelayedCalls() == []  # neither the heartbeat nor the ack timer
    assert h.uplink.uplink.metrics.batches_resent == 1


# -- with a real spool ------------------------------------------------------


class RealSpool:
    def __init__(self, path):
        self.path = path
        connection, self.recovered = Spool.open(path)
        self.database = Database(connection, reactor)
        self.spool = Spool(self.database, self.recovered.depth)
        self.stopped = False

    async def stop(self):
        self.stopped = True
        await self.database.stop()


@pytest_twisted.async_yield_fixture
async def real(tmp_path):
    spool = RealSpool(tmp_path / "spool.sqlite")
    yield spool
    if not spool.stopped:
        await spool.stop()


@pytest_twisted.ensureDeferred
async def test_intake_on_a_real_spool_forwards_a_complete_round(real):
    h = IntakeHarness(spool=real.spool)
    acks = [await h.intake.chunk_received(day_chunk(d), "p") for d in FLEET]
    assert [a.status for a in acks] == ["ok"] * 4
    await real.database.flush()
    assert h.ready == [NOW]
    batch = await real.spool.take_batch(100)
    assert list(batch.readings) == [day_chunk(d).readings[0] for d in FLEET]

    uplink = UplinkHarness()
    uplink.uplink = Uplink(real.spool, uplink.clock, 100, 30.0, uplink.delivered.append)
    uplink.uplink.log = Logger(observer=lambda event: None)
    uplink.uplink.connected(uplink.sender)
    await real.database.flush()
    (sent,) = uplink.sender.sent
    assert len(sent.readings) == 4
    uplink.ack(sent)
    await real.database.flush()
    assert uplink.delivered == [4]
    assert (await real.spool.take_batch(100)).count == 0


@pytest_twisted.ensureDeferred
async def test_an_open_round_is_not_forwarded(real):
    h = IntakeHarness(spool=real.spool)
    await h.intake.chunk_received(day_chunk(1), "p")
    assert (await real.spool.take_batch(100)).count == 0


@pytest_twisted.ensureDeferred
async def test_a_restart_resumes_from_the_spool(real, tmp_path):
    first = IntakeHarness(spool=real.spool)
    for device_id in (1, 2):
        await first.intake.chunk_received(day_chunk(device_id), "p")
    first.intake.stop()
    await real.stop()

    again = RealSpool(tmp_path / "spool.sqlite")
    try:
        state = again.recovered
        assert state.depth == 2
        assert [(r.day, r.closed_at) for r in state.rounds] == [(DAY, None)]
        assert sorted(p.device_id for p in state.chunks) == [1, 2]
        h = IntakeHarness(spool=again.spool)
        h.clock.advance(61)  # the deadline passed while the gateway was down
        h.intake.recover(state)
        assert h.spool.depth == 2
        # a duplicate of a chunk acknowledged before the restart
        assert await h.intake.chunk_received(day_chunk(1), "p") == ok(day_chunk(1))
        assert h.intake.metrics.duplicates == 1
        h.clock.advance(0)
        await again.database.flush()
        assert [r.device_id for r in (await again.spool.take_batch(100)).readings] == [1, 2]
    finally:
        await again.stop()


@pytest_twisted.ensureDeferred
async def test_a_failed_first_write_does_not_lose_the_days_round(real):
    # The first chunk of a day opens its round in memory and in the spool;
    # if that write fails the device retries, and its day must still be
    # forwarded once the round closes.
    h = IntakeHarness(fleet={1: FLEET[1]}, spool=real.spool)
    chunk = day_chunk(1)
    # Another process holds the write lock, and the spool waits for none:
    # the first write fails.
    lock = sqlite3.connect(str(real.path), isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        assert (await h.intake.chunk_received(chunk, "p")).status == "busy"
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert (await h.intake.chunk_received(chunk, "p")).status == "ok"
    await real.database.flush()
    assert h.ready == [NOW]
    assert list((await real.spool.take_batch(100)).readings) == list(chunk.readings)


# -- the spool itself -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_spool_takes_a_burst_of_chunks_together_and_still_tells_old_ones(real):
    first = day_chunk(1)
    assert await real.spool.add_chunk(first, NOW) == 1
    # A burst committed together, with a chunk spooled before among new ones
    # (and the same new chunk twice): each learns what it added.
    blocker = real.database.run(lambda connection: None)
    burst = [day_chunk(2), first, day_chunk(3, xfer=1), day_chunk(2)]
    answers = [real.spool.add_chunk(chunk, NOW + 1) for chunk in burst]
    await blocker
    assert [await d for d in answers] == [1, 0, 1, 0]
    await real.spool.close_round(DAY, NOW + 2)
    taken = await real.spool.take_batch(100)
    assert sorted((r.device_id, r.taken_at) for r in taken.readings) == sorted(
        (r.device_id, r.taken_at) for chunk in (first, day_chunk(2), day_chunk(3, xfer=1)) for r in chunk.readings
    )


def test_a_spool_of_one_row_a_reading_is_moved_into_chunks(tmp_path):
    path = tmp_path / "spool.sqlite"
    old = sqlite3.connect(str(path))
    old.executescript(
        """
        CREATE TABLE readings (
            seq INTEGER PRIMARY KEY, day TEXT NOT NULL, device_id INTEGER NOT NULL, device_ip TEXT NOT NULL,
            taken_at TEXT NOT NULL, temperature_c REAL NOT NULL, humidity_pct REAL NOT NULL,
            UNIQUE (device_id, taken_at)
        );
        CREATE TABLE rounds (day TEXT PRIMARY KEY, opened_at REAL NOT NULL, closed_at REAL);
        """
    )
    old.executemany(
        "INSERT INTO readings (day, device_id, device_ip, taken_at, temperature_c, humidity_pct) VALUES (?, ?, ?, ?, ?, ?)",
        [
            ("2026-03-01", 1, FLEET[1], "2026-03-01T08:00", 20.5, 30.0),
            ("2026-03-01", 2, FLEET[2], "2026-03-01T08:00", -3.25, 100.0),
            ("2026-03-01", 1, FLEET[1], "2026-03-01T08:15", 21.0, 31.5),
        ],
    )
    old.execute("INSERT INTO rounds VALUES ('2026-03-01', 1.0, 2.0)")
    old.commit()
    old.close()
    connection, state = Spool.open(path)
    try:
        assert state.depth == 3
        assert [(r.day, r.closed_at) for r in state.rounds] == [(DAY, 2.0)]
        assert connection.execute("SELECT day, device_id, device_ip, records, n FROM chunks ORDER BY seq").fetchall() == [
            ("2026-03-01", 1, FLEET[1], "08:00,20.5,30;08:15,21,31.5", 2),
            ("2026-03-01", 2, FLEET[2], "08:00,-3.25,100", 1),
        ]
        assert connection.execute("SELECT name FROM sqlite_master WHERE name = 'readings'").fetchall() == []
    finally:
        connection.close()
    # opened again: nothing to move, nothing lost
    connection, state = Spool.open(path)
    connection.close()
    assert state.depth == 3


def test_a_retransmission_of_a_stored_chunk_is_acknowledged_without_decoding(monkeypatch):
    h = ProtocolHarness()
    chunk = day_chunk(1)
    datagram = wire.seal(wire.encode(chunk), KEYS[1])
    h.receive(datagram, DEVICE_ADDR)

    def no_decode(*args, **kwargs):
        raise AssertionError("a stored chunk was decoded again")

    monkeypatch.setattr(wire, "decode", no_decode)
    h.receive(datagram, DEVICE_ADDR)
    monkeypatch.undo()
    assert h.answers() == [(ok(chunk), DEVICE_ADDR), (ok(chunk), DEVICE_ADDR)]
    assert h.intake.added() == 1
    assert h.intake.intake.metrics.duplicates == 1


def test_a_stored_chunk_replayed_after_the_window_is_not_acknowledged_again():
    h = ProtocolHarness()
    h.intake = IntakeHarness(replay_window=600.0)
    h.protocol = gateway.GatewayProtocol(h.intake.intake, KEYS, h.intake.clock)
    h.protocol.makeConnection(h.transport)
    chunk = day_chunk(1)
    datagram = wire.seal(wire.encode(chunk), KEYS[1])
    h.receive(datagram, DEVICE_ADDR)
    h.intake.clock.advance(601)
    h.receive(datagram, DEVICE_ADDR)
    (first, _), (second, _) = h.answers()
    assert first == ok(chunk)
    assert second.status == "bad" and "replay window" in second.reason
    assert h.intake.intake.metrics.duplicates == 0


def test_an_overloaded_gateway_answers_busy_before_decoding():
    h = ProtocolHarness()
    h.intake = IntakeHarness(max_committing=2)
    h.intake.spool.hold()
    h.protocol = gateway.GatewayProtocol(h.intake.intake, KEYS, h.intake.clock)
    h.protocol.makeConnection(h.transport)
    chunks = [day_chunk(1, part=part, parts=3) for part in (1, 2, 3)]
    for chunk in chunks:
        h.receive(wire.seal(wire.encode(chunk), KEYS[1]), DEVICE_ADDR)
    # With the shortest retry-after hint: nothing was shed, the calendar is empty.
    assert h.answers() == [
        (wire.DayAck(chunks[2].xfer, 3, "busy", "overloaded: too many chunks wait for the spool", 500), DEVICE_ADDR)
    ]
    assert h.intake.added() == 2
    assert h.intake.intake.metrics.refused_overloaded == 1
    h.intake.spool.release()
    assert [answer for answer, _ in h.answers()[1:]] == [ok(chunks[0]), ok(chunks[1])]


# -- shedding load ------------------------------------------------------------------


class SheddingHarness(ProtocolHarness):
    """
    A gateway protocol handed datagrams with the time each waited in the
    kernel's queue, as a L{meter.stamps.StampedPort} hands them.
    """

    def waited(self, seconds: float, data: bytes, addr=DEVICE_ADDR) -> None:
        self.protocol.arrived = self.intake.clock.seconds() - seconds
        try:
            self.receive(data, addr)
        finally:
            self.protocol.arrived = None

    def send(self, chunk, waited: float = 0.0) -> None:
        self.waited(waited, wire.seal(wire.encode(chunk), KEYS[chunk.device_id]), (FLEET[chunk.device_id], 5000))

    def stand(self, seconds: float, waited: float = 0.150) -> None:
        """
        A queue standing for C{seconds}: datagrams (without a tag, dropped
        unanswered) each having waited C{waited}.
        """
        for _ in range(round(seconds / 0.005)):
            self.intake.clock.advance(0.005)
            self.waited(waited, b"noise", ("10.0.0.1", 5000))

    def answers_to(self, device_id: int) -> list[wire.DayAck]:
        return [
            wire.decode(wire.unseal(data, KEYS[device_id]))
            for data, addr in self.transport.written
            if addr[0] == FLEET[device_id]
        ]

    def answer(self, device_id: int) -> wire.DayAck:
        return self.answers_to(device_id)[-1]

    def ticks(self) -> list:
        return [call for call in self.intake.clock.getDelayedCalls() if "LoopingCall" in repr(call)]


def test_a_standing_queue_answers_a_new_transfer_busy_with_a_hint_before_decoding():
    h = SheddingHarness()
    h.stand(0.2)
    assert h.protocol.shedding.shedding
    h.send(day_chunk(2, part=1, parts=2), waited=0.150)
    ack = h.answer(2)
    assert (ack.status, ack.reason) == ("busy", "shed: the gateway takes no new transfer now")
    assert ack.retry_after_ms >= 500
    assert h.intake.added() == 0
    assert h.intake.intake.metrics.shed == 1
    assert h.intake.intake.metrics.decoder_refused == {}


def test_a_transfer_under_way_goes_on_while_new_ones_are_shed():
    h = SheddingHarness()
    first, second = day_chunk(1, part=1, parts=2), day_chunk(1, part=2, parts=2)
    h.send(first)
    assert h.answer(1) == ok(first)
    h.stand(0.2)
    h.send(second, waited=0.150)
    assert h.answer(1) == ok(second)
    h.send(day_chunk(2, part=1, parts=2), waited=0.150)
    assert h.answer(2).status == "busy"
    assert h.intake.added() == 2


def test_a_transfer_whose_first_chunk_is_still_committing_goes_on():
    h = SheddingHarness()
    h.intake.spool.hold()
    first, second = day_chunk(1, part=1, parts=2), day_chunk(1, part=2, parts=2)
    h.stand(0.05)  # the queue stands, but not for an interval yet
    h.send(first, waited=0.150)
    h.stand(0.1)
    assert h.protocol.shedding.shedding
    h.send(second, waited=0.150)
    h.intake.spool.release()
    assert [ack for ack, _ in h.answers()] == [ok(first), ok(second)]


def test_a_device_sent_away_is_let_in_when_it_comes_back_at_its_slot():
    h = SheddingHarness()
    h.stand(0.2)
    first = day_chunk(2, part=1, parts=2)
    h.send(first, waited=0.150)
    hint = h.answer(2).retry_after_ms / 1000
    h.stand(hint)
    assert h.protocol.shedding.shedding
    h.send(first, waited=0.150)
    h.send(day_chunk(2, part=2, parts=2), waited=0.150)
    assert [ack.status for ack in h.answers_to(2)] == ["busy", "ok", "ok"]
    assert h.intake.intake.metrics.shed_returned == 1


def test_a_short_queue_stops_the_shedding():
    h = SheddingHarness()
    h.stand(0.2)
    h.stand(0.005, waited=0.001)
    chunk = day_chunk(2)
    h.send(chunk, waited=0.001)
    assert h.answer(2) == ok(chunk)


def test_a_gateway_that_does_not_shed_answers_as_before():
    h = SheddingHarness(shedding=Shedding(GatewayMetrics(), enabled=False))
    h.stand(1.0)
    chunk = day_chunk(2)
    h.send(chunk, waited=0.150)
    assert h.answer(2) == ok(chunk)


def test_retransmissions_of_stored_chunks_are_acknowledged_while_shedding():
    h = SheddingHarness()
    chunk = day_chunk(2)
    h.send(chunk)
    h.stand(0.2)
    h.send(chunk, waited=0.150)
    assert h.answers_to(2) == [ok(chunk), ok(chunk)]


def test_shedding_follows_the_time_between_datagrams_only_while_alert():
    h = SheddingHarness()
    h.send(day_chunk(2))
    assert h.ticks() == []
    h.stand(0.2)
    assert len(h.ticks()) == 1
    h.intake.clock.advance(2)  # no datagram: the queue is empty
    assert not h.protocol.shedding.shedding
    for _ in range(10):
        h.intake.clock.advance(1)
    assert h.ticks() == []
    assert h.protocol.shedding.alert is False


def test_uplink_keeps_up_to_its_window_of_batches_in_flight():
    h = UplinkHarness(count=7, window=2)
    h.connect(h.sender)
    first, second = h.sender.sent
    assert (first.readings, second.readings) == (h.readings(1, 2), h.readings(3, 4))
    # An acknowledgement out of order frees its place: the next batch
    # starts after the newest in flight.
    h.ack(second)
    third = h.sender.sent[2]
    assert third.readings == h.readings(5, 6)
    assert h.removed() == [3, 4]
    h.ack(first)
    h.ack(third)
    fourth = h.sender.sent[3]
    assert fourth.readings == h.readings(7)
    h.ack(fourth)
    assert sorted(h.delivered) == [1, 2, 2, 2]
    assert h.spool.depth == 0


def test_uplink_resends_every_unacknowledged_batch_of_its_window_after_a_reconnect():
    h = UplinkHarness(count=6, window=3)
    h.connect(h.sender)
    first, second, third = h.sender.sent
    h.ack(second)
    h.uplink.disconnected(h.sender)
    assert h.uplink.metrics.batches_resent == 2
    again = FakeSender()
    h.connect(again)
    assert [b.readings for b in again.sent] == [h.readings(1, 2), h.readings(5, 6)]
    assert all(b.batch_id not in {first.batch_id, third.batch_id} for b in again.sent)


def test_uplink_looks_again_from_the_start_when_its_window_drained_during_an_empty_fetch():
    h = UplinkHarness(count=4, window=2)
    h.connect(h.sender)
    first, second = h.sender.sent
    h.spool.hold()
    h.ack(second)
    # The second is removed, and its removal starts a fetch after the
    # first, still in flight: the fetch waits for the next commit.
    h.spool.release()
    h.uplink.disconnected(h.sender)  # the first is to be sent again
    again = FakeSender()
    h.uplink.connected(again)  # a fetch is under way: no second one
    h.clock.advance(0)  # the fetch finds nothing after the first...
    # ...so the uplink looks again from the start, and the first batch's
    # readings are sent again instead of staying in the spool.
    assert [b.readings for b in again.sent] == [h.readings(1, 2)]


# -- the receive buffer ---------------------------------------------------------


class CappedSocket:
    """
    A socket as Linux treats an unprivileged process's: C{SO_RCVBUFFORCE}
    refused, C{SO_RCVBUF} capped at C{cap} and reported doubled.
    """

    def __init__(self, cap: int):
        self.cap = cap
        self.size = 0

    def setsockopt(self, level, option, value):
        if option == socket.SO_RCVBUF:
            self.size = 2 * min(value, self.cap)
        else:
            raise PermissionError(1, "Operation not permitted")

    def getsockopt(self, level, option):
        assert option == socket.SO_RCVBUF
        return self.size


def may_force_receive_buffers() -> bool:
    """
    Whether this process may go past net.core.rmem_max (CAP_NET_ADMIN in
    the initial user namespace: root outside a container that drops it).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.setsockopt(socket.SOL_SOCKET, 33, 1 << 20)  # SO_RCVBUFFORCE
        except PermissionError:
            return False
    return True


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's receive buffers")


@linux_only
def test_the_receive_buffer_is_forced_beyond_the_kernels_cap_where_permitted():
    if not may_force_receive_buffers():
        pytest.skip("this process may not go past net.core.rmem_max (no CAP_NET_ADMIN)")
    cap = int(open("/proc/sys/net/core/rmem_max").read())
    wanted = min(2 * cap, 256 << 20)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert size_receive_buffer(sock, wanted) == wanted


@linux_only
def test_without_the_capability_the_receive_buffer_is_capped_and_the_size_granted_is_told():
    assert size_receive_buffer(CappedSocket(4 << 20), 16 << 20) == 4 << 20
    assert size_receive_buffer(CappedSocket(4 << 20), 1 << 20) == 1 << 20


class SocketTransport(FakeDatagramTransport):
    def __init__(self, sock):
        super().__init__()
        self.socket = sock


@linux_only
def test_the_gateway_warns_when_it_got_a_smaller_receive_buffer_than_it_asked():
    h = IntakeHarness()

    def started(receive_buffer: int, cap: int) -> list[dict]:
        events: list[dict] = []
        protocol = gateway.GatewayProtocol(h.intake, KEYS, h.clock, receive_buffer=receive_buffer)
        protocol.log = Logger(observer=events.append)
        protocol.makeConnection(SocketTransport(CappedSocket(cap)))
        return events

    [capped] = started(16 << 20, 208 << 10)
    assert capped["log_level"].name == "warn"
    assert formatEvent(capped).startswith(
        "receive buffer 0.203125 MiB, not the 16 MiB of [gateway] receive_buffer_mb: the kernel caps it at "
        "net.core.rmem_max"
    )
    [sized] = started(1 << 20, 4 << 20)
    assert sized["log_level"].name == "info" and formatEvent(sized) == "receive buffer 1 MiB"
    assert sized["receive_buffer"] == 1 << 20


class FailingWrites(FakeDatagramTransport):
    """
    A UDP port whose next C{failing} writes raise, as a real one does when
    the kernel has no buffer for the datagram (ENOBUFS).
    """

    def __init__(self, failing: int):
        super().__init__()
        self.failing = failing

    def write(self, packet, addr=None):
        if self.failing:
            self.failing -= 1
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return super().write(packet, addr)


def test_a_chunk_whose_answer_fails_is_counted_logged_and_answered_when_the_device_sends_it_again():
    h = ProtocolHarness()
    h.protocol.log = Logger()
    h.protocol.transport = h.transport = FailingWrites(failing=2)
    first, second = day_chunk(1), day_chunk(2)
    with capturedLogs() as events:
        h.receive(wire.seal(wire.encode(first), KEYS[1]), DEVICE_ADDR)
        h.receive(wire.seal(wire.encode(second), KEYS[2]), ("192.168.1.3", 5000))
    assert h.intake.intake.metrics.answer_failures == 2
    assert h.transport.written == []
    # The traceback of the fault once, then a line without it.
    traced, line = [e for e in events if "not answered" in formatEvent(e)]
    assert formatEvent(traced) == "device 1 (192.168.1.2:5000): chunk 1/1 not answered; the device sends it again"
    assert traced["log_failure"].check(OSError)
    assert formatEvent(line) == (
        f"device 2 (192.168.1.3:5000): chunk 1/1 not answered: OSError: [Errno {errno.ENOBUFS}] No buffer space "
        "available; the device sends it again"
    )
    # Stored all the same: the retransmission is answered ok, and not stored twice.
    h.receive(wire.seal(wire.encode(first), KEYS[1]), DEVICE_ADDR)
    assert h.answers() == [(ok(first), DEVICE_ADDR)]
    assert h.intake.added() == 2
