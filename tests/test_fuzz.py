"""
Bounded fuzzing of the two daemons' input paths, with the real code behind
them: the gateway's GatewayProtocol and Intake over a real Spool (SQLite on
its Database), and the cloud's CloudProtocol over a real CloudStore.

Each test feeds tens of thousands of seeded random and mutated inputs (valid
frames with bytes flipped, inserted, deleted, cut, tokens swapped for odd
values; for the gateway also mutated bodies sealed again with the right key,
so they get past authentication to the decoder and the intake; for the cloud
mutated records with their checksum made right again, so they reach the
record decoder), then asserts:

- no exception escaped and Twisted logged no failure;
- nobody without a key got an answer, and nothing they sent reached the spool;
- every answer is a well-formed message;
- the database holds exactly the readings of what was acknowledged, each a
  valid reading;
- the daemon still serves a well-formed peer afterwards.
"""

from __future__ import annotations

import datetime
import gc
import math
import random
import re
import sqlite3
import zlib

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import FakeDatagramTransport, StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure

from meter import cloud, wire
from meter.database import Database, connect
from meter.gateway import CloudClientProtocol, GatewayProtocol, Intake
from meter.reading import HUMIDITY_RANGE, TEMPERATURE_RANGE, Reading, format_number
from meter.gateway.spool import Spool, content_digest
from meter.testing import device_keys

NOW = 1_795_320_000
DAYS = [datetime.date(2026, 11, 20), datetime.date(2026, 11, 21), datetime.date(2026, 11, 22)]
FLEET = {1: "192.168.1.2", 2: "192.168.1.3", 3: "fd00::4"}
KEYS = device_keys(FLEET)
GOOD = ("192.168.1.2", 40000)  # where the key holders send from
EVIL = ("192.168.1.66", 40066)  # where everything unauthenticated comes from

GATEWAY_INPUTS = 50_000
CLOUD_INPUTS = 50_000
ISO_MINUTE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}\Z")

# -- a seeded mutator -------------------------------------------------------------

ODD_VALUES = [
    b"", b"0", b"00", b"01", b"-0", b"-1", b"+1", b"1e3", b"nan", b"NaN", b"inf", b"-inf", b"0x10", b"4294967295",
    b"4294967296", b"2147483647", b"2147483648", b"99999999999", b"17.0", b"17.1234567", b".5", b"85", b"85.000001",
    b"-40.000001", b"100.000001", b"101", b"0.00001", b"0001-01-01", b"0001-01-02", b"0999-12-31", b"9999-12-31",
    b"2026-02-29", b"2024-02-29", b"2026-13-01", b"24:00", b"23:59", b"2026-11-21T24:00", b"1/1", b"0/1", b"2/1",
    b"1/1440", b"1/1441", b"1440/1440", b"0123456789ABCDEF", b"0123456789abcdef", b"192.168.1.2", b"192.168.1.3",
    b"192.168.001.002", b"fd00::4", b"FD00::4", b"fe80::1%eth0", b"::ffff:192.168.1.2", b"ok", b"bad", b"busy", b"%",
    b"%zz", b"%ff", b"%C3%A9", b"a%20b", b"\xff", b"\x00", b"\t", b"\r", b";", b",", b";;", b"08:00,20,30",
]
TOKENS = [b" ", b"=", b";", b",", b"/", b"\n", b"0", b"9", b"a", b" mac=", b" why=", b" why=x", b" r=", b"meter/1 "]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """
    One to three random edits of C{data}.
    """
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        n = len(data)
        kind = rng.randrange(8)
        if kind == 0 and n:  # flip a byte
            i = rng.randrange(n)
            data = data[:i] + bytes([rng.randrange(256)]) + data[i + 1 :]
        elif kind == 1:  # insert bytes
            i = rng.randrange(n + 1)
            piece = rng.choice(TOKENS) if rng.random() < 0.5 else rng.randbytes(rng.randrange(1, 9))
            data = data[:i] + piece + data[i:]
        elif kind == 2 and n:  # delete a run
            i = rng.randrange(n)
            data = data[:i] + data[i + rng.randrange(1, 17) :]
        elif kind == 3:  # truncate
            data = data[: rng.randrange(n + 1)]
        elif kind == 4:  # a token's value swapped for an odd one
            tokens = data.split(b" ")
            i = rng.randrange(len(tokens))
            key, equals, _ = tokens[i].partition(b"=")
            tokens[i] = key + equals + rng.choice(ODD_VALUES) if equals else rng.choice(ODD_VALUES)
            data = b" ".join(tokens)
        elif kind == 5:  # a token repeated
            tokens = data.split(b" ")
            i = rng.randrange(len(tokens))
            data = b" ".join(tokens[: i + 1] + tokens[i:])
        elif kind == 6:  # two tokens swapped
            tokens = data.split(b" ")
            i, j = rng.randrange(len(tokens)), rng.randrange(len(tokens))
            tokens[i], tokens[j] = tokens[j], tokens[i]
            data = b" ".join(tokens)
        else:  # a record's field swapped for an odd value
            records = data.split(b";")
            i = rng.randrange(len(records))
            fields = records[i].split(b",")
            fields[rng.randrange(len(fields))] = rng.choice(ODD_VALUES)
            records[i] = b",".join(fields)
            data = b";".join(records)
    return data


def value(rng: random.Random, low: float, high: float) -> float:
    return rng.randint(int(low * 10**6), int(high * 10**6)) / 10**6 if rng.random() < 0.7 else float(rng.randint(int(low), int(high)))


def reading(rng: random.Random, device_id: int, ip: str, day: datetime.date, minute: int) -> Reading:
    return Reading(
        device_id,
        ip,
        datetime.datetime.combine(day, datetime.time(minute // 60, minute % 60)),
        value(rng, *TEMPERATURE_RANGE),
        value(rng, *HUMIDITY_RANGE),
    )


def check_row(device_id, device_ip, taken_at, temperature, humidity) -> None:
    """
    A stored row is a valid reading, whatever reached the daemon.
    """
    assert isinstance(device_id, int) and 1 <= device_id <= wire.MAX_DEVICE_ID
    assert ISO_MINUTE.match(taken_at), taken_at
    datetime.datetime.fromisoformat(taken_at)
    for number, (low, high) in ((temperature, TEMPERATURE_RANGE), (humidity, HUMIDITY_RANGE)):
        assert isinstance(number, float) and math.isfinite(number) and low <= number <= high
    # and it travels: it encodes and decodes as itself
    r = Reading(device_id, device_ip, datetime.datetime.fromisoformat(taken_at), temperature, humidity)
    assert wire.decode(wire.encode(wire.Batch("0" * 16, (r,)))).readings == (r,)


def no_failures_logged(events) -> None:
    gc.collect()  # a Deferred that failed unhandled logs it when collected
    bad = [e for e in events if "log_failure" in e or e.get("log_level") == LogLevel.critical]
    assert bad == [], bad[:3]


# -- the gateway ---------------------------------------------------------------------


def random_chunk(rng: random.Random, now: float, xfers: list[str]) -> wire.DayChunk:
    device_id = rng.choice(list(FLEET))
    ip, day = FLEET[device_id], rng.choice(DAYS)
    parts = rng.choice((1, 1, 2, 3))
    minutes = rng.sample(range(24 * 60), rng.randrange(0, 12))
    # now and then a transfer id seen before (duplicates, inconsistent chunks)
    xfer = rng.choice(xfers) if rng.random() < 0.3 else rng.randbytes(8).hex()
    # now and then a start near the replay window's edges
    sent_at = int(now) - rng.randrange(0, 30)
    if rng.random() < 0.1:
        sent_at = int(now) + rng.choice((-1, 1)) * rng.randrange(590, 700)
    readings = tuple(reading(rng, device_id, ip, day, m) for m in sorted(minutes))
    return wire.DayChunk(device_id, ip, day, xfer, rng.randint(1, parts), parts, sent_at, readings)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("seed", [20261121])
async def test_fuzz_the_gateway(tmp_path, seed):
    rng = random.Random(seed)
    path = tmp_path / "spool.sqlite"
    connection, recovered = Spool.open(path)
    database = Database(connection, reactor)
    spool = Spool(database, recovered.depth)
    clock = task.Clock()
    clock.advance(NOW)
    intake = Intake(
        FLEET, spool, clock, 60.0, lambda: None, spool_limit=10**7, replay_window=600.0,
        reassembly_timeout=300.0, max_reassemblies=50,
        # Three devices send thousands of transfers: past a real device's
        # daily bounds, which tests/test_admission.py tries.
        max_transfers_per_day=10**6, max_parts_per_day=10**6,
    )
    intake.recover(recovered)
    protocol = GatewayProtocol(intake, KEYS, clock, source_rate=1e9, source_burst=1e9)
    transport = FakeDatagramTransport()
    protocol.makeConnection(transport)
    xfers = [rng.randbytes(8).hex() for _ in range(40)]
    authentic: set[bytes] = set()  # every body sealed with its device's right key
    kinds = dict.fromkeys(["valid", "resealed", "mutated", "random", "wrong key", "unsealed"], 0)
    try:
        with capturedLogs() as events:
            for i in range(GATEWAY_INPUTS):
                if i % 2000 == 1999:
                    await database.flush()
                    clock.advance(rng.uniform(0, 40))  # deadlines and reassembly expiries fire
                body = wire.encode(random_chunk(rng, clock.seconds(), xfers))
                device_id = wire.claimed_device(body)
                roll = rng.random()
                if roll < 0.10:
                    kind, addr, data = "valid", GOOD, wire.seal(body, KEYS[device_id])
                elif roll < 0.50:
                    body = mutate(rng, body)
                    claimed = wire.claimed_device(body)
                    kind, addr, data = "resealed", GOOD, wire.seal(body, KEYS.get(claimed, KEYS[device_id]))
                elif roll < 0.75:
                    sealed = wire.seal(body, KEYS[device_id])
                    data = mutate(rng, sealed)
                    if data == sealed:  # (a mutation that undid itself)
                        data += b" "
                    kind, addr = "mutated", EVIL
                elif roll < 0.85:
                    kind, addr, data = "random", EVIL, rng.randbytes(rng.randrange(0, 300))
                elif roll < 0.95:
                    key = rng.choice([bytes(32), KEYS[device_id % 3 + 1], rng.randbytes(32)])
                    kind, addr, data = "wrong key", EVIL, wire.seal(body, key)
                else:
                    kind, addr, data = "unsealed", EVIL, body
                if addr == GOOD:
                    authentic.add(body)
                kinds[kind] += 1
                protocol.datagramReceived(data, addr)
            await database.flush()

            # Afterwards a well-formed device is served as ever.
            fresh = wire.DayChunk(
                2, FLEET[2], DAYS[1], "f" * 16, 1, 1, int(clock.seconds()),
                (Reading(2, FLEET[2], datetime.datetime(2026, 11, 21, 23, 59), 21.5, 40.0),),
            )
            before = len(transport.written)
            authentic.add(wire.encode(fresh))
            protocol.datagramReceived(wire.seal(wire.encode(fresh), KEYS[2]), GOOD)
            await database.flush()
            (answer, to), = transport.written[before:]
            assert to == GOOD
            assert wire.decode(wire.unseal(answer, KEYS[2])) == wire.DayAck("f" * 16, 1, "ok")
            intake.stop()
        no_failures_logged(events)
    finally:
        await database.stop()

    # Nobody without a key got an answer or reached the spool.
    assert [to for _, to in transport.written if to != GOOD] == []
    with sqlite3.connect(str(path)) as other:
        digests = {digest for (digest,) in other.execute("SELECT digest FROM parts")}
    assert digests <= {content_digest(body) for body in authentic}
    metrics = intake.metrics
    assert metrics.spool_failures == 0
    assert sum(kinds.values()) == GATEWAY_INPUTS
    assert metrics.dropped_bad_tag + metrics.dropped_no_tag + metrics.dropped_unknown_device >= (
        kinds["mutated"] + kinds["random"] + kinds["wrong key"] + kinds["unsealed"]
    )
    # Every answer is a sealed acknowledgement under one of the fleet's keys.
    statuses = {"ok": 0, "bad": 0, "busy": 0}
    for data, _ in transport.written:
        for key in KEYS.values():
            try:
                message = wire.decode(wire.unseal(data, key), max_size=wire.MAX_DATAGRAM)
            except wire.WireError:
                continue
            assert isinstance(message, wire.DayAck)
            statuses[message.status] += 1
            break
        else:
            raise AssertionError(f"an answer no fleet key verifies: {data[:80]!r}")
    # It was a real fight: plenty accepted, plenty refused, all of it dropped.
    assert statuses["ok"] > 1000 and statuses["bad"] > 1000, statuses
    assert metrics.chunks > 1000

    # The spool holds only chunks sent with their device's key, one row
    # each with all its readings as canonical text, and as many readings as
    # the spool told the intake were new (a chunk spooled again under a
    # message id the spool still holds adds nothing), each reading valid.
    sent = set()
    for body in authentic:
        try:
            chunk = wire.decode(body, max_size=wire.MAX_DATAGRAM)
        except wire.WireError:
            continue
        if not isinstance(chunk, wire.DayChunk):
            continue
        sent.add((
            chunk.day.isoformat(),
            chunk.device_id,
            chunk.device_ip,
            ";".join(
                f"{r.taken_at:%H:%M},{format_number(r.temperature_c)},{format_number(r.humidity_pct)}"
                for r in chunk.readings
            ),
            len(chunk.readings),
        ))
    with sqlite3.connect(str(path)) as other:
        rows = other.execute("SELECT day, device_id, device_ip, records, n FROM chunks ORDER BY seq").fetchall()
    assert len(rows) > 1000
    assert set(rows) <= sent
    assert sum(n for *_, n in rows) == metrics.readings == spool.depth
    for day, device_id, device_ip, records, n in rows:
        assert FLEET[device_id] == device_ip
        assert len(records.split(";")) == n
        for record in records.split(";"):
            hhmm, temperature, humidity = record.split(",")
            check_row(device_id, device_ip, f"{day}T{hhmm}", float(temperature), float(humidity))


# -- the cloud --------------------------------------------------------------------------


def acknowledged(lines: list[bytes], answers: bytes) -> list[wire.Batch]:
    """
    The batches among C{lines} (sent on one connection) that C{answers} (what
    the cloud wrote back) acknowledged as stored, in the order of their
    acknowledgements.
    """
    sent: dict[str, wire.Batch] = {}
    for line in lines:
        try:
            message = wire.decode(line)
        except wire.WireError:
            continue
        if isinstance(message, wire.Batch):
            sent[message.batch_id] = message
    batches = []
    for line in answers.splitlines():
        answer = wire.decode(line)
        if isinstance(answer, wire.BatchAck) and answer.status == "ok":
            batches.append(sent[answer.batch_id])  # only a batch this connection sent
    return batches


DEVICE_POOL = [(1, "192.168.1.2"), (2, "192.168.1.3"), (3, "fd00::4"), (2147483647, "10.255.255.254")]


def random_batch(rng: random.Random) -> wire.Batch:
    keys = {(rng.choice(DEVICE_POOL), rng.choice(DAYS), rng.randrange(24 * 60)) for _ in range(rng.randrange(0, 16))}
    return wire.Batch(
        rng.randbytes(8).hex(),
        tuple(reading(rng, device_id, ip, day, minute) for (device_id, ip), day, minute in sorted(keys)),
    )


def resummed(line: bytes) -> bytes:
    """
    C{line} with its C{sum=} made right again for whatever follows C{ r=}.
    """
    head, sep, records = line.partition(b" r=")
    if not sep:
        return line
    return re.sub(rb" sum=[^ ]*", b" sum=%08x" % zlib.crc32(records), head, count=1) + sep + records


def cloud_input(rng: random.Random) -> bytes:
    roll = rng.random()
    line = wire.encode(random_batch(rng))
    if roll < 0.12:
        return line
    if roll < 0.50:
        return resummed(mutate(rng, line))
    if roll < 0.75:
        return mutate(rng, line)
    if roll < 0.85:
        return mutate(rng, wire.encode(rng.choice([wire.Ping(rng.randrange(2**32)), wire.Pong(1), wire.BatchAck("0" * 16, "ok")])))
    if roll < 0.95:
        return rng.randbytes(rng.randrange(0, 200))
    if roll < 0.975:
        # a long malformed record, quoted by the refusal's reason
        return resummed(line.replace(b" r=", b" r=" + b"%" * rng.randrange(1000, 100_000), 1))
    return rng.randbytes(rng.randrange(1000, 100_000))


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("seed", [20261122])
async def test_fuzz_the_cloud(tmp_path, seed):
    rng = random.Random(seed)
    path = tmp_path / "cloud.sqlite"
    connection = connect(path)
    cloud.open_database(connection)
    readings = cloud.SQLiteReadingStore(connection, reactor)
    database = readings.database
    clock = task.Clock()
    clock.advance(NOW)
    console: list[str] = []
    store = cloud.CloudStore(readings, lambda text: console.extend(text.splitlines()), clock)
    factory = cloud.CloudFactory(store, 120.0, clock)
    inputs = 0
    sessions = 0

    def connected():
        protocol = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5555))
        protocol.makeConnection(transport)
        return protocol, transport

    def check_output(transport) -> None:
        for line in transport.value().splitlines():
            # every answer is a message the gateway reads
            assert len(line) <= CloudClientProtocol.MAX_LENGTH
            message = wire.decode(line)
            assert isinstance(message, (wire.BatchAck, wire.Pong)), message

    try:
        with capturedLogs() as events:
            outputs = []
            while inputs < CLOUD_INPUTS:
                sessions += 1
                if sessions % 300 == 0:
                    await database.flush()
                protocol, transport = connected()
                lines = [cloud_input(rng) for _ in range(rng.randrange(1, 12))]
                inputs += len(lines)
                data = b"\n".join(lines) + (b"\n" if rng.random() < 0.9 else b"")
                if sessions % 2000 == 0:  # now and then a line over the limit
                    data = b"meter/1 BATCH id=" + b"0" * (protocol.MAX_LENGTH + 1) + b"\n" + data
                # delivered in arbitrary pieces, as TCP may
                at = 0
                while at < len(data) and not transport.disconnecting:
                    step = rng.choice((1, 7, 100, 5000, len(data)))
                    protocol.dataReceived(data[at : at + step])
                    at += step
                if rng.random() < 0.05:
                    clock.advance(121)  # idle: the timeout closes it
                    assert transport.disconnected
                outputs.append((data.split(b"\n"), transport))
                protocol.connectionLost(Failure(ConnectionDone()))
            await database.flush()
            committed = []
            for lines, transport in outputs:
                check_output(transport)
                committed.extend(acknowledged(lines, transport.value()))
            # The strangers' summary is pending until its minute ends; what
            # remains is each connection's timer, which must be gone.
            factory.admission.stop()
            assert clock.getDelayedCalls() == []

            # Afterwards a well-formed gateway is served as ever.
            good = wire.Batch("e" * 16, (Reading(7, "192.168.1.8", datetime.datetime(2026, 11, 21, 12, 0), 21.5, 40.0),))
            protocol, transport = connected()
            protocol.dataReceived(wire.encode(good) + b"\n")
            await database.flush()
            assert wire.decode(transport.value().rstrip(b"\n")) == wire.BatchAck("e" * 16, "ok", new=1)
            committed.append(good)
        no_failures_logged(events)
    finally:
        await database.stop()

    assert inputs >= CLOUD_INPUTS
    assert len(committed) > 1000
    assert store.metrics.store_failures == 0
    refused = sum(store.metrics.refused.values())
    assert refused > 10_000
    assert store.metrics.refused["size"] > 0 and store.metrics.idle_timeouts > 0

    # The database holds exactly the first of each (device, minute) of the
    # acknowledged batches, each a valid reading: nothing of a line refused
    # or cut short.
    expected: dict[tuple, tuple] = {}
    for batch in committed:
        for r in batch.readings:
            key = (r.device_id, r.taken_at.isoformat(timespec="minutes"))
            expected.setdefault(key, (r.device_id, r.device_ip, key[1], r.temperature_c, r.humidity_pct))
    with sqlite3.connect(str(path)) as other:
        rows = other.execute(
            "SELECT device_id, device_ip, taken_at, temperature_c, humidity_pct, stored_at FROM readings"
        ).fetchall()
    assert sorted(row[:5] for row in rows) == sorted(expected.values())
    assert len(console) == len(rows)
    for row in rows:
        check_row(*row[:5])
        assert row[5] >= NOW
