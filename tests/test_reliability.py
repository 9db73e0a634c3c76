"""
Unit tests of the bounds behind "nothing lost, nothing doubled" that the
fault tests (tests/test_faults.py) cannot aim at precisely: the spool limit
under a burst of commits, reassembly bounds after a restart, and a chunk
spooled twice.  The real spool, committing as a task.Clock turns: no
sleeps.
"""

from __future__ import annotations

import datetime
import functools

from twisted.internet import task
from twisted.internet.defer import Deferred

from meter import config, wire
from meter.database import Database
from meter.gateway import Intake
from meter.gateway.spool import Recovered, Spool, StoredChunk, StoredRound
from meter.testing import day_chunk

DAY = datetime.date(2026, 3, 1)
NOW = 1772400000.0
FLEET = {1: "192.168.1.2", 2: "192.168.1.3", 3: "192.168.1.4"}


#: Readings from 01:00 on.
chunk = functools.partial(day_chunk, day=DAY, sent_at=NOW, fleet=FLEET, minutes=(60,))


def fired(d: Deferred):
    out = []
    d.addBoth(out.append)
    assert out, "not fired"
    return out[0]


def intake(tmp_path, **kw) -> tuple[Intake, Spool, task.Clock, Recovered]:
    """
    An Intake on the real spool, which commits as the clock turns.
    """
    connection, recovered = Spool.open(tmp_path / "spool.sqlite")
    clock = task.Clock()
    clock.advance(NOW)
    spool = Spool(Database(connection, clock), recovered.depth)
    return Intake(FLEET, spool, clock, 60.0, lambda: None, **kw), spool, clock, recovered


def committed(clock: task.Clock, d: Deferred):
    clock.advance(0)
    return fired(d)


def test_a_burst_of_chunks_cannot_overshoot_the_spool_limit(tmp_path):
    # Twelve readings arrive in three chunks before any commit is done: the
    # readings being committed count against the limit already.
    gateway, spool, clock, _ = intake(tmp_path, spool_limit=10)
    answers = [gateway.chunk_received(chunk(device_id, minutes=range(60, 64)), "127.0.0.1:1") for device_id in (1, 2, 3)]
    assert fired(answers[2]) == wire.DayAck(
        f"{3:08x}{0:08x}", 1, "busy", "spool_full: the spool is at its limit of 10 readings", 500
    )
    assert not answers[0].called
    clock.advance(0)  # the commit
    assert [fired(d).status for d in answers[:2]] == ["ok", "ok"]
    assert spool.depth == 8
    assert fired(gateway.chunk_received(chunk(3, minutes=range(60, 63)), "127.0.0.1:1")).status == "busy"
    # Once the cloud took readings, what fits is taken again.
    clock.advance(60)  # the round closes at its deadline
    assert committed(clock, spool.remove(committed(clock, spool.take_batch(100)).seqs)) == 8
    assert committed(clock, gateway.chunk_received(chunk(3, minutes=range(60, 64)), "127.0.0.1:1")).status == "ok"
    assert gateway.metrics.refused_spool_full == 2


def test_a_chunk_spooled_again_is_acknowledged_and_stored_once(tmp_path):
    # After its reassembly expired, a late copy of an acknowledged chunk
    # reaches the spool again: no error, nothing new.
    gateway, spool, clock, _ = intake(tmp_path, reassembly_timeout=30.0)
    first = chunk(1, part=1, parts=2, minutes=range(60, 63))
    assert committed(clock, gateway.chunk_received(first, "127.0.0.1:1")).status == "ok"
    clock.advance(30)
    assert gateway.metrics.expired_reassemblies == 1
    assert committed(clock, gateway.chunk_received(first, "127.0.0.1:1")).status == "ok"
    assert spool.depth == 3
    assert gateway.metrics.readings == 3


def test_a_restart_expires_transfers_whose_time_ran_out_while_down(tmp_path):
    gateway, _, clock, _ = intake(tmp_path, reassembly_timeout=300.0)
    gateway.recover(
        Recovered(
            (StoredRound(DAY, NOW - 400, None),),
            (
                StoredChunk(1, "a" * 16, 2, 3, DAY, NOW - 400),
                StoredChunk(1, "a" * 16, 1, 3, DAY, NOW - 390),
                StoredChunk(2, "b" * 16, 1, 2, DAY, NOW - 100),
            ),
            depth=3,
        )
    )
    clock.advance(0)
    assert gateway.metrics.expired_reassemblies == 1
    assert gateway.gauges()["reassemblies"] == 1
    # The survivor expires 300 s after its first chunk, not after the restart.
    clock.advance(199)
    assert gateway.gauges()["reassemblies"] == 1
    clock.advance(1)
    assert gateway.gauges()["reassemblies"] == 0
    assert gateway.metrics.expired_reassemblies == 2


def test_a_restart_keeps_at_most_max_reassemblies_the_newest(tmp_path):
    gateway, _, clock, _ = intake(tmp_path, max_reassemblies=1)
    gateway.recover(
        Recovered(
            (StoredRound(DAY, NOW - 50, None),),
            (StoredChunk(2, "b" * 16, 1, 2, DAY, NOW - 10), StoredChunk(1, "a" * 16, 1, 2, DAY, NOW - 50)),
            depth=2,
        )
    )
    assert gateway.metrics.expired_reassemblies == 1
    # Device 1's (older) transfer went: its chunk is spooled again, device 2's is a duplicate.
    assert committed(clock, gateway.chunk_received(chunk(2, part=1, parts=2, xfer="b" * 16), "127.0.0.1:1")).status == "ok"
    assert gateway.metrics.duplicates == 1


def test_the_reliability_keys_are_configurable():
    loaded = config.from_raw(
        {"gateway": {"spool_limit": 100, "reassembly_timeout": 5, "max_reassemblies": 7, "stats_interval": 2}}, "f.toml"
    )
    assert (
        loaded.gateway["spool_limit"],
        loaded.gateway["reassembly_timeout"],
        loaded.gateway["max_reassemblies"],
        loaded.gateway["stats_interval"],
    ) == (100, 5.0, 7, 2.0)
    defaults = config.from_raw({}, "defaults").gateway
    assert defaults["spool_limit"] >= 1_000_000
    # A transfer must outlive a device's retry span (CoAP MAX_TRANSMIT_WAIT).
    device = config.from_raw({}, "defaults").device
    span = device["ack_timeout"] * (2 ** (device["max_retransmit"] + 1) - 1) * device["ack_random_factor"]
    assert defaults["reassembly_timeout"] > 2 * span
