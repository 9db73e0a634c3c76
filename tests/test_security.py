"""
Who may speak, and what bad input gets (docs/security.md), at unit level:
the gateway's UDP protocol and intake on a FakeDatagramTransport, the device's
protocol, and the cloud's line protocol on a StringTransport, each with a
task.Clock.  The gateway's spool is the memory spool (meter.testing),
committing as the clock turns; the cloud's store is real.
"""

from __future__ import annotations

import datetime
import functools
import gc
import random
import sqlite3
import zlib

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import FakeDatagramTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure

from meter import wire
from meter.clocktext import utc_time
from meter.device import DaySender, DeviceProtocol, Retransmission
from meter.gateway import GatewayProtocol, Intake
from meter.testing import MemorySpool, SQLiteCloud, day_chunk, device_key, device_keys

NOW = 1_795_320_000  # 2026-11-22 04:00 UTC
DAY = datetime.date(2026, 11, 21)
XFER = "0123456789abcdef"
FLEET = {1: "192.168.1.2", 2: "192.168.1.3"}
KEYS = device_keys([1, 2])
ATTACKER_KEY = device_key(66)
REPLAY_WINDOW = 600.0

DEVICE1 = ("192.168.1.2", 50001)
DEVICE2 = ("192.168.1.3", 50002)
STRANGER = ("192.168.1.66", 50066)


chunk = functools.partial(
    day_chunk, xfer=XFER, day=DAY, sent_at=NOW, fleet=FLEET, stranger_ip="192.168.1.99", minutes=(480, 540),
    temperature=lambda minute: 20.0 + minute % 7,
)


def sealed(message, key=None) -> bytes:
    if key is None:
        key = KEYS[message.device_id]
    return wire.seal(wire.encode(message), key)


class Gateway:
    """
    A GatewayProtocol and its Intake on a fake datagram transport and a
    task.Clock at L{NOW}.
    """

    def __init__(self, spool=None, *, rate=1e6, burst=1e6, fleet=FLEET, keys=KEYS, recovered=None, clock=None):
        if clock is None:
            clock = task.Clock()
            clock.advance(NOW)
        self.clock = clock
        self.spool = spool if spool is not None else MemorySpool(self.clock)
        self.intake = Intake(fleet, self.spool, self.clock, 60.0, lambda: None, replay_window=REPLAY_WINDOW)
        if recovered is not None:
            self.intake.recover(recovered)
        self.protocol = GatewayProtocol(self.intake, keys, self.clock, rate, burst)
        self.transport = FakeDatagramTransport()
        self.protocol.makeConnection(self.transport)
        self.keys = keys

    @property
    def metrics(self):
        return self.intake.metrics

    def receive(self, data: bytes, addr=DEVICE1) -> None:
        """
        Hand C{data} to the protocol and let the spool commit.
        """
        self.protocol.datagramReceived(data, addr)
        self.clock.advance(0)

    def spooled(self) -> int:
        """
        How many chunks reached the spool.
        """
        return self.spool.submitted["add_chunk"]

    def answers(self, addr=DEVICE1, key=None) -> list[wire.DayAck]:
        """
        The acknowledgements written to C{addr}, each verified under C{key}.
        """
        key = key or KEYS[1]
        return [wire.decode(wire.unseal(data, key)) for data, to in self.transport.written if to == addr]


OK = wire.DayAck(XFER, 1, "ok")

# -- only devices holding their key are heard -------------------------------


@pytest.mark.parametrize(
    "data, counter",
    [
        (sealed(chunk(), ATTACKER_KEY), "dropped_bad_tag"),
        # device 2's key on a datagram claiming device 1: impersonation
        (sealed(chunk(), KEYS[2]), "dropped_bad_tag"),
        # a genuine datagram altered after sealing
        (sealed(chunk()).replace(b",30;", b",31;"), "dropped_bad_tag"),
        # a genuine tag moved onto another body
        (wire.encode(chunk(minutes=(600,))) + sealed(chunk())[-wire.TAG_LENGTH :], "dropped_bad_tag"),
        (sealed(chunk(device_id=9), ATTACKER_KEY), "dropped_unknown_device"),
        (sealed(chunk(device_id=9), KEYS[1]), "dropped_unknown_device"),
        (wire.encode(chunk()), "dropped_no_tag"),
        (b"", "dropped_no_tag"),
        (b"hello", "dropped_no_tag"),
        (wire.seal(b"meter/1 PING seq=1", KEYS[1]), "dropped_unknown_device"),
        (wire.seal(wire.encode(OK), KEYS[1]), "dropped_unknown_device"),
    ],
    ids=[
        "forged", "other device's key", "altered body", "tag moved", "unknown device",
        "unknown device with a real key", "no tag", "empty", "garbage", "sealed ping", "sealed ack",
    ],
)
def test_an_unauthenticated_datagram_is_dropped_unanswered(data, counter):
    g = Gateway()
    with capturedLogs() as events:
        g.receive(data, STRANGER)
    assert g.transport.written == []  # no answer: the gateway reflects nothing
    assert g.spooled() == 0
    assert g.metrics[counter] == 1
    assert [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn][0].startswith(
        f"dropped datagram of {len(data)} bytes from 192.168.1.66:50066"
    )


def test_a_device_outside_the_fleet_is_named_as_such():
    g = Gateway()
    with capturedLogs() as events:
        g.receive(sealed(chunk(device_id=9), ATTACKER_KEY), STRANGER)
    (line,) = [formatEvent(e) for e in events]
    assert line.endswith("from 192.168.1.66:50066: device 9 is not in [fleet]")


def test_a_device_of_the_fleet_without_a_key_is_named_as_such():
    # Its key file may exist: what matters is that the gateway holds no key.
    g = Gateway(keys={1: KEYS[1]})
    with capturedLogs() as events:
        g.receive(sealed(chunk(device_id=2)), STRANGER)
    (line,) = [formatEvent(e) for e in events]
    assert line.endswith("from 192.168.1.66:50066: device 2 in [fleet] has no key loaded")
    assert g.metrics["dropped_unknown_device"] == 1


def test_a_genuine_chunk_is_spooled_and_acknowledged_under_its_devices_key():
    g = Gateway()
    g.receive(sealed(chunk()))
    assert g.answers() == [OK]
    assert g.spooled() == 1
    assert [row[1:] for row in g.spool.contents.chunks.values()] == [
        (DAY.isoformat(), 1, FLEET[1], chunk().records, 2)
    ]
    # the answer verifies only under the device's own key
    (data, _), = g.transport.written
    with pytest.raises(wire.WireError):
        wire.unseal(data, KEYS[2])


def test_a_malformed_but_authentic_datagram_is_answered_bad_under_its_key():
    g = Gateway()
    g.receive(wire.seal(wire.encode(chunk()).replace(b",30", b",101"), KEYS[1]))
    (answer,) = g.answers()
    assert (answer.xfer, answer.part, answer.status) == (XFER, 1, "bad")
    assert answer.reason.startswith("range: humidity 101%")
    assert g.metrics.decoder_refused["range"] == 1
    assert g.spooled() == 0


def test_the_refusal_of_a_huge_malformed_datagram_fits_a_datagram():
    # A reason quoting the offending record used to be three times the
    # datagram (percent-encoded): too large to send at all.
    body = wire.encode(chunk(minutes=())).replace(b"n=0 r=", b"n=1 r=" + b"%" * 60000)
    g = Gateway()
    g.receive(wire.seal(body, KEYS[1]))
    (answer,) = g.answers()
    assert answer.status == "bad" and answer.reason.startswith("record: ")
    (data, _), = g.transport.written
    assert len(data) < 1200


# -- replays --------------------------------------------------------------------


@pytest.mark.parametrize("offset", [-601, 601, -NOW])
def test_a_datagram_outside_the_replay_window_is_refused(offset):
    g = Gateway()
    g.receive(sealed(chunk(sent_at=NOW + offset)))
    (answer,) = g.answers()
    assert answer.status == "bad"
    assert "outside the replay window of 600 s" in answer.reason
    assert g.metrics.refused_replay == 1
    assert g.spooled() == 0


@pytest.mark.parametrize("offset", [-600, 600, 0])
def test_the_replay_window_includes_its_edges(offset):
    g = Gateway()
    g.receive(sealed(chunk(sent_at=NOW + offset)))
    assert g.answers() == [OK]


def test_a_captured_datagram_replayed_after_the_window_is_refused():
    g = Gateway()
    data = sealed(chunk())
    g.receive(data)
    g.clock.advance(REPLAY_WINDOW + 1)
    g.receive(data, STRANGER)
    assert g.answers() == [OK]
    (refused,) = g.answers(STRANGER)
    assert refused.status == "bad"
    assert g.spooled() == 1


def test_a_duplicate_is_acknowledged_again_but_never_processed_again():
    g = Gateway()
    data = sealed(chunk())
    for _ in range(5):
        g.receive(data)
    assert g.answers() == [OK] * 5
    assert g.spooled() == 1
    assert g.metrics.duplicates == 4
    assert g.metrics.chunks == 1


def test_deduplication_survives_a_gateway_restart():
    data = sealed(chunk())
    first = Gateway()
    first.protocol.datagramReceived(data, DEVICE1)
    assert first.answers() == []  # not before the commit
    first.clock.advance(0)
    assert first.answers() == [OK]
    first.intake.stop()

    spool = first.spool.reopened()
    recovered = spool.recover()
    first.clock.advance(0)
    second = Gateway(spool, recovered=recovered.result, clock=first.clock)
    assert [(p.device_id, p.xfer, p.part) for p in recovered.result.chunks] == [(1, XFER, 1)]
    second.protocol.datagramReceived(data, DEVICE1)
    # answered at once from the recovered message ids: the spool never saw it
    assert second.answers() == [OK]
    assert second.spooled() == 0
    assert second.metrics.duplicates == 1
    assert spool.depth == 2


# -- floods and logs ------------------------------------------------------------


def test_a_flood_from_one_source_is_cut_while_another_is_served():
    g = Gateway(rate=10, burst=20)
    data = sealed(chunk())
    for _ in range(1000):
        g.receive(data, DEVICE1)
    assert len(g.answers(DEVICE1)) == 20  # the burst, then nothing
    assert g.metrics.dropped_flood == 980
    g.receive(sealed(chunk(device_id=2)), DEVICE2)
    assert g.answers(DEVICE2, KEYS[2]) == [OK]
    # the flooding source gets its rate back as time passes
    g.clock.advance(1)
    for _ in range(100):
        g.receive(data, DEVICE1)
    assert len(g.answers(DEVICE1)) == 30
    assert g.metrics.datagrams == 1101


def test_the_per_source_table_is_bounded():
    g = Gateway(rate=1, burst=1)
    for i in range(10000):
        g.receive(b"x", (f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 1))
    assert len(g.protocol._per_source._buckets) <= 4096
    assert len(g.protocol._warnings.limit._buckets) <= 4096


def warnings_by_source(events) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for event in events:
        if event.get("log_level") == LogLevel.warn and event.get("log_namespace") == "meter.gateway.protocol.GatewayProtocol":
            found.setdefault(event["peer"].rpartition(":")[0], []).append(formatEvent(event))
    return found


def test_warnings_about_bad_input_are_rate_limited_per_source():
    g = Gateway()
    forged = sealed(chunk(), ATTACKER_KEY)
    with capturedLogs() as events:
        for _ in range(100):
            g.receive(forged, STRANGER)
        for _ in range(3):
            g.receive(forged, DEVICE2)
    warnings = warnings_by_source(events)
    assert {source: len(lines) for source, lines in warnings.items()} == {"192.168.1.66": 5, "192.168.1.3": 3}
    assert g.metrics.dropped_bad_tag == 103  # every one is counted all the same
    g.clock.advance(6)
    with capturedLogs() as events:
        g.receive(forged, STRANGER)
        g.receive(forged, STRANGER)
    (line,) = warnings_by_source(events)["192.168.1.66"]
    assert line.endswith("(95 similar lines from this source left out)")


def test_warnings_about_refused_authentic_chunks_are_rate_limited_per_source():
    # A genuine datagram captured and replayed in a loop after its window:
    # each is refused (and counted), but the log gets a few lines.
    g = Gateway()
    stale = sealed(chunk(sent_at=NOW - 3600))
    with capturedLogs() as events:
        for _ in range(100):
            g.receive(stale, STRANGER)
        g.receive(stale, DEVICE2)
        g.clock.advance(6)
        g.receive(stale, STRANGER)
    refused = [formatEvent(e) for e in events if e.get("log_namespace") == "meter.gateway.intake.Intake" and e["log_level"] == LogLevel.warn]
    assert [line.split(":")[0] for line in refused] == ["refused chunk from 192.168.1.66"] * 5 + [
        "refused chunk from 192.168.1.3"
    ] + ["refused chunk from 192.168.1.66"]
    assert refused[-1].endswith("(95 similar lines from this source left out)")
    assert g.metrics.refused_replay == 102
    assert len(g.answers(STRANGER)) == 101  # the answers are flood-limited, not log-limited

def test_flood_warnings_are_rate_limited_too():
    g = Gateway(rate=1, burst=1)
    with capturedLogs() as events:
        for _ in range(1000):
            g.receive(b"x", STRANGER)
    (source, lines), = warnings_by_source(events).items()
    assert len(lines) == 5
    assert g.metrics.dropped_flood == 999


# -- odd days a device may report ----------------------------------------------


@pytest.mark.parametrize("day", [datetime.date(1, 1, 1), datetime.date(1, 1, 2), datetime.date(9999, 12, 31)])
def test_a_day_far_from_the_transfers_start_is_refused(day):
    # A day must agree with ts: far days are refused at once, answered, and
    # neither stored nor made a round.
    g = Gateway(fleet={1: FLEET[1]}, keys={1: KEYS[1]})
    with capturedLogs() as events:
        g.receive(sealed(chunk(day=day)))
    (answer,) = g.answers()
    assert answer.status == "bad" and answer.reason.startswith(f"day: {day} does not agree with ts ({utc_time(NOW)})")
    assert g.spooled() == 0 and g.spool.contents.rounds == {}
    assert g.metrics.refused_day == 1
    assert not [e for e in events if "log_failure" in e]


def at(text: str) -> int:
    """
    The Unix time of C{text}, an ISO date and time in UTC.
    """
    return int(datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.timezone.utc).timestamp())


def test_a_chunk_whose_round_is_forgotten_while_it_commits_is_still_answered():
    # Device 1 sends day D again just before D can no longer be sent (a
    # transfer started up to the replay window before, 62 h after D began),
    # and the disk stalls.  Meanwhile a later round closes and forgets D's,
    # closed two days before: the commit must still find its answer.
    later = DAY + datetime.timedelta(days=2)
    g = Gateway()
    g.receive(sealed(chunk(1, xfer="a" * 16)))
    g.receive(sealed(chunk(2, xfer="b" * 16)), DEVICE2)  # round DAY complete and closed
    sent = at("2026-11-24T13:59:00")  # 62 h after DAY, less a minute
    g.clock.advance(sent + REPLAY_WINDOW - 1 - g.clock.seconds())
    g.spool.hold()
    g.receive(sealed(chunk(1, xfer="c" * 16, minutes=(600,), sent_at=sent)))
    g.clock.advance(5)
    g.receive(sealed(chunk(1, xfer="d" * 16, day=later, sent_at=int(g.clock.seconds()))))  # round DAY+2 opens
    with capturedLogs() as events:
        g.clock.advance(60)  # DAY+2 closes at its deadline: DAY is forgotten
        assert DAY not in g.intake.rounds.rounds
        g.spool.release()
        gc.collect()
    assert [a.xfer[0] for a in g.answers()] == ["a", "c", "d"]
    assert {a.status for a in g.answers()} == {"ok"}
    assert not [e for e in events if "log_failure" in e]
    assert not g.intake.admission.overloaded() and g.intake.admission._committing == {}


# -- the device hears only its gateway -----------------------------------------

GATEWAY = ("127.0.0.1", 10005)


def device():
    clock = task.Clock()
    protocol = DeviceProtocol(GATEWAY, KEYS[1])
    transport = FakeDatagramTransport()
    protocol.makeConnection(transport)
    sender = DaySender([chunk()], protocol.send, clock, Retransmission(2.0, 1.0, 4), random.Random(0))
    protocol.sender = sender
    return clock, protocol, transport, sender.start()


@pytest.mark.parametrize("status", ["ok", "bad"])
def test_a_device_ignores_a_forged_ack(status):
    clock, protocol, transport, done = device()
    forged = wire.DayAck(XFER, 1, status, "" if status == "ok" else "go away")
    protocol.datagramReceived(wire.seal(wire.encode(forged), ATTACKER_KEY), GATEWAY)
    protocol.datagramReceived(wire.seal(wire.encode(forged), KEYS[2]), GATEWAY)
    protocol.datagramReceived(wire.encode(forged), GATEWAY)  # no tag
    assert not done.called  # the day is neither delivered nor failed
    assert protocol.metrics.refused_datagrams == 3
    clock.advance(2)
    assert len(transport.written) == 2  # so it is retransmitted
    protocol.datagramReceived(wire.seal(wire.encode(OK), KEYS[1]), GATEWAY)
    assert done.called and done.result == 1


def test_a_device_ignores_an_ack_from_another_address():
    clock, protocol, transport, done = device()
    genuine = wire.seal(wire.encode(OK), KEYS[1])
    for addr in [("127.0.0.2", 10005), ("127.0.0.1", 10006), STRANGER]:
        protocol.datagramReceived(genuine, addr)
    assert not done.called
    assert protocol.metrics.foreign_datagrams == 3
    protocol.datagramReceived(genuine, GATEWAY)
    assert done.called


# -- the cloud: every malformed line, nothing stored ---------------------------

BATCH_ID = "fedcba9876543210"
RECORDS = "3,192.168.1.4,2026-11-21T02:00,17,35;1,192.168.1.2,2026-11-21T08:00,20,30"
IDLE = 120.0


def batch_line(records: str = RECORDS, n: int | None = None, checksum: str | None = None, head=b"meter/1") -> bytes:
    if n is None:
        n = len(records.split(";")) if records else 0
    if checksum is None:
        checksum = f"{zlib.crc32(records.encode('latin-1')):08x}"
    return head + f" BATCH id={BATCH_ID} n={n} sum={checksum} r=".encode() + records.encode("latin-1")


@pytest_twisted.async_yield_fixture
async def c(tmp_path):
    instance = SQLiteCloud(tmp_path / "cloud.sqlite", reactor, now=NOW)
    yield instance
    await instance.database.stop()


def with_record(record: str) -> str:
    return RECORDS.replace("1,192.168.1.2,2026-11-21T08:00,20,30", record)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "data, reason",
    [
        (batch_line()[:-10], "checksum: records do not match"),
        (batch_line(RECORDS[:-10]), "record: record"),
        (batch_line(head=b"meter/2"), "version: version '2', this side speaks 1"),
        (batch_line(head=b"meter/10"), "version: version '10'"),
        (batch_line().replace(b"192.168.1.2", b"192.168.1.\xff"), "syntax: not printable ASCII"),
        (batch_line(with_record("1,192.168.1.2,2026-11-21T08:00,20,3\xe9")), "syntax: not printable ASCII"),
        (batch_line().replace(b" n=2 ", b" n=2  "), "syntax: "),
        (batch_line(with_record("1,192.168.1.2,2026-11-21T08:00,nan,30")), "value: temperature 'nan'"),
        (batch_line(with_record("1,192.168.1.2,2026-11-21T08:00,NaN,30")), "value: temperature 'NaN'"),
        (batch_line(with_record("1,192.168.1.2,2026-11-21T08:00,inf,30")), "value: temperature 'inf'"),
        (batch_line(with_record("1,192.168.1.2,2026-11-21T08:00,-inf,30")), "value: temperature '-inf'"),
        (batch_line(with_record("1,192.168.1.2,2026-11-21T08:00,1e3,30")), "value: temperature '1e3'"),
        (batch_line(with_record("1,192.168.1.2,2026-11-21T08:00,85.5,30")), "range: temperature 85.5 outside"),
        (batch_line(with_record("1,192.168.1.2,2026-11-21T08:00,-41,30")), "range: temperature -41 outside"),
        (batch_line(with_record("1,192.168.1.2,2026-11-21T08:00,20,100.5")), "range: humidity 100.5% outside"),
        (batch_line(with_record("1,192.168.1.2,2026-11-21T08:00,20,-1")), "range: humidity -1% outside"),
        (batch_line(with_record("1,192.168.1.2,2026-02-30T08:00,20,30")), "value: time '2026-02-30T08:00'"),
        (batch_line(with_record("0,192.168.1.2,2026-11-21T08:00,20,30")), "value: device id 0"),
        (batch_line(with_record("1,192.168.1.256,2026-11-21T08:00,20,30")), "value: device address"),
        (batch_line(with_record("3,192.168.1.4,2026-11-21T02:00,18,35")), "minute: device 3 at"),
        (batch_line(n=3), "count: n=3 but 2 records"),
        (batch_line(n=1), "count: n=1 but 2 records"),
        (batch_line(checksum="00000000"), "checksum: records do not match sum=00000000"),
        (batch_line(checksum="0000000G"), "value: sum"),
        (batch_line() + b" extra=1", "field: BATCH has no field 'extra' there"),
    ],
)
async def test_a_bad_batch_gets_a_bad_batchack_naming_the_reason_and_nothing_is_stored(c, data, reason):
    protocol, transport = c.connect(IDLE)
    protocol.dataReceived(data + b"\n" + wire.encode(wire.Ping(1)) + b"\n")
    answer, pong = transport.value().splitlines()
    ack = wire.decode(answer)
    assert (ack.batch_id, ack.status, ack.new, ack.dup) == (BATCH_ID, "bad", 0, 0)
    assert ack.reason.startswith(reason), ack.reason
    assert wire.decode(pong) == wire.Pong(1)  # the connection goes on
    assert not transport.disconnecting
    await c.database.flush()
    assert c.count() == 0
    assert c.console == []


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b" ",
        b"\r",
        b"hello",
        b"GET / HTTP/1.1\r",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on a plain port
        b"meter/1",
        b"meter/1 ",
        b"meter/1 BATCH",
        b"meter/1 BATCH id=",
        b"meter/1 BATCH id=FEDCBA9876543210 n=0 sum=00000000 r=",
        b"meter/ BATCH id=fedcba9876543210 n=0 sum=00000000 r=",
        b"METER/1 PING seq=1",
        b"meter/1 PING seq=-1",
        b"meter/1 PING seq=4294967296",
        b"meter/1 NOPE x=1",
        b"\xff\xfe\xfd",
        b"\x00" * 100,
    ],
)
async def test_a_line_that_names_no_batch_closes_the_connection(c, data):
    protocol, transport = c.connect(IDLE)
    protocol.dataReceived(data + b"\n" + batch_line() + b"\n")
    assert transport.disconnecting
    assert transport.value() == b""  # and what followed is not read
    await c.database.flush()
    assert c.count() == 0


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("seed", range(5))
async def test_random_lines_store_nothing_and_crash_nothing(c, seed):
    rng = random.Random(seed)
    for _ in range(200):
        protocol, transport = c.connect(IDLE)
        protocol.dataReceived(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) + b"\n")
        assert transport.disconnecting or transport.value().startswith(b"meter/1 ")
        protocol.connectionLost(Failure(ConnectionDone()))
    await c.database.flush()
    assert c.count() == 0
    assert c.clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("with_end", [False, True])
async def test_a_line_over_max_length_is_refused_unread(c, with_end):
    protocol, transport = c.connect(IDLE)
    records = ";".join(f"1,192.168.1.2,2026-11-21T{m // 60:02d}:{m % 60:02d},20,30" for m in range(1440))
    line = batch_line(records)
    data = line + b";" * (protocol.MAX_LENGTH + 1 - len(line)) + (b"\n" if with_end else b"")
    assert len(data) > protocol.MAX_LENGTH
    protocol.dataReceived(data)
    assert transport.disconnecting
    assert transport.value() == b""
    assert c.store.metrics.refused["size"] == 1
    await c.database.flush()
    assert c.count() == 0


@pytest_twisted.ensureDeferred
async def test_a_silent_connection_is_closed_by_the_idle_timeout(c):
    protocol, transport = c.connect(IDLE)
    c.clock.advance(IDLE - 0.001)
    assert not transport.disconnected
    c.clock.advance(0.001)
    assert transport.disconnected  # aborted, not waiting for a polite close
    assert c.store.metrics.idle_timeouts == 1
    protocol.connectionLost(Failure(ConnectionDone()))
    assert c.clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_trickle_of_bytes_without_a_line_end_is_closed_by_the_idle_timeout(c):
    protocol, transport = c.connect(IDLE)
    data = batch_line()
    # one byte a second: data keeps coming, but never a whole line
    for i in range(int(IDLE) - 1):
        protocol.dataReceived(data[i % len(data) : i % len(data) + 1])
        c.clock.advance(1)
        assert not transport.disconnected
    c.clock.advance(1)
    assert transport.disconnected
    assert transport.value() == b""
    await c.database.flush()
    assert c.count() == 0


@pytest_twisted.ensureDeferred
async def test_complete_lines_keep_a_connection_open(c):
    protocol, transport = c.connect(IDLE)
    for seq in range(10):
        c.clock.advance(IDLE - 1)
        protocol.dataReceived(wire.encode(wire.Ping(seq)) + b"\n")
    assert not transport.disconnected
    assert transport.value().count(b"PONG") == 10


@pytest_twisted.ensureDeferred
async def test_a_good_batch_after_refused_ones_is_stored_exactly(c):
    protocol, transport = c.connect(IDLE)
    protocol.dataReceived(batch_line(n=3) + b"\n" + batch_line() + b"\n")
    await c.database.flush()
    refused, ok = map(wire.decode, transport.value().splitlines())
    assert refused.status == "bad"
    assert ok == wire.BatchAck(BATCH_ID, "ok", new=2)
    with sqlite3.connect(str(c.path)) as other:
        rows = other.execute(
            "SELECT device_id, device_ip, taken_at, temperature_c, humidity_pct FROM readings ORDER BY device_id"
        ).fetchall()
    assert rows == [(1, "192.168.1.2", "2026-11-21T08:00", 20.0, 30.0), (3, "192.168.1.4", "2026-11-21T02:00", 17.0, 35.0)]


# -- the documents say what the code does --------------------------------------


def test_the_sealed_example_of_the_protocol_document_verifies():
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    (body,) = [line[len("body: ") :] for line in text.splitlines() if line.startswith("body: meter/1 ")]
    (sent,) = [line[len("sent: ") :] for line in text.splitlines() if line.startswith("sent: meter/1 ")]
    key = bytes.fromhex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
    assert wire.seal(body.encode(), key) == sent.encode()
    assert wire.decode(wire.unseal(sent.encode(), key)) == wire.DayAck(XFER, 1, "ok")
