"""
meter.device: the DaySender's CoAP-style retransmission on a task.Clock, the
DeviceProtocol on a FakeDatagramTransport, their metrics, and the tap's
service tree.  The schedule has its own tests (test_schedule.py), as do the
survey files (test_survey.py).
"""

from __future__ import annotations

import datetime
import random

import pytest
from twisted.internet import task
from twisted.internet.testing import FakeDatagramTransport, MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent

from meter import wire
from meter.clocktext import iso_time
from meter.device import DaySender, DeliveryFailed, DeviceMetrics, DeviceProtocol, Retransmission, SurveyDelivery
from meter.device import tap as device_tap
from meter.notify import ReadinessService
from meter.reading import Reading

DAY = datetime.date(2026, 3, 1)
XFER = "0123456789abcdef"
KEY = bytes(range(32))
GATEWAY = ("127.0.0.1", 10005)


def make_chunks(parts: int = 1, xfer: str = XFER) -> list[wire.DayChunk]:
    return [
        wire.DayChunk(
            1,
            "192.168.1.2",
            DAY,
            xfer,
            part,
            parts,
            1772400000,
            (Reading(1, "192.168.1.2", datetime.datetime(2026, 3, 1, part % 24, 0), 20.0, 30.0),),
        )
        for part in range(1, parts + 1)
    ]


class Harness:
    def __init__(self, parts=1, seed=7, window=8, retransmission=Retransmission()):
        self.clock = task.Clock()
        self.sent: list[bytes] = []
        self.chunks = make_chunks(parts)
        self.sender = DaySender(
            self.chunks, self.sent.append, self.clock, retransmission, rng=random.Random(seed), window=window
        )
        self.results: list = []
        self.done = self.sender.start()
        self.done.addBoth(self.results.append)

    def parts_sent(self) -> list[int]:
        return [wire.decode(datagram).part for datagram in self.sent]

    def ack(self, part: int, status: str = "ok", reason: str = "", xfer: str = XFER) -> None:
        self.sender.ack_received(wire.DayAck(xfer, part, status, reason))

    def failure(self) -> DeliveryFailed:
        (result,) = self.results
        assert isinstance(result.value, DeliveryFailed), result
        return result.value


def first_timeout(seed: int, params: Retransmission = Retransmission()) -> float:
    return params.ack_timeout * random.Random(seed).uniform(1.0, params.ack_random_factor)


# -- acknowledgements -------------------------------------------------------


def test_an_ack_completes_the_day():
    h = Harness()
    assert h.sent == [wire.encode(h.chunks[0])]
    assert h.results == []
    h.ack(1)
    assert h.results == [1]
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(1000)
    assert len(h.sent) == 1


def test_every_chunk_must_be_acknowledged():
    h = Harness(parts=3)
    assert h.parts_sent() == [1, 2, 3]
    h.ack(3)
    h.ack(1)
    assert h.results == []
    h.ack(2)
    assert h.results == [3]


# -- retransmission ---------------------------------------------------------


def step(clock: task.Clock) -> float:
    """
    Advance to the next scheduled call and run it; its time.  (A Clock runs
    calls scheduled during one big advance relative to its end, so a chain of
    timers is followed one call at a time.)
    """
    (call,) = clock.getDelayedCalls()
    at = call.getTime()
    clock.advance(at - clock.seconds() - 1e-9)
    assert call.active(), "ran early"
    clock.advance(at - clock.seconds())
    return at


def test_retransmissions_follow_coap_timing():
    h = Harness(seed=7)
    timeout = first_timeout(7)
    assert 2.0 <= timeout < 3.0
    # Transmissions at 0, T, 3T, 7T, 15T; failure at 31T.
    for count, multiple in enumerate([1, 3, 7, 15], start=1):
        assert len(h.sent) == count
        assert step(h.clock) == pytest.approx(multiple * timeout)
        assert len(h.sent) == count + 1
    assert set(h.sent) == {wire.encode(h.chunks[0])}
    assert h.sender.metrics.retransmissions == 4
    assert h.results == []
    assert step(h.clock) == pytest.approx(31 * timeout)
    assert str(h.failure()) == "no acknowledgement for part 1/1 after 5 transmissions"
    assert len(h.sent) == 5
    assert h.clock.getDelayedCalls() == []


@pytest.mark.parametrize("seed", range(40))
def test_first_timeout_is_between_ack_timeout_and_its_random_factor(seed):
    h = Harness(seed=seed)
    (call,) = h.clock.getDelayedCalls()
    assert 2.0 <= call.getTime() < 3.0
    assert call.getTime() == pytest.approx(first_timeout(seed))


def test_without_a_seeded_rng_the_first_timeout_is_still_in_range():
    clock = task.Clock()
    DaySender(make_chunks(), [].append, clock).start()
    (call,) = clock.getDelayedCalls()
    assert 2.0 <= call.getTime() <= 3.0


def test_configured_parameters_are_used():
    params = Retransmission(ack_timeout=1.0, ack_random_factor=1.0, max_retransmit=2)
    h = Harness(retransmission=params)
    assert [step(h.clock), step(h.clock)] == [1.0, 3.0]
    assert len(h.sent) == 3
    assert h.results == []
    assert step(h.clock) == 7.0
    assert str(h.failure()) == "no acknowledgement for part 1/1 after 3 transmissions"


def test_no_retransmission_at_all():
    h = Harness(retransmission=Retransmission(max_retransmit=0))
    h.clock.advance(3.0)
    assert len(h.sent) == 1
    assert str(h.failure()) == "no acknowledgement for part 1/1 after 1 transmissions"


def test_span_is_coaps_max_transmit_wait():
    assert Retransmission().span() == 93.0
    assert Retransmission(1.0, 1.0, 0).span() == 1.0


def test_an_ack_after_retransmissions_completes():
    h = Harness()
    step(h.clock)
    step(h.clock)
    assert len(h.sent) == 3
    h.ack(1)
    assert h.results == [1]
    assert h.sender.metrics.retransmissions == 2


# -- busy and bad -----------------------------------------------------------


def test_busy_keeps_the_chunk_and_retries_on_its_timer():
    h = Harness()
    timeout = first_timeout(7)
    h.clock.advance(0.5)
    h.ack(1, "busy", "spool full")
    assert h.results == []
    assert len(h.sent) == 1  # not at once: the backoff timer decides
    assert h.sender.metrics.busy_answers == 1
    assert step(h.clock) == pytest.approx(timeout)
    assert len(h.sent) == 2
    h.ack(1, "busy", "spool full")
    assert step(h.clock) == pytest.approx(3 * timeout)
    assert len(h.sent) == 3
    h.ack(1)
    assert h.results == [1]


def test_giving_up_after_busy_answers_says_the_gateway_was_busy():
    h = Harness()
    for _ in range(5):
        h.ack(1, "busy", "spool full")
        step(h.clock)
    assert str(h.failure()) == "gateway busy (spool full) for part 1/1 after 5 transmissions"


# -- the gateway's retry-after hint --------------------------------------------


def hinted(h: Harness, part: int, after_ms: int, reason: str = "shed: the gateway takes no new transfer now") -> None:
    h.sender.ack_received(wire.DayAck(XFER, part, "busy", reason, after_ms))


def test_a_hinted_busy_pauses_the_whole_window_for_the_hint_and_some_jitter():
    h = Harness(parts=3)
    assert h.parts_sent() == [1, 2, 3]
    h.clock.advance(0.1)
    hinted(h, 1, 10_000)
    # The whole window waits: no timer of any chunk fires meanwhile.
    (resume,) = h.clock.getDelayedCalls()
    assert 10.1 <= resume.getTime() <= 10.1 + 10 * 0.2
    h.clock.advance(resume.getTime() - h.clock.seconds() - 0.001)
    assert h.parts_sent() == [1, 2, 3]
    h.clock.advance(0.001)
    # Then every chunk not acknowledged goes again, on fresh first timers:
    # the gateway answered, so no retransmission is spent.
    assert h.parts_sent() == [1, 2, 3, 1, 2, 3]
    assert (h.sender.metrics.retransmissions, h.sender.metrics.resent_after_busy) == (0, 3)
    assert (h.sender.metrics.busy_answers, h.sender.metrics.busy_hints) == (1, 1)
    for part in (1, 2, 3):
        h.ack(part)
    assert h.results == [3]
    assert h.clock.getDelayedCalls() == []


def test_a_pause_draws_its_length_between_the_hint_and_a_fifth_more():
    lengths = []
    for seed in range(50):
        h = Harness(seed=seed)
        hinted(h, 1, 1000)
        (resume,) = h.clock.getDelayedCalls()
        lengths.append(resume.getTime())
    assert all(1.0 <= length <= 1.2 for length in lengths)
    assert max(lengths) - min(lengths) > 0.1  # drawn, not one value for all


def test_acks_during_a_pause_count_and_the_rest_waits_for_its_end():
    h = Harness(parts=3, window=2)
    hinted(h, 1, 2000)
    h.ack(2)
    # Acknowledged during the pause; part 3 does not start before its end.
    assert h.parts_sent() == [1, 2]
    h.clock.advance(2.4)
    assert h.parts_sent() == [1, 2, 1, 3]


def test_the_latest_hint_of_a_window_holds_and_a_shorter_one_does_not_shorten_it():
    h = Harness(parts=2)
    hinted(h, 1, 1000)
    hinted(h, 2, 5000)
    hinted(h, 1, 500)
    (resume,) = h.clock.getDelayedCalls()
    assert 5.0 <= resume.getTime() <= 6.0


def test_a_day_acknowledged_during_a_pause_is_done_at_once():
    h = Harness(parts=2)
    hinted(h, 1, 3000)
    h.ack(2)
    h.ack(1)  # its answer was late, not lost
    assert h.results == [2]
    assert h.clock.getDelayedCalls() == []


def test_hinted_busy_answers_do_not_spend_the_retransmissions():
    h = Harness(retransmission=Retransmission(max_retransmit=1))
    for _ in range(5):
        hinted(h, 1, 1000)
        h.clock.advance(1.2)
    assert h.results == []
    assert h.sender.metrics.retransmissions == 0
    assert len(h.sent) == 6
    h.ack(1)
    assert h.results == [1]


def test_hints_that_would_hold_the_day_past_max_busy_wait_fail_it():
    h = Harness(retransmission=Retransmission(max_busy_wait=30.0))
    hinted(h, 1, 20_000)
    h.clock.advance(24)
    assert h.results == []
    hinted(h, 1, 20_000)
    assert str(h.failure()).startswith(
        "gateway busy (shed: the gateway takes no new transfer now) for part 1/1: its hints would hold the day "
    )
    assert str(h.failure()).endswith("s, more than max_busy_wait (30 s)")
    assert h.clock.getDelayedCalls() == []


def test_a_hint_of_a_millisecond_pauses_a_tenth_of_a_second_at_least():
    h = Harness()
    hinted(h, 1, 1)
    (resume,) = h.clock.getDelayedCalls()
    assert 0.1 <= resume.getTime() <= 0.12


def test_a_bad_answer_during_a_pause_fails_the_day_and_cancels_the_pause():
    h = Harness(parts=2)
    hinted(h, 1, 1000)
    h.ack(2, "bad", "limit: too many")
    assert "limit: too many" in str(h.failure())
    assert h.clock.getDelayedCalls() == []


def test_bad_fails_the_day_with_the_reason():
    h = Harness(parts=2)
    h.ack(2, "bad", "device 1 is 192.168.1.2, not 10.0.0.9")
    assert str(h.failure()) == "gateway refused part 2/2: device 1 is 192.168.1.2, not 10.0.0.9"
    # the other chunk is not retransmitted any more
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(100)
    assert len(h.sent) == 2
    # a late ack changes nothing
    h.ack(1)
    assert len(h.results) == 1


# -- the window -------------------------------------------------------------


def test_window_limits_outstanding_chunks():
    h = Harness(parts=5, window=2)
    assert h.parts_sent() == [1, 2]
    h.ack(2)
    assert h.parts_sent() == [1, 2, 3]
    h.ack(1)
    assert h.parts_sent() == [1, 2, 3, 4]
    h.ack(4)
    assert h.parts_sent() == [1, 2, 3, 4, 5]
    h.ack(3)
    assert h.results == []
    h.ack(5)
    assert h.results == [5]


def test_each_chunk_has_its_own_timer():
    h = Harness(parts=2, window=2)
    rng = random.Random(7)
    timeouts = [2.0 * rng.uniform(1.0, 1.5) for _ in range(2)]
    h.clock.advance(0.1)
    h.ack(1)
    h.clock.advance(max(timeouts))
    assert h.parts_sent() == [1, 2, 2]


def test_window_of_one_sends_in_order():
    h = Harness(parts=3, window=1)
    for part in (1, 2, 3):
        assert h.parts_sent()[-1] == part
        h.ack(part)
    assert h.parts_sent() == [1, 2, 3]
    assert h.results == [3]


# -- stray acks -------------------------------------------------------------


def test_stray_acks_are_ignored():
    h = Harness(parts=2)
    h.ack(1, xfer="ffffffffffffffff")  # another transfer
    h.ack(3)  # no such part
    h.ack(2)
    h.ack(2)  # already acknowledged
    assert h.results == []
    assert h.sender.metrics.stray_acks == 3
    h.ack(1)
    assert h.results == [2]


def test_a_stray_bad_ack_does_not_fail_the_day():
    h = Harness()
    h.ack(1, "bad", "forged", xfer="ffffffffffffffff")
    assert h.results == []
    h.ack(1)
    assert h.results == [1]


# -- the protocol -----------------------------------------------------------


class RecordingSender:
    def __init__(self):
        self.acks = []

    def ack_received(self, ack):
        self.acks.append(ack)


def connected_protocol():
    protocol = DeviceProtocol(GATEWAY, KEY)
    transport = FakeDatagramTransport()
    protocol.makeConnection(transport)
    protocol.sender = RecordingSender()
    return protocol, transport


ACK = wire.DayAck(XFER, 1, "ok")


def test_protocol_sends_sealed_datagrams_to_the_gateway():
    protocol, transport = connected_protocol()
    protocol.send(b"meter/1 PING seq=1")
    assert transport.written == [(wire.seal(b"meter/1 PING seq=1", KEY), GATEWAY)]


def test_protocol_hands_acks_from_the_gateway_to_the_sender():
    protocol, _ = connected_protocol()
    protocol.datagramReceived(wire.seal(wire.encode(ACK), KEY), GATEWAY)
    assert protocol.sender.acks == [ACK]


@pytest.mark.parametrize("addr", [("127.0.0.2", 10005), ("127.0.0.1", 10006), ("::1", 10005)])
def test_protocol_ignores_datagrams_from_other_addresses(addr):
    protocol, transport = connected_protocol()
    protocol.datagramReceived(wire.seal(wire.encode(ACK), KEY), addr)
    assert protocol.sender.acks == []
    assert protocol.metrics.foreign_datagrams == 1
    assert transport.written == []


@pytest.mark.parametrize(
    "data",
    [
        wire.encode(ACK),  # not sealed
        wire.seal(wire.encode(ACK), bytes(32)),  # sealed with another key
        wire.seal(b"garbage", KEY),
    ],
    ids=["unsealed", "wrong key", "garbage"],
)
def test_protocol_refuses_unauthenticated_or_malformed_datagrams(data):
    protocol, _ = connected_protocol()
    protocol.datagramReceived(data, GATEWAY)
    assert protocol.sender.acks == []
    assert protocol.metrics.refused_datagrams == 1


def test_protocol_hands_a_hinted_busy_to_the_sender():
    protocol, _ = connected_protocol()
    ack = wire.DayAck(XFER, 1, "busy", "", 1500)
    protocol.datagramReceived(wire.seal(wire.encode(ack), KEY), GATEWAY)
    assert protocol.sender.acks == [ack]


def test_an_answer_with_a_field_the_device_does_not_know_is_no_answer():
    # What a device of before the retry-after hint does with one (its
    # decoder refuses any field it does not know, as this one refuses a
    # field newer than itself): the answer is counted as refused and the
    # chunk goes again on its CoAP timer.
    clock = task.Clock()
    protocol, transport = connected_protocol()
    sender = DaySender(make_chunks(), protocol.send, clock, rng=random.Random(7), metrics=protocol.metrics)
    protocol.sender = sender
    sender.start()
    answer = wire.encode(wire.DayAck(XFER, 1, "busy")) + b" later=1500"
    protocol.datagramReceived(wire.seal(answer, KEY), GATEWAY)
    assert protocol.metrics.refused_datagrams == 1
    assert protocol.metrics.busy_answers == 0
    clock.advance(first_timeout(7))
    assert len(transport.written) == 2
    assert sender.metrics.retransmissions == 1


def test_protocol_ignores_other_messages_and_acks_without_a_sender():
    protocol, _ = connected_protocol()
    protocol.datagramReceived(wire.seal(wire.encode(wire.Ping(1)), KEY), GATEWAY)
    assert protocol.sender.acks == []
    protocol.sender = None
    protocol.datagramReceived(wire.seal(wire.encode(ACK), KEY), GATEWAY)  # no error


def test_sender_and_protocol_deliver_a_day_together():
    clock = task.Clock()
    protocol = DeviceProtocol(GATEWAY, KEY)
    transport = FakeDatagramTransport()
    protocol.makeConnection(transport)
    chunks = make_chunks(2)
    protocol.sender = DaySender(chunks, protocol.send, clock, rng=random.Random(1))
    results = []
    protocol.sender.start().addCallback(results.append)
    assert [wire.decode(wire.unseal(data, KEY)) for data, _ in transport.written] == chunks
    for chunk in chunks:
        protocol.datagramReceived(wire.seal(wire.encode(wire.DayAck(chunk.xfer, chunk.part, "ok")), KEY), GATEWAY)
    assert results == [2]


# -- metrics ----------------------------------------------------------------


def test_metrics_render_as_logfmt_in_field_order():
    metrics = DeviceMetrics(retransmissions=4, busy_answers=1)
    assert metrics.logfmt() == (
        "retransmissions=4 busy_answers=1 stray_acks=0 foreign_datagrams=0 refused_datagrams=0 "
        "days_delivered=0 days_failed=0 busy_hints=0 resent_after_busy=0"
    )


def test_sender_and_protocol_count_into_one_metrics_object():
    metrics = DeviceMetrics()
    clock = task.Clock()
    protocol = DeviceProtocol(GATEWAY, KEY, metrics)
    protocol.makeConnection(FakeDatagramTransport())
    protocol.sender = DaySender(make_chunks(), protocol.send, clock, rng=random.Random(1), metrics=metrics)
    protocol.sender.start()
    protocol.datagramReceived(b"noise", GATEWAY)
    protocol.datagramReceived(wire.seal(wire.encode(wire.DayAck(XFER, 1, "busy", "spool full")), KEY), GATEWAY)
    step(clock)
    assert (metrics.refused_datagrams, metrics.busy_answers, metrics.retransmissions) == (1, 1, 1)


# -- one day's delivery -----------------------------------------------------


class Delivery:
    """
    A SurveyDelivery on a FakeDatagramTransport and a Clock, reading
    C{survey} as device 1's file.
    """

    def __init__(self, folder, survey: str | None = "08:00 - 20 - 30%\n12:00 - 25 - 33%\n"):
        if survey is not None:
            (folder / "device1.txt").write_text(survey)
        self.folder = folder
        self.clock = task.Clock()
        self.clock.advance(1772400000)
        self.protocol = DeviceProtocol(GATEWAY, KEY)
        self.transport = FakeDatagramTransport()
        self.protocol.makeConnection(self.transport)
        params = Retransmission(ack_timeout=1.0, ack_random_factor=1.0, max_retransmit=1)
        self.send = SurveyDelivery(self.protocol, self.clock, 1, "192.168.1.2", folder, 1200, params)
        self.results: list = []

    def start(self, day=DAY) -> None:
        self.send(day).addBoth(self.results.append)

    def chunks(self) -> list[wire.DayChunk]:
        return [wire.decode(wire.unseal(data, KEY)) for data, _ in self.transport.written]

    def ack_all(self) -> None:
        for chunk in self.chunks():
            ack = wire.DayAck(chunk.xfer, chunk.part, "ok")
            self.protocol.datagramReceived(wire.seal(wire.encode(ack), KEY), GATEWAY)


def test_a_delivery_sends_the_days_survey_and_fires_with_its_chunks(tmp_path):
    d = Delivery(tmp_path)
    with capturedLogs() as events:
        d.start()
        (chunk,) = d.chunks()
        assert [r.console_line() for r in chunk.readings] == ["192.168.1.2 - 08:00 - 20 - 30%", "192.168.1.2 - 12:00 - 25 - 33%"]
        assert (chunk.device_id, chunk.day) == (1, DAY)
        d.ack_all()
    assert d.results == [1]
    assert d.protocol.metrics.days_delivered == 1
    lines = [formatEvent(event) for event in events]
    assert "device 1 (192.168.1.2) sending 2 readings of 2026-03-01 to 127.0.0.1:10005 in 1 datagrams" in lines[0]
    # for people, a clock time with its zone; for programs, the number
    assert lines[0].endswith(f"send started at {iso_time(1772400000.0)}")
    assert events[0]["at"] == 1772400000.0
    assert lines[-1] == (
        "device 1: gateway acknowledged all 1 datagrams in 0.0 ms after 0 retransmissions; since start "
        "retransmissions=0 busy_answers=0 stray_acks=0 foreign_datagrams=0 refused_datagrams=0 days_delivered=1 "
        "days_failed=0 busy_hints=0 resent_after_busy=0"
    )


def test_a_delivery_that_is_not_acknowledged_fails_saying_so_and_logs_the_metrics(tmp_path):
    d = Delivery(tmp_path)
    with capturedLogs() as events:
        d.start()
        d.clock.advance(1)
        d.clock.advance(2)
    (failure,) = d.results
    assert failure.check(DeliveryFailed)
    assert failure.getErrorMessage() == "day not delivered: no acknowledgement for part 1/1 after 2 transmissions"
    assert d.protocol.metrics.days_failed == 1
    assert formatEvent(events[-1]).startswith(
        "device 1: giving up after 1 retransmissions; since start retransmissions=1 busy_answers=0 "
    )
    # A later day's lines count its own retransmissions apart from the
    # process's: none this time, one since start.
    with capturedLogs() as events:
        d.start()
        d.ack_all()
    assert formatEvent(events[-1]).startswith(
        "device 1: gateway acknowledged all 1 datagrams in 0.0 ms after 0 retransmissions; since start "
        "retransmissions=1 "
    )


def test_a_delivery_of_an_unreadable_survey_fails_at_once_and_sends_nothing(tmp_path):
    d = Delivery(tmp_path, "08:00 - 20 - 30%\n08:00 - 21 - 31%\n")
    d.start()
    (failure,) = d.results
    assert failure.check(DeliveryFailed)
    assert failure.getErrorMessage() == (
        f"cannot read the day's survey: {tmp_path / 'device1.txt'}:2: time 08:00 already read at line 1"
    )
    assert d.transport.written == []
    assert d.protocol.metrics.days_failed == 1


def test_each_delivery_has_its_own_transfer(tmp_path):
    d = Delivery(tmp_path)
    d.start()
    d.ack_all()
    d.start(DAY + datetime.timedelta(days=1))
    first, second = d.chunks()
    assert first.xfer != second.xfer
    assert second.day == DAY + datetime.timedelta(days=1)


# -- the tap: the service tree ----------------------------------------------


class UDPReactor(MemoryReactorClock):
    """
    A MemoryReactorClock that binds UDP ports to FakeDatagramTransports.
    """

    def __init__(self):
        super().__init__()
        self.udp: list[tuple[object, dict]] = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        transport = FakeDatagramTransport()
        transport.stopListening = lambda: None
        protocol.makeConnection(transport)
        self.udp.append((protocol, {"port": port, "interface": interface, "maxPacketSize": maxPacketSize}))
        return transport


def device_service(tmp_path, *args):
    surveys = tmp_path / "surveys"
    surveys.mkdir()
    (surveys / "device2.txt").write_text("08:00 - 20 - 30%\n")
    options = device_tap.Options()
    options.parseOptions(["--id", "2", "--secrets", str(tmp_path / "secrets"), "--surveys", str(surveys), *args])
    reactor = UDPReactor()
    reactor.advance(1772400000)
    return reactor, device_tap.build(options, reactor), options


def test_the_tree_is_the_udp_port_then_the_schedule(repo_root, tmp_path):
    reactor, service, options = device_service(tmp_path)
    udp, schedule, readiness = list(service)
    assert type(udp).__name__ == "UDPServer" and isinstance(schedule, device_tap.ScheduleService)
    assert isinstance(readiness, ReadinessService)  # last: READY=1 once the others started
    assert reactor.udp == []  # nothing bound or sent before the service starts
    service.startService()
    ((protocol, listen),) = reactor.udp
    assert listen == {"port": 0, "interface": "0.0.0.0", "maxPacketSize": wire.MAX_DATAGRAM}
    ((data, to),) = protocol.transport.written
    chunk = wire.decode(wire.unseal(data, options.key))
    assert (chunk.device_id, chunk.device_ip, to) == (2, "192.168.1.3", options.config.device["gateway"])
    protocol.datagramReceived(wire.seal(wire.encode(wire.DayAck(chunk.xfer, 1, "ok")), options.key), to)
    assert schedule.schedule.next_at is not None  # the next daily send
    service.stopService()
    assert reactor.getDelayedCalls() == []
    assert not reactor.hasStopped


def test_once_stops_the_reactor_once_the_day_is_delivered(repo_root, tmp_path):
    reactor, service, options = device_service(tmp_path, "--once")
    service.startService()
    ((protocol, _),) = reactor.udp
    ((data, to),) = protocol.transport.written
    chunk = wire.decode(wire.unseal(data, options.key))
    protocol.datagramReceived(wire.seal(wire.encode(wire.DayAck(chunk.xfer, 1, "ok")), options.key), to)
    assert reactor.hasStopped
    assert "shutdown" not in reactor.triggers.get("after", {})  # exits 0, as twistd does


def test_once_with_an_unreadable_survey_exits_non_zero_once_the_reactor_runs(repo_root, tmp_path):
    reactor, service, options = device_service(tmp_path, "--once")
    (tmp_path / "surveys" / "device2.txt").write_text("noon - 20 - 30%\n")
    service.startService()
    assert not reactor.hasStopped  # the reactor is not running yet
    # The stop first, then meter.notify's READY=1 (sent only under systemd).
    assert [hook[:2] for hook in reactor.whenRunningHooks][0] == (device_tap.stop_reactor, (reactor,))
    assert len(reactor.triggers["after"]["shutdown"]) == 1  # the exit with status 1
