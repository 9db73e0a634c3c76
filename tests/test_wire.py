"""
meter.wire: the one codec of both hops.  Every message kind round-trips, the
encoding is canonical, and every malformed form is refused with a WireError
whose code names the fault.
"""

from __future__ import annotations

import datetime
import functools
import socket
import zlib

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientCreator, Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import LineOnlyReceiver

from meter import testing, wire
from meter.reading import Reading
from meter.wire.values import TEMPERATURES, BoundedCache
from meter.wire import (
    Batch,
    BatchAck,
    DayAck,
    DayChunk,
    Ping,
    Pong,
    WireError,
    decode,
    encode,
    refusal,
    seal,
    split_day,
)

DAY = datetime.date(2026, 3, 1)
XFER = "0123456789abcdef"
BATCH_ID = "fedcba9876543210"
KEY = bytes(range(32))


def reading(device_id=1, ip="192.168.1.2", hhmm="08:00", t=20.0, h=30.0, day=DAY):
    hour, minute = map(int, hhmm.split(":"))
    return Reading(device_id, ip, datetime.datetime(day.year, day.month, day.day, hour, minute), t, h)


#: GOOD_DAY's chunk, or one of other readings.
chunk = functools.partial(
    testing.day_chunk, xfer=XFER, day=DAY, sent_at=1772400000, ip="192.168.1.2",
    readings=(reading(hhmm="08:00", t=20, h=30), reading(hhmm="12:00", t=25.5, h=33)),
)


GOOD_DAY = (
    b"meter/1 DAY dev=1 ip=192.168.1.2 day=2026-03-01 xfer=0123456789abcdef part=1/1 ts=1772400000 "
    b"n=2 r=08:00,20,30;12:00,25.5,33"
)
BATCH_RECORDS = "3,192.168.1.4,2026-03-01T02:00,17,35;1,192.168.1.2,2026-03-02T08:00,-3.5,30.25"


def batch_line(records: str = BATCH_RECORDS, n: int | None = None, checksum: str | None = None, id=BATCH_ID) -> bytes:
    if n is None:
        n = len(records.split(";")) if records else 0
    if checksum is None:
        checksum = f"{zlib.crc32(records.encode()):08x}"
    return f"meter/1 BATCH id={id} n={n} sum={checksum} r={records}".encode()


# -- encode: the exact bytes ------------------------------------------------


def test_day_chunk_bytes():
    assert encode(chunk()) == GOOD_DAY


def test_empty_day_chunk_bytes():
    assert encode(chunk(readings=())) == (
        b"meter/1 DAY dev=1 ip=192.168.1.2 day=2026-03-01 xfer=0123456789abcdef part=1/1 ts=1772400000 n=0 r="
    )


def test_dayack_bytes():
    assert encode(DayAck(XFER, 2, "ok")) == b"meter/1 DAYACK xfer=0123456789abcdef part=2 st=ok"
    assert encode(DayAck(XFER, 1, "busy", "spool full")) == (
        b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=busy why=spool%20full"
    )
    # The retry-after hint, in whole milliseconds, last.
    assert encode(DayAck(XFER, 1, "busy", "shed: wait", 1500)) == (
        b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=busy why=shed%3A%20wait after=1500"
    )
    assert encode(DayAck(XFER, 1, "busy", retry_after_ms=4294967295)) == (
        b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=busy after=4294967295"
    )


def test_batch_bytes_carry_a_crc32_of_the_records():
    batch = Batch(BATCH_ID, (reading(3, "192.168.1.4", "02:00", 17, 35),))
    records = "3,192.168.1.4,2026-03-01T02:00,17,35"
    assert encode(batch) == f"meter/1 BATCH id={BATCH_ID} n=1 sum={zlib.crc32(records.encode()):08x} r={records}".encode()


def test_batchack_and_ping_bytes():
    assert encode(BatchAck(BATCH_ID, "ok", new=3, dup=2)) == b"meter/1 BATCHACK id=fedcba9876543210 st=ok new=3 dup=2"
    assert encode(BatchAck(BATCH_ID, "bad", "not stored")) == (
        b"meter/1 BATCHACK id=fedcba9876543210 st=bad new=0 dup=0 why=not%20stored"
    )
    assert encode(Ping(5)) == b"meter/1 PING seq=5"
    assert encode(Pong(5)) == b"meter/1 PONG seq=5"


# -- round trips ------------------------------------------------------------

ROUND_TRIP = [
    chunk(),
    chunk(readings=()),
    chunk(part=2, parts=3),
    chunk(readings=(reading(2, "2001:db8::2", "23:59", -40, 100),), device_id=2, ip="2001:db8::2"),
    chunk(readings=(reading(wire.MAX_DEVICE_ID, "10.0.0.1", "00:00", 85, 0),), device_id=wire.MAX_DEVICE_ID, ip="10.0.0.1"),
    DayAck(XFER, 1, "ok"),
    DayAck(XFER, 1440, "busy", "spool full"),
    DayAck(XFER, 2, "busy", "shed: wait", 1),
    DayAck(XFER, 2, "busy", "", 60_000),
    DayAck(XFER, 3, "bad", "range: temperature 86 outside -40..85 °C; 50% = a/b"),
    Batch(BATCH_ID, ()),
    Batch(
        BATCH_ID,
        (
            reading(3, "192.168.1.4", "02:00", 17, 35),
            reading(1, "192.168.1.2", "08:00", -3.5, 30.25, datetime.date(2026, 3, 2)),
            reading(7, "::1", "08:00", 0.5, 99.999999),
        ),
    ),
    BatchAck(BATCH_ID, "ok", new=4294967295, dup=0),
    BatchAck(BATCH_ID, "ok", new=3, dup=2),
    BatchAck(BATCH_ID, "bad", "store: not stored: disk I/O error"),
    Ping(0),
    Ping(4294967295),
    Pong(17),
]


@pytest.mark.parametrize("message", ROUND_TRIP, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    data = encode(message)
    assert decode(data) == message
    # canonical: what decodes re-encodes to the same bytes
    assert encode(decode(data)) == data


def test_round_trip_is_printable_ascii_without_line_end():
    for message in ROUND_TRIP:
        data = encode(message)
        assert data.isascii()
        assert b"\n" not in data and b"  " not in data
        assert data.startswith(b"meter/1 ")


_hundredths = st.integers(min_value=-4000, max_value=8500).map(lambda k: k / 100)
_humidity = st.integers(min_value=0, max_value=100_000).map(lambda k: k / 1000)


@settings(max_examples=150, deadline=None)
@given(
    minutes=st.sets(st.integers(min_value=0, max_value=1439), max_size=40),
    temperature=_hundredths,
    humidity=_humidity,
    device_id=st.integers(min_value=1, max_value=wire.MAX_DEVICE_ID),
)
def test_round_trip_property(minutes, temperature, humidity, device_id):
    readings = tuple(
        Reading(device_id, "10.1.2.3", datetime.datetime.combine(DAY, datetime.time(m // 60, m % 60)), temperature, humidity)
        for m in sorted(minutes)
    )
    day = DayChunk(device_id, "10.1.2.3", DAY, XFER, 1, 1, 0, readings)
    assert decode(encode(day)) == day
    batch = Batch(BATCH_ID, readings)
    assert decode(encode(batch)) == batch


# -- encode refuses what it cannot carry ------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        chunk(part=0, parts=1),
        chunk(part=3, parts=2),
        DayAck(XFER, 1, "ok", "but why"),
        DayAck(XFER, 1, "bad"),
        DayAck(XFER, 1, "maybe", "x"),
        DayAck(XFER, 1, "ok", "", 1000),
        DayAck(XFER, 1, "bad", "fleet: no", 1000),
        DayAck(XFER, 1, "busy", "", 0),
        DayAck(XFER, 1, "busy", "", 2**32),
        BatchAck(BATCH_ID, "busy", "x"),
        BatchAck(BATCH_ID, "bad"),
    ],
)
def test_encode_refuses_unfaithful_messages(message):
    with pytest.raises(ValueError):
        encode(message)


@pytest.mark.parametrize(
    "foreign",
    [
        reading(2, "192.168.1.3"),  # another device's reading
        reading(1, "192.168.1.9"),  # another address
        reading(day=datetime.date(2026, 3, 2)),  # another day
    ],
)
def test_a_chunk_refuses_readings_it_cannot_carry(foreign):
    with pytest.raises(ValueError, match="does not belong in a chunk of device 1 on 2026-03-01"):
        chunk(readings=(foreign,))


def test_encode_refuses_other_objects():
    with pytest.raises(TypeError):
        encode("PING seq=1")


# -- decode refuses every malformed form ------------------------------------


def day_variant(old: bytes, new: bytes) -> bytes:
    assert old in GOOD_DAY, old
    return GOOD_DAY.replace(old, new, 1)


MALFORMED = [
    # framing
    ("empty", b"", "magic"),
    ("wrong magic", day_variant(b"meter/1", b"metre/1"), "magic"),
    ("no magic", b"DAY dev=1", "magic"),
    ("version 2", day_variant(b"meter/1", b"meter/2"), "version"),
    ("version 10", day_variant(b"meter/1", b"meter/10"), "version"),
    ("version missing", day_variant(b"meter/1", b"meter/"), "version"),
    ("unknown kind", day_variant(b" DAY ", b" NIGHT "), "kind"),
    ("lowercase kind", day_variant(b" DAY ", b" day "), "kind"),
    ("kind only", b"meter/1 HELLO", "kind"),
    # tokens
    ("double space", day_variant(b"dev=1 ip", b"dev=1  ip"), "syntax"),
    ("leading double space", day_variant(b"meter/1 DAY", b"meter/1  DAY"), "syntax"),
    ("trailing space", GOOD_DAY + b" ", "syntax"),
    ("line end inside datagram", GOOD_DAY + b"\n", "syntax"),
    ("tab", day_variant(b"dev=1 ip", b"dev=1\tip"), "syntax"),
    ("non-ascii utf-8", day_variant(b"xfer=", b"xf\xc3\xa9r="), "syntax"),
    ("invalid utf-8", day_variant(b"n=2", b"n=\xff"), "syntax"),
    ("nul byte", day_variant(b"n=2", b"n=2\x00"), "syntax"),
    ("token without equals", day_variant(b"dev=1", b"dev"), "syntax"),
    ("uppercase key", day_variant(b"dev=1", b"DEV=1"), "syntax"),
    ("key too long", day_variant(b"dev=1", b"deviceidx=1"), "syntax"),
    # fields
    ("missing field", day_variant(b" ts=1772400000", b""), "field"),
    ("missing last field", GOOD_DAY.split(b" r=")[0], "field"),
    ("field out of order", day_variant(b"dev=1 ip=192.168.1.2", b"ip=192.168.1.2 dev=1"), "field"),
    ("extra field", GOOD_DAY.replace(b" n=2", b" x=1 n=2"), "field"),
    ("extra trailing field", GOOD_DAY + b" x=1", "field"),
    ("duplicate field", day_variant(b"dev=1", b"dev=1 dev=1"), "field"),
    ("duplicate records", GOOD_DAY + b" r=08:00,20,30", "field"),
    # records
    ("n above records", day_variant(b"n=2", b"n=3"), "count"),
    ("n below records", day_variant(b"n=2", b"n=1"), "count"),
    ("n=0 with records", day_variant(b"n=2", b"n=0"), "count"),
    ("n=1 without records", day_variant(b"n=2 r=08:00,20,30;12:00,25.5,33", b"n=1 r="), "record"),
    ("record of two fields", day_variant(b"12:00,25.5,33", b"12:00,25.5"), "record"),
    ("record of four fields", day_variant(b"12:00,25.5,33", b"12:00,25.5,33,1"), "record"),
    ("same time twice", day_variant(b"12:00,25.5,33", b"08:00,25.5,33"), "minute"),
    ("same time twice, other values", day_variant(b"12:00,25.5,33", b"08:00,20,30"), "minute"),
    ("empty record", day_variant(b";12:00", b";;12:00"), "count"),
    # values
    ("time 24:00", day_variant(b"12:00,25.5", b"24:00,25.5"), "value"),
    ("time 7:00", day_variant(b"08:00,20", b"8:00,20"), "value"),
    ("time 12:60", day_variant(b"12:00,25.5", b"12:60,25.5"), "value"),
    ("leading zero number", day_variant(b"08:00,20,30", b"08:00,017,30"), "value"),
    ("needless .0", day_variant(b"08:00,20,30", b"08:00,17.0,30"), "value"),
    ("trailing zero", day_variant(b"25.5,33", b"25.50,33"), "value"),
    ("exponent", day_variant(b"08:00,20,30", b"08:00,1e3,30"), "value"),
    ("plus sign", day_variant(b"08:00,20,30", b"08:00,+5,30"), "value"),
    ("bare fraction", day_variant(b"25.5,33", b".5,33"), "value"),
    ("negative zero fraction", day_variant(b"08:00,20,30", b"08:00,-0.0,30"), "value"),
    ("zero fraction", day_variant(b"08:00,20,30", b"08:00,0.0,30"), "value"),
    ("negative zero temperature", day_variant(b"08:00,20,30", b"08:00,-0,30"), "value"),
    ("negative zero humidity", day_variant(b"08:00,20,30", b"08:00,20,-0"), "value"),
    ("plus zero", day_variant(b"08:00,20,30", b"08:00,+0,30"), "value"),
    ("too many decimals", day_variant(b"25.5,33", b"25.1234567,33"), "value"),
    ("nan", day_variant(b"08:00,20,30", b"08:00,nan,30"), "value"),
    ("inf", day_variant(b"08:00,20,30", b"08:00,20,inf"), "value"),
    ("four integer digits", day_variant(b"08:00,20,30", b"08:00,1000,30"), "value"),
    ("temperature above 85", day_variant(b"08:00,20,30", b"08:00,86,30"), "range"),
    ("temperature below -40", day_variant(b"08:00,20,30", b"08:00,-40.5,30"), "range"),
    ("humidity above 100", day_variant(b"08:00,20,30", b"08:00,20,100.5"), "range"),
    ("humidity below 0", day_variant(b"08:00,20,30", b"08:00,20,-1"), "range"),
    ("day 2026-02-30", day_variant(b"day=2026-03-01", b"day=2026-02-30"), "value"),
    ("day 2026-13-01", day_variant(b"day=2026-03-01", b"day=2026-13-01"), "value"),
    ("day not zero padded", day_variant(b"day=2026-03-01", b"day=2026-3-1"), "value"),
    ("part 0/1", day_variant(b"part=1/1", b"part=0/1"), "chunk"),
    ("part 3/2", day_variant(b"part=1/1", b"part=3/2"), "chunk"),
    ("part 0/0", day_variant(b"part=1/1", b"part=0/0"), "chunk"),
    ("part without parts", day_variant(b"part=1/1", b"part=1"), "value"),
    ("part leading zero", day_variant(b"part=1/1", b"part=01/2"), "value"),
    ("parts above a day", day_variant(b"part=1/1", b"part=1/1441"), "value"),
    ("device id 0", day_variant(b"dev=1", b"dev=0"), "value"),
    ("device id leading zero", day_variant(b"dev=1", b"dev=01"), "value"),
    ("device id above int32", day_variant(b"dev=1", b"dev=2147483648"), "value"),
    ("device id negative", day_variant(b"dev=1", b"dev=-1"), "value"),
    ("address not an address", day_variant(b"ip=192.168.1.2", b"ip=gateway"), "value"),
    ("address with leading zeros", day_variant(b"ip=192.168.1.2", b"ip=192.168.001.2"), "value"),
    ("address not canonical ipv6", day_variant(b"ip=192.168.1.2", b"ip=2001:0db8::2"), "value"),
    ("address ipv6 uppercase", day_variant(b"ip=192.168.1.2", b"ip=2001:DB8::2"), "value"),
    ("address ipv6 one zero group compressed", day_variant(b"ip=192.168.1.2", b"ip=2001:db8::1:1:1:1:1"), "value"),
    ("address ipv6 shorter zero run compressed", day_variant(b"ip=192.168.1.2", b"ip=2001::1:0:0:0:1"), "value"),
    ("address ipv6 second of equal runs compressed", day_variant(b"ip=192.168.1.2", b"ip=2001:db8:0:0:1::1"), "value"),
    ("address ipv4-mapped, dotted", day_variant(b"ip=192.168.1.2", b"ip=::ffff:192.168.1.2"), "value"),
    ("address ipv4-mapped, hex", day_variant(b"ip=192.168.1.2", b"ip=::ffff:c0a8:102"), "value"),
    ("address ipv6 with embedded dotted quad", day_variant(b"ip=192.168.1.2", b"ip=64:ff9b::192.168.1.2"), "value"),
    ("address scoped", day_variant(b"ip=192.168.1.2", b"ip=fe80::1%eth0"), "value"),
    ("address scoped numerically", day_variant(b"ip=192.168.1.2", b"ip=fe80::1%1"), "value"),
    ("xfer uppercase", day_variant(b"xfer=0123456789abcdef", b"xfer=0123456789ABCDEF"), "value"),
    ("xfer short", day_variant(b"xfer=0123456789abcdef", b"xfer=0123456789abcde"), "value"),
    ("ts above uint32", day_variant(b"ts=1772400000", b"ts=4294967296"), "value"),
    ("ts negative", day_variant(b"ts=1772400000", b"ts=-5"), "value"),
    ("n above a day", day_variant(b"n=2", b"n=1441"), "value"),
    # acknowledgements and pings
    ("dayack ok with reason", b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=ok why=x", "value"),
    ("dayack bad without reason", b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=bad", "value"),
    ("dayack unknown status", b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=fine", "value"),
    ("dayack reason not canonical", b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=bad why=%7e", "value"),
    ("dayack reason half escape", b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=bad why=%G1", "value"),
    ("dayack reason invalid utf-8", b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=bad why=%FF", "value"),
    ("dayack empty reason", b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=bad why=", "value"),
    ("dayack reason before status", b"meter/1 DAYACK xfer=0123456789abcdef part=1 why=x st=bad", "field"),
    ("dayack hint with ok", b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=ok after=100", "value"),
    ("dayack hint with bad", b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=bad why=x after=100", "value"),
    ("dayack hint of zero", b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=busy after=0", "value"),
    ("dayack hint leading zero", b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=busy after=0100", "value"),
    ("dayack hint not a number", b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=busy after=1.5", "value"),
    ("dayack hint past 32 bits", b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=busy after=4294967296", "value"),
    ("dayack empty hint", b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=busy after=", "value"),
    ("dayack hint before reason", b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=busy after=100 why=x", "field"),
    ("dayack hint twice", b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=busy after=100 after=100", "field"),
    ("batchack missing dup", b"meter/1 BATCHACK id=fedcba9876543210 st=ok new=1", "field"),
    ("batchack busy", b"meter/1 BATCHACK id=fedcba9876543210 st=busy new=0 dup=0 why=x", "value"),
    ("batchack negative count", b"meter/1 BATCHACK id=fedcba9876543210 st=ok new=-1 dup=0", "value"),
    ("ping leading zero", b"meter/1 PING seq=01", "value"),
    ("ping without seq", b"meter/1 PING", "field"),
    ("ping twice seq", b"meter/1 PING seq=1 seq=2", "field"),
    ("pong above uint32", b"meter/1 PONG seq=4294967296", "value"),
    # batches
    ("batch bad checksum", batch_line(checksum=f"{zlib.crc32(BATCH_RECORDS.encode()) ^ 1:08x}"), "checksum"),
    ("batch records altered", batch_line().replace(b",17,35", b",18,35"), "checksum"),
    ("batch checksum uppercase", batch_line(checksum="ABCDEF12"), "value"),
    ("batch checksum short", batch_line(checksum="abc"), "value"),
    ("batch n disagrees", batch_line(n=3), "count"),
    ("batch n above limit", batch_line(n=5001), "value"),
    ("batch record of four fields", batch_line("3,192.168.1.4,2026-03-01T02:00,17"), "record"),
    ("batch bad date", batch_line("3,192.168.1.4,2026-02-30T02:00,17,35"), "value"),
    ("batch stamp with seconds", batch_line("3,192.168.1.4,2026-03-01T02:00:00,17,35"), "value"),
    ("batch stamp 24:00", batch_line("3,192.168.1.4,2026-03-01T24:00,17,35"), "value"),
    ("batch same reading twice", batch_line("3,192.168.1.4,2026-03-01T02:00,17,35;3,192.168.1.4,2026-03-01T02:00,18,35"), "minute"),
    ("batch same reading twice, same values", batch_line("3,192.168.1.4,2026-03-01T02:00,17,35;3,192.168.1.4,2026-03-01T02:00,17,35"), "minute"),
    ("batch same device and minute, other address", batch_line("3,192.168.1.4,2026-03-01T02:00,17,35;3,192.168.1.5,2026-03-01T02:00,17,35"), "minute"),
    ("batch negative zero", batch_line("3,192.168.1.4,2026-03-01T02:00,-0,35"), "value"),
    ("batch ipv4-mapped address", batch_line("3,::ffff:c0a8:104,2026-03-01T02:00,17,35"), "value"),
    ("batch scoped address", batch_line("3,fe80::4%eth0,2026-03-01T02:00,17,35"), "value"),
    ("batch device 0", batch_line("0,192.168.1.4,2026-03-01T02:00,17,35"), "value"),
    ("batch bad address", batch_line("3,192.168.1.256,2026-03-01T02:00,17,35"), "value"),
    ("batch humidity range", batch_line("3,192.168.1.4,2026-03-01T02:00,17,101"), "range"),
    ("batch id uppercase", batch_line(id=BATCH_ID.upper()), "value"),
]


@pytest.mark.parametrize("data, code", [(data, code) for _, data, code in MALFORMED], ids=[name for name, _, _ in MALFORMED])
def test_malformed_is_refused_with_its_code(data, code):
    with pytest.raises(WireError) as raised:
        decode(data)
    assert raised.value.code == code
    assert str(raised.value).startswith(f"{code}: ")


def test_the_malformed_variants_differ_from_a_good_message_only_as_named():
    # The table above is built by editing good messages: they must decode.
    assert decode(GOOD_DAY) == chunk()
    assert decode(batch_line()) == Batch(
        BATCH_ID,
        (reading(3, "192.168.1.4", "02:00", 17, 35), reading(1, "192.168.1.2", "08:00", -3.5, 30.25, datetime.date(2026, 3, 2))),
    )
    assert decode(batch_line("")) == Batch(BATCH_ID, ())


def test_error_details_name_the_fault():
    with pytest.raises(WireError) as raised:
        decode(day_variant(b"meter/1", b"meter/2"))
    assert raised.value.detail == "version '2', this side speaks 1"
    with pytest.raises(WireError) as raised:
        decode(day_variant(b"n=2", b"n=3"))
    assert raised.value.detail == "n=3 but 2 records"
    with pytest.raises(WireError) as raised:
        decode(day_variant(b" ts=1772400000", b""))
    assert raised.value.detail == "DAY expects ts before n"
    with pytest.raises(WireError) as raised:
        decode(GOOD_DAY.split(b" r=")[0])
    assert raised.value.detail == "DAY misses r"
    with pytest.raises(WireError) as raised:
        decode(day_variant(b"08:00,20,30", b"08:00,86,30"))
    assert raised.value.detail == "temperature 86 outside -40..85 °C"


def test_a_minute_twice_is_refused_not_reduced_to_the_first():
    with pytest.raises(WireError) as raised:
        decode(day_variant(b"12:00,25.5,33", b"08:00,20,30"))
    assert str(raised.value) == "minute: time 08:00 twice in one message"
    with pytest.raises(WireError) as raised:
        decode(batch_line("3,192.168.1.4,2026-03-01T02:00,17,35;3,192.168.1.4,2026-03-01T02:00,17,35"))
    assert str(raised.value) == "minute: device 3 at 2026-03-01T02:00 twice in one batch"


@pytest.mark.parametrize(
    "text, detail",
    [
        ("::ffff:192.168.1.2", "device address '::ffff:192.168.1.2' is IPv4-mapped: write it as 192.168.1.2"),
        ("::ffff:c0a8:102", "device address '::ffff:c0a8:102' is IPv4-mapped: write it as 192.168.1.2"),
        ("fe80::1%eth0", "device address 'fe80::1%eth0' has a zone (scoped addresses are not device addresses)"),
        ("2001:DB8::2", "device address '2001:DB8::2' is not canonical (2001:db8::2)"),
        ("64:ff9b::192.168.1.2", "device address '64:ff9b::192.168.1.2' is not canonical (64:ff9b::c0a8:102)"),
    ],
)
def test_address_errors_say_what_to_write(text, detail):
    with pytest.raises(WireError) as raised:
        decode(day_variant(b"ip=192.168.1.2", b"ip=" + text.encode()))
    assert (raised.value.code, raised.value.detail) == ("value", detail)


def test_negative_zero_is_written_as_zero():
    # -0.0 is a float (a sensor rounding -0.04 to one decimal makes it); its
    # one text is 0, as the decoder accepts only that.
    data = encode(chunk(readings=(reading(t=-0.0, h=-0.0),)))
    assert data.endswith(b" n=1 r=08:00,0,0")
    assert decode(data) == chunk(readings=(reading(t=0.0, h=0.0),))
    assert encode(Batch(BATCH_ID, (reading(t=-0.0),))).endswith(b"r=1,192.168.1.2,2026-03-01T08:00,0,30")


def test_oversized_input_is_refused_before_parsing():
    with pytest.raises(WireError) as raised:
        decode(GOOD_DAY, max_size=len(GOOD_DAY) - 1)
    assert raised.value.code == "size"
    assert decode(GOOD_DAY, max_size=len(GOOD_DAY)) == chunk()
    with pytest.raises(WireError) as raised:
        decode(b"meter/1 PING seq=1" + b"0" * wire.MAX_LINE)
    assert raised.value.code == "size"


def test_datagram_limit_refuses_a_larger_datagram():
    big = b"x" * (wire.MAX_DATAGRAM + 1)
    with pytest.raises(WireError) as raised:
        decode(big, max_size=wire.MAX_DATAGRAM)
    assert raised.value.code == "size"


def test_wire_error_is_a_value_error():
    assert issubclass(WireError, ValueError)


def test_a_bounded_cache_holds_at_most_its_limit_and_starts_afresh_when_full():
    cache = BoundedCache(2)
    assert cache.remember("1", 1) == 1
    cache.remember("2", 2)
    assert cache.entries == {"1": 1, "2": 2}
    cache.remember("3", 3)
    assert cache.entries == {"3": 3}
    # a plain dict: a set's difference looks its values up in it
    assert type(cache.entries) is dict
    assert {"2", "3"}.difference(cache.entries) == {"2"}


def test_values_checked_once_are_taken_from_their_cache_and_refused_ones_are_not_kept():
    text = "17.123"
    assert decode(day_variant(b"08:00,20,30", b"08:00," + text.encode() + b",30")).readings[0].temperature_c == 17.123
    assert TEMPERATURES.entries[text] == 17.123
    with pytest.raises(WireError):
        decode(day_variant(b"08:00,20,30", b"08:00,17.1230,30"))
    assert "17.1230" not in TEMPERATURES.entries


# -- split_day --------------------------------------------------------------


def minutes_of_day(count=1440, t=17.0, h=35.0, ip="192.168.1.2", device_id=1):
    return tuple(
        Reading(device_id, ip, datetime.datetime.combine(DAY, datetime.time(m // 60, m % 60)), t, h) for m in range(count)
    )


def joined(chunks):
    return tuple(r for c in chunks for r in c.readings)


def test_a_day_of_minutes_fits_in_1200_byte_chunks():
    readings = minutes_of_day()
    chunks = split_day(1, "192.168.1.2", DAY, readings, XFER, 1772400000, 1200)
    sizes = [len(seal(encode(c), KEY)) for c in chunks]
    assert max(sizes) <= 1200
    assert joined(chunks) == readings
    assert [c.part for c in chunks] == list(range(1, len(chunks) + 1))
    assert {c.parts for c in chunks} == {len(chunks)}
    assert {(c.xfer, c.sent_at, c.day, c.device_id, c.device_ip) for c in chunks} == {
        (XFER, 1772400000, DAY, 1, "192.168.1.2")
    }
    # Packed greedily: every chunk but the last is nearly full.
    assert all(size > 1200 - 20 for size in sizes[:-1])
    total = sum(len(f"{r.taken_at:%H:%M},17,35") + 1 for r in readings)
    assert len(chunks) <= total // 1000 + 1
    for c in chunks:
        assert decode(encode(c), max_size=wire.MAX_DATAGRAM) == c


@pytest.mark.parametrize("max_bytes", [300, 301, 347, 512, 999, 1200, 1280, 4000, 65507])
@pytest.mark.parametrize(
    "t, h, ip, device_id",
    [(17, 35, "192.168.1.2", 1), (-39.12345, 99.54321, "2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff", wire.MAX_DEVICE_ID)],
)
def test_every_chunk_fits_max_bytes(max_bytes, t, h, ip, device_id):
    readings = minutes_of_day(t=t, h=h, ip=ip, device_id=device_id)
    chunks = split_day(device_id, ip, DAY, readings, XFER, 4294967295, max_bytes)
    assert all(len(seal(encode(c), KEY)) <= max_bytes for c in chunks)
    assert joined(chunks) == readings


@pytest.mark.parametrize(
    "device_id, ip", [(1, "192.168.1.2"), (wire.MAX_DEVICE_ID, "2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff")]
)
def test_a_chunk_of_the_widest_header_filling_its_room_seals_to_max_bytes(device_id, ip):
    # The widest header a chunk can have: part MAX_READINGS/MAX_READINGS,
    # the latest start time, and MAX_READINGS readings (n= of four digits).
    # Its records take exactly the room chunk_room leaves, so the header and
    # tag chunk_room reserves must be all of the rest: not a byte more.
    readings = minutes_of_day(wire.MAX_READINGS, ip=ip, device_id=device_id)
    widest = DayChunk(device_id, ip, DAY, XFER, wire.MAX_READINGS, wire.MAX_READINGS, 4294967295, readings)
    reserved = 1200 - wire.chunk_room(device_id, ip, DAY, 1200)
    max_bytes = reserved + len(widest.records)
    assert wire.chunk_room(device_id, ip, DAY, max_bytes) == len(widest.records)
    sealed = seal(encode(widest), KEY)
    assert len(sealed) == max_bytes
    assert decode(wire.unseal(sealed, KEY), max_size=wire.MAX_DATAGRAM) == widest


def test_a_small_day_is_one_chunk():
    readings = minutes_of_day(4)
    assert split_day(1, "192.168.1.2", DAY, readings, XFER, 7) == [
        DayChunk(1, "192.168.1.2", DAY, XFER, 1, 1, 7, readings)
    ]


def test_an_empty_day_is_one_empty_chunk():
    assert split_day(1, "192.168.1.2", DAY, (), XFER, 7) == [DayChunk(1, "192.168.1.2", DAY, XFER, 1, 1, 7, ())]


def test_day_chunk_records_are_the_record_texts_of_split_day():
    # What a load generator prepares before its clock starts is exactly what
    # a device sends, whatever the transfer id and start time.
    readings = minutes_of_day(300, t=-3.25, h=41.5)
    texts = wire.day_chunk_records(1, "192.168.1.2", DAY, readings)
    for sent_at in (0, 7, 1772400000, 4294967295):
        chunks = split_day(1, "192.168.1.2", DAY, readings, XFER, sent_at)
        assert [c.records for c in chunks] == texts
        assert all(len(seal(encode(c), KEY)) <= wire.DEFAULT_CHUNK_BYTES for c in chunks)
    assert len(texts) > 1


@pytest.mark.parametrize(
    "reading",
    [
        Reading(2, "192.168.1.2", datetime.datetime(2026, 3, 1, 0, 0), 17, 35),
        Reading(1, "192.168.1.3", datetime.datetime(2026, 3, 1, 0, 0), 17, 35),
        Reading(1, "192.168.1.2", datetime.datetime(2026, 3, 2, 0, 0), 17, 35),
    ],
)
def test_split_day_refuses_a_reading_of_another_device_or_day(reading):
    with pytest.raises(ValueError, match="does not belong in a chunk of device 1 on 2026-03-01"):
        split_day(1, "192.168.1.2", DAY, minutes_of_day(3) + (reading,), XFER, 7)


def test_split_day_refuses_a_size_that_holds_no_reading():
    with pytest.raises(ValueError):
        split_day(1, "192.168.1.2", DAY, minutes_of_day(2), XFER, 7, max_bytes=100)


# -- refusal ----------------------------------------------------------------


def refused(data: bytes):
    with pytest.raises(WireError) as raised:
        decode(data)
    return refusal(data, raised.value), raised.value


def test_refusal_of_a_day_names_the_error():
    answer, error = refused(GOOD_DAY.replace(b"part=1/1", b"part=2/3").replace(b"08:00,20,30", b"08:00,86,30"))
    assert answer == DayAck(XFER, 2, "bad", "range: temperature 86 outside -40..85 °C")
    assert answer.reason == str(error)
    # it can be sent: it encodes and decodes back
    assert decode(encode(answer)) == answer


def test_refusal_of_a_bad_day_record_and_other_version():
    answer, _ = refused(day_variant(b"n=2", b"n=5"))
    assert answer == DayAck(XFER, 1, "bad", "count: n=5 but 2 records")
    answer, _ = refused(day_variant(b"meter/1", b"meter/2"))
    assert answer == DayAck(XFER, 1, "bad", "version: version '2', this side speaks 1")


def test_refusal_of_a_batch_names_the_error():
    data = batch_line().replace(b",17,35", b",18,35")
    answer, error = refused(data)
    assert isinstance(answer, BatchAck)
    assert (answer.batch_id, answer.status, answer.new, answer.dup) == (BATCH_ID, "bad", 0, 0)
    assert answer.reason == str(error)
    assert answer.reason.startswith("checksum: records do not match sum=")
    assert decode(encode(answer)) == answer


@pytest.mark.parametrize(
    "data",
    [
        b"hello",
        b"",
        b"meter/1 PING seq=01",
        b"meter/1 BATCHACK id=fedcba9876543210 st=ok new=1",
        day_variant(b"xfer=0123456789abcdef", b"xfer=0123456789ABCDEF"),
        day_variant(b"part=1/1", b"part=0/1"),
        batch_line(id="not-an-id"),
    ],
)
def test_refusal_is_none_when_no_id_can_be_read(data):
    answer, _ = refused(data)
    assert answer is None


# -- sealing (HMAC-SHA256 tags of device datagrams) -------------------------


def test_seal_appends_a_tag_that_unseal_verifies():
    body = encode(chunk())
    sealed = seal(body, KEY)
    assert sealed.startswith(body + b" mac=")
    assert len(sealed) == len(body) + wire.TAG_LENGTH == len(body) + 69
    assert wire.unseal(sealed, KEY) == body
    assert wire.split_tag(sealed) == (body, sealed[-64:])
    assert wire.tag_ok(body, sealed[-64:], KEY)


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + (b"0" if data[-1:] != b"0" else b"1")


@pytest.mark.parametrize(
    "sealed, key",
    [
        (seal(GOOD_DAY, KEY), bytes(32)),  # another device's key
        (seal(GOOD_DAY, KEY).replace(b"n=2", b"n=3"), KEY),  # body altered
        (_flip_last(seal(GOOD_DAY, KEY)), KEY),  # tag altered
        (seal(GOOD_DAY, KEY)[:-64] + seal(GOOD_DAY, KEY)[-64:].upper(), KEY),  # tag in uppercase hex
    ],
    ids=["wrong key", "body altered", "tag altered", "tag uppercase"],
)
def test_unseal_refuses_a_wrong_tag(sealed, key):
    with pytest.raises(WireError) as raised:
        wire.unseal(sealed, key)
    assert raised.value.code == "auth"
    assert raised.value.detail == "authentication tag does not match"


@pytest.mark.parametrize("data", [GOOD_DAY, b"", b"x" * 68, GOOD_DAY + b" mac=" + b"0" * 63])
def test_unseal_refuses_a_missing_tag(data):
    with pytest.raises(WireError) as raised:
        wire.unseal(data, KEY)
    assert raised.value.code == "auth"
    assert raised.value.detail == "no authentication tag"


def test_claimed_device_is_read_before_parsing():
    assert wire.claimed_device(GOOD_DAY) == 1
    assert wire.claimed_device(day_variant(b"dev=1", b"dev=2147483647")) == 2147483647
    assert wire.claimed_device(day_variant(b"dev=1", b"dev=0")) is None
    assert wire.claimed_device(day_variant(b"dev=1", b"dev=01")) is None
    assert wire.claimed_device(b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=ok") is None
    assert wire.claimed_device(b"garbage") is None


def test_a_day_of_another_version_claims_its_device_and_is_refused_with_version():
    # So a gateway verifies its tag under the device's key and answers it
    # bad with the reason, instead of dropping it as a stranger's.
    body = day_variant(b"meter/1", b"meter/2")
    assert wire.claimed_device(body) == 1
    assert wire.claimed_device(day_variant(b"meter/1", b"meter/12")) == 1
    answer, _ = refused(body)
    assert answer == DayAck(XFER, 1, "bad", "version: version '2', this side speaks 1")


def test_refusal_reason_is_bounded_so_the_answer_fits():
    # the error quotes the offending record, which may be most of the input
    data = day_variant(b"12:00,25.5,33", b"12:00,25.5,33," + b":" * 60000)
    answer, error = refused(data)
    assert len(str(error)) > 60000
    assert len(answer.reason) == wire.MAX_REASON
    assert answer.reason == str(error)[: wire.MAX_REASON - 3] + "..."
    assert len(seal(encode(answer), KEY)) < 1200
    assert decode(encode(answer)) == answer


# -- the TCP hop ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_without_nagle_sets_no_delay_on_a_real_tcp_connection():
    from twisted.internet import reactor

    connected = Deferred()

    class Accept(Protocol):
        def connectionMade(self):
            wire.without_nagle(self.transport)
            connected.callback(self.transport.getHandle())

    port = reactor.listenTCP(0, Factory.forProtocol(Accept), interface="127.0.0.1")
    client = await ClientCreator(reactor, Protocol).connectTCP("127.0.0.1", port.getHost().port)
    try:
        accepted = await connected
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert client.transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    finally:
        client.transport.loseConnection()
        await port.stopListening()


class Asked:
    """
    A transport that records which attributes it was asked for, offering
    C{setTcpNoDelay} (recording its argument) only if told it is TCP.
    """

    def __init__(self, tcp: bool):
        self.tcp = tcp
        self.asked: list[str] = []
        self.no_delay: list[bool] = []

    def __getattr__(self, name):
        self.asked.append(name)
        if name == "setTcpNoDelay" and self.tcp:
            return self.no_delay.append
        raise AttributeError(name)


def test_without_nagle_sets_no_delay_on_tcp_and_leaves_another_transport_alone():
    tcp, other = Asked(tcp=True), Asked(tcp=False)
    wire.without_nagle(tcp)
    wire.without_nagle(other)
    assert (tcp.asked, tcp.no_delay) == (["setTcpNoDelay"], [True])
    assert (other.asked, other.no_delay) == (["setTcpNoDelay"], [])


class Lines(wire.LineProtocol):
    """
    A LineProtocol that records what it was given, and closes its
    connection on a line C{close}.
    """

    MAX_LENGTH = 10

    def __init__(self):
        self.lines: list[bytes] = []
        self.too_long: list[bytes] = []

    def lineReceived(self, line):
        self.lines.append(line)
        if line == b"close":
            self.transport.loseConnection()

    def lineLengthExceeded(self, line):
        self.too_long.append(line)


def connected_lines() -> tuple[Lines, StringTransport]:
    protocol, transport = Lines(), StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=10).map(lambda b: b.replace(b"\n", b"")), max_size=8), st.data())
def test_line_protocol_gives_each_line_whole_however_the_bytes_are_cut(lines, data):
    stream = b"".join(line + b"\n" for line in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    protocol, _ = connected_lines()
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        protocol.dataReceived(stream[start:end])
    assert protocol.lines == lines
    assert protocol.too_long == []


def test_line_protocol_holds_a_line_begun_until_its_end():
    protocol, _ = connected_lines()
    protocol.dataReceived(b"ab")
    protocol.dataReceived(b"cd")
    assert protocol.lines == []
    protocol.dataReceived(b"e\nf")
    assert protocol.lines == [b"abcde"]
    protocol.dataReceived(b"\n")
    assert protocol.lines == [b"abcde", b"f"]


def test_line_protocol_refuses_a_line_over_its_limit_whole_or_begun():
    protocol, _ = connected_lines()
    protocol.dataReceived(b"0123456789\n")  # at the limit: a line
    protocol.dataReceived(b"0123456789a\nnext\n")  # over it: refused, and the rest unread
    assert protocol.lines == [b"0123456789"]
    assert protocol.too_long == [b"0123456789a"]
    protocol, _ = connected_lines()
    protocol.dataReceived(b"012345")
    protocol.dataReceived(b"6789ab")  # no end yet, already too long
    assert protocol.too_long == [b"0123456789ab"]


def test_line_protocol_reads_no_further_once_a_line_closed_the_connection():
    protocol, transport = connected_lines()
    protocol.dataReceived(b"one\nclose\ntwo\n")
    assert transport.disconnecting
    assert protocol.lines == [b"one", b"close"]


def test_line_protocol_sends_a_line_with_its_end():
    protocol, transport = connected_lines()
    protocol.sendLine(b"meter/1 PING seq=1")
    assert transport.value() == b"meter/1 PING seq=1\n"


class _ClosingLines(Lines):
    """
    L{Lines} closing its connection on a line too long, as
    C{LineOnlyReceiver} does.  What it is told once its connection is
    closing does not count: nothing reads it.
    """

    def lineLengthExceeded(self, line):
        if not self.transport.disconnecting:
            self.too_long.append(line)
        self.transport.loseConnection()


class _TwistedLines(_ClosingLines):
    """
    The same, reading as C{LineOnlyReceiver} itself reads.
    """

    dataReceived = LineOnlyReceiver.dataReceived


def test_line_protocol_is_twisteds_line_only_receiver_of_newline_ended_lines():
    assert issubclass(wire.LineProtocol, LineOnlyReceiver)
    assert wire.LineProtocol.delimiter == b"\n"
    assert wire.LineProtocol.MAX_LENGTH == wire.MAX_LINE


def test_line_protocol_closes_on_a_line_too_long_as_line_only_receiver_does():
    class Plain(wire.LineProtocol):
        MAX_LENGTH = 4

        def lineReceived(self, line):
            raise AssertionError(line)

    protocol, transport = Plain(), StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"01234\n")
    assert transport.disconnecting


_stream_lines = st.lists(
    st.one_of(st.binary(max_size=14).map(lambda b: b.replace(b"\n", b"")), st.just(b"close")), max_size=8
)


@settings(max_examples=200, deadline=None)
@given(_stream_lines, st.booleans(), st.data())
def test_line_protocol_reads_as_line_only_receiver_however_the_bytes_are_cut(lines, ended, data):
    stream = b"".join(line + b"\n" for line in lines)
    if not ended:
        stream += data.draw(st.binary(max_size=14).map(lambda b: b.replace(b"\n", b"")), "unended")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6), "cuts"))
    fast, twisted = _ClosingLines(), _TwistedLines()
    for protocol in (fast, twisted):
        protocol.makeConnection(StringTransport())
        for start, end in zip([0, *cuts], [*cuts, len(stream)]):
            protocol.dataReceived(stream[start:end])
    assert fast.lines == twisted.lines
    assert fast.too_long == twisted.too_long
    assert fast.transport.disconnecting == twisted.transport.disconnecting
