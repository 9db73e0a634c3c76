"""
The cloud's SQLite store alone: the CPU a reading its insert work and
commit cost for a fleet's day, in the batches and the order the gateway
forwards them, with no network, TLS or decoding: each device's two chunks
side by side, the devices

- in the random order they report in, as with C{forward = "device"}
  (C{--order arrival}, the default);
- as a closed round leaves (C{--order round}): made ready a slice of
  L{meter.gateway.rounds.CLOSE_CHUNKS} chunks at a time by device, each
  slice in the order its chunks were spooled;
- by device (C{--order device}).

    python bench/cloud_store.py [--devices 30000] [--batch 5000] [--order arrival|round|device] [--days 1]

What it measures is the B-trees' upkeep, which grows with what the table
holds: the figure for a day of 30,000 devices (2.88 million readings) into
an empty database is the one docs/performance.md quotes.  C{--days}
stores that many days one after another, each a figure of its own: from the
second day on, a device's new readings go between its own older ones and
the next device's, in the middle of the B-tree, whatever the order.  Each
day's batches are made before its clock starts.
"""

from __future__ import annotations

import argparse
import datetime
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from meter import wire  # noqa: E402
from meter.cloud.sqlite import VERSIONS, _insert, open_database  # noqa: E402
from meter.database import connect  # noqa: E402
from meter.gateway.rounds import CLOSE_CHUNKS  # noqa: E402

READINGS = 96
FIRST_DAY = datetime.date(2026, 12, 1)


def day_batches(
    devices: int, batch: int, seed: int, order: str = "arrival", day: datetime.date = FIRST_DAY
) -> list[wire.BatchColumns]:
    """
    C{day} of C{devices} devices × 96 readings as the gateway forwards it:
    each device's day in two chunks of 48, the devices in C{order} (see
    the module's text), whole chunks to a batch of at least C{batch}
    readings.
    """
    rng = random.Random(seed)
    order_of = list(range(1, devices + 1))
    if order != "device":
        rng.shuffle(order_of)
    if order == "round":
        slice_devices = CLOSE_CHUNKS // 2
        place = {device: at for at, device in enumerate(order_of)}
        by_device = sorted(order_of)
        order_of = [device for start in range(0, devices, slice_devices)
                    for device in sorted(by_device[start:start + slice_devices], key=place.__getitem__)]
    batches: list[str] = []
    records: list[str] = []
    date = day.isoformat()
    for device in order_of:
        ip = f"10.{device >> 16}.{(device >> 8) & 255}.{device & 255}"
        for minute in range(0, 1440, 1440 // READINGS):
            records.append(f"{device},{ip},{date}T{minute // 60:02d}:{minute % 60:02d},"
                           f"{rng.randint(-100, 400) / 10},{rng.randint(0, 1000) / 10}")
            if len(records) >= batch and len(records) % (READINGS // 2) == 0:
                batches.append(";".join(records))
                records = []
    if records:
        batches.append(";".join(records))
    return [wire.BatchColumns.of(text) for text in batches]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=30_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cache-mb", type=float, default=16.0, help="the page cache, as [cloud] cache_mb (default 16)")
    parser.add_argument("--order", choices=("arrival", "round", "device"), default="arrival",
                        help="the devices in the order they report (default), as a closed round leaves, or by device")
    parser.add_argument("--days", type=int, default=1,
                        help="days stored one after another, a figure each (default 1: into an empty database)")
    args = parser.parse_args(argv)
    readings = args.devices * READINGS
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "cloud.sqlite"
        connection = connect(path, args.cache_mb)
        open_database(connection)
        for number in range(args.days):
            day = FIRST_DAY + datetime.timedelta(days=number)
            batches = day_batches(args.devices, args.batch, args.seed + number, args.order, day)
            cpu, wall, commit = time.process_time(), time.perf_counter(), 0.0
            for columns in batches:
                connection.execute("BEGIN IMMEDIATE")
                _insert(columns, 1.0)(connection)
                started = time.perf_counter()
                connection.execute("COMMIT")
                commit += time.perf_counter() - started
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            size = path.stat().st_size + path.with_name(path.name + "-wal").stat().st_size
            print(f"cloud store, schema version {VERSIONS.version}, in {args.order} order, day {number + 1} ({day}): "
                  f"{readings:,} readings in {len(batches):,} batches: {cpu:.2f} CPU s ({cpu / readings * 1e6:.2f} µs a "
                  f"reading), {wall:.2f} s, of which COMMIT {commit:.2f} s; file and log {size / 2**20:.1f} MB",
                  flush=True)
        connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
