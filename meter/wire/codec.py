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

import datetime
import re
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
    @ivar optional: the token is left out when its value is C{default}, the
        value it then reads as.
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
        shows, each a function of the message giving C{(code, words)} or
        C{None}.  L{encode} refuses such a message with a C{ValueError},
        L{decode} with a L{WireError} of that code.
    @ivar check: checks the records of a message being decoded against the
        fields they imply, given the values read by key; gives the
        attributes it made along the way, if any.
    @ivar answer: the acknowledgement of a message of this kind that
        L{refusal} sends when it cannot be decoded, and C{ids}, the pattern
        of the message id it then reads from the raw bytes.
    @ivar write: the bytes of a message of this kind.
        @raise ValueError: if it breaks one of the kind's rules.
    @ivar read: the message whose fields' texts are given, in the kind's
        order (C{None} for an optional field left out).
        @raise WireError: if they are not a valid, canonical message.
    """

    name: str
    message: type
    fields: tuple[Field, ...]
    rules: tuple[Callable[..., tuple[str, str] | None], ...] = ()
    check: Callable[[dict], dict | None] | None = None
    answer: Callable[..., Message] | None = None
    ids: re.Pattern | None = None
    tag: bytes = attrs.field(init=False, repr=False)
    write: Callable[[Message], bytes] = attrs.field(init=False, repr=False)
    read: Callable[[list], Message] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self):
        object.__setattr__(self, "tag", self.name.encode("ascii"))
        # Made once from the description, as attrs makes an __init__ from a
        # class's fields: the code reads as one written by hand for the
        # kind, and runs as fast, on every datagram.
        namespace = {
            "WireError": WireError,
            "Message": self.message,
            "check": self.check,
            **{f"rule{index}": rule for index, rule in enumerate(self.rules)},
            **{f"read{index}": field.read for index, field in enumerate(self.fields)},
            **{f"write{index}": field.write for index, field in enumerate(self.fields)},
            **{f"default{index}": field.default for index, field in enumerate(self.fields)},
        }
        exec(_source(self), namespace)
        object.__setattr__(self, "write", namespace["write"])
        object.__setattr__(self, "read", namespace["read"])


def _source(kind: Kind) -> str:
    """
    The source of C{write} and C{read} of C{kind}, names in it bound to the
    kind's message class, rules, check and fields' functions.
    """
    rules = [f"    fault = rule{index}(message)" for index in range(len(kind.rules))]
    tokens, optional = [], []
    for index, field in enumerate(kind.fields):
        texts = [f"{{message.{name}}}" if field.write is None else f"{{write{index}(message.{name})}}"
                 for name in field.attributes]
        token = f" {field.key}=" + "/".join(texts)
        if field.optional:
            (name,) = field.attributes
            optional.append(f"    if message.{name} != default{index}:\n        text += f{token!r}")
        else:
            tokens.append(token)
    write = [
        "def write(message):",
        *(f"{rule}\n    if fault is not None:\n        raise ValueError(f'{kind.message.__name__}: {{fault[1]}}')"
          for rule in rules),
        f"    text = f{(_PREFIX.decode('ascii') + kind.name + ''.join(tokens))!r}",
        *optional,
        "    return text.encode('ascii')",
    ]
    read = ["def read(texts):"]
    carried = {}
    for index, field in enumerate(kind.fields):
        if field.optional:
            read.append(f"    v{index} = default{index} if texts[{index}] is None else read{index}(texts[{index}])")
        else:
            read.append(f"    v{index} = read{index}(texts[{index}])")
        if not field.implied:
            if len(field.attributes) == 1:
                carried[field.attributes[0]] = f"v{index}"
            else:
                carried.update((name, f"v{index}[{place}]") for place, name in enumerate(field.attributes))
    # In the order of the class's attributes, by position while none is
    # left out (cheaper than by name): the rest keep their defaults.
    arguments = []
    for attribute in attrs.fields(kind.message):
        if attribute.name not in carried:
            break
        arguments.append(carried.pop(attribute.name))
    if carried:
        raise TypeError(f"{kind.name}: {', '.join(carried)} after an attribute no field carries")
    arguments = ", ".join(arguments)
    read.append(f"    message = Message({arguments})")
    read.extend(f"{rule}\n    if fault is not None:\n        raise WireError(*fault)" for rule in rules)
    if kind.check is not None:
        fields = ", ".join(f"{field.key!r}: v{index}" for index, field in enumerate(kind.fields))
        read.append(f"    made = check({{{fields}}})")
        read.append(f"    if made:\n        message = Message({arguments}, **made)")
    read.append("    return message")
    return "\n".join(write) + "\n\n\n" + "\n".join(read) + "\n"


def _part(text: str) -> tuple[int, int]:
    part_text, slash, parts_text = text.partition("/")
    if not slash:
        raise WireError("value", f"part {text!r} is not N/M")
    return values.uint(part_text, "part", MAX_READINGS), values.uint(parts_text, "parts", MAX_READINGS)


def _part_of_parts(chunk: DayChunk):
    if not 1 <= chunk.part <= chunk.parts:
        return "chunk", f"part {chunk.part} of {chunk.parts}"
    return None


def _status_of(statuses: tuple[str, ...]):
    """
    The rule of an acknowledgement's status: one of C{statuses}; C{bad}
    says why, C{ok} does not.
    """

    def rule(ack: DayAck | BatchAck):
        status, reason = ack.status, ack.reason
        if status not in statuses:
            return "value", f"status {status!r}"
        if status == "bad" and not reason:
            return "value", "status bad without a reason"
        if status == "ok" and reason:
            return "value", "status ok with a reason"
        return None

    return rule


def _hint_with_busy(ack: DayAck):
    """
    The rule of a retry-after hint: only a busy answer carries one, and it
    is a wait (a hint of 0 would let a device resend at once, without end).
    """
    after = ack.retry_after_ms
    if after is None:
        return None
    if ack.status != "busy":
        return "value", f"after={after} with status {ack.status} (only busy has a hint)"
    if not 1 <= after <= values.MAX_UINT32:
        return "value", f"after={after} outside 1 ... {values.MAX_UINT32}"
    return None


def _check_day(read: dict) -> None:
    check_day_records(read["r"], read["n"], read["dev"], read["ip"], read["day"])


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


#: A reason, left out when there is none: why= would not be canonical.
_REASON = Field("why", values.reason, ("reason",), values.quote_reason, optional=True, default="")

KINDS = (
    Kind(
        "DAY",
        DayChunk,
        (
            Field("dev", values.device_id, ("device_id",)),
            Field("ip", values.address, ("device_ip",)),
            Field("day", values.day, ("day",), datetime.date.isoformat),
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
            # The retry-after hint, milliseconds: new in issue 20, at the
            # end of the list, so a device that does not know it refuses the
            # answer as a whole (code field) and retries on its own timers.
            Field("after", _uint("after"), ("retry_after_ms",), optional=True, default=None),
        ),
        rules=(_status_of(STATUSES[DayAck]), _hint_with_busy),
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
