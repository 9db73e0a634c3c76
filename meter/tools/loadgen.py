"""
meter loadgen: a fleet of simulated devices in one process (or several,
C{--processes}), for measuring a gateway (see bench/ and
docs/performance.md).

Each simulated device is the real device code, wired as meter-device wires
it: a L{meter.device.DeviceProtocol} holding the device's own key from
C{[security] dir} (it seals every datagram and verifies every
acknowledgement), and a L{meter.device.DaySender} sending the day in
confirmable chunks with CoAP retransmission.  Each device has its own UDP
socket; when the file-descriptor limit is too low for that (or with
C{--sockets K}), devices share a pool of K sockets and acknowledgements are
routed to their device by transfer id.

The day each device sends is synthetic but plausible (L{DayLibrary}): a
diurnal soil temperature curve and a humidity curve that falls as the soil
warms, with smooth noise and now and then an irrigation; a fleet draws its
days from a library of C{--day-shapes} of them seeded by C{--seed}, device
by device id, so the same command sends the same readings.  C{--surveys}
sends survey files instead (the report's day).

With C{--processes P} the devices are split between P processes forked
before any reactor exists (device k in process k mod P); they start
together once all are prepared, and their summaries and latencies make
one.

The devices start evenly over C{--spread} seconds, in the order the device
daemons' schedule fires them in its window (not by id).  The run records, per
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
import functools
import gc
import hashlib
import ipaddress
import json
import math
import os
import random
import resource
import socket
import sys
import time
from collections import Counter
from pathlib import Path

from twisted.internet.protocol import DatagramProtocol

from meter import config, device, secrets, wire
from meter.device.schedule import offset_for
from meter.device.survey import load_survey, survey_path
from meter.reading import HUMIDITY_RANGE, TEMPERATURE_RANGE, Reading, format_number

#: File descriptors kept free for the reactor, logs and the JSON file.
SPARE_FDS = 64


# -- the synthetic day --------------------------------------------------------

#: Distinct synthetic days a fleet draws from (L{DayLibrary}).
DAY_SHAPES = 4096

#: Length of the shared noise series the days of a library read from.
_NOISE_LENGTH = 1 << 15


class DayLibrary:
    """
    The synthetic days of a fleet: C{shapes} distinct days of C{readings}
    readings each, made on first use, and which of them each device sends.

    Soil temperature follows a daily cosine peaking in mid-afternoon around
    a day-specific mean; humidity falls as the soil warms and jumps after an
    irrigation on some days; both carry smooth (autocorrelated) noise.
    Values are in tenths, within the sensor's ranges.  A device sends day
    L{shape_of}(its id), so the same C{seed} always gives the same days.

    Why a library rather than a day per device: formatting 9.6 million
    readings took a minute of CPU and most of a gigabyte before the clock
    started; a library of 4,096 days costs a fraction of a second and a few
    megabytes, and a device's chunks hold no more of its own than their
    header, which is built per device anyway.  Neither the gateway nor the
    cloud keeps anything keyed by a chunk's record text (they check values
    one distinct value at a time), so devices sharing a day cost them what
    distinct days would.
    """

    def __init__(self, readings: int = 96, seed: int = 1, shapes: int = DAY_SHAPES,
                 chunk_bytes: int = wire.DEFAULT_CHUNK_BYTES):
        if not 1 <= readings <= wire.MAX_READINGS:
            raise ValueError(f"readings {readings}: expected 1 to {wire.MAX_READINGS}")
        if shapes < 1:
            raise ValueError(f"shapes {shapes}: expected at least 1")
        self.readings = readings
        self.seed = seed
        self.shapes = shapes
        self.chunk_bytes = chunk_bytes
        self.minutes = [i * wire.MAX_READINGS // readings for i in range(readings)]
        self._values: dict[int, tuple[list[int], list[int]]] = {}
        self._chunk_records: dict[int, list[str]] = {}
        self._noise: tuple[list[float], list[float]] | None = None
        self._room: int | None = None
        self._cos: list[float] | None = None
        self._sin: list[float] = []
        self._times: list[str] = []

    def shape_of(self, device_id: int) -> int:
        """
        The library day device C{device_id} sends.
        """
        digest = hashlib.blake2b(f"{self.seed}/{device_id}".encode("ascii"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.shapes

    def values(self, shape: int) -> tuple[list[int], list[int]]:
        """
        Day C{shape}'s temperatures and humidities, in tenths, one a reading.
        """
        made = self._values.get(shape)
        if made is None:
            made = self._values[shape] = self._make(shape)
        return made

    def readings_of(self, device_id: int, device_ip: str, day: datetime.date) -> tuple[Reading, ...]:
        """
        The readings device C{device_id} sends for C{day}.
        """
        temperatures, humidities = self.values(self.shape_of(device_id))
        return tuple(
            Reading(device_id, device_ip, datetime.datetime(day.year, day.month, day.day, minute // 60, minute % 60),
                    t / 10, h / 10)
            for minute, t, h in zip(self.minutes, temperatures, humidities)
        )

    def chunk_records(self, device_id: int, widest: tuple[int, str], day: datetime.date) -> list[str]:
        """
        Device C{device_id}'s day cut into chunk record texts as
        L{wire.day_chunk_records} cuts it, for a device with the header of
        C{widest} (the fleet's longest id and address), so that every
        device's chunks fit and devices sharing a day share its texts.
        """
        shape = self.shape_of(device_id)
        texts = self._chunk_records.get(shape)
        if texts is None:
            texts = self._chunk_records[shape] = self._cut(shape, widest, day)
        return texts

    def _cut(self, shape: int, widest: tuple[int, str], day: datetime.date) -> list[str]:
        # wire.day_chunk_records' cut, on records formatted from tables:
        # making a Reading of each value and formatting it cost ten times
        # more (tests/test_loadgen.py compares the two).
        if self._room is None:
            self._room = wire.chunk_room(widest[0], widest[1], day, self.chunk_bytes)
            self._times = [f"{minute // 60:02d}:{minute % 60:02d}" for minute in self.minutes]
        text = _tenths_text()
        temperatures, humidities = self.values(shape)
        records = [f"{hhmm},{text[t]},{text[h]}" for hhmm, t, h in zip(self._times, temperatures, humidities)]
        return wire.pack_records(records, self._room, self.chunk_bytes)

    def _shared_noise(self) -> tuple[list[float], list[float]]:
        # AR(1) noise whose correlation time is an hour whatever the
        # sampling, drawn once: each day reads its own stretch of it.
        if self._noise is None:
            rng = random.Random(f"meter-loadgen/noise/{self.seed}/{self.readings}")
            step = wire.MAX_READINGS / self.readings
            rho = math.exp(-step / 60.0)
            spread = math.sqrt(1.0 - rho * rho)
            series = []
            for sigma in (0.3, 0.6):
                value = rng.gauss(0.0, sigma)
                out = []
                for _ in range(_NOISE_LENGTH + self.readings):
                    value = rho * value + spread * rng.gauss(0.0, sigma)
                    out.append(value)
                series.append(out)
            self._noise = (series[0], series[1])
        return self._noise

    def _make(self, shape: int) -> tuple[list[int], list[int]]:
        rng = random.Random(f"meter-loadgen/{self.seed}/{self.readings}/{shape}")
        mean = rng.uniform(6.0, 24.0)
        amplitude = rng.uniform(1.5, 6.0)
        warmest = rng.uniform(14.0, 17.0)
        moisture = rng.uniform(18.0, 48.0)
        drying = rng.uniform(0.4, 1.2)
        irrigation_at = rng.uniform(4.0, 20.0) if rng.random() < 0.35 else None
        irrigation = rng.uniform(5.0, 20.0)
        noise_t, noise_h = self._shared_noise()
        at_t = rng.randrange(_NOISE_LENGTH)
        at_h = rng.randrange(_NOISE_LENGTH)
        t_low, t_high = round(TEMPERATURE_RANGE[0] * 10), round(TEMPERATURE_RANGE[1] * 10)
        h_low, h_high = round(HUMIDITY_RANGE[0] * 10), round(HUMIDITY_RANGE[1] * 10)
        # cos(x - w) = cos x cos w + sin x sin w: the day's curve from the
        # library's tables of cos x and sin x.
        if self._cos is None:
            angles = [2 * math.pi * minute / (60.0 * 24.0) for minute in self.minutes]
            self._cos = [math.cos(x) for x in angles]
            self._sin = [math.sin(x) for x in angles]
        phase = 2 * math.pi * warmest / 24.0
        a = amplitude * math.cos(phase)
        b = amplitude * math.sin(phase)
        warm = [mean + a * c + b * s + n for c, s, n in zip(self._cos, self._sin, noise_t[at_t:at_t + self.readings])]
        wet = [moisture - drying * (t - mean) + n for t, n in zip(warm, noise_h[at_h:at_h + self.readings])]
        if irrigation_at is not None:
            for index, minute in enumerate(self.minutes):
                hours = minute / 60.0
                if hours >= irrigation_at:
                    wet[index] += irrigation * math.exp(-(hours - irrigation_at) / 3.0)
        floor = math.floor
        temperatures = [min(max(floor(t * 10 + 0.5), t_low), t_high) for t in warm]
        humidities = [min(max(floor(h * 10 + 0.5), h_low), h_high) for h in wet]
        return temperatures, humidities


_TENTHS: dict[int, str] = {}


def _tenths_text() -> dict[int, str]:
    """
    The record text of every value the sensors give, by its tenths.
    """
    if not _TENTHS:
        low = min(TEMPERATURE_RANGE[0], HUMIDITY_RANGE[0])
        high = max(TEMPERATURE_RANGE[1], HUMIDITY_RANGE[1])
        for tenths in range(round(low * 10), round(high * 10) + 1):
            _TENTHS[tenths] = format_number(tenths / 10)
    return _TENTHS


def synthetic_day(
    device_id: int, device_ip: str, day: datetime.date, readings: int = 96, seed: int = 1, shapes: int = DAY_SHAPES
) -> tuple[Reading, ...]:
    """
    The C{readings} readings of C{day} (evenly spaced minutes from 00:00: 96
    is every 15 minutes, 1,440 every minute) device C{device_id} sends: its
    day of the L{DayLibrary} of C{seed}.
    """
    return day_library(readings, seed, shapes).readings_of(device_id, device_ip, day)


@functools.lru_cache(maxsize=8)
def day_library(readings: int = 96, seed: int = 1, shapes: int = DAY_SHAPES) -> DayLibrary:
    """
    The L{DayLibrary} of these settings, made once a process: what the
    bench checks a run's database against, day by day.
    """
    return DayLibrary(readings, seed, shapes)


# -- one simulated device -----------------------------------------------------


class SimDevice:
    """
    One device of the fleet: its protocol (socket, key), its day, and the
    timing of each of its chunks.

    The day comes already cut into chunk record texts (shared with the
    devices sending the same library day): formatting thousands of days
    while sending would take the CPU the gateway under test needs, so it is
    done before the clock starts.  What a device holds between its
    attempts is kept small (slots, no sender once it is done): a hundred
    thousand of them live in one process.
    """

    __slots__ = ("run", "id", "address", "chunk_records", "chunk_counts", "protocol", "sender", "xfer", "first_sent",
                 "acked", "datagrams", "outcome", "reason", "started_at", "attempts", "offset")

    def __init__(self, run: LoadRun, device_id: int, address: str, key: bytes, chunk_records: list[str],
                 chunk_counts: tuple[int, ...], offset: float):
        self.run = run
        self.id = device_id
        self.address = address
        self.chunk_records = chunk_records
        #: How many readings each chunk holds, by part - 1.
        self.chunk_counts = chunk_counts
        self.protocol = device.DeviceProtocol(run.target, key, run.metrics)
        self.sender: device.DaySender | None = None
        self.xfer = ""
        self.first_sent: dict[int, float] | None = None
        #: Parts acknowledged ok, in any attempt: bit C{part} set.
        self.acked = 0
        self.datagrams = 0
        self.outcome: str | None = None
        self.reason = ""
        self.started_at = 0.0
        self.attempts = 0
        #: When the device starts, in seconds after the run does.
        self.offset = offset

    @property
    def reading_count(self) -> int:
        """
        How many readings the day holds, for the summary.
        """
        return sum(self.chunk_counts)

    def start(self) -> None:
        run = self.run
        now = time.time()
        self.attempts += 1
        if self.attempts == 1:
            self.started_at = now
            run.started += 1
        else:
            run.on_stop(self)
            run.retries += 1
        # A new transfer, as a device's next attempt is: its chunks are
        # timed afresh, but a chunk acknowledged in an attempt before counts
        # once (its readings are the same).
        self.first_sent = {}
        self.xfer = device_xfer(run.seed, self.id, f"{run.attempt_salt}/{self.attempts}")
        chunks = wire.day_chunks(self.id, self.address, run.day, self.chunk_records, self.xfer, int(now))
        run.chunks += len(chunks)
        run.on_start(self)
        sender = device.DaySender(chunks, self._send, run.reactor, run.retransmission, run.rng, run.window, run.metrics)
        self.sender = sender
        self.protocol.sender = _AckTap(self, sender)
        sender.start().addCallbacks(self._delivered, self._not_delivered)

    def _send(self, datagram: bytes) -> None:
        seen = wire.peek_day_id(datagram)
        part = seen[1] if seen is not None else 0
        run = self.run
        if part not in self.first_sent:
            now = self.first_sent[part] = time.time()
            run.first_sends += 1
            if run.first_send is None:
                run.first_send = now
        elif not run.retransmitting:
            run.first_retransmission(self)
        self.datagrams += 1
        run.datagrams += 1
        self.protocol.send(datagram)

    def acknowledged(self, ack: wire.DayAck) -> None:
        if ack.status != "ok" or ack.xfer != self.xfer or self.acked >> ack.part & 1 or self.first_sent is None:
            return
        sent = self.first_sent.get(ack.part)
        if sent is None:
            return
        self.acked |= 1 << ack.part
        run = self.run
        handled = time.time()
        run.handled_latencies.append(handled - sent)
        # When the kernel took the acknowledgement in: what a device of its
        # own would see, not the time this process, busy with thousands of
        # devices, took to get to it.
        run.latencies.append((run.arrived_at or handled) - sent)
        run.sent_at.append(sent)
        run.chunks_acked += 1
        run.readings_acked += self.chunk_counts[ack.part - 1] if 0 < ack.part <= len(self.chunk_counts) else 0
        run.last_ack = handled

    def _done(self) -> None:
        # What only a sending device needs goes: its sender, timers, tap.
        self.sender = None
        self.protocol.sender = None
        self.first_sent = None

    def _delivered(self, chunks: int) -> None:
        self.outcome = "delivered"
        self._done()
        self.run.finished(self)

    def _not_delivered(self, failure) -> None:
        run = self.run
        self._done()
        if not failure.check(device.DeliveryFailed):
            # A fault of the device code, not the gateway's answer: the
            # device fails, saying so, rather than trying forever.
            self.outcome = "failed"
            self.reason = f"error in the device code: {failure.getErrorMessage() or failure.type.__name__}"
            failure.printTraceback(file=sys.stderr)
            run.finished(self)
            return
        run.gave_up += 1
        self.reason = failure.getErrorMessage()
        if self.attempts < run.attempts:
            # As meter-device does: the day is tried again, whole, later.
            run.reactor.callLater(run.retry_after, self.start)
            return
        self.outcome = "failed"
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
    return hashlib.blake2b(f"xfer/{salt}/{seed}/{device_id}".encode("ascii"), digest_size=8).hexdigest()


def _stamped_port_class():
    """
    A Twisted UDP port that notes, for each datagram it reads, the time the
    kernel received it (C{SO_TIMESTAMPNS}), in C{run.arrived_at} while the
    datagram is handled.
    """
    from meter.stamps import StampedPort

    class LoadgenPort(StampedPort):
        def __init__(self, run: "LoadRun", port: int, protocol, interface: str, maxPacketSize: int, reactor):
            super().__init__(port, protocol, interface, maxPacketSize, reactor)
            self._run = run
            #: The address a datagram went to through udp.Port.write.
            self._checked: tuple[str, int] | None = None

        def arrival(self, arrived: float | None) -> None:
            self._run.arrived_at = arrived

        def write(self, datagram: bytes, addr=None):
            # Every datagram goes to one address (the gateway's, or the
            # relay's): udp.Port.write checks it once, then datagrams go
            # straight to sendto.  Its checks parse the address text four
            # times a datagram, the largest share of a send's Python.  An
            # error goes through udp.Port.write, which handles it.
            if addr is not None and addr == self._checked:
                try:
                    return self.socket.sendto(datagram, addr)
                except OSError:
                    pass
            written = super().write(datagram, addr)
            self._checked = addr
            return written

    return LoadgenPort


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
        #: The senders' retransmission timers' jitter, one generator for all
        #: (a generator each would hold 2.5 kB a device).
        self.rng = random.Random(self.seed)
        self.library = DayLibrary(args.readings, self.seed, args.day_shapes, self.chunk_bytes)
        self.devices: list[SimDevice] = []
        self.by_xfer: dict[str, SimDevice] = {}
        self.pooled = False
        self.sockets = 0
        #: Per chunk, first send to the kernel's receipt of its ok.
        self.latencies: list[float] = []
        #: Per chunk, in the same order, when it was first sent.
        self.sent_at: list[float] = []
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
        #: Attempts after a device's first.
        self.retries = 0
        self.retransmitting = False
        self.timed_out = False
        self.prepare_s = 0.0
        self.run_started = 0.0
        self._progress = None
        self._limit = None
        self._next_device = 0
        self._stopped = False
        #: This process's CPU time when the run started, and from then to
        #: its end: the cost of sending, apart from preparing.
        self.cpu_at_start = 0.0
        self.sending_cpu_s = 0.0

    # -- preparation

    def prepare(self, settings: config.Config, ids: list[int], offsets: list[float]) -> None:
        """
        Make the devices C{ids}, each to start C{offsets} (the same order)
        seconds after the run does: their keys, days and sockets.
        """
        began = time.monotonic()
        keys = load_keys(settings, ids)
        args = self.args
        if args.loss or args.dup or args.delay:
            self.relay = LossyRelay(self.reactor, self.gateway, args.loss, args.dup, args.delay, random.Random(self.seed))
            port = self.reactor.listenUDP(0, self.relay, interface="127.0.0.1", maxPacketSize=wire.MAX_DATAGRAM)
            self.target = ("127.0.0.1", port.getHost().port)
        # The fleet's longest header: every device's chunks are cut to fit it.
        widest = max(ids, key=lambda i: (len(str(i)) + len(settings.fleet[i]), i))
        widest_header = (widest, settings.fleet[widest])
        counts_of: dict[int, tuple[int, ...]] = {}
        for device_id, offset in zip(ids, offsets):
            address = settings.fleet[device_id]
            if self.args.surveys is not None:
                readings = load_survey(survey_path(self.args.surveys, device_id), device_id, address, self.day)
                records = wire.day_chunk_records(device_id, address, self.day, readings, self.chunk_bytes)
            else:
                records = self.library.chunk_records(device_id, widest_header, self.day)
            counts = counts_of.get(id(records))
            if counts is None:
                counts = counts_of[id(records)] = tuple(map(wire.record_count, records))
            self.devices.append(SimDevice(self, device_id, address, keys[device_id], records, counts, offset))
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
        self.cpu_at_start = time.process_time()
        self._next_device = 0
        self._start_due()
        self._limit = self.reactor.callLater(self.args.timeout, self._time_limit)
        if self.args.progress:
            from twisted.internet.task import LoopingCall

            self._progress = LoopingCall(self.show_progress)
            self._progress.clock = self.reactor
            self._progress.start(0.25, now=False)

    def _start_due(self) -> None:
        # One timer walking the devices in order of their offsets, rather
        # than a timer each: 100,000 pending timers would cost memory and
        # every other timer's heap operations.
        elapsed = time.monotonic() - self.run_started
        devices = self.devices
        while self._next_device < len(devices) and devices[self._next_device].offset <= elapsed:
            devices[self._next_device].start()
            self._next_device += 1
        if self._next_device < len(devices) and not self._stopped:
            self.reactor.callLater(max(0.0, devices[self._next_device].offset - elapsed), self._start_due)

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
        self._stopped = True
        self.sending_cpu_s = time.process_time() - self.cpu_at_start
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
        readings_sent = sum(sim.reading_count for sim in self.devices if sim.attempts)
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
            "max_attempts": self.attempts,
            "retry_after_s": self.retry_after,
            "gave_up": self.gave_up,
            "retries": self.retries,
            "retried_devices": sum(1 for sim in self.devices if sim.attempts > 1),
            "relay": dict(sorted(self.relay.counters.items())) if self.relay is not None else None,
            "first_send": self.first_send,
            "last_ack": self.last_ack,
            # When the first and the last device started: the start window
            # as it was, not as asked.
            "first_start": min((sim.started_at for sim in self.devices if sim.attempts), default=None),
            "last_start": max((sim.started_at for sim in self.devices if sim.attempts), default=None),
            "duration_s": round(duration, 6),
            "readings_per_s": round(self.readings_acked / duration, 1) if duration > 0 else None,
            "chunks_per_s": round(self.chunks_acked / duration, 1) if duration > 0 else None,
            "ack_latency_ms": latency_summary(latencies),
            "ack_latency_handled_ms": latency_summary(sorted(self.handled_latencies)),
            "ack_tail": latency_tail(self.sent_at, self.latencies),
            "prepare_s": round(self.prepare_s, 3),
            "loadgen_cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "loadgen_sending_cpu_s": round(self.sending_cpu_s, 3),
            "loadgen_max_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "processes": 1,
            "day_shapes": self.library.shapes if self.args.surveys is None else None,
        }


def tail_text(tail: dict) -> str:
    """
    One line of L{latency_tail}'s figures.
    """
    if not tail.get("count"):
        return "no chunks acknowledged"
    worst = ", ".join(f"second {w['second']}: {w['over']:,} of {w['chunks']:,}" for w in tail["worst_seconds"])
    return (
        f"chunks acknowledged after over {tail['over_ms']:g} ms: {tail['chunks_over']:,} of {tail['count']:,} "
        f"({tail['share_over'] * 100:.2f} %), sent in {tail['seconds_with_any_over']} of {tail['seconds']} seconds; "
        f"a hundredth or more of a second's chunks in {tail['seconds_over_p99']}"
        + (f"; the worst ({tail['worst_share'] * 100:.0f} % of them): {worst}" if worst else "")
    )


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


#: The acknowledgement time a chunk's device should not wait beyond (ms):
#: the tail L{latency_tail} describes is the chunks over it.
TAIL_MS = 10.0


def latency_tail(sent_at: list[float], latencies: list[float], over_ms: float = TAIL_MS, worst: int = 3) -> dict:
    """
    Where the chunks acknowledged after more than C{over_ms} were sent:
    how many, and in which seconds of the run, by when they were first sent
    (C{sent_at}, epoch seconds, each chunk's latency in seconds in
    C{latencies} at the same place).  A tail spread over every second is
    the gateway's steady queueing; one packed into a few seconds is stalls,
    of the gateway or of the machine.
    """
    if not latencies:
        return {"over_ms": over_ms, "count": 0}
    start = min(sent_at)
    limit = over_ms / 1000
    chunks: Counter = Counter()
    over: Counter = Counter()
    for sent, latency in zip(sent_at, latencies):
        second = int(sent - start)
        chunks[second] += 1
        if latency > limit:
            over[second] += 1
    total_over = sum(over.values())
    worst_seconds = [
        {"second": second, "chunks": chunks[second], "over": n}
        for second, n in sorted(over.items(), key=lambda item: (-item[1], item[0]))[:worst]
    ]
    return {
        "over_ms": over_ms,
        "count": len(latencies),
        "chunks_over": total_over,
        "share_over": round(total_over / len(latencies), 5),
        "seconds": max(chunks) + 1,
        "seconds_with_any_over": len(over),
        # The seconds where a hundredth or more of the chunks were over.
        "seconds_over_p99": sum(1 for second, n in over.items() if n * 100 >= chunks[second]),
        "worst_seconds": worst_seconds,
        "worst_share": round(sum(w["over"] for w in worst_seconds) / total_over, 3) if total_over else 0.0,
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
        f"{' (timed out)' if s['timed_out'] else ''}; attempts {s['attempts']:,} ({s['retried_devices']:,} devices "
        f"tried again, at most {s['max_attempts']} attempts, {s['retry_after_s']:g} s after a sender gave up)",
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
        lines.append("  " + tail_text(s["ack_tail"]))
    per_datagram = s["loadgen_sending_cpu_s"] / s["datagrams_sent"] * 1e6 if s["datagrams_sent"] else 0.0
    lines.append(f"  loadgen: {s['processes']} process{'es' if s['processes'] > 1 else ''}, prepared in "
                 f"{s['prepare_s']:.2f} s, {s['loadgen_cpu_s']:.2f} CPU s of which sending {s['loadgen_sending_cpu_s']:.2f} s "
                 f"({per_datagram:.0f} µs a datagram), peak RSS {s['loadgen_max_rss_mb']:.0f} MB"
                 f"{' (the largest process)' if s['processes'] > 1 else ''}")
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
                   help="wait before a device's next attempt (default 0.5; meter-device waits 300)")
    p.add_argument("--processes", type=int, default=1, metavar="P",
                   help="split the devices between P processes (device k in process k mod P), one summary (default 1)")
    p.add_argument("--day-shapes", type=int, default=DAY_SHAPES, metavar="K",
                   help=f"distinct synthetic days the fleet draws from (default {DAY_SHAPES:,})")
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
    if args.window < 1 or args.attempts < 1 or args.processes < 1 or args.day_shapes < 1:
        print("meter loadgen: --window, --attempts, --processes and --day-shapes must be at least 1", file=sys.stderr)
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
    ids = start_order(ids)
    offsets = start_offsets(len(ids), args.spread)
    if args.processes > 1:
        return run_processes(args, settings, ids, offsets)
    outcome = run_one(args, settings, ids, offsets)
    if isinstance(outcome, int):
        return outcome
    summary = outcome.summary()
    return report(args, summary)


def start_order(ids: list[int]) -> list[int]:
    """
    The devices C{ids} in the order a fleet of meter-device daemons sends
    them in its window (L{meter.device.schedule.offset_for}): scattered by
    id, so the gateway and the cloud see the devices' days arrive as a real
    fleet's do, not neighbour after neighbour, which the cloud's B-tree of
    readings by device takes at half the cost.
    """
    return sorted(ids, key=lambda device_id: (offset_for(device_id, 1.0), device_id))


def start_offsets(count: int, spread: float) -> list[float]:
    """
    When each of C{count} devices starts, in seconds after the first:
    evenly over C{spread}.
    """
    return [spread * index / count if spread > 0 else 0.0 for index in range(count)]


def report(args: argparse.Namespace, summary: dict) -> int:
    print(format_summary(summary), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if summary["delivered"] == summary["devices"] else 1


def run_one(args: argparse.Namespace, settings: config.Config, ids: list[int], offsets: list[float],
            ready=None) -> "LoadRun | int":
    """
    Devices C{ids} in this process, until they are done or the time limit:
    the finished run, or an exit status if it could not start.  With
    C{ready} (called once the devices are prepared, it returns the Unix
    time to start at), the run starts when the other processes' do.
    """
    from twisted.internet import reactor
    from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner, textFileLogObserver

    # Only errors on stderr: retransmissions and busy answers are counted.
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.error)])],
        redirectStandardIO=False,
    )
    load = LoadRun(args, settings, reactor)
    try:
        load.prepare(settings, ids, offsets)
    except (secrets.SecretError, ValueError, OSError) as e:
        print(f"meter loadgen: {e}", file=sys.stderr)
        return 2
    if ready is None:
        reactor.callWhenRunning(load.start)
    else:
        start_at = ready()
        reactor.callWhenRunning(lambda: reactor.callLater(max(0.0, start_at - time.time()), load.start))
    with collector_paused():
        reactor.run()
    return load


def run_processes(args: argparse.Namespace, settings: config.Config, ids: list[int], offsets: list[float]) -> int:
    """
    The fleet split between C{args.processes} processes (forked here, before
    any reactor exists), device k to process k mod P so each process's
    starts are spread over the whole window; they start together once all
    are prepared, and their summaries and latencies make one summary.

    Why: one process is one core at most; a fleet of 100,000 devices
    offers more datagrams a second than one process of device code sends
    and verifies with room to spare.
    """
    import tempfile

    try:
        # The fleet's keys, made once here if they are to be made, not by
        # each process at once.
        load_keys(settings, ids[:1])
    except (secrets.SecretError, OSError) as e:
        print(f"meter loadgen: {e}", file=sys.stderr)
        return 2
    count = args.processes
    scratch = Path(tempfile.mkdtemp(prefix="meter-loadgen-"))
    children = []
    sys.stdout.flush()
    sys.stderr.flush()
    for k in range(count):
        ready_read, ready_write = os.pipe()
        go_read, go_write = os.pipe()
        out = scratch / f"process-{k}.json"
        pid = os.fork()
        if pid == 0:  # the child
            status = 3
            try:
                os.close(ready_read)
                os.close(go_write)
                args.progress = False
                args.json = None

                def ready() -> float:
                    os.write(ready_write, b"ready\n")
                    return float(os.read(go_read, 64).decode("ascii"))

                outcome = run_one(args, settings, ids[k::count], offsets[k::count], ready)
                if isinstance(outcome, int):
                    status = outcome
                else:
                    out.write_text(json.dumps({"summary": outcome.summary(), "latencies": list(outcome.latencies),
                                               "sent_at": list(outcome.sent_at),
                                               "handled": list(outcome.handled_latencies)}))
                    status = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        os.close(ready_write)
        os.close(go_read)
        children.append((pid, ready_read, go_write, out))
    # Start together once every process is prepared (or has failed).
    for _, ready_read, _, _ in children:
        os.read(ready_read, 64)
        os.close(ready_read)
    start_at = time.time() + 0.1
    for _, _, go_write, _ in children:
        try:
            os.write(go_write, f"{start_at!r}\n".encode("ascii"))
        except BrokenPipeError:
            pass
        os.close(go_write)
    parts = []
    latencies: list[float] = []
    sent_at: list[float] = []
    handled: list[float] = []
    status = 0
    for pid, _, _, out in children:
        _, code = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(code) != 0 or not out.exists():
            status = 2
            continue
        data = json.loads(out.read_text())
        parts.append(data["summary"])
        latencies.extend(data["latencies"])
        sent_at.extend(data["sent_at"])
        handled.extend(data["handled"])
        out.unlink()
    scratch.rmdir()
    if status:
        print("meter loadgen: a loadgen process failed (see above)", file=sys.stderr)
        return status
    return report(args, merge_summaries(parts, latencies, handled, sent_at))


#: Summary counts that add up over processes.
_SUMMED = ("devices", "sockets", "started", "delivered", "failed", "incomplete", "readings_sent", "readings_acked",
           "chunks", "chunks_acked", "datagrams_sent", "retransmissions", "busy_answers", "stray_acks", "attempts",
           "gave_up", "retries", "retried_devices", "loadgen_cpu_s", "loadgen_sending_cpu_s")


def merge_summaries(parts: list[dict], latencies: list[float], handled: list[float], sent_at: list[float]) -> dict:
    """
    One summary of a fleet sent by several processes: their counts added,
    the first send and last acknowledgement of all, and the percentiles and
    the tail of all their latencies together (C{sent_at}: when each chunk
    of C{latencies} was first sent).
    """
    merged = dict(parts[0])
    for key in _SUMMED:
        merged[key] = round(sum(part[key] for part in parts), 3)
    merged["first_id"] = min(part["first_id"] for part in parts)
    merged["pooled_sockets"] = any(part["pooled_sockets"] for part in parts)
    merged["timed_out"] = any(part["timed_out"] for part in parts)
    merged["failed_devices"] = sorted((d for part in parts for d in part["failed_devices"]), key=lambda d: d["id"])[:50]
    merged["incomplete_devices"] = sorted(d for part in parts for d in part["incomplete_devices"])[:50]
    firsts = [part["first_send"] for part in parts if part["first_send"]]
    lasts = [part["last_ack"] for part in parts if part["last_ack"]]
    starts = [part[key] for part in parts for key in ("first_start", "last_start") if part.get(key)]
    merged["first_start"] = min(starts) if starts else None
    merged["last_start"] = max(starts) if starts else None
    merged["first_send"] = min(firsts) if firsts else None
    merged["last_ack"] = max(lasts) if lasts else None
    duration = merged["last_ack"] - merged["first_send"] if firsts and lasts else 0.0
    merged["duration_s"] = round(duration, 6)
    merged["readings_per_s"] = round(merged["readings_acked"] / duration, 1) if duration > 0 else None
    merged["chunks_per_s"] = round(merged["chunks_acked"] / duration, 1) if duration > 0 else None
    merged["ack_latency_ms"] = latency_summary(sorted(latencies))
    merged["ack_latency_handled_ms"] = latency_summary(sorted(handled))
    merged["ack_tail"] = latency_tail(sent_at, latencies)
    merged["prepare_s"] = max(part["prepare_s"] for part in parts)
    merged["loadgen_max_rss_mb"] = max(part["loadgen_max_rss_mb"] for part in parts)
    merged["processes"] = len(parts)
    merged["per_process"] = [{key: part[key] for key in ("devices", "delivered", "datagrams_sent", "loadgen_cpu_s",
                                                         "loadgen_sending_cpu_s",
                                                         "loadgen_max_rss_mb", "prepare_s")} for part in parts]
    relays = [part["relay"] for part in parts if part["relay"]]
    if relays:
        merged["relay"] = dict(sorted(sum((Counter(relay) for relay in relays), Counter()).items()))
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meter loadgen", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
