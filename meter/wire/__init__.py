"""
The wire format of both hops, device -> gateway over UDP and gateway -> cloud
over TCP: one codec, as twisted.names has one C{dns.Message} behind its UDP
and TCP protocols.

Every message is one line of printable ASCII::

    meter/1 <KIND> key=value key=value ... r=<records>

A UDP datagram carries exactly one message with no line end; on TCP each
message ends with C{\\n}.  The encoding is canonical: L{decode} refuses any
form L{encode} would not have produced, so a message that decodes re-encodes
to the same bytes.  docs/protocol.md specifies every field.
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import os
import re
import zlib
from typing import Union
from urllib.parse import quote, unquote

import attrs
from twisted.internet.protocol import Protocol

from meter.reading import (
    HHMM,
    MinuteStamps,
    Reading,
    ReadingError,
    check_humidity,
    check_temperature,
    format_number,
)

VERSION = 1
MAGIC = b"meter/"
_PREFIX = b"meter/%d " % (VERSION,)

#: The largest UDP payload an IPv4 datagram can carry.
MAX_DATAGRAM = 65507
#: The default ceiling of one device datagram: fits a 1280-byte IPv6 MTU.
DEFAULT_CHUNK_BYTES = 1200
#: The most readings one message may carry (a day of per-minute readings).
MAX_READINGS = 24 * 60
#: The most readings one batch to the cloud carries.
MAX_BATCH_READINGS = 5000
#: The longest line either side accepts on TCP; a full batch fits easily.
MAX_LINE = 1 << 20


class WireError(ValueError):
    """
    Bytes that are not a valid message.

    @ivar code: a short fixed token naming the kind of fault, for counters.
    """

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def _day_records_text(value, chunk) -> str:
    """
    A chunk's records as canonical C{DAY} record text: text is taken as it
    is (the decoder checked it), readings are formatted, and must be of the
    chunk's device, address and day, or the chunk could not carry them.
    """
    if isinstance(value, str):
        return value
    _check_belong(value, chunk.device_id, chunk.device_ip, chunk.day)
    return ";".join(map(_day_record, value))


def _check_belong(readings, device_id: int, device_ip: str, day: datetime.date) -> None:
    """
    @raise ValueError: if a reading is not of this device, address and day,
        so a chunk of theirs could not carry it.
    """
    for reading in readings:
        if reading.device_id != device_id or reading.device_ip != device_ip or reading.taken_at.date() != day:
            raise ValueError(f"{reading!r} does not belong in a chunk of device {device_id} on {day}")


def record_count(records: str) -> int:
    """
    How many records a C{;}-separated record text holds.
    """
    return records.count(";") + 1 if records else 0


@attrs.frozen
class DayChunk:
    """
    Device -> gateway: part C{part} of C{parts} of one device's day.

    @ivar xfer: the transfer id, 16 lowercase hex digits, the same for every
        part of one day's sending and for every retransmission of it.  With
        C{part} it is the message id the gateway acknowledges and
        deduplicates by.
    @ivar sent_at: when the device first sent this transfer, in whole Unix
        seconds (the gateway's replay window reads it).
    @ivar records: the readings as canonical C{DAY} record text
        (C{HH:MM,t,h;...}).  Given a sequence of L{Reading}s instead, the
        chunk formats them.  The text is the value: the gateway checks it and
        spools it as it came, without making an object of each reading.
    """

    device_id: int
    device_ip: str
    day: datetime.date
    xfer: str
    part: int
    parts: int
    sent_at: int
    records: str = attrs.field(converter=attrs.Converter(_day_records_text, takes_self=True))

    @property
    def count(self) -> int:
        """
        How many readings the chunk carries.
        """
        return record_count(self.records)

    @property
    def readings(self) -> tuple[Reading, ...]:
        return _decode_day_records(self.records, self.count, self.device_id, self.device_ip, self.day)

    @property
    def message_id(self) -> tuple[int, str, int]:
        return (self.device_id, self.xfer, self.part)


@attrs.frozen
class DayAck:
    """
    Gateway -> device: the answer to one L{DayChunk}.

    @ivar status: C{ok} (the chunk is durable at the gateway), C{busy} (the
        gateway cannot take it now; retry later) or C{bad} (it will never be
        accepted; C{reason} says why).
    """

    xfer: str
    part: int
    status: str
    reason: str = ""


@attrs.frozen
class BatchColumns:
    """
    The fields of a batch's records as text, column by column: the
    C{index}th record is C{devices[index]}, C{ips[index]}, and so on.

    Columns, not a tuple a record: the cloud makes each column's values and
    console lines with one C-level pass over a list, not a Python loop over
    records.
    """

    devices: list[str]
    ips: list[str]
    stamps: list[str]
    temperatures: list[str]
    humidities: list[str]

    @classmethod
    def of(cls, text: str) -> BatchColumns:
        """
        The columns of a C{;}-separated batch record text, split, not checked.
        """
        flat = text.replace(";", ",").split(",") if text else []
        return cls(flat[0::5], flat[1::5], flat[2::5], flat[3::5], flat[4::5])

    def __len__(self) -> int:
        return len(self.devices)

    def pick(self, indexes: list[int]) -> BatchColumns:
        """
        The records at C{indexes}, in that order.
        """
        return BatchColumns(*([column[index] for index in indexes] for column in attrs.astuple(self, recurse=False)))


def _batch_records_text(value) -> str:
    if isinstance(value, str):
        return value
    return _batch_records(value)


@attrs.frozen
class Batch:
    """
    Gateway -> cloud: readings of any devices and days, all or nothing.

    @ivar records: the readings as canonical C{BATCH} record text
        (C{id,ip,YYYY-MM-DDTHH:MM,t,h;...}); given a sequence of L{Reading}s
        instead, the batch formats them.
    @ivar checked_columns: the records' fields when the batch was decoded
        from the wire (the decoder split and checked them), so the cloud
        stores them without splitting again; C{None} otherwise.  Not part of
        the batch's value: it only repeats C{records}.
    """

    batch_id: str
    records: str = attrs.field(converter=_batch_records_text)
    checked_columns: BatchColumns | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def count(self) -> int:
        return record_count(self.records)

    @property
    def readings(self) -> tuple[Reading, ...]:
        return _decode_batch_records(self.records, self.count)

    def columns(self) -> BatchColumns:
        """
        The records' fields: device ids, addresses, timestamps,
        temperatures and humidities, as text.
        """
        if self.checked_columns is not None:
            return self.checked_columns
        return BatchColumns.of(self.records)


@attrs.frozen
class BatchAck:
    """
    Cloud -> gateway: the answer to one L{Batch}.

    @ivar status: C{ok} once every reading is committed (C{new} were stored
        now, C{dup} had been stored before), or C{bad} with a C{reason}; then
        nothing of the batch was stored.
    """

    batch_id: str
    status: str
    reason: str = ""
    new: int = 0
    dup: int = 0


@attrs.frozen
class Ping:
    """
    Either side of the TCP hop: are you there?  Answered by L{Pong}.
    """

    seq: int


@attrs.frozen
class Pong:
    seq: int


Message = Union[DayChunk, DayAck, Batch, BatchAck, Ping, Pong]

STATUSES = {DayAck: ("ok", "busy", "bad"), BatchAck: ("ok", "bad")}

# -- value grammar ----------------------------------------------------------

_HEX16 = re.compile(r"[0-9a-f]{16}\Z")
_UINT = re.compile(r"(0|[1-9][0-9]{0,9})\Z")
_NUMBER = re.compile(r"-?(0|[1-9][0-9]{0,2})(\.[0-9]{0,5}[1-9])?\Z")
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")
_HHMM = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]\Z")
_STAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T([01][0-9]|2[0-3]):[0-5][0-9]\Z")
_KEY = re.compile(r"[a-z]{1,8}\Z")
_PRINTABLE = re.compile(rb"[\x21-\x7e]+( [\x21-\x7e]+)*\Z")

#: Device ids are positive and fit a signed 32-bit column.
MAX_DEVICE_ID = 2**31 - 1
_MAX_UINT32 = 2**32 - 1


def _uint(text: str, what: str, high: int = _MAX_UINT32) -> int:
    if _UINT.match(text) is None:
        raise WireError("value", f"{what} {text!r} is not a whole number")
    value = int(text)
    if value > high:
        raise WireError("value", f"{what} {value} above {high}")
    return value


#: Device ids already checked: a batch repeats its devices.  Bounded.
_device_ids: dict[str, int] = {}


def _device_id(text: str) -> int:
    value = _device_ids.get(text)
    if value is not None:
        return value
    value = _uint(text, "device id", MAX_DEVICE_ID)
    if value == 0:
        raise WireError("value", "device id 0 (ids start at 1)")
    if len(_device_ids) < _CHECKED_MAX:
        _device_ids[text] = value
    return value


def device_address(text: str) -> str:
    """
    The one text of a device address: IPv4 in dotted decimal without leading
    zeros, IPv6 in RFC 5952's form (section 4: lowercase hex, no leading
    zeros, the first longest run of two or more zero groups as C{::}).

    Made here, not by C{str(ipaddress)}, whose IPv4-mapped form differs
    between Python versions (C{::ffff:102:304} on 3.11, C{::ffff:1.2.3.4}
    from 3.13 on).  An IPv4-mapped address is refused: the device it names
    has an IPv4 address, written as such.  A scoped address
    (C{fe80::1%eth0}) is refused: its zone names an interface of the host
    that wrote it, not the device.

    @raise ValueError: if C{text} is not such an address in any form.
    """
    if "%" in text:
        raise ValueError(f"device address {text!r} has a zone (scoped addresses are not device addresses)")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"device address {text!r} is not an IP address") from None
    packed = address.packed
    if address.version == 4:
        return ".".join(map(str, packed))
    if packed[:12] == _MAPPED_PREFIX:
        raise ValueError(f"device address {text!r} is IPv4-mapped: write it as {'.'.join(map(str, packed[12:]))}")
    groups = [f"{packed[index] << 8 | packed[index + 1]:x}" for index in range(0, 16, 2)]
    # The first longest run of zero groups, if two or more long.
    start, length = 0, 0
    index = 0
    while index < 8:
        end = index
        while end < 8 and groups[end] == "0":
            end += 1
        if end - index > length:
            start, length = index, end - index
        index = end + 1
    if length < 2:
        return ":".join(groups)
    return ":".join(groups[:start]) + "::" + ":".join(groups[start + length :])


#: The first 12 bytes of every IPv4-mapped IPv6 address (::ffff:0:0/96).
_MAPPED_PREFIX = bytes(10) + b"\xff\xff"

_seen_ips: dict[str, str] = {}


def _ip(text: str) -> str:
    # A fleet has few addresses and a batch repeats them: remember the ones
    # already checked instead of parsing each again (bounded, so forged
    # addresses cannot grow it without limit).
    if text in _seen_ips:
        return text
    try:
        canonical = device_address(text)
    except ValueError as e:
        raise WireError("value", str(e)) from None
    if canonical != text:
        raise WireError("value", f"device address {text!r} is not canonical ({canonical})")
    if len(_seen_ips) < 65536:
        _seen_ips[text] = text
    return text


#: Numbers already checked, by kind: sensor values repeat, so most records
#: are checked by one lookup.  Bounded, so odd inputs cannot grow them.
_CHECKED: dict[str, dict[str, float]] = {"temperature": {}, "humidity": {}}
_CHECKED_MAX = 1 << 16


def _number(text: str, check, what: str) -> float:
    checked = _CHECKED[what]
    value = checked.get(text)
    if value is not None:
        return value
    value = _check_number(text, check, what)
    if len(checked) < _CHECKED_MAX:
        checked[text] = value
    return value


def _check_number(text: str, check, what: str) -> float:
    if _NUMBER.match(text) is None:
        raise WireError("value", f"{what} {text!r} is not a decimal number")
    value = float(text)
    if format_number(value) != text:
        raise WireError("value", f"{what} {text!r} is not canonical")
    try:
        return check(value)
    except ReadingError as e:
        raise WireError("range", str(e)) from None


def _day(text: str) -> datetime.date:
    if _DAY.match(text) is None:
        raise WireError("value", f"day {text!r} is not YYYY-MM-DD")
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise WireError("value", f"day {text!r} is not a calendar date") from None


def _hex16(text: str, what: str) -> str:
    if _HEX16.match(text) is None:
        raise WireError("value", f"{what} {text!r} is not 16 lowercase hex digits")
    return text


def _reason(text: str | None) -> str:
    if text is None:
        return ""
    if not text:
        # The encoder leaves an empty reason out: why= would not be canonical.
        raise WireError("value", "why= without a reason")
    try:
        reason = unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise WireError("value", f"reason {text[:32]!r} is not percent-encoded UTF-8") from None
    if _quote(reason) != text:
        raise WireError("value", f"reason {text!r} is not canonical")
    return reason


def _quote(reason: str) -> str:
    return quote(reason, safe="")


# -- records ----------------------------------------------------------------


def _day_record(reading: Reading) -> str:
    return (
        f"{reading.taken_at:%H:%M},{format_number(reading.temperature_c)},"
        f"{format_number(reading.humidity_pct)}"
    )


def _batch_records(readings: tuple[Reading, ...]) -> str:
    stamps = MinuteStamps()
    return ";".join(
        f"{reading.device_id},{reading.device_ip},{stamps[reading.taken_at]},"
        f"{format_number(reading.temperature_c)},{format_number(reading.humidity_pct)}"
        for reading in readings
    )


def _records(text: str, count: int) -> list[list[str]]:
    if count == 0:
        if text:
            raise WireError("count", "n=0 but records follow")
        return []
    records = text.split(";")
    if len(records) != count:
        raise WireError("count", f"n={count} but {len(records)} records")
    return [record.split(",") for record in records]


#: The minute of the day of each valid C{HH:MM}: one lookup checks a time
#: as L{_HHMM} would and gives its minute.
_MINUTE_OF = {text: minute for minute, text in enumerate(HHMM)}
#: Each day's times already made, by minute of the day: a chunk's readings
#: share their day and a fleet's chunks their minutes.  Bounded.
_DAY_TIMES: dict[datetime.date, list] = {}
_DAY_TIMES_MAX = 64


def _decode_day_records(text: str, count: int, device_id: int, device_ip: str, day: datetime.date):
    readings = []
    seen = set()
    times = _DAY_TIMES.get(day)
    if times is None:
        times = [None] * (24 * 60)
        if len(_DAY_TIMES) < _DAY_TIMES_MAX:
            _DAY_TIMES[day] = times
    for fields in _records(text, count):
        if len(fields) != 3:
            raise WireError("record", f"record {','.join(fields)!r} is not HH:MM,temperature,humidity")
        hhmm, temperature, humidity = fields
        minute = _MINUTE_OF.get(hhmm)
        if minute is None:
            raise WireError("value", f"time {hhmm!r} is not HH:MM")
        if minute in seen:
            raise WireError("minute", f"time {hhmm} twice in one message")
        seen.add(minute)
        taken_at = times[minute]
        if taken_at is None:
            taken_at = times[minute] = datetime.datetime(day.year, day.month, day.day, minute // 60, minute % 60)
        readings.append(
            Reading.checked(
                device_id,
                device_ip,
                taken_at,
                _number(temperature, check_temperature, "temperature"),
                _number(humidity, check_humidity, "humidity"),
            )
        )
    return tuple(readings)


#: Times already checked: a fleet's readings share the day's minutes.
#: Bounded.
_stamps: dict[str, datetime.datetime] = {}


def _stamp(stamp: str) -> datetime.datetime:
    if _STAMP.match(stamp) is None:
        raise WireError("value", f"time {stamp!r} is not YYYY-MM-DDTHH:MM")
    try:
        taken_at = datetime.datetime.fromisoformat(stamp)
    except ValueError:
        raise WireError("value", f"time {stamp!r} is not a calendar date") from None
    if len(_stamps) < _CHECKED_MAX:
        _stamps[stamp] = taken_at
    return taken_at


def _decode_batch_records(text: str, count: int):
    readings = []
    seen = set()
    for fields in _records(text, count):
        if len(fields) != 5:
            raise WireError("record", f"record {','.join(fields)!r} is not id,ip,stamp,temperature,humidity")
        device, ip, stamp, temperature, humidity = fields
        taken_at = _stamps.get(stamp)
        if taken_at is None:
            taken_at = _stamp(stamp)
        device_id = _device_id(device)
        key = (device_id, taken_at)
        if key in seen:
            raise WireError("minute", f"device {device_id} at {stamp} twice in one batch")
        seen.add(key)
        readings.append(
            Reading.checked(
                device_id,
                _ip(ip),
                taken_at,
                _number(temperature, check_temperature, "temperature"),
                _number(humidity, check_humidity, "humidity"),
            )
        )
    return tuple(readings)


# -- the fast path of record checking ------------------------------------------
#
# A record is checked field by field above, in Python, one call a value.  A
# chunk of 70 readings is checked here instead by one regular expression over
# all its records, which the re engine runs in C: the pattern accepts only
# canonical numbers inside the sensor's range, so a match means exactly what
# the field checks would have said (the property tests compare the two).  A
# batch of 5,000 is checked column by column: its shape by one pass over its
# bytes, then each distinct value of each column once.  Both accept a subset:
# anything they do not take goes through the field checks, which give the
# exact verdict and the error's words.

_DECIMALS = r"(?:\.[0-9]{0,5}[1-9])?"
#: Below zero: -0.000001 to -39.999999, and -40; never -0.
_NEGATIVE_TEXT = rf"-(?:0\.[0-9]{{0,5}}[1-9]|(?:[1-9]|[1-3][0-9]){_DECIMALS}|40)"
_TEMPERATURE_TEXT = rf"(?:{_NEGATIVE_TEXT}|(?:[1-7]?[0-9]|8[0-4]){_DECIMALS}|85)"
_HUMIDITY_TEXT = rf"(?:[1-9]?[0-9]{_DECIMALS}|100)"
_HHMM_TEXT = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]"
#: One day record, as a whole ';'-separated item, its time grouped.
_DAY_RECORD = re.compile(rf"(?<![^;])({_HHMM_TEXT}),{_TEMPERATURE_TEXT},{_HUMIDITY_TEXT}(?![^;])")


def _check_day_records(text: str, count: int, device_id: int, device_ip: str, day: datetime.date) -> None:
    """
    Check a chunk's record text as L{_decode_day_records} would, without
    making its readings.

    @raise WireError: as L{_decode_day_records} does.
    """
    # Each match is one whole record, so as many matches as records means
    # every record matched; their times must then all differ.
    if count == 0 or record_count(text) != count:
        _decode_day_records(text, count, device_id, device_ip, day)
        return
    times = _DAY_RECORD.findall(text)
    if len(times) != count or len(set(times)) != count:
        _decode_day_records(text, count, device_id, device_ip, day)


#: Every character a batch record's fields hold on the fast path: digits,
#: the hex digits and separators of addresses, and the punctuation of times
#: and numbers.  With them deleted, a batch of well-formed records leaves
#: only its separators.
_FIELD_CHARACTERS = b"0123456789abcdef.:-T"
#: The separators of one record and the one after it.
_RECORD_SHAPE = b",,,,;"


def _batch_columns(text: str, count: int) -> BatchColumns:
    """
    A batch's records split into their fields, checked as
    L{_decode_batch_records} would.

    @raise WireError: as L{_decode_batch_records} does.
    """
    if count and record_count(text) == count:
        shape = text.encode("ascii").translate(None, _FIELD_CHARACTERS)
        if shape == (_RECORD_SHAPE * count)[:-1]:
            # Exactly five fields a record, each made of field characters.
            columns = BatchColumns.of(text)
            if _columns_ok(columns, count):
                return columns
    _decode_batch_records(text, count)
    return BatchColumns.of(text)


def _columns_ok(columns: BatchColumns, count: int) -> bool:
    """
    Whether every field of C{columns} is valid and no device has two
    readings of one minute.  Each distinct value is checked once, and a value
    checked before (a fleet repeats its devices, addresses, minutes and
    readings) costs only a look-up in its cache.
    """
    # set.difference(dict) looks each of the set's values up in the dict;
    # "set - dict.keys()" would walk the whole cache instead.
    try:
        for device in set(columns.devices).difference(_device_ids):
            _device_id(device)
        for ip in set(columns.ips).difference(_seen_ips):
            _ip(ip)
        for stamp in set(columns.stamps).difference(_stamps):
            _stamp(stamp)
        for temperature in set(columns.temperatures).difference(_CHECKED["temperature"]):
            _number(temperature, check_temperature, "temperature")
        for humidity in set(columns.humidities).difference(_CHECKED["humidity"]):
            _number(humidity, check_humidity, "humidity")
    except WireError:
        return False
    # The texts are canonical, so equal texts are equal values and unequal
    # texts unequal ones; and every stamp is 16 characters long, so a device
    # and a stamp joined name one pair (strings, not tuples: no garbage
    # collector work for 5,000 objects).
    return len(set(map(str.__add__, columns.devices, columns.stamps))) == count


def _checksum(records: str) -> str:
    return f"{zlib.crc32(records.encode('ascii')):08x}"


# -- encode -----------------------------------------------------------------


def encode(message: Message) -> bytes:
    """
    The bytes of C{message}, without a line end.

    @raise ValueError: if the message cannot be encoded faithfully (a reading
        of another device or day inside a L{DayChunk}, a bad status).
    """
    if isinstance(message, DayChunk):
        if not 1 <= message.part <= message.parts:
            raise ValueError(f"part {message.part} of {message.parts}")
        text = (
            f"DAY dev={message.device_id} ip={message.device_ip} day={message.day.isoformat()} "
            f"xfer={message.xfer} part={message.part}/{message.parts} ts={message.sent_at} "
            f"n={message.count} r={message.records}"
        )
    elif isinstance(message, DayAck):
        _check_status(message)
        text = f"DAYACK xfer={message.xfer} part={message.part} st={message.status}"
        if message.reason:
            text += f" why={_quote(message.reason)}"
    elif isinstance(message, Batch):
        records = message.records
        text = f"BATCH id={message.batch_id} n={message.count} sum={_checksum(records)} r={records}"
    elif isinstance(message, BatchAck):
        _check_status(message)
        text = f"BATCHACK id={message.batch_id} st={message.status} new={message.new} dup={message.dup}"
        if message.reason:
            text += f" why={_quote(message.reason)}"
    elif isinstance(message, Ping):
        text = f"PING seq={message.seq}"
    elif isinstance(message, Pong):
        text = f"PONG seq={message.seq}"
    else:
        raise TypeError(f"not a meter message: {message!r}")
    return _PREFIX + text.encode("ascii")


def _check_status(message) -> None:
    if message.status not in STATUSES[type(message)]:
        raise ValueError(f"status {message.status!r} of {type(message).__name__}")
    if message.status == "ok" and message.reason:
        raise ValueError(f"status ok with reason {message.reason!r}")
    if message.status == "bad" and not message.reason:
        raise ValueError("status bad without a reason")


# -- decode -----------------------------------------------------------------

#: The fields of each kind, in their one order; C{r} (records) is last.
_FIELDS = {
    b"DAY": ("dev", "ip", "day", "xfer", "part", "ts", "n", "r"),
    b"DAYACK": ("xfer", "part", "st", "why?"),
    b"BATCH": ("id", "n", "sum", "r"),
    b"BATCHACK": ("id", "st", "new", "dup", "why?"),
    b"PING": ("seq",),
    b"PONG": ("seq",),
}


def decode(data: bytes, max_size: int = MAX_LINE) -> Message:
    """
    The message in C{data} (one datagram, or one line without its end).

    @raise WireError: if C{data} is not a valid, canonical message of this
        version; the error's C{code} names the fault.
    """
    if len(data) > max_size:
        raise WireError("size", f"{len(data)} bytes, more than {max_size}")
    day = _DAY_MESSAGE.match(data)
    if day is not None:
        # The gateway's every datagram: its layout checked in one match, its
        # values by the same checks as below.
        return _decode_day(dict(zip(_FIELDS[b"DAY"], (value.decode("ascii") for value in day.groups()))))
    if not data.startswith(MAGIC):
        raise WireError("magic", "does not start with 'meter/'")
    if not data.startswith(_PREFIX):
        version = data[len(MAGIC):].split(b" ", 1)[0][:16]
        raise WireError("version", f"version {version.decode('ascii', 'replace')!r}, this side speaks {VERSION}")
    if _PRINTABLE.match(data) is None:
        raise WireError("syntax", "not printable ASCII tokens separated by single spaces")
    tokens = data[len(_PREFIX):].decode("ascii").split(" ")
    kind = tokens[0].encode("ascii")
    layout = _FIELDS.get(kind)
    if layout is None:
        raise WireError("kind", f"unknown message kind {tokens[0][:16]!r}")
    fields = {}
    expected = iter(layout)
    for token in tokens[1:]:
        key, equals, value = token.partition("=")
        if not equals or _KEY.match(key) is None:
            raise WireError("syntax", f"token {token[:32]!r} is not key=value")
        for name in expected:
            if name.rstrip("?") == key:
                break
            if not name.endswith("?"):
                raise WireError("field", f"{kind.decode()} expects {name} before {key}")
        else:
            raise WireError("field", f"{kind.decode()} has no field {key!r} there")
        fields[key] = value
    missing = [name for name in layout if not name.endswith("?") and name not in fields]
    if missing:
        raise WireError("field", f"{kind.decode()} misses {', '.join(missing)}")
    return _DECODERS[kind](fields)


#: A C{DAY} message whose tokens are all there, in order, printable and
#: single-spaced: the layout the general parsing in L{decode} would accept,
#: matched at once; each value is still checked by L{_decode_day}.
_DAY_MESSAGE = re.compile(
    re.escape(_PREFIX + b"DAY ")
    + b" ".join(re.escape(key.encode("ascii")) + rb"=([!-~]+)" for key in _FIELDS[b"DAY"])
    + rb"\Z"
)


def _decode_day(f: dict) -> DayChunk:
    device_id = _device_id(f["dev"])
    device_ip = _ip(f["ip"])
    day = _day(f["day"])
    part_text, slash, parts_text = f["part"].partition("/")
    if not slash:
        raise WireError("value", f"part {f['part']!r} is not N/M")
    part = _uint(part_text, "part", MAX_READINGS)
    parts = _uint(parts_text, "parts", MAX_READINGS)
    if not 1 <= part <= parts:
        raise WireError("chunk", f"part {part} of {parts}")
    count = _uint(f["n"], "n", MAX_READINGS)
    xfer = _hex16(f["xfer"], "xfer")
    sent_at = _uint(f["ts"], "ts")
    _check_day_records(f["r"], count, device_id, device_ip, day)
    return DayChunk(
        device_id,
        device_ip,
        day,
        xfer,
        part,
        parts,
        sent_at,
        f["r"],
    )


def _status(kind, text: str, reason: str) -> str:
    if text not in STATUSES[kind]:
        raise WireError("value", f"status {text!r}")
    if text == "bad" and not reason:
        raise WireError("value", "status bad without a reason")
    if text == "ok" and reason:
        raise WireError("value", "status ok with a reason")
    return text


def _decode_dayack(f: dict) -> DayAck:
    reason = _reason(f.get("why"))
    return DayAck(
        _hex16(f["xfer"], "xfer"),
        _uint(f["part"], "part", MAX_READINGS),
        _status(DayAck, f["st"], reason),
        reason,
    )


def _decode_batch(f: dict) -> Batch:
    count = _uint(f["n"], "n", MAX_BATCH_READINGS)
    if re.fullmatch(r"[0-9a-f]{8}", f["sum"]) is None:
        raise WireError("value", f"sum {f['sum']!r} is not 8 lowercase hex digits")
    if _checksum(f["r"]) != f["sum"]:
        raise WireError("checksum", f"records do not match sum={f['sum']}")
    batch_id = _hex16(f["id"], "batch id")
    return Batch(batch_id, f["r"], _batch_columns(f["r"], count))


def _decode_batchack(f: dict) -> BatchAck:
    reason = _reason(f.get("why"))
    return BatchAck(
        _hex16(f["id"], "batch id"),
        _status(BatchAck, f["st"], reason),
        reason,
        _uint(f["new"], "new"),
        _uint(f["dup"], "dup"),
    )


_DECODERS = {
    b"DAY": _decode_day,
    b"DAYACK": _decode_dayack,
    b"BATCH": _decode_batch,
    b"BATCHACK": _decode_batchack,
    b"PING": lambda f: Ping(_uint(f["seq"], "seq")),
    b"PONG": lambda f: Pong(_uint(f["seq"], "seq")),
}


# -- the TCP hop -------------------------------------------------------------


class LineProtocol(Protocol):
    """
    A connection of C{\\n}-ended lines, as Twisted's C{LineOnlyReceiver}
    reads and writes them, for lines of up to C{MAX_LENGTH} bytes.

    Why not C{LineOnlyReceiver}: it joins its buffer to each piece of data
    and splits the whole again, so a batch of 5,000 readings (~230 kB,
    arriving in ~8 pieces) costs ~1 MB of copying and scanning; measured,
    127 ns a reading against ~1 ns here, where a line's pieces are kept
    apart and joined once.

    Subclasses define C{lineReceived} and C{lineLengthExceeded}, which must
    close the connection: the line's bytes held so far are dropped, so the
    rest of it would otherwise arrive as a line of its own.
    """

    MAX_LENGTH = MAX_LINE

    #: The pieces of a line begun but not ended yet, and their length.
    _pieces: list[bytes]
    _held = 0

    def dataReceived(self, data: bytes) -> None:
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            line = data[start:end]
            if self._held:
                self._pieces.append(line)
                line = b"".join(self._pieces)
                self._pieces, self._held = [], 0
            # As LineOnlyReceiver: a line that closed the connection ends
            # the reading of the rest.
            if self.transport.disconnecting:
                return
            if len(line) > self.MAX_LENGTH:
                self.lineLengthExceeded(line)
                return
            self.lineReceived(line)
            start = end + 1
        if start < len(data):
            if not self._held:
                self._pieces = []
            self._pieces.append(data[start:])
            self._held += len(data) - start
            if self._held > self.MAX_LENGTH:
                line = b"".join(self._pieces)
                self._pieces, self._held = [], 0
                self.lineLengthExceeded(line)

    def sendLine(self, line: bytes) -> None:
        self.transport.writeSequence((line, b"\n"))

    def lineReceived(self, line: bytes) -> None:
        raise NotImplementedError

    def lineLengthExceeded(self, line: bytes) -> None:
        raise NotImplementedError


def without_nagle(transport) -> None:
    """
    Turn Nagle's algorithm off on the TCP connection under C{transport}, if
    it is one (a TLS transport passes the call on to the connection under
    it; a test's fake transport has none).

    Why: with it on, the last, partial segment of a line waits until the
    peer acknowledges the segments before it, and the peer holds that
    acknowledgement back (up to 40 ms) while it waits for the rest of the
    line: each batch, and each BATCHACK written while another is still
    unacknowledged, stalls.  Both sides write whole lines at once, so no
    stream of small packets follows.  Measured with one batch of 2,000
    readings in flight: ~72,000 readings/s with it, ~200,000-240,000
    without (docs/performance.md).
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)


# -- a day in chunks --------------------------------------------------------


def split_day(
    device_id: int,
    device_ip: str,
    day: datetime.date,
    readings: tuple[Reading, ...],
    xfer: str,
    sent_at: int,
    max_bytes: int = DEFAULT_CHUNK_BYTES,
) -> list[DayChunk]:
    """
    Cut one device's day into L{DayChunk}s whose sealed datagrams (see
    L{seal}) are at most C{max_bytes} long each.  A day with no readings is
    one empty chunk, so the gateway still learns the device reported.
    """
    texts = day_parts(device_id, device_ip, day, readings, max_bytes)
    return day_chunks(device_id, device_ip, day, texts, xfer, sent_at)


def day_chunks(
    device_id: int, device_ip: str, day: datetime.date, texts: list[str], xfer: str, sent_at: int
) -> list[DayChunk]:
    """
    The chunks of a day cut by L{day_parts} into C{texts}, sent as transfer
    C{xfer} started at C{sent_at}.
    """
    parts = len(texts)
    return [
        DayChunk(device_id, device_ip, day, xfer, index, parts, sent_at, text)
        for index, text in enumerate(texts, start=1)
    ]


def day_parts(
    device_id: int,
    device_ip: str,
    day: datetime.date,
    readings: tuple[Reading, ...],
    max_bytes: int = DEFAULT_CHUNK_BYTES,
) -> list[str]:
    """
    The record texts of the chunks L{split_day} cuts a day into, whatever
    their transfer id and start time: formatting the readings is the cost
    of cutting a day, and a load generator pays it before it starts the
    clock.

    @raise ValueError: if a reading is not of this device and day, or
        C{max_bytes} cannot hold one reading.
    """
    _check_belong(readings, device_id, device_ip, day)
    # The header's length depends on the part numbers and the start time
    # only through their digits; reserve the widest forms so every chunk's
    # header fits.
    widest = MAX_READINGS
    header = len(encode(DayChunk(device_id, device_ip, day, "0" * 16, widest, widest, _MAX_UINT32, "")))
    room = max_bytes - header - TAG_LENGTH
    groups: list[list[str]] = [[]]
    used = 0
    for record in map(_day_record, readings):
        size = len(record) + (1 if groups[-1] else 0)
        if used + size > room:
            if not groups[-1]:
                raise ValueError(f"chunk size {max_bytes} cannot hold one reading")
            groups.append([])
            size = len(record)
            used = 0
        groups[-1].append(record)
        used += size
    return [";".join(group) for group in groups]


#: The longest reason (in characters, before percent-encoding) L{refusal} sends.
MAX_REASON = 200

_DAY_ID = re.compile(rb"^meter/\d+ DAY .*?\bxfer=([0-9a-f]{16}) part=([1-9][0-9]{0,3})/")
_BATCH_ID = re.compile(rb"^meter/\d+ BATCH id=([0-9a-f]{16})(?: |$)")


_DAY_HEADER = re.compile(
    rb"^meter/1 DAY dev=[1-9][0-9]{0,9} ip=\S+ day=\S+ xfer=([0-9a-f]{16}) part=([1-9][0-9]{0,3})/[1-9][0-9]{0,3} ts=(0|[1-9][0-9]{0,9}) "
)


def peek_day_id(body: bytes) -> tuple[str, int, int] | None:
    """
    The transfer id, part number and start time of a C{DAY} message, read
    from its header without decoding its records: enough to recognise a
    retransmission of a chunk already stored.  C{None} if the header is not
    a well-formed C{DAY} header (the full decoder then says why).
    """
    match = _DAY_HEADER.match(body)
    if match is None:
        return None
    return match.group(1).decode("ascii"), int(match.group(2)), int(match.group(3))


def refusal(data: bytes, error: WireError) -> DayAck | BatchAck | None:
    """
    The negative acknowledgement for C{data}, which L{decode} refused with
    C{error}, if its message id can still be read: the sender then learns
    why at once instead of retrying in vain.  C{None} if it cannot.
    """
    head = data[:512]
    # The reason quotes the offending text, which may be most of the input:
    # bound it, so the answer always fits a datagram and the peer's line.
    reason = str(error)
    if len(reason) > MAX_REASON:
        reason = reason[: MAX_REASON - 3] + "..."
    match = _DAY_ID.match(head)
    if match is not None:
        return DayAck(match.group(1).decode(), int(match.group(2)), "bad", reason)
    match = _BATCH_ID.match(head)
    if match is not None:
        return BatchAck(match.group(1).decode(), "bad", reason)
    return None


# -- authentication ---------------------------------------------------------

#: A sealed datagram ends with this and 64 hex digits of HMAC-SHA256.
_TAG = b" mac="
TAG_LENGTH = len(_TAG) + 64
_CLAIMED_DEVICE = re.compile(rb"^meter/[0-9]{1,9} DAY dev=([1-9][0-9]{0,9}) ")


def new_id() -> str:
    """
    A fresh transfer or batch id: 16 lowercase hex digits, random, so ids
    of a restarted sender do not repeat earlier ones.
    """
    return os.urandom(8).hex()


def seal(data: bytes, key: bytes) -> bytes:
    """
    C{data} with its authentication tag: C{" mac="} and the HMAC-SHA256 of
    everything before it under C{key}, in hex.
    """
    return data + _TAG + _tag(data, key)


def unseal(data: bytes, key: bytes) -> bytes:
    """
    The message in a sealed datagram, once its tag is verified under C{key}.

    @raise WireError: code C{auth}, if the tag is missing or wrong.
    """
    body, tag = split_tag(data)
    if not tag_ok(body, tag, key):
        raise WireError("auth", "authentication tag does not match")
    return body


def split_tag(data: bytes) -> tuple[bytes, bytes]:
    """
    The message and the hex tag of a sealed datagram, unverified.

    @raise WireError: code C{auth}, if there is no tag.
    """
    if len(data) < TAG_LENGTH or data[-TAG_LENGTH:-64] != _TAG:
        raise WireError("auth", "no authentication tag")
    return data[:-TAG_LENGTH], data[-64:]


def tag_ok(body: bytes, tag: bytes, key: bytes) -> bool:
    return hmac.compare_digest(_tag(body, key), tag)


def _tag(body: bytes, key: bytes) -> bytes:
    """
    The hex HMAC-SHA256 of C{body} under C{key}: the tag L{seal} appends and
    L{tag_ok} expects.
    """
    # hmac.digest: OpenSSL's one-shot HMAC, a third of hmac.new's cost.
    return hmac.digest(key, body, "sha256").hex().encode("ascii")


def claimed_device(body: bytes) -> int | None:
    """
    The device id a C{DAY} message claims, read before anything else is
    parsed so its key can verify the tag; C{None} if there is none.

    Of any version: a device speaking another version is then answered, under
    its key, C{bad} with the decoder's C{version} error, rather than
    dropped like a stranger's datagram.
    """
    match = _CLAIMED_DEVICE.match(body)
    return int(match.group(1)) if match is not None else None
