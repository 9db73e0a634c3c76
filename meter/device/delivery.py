"""
One send of one day: the device's survey file, read for that day, cut into
chunks and handed to a fresh L{DaySender} on the device's protocol.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from meter import wire
from meter.clocktext import iso_time
from meter.device.metrics import DeviceMetrics
from meter.device.protocol import DeviceProtocol
from meter.device.sender import DaySender, DeliveryFailed, Retransmission
from meter.device.survey import SurveyError, load_survey, survey_path


class SurveyDelivery:
    """
    Sends a day of device C{device_id}'s survey (the C{send} a
    L{meter.device.schedule.DailySchedule} calls): fires with the number of
    chunks once the gateway acknowledged them all, or fails with a
    L{DeliveryFailed} saying why, the survey's own errors included.
    """

    log = Logger()

    def __init__(
        self,
        protocol: DeviceProtocol,
        clock,
        device_id: int,
        address: str,
        surveys: Path,
        chunk_bytes: int,
        retransmission: Retransmission = Retransmission(),
    ):
        self._protocol = protocol
        self._clock = clock
        self._id = device_id
        self._address = address
        self._surveys = surveys
        self._chunk_bytes = chunk_bytes
        self._retransmission = retransmission
        #: The protocol's: one object counts everything the device does.
        self.metrics: DeviceMetrics = protocol.metrics

    def __call__(self, day: datetime.date) -> Deferred:
        now = self._clock.seconds()
        try:
            readings = load_survey(survey_path(self._surveys, self._id), self._id, self._address, day)
        except SurveyError as e:
            self.metrics.days_failed += 1
            return fail(DeliveryFailed(f"cannot read the day's survey: {e}"))
        chunks = wire.split_day(self._id, self._address, day, readings, wire.new_id(), int(now), self._chunk_bytes)
        sender = DaySender(chunks, self._protocol.send, self._clock, self._retransmission, metrics=self.metrics)
        self._protocol.sender = sender
        self.log.info(
            "device {id} ({ip}) sending {n} readings of {day} to {gateway} in {parts} datagrams; send started at {when}",
            id=self._id,
            ip=self._address,
            n=len(readings),
            day=day,
            gateway="%s:%d" % self._protocol.gateway,
            parts=len(chunks),
            at=now,
            when=iso_time(now),
        )
        # The metrics count for the process's life: this day's own
        # retransmissions are the difference.
        before = self.metrics.retransmissions
        return sender.start().addCallbacks(
            self._delivered, self._not_delivered, callbackArgs=(now, before), errbackArgs=(before,)
        )

    def _delivered(self, parts: int, started: float, before: int) -> int:
        self.metrics.days_delivered += 1
        self.log.info(
            "device {id}: gateway acknowledged all {parts} datagrams in {ms:.1f} ms after {day} retransmissions; "
            "since start {metrics}",
            id=self._id,
            parts=parts,
            ms=(self._clock.seconds() - started) * 1000,
            day=self.metrics.retransmissions - before,
            metrics=self.metrics.logfmt(),
        )
        return parts

    def _not_delivered(self, failure, before: int) -> None:
        failure.trap(DeliveryFailed)
        self.metrics.days_failed += 1
        self.log.warn(
            "device {id}: giving up after {day} retransmissions; since start {metrics}",
            id=self._id,
            day=self.metrics.retransmissions - before,
            metrics=self.metrics.logfmt(),
        )
        raise DeliveryFailed(f"day not delivered: {failure.getErrorMessage()}")
