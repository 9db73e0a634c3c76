"""
A fleet of devices in one process, optionally behind a lossy UDP relay: the
traffic generator of the fault tests (tests/test_faults.py).

Running hundreds of twistd device processes would take minutes on a small
machine, so this drives every device from one reactor with the real device
code: each device is a L{meter.device.DeviceProtocol} on its own UDP socket
and a L{meter.device.DaySender} per attempt, exactly as meter-device wires
them.  A device whose day is not delivered (the sender gave up) sends it
again after C{--retry-after} seconds, as meter-device does when it is not
run with --once, at most C{--attempts} times in all.

The relay (C{--loss}, C{--dup}, C{--delay}) sits between the devices and the
gateway on 127.0.0.1: it drops each datagram with probability C{loss} in
each direction, sends a second copy with probability C{dup}, and delays
every copy by a random time up to C{delay} seconds, which reorders them.
Its random choices come from a generator seeded with C{--seed}.

    python tests/fleet.py --config meter.toml --day 2024-05-01 --devices 1-200 \\
        --loss 0.3 --dup 0.1 --delay 0.02 --seed 7

Prints one line per device delivered (or failed), and at the end a line
C{fleet done: <json summary>}; exits 0 if every device delivered its day.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import socket
import sys
import time
from collections import Counter
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol

from meter import config, device, wire
from meter.device.survey import load_survey, survey_path


def say(text: str) -> None:
    print(text, flush=True)


class LossyRelay(DatagramProtocol):
    """
    Devices send to this port; each device gets its own upstream socket
    towards the gateway, so the gateway's answers come back to it and are
    passed on to the device from this port.
    """

    def __init__(self, gateway: tuple[str, int], loss: float, dup: float, delay: float, rng: random.Random):
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
            reactor.listenUDP(0, upstream, interface="127.0.0.1", maxPacketSize=wire.MAX_DATAGRAM)
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
            reactor.callLater(self._rng.uniform(0, self._delay), self._write, direction, transport, data, to)

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


class FleetDevice:
    """
    One device: its socket, its day, and its attempts at delivering it.
    """

    def __init__(self, fleet: Fleet, device_id: int, address: str, key: bytes, readings):
        self.fleet = fleet
        self.id = device_id
        self.address = address
        self.readings = readings
        self.protocol = device.DeviceProtocol(fleet.target, key, fleet.metrics)
        self.attempts = 0
        self.counters: Counter[str] = Counter()
        self.outcome: str | None = None

    def start(self) -> None:
        reactor.listenUDP(0, self.protocol, interface="127.0.0.1", maxPacketSize=wire.MAX_DATAGRAM)
        self.send_day()

    def send_day(self) -> None:
        self.attempts += 1
        f = self.fleet
        chunks = wire.split_day(
            self.id, self.address, f.day, self.readings, wire.new_id(), int(time.time()), f.chunk_bytes
        )
        sender = device.DaySender(
            chunks, self._send, reactor, f.retransmission, random.Random(f.seed * 100003 + self.id), metrics=f.metrics
        )
        self.protocol.sender = sender
        self.counters["chunks"] += len(chunks)
        sender.start().addCallbacks(self._delivered, self._not_delivered)

    def _send(self, datagram: bytes) -> None:
        self.counters["datagrams"] += 1
        self.fleet.datagram_sent(self)
        self.protocol.send(datagram)

    def _delivered(self, parts: int) -> None:
        self.outcome = "delivered"
        self.fleet.finished(self, f"delivered in {self.attempts} attempt(s)")

    def _not_delivered(self, failure) -> None:
        failure.trap(device.DeliveryFailed)
        self.counters["gave_up"] += 1
        if self.attempts < self.fleet.attempts:
            say(f"fleet: device {self.id} attempt {self.attempts} failed ({failure.getErrorMessage()}): "
                f"sending again in {self.fleet.retry_after:g} s")
            reactor.callLater(self.fleet.retry_after, self.send_day)
            return
        self.outcome = "failed"
        self.fleet.finished(self, f"NOT delivered after {self.attempts} attempt(s): {failure.getErrorMessage()}")


class Fleet:
    def __init__(self, args, settings: config.Config, target: tuple[str, int], keys: dict[int, bytes]):
        self.day = args.day
        self.seed = args.seed
        self.attempts = args.attempts
        self.retry_after = args.retry_after
        self.chunk_bytes = args.chunk_bytes or settings.device["chunk_bytes"]
        self.retransmission = device.Retransmission(
            args.ack_timeout if args.ack_timeout is not None else settings.device["ack_timeout"],
            settings.device["ack_random_factor"],
            args.max_retransmit if args.max_retransmit is not None else settings.device["max_retransmit"],
        )
        self.target = target
        #: What every device counts, together.
        self.metrics = device.DeviceMetrics()
        self.started = time.monotonic()
        self.devices = []
        for device_id in args.devices:
            address = settings.fleet[device_id]
            readings = load_survey(survey_path(settings.device["surveys"], device_id), device_id, address, self.day)
            self.devices.append(FleetDevice(self, device_id, address, keys[device_id], readings))
        self.remaining = len(self.devices)
        self.retransmitting = False
        self.chunks_first = 0

    def datagram_sent(self, fleet_device: FleetDevice) -> None:
        if not self.retransmitting and fleet_device.counters["datagrams"] > fleet_device.counters["chunks"]:
            self.retransmitting = True
            say(f"fleet: retransmitting (device {fleet_device.id} first)")

    def finished(self, fleet_device: FleetDevice, how: str) -> None:
        say(f"fleet: device {fleet_device.id} {how}")
        self.remaining -= 1
        if self.remaining == 0:
            reactor.stop()

    def summary(self, relay: LossyRelay | None, timed_out: bool) -> dict:
        totals: Counter[str] = Counter()
        for d in self.devices:
            totals.update(d.counters)
        return {
            "devices": len(self.devices),
            "delivered": sum(d.outcome == "delivered" for d in self.devices),
            "failed": sorted(d.id for d in self.devices if d.outcome != "delivered"),
            "timed_out": timed_out,
            "attempts": sum(d.attempts for d in self.devices),
            "chunks": totals["chunks"],
            "datagrams": totals["datagrams"],
            "retransmissions": self.metrics.retransmissions,
            "busy": self.metrics.busy_answers,
            "stray_acks": self.metrics.stray_acks,
            "gave_up": totals["gave_up"],
            "seconds": round(time.monotonic() - self.started, 3),
            "relay": dict(sorted(relay.counters.items())) if relay is not None else None,
        }


def _ids(text: str) -> list[int]:
    ids: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        ids.extend(range(int(low), int(high or low) + 1))
    return ids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--day", required=True, type=datetime.date.fromisoformat)
    parser.add_argument("--devices", required=True, type=_ids, help="ids, e.g. 1-200 or 1,3,5-9")
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--dup", type=float, default=0.0)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ack-timeout", type=float)
    parser.add_argument("--max-retransmit", type=int)
    parser.add_argument("--chunk-bytes", type=int)
    parser.add_argument("--attempts", type=int, default=1, help="deliveries tried per device (1: like --once)")
    parser.add_argument("--retry-after", type=float, default=0.5)
    parser.add_argument("--spread", type=float, default=0.0, help="start the devices over this many seconds")
    parser.add_argument("--time-limit", type=float, default=120.0)
    args = parser.parse_args(argv)

    settings = config.load(args.config)
    keys = _keys(settings, args.devices)
    gateway = settings.device["gateway"]
    relay = None
    target = gateway
    if args.loss or args.dup or args.delay:
        relay = LossyRelay(gateway, args.loss, args.dup, args.delay, random.Random(args.seed))
        port = reactor.listenUDP(0, relay, interface="127.0.0.1", maxPacketSize=wire.MAX_DATAGRAM)
        target = ("127.0.0.1", port.getHost().port)
        say(f"fleet: relay on 127.0.0.1:{target[1]} -> {gateway[0]}:{gateway[1]}: loss {args.loss:g}, "
            f"dup {args.dup:g}, delay up to {args.delay:g} s, seed {args.seed}")
    fleet = Fleet(args, settings, target, keys)
    say(f"fleet: {len(fleet.devices)} devices sending {args.day} to {target[0]}:{target[1]}")
    for index, fleet_device in enumerate(fleet.devices):
        at = args.spread * index / len(fleet.devices) if args.spread else 0
        reactor.callLater(at, fleet_device.start)
    timed_out = []

    def time_limit():
        timed_out.append(True)
        reactor.stop()

    limit = reactor.callLater(args.time_limit, time_limit)
    reactor.run()
    if limit.active():
        limit.cancel()
    summary = fleet.summary(relay, bool(timed_out))
    say("fleet done: " + json.dumps(summary))
    return 0 if summary["delivered"] == summary["devices"] else 1


def _keys(settings: config.Config, ids: list[int]) -> dict[int, bytes]:
    """
    Each device's HMAC key, as meter-device reads it (created first when
    [security] generate is set and the folder holds no secrets, as the
    daemons do at start).
    """
    from meter import secrets

    security = settings.security
    if security["generate"]:
        secrets.generate(security["dir"], settings.fleet)
    return {device_id: secrets.read_device_key(security["dir"], device_id) for device_id in ids}


if __name__ == "__main__":
    sys.exit(main())
