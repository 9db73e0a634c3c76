"""
Micro-benchmarks of the per-datagram and per-reading steps the profiles
point at (docs/performance.md): what each costs today and what a cheaper
form of the same step costs, so the recommendations carry expected gains.

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

from meter import cloud, wire  # noqa: E402
from meter.dbthread import connect  # noqa: E402
from meter.loadgen import synthetic_day  # noqa: E402
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


def _lean_batch_decoder():
    """
    A sketch of batch-record decoding that checks what wire.decode checks
    (grammar, canonical numbers, ranges, calendar dates, one reading per
    device and minute) but caches the verdict for each distinct token and
    builds plain tuples: the kind of change recommended for wire.py.
    """
    import re

    from meter.reading import check_humidity, check_temperature

    stamp_re = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T([01][0-9]|2[0-3]):[0-5][0-9]\Z")
    numbers: dict[tuple[str, object], float] = {}
    days: dict[str, bool] = {}
    devices: dict[str, int] = {}
    ips: dict[str, str] = {}

    def number(text, check):
        key = (text, check)
        value = numbers.get(key)
        if value is None:
            value = wire._number(text, check, "value")
            numbers[key] = value
        return value

    def decode(text: str):
        rows = []
        seen = set()
        for record in text.split(";"):
            device, ip, stamp, t, h = record.split(",")
            device_id = devices.get(device) or devices.setdefault(device, wire._device_id(device))
            if ip not in ips:
                ips[ip] = wire._ip(ip)
            if stamp_re.match(stamp) is None:
                raise wire.WireError("value", stamp)
            day = stamp[:10]
            if day not in days:
                datetime.date.fromisoformat(day)
                days[day] = True
            key = (device_id, stamp)
            if key in seen:
                raise wire.WireError("record", stamp)
            seen.add(key)
            rows.append((device_id, ip, stamp, number(t, check_temperature), number(h, check_humidity), 0.0, t, h))
        return rows

    return decode


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
        lambda: wire._check_number("21.3", lambda v: v, "t"), number=20000))
    cache = {"21.3": 21.3}
    note("  a dict lookup of an already-checked number instead", best(lambda: cache.get("21.3"), number=20000))
    ack = wire.DayAck(chunk.xfer, chunk.part, "ok")
    note("encode + seal of the DAYACK", best(lambda: wire.seal(wire.encode(ack), KEY), number=5000))

    from twisted.logger import Logger, LogPublisher, textFileLogObserver

    with tempfile.TemporaryFile("w") as sink:
        # As twistd -n logs: formatted text, written and flushed per event.
        publisher = LogPublisher(textFileLogObserver(sink))
        log = Logger(namespace="meter.gateway.GatewayProtocol", observer=publisher)
        note("one info log line through twistd's text file observer (to a file)", best(lambda: log.info(
            "received {size} bytes from device {device} ({peer}): part {part}/{parts} of {day}, {n} readings",
            size=1200, device=3, peer="127.0.0.1:5555", part=1, parts=21, day=DAY, n=n), number=2000))

    with tempfile.TemporaryDirectory() as scratch:
        from meter.spool import SCHEMA as SPOOL_SCHEMA, Spool

        connection = connect(Path(scratch) / "spool.sqlite")
        connection.executescript(SPOOL_SCHEMA)
        chunks = [wire.split_day(d, f"10.0.{d >> 8}.{d & 255}", DAY, synthetic_day(d, f"10.0.{d >> 8}.{d & 255}", DAY, 1440),
                                 f"{d:016x}", 1772400000) for d in range(1, 61)]
        pieces = [c for day in chunks for c in day][:1000]

        captured = []

        class Capture:
            def run(self, work):
                captured.append(work)

        spool = Spool(Capture())
        started = time.perf_counter()
        for c in pieces:
            spool.add_chunk(c, 1.0, open_round=False)
        prepare = (time.perf_counter() - started) / len(pieces) * 1e6
        started = time.perf_counter()
        connection.execute("BEGIN IMMEDIATE")
        for work in captured:
            connection.execute("SAVEPOINT piece")
            work(connection)
            connection.execute("RELEASE piece")
        connection.execute("COMMIT")
        elapsed = (time.perf_counter() - started) / len(pieces) * 1e6
        note("spool.add_chunk: rows prepared on the reactor thread, per chunk", prepare)
        note("spool.add_chunk: the database thread's work, per chunk (one big group commit)", elapsed)
        connection.close()

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

        def insert(per_row: bool):
            db = Path(scratch) / f"cloud-{per_row}.sqlite"
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
            connection = connect(db)
            cloud.open_database(connection)
            connection.execute("BEGIN IMMEDIATE")
            if per_row:
                cloud._insert(batch.readings, 1.0)(connection)
            else:
                rows = [(r.device_id, r.device_ip, r.taken_at.isoformat(timespec="minutes"), r.temperature_c,
                         r.humidity_pct, 1.0) for r in batch.readings]
                connection.executemany("INSERT INTO readings VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", rows)
            connection.execute("COMMIT")
            connection.close()

        note("cloud insert: execute per row + rowcount (cloud._insert), per reading",
             best(lambda: insert(True), repeat=3) / len(readings))
        note("cloud insert: executemany of the same rows, per reading", best(lambda: insert(False), repeat=3) / len(readings))

    # -- a sketch of a leaner decode (not meter's code: what one could cost) --
    lean_decode = _lean_batch_decoder()
    text = line.split(b" r=", 1)[1].decode("ascii")
    rows = lean_decode(text)
    assert len(rows) == len(readings) and rows[0][2] == readings[0].taken_at.isoformat(timespec="minutes")
    note("sketch: batch records to checked row tuples (caches, no Reading objects), per reading",
         best(lambda: lean_decode(text), number=5) / len(readings))
    note("sketch: console lines from the record text, per reading", best(
        lambda: "".join(f"{r[1]} - {r[2][11:]} - {r[6]} - {r[7]}%\n" for r in rows), number=5) / len(readings))

    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
