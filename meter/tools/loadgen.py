"""
meter loadgen: a fleet of simulated devices in one process, for measuring a
gateway (see bench/ and docs/performance.md).

Each simulated device is the real device code, wired as meter-device wires
it: a L{meter.device.DeviceProtocol} holding the device's own key from
C{[security] dir} (it seals every datagram and verifies every
acknowledgement), and a L{meter.device.DaySender} sending the day in
confirmable chunks with CoAP retransmission.  Each device has its own UDP
socket; when the file-descriptor limit is too low for that (or with
C{--sockets K}), devices share a pool of K sockets and acknowledgements are
routed to their device by transfer id.

The day each device sends is synthetic but plausible (L{synthetic_day}): a
diurnal soil temperature curve and a humidity curve that falls as the soil
warms, with smooth noise and now and then an irrigation, all drawn from a
generator seeded by C{--seed} and the device id, so the same command sends
the same readings.  C{--surveys} sends survey files instead (the report's
day).

The devices start evenly over C{--spread} seconds.  The run records, per
chunk, the time from its first transmission to its C{ok} acknowledgement:
until the kernel received the acknowledgement (C{SO_TIMESTAMPNS}, on
Linux), which is what a device of its own would see, and, beside it, until
this process, busy with all the others, handled it.  It counts datagrams,
retransmissions, busy answers and failures; it stops
when every device is done or at C{--timeout}, prints a summary (and writes
it as JSON with C{--json}), and exits 0 only if every device delivered.

A device whose day is not delivered (its sender gave up) sends it again,
with a fresh transfer, after C{--retry-after} seconds, as meter-device does
when it is not run with --once, at most C{--attempts} times in all.  The
fault tests drive their fleets so, through a lossy relay (C{--loss},
C{--dup}, C{--delay}: L{LossyRelay}) between the devices and the gateway.

Traffic goes only to the configured gateway (C{[device] gateway}, or
C{--gateway}), which must be a loopback address unless C{--non-loopback} is
given.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import ipaddress
import json
import math
import random
import resource
import socket
import struct
import sys
import time
from collections import Counter
from pathlib import Path

from twisted.internet.protocol import DatagramProtocol

from meter import config, device, secrets, wire
from meter.device.survey import load_survey, survey_path
from meter.reading import HUMIDITY_RANGE, TEMPERATURE_RANGE, Reading

#: File descriptors kept free for the reactor, logs and the JSON file.
SPARE_FDS = 64

#: Linux's socket option and control message for a datagram's kernel
#: receive time (struct timespec); the socket module does not name them.
SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@ll")


# -- the synthetic day --------------------------------------------------------


def synthetic_day(
    device_id: int, device_ip: str, day: datetime.date, readings: int = 96, seed: int = 1
) -> tuple[Reading, ...]:
    """
    C{readings} readings of C{day} (evenly spaced minutes from 00:00: 96 is
    every 15 minutes, 1,440 every minute) for one device.

    Soil temperature follows a daily cosine peaking in mid-afternoon around a
    device-specific mean; humidity falls as the soil warms and jumps after an
    irrigation on some days; both carry smooth (autocorrelated) noise.
    Values are rounded to 0.1 and clipped to the sensor's ranges.  The same
    C{device_id} and C{seed} always give the same day.
    """
    if not 1 <= readings <= wire.MAX_READINGS:
        raise ValueError(f"readings {readings}: expected 1 to {wire.MAX_READINGS}")
    rng = random.Random(f"meter-loadgen/{seed}/{device_id}")
    mean = rng.uniform(6.0, 24.0)
    amplitude = rng.uniform(1.5, 6.0)
    warmest = rng.uniform(14.0, 17.0)
    moisture = rng.uniform(18.0, 48.0)
    drying = rng.uniform(0.4, 1.2)
    irrigation_at = rng.uniform(4.0, 20.0) if rng.random() < 0.35 else None
    irrigation = rng.uniform(5.0, 20.0)
    step = wire.MAX_READINGS / readings
    # AR(1) noise whose correlation time is an hour whatever the sampling.
    rho = math.exp(-step / 60.0)
    spread = math.sqrt(1.0 - rho * rho)
    noise_t = rng.gauss(0.0, 0.3)
    noise_h = rng.gauss(0.0, 0.6)
    out = []
    for i in range(readings):
        minute = i * wire.MAX_READINGS // readings
        hours = minute / 60.0
        noise_t = rho * noise_t + spread * rng.gauss(0.0, 0.3)
        noise_h = rho * noise_h + spread * rng.gauss(0.0, 0.6)
        temperature = mean + amplitude * math.cos(2 * math.pi * (hours - warmest) / 24.0) + noise_t
        humidity = moisture - drying * (temperature - mean) + noise_h
        if irrigation_at is not None and hours >= irrigation_at:
            humidity += irrigation * math.exp(-(hours - irrigation_at) / 3.0)
        temperature = round(min(max(temperature, TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1]), 1) + 0.0
        humidity = round(min(max(humidity, HUMIDITY_RANGE[0]), HUMIDITY_RANGE[1]), 1) + 0.0
        taken_at = datetime.datetime(day.year, day.month, day.day, minute // 60, minute % 60)
        out.append(Reading(device_id, device_ip, taken_at, temperature, humidity))
    return tuple(out)


# -- one simulated device -----------------------------------------------------


class SimDevice:
    """
    One device of the fleet: its protocol (socket, key), its day, and the
    timing of each of its chunks.

    The day comes already cut into chunk record texts (L{wire.day_chunk_records}):
    formatting thousands of days while sending would take the CPU the
    gateway under test needs, so it is done before the clock starts.
    """

    def __init__(self, run: LoadRun, device_id: int, address: str, key: bytes, chunk_records: list[str]):
        self.run = run
        self.id = device_id
        self.address = address
        self.chunk_records = chunk_records
        #: How many readings the day holds, for the summary.
        self.reading_count = sum(map(wire.record_count, chunk_records))
        self.protocol = device.DeviceProtocol(run.target, key, run.metrics)
        self.sender: device.DaySender | None = None
        self.xfer = ""
        self.chunk_readings: dict[int, int] = {}
        self.first_sent: dict[int, float] = {}
        self.acked: set[int] = set()
        self.datagrams = 0
        self.outcome: str | None = None
        self.reason = ""
        self.started_at = 0.0
        self.attempts = 0

    def start(self) -> None:
        run = self.run
        now = time.time()
        self.attempts += 1
        if self.attempts == 1:
            self.started_at = now
            run.started += 1
        else:
            run.on_stop(self)
            # A new transfer, as a device's next attempt is: its chunks are
            # timed afresh, but a chunk acknowledged in an attempt before
            # counts once (its readings are the same).
            self.first_sent = {}
        self.xfer = device_xfer(run.seed, self.id, f"{run.attempt_salt}/{self.attempts}")
        chunks = wire.day_chunks(self.id, self.address, run.day, self.chunk_records, self.xfer, int(now))
        self.chunk_readings = {chunk.part: chunk.count for chunk in chunks}
        run.chunks += len(chunks)
        run.on_start(self)
        sender = device.DaySender(
            chunks,
            self._send,
            run.reactor,
            run.retransmission,
            random.Random(run.seed * 1000003 + self.id),
            run.window,
            run.metrics,
        )
        self.sender = sender
        self.protocol.sender = _AckTap(self, sender)
        sender.start().addCallbacks(self._delivered, self._not_delivered)

    def _send(self, datagram: bytes) -> None:
        seen = wire.peek_day_id(datagram)
        part = seen[1] if seen is not None else 0
        if part not in self.first_sent:
            now = self.first_sent[part] = time.time()
            self.run.first_sends += 1
            if self.run.first_send is None:
                self.run.first_send = now
        elif not self.run.retransmitting:
            self.run.first_retransmission(self)
        self.datagrams += 1
        self.run.datagrams += 1
        self.protocol.send(datagram)

    def acknowledged(self, ack: wire.DayAck) -> None:
        if ack.status != "ok" or ack.xfer != self.xfer or ack.part in self.acked:
            return
        sent = self.first_sent.get(ack.part)
        if sent is None:
            return
        self.acked.add(ack.part)
        run = self.run
        handled = time.time()
        run.handled_latencies.append(handled - sent)
        # When the kernel took the acknowledgement in: what a device of its
        # own would see, not the time this process, busy with thousands of
        # devices, took to get to it.
        run.latencies.append((run.arrived_at or handled) - sent)
        run.chunks_acked += 1
        run.readings_acked += self.chunk_readings.get(ack.part, 0)
        run.last_ack = handled

    def _delivered(self, chunks: int) -> None:
        self.outcome = "delivered"
        self.run.finished(self)

    def _not_delivered(self, failure) -> None:
        failure.trap(device.DeliveryFailed)
        run = self.run
        run.gave_up += 1
        if self.attempts < run.attempts:
            run.reactor.callLater(run.retry_after, self.start)
            return
        self.outcome = "failed"
        self.reason = failure.getErrorMessage()
        run.finished(self)


class _AckTap:
    """
    Stands in for the device's L{device.DaySender} on its protocol: notes
    the acknowledgement's time, then hands it on.
    """

    def __init__(self, sim: SimDevice, sender: device.DaySender):
        self._sim = sim
        self._sender = sender

    def ack_received(self, ack: wire.DayAck) -> None:
        self._sim.acknowledged(ack)
        self._sender.ack_received(ack)


def device_xfer(seed: int, device_id: int, salt: str) -> str:
    """
    A transfer id for one device's run: fresh for every run (C{salt}), as
    a real device's is for every day it sends.
    """
    return random.Random(f"xfer/{salt}/{seed}/{device_id}").getrandbits(64).to_bytes(8, "big").hex()


def _stamped_port_class():
    """
    A Twisted UDP port that notes, for each datagram it reads, the time the
    kernel received it (C{SO_TIMESTAMPNS}), in C{run.arrived_at} while the
    datagram is handled.
    """
    import errno

    from twisted.internet import udp
    from twisted.python import log

    again = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ECONNREFUSED}

    class StampedPort(udp.Port):
        def __init__(self, run: "LoadRun", port: int, protocol, interface: str, maxPacketSize: int, reactor):
            super().__init__(port, protocol, interface, maxPacketSize, reactor)
            self._run = run
            self._ancillary = socket.CMSG_SPACE(_TIMESPEC.size)

        def createInternetSocket(self):
            sock = super().createInternetSocket()
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            return sock

        def doRead(self):
            # udp.Port.doRead, with recvmsg for the timestamp.
            read = 0
            while read < self.maxThroughput:
                try:
                    data, ancillary, _, addr = self.socket.recvmsg(self.maxPacketSize, self._ancillary)
                except OSError as e:
                    if e.args[0] in again:
                        return
                    raise
                read += len(data)
                for level, kind, value in ancillary:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= _TIMESPEC.size:
                        seconds, nanoseconds = _TIMESPEC.unpack_from(value)
                        self._run.arrived_at = seconds + nanoseconds / 1e9
                try:
                    self.protocol.datagramReceived(data, addr[:2])
                except BaseException:
                    log.err()
                finally:
                    self._run.arrived_at = None

    return StampedPort


def _pool_protocol():
    from twisted.internet.protocol import DatagramProtocol

    class PoolProtocol(DatagramProtocol):
        """
        A socket shared by many devices: each acknowledgement goes to the
        device whose transfer it names, which verifies it with its key.
        """

        def __init__(self, by_xfer: dict[str, SimDevice]):
            self._by_xfer = by_xfer

        def datagramReceived(self, data: bytes, addr):
            seen = wire.peek_ack_id(data)
            sim = self._by_xfer.get(seen[0]) if seen is not None else None
            if sim is not None:
                sim.protocol.datagramReceived(data, addr)

    return PoolProtocol


# -- the lossy relay ----------------------------------------------------------


class LossyRelay(DatagramProtocol):
    """
    A relay between the devices and the gateway on 127.0.0.1 that drops
    each datagram with probability C{loss} in each direction, sends a second
    copy with probability C{dup}, and delays every copy by a random time up
    to C{delay} seconds, which reorders them; its choices come from C{rng}.

    Devices send to its port; each device gets its own upstream socket
    towards the gateway, so the gateway's answers come back to it and are
    passed on to the device from this port.
    """

    def __init__(self, reactor, gateway: tuple[str, int], loss: float, dup: float, delay: float, rng: random.Random):
        self._reactor = reactor
        self._gateway = gateway
        self._loss = loss
        self._dup = dup
        self._delay = delay
        self._rng = rng
        self._upstreams: dict[tuple[str, int], _Upstream] = {}
        self.counters: Counter[str] = Counter()

    def startProtocol(self):
        # The whole fleet's first datagrams arrive at once: let the kernel
        # queue them (up to net.core.rmem_max), so the relay's drops are
        # the seeded ones rather than a full socket buffer's.
        self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)

    def datagramReceived(self, data: bytes, addr):
        upstream = self._upstreams.get(addr)
        if upstream is None:
            upstream = self._upstreams[addr] = _Upstream(self, addr)
            self._reactor.listenUDP(0, upstream, interface="127.0.0.1", maxPacketSize=wire.MAX_DATAGRAM)
        self.forward("up", data, upstream.transport, self._gateway)

    def forward(self, direction: str, data: bytes, transport, to) -> None:
        self.counters[f"{direction}_received"] += 1
        if self._rng.random() < self._loss:
            self.counters[f"{direction}_dropped"] += 1
            return
        copies = 1
        if self._rng.random() < self._dup:
            self.counters[f"{direction}_duplicated"] += 1
            copies = 2
        for _ in range(copies):
            self._reactor.callLater(self._rng.uniform(0, self._delay), self._write, direction, transport, data, to)

    def _write(self, direction: str, transport, data: bytes, to) -> None:
        if transport is not None:
            self.counters[f"{direction}_sent"] += 1
            transport.write(data, to)


class _Upstream(DatagramProtocol):
    def __init__(self, relay: LossyRelay, device_addr):
        self._relay = relay
        self._device = device_addr

    def datagramReceived(self, data: bytes, addr):
        self._relay.forward("down", data, self._relay.transport, self._device)


# -- the run ------------------------------------------------------------------


class LoadRun:
    def __init__(self, args: argparse.Namespace, settings: config.Config, reactor):
        self.reactor = reactor
        self.args = args
        self.seed = args.seed
        self.attempt_salt = f"{time.time_ns()}"
        self.day = args.day or device.previous_day(time.time())
        self.gateway = args.gateway or settings.device["gateway"]
        #: Where the devices send: the gateway, or the relay in front of it.
        self.target = self.gateway
        self.relay: LossyRelay | None = None
        self.attempts = args.attempts
        self.retry_after = args.retry_after
        self.chunk_bytes = args.chunk_bytes or settings.device["chunk_bytes"]
        self.window = args.window
        self.retransmission = device.Retransmission(
            args.ack_timeout if args.ack_timeout is not None else settings.device["ack_timeout"],
            settings.device["ack_random_factor"],
            args.max_retransmit if args.max_retransmit is not None else settings.device["max_retransmit"],
        )
        #: What every simulated device counts, together.
        self.metrics = device.DeviceMetrics()
        self.devices: list[SimDevice] = []
        self.by_xfer: dict[str, SimDevice] = {}
        self.pooled = False
        self.sockets = 0
        #: Per chunk, first send to the kernel's receipt of its ok.
        self.latencies: list[float] = []
        #: The same, to when this process handled the ok.
        self.handled_latencies: list[float] = []
        #: The kernel receive time of the datagram being handled, if known.
        self.arrived_at: float | None = None
        self.first_send: float | None = None
        self.last_ack: float | None = None
        self.started = 0
        self.chunks = 0
        self.chunks_acked = 0
        self.readings_acked = 0
        self.datagrams = 0
        self.first_sends = 0
        self.delivered = 0
        self.failed = 0
        #: Senders that gave up, the last attempt's or not.
        self.gave_up = 0
        self.retransmitting = False
        self.timed_out = False
        self.prepare_s = 0.0
        self.run_started = 0.0
        self._progress = None
        self._limit = None

    # -- preparation

    def prepare(self, settings: config.Config, ids: list[int]) -> None:
        began = time.monotonic()
        keys = load_keys(settings, ids)
        args = self.args
        if args.loss or args.dup or args.delay:
            self.relay = LossyRelay(self.reactor, self.gateway, args.loss, args.dup, args.delay, random.Random(self.seed))
            port = self.reactor.listenUDP(0, self.relay, interface="127.0.0.1", maxPacketSize=wire.MAX_DATAGRAM)
            self.target = ("127.0.0.1", port.getHost().port)
        for device_id in ids:
            address = settings.fleet[device_id]
            if self.args.surveys is not None:
                readings = load_survey(survey_path(self.args.surveys, device_id), device_id, address, self.day)
            else:
                readings = synthetic_day(device_id, address, self.day, self.args.readings, self.seed)
            records = wire.day_chunk_records(device_id, address, self.day, readings, self.chunk_bytes)
            self.devices.append(SimDevice(self, device_id, address, keys[device_id], records))
        self._open_sockets()
        self.prepare_s = time.monotonic() - began

    def _open_sockets(self) -> None:
        host = self.gateway[0]
        interface = host if ipaddress.ip_address(host).is_loopback else ("::" if ":" in host else "0.0.0.0")
        wanted = self.args.sockets
        limit = raise_fd_limit()
        if not wanted and len(self.devices) + SPARE_FDS > limit:
            wanted = max(1, min(256, limit - SPARE_FDS))
        if wanted:
            self.pooled = True
            protocol_class = _pool_protocol()
            ports = [
                self._listen(protocol_class(self.by_xfer), interface) for _ in range(min(wanted, len(self.devices)))
            ]
            for index, sim in enumerate(self.devices):
                sim.protocol.transport = ports[index % len(ports)]
            self.sockets = len(ports)
        else:
            for sim in self.devices:
                self._listen(sim.protocol, interface)
            self.sockets = len(self.devices)

    def _listen(self, protocol, interface: str):
        if sys.platform != "linux" or not hasattr(self.reactor, "addReader"):
            # No kernel timestamps: latencies end when this process reads
            # the acknowledgement.
            return self.reactor.listenUDP(0, protocol, interface=interface, maxPacketSize=wire.MAX_DATAGRAM)
        port = _stamped_port_class()(self, 0, protocol, interface, wire.MAX_DATAGRAM, self.reactor)
        port.startListening()
        return port

    # -- running

    def start(self) -> None:
        self.run_started = time.monotonic()
        count = len(self.devices)
        spread = self.args.spread
        for index, sim in enumerate(self.devices):
            self.reactor.callLater(spread * index / count if spread > 0 else 0, sim.start)
        self._limit = self.reactor.callLater(self.args.timeout, self._time_limit)
        if self.args.progress:
            from twisted.internet.task import LoopingCall

            self._progress = LoopingCall(self.show_progress)
            self._progress.clock = self.reactor
            self._progress.start(0.25, now=False)

    def on_start(self, sim: SimDevice) -> None:
        if self.pooled:
            self.by_xfer[sim.xfer] = sim

    def on_stop(self, sim: SimDevice) -> None:
        if self.pooled:
            self.by_xfer.pop(sim.xfer, None)

    def first_retransmission(self, sim: SimDevice) -> None:
        # A line to wait on for the tests of a gateway that is not there.
        self.retransmitting = True
        print(f"loadgen: retransmitting (device {sim.id} first)", flush=True)

    def finished(self, sim: SimDevice) -> None:
        if sim.outcome == "delivered":
            self.delivered += 1
        else:
            self.failed += 1
        self.on_stop(sim)
        if self.delivered + self.failed == len(self.devices):
            self._stop()

    def _time_limit(self) -> None:
        self.timed_out = True
        self._stop()

    def _stop(self) -> None:
        if self._limit is not None and self._limit.active():
            self._limit.cancel()
        if self._progress is not None and self._progress.running:
            self._progress.stop()
            self.show_progress()
            sys.stderr.write("\n")
        for sim in self.devices:
            if sim.sender is not None and not sim.sender.done.called:
                sim.sender.done.addErrback(lambda _: None)
        if self.reactor.running:
            self.reactor.stop()

    def show_progress(self) -> None:
        count = len(self.devices)
        done = self.delivered + self.failed
        width = 30
        filled = int(width * done / count) if count else width
        elapsed = time.time() - self.first_send if self.first_send else 0.0
        rate = self.readings_acked / elapsed if elapsed > 0 else 0.0
        sys.stderr.write(
            f"\r[{'#' * filled}{'-' * (width - filled)}] {self.delivered}/{count} devices delivered"
            f"  {rate:,.0f} readings/s  {self.datagrams:,} datagrams  {self.datagrams - self.first_sends:,} retransmitted"
            f"  {self.failed} failed "
        )
        sys.stderr.flush()

    # -- the outcome

    def summary(self) -> dict:
        latencies = sorted(self.latencies)
        duration = (self.last_ack - self.first_send) if self.first_send and self.last_ack else 0.0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        failed = [sim for sim in self.devices if sim.outcome == "failed"]
        incomplete = [sim for sim in self.devices if sim.outcome is None]
        readings_sent = sum(sim.reading_count for sim in self.devices if sim.sender is not None)
        return {
            "devices": len(self.devices),
            "first_id": self.devices[0].id if self.devices else None,
            "day": self.day.isoformat(),
            "readings_per_device": self.args.readings if self.args.surveys is None else None,
            "surveys": str(self.args.surveys) if self.args.surveys is not None else None,
            "seed": self.seed,
            "spread_s": self.args.spread,
            "window": self.window,
            "chunk_bytes": self.chunk_bytes,
            "gateway": f"{self.gateway[0]}:{self.gateway[1]}",
            "sockets": self.sockets,
            "pooled_sockets": self.pooled,
            "started": self.started,
            "delivered": self.delivered,
            "failed": len(failed),
            "incomplete": len(incomplete),
            "failed_devices": [{"id": sim.id, "reason": sim.reason} for sim in failed[:50]],
            "incomplete_devices": [sim.id for sim in incomplete[:50]],
            "timed_out": self.timed_out,
            "readings_sent": readings_sent,
            "readings_acked": self.readings_acked,
            "chunks": self.chunks,
            "chunks_acked": self.chunks_acked,
            "datagrams_sent": self.datagrams,
            "retransmissions": self.metrics.retransmissions,
            "busy_answers": self.metrics.busy_answers,
            "stray_acks": self.metrics.stray_acks,
            "attempts": sum(sim.attempts for sim in self.devices),
            "gave_up": self.gave_up,
            "relay": dict(sorted(self.relay.counters.items())) if self.relay is not None else None,
            "first_send": self.first_send,
            "last_ack": self.last_ack,
            "duration_s": round(duration, 6),
            "readings_per_s": round(self.readings_acked / duration, 1) if duration > 0 else None,
            "chunks_per_s": round(self.chunks_acked / duration, 1) if duration > 0 else None,
            "ack_latency_ms": latency_summary(latencies),
            "ack_latency_handled_ms": latency_summary(sorted(self.handled_latencies)),
            "prepare_s": round(self.prepare_s, 3),
            "loadgen_cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "loadgen_max_rss_mb": round(usage.ru_maxrss / 1024, 1),
        }


def latency_summary(sorted_seconds: list[float]) -> dict:
    """
    Percentiles (nearest rank) of sorted latencies in seconds, in ms.
    """
    if not sorted_seconds:
        return {"count": 0}

    def rank(p: float) -> float:
        index = max(0, min(len(sorted_seconds) - 1, math.ceil(p / 100 * len(sorted_seconds)) - 1))
        return round(sorted_seconds[index] * 1000, 3)

    return {
        "count": len(sorted_seconds),
        "p50": rank(50),
        "p90": rank(90),
        "p99": rank(99),
        "max": round(sorted_seconds[-1] * 1000, 3),
        "mean": round(sum(sorted_seconds) / len(sorted_seconds) * 1000, 3),
    }


@contextlib.contextmanager
def collector_paused():
    """
    No automatic garbage collection inside the block.

    Why: a full collection of this process's thousands of devices stops
    every device for its length (docs/performance.md, on the method); those
    due meanwhile then all send at once when it ends, and the gateway's
    queue for that burst, not the even load asked for, makes the tail of
    the measured latencies.  The run is bounded in devices and time, so its
    cyclic garbage is too: it is collected once, after.
    """
    was_enabled = gc.isenabled()
    gc.collect()
    # What exists now (the prepared days, sockets, keys) lives to the end:
    # no collection needs to look at it again.
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()


def raise_fd_limit() -> int:
    """
    Raise this process's soft limit of open files to the hard limit; the
    limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def load_keys(settings: config.Config, ids: list[int]) -> dict[int, bytes]:
    """
    Each device's HMAC key, as meter-device reads it (the fleet's keys are
    created first when [security] generate is set and the folder holds no
    secrets, as the daemons do).
    """
    folder = settings.security["dir"]
    if settings.security["generate"]:
        for path in secrets.generate(folder, settings.fleet):
            print(f"meter loadgen: created secret {path}", file=sys.stderr)
    return secrets.read_fleet_keys(folder, ids)


def format_summary(s: dict) -> str:
    latency = s["ack_latency_ms"]
    lines = [
        f"loadgen: {s['devices']} devices (ids {s['first_id']}..), {s['readings_per_device'] or 'survey'} readings each, "
        f"day {s['day']}, spread {s['spread_s']:g} s, window {s['window']}, {s['sockets']} sockets"
        f"{' (pooled)' if s['pooled_sockets'] else ''} -> {s['gateway']}",
        f"  delivered {s['delivered']}, failed {s['failed']}, incomplete {s['incomplete']}"
        f"{' (timed out)' if s['timed_out'] else ''}",
        f"  readings acknowledged {s['readings_acked']:,} of {s['readings_sent']:,}; chunks {s['chunks_acked']:,} of "
        f"{s['chunks']:,}; datagrams sent {s['datagrams_sent']:,}; retransmissions {s['retransmissions']:,}; "
        f"busy answers {s['busy_answers']:,}",
        f"  first send to last acknowledgement {s['duration_s'] * 1000:,.1f} ms: "
        f"{s['readings_per_s'] or 0:,.0f} readings/s, {s['chunks_per_s'] or 0:,.0f} chunks/s",
    ]
    if latency.get("count"):
        lines.append(
            f"  chunk ack latency (first send -> ok at the device's socket): p50 {latency['p50']:.2f} ms, "
            f"p90 {latency['p90']:.2f} ms, p99 {latency['p99']:.2f} ms, max {latency['max']:.2f} ms over "
            f"{latency['count']:,} chunks"
        )
        handled = s["ack_latency_handled_ms"]
        lines.append(
            f"  (to when loadgen handled the ok: p50 {handled['p50']:.2f} ms, p99 {handled['p99']:.2f} ms)"
        )
    lines.append(f"  loadgen: prepared in {s['prepare_s']:.2f} s, {s['loadgen_cpu_s']:.2f} CPU s, "
                 f"peak RSS {s['loadgen_max_rss_mb']:.0f} MB")
    for failed in s["failed_devices"][:5]:
        lines.append(f"  device {failed['id']} failed: {failed['reason']}")
    if s["incomplete_devices"]:
        lines.append(f"  incomplete at the time limit: {', '.join(map(str, s['incomplete_devices'][:20]))}"
                     f"{' ...' if s['incomplete'] > 20 else ''}")
    return "\n".join(lines)


# -- command line -------------------------------------------------------------


def _host_port(text: str) -> tuple[str, int]:
    try:
        return config.host_port(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _day(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, got {text!r}") from None


def _readings(text: str) -> int:
    value = int(text)
    if not 1 <= value <= wire.MAX_READINGS:
        raise argparse.ArgumentTypeError(f"expected 1 to {wire.MAX_READINGS} readings, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="configuration file: [fleet], [security] dir, [device] (default: etc/meter.toml)")
    p.add_argument("--devices", type=int, required=True, metavar="N", help="how many devices to simulate")
    p.add_argument("--first-id", type=int, default=None, metavar="K",
                   help="first device id (default: the fleet's first); devices K..K+N-1 must be in [fleet]")
    p.add_argument("--readings", type=_readings, default=96, metavar="R",
                   help="readings per device-day, evenly spaced (96: every 15 min, default; 1440: every minute)")
    p.add_argument("--surveys", type=Path, help="send these survey files (a file, or a folder of device<N>.txt) "
                   "instead of synthetic days")
    p.add_argument("--day", type=_day, help="the day sent (default: yesterday, as a device sends)")
    p.add_argument("--seed", type=int, default=1, help="seed of the synthetic days and the retransmission timers")
    p.add_argument("--spread", type=float, default=10.0, metavar="SECONDS",
                   help="start the devices evenly over this many seconds (default 10; 0: all at once)")
    p.add_argument("--window", type=int, default=8, help="unacknowledged chunks per device at a time (default 8)")
    p.add_argument("--gateway", type=_host_port, help="UDP HOST:PORT to send to (default: [device] gateway)")
    p.add_argument("--non-loopback", action="store_true",
                   help="allow a gateway address that is not loopback (never aim a load test at a network you do not own)")
    p.add_argument("--chunk-bytes", type=int, help="largest datagram (default: [device] chunk_bytes)")
    p.add_argument("--ack-timeout", type=float, help="first retransmission timeout, s (default: [device] ack_timeout)")
    p.add_argument("--max-retransmit", type=int, help="retransmissions before a device gives up (default: [device])")
    p.add_argument("--sockets", type=int, default=0, metavar="K",
                   help="share K sockets among the devices (default 0: one socket each, pooled only if the "
                   "open-file limit is too low)")
    p.add_argument("--attempts", type=int, default=1, metavar="N",
                   help="deliveries a device tries, each a fresh transfer after its sender gave up (default 1)")
    p.add_argument("--retry-after", type=float, default=0.5, metavar="SECONDS",
                   help="wait before a device's next attempt (default 0.5)")
    p.add_argument("--loss", type=float, default=0.0, metavar="P",
                   help="send through a relay on 127.0.0.1 that drops each datagram with this probability, each way")
    p.add_argument("--dup", type=float, default=0.0, metavar="P", help="... and sends a second copy with this one")
    p.add_argument("--delay", type=float, default=0.0, metavar="SECONDS",
                   help="... and delays each copy by up to this long, reordering them (the relay's choices are "
                   "seeded by --seed)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="stop after this long and report what was not delivered (default 120)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the summary as JSON here")
    progress = p.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="show a progress bar (default: when stderr is a terminal)")
    progress.add_argument("--quiet", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        settings = config.load(Path(args.config) if args.config else None)
    except config.ConfigError as e:
        print(f"meter loadgen: {e}", file=sys.stderr)
        return 2
    if args.devices < 1:
        print("meter loadgen: --devices must be at least 1", file=sys.stderr)
        return 2
    if args.window < 1 or args.attempts < 1:
        print("meter loadgen: --window and --attempts must be at least 1", file=sys.stderr)
        return 2
    target = args.gateway or settings.device["gateway"]
    if not ipaddress.ip_address(target[0]).is_loopback and not args.non_loopback:
        print(f"meter loadgen: gateway {target[0]} is not a loopback address: refusing to send load there "
              "(give --non-loopback if it is your own test gateway)", file=sys.stderr)
        return 2
    fleet_ids = list(settings.fleet)
    first = args.first_id if args.first_id is not None else fleet_ids[0]
    ids = list(range(first, first + args.devices))
    missing = [i for i in ids if i not in settings.fleet]
    if missing:
        print(f"meter loadgen: devices {missing[0]}..{missing[-1]} ({len(missing)}) are not in [fleet] of "
              f"{settings.source} ({len(fleet_ids)} devices)", file=sys.stderr)
        return 2
    if args.progress is None:
        args.progress = sys.stderr.isatty()

    from twisted.internet import reactor
    from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner, textFileLogObserver

    # Only errors on stderr: retransmissions and busy answers are counted.
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.error)])],
        redirectStandardIO=False,
    )
    load = LoadRun(args, settings, reactor)
    try:
        load.prepare(settings, ids)
    except (secrets.SecretError, ValueError, OSError) as e:
        print(f"meter loadgen: {e}", file=sys.stderr)
        return 2
    reactor.callWhenRunning(load.start)
    with collector_paused():
        reactor.run()
    summary = load.summary()
    print(format_summary(summary), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if summary["delivered"] == summary["devices"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meter loadgen", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
