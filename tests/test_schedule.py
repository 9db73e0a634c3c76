"""
meter.device.schedule: which day a device sends when, on a task.Clock, in a
time zone the tests pin (Europe/Berlin) so daylight saving changes fall on
known dates whatever the machine's own zone.
"""

from __future__ import annotations

import datetime
from zoneinfo import ZoneInfo

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs, formatEvent

from meter.device import RETRY_AFTER, DailySchedule, DeliveryFailed, next_send, offset_for, previous_day

BERLIN = ZoneInfo("Europe/Berlin")
SEND_AT = datetime.time(0, 5)


def berlin(*args) -> float:
    return datetime.datetime(*args, tzinfo=BERLIN).timestamp()


class Sends:
    """
    The schedule's send: notes when each send starts and which day it
    reports; the test decides how each ends.
    """

    def __init__(self, clock: task.Clock):
        self._clock = clock
        self._pending: list[Deferred] = []
        self.calls: list[tuple[float, datetime.date]] = []

    def __call__(self, day: datetime.date) -> Deferred:
        self.calls.append((self._clock.seconds(), day))
        self._pending.append(Deferred())
        return self._pending[-1]

    def succeed(self) -> None:
        self._pending[-1].callback(3)

    def fail(self) -> None:
        self._pending[-1].errback(DeliveryFailed("day not delivered: no acknowledgement for part 1/3"))


class Scene:
    def __init__(self, now: float, offset: float = 0.0, once: bool = False, send_at: datetime.time = SEND_AT):
        self.clock = task.Clock()
        self.clock.advance(now)
        self.sends = Sends(self.clock)
        self.schedule = DailySchedule(self.clock, self.sends, send_at, offset, tz=BERLIN, once=once, name="device 1")
        self.outcomes: list = []
        self.schedule.finished.addBoth(self.outcomes.append)

    def run_to_next_send(self) -> float:
        """
        Advance to the planned send (checking nothing runs before it) and
        let it start; its time.
        """
        at = self.schedule.next_at
        (call,) = self.clock.getDelayedCalls()
        assert call.getTime() == at
        calls = len(self.sends.calls)
        self.clock.advance(at - self.clock.seconds() - 0.001)
        assert len(self.sends.calls) == calls, "sent early"
        self.clock.advance(at - self.clock.seconds())
        assert len(self.sends.calls) == calls + 1
        return at


# -- the daily schedule -----------------------------------------------------


def test_the_first_send_is_at_start_and_reports_yesterday():
    s = Scene(berlin(2026, 3, 10, 14, 30))
    s.schedule.start()
    assert s.sends.calls == [(berlin(2026, 3, 10, 14, 30), datetime.date(2026, 3, 9))]
    assert s.schedule.next_at is None  # nothing planned while the send is in flight
    assert s.clock.getDelayedCalls() == []


def test_after_a_delivery_the_next_send_is_at_send_at_plus_the_offset_local_time():
    s = Scene(berlin(2026, 3, 10, 14, 30), offset=120)
    s.schedule.start()
    s.sends.succeed()
    assert s.schedule.next_at == berlin(2026, 3, 11, 0, 7)
    s.run_to_next_send()
    assert s.sends.calls[-1] == (berlin(2026, 3, 11, 0, 7), datetime.date(2026, 3, 10))
    s.sends.succeed()
    assert s.schedule.next_at == berlin(2026, 3, 12, 0, 7)
    assert s.outcomes == []  # only --once reports an outcome


def test_the_next_send_is_said_as_a_local_clock_time_with_its_zone():
    s = Scene(berlin(2026, 12, 1, 14, 30), offset=133)
    s.schedule.start()
    with capturedLogs() as events:
        s.sends.succeed()
    assert [formatEvent(e) for e in events] == ["device 1: next send at 2026-12-02 00:07:13 CET"]
    assert events[0]["at"] == berlin(2026, 12, 2, 0, 7, 13)
    # in summer, the summer zone
    s = Scene(berlin(2026, 7, 1, 14, 30))
    s.schedule.start()
    with capturedLogs() as events:
        s.sends.fail()
    assert formatEvent(events[-1]) == "device 1: next send at 2026-07-01 14:35:00 CEST"


def test_a_failure_is_retried_five_minutes_later_for_the_same_day():
    s = Scene(berlin(2026, 3, 10, 14, 30))
    s.schedule.start()
    s.sends.fail()
    assert RETRY_AFTER == 300
    assert s.schedule.next_at == berlin(2026, 3, 10, 14, 35)
    s.run_to_next_send()
    s.sends.fail()
    assert s.run_to_next_send() == berlin(2026, 3, 10, 14, 40)
    assert [day for _, day in s.sends.calls] == [datetime.date(2026, 3, 9)] * 3


def test_a_success_cancels_the_retries():
    s = Scene(berlin(2026, 3, 10, 14, 30))
    s.schedule.start()
    s.sends.fail()
    s.run_to_next_send()
    s.sends.succeed()
    assert s.schedule.next_at == berlin(2026, 3, 11, 0, 5)
    assert [call.getTime() for call in s.clock.getDelayedCalls()] == [berlin(2026, 3, 11, 0, 5)]


def test_a_failure_that_lasts_until_the_next_daily_send_moves_on_to_the_new_day():
    # The offset puts the daily send between two retries: the retry is
    # brought forward to it.
    daily = berlin(2026, 3, 11, 0, 5) + 100
    s = Scene(berlin(2026, 3, 10, 12, 0), offset=100)
    s.schedule.start()
    while s.clock.seconds() < daily:
        s.sends.fail()
        s.run_to_next_send()
    times = [at for at, _ in s.sends.calls]
    assert times[-1] == daily
    assert {b - a for a, b in zip(times, times[1:-1])} == {300}
    assert 0 < times[-1] - times[-2] < 300
    midnight = berlin(2026, 3, 11, 0, 0)
    # Each send reports the previous day of its own moment: the survey file
    # holds the last 24 hours.
    assert all(day == datetime.date(2026, 3, 9) for at, day in s.sends.calls if at < midnight)
    assert all(day == datetime.date(2026, 3, 10) for at, day in s.sends.calls if at >= midnight)
    s.sends.fail()
    assert s.schedule.next_at == daily + 300  # and the retries go on for the new day


def test_once_sends_once_and_reports_the_delivery():
    s = Scene(berlin(2026, 3, 10, 14, 30), once=True)
    s.schedule.start()
    assert s.outcomes == []
    s.sends.succeed()
    assert s.outcomes == [3]
    assert s.clock.getDelayedCalls() == []
    assert len(s.sends.calls) == 1


def test_once_reports_a_failure_and_does_not_retry():
    s = Scene(berlin(2026, 3, 10, 14, 30), once=True)
    s.schedule.start()
    s.sends.fail()
    (failure,) = s.outcomes
    assert failure.getErrorMessage() == "day not delivered: no acknowledgement for part 1/3"
    assert failure.check(DeliveryFailed)
    assert s.clock.getDelayedCalls() == []
    assert len(s.sends.calls) == 1


def test_a_send_that_fails_at_once_is_an_outcome_like_any_other():
    clock = task.Clock()
    clock.advance(berlin(2026, 3, 10, 14, 30))

    def refused(day):
        raise DeliveryFailed("cannot read the day's survey: device1.txt:3: time 08:00 already read at line 1")

    schedule = DailySchedule(clock, refused, SEND_AT, tz=BERLIN, once=True)
    outcomes: list = []
    schedule.finished.addErrback(outcomes.append)
    schedule.start()
    (failure,) = outcomes
    assert failure.getErrorMessage().startswith("cannot read the day's survey: ")


def test_stop_cancels_the_planned_send():
    s = Scene(berlin(2026, 3, 10, 14, 30))
    s.schedule.start()
    s.sends.fail()
    s.schedule.stop()
    assert s.clock.getDelayedCalls() == []
    assert s.schedule.next_at is None


def test_an_outcome_after_stop_plans_nothing_and_reports_nothing():
    for once in (False, True):
        s = Scene(berlin(2026, 3, 10, 14, 30), once=once)
        s.schedule.start()
        s.schedule.stop()
        s.sends.fail()
        assert s.clock.getDelayedCalls() == []
        assert s.outcomes == []


# -- daylight saving time ---------------------------------------------------


def test_the_daily_send_keeps_its_local_time_across_the_spring_change():
    # Berlin skips 02:00-03:00 on 2026-03-29: that day has 23 hours.
    s = Scene(berlin(2026, 3, 28, 12, 0))
    s.schedule.start()
    s.sends.succeed()
    first = s.run_to_next_send()
    s.sends.succeed()
    second = s.run_to_next_send()
    assert (first, second) == (berlin(2026, 3, 29, 0, 5), berlin(2026, 3, 30, 0, 5))
    assert second - first == 23 * 3600
    assert [day for _, day in s.sends.calls] == [datetime.date(2026, 3, d) for d in (27, 28, 29)]


def test_the_daily_send_keeps_its_local_time_across_the_autumn_change():
    # Berlin repeats 02:00-03:00 on 2026-10-25: that day has 25 hours.
    s = Scene(berlin(2026, 10, 24, 12, 0))
    s.schedule.start()
    s.sends.succeed()
    first = s.run_to_next_send()
    s.sends.succeed()
    second = s.run_to_next_send()
    assert second - first == 25 * 3600
    assert [day for _, day in s.sends.calls] == [datetime.date(2026, 10, d) for d in (23, 24, 25)]


def test_a_send_at_in_the_repeated_hour_sends_once_that_day():
    s = Scene(berlin(2026, 10, 24, 12, 0), send_at=datetime.time(2, 30))
    s.schedule.start()
    s.sends.succeed()
    first = s.run_to_next_send()
    s.sends.succeed()
    second = s.run_to_next_send()
    assert first == datetime.datetime(2026, 10, 25, 0, 30, tzinfo=datetime.timezone.utc).timestamp()  # 02:30 CEST
    assert second == berlin(2026, 10, 26, 2, 30)


def test_previous_day_is_the_local_one():
    # 00:30 in Berlin is still the day before in UTC.
    assert previous_day(berlin(2026, 3, 10, 0, 30), BERLIN) == datetime.date(2026, 3, 9)
    assert previous_day(berlin(2026, 3, 10, 0, 30), datetime.timezone.utc) == datetime.date(2026, 3, 8)


# -- in the system's time zone (the default) ---------------------------------


def local(*args) -> float:
    return datetime.datetime(*args).timestamp()


def test_previous_day_is_yesterday_in_local_time():
    assert previous_day(local(2026, 3, 10, 0, 5)) == datetime.date(2026, 3, 9)
    assert previous_day(local(2026, 3, 10, 23, 59)) == datetime.date(2026, 3, 9)
    assert previous_day(local(2026, 1, 1, 0, 0)) == datetime.date(2025, 12, 31)
    assert previous_day(local(2024, 3, 1, 12, 0)) == datetime.date(2024, 2, 29)


@pytest.mark.parametrize(
    "now, offset, expected",
    [
        ((2026, 3, 10, 0, 0), 0, (2026, 3, 10, 0, 5)),
        ((2026, 3, 10, 0, 4, 59), 0, (2026, 3, 10, 0, 5)),
        ((2026, 3, 10, 0, 5), 0, (2026, 3, 11, 0, 5)),  # strictly after now
        ((2026, 3, 10, 0, 6), 0, (2026, 3, 11, 0, 5)),
        ((2026, 3, 10, 0, 6), 120, (2026, 3, 10, 0, 7)),  # today's send plus the offset is still ahead
        ((2026, 3, 10, 23, 0), 0, (2026, 3, 11, 0, 5)),
        ((2026, 12, 31, 12, 0), 0, (2027, 1, 1, 0, 5)),
    ],
)
def test_next_send(now, offset, expected):
    # expected already includes the offset
    assert next_send(local(*now), datetime.time(0, 5), offset) == local(*expected)


def test_next_send_with_offset_is_exact():
    assert next_send(local(2026, 3, 10, 0, 6), datetime.time(0, 5), 120) == local(2026, 3, 10, 0, 7)
    assert next_send(local(2026, 3, 10, 0, 8), datetime.time(0, 5), 120) == local(2026, 3, 11, 0, 7)
    assert next_send(local(2026, 3, 10, 0, 0), datetime.time(0, 5), 30.5) == local(2026, 3, 10, 0, 5) + 30.5


def test_offset_for_is_deterministic_spread_and_bounded():
    assert offset_for(1, 600) == pytest.approx(370.8203920628875)
    offsets = [offset_for(device_id, 600) for device_id in range(1, 51)]
    assert offsets == [offset_for(device_id, 600) for device_id in range(1, 51)]
    assert all(0 <= o < 600 for o in offsets)
    assert len(set(offsets)) == 50
    ordered = sorted(offsets)
    # evenly spread: no two devices within 5 s, no gap wider than 3 even shares
    assert min(b - a for a, b in zip(ordered, ordered[1:])) > 5
    assert max(b - a for a, b in zip(ordered, ordered[1:])) < 3 * 600 / 50


def test_offset_without_a_spread_is_zero():
    assert offset_for(17, 0) == 0.0
    assert offset_for(17, -5) == 0.0
