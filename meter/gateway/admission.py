"""
What a device's chunk must be to be taken, and what the gateway remembers to
tell: who sent it (fleet, address, source), when (the replay window, the day
against ts), whether it was taken before (its message id and content), and
what the device's day, its transfer, the spool and the gateway can still
take.

One set of rules serves both ways in: L{Admission.admit}, for a decoded
chunk, and L{Admission.acknowledged_before}, the shortcut that acknowledges
a retransmission again before it is decoded.
"""

from __future__ import annotations

import datetime
import ipaddress
from typing import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger, LogLevel

from meter import wire
from meter.clocktext import utc_time
from meter.gateway.interfaces import ISpool
from meter.gateway.metrics import GatewayMetrics
from meter.gateway.reassembly import DAY, PARTS, Reassembly
from meter.gateway.room import RoomCalendar
from meter.gateway.spool import StoredChunk, content_digest
from meter.ratelimit import LimitedLines, LimitedWarnings

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


def day_at(unix_time: int) -> datetime.date:
    """
    The UTC date of C{unix_time}.
    """
    return datetime.date.fromordinal(_EPOCH_ORDINAL + unix_time // 86400)


def admissible_from(now: float, replay_window: float | None) -> datetime.date | None:
    """
    The first day a chunk taken at C{now} may name, on the gateway's clock:
    one whose transfer started up to the replay window before (None: any
    day, without a window).
    """
    return None if replay_window is None else day_at(int(now - replay_window) + DAY_EARLIEST)


#: The bit of each minute of the day, by its C{HH:MM}.
_MINUTE_BIT = {f"{m // 60:02d}:{m % 60:02d}": 1 << m for m in range(24 * 60)}


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


#: What one device sent of one day, kept until it is forgotten by its age
#: (see L{Admission.forget_before}): the message ids admitted (being
#: committed or acknowledged), so a device's day is bounded in transfers and
#: chunks however many it sends.  A plain tuple C{(transfers, chunks,
#: last_seen)}: C{transfers} is C{(xfer, parts, xfer, parts, ...)} for each
#: transfer with a chunk admitted, the parts one bit each; how many chunks
#: were admitted in all; when the last was, on the gateway's clock.
#: Replaced rather than changed, and tuples of plain values, for the reason
#: L{meter.gateway.reassembly.Transfer} gives (a tuple holding a dict stays
#: tracked).  Flat, not pairs in a tuple: the collector's pass untracks a
#: tuple only if what it holds is untracked already, one level of nesting a
#: pass, so the books of pairs reached the old generation still tracked,
#: 60,000 of them at 100,000 devices, for a full pass to scan.
DeviceDay = tuple
Transfers = tuple


def _parts_of(transfers: Transfers, xfer: str) -> int:
    """
    The parts admitted of transfer C{xfer}, one bit each (0: none).
    """
    # Ids are strings and parts numbers, so only an id can equal xfer.
    try:
        return transfers[transfers.index(xfer) + 1]
    except ValueError:
        return 0


def _with_parts(transfers: Transfers, xfer: str, parts: int) -> Transfers:
    """
    C{transfers} with transfer C{xfer}'s parts now C{parts} (none: gone).
    """
    try:
        at = transfers.index(xfer)
    except ValueError:
        return (*transfers, xfer, parts) if parts else transfers
    if parts:
        return (*transfers[: at + 1], parts, *transfers[at + 2 :])
    return transfers[:at] + transfers[at + 2 :]


def _transfer_parts(transfers: Transfers):
    """
    Each C{(xfer, parts)} of C{transfers}.
    """
    return zip(transfers[::2], transfers[1::2])


def _part_numbers(bits: int):
    """
    The part numbers of a transfer's bits in a L{DeviceDay}, one bit each.
    """
    while bits:
        lowest = bits & -bits
        yield lowest.bit_length() - 1
        bits ^= lowest


class Admission:
    """
    Decides whether a chunk is taken, and keeps what that takes: the message
    ids acknowledged and being committed, each device's days, the minutes of
    each incomplete multi-chunk transfer, the readings being committed.

    @param report: logs a line about what a device sends again, rate-limited
        per device (see L{meter.gateway.intake.Intake}).
    """

    def __init__(
        self,
        fleet: dict[int, str],
        spool: ISpool,
        clock,
        reassembly: Reassembly,
        metrics: GatewayMetrics,
        log: Logger,
        report: Callable[..., None],
        *,
        check_source: bool = False,
        replay_window: float | None = None,
        spool_limit: int | None = None,
        max_committing: int = 2000,
        max_transfers_per_day: int = 24,
        max_parts_per_day: int = 4096,
        on_spool_full: Callable[[], None] = lambda: None,
        max_hint: float | None = 60.0,
    ):
        self._fleet = fleet
        self._spool = spool
        self._clock = clock
        self._reassembly = reassembly
        self._metrics = metrics
        self._log = log
        self._report = report
        self._check_source = check_source
        self._replay_window = replay_window
        self._spool_limit = spool_limit
        self._max_committing = max_committing
        self._max_transfers_per_day = max_transfers_per_day
        self._max_parts_per_day = max_parts_per_day
        #: Message ids committed to the spool, with their content digests
        #: (C{None}: spooled before digests were kept), so a duplicate is
        #: re-acknowledged without being processed again and a message id
        #: sent again with other content is refused.
        self.acknowledged: dict[tuple[int, str, int], bytes | None] = {}
        #: Message ids being committed now, with the answers a duplicate
        #: arriving meanwhile waits for.
        self._committing: dict[tuple[int, str, int], list[Deferred]] = {}
        #: The content digest and the minutes of each chunk being committed.
        self._committing_content: dict[tuple[int, str, int], tuple[bytes, int]] = {}
        #: What each device sent of each day, by (device, day): the bounds a
        #: device's day is held to, and what is forgotten by age.
        self.days: dict[tuple[int, datetime.date], DeviceDay] = {}
        #: The minutes of the chunks admitted of each multi-chunk transfer still
        #: incomplete, one bit each: a minute sent twice across chunks is
        #: refused.
        self._minutes: dict[tuple[int, str], int] = {}
        #: Readings of chunks being committed now: they count against the
        #: spool limit already, or a burst could overshoot it.
        self._incoming = 0
        self._warnings = LimitedWarnings(log, clock)
        self._spool_full_lines = LimitedLines(log, clock, 1 / 6, 5, LogLevel.error, "similar lines left out")
        self._on_spool_full = on_spool_full
        #: The hints of the devices a full spool refuses (None: no hints).
        self.room = RoomCalendar(max_hint) if max_hint is not None else None

    def set_fleet(self, fleet: dict[int, str]) -> None:
        """
        Expect C{fleet} from the next chunk on (a reload): what devices sent
        before, removed ones included, is kept and forgotten by its age.
        """
        self._fleet = fleet

    # -- the rules -----------------------------------------------------------

    def _refusal(
        self, device_id: int, sent_at: int, peer: str, device_ip: str | None = None, day: datetime.date | None = None
    ) -> tuple[str, str] | None:
        """
        The counter and the reason of the first rule on who sent a chunk and
        when that it breaks, or None.  The rules on its content (its address,
        its day) are checked where given: the shortcut, which has not decoded
        the chunk, knows its content is that of a chunk taken before.
        """
        expected_ip = self._fleet.get(device_id)
        if expected_ip is None:
            return "unknown_device", f"fleet: device {device_id} is not in this gateway's fleet"
        if device_ip is not None and device_ip != expected_ip:
            return "wrong_address", f"address: device {device_id} is {expected_ip}, not {device_ip}"
        if self._check_source and peer_host(peer) != expected_ip:
            return "wrong_source", f"source: device {device_id} sends from {expected_ip}, not from {peer_host(peer)}"
        if self._replay_window is not None and abs(self._clock.seconds() - sent_at) > self._replay_window:
            # Either a datagram captured earlier and sent again, or a device
            # whose clock is off: neither may be stored.
            return "refused_replay", (
                f"replay: the gateway's clock minus ts ({utc_time(sent_at)}) is "
                f"{self._clock.seconds() - sent_at:+.0f} s (positive: the transfer started that long ago), "
                f"outside the replay window of {self._replay_window:g} s"
            )
        if day is not None and not day_agrees(day, sent_at):
            # What the gateway keeps and forgets is filed by day: a day far
            # from the device's own clock is a device gone wrong (or a key
            # in the wrong hands), not a day to keep.
            return "refused_day", (
                f"day: {day} does not agree with ts ({utc_time(sent_at)}): a transfer started then reports "
                f"a day from {day_at(sent_at + DAY_EARLIEST)} to {day_at(sent_at + DAY_LATEST)}"
            )
        return None

    def in_fleet(self, device_id: int) -> bool:
        """
        Whether device C{device_id} is one of [fleet].
        """
        return device_id in self._fleet

    def acknowledged_before(self, device_id: int, xfer: str, part: int, sent_at: int, peer: str, body: bytes) -> bool:
        """
        Whether a chunk with this message id is stored already and may be
        acknowledged again as it is: the same content (C{body}, the unsealed
        datagram) and within the rules.  Counts it as a duplicate.  Anything
        else takes the full path (L{admit}), which says why it is refused,
        if it is.
        """
        stored = self.acknowledged.get((device_id, xfer, part), False)
        if stored is False:
            return False
        if stored is None or content_digest(body) != stored:
            # Other content (refused as a conflict), or the same content
            # written another way, or a message id spooled before digests
            # were kept: decoding settles it.
            return False
        if self._refusal(device_id, sent_at, peer) is not None:
            return False
        self._metrics.duplicates += 1
        return True

    def overloaded(self) -> bool:
        """
        Whether more chunks wait for their spool commit than should: new
        ones are then answered busy before they are decoded.
        """
        return len(self._committing) >= self._max_committing

    def admit(self, chunk: wire.DayChunk, peer: str, digest: bytes) -> Deferred | None:
        """
        Decide on C{chunk}, whose content digest is C{digest} (see
        L{content_digest}): the Deferred of its answer, or None if it is
        taken.  A chunk taken counts as being committed until the caller,
        which spools it, calls L{acknowledge} and L{answer}, or
        L{not_committed}.
        """
        refusal = self._refusal(chunk.device_id, chunk.sent_at, peer, chunk.device_ip, chunk.day)
        if refusal is not None:
            counter, reason = refusal
            self._metrics[counter] += 1
            return succeed(self._refuse(chunk, reason, peer))
        key = chunk.message_id
        if key in self.acknowledged:
            stored = self.acknowledged[key]
            if stored is not None and stored != digest:
                return succeed(self._conflict(chunk, peer))
            self._metrics.duplicates += 1
            self._report(
                chunk.device_id,
                "duplicate of device {device} part {part}/{parts} from {peer}: acknowledged again",
                device=chunk.device_id,
                part=chunk.part,
                parts=chunk.parts,
                peer=peer,
            )
            return succeed(wire.DayAck(chunk.xfer, chunk.part, "ok"))
        if key in self._committing:
            if self._committing_content[key][0] != digest:
                return succeed(self._conflict(chunk, peer))
            self._metrics.duplicates += 1
            waiter = Deferred()
            self._committing[key].append(waiter)
            return waiter
        transfer = self._reassembly.transfers.get((chunk.device_id, chunk.xfer))
        if transfer is not None and (transfer[PARTS] != chunk.parts or transfer[DAY] != chunk.day):
            self._metrics.inconsistent_chunks += 1
            return succeed(
                self._refuse(
                    chunk,
                    f"transfer: transfer {chunk.xfer} was {transfer[PARTS]} chunks of {transfer[DAY]}, "
                    f"now {chunk.parts} chunks of {chunk.day}",
                    peer,
                )
            )
        device_day = self.days.get((chunk.device_id, chunk.day))
        refusal_reason = self._over_daily_bounds(chunk, device_day)
        if refusal_reason is not None:
            self._metrics.refused_limit += 1
            return succeed(self._refuse(chunk, refusal_reason, peer))
        transfer_key = (chunk.device_id, chunk.xfer)
        minutes = 0
        if chunk.parts > 1:
            minutes = minute_bits(chunk.records)
            repeated = self._minutes.get(transfer_key, 0) & minutes
            if repeated:
                self._metrics.refused_minute += 1
                first = (repeated & -repeated).bit_length() - 1
                return succeed(
                    self._refuse(
                        chunk,
                        f"minute: {first // 60:02d}:{first % 60:02d} of {chunk.day} is in another chunk of "
                        f"transfer {chunk.xfer} already",
                        peer,
                    )
                )
        count = chunk.count
        if self._spool_limit is not None and self._spool.depth + self._incoming + count > self._spool_limit:
            return succeed(self._spool_full(chunk))
        self._committing[key] = []
        self._committing_content[key] = (digest, minutes)
        self._incoming += count
        if device_day is None:
            self.days[(chunk.device_id, chunk.day)] = ((chunk.xfer, 1 << chunk.part), 1, self._clock.seconds())
        else:
            transfers, chunks, _ = device_day
            parts = _parts_of(transfers, chunk.xfer) | 1 << chunk.part
            self.days[(chunk.device_id, chunk.day)] = (
                _with_parts(transfers, chunk.xfer, parts), chunks + 1, self._clock.seconds()
            )
        if minutes:
            self._minutes[transfer_key] = self._minutes.get(transfer_key, 0) | minutes
        return None

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
        transfers, chunks, _ = device_day
        if len(transfers) // 2 >= self._max_transfers_per_day and not _parts_of(transfers, chunk.xfer):
            return (
                f"limit: device {chunk.device_id} sent {len(transfers) // 2} transfers of {chunk.day} already, "
                f"the most a device's day may have"
            )
        if chunks >= self._max_parts_per_day:
            return (
                f"limit: device {chunk.device_id} sent {chunks} chunks of {chunk.day} already, "
                f"the most a device's day may have"
            )
        return None

    def _spool_full(self, chunk: wire.DayChunk) -> wire.DayAck:
        self._metrics.refused_spool_full += 1
        # Every device's every chunk is refused while the spool is full: a
        # few lines a minute say so, the counter counts them all.
        self._spool_full_lines.line(
            None,
            "SPOOL FULL ({depth} of {limit} readings): device {device} must retry later; is the cloud reachable?",
            depth=self._spool.depth,
            limit=self._spool_limit,
            device=chunk.device_id,
        )
        reason = f"spool_full: the spool is at its limit of {self._spool_limit} readings"
        # Room is made as the cloud takes readings: the device comes back
        # when there should be room for its day (meter.gateway.room).
        hint = None
        if self.room is not None:
            hint = self.room.hint(self._clock.seconds(), self._spool.removed, chunk.count * chunk.parts)
        self._on_spool_full()
        return wire.DayAck(chunk.xfer, chunk.part, "busy", reason, hint)

    def _refuse(self, chunk: wire.DayChunk, reason: str, peer: str) -> wire.DayAck:
        self._warnings.warn(peer_host(peer), "refused chunk from {peer}: {reason}", peer=peer, reason=reason)
        return wire.DayAck(chunk.xfer, chunk.part, "bad", reason)

    def _conflict(self, chunk: wire.DayChunk, peer: str) -> wire.DayAck:
        # Acknowledging it as a duplicate would tell the device its content
        # is stored when only the first content is.
        self._metrics.refused_conflict += 1
        return self._refuse(
            chunk,
            f"conflict: part {chunk.part}/{chunk.parts} of transfer {chunk.xfer} was received with other content",
            peer,
        )

    # -- after the commit ----------------------------------------------------

    def acknowledge(self, chunk: wire.DayChunk) -> None:
        """
        C{chunk}, admitted, is committed: its message id is acknowledged
        from now on.
        """
        key = chunk.message_id
        self.acknowledged[key] = self._committing_content.pop(key)[0]

    def answer(self, chunk: wire.DayChunk, ack: wire.DayAck) -> wire.DayAck:
        """
        C{chunk}'s commit is over: the duplicates that arrived meanwhile get
        C{ack} too.
        """
        self._incoming -= chunk.count
        for waiter in self._committing.pop(chunk.message_id):
            waiter.callback(ack)
        return ack

    def not_committed(self, chunk: wire.DayChunk) -> None:
        """
        The commit of C{chunk} failed: it no longer counts against its day
        (its device sends it again) nor its minutes against its transfer.
        """
        key = chunk.message_id
        _, minutes = self._committing_content.pop(key, (None, 0))
        device_day = self.days.get((chunk.device_id, chunk.day))
        bit = 1 << chunk.part
        if device_day is not None and _parts_of(device_day[0], chunk.xfer) & bit:
            transfers, chunks, last_seen = device_day
            # A transfer none of whose chunks was taken is not one of the
            # day's (its parts left are none): a device whose chunks met a
            # failing spool gives up and sends its day again in a new
            # transfer, as often as it takes.
            left = _parts_of(transfers, chunk.xfer) & ~bit
            self.days[(chunk.device_id, chunk.day)] = (_with_parts(transfers, chunk.xfer, left), chunks - 1, last_seen)
        transfer_key = (chunk.device_id, chunk.xfer)
        if minutes and transfer_key in self._minutes:
            self._minutes[transfer_key] &= ~minutes

    def transfer_complete(self, device_id: int, xfer: str) -> None:
        """
        Every chunk of the transfer arrived: its minutes need no more checks.
        """
        self._minutes.pop((device_id, xfer), None)

    # -- memory --------------------------------------------------------------

    def recover(self, chunks: tuple[StoredChunk, ...]) -> None:
        """
        Remember the message ids the spool holds, each against its device's
        day.
        """
        for stored in chunks:
            message_id = (stored.device_id, stored.xfer, stored.part)
            self.acknowledged[message_id] = stored.digest
            transfers, chunks, last_seen = self.days.get((stored.device_id, stored.day), ((), 0, stored.received_at))
            parts = _parts_of(transfers, stored.xfer) | 1 << stored.part
            self.days[(stored.device_id, stored.day)] = (
                _with_parts(transfers, stored.xfer, parts), chunks + 1, max(last_seen, stored.received_at)
            )

    def forget_before(self, cutoff: float) -> list[tuple[int, str]]:
        """
        Forget each device's day last heard from before C{cutoff} (on the
        gateway's clock): its message ids and its transfers' minutes.  The
        transfers forgotten, as C{(device_id, xfer)}.
        """
        forgotten = []
        for (device_id, day), device_day in list(self.days.items()):
            transfers, _, last_seen = device_day
            if last_seen >= cutoff:
                continue
            del self.days[(device_id, day)]
            for xfer, parts in _transfer_parts(transfers):
                for part in _part_numbers(parts):
                    self.acknowledged.pop((device_id, xfer, part), None)
                self._minutes.pop((device_id, xfer), None)
                forgotten.append((device_id, xfer))
        return forgotten
