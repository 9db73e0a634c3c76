"""
One body of tests of the gateway's spool (L{meter.gateway.interfaces.ISpool})
run over every implementation: the SQLite L{meter.gateway.spool.Spool} and
L{meter.testing.MemorySpool}.  What passes here is what the other tests may
rely on when they use the memory spool.

Both commit on a L{task.Clock}: an operation's Deferred fires only once the
clock turns (L{Backend.commit}).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import sqlite3

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from meter import wire
from meter.database import Database
from meter.gateway.interfaces import ISpool
from meter.gateway.spool import Spool, StoredRound, chunk_digest, content_digest
from meter.testing import MemorySpool, day_chunk

DAY = datetime.date(2026, 3, 1)
NOW = 1772400000.0
IPS = {1: "192.168.1.2", 2: "192.168.1.3", 3: "192.168.1.4"}


chunk = functools.partial(day_chunk, day=DAY, sent_at=NOW, fleet=IPS, minutes=(480,))


class Backend:
    """
    One implementation under test: its spool on a clock, a way to commit,
    to restart on what it committed, and to make its next commit fail.
    """

    spool: object

    def __init__(self):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self._failing = False

    def commit(self, d: Deferred):
        """
        Turn the clock so the spool commits; C{d}'s result (a Failure if it
        failed).
        """
        self._turn()
        out = []

        def keep(result):
            out.append(result)
            return None if isinstance(result, Failure) else result

        d.addBoth(keep)
        assert out, "not committed after a turn of the clock"
        return out[0]

    def fail_next_commit(self, operation: str) -> None:
        raise NotImplementedError

    def reopen(self) -> None:
        """
        Restart on what is committed (work not committed is lost).
        """
        raise NotImplementedError

    def set_aside_rows(self) -> list[tuple]:
        """
        What was set aside, in order: (seq, device_id, records, reason).
        """
        raise NotImplementedError

    def _turn(self) -> None:
        self.clock.advance(0)


class MemoryBackend(Backend):
    def __init__(self, tmp_path):
        super().__init__()
        self.spool = MemorySpool(self.clock)

    def fail_next_commit(self, operation: str) -> None:
        self.spool.fail_next(operation)

    def reopen(self) -> None:
        self.spool = self.spool.reopened()

    def set_aside_rows(self) -> list[tuple]:
        return [(row[0], row[2], row[4], row[6]) for row in self.spool.contents.refused]


class SQLiteBackend(Backend):
    def __init__(self, tmp_path):
        super().__init__()
        self._path = tmp_path / "spool.sqlite"
        self._open()

    def _open(self) -> None:
        self._connection, recovered = Spool.open(self._path)
        self.spool = Spool(Database(self._connection, self.clock), recovered.depth)

    def set_aside_rows(self) -> list[tuple]:
        with contextlib.closing(sqlite3.connect(self._path)) as connection:
            return connection.execute("SELECT seq, device_id, records, reason FROM refused ORDER BY id").fetchall()

    def fail_next_commit(self, operation: str) -> None:
        # A real failure: another connection holds the write lock, and the
        # spool waits for no lock.
        self._failing = True

    def _turn(self) -> None:
        if not self._failing:
            self.clock.advance(0)
            return
        self._failing = False
        lock = sqlite3.connect(str(self._path), isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        try:
            self.clock.advance(0)
        finally:
            lock.execute("ROLLBACK")
            lock.close()

    def reopen(self) -> None:
        self._connection.close()
        self._open()


@pytest.fixture(params=[MemoryBackend, SQLiteBackend], ids=["memory", "sqlite"])
def backend(request, tmp_path) -> Backend:
    return request.param(tmp_path)


def recovered(backend: Backend):
    return backend.commit(backend.spool.recover())


def take(backend: Backend, limit=100, after=0):
    return backend.commit(backend.spool.take_batch(limit, after))


def test_it_provides_the_interface(backend):
    assert verifyObject(ISpool, backend.spool)


def test_a_chunk_tells_how_many_readings_were_new_after_its_commit(backend):
    first = chunk(minutes=(480, 481, 482))
    d = backend.spool.add_chunk(first, NOW)
    assert not d.called
    assert backend.spool.depth == 0
    assert backend.commit(d) == 3
    assert backend.spool.depth == 3
    # The same message id again is a no-op, whatever it holds.
    assert backend.commit(backend.spool.add_chunk(first, NOW + 1)) == 0
    assert backend.commit(backend.spool.add_chunk(chunk(minutes=(600,)), NOW + 1)) == 0
    assert backend.spool.depth == 3


def test_the_same_day_in_a_new_transfer_is_stored_again(backend):
    # The spool does not make readings unique by device and minute: the
    # cloud does.
    assert backend.commit(backend.spool.add_chunk(chunk(xfer=0), NOW)) == 1
    assert backend.commit(backend.spool.add_chunk(chunk(xfer=1), NOW)) == 1
    assert backend.spool.depth == 2


def test_chunks_of_one_turn_commit_together(backend):
    ds = [backend.spool.add_chunk(chunk(device_id), NOW) for device_id in (1, 2, 3)]
    ds.append(backend.spool.add_chunk(chunk(1), NOW))
    assert not any(d.called for d in ds)
    backend.commit(ds[0])
    assert [d.result for d in ds] == [1, 1, 1, 0]
    assert backend.spool.depth == 3


def test_an_empty_chunk_records_its_message_id(backend):
    empty = chunk(minutes=())
    assert backend.commit(backend.spool.add_chunk(empty, NOW)) == 0
    state = recovered(backend)
    assert [(p.device_id, p.xfer, p.part, p.digest) for p in state.chunks] == [
        (1, empty.xfer, 1, chunk_digest(empty))
    ]
    assert state.depth == 0


def test_a_chunk_keeps_the_digest_it_is_given(backend):
    given = chunk(2)
    assert backend.commit(backend.spool.add_chunk(given, NOW, digest=content_digest(wire.encode(given)))) == 1
    assert backend.commit(backend.spool.add_chunk(chunk(3), NOW, digest=b"d" * 16)) == 1
    assert [p.digest for p in recovered(backend).chunks] == [chunk_digest(given), b"d" * 16]


def test_nothing_leaves_until_its_round_closes(backend):
    backend.commit(backend.spool.add_chunk(chunk(1), NOW))
    assert take(backend).count == 0
    assert recovered(backend).rounds == (StoredRound(DAY, NOW, None),)
    backend.commit(backend.spool.close_round(DAY, NOW + 60))
    assert [r.device_id for r in take(backend).readings] == [1]
    # Closed once: closing again keeps its time.
    backend.commit(backend.spool.close_round(DAY, NOW + 90))
    assert recovered(backend).rounds == (StoredRound(DAY, NOW, NOW + 60),)


def test_a_chunk_brings_its_round_closed_if_told_so(backend):
    backend.commit(backend.spool.add_chunk(chunk(1), NOW, round_closed=True))
    assert recovered(backend).rounds == (StoredRound(DAY, NOW, NOW),)
    assert take(backend).count == 1
    # A round the spool holds keeps what it holds.
    other = DAY + datetime.timedelta(days=1)
    backend.commit(backend.spool.add_chunk(chunk(2, day=other), NOW))
    backend.commit(backend.spool.add_chunk(chunk(3, day=other), NOW + 5, round_closed=True))
    assert recovered(backend).rounds[1] == StoredRound(other, NOW, None)


def test_closing_a_round_the_spool_lacks_adds_it_closed(backend):
    backend.commit(backend.spool.close_round(DAY, NOW))
    assert recovered(backend).rounds == (StoredRound(DAY, NOW, NOW),)
    backend.commit(backend.spool.add_chunk(chunk(1), NOW + 1))
    assert take(backend).count == 1


def test_batches_are_whole_chunks_oldest_first(backend):
    other = DAY + datetime.timedelta(days=1)
    three = chunk(1, minutes=(480, 481, 482))
    backend.commit(backend.spool.add_chunk(three, NOW))
    backend.commit(backend.spool.add_chunk(chunk(2, day=other), NOW))  # its round stays open
    backend.commit(backend.spool.add_chunk(chunk(3), NOW))
    backend.commit(backend.spool.close_round(DAY, NOW + 60))
    batch = take(backend, limit=2)  # a chunk larger than the limit goes alone
    assert list(batch.readings) == list(three.readings) and batch.count == 3
    assert take(backend, limit=2) == batch  # taking does not remove
    assert list(take(backend, limit=4).readings) == list(three.readings) + list(chunk(3).readings)
    rest = take(backend, limit=100, after=batch.last)
    assert list(rest.readings) == list(chunk(3).readings)
    assert take(backend, after=rest.last).count == 0


def test_a_devices_day_made_ready_leaves_before_its_round_closes(backend):
    # forward = "device": the intake makes a device's day ready once its
    # transfer is complete; the others wait for their round.
    backend.commit(backend.spool.add_chunk(chunk(1, part=1, parts=2), NOW))
    backend.commit(backend.spool.add_chunk(chunk(2, part=1, parts=2), NOW))
    backend.commit(backend.spool.add_chunk(chunk(1, part=2, parts=2, minutes=(481,)), NOW))
    assert take(backend).count == 0
    assert backend.commit(backend.spool.devices_ready([(1, DAY)])) == 2
    assert [(r.device_id, r.taken_at.minute) for r in take(backend).readings] == [(1, 0), (1, 1)]
    # Ready once: again is a no-op, and a device with nothing spooled too.
    assert backend.commit(backend.spool.devices_ready([(1, DAY), (3, DAY)])) == 0
    # Readiness is committed with the rest: a restart keeps it.
    backend.reopen()
    assert [r.device_id for r in take(backend).readings] == [1, 1]
    backend.commit(backend.spool.close_round(DAY, NOW + 60))
    assert [r.device_id for r in take(backend).readings] == [1, 1, 2]
    assert backend.commit(backend.spool.devices_ready([(2, DAY)])) == 0


def test_a_days_chunks_made_ready_leave_with_its_round_open(backend):
    # A full spool forwards what it holds of the open rounds: every chunk
    # of the day, of complete transfers or not; other days wait.
    other = DAY + datetime.timedelta(days=1)
    backend.commit(backend.spool.add_chunk(chunk(1), NOW))
    backend.commit(backend.spool.add_chunk(chunk(2, part=1, parts=2), NOW))
    backend.commit(backend.spool.add_chunk(chunk(3, day=other), NOW))
    assert backend.commit(backend.spool.days_ready([DAY])) == 2
    assert [r.device_id for r in take(backend).readings] == [1, 2]
    assert [(r.day, r.closed_at) for r in recovered(backend).rounds] == [(DAY, None), (other, None)]
    # Ready once; a chunk spooled later waits for the next call, or the close.
    assert backend.commit(backend.spool.days_ready([DAY])) == 0
    backend.commit(backend.spool.add_chunk(chunk(2, part=2, parts=2, minutes=(481,)), NOW))
    first = take(backend)
    assert take(backend, after=first.last).count == 0
    backend.reopen()
    # The earliest day's first, though the other day's chunk was spooled
    # before it.
    assert backend.commit(backend.spool.days_ready([other, DAY], most=1)) == 1
    assert [r.device_id for r in take(backend, after=first.last).readings] == [2]
    assert backend.commit(backend.spool.days_ready([DAY, other], most=5)) == 1
    assert [r.device_id for r in take(backend, after=first.last).readings] == [2, 3]


def test_a_round_closes_a_slice_of_its_chunks_at_a_time(backend):
    # A large round is made ready a slice a transaction, so no one
    # transaction holds the reactor for the whole day.
    for device_id in (1, 2, 3):
        backend.commit(backend.spool.add_chunk(chunk(device_id, minutes=(480, 481)), NOW))
    backend.commit(backend.spool.add_chunk(chunk(1, xfer=1, part=2, parts=2, minutes=(482,)), NOW))
    assert backend.commit(backend.spool.close_round(DAY, NOW + 60, most=2)) == 3
    assert [(r.day, r.closed_at) for r in recovered(backend).rounds] == [(DAY, NOW + 60)]
    first = take(backend)
    # By device, then as spooled: device 1's later chunk before device 2.
    assert [(r.device_id, r.taken_at.minute) for r in first.readings] == [(1, 0), (1, 1), (1, 2)]
    # The round is closed, and a restart keeps it so; closing it again
    # keeps its time and makes the next ones ready, until none is left.
    backend.reopen()
    assert take(backend, after=first.last).count == 0
    assert backend.commit(backend.spool.close_round(DAY, NOW + 90, most=2)) == 4
    assert backend.commit(backend.spool.close_round(DAY, NOW + 90, most=2)) == 0
    assert [r.device_id for r in take(backend, after=first.last).readings] == [2, 2, 3, 3]
    assert [(r.day, r.closed_at) for r in recovered(backend).rounds] == [(DAY, NOW + 60)]


def test_a_closed_rounds_chunks_leave_by_device_whatever_order_they_came_in(backend):
    # The cloud stores readings by device: neighbours in a batch are
    # neighbours in its table.
    for device_id in (3, 1, 2):
        backend.commit(backend.spool.add_chunk(chunk(device_id, part=1, parts=2), NOW))
    backend.commit(backend.spool.add_chunk(chunk(3, part=2, parts=2, minutes=(481,)), NOW))
    backend.commit(backend.spool.add_chunk(chunk(1, part=2, parts=2, minutes=(481,)), NOW))
    assert backend.commit(backend.spool.close_round(DAY, NOW + 60, most=3)) == 3
    first = take(backend)
    assert [(r.device_id, r.taken_at.minute) for r in first.readings] == [(1, 0), (1, 1), (2, 0)]
    # The next slice after it, by device again.
    assert backend.commit(backend.spool.close_round(DAY, NOW + 60)) == 2
    assert [(r.device_id, r.taken_at.minute) for r in take(backend, after=first.last).readings] == [(3, 0), (3, 1)]


def test_the_readings_that_left_are_counted(backend):
    for device_id in (1, 2, 3):
        backend.commit(backend.spool.add_chunk(chunk(device_id, minutes=(480, 481)), NOW))
    backend.commit(backend.spool.close_round(DAY, NOW))
    assert backend.spool.removed == 0
    seqs = take(backend, limit=2).seqs
    assert backend.commit(backend.spool.remove(seqs)) == 2
    assert backend.commit(backend.spool.remove(seqs)) == 0
    assert backend.spool.removed == 2
    rest = take(backend).seqs
    assert backend.commit(backend.spool.set_aside(rest[:1], "bad", NOW)) == 2
    assert (backend.spool.removed, backend.spool.depth) == (4, 2)


def test_chunks_made_ready_later_come_after_the_batches_taken(backend):
    # Readiness, not arrival, orders the batches: a batch in flight marks
    # where the next starts, and a chunk spooled before it but made ready
    # after it must not be passed over.
    backend.commit(backend.spool.add_chunk(chunk(1, part=1, parts=2), NOW))
    backend.commit(backend.spool.add_chunk(chunk(2), NOW))
    backend.commit(backend.spool.devices_ready([(2, DAY)]))
    first = take(backend)
    assert [r.device_id for r in first.readings] == [2]
    backend.commit(backend.spool.add_chunk(chunk(1, part=2, parts=2, minutes=(481,)), NOW))
    backend.commit(backend.spool.devices_ready([(1, DAY)]))
    later = take(backend, after=first.last)
    assert [r.device_id for r in later.readings] == [1, 1]
    assert take(backend, after=later.last).count == 0
    # A late chunk of a closed round is ready as it is spooled, after them.
    other = DAY - datetime.timedelta(days=1)
    backend.commit(backend.spool.close_round(other, NOW))
    backend.commit(backend.spool.add_chunk(chunk(3, day=other), NOW, round_closed=True))
    assert [r.device_id for r in take(backend, after=later.last).readings] == [3]


def test_a_batch_holds_a_device_and_minute_once(backend):
    backend.commit(backend.spool.add_chunk(chunk(1, minutes=(480, 481, 482)), NOW))
    backend.commit(backend.spool.add_chunk(chunk(1, xfer=1, minutes=(481, 482)), NOW))  # the day again
    backend.commit(backend.spool.add_chunk(chunk(1, xfer=2, minutes=(481,)), NOW))  # nothing left of it
    backend.commit(backend.spool.add_chunk(chunk(2), NOW))
    backend.commit(backend.spool.close_round(DAY, NOW + 60))
    batch = take(backend)
    assert [(r.device_id, r.taken_at.minute) for r in batch.readings] == [(1, 0), (1, 1), (1, 2), (2, 0)]
    assert len(batch.seqs) == 2  # the copies of the day wait for later batches
    wire.decode(wire.encode(wire.Batch("0123456789abcdef", batch.records)))  # a batch the cloud takes
    assert backend.commit(backend.spool.remove(batch.seqs)) == 4
    rest = take(backend)
    assert [(r.device_id, r.taken_at.minute) for r in rest.readings] == [(1, 1), (1, 2)]
    assert backend.commit(backend.spool.remove(rest.seqs)) == 2
    last = take(backend)
    assert [(r.device_id, r.taken_at.minute) for r in last.readings] == [(1, 1)]
    assert backend.commit(backend.spool.remove(last.seqs)) == 1
    assert backend.spool.depth == 0


def test_removed_chunks_leave_the_spool_and_its_depth(backend):
    for device_id in (1, 2, 3):
        backend.commit(backend.spool.add_chunk(chunk(device_id), NOW))
    backend.commit(backend.spool.close_round(DAY, NOW))
    batch = take(backend, limit=2)
    assert backend.commit(backend.spool.remove(batch.seqs)) == 2
    assert backend.commit(backend.spool.remove(batch.seqs)) == 0
    assert backend.spool.depth == 1
    assert [r.device_id for r in take(backend).readings] == [3]
    assert recovered(backend).depth == 1


def test_chunks_set_aside_leave_the_depth_and_the_batches(backend):
    for device_id in (1, 2):
        backend.commit(backend.spool.add_chunk(chunk(device_id), NOW))
    backend.commit(backend.spool.close_round(DAY, NOW))
    first = take(backend, limit=1)
    assert backend.commit(backend.spool.set_aside(first.seqs, "value: no", NOW + 1)) == 1
    assert backend.commit(backend.spool.set_aside(first.seqs, "value: no", NOW + 2)) == 0
    assert backend.commit(backend.spool.remove(first.seqs)) == 0
    assert backend.spool.depth == 1
    assert [r.device_id for r in take(backend).readings] == [2]


def test_chunks_set_aside_are_all_kept_though_a_drained_spool_uses_seqs_again(backend):
    for device_id in (1, 2):
        backend.commit(backend.spool.add_chunk(chunk(device_id), NOW))
        backend.commit(backend.spool.close_round(DAY, NOW))
        batch = take(backend)
        assert backend.commit(backend.spool.set_aside(batch.seqs, f"value: no {device_id}", NOW + 1)) == 1
    assert backend.spool.depth == 0
    rows = backend.set_aside_rows()
    assert [(device_id, reason) for _, device_id, _, reason in rows] == [(1, "value: no 1"), (2, "value: no 2")]
    assert [records for _, _, records, _ in rows] == ["08:00,20,30"] * 2


def test_forgetting_drops_old_message_ids_and_empty_closed_rounds(backend):
    old, open_day, held = DAY, DAY + datetime.timedelta(days=1), DAY + datetime.timedelta(days=2)
    backend.commit(backend.spool.add_chunk(chunk(1, day=old), NOW))
    backend.commit(backend.spool.add_chunk(chunk(2, day=old, part=1, parts=2), NOW))
    backend.commit(backend.spool.add_chunk(chunk(2, day=old, part=2, parts=2, minutes=(481,)), NOW + 10))
    backend.commit(backend.spool.close_round(old, NOW))
    backend.commit(backend.spool.add_chunk(chunk(3, day=open_day), NOW))
    backend.commit(backend.spool.add_chunk(chunk(3, day=held, xfer=1), NOW, round_closed=True))
    backend.commit(backend.spool.remove(take(backend, limit=3).seqs))  # old's readings are delivered
    assert backend.commit(backend.spool.forget_before(NOW + 5)) is None
    state = recovered(backend)
    # Device 2's day of old had a chunk after the cutoff: all of it is kept.
    assert sorted((p.device_id, p.part) for p in state.chunks) == [(2, 1), (2, 2)]
    # old is closed and empty; open_day is open; held holds readings.
    assert [r.day for r in state.rounds] == [open_day, held]
    # A message id forgotten is new again.
    assert backend.commit(backend.spool.add_chunk(chunk(1, day=old), NOW + 20)) == 1


def test_an_old_round_still_holding_readings_is_not_forgotten(backend):
    old = DAY - datetime.timedelta(days=3)
    backend.commit(backend.spool.add_chunk(chunk(1, day=old), NOW))
    backend.commit(backend.spool.close_round(old, NOW))
    backend.commit(backend.spool.forget_before(NOW + 1))
    backend.reopen()
    state = recovered(backend)
    assert [r.day for r in state.rounds] == [old]
    assert state.chunks == ()
    assert state.depth == 1


def test_a_restart_finds_what_was_committed(backend):
    two = chunk(2, part=1, parts=2)
    backend.commit(backend.spool.add_chunk(chunk(1), NOW))
    backend.commit(backend.spool.add_chunk(two, NOW + 1))
    backend.commit(backend.spool.close_round(DAY, NOW + 2))
    backend.spool.add_chunk(chunk(3), NOW + 3)  # never committed
    backend.reopen()
    assert backend.spool.depth == 2
    state = recovered(backend)
    assert state.depth == 2
    assert state.rounds == (StoredRound(DAY, NOW, NOW + 2),)
    assert [(p.device_id, p.xfer, p.part, p.parts, p.day, p.received_at, p.digest) for p in state.chunks] == [
        (1, chunk(1).xfer, 1, 1, DAY, NOW, chunk_digest(chunk(1))),
        (2, two.xfer, 1, 2, DAY, NOW + 1, chunk_digest(two)),
    ]
    assert backend.commit(backend.spool.add_chunk(chunk(1), NOW)) == 0
    assert [r.device_id for r in take(backend).readings] == [1, 2]


@pytest.mark.parametrize("operation", ["add_chunk", "close_round", "remove", "devices_ready", "days_ready"])
def test_a_failed_commit_changes_nothing(backend, operation):
    backend.commit(backend.spool.add_chunk(chunk(1), NOW))
    backend.commit(backend.spool.close_round(DAY + datetime.timedelta(days=1), NOW))
    seqs = take(backend, limit=1).seqs or (1,)
    calls = {
        "add_chunk": lambda: backend.spool.add_chunk(chunk(2), NOW),
        "close_round": lambda: backend.spool.close_round(DAY, NOW),
        "remove": lambda: backend.spool.remove(seqs),
        "devices_ready": lambda: backend.spool.devices_ready([(1, DAY)]),
        "days_ready": lambda: backend.spool.days_ready([DAY]),
    }
    before = recovered(backend), take(backend)
    backend.fail_next_commit(operation)
    assert isinstance(backend.commit(calls[operation]()), Failure)
    assert (recovered(backend), take(backend)) == before
    assert backend.spool.depth == before[0].depth
    assert not isinstance(backend.commit(calls[operation]()), Failure)
    assert (recovered(backend), take(backend)) != before
