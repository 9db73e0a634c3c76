"""
The codec of both hops, device -> gateway over UDP and gateway -> cloud over
TCP: one codec, as twisted.names has one C{dns.Message} behind its UDP and
TCP protocols.

Every message is one line of printable ASCII::

    meter/1 <KIND> key=value key=value ... r=<records>

A UDP datagram carries exactly one message with no line end; on TCP each
message ends with C{\\n}.  The encoding is canonical: L{decode} refuses any
form L{encode} would not have produced, so a message that decodes re-encodes
to the same bytes.  docs/protocol.md specifies every field.

Each kind is described once, by a L{Kind}: its fields in their one order,
which are optional, how each is read and written, and the rules its values
keep.  L{encode}, L{decode} and L{refusal} all work from these descriptions,
as twisted.names' records describe themselves.  A message with several
faults is refused for the first found: its fields in their order, then its
rules, then its records.
"""

from __future__ import annotations

import re
from operator import attrgetter
from typing import Callable

import attrs

from meter.wire import values
from meter.wire.batch import batch_columns, checksum
from meter.wire.day import check_day_records
from meter.wire.messages import MAGIC, MAX_BATCH_READINGS, MAX_LINE, MAX_READINGS, STATUSES, VERSION
from meter.wire.messages import Batch, BatchAck, DayAck, DayChunk, Message, Ping, Pong
from meter.wire.values import WireError

_PREFIX = b"meter/%d " % (VERSION,)
_KEY = re.compile(r"[a-z]{1,8}\Z")
_PRINTABLE = re.compile(rb"[\x21-\x7e]+( [\x21-\x7e]+)*\Z")


@attrs.frozen
class Field:
    """
    One C{key=value} token of a kind of message.

    @ivar read: the value of the token's text; a tuple of values when the
        token carries several attributes.
        @raise WireError: if the text is not the value's one text.
    @ivar attributes: the message's attributes the token carries, in order.
    @ivar write: the text of an attribute's value, where C{str} is not it.
    @ivar implied: the value follows from the others (C{n=}, C{sum=}): it is
        checked against them, not kept in the message.
    @ivar optional: the token is left out when its value is C{default}.
    """

    key: str
    read: Callable[[str], object]
    attributes: tuple[str, ...]
    write: Callable[[object], str] | None = None
    implied: bool = False
    optional: bool = False
    default: object = None


@attrs.frozen
class Kind:
    """
    One kind of message: how it is written, read and refused.

    @ivar rules: the faults a message's values may have that no single field
        shows, each a function of a getter of the message's attributes by
        name, giving C{(code, words)} or C{None}.  L{encode} refuses such a
        message with a C{ValueError}, L{decode} with a L{WireError} of that
        code.
    @ivar check: checks the records of a message being decoded against the
        fields they imply, given the values read by key; gives the
        message's attributes made along the way.
    @ivar answer: the acknowledgement of a message of this kind that
        L{refusal} sends when it cannot be decoded, and C{ids}, the pattern
        of the message id it then reads from the raw bytes.
    """

    name: str
    message: type
    fields: tuple[Field, ...]
    rules: tuple[Callable[..., tuple[str, str] | None], ...] = ()
    check: Callable[[dict], dict] | None = None
    answer: Callable[..., Message] | None = None
    ids: re.Pattern | None = None
    #: Made from the fields: what L{write} and L{decode} work with.
    tag: bytes = attrs.field(init=False, repr=False)
    _template: str = attrs.field(init=False, repr=False)
    _get: attrgetter = attrs.field(init=False, repr=False)
    _writers: tuple = attrs.field(init=False, repr=False)
    _optional: tuple[Field, ...] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self):
        required = [field for field in self.fields if not field.optional]
        template = " ".join(f"{field.key}=" + "/".join("{}" for _ in field.attributes) for field in required)
        object.__setattr__(self, "_template", f"{self.name} {template}")
        object.__setattr__(
            self, "_get", attrgetter(*(name for field in required for name in field.attributes))
        )
        writers, index = [], 0
        for field in required:
            if field.write is not None:
                writers.append((index, field.write))
            index += len(field.attributes)
        object.__setattr__(self, "_writers", tuple(writers))
        object.__setattr__(self, "_optional", tuple(field for field in self.fields if field.optional))
        object.__setattr__(self, "tag", self.name.encode("ascii"))

    def fault(self, get) -> tuple[str, str] | None:
        """
        The first of the kind's rules broken by the values C{get} gives by
        attribute name, if any.
        """
        for rule in self.rules:
            fault = rule(get)
            if fault is not None:
                return fault
        return None

    def write(self, message) -> bytes:
        """
        The bytes of C{message}, of this kind.
        """
        if self.rules:
            fault = self.fault(message.__getattribute__)
            if fault is not None:
                raise ValueError(f"{self.message.__name__}: {fault[1]}")
        items = self._get(message)
        if type(items) is not tuple:
            items = (items,)
        if self._writers:
            items = list(items)
            for index, write in self._writers:
                items[index] = write(items[index])
        text = self._template.format(*items)
        for field in self._optional:
            (name,) = field.attributes
            value = getattr(message, name)
            if value != field.default:
                text += f" {field.key}={field.write(value) if field.write is not None else value}"
        return _PREFIX + text.encode("ascii")

    def read(self, texts) -> Message:
        """
        The message whose fields' texts are C{texts}, in the kind's order
        (C{None} for an optional field left out).

        @raise WireError: if they are not a valid, canonical message.
        """
        read = {}
        made = {}
        for field, text in zip(self.fields, texts):
            if text is None:
                # An optional field left out.
                made[field.attributes[0]] = field.default
                continue
            value = read[field.key] = field.read(text)
            if field.implied:
                continue
            names = field.attributes
            if len(names) == 1:
                made[names[0]] = value
            else:
                made.update(zip(names, value))
        if self.rules:
            fault = self.fault(made.__getitem__)
            if fault is not None:
                raise WireError(*fault)
        if self.check is not None:
            made.update(self.check(read))
        return self.message(**made)


def _part(text: str) -> tuple[int, int]:
    part_text, slash, parts_text = text.partition("/")
    if not slash:
        raise WireError("value", f"part {text!r} is not N/M")
    return values.uint(part_text, "part", MAX_READINGS), values.uint(parts_text, "parts", MAX_READINGS)


def _part_of_parts(get):
    part, parts = get("part"), get("parts")
    if not 1 <= part <= parts:
        return "chunk", f"part {part} of {parts}"
    return None


def _status_of(statuses: tuple[str, ...]):
    """
    The rule of an acknowledgement's status: one of C{statuses}; C{bad}
    says why, C{ok} does not.
    """

    def rule(get):
        status, reason = get("status"), get("reason")
        if status not in statuses:
            return "value", f"status {status!r}"
        if status == "bad" and not reason:
            return "value", "status bad without a reason"
        if status == "ok" and reason:
            return "value", "status ok with a reason"
        return None

    return rule


def _check_day(read: dict) -> dict:
    check_day_records(read["r"], read["n"], read["dev"], read["ip"], read["day"])
    return {}


def _check_batch(read: dict) -> dict:
    if checksum(read["r"]) != read["sum"]:
        raise WireError("checksum", f"records do not match sum={read['sum']}")
    return {"checked_columns": batch_columns(read["r"], read["n"])}


def _text(text: str) -> str:
    return text


def _uint(what: str, high: int = values.MAX_UINT32) -> Callable[[str], int]:
    return lambda text: values.uint(text, what, high)


def _hex16(what: str) -> Callable[[str], str]:
    return lambda text: values.hex16(text, what)


_REASON = Field("why", values.reason, ("reason",), values.quote_reason, optional=True, default="")

KINDS = (
    Kind(
        "DAY",
        DayChunk,
        (
            Field("dev", values.device_id, ("device_id",)),
            Field("ip", values.address, ("device_ip",)),
            Field("day", values.day, ("day",)),
            Field("xfer", _hex16("xfer"), ("xfer",)),
            Field("part", _part, ("part", "parts")),
            Field("ts", _uint("ts"), ("sent_at",)),
            Field("n", _uint("n", MAX_READINGS), ("count",), implied=True),
            Field("r", _text, ("records",)),
        ),
        rules=(_part_of_parts,),
        check=_check_day,
        answer=lambda xfer, part, reason: DayAck(xfer, int(part), "bad", reason),
        # The id of a chunk of any version, its fields in any order.
        ids=re.compile(rb"^meter/\d+ DAY .*?\bxfer=([0-9a-f]{16}) part=([1-9][0-9]{0,3})/"),
    ),
    Kind(
        "DAYACK",
        DayAck,
        (
            Field("xfer", _hex16("xfer"), ("xfer",)),
            Field("part", _uint("part", MAX_READINGS), ("part",)),
            Field("st", _text, ("status",)),
            _REASON,
        ),
        rules=(_status_of(STATUSES[DayAck]),),
    ),
    Kind(
        "BATCH",
        Batch,
        (
            Field("id", _hex16("batch id"), ("batch_id",)),
            Field("n", _uint("n", MAX_BATCH_READINGS), ("count",), implied=True),
            Field("sum", lambda text: values.hex8(text, "sum"), ("records",), checksum, implied=True),
            Field("r", _text, ("records",)),
        ),
        check=_check_batch,
        answer=lambda batch_id, reason: BatchAck(batch_id, "bad", reason),
        ids=re.compile(rb"^meter/\d+ BATCH id=([0-9a-f]{16})(?: |$)"),
    ),
    Kind(
        "BATCHACK",
        BatchAck,
        (
            Field("id", _hex16("batch id"), ("batch_id",)),
            Field("st", _text, ("status",)),
            Field("new", _uint("new"), ("new",)),
            Field("dup", _uint("dup"), ("dup",)),
            _REASON,
        ),
        rules=(_status_of(STATUSES[BatchAck]),),
    ),
    Kind("PING", Ping, (Field("seq", _uint("seq"), ("seq",)),)),
    Kind("PONG", Pong, (Field("seq", _uint("seq"), ("seq",)),)),
)

_BY_TYPE = {kind.message: kind for kind in KINDS}
_BY_TAG = {kind.tag: kind for kind in KINDS}
_DAY = _BY_TYPE[DayChunk]


def encode(message: Message) -> bytes:
    """
    The bytes of C{message}, without a line end.

    @raise ValueError: if the message cannot be encoded faithfully (a reading
        of another device or day inside a L{DayChunk}, a bad status).
    """
    kind = _BY_TYPE.get(type(message))
    if kind is None:
        raise TypeError(f"not a meter message: {message!r}")
    return kind.write(message)


#: A C{DAY} message whose tokens are all there, in order, printable and
#: single-spaced: the layout the general parsing in L{decode} would accept,
#: matched at once; each value is still read by its field.
_DAY_MESSAGE = re.compile(
    re.escape(_PREFIX + _DAY.tag + b" ")
    + b" ".join(re.escape(field.key.encode("ascii")) + rb"=([!-~]+)" for field in _DAY.fields)
    + rb"\Z"
)


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
        # The gateway's every datagram: its layout checked in one match.
        return _DAY.read([value.decode("ascii") for value in day.groups()])
    if not data.startswith(MAGIC):
        raise WireError("magic", "does not start with 'meter/'")
    if not data.startswith(_PREFIX):
        version = data[len(MAGIC):].split(b" ", 1)[0][:16]
        raise WireError("version", f"version {version.decode('ascii', 'replace')!r}, this side speaks {VERSION}")
    if _PRINTABLE.match(data) is None:
        raise WireError("syntax", "not printable ASCII tokens separated by single spaces")
    tokens = data[len(_PREFIX):].decode("ascii").split(" ")
    kind = _BY_TAG.get(tokens[0].encode("ascii"))
    if kind is None:
        raise WireError("kind", f"unknown message kind {tokens[0][:16]!r}")
    return kind.read(_texts(kind, tokens[1:]))


def _texts(kind: Kind, tokens: list[str]) -> list[str | None]:
    """
    The text of each of C{kind}'s fields in C{tokens}, in the kind's order,
    C{None} for an optional field left out.

    @raise WireError: if the tokens are not C{key=value}, or not the kind's
        fields in its order.
    """
    texts: list[str | None] = [None] * len(kind.fields)
    index = 0
    for token in tokens:
        key, equals, value = token.partition("=")
        if not equals or _KEY.match(key) is None:
            raise WireError("syntax", f"token {token[:32]!r} is not key=value")
        while index < len(kind.fields):
            field = kind.fields[index]
            index += 1
            if field.key == key:
                texts[index - 1] = value
                break
            if not field.optional:
                raise WireError("field", f"{kind.name} expects {field.key} before {key}")
        else:
            raise WireError("field", f"{kind.name} has no field {key!r} there")
    missing = [field.key for field, text in zip(kind.fields, texts) if text is None and not field.optional]
    if missing:
        raise WireError("field", f"{kind.name} misses {', '.join(missing)}")
    return texts


#: The longest reason (in characters, before percent-encoding) L{refusal} sends.
MAX_REASON = 200


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
    for kind in _ANSWERED:
        match = kind.ids.match(head)
        if match is not None:
            return kind.answer(*(value.decode("ascii") for value in match.groups()), reason)
    return None


_ANSWERED = tuple(kind for kind in KINDS if kind.answer is not None)
