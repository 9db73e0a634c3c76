"""
The web API's speed (bench/run.py --scenarios api): the REAL meter-cloud
plugin started on a dataset made by bench/dataset.py (by default a year of a
1,000-device fleet: 35 million readings), asked over HTTP on loopback with
one kept-alive connection, a request at a time:

  day      one device's day as JSON (/api/v1/readings?device=K&from=D&to=D),
           a random device and day each time
  series   a 30-day series of a random device, downsampled to 500 points
  devices  /api/v1/devices (every device, with its first and last reading,
           count and staleness)
  export   a million readings streamed as CSV: the time, and the cloud's
           memory before and at its peak (a page at a time keeps it flat)

Each figure is the p50 and p95 of --api-requests requests after a few to warm
the caches.  Not in the default run: the dataset takes minutes to make (it is
kept with --api-db PATH, and reused when that file exists).
"""

from __future__ import annotations

import datetime
import http.client
import json
import random
import sqlite3
import statistics
import time
from pathlib import Path
from urllib.parse import urlsplit

import dataset
from meter.tools.processes import web_url
from meter.tools.suite import Suite

#: The issue's targets (issue 18), in ms.
TARGETS_MS = {"day": 20.0, "series": 100.0, "devices": 200.0}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _timed(connection: http.client.HTTPConnection, path: str) -> tuple[float, int, bytes]:
    started = time.perf_counter()
    connection.request("GET", path)
    answer = connection.getresponse()
    body = answer.read()
    return (time.perf_counter() - started) * 1000, answer.status, body


def measure(url: str, paths, count: int, warm: int = 3) -> dict:
    """
    Time C{count} requests of C{paths()} (a new path each call) after
    C{warm} untimed ones; p50, p95 and the answers' sizes.
    """
    where = urlsplit(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=120)
    times, sizes = [], []
    try:
        for number in range(warm + count):
            took, status, body = _timed(connection, paths())
            if status != 200:
                raise RuntimeError(f"{status} from the API: {body[:200]!r}")
            if number >= warm:
                times.append(took)
                sizes.append(len(body))
    finally:
        connection.close()
    return {
        "requests": count,
        "p50_ms": round(statistics.median(times), 2),
        "p95_ms": round(_percentile(times, 0.95), 2),
        "max_ms": round(max(times), 2),
        "bytes_p50": int(statistics.median(sizes)),
    }


def scenario_api(args, scratch: Path, say) -> dict:
    db = Path(args.api_db) if args.api_db else scratch / "api-dataset.sqlite"
    if db.exists():
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
            devices, first, last, readings = connection.execute(
                "SELECT count(*), min(first_reading), max(last_reading), sum(readings) FROM devices"
            ).fetchone()
        made = {"reused": str(db), "devices": devices, "readings": readings}
        say(f"api: reusing {db}: {readings:,} readings of {devices:,} devices")
    else:
        say(f"api: making a dataset of {args.api_devices:,} devices x 96 readings x {args.api_days} days in {db}")
        made = dataset.build(db, args.api_devices, args.api_days, datetime.date.today() - datetime.timedelta(days=1),
                             say=lambda text: None)
        say(f"  {made['readings']:,} readings in {made['seconds']} s ({made['bytes'] / 1e9:.2f} GB)")
        devices, readings = made["devices"], made["readings"]
        first, last = made["first_day"], made["last_day"]
    first_day = datetime.date.fromisoformat(first[:10])
    last_day = datetime.date.fromisoformat(last[:10])
    days = (last_day - first_day).days + 1
    workspace = Suite(scratch / "api-suite", 1, None, logs=True, cloud={"db": str(db)})
    rng = random.Random(args.seed)

    def a_day() -> str:
        day = first_day + datetime.timedelta(days=rng.randrange(days))
        return f"/api/v1/readings?device={rng.randint(1, devices)}&from={day}&to={day}"

    def a_month() -> str:
        end = first_day + datetime.timedelta(days=rng.randrange(min(days, 30) - 1, days))
        start = end - datetime.timedelta(days=29)
        return f"/api/v1/series?device={rng.randint(1, devices)}&from={start}&to={end}&points=500"

    try:
        started = time.monotonic()
        # The start checks the whole file (PRAGMA quick_check): minutes on
        # tens of millions of readings.
        cloud = workspace.start_cloud(timeout=1800)
        url = web_url(cloud, timeout=120)
        say(f"  the cloud started on it in {time.monotonic() - started:.1f} s; {url}")
        figures = {
            "day": measure(url, a_day, args.api_requests),
            "series": measure(url, a_month, args.api_requests),
            "devices": measure(url, lambda: "/api/v1/devices", args.api_requests),
        }
        # A million readings streamed as CSV: the time, and the cloud's
        # memory, which a page at a time keeps flat.
        before = cloud.stats()
        where = urlsplit(url)
        export = http.client.HTTPConnection(where.hostname, where.port, timeout=600)
        started = time.perf_counter()
        export.request("GET", "/api/v1/readings?format=csv&limit=1000000")
        answer = export.getresponse()
        received = lines = 0
        while True:
            block = answer.read(1 << 20)
            if not block:
                break
            received += len(block)
            lines += block.count(b"\n")
        export_seconds = time.perf_counter() - started
        export.close()
        after = cloud.stats()
        figures["export"] = {
            "readings": lines - 1, "seconds": round(export_seconds, 2), "bytes": received,
            "cloud_rss_mb_before": before["rss_mb"], "cloud_peak_rss_mb_after": after["peak_rss_mb"],
        }
        # What was measured, once: the shapes behind the figures.
        where = urlsplit(url)
        probe = http.client.HTTPConnection(where.hostname, where.port, timeout=120)
        _, _, body = _timed(probe, a_month())
        series = json.loads(body)
        probe.close()
        cloud_stats = cloud.stats()
    finally:
        workspace.stop()
    export = figures.pop("export")
    for name, figure in figures.items():
        target = TARGETS_MS[name]
        verdict = "MET" if figure["p50_ms"] < target else "NOT MET"
        say(f"  {name:8} p50 {figure['p50_ms']:8.2f} ms  p95 {figure['p95_ms']:8.2f} ms  ({figure['bytes_p50']:,} bytes; "
            f"target p50 < {target:g} ms: {verdict})")
    say(f"  export   {export['readings']:,} readings as CSV ({export['bytes'] / 1e6:.0f} MB) in {export['seconds']} s; the cloud's "
        f"memory {export['cloud_rss_mb_before']} MB before, peak {export['cloud_peak_rss_mb_after']} MB")
    return {
        "export": export,
        "dataset": made, "devices": devices, "readings": readings, "days": days, "figures": figures,
        "series_points": len(series["t"]), "series_bucket_seconds": series["bucket_seconds"],
        "cloud_peak_rss_mb": cloud_stats["peak_rss_mb"],
        "targets_met": {name: figures[name]["p50_ms"] < TARGETS_MS[name] for name in figures},
    }
