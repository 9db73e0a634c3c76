"""
meter.gateway.shedding: the controller on the times a task.Clock gives it
(it takes the time as an argument), and the port that reads the kernel's
receive timestamps on a real socket.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import socket
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger, formatEvent

from meter.device import previous_day
from meter.gateway.metrics import GatewayMetrics
from meter.gateway.shedding import MIN_HINT, QUIET, Shedding
from meter.stamps import StampedPort, stamps_available
from meter.tools.suite import label_address, loadgen_summary


class Controller:
    """
    A controller, its metrics, its log lines, and a clock to step it by.
    """

    def __init__(self, **kw):
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.metrics = GatewayMetrics()
        self.events: list[dict] = []
        #: The process's CPU seconds, as the controller reads them.
        self.cpu = 0.0
        kw.setdefault("target", 0.005)
        self.shedding = Shedding(self.metrics, log=Logger(observer=self.events.append), cpu=lambda: self.cpu, **kw)

    def datagrams(self, seconds: float, sojourn: float, every: float = 0.001) -> None:
        """
        Datagrams for C{seconds}, one every C{every}, each having waited
        C{sojourn} in the queue.
        """
        for _ in range(round(seconds / every)):
            self.clock.advance(every)
            self.shedding.observe(self.clock.seconds(), sojourn)

    def lines(self) -> list[str]:
        return [formatEvent(event) for event in self.events]


def test_a_short_burst_over_target_does_not_shed():
    c = Controller()
    c.datagrams(0.09, 0.050)
    assert not c.shedding.shedding
    c.datagrams(0.001, 0.001)  # the queue emptied: the burst is over
    c.datagrams(0.09, 0.050)
    assert not c.shedding.shedding
    assert c.metrics.shed_episodes == 0


def test_a_queue_standing_over_target_for_an_interval_sheds_until_a_datagram_waits_less():
    c = Controller()
    c.datagrams(0.101, 0.006)
    assert c.shedding.shedding and c.metrics.shed_episodes == 1
    c.datagrams(0.5, 0.006)
    assert c.shedding.shedding
    c.datagrams(0.001, 0.004)
    assert not c.shedding.shedding


def test_the_target_and_interval_are_configurable():
    c = Controller(target=0.050, interval=0.5)
    c.datagrams(1.0, 0.040)
    assert not c.shedding.shedding
    c.datagrams(0.499, 0.060)
    assert not c.shedding.shedding
    c.datagrams(0.002, 0.060)
    assert c.shedding.shedding


def test_a_disabled_controller_never_sheds_and_gives_no_hint():
    c = Controller(enabled=False)
    c.datagrams(2.0, 1.0)
    assert not c.shedding.shedding
    assert c.shedding.queue_delay == 1.0  # it still measures
    assert c.shedding.hint(c.clock.seconds()) is None


def test_hints_reserve_a_slot_a_chunk_at_the_measured_rate():
    c = Controller()
    c.datagrams(0.2, 0.010)
    now = c.clock.seconds()
    hints = [c.shedding.shed(now, device_id, 0.010) for device_id in range(1, 101)]
    # The first waits the shortest hint; each next one a chunk's time more.
    assert hints[0] == MIN_HINT * 1000
    assert hints[-1] - hints[0] == pytest.approx(99 / c.shedding.rate * 1000, abs=1)
    assert hints == sorted(hints)
    assert c.metrics.shed == 100


def test_a_hint_is_at_least_the_wait_of_the_queue():
    c = Controller()
    c.datagrams(0.2, 3.0)
    assert c.shedding.shed(c.clock.seconds(), 1, 3.0) == 3000


def test_hints_stop_at_the_longest():
    c = Controller(max_hint=2.0)
    c.datagrams(0.2, 0.010)
    now = c.clock.seconds()
    hints = [c.shedding.shed(now, device_id, 0.010) for device_id in range(1, 2001)]
    assert max(hints) == 2000


def test_the_rate_is_measured_in_chunks_committed_a_cpu_second():
    c = Controller()
    for _ in range(30):
        c.metrics.chunks += 150  # 150 chunks in 0.05 CPU seconds: 3,000 a CPU second
        c.cpu += 0.05
        c.datagrams(0.1, 0.001)
    assert c.shedding.rate == pytest.approx(3000, rel=0.01)
    # Whether the gateway was saturated or not, and whatever it let in:
    # what a chunk costs it is what it can take.
    for _ in range(30):
        c.metrics.chunks += 40
        c.cpu += 0.01
        c.datagrams(0.1, 0.050)
    assert c.shedding.rate == pytest.approx(4000, rel=0.01)
    # Too few chunks in an interval measure nothing.
    for _ in range(30):
        c.metrics.chunks += 5
        c.cpu += 0.05
        c.datagrams(0.1, 0.050)
    assert c.shedding.rate == pytest.approx(4000, rel=0.01)


def test_a_device_back_at_its_slot_is_let_in_while_shedding_goes_on():
    c = Controller()
    c.datagrams(0.2, 0.008)
    hint = c.shedding.shed(c.clock.seconds(), 7, 0.008)
    c.datagrams(hint / 1000 - 0.01, 0.008)
    # Too early: sent away again, further.
    assert c.shedding.shed(c.clock.seconds(), 7, 0.008) is not None
    c.datagrams(2.0, 0.008)
    assert c.shedding.shed(c.clock.seconds(), 7, 0.008) is None
    assert c.metrics.shed_returned == 1
    # Once: its next new transfer is a new one.
    assert c.shedding.shed(c.clock.seconds(), 7, 0.008) is not None


def test_a_device_back_at_its_slot_waits_again_if_the_queue_is_twice_the_target():
    c = Controller()
    c.datagrams(0.2, 0.010)
    c.shedding.shed(c.clock.seconds(), 7, 0.010)
    c.datagrams(1.0, 0.2)
    assert c.shedding.shed(c.clock.seconds(), 7, 0.2) is not None


def test_transfers_let_in_while_alert_are_under_way():
    c = Controller()
    assert not c.shedding.alert  # the protocol notes nothing then
    c.datagrams(0.01, 0.010)
    assert c.shedding.alert
    c.shedding.opened(c.clock.seconds(), 1, "a" * 16)
    assert c.shedding.under_way((1, "a" * 16))
    assert not c.shedding.under_way((2, "a" * 16))
    # Kept for two generations, then forgotten.
    c.datagrams(Shedding.GENERATION + 0.1, 0.010, every=0.01)
    c.shedding.opened(c.clock.seconds(), 2, "b" * 16)
    assert c.shedding.under_way((1, "a" * 16))
    c.datagrams(Shedding.GENERATION, 0.010, every=0.01)
    c.shedding.opened(c.clock.seconds(), 3, "c" * 16)
    assert not c.shedding.under_way((1, "a" * 16))


def test_one_line_when_an_overload_period_starts_and_one_when_it_ends_however_it_flaps():
    c = Controller()
    for _ in range(5):
        c.datagrams(0.2, 0.010)
        c.shedding.shed(c.clock.seconds(), 1, 0.010)
        c.datagrams(0.5, 0.001)
    assert c.metrics.shed_episodes == 5
    assert len(c.lines()) == 1
    assert c.lines()[0].startswith("SHEDDING LOAD: datagrams waited over 5 ms in the receive queue for 100 ms")
    c.datagrams(QUIET, 0.001, every=0.01)
    assert len(c.lines()) == 2
    assert c.lines()[1].startswith("stopped shedding load after ")
    assert "5 chunks answered busy with a hint, 0 let in back at their slot" in c.lines()[1]
    assert not c.shedding.alert


def test_a_gateway_gone_quiet_stops_shedding_at_the_next_tick():
    c = Controller()
    c.datagrams(0.2, 0.010)
    assert c.shedding.shedding
    c.clock.advance(1)
    c.shedding.tick(c.clock.seconds())
    c.clock.advance(1)
    c.shedding.tick(c.clock.seconds())
    assert not c.shedding.shedding and c.shedding.queue_delay == 0.0
    c.clock.advance(QUIET)
    c.shedding.tick(c.clock.seconds())
    assert [line.split(" ")[0] for line in c.lines()] == ["SHEDDING", "stopped"]


def test_the_backstop_hint_is_what_the_calendar_holds():
    c = Controller()
    c.datagrams(0.2, 0.010)
    now = c.clock.seconds()
    assert c.shedding.hint(now) == MIN_HINT * 1000
    last = max(c.shedding.shed(now, device_id, 0.010) for device_id in range(1, 1001))
    assert c.shedding.hint(now) == pytest.approx(last, abs=3)


def test_the_gauges():
    c = Controller()
    c.datagrams(0.3, 0.010)
    c.shedding.shed(c.clock.seconds(), 1, 0.010)
    gauges = c.shedding.gauges(c.clock.seconds())
    assert gauges["shedding"] == 1 and gauges["queue_delay_seconds"] == pytest.approx(0.010)
    assert gauges["devices_sent_away"] == 1 and gauges["hint_seconds"] > MIN_HINT


# -- the kernel's receive timestamps on a real socket -------------------------


class Recording(DatagramProtocol):
    def __init__(self, count: int):
        self.seen: list[tuple[bytes, float | None]] = []
        self.count = count
        self.done = Deferred()
        self.arrived = None

    def datagramReceived(self, data, addr):
        self.seen.append((data, self.arrived))
        if len(self.seen) == self.count:
            self.done.callback(None)


@pytest.mark.skipif(not stamps_available(reactor), reason="kernel receive timestamps are Linux's")
@pytest_twisted.ensureDeferred
async def test_a_stamped_port_gives_each_datagram_its_kernel_receive_time():
    protocol = Recording(3)
    port = StampedPort(0, protocol, "127.0.0.1", 65507, reactor)
    port.startListening()
    try:
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        before = time.time()
        for index in range(3):
            sender.sendto(b"datagram %d" % index, ("127.0.0.1", port.getHost().port))
        sender.close()
        await protocol.done
        after = time.time()
    finally:
        await port.stopListening()
    assert [data for data, _ in protocol.seen] == [b"datagram 0", b"datagram 1", b"datagram 2"]
    assert all(before - 0.01 <= arrived <= after for _, arrived in protocol.seen)
    assert protocol.arrived is None  # only while a datagram is handled


# -- end to end: the real gateway, stopped while a fleet sends -------------------


def stats_of(gateway) -> dict[str, int]:
    """
    The counts of the gateway's last stats line (logfmt).
    """
    line = gateway.all_matching(r"gateway stats: (.*)")[-1].group(1)
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", line)}


@pytest.mark.e2e
def test_a_gateway_stopped_while_a_fleet_sends_sheds_and_stores_every_day_once(make_suite):
    """
    The gateway is stopped (SIGSTOP) while 600 devices send their day at
    once, and resumed seconds later with its receive queue full: it sheds
    (the new transfers answered busy with a hint, before decoding), the
    devices pause by the hint and come back, and every reading is stored
    exactly once.
    """
    devices = 600
    day = previous_day(time.time()) - datetime.timedelta(days=1)
    suite = make_suite(devices, 96, addresses=label_address, keys=True, device={"ack_timeout": 1.0}, deadline=120.0)
    cloud = suite.start_cloud()
    gateway = suite.start_gateway(connected=True)
    os.kill(gateway.pid, signal.SIGSTOP)
    try:
        fleet = suite.start_fleet(day, f"1-{devices}", "--attempts", "3", "--retry-after", "1", "--timeout", "150")
        # Every device has sent its window once the first times out.
        fleet.wait_for(r"loadgen: retransmitting", 60)
        time.sleep(2.0)
    finally:
        os.kill(gateway.pid, signal.SIGCONT)
    summary = loadgen_summary(fleet, 160)
    assert summary["delivered"] == devices, summary
    assert summary["busy_answers"] > 0, summary
    gateway.wait_for(r"SHEDDING LOAD: datagrams waited over 100 ms in the receive queue", 5)
    suite.wait_stored(devices * 96, cloud, 60)
    gateway.wait_for(r"stopped shedding load after [\d.]+ s: \d+ chunks answered busy with a hint", 20)
    gateway.stop()
    assert suite.stored() == suite.expected_rows(day)
    stats = stats_of(gateway)
    print("gateway:", {key: stats[key] for key in ("shed", "shed_returned", "shed_episodes", "refused_overloaded")})
    assert stats["shed"] > 0 and stats["shed_episodes"] > 0, stats
