"""
What a device key holder can make the gateway keep: a chunk's day must agree
with its ts; the gateway forgets by the age of what it holds on its own
clock, never by a day a device named; a device's day is bounded in
transfers and chunks (empty ones included); a minute sent twice across the
chunks of a transfer and a message id sent again with other content are
refused; and every refusal the gateway makes starts with its code.

Unit tests run the Intake (and the GatewayProtocol) on a task.Clock and the
real Spool on a SQLite file, or the memory spool where the spool must fail;
the end-to-end test runs the real gateway.
"""

from __future__ import annotations

import datetime
import functools
import socket
import sqlite3
import time

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.testing import FakeDatagramTransport
from twisted.logger import Logger, formatEvent

from meter import secrets, wire
from meter.clocktext import utc_time
from meter.database import Database
from meter.gateway import REMEMBER, GatewayProtocol, Intake, day_agrees
from meter.reading import Reading
from meter.gateway.spool import Recovered, Spool, chunk_digest, content_digest
from meter.testing import MemorySpool, day_chunk, device_keys

#: 2026-03-01 21:20:00 UTC: a device sending now reports 2026-02-28 (or,
#: east of UTC+2:40, 2026-03-01).
NOW = 1772400000
DAY = datetime.date(2026, 2, 28)
FLEET = {1: "192.168.1.2", 2: "192.168.1.3", 3: "192.168.1.4"}
KEYS = device_keys(FLEET)
DEVICE1 = ("192.168.1.2", 50001)


chunk = functools.partial(day_chunk, xfer=1, day=DAY, sent_at=NOW, fleet=FLEET, minutes=(480,))


class Gateway:
    """
    An Intake on the real spool at C{path} (or, without one, the memory
    spool committing as the clock turns), a task.Clock at L{NOW}, and a
    GatewayProtocol on a fake transport in front of it.
    """

    def __init__(self, path=None, **kw):
        self.path = path
        self.clock = task.Clock()
        self.clock.advance(NOW)
        if path is None:
            self.database = None
            self.spool = MemorySpool(self.clock)
            recovered = Recovered((), (), 0)
        else:
            connection, recovered = Spool.open(path)
            self.database = Database(connection, reactor)
            self.spool = Spool(self.database, recovered.depth)
        self.ready = 0
        self.events: list[dict] = []
        self.intake = Intake(FLEET, self.spool, self.clock, 60.0, self._ready, log=Logger(observer=self.events.append), **kw)
        self.intake.recover(recovered)
        self.protocol = GatewayProtocol(self.intake, KEYS, self.clock, 1e9, 1e9)
        self.transport = FakeDatagramTransport()
        self.protocol.makeConnection(self.transport)

    def _ready(self) -> None:
        self.ready += 1

    @property
    def metrics(self):
        return self.intake.metrics

    async def send(self, message: wire.DayChunk, peer: str | None = None) -> wire.DayAck:
        d = self.intake.chunk_received(message, peer or f"{message.device_ip}:5000")
        if self.database is None:
            self.clock.advance(0)
        return await d

    async def datagram(self, message: wire.DayChunk) -> wire.DayAck:
        """
        C{message} sealed, through the protocol: the answer it gets.
        """
        before = len(self.transport.written)
        self.protocol.datagramReceived(wire.seal(wire.encode(message), KEYS[message.device_id]), DEVICE1)
        await self.database.flush()
        (data, _), = self.transport.written[before:]
        return wire.decode(wire.unseal(data, KEYS[message.device_id]))

    def logged(self) -> list[str]:
        return [formatEvent(event) for event in self.events]

    stopped = False

    async def stop(self) -> None:
        self.stopped = True
        self.intake.stop()
        if self.database is not None:
            await self.database.stop()

    def stored(self, query: str) -> list[tuple]:
        with sqlite3.connect(self.path) as connection:
            return connection.execute(query).fetchall()


@pytest_twisted.async_yield_fixture
async def g(tmp_path):
    made = Gateway(tmp_path / "spool.sqlite")
    yield made
    if not made.stopped:
        await made.stop()


def ok(message: wire.DayChunk) -> wire.DayAck:
    return wire.DayAck(message.xfer, message.part, "ok")


# -- a chunk's day agrees with its ts ------------------------------------------


def utc(text: str) -> int:
    return int(datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.timezone.utc).timestamp())


@pytest.mark.parametrize(
    "day, sent_at, agrees",
    [
        # the day before ts's UTC date, and a day either side of the dates
        # of ts - 1 day from UTC-14 to UTC+14
        ("2026-02-28", "2026-03-01T00:05:00", True),
        ("2026-02-27", "2026-03-01T00:05:00", True),  # UTC-14: its 02-28 10:05 reports 02-27
        ("2026-02-26", "2026-03-01T00:05:00", True),  # ... a day late
        ("2026-02-25", "2026-03-01T00:05:00", False),
        ("2026-03-01", "2026-03-01T00:05:00", True),  # UTC+14: its 03-01 14:05 reports 02-28, a day early
        ("2026-03-02", "2026-03-01T00:05:00", False),
        # the edges: the UTC dates of ts - 62 h and ts + 14 h
        ("2026-02-26", "2026-03-01T13:59:59", True),
        ("2026-02-26", "2026-03-01T14:00:00", False),
        ("2026-03-01", "2026-03-01T09:59:59", True),
        ("2026-03-02", "2026-03-01T09:59:59", False),
        ("2026-03-02", "2026-03-01T10:00:00", True),
        # the ends of ts's range
        ("1969-12-31", "1970-01-01T00:00:00", True),
        ("1969-12-29", "1970-01-01T00:00:00", True),
        ("1969-12-28", "1970-01-01T00:00:00", False),
        ("2106-02-07", "2106-02-07T06:28:15", True),
        ("0001-01-01", "2026-03-01T00:05:00", False),
        ("9999-12-31", "2026-03-01T00:05:00", False),
    ],
)
def test_the_days_a_ts_allows(day, sent_at, agrees):
    assert day_agrees(datetime.date.fromisoformat(day), utc(sent_at)) is agrees


@pytest_twisted.ensureDeferred
async def test_a_day_that_does_not_agree_with_ts_is_refused(g):
    far = chunk(3, day=datetime.date(9999, 12, 31))
    ack = await g.send(far)
    assert ack.status == "bad"
    assert ack.reason == (
        f"day: 9999-12-31 does not agree with ts ({utc_time(NOW)}): a transfer started then reports a day from "
        "2026-02-27 to 2026-03-02"
    )
    assert g.metrics.refused_day == 1
    await g.database.flush()
    assert g.stored("SELECT day FROM rounds") == []
    assert g.stored("SELECT count(*) FROM parts") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_a_far_day_neither_forgets_other_devices_ids_nor_reopens_their_rounds(g):
    # The attack of the issue: one device's chunk naming 9999-12-31, its
    # round closing, made the gateway forget every other device's message
    # ids (so their retransmissions were stored again) and reopen rounds.
    first = [chunk(1), chunk(2)]
    assert [await g.send(c) for c in first] == [ok(c) for c in first]
    g.clock.advance(60)  # DAY's round closes at its deadline
    await g.database.flush()
    assert g.stored("SELECT day, closed_at FROM rounds") == [(DAY.isoformat(), NOW + 60)]
    assert (await g.send(chunk(3, day=datetime.date(9999, 12, 31)))).status == "bad"
    g.clock.advance(60)
    await g.database.flush()
    # retransmissions of the first chunks are duplicates: not stored again
    assert [await g.send(c) for c in first] == [ok(c) for c in first]
    assert g.metrics.duplicates == 2
    assert g.metrics.chunks == 2
    await g.database.flush()
    assert g.stored("SELECT device_id FROM parts ORDER BY device_id") == [(1,), (2,)]
    assert g.stored("SELECT day, closed_at FROM rounds") == [(DAY.isoformat(), NOW + 60)]
    assert g.intake.gauges()["message_ids"] == 2


# -- forgetting by age ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_what_is_forgotten_is_decided_by_age_on_the_gateways_clock(g):
    # (Empty chunks: a round still holding readings stays in the spool.)
    await g.send(chunk(1, minutes=()))
    await g.send(chunk(2, minutes=()))
    g.clock.advance(60)  # DAY's round closes
    # Two days less a minute later, another round closes: DAY is kept,
    # though the device names a day three after it (as one east of UTC
    # may, a day early).
    g.clock.advance(REMEMBER - 120)
    later = DAY + datetime.timedelta(days=3)
    await g.send(chunk(1, xfer=2, day=later, sent_at=int(g.clock.seconds())))
    g.clock.advance(60)
    await g.database.flush()
    assert g.intake.gauges()["message_ids"] == 3
    assert len(g.stored("SELECT * FROM parts")) == 3
    assert [day for day, in g.stored("SELECT day FROM rounds ORDER BY day")] == [DAY.isoformat(), later.isoformat()]
    # A round closing once DAY's last chunk and its round's close are more
    # than two days old forgets them, in memory and in the spool.
    g.clock.advance(120)
    latest = later + datetime.timedelta(days=1)
    await g.send(chunk(1, xfer=3, day=latest, sent_at=int(g.clock.seconds())))
    g.clock.advance(60)
    await g.database.flush()
    assert g.intake.gauges()["message_ids"] == 2
    assert g.stored("SELECT device_id, day FROM parts ORDER BY day") == [
        (1, later.isoformat()), (1, latest.isoformat())
    ]
    assert [day for day, in g.stored("SELECT day FROM rounds ORDER BY day")] == [later.isoformat(), latest.isoformat()]
    # DAY's message ids are forgotten: a copy is spooled again (the cloud
    # stores its readings once)
    assert await g.send(chunk(1, minutes=())) == ok(chunk(1, minutes=()))
    assert g.metrics.chunks == 5


@pytest_twisted.ensureDeferred
async def test_a_closed_round_is_kept_while_its_day_can_still_be_sent(tmp_path):
    # A round that closed just after its day ended is two days old while a
    # transfer may still name its day (up to 62 h after it ended): a late
    # part then finds it closed, in memory and in the spool, and goes on.
    g = Gateway(tmp_path / "spool.sqlite", replay_window=600.0)
    try:
        day = datetime.date(2026, 3, 1)
        g.clock.advance(utc("2026-03-02T00:30:00") - NOW)
        await g.send(chunk(1, day=day, minutes=(), sent_at=int(g.clock.seconds())))
        g.clock.advance(60)  # the round closes without devices 2 and 3
        g.clock.advance(REMEMBER)
        later = datetime.date(2026, 3, 3)
        await g.send(chunk(1, xfer=2, day=later, minutes=(), sent_at=int(g.clock.seconds())))
        g.clock.advance(60)  # another round closes, which forgets what is old
        await g.database.flush()
        assert g.stored("SELECT day FROM rounds WHERE day = '2026-03-01'") == []  # the spool forgot it
        before = len(g.logged())
        late = chunk(2, day=day, sent_at=int(g.clock.seconds()))
        assert await g.send(late) == ok(late)
        assert not [line for line in g.logged()[before:] if "round 2026-03-01 opened" in line]
        assert g.stored("SELECT closed_at IS NOT NULL FROM rounds WHERE day = '2026-03-01'") == [(1,)]
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_a_failed_forget_is_counted_logged_once_and_retried():
    g = Gateway()
    try:
        await g.send(chunk(1, minutes=()))
        g.clock.advance(60)  # the round closes, which forgets what is old
        g.clock.advance(REMEMBER + 1)
        g.spool.fail_next("forget_before", times=3, error=sqlite3.OperationalError("database is locked"))
        await g.send(chunk(2, minutes=(), sent_at=int(g.clock.seconds()), day=DAY + datetime.timedelta(days=2)))
        g.clock.advance(60)  # the round closes: forgetting fails
        assert g.metrics.forget_failures == 1
        # retried later, with backoff, until it succeeds
        g.clock.advance(0.25)
        g.clock.advance(0.5)
        assert g.metrics.forget_failures == 3
        g.clock.advance(1)
        assert g.metrics.forget_failures == 3
        assert g.metrics.transaction_failures == 3
        assert sorted(device_id for device_id, _, _ in g.spool.contents.parts) == [2]
        lines = [formatEvent(e) for e in g.events if "forg" in formatEvent(e)]
        assert lines == [
            f"old message ids and rounds not forgotten in the spool: OperationalError: database is locked; "
            f"retry in {delay} s"
            for delay in ("0.25", "0.5", "1")
        ] + ["forgetting old message ids succeeded again after 3 failures over 1.8 s"]
        assert g.clock.getDelayedCalls() == []
    finally:
        await g.stop()


# -- the bounds on a device's day ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_empty_transfers_count_against_a_devices_day(g):
    empties = [chunk(1, xfer=n, minutes=()) for n in range(30)]
    answers = [await g.send(c) for c in empties]
    assert answers[:24] == [ok(c) for c in empties[:24]]
    assert {a.status for a in answers[24:]} == {"bad"}
    assert answers[24].reason == (
        "limit: device 1 sent 24 transfers of 2026-02-28 already, the most a device's day may have"
    )
    assert g.metrics.refused_limit == 6
    # the transfers taken are still recognised; other devices are served
    assert await g.send(empties[0]) == ok(empties[0])
    assert await g.send(chunk(2, minutes=())) == ok(chunk(2, minutes=()))
    await g.database.flush()
    assert g.stored("SELECT count(*) FROM parts WHERE device_id = 1") == [(24,)]
    assert g.intake.gauges()["message_ids"] == 25


@pytest_twisted.ensureDeferred
async def test_a_devices_day_is_bounded_in_chunks(tmp_path):
    g = Gateway(tmp_path / "spool.sqlite", max_parts_per_day=10)
    try:
        parts = [chunk(1, part=p, parts=20, minutes=(p,)) for p in range(1, 21)]
        answers = [await g.send(c) for c in parts]
        assert [a.status for a in answers] == ["ok"] * 10 + ["bad"] * 10
        assert answers[10].reason == (
            "limit: device 1 sent 10 chunks of 2026-02-28 already, the most a device's day may have"
        )
        assert g.metrics.refused_limit == 10
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_the_bounds_are_kept_through_a_restart(tmp_path):
    g = Gateway(tmp_path / "spool.sqlite", max_transfers_per_day=2)
    await g.send(chunk(1, xfer=1, minutes=()))
    await g.send(chunk(1, xfer=2, minutes=()))
    await g.stop()
    g = Gateway(tmp_path / "spool.sqlite", max_transfers_per_day=2)
    try:
        assert (await g.send(chunk(1, xfer=3, minutes=()))).reason.startswith("limit: device 1 sent 2 transfers")
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_a_failed_commit_gives_its_place_back():
    g = Gateway(max_parts_per_day=1)
    g.spool.fail_next("add_chunk")
    try:
        first = chunk(1, part=1, parts=2, minutes=(1, 2))
        busy = await g.send(first)
        assert busy == wire.DayAck(first.xfer, 1, "busy", "spool: write failed")
        # the same chunk again fits its day's bound and its minutes
        assert await g.send(first) == ok(first)
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_lines_about_a_devices_repeated_transfers_are_rate_limited(g):
    for n in range(24):
        assert (await g.send(chunk(1, xfer=n, minutes=()))).status == "ok"
    lines = [line for line in g.logged() if line.startswith("device 1 ")]
    assert lines[0].startswith("device 1 (192.168.1.2:5000) reported 2026-02-28 in 1 chunks: 1 of 3 devices")
    assert len(lines) == 1 + 5
    g.clock.advance(60)  # the round closes at its deadline; a minute passed
    await g.send(chunk(1, xfer=24, minutes=()))  # past the bound: refused, no report line
    assert (await g.send(chunk(2, xfer=0, minutes=()))).status == "ok"  # late
    late = [line for line in g.logged() if line.startswith("late device")]
    assert len(late) == 1


@pytest_twisted.ensureDeferred
async def test_a_full_spool_is_logged_a_few_times_a_minute_and_counted_always(tmp_path):
    g = Gateway(tmp_path / "spool.sqlite", spool_limit=1)
    try:
        assert (await g.send(chunk(1))).status == "ok"
        answers = [await g.send(chunk(2, xfer=n)) for n in range(100)]
        assert {a.reason for a in answers} == {"spool_full: the spool is at its limit of 1 readings"}
        assert g.metrics.refused_spool_full == 100
        full = [line for line in g.logged() if line.startswith("SPOOL FULL")]
        assert len(full) == 5 and full[0].endswith("is the cloud reachable?")
        g.clock.advance(6)
        await g.send(chunk(3))
        full = [line for line in g.logged() if line.startswith("SPOOL FULL")]
        assert len(full) == 6 and full[-1].endswith("(95 similar lines left out)")
    finally:
        await g.stop()


# -- what a transfer repeats ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_minute_sent_twice_across_chunks_is_refused(g):
    first = chunk(1, part=1, parts=3, minutes=(480, 481))
    again = chunk(1, part=2, parts=3, minutes=(481, 482))
    other = chunk(1, part=2, parts=3, minutes=(482, 483))
    assert await g.send(first) == ok(first)
    refused = await g.send(again)
    assert refused == wire.DayAck(
        again.xfer, 2, "bad", f"minute: 08:01 of 2026-02-28 is in another chunk of transfer {again.xfer} already"
    )
    assert g.metrics.refused_minute == 1
    assert await g.send(other) == ok(other)
    # another transfer may send the same minutes (a day sent again)
    assert (await g.send(chunk(1, xfer=2, part=1, parts=2, minutes=(480,)))).status == "ok"


@pytest_twisted.ensureDeferred
async def test_a_chunk_after_its_reassembly_expired_is_still_checked(tmp_path):
    g = Gateway(tmp_path / "spool.sqlite", reassembly_timeout=30.0)
    try:
        assert (await g.send(chunk(1, part=1, parts=2, minutes=(480,)))).status == "ok"
        g.clock.advance(30)
        assert g.metrics.expired_reassemblies == 1
        assert (await g.send(chunk(1, part=2, parts=2, minutes=(480,)))).reason.startswith("minute: 08:00")
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_minutes_in_chunks_being_committed_together_are_checked(g):
    first = g.intake.chunk_received(chunk(1, part=1, parts=2, minutes=(480,)), "p")
    second = g.intake.chunk_received(chunk(1, part=2, parts=2, minutes=(480,)), "p")
    assert (await second).reason.startswith("minute: 08:00")
    assert (await first).status == "ok"


@pytest_twisted.ensureDeferred
async def test_a_message_id_sent_again_with_other_content_is_refused(g):
    first = chunk(1, temperature=20.0)
    other = chunk(1, temperature=21.5)
    assert await g.send(first) == ok(first)
    refused = await g.send(other)
    assert refused == wire.DayAck(
        other.xfer, 1, "bad", f"conflict: part 1/1 of transfer {other.xfer} was received with other content"
    )
    assert g.metrics.refused_conflict == 1
    assert await g.send(first) == ok(first)
    assert g.metrics.duplicates == 1
    await g.database.flush()
    assert g.stored("SELECT records FROM chunks") == [("08:00,20,30",)]


@pytest_twisted.ensureDeferred
async def test_other_content_during_the_commit_is_refused(g):
    pending = g.intake.chunk_received(chunk(1, temperature=20.0), "p")
    assert (await g.intake.chunk_received(chunk(1, temperature=22.0), "p")).reason.startswith("conflict: ")
    assert (await pending).status == "ok"


@pytest_twisted.ensureDeferred
async def test_the_retransmission_shortcut_compares_content(g):
    first = chunk(1, temperature=20.0)
    assert await g.datagram(first) == ok(first)
    assert await g.datagram(first) == ok(first)
    assert g.metrics.duplicates == 1
    refused = await g.datagram(chunk(1, temperature=23.0))
    assert refused.status == "bad" and refused.reason.startswith("conflict: ")
    assert g.metrics.duplicates == 1


@pytest_twisted.ensureDeferred
async def test_digests_are_spooled_and_recovered(tmp_path):
    g = Gateway(tmp_path / "spool.sqlite")
    first = chunk(1)
    await g.send(first)
    await g.stop()
    assert g.stored("SELECT digest FROM parts") == [(content_digest(wire.encode(first)),)]
    g = Gateway(tmp_path / "spool.sqlite")
    try:
        assert (await g.datagram(chunk(1, temperature=25.0))).reason.startswith("conflict: ")
        assert await g.datagram(first) == ok(first)
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_a_datagram_spools_the_digest_of_its_bytes_as_a_chunk_handed_over_does(g):
    # Through the protocol the digest is that of the bytes decoded; handed
    # to the intake, that of the chunk encoded: the same for the one text
    # the decoder takes.
    through_protocol, handed_over = chunk(1, minutes=(480, 481)), chunk(2, minutes=(480, 481))
    assert await g.datagram(through_protocol) == ok(through_protocol)
    assert await g.send(handed_over) == ok(handed_over)
    await g.database.flush()
    assert g.stored("SELECT device_id, digest FROM parts ORDER BY device_id") == [
        (1, chunk_digest(through_protocol)), (2, chunk_digest(handed_over))
    ]
    assert g.intake.admission.acknowledged[through_protocol.message_id] == chunk_digest(through_protocol)


@pytest_twisted.ensureDeferred
async def test_a_spool_without_digests_gains_the_column(tmp_path):
    path = tmp_path / "spool.sqlite"
    with sqlite3.connect(path) as connection:
        connection.executescript(
            """
            CREATE TABLE parts (
                device_id INTEGER NOT NULL, xfer TEXT NOT NULL, part INTEGER NOT NULL, parts INTEGER NOT NULL,
                day TEXT NOT NULL, received_at REAL NOT NULL, PRIMARY KEY (device_id, xfer, part)
            ) WITHOUT ROWID;
            """
        )
        first = chunk(1)
        connection.execute(
            "INSERT INTO parts VALUES (?, ?, 1, 1, ?, ?)", (1, first.xfer, DAY.isoformat(), float(NOW))
        )
    connection.close()
    g = Gateway(path)
    try:
        # no digest to compare: acknowledged as before, as a duplicate
        assert await g.datagram(first) == ok(first)
        assert g.metrics.duplicates == 1
        await g.send(chunk(2))
        await g.database.flush()
        assert [digest is None for digest, in g.stored("SELECT digest FROM parts ORDER BY device_id")] == [True, False]
    finally:
        await g.stop()


# -- every refusal starts with its code ----------------------------------------


@pytest_twisted.ensureDeferred
async def test_every_refusal_of_the_gateway_starts_with_its_code():
    g = Gateway(check_source=True, replay_window=600.0, spool_limit=3, max_transfers_per_day=1)
    try:
        send = g.send
        two = chunk(1, part=1, parts=2, minutes=(1, 2))
        assert (await send(two, "192.168.1.2:1")).status == "ok"
        reasons = [
            (await send(chunk(9), "10.9.9.9:1")).reason,
            (await send(attrs.evolve(chunk(1), device_ip="192.168.1.9"), "192.168.1.9:1")).reason,
            (await send(chunk(1), "192.168.1.66:1")).reason,
            (await send(chunk(1, sent_at=NOW - 601), "192.168.1.2:1")).reason,
            (await send(chunk(1, part=2, parts=3), "192.168.1.2:1")).reason,
            (await send(chunk(1, day=DAY - datetime.timedelta(days=5)), "192.168.1.2:1")).reason,
            (await send(chunk(1, xfer=2), "192.168.1.2:1")).reason,
            (await send(chunk(1, part=2, parts=2, minutes=(2, 3)), "192.168.1.2:1")).reason,
            (await send(chunk(1, part=1, parts=2, minutes=(1, 5)), "192.168.1.2:1")).reason,
            (await send(chunk(2, minutes=(1, 2)), "192.168.1.3:1")).reason,
        ]
        g.spool.fail_next("add_chunk")
        reasons.append((await send(chunk(3), "192.168.1.4:1")).reason)
        codes = [reason.partition(": ")[0] for reason in reasons]
        assert codes == [
            "fleet", "address", "source", "replay", "transfer", "day", "limit", "minute", "conflict", "spool_full",
            "spool",
        ], reasons
        assert f"minus ts ({utc_time(NOW - 601)}) is +601 s (positive: the transfer started that long ago)" in reasons[3]
    finally:
        await g.stop()


def test_an_overloaded_gateway_says_so_with_its_code():
    g = Gateway(max_committing=1)
    g.spool.hold()
    for part in (1, 2):
        message = chunk(1, part=part, parts=2, minutes=(part,))
        g.protocol.datagramReceived(wire.seal(wire.encode(message), KEYS[1]), DEVICE1)
    ((data, _),) = g.transport.written
    assert wire.decode(wire.unseal(data, KEYS[1])).reason.startswith("overloaded: ")


# -- against the real gateway ----------------------------------------------------


@pytest.mark.e2e
def test_one_key_sending_empty_transfers_keeps_the_real_gateways_books_bounded(tmp_path):
    from meter.tools.suite import Suite

    suite = Suite(tmp_path, devices=3, stats_interval=0.5, deadline=300.0)
    try:
        gateway_daemon = suite.start_gateway()
        keys = {d: secrets.read_device_key(tmp_path / "var" / "secrets", d) for d in suite.fleet}
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(5.0)
        target = ("127.0.0.1", suite.gateway_port)
        now = int(time.time())
        day = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).date() - datetime.timedelta(days=1)

        def send(device_id: int, xfer: int, day: datetime.date = day, minutes=()) -> wire.DayAck:
            ip = suite.fleet[device_id]
            readings = tuple(
                Reading(device_id, ip, datetime.datetime.combine(day, datetime.time(m // 60, m % 60)), 20.0, 30.0)
                for m in minutes
            )
            message = wire.DayChunk(device_id, ip, day, f"{device_id:08x}{xfer:08x}", 1, 1, now, readings)
            sock.sendto(wire.seal(wire.encode(message), keys[device_id]), target)
            data, _ = sock.recvfrom(wire.MAX_DATAGRAM)
            return wire.decode(wire.unseal(data, keys[device_id]))

        # Devices 2 and 3 report their day.
        assert send(2, 1, minutes=(480,)).status == "ok"
        assert send(3, 1, minutes=(480,)).status == "ok"
        # Device 1's key sends 2,000 empty transfers of its day.
        statuses = [send(1, n) for n in range(2000)]
        assert [a.status for a in statuses[:24]] == ["ok"] * 24
        assert {a.status for a in statuses[24:]} == {"bad"}
        assert {a.reason.partition(":")[0] for a in statuses[24:]} == {"limit"}
        # ... and a chunk of 9999-12-31, refused without touching the others.
        far = send(1, 5000, day=datetime.date(9999, 12, 31))
        assert far.status == "bad" and far.reason.startswith("day: 9999-12-31 does not agree with ts (")
        # The others' message ids are still known: their retransmissions are
        # duplicates.
        assert send(2, 1, minutes=(480,)).status == "ok"
        assert send(3, 1, minutes=(480,)).status == "ok"
        stats = gateway_daemon.wait_for(r"gateway stats: .* refused_limit=1976 ", 10)
        line = stats.string
        assert " refused_day=1 " in line
        assert " message_ids=26 " in line and " device_days=3 " in line
        assert " duplicates=2 " in line
        # The log does not carry a line a refusal: a few, then counts.
        refused = gateway_daemon.all_matching(r"refused chunk from 127\.0\.0\.1")
        assert 1 <= len(refused) <= 10
        reported = gateway_daemon.all_matching(r"device 1 \(127\.0\.0\.1:\d+\) reported")
        assert len(reported) <= 6
    finally:
        suite.stop()
    with sqlite3.connect(suite.spool) as connection:
        parts = dict(connection.execute("SELECT device_id, count(*) FROM parts GROUP BY device_id"))
        rounds = [day for day, in connection.execute("SELECT day FROM rounds")]
    connection.close()
    assert parts == {1: 24, 2: 1, 3: 1}
    assert rounds == [day.isoformat()]
