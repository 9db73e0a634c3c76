"""
The retry-after hints of a full spool (L{meter.gateway.room}), on made-up
times.
"""

from __future__ import annotations

import pytest

from meter.gateway.room import INITIAL_RATE, QUIET, UNMEASURED_MAX_HINT, RoomCalendar

NOW = 1772400000.0


def test_devices_refused_together_come_back_spread_at_the_initial_rate():
    room = RoomCalendar(max_hint=60.0)
    hints = [room.hint(NOW, 0, 96) for _ in range(20)]
    # Slots 96 readings apart at 1,000 readings a second: 0, 0.096, ...;
    # none sooner than the shortest hint, half a second.
    assert hints[:6] == [500] * 6
    assert hints[6:9] == pytest.approx([576, 672, 768], abs=1)
    assert hints[19] == pytest.approx(19 * 96 / INITIAL_RATE * 1000, abs=1)


def test_until_a_rate_is_measured_devices_are_sent_away_briefly():
    room = RoomCalendar(max_hint=60.0)
    hints = [room.hint(NOW, 0, 1440) for _ in range(10)]
    assert max(hints) == UNMEASURED_MAX_HINT * 1000
    # Measured a second later, the rate sizes the slots, up to the longest hint.
    room.hint(NOW + 1, 1440, 1440)
    assert room.rate == 1440
    assert [room.hint(NOW + 1, 1440, 1440) for _ in range(80)][-1] == 60_000


def test_slots_follow_the_rate_readings_leave_at():
    room = RoomCalendar(max_hint=60.0)
    room.hint(NOW, 0, 96)
    # 48,000 readings left in the next second: slots 2 ms apart.
    first = room.hint(NOW + 1, 48_000, 96)
    assert room.rate == 48_000
    later = [room.hint(NOW + 1, 48_000, 96) for _ in range(500)]
    assert first == 500
    assert later[-1] == pytest.approx(500 * 96 / 48_000 * 1000, abs=1)
    # The rate is smoothed: a slower second weighs 0.3.
    room.hint(NOW + 2, 48_000 + 12_000, 96)
    assert room.rate == pytest.approx(0.7 * 48_000 + 0.3 * 12_000)


def test_a_spool_nothing_leaves_sends_devices_away_for_the_longest_hint():
    room = RoomCalendar(max_hint=45.0)
    room.hint(NOW, 1000, 96)
    assert room.hint(NOW + 1.5, 1000, 96) == 45_000
    assert room.hint(NOW + 3, 1000, 96) == 45_000
    # Readings leave again: slots again (the rate smoothed up from 0).
    assert room.hint(NOW + 4, 1000 + 100_000, 96) == 500


def test_slots_never_pass_the_longest_hint():
    room = RoomCalendar(max_hint=2.0)  # under the longest hint of an unmeasured rate
    hints = [room.hint(NOW, 0, 1440) for _ in range(10)]
    assert max(hints) == 2000
    # The calendar is cut there: a device refused half a second later
    # comes back with the others, not nine slots past them.
    assert room.hint(NOW + 0.5, 0, 1440) == 1500


def test_after_a_quiet_spell_the_rate_is_measured_afresh():
    room = RoomCalendar(max_hint=60.0)
    room.hint(NOW, 0, 96)
    room.hint(NOW + 1, 0, 96)
    assert room.rate == 0
    # Much later the spool is full again: what left over the quiet spell
    # says nothing of the rate now.
    assert room.hint(NOW + 1 + QUIET + 1, 5_000_000, 96) == 500
    assert room.rate is None
