"""
The `meter` command for users:

    meter demo [--keep]             the report's day, end to end, on loopback (--keep: then the dashboard)
    meter readings                  what the cloud stored (its [cloud] db, or --db PATH|URI)
    meter fleet add ID ADDRESS      a device's key and its [fleet] line (or a range of them)
    meter lab                       the report's two subnets in network namespaces (root)
    meter backup SOURCE DEST        copy a spool or database while its daemon runs
    meter restore BACKUP DEST       put a backup in place for a daemon to start on
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import shutil
import signal
import sqlite3
import sys
from pathlib import Path

from twisted.python.failure import Failure

from meter import config, database, secrets
from meter.cloud import SQLiteReadingStore
from meter.wire import device_address
from meter.tools.processes import (
    CLOUD_LISTENING, CONSOLE_DAY, CONSOLE_LINE, WEB_ON, Daemon, DaemonError, Daemons, stamp,
)
from meter.reading import format_number

DEMO_DIR = Path("var/demo")


def demo(args: argparse.Namespace) -> int:
    """
    Start the cloud, the gateway and every device of the fleet as the real
    twistd plugins on the configured (loopback) addresses, with a fresh
    database, and show the cloud's console.
    """
    try:
        settings = config.load(Path(args.config) if args.config else None)
    except config.ConfigError as e:
        print(f"meter demo: {e}", file=sys.stderr)
        return 2
    surveys = settings.device["surveys"]
    if not surveys.exists():
        print(f"meter demo: no survey folder {surveys}: run it from the repository root", file=sys.stderr)
        return 2
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    db = work / "cloud.sqlite"
    daemons = Daemons(Path(args.config) if args.config else None)
    kept = False
    try:
        cloud = daemons.start_cloud("--db", str(db))
        daemons.start_gateway("--spool", str(work / "gateway-spool.sqlite"), "--deadline", "30", connected=True)
        devices = [daemons.start_device(i) for i in settings.fleet]
        for device in devices:
            status = device.wait(60)
            if status != 0:
                raise DaemonError(f"{device.name} exited {status}{device.tail()}")
        sent = sum(int(m.group(1)) for d in devices for m in d.all_matching(r"sending (\d+) readings"))
        lines = [m.group(0) for m in cloud.collect(CONSOLE_LINE, sent)]
        cloud.wait_for(r"acknowledged at ")
        if args.keep:
            # The cloud stays; the gateway and the devices have done their day.
            for daemon in daemons:
                if daemon is not cloud:
                    daemon.stop()
            dashboard = dashboard_url(cloud)
            kept = True
    except DaemonError as e:
        print(f"meter demo: {e}", file=sys.stderr)
        return 1
    finally:
        if not kept:
            daemons.stop()

    print("The cloud's console:")
    # Its lines and the day headers among them, as the cloud printed them.
    for line in cloud.lines:
        if CONSOLE_LINE.match(line) or CONSOLE_DAY.match(line):
            print(f"  {line}")
    addresses = {m.group(1) for m in map(CONSOLE_LINE.match, lines)}
    missing = set(settings.fleet.values()) - addresses
    first_send = min(stamp(m.group(1)) for d in devices for m in d.all_matching(r"send started at (\S+)"))
    last_ack = max(stamp(m.group(1)) for m in cloud.all_matching(r"acknowledged at (\S+)"))
    print(
        f"\n{len(lines)} readings from {len(addresses)} devices; "
        f"first device send to the cloud's last acknowledgement: {(last_ack - first_send) * 1000:.1f} ms"
    )
    print(f"Stored in {db}: see them with  meter readings --db {db}")
    if missing:
        print(f"meter demo: no reading of {', '.join(sorted(missing))} on the console", file=sys.stderr)
    if kept:
        status = keep_serving(cloud, dashboard)
        return 1 if missing else status
    return 1 if missing else 0


def dashboard_url(cloud: Daemon) -> str:
    """
    The running cloud's dashboard, as it logged it (its port may be one the
    kernel chose); a L{DaemonError} if the cloud serves none.
    """
    seen = cloud.all_matching(WEB_ON)
    if seen:
        return seen[-1].group(1) + "/"
    if not cloud.all_matching(CLOUD_LISTENING):
        raise DaemonError(f"{cloud.name} is not running{cloud.tail()}")
    raise DaemonError(
        "the cloud serves no dashboard: --keep needs [cloud] web, a Twisted endpoint such as "
        "\"tcp:8080:interface=127.0.0.1\""
    )


def keep_serving(cloud: Daemon, url: str) -> int:
    """
    Leave the demo's cloud and its dashboard running until Ctrl-C (SIGINT)
    or SIGTERM, then stop it cleanly; 0, or 1 if the cloud ended by itself.
    """
    def interrupted(signum, frame):
        raise KeyboardInterrupt

    # Both are handled before the URL is out (whoever reads it may send one
    # at once), and the URL goes out in one write, never cut mid-line.
    previous = {signum: signal.signal(signum, interrupted) for signum in (signal.SIGINT, signal.SIGTERM)}
    status = None
    try:
        sys.stdout.write(f"\nThe dashboard: {url}\n(the cloud keeps running; Ctrl-C stops it)\n")
        sys.stdout.flush()
        # Ctrl-C reaches only this process: the cloud runs in a session of
        # its own, and is stopped here, with its database closed cleanly.
        status = cloud.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        stopped = cloud.stop()
    if status is not None:
        print(f"meter demo: the cloud exited by itself ({status}){cloud.tail()}", file=sys.stderr)
        return 1
    # twistd ends a clean stop by SIGTERM with that signal's own status.
    if stopped not in (0, -signal.SIGTERM):
        print(f"meter demo: the cloud did not stop cleanly ({stopped}){cloud.tail()}", file=sys.stderr)
        return 1
    print("meter demo: the cloud stopped", flush=True)
    return 0


COLUMNS = ("device_id", "device_ip", "taken_at", "temperature_c", "humidity_pct")


def _device(text: str) -> dict:
    """
    C{--device}: a device id (digits) or a device address, as the store's
    query keywords.
    """
    if text.isdigit():
        return {"device_id": config.whole(1, 2**31 - 1)(text)}
    return {"device_ip": device_address(text)}


#: What --from and --to take: a date, maybe a time of day (a zone is refused).
_MOMENT = re.compile(r"^\d{4}-\d\d-\d\d(?P<time>[T ]\d\d:\d\d(:\d\d)?)?(?P<zone>Z|[+-]\d\d:?\d\d)?$")


def _moment(text: str, end: bool) -> datetime.datetime:
    """
    C{--from} or C{--to}: a date or a date and time, in the devices' local
    time as stored (the readings carry no zone).  A date alone as C{--to}
    takes in that whole day.
    """
    shape = _MOMENT.match(text)
    if shape is not None and shape.group("zone"):
        raise ValueError(f"{text!r} has a zone: readings are stamped in their device's local time, give it without one")
    try:
        if shape is None:
            raise ValueError
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"expected a date (2026-11-30) or a date and time (2026-11-30T08:00), got {text!r}") from None
    if end and shape.group("time") is None:
        moment += datetime.timedelta(days=1)
    return moment


def _database_path(args: argparse.Namespace):
    """
    The cloud's database (an SQLite file's path, or a PostgreSQL database's
    L{meter.postgres.PostgresLocation}): --db, else [cloud] db of the
    configuration; and where it came from, for a message.
    """
    if args.db:
        from meter.postgres import PostgresLocation, is_postgres_uri

        return (PostgresLocation.parse(args.db) if is_postgres_uri(args.db) else Path(args.db)), "--db"
    settings = config.load(Path(args.config) if args.config else None)
    return settings.cloud["db"], f"[cloud] db of {settings.source}"


def readings(args: argparse.Namespace) -> int:
    try:
        path, source = _database_path(args)
    except (config.ConfigError, ValueError) as e:
        print(f"meter readings: {e}", file=sys.stderr)
        return 2
    query: dict = {}
    for option, given, parse in (
        ("--device", args.device, _device),
        ("--from", args.since, lambda text: {"since": _moment(text, False)}),
        ("--to", args.until, lambda text: {"until": _moment(text, True)}),
    ):
        if given is not None:
            try:
                query.update(parse(given))
            except ValueError as e:
                print(f"meter readings: {option}: {e}", file=sys.stderr)
                return 2
    if args.limit is not None and args.limit < 0:
        print(f"meter readings: --limit: expected 0 or more, got {args.limit}", file=sys.stderr)
        return 2
    if not isinstance(path, Path):
        from meter.tools.pgreadings import postgres_readings

        try:
            found, more = postgres_readings(path, query, args.limit)
        except ValueError as e:
            print(f"meter readings: {e} ({source})", file=sys.stderr)
            return 2
        return _print_readings(args, found, more)
    if not path.is_file():
        hint = "" if args.db else " (run where the cloud runs, or give --db PATH or --config FILE)"
        print(f"meter readings: no database at {path} ({source}){hint}", file=sys.stderr)
        return 2
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        (kind,) = connection.execute("PRAGMA application_id").fetchone()
        if kind != database.CLOUD_DATABASE and kind in database.KINDS:
            print(f"meter readings: {path} is a {database.KINDS[kind]}, not the cloud's database ({source})", file=sys.stderr)
            return 2
        # One more than the limit: whether there were more to show.
        limit = None if args.limit is None else args.limit + 1
        # The SQLite store answers a query at once: its Deferred has fired.
        outcome: list = []
        SQLiteReadingStore(connection).readings(**query, limit=limit).addBoth(outcome.append)
        (found,) = outcome
        if isinstance(found, Failure):
            found.raiseException()
        more = limit is not None and len(found) == limit
    except sqlite3.DatabaseError as e:
        print(f"meter readings: {path} is not a meter cloud database ({source}): {e}", file=sys.stderr)
        return 2
    return _print_readings(args, found[:args.limit], more)


def _print_readings(args: argparse.Namespace, found: list, more: bool) -> int:
    rows = [
        (r.device_id, r.device_ip, r.taken_at.isoformat(timespec="minutes"), r.temperature_c, r.humidity_pct)
        for r in found
    ]
    out = sys.stdout
    if args.format == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows((i, ip, at, format_number(t), format_number(h)) for i, ip, at, t, h in rows)
    elif args.format == "json":
        json.dump([dict(zip(COLUMNS, row)) for row in rows], out, indent=1)
        out.write("\n")
    else:
        table = [COLUMNS] + [(str(i), ip, at, format_number(t), format_number(h)) for i, ip, at, t, h in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
        for row in table:
            out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")
        out.write(f"({len(rows)} readings{'; more beyond --limit' if more else ''})\n")
    return 0


def certs(args: argparse.Namespace) -> int:
    """
    Create the CA, the cloud's and gateway's certificates and the fleet's
    device keys in a folder, never replacing what exists; renew the
    certificates near their end (L{meter.renewal}).
    """
    from meter import renewal

    window = datetime.timedelta(days=args.renew_within)
    try:
        settings = config.load(Path(args.config) if args.config else None)
        created = secrets.create(Path(args.dir), settings.fleet)
        renewed = renewal.renew(Path(args.dir), window, force=args.renew)
        ca_warning = renewal.ca_expiring(Path(args.dir), window)
    except (config.ConfigError, secrets.SecretError, OSError) as e:
        print(f"meter certs: {e}", file=sys.stderr)
        return 2
    for path in created:
        print(f"created {path}")
    for certificate in renewed:
        print(renewal.describe(certificate))
    if ca_warning is not None:
        print(f"meter certs: {ca_warning}", file=sys.stderr)
    print(f"{args.dir}: CA, cloud and gateway certificates, keys of {len(settings.fleet)} devices "
          f"({len(created)} files new). Give each device only its own devices/device<N>.key.")
    return 0


def lab(args: argparse.Namespace) -> int:
    from meter.tools import lab as network_lab

    return network_lab.main(args)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="meter", description="The meter suite's user commands.")
    commands = top.add_subparsers(dest="command", required=True)

    p = commands.add_parser("demo", help="run the report's day end to end on loopback and show the cloud's console")
    p.add_argument("--config", help="configuration file (default: etc/meter.toml, else the embedded defaults)")
    p.add_argument("--dir", default=str(DEMO_DIR), help=f"folder for the demo's fresh database and spool (default {DEMO_DIR})")
    p.add_argument("--keep", action="store_true",
                   help="after the day, leave the cloud and its dashboard running ([cloud] web) until Ctrl-C")
    p.set_defaults(run=demo)

    p = commands.add_parser("certs", help="create a CA, TLS certificates and device keys for the fleet")
    p.add_argument("dir", help="folder to create them in (existing files are kept)")
    p.add_argument("--config", help="configuration file whose [fleet] gets keys (default: etc/meter.toml)")
    p.add_argument("--renew-within", type=float, default=30.0, metavar="DAYS",
                   help="renew the cloud's and gateway's certificates that expire within DAYS (default 30), "
                   "with the same CA and key")
    p.add_argument("--renew", action="store_true", help="renew the cloud's and gateway's certificates now")
    p.set_defaults(run=certs)

    p = commands.add_parser(
        "lab",
        help="run as root: the report's two subnets in network namespaces, one day through the real daemons",
        description="Build the report's network in Linux network namespaces (devices 192.168.1.2.. on a LAN "
        "bridge, the gateway on 192.168.1.1 and 10.10.10.1, the cloud on 10.10.10.2; nothing routed out), run the "
        "real twistd plugins inside, play one day, print the cloud's console and tear everything down. "
        "See docs/lab.md.",
    )
    p.add_argument("--devices", type=int, default=4, metavar="N", help="device hosts 192.168.1.2.. (default 4, at most 253)")
    p.add_argument("--loss", type=int, default=0, metavar="PCT", help="per cent of UDP frames the LAN drops each way (default 0)")
    p.add_argument("--keep", type=float, nargs="?", const=600.0, default=0.0, metavar="SECONDS",
                   help="keep the lab up this long after the day, to look inside (default 600 s; Ctrl-C ends it)")
    p.add_argument("--dir", default="var/lab", help="folder of the lab's configuration, database and logs (default var/lab)")
    p.add_argument("--down", nargs="?", const="", metavar="RUN_ID",
                   help="only remove the namespaces (and their processes) left by earlier runs: all mlab-*, or one run's")
    p.set_defaults(run=lab)

    p = commands.add_parser(
        "readings", help="list the readings a cloud database holds",
        description="The readings the cloud stored, by time taken, then device id.  Times are the devices' local "
        "times, as their surveys and the cloud's console give them (no zone).",
    )
    p.add_argument("--db", help="the cloud's database: an SQLite file, or a PostgreSQL URI postgresql://user@host/dbname "
                   "(default: [cloud] db of the configuration)")
    p.add_argument("--config", help="configuration file naming the database (default: etc/meter.toml, else the "
                   "embedded defaults)")
    p.add_argument("--device", metavar="ID|ADDRESS", help="only this device's readings, by id (3) or address (192.168.1.4)")
    p.add_argument("--from", dest="since", metavar="WHEN",
                   help="only readings taken at or after WHEN: a date (2026-11-30) or date and time (2026-11-30T08:00)")
    p.add_argument("--to", dest="until", metavar="WHEN",
                   help="only readings taken before WHEN; a date alone includes that whole day")
    p.add_argument("--limit", type=int, metavar="N", help="at most N readings, the first by time taken")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(run=readings)

    from meter.tools import backup

    backup.register(commands)

    from meter.tools import fleet

    fleet.add_arguments(commands)

    from meter.tools import loadgen as load_generator

    p = commands.add_parser(
        "loadgen",
        help="simulate a fleet of devices from one process against a (loopback) gateway and measure it",
        description=load_generator.__doc__.split("\n\n")[0],
    )
    load_generator.add_arguments(p)
    p.set_defaults(run=load_generator.run)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:
        # The reader went away (`meter readings | head`): what is left
        # unwritten is not wanted.  Quiet, with a shell's status for a
        # command ended by SIGPIPE; stdout goes to /dev/null so that the
        # interpreter's own flush at exit meets no broken pipe either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13


if __name__ == "__main__":
    sys.exit(main())
