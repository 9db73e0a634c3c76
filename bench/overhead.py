"""
What observing the suite and storing into PostgreSQL cost the fleet's day
(issue 20, item 6): the same fleet scenario run three ways at the same N,
each on a fresh gateway and cloud, and the CPU seconds of each side compared.

- plain: the daemons with their monitoring endpoints and the cloud's web
  service turned off (C{[gateway] metrics = ""}, C{[cloud] metrics = ""},
  C{[cloud] web = ""}), the cloud on SQLite;
- observed: both monitoring endpoints on and scraped like Prometheus
  scrapes them (every C{--overhead-scrape} seconds, 5 by default: a third of
  Prometheus' usual 15 s, a twelfth of its default minute; the scraper's
  Accept header; a kept-alive connection to each daemon), and the cloud's
  web service serving the dashboard to a real headless Chromium that keeps
  the page open through the run (app.js refreshes the fleet every 15 s, its
  own default, and reloads the charts when the shown device's last reading
  changed), the cloud on SQLite;
- postgresql: endpoints off, the cloud storing into a throwaway PostgreSQL
  server (fsync on, as bench/pg_bench.py starts it); the server's CPU
  (the postmaster and every process under it: backends, WAL writer,
  checkpointer, autovacuum, the ones that ended included) is counted on
  the cloud's side.

Every run is checked in its database afterwards: every reading stored once.

    python bench/run.py --scenarios overhead --devices 20000 --spread 12
    python bench/overhead.py --devices 20000 --spread 12
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from meter.tools import browser, pgcluster  # noqa: E402
from meter.tools.processes import CLOCK_TICKS, monitoring_url, web_url  # noqa: E402
from meter.tools.suite import Suite, label_address  # noqa: E402

MODES = ("plain", "observed", "postgresql")

#: The cloud's record of each batch it stored (the bench's other scenarios
#: read the same one).
COMMITTED = "batch {batch_id} from {peer}: {count} readings committed"

#: What Prometheus asks a target for (its 2.x default scrape protocols).
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")

#: The issue's bound on what observing, or PostgreSQL, may add.
TARGET_RATIO = 1.10


def say(text: str) -> None:
    print(text, flush=True)


# -- CPU of a process tree ------------------------------------------------------


def _stat(pid: int) -> tuple[int, int] | None:
    """
    (parent pid, clock ticks of CPU: its own and its reaped children's), or
    None once it is gone.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    # After the command: state, ppid, ... utime is the 14th field overall,
    # stime, cutime, cstime follow.
    return int(fields[1]), sum(int(x) for x in fields[11:15])


def tree_cpu(root: int) -> float:
    """
    CPU seconds of process C{root} and every live process under it, each
    with its reaped children's: a process that ended and was waited for is
    counted in its parent's, once (PostgreSQL's backends end with their
    sessions; the postmaster waits for them).
    """
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                parents[int(entry)], ticks[int(entry)] = stat
    inside = {root}
    grew = True
    while grew:  # bounded: each pass adds a generation or ends
        grew = False
        for pid, parent in parents.items():
            if parent in inside and pid not in inside:
                inside.add(pid)
                grew = True
    return sum(ticks.get(pid, 0) for pid in inside) / CLOCK_TICKS


def postmaster_pid(cluster: pgcluster.Cluster) -> int:
    # The first line of postmaster.pid is the server's process id.
    return int((cluster.data / "postmaster.pid").read_text().split()[0])


# -- the observers --------------------------------------------------------------


class Scraper:
    """
    A Prometheus-like scraper of C{urls} (each a C{/metrics} page) every
    C{interval} seconds on a thread: one kept-alive connection a target,
    the scraper's Accept header, each scrape's size and time kept.
    """

    def __init__(self, urls: dict[str, str], interval: float):
        self._urls = urls
        self._interval = interval
        self._stop = threading.Event()
        self.scrapes = {name: {"count": 0, "failed": 0, "bytes": 0, "ms": []} for name in urls}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        connections = {}
        while not self._stop.is_set():
            for name, url in self._urls.items():
                parts = urlsplit(url)
                figures = self.scrapes[name]
                began = time.perf_counter()
                try:
                    if name not in connections:
                        connections[name] = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
                    connection = connections[name]
                    connection.request("GET", parts.path, headers={"Accept": PROMETHEUS_ACCEPT})
                    response = connection.getresponse()
                    body = response.read()
                    if response.status != 200:
                        raise OSError(f"status {response.status}")
                except (OSError, http.client.HTTPException):
                    figures["failed"] += 1
                    connections.pop(name, None)
                    continue
                figures["count"] += 1
                figures["bytes"] = len(body)
                figures["ms"].append(round((time.perf_counter() - began) * 1000, 2))
            self._stop.wait(self._interval)
        for connection in connections.values():
            connection.close()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(15)
        return {name: {"scrapes": f["count"], "failed": f["failed"], "last_bytes": f["bytes"],
                       "max_ms": max(f["ms"], default=None)} for name, f in self.scrapes.items()}


class Dashboard:
    """
    The dashboard open in a real headless Chromium through the run: the page
    loads once and app.js refreshes it on its own timer (every C{refresh}
    seconds through C{#refresh=}, or its default).
    """

    #: What the page fetched from the API, read back from the browser.
    REQUESTS = ("return performance.getEntriesByType('resource').map((e) => e.name)"
                ".filter((n) => n.includes('/api/'))")

    def __init__(self, url: str, refresh: float | None):
        self._context = browser.chromium(1280, 900)
        self._driver = self._context.__enter__()
        try:
            # The page keeps its resource entries (the default buffer holds
            # 250): room for every refresh of a long run.
            self._driver.get("about:blank")
            fragment = f"#refresh={refresh:g}" if refresh else ""
            self._driver.get(url + "/" + fragment)
            self._driver.execute_script("performance.setResourceTimingBufferSize(100000)")
            self.pid = self._driver.service.process.pid
        except BaseException:
            self._context.__exit__(*sys.exc_info())
            raise

    def cpu_s(self) -> float:
        return tree_cpu(self.pid)

    def stop(self) -> dict:
        try:
            requests = self._driver.execute_script(self.REQUESTS)
            status = self._driver.execute_script("return document.getElementById('status').textContent")
        finally:
            self._context.__exit__(None, None, None)
        paths = [urlsplit(r).path for r in requests]
        return {"api_requests": len(paths), "devices_fetches": paths.count("/api/v1/devices"),
                "series_fetches": sum(p == "/api/v1/series" for p in paths), "last_status": status}


# -- one run --------------------------------------------------------------------


def _wait_committed(cloud, expected: int, timeout: float) -> dict:
    """
    Read the cloud's log until C{expected} new readings were committed, or
    C{timeout}; the sums and the last commit's time.
    """
    totals = {"new": 0, "dup": 0, "last_commit": None}
    deadline = time.monotonic() + timeout
    while totals["new"] < expected and time.monotonic() < deadline:
        for event in cloud.new_records(COMMITTED):
            totals["new"] += event["new"]
            totals["dup"] += event["dup"]
            totals["last_commit"] = event["at"]
        time.sleep(0.05)
    return totals


def run_once(args, root: Path, mode: str, cluster: pgcluster.Cluster | None, retries: Sequence[str] = ()) -> dict:
    """
    The fleet's day in one C{mode} on a fresh gateway and cloud: CPU seconds
    of each side from just before loadgen starts to the cloud's last commit.
    """
    observed = mode == "observed"
    uri = cluster.create_database(f"overhead_{root.name.replace('-', '_')}") if mode == "postgresql" else None
    # "" turns an endpoint off; Suite's own choice (a free port) keeps it on.
    endpoints = {} if observed else {"metrics": "", "web": ""}
    # The fleet scenario's gateway and devices (bench/run.py): days
    # forwarded as they complete, and a device that gives up trying again.
    suite = Suite(root, args.devices, None, addresses=label_address, keys=True, logs=True, device={}, deadline=60.0,
                  cloud=endpoints, postgres=uri, forward="device", **({} if observed else {"metrics": ""}))
    scraper = page = None
    spies: list = []
    result: dict = {"mode": mode}
    try:
        cloud = suite.start_cloud()
        gateway = suite.start_gateway(connected=True)
        server = None
        if uri is not None:
            import pg_bench

            pg_bench._wait_connected(uri, cloud)  # its schema made: the first batch is not refused
            server = postmaster_pid(cluster)
        if observed:
            scraper = Scraper({"gateway": monitoring_url(gateway) + "/metrics",
                               "cloud": monitoring_url(cloud) + "/metrics"}, args.overhead_scrape)
            page = Dashboard(web_url(cloud), args.overhead_refresh)
        if args.overhead_profile:
            import profiles

            args.overhead_profile.mkdir(parents=True, exist_ok=True)
            spies = [profiles.Spy(daemon.pid, args.overhead_profile / f"{root.name}-{daemon.name}.txt")
                     for daemon in (gateway, cloud)]
            time.sleep(0.5)
        before = {"gateway": gateway.stats()["cpu_s"], "cloud": cloud.stats()["cpu_s"]}
        if server is not None:
            before["postgresql"] = tree_cpu(server)
        if page is not None:
            before["chromium"] = page.cpu_s()
        summary = root / "loadgen.json"
        command = suite.loadgen_command(summary, "--devices", str(args.devices), "--readings", "96", "--spread",
                                        str(args.spread), "--seed", str(args.seed), "--timeout",
                                        str(args.fleet_timeout), *retries,
                                        *shlex.split(args.overhead_loadgen))
        completed = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=args.fleet_timeout + 120)
        (root / "loadgen.out").write_text(completed.stdout + completed.stderr)
        if not summary.exists():
            raise RuntimeError(f"loadgen wrote no summary (exit {completed.returncode}): {completed.stderr[-2000:]}")
        sent = json.loads(summary.read_text())
        totals = _wait_committed(cloud, sent["readings_acked"], args.fleet_timeout)
        after = {"gateway": gateway.stats()["cpu_s"], "cloud": cloud.stats()["cpu_s"]}
        if server is not None:
            after["postgresql"] = tree_cpu(server)
        if page is not None:
            after["chromium"] = page.cpu_s()
        if scraper is not None:
            result["scrapes"] = scraper.stop()
            scraper = None
        if page is not None:
            result["dashboard"] = page.stop()
            page = None
        result["peak_rss_mb"] = {"gateway": gateway.stats()["peak_rss_mb"], "cloud": cloud.stats()["peak_rss_mb"]}
    finally:
        for spy in spies:
            spy.stop()
        if scraper is not None:
            scraper.stop()
        if page is not None:
            with contextlib.suppress(Exception):
                page.stop()
        suite.stop()
    stored = suite.count_stored()
    expected = args.devices * 96
    cpu = {name: round(after[name] - before[name], 2) for name in after}
    cpu["cloud_side"] = round(cpu["cloud"] + cpu.get("postgresql", 0.0), 2)
    cpu["total"] = round(cpu["gateway"] + cpu["cloud_side"], 2)
    first, last = sent.get("first_send"), totals["last_commit"]
    result.update({
        "cpu_s": cpu,
        "expected": expected,
        "stored": stored,
        "exact": stored == expected and sent["readings_acked"] == expected,
        "retransmissions": sent.get("retransmissions"),
        "ack_latency_ms": sent.get("ack_latency_ms"),
        "end_to_end_s": round(last - first, 2) if first and last else None,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    })
    return result


def scenario(args, scratch: Path, retries: Sequence[str] = ()) -> dict:
    """
    The three runs (C{args.overhead_modes}, in that order) and the ratios of
    each to the plain run.
    """
    if args.spread is None:  # bench/run.py's: the fleet scenario's rate
        args.spread = round(args.devices / args.spread_rate, 3)
    modes = [m for m in args.overhead_modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"--overhead-modes: unknown {', '.join(sorted(unknown))} (of {', '.join(MODES)})")
    if "observed" in modes and browser.missing():
        raise SystemExit(f"overhead: the observed run needs the browser: {browser.missing()}")
    say(f"overhead: {args.devices:,} devices x 96 readings over {args.spread:g} s, runs {', '.join(modes)}; scrapes "
        f"every {args.overhead_scrape:g} s, the dashboard refreshing every "
        f"{args.overhead_refresh or 15:g} s in headless Chromium")
    cluster = None
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    try:
        if "postgresql" in modes:
            cluster = pgcluster.Cluster.create(durable=True, prefix="meter-bench-pg-")
            cluster.start()
        # Rounds of the modes in turn: this machine's speed drifts within
        # minutes, and each mode's median is compared with plain's.
        for round_number in range(args.overhead_rounds):
            for mode in modes:
                name = f"overhead-{round_number + 1}-{mode}"
                run = run_once(args, scratch / name, mode, cluster if mode == "postgresql" else None, retries)
                runs[mode].append(run)
                cpu = run["cpu_s"]
                extra = "".join(f", {k} {cpu[k]} s" for k in ("postgresql", "chromium") if k in cpu)
                say(f"  {mode} (round {round_number + 1}): gateway {cpu['gateway']} s, cloud {cpu['cloud']} s{extra}: "
                    f"cloud side {cpu['cloud_side']} s, total {cpu['total']} s of CPU; stored {run['stored']:,} of "
                    f"{run['expected']:,}{'' if run['exact'] else ' (NOT EXACT)'}; {run['retransmissions']} "
                    f"retransmissions; end to end {run['end_to_end_s']} s; load average {run['loadavg'][0]}")
                for key in ("scrapes", "dashboard"):
                    if key in run:
                        say(f"    {key}: {run[key]}")
    finally:
        if cluster is not None:
            cluster.destroy()
    medians = {mode: {side: round(statistics.median(run["cpu_s"][side] for run in done), 2)
                      for side in done[0]["cpu_s"]} for mode, done in runs.items() if done}
    result = {"devices": args.devices, "spread_s": args.spread, "rounds": args.overhead_rounds,
              "scrape_interval_s": args.overhead_scrape, "dashboard_refresh_s": args.overhead_refresh or 15.0,
              "exact": all(run["exact"] for done in runs.values() for run in done),
              "median_cpu_s": medians, "runs": runs, "ratios": {}}
    plain = medians.get("plain")
    if plain:
        for mode, cpu in medians.items():
            if mode == "plain":
                continue
            ratios = {side: round(cpu[side] / plain[base], 3) if plain[base] else None
                      for side, base in (("gateway", "gateway"), ("cloud_side", "cloud"), ("total", "total"))}
            ratios["met"] = ratios["total"] is not None and ratios["total"] <= TARGET_RATIO and result["exact"]
            result["ratios"][mode] = ratios
            say(f"  {mode} / plain, medians of {args.overhead_rounds}: gateway {ratios['gateway']}x, cloud side "
                f"{ratios['cloud_side']}x, total {ratios['total']}x (target <= {TARGET_RATIO}x): "
                f"{'MET' if ratios['met'] else 'NOT MET'}")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overhead-modes", default=",".join(MODES),
                        help=f"the overhead scenario's runs, in order (default {','.join(MODES)})")
    parser.add_argument("--overhead-rounds", type=int, default=1,
                        help="rounds of the runs, in turns; each mode's median counts (default 1)")
    parser.add_argument("--overhead-loadgen", default="",
                        help="more arguments for loadgen in each run, e.g. \"--processes 2\" (one string)")
    parser.add_argument("--overhead-profile", type=Path,
                        help="also sample the gateway and the cloud of each run with py-spy into this folder")
    parser.add_argument("--overhead-scrape", type=float, default=5.0,
                        help="seconds between scrapes of each daemon's /metrics in the observed run (default 5)")
    parser.add_argument("--overhead-refresh", type=float, default=None,
                        help="the dashboard's refresh in seconds (#refresh=; default: app.js's own, 15 s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=20000)
    parser.add_argument("--spread", type=float, default=12.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fleet-timeout", type=float, default=300.0)
    add_arguments(parser)
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="meter-bench-overhead-"))
    try:
        scenario(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
