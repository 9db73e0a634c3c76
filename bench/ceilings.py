"""
The ceilings the daemons are measured against: tiny programs doing only the
minimum work of each hop, in plain Python on the same machine.

- L{udp_ack_loop}: receive a datagram, send a short acknowledgement back;
  nothing else (run as a child process: C{python bench/ceilings.py
  udp-ack-loop}).
- L{windowed_send}: the driver of both that loop and the real gateway: keeps
  C{window} datagrams unacknowledged, sends the next one per acknowledgement,
  resends what stays unacknowledged for C{resend_after} seconds; bounded in
  count and time.
- L{executemany_ceiling}: SQLite executemany of reading rows, 10,000 per
  transaction, into a WAL database (synchronous=FULL, as the daemons open
  theirs) with the cloud's schema and primary key.
- L{send_batches}: a TLS client speaking the gateway's side of the cloud hop
  (BATCH lines, BATCHACK answers) with pre-encoded batches, to load the
  cloud alone.

All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Callable, Hashable

#: The raw loop's receive buffer, asked for without forcing (the kernel caps
#: it at net.core.rmem_max).  The drivers keep at most a window of
#: datagrams in flight, so its size does not bound the rates measured.
RECEIVE_BUFFER = 4 << 20


# -- UDP ----------------------------------------------------------------------


def udp_ack_loop(time_limit: float, ready: Callable[[int], None]) -> int:
    """
    Receive datagrams on 127.0.0.1 and answer each with C{b"ACK "} and its
    first 16 bytes, until a datagram C{STOP} or C{time_limit} seconds.  The
    number of datagrams answered.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.5)
    ready(sock.getsockname()[1])
    recvfrom, sendto = sock.recvfrom, sock.sendto
    deadline = time.monotonic() + time_limit
    answered = 0
    while time.monotonic() < deadline:
        for _ in range(1024):
            try:
                data, addr = recvfrom(65536)
            except socket.timeout:
                break
            if data == b"STOP":
                return answered
            sendto(b"ACK " + data[:16], addr)
            answered += 1
    return answered


def twisted_udp_ack_loop(time_limit: float, ready: Callable[[int], None]) -> int:
    """
    The same loop on Twisted's reactor (a DatagramProtocol answering each
    datagram at once), to tell the framework's cost per datagram from the
    gateway's own.
    """
    from twisted.internet import reactor
    from twisted.internet.protocol import DatagramProtocol

    answered = [0]

    class Ack(DatagramProtocol):
        def datagramReceived(self, data, addr):
            if data == b"STOP":
                reactor.stop()
                return
            self.transport.write(b"ACK " + data[:16], addr)
            answered[0] += 1

    port = reactor.listenUDP(0, Ack(), interface="127.0.0.1", maxPacketSize=65536)
    port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    ready(port.getHost().port)
    reactor.callLater(time_limit, reactor.stop)
    reactor.run()
    return answered[0]


def windowed_send(
    target: tuple[str, int],
    datagrams: list[bytes],
    ident: Callable[[bytes], Hashable],
    ack_ident: Callable[[bytes], Hashable | None],
    window: int,
    time_limit: float,
    resend_after: float = 0.5,
) -> dict:
    """
    Send C{datagrams} to C{target} from one socket, at most C{window}
    unacknowledged at a time.  C{ident} names a datagram, C{ack_ident} the
    datagram an answer acknowledges (C{None}: not an acknowledgement).
    Returns counts and the rate of acknowledged datagrams.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, RECEIVE_BUFFER)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(resend_after)
    ids = [ident(d) for d in datagrams]
    outstanding: dict[Hashable, int] = {}
    sendto, recv = sock.sendto, sock.recv
    total = len(datagrams)
    sent = resent = acked = stray = 0
    next_index = 0
    started = time.perf_counter()
    deadline = started + time_limit
    last_ack = started
    while next_index < total and len(outstanding) < window:
        outstanding[ids[next_index]] = next_index
        sendto(datagrams[next_index], target)
        next_index += 1
        sent += 1
    while acked < total and time.perf_counter() < deadline:
        try:
            data = recv(65536)
        except socket.timeout:
            for index in list(outstanding.values()):
                sendto(datagrams[index], target)
                resent += 1
            continue
        key = ack_ident(data)
        if key is None or outstanding.pop(key, None) is None:
            stray += 1
            continue
        acked += 1
        last_ack = time.perf_counter()
        if next_index < total:
            outstanding[ids[next_index]] = next_index
            sendto(datagrams[next_index], target)
            next_index += 1
            sent += 1
    elapsed = last_ack - started
    sock.close()
    return {
        "datagrams": total,
        "acked": acked,
        "sent": sent,
        "resent": resent,
        "stray_answers": stray,
        "window": window,
        "seconds": round(elapsed, 4),
        "datagrams_per_s": round(acked / elapsed, 1) if elapsed > 0 else None,
        "complete": acked == total,
    }


def raw_datagrams(count: int, size: int = 1200) -> list[bytes]:
    return [b"%016d" % i + b"x" * (size - 16) for i in range(count)]


def raw_udp_ceiling(count: int, window: int, time_limit: float = 60.0, size: int = 1200, loop: str = "udp-ack-loop") -> dict:
    """
    The raw loop (or with C{loop="twisted-udp-ack-loop"} its Twisted twin)
    in a child process, driven by L{windowed_send} with C{count} datagrams
    of C{size} bytes.
    """
    import subprocess

    child = subprocess.Popen(
        [sys.executable, __file__, loop, "--time-limit", str(time_limit + 10)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # The child's first line: its port and the CPU it spent starting up.
        port_text, startup_text = child.stdout.readline().split()
        port, startup_cpu = int(port_text), float(startup_text)
        datagrams = raw_datagrams(count, size)
        result = windowed_send(
            ("127.0.0.1", port), datagrams, lambda d: d[:16], lambda a: a[4:20] if a[:4] == b"ACK " else None,
            window, time_limit,
        )
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stop:
            stop.sendto(b"STOP", ("127.0.0.1", port))
        # wait4 gives the child's own CPU time (utime + stime).
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        result["loop_cpu_s"] = round(usage.ru_utime + usage.ru_stime - startup_cpu, 3)
        result["loop_capacity_per_s"] = round(result["acked"] / result["loop_cpu_s"], 1) if result["loop_cpu_s"] else None
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    result["size"] = size
    return result


def day_ident(datagram: bytes) -> tuple[str, int]:
    """
    The transfer id and part of a sealed C{DAY} datagram.
    """
    from meter.wire import peek_day_id

    xfer, part, _ = peek_day_id(datagram)
    return xfer, part


def dayack_ident(answer: bytes) -> tuple[str, int] | None:
    """
    The chunk an C{ok} DAYACK acknowledges (its tag is not checked: this
    driver measures the gateway, and the tags were made with the right keys).
    """
    from meter.wire import peek_ack_id

    seen = peek_ack_id(answer)
    if seen is None or seen[2] != "ok":
        return None
    return seen[:2]


# -- SQLite -------------------------------------------------------------------


def executemany_ceiling(path: Path, rows: list[tuple], batch: int = 10_000, index: bool = True) -> dict:
    """
    Insert C{rows} (device_id, device_ip, taken_at, temperature, humidity,
    stored_at) with executemany, C{batch} rows a transaction, into a fresh
    database at C{path} opened as the daemons open theirs (WAL,
    synchronous=FULL) with the cloud's table.
    """
    from meter import cloud
    from meter.database import connect

    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    connection = connect(path)
    schema = cloud.SCHEMA if index else cloud.SCHEMA.split("CREATE INDEX")[0]
    connection.executescript(schema)
    started = time.perf_counter()
    for start in range(0, len(rows), batch):
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(
            "INSERT INTO readings VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", rows[start:start + batch]
        )
        connection.execute("COMMIT")
    elapsed = time.perf_counter() - started
    (stored,) = connection.execute("SELECT count(*) FROM readings").fetchone()
    connection.close()
    return {
        "rows": len(rows),
        "stored": stored,
        "batch": batch,
        "with_ip_index": index,
        "seconds": round(elapsed, 4),
        "rows_per_s": round(len(rows) / elapsed, 1),
    }


# -- the cloud hop --------------------------------------------------------------

_BATCHACK = re.compile(rb"^meter/1 BATCHACK id=([0-9a-f]{16}) st=(\w+) new=([0-9]+) dup=([0-9]+)")


def tls_client(secrets_dir: Path, port: int) -> ssl.SSLSocket:
    """
    A TLS connection to the cloud on 127.0.0.1 as the gateway makes it: the
    gateway's client certificate, the cloud's verified against the CA,
    Nagle's algorithm off.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(secrets_dir / "ca.crt"))
    context.load_cert_chain(str(secrets_dir / "gateway.crt"), str(secrets_dir / "gateway.key"))
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    # Without Nagle's algorithm, as the gateway's connection (wire.without_nagle).
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return context.wrap_socket(raw, server_hostname="meter-cloud")


def send_batches(connection: socket.socket, lines: list[bytes], in_flight: int, time_limit: float) -> dict:
    """
    Send pre-encoded BATCH lines (each ending in a line feed), at most
    C{in_flight} unacknowledged; wait for every BATCHACK.
    """
    reader = connection.makefile("rb")
    sent = acked = new = dup = refused = 0
    started = time.perf_counter()
    deadline = started + time_limit
    while sent < len(lines) and sent - acked < in_flight:
        connection.sendall(lines[sent])
        sent += 1
    while acked < len(lines) and time.perf_counter() < deadline:
        line = reader.readline()
        if not line:
            break
        match = _BATCHACK.match(line)
        if match is None:
            continue
        acked += 1
        if match.group(2) != b"ok":
            refused += 1
        new += int(match.group(3))
        dup += int(match.group(4))
        if sent < len(lines):
            connection.sendall(lines[sent])
            sent += 1
    elapsed = time.perf_counter() - started
    return {"batches": len(lines), "acked": acked, "refused": refused, "new": new, "dup": dup,
            "in_flight": in_flight, "seconds": round(elapsed, 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="ceiling programs (children of bench/run.py)")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("udp-ack-loop", "twisted-udp-ack-loop"):
        p = commands.add_parser(name)
        p.add_argument("--time-limit", type=float, default=60.0)
    args = parser.parse_args(argv)
    loop = udp_ack_loop if args.command == "udp-ack-loop" else twisted_udp_ack_loop
    loop(args.time_limit, lambda port: print(port, time.process_time(), flush=True))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parent.parent))
    sys.exit(main())
