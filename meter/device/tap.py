"""
twistd -n meter-device --id N: wires one device's UDP socket, its survey
and its daily schedule (L{meter.device.schedule}).
"""

from __future__ import annotations

import os
import sys

from twisted.application.internet import UDPServer
from twisted.application.service import MultiService, Service
from twisted.internet.error import ReactorNotRunning
from twisted.python import usage

from meter import secrets, wire
from meter.device.delivery import SurveyDelivery
from meter.device.metrics import DeviceMetrics
from meter.device.protocol import DeviceProtocol
from meter.device.schedule import DailySchedule, offset_for, previous_day
from meter.device.sender import Retransmission
from meter.notify import Notifier, ReadinessService
from meter.device.survey import SurveyError, load_survey, survey_path
from meter.options import MeterOptions


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


class ScheduleService(Service):
    """
    Runs the device's schedule while the service runs: its first send goes
    out as the service starts, after the UDP port (the service before it in
    the tree) is bound.
    """

    def __init__(self, schedule: DailySchedule):
        self.schedule = schedule

    def startService(self):
        Service.startService(self)
        self.schedule.start()

    def stopService(self):
        Service.stopService(self)
        self.schedule.stop()


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

    if options["once"]:
        refuse_unsendable_survey(options, reactor)
    return build(options, reactor)


def refuse_unsendable_survey(options: Options, clock) -> None:
    """
    With C{--once}, the day's survey is read here, before twistd logs or
    binds anything: one missing, bad or empty ends the start with one line
    naming the file and a non-zero exit, rather than a run that can only
    fail.  (The send reads it again: the file may change meanwhile.)
    """
    settings = options.config.device
    device_id = settings["id"]
    path = survey_path(settings["surveys"], device_id)
    try:
        load_survey(path, device_id, options.config.fleet[device_id], previous_day(clock.seconds()))
    except SurveyError as e:
        raise SystemExit(f"meter-device {device_id}: cannot read the day's survey: {e}") from None


def build(options: Options, reactor) -> MultiService:
    """
    The device's service tree: its UDP port, then its schedule sending days
    of its survey through it; with C{--once}, the process ends with the one
    send's outcome.
    """
    settings = options.config.device
    device_id = settings["id"]
    protocol = DeviceProtocol(settings["gateway"], options.key, DeviceMetrics())
    retransmission = Retransmission(
        settings["ack_timeout"], settings["ack_random_factor"], settings["max_retransmit"], settings["max_busy_wait"]
    )
    delivery = SurveyDelivery(
        protocol,
        reactor,
        device_id,
        options.config.fleet[device_id],
        settings["surveys"],
        settings["chunk_bytes"],
        retransmission,
    )
    schedule = DailySchedule(
        reactor,
        delivery,
        settings["send_at"],
        offset_for(device_id, settings["spread"]),
        once=options["once"],
        name=f"device {device_id}",
    )
    if options["once"]:
        schedule.finished.addCallbacks(lambda _: stop_reactor(reactor), _exit_non_zero, errbackArgs=(reactor, device_id))
    top = MultiService()
    interface = "::" if ":" in settings["gateway"][0] else "0.0.0.0"
    UDPServer(0, protocol, interface=interface, maxPacketSize=wire.MAX_DATAGRAM, reactor=reactor).setServiceParent(top)
    ScheduleService(schedule).setServiceParent(top)
    # Last: READY=1 once the port is bound and the schedule started.
    ReadinessService(Notifier.from_environment(), reactor, f"device {device_id}").setServiceParent(top)
    return top


def _exit_non_zero(failure, reactor, device_id: int) -> None:
    exit_after_shutdown(reactor, f"meter-device {device_id}: {failure.getErrorMessage()}")
    # A survey refused at start fails before the reactor runs.
    reactor.callWhenRunning(stop_reactor, reactor)


def stop_reactor(reactor) -> None:
    """
    Stop C{reactor}, unless it is stopping already (a signal came first):
    a second stop would end the run in a traceback.
    """
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass
