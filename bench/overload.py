"""
The overload scenario of bench/run.py (`--scenarios overload`): far more
devices than the gateway can take start at once, and the gateway must shed
early and cheaply (docs/performance.md, "Load shedding") so that what it
accepts stays near its capacity and every device's day ends stored once.

The real gateway and cloud, driven by `meter loadgen` (the real device code:
its DaySender pauses by the gateway's retry-after hints); a device whose
attempt fails tries its day again later (loadgen's --attempts and
--retry-after, as meter-device does).  The gateway logs its stats line every
half second; the accepted chunks a second over time are read from it (its
`chunks` count, committed), beside the busy answers, the retransmissions,
the kernel's drops, and the database checked against every device's
synthetic day.  With --overload-compare the same load is offered to a gateway
that does not shed ([gateway] shed = false), for the difference.

    python bench/run.py --scenarios overload                          # 20,000 devices in 2 s
    python bench/run.py --scenarios overload --overload-devices 50000 --overload-spread 3
    python bench/run.py --scenarios overload --overload-compare       # and without shedding
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

#: Seconds between the gateway's stats lines: the timeline's resolution.
STATS_INTERVAL = 0.5
STATS = "gateway stats:"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overload-devices", type=int, default=20_000,
                        help="devices of the overload scenario, 96 readings each (default 20,000)")
    parser.add_argument("--overload-spread", type=float, default=2.0,
                        help="seconds over which they all start (default 2)")
    parser.add_argument("--overload-attempts", type=int, default=10,
                        help="attempts a device makes at its day (loadgen --attempts, default 10)")
    parser.add_argument("--overload-retry-after", type=float, default=10.0,
                        help="seconds before a failed attempt is made again (loadgen --retry-after, default 10)")
    parser.add_argument("--overload-timeout", type=float, default=600.0,
                        help="the most seconds the devices are given (default 600)")
    parser.add_argument("--overload-compare", action="store_true",
                        help="also offer the same load to a gateway that does not shed ([gateway] shed = false)")


def scenario(args, scratch: Path, bench) -> dict:
    """
    The overload scenario, with shedding and (with --overload-compare)
    without; C{bench} is bench/run.py's module, whose helpers run it.
    """
    runs = {"shedding": one_run(args, scratch, bench, shed=True)}
    if args.overload_compare:
        runs["no_shedding"] = one_run(args, scratch, bench, shed=False)
    return runs


def one_run(args, scratch: Path, bench, shed: bool) -> dict:
    devices, readings = args.overload_devices, 96
    tag = f"overload-{devices}-{'shed' if shed else 'noshed'}"
    bench.say(f"overload: {devices:,} devices x {readings} readings within {args.overload_spread:g} s, "
              f"{'with' if shed else 'WITHOUT'} shedding")
    workspace = bench.workspace_of(scratch / tag, devices, stats_interval=STATS_INTERVAL, shed=shed)
    try:
        cloud = workspace.start_cloud()
        gateway = workspace.start_gateway(connected=True)
        g0, c0 = gateway.stats(), cloud.stats()
        udp0 = bench.udp_counters()
        sent = bench.run_loadgen(
            workspace, tag, "--devices", str(devices), "--readings", str(readings),
            "--spread", str(args.overload_spread), "--seed", str(args.seed),
            "--attempts", str(args.overload_attempts), "--retry-after", str(args.overload_retry_after),
            "--timeout", str(args.overload_timeout), timeout=args.overload_timeout,
        )
        udp1 = bench.udp_counters()
        g1 = gateway.stats()
        totals = bench.wait_committed(cloud, sent["readings_acked"], 120.0)
        g2, c2 = gateway.stats(), cloud.stats()
        time.sleep(2 * STATS_INTERVAL)  # a last stats line after the last commit
        stats = gateway.records_of(STATS)
    finally:
        workspace.stop()
    counters = bench.gateway_counters(gateway)
    day = datetime.date.fromisoformat(sent["day"])
    check = bench.verify_cloud(workspace.db, workspace.fleet, list(workspace.fleet), day, readings, args.seed)
    timeline = accepted_timeline(stats, sent["first_send"])
    accepted = [point["accepted_chunks_per_s"] for point in timeline]
    # The gateway's capacity as it showed it: its best second-long stretch
    # of accepted chunks; what it kept while it shed is set against it.
    best = max((statistics.mean(accepted[i:i + 2]) for i in range(len(accepted) - 1)), default=None)
    busy_stretch = [point["accepted_chunks_per_s"] for point in timeline if point["busy_per_s"] > 0]
    spread = max(args.overload_spread, 1e-3)
    result = {
        "shedding": shed,
        "devices": devices,
        "readings_per_device": readings,
        "spread_s": args.overload_spread,
        "offered_chunks_per_s": round(sent["chunks"] / spread, 1),
        "delivered_devices": sent["delivered"],
        "failed_devices": sent["failed"],
        "incomplete_devices": sent["incomplete"],
        "attempts": sent["attempts"],
        "gave_up": sent["gave_up"],
        "chunks": sent["chunks"],
        "datagrams_sent": sent["datagrams_sent"],
        "retransmissions": sent["retransmissions"],
        "busy_answers": sent["busy_answers"],
        "intake_s": sent["duration_s"],
        "end_to_end_s": round(totals["last_ack"] - sent["first_send"], 3)
        if totals["last_ack"] and sent["first_send"] else None,
        "ack_latency_ms": sent["ack_latency_ms"],
        "gateway_shed": counters.get("shed", 0),
        "gateway_shed_returned": counters.get("shed_returned", 0),
        "gateway_shed_episodes": counters.get("shed_episodes", 0),
        "gateway_refused_overloaded": counters.get("refused_overloaded", 0),
        "gateway_duplicates": counters.get("duplicates", 0),
        "gateway_datagrams_received": counters.get("datagrams"),
        "kernel_udp_receive_buffer_drops": udp1.get("RcvbufErrors", 0) - udp0.get("RcvbufErrors", 0),
        "accepted_chunks_per_s_best": round(best, 1) if best is not None else None,
        "accepted_chunks_per_s_while_busy_median": round(statistics.median(busy_stretch), 1) if busy_stretch else None,
        "timeline": timeline,
        "db": check,
        "cloud_duplicates": totals["dup"],
        "gateway": {"cpu_intake_s": round(g1["cpu_s"] - g0["cpu_s"], 2), "cpu_s": round(g2["cpu_s"] - g0["cpu_s"], 2),
                    "peak_rss_mb": g2["peak_rss_mb"]},
        "cloud": {"cpu_s": round(c2["cpu_s"] - c0["cpu_s"], 2), "peak_rss_mb": c2["peak_rss_mb"]},
        "loadgen": {"cpu_s": sent["loadgen_cpu_s"], "peak_rss_mb": sent["loadgen_max_rss_mb"]},
    }
    bench.say(format_run(result))
    return result


def accepted_timeline(stats: list[dict], first_send: float | None) -> list[dict]:
    """
    From the gateway's stats records, a half second apart: per interval, the
    chunks it accepted (committed) a second, the chunks it answered busy a
    second (shed or overloaded), whether it was shedding, and its queue
    delay; time from the first send.
    """
    points = []
    for before, after in zip(stats, stats[1:]):
        elapsed = after["log_time"] - before["log_time"]
        if elapsed <= 0:
            continue
        counts0, counts1 = before["counts"], after["counts"]

        def rate(*names):
            return round(sum(counts1.get(n, 0) - counts0.get(n, 0) for n in names) / elapsed, 1)

        points.append({
            "t_s": round(after["log_time"] - (first_send or stats[0]["log_time"]), 2),
            "accepted_chunks_per_s": rate("chunks"),
            "busy_per_s": rate("shed", "refused_overloaded"),
            "duplicates_per_s": rate("duplicates"),
            "datagrams_per_s": rate("datagrams"),
            "shedding": after["gauges"].get("shedding", 0),
            "queue_delay_ms": after["gauges"].get("queue_delay_ms", 0),
        })
    # Only the intake: from the first datagram to the last chunk taken.
    busy = [i for i, point in enumerate(points) if point["datagrams_per_s"] > 0]
    return points[busy[0]:busy[-1] + 1] if busy else []


def format_run(r: dict) -> str:
    check = r["db"]
    lines = [
        f"  {'with' if r['shedding'] else 'WITHOUT'} shedding: {r['delivered_devices']:,} of {r['devices']:,} devices "
        f"delivered ({r['attempts']:,} attempts, {r['gave_up']:,} gave up and tried again), intake {r['intake_s']} s, "
        f"end to end {r['end_to_end_s']} s",
        f"  offered {r['offered_chunks_per_s']:,.0f} chunks/s over the spread; accepted: best second "
        f"{r['accepted_chunks_per_s_best'] or 0:,.0f} chunks/s, median while answering busy "
        f"{r['accepted_chunks_per_s_while_busy_median'] or 0:,.0f} chunks/s",
        f"  busy answers {r['busy_answers']:,} (gateway: {r['gateway_shed']:,} shed, {r['gateway_shed_returned']:,} "
        f"let in back at their slot, {r['gateway_refused_overloaded']:,} at the backstop, "
        f"{r['gateway_shed_episodes']} episodes); retransmissions {r['retransmissions']:,}; "
        f"kernel receive-buffer drops {r['kernel_udp_receive_buffer_drops']:,}",
        f"  db: {check['stored']:,} of {check['expected']:,} stored, lost {check['lost']}, doubled "
        f"{check['doubled_rows']}; gateway CPU {r['gateway']['cpu_s']} s, peak RSS {r['gateway']['peak_rss_mb']} MB; "
        f"ack p50 {r['ack_latency_ms'].get('p50')} ms p99 {r['ack_latency_ms'].get('p99')} ms",
        "  t (s)  accepted/s  busy/s  datagrams/s  shedding  queue ms",
    ]
    for point in r["timeline"]:
        lines.append(
            f"  {point['t_s']:5.1f}  {point['accepted_chunks_per_s']:10,.0f}  {point['busy_per_s']:6,.0f}  "
            f"{point['datagrams_per_s']:11,.0f}  {point['shedding']:8}  {point['queue_delay_ms']:8}"
        )
    return "\n".join(lines)


def table_rows(runs: dict) -> list[str]:
    """
    The overload scenario's rows in the bench's table.
    """
    rows = []
    for name, r in runs.items():
        check = r["db"]
        rows.append(
            f"overload ({name.replace('_', ' ')}): {r['devices']:,} devices in {r['spread_s']:g} s, "
            f"accepted best {r['accepted_chunks_per_s_best'] or 0:,.0f} chunks/s, while busy "
            f"{r['accepted_chunks_per_s_while_busy_median'] or 0:,.0f}; end to end {r['end_to_end_s']} s; "
            f"{r['busy_answers']:,} busy, {r['retransmissions']:,} retransmissions, "
            f"{r['kernel_udp_receive_buffer_drops']:,} kernel drops; stored {check['stored']:,} of "
            f"{check['expected']:,}, lost {check['lost']}, doubled {check['doubled_rows']}"
        )
    return rows
