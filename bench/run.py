"""
make bench: the meter suite's speed and scale, measured on this machine.

Starts the REAL meter-gateway and meter-cloud twistd plugins on free
127.0.0.1 ports with a temporary configuration (a fleet whose device
addresses, 10.0.x.y, are only labels in the data), drives them with
`meter loadgen` (the real device code) or leaner drivers, and in the same run
measures the ceilings: a plain-Python UDP receive-and-acknowledge loop and
plain SQLite executemany.  Prints a table and writes bench/results/latest.json.

Scenarios:

  day4    the report's day: 4 devices, their survey files; first device send
          to the cloud's last acknowledgement (median of --repeat runs)
  intake  gateway intake: pre-sealed 1,200-byte chunks (1,440-reading days)
          from a windowed sender, datagrams acknowledged per second, against
          the raw UDP loop driven by the same sender; and the same days sent
          by loadgen
  cloud   cloud ingest: a TLS client sending BATCH lines straight to the
          cloud, readings committed per second, against raw executemany
  fleet   N devices x 96 readings end to end (and the scaling table, and the
          CPU a datagram and a reading by N), starting within min(60 s,
          N x R / 96,000 s), devices that give up trying again (meter-device's
          300 s / 60): first send to the cloud's last commit, every device-day
          checked stored exactly once against the synthetic days
  dashboard  (only when asked for) the dashboard's first chart in headless
          Chromium, navigation start to drawn (bench/dashboard.py)
  overload  (only when asked for) several times the gateway's capacity at
          once: accepted chunks/s over time, busy answers, every day stored
          once (bench/overload.py)
  overhead  (only when asked for) the fleet three ways at --devices: plain,
          observed (metrics scraped, the dashboard open), on PostgreSQL;
          the CPU seconds of each side against plain (bench/overhead.py)
  api     the web API over HTTP on a dataset of bench/dataset.py (a year of
          1,000 devices: 35 million readings): one device's day, a 30-day
          series, the fleet (bench/api_figures.py).  Not in the default run:
          making the dataset takes minutes (--api-db keeps and reuses it)
  --store postgresql  the cloud scenario alone, on a throwaway PostgreSQL
          server: the cloud against the raw COPY + INSERT ceiling in the same
          run, one node against two (bench/pg_bench.py)

Every load is bounded in count and time; nothing is sent outside 127.0.0.1.

    python bench/run.py                      # the default run (~1 min)
    python bench/run.py --devices 10000      # the full fleet
    python bench/run.py --devices 100000     # issue 20: 100,000 x 96 and 10,000 x 1,440 within 60 s
    python bench/run.py --profile            # also py-spy the daemons under load
    python bench/run.py --store postgresql   # the cloud scenario on PostgreSQL (bench/pg_bench.py)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import api_figures  # noqa: E402
import ceilings  # noqa: E402
import dashboard  # noqa: E402
import micro  # noqa: E402
import overload  # noqa: E402
import overhead  # noqa: E402
import pg_bench  # noqa: E402
import profiles  # noqa: E402
from meter import config, device, wire  # noqa: E402
from meter.tools import loadgen  # noqa: E402
from meter.tools.loadgen import synthetic_day  # noqa: E402
from meter.tools.processes import proc_stats  # noqa: E402
from meter.tools.suite import Suite, label_address  # noqa: E402

REPO = HERE.parent
RESULTS = HERE / "results"
#: The formats of the daemons' log records the figures are read from.
COMMITTED = "batch {batch_id} from {peer}: {count} readings committed"
ACKNOWLEDGED = "batch {batch_id} acknowledged by the cloud after"
GATEWAY_STOPPED = "gateway stopped:"

#: The targets of issue #6, checked against the measurements.  (Its intake
#: ratio against the raw UDP loop is reported, no longer judged: issue 20's
#: owner decided against a compiled extension.)
TARGETS = {
    "cloud_ratio": 0.6,
    "fleet_10k_seconds": 20.0,
    "fleet_10k_rss_mb": 200.0,
    "day4_ms": 20.0,
    "ack_p99_ms": 5.0,
}

#: The targets of issue 20, judged on the 100,000-device day (96 readings)
#: and the 10,000-device day of 1,440 readings.
FLEET_TARGETS = {
    "devices": 100_000,
    "seconds": 90.0,
    "devices_1440": 10_000,
    "seconds_1440": 120.0,
    "rss_mb": 300.0,
    "ack_p99_ms": 10.0,
    "spread_s": 60.0,
    #: The CPU a reading at the largest N over that at 10,000: "must not
    #: grow with N", within the machine's noise.
    "cost_growth": 1.10,
}

#: The longest start window a fleet scenario plans (issue 20: every device
#: starting within 60 s): 60 s less the lateness of loadgen's start timer on
#: two busy cores, up to 10 ms (2026-12-02: 5 of 14 runs planned over 60 s
#: measured 60.001-60.010 s), so a run whose starts kept their plan meets
#: the target it is measured against.
FLEET_MAX_SPREAD_S = 59.9

#: The device daemon's wait before it tries a failed day again
#: (meter.device.RETRY_AFTER, 300 s), scaled down in the fleet scenarios so a
#: retry lands within the run: 1/60, 5 s.
RETRY_SCALE = 60.0


def say(text: str) -> None:
    print(text, flush=True)


# -- helpers --------------------------------------------------------------------


def workspace_of(root: Path, devices: int, **settings) -> Suite:
    """
    One scenario's suite: a fleet of C{devices} whose addresses are only
    labels in the data (nothing is ever sent to them), their keys written
    before the daemons start, no survey files, the daemons' output in log
    files (a pipe read by this process would cost CPU on the cores the
    daemons are measured on), and the devices' own retransmission timers.
    """
    settings = {"addresses": label_address, "deadline": 60.0, **settings}
    return Suite(root, devices, None, keys=True, logs=True, device={}, **settings)


def fleet_gateway_settings(forward: str = "device", readings: int = 0) -> dict:
    """
    The gateway settings of the fleet scenarios (laid over
    L{workspace_of}'s): by default a device's day forwarded as soon as its
    transfer is complete (C{[gateway] forward = "device"}), so the readings
    flow to the cloud while the fleet still reports, which the 90 s of
    issue 20 needs.  With C{forward = "round"} the day's C{readings} wait
    in the spool until the round closes, so the spool is given room for
    all of them and a quarter more, as an operator of such a fleet would:
    at its default limit it fills and sends devices away half way through.
    """
    if forward == "round":
        default = config.SCHEMA["gateway"]["spool_limit"][1]
        return {"forward": forward, "spool_limit": max(default, readings + readings // 4)}
    return {"forward": forward}


def fleet_retries(timeout: float) -> tuple[float, int]:
    """
    The fleet scenarios' devices' retries: a device that gives up tries its
    day again after meter-device's wait scaled down, until the run's
    C{timeout}, as meter-device does forever; the gateway takes at most
    max_transfers_per_day transfers of a device's day.  (seconds, attempts)
    """
    retry_after = device.RETRY_AFTER / RETRY_SCALE
    attempts = max(1, min(int(timeout / retry_after) + 1, config.SCHEMA["gateway"]["max_transfers_per_day"][1]))
    return retry_after, attempts


def fleet_spread(devices: int, readings: int, rate: float) -> float:
    """
    The start window of a fleet of C{devices} x C{readings}: its readings
    offered at C{rate} device-days of 96 a second (so every size offers the
    same datagrams a second), but never longer than 60 s, the window of
    issue 20 ("every device starting within 60 s").
    """
    return round(min(FLEET_MAX_SPREAD_S, devices * readings / 96 / rate), 3)


def fleet_loadgen_processes(devices: int, wanted: int | None) -> int:
    """
    loadgen processes for a fleet: as asked, else one.  Why one: at the
    100,000-device rate (3,300 datagrams/s) one process sends for ~90 µs of
    CPU a datagram, a third of a core; split in two, each process wakes for
    half as many datagrams and the pair spent ~150 µs a datagram
    (--devices 20000 --spread 12, both pooled on 256 sockets a process).
    """
    return wanted if wanted else 1


def run_loadgen(workspace: Suite, name: str, *args: str, timeout: float = 300.0) -> dict:
    out = workspace.root / f"loadgen-{name}.json"
    command = workspace.loadgen_command(out, *args)
    completed = subprocess.run(command, cwd=workspace.root, capture_output=True, text=True, timeout=timeout + 60)
    (workspace.root / f"loadgen-{name}.out").write_text(completed.stdout + completed.stderr)
    if not out.exists():
        raise RuntimeError(f"loadgen {name} wrote no summary (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
    return json.loads(out.read_text())


def wait_committed(cloud, expected: int, timeout: float, totals: dict | None = None) -> dict:
    """
    Read the cloud's log until C{expected} new readings were committed (or
    C{timeout}); the sums and the last acknowledgement's time.
    """
    totals = totals if totals is not None else {"new": 0, "dup": 0, "batches": 0, "last_ack": None}
    deadline = time.monotonic() + timeout
    while True:
        for event in cloud.new_records(COMMITTED):
            totals["new"] += event["new"]
            totals["dup"] += event["dup"]
            totals["batches"] += 1
            totals["store_ms"] = round(event["ms"], 1)
            totals["last_ack"] = event["at"]
        if totals["new"] >= expected or time.monotonic() > deadline:
            totals["complete"] = totals["new"] >= expected
            return totals
        time.sleep(0.02)


class Sampler:
    """
    CPU time and resident memory of some processes, every C{interval}
    seconds on a thread, for the timeline of a scenario.
    """

    def __init__(self, pids: dict[str, int], interval: float = 0.25):
        import threading

        self._pids = pids
        self._interval = interval
        self._stop = threading.Event()
        self.samples: list[tuple[float, dict]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            point = {}
            for name, pid in self._pids.items():
                try:
                    point[name] = proc_stats(pid)
                except OSError:
                    pass
            self.samples.append((time.time(), point))
            self._stop.wait(self._interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def timeline(self, first_send: float | None, last_device_ack: float | None, last_commit: float | None) -> dict:
        """
        Per phase (intake: first send to the last device acknowledgement;
        forward: then to the last commit), each process's share of one core
        and its largest resident memory.
        """
        phases = {"intake": (first_send, last_device_ack), "forward": (last_device_ack, last_commit)}
        out = {}
        for phase, (start, end) in phases.items():
            if start is None or end is None or end - start < 4 * self._interval:
                continue  # too short for this sampling
            inside = [(t, p) for t, p in self.samples if start - self._interval <= t <= end + self._interval]
            if len(inside) < 2:
                continue
            (t0, p0), (t1, p1) = inside[0], inside[-1]
            out[phase] = {
                name: {
                    "core_share": round((p1[name]["cpu_s"] - p0[name]["cpu_s"]) / (t1 - t0), 2),
                    "max_rss_mb": max(p[name]["rss_mb"] for _, p in inside if name in p),
                }
                for name in self._pids
                if name in p0 and name in p1
            }
        return out


def udp_counters() -> dict:
    """
    The kernel's UDP counters (system-wide: other processes' drops count too).
    """
    try:
        lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")]
        return {name: int(value) for name, value in zip(lines[0][1:], lines[1][1:])}
    except (OSError, IndexError, ValueError):
        return {}


def forwarding_breakdown(gateway, cloud) -> dict:
    """
    The uplink's cycle per batch, from the daemons' logs: the gateway's
    send-to-acknowledgement time, the cloud's store time (its queue,
    inserts, commit and console), and the interval between acknowledgements.
    """
    rtt = [event["ms"] for event in gateway.records_of(ACKNOWLEDGED)]
    committed = cloud.records_of(COMMITTED)
    store = [event["ms"] for event in committed]
    acks = [event["at"] for event in committed]
    gaps = [(b - a) * 1000 for a, b in zip(acks, acks[1:])]
    median = lambda xs: round(statistics.median(xs), 2) if xs else None  # noqa: E731
    return {"batches": len(acks), "gateway_send_to_ack_ms_p50": median(rtt), "cloud_store_ms_p50": median(store),
            "interval_between_acks_ms_p50": median(gaps)}


def gateway_counters(gateway) -> dict:
    """
    The gateway's counts from its stop record (see meter.gateway.metrics).
    """
    for event in reversed(gateway.records_of(GATEWAY_STOPPED)):
        return event["counts"]
    return {}


#: A row's fingerprint in SQL: its minute, temperature and humidity (in
#: tenths) as one integer, and that integer's square modulo a prime (taken
#: of the integer modulo the prime first, so no product leaves 64 bits).  Summed
#: per device, they tell a device's stored day from its sent day without
#: reading its rows into Python.
_ROW_CODE = ("((CAST(substr(taken_at, 12, 2) AS INTEGER) * 60 + CAST(substr(taken_at, 15, 2) AS INTEGER)) * 4096 "
             "+ CAST(round(temperature_c * 10) AS INTEGER) + 1000) * 4096 + CAST(round(humidity_pct * 10) AS INTEGER) + 1000")
_PRIME = 2_147_483_647


def _row_code(minute: int, temperature_tenths: int, humidity_tenths: int) -> int:
    return (minute * 4096 + temperature_tenths + 1000) * 4096 + humidity_tenths + 1000


def verify_cloud(db: Path, fleet: dict[int, str], ids: list[int], day: datetime.date, readings: int, seed: int) -> dict:
    """
    Compare the cloud's database with the synthetic days sent, device-day by
    device-day: lost, unexpected, doubled and wrong readings, and which
    device-days are not stored exactly once.

    One pass of SQL over the table sums each device's row count and two
    fingerprints of its rows (L{_ROW_CODE}); a device whose sums are its
    day's is stored exactly.  Only the devices that differ have their rows
    read and compared one by one, so checking 9.6 million rows costs
    seconds and no memory of them.  (Doubles cannot exist under the primary
    key; counted all the same.)
    """
    library = loadgen.day_library(readings, seed)
    minutes = library.minutes
    expected_of: dict[int, tuple[int, int, int]] = {}
    wanted = set(ids)
    day_text = day.isoformat()
    lost = unexpected = wrong = doubled = 0
    stored_devices = 0
    bad: dict[str, list[int]] = {"lost": [], "doubled": [], "unexpected": [], "wrong": [], "missing": []}
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        (rows_total,) = connection.execute("SELECT count(*) FROM readings").fetchone()
        suspects = []
        seen = set()
        # Each row's code once (a subquery the planner does not flatten,
        # for its aggregate), then summed by device in key order.
        query = (f"SELECT device_id, count(*), min(device_ip), max(device_ip), sum(of_day), sum(code), "
                 f"sum((code % {_PRIME}) * (code % {_PRIME}) % {_PRIME}) FROM "
                 f"(SELECT device_id, device_ip, substr(taken_at, 1, 10) = ? AS of_day, {_ROW_CODE} AS code "
                 f"FROM readings ORDER BY device_id LIMIT -1) GROUP BY device_id")
        for device_id, count, ip_low, ip_high, of_day, code_sum, square_sum in connection.execute(query, (day_text,)):
            seen.add(device_id)
            if device_id not in wanted:
                unexpected += count
                bad["unexpected"].append(device_id)
                continue
            stored_devices += 1
            shape = library.shape_of(device_id)
            expected = expected_of.get(shape)
            if expected is None:
                temperatures, humidities = library.values(shape)
                codes = [_row_code(m, t, h) for m, t, h in zip(minutes, temperatures, humidities)]
                expected = expected_of[shape] = (len(codes), sum(codes), sum((c % _PRIME) * (c % _PRIME) % _PRIME for c in codes))
            if (count, of_day, code_sum, square_sum) == (expected[0], expected[0], expected[1], expected[2]) \
                    and ip_low == ip_high == fleet[device_id]:
                continue
            suspects.append(device_id)
        for device_id in sorted(wanted - seen):
            lost += readings
            bad["missing"].append(device_id)
        for device_id in suspects:
            want = {
                r.taken_at.isoformat(timespec="minutes"): (r.device_ip, r.temperature_c, r.humidity_pct)
                for r in library.readings_of(device_id, fleet[device_id], day)
            }
            rows = connection.execute(
                "SELECT device_ip, taken_at, temperature_c, humidity_pct FROM readings WHERE device_id = ?", (device_id,)
            ).fetchall()
            have = {taken_at: (ip, t, h) for ip, taken_at, t, h in rows}
            device_lost = len(want.keys() - have.keys())
            device_unexpected = len(have.keys() - want.keys())
            device_wrong = sum(1 for k in want.keys() & have.keys() if want[k] != have[k])
            device_doubled = len(rows) - len(have)
            lost += device_lost
            unexpected += device_unexpected
            wrong += device_wrong
            doubled += device_doubled
            for name, value in (("lost", device_lost), ("unexpected", device_unexpected), ("wrong", device_wrong),
                                ("doubled", device_doubled)):
                if value:
                    bad[name].append(device_id)
    finally:
        connection.close()
    expected_total = len(ids) * readings
    device_days = {
        "expected": len(ids),
        "exactly_once": len(ids) - len(set(bad["missing"]) | set(bad["lost"]) | set(bad["wrong"]) | set(bad["doubled"])
                                       | (set(bad["unexpected"]) & wanted)),
        **{f"{name}": len(devices) for name, devices in bad.items()},
        "first": {name: sorted(devices)[:10] for name, devices in bad.items() if devices},
    }
    return {"expected": expected_total, "stored": rows_total, "lost": lost, "unexpected": unexpected,
            "wrong_values": wrong, "doubled_rows": doubled, "device_days": device_days,
            "exact": lost == unexpected == wrong == doubled == 0 and rows_total == expected_total}


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = f"{int(Path('/proc/meminfo').read_text().split()[1]) / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory": mem,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "sqlite": sqlite3.sqlite_version,
        "rmem_max": _read_int("/proc/sys/net/core/rmem_max"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "python_speed_start": python_speed(),
    }


def python_speed(runs: int = 7, steps: int = 100_000) -> dict:
    """
    The CPU time one step of a fixed pure-Python workload takes (string,
    dict and tuple work, as the daemons' own), in nanoseconds: the best and
    the median of C{runs}.  The machine's speed differs from day to day
    (the same code's CPU seconds have differed by two times), so a run's
    CPU figures are read against it; measured at the start and the end of
    a run, with the machine otherwise idle: beside a fleet's daemons it
    would measure their contention for the cores' caches as much as the
    machine.
    """
    def workload() -> float:
        table: dict[str, tuple[int, str]] = {}
        started = time.process_time()
        for step in range(steps):
            key = f"{step & 4095:04x}"
            table[key] = (step, key.upper())
            if len(table[key][1]) != 4:
                raise AssertionError("unreachable")
        return time.process_time() - started

    times = sorted(workload() for _ in range(runs))
    return {"best_ns": round(times[0] / steps * 1e9, 1), "median_ns": round(times[len(times) // 2] / steps * 1e9, 1)}


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text())
    except (OSError, ValueError):
        return None


# -- ceilings -------------------------------------------------------------------


def ceiling_udp(args) -> dict:
    say(f"ceiling: raw UDP receive-and-acknowledge loop, {args.raw_datagrams:,} datagrams of 1,200 bytes, "
        f"window {args.intake_window}, best of {args.ceiling_runs}")
    runs = [ceilings.raw_udp_ceiling(args.raw_datagrams, args.intake_window, time_limit=60)
            for _ in range(args.ceiling_runs)]
    result = dict(max(runs, key=lambda r: r["datagrams_per_s"] or 0))
    result["loop_capacity_per_s"] = max(r["loop_capacity_per_s"] or 0 for r in runs)
    result["runs_datagrams_per_s"] = [r["datagrams_per_s"] for r in runs]
    say(f"  {result['datagrams_per_s']:,.0f} datagrams/s acknowledged (runs: "
        f"{', '.join(f'{r:,.0f}' for r in result['runs_datagrams_per_s'])}); the loop's own CPU: "
        f"{result['loop_capacity_per_s']:,.0f} datagrams per CPU second")
    # Not a target: the same loop on Twisted's reactor, to tell the
    # framework's share of the gateway's cost per datagram.
    twisted = ceilings.raw_udp_ceiling(args.raw_datagrams // 2, args.intake_window, time_limit=60,
                                       loop="twisted-udp-ack-loop")
    result["twisted_loop"] = twisted
    say(f"  the same loop on Twisted's reactor: {twisted['datagrams_per_s']:,.0f} datagrams/s, "
        f"{twisted['loop_capacity_per_s']:,.0f} per CPU second")
    # Not a target either: what the intake's own steps cost with no daemon
    # around them, so the best ratio any gateway built on this codec and
    # spool could reach is known in the same run.
    with tempfile.TemporaryDirectory(prefix="meter-floor-") as scratch:
        floor = micro.intake_floor(Path(scratch))
    raw_us = 1e6 / result["loop_capacity_per_s"]
    result["intake_floor_us"] = {step: round(micros, 2) for step, micros in floor.items()}
    result["intake_floor_per_s"] = round(1e6 / (raw_us + sum(floor.values())), 1)
    say(f"  the intake's steps alone (bench/micro.py intake_floor): "
        f"{', '.join(f'{step} {micros:.1f}' for step, micros in floor.items())} µs of CPU a datagram; "
        f"with the raw loop's {raw_us:.1f} µs, at most {result['intake_floor_per_s']:,.0f} datagrams per CPU second")
    return result


def ceiling_sqlite(args, rows: list[tuple], scratch: Path) -> dict:
    say(f"ceiling: SQLite executemany of {len(rows):,} rows, 10,000 a transaction, WAL + synchronous=FULL, "
        f"cloud schema, median of {args.ceiling_runs} (and of the runs beside the cloud's)")
    runs = [ceilings.executemany_ceiling(scratch / "ceiling.sqlite", rows) for _ in range(args.ceiling_runs)]
    result = dict(runs[0])
    result["runs_rows_per_s"] = [r["rows_per_s"] for r in runs]
    result["rows_per_s"] = round(statistics.median(result["runs_rows_per_s"]), 1)
    result["best_rows_per_s"] = max(result["runs_rows_per_s"])
    without = ceilings.executemany_ceiling(scratch / "ceiling-noindex.sqlite", rows, index=False)
    result["rows_per_s_without_ip_index"] = without["rows_per_s"]
    say(f"  {result['rows_per_s']:,.0f} rows/s (runs: {', '.join(f'{r:,.0f}' for r in result['runs_rows_per_s'])}; "
        f"{without['rows_per_s']:,.0f} without the device_ip index)")
    return result


def cloud_rows(readings: list) -> list[tuple]:
    stored_at = time.time()
    return [(r.device_id, r.device_ip, r.taken_at.isoformat(timespec="minutes"), r.temperature_c, r.humidity_pct,
             stored_at) for r in readings]


# -- scenarios ------------------------------------------------------------------


def scenario_day4(args, scratch: Path) -> dict:
    """
    The report's day: 4 devices with the survey files of surveys/, through
    a gateway and a cloud; first send to the cloud's last acknowledgement.
    """
    say(f"day4: the report's 4-device day (surveys/), {args.repeat} runs, each with a fresh gateway and cloud")
    runs = []
    # Each run its own spool and database: the gateway takes only yesterday
    # (give or take a day), so runs cannot be told apart by their day, and
    # a second run of one day would find its round closed.
    day = datetime.date.today() - datetime.timedelta(days=1)
    for index in range(args.repeat):
        workspace = workspace_of(scratch / f"day4-{index}", len(config.DEFAULT_FLEET),
                                 addresses=config.DEFAULT_FLEET.__getitem__)
        try:
            cloud = workspace.start_cloud()
            gateway = workspace.start_gateway(connected=True)
            sent = run_loadgen(workspace, f"day4-{index}", "--devices", "4", "--surveys", str(REPO / "surveys"),
                               "--day", day.isoformat(), "--spread", "0", "--timeout", "30")
            totals = wait_committed(cloud, sent["readings_acked"], 30)
            first, last = sent["first_send"], totals["last_ack"]
            rtt = gateway.new_records(ACKNOWLEDGED)
            rtt_ms = round(rtt[-1]["ms"], 1) if rtt else None
            runs.append({
                "day": day.isoformat(),
                "readings": sent["readings_acked"],
                "stored": totals["new"],
                "first_send_to_last_cloud_ack_ms": round((last - first) * 1000, 2) if last and first else None,
                "device_delivery_ms": round(sent["duration_s"] * 1000, 2),
                "gateway_batch_send_to_ack_ms": rtt_ms,
                "cloud_store_ms": totals.get("store_ms"),
                "ack_latency_ms": sent["ack_latency_ms"],
                "ack_latency_handled_ms": sent.get("ack_latency_handled_ms"),
            })
            say(f"  run {index + 1}: {runs[-1]['first_send_to_last_cloud_ack_ms']} ms first send to last cloud ack "
                f"({totals['new']} readings stored; every device acknowledged after {runs[-1]['device_delivery_ms']} ms; "
                f"batch sent to acknowledged {rtt_ms} ms, of which cloud store {totals.get('store_ms')} ms)")
        finally:
            workspace.stop()
    times = [r["first_send_to_last_cloud_ack_ms"] for r in runs if r["first_send_to_last_cloud_ack_ms"] is not None]
    return {
        "runs": runs,
        "median_ms": round(statistics.median(times), 2) if times else None,
        "min_ms": min(times) if times else None,
        "max_ms": max(times) if times else None,
        "complete": all(r["stored"] == r["readings"] == 16 for r in runs),
    }


def scenario_intake(args, scratch: Path, raw: dict) -> dict:
    """
    Gateway intake alone: the fleet has one more device than send, so the
    day's round stays open and nothing is forwarded while measuring.
    """
    devices = args.intake_devices
    sealed = args.intake_sealed_devices
    say(f"intake: {sealed} devices x 1,440 readings, pre-sealed chunks of <= 1,200 bytes, window {args.intake_window}; "
        f"then {devices} devices from loadgen")
    workspace = workspace_of(scratch / "intake", max(devices, sealed) + 1, deadline=600.0)
    fleet = workspace.fleet
    try:
        workspace.start_cloud()
        gateway = workspace.start_gateway(connected=True)
        from meter import secrets

        day = datetime.date.today() - datetime.timedelta(days=1)
        datagrams = []
        now = int(time.time())
        for device_id in range(1, sealed + 1):
            key = secrets.read_device_key(workspace.secrets, device_id)
            day_readings = synthetic_day(device_id, fleet[device_id], day, 1440, args.seed)
            xfer = f"{device_id:016x}"
            for chunk in wire.split_day(device_id, fleet[device_id], day, day_readings, xfer, now):
                datagrams.append(wire.seal(wire.encode(chunk), key))
        sizes = [len(d) for d in datagrams]
        before = gateway.stats()
        lean = ceilings.windowed_send(("127.0.0.1", workspace.gateway_port), datagrams, ceilings.day_ident,
                                      ceilings.dayack_ident, args.intake_window, time_limit=120)
        after = gateway.stats()
        cpu = after["cpu_s"] - before["cpu_s"]
        lean.update({
            "mean_size": round(sum(sizes) / len(sizes), 1),
            "max_size": max(sizes),
            "readings": sealed * 1440,
            "gateway_cpu_s": round(cpu, 2),
            "gateway_capacity_per_s": round(lean["acked"] / cpu, 1) if cpu > 0 else None,
            "gateway_peak_rss_mb": after["peak_rss_mb"],
        })
        say(f"  pre-sealed: {lean['datagrams_per_s']:,.0f} datagrams/s acknowledged ({lean['acked']:,} of "
            f"{lean['datagrams']:,}, mean {lean['mean_size']:.0f} bytes); gateway CPU {cpu:.2f} s = "
            f"{lean['gateway_capacity_per_s'] or 0:,.0f} datagrams per CPU second")

        # The same kind of days from loadgen (real device code, its own
        # sockets and keys), on the next device ids of a fresh gateway.
        workspace.stop()
        workspace = workspace_of(scratch / "intake-loadgen", max(devices, sealed) + 1, deadline=600.0)
        workspace.start_cloud()
        gateway = workspace.start_gateway(connected=True)
        before = gateway.stats()
        sent = run_loadgen(workspace, "intake", "--devices", str(devices), "--readings", "1440",
                           "--spread", str(args.intake_spread), "--seed", str(args.seed), "--timeout", "120")
        after = gateway.stats()
        cpu = after["cpu_s"] - before["cpu_s"]
        via_loadgen = {
            "devices": devices,
            "spread_s": args.intake_spread,
            "chunks_acked": sent["chunks_acked"],
            "datagrams_sent": sent["datagrams_sent"],
            "retransmissions": sent["retransmissions"],
            "failed": sent["failed"],
            "seconds": sent["duration_s"],
            "datagrams_per_s": sent["chunks_per_s"],
            "readings_per_s": sent["readings_per_s"],
            "ack_latency_ms": sent["ack_latency_ms"],
            "ack_latency_handled_ms": sent.get("ack_latency_handled_ms"),
            "gateway_cpu_s": round(cpu, 2),
            "gateway_capacity_per_s": round(sent["chunks_acked"] / cpu, 1) if cpu > 0 else None,
            "loadgen_cpu_s": sent["loadgen_cpu_s"],
        }
        say(f"  loadgen: {via_loadgen['datagrams_per_s'] or 0:,.0f} datagrams/s acknowledged, "
            f"{sent['retransmissions']} retransmissions, ack p50 {sent['ack_latency_ms'].get('p50')} ms "
            f"p99 {sent['ack_latency_ms'].get('p99')} ms (loadgen CPU {sent['loadgen_cpu_s']} s)")
    finally:
        workspace.stop()
    ratio = lean["datagrams_per_s"] / raw["datagrams_per_s"] if lean["datagrams_per_s"] and raw["datagrams_per_s"] else None
    capacity_ratio = (lean["gateway_capacity_per_s"] / raw["loop_capacity_per_s"]
                      if lean["gateway_capacity_per_s"] and raw["loop_capacity_per_s"] else None)
    return {
        "pre_sealed": lean,
        "loadgen": via_loadgen,
        "ratio_to_raw": round(ratio, 4) if ratio else None,
        "cpu_ratio_to_raw": round(capacity_ratio, 4) if capacity_ratio else None,
    }


def scenario_cloud(args, scratch: Path, readings: list, executemany: dict) -> dict:
    """
    The cloud alone: BATCH lines over TLS from a client holding the
    gateway's certificate.  First as the gateway sends them (its default
    batch size and batches in flight, the figures the target is judged on),
    C{args.cloud_runs} times, then once each one batch in flight of that
    size and of C{args.batch}: the cloud's work for one batch alone, with no
    next batch to read while it commits.

    Each run is followed by a run of the executemany ceiling: this machine's
    speed drifts by up to 1.8x within minutes, so the ratios are the median
    of the cloud's runs over the median of all the ceiling's runs, taken in
    turns (a single run against the best ceiling ranged 0.49x-0.60x within
    ten minutes on unchanged code).
    """
    batch = config.SCHEMA["gateway"]["batch_readings"][1]
    window = config.SCHEMA["gateway"]["batches_in_flight"][1]
    say(f"cloud: {len(readings):,} readings over TLS straight to the cloud: batches of {batch}, {window} in flight "
        f"(the gateway's defaults) {args.cloud_runs} times, then one in flight, batches of {batch} and of {args.batch}")
    runs: dict[str, list[dict]] = {}
    rows = cloud_rows(readings)
    beside: list[float] = []
    plan = [("as_gateway_sends", batch, window)] * args.cloud_runs + [("in_flight_1", batch, 1),
                                                                       ("small_batches", args.batch, 1)]
    # Each batch size's lines once: every run starts a fresh cloud, so the
    # same batch ids are new to each.
    lines_of = {size: [wire.encode(wire.Batch(f"{index + 1:016x}", tuple(readings[start:start + size]))) + b"\n"
                       for index, start in enumerate(range(0, len(readings), size))]
                for size in {batch_size for _, batch_size, _ in plan}}
    for number, (name, batch_size, in_flight) in enumerate(plan):
        workspace = workspace_of(scratch / f"cloud-{number}-{name}", 1)
        try:
            cloud = workspace.start_cloud()
            connection = ceilings.tls_client(workspace.secrets, workspace.cloud_port)
            before = cloud.stats()
            outcome = ceilings.send_batches(connection, lines_of[batch_size], in_flight, time_limit=180)
            after = cloud.stats()
            connection.close()
            cpu = after["cpu_s"] - before["cpu_s"]
            outcome.update({
                "readings": len(readings),
                "batch": batch_size,
                "readings_per_s": round(outcome["new"] / outcome["seconds"], 1) if outcome["seconds"] else None,
                "cloud_cpu_s": round(cpu, 2),
                "cloud_capacity_per_s": round(outcome["new"] / cpu, 1) if cpu > 0 else None,
                "cloud_peak_rss_mb": after["peak_rss_mb"],
            })
            runs.setdefault(name, []).append(outcome)
            say(f"  batches of {batch_size}, {in_flight} in flight: {outcome['readings_per_s'] or 0:,.0f} readings/s "
                f"committed ({outcome['new']:,} new, {outcome['dup']} dup); cloud CPU {cpu:.2f} s = "
                f"{outcome['cloud_capacity_per_s'] or 0:,.0f} readings per CPU second")
        finally:
            workspace.stop()
        beside.append(ceilings.executemany_ceiling(scratch / "ceiling-beside.sqlite", rows)["rows_per_s"])
    executemany["runs_beside_cloud_rows_per_s"] = beside
    every = executemany["runs_rows_per_s"] + beside
    executemany["best_rows_per_s"] = max(every)
    executemany["rows_per_s"] = round(statistics.median(every), 1)
    say(f"  executemany beside these runs: {', '.join(f'{r:,.0f}' for r in beside)} rows/s; the ratios use the "
        f"median of all its {len(every)} runs, {executemany['rows_per_s']:,.0f} (best {executemany['best_rows_per_s']:,.0f})")
    results = {name: _median_run(outcomes) for name, outcomes in runs.items()}
    main = results["as_gateway_sends"]
    say(f"  as the gateway sends, median of {len(runs['as_gateway_sends'])} runs: {main['readings_per_s'] or 0:,.0f} "
        f"readings/s, {main['cloud_capacity_per_s'] or 0:,.0f} per CPU second")
    ratio = main["readings_per_s"] / executemany["rows_per_s"] if main["readings_per_s"] else None
    # executemany runs on one thread, nearly all of it on the CPU: its rows/s
    # is close to its rows per CPU second.
    cpu_ratio = main["cloud_capacity_per_s"] / executemany["rows_per_s"] if main["cloud_capacity_per_s"] else None
    return {**results, "ratio_to_raw": round(ratio, 4) if ratio else None,
            "cpu_ratio_to_raw": round(cpu_ratio, 4) if cpu_ratio else None}


def _median_run(outcomes: list[dict]) -> dict:
    """
    One figure for several runs of the same cloud load: the medians of
    their rates, the sums of their counts, and each run's own rates.
    """
    if len(outcomes) == 1:
        return outcomes[0]
    summary = dict(outcomes[-1])
    for count in ("batches", "acked", "refused", "new", "dup", "readings"):
        summary[count] = sum(outcome[count] for outcome in outcomes)
    for rate in ("readings_per_s", "cloud_capacity_per_s"):
        values = [outcome[rate] for outcome in outcomes]
        summary[rate] = round(statistics.median(values), 1) if None not in values else None
        summary[f"runs_{rate}"] = values
    summary["runs"] = len(outcomes)
    summary["cloud_peak_rss_mb"] = max(outcome["cloud_peak_rss_mb"] for outcome in outcomes)
    del summary["seconds"], summary["cloud_cpu_s"]
    return summary


def scenario_fleet(args, scratch: Path, devices: int, readings: int, spread: float, profile: bool = False) -> dict:
    """
    N devices x R readings through the gateway and the cloud, first send to
    the cloud's last commit, with every reading checked in the database.
    """
    tag = f"{devices}x{readings}{'-profiled' if profile else ''}"
    processes = fleet_loadgen_processes(devices, args.loadgen_processes)
    retry_after, attempts = fleet_retries(args.fleet_timeout)
    say(f"fleet: {devices:,} devices x {readings} readings, spread {spread:g} s, {processes} loadgen "
        f"process{'es' if processes > 1 else ''}, a device that gives up tries again after {retry_after:g} s "
        f"(meter-device's {device.RETRY_AFTER:g} s / {RETRY_SCALE:g}), up to {attempts} attempts"
        f"{' (profiled)' if profile else ''}")
    gateway_settings = fleet_gateway_settings(args.forward, devices * readings)
    workspace = workspace_of(scratch / f"fleet-{tag}", devices, **gateway_settings)
    fleet = workspace.fleet
    spies = []
    try:
        cloud = workspace.start_cloud()
        gateway = workspace.start_gateway(connected=True)
        if profile:
            RESULTS.mkdir(parents=True, exist_ok=True)
            spies = [profiles.Spy(gateway.pid, RESULTS / "profile-gateway-intake.txt"),
                     profiles.Spy(cloud.pid, RESULTS / "profile-cloud.txt")]
            time.sleep(0.5)
        g0, c0 = gateway.stats(), cloud.stats()
        sampler = Sampler({"gateway": gateway.pid, "cloud": cloud.pid})
        udp0 = udp_counters()
        sent = run_loadgen(workspace, tag, "--devices", str(devices), "--readings", str(readings),
                           "--spread", str(spread), "--seed", str(args.seed), "--timeout", str(args.fleet_timeout),
                           "--processes", str(processes), "--attempts", str(attempts),
                           "--retry-after", str(retry_after), timeout=args.fleet_timeout)
        udp1 = udp_counters()
        g1, c1 = gateway.stats(), cloud.stats()
        if profile:
            spies[0].stop()
            spies.append(profiles.Spy(gateway.pid, RESULTS / "profile-gateway-forward.txt"))
        totals = wait_committed(cloud, sent["readings_acked"], args.fleet_timeout)
        g2, c2 = gateway.stats(), cloud.stats()
        sampler.stop()
        for spy in spies:
            spy.stop()
    finally:
        for spy in spies:
            spy.stop()
        if "sampler" in locals():
            sampler.stop()
        workspace.stop()
    counters = gateway_counters(gateway)
    day = datetime.date.fromisoformat(sent["day"])
    verify_began = time.monotonic()
    verify_cpu = time.process_time()
    check = verify_cloud(workspace.db, fleet, list(fleet), day, readings, args.seed)
    check["seconds"] = round(time.monotonic() - verify_began, 2)
    check["cpu_s"] = round(time.process_time() - verify_cpu, 2)
    first, last = sent["first_send"], totals["last_ack"]
    end_to_end = (last - first) if first and last else None
    intake_s = sent["duration_s"]
    total_readings = devices * readings
    result = {
        "devices": devices,
        "readings_per_device": readings,
        "spread_s": spread,
        "start_window_s": round(sent["last_start"] - sent["first_start"], 3)
        if sent.get("first_start") and sent.get("last_start") else None,
        "profiled": profile,
        "readings_sent": sent["readings_sent"],
        "delivered_devices": sent["delivered"],
        "failed_devices": sent["failed"],
        "incomplete_devices": sent["incomplete"],
        "attempts": sent["attempts"],
        "retried_devices": sent["retried_devices"],
        "gave_up": sent["gave_up"],
        "retry_after_s": retry_after,
        "loadgen_processes": processes,
        "gateway_settings": gateway_settings,
        "end_to_end_s": round(end_to_end, 3) if end_to_end else None,
        "intake_s": intake_s,
        "forward_s": round(last - sent["last_ack"], 3) if last and sent["last_ack"] else None,
        "readings_per_s": round(total_readings / end_to_end, 1) if end_to_end else None,
        "datagrams_per_s": sent["chunks_per_s"],
        "chunks": sent["chunks"],
        "datagrams_sent": sent["datagrams_sent"],
        "retransmissions": sent["retransmissions"],
        "busy_answers": sent["busy_answers"],
        "ack_latency_ms": sent["ack_latency_ms"],
        "ack_latency_handled_ms": sent.get("ack_latency_handled_ms"),
        "ack_tail": sent.get("ack_tail"),
        "cloud_batches": totals["batches"],
        "cloud_duplicates": totals["dup"],
        "gateway_datagrams_received": counters.get("datagrams"),
        "gateway_duplicate_chunks": counters.get("duplicates", 0),
        "kernel_udp_receive_buffer_drops": udp1.get("RcvbufErrors", 0) - udp0.get("RcvbufErrors", 0),
        "forwarding": forwarding_breakdown(gateway, cloud),
        "db": check,
        "gateway": {"cpu_intake_s": round(g1["cpu_s"] - g0["cpu_s"], 2), "cpu_forward_s": round(g2["cpu_s"] - g1["cpu_s"], 2),
                    "cpu_s": round(g2["cpu_s"] - g0["cpu_s"], 2), "peak_rss_mb": g2["peak_rss_mb"]},
        "cloud": {"cpu_s": round(c2["cpu_s"] - c0["cpu_s"], 2), "peak_rss_mb": c2["peak_rss_mb"]},
        "loadgen": {"cpu_s": sent["loadgen_cpu_s"], "peak_rss_mb": sent["loadgen_max_rss_mb"], "sockets": sent["sockets"],
                    "processes": processes, "prepare_s": sent["prepare_s"],
                    "sending_cpu_s": sent["loadgen_sending_cpu_s"],
                    "cpu_us_per_datagram": round(sent["loadgen_sending_cpu_s"] / sent["datagrams_sent"] * 1e6, 1)
                    if sent["datagrams_sent"] else None},
        "timeline": sampler.timeline(sent["first_send"], sent["last_ack"], last),
    }
    result["gateway"]["cpu_us_per_reading"] = round(result["gateway"]["cpu_s"] / total_readings * 1e6, 2)
    result["cloud"]["cpu_us_per_reading"] = round(result["cloud"]["cpu_s"] / total_readings * 1e6, 2)
    result["costs"] = fleet_costs(result)
    if profile:
        result["profiles"] = {}
        for name in ("gateway-intake", "gateway-forward", "cloud"):
            path = RESULTS / f"profile-{name}.txt"
            if path.exists():
                summary = profiles.summarise(path)
                result["profiles"][name] = summary
                say(profiles.format_summary(f"  profile of the {name} ({path.relative_to(REPO)})", summary))
    say(f"  end to end {result['end_to_end_s']} s (intake {intake_s} s, forward {result['forward_s']} s): "
        f"{result['readings_per_s'] or 0:,.0f} readings/s; {sent['retransmissions']} retransmissions; "
        f"ack p50 {sent['ack_latency_ms'].get('p50')} ms p99 {sent['ack_latency_ms'].get('p99')} ms; "
        f"db: {check['stored']:,} of {check['expected']:,} stored, lost {check['lost']}, doubled {check['doubled_rows']}, "
        f"device-days stored exactly once {check['device_days']['exactly_once']:,} of {check['device_days']['expected']:,} "
        f"(missing {check['device_days']['missing']}, lost some {check['device_days']['lost']}, doubled "
        f"{check['device_days']['doubled']}, wrong {check['device_days']['wrong']}; checked in {check['seconds']} s); "
        f"{sent['retried_devices']:,} devices tried again; "
        f"cloud saw {totals['dup']} duplicates; kernel receive-buffer drops {result['kernel_udp_receive_buffer_drops']}; "
        f"uplink cycle {result['forwarding']['interval_between_acks_ms_p50']} ms a batch; phases {result['timeline']}; gateway CPU {result['gateway']['cpu_s']} s, peak RSS "
        f"{result['gateway']['peak_rss_mb']} MB; cloud CPU {result['cloud']['cpu_s']} s")
    if sent.get("ack_tail"):
        say(f"  {loadgen.tail_text(sent['ack_tail'])}")
    return result


def fleet_costs(fleet: dict) -> dict:
    """
    A fleet run's CPU a datagram and a reading: the gateway's while the
    fleet sends (intake: first send to the last device acknowledgement;
    with forward = "device" it forwards meanwhile too) and after (forward),
    the cloud's, and loadgen's a datagram it sent.
    """
    readings = fleet["devices"] * fleet["readings_per_device"]
    datagrams = fleet["gateway_datagrams_received"] or fleet["datagrams_sent"]
    gateway = fleet["gateway"]
    per = lambda seconds, count: round(seconds / count * 1e6, 2) if count else None  # noqa: E731
    return {
        "devices": fleet["devices"],
        "readings_per_device": fleet["readings_per_device"],
        "datagrams": datagrams,
        "readings": readings,
        "gateway_intake_us_per_datagram": per(gateway["cpu_intake_s"], datagrams),
        "gateway_intake_us_per_reading": per(gateway["cpu_intake_s"], readings),
        "gateway_forward_us_per_reading": per(gateway["cpu_forward_s"], readings),
        "gateway_us_per_datagram": per(gateway["cpu_s"], datagrams),
        "gateway_us_per_reading": per(gateway["cpu_s"], readings),
        "cloud_us_per_reading": per(fleet["cloud"]["cpu_s"], readings),
        "loadgen_us_per_datagram": fleet["loadgen"]["cpu_us_per_datagram"],
    }


def cost_table(results: dict) -> str:
    """
    The per-N table of issue 20: CPU a datagram and a reading, by fleet size.
    """
    fleets = sorted((f for f in results["scenarios"].get("fleet", []) if not f["profiled"]),
                    key=lambda f: (f["readings_per_device"], f["devices"]))
    if not fleets:
        return ""
    header = ("fleet", "datagrams", "gateway µs/datagram (intake)", "gateway µs/reading intake + forward = total",
              "cloud µs/reading", "loadgen µs/datagram (sending)")
    rows = [header]
    for f in fleets:
        c = f["costs"]
        rows.append((f"{f['devices']:,} x {f['readings_per_device']:,}", f"{c['datagrams']:,}",
                     f"{c['gateway_intake_us_per_datagram']}",
                     f"{c['gateway_intake_us_per_reading']} + {c['gateway_forward_us_per_reading']} = "
                     f"{c['gateway_us_per_reading']}", f"{c['cloud_us_per_reading']}", f"{c['loadgen_us_per_datagram']}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- the report -----------------------------------------------------------------


def verdicts(results: dict) -> list[dict]:
    out = []
    scenarios = results["scenarios"]
    intake = scenarios.get("intake")
    if intake:
        # Reported, not judged (issue 20: no compiled extension).
        out.append(_verdict("gateway intake / raw UDP loop (datagrams/s, same driver)", "reported", intake["ratio_to_raw"],
                            None, measured_only=True, why="a figure, no longer a target"))
        out.append(_verdict("gateway intake / raw UDP loop (per CPU second)", "reported", intake["cpu_ratio_to_raw"],
                            None, measured_only=True, why="a figure, no longer a target"))
    cloud = scenarios.get("cloud")
    if cloud:
        out.append(_verdict("cloud ingest / raw executemany (readings/s)", ">= 0.6", cloud["ratio_to_raw"],
                            lambda v: v >= TARGETS["cloud_ratio"]))
        out.append(_verdict("cloud ingest / raw executemany (per CPU second)", ">= 0.6", cloud["cpu_ratio_to_raw"],
                            lambda v: v >= TARGETS["cloud_ratio"]))
    pg = scenarios.get("cloud_postgresql")
    if pg:
        out.append(_verdict("cloud ingest into PostgreSQL / raw COPY + INSERT ON CONFLICT (readings/s)", ">= 0.6",
                            pg["ratio_to_raw"], lambda v: v >= pg_bench.TARGET_RATIO))
        out.append(_verdict("cloud ingest into PostgreSQL: lost + doubled readings", "0", 0 if pg["exact"] else "not exact",
                            lambda v: v == 0))
    day4 = scenarios.get("day4")
    if day4:
        out.append(_verdict("4-device day, first send to last cloud ack (median ms)", "< 20", day4["median_ms"],
                            lambda v: v < TARGETS["day4_ms"]))
    for name, view in scenarios.get("dashboard", {}).get("views", {}).items():
        out.append(_verdict(f"dashboard ({name}): first chart after navigation start (p50 ms)", "< 1000",
                            view["p50_ms"], lambda v: v < dashboard.TARGET_MS))
    fleets = [f for f in scenarios.get("fleet", []) if not f["profiled"] and f["readings_per_device"] == 96]
    ten = [f for f in fleets if f["devices"] == 10_000]
    if ten:
        # Issue #6's targets, on its 10,000-device day.
        f = ten[0]
        name = "10,000 devices x 96 (issue #6)"
        out.append(_verdict(f"{name}: first send to last cloud commit (s)", "<= 20", f["end_to_end_s"],
                            lambda v: v <= TARGETS["fleet_10k_seconds"]))
        out.append(_verdict(f"{name}: gateway peak RSS (MB)", "< 200", f["gateway"]["peak_rss_mb"],
                            lambda v: v < TARGETS["fleet_10k_rss_mb"]))
        out.append(_verdict(f"{name}: device ack latency p99 (ms)", "< 5", f["ack_latency_ms"].get("p99"),
                            lambda v: v < TARGETS["ack_p99_ms"]))
    if fleets:
        big = max(fleets, key=lambda f: f["devices"])
        out.extend(fleet_verdicts(big, FLEET_TARGETS["devices"], FLEET_TARGETS["seconds"]))
        if ten and big["devices"] > 10_000:
            for side, key in (("gateway", "gateway_us_per_reading"), ("cloud", "cloud_us_per_reading")):
                small, large = ten[0]["costs"][key], big["costs"][key]
                growth = round(large / small, 3) if small and large else None
                out.append(_verdict(f"{side} CPU a reading, {big['devices']:,} devices over 10,000 ({large} / {small} µs)",
                                    f"<= {FLEET_TARGETS['cost_growth']:g} (does not grow with N)", growth,
                                    lambda v: v <= FLEET_TARGETS["cost_growth"],
                                    measured_only=big["devices"] < FLEET_TARGETS["devices"], why=_FULL_FLEET))
    for f in scenarios.get("fleet", []):
        if not f["profiled"] and f["readings_per_device"] == 1440 and f["devices"] >= FLEET_TARGETS["devices_1440"]:
            out.extend(fleet_verdicts(f, FLEET_TARGETS["devices_1440"], FLEET_TARGETS["seconds_1440"]))
    api = scenarios.get("api")
    if api:
        # Judged at the size: a year of 1,000 devices.
        full = api["readings"] >= 35_000_000
        for name, label in (("day", "one device's day as JSON"), ("series", "a 30-day series, 500 points"),
                            ("devices", "/api/v1/devices")):
            target = api_figures.TARGETS_MS[name]
            out.append(_verdict(f"api on {api['readings']:,} readings: {label}, p50 ms", f"< {target:g} (35M readings)",
                                api["figures"][name]["p50_ms"], lambda v, t=target: v < t, measured_only=not full,
                                why="the target is for 35 million readings: run with the default --api-devices and --api-days"))
    return out


_FULL_FLEET = "the target is for 100,000 devices: run with --devices 100000"


def fleet_verdicts(f: dict, full: int, seconds: float) -> list[dict]:
    """
    Issue 20's conditions on one fleet run, judged when it is the issue's
    size (C{full} devices; shown as measured below it).
    """
    small = f["devices"] < full
    why = f"the target is for {full:,} devices x {f['readings_per_device']:,}"
    name = f"{f['devices']:,} devices x {f['readings_per_device']:,}"
    days = f["db"].get("device_days", {})
    return [
        _verdict(f"{name}: devices started within (s, first to last start)", f"<= {FLEET_TARGETS['spread_s']:g}",
                 f.get("start_window_s"),
                 lambda v: v <= FLEET_TARGETS["spread_s"], measured_only=small, why=why),
        _verdict(f"{name}: first send to last cloud commit (s)", f"<= {seconds:g}", f["end_to_end_s"],
                 lambda v: v <= seconds, measured_only=small, why=why),
        _verdict(f"{name}: readings lost + doubled + unexpected + wrong", "0", f["db"]["lost"] + f["db"]["doubled_rows"]
                 + f["db"]["unexpected"] + f["db"]["wrong_values"], lambda v: v == 0),
        _verdict(f"{name}: device-days not stored exactly once (of {days.get('expected', 0):,})", "0",
                 days.get("expected", 0) - days.get("exactly_once", 0) if days else None, lambda v: v == 0),
        _verdict(f"{name}: kernel UDP receive-buffer drops (system-wide)", "0", f["kernel_udp_receive_buffer_drops"],
                 lambda v: v == 0, measured_only=small, why=why),
        _verdict(f"{name}: gateway peak RSS (MB)", f"< {FLEET_TARGETS['rss_mb']:g}", f["gateway"]["peak_rss_mb"],
                 lambda v: v < FLEET_TARGETS["rss_mb"], measured_only=small, why=why),
        _verdict(f"{name}: device ack latency p99 (ms)", f"< {FLEET_TARGETS['ack_p99_ms']:g}",
                 f["ack_latency_ms"].get("p99"), lambda v: v < FLEET_TARGETS["ack_p99_ms"], measured_only=small, why=why),
    ]


def _verdict(name: str, target: str, value, check, measured_only: bool = False,
             why: str = "the target is for 10,000 devices: run with --devices 10000") -> dict:
    met = None if value is None or measured_only else bool(check(value))
    return {"what": name, "target": target, "measured": value, "met": met, "note": why if measured_only else ""}


def table(results: dict) -> str:
    s = results["scenarios"]
    c = results["ceilings"]
    rows = [("figure", "measured", "ceiling", "ratio")]
    if "udp" in c and "intake" in s:
        i = s["intake"]
        rows.append(("gateway intake, datagrams/s acked (pre-sealed, window %d)" % i["pre_sealed"]["window"],
                     f"{i['pre_sealed']['datagrams_per_s']:,.0f}", f"{c['udp']['datagrams_per_s']:,.0f} raw UDP loop",
                     _ratio(i["ratio_to_raw"])))
        rows.append(("gateway intake, datagrams per CPU second",
                     f"{i['pre_sealed']['gateway_capacity_per_s']:,.0f}", f"{c['udp']['loop_capacity_per_s']:,.0f} raw loop",
                     _ratio(i["cpu_ratio_to_raw"])))
        rows.append(("(a Twisted UDP acknowledge loop, datagrams per CPU second)",
                     f"{c['udp']['twisted_loop']['loop_capacity_per_s']:,.0f}", "", _ratio(
                         c['udp']['twisted_loop']['loop_capacity_per_s'] / c['udp']['loop_capacity_per_s'])))
        rows.append(("(the raw loop plus the intake's steps alone, no daemon, per CPU second)",
                     f"{c['udp']['intake_floor_per_s']:,.0f}", "", _ratio(
                         c['udp']['intake_floor_per_s'] / c['udp']['loop_capacity_per_s'])))
        rows.append(("gateway intake via loadgen (device code), datagrams/s",
                     f"{i['loadgen']['datagrams_per_s'] or 0:,.0f}", "", ""))
    if "sqlite" in c and "cloud" in s:
        k = s["cloud"]
        main = k["as_gateway_sends"]
        rows.append((f"cloud ingest, readings/s committed (batches of {main['batch']:,}, {main['in_flight']} in flight, "
                     f"median of {main.get('runs', 1)})",
                     f"{main['readings_per_s']:,.0f}", f"{c['sqlite']['rows_per_s']:,.0f} raw executemany (median)",
                     _ratio(k["ratio_to_raw"])))
        rows.append(("cloud ingest, readings per CPU second (the same)",
                     f"{main['cloud_capacity_per_s']:,.0f}", f"{c['sqlite']['rows_per_s']:,.0f} raw executemany (median)",
                     _ratio(k["cpu_ratio_to_raw"])))
        for name in ("in_flight_1", "small_batches"):
            one = k[name]
            rows.append((f"cloud ingest, readings/s committed (batches of {one['batch']:,}, 1 in flight)",
                         f"{one['readings_per_s']:,.0f}", "", _ratio(one["readings_per_s"] / c["sqlite"]["rows_per_s"])))
    pg = s.get("cloud_postgresql")
    if pg:
        main = pg["as_gateway_sends"]
        rows.append((f"cloud ingest into PostgreSQL {pg['server']}, readings/s committed (batches of {main['batch']:,}, "
                     f"{main['in_flight_per_node']} in flight, median of {main['runs']})",
                     f"{main['readings_per_s']:,.0f}", f"{pg['ceiling']['rows_per_s']:,.0f} raw COPY + INSERT (median)",
                     _ratio(pg["ratio_to_raw"])))
        rows.append(("the same, readings per cloud CPU second", f"{main['cloud_capacity_per_s']:,.0f}", "", ""))
        rows.append(("bytes a reading on disk (table + key + address index)", f"{main['db']['bytes_per_reading']}", "", ""))
        rows.append((f"one cloud node / two in front of the same database (2 cores), readings/s, median of "
                     f"{pg['one_node']['runs']}",
                     f"{pg['one_node']['readings_per_s']:,.0f} / {pg['two_nodes']['readings_per_s']:,.0f}", "",
                     _ratio(pg["two_over_one"])))
    if "day4" in s:
        rows.append(("4-device day, first send to last cloud ack (median)", f"{s['day4']['median_ms']} ms", "", ""))
    for f in s.get("fleet", []):
        if f["profiled"]:
            continue
        name = f"{f['devices']:,} dev x {f['readings_per_device']} (spread {f['spread_s']:g} s)"
        rows.append((f"{name}: first send to last commit", f"{f['end_to_end_s']} s "
                     f"(intake {f['intake_s']} s)", "", ""))
        rows.append((f"{name}: readings/s end to end; datagrams/s at gateway",
                     f"{f['readings_per_s'] or 0:,.0f}; {f['datagrams_per_s'] or 0:,.0f}", "", ""))
        rows.append((f"{name}: ack latency p50 / p99 (at the device's socket)",
                     f"{f['ack_latency_ms'].get('p50')} / {f['ack_latency_ms'].get('p99')} ms", "", ""))
        handled = f.get("ack_latency_handled_ms") or {}
        rows.append((f"{name}: the same, read by the busy loadgen", f"{handled.get('p50')} / {handled.get('p99')} ms",
                     "", ""))
        tail = f.get("ack_tail") or {}
        if tail.get("count"):
            rows.append((f"{name}: chunks acked after > {tail['over_ms']:g} ms; seconds with >= 1 % of theirs",
                         f"{tail['chunks_over']:,} ({tail['share_over'] * 100:.2f} %); "
                         f"{tail['seconds_over_p99']} of {tail['seconds']}", "", ""))
        rows.append((f"{name}: gateway CPU s / peak RSS", f"{f['gateway']['cpu_s']} s / {f['gateway']['peak_rss_mb']} MB",
                     "", ""))
        rows.append((f"{name}: cloud CPU s / peak RSS", f"{f['cloud']['cpu_s']} s / {f['cloud']['peak_rss_mb']} MB", "", ""))
        rows.append((f"{name}: retransmissions; busy answers; devices tried again (after {f['retry_after_s']:g} s)",
                     f"{f['retransmissions']:,}; {f['busy_answers']:,}; {f['retried_devices']:,}", "", ""))
        days = f["db"].get("device_days", {})
        rows.append((f"{name}: readings lost; doubled; cloud dups; device-days stored exactly once",
                     f"{f['db']['lost']}; {f['db']['doubled_rows']}; {f['cloud_duplicates']}; "
                     f"{days.get('exactly_once', 0):,} of {days.get('expected', 0):,}", "", ""))
        rows.append((f"{name}: kernel receive-buffer drops; loadgen CPU s ({f['loadgen']['processes']} proc.)",
                     f"{f['kernel_udp_receive_buffer_drops']}; {f['loadgen']['cpu_s']} s", "", ""))
    for name, view in s.get("dashboard", {}).get("views", {}).items():
        rows.append((f"dashboard ({name}), navigation start to first chart: p50 (cold first)",
                     f"{view['p50_ms']} ms ({view['first_ms']} ms)", "", ""))
    api = s.get("api")
    if api:
        for name, label in (("day", "one device's day as JSON"), ("series", "a 30-day series, 500 points"),
                            ("devices", "/api/v1/devices")):
            figure = api["figures"][name]
            rows.append((f"api on {api['readings']:,} readings: {label}, p50 / p95",
                         f"{figure['p50_ms']} / {figure['p95_ms']} ms", "", ""))
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ratio(value) -> str:
    return f"{value:.3f}x" if value else ""


def verdict_lines(items: list[dict]) -> str:
    lines = []
    for v in items:
        state = "n/a" if v["met"] is None else ("MET" if v["met"] else "NOT MET")
        if v["note"]:
            state += f" ({v['note']})"
        lines.append(f"  {v['what']}: {v['measured']} (target {v['target']}): {state}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", help="comma-separated subset of ceilings,day4,intake,cloud,fleet,api,dashboard,"
                        "overload (default: all but api, dashboard and overload; cloud alone with --store postgresql)")
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite",
                        help="the cloud's database: sqlite (default), or postgresql: a throwaway server started here, "
                        "the cloud's ingest against the raw COPY + INSERT ceiling, and one node against two")
    parser.add_argument("--devices", type=int, default=1000, help="devices of the main fleet scenario (default 1000; "
                        "10000 for the full fleet)")
    parser.add_argument("--scale", help="also run the fleet scenario at these sizes x 96 readings (default: those of "
                        "100, 1,000 and 10,000 below --devices: the per-N cost table)")
    parser.add_argument("--scale-1440", help="and at these sizes x 1,440 readings (default 100; 10,000, issue 20's "
                        "day of 14.4 million readings, from --devices 100000)")
    parser.add_argument("--spread-rate", type=float, default=1000.0,
                        help="fleet scenarios start their devices over readings / (96 x this) seconds, at most 60 s "
                        "(default 1000: 10,000 devices x 96 within 10 s, 100,000 within 60 s)")
    parser.add_argument("--spread", type=float, help="a fixed start window for the fleet scenarios instead")
    parser.add_argument("--loadgen-processes", type=int, default=0, metavar="P",
                        help="loadgen processes of each fleet scenario (default 1)")
    parser.add_argument("--fleet-timeout", type=float, default=180.0,
                        help="longest a fleet scenario's devices send, and then longest its cloud commits (s)")
    parser.add_argument("--forward", choices=("round", "device"), default="device",
                        help="the fleet scenarios' gateway [gateway] forward (default device: the readings flow "
                        "while the fleet reports; round: the report's way, a day's readings leave when its round closes)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of the 4-device day (default 5)")
    parser.add_argument("--intake-devices", type=int, default=300,
                        help="devices x 1,440 readings loadgen sends in the intake test (default 300)")
    parser.add_argument("--intake-sealed-devices", type=int, default=1000,
                        help="devices x 1,440 readings pre-sealed for the intake's ratio (default 1,000: ~22,000 "
                        "datagrams, ~2 CPU s, so the CPU clock's 10 ms ticks do not matter)")
    parser.add_argument("--intake-window", type=int, default=64, help="datagrams in flight in the intake tests")
    parser.add_argument("--intake-spread", type=float, default=5.0, help="loadgen spread in the intake test (s)")
    parser.add_argument("--ceiling-runs", type=int, default=3, help="runs of each ceiling (default 3): the best UDP loop counts, the median executemany")
    parser.add_argument("--raw-datagrams", type=int, default=100_000, help="datagrams through the raw UDP loop")
    parser.add_argument("--cloud-readings", type=int, default=200_000, help="readings sent straight to the cloud")
    parser.add_argument("--cloud-runs", type=int, default=5,
                        help="runs of the cloud as the gateway sends; the median counts (default 5)")
    parser.add_argument("--batch", type=int, default=2000,
                        help="readings per batch of the cloud's small-batch run (default 2000)")
    parser.add_argument("--seed", type=int, default=1)
    dashboard.add_arguments(parser)
    overload.add_arguments(parser)
    overhead.add_arguments(parser)
    parser.add_argument("--profile", action="store_true",
                        help="also run the main fleet scenario under py-spy and summarise where the time goes")
    parser.add_argument("--api-devices", type=int, default=1000, help="devices of the api scenario's dataset (default 1000)")
    parser.add_argument("--api-days", type=int, default=365, help="days of the api scenario's dataset (default 365)")
    parser.add_argument("--api-db", help="the api scenario's dataset: reused if it exists, else made there and kept")
    parser.add_argument("--api-requests", type=int, default=50, help="timed requests of each api figure (default 50)")
    parser.add_argument("--json", type=Path, help="where the results go (default bench/results/latest.json; "
                        "bench/results/api.json for the api scenario alone)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, databases)")
    args = parser.parse_args(argv)
    if args.cloud_runs < 1:
        parser.error("--cloud-runs must be at least 1")
    if args.scenarios is None:
        args.scenarios = "cloud" if args.store == "postgresql" else "ceilings,day4,intake,cloud,fleet"
    wanted = set(args.scenarios.split(","))
    if args.store == "postgresql" and wanted != {"cloud"}:
        parser.error("--store postgresql measures the cloud scenario alone: leave --scenarios out, or give cloud")
    if args.store == "postgresql" and args.json is None:
        args.json = RESULTS / "postgresql.json"
    if args.json is None:
        alone = {frozenset({"api"}): "api.json", frozenset({"dashboard"}): "dashboard.json",
                 frozenset({"overhead"}): "overhead.json"}
        args.json = RESULTS / alone.get(frozenset(wanted), "latest.json")

    results = {
        "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]) if argv is None else "bench/run.py " + " ".join(argv),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "ceilings": {},
        "scenarios": {},
    }
    say(f"meter bench: {results['machine']['nproc']} cores ({results['machine']['cpu']}), Python "
        f"{results['machine']['python']}, SQLite {results['machine']['sqlite']}, load average "
        f"{results['machine']['loadavg_start']}, a step of Python "
        f"{results['machine']['python_speed_start']['best_ns']:g} ns (best; median "
        f"{results['machine']['python_speed_start']['median_ns']:g})")
    if results["machine"]["loadavg_start"][0] > 1.0:
        say("  (the machine is not idle: other processes compete for the 2 cores; wall-clock figures suffer, "
            "CPU-second figures much less)")
    scratch = Path(tempfile.mkdtemp(prefix="meter-bench-"))
    began = time.monotonic()
    try:
        yesterday = datetime.date.today() - datetime.timedelta(days=1)
        sample = [r for d in range(1, args.cloud_readings // 96 + 2)
                  for r in synthetic_day(d, label_address(d), yesterday, 96, args.seed)][:args.cloud_readings]
        if "ceilings" in wanted or "intake" in wanted:
            results["ceilings"]["udp"] = ceiling_udp(args)
        if args.store == "postgresql":
            results["scenarios"]["cloud_postgresql"] = pg_bench.scenario(args, scratch, sample, workspace_of, say)
        elif "ceilings" in wanted or "cloud" in wanted:
            results["ceilings"]["sqlite"] = ceiling_sqlite(args, cloud_rows(sample), scratch)
        if "day4" in wanted:
            results["scenarios"]["day4"] = scenario_day4(args, scratch)
        if "intake" in wanted:
            results["scenarios"]["intake"] = scenario_intake(args, scratch, results["ceilings"]["udp"])
        if "cloud" in wanted and args.store == "sqlite":
            results["scenarios"]["cloud"] = scenario_cloud(args, scratch, sample, results["ceilings"]["sqlite"])
        if "fleet" in wanted:
            runs = []
            scale = args.scale if args.scale is not None else ",".join(
                str(n) for n in (100, 1000, 10_000) if n < args.devices)
            scale_1440 = args.scale_1440 if args.scale_1440 is not None else (
                str(FLEET_TARGETS["devices_1440"]) if args.devices >= FLEET_TARGETS["devices"] else "100")
            sizes = sorted({int(n) for n in scale.split(",") if n} | {args.devices})
            plan = [(n, 96) for n in sizes] + [(int(n), 1440) for n in scale_1440.split(",") if n]
            for devices, readings in plan:
                spread = args.spread if args.spread is not None else fleet_spread(devices, readings, args.spread_rate)
                runs.append(scenario_fleet(args, scratch, devices, readings, spread))
            if args.profile:
                if profiles.available():
                    # A gentler start than the measured runs, so the profile shows
                    # the steady cost of a datagram rather than a retransmission storm.
                    spread = args.spread if args.spread is not None else fleet_spread(args.devices, 96, 400)
                    runs.append(scenario_fleet(args, scratch, args.devices, 96, spread, profile=True))
                else:
                    say("profile: py-spy is not installed (pip install -e '.[bench]'): skipped")
            results["scenarios"]["fleet"] = runs
            results["fleet_costs"] = [run["costs"] for run in runs if not run["profiled"]]
        if "overload" in wanted:
            results["scenarios"]["overload"] = overload.scenario(args, scratch, sys.modules[__name__])
        if "dashboard" in wanted:
            results["scenarios"]["dashboard"] = dashboard.scenario(args, scratch)
        if "api" in wanted:
            results["scenarios"]["api"] = api_figures.scenario_api(args, scratch, say)
        if "overhead" in wanted:
            retry_after, attempts = fleet_retries(args.fleet_timeout)
            results["scenarios"]["overhead"] = overhead.scenario(
                args, scratch, ("--attempts", str(attempts), "--retry-after", str(retry_after))
            )
    finally:
        if args.keep:
            say(f"scratch folder kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    results["seconds"] = round(time.monotonic() - began, 1)
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["machine"]["python_speed_end"] = python_speed()
    results["targets"] = verdicts(results)
    say("")
    say(table(results))
    if "overload" in results["scenarios"]:
        say("\n".join(overload.table_rows(results["scenarios"]["overload"])))
    costs = cost_table(results)
    if costs:
        say("")
        say("CPU a datagram and a reading by fleet size (issue 20; µs):")
        say(costs)
    say("")
    say("targets (issues #6, #18 and #20):")
    say(verdict_lines(results["targets"]))
    speeds = results["machine"]["python_speed_start"], results["machine"]["python_speed_end"]
    say(f"\nthe machine's speed, a step of Python (best / median of 7, ns): {speeds[0]['best_ns']:g} / "
        f"{speeds[0]['median_ns']:g} at the start, {speeds[1]['best_ns']:g} / {speeds[1]['median_ns']:g} at the end; "
        f"load average {results['machine']['loadavg_end']} at the end")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    say(f"\nwritten {args.json} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
