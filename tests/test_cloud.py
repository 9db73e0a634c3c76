"""
meter.cloud: CloudStore on the real SQLite reading store in tmp_path (its
commits and refusals; the stores' own behaviour is the contract of
tests/contracts/test_reading_store.py), CloudProtocol on a StringTransport
with a task.Clock for its idle timeout, the metrics, the service tree.
"""

from __future__ import annotations

import datetime
import sqlite3
import zlib

import pytest
import pytest_twisted
from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from meter import cloud, wire
from meter.reading import Reading
from meter.testing import SQLiteCloud

BATCH_ID = "fedcba9876543210"
OTHER_ID = "0123456789abcdef"


def reading(device_id, ip, stamp, t, h) -> Reading:
    return Reading(device_id, ip, datetime.datetime.fromisoformat(stamp), t, h)


R1 = reading(3, "192.168.1.4", "2026-03-01T02:00", 17, 35)
R2 = reading(1, "192.168.1.2", "2026-03-01T08:00", 20, 30)
R3 = reading(1, "192.168.1.2", "2026-03-01T12:00", 25.5, 33.25)
BATCH = wire.Batch(BATCH_ID, (R1, R2))


@pytest_twisted.async_yield_fixture
async def c(tmp_path):
    instance = SQLiteCloud(tmp_path / "cloud.sqlite", reactor)
    yield instance
    await instance.database.stop()


# -- the store --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_store_commits_a_batch_and_prints_each_reading(c):
    ack = await c.store.store(BATCH, "10.0.0.1:5555")
    assert ack == wire.BatchAck(BATCH_ID, "ok", new=2, dup=0)
    assert c.console == ["192.168.1.4 - 02:00 - 17 - 35%", "192.168.1.2 - 08:00 - 20 - 30%"]
    assert await c.readings.readings() == [R1, R2]
    assert c.store.metrics.batches == 1
    assert c.store.metrics.readings_new == 2


@pytest_twisted.ensureDeferred
async def test_a_batch_sent_again_is_stored_once_and_acknowledged_with_its_duplicates(c):
    await c.store.store(BATCH, "10.0.0.1:5555")
    again = wire.Batch(OTHER_ID, BATCH.readings)  # the gateway's retry has a new id
    ack = await c.store.store(again, "10.0.0.1:5556")
    assert ack == wire.BatchAck(OTHER_ID, "ok", new=0, dup=2)
    assert c.console == ["192.168.1.4 - 02:00 - 17 - 35%", "192.168.1.2 - 08:00 - 20 - 30%"]
    assert c.count() == 2
    assert c.store.metrics.readings_duplicate == 2


@pytest_twisted.ensureDeferred
async def test_an_overlapping_batch_stores_and_prints_only_what_is_new(c):
    await c.store.store(wire.Batch(BATCH_ID, (R1,)), "gw")
    ack = await c.store.store(wire.Batch(OTHER_ID, (R1, R3)), "gw")
    assert ack == wire.BatchAck(OTHER_ID, "ok", new=1, dup=1)
    assert c.console == ["192.168.1.4 - 02:00 - 17 - 35%", "192.168.1.2 - 12:00 - 25.5 - 33.25%"]


@pytest_twisted.ensureDeferred
async def test_a_reading_is_unique_by_device_and_time(c):
    await c.store.store(wire.Batch(BATCH_ID, (R2,)), "gw")
    changed = reading(1, "192.168.1.2", "2026-03-01T08:00", 21, 31)
    ack = await c.store.store(wire.Batch(OTHER_ID, (changed,)), "gw")
    assert (ack.new, ack.dup) == (0, 1)
    assert await c.readings.readings() == [R2]


@pytest_twisted.ensureDeferred
async def test_stored_at_is_the_clock_of_the_batch(c):
    await c.store.store(BATCH, "gw")
    with sqlite3.connect(str(c.path)) as other:
        assert {row[0] for row in other.execute("SELECT stored_at FROM readings")} == {1772400000.0}


@pytest_twisted.ensureDeferred
async def test_an_empty_batch_is_acknowledged(c):
    assert await c.store.store(wire.Batch(BATCH_ID, ()), "gw") == wire.BatchAck(BATCH_ID, "ok", new=0, dup=0)


@pytest_twisted.ensureDeferred
async def test_a_failed_store_is_a_bad_ack_and_prints_nothing(tmp_path):
    broken = SQLiteCloud(tmp_path / "no-schema.sqlite", reactor, schema=False)
    try:
        ack = await broken.store.store(BATCH, "gw")
    finally:
        await broken.database.stop()
    assert ack == wire.BatchAck(BATCH_ID, "bad", "store: not stored: no such table: readings")
    assert broken.console == []
    assert (broken.store.metrics.store_failures, broken.store.metrics.transaction_failures) == (1, 1)


@pytest_twisted.ensureDeferred
async def test_a_batch_is_stored_whole_or_not_at_all(c):
    def refuse_device_9(connection):
        connection.execute(
            "CREATE TRIGGER no9 BEFORE INSERT ON readings WHEN NEW.device_id = 9"
            " BEGIN SELECT RAISE(ABORT, 'device 9 refused'); END"
        )

    await c.database.run(refuse_device_9)
    poisoned = wire.Batch(BATCH_ID, (R1, R2, reading(9, "10.0.0.9", "2026-03-01T02:00", 1, 1)))
    ack = await c.store.store(poisoned, "gw")
    assert ack == wire.BatchAck(BATCH_ID, "bad", "store: not stored: device 9 refused")
    assert c.count() == 0
    assert c.console == []


def _readings_database(path) -> None:
    # Two devices with the same address on different days: the address is
    # what the console shows, the device id what a reading is keyed by.
    with sqlite3.connect(str(path)) as connection:
        cloud.open_database(connection)
        connection.executemany(
            "INSERT INTO readings VALUES (?, ?, ?, ?, ?, 0)",
            [(3, "192.168.1.4", "2026-03-01T02:00", 17.0, 35.0), (5, "192.168.1.4", "2026-03-02T02:00", -3.5, 0.25)],
        )
        # Each address a device's readings were stored with, as the store keeps them.
        connection.execute("INSERT INTO device_addresses SELECT DISTINCT device_ip, device_id FROM readings")


@pytest.mark.parametrize(
    "fmt, expected",
    [
        (
            "table",
            "device_id  device_ip    taken_at          temperature_c  humidity_pct\n"
            "3          192.168.1.4  2026-03-01T02:00  17             35\n"
            "5          192.168.1.4  2026-03-02T02:00  -3.5           0.25\n"
            "(2 readings)\n",
        ),
        (
            "csv",
            "device_id,device_ip,taken_at,temperature_c,humidity_pct\n"
            "3,192.168.1.4,2026-03-01T02:00,17,35\n"
            "5,192.168.1.4,2026-03-02T02:00,-3.5,0.25\n",
        ),
    ],
)
def test_meter_readings_carries_the_device_id_beside_the_address(tmp_path, capsys, fmt, expected):
    from meter.tools import cli

    _readings_database(tmp_path / "cloud.sqlite")
    assert cli.main(["readings", "--db", str(tmp_path / "cloud.sqlite"), "--format", fmt]) == 0
    assert capsys.readouterr().out == expected


def test_meter_readings_as_json_carries_the_device_id(tmp_path, capsys):
    import json

    from meter.tools import cli

    _readings_database(tmp_path / "cloud.sqlite")
    assert cli.main(["readings", "--db", str(tmp_path / "cloud.sqlite"), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"device_id": 3, "device_ip": "192.168.1.4", "taken_at": "2026-03-01T02:00", "temperature_c": 17.0, "humidity_pct": 35.0},
        {"device_id": 5, "device_ip": "192.168.1.4", "taken_at": "2026-03-02T02:00", "temperature_c": -3.5, "humidity_pct": 0.25},
    ]


# -- the protocol -----------------------------------------------------------

IDLE = 120.0


def line(message) -> bytes:
    return wire.encode(message) + b"\n"


@pytest_twisted.ensureDeferred
async def test_a_batch_line_is_acknowledged_after_its_commit(c):
    protocol, transport = c.connect(IDLE)
    protocol.dataReceived(line(BATCH))
    assert transport.value() == b""  # not before the commit
    await c.database.flush()
    assert transport.value() == line(wire.BatchAck(BATCH_ID, "ok", new=2, dup=0))
    assert c.count() == 2
    assert not transport.disconnecting


@pytest_twisted.ensureDeferred
async def test_a_batch_in_pieces_is_one_line(c):
    protocol, transport = c.connect(IDLE)
    data = line(BATCH)
    for i in range(0, len(data), 7):
        protocol.dataReceived(data[i : i + 7])
    await c.database.flush()
    assert transport.value() == line(wire.BatchAck(BATCH_ID, "ok", new=2, dup=0))


@pytest_twisted.ensureDeferred
async def test_the_cloud_turns_nagle_off_on_each_connection(c):
    # Else an acknowledgement written while another is unacknowledged waits
    # for the gateway's delayed ACK (wire.without_nagle).
    protocol = cloud.CloudFactory(c.store, IDLE, c.clock).buildProtocol(IPv4Address("TCP", "10.0.0.1", 5555))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5555))
    no_delay: list[bool] = []
    transport.setTcpNoDelay = no_delay.append
    protocol.makeConnection(transport)
    assert no_delay == [True]


@pytest_twisted.ensureDeferred
async def test_ping_gets_pong_at_once(c):
    protocol, transport = c.connect(IDLE)
    protocol.dataReceived(line(wire.Ping(3)) + line(wire.Ping(4)))
    assert transport.value() == line(wire.Pong(3)) + line(wire.Pong(4))


@pytest_twisted.ensureDeferred
async def test_a_malformed_batch_with_a_readable_id_gets_a_bad_ack_and_nothing_is_stored(c):
    protocol, transport = c.connect(IDLE)
    data = wire.encode(BATCH).replace(b",17,35", b",18,35")  # no longer matches its sum
    protocol.dataReceived(data + b"\n")
    (answer,) = transport.value().splitlines()
    ack = wire.decode(answer)
    assert (ack.batch_id, ack.status) == (BATCH_ID, "bad")
    assert ack.reason.startswith("checksum: records do not match sum=")
    await c.database.flush()
    assert c.count() == 0
    assert c.console == []
    assert not transport.disconnecting
    assert c.store.metrics.refused["checksum"] == 1


@pytest_twisted.ensureDeferred
async def test_an_out_of_range_batch_is_refused_naming_the_reading(c):
    protocol, transport = c.connect(IDLE)
    records = "3,192.168.1.4,2026-03-01T02:00,17,101"
    protocol.dataReceived(f"meter/1 BATCH id={BATCH_ID} n=1 sum={zlib.crc32(records.encode()):08x} r={records}\n".encode())
    assert wire.decode(transport.value().rstrip(b"\n")) == wire.BatchAck(
        BATCH_ID, "bad", "range: humidity 101% outside 0..100 %"
    )
    await c.database.flush()
    assert c.count() == 0


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.1", b"meter/1 BATCH id=nothex n=0 sum=00000000 r=", b"\x16\x03\x01\x02\x00", b""],
)
async def test_garbage_closes_the_connection(c, garbage):
    protocol, transport = c.connect(IDLE)
    protocol.dataReceived(garbage + b"\n" + line(wire.Ping(1)))
    assert transport.disconnecting
    assert transport.value() == b""  # and what followed the garbage is not read


@pytest_twisted.ensureDeferred
async def test_a_line_over_max_length_closes_the_connection(c):
    protocol, transport = c.connect(IDLE)
    protocol.dataReceived(b"meter/1 PING seq=1" + b"0" * protocol.MAX_LENGTH)
    assert transport.disconnecting
    assert transport.value() == b""
    assert c.store.metrics.refused["size"] == 1


@pytest_twisted.ensureDeferred
async def test_an_unexpected_kind_is_ignored(c):
    protocol, transport = c.connect(IDLE)
    protocol.dataReceived(line(wire.BatchAck(BATCH_ID, "ok")) + line(wire.Ping(9)))
    assert transport.value() == line(wire.Pong(9))
    assert c.store.metrics.unexpected == 1
    assert not transport.disconnecting


@pytest_twisted.ensureDeferred
async def test_a_silent_connection_is_closed_after_the_idle_timeout(c):
    protocol, transport = c.connect(IDLE)
    c.clock.advance(IDLE - 1)
    assert not transport.disconnected
    protocol.dataReceived(line(wire.Ping(1)))  # any line resets the timeout
    c.clock.advance(IDLE - 1)
    assert not transport.disconnected
    c.clock.advance(1)
    assert transport.disconnected
    assert c.store.metrics.idle_timeouts == 1


@pytest_twisted.ensureDeferred
async def test_connection_lost_cancels_the_idle_timeout(c):
    protocol, transport = c.connect(IDLE)
    assert len(c.clock.getDelayedCalls()) == 1
    protocol.connectionLost(Failure(ConnectionDone()))
    assert c.clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_no_ack_is_written_to_a_lost_connection(c):
    protocol, transport = c.connect(IDLE)
    protocol.dataReceived(line(BATCH))
    transport.connected = False
    protocol.connectionLost(Failure(ConnectionDone()))
    await c.database.flush()
    assert transport.value() == b""
    assert c.count() == 2  # stored all the same: the gateway's retry is a duplicate


class UnansweringStore:
    """
    A store whose answer to every batch fails: a fault of the cloud's own
    after the store's work, which the store's own handling did not catch.
    """

    def __init__(self):
        self.metrics = cloud.CloudMetrics()

    def store(self, batch, peer):
        return fail(RuntimeError("the acknowledgement could not be made"))


def test_a_batch_whose_answer_fails_is_logged_counted_and_its_connection_closed_for_the_gateway_to_resend(c):
    store = UnansweringStore()
    protocol = cloud.CloudFactory(store, IDLE, c.clock).buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5555))
    protocol.makeConnection(transport)
    with capturedLogs() as events:
        protocol.dataReceived(line(BATCH))
    assert store.metrics.answer_failures == 1
    assert transport.value() == b""
    assert transport.disconnecting
    [event] = [e for e in events if e.get("log_failure") is not None]
    assert f"batch {BATCH_ID} not acknowledged" in formatEvent(event)
    assert event["log_failure"].getErrorMessage() == "the acknowledgement could not be made"


def test_console_text_from_record_text_reads_as_each_reading_prints_itself():
    # The cloud prints from the batch's text; Reading.console_line is the
    # format's other writer, and the two must not drift apart.
    readings = (
        Reading(3, "192.168.1.4", datetime.datetime(2026, 11, 21, 2, 0), 17.0, 35.0),
        Reading(1, "192.168.1.2", datetime.datetime(2026, 11, 21, 23, 5), -3.5, 32.25),
        Reading(7, "fd00::5", datetime.datetime(2026, 11, 21, 0, 0), 0.000001, 100.0),
    )
    batch = wire.decode(wire.encode(wire.Batch("0123456789abcdef", readings)))
    assert cloud.console_text(batch.columns()) == "".join(r.console_line() + "\n" for r in readings)


# -- the metrics ------------------------------------------------------------


def test_the_metrics_render_as_logfmt_every_field_in_order():
    metrics = cloud.CloudMetrics()
    metrics.stored(2, 1)
    metrics.refused["checksum"] += 1
    metrics.refused["auth"] += 2
    metrics.handshake_timeouts += 3
    assert metrics.logfmt() == (
        "batches=1 readings_new=2 readings_duplicate=1 transaction_failures=0 store_failures=0 console_failures=0 answer_failures=0 "
        "refused_auth=2 refused_checksum=1 unexpected=0 idle_timeouts=0 handshake_timeouts=3 "
        "unauthenticated_evicted=0 unauthenticated_failed=0 connections_refused=0 accept_failures=0"
    )
    assert str(metrics) == metrics.logfmt()


def test_the_store_the_protocol_and_admission_count_in_one_metrics_object(c):
    metrics = cloud.CloudMetrics()
    store = cloud.CloudStore(c.readings, c.print, c.clock, metrics)
    factory = cloud.CloudFactory(store, IDLE, c.clock)
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5555)))
    protocol.dataReceived(b"GET / HTTP/1.1\n")
    protocol.connectionLost(Failure(ConnectionDone()))
    factory.admission.accept_failed()
    assert (metrics.refused["magic"], metrics.unauthenticated_failed, metrics.accept_failures) == (1, 1, 1)
    assert store.metrics is metrics


# -- the service tree ---------------------------------------------------------


class Child(Service):
    """
    A child service whose stop ends when the test says so.
    """

    def __init__(self, name: str, stops: list[str]):
        self.name = name
        self._stops = stops
        self.stopped = Deferred()

    def stopService(self):
        Service.stopService(self)
        self._stops.append(self.name)
        return self.stopped


def started_cloud_service():
    """
    A started cloud service with two children that stop when the test says:
    the service, its database and listener children, and the order of stops.
    """
    from meter.cloud import tap

    stops: list[str] = []
    service = tap.CloudService(cloud.CloudMetrics())
    database, listener = Child("database", stops), Child("listener", stops)
    database.setServiceParent(service)
    listener.setServiceParent(service)
    service.startService()
    return service, database, listener, stops


def test_the_cloud_stops_its_children_in_reverse_each_once_the_one_before_has_stopped():
    service, database, listener, stops = started_cloud_service()
    with capturedLogs() as events:
        done: list = []
        service.stopService().addCallback(done.append)
        assert stops == ["listener"]
        listener.stopped.callback(None)
        assert stops == ["listener", "database"] and done == []
        database.stopped.callback(None)
    assert done == [None]
    (line,) = [formatEvent(e) for e in events if "cloud stopped" in formatEvent(e)]
    assert line.startswith("cloud stopped: batches=0 readings_new=0 ")


def test_a_child_that_fails_to_stop_is_logged_and_the_next_still_stops():
    service, database, listener, stops = started_cloud_service()
    with capturedLogs() as events:
        done: list = []
        service.stopService().addCallback(done.append)
        listener.stopped.errback(Failure(OSError("the port would not close")))
        assert stops == ["listener", "database"]
        database.stopped.callback(None)
    assert done == [None]
    lines = [formatEvent(e) for e in events]
    assert "a part of the cloud did not stop cleanly" in lines
    assert [line for line in lines if line.startswith("cloud stopped: ")]
