"""
The gateway: takes devices' days over UDP, spools them durably, and forwards
each day's readings to the cloud over TCP once every expected device has
reported or the day's deadline has passed.

L{Intake} decides what a device's chunk gets; L{Uplink} moves spooled
readings to the cloud.  L{GatewayProtocol} and L{CloudClientProtocol} only
translate datagrams and lines into calls on them.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from collections import Counter
from typing import Callable, Protocol

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHandshakeListener, INegotiated
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.logger import Logger
from zope.interface import implementer

from meter import wire
from meter.ratelimit import LimitedWarnings, PerSource
from meter.retry import Backoff, Failures
from meter.gateway.spool import Recovered, Spool, Spooled, chunk_digest, content_digest

#: How long (seconds, on the gateway's clock) the gateway remembers a
#: device's day after its last part arrived (its message ids, so a duplicate
#: is recognised, and what it counts against the device's daily bounds) and
#: a round after it closed: a device retries for about a minute, so two days
#: is ample.
REMEMBER = 2 * 86400.0

#: The days a chunk may name, relative to its C{ts} (UTC dates, whole
#: seconds): a device sends the day before its local date, in any zone from
#: UTC-14 to UTC+14, give or take a day for its clock and a send that
#: crossed midnight.  So the day lies between the UTC dates of ts - 62 h
#: and ts + 14 h, both included.
DAY_EARLIEST = -62 * 3600
DAY_LATEST = 14 * 3600
_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()


def day_agrees(day: datetime.date, sent_at: int) -> bool:
    """
    Whether a chunk sent at Unix time C{sent_at} may report C{day} (see
    L{DAY_EARLIEST}).
    """
    earliest = _EPOCH_ORDINAL + (sent_at + DAY_EARLIEST) // 86400
    latest = _EPOCH_ORDINAL + (sent_at + DAY_LATEST) // 86400
    return earliest <= day.toordinal() <= latest


#: The bit of each minute of the day, by its C{HH:MM}.
_MINUTE_BIT = {f"{m // 60:02d}:{m % 60:02d}": 1 << m for m in range(24 * 60)}


def _day_at(unix_time: int) -> datetime.date:
    return datetime.date.fromordinal(_EPOCH_ORDINAL + unix_time // 86400)


def minute_bits(records: str) -> int:
    """
    The minutes of a chunk's C{DAY} records, one bit each.
    """
    bits = 0
    for record in records.split(";"):
        bits |= _MINUTE_BIT.get(record[:5], 0)
    return bits


def peer_host(peer: str) -> str:
    """
    The address of a C{"host:port"} peer, IPv4-mapped IPv6 given as IPv4, so
    it compares with a [fleet] address.
    """
    host = peer.rpartition(":")[0].strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


@attrs.define
class Round:
    """
    One day's collection: open from the day's first report until every
    expected device has reported or the deadline passes.
    """

    day: datetime.date
    opened_at: float
    closed: bool = False
    reported: set[int] = attrs.Factory(set)
    timer: object = None
    #: When it closed, on the gateway's clock: it is forgotten L{REMEMBER}
    #: seconds later.
    closed_at: float | None = None


@attrs.define
class Transfer:
    """
    The reassembly of one device's day: which parts have arrived.
    """

    day: datetime.date
    parts: int
    received: set[int] = attrs.Factory(set)
    first_seen: float = 0.0


@attrs.define
class DeviceDay:
    """
    What one device sent of one day, kept until L{REMEMBER} seconds after
    its last part arrived: the message ids admitted (being committed or
    acknowledged), so a device's day is bounded in transfers and parts
    however many it sends, and forgotten by its age on the gateway's clock.
    """

    xfers: set[str] = attrs.Factory(set)
    ids: list[tuple[int, str, int]] = attrs.Factory(list)
    last_seen: float = 0.0


class Intake:
    """
    Decides what each device chunk gets, and when a day's round closes.

    @param fleet: device id -> device address, the devices expected each day.
    @param on_ready: called when readings may have become ready to forward.
    @param on_late: called with the number of readings of a part that arrived
        after its round closed (default: L{on_ready} is called).
    @param max_retry_delay: the longest wait, in seconds, before a failed
        spool transaction (closing a round) is tried again.
    """

    log = Logger()

    def __init__(
        self,
        fleet: dict[int, str],
        spool: Spool,
        clock,
        deadline: float,
        on_ready: Callable[[], None],
        on_late: Callable[[int], None] | None = None,
        max_retry_delay: float = 30.0,
        spool_limit: int | None = None,
        check_source: bool = False,
        replay_window: float | None = None,
        reassembly_timeout: float | None = None,
        max_reassemblies: int | None = None,
        max_committing: int = 2000,
        max_transfers_per_day: int = 24,
        max_parts_per_day: int = 4096,
        remember: float = REMEMBER,
    ):
        self._fleet = fleet
        self._max_transfers_per_day = max_transfers_per_day
        self._max_parts_per_day = max_parts_per_day
        self._remember = remember
        self._max_committing = max_committing
        self._reassembly_timeout = reassembly_timeout
        self._max_reassemblies = max_reassemblies
        self._replay_window = replay_window
        self._check_source = check_source
        self._spool = spool
        self._clock = clock
        self._deadline = deadline
        self._on_ready = on_ready
        self._on_late = on_late if on_late is not None else lambda count: on_ready()
        #: Rounds closed in memory whose close the spool has not taken yet:
        #: day -> the timer of the next attempt.
        self._closing: dict[datetime.date, object] = {}
        self._stopped = False
        self._spool_limit = spool_limit
        self._rounds: dict[datetime.date, Round] = {}
        self._transfers: dict[tuple[int, str], Transfer] = {}
        #: The transfers still missing parts, oldest first: what the time and
        #: memory bounds on reassembly expire (see L{_expire}).
        self._incomplete: dict[tuple[int, str], None] = {}
        self._expiry = None
        #: Message ids committed to the spool, with their content digests
        #: (C{None}: spooled before digests were kept), so a duplicate is
        #: re-acknowledged without being processed again and a message id
        #: sent again with other content is refused.
        self._acknowledged: dict[tuple[int, str, int], bytes | None] = {}
        #: Message ids being committed now: a duplicate arriving meanwhile gets
        #: the same answer once the commit is done.
        self._committing: dict[tuple[int, str, int], list[Deferred]] = {}
        #: The content digests of the chunks being committed now.
        self._committing_digests: dict[tuple[int, str, int], bytes] = {}
        #: What each device sent of each day, by (device, day): the bounds a
        #: device's day is held to, and what is forgotten by age.
        self._days: dict[tuple[int, datetime.date], DeviceDay] = {}
        #: The minutes of the parts admitted of each multi-part transfer still
        #: incomplete, one bit each: a minute sent twice across parts is
        #: refused.
        self._minutes: dict[tuple[int, str], int] = {}
        self._forget_retry = None
        #: Lines about what devices send again: a few a device, then one a
        #: minute with a count (see L{_log_report}).
        self._report_lines = PerSource(clock, 1 / 60, 5)
        self._spool_full_lines = PerSource(clock, 1 / 6, 5)
        #: Readings of chunks being committed now: they count against the
        #: spool limit already, or a burst could overshoot it.
        self._incoming = 0
        self.counters: Counter[str] = Counter()
        self._warnings = LimitedWarnings(self.log, clock)
        self._failures = Failures(self, clock, self.counters, max_retry_delay)

    # -- start and stop ------------------------------------------------------

    def recover(self, state: Recovered) -> None:
        """
        Resume from what the spool holds: open rounds get their deadline back
        (closing at once if it passed while the gateway was down).
        """
        for part in state.parts:
            message_id = (part.device_id, part.xfer, part.part)
            self._acknowledged[message_id] = part.digest
            device_day = self._days.setdefault((part.device_id, part.day), DeviceDay())
            device_day.xfers.add(part.xfer)
            device_day.ids.append(message_id)
            device_day.last_seen = max(device_day.last_seen, part.received_at)
            transfer = self._transfers.setdefault(
                (part.device_id, part.xfer), Transfer(part.day, part.parts, first_seen=part.received_at)
            )
            transfer.received.add(part.part)
            transfer.first_seen = min(transfer.first_seen, part.received_at)
        for key, transfer in sorted(self._transfers.items(), key=lambda item: item[1].first_seen):
            if len(transfer.received) < transfer.parts:
                self._incomplete[key] = None
        self._bound_reassemblies()
        for stored in state.rounds:
            self._rounds[stored.day] = Round(
                stored.day, stored.opened_at, closed=stored.closed_at is not None, closed_at=stored.closed_at
            )
        for (device_id, _), transfer in self._transfers.items():
            round_ = self._rounds.get(transfer.day)
            if round_ is not None and len(transfer.received) == transfer.parts:
                round_.reported.add(device_id)
        # A copy: closing a round forgets old rounds from self._rounds.
        for round_ in list(self._rounds.values()):
            if not round_.closed:
                self.log.info(
                    "resuming open round {day}: {n} of {total} devices reported",
                    day=round_.day,
                    n=len(round_.reported),
                    total=len(self._fleet),
                )
                if self._everyone_reported(round_):
                    self._close(round_, "every expected device reported")
                else:
                    self._arm(round_)
        self.log.info(
            "spool holds {depth} readings, {rounds} rounds, {ids} message ids",
            depth=self._spool.depth,
            rounds=len(self._rounds),
            ids=len(self._acknowledged),
        )
        if state.depth:
            self._on_ready()

    def stop(self) -> None:
        for round_ in self._rounds.values():
            if round_.timer is not None and round_.timer.active():
                round_.timer.cancel()
        if self._forget_retry is not None and self._forget_retry.active():
            self._forget_retry.cancel()
        self._forget_retry = None
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        # A close not yet in the spool is not lost: the next start finds the
        # round open past its deadline (or complete) and closes it again.
        self._stopped = True
        for retry in self._closing.values():
            if retry.active():
                retry.cancel()
        self._closing.clear()

    def stats(self) -> dict[str, int]:
        """
        The gauges and counters of the intake, for the periodic stats line.
        """
        return {
            "spool_depth": self._spool.depth,
            "reassemblies": len(self._incomplete),
            "message_ids": len(self._acknowledged),
            "device_days": len(self._days),
            **self.counters,
        }

    # -- a chunk arrives -----------------------------------------------------

    def chunk_received(self, chunk: wire.DayChunk, peer: str) -> Deferred:
        """
        Handle one device chunk; the Deferred fires with the L{wire.DayAck}
        to send back (C{ok} only once the chunk is durable).
        """
        expected_ip = self._fleet.get(chunk.device_id)
        if expected_ip is None:
            self.counters["unknown_device"] += 1
            return succeed(self._refuse(chunk, f"fleet: device {chunk.device_id} is not in this gateway's fleet", peer))
        if chunk.device_ip != expected_ip:
            self.counters["wrong_address"] += 1
            return succeed(
                self._refuse(chunk, f"address: device {chunk.device_id} is {expected_ip}, not {chunk.device_ip}", peer)
            )
        if self._check_source and peer_host(peer) != expected_ip:
            self.counters["wrong_source"] += 1
            return succeed(
                self._refuse(
                    chunk,
                    f"source: device {chunk.device_id} sends from {expected_ip}, not from {peer_host(peer)}",
                    peer,
                )
            )
        if self._replay_window is not None and abs(self._clock.seconds() - chunk.sent_at) > self._replay_window:
            # Either a datagram captured earlier and sent again, or a device
            # whose clock is off: neither may be stored.
            self.counters["refused_replay"] += 1
            return succeed(
                self._refuse(
                    chunk,
                    f"replay: the gateway's clock minus ts={chunk.sent_at} is "
                    f"{self._clock.seconds() - chunk.sent_at:+.0f} s (positive: the transfer started that long ago), "
                    f"outside the replay window of {self._replay_window:g} s",
                    peer,
                )
            )
        if not day_agrees(chunk.day, chunk.sent_at):
            # What the gateway keeps and forgets is filed by day: a day far
            # from the device's own clock is a device gone wrong (or a key
            # in the wrong hands), not a day to keep.
            self.counters["refused_day"] += 1
            return succeed(
                self._refuse(
                    chunk,
                    f"day: {chunk.day} does not agree with ts={chunk.sent_at}: a transfer started then reports "
                    f"a day from {_day_at(chunk.sent_at + DAY_EARLIEST)} to {_day_at(chunk.sent_at + DAY_LATEST)}",
                    peer,
                )
            )
        key = chunk.message_id
        digest = chunk_digest(chunk)
        if key in self._acknowledged:
            stored = self._acknowledged[key]
            if stored is not None and stored != digest:
                return succeed(self._conflict(chunk, peer))
            self.counters["duplicates"] += 1
            self._log_report(
                chunk.device_id,
                "duplicate of device {device} part {part}/{parts} from {peer}: acknowledged again",
                device=chunk.device_id,
                part=chunk.part,
                parts=chunk.parts,
                peer=peer,
            )
            return succeed(wire.DayAck(chunk.xfer, chunk.part, "ok"))
        if key in self._committing:
            if self._committing_digests[key] != digest:
                return succeed(self._conflict(chunk, peer))
            self.counters["duplicates"] += 1
            waiter = Deferred()
            self._committing[key].append(waiter)
            return waiter
        transfer = self._transfers.get((chunk.device_id, chunk.xfer))
        if transfer is not None and (transfer.parts != chunk.parts or transfer.day != chunk.day):
            self.counters["inconsistent_chunks"] += 1
            return succeed(
                self._refuse(
                    chunk,
                    f"transfer: transfer {chunk.xfer} was {transfer.parts} parts of {transfer.day}, "
                    f"now {chunk.parts} parts of {chunk.day}",
                    peer,
                )
            )
        device_day = self._days.get((chunk.device_id, chunk.day))
        refusal = self._over_daily_bounds(chunk, device_day)
        if refusal is not None:
            self.counters["refused_limit"] += 1
            return succeed(self._refuse(chunk, refusal, peer))
        transfer_key = (chunk.device_id, chunk.xfer)
        minutes = 0
        if chunk.parts > 1:
            minutes = minute_bits(chunk.records)
            repeated = self._minutes.get(transfer_key, 0) & minutes
            if repeated:
                self.counters["refused_minute"] += 1
                first = (repeated & -repeated).bit_length() - 1
                return succeed(
                    self._refuse(
                        chunk,
                        f"minute: {first // 60:02d}:{first % 60:02d} of {chunk.day} is in another part of "
                        f"transfer {chunk.xfer} already",
                        peer,
                    )
                )
        count = chunk.count
        if self._spool_limit is not None and self._spool.depth + self._incoming + count > self._spool_limit:
            self.counters["refused_spool_full"] += 1
            # Every device's every chunk is refused while the spool is full:
            # a few lines a minute say so, the counter counts them all.
            if self._spool_full_lines.allow(None):
                suppressed = self._spool_full_lines.take_suppressed(None)
                self.log.error(
                    "SPOOL FULL ({depth} of {limit} readings): device {device} must retry later; "
                    "is the cloud reachable?" + (" ({suppressed} similar lines left out)" if suppressed else ""),
                    depth=self._spool.depth,
                    limit=self._spool_limit,
                    device=chunk.device_id,
                    suppressed=suppressed,
                )
            reason = f"spool_full: the spool is at its limit of {self._spool_limit} readings"
            return succeed(wire.DayAck(chunk.xfer, chunk.part, "busy", reason))

        round_ = self._rounds.get(chunk.day)
        # Every chunk makes sure its round is in the spool (INSERT OR IGNORE),
        # as the gateway knows it: if the write of the day's first chunk
        # failed, the round exists in memory only; a round closed long ago
        # may be forgotten by the spool and not by the gateway.  Either way
        # its readings would otherwise never leave the spool.
        d = self._spool.add_chunk(chunk, self._clock.seconds(), round_closed=round_ is not None and round_.closed)
        self._committing[key] = []
        self._incoming += count
        self._admit(chunk, device_day, digest, minutes)
        # Before the answer is made: a failed commit gives back what the
        # chunk took of its device's day and transfer.
        d.addErrback(self._not_admitted, chunk, minutes)
        if round_ is None:
            round_ = self._rounds[chunk.day] = Round(chunk.day, self._clock.seconds())
            self.log.info("round {day} opened by device {device}", day=chunk.day, device=chunk.device_id)
            self._arm(round_)

        def committed(new: int) -> wire.DayAck:
            self._failures.succeeded("spooling a chunk")
            self._acknowledged[key] = self._committing_digests.pop(key)
            self.counters["chunks"] += 1
            self.counters["readings"] += new
            self._part_arrived(chunk, peer)
            return answer_waiters(wire.DayAck(chunk.xfer, chunk.part, "ok"))

        def failed(failure) -> wire.DayAck:
            # The device keeps the chunk and sends it again: nothing to retry here.
            self._failures.failed(
                "spooling a chunk", "spool_failures", failure, "device {device}: chunk not spooled, answered busy", retried=False,
                device=chunk.device_id,
            )
            return answer_waiters(wire.DayAck(chunk.xfer, chunk.part, "busy", "spool: write failed"))

        def answer_waiters(ack: wire.DayAck) -> wire.DayAck:
            self._incoming -= count
            for waiter in self._committing.pop(key):
                waiter.callback(ack)
            return ack

        return d.addCallbacks(committed, failed)

    def acknowledged_before(self, device_id: int, xfer: str, part: int, sent_at: int, peer: str, body: bytes) -> bool:
        """
        Whether a chunk with this message id is stored already and may be
        acknowledged again as it is: the same content (C{body}, the unsealed
        datagram), within the replay window, and from its device's address
        when sources are checked.  Counts it as a duplicate.  Anything else
        takes the full path, which says why it is refused, if it is.
        """
        stored = self._acknowledged.get((device_id, xfer, part), False)
        if stored is False:
            return False
        if stored is None or content_digest(body) != stored:
            # Other content (refused as a conflict), or the same content
            # written another way, or a message id spooled before digests
            # were kept: decoding settles it.
            return False
        if self._replay_window is not None and abs(self._clock.seconds() - sent_at) > self._replay_window:
            return False
        if self._check_source and peer_host(peer) != self._fleet.get(device_id):
            return False
        self.counters["duplicates"] += 1
        return True

    def overloaded(self) -> bool:
        """
        Whether more chunks wait for their spool commit than should: new
        ones are then answered busy before they are decoded.
        """
        return len(self._committing) >= self._max_committing

    def _refuse(self, chunk: wire.DayChunk, reason: str, peer: str) -> wire.DayAck:
        self._warnings.warn(peer_host(peer), "refused chunk from {peer}: {reason}", peer=peer, reason=reason)
        return wire.DayAck(chunk.xfer, chunk.part, "bad", reason)

    def _conflict(self, chunk: wire.DayChunk, peer: str) -> wire.DayAck:
        # Acknowledging it as a duplicate would tell the device its content
        # is stored when only the first content is.
        self.counters["refused_conflict"] += 1
        return self._refuse(
            chunk,
            f"conflict: part {chunk.part}/{chunk.parts} of transfer {chunk.xfer} was received with other content",
            peer,
        )

    # -- the bounds on a device's day ----------------------------------------

    def _over_daily_bounds(self, chunk: wire.DayChunk, device_day: DeviceDay | None) -> str | None:
        """
        Why C{chunk}, a message id not seen before, would take its device's
        day past its bounds, if it would.  A real device sends a day once
        or a few times; the bounds stop a device gone wrong (or a key in the
        wrong hands) from growing the gateway's memory, spool and log
        without end, empty transfers included.
        """
        if device_day is None:
            return None
        if chunk.xfer not in device_day.xfers and len(device_day.xfers) >= self._max_transfers_per_day:
            return (
                f"limit: device {chunk.device_id} sent {len(device_day.xfers)} transfers of {chunk.day} already, "
                f"the most a device's day may have"
            )
        if len(device_day.ids) >= self._max_parts_per_day:
            return (
                f"limit: device {chunk.device_id} sent {len(device_day.ids)} parts of {chunk.day} already, "
                f"the most a device's day may have"
            )
        return None

    def _admit(self, chunk: wire.DayChunk, device_day: DeviceDay | None, digest: bytes, minutes: int) -> None:
        """
        Count C{chunk}, now being committed, against its device's day, and
        its minutes against its transfer's.
        """
        key = chunk.message_id
        self._committing_digests[key] = digest
        if device_day is None:
            device_day = self._days[(chunk.device_id, chunk.day)] = DeviceDay()
        device_day.xfers.add(chunk.xfer)
        device_day.ids.append(key)
        device_day.last_seen = self._clock.seconds()
        if minutes:
            transfer_key = (chunk.device_id, chunk.xfer)
            self._minutes[transfer_key] = self._minutes.get(transfer_key, 0) | minutes

    def _not_admitted(self, failure, chunk: wire.DayChunk, minutes: int):
        """
        The commit of C{chunk} failed: it no longer counts against its day
        (its device sends it again) nor its minutes against its transfer.
        """
        key = chunk.message_id
        self._committing_digests.pop(key, None)
        device_day = self._days.get((chunk.device_id, chunk.day))
        if device_day is not None and key in device_day.ids:
            device_day.ids.remove(key)
            # A transfer none of whose parts was taken is not one of the
            # day's: a device whose chunks met a failing spool gives up and
            # sends its day again in a new transfer, as often as it takes.
            if not any(xfer == chunk.xfer for _, xfer, _ in device_day.ids):
                device_day.xfers.discard(chunk.xfer)
        transfer_key = (chunk.device_id, chunk.xfer)
        if minutes and transfer_key in self._minutes:
            self._minutes[transfer_key] &= ~minutes
        return failure

    def _log_report(self, device_id: int, format: str, **fields) -> None:
        """
        Log a line about what a device sends again (a duplicate, its day
        again, late), at most a few a device and then one a minute, saying
        how many were left out: a device may send its day as often as its
        bounds allow, and the log must not grow with it.
        """
        if not self._report_lines.allow(device_id):
            return
        suppressed = self._report_lines.take_suppressed(device_id)
        if suppressed:
            format += " ({suppressed} similar lines about this device left out)"
        self.log.info(format, suppressed=suppressed, **fields)

    def _part_arrived(self, chunk: wire.DayChunk, peer: str) -> None:
        key = (chunk.device_id, chunk.xfer)
        transfer = self._transfers.setdefault(
            key, Transfer(chunk.day, chunk.parts, first_seen=self._clock.seconds())
        )
        transfer.received.add(chunk.part)
        if len(transfer.received) >= transfer.parts:
            self._minutes.pop(key, None)
        round_ = self._rounds.get(chunk.day)
        if round_ is None:
            # Its round, closed long ago, was forgotten (as another round
            # closed) while this chunk was being committed: its readings are
            # spooled under a closed round, so they may go.
            self._on_late(chunk.count)
            return
        if len(transfer.received) < transfer.parts:
            if key not in self._incomplete:
                self._incomplete[key] = None
                self._bound_reassemblies()
            if round_.closed:
                # Its readings are spooled under a closed round: they may go.
                self._on_late(chunk.count)
            return
        self._incomplete.pop(key, None)
        # One line a device a day, what the report's gateway printed for
        # each device (each datagram only with log_datagrams).
        reported = {"device": chunk.device_id, "peer": peer, "day": chunk.day, "parts": chunk.parts}
        if round_.closed:
            self.counters["late_devices"] += 1
            self._log_report(
                chunk.device_id,
                "late device {device} ({peer}) reported {day} in {parts} parts after its round closed: "
                "forwarding its readings now",
                **reported,
            )
            self._on_late(chunk.count)
            return
        if chunk.device_id in round_.reported:
            self._log_report(
                chunk.device_id, "device {device} ({peer}) reported {day} again in {parts} parts", **reported
            )
            return
        round_.reported.add(chunk.device_id)
        self.log.info(
            "device {device} ({peer}) reported {day} in {parts} parts: {n} of {total} devices",
            n=len(round_.reported),
            total=len(self._fleet),
            **reported,
        )
        if self._everyone_reported(round_):
            self._close(round_, "every expected device reported")

    # -- rounds --------------------------------------------------------------

    def _everyone_reported(self, round_: Round) -> bool:
        # Counting first: comparing the sets costs as much as the fleet is
        # large, and this is asked each time a device reports.
        return len(round_.reported) >= len(self._fleet) and self._fleet.keys() <= round_.reported

    def _arm(self, round_: Round) -> None:
        delay = max(0.0, round_.opened_at + self._deadline - self._clock.seconds())
        round_.timer = self._clock.callLater(delay, self._deadline_passed, round_)

    def _deadline_passed(self, round_: Round) -> None:
        round_.timer = None
        if not round_.closed:
            self._close(round_, f"deadline of {self._deadline:g} s passed")

    def _close(self, round_: Round, why: str) -> None:
        round_.closed = True
        if round_.timer is not None and round_.timer.active():
            round_.timer.cancel()
        round_.timer = None
        missing = sorted(self._fleet.keys() - round_.reported)
        if missing:
            self.counters["rounds_incomplete"] += 1
            self.log.warn(
                "round {day} closed: {why}; devices that did not report: {missing}",
                day=round_.day,
                why=why,
                missing=", ".join(f"{d} ({self._fleet[d]})" for d in missing),
            )
        else:
            self.log.info("round {day} complete: {why}", day=round_.day, why=why)
        self.counters["rounds_closed"] += 1
        self._close_in_spool(round_.day, self._clock.seconds())
        self._forget_old()

    def _close_in_spool(self, day: datetime.date, at: float) -> None:
        """
        Close C{day}'s round in the spool, retrying until the spool takes it.

        The round stays closed in memory meanwhile: the decision is made
        (its deadline passed, or every device reported) and is not taken
        twice.  Its readings cannot leave early, as only a round closed in
        the spool is forwarded, and a restart before the spool took the
        close finds the round open and closes it again for the same reason.
        """
        pending = self._closing.pop(day, None)
        if pending is not None and pending.active():
            pending.cancel()
        self._spool.close_round(day, at).addCallbacks(
            self._closed_in_spool, self._close_failed, callbackArgs=(day,), errbackArgs=(day, at)
        )

    def _closed_in_spool(self, _, day: datetime.date) -> None:
        self._failures.succeeded("closing a round")
        self._on_ready()

    def _close_failed(self, failure, day: datetime.date, at: float) -> None:
        delay = self._failures.failed(
            "closing a round", "close_failures", failure, "round {day} not closed in the spool, not forwarded yet",
            day=day,
        )
        if self._stopped:
            return
        self._closing[day] = self._clock.callLater(delay, self._close_in_spool, day, at)

    def _forget_old(self) -> None:
        """
        Bound memory and the spool: drop the rounds closed, and the devices'
        days last heard from, more than L{REMEMBER} seconds ago on the
        gateway's own clock (never by a day a device named).  Runs as each
        round closes, which happens at least daily while devices report.
        """
        now = self._clock.seconds()
        cutoff = now - self._remember
        # A closed round is kept while a chunk of its day can still be
        # taken (a transfer sent within the replay window may name it): a
        # late part then finds its round closed and is forwarded, where a
        # round made anew would wait for a deadline and report every device
        # missing.  The gateway's clock decides this too.
        admissible = (
            None if self._replay_window is None
            else _day_at(int(now - self._replay_window) + DAY_EARLIEST)
        )
        for day, round_ in list(self._rounds.items()):
            if not round_.closed:
                continue
            if round_.closed_at is None:
                # Closed since the last pass (closing does not stamp it).
                round_.closed_at = now
            elif round_.closed_at < cutoff and (admissible is None or day < admissible):
                del self._rounds[day]
        for (device_id, day), device_day in list(self._days.items()):
            if device_day.last_seen >= cutoff:
                continue
            del self._days[(device_id, day)]
            for message_id in device_day.ids:
                self._acknowledged.pop(message_id, None)
            for xfer in device_day.xfers:
                key = (device_id, xfer)
                self._minutes.pop(key, None)
                transfer = self._transfers.pop(key, None)
                if key in self._incomplete:
                    del self._incomplete[key]
                    self.counters["expired_reassemblies"] += 1
        self._spool.forget_before(cutoff).addCallbacks(self._forgotten, self._not_forgotten)

    def _forgotten(self, _) -> None:
        self._failures.succeeded("forgetting old message ids")

    def _not_forgotten(self, failure) -> None:
        # Forgetting again later loses nothing: the spool keeps some old
        # message ids and empty rounds a little longer.
        delay = self._failures.failed(
            "forgetting old message ids", "forget_failures", failure,
            "old message ids and rounds not forgotten in the spool",
        )
        if self._stopped:
            return
        if self._forget_retry is None or not self._forget_retry.active():
            self._forget_retry = self._clock.callLater(delay, self._forget_old)

    # -- bounds on reassembly ------------------------------------------------

    def _bound_reassemblies(self) -> None:
        """
        Keep at most C{max_reassemblies} transfers in reassembly (the oldest
        go first), and expire each C{reassembly_timeout} seconds after its
        first part arrived.
        """
        if self._max_reassemblies is not None:
            while len(self._incomplete) > self._max_reassemblies:
                self._expire(next(iter(self._incomplete)), f"more than {self._max_reassemblies} in progress")
        self._arm_expiry()

    def _arm_expiry(self) -> None:
        if self._reassembly_timeout is None or not self._incomplete:
            return
        if self._expiry is not None and self._expiry.active():
            return
        oldest = self._transfers[next(iter(self._incomplete))]
        delay = max(0.0, oldest.first_seen + self._reassembly_timeout - self._clock.seconds())
        self._expiry = self._clock.callLater(delay, self._expire_old)

    def _expire_old(self) -> None:
        self._expiry = None
        cutoff = self._clock.seconds() - self._reassembly_timeout
        while self._incomplete:
            key = next(iter(self._incomplete))
            if self._transfers[key].first_seen > cutoff:
                break
            self._expire(key, f"incomplete after {self._reassembly_timeout:g} s")
        self._arm_expiry()

    def _expire(self, key: tuple[int, str], why: str) -> None:
        """
        Stop reassembling transfer C{key}: forget which of its parts arrived.

        Only bookkeeping goes.  Every part that was acknowledged is durable
        in the spool and its readings are forwarded with their day whatever
        happens here; what is lost is only the knowledge that the device
        reported completely (its round then closes at its deadline).  The
        message ids of its parts and the minutes they held stay with their
        device's day (bounded, and forgotten by age), so a late
        retransmission is still recognised and a late part still checked.
        """
        del self._incomplete[key]
        transfer = self._transfers.pop(key)
        device_id, xfer = key
        self.counters["expired_reassemblies"] += 1
        self.log.warn(
            "reassembly of device {device}'s transfer {xfer} of {day} expired ({why}) with {n} of {parts} parts: "
            "the parts received stay spooled and are forwarded",
            device=device_id,
            xfer=xfer,
            day=transfer.day,
            why=why,
            n=len(transfer.received),
            parts=transfer.parts,
        )


#: The codes of a cloud's refusal that name something in the batch itself,
#: which sending it again cannot change (docs/protocol.md).  Any other
#: refusal (the cloud's database failing, a cloud of another version) may
#: pass and is retried.
REFUSED_FOR_GOOD = frozenset({"field", "value", "range", "count", "record", "minute", "checksum"})


def refused_for_good(reason: str) -> bool:
    """
    Whether a refusal's C{reason} says the batch will never be stored.
    """
    return reason.partition(":")[0] in REFUSED_FOR_GOOD


class BatchSender(Protocol):
    """
    What the uplink needs of a connection to the cloud.
    """

    def send(self, message) -> None: ...

    def abort(self) -> None: ...


class Uplink:
    """
    Forwards ready readings from the spool to the cloud, up to C{window}
    batches in flight at once, and removes a batch's readings from the spool
    once the cloud acknowledged it.

    A batch the cloud does not acknowledge within C{ack_timeout} (or that it
    refuses) stays in the spool and is sent again; one the cloud refuses for
    good (L{refused_for_good}) is set aside in the spool's C{refused} table,
    so the batches behind it go on.

    A spool transaction that fails (taking a batch, removing an acknowledged
    one) is retried on a timer with backoff up to C{max_retry_delay}
    seconds; an acknowledged batch stays in the window until its removal
    succeeds.

    Readings of parts that arrive after their round closed (see
    L{late_arrived}) linger: for C{late_linger} seconds from the first of
    them a batch goes only if it is full, so a late day arriving part by
    part leaves in a few full batches rather than one batch a part.
    """

    log = Logger()

    def __init__(
        self,
        spool: Spool,
        clock,
        batch_readings: int,
        ack_timeout: float,
        on_delivered: Callable[[int], None],
        retry_delay: float = 5.0,
        new_batch_id: Callable[[], str] = wire.new_id,
        window: int = 1,
        max_retry_delay: float = 30.0,
        late_linger: float = 0.0,
    ):
        """
        @param on_delivered: called with the number of readings that left
            the spool, delivered.
        """
        self._spool = spool
        self._clock = clock
        self._batch_readings = batch_readings
        self._ack_timeout = ack_timeout
        self._on_delivered = on_delivered
        self._retry_delay = retry_delay
        self._new_batch_id = new_batch_id
        self._window = window
        self._sender: BatchSender | None = None
        #: Batches sent and not yet removed from the spool, oldest first.
        self._in_flight: dict[str, _InFlight] = {}
        self._fetching = False
        self._retry = None
        self._late_linger = late_linger
        #: The end of the linger for late readings, while one runs.
        self._linger = None
        #: Readings of late parts spooled since the linger started, not yet
        #: sent: once they fill a batch, it goes.
        self._late_readings = 0
        self._stopped = False
        self.counters: Counter[str] = Counter()
        self._failures = Failures(self, clock, self.counters, max_retry_delay)
        self._refusals = LimitedWarnings(self.log, clock)
        self._refused_backoff = Backoff(retry_delay, max(retry_delay, max_retry_delay))

    def connected(self, sender: BatchSender) -> None:
        self._sender = sender
        self.kick()

    def disconnected(self, sender: BatchSender) -> None:
        if sender is not self._sender:
            return
        self._sender = None
        # Unacknowledged batches are sent again on the next connection, from
        # the spool; acknowledged ones are being removed and stay tracked
        # until they are, so they are not taken again meanwhile.
        for batch_id, flight in list(self._in_flight.items()):
            if not flight.acknowledged:
                self.counters["batches_resent"] += 1
                self._cancel(flight)
                del self._in_flight[batch_id]

    def stop(self) -> None:
        # Work still in the spool's queue may fail after this: it is not
        # retried (a delivered batch not removed is sent again at the next
        # start, and the cloud stores it once).
        self._stopped = True
        for flight in self._in_flight.values():
            self._cancel(flight)
        for timer in (self._retry, self._linger):
            if timer is not None and timer.active():
                timer.cancel()

    def late_arrived(self, count: int) -> None:
        """
        A part of C{count} readings arrived after its round closed: it is
        spooled and ready.  It goes with the batch that fills, or when the
        linger it starts (or joins) ends.
        """
        if self._late_linger <= 0:
            self.kick()
            return
        self._late_readings += count
        if self._linger is None:
            self._linger = self._clock.callLater(self._late_linger, self._linger_ended)
        if self._late_readings >= self._batch_readings:
            self.kick()

    def _linger_ended(self) -> None:
        self._linger = None
        self._late_readings = 0
        self.kick()

    def kick(self) -> None:
        """
        Ready readings may be waiting: fetch the next batch if the window has
        room.
        """
        if self._sender is None or len(self._in_flight) >= self._window or self._fetching:
            return
        if self._retry is not None and self._retry.active():
            return
        if any(flight.removal_failed for flight in self._in_flight.values()):
            # A fetch now would see the readings of the batch whose removal
            # failed and send them again; its retry kicks once it succeeds.
            return
        self._fetching = True
        after = self._after()
        self._spool.take_batch(self._batch_readings, after).addCallbacks(
            self._send, self._take_failed, callbackArgs=(after,)
        )

    def _take_failed(self, failure) -> None:
        self._fetching = False
        delay = self._failures.failed(
            "taking a batch from the spool", "take_failures", failure, "no batch taken from the spool"
        )
        if self._stopped:
            return
        if self._retry is None or not self._retry.active():
            self._retry = self._clock.callLater(delay, self.kick)

    def _after(self) -> int:
        """
        Where the next batch starts in the spool: after the newest batch
        still waiting for its acknowledgement.  An acknowledged batch needs
        no skipping: its removal was queued in the spool's database before
        any later fetch, which therefore no longer sees its readings; if
        that removal fails, no fetch starts until it is made again, and a
        fetch taken in its transaction is dropped (see L{_send}).  After
        a reconnection nothing waits, so the batches that lost their
        acknowledgement are sent again first.  Readings of a round that
        closed while batches were in flight, behind them in the spool, wait
        until the window drains, which it does whenever the cloud has caught
        up.
        """
        return max((f.seqs[-1] for f in self._in_flight.values() if not f.acknowledged), default=0)

    def _send(self, spooled: Spooled, after: int) -> None:
        self._fetching = False
        self._failures.succeeded("taking a batch from the spool")
        if any(flight.removal_failed for flight in self._in_flight.values()):
            # Taken in the transaction whose removal of an acknowledged
            # batch failed, so it may hold that batch's readings.
            return
        if not spooled.count:
            # The window moved while this fetch ran (a batch left it): what
            # lies before the new start has not been looked at yet.
            if after != self._after():
                self.kick()
            return
        if self._sender is None or len(self._in_flight) >= self._window:
            return
        if (
            self._linger is not None
            and spooled.count < self._batch_readings
            and self._late_readings < self._batch_readings
        ):
            # Late parts are still arriving: wait for the batch to fill, at
            # most until the linger ends (which kicks again).
            return
        self._late_readings = max(0, self._late_readings - spooled.count)
        batch = wire.Batch(self._new_batch_id(), spooled.records)
        flight = _InFlight(batch, spooled.seqs, self._clock.seconds())
        flight.timer = self._clock.callLater(self._ack_timeout, self._ack_timed_out, flight)
        self._in_flight[batch.batch_id] = flight
        self.counters["batches_sent"] += 1
        self.log.info(
            "forwarding batch {batch_id} of {count} readings to the cloud",
            batch_id=batch.batch_id,
            count=spooled.count,
        )
        self._sender.send(batch)
        self.kick()

    def ack_received(self, ack: wire.BatchAck) -> None:
        flight = self._in_flight.get(ack.batch_id)
        if flight is None or flight.acknowledged:
            self.counters["stray_acks"] += 1
            self.log.warn("acknowledgement of unknown batch {batch_id}", batch_id=ack.batch_id)
            return
        self._cancel(flight)
        elapsed = (self._clock.seconds() - flight.sent_at) * 1000
        if ack.status != "ok" and refused_for_good(ack.reason):
            # Sent again, it would be refused again, and every batch behind
            # it would wait: it goes out of the way, kept in the spool file.
            self.counters["batches_set_aside"] += 1
            flight.acknowledged = True
            flight.set_aside = ack.reason
            self._refusals.warn(
                "cloud",
                "the cloud refused batch {batch_id} for good: {reason}; its readings are set aside in the spool's "
                "refused table (docs/reliability.md)",
                batch_id=ack.batch_id,
                reason=ack.reason,
            )
            self._remove(flight)
            return
        if ack.status != "ok":
            self.counters["batches_refused"] += 1
            del self._in_flight[ack.batch_id]
            # One retry for the whole window (a cloud whose disk is full
            # refuses every batch in flight), later after each refusal.
            if self._retry is None or not self._retry.active():
                delay = self._refused_backoff.next()
                if not self._stopped:
                    self._retry = self._clock.callLater(delay, self.kick)
            else:
                delay = self._retry.getTime() - self._clock.seconds()
            # A few lines a minute, for the same reason.
            self._refusals.warn(
                "cloud",
                "the cloud refused batch {batch_id}: {reason}; its readings stay spooled, retry in {delay:g} s",
                batch_id=ack.batch_id,
                reason=ack.reason,
                delay=round(delay, 3),
            )
            return
        self._refused_backoff.reset()
        flight.acknowledged = True
        self.counters["batches_acknowledged"] += 1
        self.log.info(
            "batch {batch_id} acknowledged by the cloud after {ms:.1f} ms: {new} new, {dup} already stored",
            batch_id=ack.batch_id,
            ms=elapsed,
            new=ack.new,
            dup=ack.dup,
        )
        self._remove(flight)

    def _remove(self, flight: _InFlight) -> None:
        """
        Remove acknowledged C{flight}'s readings from the spool; it stays in
        the window until they are gone, so they are not taken again.
        """
        flight.timer = None
        if flight.set_aside is None:
            removed = self._spool.remove(flight.seqs)
        else:
            removed = self._spool.set_aside(flight.seqs, flight.set_aside, self._clock.seconds())
        removed.addCallbacks(self._removed, self._remove_failed, callbackArgs=(flight,), errbackArgs=(flight,))

    def _removed(self, count: int, flight: _InFlight) -> None:
        self._failures.succeeded("removing a delivered batch from the spool")
        flight.removal_failed = False
        del self._in_flight[flight.batch.batch_id]
        if flight.set_aside is None:
            self._on_delivered(count)
        else:
            self.counters["readings_set_aside"] += count
        self.kick()

    def _remove_failed(self, failure, flight: _InFlight) -> None:
        flight.removal_failed = True
        delay = self._failures.failed(
            "removing a delivered batch from the spool", "remove_failures", failure,
            "batch {batch_id}, delivered, not removed from the spool", batch_id=flight.batch.batch_id,
        )
        if self._stopped:
            return
        flight.timer = self._clock.callLater(delay, self._remove, flight)

    def _ack_timed_out(self, flight: _InFlight) -> None:
        flight.timer = None
        self.counters["ack_timeouts"] += 1
        self.log.warn(
            "batch {batch_id} not acknowledged within {t:g} s: reconnecting to the cloud",
            batch_id=flight.batch.batch_id,
            t=self._ack_timeout,
        )
        if self._sender is not None:
            self._sender.abort()

    @staticmethod
    def _cancel(flight: _InFlight) -> None:
        if flight.timer is not None and flight.timer.active():
            flight.timer.cancel()
        flight.timer = None


@attrs.define
class _InFlight:
    batch: wire.Batch
    seqs: tuple[int, ...]
    sent_at: float
    timer: object = None
    acknowledged: bool = False
    #: Its removal from the spool failed and waits for a retry.
    removal_failed: bool = False
    #: Why the cloud refused it for good, if it did: it is set aside, not
    #: removed.
    set_aside: str | None = None


# -- protocols ---------------------------------------------------------------


class GatewayProtocol(DatagramProtocol):
    """
    The devices' side: one UDP port for the gateway's whole life.

    A datagram is authenticated before anything else is done with it: its
    claimed device must have a key and its tag must verify under that key,
    or it is dropped unanswered (an answer would let anyone use the gateway
    to reflect traffic).  Every answer is sealed with the device's key, so a
    forged acknowledgement cannot make a device drop its data.
    """

    log = Logger()

    def __init__(
        self,
        intake: Intake,
        keys: dict[int, bytes],
        clock,
        source_rate: float = 200.0,
        source_burst: float = 400.0,
        receive_buffer: int = 4 << 20,
        log_datagrams: bool = False,
    ):
        self._intake = intake
        self._log_datagrams = log_datagrams
        self._keys = keys
        self._receive_buffer = receive_buffer
        # A flood from one address is cut off before any work is spent on
        # it, so the other devices keep being served.
        self._per_source = PerSource(clock, source_rate, source_burst)
        # Warnings about bad input: a few a minute per source, then a count.
        self._warnings = LimitedWarnings(self.log, clock)

    def startProtocol(self):
        # A fleet reporting at once must not overflow the kernel's queue.
        sock = getattr(self.transport, "socket", None)
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._receive_buffer)

    def datagramReceived(self, data: bytes, addr):
        peer = f"{addr[0]}:{addr[1]}"
        counters = self._intake.counters
        counters["datagrams"] += 1
        if not self._per_source.allow(addr[0]):
            counters["dropped_flood"] += 1
            self._warnings.warn(addr[0], "dropping datagrams from {peer}: over its limit of {rate:g} a second", peer=peer, rate=self._per_source.rate)
            return
        try:
            body, tag = wire.split_tag(data)
        except wire.WireError as e:
            self._drop("no_tag", peer, len(data), str(e))
            return
        device_id = wire.claimed_device(body)
        key = self._keys.get(device_id)
        if key is None:
            self._drop("unknown_device", peer, len(data), f"no key for claimed device {device_id}")
            return
        if not wire.tag_ok(body, tag, key):
            self._drop("bad_tag", peer, len(data), f"tag does not verify under device {device_id}'s key")
            return
        seen = wire.peek_day_id(body)
        if seen is not None:
            xfer, part, sent_at = seen
            if self._intake.acknowledged_before(device_id, xfer, part, sent_at, peer, body):
                # A retransmission of a stored chunk (its ack was lost or
                # late): answer again without decoding it a second time.
                self._reply(wire.DayAck(xfer, part, "ok"), key, addr)
                return
            if self._intake.overloaded():
                # More chunks wait for their commit than the spool can
                # take in a device's first timeout: refuse new work now,
                # cheaply, rather than acknowledge late and draw every
                # device's retransmissions.  The device keeps the chunk.
                counters["refused_overloaded"] += 1
                self._reply(
                    wire.DayAck(xfer, part, "busy", "overloaded: too many chunks wait for the spool"), key, addr
                )
                return
        try:
            message = wire.decode(body, max_size=wire.MAX_DATAGRAM)
        except wire.WireError as e:
            counters[f"refused_{e.code}"] += 1
            self._warnings.warn(addr[0], "refused datagram of {size} bytes from {peer}: {error}", size=len(data), peer=peer, error=str(e))
            answer = wire.refusal(body, e)
            if isinstance(answer, wire.DayAck):
                self._reply(answer, key, addr)
            return
        if not isinstance(message, wire.DayChunk):
            counters["unexpected"] += 1
            self.log.warn("{peer} sent a {kind}, which a gateway never takes", peer=peer, kind=type(message).__name__)
            return
        self._intake.chunk_received(message, peer).addCallback(self._answer, message, addr, peer, len(data))

    def _drop(self, why: str, peer: str, size: int, detail: str) -> None:
        self._intake.counters[f"dropped_{why}"] += 1
        self._warnings.warn(peer.rpartition(":")[0], "dropped datagram of {size} bytes from {peer}: {detail}", size=size, peer=peer, detail=detail)

    def _reply(self, ack: wire.DayAck, key: bytes, addr) -> None:
        """
        Send C{ack}, sealed with the device's C{key}, to C{addr}.
        """
        self.transport.write(wire.seal(wire.encode(ack), key), addr)

    def _answer(self, ack: wire.DayAck, chunk: wire.DayChunk, addr, peer: str, size: int) -> None:
        self._reply(ack, self._keys[chunk.device_id], addr)
        if not self._log_datagrams:
            # A log line costs as much as the rest of a datagram's handling:
            # by default the intake logs each device's day once it is whole.
            return
        # One line for both events.
        self.log.info(
            "received {size} bytes from device {device} ({peer}): part {part}/{parts} of {day}, {n} readings; "
            "sent {status} to device {device} for part {part}/{parts}",
            size=size,
            device=chunk.device_id,
            peer=peer,
            part=chunk.part,
            parts=chunk.parts,
            day=chunk.day,
            n=chunk.count,
            status=ack.status,
        )


@implementer(IHandshakeListener)
class CloudClientProtocol(wire.LineProtocol):
    """
    The cloud's side: hands acknowledgements to the uplink, and pings the
    cloud when the line has been silent for C{heartbeat} seconds, so a
    half-open connection is noticed and replaced.

    Over TLS the link is up, and the uplink sends, once the cloud has
    answered a first ping through it: in TLS 1.3 this side's handshake
    completes before the cloud has checked this side's certificate, so only
    an answer shows that both checks passed.  A handshake that does not
    complete within C{heartbeat} seconds is given up.  In plain text the link
    is up at once.
    """

    MAX_LENGTH = 64 * 1024
    log = Logger()

    def __init__(self, uplink: Uplink, clock, heartbeat: float):
        self._uplink = uplink
        self._clock = clock
        self._heartbeat = heartbeat
        self._timer = None
        self._pings = 0
        self._handshake_done = False
        self._up = False
        self._how = "plain text"

    def connectionMade(self):
        wire.without_nagle(self.transport)
        self._heard()
        # A TLS transport provides INegotiated; handshakeCompleted follows.
        if not INegotiated.providedBy(self.transport):
            self._handshake_done = True
            self._link_up()

    def handshakeCompleted(self):
        self._handshake_done = True
        certificate = self.transport.getPeerCertificate()
        subject = certificate.get_subject().commonName if certificate is not None else None
        self._how = f"TLS, certificate CN={subject}"
        self._ping()

    def _link_up(self) -> None:
        self._up = True
        self.log.info(
            "connected to the cloud at {peer} from {local} ({how})",
            peer=self.transport.getPeer(),
            local=self.transport.getHost(),
            how=self._how,
        )
        self._uplink.connected(self)

    def connectionLost(self, reason):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._up:
            self.log.info("connection to the cloud lost: {why}", why=reason.getErrorMessage())
        else:
            stage = "before the cloud answered over TLS" if self._handshake_done else "before the TLS handshake completed"
            self.log.info("connection to the cloud lost: {why} ({stage})", why=reason.getErrorMessage(), stage=stage)
        self._uplink.disconnected(self)

    def send(self, message) -> None:
        self.sendLine(wire.encode(message))

    def abort(self) -> None:
        self.transport.abortConnection()

    def _heard(self) -> None:
        self._pings = 0
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._heartbeat)
        else:
            self._timer = self._clock.callLater(self._heartbeat, self._silent)

    def _silent(self) -> None:
        if not self._handshake_done:
            self.log.warn("no TLS handshake with the cloud within {t:g} s: reconnecting", t=self._heartbeat)
            self._uplink.counters["handshake_timeouts"] += 1
            self.abort()
            return
        if self._pings >= 1:
            self.log.warn("the cloud did not answer a ping within {t:g} s: reconnecting", t=self._heartbeat)
            self._uplink.counters["heartbeat_failures"] += 1
            self.abort()
            return
        self._ping()

    def _ping(self) -> None:
        self._pings += 1
        self.send(wire.Ping(self._pings))
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._heartbeat)
        else:
            self._timer = self._clock.callLater(self._heartbeat, self._silent)

    def lineReceived(self, line: bytes):
        self._heard()
        if not self._up:
            self._link_up()
        try:
            message = wire.decode(line, max_size=self.MAX_LENGTH)
        except wire.WireError as e:
            self._uplink.counters["refused_from_cloud"] += 1
            self.log.warn("refused a line from the cloud: {error}", error=str(e))
            return
        if isinstance(message, wire.BatchAck):
            self._uplink.ack_received(message)
        elif not isinstance(message, wire.Pong):
            self.log.warn("the cloud sent a {kind}: ignored", kind=type(message).__name__)

    def lineLengthExceeded(self, line):
        self.log.warn("the cloud sent a line over {max} bytes: reconnecting", max=self.MAX_LENGTH)
        self.abort()


class CloudClientFactory(Factory):
    def __init__(self, uplink: Uplink, clock, heartbeat: float):
        self._uplink = uplink
        self._clock = clock
        self._heartbeat = heartbeat

    def buildProtocol(self, addr):
        return CloudClientProtocol(self._uplink, self._clock, self._heartbeat)
