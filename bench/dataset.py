"""
A cloud database of a fleet's history, made fast, for the API benchmark
(bench/run.py --scenarios api) and for trying the dashboard on a large store.

    python bench/dataset.py var/year.sqlite                       # 1,000 devices x 96 a day x 365 days
    python bench/dataset.py var/week.sqlite --devices 50 --days 7

N devices (addresses 10.0.x.y, labels only) x 96 readings a day (every 15
minutes) x D days ending yesterday (local time), written straight into the
cloud's schema at its current version (meter.cloud.open_database), the
devices summary filled, as the cloud would have left them.  Every 50th
device misses the last day (it shows stale).

Fast: the readings are made by SQLite itself (a device table crossed with a
table of the period's minutes, in primary-key order), in one transaction a
batch of devices, with the journal and fsync off while it is built (the
file is thrown away if the build fails) and the devices' addresses written once at
the end.  35 million readings take a few minutes.
"""

from __future__ import annotations

import argparse
import datetime
import sqlite3
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from meter.cloud import open_database  # noqa: E402
from meter.tools.suite import label_address  # noqa: E402

READINGS_A_DAY = 96
#: Every this many devices, one misses the last day: stale.
STALE_EVERY = 50


def build(path: Path, devices: int, days: int, end: datetime.date, batch: int = 50, say=print) -> dict:
    """
    Write the dataset to C{path} (which must not exist); its figures.
    """
    if path.exists():
        raise SystemExit(f"dataset: {path} exists; remove it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    first_day = end - datetime.timedelta(days=days - 1)
    connection = sqlite3.connect(str(path), isolation_level=None)
    try:
        open_database(connection)
        connection.execute("PRAGMA journal_mode=OFF")
        connection.execute("PRAGMA synchronous=OFF")
        connection.execute("PRAGMA cache_size=-262144")  # 256 MB
        connection.execute("CREATE TEMP TABLE slots (n INTEGER PRIMARY KEY, taken_at TEXT NOT NULL)")
        step = datetime.timedelta(minutes=1440 // READINGS_A_DAY)
        origin = datetime.datetime.combine(first_day, datetime.time())
        connection.execute("BEGIN")
        connection.executemany(
            "INSERT INTO temp.slots VALUES (?, ?)",
            ((n, (origin + n * step).isoformat(timespec="minutes")) for n in range(days * READINGS_A_DAY)),
        )
        connection.execute("COMMIT")
        last_day_from = (days - 1) * READINGS_A_DAY
        stored_at = time.time()
        # A day's curve (warmest at 14:00), a season's (coldest in the
        # middle of the period), a device's own offset; two decimals.
        insert = f"""
            INSERT INTO readings (device_id, device_ip, taken_at, temperature_c, humidity_pct, stored_at)
            SELECT d.id, d.ip, s.taken_at,
                   round(20.0 - abs(s.n % 96 - 56) * 0.15 + (d.id % 7) * 0.5
                         - abs((s.n / 96) % 365 - 182) * 0.03, 2),
                   round(30 + (s.n % 96 * 3 + d.id * 11) % 40 + (s.n % 4) * 0.25, 2),
                   {stored_at!r}
            FROM temp.batch AS d CROSS JOIN temp.slots AS s
            WHERE NOT (d.id % {STALE_EVERY} = 0 AND s.n >= {last_day_from})
            ORDER BY d.id, s.n
        """
        connection.execute("CREATE TEMP TABLE batch (id INTEGER PRIMARY KEY, ip TEXT NOT NULL)")
        for low in range(1, devices + 1, batch):
            ids = range(low, min(devices, low + batch - 1) + 1)
            connection.execute("BEGIN")
            connection.execute("DELETE FROM temp.batch")
            connection.executemany("INSERT INTO temp.batch VALUES (?, ?)", ((i, label_address(i)) for i in ids))
            connection.execute(insert)
            connection.execute("COMMIT")
            say(f"  devices {ids[0]}..{ids[-1]} written ({time.monotonic() - started:.0f} s)")
        say("  the devices' addresses ...")
        connection.execute("INSERT INTO device_addresses SELECT DISTINCT device_ip, device_id FROM readings")
        say("  the devices summary ...")
        connection.execute("BEGIN")
        connection.execute("DELETE FROM devices")
        connection.execute(
            """
            INSERT INTO devices (device_id, device_ip, first_reading, last_reading, readings)
            SELECT device_id,
                   (SELECT latest.device_ip FROM readings AS latest
                    WHERE latest.device_id = r.device_id ORDER BY latest.taken_at DESC LIMIT 1),
                   min(taken_at), max(taken_at), count(*)
            FROM readings AS r GROUP BY device_id
            """
        )
        connection.execute("COMMIT")
        (count,) = connection.execute("SELECT sum(readings) FROM devices").fetchone()
        connection.execute("PRAGMA journal_mode=WAL")
    except BaseException:
        connection.close()
        path.unlink(missing_ok=True)
        raise
    connection.close()
    seconds = time.monotonic() - started
    return {
        "devices": devices, "days": days, "first_day": first_day.isoformat(), "last_day": end.isoformat(),
        "readings": count or 0, "seconds": round(seconds, 1), "bytes": path.stat().st_size,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="the database to make (must not exist)")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--end", type=datetime.date.fromisoformat, help="the last day (default: yesterday)")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.days < 1:
        parser.error("--devices and --days must be 1 or more")
    end = args.end or datetime.date.today() - datetime.timedelta(days=1)
    figures = build(args.path, args.devices, args.days, end)
    print(f"{figures['readings']:,} readings of {figures['devices']:,} devices, {figures['first_day']} to "
          f"{figures['last_day']}, in {figures['seconds']} s ({figures['bytes'] / 1e9:.2f} GB): {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
