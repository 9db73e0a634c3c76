"""
Micro-benchmarks of the per-datagram and per-reading steps the profiles
point at: what each step costs, and beside some of them what a cheaper form
of the same step would cost, to judge a change before making it (the
figures: docs/performance.md).

    python bench/micro.py [--json PATH]

Each figure is the best of 5 timings, in microseconds, on this machine; it
does not touch the network.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from twisted.internet.defer import Deferred  # noqa: E402

from meter import cloud, wire  # noqa: E402
from meter.wire import values as wire_values  # noqa: E402
from meter.database import connect  # noqa: E402
from meter.tools.loadgen import synthetic_day  # noqa: E402
from meter.reading import Reading  # noqa: E402

DAY = datetime.date(2026, 3, 1)
KEY = bytes(range(32))


def best(function, repeat: int = 5, number: int = 1) -> float:
    """
    The best time of C{number} calls, over C{repeat} tries, in microseconds
    per call.
    """
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(number):
            function()
        times.append((time.perf_counter() - started) / number)
    return min(times) * 1e6


def intake_floor(scratch: Path, devices: int = 100, group: int = 64) -> dict[str, float]:
    """
    CPU microseconds per datagram of the work the gateway must do for each
    chunk of a 1,440-reading day, with meter's own codec and spool
    statements but none of the daemon around them (no reactor, Deferreds,
    intake bookkeeping or log lines): check the tag and look the message id
    up, decode, spool the chunks of C{group} datagrams in one transaction
    (as the group commit does under load; the commit's fsync is real), seal
    the acknowledgements.  Plus the raw loop's CPU per datagram, it is the
    least the gateway daemon can spend with this codec and spool.
    """
    from meter.gateway.spool import Spool, _add_chunks, content_digest

    keys = {d: bytes([d % 251 + 1]) * 32 for d in range(1, devices + 1)}
    datagrams = []
    for d in keys:
        ip = f"10.0.{d >> 8}.{d & 255}"
        for chunk in wire.split_day(d, ip, DAY, synthetic_day(d, ip, DAY, 1440), f"{d:016x}", 1772400000):
            datagrams.append(wire.seal(wire.encode(chunk), keys[d]))

    items: list[tuple] = []

    class Collect:
        def run_many(self, work, item):
            items.append(item)
            return Deferred()

    spool = Spool(Collect())
    connection, _ = Spool.open(scratch / "floor.sqlite")
    seen: set[tuple[int, str, int]] = set()
    spent = dict.fromkeys(("verify", "decode", "spool", "answer"), 0.0)
    clock = time.process_time
    for start in range(0, len(datagrams), group):
        t0 = clock()
        fresh = []
        for data in datagrams[start:start + group]:
            body, tag = wire.split_tag(data)
            device_id = wire.claimed_device(body)
            key = keys[device_id]
            if not wire.tag_ok(body, tag, key):
                raise AssertionError("tag")
            xfer, part, _ = wire.peek_day_id(body)
            if (device_id, xfer, part) not in seen:
                seen.add((device_id, xfer, part))
                fresh.append((body, key))
        t1 = clock()
        chunks = [(wire.decode(body, max_size=wire.MAX_DATAGRAM), key) for body, key in fresh]
        t2 = clock()
        items.clear()
        for (chunk, _), (body, _) in zip(chunks, fresh):
            # As the gateway does: the digest of the bytes it decoded.
            spool.add_chunk(chunk, 1.0, digest=content_digest(body))
        connection.execute("BEGIN IMMEDIATE")
        _add_chunks(connection, items)
        connection.execute("COMMIT")
        t3 = clock()
        answers = [wire.seal(wire.encode(wire.DayAck(chunk.xfer, chunk.part, "ok")), key) for chunk, key in chunks]
        t4 = clock()
        assert len(answers) == len(chunks)
        spent["verify"] += t1 - t0
        spent["decode"] += t2 - t1
        spent["spool"] += t3 - t2
        spent["answer"] += t4 - t3
    (stored,) = connection.execute("SELECT count(*) FROM chunks").fetchone()
    connection.close()
    assert stored == len(datagrams), (stored, len(datagrams))
    return {step: seconds / len(datagrams) * 1e6 for step, seconds in spent.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    out: dict[str, float] = {}

    def note(name: str, micros: float, per: str = "") -> None:
        out[name] = round(micros, 2)
        print(f"{micros:10.2f} us  {name}{(' ' + per) if per else ''}", flush=True)

    # -- one device chunk at the gateway ------------------------------------
    day_1440 = synthetic_day(3, "10.0.0.3", DAY, 1440)
    chunk = wire.split_day(3, "10.0.0.3", DAY, day_1440, "0123456789abcdef", 1772400000)[0]
    body = wire.encode(chunk)
    sealed = wire.seal(body, KEY)
    n = len(chunk.readings)
    print(f"a 1,440-reading day's chunk: {len(sealed)} bytes, {n} readings")
    note("split_tag + claimed_device + tag_ok (HMAC-SHA256 verify)", best(
        lambda: wire.tag_ok(*wire.split_tag(sealed), KEY) and wire.claimed_device(body), number=2000))
    note("wire.decode of the chunk", best(lambda: wire.decode(body, wire.MAX_DATAGRAM), number=200))
    note("  of which Reading(...) with validators, per reading", best(
        lambda: Reading(3, "10.0.0.3", datetime.datetime(2026, 3, 1, 1, 2), 21.3, 35.5), number=20000))
    note("  a plain tuple instead, per reading", best(
        lambda: (3, "10.0.0.3", datetime.datetime(2026, 3, 1, 1, 2), 21.3, 35.5), number=20000))
    note("  _number('21.3') (regex, float, canonical check, range)", best(
        lambda: wire_values.check_number("21.3", lambda v: v, "t"), number=20000))
    cache = {"21.3": 21.3}
    note("  a dict lookup of an already-checked number instead", best(lambda: cache.get("21.3"), number=20000))
    ack = wire.DayAck(chunk.xfer, chunk.part, "ok")
    note("encode + seal of the DAYACK", best(lambda: wire.seal(wire.encode(ack), KEY), number=5000))

    from twisted.logger import Logger, LogPublisher, textFileLogObserver

    with tempfile.TemporaryFile("w") as sink:
        # As twistd -n logs: formatted text, written and flushed per event.
        publisher = LogPublisher(textFileLogObserver(sink))
        log = Logger(namespace="meter.gateway.protocol.GatewayProtocol", observer=publisher)
        note("one info log line through twistd's text file observer (to a file)", best(lambda: log.info(
            "received {size} bytes from device {device} ({peer}): part {part}/{parts} of {day}, {n} readings",
            size=1200, device=3, peer="127.0.0.1:5555", part=1, parts=21, day=DAY, n=n), number=2000))

    with tempfile.TemporaryDirectory() as scratch:
        from meter.gateway.spool import Spool

        connection, _ = Spool.open(Path(scratch) / "spool.sqlite")
        chunks = [wire.split_day(d, f"10.0.{d >> 8}.{d & 255}", DAY, synthetic_day(d, f"10.0.{d >> 8}.{d & 255}", DAY, 1440),
                                 f"{d:016x}", 1772400000) for d in range(1, 61)]
        pieces = [c for day in chunks for c in day][:1000]

        captured = []

        class Capture:
            def run_many(self, work, item):
                captured.append((work, item))
                return Deferred()

        spool = Spool(Capture())
        started = time.perf_counter()
        for c in pieces:
            spool.add_chunk(c, 1.0)
        prepare = (time.perf_counter() - started) / len(pieces) * 1e6
        started = time.perf_counter()
        connection.execute("BEGIN IMMEDIATE")
        (work,) = {work for work, _ in captured}
        work(connection, [item for _, item in captured])
        connection.execute("COMMIT")
        elapsed = (time.perf_counter() - started) / len(pieces) * 1e6
        note("spool.add_chunk: its rows prepared, per chunk", prepare)
        note("spool.add_chunk: its statements, per chunk (one big group commit)", elapsed)
        connection.close()

        floor = intake_floor(Path(scratch))
        for step, micros in floor.items():
            note(f"intake floor, without the daemon: {step}, CPU per datagram", micros)
        note("intake floor, without the daemon: all of it, CPU per datagram", sum(floor.values()))

    # -- one batch at the cloud ---------------------------------------------
    readings = [r for d in range(1, 22) for r in synthetic_day(d, f"10.0.0.{d}", DAY, 96)][:2000]
    batch = wire.Batch("0123456789abcdef", tuple(readings))
    line = wire.encode(batch)
    print(f"a batch of {len(readings)} readings: {len(line):,} bytes")
    note("wire.encode of the batch, per reading", best(lambda: wire.encode(batch), number=5) / len(readings))
    note("wire.decode of the batch, per reading", best(lambda: wire.decode(line), number=5) / len(readings))
    note("Reading.console_line, per reading", best(lambda: [r.console_line() for r in readings], number=5) / len(readings))
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "console.txt"
        with open(path, "w") as console:
            lines = [r.console_line() for r in readings]

            def each():
                for text in lines:
                    console.write(text + "\n")
                    console.flush()

            note("console: write + flush each line (as cloud_tap does), per reading", best(each, number=2) / len(readings))
            note("console: one write + flush per batch, per reading", best(
                lambda: (console.write("\n".join(lines) + "\n"), console.flush()), number=20) / len(readings))

        rows = [(r.device_id, r.device_ip, r.taken_at.isoformat(timespec="minutes"), r.temperature_c,
                 r.humidity_pct, 1.0) for r in batch.readings]
        columns = batch.columns()

        def insert(per_row: bool):
            db = Path(scratch) / f"cloud-{per_row}.sqlite"
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
            connection = connect(db)
            cloud.open_database(connection)
            connection.execute("BEGIN IMMEDIATE")
            if per_row:
                cloud.sqlite._insert(columns, 1.0)(connection)
            else:
                connection.executemany("INSERT INTO readings VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", rows)
            connection.execute("COMMIT")
            connection.close()

        note("cloud insert: rows from the split records + insert_telling_new (cloud.sqlite._insert), per reading",
             best(lambda: insert(True), repeat=3) / len(readings))
        note("cloud insert: executemany of the same rows, built beforehand, per reading", best(lambda: insert(False), repeat=3) / len(readings))

    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
