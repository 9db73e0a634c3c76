"""
The value grammar of the wire: the one text of each kind of value a message
carries (whole numbers, device ids and addresses, days, times, ids, decimal
readings, reasons), each checked from its text and written to it.

Every check here refuses any text but the canonical one, raising
L{WireError}, so a value that is read writes back to the same text.

A fleet repeats its values (its devices, addresses, minutes and readings),
so the values already checked are kept in a L{BoundedCache} of their kind.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from urllib.parse import quote, unquote

from meter.reading import HHMM, ReadingError, check_humidity, check_temperature, format_number


class WireError(ValueError):
    """
    Bytes that are not a valid message.

    @ivar code: a short fixed token naming the kind of fault, for counters.
    """

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class BoundedCache:
    """
    Values already checked, by their text, at most C{limit} of them: inputs
    a peer makes up cannot grow it without limit.  Once full it starts
    afresh, so it follows a fleet whose values drift (a new day's minutes).

    @ivar entries: the values by their text: a plain C{dict}, so a set's
        C{difference(cache.entries)} looks the set's values up in it (with a
        subclass of C{dict} it would walk the whole cache instead).
    """

    __slots__ = ("entries", "limit")

    def __init__(self, limit: int):
        self.entries: dict = {}
        self.limit = limit

    def remember(self, text, value):
        """
        Keep C{value} as the checked value of C{text}; return it.
        """
        entries = self.entries
        if len(entries) >= self.limit:
            entries.clear()
        entries[text] = value
        return value


#: How many values of one kind are kept checked.
_CHECKED_MAX = 1 << 16

#: Device ids by their text.
DEVICE_IDS = BoundedCache(_CHECKED_MAX)
#: Device addresses, each its own canonical text.
ADDRESSES = BoundedCache(_CHECKED_MAX)
#: Temperatures and humidities by their text: sensor values repeat, so most
#: records are checked by one lookup.
TEMPERATURES = BoundedCache(_CHECKED_MAX)
HUMIDITIES = BoundedCache(_CHECKED_MAX)
#: The times of batch records (C{YYYY-MM-DDTHH:MM}) by their text.
STAMPS = BoundedCache(_CHECKED_MAX)
#: Each day's times already made, a list by minute of the day: a chunk's
#: readings share their day and a fleet's chunks their minutes.
DAY_TIMES = BoundedCache(64)

_HEX16 = re.compile(r"[0-9a-f]{16}\Z")
_HEX8 = re.compile(r"[0-9a-f]{8}\Z")
_UINT = re.compile(r"(0|[1-9][0-9]{0,9})\Z")
_NUMBER = re.compile(r"-?(0|[1-9][0-9]{0,2})(\.[0-9]{0,5}[1-9])?\Z")
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")
_STAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T([01][0-9]|2[0-3]):[0-5][0-9]\Z")

#: Device ids are positive and fit a signed 32-bit column.
MAX_DEVICE_ID = 2**31 - 1
MAX_UINT32 = 2**32 - 1

#: The minute of the day of each valid C{HH:MM}: one lookup checks a time
#: and gives its minute.
MINUTE_OF = {text: minute for minute, text in enumerate(HHMM)}


def uint(text: str, what: str, high: int = MAX_UINT32) -> int:
    """
    A whole number of at most C{high}, without leading zeros.
    """
    if _UINT.match(text) is None:
        raise WireError("value", f"{what} {text!r} is not a whole number")
    value = int(text)
    if value > high:
        raise WireError("value", f"{what} {value} above {high}")
    return value


def device_id(text: str) -> int:
    value = DEVICE_IDS.entries.get(text)
    if value is not None:
        return value
    value = uint(text, "device id", MAX_DEVICE_ID)
    if value == 0:
        raise WireError("value", "device id 0 (ids start at 1)")
    return DEVICE_IDS.remember(text, value)


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


def address(text: str) -> str:
    """
    A device address in its one text (see L{device_address}).
    """
    if text in ADDRESSES.entries:
        return text
    try:
        canonical = device_address(text)
    except ValueError as e:
        raise WireError("value", str(e)) from None
    if canonical != text:
        raise WireError("value", f"device address {text!r} is not canonical ({canonical})")
    return ADDRESSES.remember(text, text)


def check_number(text: str, check, what: str) -> float:
    """
    A decimal reading value in its shortest text, inside the range
    C{check} allows, checked without the caches.
    """
    if _NUMBER.match(text) is None:
        raise WireError("value", f"{what} {text!r} is not a decimal number")
    value = float(text)
    if format_number(value) != text:
        raise WireError("value", f"{what} {text!r} is not canonical")
    try:
        return check(value)
    except ReadingError as e:
        raise WireError("range", str(e)) from None


def temperature(text: str) -> float:
    value = TEMPERATURES.entries.get(text)
    if value is not None:
        return value
    return TEMPERATURES.remember(text, check_number(text, check_temperature, "temperature"))


def humidity(text: str) -> float:
    value = HUMIDITIES.entries.get(text)
    if value is not None:
        return value
    return HUMIDITIES.remember(text, check_number(text, check_humidity, "humidity"))


def day(text: str) -> datetime.date:
    """
    A calendar day, C{YYYY-MM-DD}.
    """
    if _DAY.match(text) is None:
        raise WireError("value", f"day {text!r} is not YYYY-MM-DD")
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise WireError("value", f"day {text!r} is not a calendar date") from None


def stamp(text: str) -> datetime.datetime:
    """
    A minute of a day, C{YYYY-MM-DDTHH:MM}.
    """
    taken_at = STAMPS.entries.get(text)
    if taken_at is not None:
        return taken_at
    if _STAMP.match(text) is None:
        raise WireError("value", f"time {text!r} is not YYYY-MM-DDTHH:MM")
    try:
        taken_at = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise WireError("value", f"time {text!r} is not a calendar date") from None
    return STAMPS.remember(text, taken_at)


def hex16(text: str, what: str) -> str:
    """
    A transfer or batch id: 16 lowercase hex digits.
    """
    if _HEX16.match(text) is None:
        raise WireError("value", f"{what} {text!r} is not 16 lowercase hex digits")
    return text


def hex8(text: str, what: str) -> str:
    if _HEX8.match(text) is None:
        raise WireError("value", f"{what} {text!r} is not 8 lowercase hex digits")
    return text


def reason(text: str) -> str:
    """
    A reason as its percent-encoded UTF-8 text (see L{quote}).
    """
    if not text:
        # The encoder leaves an empty reason out: why= would not be canonical.
        raise WireError("value", "why= without a reason")
    try:
        value = unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise WireError("value", f"reason {text[:32]!r} is not percent-encoded UTF-8") from None
    if quote_reason(value) != text:
        raise WireError("value", f"reason {text!r} is not canonical")
    return value


def quote_reason(reason: str) -> str:
    """
    The text of a reason: its UTF-8, every byte but letters, digits and
    C{_.-~} percent-encoded, so it holds no space or C{=}.
    """
    # The fixed reasons of an overloaded gateway's busy answers go out by
    # the thousand a second: their text is made once.
    quoted = QUOTED_REASONS.entries.get(reason)
    if quoted is None:
        quoted = QUOTED_REASONS.remember(reason, quote(reason, safe=""))
    return quoted


#: Reasons already quoted, by their text.
QUOTED_REASONS = BoundedCache(256)


def record_count(records: str) -> int:
    """
    How many records a C{;}-separated record text holds.
    """
    return records.count(";") + 1 if records else 0


def split_records(text: str, count: int) -> list[list[str]]:
    """
    The fields of each of the C{count} records of a C{;}-separated record
    text, split at C{,}.
    """
    if count == 0:
        if text:
            raise WireError("count", "n=0 but records follow")
        return []
    records = text.split(";")
    if len(records) != count:
        raise WireError("count", f"n={count} but {len(records)} records")
    return [record.split(",") for record in records]
