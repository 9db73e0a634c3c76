"""
The report's network for real: two subnets in Linux network namespaces, with
the real twistd plugins running inside them.

    device hosts 192.168.1.2 ..   LAN bridge   gateway host          cloud host
    (one namespace each)          (namespace)  192.168.1.1 | 10.10.10.1 -- 10.10.10.2

Every host and the LAN's bridge is a namespace of its own, named
C{mlab-<run id>-<role>}; the veth pairs are created directly inside them, so
the root namespace gains no interface.  No namespace has a default route and
the gateway host does not forward, so no packet can leave the lab: a device
reaches the gateway's 192.168.1.1 and nothing else, the cloud is reached
only by the gateway, from 10.10.10.1.

Loss on the LAN is an nftables rule in the bridge's namespace (bridge family,
forward hook) dropping a random share of the UDP frames each way.

L{Lab} builds, runs and tears down one lab; L{down} removes the leftovers of
a run that could not tear down (killed by SIGKILL).  See docs/lab.md.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterator

import attrs

from meter import config
from meter.tools.processes import CONSOLE_LINE, Daemon, DaemonError, Daemons, stamp, twistd
from meter.tools.suite import survey_text

#: Every namespace of a lab is named PREFIX + run id + "-" + role.
PREFIX = "mlab-"
LAN = ipaddress.ip_network("192.168.1.0/24")
GATEWAY_LAN_IP = "192.168.1.1"
GATEWAY_CLOUD_IP = "10.10.10.1"
CLOUD_IP = "10.10.10.2"
CLOUD_PORT = 8001
GATEWAY_PORT = 10005
#: Devices take 192.168.1.2 .. 192.168.1.254.
MAX_DEVICES = 253
#: The gateway's port on the LAN bridge, in the bridge's namespace.
GATEWAY_PORT_NAME = "gw"
#: The repository's survey files (devices 1 to 4 of the report), if there.
REPO_SURVEYS = Path(__file__).resolve().parents[2] / "surveys"
#: How long one `ip` or `nft` command may take.
COMMAND_TIMEOUT = 30.0


class LabError(RuntimeError):
    """
    The lab could not be built, run or torn down; the message says which
    command failed and what it printed.
    """


def command(*args: str, input: str | None = None) -> str:
    """
    Run one namespace command (C{ip ...}, C{nft ...}); its output.

    @raise LabError: naming the command and quoting its error.
    """
    try:
        done = subprocess.run(
            args, input=input, capture_output=True, text=True, check=True, timeout=COMMAND_TIMEOUT
        )
    except FileNotFoundError:
        raise LabError(
            f"{args[0]} not found: the lab needs iproute2 and nftables "
            "(apt-get install -y --no-install-recommends iproute2 nftables)"
        ) from None
    except subprocess.CalledProcessError as e:
        raise LabError(f"`{' '.join(args)}` failed (exit {e.returncode}): {e.stderr.strip() or e.stdout.strip()}") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"`{' '.join(args)}` did not finish within {COMMAND_TIMEOUT:g} s") from None
    return done.stdout


def new_run_id() -> str:
    return os.urandom(3).hex()


def namespaces(prefix: str = PREFIX) -> list[str]:
    """
    The network namespaces whose name starts with C{prefix}.
    """
    if shutil.which("ip") is None:
        return []
    names = [line.split()[0] for line in command("ip", "netns", "list").splitlines() if line.strip()]
    return sorted(name for name in names if name.startswith(prefix))


def remove_namespace(name: str) -> bool:
    """
    Stop every process left in namespace C{name} (they are a lab's daemons),
    then delete it.  False if there was no such namespace.
    """
    if name not in namespaces(name):
        return False
    for signum in (signal.SIGTERM, signal.SIGKILL):
        pids = _pids(name)
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        # An exited process leaves the namespace's list even before it is reaped.
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = _pids(name)
        if not pids:
            break
    command("ip", "netns", "delete", name)
    return True


def _pids(namespace: str) -> list[int]:
    return [int(pid) for pid in command("ip", "netns", "pids", namespace).split()]


def down(run_id: str | None = None) -> list[str]:
    """
    Remove every lab namespace (or those of run C{run_id}), with the
    processes in them: the leftovers of a run killed before its teardown.
    The names removed.
    """
    prefix = PREFIX if run_id is None else f"{PREFIX}{run_id}-"
    removed = []
    for name in namespaces(prefix):
        if remove_namespace(name):
            removed.append(name)
    return removed


def unavailable() -> str | None:
    """
    Why the lab cannot run here, or C{None} if it can.
    """
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, veth pairs, nftables)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"{tool} not found: apt-get install -y --no-install-recommends {package}"
    probe = f"{PREFIX}probe{new_run_id()}"
    try:
        command("ip", "netns", "add", probe)
    except LabError as e:
        return f"cannot create a network namespace: {e}"
    finally:
        try:
            remove_namespace(probe)
        except LabError:
            pass
    return None


@attrs.define
class Result:
    """
    What one lab day showed.
    """

    console: list[str]
    #: readings the devices sent (the console shows each once)
    sent: int
    #: device id -> retransmissions it needed
    retransmissions: dict[int, int]
    #: milliseconds from the first device's send to the cloud's last acknowledgement
    elapsed_ms: float
    #: direction -> (UDP frames seen, dropped) on the LAN; empty without loss
    loss: dict[str, tuple[int, int]]
    #: datagrams the gateway had already taken and acknowledged again
    duplicates: int
    #: rows in the cloud's database
    stored: int


class Lab:
    """
    One run of the lab: C{devices} device hosts, a gateway host, a cloud
    host and the LAN bridge, each a namespace named C{mlab-<run id>-<role>}.

    @param loss: per cent of UDP frames the LAN drops, each way.
    @param workdir: the folder of the configuration, surveys, database,
        spool and logs; a temporary one (removed at teardown) if C{None}.
    """

    def __init__(
        self,
        devices: int = 4,
        loss: int = 0,
        workdir: Path | None = None,
        run_id: str | None = None,
        device_ack_timeout: float = 0.2,
        max_retransmit: int = 10,
        deadline: float = 60.0,
    ):
        if not 1 <= devices <= MAX_DEVICES:
            raise LabError(f"--devices: from 1 to {MAX_DEVICES} (192.168.1.2 .. 192.168.1.254), got {devices}")
        if not 0 <= loss <= 100:
            raise LabError(f"--loss: a share in per cent from 0 to 100, got {loss}")
        self.run_id = run_id or new_run_id()
        self.prefix = f"{PREFIX}{self.run_id}-"
        self.devices = devices
        self.loss = loss
        self.fleet = {i: str(LAN.network_address + i + 1) for i in range(1, devices + 1)}
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix=self.prefix)) if workdir is None else Path(workdir).absolute()
        self.config = self.workdir / "meter.toml"
        self.db = self.workdir / "cloud.sqlite"
        self.surveys = self.workdir / "surveys"
        self._device_ack_timeout = device_ack_timeout
        self._max_retransmit = max_retransmit
        self._deadline = deadline
        self.daemons = Daemons(self.config, cwd=self.workdir)
        self._created: list[str] = []

    # -- names ---------------------------------------------------------------

    @property
    def lan_ns(self) -> str:
        return self.prefix + "lan"

    @property
    def gateway_ns(self) -> str:
        return self.prefix + "gw"

    @property
    def cloud_ns(self) -> str:
        return self.prefix + "cloud"

    def device_ns(self, device_id: int) -> str:
        return f"{self.prefix}d{device_id}"

    def all_ns(self) -> list[str]:
        return [self.lan_ns, self.gateway_ns, self.cloud_ns, *map(self.device_ns, self.fleet)]

    # -- build ---------------------------------------------------------------

    def build(self) -> None:
        """
        Create the namespaces, the bridge, the links and the addresses, check
        that nothing can leave, install the loss rules, and write the
        configuration and surveys.
        """
        root_links = _link_names(None)
        for name in self.all_ns():
            if name in namespaces(name):
                raise LabError(f"namespace {name} exists already: another run with id {self.run_id}?")
            # Recorded before it exists: a teardown after an interrupted
            # `ip netns add` still looks for it.
            self._created.append(name)
            command("ip", "netns", "add", name)
            command("ip", "-n", name, "link", "set", "lo", "up")
            # No forwarding anywhere; no IPv6 (no router solicitations, no
            # duplicate address detection: the links carry the lab's traffic only).
            self._sysctl(
                name,
                ("net.ipv4.ip_forward", "0"),
                ("net.ipv6.conf.all.disable_ipv6", "1"),
                ("net.ipv6.conf.default.disable_ipv6", "1"),
            )

        lan = self.lan_ns
        command("ip", "-n", lan, "link", "add", "br0", "type", "bridge")
        command("ip", "-n", lan, "link", "set", "br0", "up")
        # The gateway: eth0 on the LAN, eth1 facing the cloud.
        self._port(GATEWAY_PORT_NAME, self.gateway_ns, f"{GATEWAY_LAN_IP}/{LAN.prefixlen}")
        command("ip", "-n", self.gateway_ns, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", self.cloud_ns)
        command("ip", "-n", self.gateway_ns, "address", "add", f"{GATEWAY_CLOUD_IP}/24", "dev", "eth1")
        command("ip", "-n", self.gateway_ns, "link", "set", "eth1", "up")
        command("ip", "-n", self.cloud_ns, "address", "add", f"{CLOUD_IP}/24", "dev", "eth0")
        command("ip", "-n", self.cloud_ns, "link", "set", "eth0", "up")
        for device_id, address in self.fleet.items():
            self._port(f"d{device_id}", self.device_ns(device_id), f"{address}/{LAN.prefixlen}")
        if self.loss:
            command(*in_namespace(lan), "nft", "-f", "-", input=self.loss_rules())
        self.check_isolated(root_links)
        self._write_files()

    def _port(self, port: str, namespace: str, address: str) -> None:
        """
        A veth pair from the bridge (C{port}) to C{namespace} (C{eth0} there,
        with C{address}), created in the bridge's namespace with its peer
        placed straight into the host's.
        """
        lan = self.lan_ns
        command("ip", "-n", lan, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        command("ip", "-n", lan, "link", "set", port, "master", "br0", "up")
        command("ip", "-n", namespace, "address", "add", address, "dev", "eth0")
        command("ip", "-n", namespace, "link", "set", "eth0", "up")

    @staticmethod
    def _sysctl(namespace: str, *settings: tuple[str, str]) -> None:
        # /proc/sys/net shows the namespace of the process reading it.  A
        # kernel without IPv6 has no net.ipv6 keys: nothing to turn off.
        script = "; ".join(
            f"if [ -e {path} ] || [ {key.split('.')[1]} != ipv6 ]; then echo {value} > {path}; fi"
            for key, value in settings
            for path in [f"/proc/sys/{key.replace('.', '/')}"]
        )
        command(*in_namespace(namespace), "sh", "-ec", script)

    def loss_rules(self) -> str:
        """
        The nftables ruleset of the LAN bridge: count the UDP frames each way
        and drop C{loss} per cent of them, at random.
        """
        rules = []
        for direction, match in (("to_devices", "=="), ("to_gateway", "!=")):
            rules.append(f'\t\tiifname {match} "{GATEWAY_PORT_NAME}" meta l4proto udp counter comment "{direction} seen"')
            rules.append(
                f'\t\tiifname {match} "{GATEWAY_PORT_NAME}" meta l4proto udp numgen random mod 100 < {self.loss} '
                f'counter drop comment "{direction} dropped"'
            )
        return "table bridge mlab {\n\tchain forward {\n\t\ttype filter hook forward priority 0; policy accept;\n" + "\n".join(rules) + "\n\t}\n}\n"

    def loss_counters(self) -> dict[str, tuple[int, int]]:
        """
        Direction -> (UDP frames seen, dropped) on the LAN so far.
        """
        if not self.loss:
            return {}
        listing = command(*in_namespace(self.lan_ns), "nft", "list", "table", "bridge", "mlab")
        counts: dict[str, dict[str, int]] = {}
        for packets, direction, what in re.findall(r'counter packets (\d+) bytes \d+ .*?comment "(\w+) (seen|dropped)"', listing):
            counts.setdefault(direction, {})[what] = int(packets)
        return {d: (c.get("seen", 0), c.get("dropped", 0)) for d, c in counts.items()}

    def check_isolated(self, root_links: set[str] | None = None) -> None:
        """
        Raise L{LabError} unless: no namespace of the lab has a default route,
        the gateway host does not forward, and (if C{root_links} is given) the
        root namespace has the links it had.
        """
        for name in self.all_ns():
            routes = command("ip", "-n", name, "route", "show", "default").strip()
            if routes:
                raise LabError(f"namespace {name} has a default route: {routes}")
        forwarding = command(*in_namespace(self.gateway_ns), "cat", "/proc/sys/net/ipv4/ip_forward").strip()
        if forwarding != "0":
            raise LabError(f"the gateway host forwards (net.ipv4.ip_forward = {forwarding})")
        if root_links is not None:
            gained = _link_names(None) - root_links
            if gained:
                raise LabError(f"the root namespace gained interfaces: {', '.join(sorted(gained))}")

    def _write_files(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.surveys, ignore_errors=True)
        self.surveys.mkdir()
        for device_id in self.fleet:
            theirs = REPO_SURVEYS / f"device{device_id}.txt"
            ours = self.surveys / f"device{device_id}.txt"
            if theirs.is_file():
                shutil.copyfile(theirs, ours)
            else:
                ours.write_text(survey_text(device_id))
        for stale in (self.db, self.workdir / "gateway-spool.sqlite"):
            for path in (stale, Path(f"{stale}-wal"), Path(f"{stale}-shm")):
                path.unlink(missing_ok=True)
        settings = {
            "cloud": {"listen": f"tcp:{CLOUD_PORT}:interface={CLOUD_IP}", "db": str(self.db)},
            "gateway": {
                "listen": f"{GATEWAY_LAN_IP}:{GATEWAY_PORT}",
                "cloud": f"{CLOUD_IP}:{CLOUD_PORT}",
                "cloud_source": GATEWAY_CLOUD_IP,
                "check_source": True,
                "spool": str(self.workdir / "gateway-spool.sqlite"),
                "deadline": self._deadline,
                "max_backoff": 1.0,
            },
            "device": {
                "gateway": f"{GATEWAY_LAN_IP}:{GATEWAY_PORT}",
                "surveys": str(self.surveys),
                "ack_timeout": self._device_ack_timeout,
                "max_retransmit": self._max_retransmit,
            },
        }
        if "security" in config.SCHEMA:
            # The cloud, started first, creates the CA, the certificates and
            # the device keys here; the others find them.
            # Beyond loopback, but in network namespaces of this host only.
            settings["security"] = {"dir": str(self.workdir / "secrets"), "allow_generate_beyond_loopback": True}
        self.config.write_text(config.render(settings, self.fleet))
        config.load(self.config)  # refuse a bad generated file here, not in four daemons

    # -- run -----------------------------------------------------------------

    def start_cloud(self) -> Daemon:
        return self.daemons.start_cloud(prefix=in_namespace(self.cloud_ns))

    def start_gateway(self) -> Daemon:
        return self.daemons.start_gateway(prefix=in_namespace(self.gateway_ns), connected=True)

    def start_device(self, device_id: int, *args: str, host: int | None = None) -> Daemon:
        """
        Device C{device_id} sending its day once, from the namespace of
        device C{host} (its own by default: another to forge an address).
        """
        host = device_id if host is None else host
        name = f"device {device_id}" if host == device_id else f"device {device_id} on host {host}"
        return self.daemons.start_device(device_id, *args, prefix=in_namespace(self.device_ns(host)), name=name)

    def device_wait(self) -> float:
        """
        The longest a device may try one chunk, plus start-up: how long to
        wait for a device to exit.
        """
        return self._device_ack_timeout * (2 ** (self._max_retransmit + 1) - 1) * 1.5 + 60

    def run(self) -> Result:
        """
        Play one day: the cloud, the gateway, then every device with --once;
        the cloud's console once it acknowledged the last batch.

        @raise DaemonError: a daemon did not do its part.
        """
        cloud = self.start_cloud()
        gateway = self.start_gateway()
        devices = {i: self.start_device(i) for i in self.fleet}
        deadline = time.monotonic() + self.device_wait()
        for device in devices.values():
            status = device.wait(max(1.0, deadline - time.monotonic()))
            if status != 0:
                raise DaemonError(f"{device.name} exited {status}{device.tail()}")
        sent = sum(int(m.group(1)) for d in devices.values() for m in d.all_matching(r"sending (\d+) readings"))
        console = [m.group(0) for m in cloud.collect(CONSOLE_LINE, sent, timeout=self._deadline + 30)]
        # Logged right after the last console line, by the same commit.
        cloud.wait_for(r"acknowledged at ")
        gateway.wait_for(r"round \S+ complete", timeout=30)
        retransmissions = {
            # The last line's count: each counts since the device started.
            i: max([int(m.group(1)) for m in d.all_matching(r"\bretransmissions=(\d+)")], default=0)
            for i, d in devices.items()
        }
        first_send = min(stamp(m.group(1)) for d in devices.values() for m in d.all_matching(r"send started at (\S+)"))
        last_ack = max(stamp(m.group(1)) for m in cloud.all_matching(r"acknowledged at (\S+)"))
        duplicates = len(gateway.all_matching(r"duplicate of device \d+"))
        with closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as connection:
            stored = connection.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
        return Result(
            console, sent, retransmissions, (last_ack - first_send) * 1000, self.loss_counters(), duplicates, stored
        )

    # -- teardown ------------------------------------------------------------

    def teardown(self) -> None:
        """
        Stop the daemons, keep their output in <workdir>/<name>.log (when the
        workdir is kept), and delete every namespace of the run.  Idempotent;
        Ctrl-C and SIGTERM wait until it is done.
        """
        with _signals_held():
            errors = self.daemons.stop()
            if not self._own_workdir and self.workdir.is_dir():
                for daemon in self.daemons:
                    log = self.workdir / (daemon.name.replace(" ", "-") + ".log")
                    log.write_text("\n".join(daemon.lines) + "\n")
            for name in self._created:
                try:
                    remove_namespace(name)
                except LabError as e:
                    errors.append(str(e))
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            left = [name for name in namespaces(self.prefix) if name in self._created]
            if left or errors:
                raise LabError(
                    f"teardown of lab {self.run_id} incomplete: {'; '.join(errors)}"
                    + (f" namespaces left: {', '.join(left)} (meter lab --down {self.run_id})" if left else "")
                )

    def __enter__(self) -> Lab:
        try:
            self.build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()


def in_namespace(namespace: str) -> list[str]:
    """
    The command prefix that runs a command inside network namespace
    C{namespace}.
    """
    return ["ip", "netns", "exec", namespace]


def _link_names(namespace: str | None) -> set[str]:
    args = ("ip", "-o", "link", "show") if namespace is None else ("ip", "-n", namespace, "-o", "link", "show")
    return {line.split(":")[1].strip().split("@")[0] for line in command(*args).splitlines() if ":" in line}


@contextmanager
def _signals_held() -> Iterator[None]:
    """
    Within: SIGINT, SIGTERM and SIGHUP are ignored, so a second Ctrl-C does
    not cut a teardown short.
    """
    try:
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    except ValueError:  # not the main thread, where signals are not handled anyway
        previous = {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def interrupted_by_signals() -> Iterator[None]:
    """
    Within: SIGINT (Ctrl-C), SIGTERM and SIGHUP raise KeyboardInterrupt, so
    the caller's finally tears the lab down whichever ends it.  SIGINT too:
    a shell starts a background job with it ignored.
    """

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# -- `meter lab` -------------------------------------------------------------

LAB_DIR = Path("var/lab")


def look_inside(lab: Lab) -> list[str]:
    """
    Commands to look inside a running lab.
    """
    gw, cloud, lan, d1 = lab.gateway_ns, lab.cloud_ns, lab.lan_ns, lab.device_ns(1)
    lines = [
        f"ip netns list | grep {lab.prefix}",
        f"ip -n {gw} -brief address            # the gateway host: eth0 192.168.1.1, eth1 10.10.10.1",
        f"ip netns exec {gw} ss -uanp          # the gateway's UDP socket on 192.168.1.1:{GATEWAY_PORT}",
        f"ip netns exec {gw} ss -tnp           # its TCP connection from 10.10.10.1 to the cloud",
        f"ip netns exec {cloud} ss -tlnp       # the cloud listening on {CLOUD_IP}:{CLOUD_PORT}",
        f"ip -n {lan} link show master br0     # the LAN bridge's ports",
        f"ip netns exec {d1} {shlex.join(twistd('meter-device', '--config', str(lab.config), '--id', '1', '--once'))}"
        "   # device 1 sends its day again: the cloud has its readings already",
    ]
    if lab.loss:
        lines.append(f"ip netns exec {lan} nft list ruleset   # the loss rules and their counters")
    return lines


def main(args) -> int:
    """
    `meter lab`: build the lab, play one day, print the cloud's console,
    tear down (also on failure, Ctrl-C, SIGTERM and SIGHUP).
    """
    if args.down is not None:
        try:
            removed = down(args.down or None)
        except LabError as e:
            print(f"meter lab --down: {e}", file=sys.stderr)
            return 1
        print(f"removed {len(removed)} namespaces{': ' + ', '.join(removed) if removed else ''}")
        return 0
    reason = unavailable()
    if reason is not None:
        print(f"meter lab: {reason}", file=sys.stderr)
        return 2
    leftovers = namespaces()
    if leftovers:
        print(
            f"meter lab: note: {len(leftovers)} namespaces of other runs exist ({', '.join(leftovers[:4])}"
            f"{', ...' if len(leftovers) > 4 else ''}); `meter lab --down` removes them",
            file=sys.stderr,
        )
    workdir = Path(args.dir)
    try:
        shutil.rmtree(workdir, ignore_errors=True)
        lab = Lab(args.devices, args.loss, workdir=workdir)
    except LabError as e:
        print(f"meter lab: {e}", file=sys.stderr)
        return 2
    status = 0
    keeping = False
    with interrupted_by_signals():
        try:
            print(
                f"lab {lab.run_id}: {lab.devices} devices on {LAN} (192.168.1.2 .. {lab.fleet[lab.devices]}), "
                f"gateway {GATEWAY_LAN_IP} | {GATEWAY_CLOUD_IP}, cloud {CLOUD_IP}; "
                f"{f'{lab.loss}% of UDP frames dropped each way on the LAN' if lab.loss else 'no loss'}",
                flush=True,
            )
            lab.build()
            print(
                f"namespaces {lab.prefix}{{lan,gw,cloud,d1..d{lab.devices}}}; no default route, no forwarding; "
                f"files in {workdir}",
                flush=True,
            )
            result = lab.run()
            print("The cloud's console:")
            for line in result.console:
                print(f"  {line}")
            addresses = {m.group(1) for m in map(CONSOLE_LINE.match, result.console)}
            print(
                f"\n{len(result.console)} readings from {len(addresses)} devices; "
                f"{sum(result.retransmissions.values())} retransmissions; "
                f"first device send to the cloud's last acknowledgement: {result.elapsed_ms:.1f} ms"
            )
            for direction, (seen, dropped) in sorted(result.loss.items()):
                print(f"LAN {direction.replace('_', ' ')}: {dropped} of {seen} UDP frames dropped")
            print(
                f"The gateway acknowledged {result.duplicates} duplicate datagrams again; "
                f"the cloud's database holds {result.stored} readings"
            )
            print(f"Stored in {lab.db}: meter readings --db {lab.db}; daemons' logs in {workdir}/*.log")
            missing = set(lab.fleet.values()) - addresses
            if missing or not len(result.console) == result.sent == result.stored:
                print(
                    f"meter lab: the devices sent {result.sent} readings, the console shows {len(result.console)}, "
                    f"the database holds {result.stored}"
                    + (f"; none of {', '.join(sorted(missing))}" if missing else ""),
                    file=sys.stderr,
                )
                status = 1
            if args.keep:
                print(f"\nThe lab stays up for {args.keep:g} s (Ctrl-C ends it sooner). Look inside:")
                for line in look_inside(lab):
                    print(f"  {line}")
                sys.stdout.flush()
                keeping = True
                time.sleep(args.keep)
        except KeyboardInterrupt as e:
            if keeping:
                print(f"\n{e or 'SIGINT'}: tearing down", flush=True)
            else:
                print(f"\nmeter lab: interrupted ({e or 'SIGINT'}): tearing down", file=sys.stderr)
                status = 130
        except (LabError, DaemonError) as e:
            print(f"meter lab: {e}", file=sys.stderr)
            status = 1
        finally:
            try:
                lab.teardown()
                print(f"lab {lab.run_id} torn down: no namespace of it left", flush=True)
            except LabError as e:
                print(f"meter lab: {e}", file=sys.stderr)
                status = status or 1
    return status
