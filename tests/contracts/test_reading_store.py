"""
The contract of meter.cloud.interfaces.IReadingStore: one test body run over
every implementation (the in-memory one of meter.testing, the SQLite one,
and the daemon's service that opens it), so that the tests written against the memory store speak of
the behaviour the daemon has.  A new store joins by adding a fixture param.

Bounds of a time range: C{since} is inclusive, C{until} exclusive, so that
consecutive ranges hold each reading once.
"""

from __future__ import annotations

import datetime

import pytest
import pytest_twisted
from twisted.internet import reactor
from zope.interface.verify import verifyObject

from meter import wire
from meter.wire import batch as wire_batch
from meter.cloud import DeviceSummary, IReadingStore, SQLiteReadingStore, open_database
from meter.cloud.postgres import PostgresReadingStore
from meter.cloud.tap import ReadingsDatabase
from meter.database import connect
from meter.postgres import PostgresLocation
from meter.reading import Reading
from meter.testing import MemoryReadingStore


@pytest_twisted.async_yield_fixture(params=["memory", "sqlite", "daemon", "postgresql"])
async def store(request, tmp_path):
    if request.param == "postgresql":
        instance = PostgresReadingStore(PostgresLocation.parse(request.getfixturevalue("postgres_database")), reactor)
        instance.start()
        verifyObject(IReadingStore, instance)
        yield instance
        await instance.stop()
    elif request.param == "memory":
        instance = MemoryReadingStore()
        verifyObject(IReadingStore, instance)
        yield instance
    elif request.param == "daemon":
        # The daemon's service, opening the SQLite store at its start.
        instance = ReadingsDatabase(tmp_path / "cloud.sqlite", reactor)
        instance.startService()
        verifyObject(IReadingStore, instance)
        yield instance
        await instance.stopService()
    else:
        connection = connect(tmp_path / "cloud.sqlite")
        open_database(connection)
        instance = SQLiteReadingStore(connection, reactor)
        verifyObject(IReadingStore, instance)
        yield instance
        await instance.database.stop()


def columns(*records: str) -> wire.BatchColumns:
    return wire.BatchColumns.of(";".join(records))


def at(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


A = "3,192.168.1.4,2026-03-01T02:00,17,35"
B = "1,192.168.1.2,2026-03-01T08:00,20,30"
C = "1,192.168.1.2,2026-03-01T12:00,25.5,33.25"
D = "7,fd00::5,2026-03-02T00:00,0.000001,100"
A_AGAIN = "3,192.168.1.9,2026-03-01T02:00,-3.5,0"  # A's key: device 3 at 02:00

READING_A = Reading(3, "192.168.1.4", at("2026-03-01T02:00"), 17.0, 35.0)
READING_B = Reading(1, "192.168.1.2", at("2026-03-01T08:00"), 20.0, 30.0)
READING_C = Reading(1, "192.168.1.2", at("2026-03-01T12:00"), 25.5, 33.25)
READING_D = Reading(7, "fd00::5", at("2026-03-02T00:00"), 0.000001, 100.0)


@pytest_twisted.ensureDeferred
async def test_an_empty_store_has_no_readings_and_no_devices(store):
    assert await store.readings() == []
    assert await store.devices() == []


@pytest_twisted.ensureDeferred
async def test_a_batch_of_new_readings_is_all_new(store):
    assert await store.add(columns(A, B), 1.0) is None
    assert await store.readings() == [READING_A, READING_B]


@pytest_twisted.ensureDeferred
async def test_an_empty_batch_is_all_new(store):
    assert await store.add(columns(), 1.0) is None
    assert await store.readings() == []


@pytest_twisted.ensureDeferred
async def test_a_batch_sent_again_is_all_duplicate(store):
    await store.add(columns(A, B), 1.0)
    assert await store.add(columns(A, B), 2.0) == []
    assert await store.readings() == [READING_A, READING_B]


@pytest_twisted.ensureDeferred
async def test_an_overlapping_batch_tells_the_positions_of_the_new(store):
    await store.add(columns(B), 1.0)
    assert await store.add(columns(A, B, C), 2.0) == [0, 2]
    assert await store.readings() == [READING_A, READING_B, READING_C]


@pytest_twisted.ensureDeferred
async def test_a_key_twice_in_one_batch_is_stored_once_as_first_given(store):
    assert await store.add(columns(A, B, A_AGAIN, C), 1.0) == [0, 1, 3]
    assert await store.readings() == [READING_A, READING_B, READING_C]


@pytest_twisted.ensureDeferred
async def test_a_reading_is_unique_by_device_and_time_whatever_its_values(store):
    await store.add(columns(A), 1.0)
    assert await store.add(columns(A_AGAIN), 2.0) == []
    assert await store.readings() == [READING_A]


@pytest_twisted.ensureDeferred
async def test_a_batch_with_an_unreadable_record_fails_and_stores_nothing(store):
    with pytest.raises(ValueError):
        await store.add(columns(A, "x,192.168.1.3,2026-03-01T02:00,1,1", B), 1.0)
    assert await store.readings() == []
    assert await store.add(columns(A, B), 2.0) is None


@pytest_twisted.ensureDeferred
async def test_readings_come_by_time_taken_then_device_id(store):
    same_minute = "2,192.168.1.3,2026-03-01T08:00,1,2"
    await store.add(columns(D, C, B, same_minute, A), 1.0)
    assert [(r.taken_at.isoformat(timespec="minutes"), r.device_id) for r in await store.readings()] == [
        ("2026-03-01T02:00", 3),
        ("2026-03-01T08:00", 1),
        ("2026-03-01T08:00", 2),
        ("2026-03-01T12:00", 1),
        ("2026-03-02T00:00", 7),
    ]


@pytest_twisted.ensureDeferred
async def test_numbers_read_back_as_the_decoder_checked_them(store):
    await store.add(columns(C, D), 1.0)
    assert [(r.temperature_c, r.humidity_pct) for r in await store.readings()] == [(25.5, 33.25), (0.000001, 100.0)]
    assert all(type(r.device_id) is int for r in await store.readings())


@pytest_twisted.ensureDeferred
async def test_readings_of_one_device_by_id_by_address_or_both(store):
    moved = "1,192.168.1.7,2026-03-03T08:00,20,30"  # device 1 at a new address
    await store.add(columns(A, B, C, D, moved), 1.0)
    assert [r.taken_at.hour for r in await store.readings(device_id=1)] == [8, 12, 8]
    assert await store.readings(device_ip="192.168.1.2") == [READING_B, READING_C]
    assert [r.device_ip for r in await store.readings(device_id=1, device_ip="192.168.1.7")] == ["192.168.1.7"]
    assert await store.readings(device_id=3, device_ip="192.168.1.2") == []
    assert await store.readings(device_id=99) == []


@pytest_twisted.ensureDeferred
async def test_a_device_that_moved_within_one_run_of_a_batch_is_found_at_each_address(store):
    # Device 1's readings side by side in the batch, at two addresses.
    moved = "1,192.168.1.7,2026-03-01T10:00,21,31"
    await store.add(columns(B, moved, C, A), 1.0)
    assert await store.readings(device_ip="192.168.1.2") == [READING_B, READING_C]
    assert [(r.device_id, r.taken_at.hour) for r in await store.readings(device_ip="192.168.1.7")] == [(1, 10)]
    assert await store.readings(device_ip="192.168.1.4") == [READING_A]


@pytest_twisted.ensureDeferred
async def test_a_reading_sent_again_from_another_address_is_not_found_there(store):
    # A_AGAIN is A's key from another address: a duplicate, not stored, so
    # nothing is stored with that address.
    await store.add(columns(A), 1.0)
    assert await store.add(columns(A_AGAIN, B), 2.0) == [1]
    assert await store.readings(device_ip="192.168.1.9") == []
    assert await store.readings(device_ip="192.168.1.4") == [READING_A]


@pytest_twisted.ensureDeferred
async def test_since_is_inclusive_and_until_exclusive(store):
    await store.add(columns(A, B, C, D), 1.0)
    assert await store.readings(since=at("2026-03-01T08:00")) == [READING_B, READING_C, READING_D]
    assert await store.readings(until=at("2026-03-01T12:00")) == [READING_A, READING_B]
    assert await store.readings(since=at("2026-03-01T08:00"), until=at("2026-03-01T12:00")) == [READING_B]
    assert await store.readings(since=at("2026-03-01T12:00"), until=at("2026-03-01T12:00")) == []


@pytest_twisted.ensureDeferred
async def test_bounds_between_whole_minutes(store):
    await store.add(columns(A, B, C), 1.0)
    assert await store.readings(since=at("2026-03-01T07:59:59.999999")) == [READING_B, READING_C]
    assert await store.readings(since=at("2026-03-01T08:00:00.000001")) == [READING_C]
    assert await store.readings(until=at("2026-03-01T08:00:00.000001")) == [READING_A, READING_B]
    assert await store.readings(until=at("2026-03-01T07:59:30")) == [READING_A]


@pytest_twisted.ensureDeferred
async def test_consecutive_ranges_hold_each_reading_once(store):
    await store.add(columns(A, B, C, D), 1.0)
    edges = [at("2026-03-01T00:00"), at("2026-03-01T08:00"), at("2026-03-01T12:00:30"), at("2026-03-03T00:00")]
    pieces = [await store.readings(since=a, until=b) for a, b in zip(edges, edges[1:])]
    assert [r for piece in pieces for r in piece] == [READING_A, READING_B, READING_C, READING_D]


@pytest_twisted.ensureDeferred
async def test_a_range_and_a_device_together(store):
    await store.add(columns(A, B, C, D), 1.0)
    assert await store.readings(device_id=1, since=at("2026-03-01T09:00")) == [READING_C]
    assert await store.readings(device_ip="192.168.1.4", until=at("2026-03-01T02:00")) == []


@pytest_twisted.ensureDeferred
async def test_devices_are_summarized_by_id(store):
    await store.add(columns(C, D, A), 1.0)
    await store.add(columns(B, A_AGAIN), 2.0)
    assert await store.devices() == [
        DeviceSummary(1, at("2026-03-01T08:00"), at("2026-03-01T12:00"), 2),
        DeviceSummary(3, at("2026-03-01T02:00"), at("2026-03-01T02:00"), 1),
        DeviceSummary(7, at("2026-03-02T00:00"), at("2026-03-02T00:00"), 1),
    ]


@pytest_twisted.ensureDeferred
async def test_a_limit_gives_the_first_readings_in_order(store):
    await store.add(columns(D, C, B, A), 1.0)
    assert await store.readings(limit=2) == [READING_A, READING_B]
    assert await store.readings(device_id=1, limit=1) == [READING_B]
    assert await store.readings(since=at("2026-03-01T09:00"), limit=5) == [READING_C, READING_D]
    assert await store.readings(limit=0) == []


@pytest_twisted.ensureDeferred
async def test_columns_the_decoder_checked_are_stored_as_the_decoder_read_them(store):
    # The PostgreSQL store takes checked columns' texts as they are: the
    # server must read each as the decoder did.
    text = ";".join([
        "2147483647,fd00::5,2026-03-01T23:59,-0.5,0.000001",
        "1,192.168.1.2,2026-03-01T00:00,-39.999999,99.5",
        "10,10.0.0.10,2026-12-31T23:59,0.1,33.333333",
    ])
    checked = wire_batch.batch_columns(text, 3)
    assert checked.checked and not wire.BatchColumns.of(text).checked
    assert checked.pick([2, 0]).checked
    assert await store.add(checked, 1.0) is None
    stored = await store.readings()
    assert stored == sorted(wire_batch.decode_batch_records(text, 3), key=lambda r: (r.taken_at, r.device_id))
