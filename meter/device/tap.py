"""
twistd -n meter-device --id N: wires one device's UDP socket and its daily
schedule.
"""

from __future__ import annotations

import os
import sys

from twisted.application.service import Service
from twisted.logger import Logger
from twisted.python import usage

from meter import device, secrets, wire
from meter.options import MeterOptions
from meter.reading import SurveyError, load_survey, survey_path

#: After a failed daily send, try again this much later (at most until the
#: next daily send).
RETRY_AFTER = 300.0


class Options(MeterOptions):
    role = "device"
    synopsis = "--id N [options]"
    longdesc = (
        "A soil meter: sends the previous day's readings from its survey file to the gateway over UDP at start "
        "and then once a day; with --once, sends now and exits 0 once the gateway acknowledged every chunk."
    )
    overrides = {"id": "id", "gateway": "gateway", "surveys": "surveys"}
    optParameters = MeterOptions.optParameters + [
        ["id", "i", None, "this device's number in [fleet] (config: [device] id)"],
        ["gateway", "g", None, "UDP HOST:PORT of the gateway (config: [device] gateway)"],
        ["surveys", "s", None, "survey file, or the folder holding device<N>.txt (config: [device] surveys)"],
    ]
    optFlags = [["once", "1", "send the previous day now and exit: 0 once acknowledged, 1 if not"]]

    def _check(self) -> None:
        device_id = self.config.device["id"]
        if device_id is None:
            raise usage.UsageError("--id is required (or [device] id in the configuration)")
        if device_id not in self.config.fleet:
            raise usage.UsageError(
                f"--id {device_id}: not a device of [fleet] in {self.config.source} "
                f"(devices: {', '.join(map(str, self.config.fleet))})"
            )
        folder = self.config.security["dir"]
        secrets.require(folder, [secrets.device_key_path(folder, device_id)])
        self.key = secrets.read_device_key(folder, device_id)

    def pidfile_name(self) -> str:
        return f"meter-device-{self.config.device['id']}.pid"


class DeviceService(Service):
    log = Logger()

    def __init__(self, settings: dict, address: str, key: bytes, reactor, once: bool):
        self._settings = settings
        self._id = settings["id"]
        self._address = address
        self._reactor = reactor
        self._once = once
        self._port = None
        self._next = None
        self.protocol = device.DeviceProtocol(settings["gateway"], key)
        self._retransmission = device.Retransmission(
            settings["ack_timeout"], settings["ack_random_factor"], settings["max_retransmit"]
        )

    def startService(self):
        Service.startService(self)
        gateway_host = self._settings["gateway"][0]
        self._port = self._reactor.listenUDP(
            0, self.protocol, interface="::" if ":" in gateway_host else "0.0.0.0", maxPacketSize=wire.MAX_DATAGRAM
        )
        self.send_day()

    def stopService(self):
        Service.stopService(self)
        if self._next is not None and self._next.active():
            self._next.cancel()
        if self.protocol.sender is not None:
            self.protocol.sender.done.addErrback(lambda _: None)
        return self._port.stopListening() if self._port is not None else None

    def send_day(self) -> None:
        self._next = None
        now = self._reactor.seconds()
        day = device.previous_day(now)
        path = survey_path(self._settings["surveys"], self._id)
        try:
            readings = load_survey(path, self._id, self._address, day)
        except SurveyError as e:
            self._failed(f"cannot read the day's survey: {e}")
            return
        chunks = wire.split_day(
            self._id, self._address, day, readings, wire.new_id(), int(now), self._settings["chunk_bytes"]
        )
        sender = device.DaySender(chunks, self.protocol.send, self._reactor, self._retransmission)
        self.protocol.sender = sender
        self.log.info(
            "device {id} ({ip}) sending {n} readings of {day} to {gateway} in {parts} datagrams; send started at={at:.6f}",
            id=self._id,
            ip=self._address,
            n=len(readings),
            day=day,
            gateway="%s:%d" % self._settings["gateway"],
            parts=len(chunks),
            at=now,
        )
        sender.start().addCallbacks(self._delivered, self._not_delivered, callbackArgs=(now,))

    def _delivered(self, parts: int, started: float) -> None:
        self.log.info(
            "device {id}: gateway acknowledged all {parts} datagrams in {ms:.1f} ms ({retries} retransmissions)",
            id=self._id,
            parts=parts,
            ms=(self._reactor.seconds() - started) * 1000,
            retries=self.protocol.sender.counters["retransmissions"],
        )
        if self._once:
            self._reactor.stop()
        else:
            self._schedule(None)

    def _not_delivered(self, failure) -> None:
        failure.trap(device.DeliveryFailed)
        counters = self.protocol.sender.counters
        self.log.warn(
            "device {id}: giving up after {retries} retransmissions ({busy} busy answers)",
            id=self._id,
            retries=counters["retransmissions"],
            busy=counters["busy"],
        )
        self._failed(f"day not delivered: {failure.getErrorMessage()}")

    def _failed(self, why: str) -> None:
        self.log.error("device {id}: {why}", id=self._id, why=why)
        if self._once:
            exit_after_shutdown(self._reactor, f"meter-device {self._id}: {why}")
            # A survey refused at start fails before the reactor runs.
            self._reactor.callWhenRunning(self._reactor.stop)
        else:
            self._schedule(RETRY_AFTER)

    def _schedule(self, retry: float | None) -> None:
        now = self._reactor.seconds()
        at = device.next_send(
            now, self._settings["send_at"], device.offset_for(self._id, self._settings["spread"])
        )
        if retry is not None:
            at = min(at, now + retry)
        self.log.info("device {id}: next send in {s:.0f} s", id=self._id, s=at - now)
        self._next = self._reactor.callLater(at - now, self.send_day)


def exit_after_shutdown(reactor, message: str, status: int = 1) -> None:
    """
    Make the process exit with C{status} once the reactor has shut down,
    after printing C{message} on stderr: twistd itself always exits 0.
    """

    def leave():
        sys.stdout.flush()
        print(message, file=sys.__stderr__, flush=True)
        os._exit(status)

    reactor.addSystemEventTrigger("after", "shutdown", leave)


def makeService(options: Options):
    from twisted.internet import reactor

    settings = options.config.device
    return DeviceService(settings, options.config.fleet[settings["id"]], options.key, reactor, options["once"])
