"""
`meter fleet`: the devices the gateway expects, changed without typing them.

    meter fleet add 5 192.168.1.6                          one device
    meter fleet add 5-5004 --first-address 192.168.1.6/16  a range, consecutive addresses
    meter fleet list                                       the fleet and its keys

An add creates each device's HMAC key in the secrets folder (never replacing
one) and adds its C{ID = "ADDRESS"} line at the end of the C{[fleet]} table
of the configuration file, whose comments and layout are kept: the file's
text is edited, not rendered again.  The new file is written beside the old
one, checked by the configuration's own loader, and only then renamed over
it, in one write however many devices are added.  A running gateway takes
the new fleet on SIGHUP.
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import os
import re
import sys
import tomllib
from pathlib import Path

from meter.files import sync_folder
from meter import config, secrets
from meter.wire import device_address

#: A table header line of the fleet: C{[fleet]}, maybe with a comment.
_FLEET_HEADER = re.compile(r"^\s*\[\s*fleet\s*\]\s*(#.*)?$")
#: Any table header line: where the fleet's table ends.
_TABLE_HEADER = re.compile(r"^\s*\[")
#: The prefix a range's first address gets when none is given: the usual LAN.
DEFAULT_PREFIX = {4: 24, 6: 64}
#: How many refused ids or addresses a refusal names before it counts them.
NAMED = 5
#: The most devices one add takes: each is a key file and a line.
MAX_ADD = 100_000


class FleetError(ValueError):
    """
    An add is refused: the message names the id, address, file or key.
    """


def device_ids(text: str) -> range:
    """
    The ids of C{"5"} or C{"5-5004"} (both ends included).
    """
    first, dash, last = text.partition("-")
    parse = config.whole(1, 2**31 - 1)
    try:
        low = parse(first)
        high = parse(last) if dash else low
    except ValueError as e:
        raise FleetError(f"device ids {text!r}: {e}") from None
    if high < low:
        raise FleetError(f"device ids {text!r}: the range ends before it starts")
    if high - low + 1 > MAX_ADD:
        raise FleetError(f"device ids {text!r}: {high - low + 1} devices, at most {MAX_ADD} in one add")
    return range(low, high + 1)


def consecutive_addresses(first: str, count: int) -> list[str]:
    """
    C{count} consecutive addresses from C{first} (C{ADDRESS} or
    C{ADDRESS/PREFIX}; without a prefix, /24 for IPv4 and /64 for IPv6),
    refused if they would run past the last host address of that subnet.
    """
    try:
        interface = ipaddress.ip_interface(first)
        if "/" not in first:
            interface = ipaddress.ip_interface(f"{first}/{DEFAULT_PREFIX[interface.version]}")
        start = device_address(str(interface.ip))
    except ValueError as e:
        raise FleetError(f"--first-address {first!r}: {e}") from None
    network = interface.network
    # The subnet's own address and (IPv4) its broadcast address name no host.
    hosts_end = network.broadcast_address - (1 if network.version == 4 and network.prefixlen < 31 else 0)
    hosts_start = network.network_address + (1 if network.version == 4 and network.prefixlen < 31 else 0)
    if interface.ip < hosts_start or interface.ip > hosts_end:
        raise FleetError(f"--first-address {first!r}: {start} is not a host address of {network}")
    if int(interface.ip) + count - 1 > int(hosts_end):
        room = int(hosts_end) - int(interface.ip) + 1
        raise FleetError(
            f"{count} addresses from {start} run past {hosts_end}, the last host of {network} "
            f"(room for {room}): give a wider subnet, e.g. --first-address {start}/{max(network.prefixlen - 8, 8)}"
        )
    return [device_address(str(interface.ip + offset)) for offset in range(count)]


def _named(items: list[str]) -> str:
    shown = "; ".join(items[:NAMED])
    return shown if len(items) <= NAMED else f"{shown}; and {len(items) - NAMED} more"


def check_new(fleet: dict[int, str], additions: dict[int, str]) -> None:
    """
    Refuse C{additions} naming every id or address that C{fleet} holds
    already (the first few, and how many more).
    """
    owners = {address: device_id for device_id, address in fleet.items()}
    clashes = [
        f"device {device_id} is in [fleet] already (as {fleet[device_id]})" for device_id in additions if device_id in fleet
    ]
    clashes += [
        f"address {address} belongs to device {owners[address]} already"
        for address in additions.values()
        if address in owners
    ]
    if clashes:
        raise FleetError(f"nothing added: {_named(clashes)}")


def with_devices(text: str, source: str, additions: dict[int, str], fleet: dict[int, str]) -> str:
    """
    C{text}, a configuration file, with the C{additions} lines inserted
    after the last entry of its C{[fleet]} table, everything else as it
    was.  A file without a C{[fleet]} table gets one at its end holding
    the fleet it had (the embedded defaults) and the additions.
    """
    lines = [f'{device_id} = "{address}"\n' for device_id, address in additions.items()]
    rows = text.splitlines(keepends=True)
    if rows and not rows[-1].endswith("\n"):
        rows[-1] += "\n"
    header = next((i for i, row in enumerate(rows) if _FLEET_HEADER.match(row)), None)
    if header is None:
        if "fleet" in tomllib.loads(text):
            raise FleetError(
                f"{source}: its fleet is not written as a [fleet] table (one `ID = \"ADDRESS\"` line each): "
                f"add the devices by hand"
            )
        kept = [f'{device_id} = "{address}"\n' for device_id, address in fleet.items()]
        table = ["\n", "# The devices the gateway expects each day: id = \"address\".\n", "[fleet]\n"]
        return "".join(rows + table + kept + lines)
    end = next((i for i in range(header + 1, len(rows)) if _TABLE_HEADER.match(rows[i])), len(rows))
    entries = [i for i in range(header + 1, end) if rows[i].strip() and not rows[i].lstrip().startswith("#")]
    at = entries[-1] + 1 if entries else header + 1
    return "".join(rows[:at] + lines + rows[at:])


def replace_config(path: Path, text: str, expected: dict[int, str]) -> None:
    """
    Put C{text} in place of the configuration file C{path}: written to a
    temporary file beside it (its mode kept) and fsynced, loaded by
    L{config.load}, which must find the fleet C{expected}, and only then
    renamed over C{path}.  A reader sees the old file or the new one.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    old = os.stat(path)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, old.st_mode & 0o7777)
    try:
        if os.geteuid() == 0 and (old.st_uid, old.st_gid) != (0, 0):
            # Run as root on the service user's file: it stays theirs, or
            # the daemons reading it could no longer.
            os.fchown(fd, old.st_uid, old.st_gid)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        try:
            loaded = config.load(temporary)
        except config.ConfigError as e:
            raise FleetError(f"{path} not changed: the edited file is refused: {str(e).replace(str(temporary), str(path))}") from None
        if loaded.fleet != expected:
            raise FleetError(f"{path} not changed: the edited file does not hold the fleet intended")
        os.replace(temporary, path)
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)
    sync_folder(path.parent)


def _config_path(args: argparse.Namespace) -> Path:
    path = Path(args.config) if args.config else config.DEFAULT_CONFIG
    if not path.is_file():
        hint = "" if args.config else " (run in the repository root, or give --config)"
        raise FleetError(f"no configuration file at {path}{hint}")
    return path


def _secrets_folder(args: argparse.Namespace, settings: config.Config) -> Path:
    return Path(args.secrets) if args.secrets else settings.security["dir"]


def _span(names: list) -> str:
    return str(names[0]) if len(names) == 1 else f"{names[0]}..{names[-1]}"


def add(args: argparse.Namespace) -> int:
    try:
        return _add(args)
    except (FleetError, config.ConfigError, secrets.SecretError) as e:
        print(f"meter fleet add: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"meter fleet add: {e}", file=sys.stderr)
        return 1


def _add(args: argparse.Namespace) -> int:
    ids = device_ids(args.ids)
    if (args.address is None) == (args.first_address is None):
        raise FleetError("give the address: ID ADDRESS for one device, or --first-address ADDRESS[/PREFIX] for a range")
    if args.address is not None:
        if len(ids) > 1:
            raise FleetError(f"{len(ids)} devices need --first-address ADDRESS[/PREFIX] (consecutive addresses), not one ADDRESS")
        try:
            addresses = [device_address(args.address)]
        except ValueError as e:
            raise FleetError(str(e)) from None
    else:
        addresses = consecutive_addresses(args.first_address, len(ids))
    path = _config_path(args)
    # One add at a time in the file's folder: two at once would each write
    # the file they read, and one's devices would be lost.
    lock = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        settings = config.load(path)
        additions = dict(zip(ids, addresses))
        check_new(settings.fleet, additions)
        text = path.read_text(encoding="utf-8")
        edited = with_devices(text, str(path), additions, settings.fleet)
        folder = _secrets_folder(args, settings)
        # The keys first: an add that stops after them is done again with
        # the same command, which keeps the keys it finds.
        created, kept = secrets.create_device_keys(folder, ids)
        replace_config(path, edited, {**settings.fleet, **additions})
    finally:
        os.close(lock)
    what = f"device {ids[0]} ({addresses[0]})" if len(ids) == 1 else (
        f"{len(ids)} devices {ids[0]}..{ids[-1]} ({addresses[0]}..{addresses[-1]})"
    )
    print(f"added {what} to [fleet] of {path}")
    if created:
        print(f"created {len(created)} key{'s' if len(created) > 1 else ''} in {folder / 'devices'}: "
              f"{_span([p.name for p in created])}")
    if kept:
        print(f"kept {len(kept)} key{'s' if len(kept) > 1 else ''} found in {folder / 'devices'}: {_span([p.name for p in kept])}")
    print("A running gateway takes them on SIGHUP (systemctl reload meter-gateway, or kill -HUP its pid). "
          "Give each device host only its own devices/device<N>.key (docs/security.md).")
    return 0


def list_fleet(args: argparse.Namespace) -> int:
    try:
        settings = config.load(Path(args.config) if args.config else None)
    except config.ConfigError as e:
        print(f"meter fleet list: {e}", file=sys.stderr)
        return 2
    folder = _secrets_folder(args, settings)
    missing = 0
    out = sys.stdout
    for device_id, address in settings.fleet.items():
        key = secrets.device_key_path(folder, device_id)
        has_key = os.path.lexists(key)
        missing += not has_key
        out.write(f"{device_id}\t{address}\t{key if has_key else 'no key: ' + str(key)}\n")
    out.write(f"({len(settings.fleet)} devices in [fleet] of {settings.source}; {missing} without a key in {folder})\n")
    return 0


def add_arguments(commands) -> None:
    """
    The C{fleet} command and its C{add} and C{list} subcommands.
    """
    p = commands.add_parser("fleet", help="add devices to [fleet] with their keys, or list the fleet",
                            description=__doc__.split("\n\n")[0])
    actions = p.add_subparsers(dest="action", required=True)

    a = actions.add_parser(
        "add", help="create the devices' keys and add them to [fleet] (a running gateway takes them on SIGHUP)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a.add_argument("ids", metavar="ID[-LAST]", help="a device id, or a range of them (5-5004, both included)")
    a.add_argument("address", nargs="?", metavar="ADDRESS", help="the device's address (one device)")
    a.add_argument("--first-address", metavar="ADDRESS[/PREFIX]",
                   help="the first device's address, the next ones consecutive within the subnet "
                        "(default prefix /24 for IPv4, /64 for IPv6)")
    a.add_argument("--config", help=f"configuration file to edit (default {config.DEFAULT_CONFIG})")
    a.add_argument("--secrets", help="folder of the device keys (default: [security] dir of the configuration)")
    a.set_defaults(run=add)

    ls = actions.add_parser("list", help="the fleet's devices, addresses and key files")
    ls.add_argument("--config", help=f"configuration file (default {config.DEFAULT_CONFIG})")
    ls.add_argument("--secrets", help="folder of the device keys (default: [security] dir of the configuration)")
    ls.set_defaults(run=list_fleet)
