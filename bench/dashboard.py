"""
The dashboard's first chart, in headless Chromium: from the start of a
navigation to the page's own mark when a chart first drew readings
(C{performance.mark("meter:first-chart")} in app.js), against the real
meter-cloud plugin serving a store of readings.

The store is the real pipeline's: a fleet of devices sends day after day
through the real gateway (`meter loadgen`, the device code) to the cloud; or
with C{--dashboard-db} any cloud database (a copy of it is served).

    python bench/run.py --scenarios dashboard
    python bench/dashboard.py --dashboard-devices 1000
    python bench/dashboard.py --dashboard-db STORE.sqlite   # e.g. a year of a 1,000-device fleet
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from meter.tools import browser  # noqa: E402
from meter.tools.processes import WEB_ON, Daemons  # noqa: E402
from meter.tools.suite import ANY_PORT, Suite, label_address, loadgen_summary  # noqa: E402

#: What each navigation shows: the page as a newcomer opens it (the fleet,
#: the first device's last day), and four devices' month on one chart.
VIEWS = {"default": "", "4 devices, month": "#devices=1,2,3,4&range=month"}

FIRST_CHART = "return performance.getEntriesByName('meter:first-chart').map((e) => e.startTime)"
TARGET_MS = 1000.0


def say(text: str) -> None:
    print(text, flush=True)


def fill(root: Path, devices: int, days: int) -> tuple[Suite, int]:
    """
    A suite whose cloud holds C{days} days (ending yesterday) of C{devices}
    devices at 96 readings a day, each day sent through the real gateway;
    its cloud left running.
    """
    suite = Suite(root, devices, 96, addresses=label_address, keys=True, logs=True, device={}, deadline=60.0,
                  cloud={"web": ANY_PORT})
    cloud = suite.start_cloud()
    suite.start_gateway(connected=True)
    yesterday = datetime.date.today() - datetime.timedelta(days=1)
    for back in range(days - 1, -1, -1):
        loadgen_summary(suite.start_fleet(yesterday - datetime.timedelta(days=back), f"1-{devices}"), timeout=300)
    suite.wait_stored(devices * days * 96, cloud, timeout=300)
    # The gateway's work is done: only the cloud runs while the page is timed.
    for daemon in suite:
        if daemon is not cloud:
            daemon.stop()
    return suite, devices * days * 96


def serve(root: Path, db: Path) -> Daemons:
    """
    The cloud alone on a copy of the database C{db}, its web on a free port.
    """
    suite = Suite(root, 1, None, keys=True, logs=True, cloud={"web": ANY_PORT})
    # SQLite's own copy: whole and consistent even while another process
    # has the database open, its write-ahead log included.
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as source, sqlite3.connect(suite.db) as copy:
        source.backup(copy)
    suite.start_cloud()
    return suite


def measure(url: str, navigations: int) -> dict:
    """
    Navigate to each view C{navigations} times in one fresh Chromium; the
    milliseconds from navigation start to the first chart, per view.
    """
    figures = {}
    with browser.chromium(1280, 900) as driver:
        for name, fragment in VIEWS.items():
            times = []
            for _ in range(navigations):
                # A real navigation each time (a fragment alone would not
                # load the page again).
                driver.get("about:blank")
                driver.get(url + fragment)
                loaded = browser.wait_for_charts(driver)
                if loaded["error"] is not None:
                    raise RuntimeError(f"the dashboard failed: {loaded}")
                marks = driver.execute_script(FIRST_CHART)
                if not marks:
                    raise RuntimeError(f"the dashboard drew no chart: {loaded}")
                times.append(round(marks[0], 1))
            figures[name] = {
                "first_ms": times[0],
                "p50_ms": round(statistics.median(times), 1),
                "max_ms": max(times),
                "navigations": times,
            }
    return figures


def scenario(args, scratch: Path) -> dict:
    """
    The bench's dashboard scenario (bench/run.py --scenarios dashboard).
    """
    why = browser.missing()
    if why is not None:
        say(f"dashboard: skipped: {why}")
        return {"skipped": why}
    root = scratch / "dashboard"
    began = time.monotonic()
    if args.dashboard_db:
        suite, readings = serve(root, Path(args.dashboard_db)), None
        source = f"a copy of {args.dashboard_db}"
    else:
        say(f"dashboard: {args.dashboard_devices} devices x {args.dashboard_days} days x 96 readings through the "
            "real gateway and cloud...")
        suite, readings = fill(root, args.dashboard_devices, args.dashboard_days)
        source = f"{args.dashboard_devices} devices x {args.dashboard_days} days x 96, sent through the real gateway"
    filled = round(time.monotonic() - began, 1)
    try:
        cloud = next(d for d in suite if d.name == "cloud")
        url = cloud.all_matching(WEB_ON)[-1].group(1) + "/"
        views = measure(url, args.dashboard_navigations)
    finally:
        suite.stop()
    result = {"store": source, "readings": readings, "fill_s": filled, "views": views, "target_ms": TARGET_MS}
    for name, view in views.items():
        say(f"dashboard, {name}: first chart p50 {view['p50_ms']} ms after navigation start "
            f"(first, cold: {view['first_ms']} ms; max {view['max_ms']} ms; {len(view['navigations'])} navigations)")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dashboard-devices", type=int, default=1000,
                        help="devices of the dashboard scenario's store (default 1,000)")
    parser.add_argument("--dashboard-days", type=int, choices=(1, 2), default=2,
                        help="days x 96 readings each device sends for it, ending yesterday (default 2: a gateway "
                        "takes days back to 62 hours before their send); --dashboard-db for a longer store")
    parser.add_argument("--dashboard-db", help="serve (a copy of) this cloud database instead")
    parser.add_argument("--dashboard-navigations", type=int, default=7,
                        help="navigations to each view of the page; the median counts (default 7)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="meter-bench-dashboard-"))
    try:
        result = scenario(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if "views" in result else 1


if __name__ == "__main__":
    sys.exit(main())
