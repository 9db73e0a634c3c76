"""
How long the gateway's reactor is held as a large round's readings are made
ready to leave: N devices' days (96 readings each, in the chunks a device
cuts them into) spooled in a real SQLite spool with fsync'd commits, then
made ready

- as the round closes (L{meter.gateway.rounds.CLOSE_CHUNKS} chunks a
  transaction, each closing again until one finds nothing left) and, for
  comparison, in one transaction;
- as a full spool releases the open round
  (L{meter.gateway.rounds.RELEASE_CHUNKS} chunks a transaction).

Each transaction runs on the thread that would be the reactor's, so its
wall time is the reactor's stall.

    python bench/close_cost.py [--devices 10000,100000]

Each size and way runs on a spool of its own, in a temporary folder that is
removed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from intake_cost import DAY, SENT_AT, address  # noqa: E402


def outcome(results: list):
    """
    The one result a Deferred added to C{results} (with C{addBoth}) once
    the clock turned; its failure raised, so the bench stops on its cause.
    """
    from twisted.python.failure import Failure

    (result,) = results
    if isinstance(result, Failure):
        result.raiseException()
    return result


def spooled(folder: Path, devices: int):
    """
    A spool holding one open round of C{devices} devices' days, on a clock
    that commits as it turns; (spool, clock, chunks spooled).
    """
    from twisted.internet import task

    from meter import wire
    from meter.database import Database
    from meter.gateway.spool import Spool
    from meter.tools.loadgen import synthetic_day

    connection, recovered = Spool.open(folder / "spool.sqlite")
    clock = task.Clock()
    spool = Spool(Database(connection, clock), recovered.depth)
    added: list = []
    for device_id in range(1, devices + 1):
        ip = address(device_id)
        readings = synthetic_day(device_id, ip, DAY, 96)
        for chunk in wire.split_day(device_id, ip, DAY, readings, f"{device_id:016x}", int(SENT_AT)):
            spool.add_chunk(chunk, 1.0).addBoth(lambda result: added.append([result]))
        if device_id % 500 == 0:
            clock.advance(0.01)
    clock.advance(0.01)
    for result in added:
        outcome(result)
    return spool, clock, len(added)


def slices(clock, step, most: int | None) -> list[float]:
    """
    Make the round ready C{most} chunks a transaction (None: all in one),
    with C{step(most)}, a spool call that fires with how many readings it
    made ready, until one makes none ready; each transaction's seconds.
    """
    seconds = []
    while True:
        made_ready: list = []
        started = time.perf_counter()
        step(most).addBoth(made_ready.append)
        clock.advance(0.01)
        seconds.append(time.perf_counter() - started)
        if most is None or not outcome(made_ready):
            return seconds


def main(argv: list[str] | None = None) -> int:
    from meter.gateway.rounds import CLOSE_CHUNKS, RELEASE_CHUNKS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="10000,100000", help="comma-separated fleet sizes (default 10000,100000)")
    args = parser.parse_args(argv)
    ways = (
        ("closed in one transaction", "close", None),
        (f"closed {CLOSE_CHUNKS:,} chunks a transaction", "close", CLOSE_CHUNKS),
        (f"released by a full spool, {RELEASE_CHUNKS:,} chunks a transaction", "release", RELEASE_CHUNKS),
    )
    for devices in (int(n) for n in args.devices.split(",")):
        for way, call, most in ways:
            with tempfile.TemporaryDirectory(prefix="meter-close-") as folder:
                spool, clock, chunks = spooled(Path(folder), devices)
                if call == "close":
                    seconds = slices(clock, lambda most: spool.close_round(DAY, 2.0, most), most)
                else:
                    seconds = slices(clock, lambda most: spool.days_ready([DAY], most), most)
            print(f"{devices:,} devices ({chunks:,} chunks), {way}: {len(seconds)} transactions, "
                  f"longest {max(seconds) * 1000:.1f} ms, all {sum(seconds) * 1000:.0f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
