"""
The raw ceiling of the cloud's ingest into PostgreSQL: the least work the
issue's way of storing a batch needs, from a plain script with one
connection and no daemon around it.

Each batch, in a transaction of its own with C{synchronous_commit} on (an
acknowledgement means COMMITted, as for the cloud): COPY its rows into a
temporary staging table, then C{INSERT INTO readings SELECT … FROM staging
ON CONFLICT (device_id, taken_at) DO NOTHING RETURNING} the keys of the new
ones, fetched; the staging table emptied at commit.  The rows are made
beforehand (as the SQLite ceiling's executemany takes made rows): what is
timed is the driver sending them, the server storing them, and the commit.

Into the cloud's own schema (its partitions, key and indexes), in a fresh
database of the same server the cloud is measured on, in the same batch
size.  Not the devices summary: that is the cloud's own bookkeeping, part
of what the ratio measures.

    python bench/pg_ceiling.py postgresql://postgres@/ceiling?host=/tmp/x 200000
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

COLUMNS = "device_id, device_ip, taken_at, temperature_c, humidity_pct, stored_at"


def copy_insert_ceiling(uri: str, rows: list[tuple], batch: int) -> dict:
    """
    Store C{rows} (device_id, device_ip, taken_at as a naive datetime,
    temperature, humidity, stored_at) into the C{readings} table of the
    database at C{uri}, which holds the cloud's schema, C{batch} rows a
    transaction.  The rate, and how many the inserts reported new.
    """
    import psycopg

    with psycopg.connect(uri, autocommit=True) as connection:
        connection.execute("SET synchronous_commit = on")
        connection.execute(
            "CREATE TEMPORARY TABLE staging (device_id integer, device_ip text, taken_at timestamp,"
            " temperature_c double precision, humidity_pct double precision, stored_at double precision)"
            " ON COMMIT DELETE ROWS"
        )
        new = 0
        started = time.perf_counter()
        with connection.cursor() as cursor:
            for start in range(0, len(rows), batch):
                with connection.transaction():
                    with cursor.copy(f"COPY staging ({COLUMNS}) FROM STDIN") as copy:
                        for row in rows[start:start + batch]:
                            copy.write_row(row)
                    cursor.execute(
                        f"INSERT INTO readings ({COLUMNS}) SELECT {COLUMNS} FROM staging"
                        " ON CONFLICT (device_id, taken_at) DO NOTHING RETURNING device_id, taken_at"
                    )
                    new += len(cursor.fetchall())
        elapsed = time.perf_counter() - started
    return {
        "rows": len(rows),
        "new": new,
        "batch": batch,
        "seconds": round(elapsed, 4),
        "rows_per_s": round(len(rows) / elapsed, 1) if elapsed > 0 else None,
    }


def sample_rows(count: int) -> list[tuple]:
    """
    C{count} rows of 96-reading days of consecutive devices, yesterday.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from meter.tools.loadgen import synthetic_day
    from meter.tools.suite import label_address

    yesterday = datetime.date.today() - datetime.timedelta(days=1)
    stored_at = time.time()
    rows = []
    for device_id in range(1, count // 96 + 2):
        for r in synthetic_day(device_id, label_address(device_id), yesterday, 96, 1):
            rows.append((r.device_id, r.device_ip, r.taken_at, r.temperature_c, r.humidity_pct, stored_at))
    return rows[:count]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("uri", help="a database holding the cloud's schema")
    parser.add_argument("rows", type=int, nargs="?", default=200_000)
    parser.add_argument("--batch", type=int, default=5000)
    args = parser.parse_args(argv)
    print(json.dumps(copy_insert_ceiling(args.uri, sample_rows(args.rows), args.batch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
