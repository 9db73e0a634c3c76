"""
The gateway's CPU a datagram, without the network: N devices' days, sealed
beforehand, handed one by one to the real GatewayProtocol, Intake and Spool
(a real SQLite file, fsync'd commits) on a task.Clock that advances 1/rate
seconds between datagrams, with the log going through the JSON observer the
bench's daemons use.  What it shows that the fleet scenario cannot: the cost
a datagram at N = 1,000 or 100,000 on the same footing, with no load
generator sharing the cores, and what the cyclic collector still tracks
afterwards (the per-device books must not be among it).

    python bench/intake_cost.py [--devices 1000,10000,100000] [--commit-interval 0.002]

Each size runs in a process of its own.  CPU figures are process CPU time
(user + system); the spool's commits are timed apart.  Scratch files go to a
temporary folder that is removed.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

DAY = datetime.date(2026, 11, 30)
#: The day's send, ten minutes after midnight UTC of the next day.
SENT_AT = datetime.datetime(2026, 12, 1, 0, 10, tzinfo=datetime.timezone.utc).timestamp()


def address(device_id: int) -> str:
    return f"10.{device_id >> 16}.{(device_id >> 8) & 255}.{device_id & 255}"


def measure(devices: int, readings: int, rate: float, commit_interval: float) -> dict:
    from twisted.internet import task
    from twisted.internet.testing import FakeDatagramTransport
    from twisted.logger import globalLogBeginner

    from meter import wire
    from meter.database import Database
    from meter.gateway.intake import Intake, settle_collector
    from meter.gateway.protocol import GatewayProtocol
    from meter.gateway.spool import Spool
    from meter.logs import json_lines
    from meter.tools.loadgen import synthetic_day

    keys = {d: d.to_bytes(4, "big") * 8 for d in range(1, devices + 1)}
    fleet = {d: address(d) for d in keys}
    datagrams = [
        wire.seal(wire.encode(chunk), keys[d])
        for d in keys
        for chunk in wire.split_day(d, fleet[d], DAY, synthetic_day(d, fleet[d], DAY, readings), f"{d:016x}", int(SENT_AT))
    ]
    with tempfile.TemporaryDirectory(prefix="meter-intake-cost-") as scratch:
        log = open(Path(scratch) / "gateway.log", "w")
        globalLogBeginner.beginLoggingTo([json_lines(log)], redirectStandardIO=False)
        clock = task.Clock()
        clock.advance(SENT_AT)
        connection, recovered = Spool.open(Path(scratch) / "spool.sqlite")
        database = Database(connection, clock, commit_interval=commit_interval)
        intake = Intake(fleet, Spool(database, recovered.depth), clock, 60.0, lambda: None, replay_window=600.0,
                        reassembly_timeout=600.0, max_reassemblies=10000)
        protocol = GatewayProtocol(intake, keys, clock, 1e6, 1e6)
        protocol.transport = FakeDatagramTransport()
        transactions = [0.0]
        transaction = database._transaction

        def timed(pieces):
            started = time.process_time()
            try:
                return transaction(pieces)
            finally:
                transactions[0] += time.process_time() - started

        database._transaction = timed
        # As the daemon does once started.
        settle_collector()
        pauses: list[float] = []
        began = [0.0]

        def collected(phase, info):
            if phase == "start":
                began[0] = time.perf_counter()
            elif info["generation"] == 2:
                pauses.append(time.perf_counter() - began[0])

        gc.callbacks.append(collected)
        step = 1.0 / rate
        peer = ("127.0.0.1", 40000)
        started = time.process_time()
        for datagram in datagrams:
            protocol.datagramReceived(datagram, peer)
            clock.advance(step)
        clock.advance(1.0)
        cpu = time.process_time() - started
        gc.callbacks.remove(collected)
        answered = len(protocol.transport.written)
        stored = intake.metrics.chunks
        tracked = len(gc.get_objects())
        database.stop()
        log.close()
    if answered != len(datagrams) or stored != len(datagrams):
        raise AssertionError(f"{answered} answers, {stored} chunks stored, of {len(datagrams)} datagrams")
    with open("/proc/self/status") as status:
        rss_kb = int(status.read().split("VmHWM:")[1].split()[0])
    return {
        "devices": devices,
        "datagrams": len(datagrams),
        "cpu_us_per_datagram": round(cpu / len(datagrams) * 1e6, 1),
        "of_which_spool_transactions_us": round(transactions[0] / len(datagrams) * 1e6, 1),
        "commits": database.commits,
        "full_collections": len(pauses),
        "longest_full_collection_ms": round(max(pauses, default=0.0) * 1e3, 1),
        "gc_tracked_objects_after": tracked,
        "peak_rss_mb": round(rss_kb / 1024, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="1000,10000,100000", help="fleet sizes, each measured in its own process")
    parser.add_argument("--readings", type=int, default=96)
    parser.add_argument("--rate", type=float, default=3333.0, help="datagrams a second on the clock (100,000 x 2 in 60 s)")
    parser.add_argument("--commit-interval", type=float, default=0.002)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.readings, args.rate, args.commit_interval)))
        return 0
    results = []
    for devices in (int(n) for n in args.devices.split(",")):
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(devices), "--readings", str(args.readings), "--rate", str(args.rate),
             "--commit-interval", str(args.commit_interval)],
            capture_output=True, text=True, check=True,
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        results.append(result)
        print(f"{devices:>7,} devices x {args.readings}: {result['cpu_us_per_datagram']:6.1f} us CPU a datagram "
              f"({result['of_which_spool_transactions_us']} in {result['commits']:,} spool transactions); "
              f"{result['full_collections']} full collections, longest {result['longest_full_collection_ms']} ms; "
              f"{result['gc_tracked_objects_after']:,} objects tracked after; peak RSS {result['peak_rss_mb']} MB",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
