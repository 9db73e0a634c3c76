"""
meter.tools.loadgen: the synthetic day its simulated devices send, and its
summary figures.  (The bench, bench/run.py, drives the real daemons with it.)
"""

from __future__ import annotations

import datetime
import gc

import pytest
import pytest_twisted

from meter import wire
from meter.device.schedule import offset_for
from meter.tools.loadgen import (
    DayLibrary,
    collector_paused,
    latency_summary,
    latency_tail,
    merge_summaries,
    start_order,
    synthetic_day,
    tail_text,
)
from meter.reading import HUMIDITY_RANGE, TEMPERATURE_RANGE, Reading, format_number

DAY = datetime.date(2026, 3, 1)
IP = "10.0.0.7"


def test_same_seed_same_day():
    assert synthetic_day(7, IP, DAY, 96, seed=3) == synthetic_day(7, IP, DAY, 96, seed=3)


def test_seed_and_device_change_the_day():
    base = synthetic_day(7, IP, DAY, 96, seed=3)
    assert synthetic_day(7, IP, DAY, 96, seed=4) != base
    other = synthetic_day(8, "10.0.0.8", DAY, 96, seed=3)
    assert [r.temperature_c for r in other] != [r.temperature_c for r in base]


@pytest.mark.parametrize("count, step", [(96, 15), (1440, 1)])
def test_count_and_distinct_evenly_spaced_times(count, step):
    day = synthetic_day(7, IP, DAY, count)
    assert len(day) == count
    times = [r.taken_at for r in day]
    assert len(set(times)) == count
    assert times == sorted(times)
    assert times[0] == datetime.datetime(2026, 3, 1, 0, 0)
    assert all((b - a) == datetime.timedelta(minutes=step) for a, b in zip(times, times[1:]))
    assert {t.date() for t in times} == {DAY}


@pytest.mark.parametrize("device_id", range(1, 60))
def test_within_sensor_ranges_and_one_decimal(device_id):
    for reading in synthetic_day(device_id, IP, DAY, 96, seed=11):
        assert reading.device_id == device_id and reading.device_ip == IP
        assert TEMPERATURE_RANGE[0] <= reading.temperature_c <= TEMPERATURE_RANGE[1]
        assert HUMIDITY_RANGE[0] <= reading.humidity_pct <= HUMIDITY_RANGE[1]
        for value in (reading.temperature_c, reading.humidity_pct):
            assert round(value, 1) == value
            assert format_number(value) != "-0"


def test_a_plausible_diurnal_curve():
    day = synthetic_day(5, IP, DAY, 96, seed=2)
    temperature = [r.temperature_c for r in day]
    # Warmest in the afternoon, coolest at night; a day's swing of a few degrees.
    warmest = day[temperature.index(max(temperature))].taken_at.hour
    coolest = day[temperature.index(min(temperature))].taken_at.hour
    assert 10 <= warmest <= 20
    assert coolest <= 9 or coolest >= 22
    assert 2 <= max(temperature) - min(temperature) <= 20


@pytest.mark.parametrize("count", [96, 1440])
def test_the_day_goes_on_the_wire(count):
    day = synthetic_day(3, IP, DAY, count)
    chunks = wire.split_day(3, IP, DAY, day, "0123456789abcdef", 1772400000)
    decoded = [wire.decode(wire.encode(chunk)) for chunk in chunks]
    assert tuple(r for chunk in decoded for r in chunk.readings) == day


@pytest.mark.parametrize("count", [96, 1440])
@pytest.mark.parametrize("widest", [(7, IP), (99_999, "10.1.134.159"), (4_000_000_000, "fd00:1234:5678:9abc:def0:1234:5678:9abc")])
def test_the_library_cuts_a_day_as_the_wire_does(count, widest):
    # Formatted from tables, the texts must be what the device's own code
    # makes of the same readings, for the longest header of the fleet.
    library = DayLibrary(count, seed=5)
    for device_id in (1, 2, 3, 50):
        # The device's day, as the device with the widest header would send it.
        day = [Reading(widest[0], widest[1], r.taken_at, r.temperature_c, r.humidity_pct)
               for r in library.readings_of(device_id, IP, DAY)]
        texts = library.chunk_records(device_id, widest, DAY)
        assert texts == wire.day_chunk_records(widest[0], widest[1], DAY, tuple(day))


def test_devices_of_one_library_day_share_its_texts():
    library = DayLibrary(96, seed=1, shapes=3)
    by_shape = {}
    for device_id in range(1, 40):
        texts = library.chunk_records(device_id, (99, IP), DAY)
        assert by_shape.setdefault(library.shape_of(device_id), texts) is texts
    assert len(by_shape) == 3


def test_readings_out_of_bounds_are_refused():
    with pytest.raises(ValueError):
        synthetic_day(1, IP, DAY, 0)
    with pytest.raises(ValueError):
        synthetic_day(1, IP, DAY, 1441)


def _part(**counts):
    summary = {key: 0 for key in ("devices", "sockets", "started", "delivered", "failed", "incomplete", "readings_sent",
                                  "readings_acked", "chunks", "chunks_acked", "datagrams_sent", "retransmissions",
                                  "busy_answers", "stray_acks", "attempts", "gave_up", "retries", "retried_devices",
                                  "loadgen_cpu_s", "loadgen_sending_cpu_s", "loadgen_max_rss_mb", "prepare_s")}
    summary.update({"first_id": 1, "pooled_sockets": False, "timed_out": False, "failed_devices": [],
                    "incomplete_devices": [], "first_send": None, "last_ack": None, "relay": None}, **counts)
    return summary


def test_the_summaries_of_several_processes_make_one():
    parts = [
        _part(devices=3, delivered=3, readings_acked=288, chunks_acked=6, first_id=1, first_send=100.0, last_ack=110.0,
              loadgen_cpu_s=1.5, loadgen_max_rss_mb=50.0, first_start=100.0, last_start=104.0),
        _part(devices=2, delivered=1, failed=1, readings_acked=96, chunks_acked=2, first_id=2, first_send=100.5,
              last_ack=112.0, loadgen_cpu_s=1.0, loadgen_max_rss_mb=60.0, failed_devices=[{"id": 4, "reason": "no"}],
              timed_out=True, first_start=100.5, last_start=104.5),
    ]
    merged = merge_summaries(parts, [i / 1000 for i in range(1, 51)], [i / 1000 for i in range(51, 101)],
                             [100.0 + i / 10 for i in range(50)])
    assert merged["devices"] == 5 and merged["delivered"] == 4 and merged["failed"] == 1
    assert merged["readings_acked"] == 384 and merged["loadgen_cpu_s"] == 2.5
    assert merged["first_id"] == 1 and merged["timed_out"] is True
    assert merged["failed_devices"] == [{"id": 4, "reason": "no"}]
    assert merged["first_send"] == 100.0 and merged["last_ack"] == 112.0 and merged["duration_s"] == 12.0
    assert merged["readings_per_s"] == 32.0
    assert (merged["first_start"], merged["last_start"]) == (100.0, 104.5)
    # Percentiles of every process's latencies together, not of one.
    assert merged["ack_latency_ms"]["count"] == 50 and merged["ack_latency_ms"]["max"] == 50.0
    assert merged["ack_latency_handled_ms"]["p50"] == 75.0
    # the tail of them all too: 11..50 ms are over 10, sent from 1.0 s on
    assert merged["ack_tail"]["chunks_over"] == 40 and merged["ack_tail"]["seconds"] == 5
    assert merged["loadgen_max_rss_mb"] == 60.0 and merged["processes"] == 2


def test_the_tail_says_in_which_seconds_the_slow_acknowledgements_were_sent():
    # Three seconds of 100 chunks each: second 0 all fast, second 1 one
    # slow (a hundredth), second 2 thirty slow (a stall).
    sent_at, seconds = [], []
    for second, slow in ((0, 0), (1, 1), (2, 30)):
        for i in range(100):
            sent_at.append(1000.0 + second + i / 100)
            seconds.append(0.050 if i < slow else 0.002)
    tail = latency_tail(sent_at, seconds)
    assert tail["count"] == 300 and tail["chunks_over"] == 31 and tail["share_over"] == round(31 / 300, 5)
    assert tail["seconds"] == 3 and tail["seconds_with_any_over"] == 2 and tail["seconds_over_p99"] == 2
    assert tail["worst_seconds"] == [{"second": 2, "chunks": 100, "over": 30}, {"second": 1, "chunks": 100, "over": 1}]
    assert tail["worst_share"] == 1.0
    assert latency_tail(sent_at, seconds, over_ms=40.0, worst=1)["worst_share"] == round(30 / 31, 3)
    # exactly at the bound is not over it
    assert latency_tail([1.0], [0.010])["chunks_over"] == 0
    assert latency_tail([], []) == {"over_ms": 10.0, "count": 0}
    line = tail_text(tail)
    assert line.startswith("chunks acknowledged after over 10 ms: 31 of 300 (10.33 %), sent in 2 of 3 seconds; ")
    assert line.endswith("second 2: 30 of 100, second 1: 1 of 100")
    assert tail_text({"count": 0}) == "no chunks acknowledged"


def test_latency_summary_nearest_rank():
    seconds = sorted(i / 1000 for i in range(1, 101))
    summary = latency_summary(seconds)
    assert summary["count"] == 100
    assert summary["p50"] == 50.0
    assert summary["p99"] == 99.0
    assert summary["max"] == 100.0
    assert latency_summary([]) == {"count": 0}


@pytest.mark.parametrize("enabled_before", [True, False])
def test_the_collector_is_paused_while_the_fleet_sends_and_restored_after(enabled_before):
    (gc.enable if enabled_before else gc.disable)()
    try:
        with collector_paused():
            assert not gc.isenabled()
            assert gc.get_freeze_count() > 0
        assert gc.isenabled() is enabled_before
        assert gc.get_freeze_count() == 0
    finally:
        gc.enable()
        gc.unfreeze()


def test_refuses_a_gateway_that_is_not_loopback(tmp_path, capsys):
    from meter.tools import loadgen

    status = loadgen.main(["--config", str(tmp_path / "none.toml"), "--devices", "1"])
    assert status == 2  # no such configuration file
    (tmp_path / "meter.toml").write_text('[fleet]\n1 = "10.0.0.1"\n')
    status = loadgen.main(["--config", str(tmp_path / "meter.toml"), "--devices", "1", "--gateway", "10.1.2.3:10005"])
    assert status == 2
    assert "not a loopback address" in capsys.readouterr().err


@pytest.mark.e2e
def test_loadgen_delivers_a_fleet_through_the_real_daemons(make_suite):
    from meter.tools.suite import loadgen_summary

    suite = make_suite(5)
    cloud = suite.start_cloud()
    suite.start_gateway(connected=True)
    loadgen = suite.run("loadgen", suite.loadgen_command(suite.root / "loadgen.json", "--devices", "5", "--spread", "0",
                                                         "--timeout", "30"))
    summary = loadgen_summary(loadgen)
    assert loadgen.process.returncode == 0, loadgen.tail()
    assert summary["delivered"] == 5 and summary["failed"] == 0
    assert summary["readings_acked"] == 5 * 96
    assert summary["ack_latency_ms"]["count"] == summary["chunks_acked"] == summary["chunks"]
    suite.wait_stored(5 * 96, cloud)
    day = datetime.date.fromisoformat(summary["day"])
    rows = suite.stored()
    expected = sorted(
        (r.device_id, r.device_ip, r.taken_at.isoformat(timespec="minutes"), r.temperature_c, r.humidity_pct)
        for device_id, address in suite.fleet.items()
        for r in synthetic_day(device_id, address, day, 96, seed=1)
    )
    assert rows == expected


@pytest_twisted.ensureDeferred
async def test_the_stamped_port_gives_each_datagram_its_kernel_receive_time():
    import socket
    import time

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.protocol import DatagramProtocol

    from meter.tools.loadgen import _stamped_port_class

    class Run:
        arrived_at = None

    run = Run()
    seen = Deferred()

    class Recorder(DatagramProtocol):
        def datagramReceived(self, data, addr):
            seen.callback((data, addr, run.arrived_at, time.time()))

    port = _stamped_port_class()(run, 0, Recorder(), "127.0.0.1", 65535, reactor)
    port.startListening()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sender.bind(("127.0.0.1", 0))
        source = sender.getsockname()
        before = time.time()
        sender.sendto(b"ack", ("127.0.0.1", port.getHost().port))
        data, addr, arrived_at, handled = await seen
    finally:
        sender.close()
        await port.stopListening()
    assert (data, addr) == (b"ack", source)
    assert arrived_at is not None and before - 0.001 <= arrived_at <= handled
    # Only while the datagram is handled.
    assert run.arrived_at is None


class _Written:
    """
    A UDP transport that keeps what is written to it.
    """

    def __init__(self):
        self.written: list[tuple[bytes, tuple]] = []

    def write(self, data, to):
        self.written.append((data, to))


class _RelayReactor:
    """
    The clock and the UDP ports the relay asks for, in memory.
    """

    def __init__(self):
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.callLater = self.clock.callLater
        self.upstreams = []

    def listenUDP(self, port, protocol, interface, maxPacketSize):
        protocol.transport = _Written()
        self.upstreams.append(protocol)
        return protocol.transport


def relay_of(loss=0.0, dup=0.0, delay=0.0, seed=7):
    import random

    from meter.tools.loadgen import LossyRelay

    reactor = _RelayReactor()
    relay = LossyRelay(reactor, ("127.0.0.1", 10005), loss, dup, delay, random.Random(seed))
    relay.transport = _Written()
    return relay, reactor


def test_the_relay_passes_datagrams_both_ways_through_a_socket_per_device():
    relay, reactor = relay_of()
    relay.datagramReceived(b"one", ("127.0.0.1", 4001))
    relay.datagramReceived(b"two", ("127.0.0.1", 4002))
    relay.datagramReceived(b"three", ("127.0.0.1", 4001))
    reactor.clock.advance(0)
    first, second = reactor.upstreams
    assert first.transport.written == [(b"one", ("127.0.0.1", 10005)), (b"three", ("127.0.0.1", 10005))]
    assert second.transport.written == [(b"two", ("127.0.0.1", 10005))]
    second.datagramReceived(b"ack", ("127.0.0.1", 10005))
    reactor.clock.advance(0)
    assert relay.transport.written == [(b"ack", ("127.0.0.1", 4002))]
    assert relay.counters == {"up_received": 3, "up_sent": 3, "down_received": 1, "down_sent": 1}


def test_the_relay_drops_and_doubles_its_share_of_datagrams_and_reorders_them():
    relay, reactor = relay_of(loss=0.3, dup=0.1, delay=0.05)
    for n in range(2000):
        relay.datagramReceived(b"%d" % n, ("127.0.0.1", 4001))
    reactor.clock.advance(0.05)
    c = relay.counters
    assert 0.25 < c["up_dropped"] / c["up_received"] < 0.35
    assert 0.05 < c["up_duplicated"] / (c["up_received"] - c["up_dropped"]) < 0.15
    assert c["up_sent"] == c["up_received"] - c["up_dropped"] + c["up_duplicated"]
    sent = [int(data) for data, _ in reactor.upstreams[0].transport.written]
    assert sent != sorted(sent)


def test_the_relays_choices_follow_its_seed():
    runs = []
    for _ in range(2):
        relay, reactor = relay_of(loss=0.3, dup=0.1, delay=0.05, seed=11)
        for n in range(200):
            relay.datagramReceived(b"%d" % n, ("127.0.0.1", 4001))
        reactor.clock.advance(0.05)
        runs.append(reactor.upstreams[0].transport.written)
    assert runs[0] == runs[1]


@pytest.mark.e2e
def test_two_loadgen_processes_deliver_one_fleet_with_one_summary(make_suite):
    from meter.tools.suite import loadgen_summary

    suite = make_suite(6, None)
    cloud = suite.start_cloud()
    suite.start_gateway(connected=True)
    loadgen = suite.run("loadgen", suite.loadgen_command(suite.root / "loadgen.json", "--devices", "6", "--spread", "0.5",
                                                         "--processes", "2", "--timeout", "30"))
    summary = loadgen_summary(loadgen)
    assert loadgen.process.returncode == 0, loadgen.tail()
    assert summary["processes"] == 2 and [p["devices"] for p in summary["per_process"]] == [3, 3]
    assert summary["delivered"] == 6 and summary["readings_acked"] == 6 * 96
    assert summary["ack_latency_ms"]["count"] == summary["chunks_acked"] == summary["chunks"]
    suite.wait_stored(6 * 96, cloud)
    day = datetime.date.fromisoformat(summary["day"])
    expected = sorted(
        (r.device_id, r.device_ip, r.taken_at.isoformat(timespec="minutes"), r.temperature_c, r.humidity_pct)
        for device_id, address in suite.fleet.items()
        for r in synthetic_day(device_id, address, day, 96, seed=1)
    )
    assert suite.stored() == expected


@pytest.mark.e2e
def test_a_device_whose_sender_gave_up_tries_its_day_again(make_suite):
    # No gateway yet: every device's first attempt runs out of
    # retransmissions; the gateway then starts, and the next attempts
    # deliver every day, stored once.
    from meter.tools.suite import loadgen_summary

    suite = make_suite(3, None)
    cloud = suite.start_cloud()
    loadgen = suite.run("loadgen", suite.loadgen_command(
        suite.root / "loadgen.json", "--devices", "3", "--spread", "0", "--ack-timeout", "0.1", "--max-retransmit", "1",
        "--attempts", "50", "--retry-after", "0.2", "--timeout", "30"))
    loadgen.wait_for("retransmitting", 10)
    suite.start_gateway(connected=True)
    summary = loadgen_summary(loadgen)
    assert loadgen.process.returncode == 0, loadgen.tail()
    assert summary["delivered"] == 3 and summary["failed"] == 0
    assert summary["retried_devices"] == 3 and summary["attempts"] > 3 and summary["gave_up"] == summary["attempts"] - 3
    assert summary["readings_acked"] == 3 * 96
    suite.wait_stored(3 * 96, cloud)
    assert len(suite.stored()) == 3 * 96


def test_a_device_that_gave_up_tries_later_but_a_fault_of_its_code_fails_it():
    from types import SimpleNamespace

    from twisted.internet.task import Clock
    from twisted.python.failure import Failure

    from meter import device
    from meter.tools.loadgen import SimDevice

    finished = []
    clock = Clock()
    run = SimpleNamespace(target=("127.0.0.1", 9), metrics=device.DeviceMetrics(), gave_up=0, attempts=3,
                          retry_after=300.0, reactor=clock, finished=finished.append)
    gave_up = SimDevice(run, 1, IP, b"k" * 32, ["00:00,1,2"], (1,), 0.0)
    gave_up.attempts = 1
    gave_up._not_delivered(Failure(device.DeliveryFailed("no acknowledgement for part 1/1")))
    assert gave_up.outcome is None and finished == [] and run.gave_up == 1
    assert [call.getTime() for call in clock.getDelayedCalls()] == [300.0]

    broken = SimDevice(run, 2, IP, b"k" * 32, ["00:00,1,2"], (1,), 0.0)
    broken.attempts = 1
    broken._not_delivered(Failure(ZeroDivisionError("division by zero")))
    assert broken.outcome == "failed" and "division by zero" in broken.reason and finished == [broken]
    assert run.gave_up == 1 and len(clock.getDelayedCalls()) == 1


def test_devices_start_in_the_order_their_daemons_schedule_sends_them():
    ids = list(range(1, 201))
    order = start_order(ids)
    assert sorted(order) == ids
    # meter-device's offsets within any window put them in this order,
    # which is not the order of their ids.
    assert [offset_for(i, 3600.0) for i in order] == sorted(offset_for(i, 3600.0) for i in ids)
    assert order != ids
