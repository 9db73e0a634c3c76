"""
Configuration: etc/meter.toml, the embedded defaults, and the command-line
options that override them.

Every key is checked before any daemon binds a socket.  A bad value is
refused with a message naming where it came from (the file and its
C{[section] key}, or the option), what was expected and what was found.
"""

from __future__ import annotations

import datetime
import ipaddress
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import attrs

from meter.wire import device_address

if TYPE_CHECKING:  # the parser imports it when a URI is given
    from meter.postgres import PostgresLocation

#: Where the daemons look for their configuration when no --config is given.
DEFAULT_CONFIG = Path("etc/meter.toml")


class ConfigError(ValueError):
    """
    A configuration value is refused; the message names its key and source.
    """


# -- value parsers: each takes the raw value and returns the checked one -----


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def positive(value: Any) -> float:
    number = _number(value)
    if number <= 0:
        raise ValueError(f"expected a number above 0, got {value!r}")
    return number


def non_negative(value: Any) -> float:
    number = _number(value)
    if number < 0:
        raise ValueError(f"expected a number of 0 or more, got {value!r}")
    return number


def _at_most(first: Callable[[Any], float], high: float, expected: str) -> Callable[[Any], float]:
    """
    C{first}'s number, refused above C{high} as not C{expected}.
    """

    def parse(value: Any) -> float:
        number = first(value)
        if number > high:
            raise ValueError(f"expected {expected}, got {value!r}")
        return number

    return parse


def seconds_up_to(high: float) -> Callable[[Any], float]:
    """
    A number of seconds from 0 to C{high}.
    """
    return _at_most(non_negative, high, f"a number from 0 to {high:g}")


def positive_up_to(high: float) -> Callable[[Any], float]:
    """
    A number above 0 and at most C{high}.
    """
    return _at_most(positive, high, f"a number above 0 and at most {high:g}")


def whole(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"expected a whole number, got {value!r}")
        try:
            number = int(value) if isinstance(value, (int, str)) else None
        except ValueError:
            number = None
        if number is None:
            raise ValueError(f"expected a whole number, got {value!r}")
        if not low <= number <= high:
            raise ValueError(f"expected a whole number from {low} to {high}, got {number}")
        return number

    return parse


def text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def one_of(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    return parse


def path(value: Any) -> Path:
    return Path(text(value))


def optional_path(value: Any) -> Path | None:
    """
    A path, or C{""} for none (the key's default applies).
    """
    if value == "":
        return None
    return path(value)


def host_port(value: Any) -> tuple[str, int]:
    """
    C{HOST:PORT}, with an IPv6 host in brackets (C{[::1]:10005}).  The host
    must be an IP address: the daemons bind and send to addresses, not
    names, so no resolver can stall them.
    """
    raw = text(value)
    host, colon, port = raw.rpartition(":")
    if not colon:
        raise ValueError(f"expected HOST:PORT, got {raw!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"expected an IP address before the port, got {host!r} in {raw!r}") from None
    return host, whole(1, 65535)(port)


def host_ports(value: Any) -> tuple[tuple[str, int], ...]:
    """
    One or more C{HOST:PORT} (L{host_port}): a TOML array of them, or one
    string of them separated by commas (C{--cloud A,B}); in their order,
    none twice.
    """
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"expected HOST:PORT or a list of them, got {value!r}")
    if not items:
        raise ValueError("expected at least one HOST:PORT, got an empty list")
    addresses: list[tuple[str, int]] = []
    for item in items:
        address = host_port(item)
        if address in addresses:
            raise ValueError(f"{item!r} is listed twice in {value!r}")
        addresses.append(address)
    return tuple(addresses)


def database(value: Any) -> "Path | PostgresLocation":
    """
    The cloud's database: a PostgreSQL connection URI
    (C{postgresql://user@host:port/dbname}, C{?host=/socket/dir} for a Unix
    socket), or else the path of an SQLite file.  A URI's password is never
    repeated in a message.
    """
    from meter.postgres import PostgresLocation, is_postgres_uri

    raw = text(value)
    if is_postgres_uri(raw):
        return PostgresLocation.parse(raw)
    return Path(raw)


def ip(value: Any) -> str:
    raw = text(value)
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise ValueError(f"expected an IP address, got {raw!r}") from None


def optional_ip(value: Any) -> str:
    """
    An IP address, or C{""} for none (let the kernel choose).
    """
    if value == "":
        return ""
    return ip(value)


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"expected true or false, got {value!r}")


def time_of_day(value: Any) -> datetime.time:
    raw = text(value)
    try:
        return datetime.time.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"expected a time of day HH:MM, got {raw!r}") from None


def server_endpoint(value: Any) -> str:
    """
    A Twisted server endpoint description (C{tcp:8001:interface=127.0.0.1}).
    It is parsed here, which binds nothing, so a typo is refused at start.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    raw = text(value)
    try:
        serverFromString(reactor, raw)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"expected a Twisted endpoint such as tcp:8001:interface=127.0.0.1, got {raw!r} ({e})") from None
    return raw


def optional_server_endpoint(value: Any) -> str:
    """
    A Twisted server endpoint description, or C{""} for none (turned off).
    """
    if value == "":
        return ""
    return server_endpoint(value)


def read_database(value: Any):
    """
    Where the web API reads: C{None} for C{""} (the cloud's C{db}), else a
    PostgreSQL URI (a read replica of C{db}, as a
    L{meter.postgres.PostgresLocation}).
    """
    if value == "":
        return None
    from meter.postgres import PostgresLocation

    return PostgresLocation.parse(text(value))


# -- the schema -------------------------------------------------------------

#: section -> key -> (parser, default, help).  etc/meter.toml repeats these
#: defaults with comments; a test keeps the two equal.
SCHEMA: dict[str, dict[str, tuple[Callable[[Any], Any], Any, str]]] = {
    "cloud": {
        "listen": (server_endpoint, "tcp:8001:interface=127.0.0.1", "Twisted endpoint the cloud listens on"),
        "db": (
            database, "var/cloud.sqlite",
            "database of stored readings: an SQLite file, or a PostgreSQL URI postgresql://user@host:port/dbname "
            "(?host=/socket/dir for a Unix socket)",
        ),
        "cache_mb": (
            positive, 16.0,
            "SQLite page cache of the readings database, in megabytes: room for a batch's pages and the readings' "
            "interior pages without spilling to the log mid-transaction",
        ),
        "console": (
            optional_path, "",
            "file the console lines are appended to (\"-\": standard output; \"\": standard output in the "
            "foreground, <db>-console.log beside the database when run as a daemon, cloud-console.log in the folder it "
            "runs in for a PostgreSQL database)",
        ),
        "idle_timeout": (positive, 120.0, "seconds a gateway connection may stay silent between lines"),
        "tls": (boolean, True, "require TLS with a client certificate signed by the suite's CA"),
        "handshake_timeout": (positive, 5.0, "seconds a connection may take to complete TLS and its certificate check"),
        "max_unauthenticated": (
            whole(0, 10**6), 0,
            "most connections not yet authenticated, the oldest closed first (0: from the descriptor limit)",
        ),
        "metrics": (
            optional_server_endpoint, "tcp:9181:interface=127.0.0.1",
            "Twisted endpoint serving /metrics, /healthz and /readyz over HTTP (\"\": none)",
        ),
        "allow_plain_beyond_loopback": (
            boolean, False, "let tls = false stand while listen is beyond loopback (a network closed by other means)",
        ),
        "web": (
            optional_server_endpoint, "tcp:8080:interface=127.0.0.1",
            "Twisted endpoint serving the dashboard at / and the read-only API under /api/v1 (\"\": none)",
        ),
        "web_token_file": (
            optional_path, "",
            "file holding the token the web API requires (bearer, or basic authentication's password); required "
            "when web listens beyond loopback (\"\": none)",
        ),
        "read_db": (
            read_database, "",
            "PostgreSQL URI the web API's queries read, e.g. a streaming replica (\"\": db)",
        ),
    },
    "gateway": {
        "listen": (host_port, "127.0.0.1:10005", "UDP HOST:PORT the devices send to"),
        "cloud": (
            host_ports, "127.0.0.1:8001",
            "TCP HOST:PORT of the cloud, or a list of its nodes' (the gateway connects to one and fails over to the next)",
        ),
        "deadline": (positive, 60.0, "seconds after a day's first report before it is forwarded anyway"),
        "spool": (path, "var/gateway-spool.sqlite", "SQLite spool holding readings until the cloud acknowledges"),
        "commit_interval": (
            seconds_up_to(0.1), 0.002,
            "least seconds between the starts of two spool commits: chunks arriving meanwhile share the next one (0: each reactor turn)",
        ),
        "batch_readings": (whole(1, 5000), 5000, "most readings in one batch to the cloud; a batch holds whole chunks, and a chunk of more readings goes alone"),
        "batches_in_flight": (whole(1, 64), 4, "batches sent to the cloud and not yet acknowledged, at most"),
        "connect_timeout": (positive, 5.0, "seconds to wait for the cloud's TCP handshake"),
        "ack_timeout": (positive, 30.0, "seconds to wait for the cloud to acknowledge a batch"),
        "heartbeat": (positive, 15.0, "seconds of silence before the gateway pings the cloud"),
        "max_backoff": (positive, 30.0, "longest wait between reconnection attempts, and between retries of a failed spool transaction, in seconds"),
        "late_linger": (non_negative, 1.0, "seconds readings ready on their own (late, or forward = \"device\") wait for more to fill a batch (0: none)"),
        "forward": (
            one_of("round", "device"), "round",
            "when a day's readings leave for the cloud: \"round\", when its round closes; \"device\", each device's as soon as its transfer is complete",
        ),
        "spool_limit": (whole(1, 10**9), 5_000_000, "most readings the spool holds; devices are answered busy beyond"),
        "reassembly_timeout": (positive, 600.0, "seconds a day's transfer may stay incomplete before it is forgotten"),
        "max_reassemblies": (whole(1, 10**7), 10_000, "most incomplete transfers tracked at once (oldest forgotten)"),
        "max_transfers_per_day": (whole(1, 10**6), 24, "most transfers one device may send of one day; more are refused"),
        "max_parts_per_day": (whole(1, 10**7), 4096, "most chunks (datagrams) one device may send of one day; more are refused"),
        "stats_interval": (positive, 60.0, "seconds between the gateway's stats log lines"),
        "tls": (boolean, True, "connect to the cloud over TLS, verifying its certificate"),
        "cloud_name": (text, "meter-cloud", "the name the cloud's certificate must carry"),
        "source_rate": (positive, 200.0, "datagrams a second one source address may send; the excess is dropped"),
        "source_burst": (positive, 400.0, "datagrams one source address may send in a burst above source_rate"),
        "replay_window": (positive, 600.0, "seconds a device's transfer stays acceptable after it started"),
        "cloud_source": (optional_ip, "", "local IP address to connect to the cloud from (\"\": the kernel's choice)"),
        "check_source": (boolean, False, "refuse a datagram whose source address is not its device's [fleet] address"),
        "log_datagrams": (boolean, False, "log every datagram and its answer, not only each device's completed day"),
        "shed": (boolean, True, "answer new transfers busy with a retry-after hint while the receive queue stands"),
        "shed_target": (positive, 0.1, "seconds a datagram may wait in the receive queue before the queue counts as standing"),
        "shed_interval": (positive, 0.1, "seconds the queue must stand over shed_target before the gateway sheds"),
        "shed_max_hint": (positive, 60.0, "longest retry-after hint, seconds, when shedding or when the spool is full"),
        "receive_buffer_mb": (
            positive_up_to(1000), 16.0,
            "the UDP socket's receive buffer, in MiB: the datagrams arriving while the gateway is busy wait there "
            "(beyond net.core.rmem_max only with CAP_NET_ADMIN; the gateway logs what it got)",
        ),
        "metrics": (
            optional_server_endpoint, "tcp:9182:interface=127.0.0.1",
            "Twisted endpoint serving /metrics, /healthz and /readyz over HTTP (\"\": none)",
        ),
    },
    "device": {
        "id": (whole(1, 2**31 - 1), None, "this device's number in the fleet"),
        "gateway": (host_port, "127.0.0.1:10005", "UDP HOST:PORT of the gateway"),
        "surveys": (path, "surveys", "survey file, or the folder holding device<N>.txt"),
        "send_at": (time_of_day, "00:05", "time of day of the daily send"),
        "spread": (non_negative, 600.0, "seconds over which the fleet's daily sends are spread"),
        "chunk_bytes": (whole(300, 65507), 1200, "largest datagram a device sends"),
        "ack_timeout": (positive, 2.0, "first retransmission timeout, seconds (CoAP ACK_TIMEOUT)"),
        "ack_random_factor": (_number, 1.5, "first timeout is ack_timeout times 1..this (CoAP)"),
        "max_retransmit": (whole(0, 20), 4, "retransmissions before giving up (CoAP MAX_RETRANSMIT)"),
        "max_busy_wait": (positive, 300.0, "most seconds one attempt at a day waits on the gateway's retry-after hints"),
    },
    "security": {
        "dir": (path, "var/secrets", "folder of the CA, the TLS certificates and devices/device<N>.key"),
        "generate": (boolean, True, "create the whole set at start if the folder holds none of it (loopback); false in production"),
        "allow_generate_beyond_loopback": (
            boolean, False, "let generate = true stand while the cloud or gateway listens (a device's gateway is) beyond loopback",
        ),
    },
}

DEFAULT_FLEET = {1: "192.168.1.2", 2: "192.168.1.3", 3: "192.168.1.4", 4: "192.168.1.5"}


@attrs.frozen
class Config:
    """
    The checked configuration of the whole suite: one section per role and
    the fleet (device id -> device address) the gateway expects.
    """

    cloud: dict[str, Any]
    gateway: dict[str, Any]
    device: dict[str, Any]
    security: dict[str, Any]
    fleet: dict[int, str]
    source: str


def _check(section: str, key: str, value: Any, where: str) -> Any:
    parser = SCHEMA[section][key][0]
    try:
        return parser(value)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _fleet(raw: Any, where: str) -> dict[int, str]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where} [fleet]: expected a table of device id = \"address\", got {raw!r}")
    fleet: dict[int, str] = {}
    owners: dict[str, int] = {}
    for key, value in raw.items():
        try:
            device_id = whole(1, 2**31 - 1)(key)
            # The text devices send as their ip field (docs/protocol.md).
            address = device_address(text(value))
        except ValueError as e:
            raise ConfigError(f"{where} [fleet] {key}: {e}") from None
        if device_id in fleet:
            raise ConfigError(f"{where} [fleet] {key}: device {device_id} is already listed")
        if address in owners:
            raise ConfigError(f"{where} [fleet] {key}: address {address} already belongs to device {owners[address]}")
        owners[address] = device_id
        fleet[device_id] = address
    return dict(sorted(fleet.items()))


def load(path: Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """
    The configuration from C{path} (or etc/meter.toml if it exists, else the
    embedded defaults), with C{overrides} (section -> key -> raw value, from
    command-line options) winning over the file.

    @raise ConfigError: naming the file and key, or the option.
    """
    if path is None:
        path = DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None
    raw: dict[str, Any] = {}
    source = "embedded defaults"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return from_raw(raw, source, overrides)


def from_raw(raw: dict[str, Any], source: str, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """
    Check C{raw} (a parsed TOML document; C{{}} for the embedded defaults)
    and apply C{overrides}; C{source} names it in error messages.
    """
    for section in raw:
        if section not in SCHEMA and section != "fleet":
            raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join([*SCHEMA, 'fleet'])})")
    sections = {}
    for section, keys in SCHEMA.items():
        given = raw.get(section, {})
        if not isinstance(given, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        for key in given:
            if key not in keys:
                raise ConfigError(f"{source} [{section}] {key}: unknown key (known: {', '.join(keys)})")
        values = {}
        for key, (parser, default, _) in keys.items():
            if key in given:
                values[key] = _check(section, key, given[key], f"{source} [{section}] {key}")
            else:
                values[key] = None if default is None else parser(default)
        for key, value in (overrides or {}).get(section, {}).items():
            if value is not None:
                values[key] = _check(section, key, value, f"--{key.replace('_', '-')}")
        sections[section] = values
    fleet = _fleet(raw["fleet"], source) if "fleet" in raw else dict(DEFAULT_FLEET)
    return Config(sections["cloud"], sections["gateway"], sections["device"], sections["security"], fleet, source)


def _toml_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def render(sections: dict[str, dict[str, Any]], fleet: dict[int, str]) -> str:
    """
    A configuration file holding C{sections} (raw values) and C{fleet}.
    """
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in keys.items())
        lines.append("")
    lines.append("[fleet]")
    lines.extend(f'{device_id} = "{address}"' for device_id, address in fleet.items())
    return "\n".join(lines) + "\n"
