"""
Properties of meter.wire, the one codec of both hops, checked with
hypothesis over everything the message types can hold:

- every encodable message decodes back to itself (also through seal and
  unseal);
- the encoding is canonical: any mutation of a valid frame (byte flips,
  insertions, deletions, truncation, a token swapped for an odd value) is
  refused with WireError, or decodes to a message that re-encodes to exactly
  the mutated bytes;
- any mutation of a sealed datagram fails to unseal;
- the negative acknowledgement of a refused frame is itself a small, valid
  message.

The settings are bounded so the file runs in a few seconds.
"""

from __future__ import annotations

import datetime
import ipaddress
import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meter import wire
from meter.wire import batch as wire_batch
from meter.wire import codec as wire_codec
from meter.wire import day as wire_day
from meter.wire import values as wire_values
from meter.reading import HUMIDITY_RANGE, TEMPERATURE_RANGE, Reading, check_humidity, check_temperature
from meter.wire import Batch, BatchAck, DayAck, DayChunk, Ping, Pong, WireError, decode, encode, seal, unseal

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))

BOUNDED = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEWER = settings(BOUNDED, max_examples=100)

# -- strategies ---------------------------------------------------------------


def decimal_values(low: float, high: float) -> st.SearchStrategy[float]:
    """
    Every value the wire carries in [low, high]: at most six decimals (as
    docs/protocol.md says), written in the shortest form.
    """
    micro = st.integers(int(low * 10**6), int(high * 10**6)).map(lambda n: n / 10**6)
    edges = st.sampled_from([low, high, 0.0, -0.0 if low < 0 else 0.0, 0.00001, 0.000001, 0.1, 99.999999])
    return st.one_of(micro, edges.filter(lambda v: low <= v <= high))


temperatures = decimal_values(*TEMPERATURE_RANGE)
humidities = decimal_values(*HUMIDITY_RANGE)
device_ids = st.one_of(st.integers(1, wire.MAX_DEVICE_ID), st.sampled_from([1, 2, wire.MAX_DEVICE_ID]))
# Device addresses are never IPv4-mapped (the IPv4 address is written
# instead), so their text is the same on every Python version.
addresses = st.one_of(
    st.ip_addresses().filter(lambda a: getattr(a, "ipv4_mapped", None) is None).map(str).map(wire.device_address),
    st.sampled_from(["192.168.1.2", "fd00::5", "2001:db8::1"]),
)
days = st.one_of(st.dates(), st.sampled_from([datetime.date(1, 1, 1), datetime.date(999, 12, 31), datetime.date(9999, 12, 31)]))
hex16 = st.binary(min_size=8, max_size=8).map(bytes.hex)
uint32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**32 - 1]))
# Reasons are any text that is not a lone surrogate (those have no UTF-8).
reasons = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)


@st.composite
def day_chunks(draw) -> DayChunk:
    device_id, ip, day = draw(device_ids), draw(addresses), draw(days)
    minutes = draw(st.lists(st.integers(0, 24 * 60 - 1), unique=True, max_size=12))
    readings = tuple(
        Reading(
            device_id,
            ip,
            datetime.datetime.combine(day, datetime.time(m // 60, m % 60)),
            draw(temperatures),
            draw(humidities),
        )
        for m in minutes
    )
    parts = draw(st.integers(1, wire.MAX_READINGS))
    part = draw(st.integers(1, parts))
    return DayChunk(device_id, ip, day, draw(hex16), part, parts, draw(uint32), readings)


@st.composite
def batches(draw) -> Batch:
    keys = draw(
        st.lists(
            st.tuples(device_ids, days, st.integers(0, 24 * 60 - 1)),
            unique_by=lambda k: (k[0], k[1], k[2]),
            max_size=12,
        )
    )
    readings = tuple(
        Reading(
            device_id,
            draw(addresses),
            datetime.datetime.combine(day, datetime.time(m // 60, m % 60)),
            draw(temperatures),
            draw(humidities),
        )
        for device_id, day, m in keys
    )
    return Batch(draw(hex16), readings)


@st.composite
def acks(draw, kind):
    status = draw(st.sampled_from(wire.STATUSES[kind]))
    reason = "" if status == "ok" else draw(reasons) if status == "bad" else draw(st.one_of(st.just(""), reasons))
    if kind is DayAck:
        hint = draw(st.one_of(st.none(), st.integers(1, 2**32 - 1))) if status == "busy" else None
        return DayAck(draw(hex16), draw(st.integers(0, wire.MAX_READINGS)), status, reason, hint)
    return BatchAck(draw(hex16), status, reason, draw(uint32), draw(uint32))


messages = st.one_of(
    day_chunks(),
    acks(DayAck),
    batches(),
    acks(BatchAck),
    st.builds(Ping, uint32),
    st.builds(Pong, uint32),
)

# -- round trips ----------------------------------------------------------------


@BOUNDED
@given(messages)
def test_every_encodable_message_round_trips(message):
    data = encode(message)
    assert decode(data) == message
    assert encode(decode(data)) == data
    # one line of printable ASCII tokens, as docs/protocol.md says
    assert b"\n" not in data and b"  " not in data
    assert all(0x21 <= byte <= 0x7E or byte == 0x20 for byte in data)


@BOUNDED
@given(messages)
def test_every_sealed_message_unseals_and_round_trips(message):
    sealed = seal(encode(message), KEY)
    assert decode(unseal(sealed, KEY), max_size=wire.MAX_DATAGRAM + wire.MAX_LINE) == message
    with pytest.raises(WireError) as raised:
        unseal(sealed, OTHER_KEY)
    assert raised.value.code == "auth"


@BOUNDED
@given(day_chunks())
def test_a_chunk_claims_its_device_before_parsing(chunk):
    assert wire.claimed_device(encode(chunk)) == chunk.device_id


@BOUNDED
@given(device_ids, addresses, days, st.lists(st.integers(0, 24 * 60 - 1), unique=True, max_size=200), temperatures,
       humidities, st.integers(300, 2000))
def test_split_day_chunks_are_sealed_within_max_bytes_and_decode(device_id, ip, day, minutes, t, h, max_bytes):
    readings = tuple(
        Reading(device_id, ip, datetime.datetime.combine(day, datetime.time(m // 60, m % 60)), t, h)
        for m in sorted(minutes)
    )
    chunks = wire.split_day(device_id, ip, day, readings, "0123456789abcdef", 2**32 - 1, max_bytes)
    assert tuple(r for c in chunks for r in c.readings) == readings
    for chunk in chunks:
        sealed = seal(encode(chunk), KEY)
        assert len(sealed) <= max_bytes
        assert decode(unseal(sealed, KEY), max_size=wire.MAX_DATAGRAM) == chunk


# -- mutations --------------------------------------------------------------------

#: Values a mutation may put in place of a token's value: edges of each
#: field's grammar and forms the encoder never produces.
ODD_VALUES = [
    b"", b"0", b"00", b"01", b"-0", b"-1", b"+1", b"1e3", b"1E3", b"nan", b"NaN", b"inf", b"-inf", b"Infinity",
    b"0x10", b"1_000", b"4294967295", b"4294967296", b"2147483647", b"2147483648", b"99999999999",
    b"17.0", b"17.10", b"17.1234567", b".5", b"5.", b"85", b"85.000001", b"-40.000001", b"100.000001", b"101",
    b"0001-01-01", b"0000-01-01", b"9999-12-31", b"2026-02-29", b"2024-02-29", b"2026-13-01", b"2026-1-01",
    b"24:00", b"23:60", b"2026-11-21T24:00", b"1/1", b"0/1", b"2/1", b"1/1440", b"1/1441", b"1/01",
    b"0123456789ABCDEF", b"0123456789abcde", b"0123456789abcdef0", b"192.168.001.002", b"::FFFF:1.2.3.4",
    b"fe80::1%eth0", b"::ffff:102:304", b"::ffff:0:1.2.3.4", b"64:ff9b::1.2.3.4", b"1::1:0:0:0:1", b"1.2.3", b"localhost", b"ok", b"bad", b"busy", b"OK", b"%", b"%2", b"%zz", b"%ff",
    b"%C3%A9", b"%c3%a9", b"a%20b", b"a b", b"\xff", b"\xc3\xa9", b"\x00", b"\t", b"\r",
]


def mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """
    Bytes near C{data}: one or a few edits of the kinds that break framing,
    fields and values.  Never C{data} itself.
    """
    n = len(data)
    index = st.integers(0, max(0, n - 1))
    some_bytes = st.one_of(
        st.binary(min_size=1, max_size=8),
        st.sampled_from([b" ", b"=", b";", b",", b"/", b"\n", b"0", b"a", b" mac=", b" why=", b" why=x", b"r="]),
    )

    def flip(i_b):
        i, b = i_b
        return data[:i] + bytes([b]) + data[i + 1 :]

    def insert(i_s):
        i, s = i_s
        return data[:i] + s + data[i:]

    def delete(i_k):
        i, k = i_k
        return data[:i] + data[i + k :]

    def swap_value(i_v):
        i, value = i_v
        tokens = data.split(b" ")
        i %= len(tokens)
        key, equals, _ = tokens[i].partition(b"=")
        tokens[i] = key + equals + value if equals else value
        return b" ".join(tokens)

    def duplicate_token(i):
        tokens = data.split(b" ")
        i %= len(tokens)
        return b" ".join(tokens[: i + 1] + tokens[i:])

    def swap_tokens(i_j):
        tokens = data.split(b" ")
        i, j = (k % len(tokens) for k in i_j)
        tokens[i], tokens[j] = tokens[j], tokens[i]
        return b" ".join(tokens)

    one = st.one_of(
        st.tuples(index, st.integers(0, 255)).map(flip),
        st.tuples(st.integers(0, n), some_bytes).map(insert),
        st.tuples(index, st.integers(1, 16)).map(delete),
        st.integers(0, n).map(lambda k: data[:k]),
        st.tuples(st.integers(0, 64), st.sampled_from(ODD_VALUES)).map(swap_value),
        st.integers(0, 64).map(duplicate_token),
        st.tuples(st.integers(0, 64), st.integers(0, 64)).map(swap_tokens),
    )
    return one.filter(lambda mutated: mutated != data)


def canonical_or_refused(data: bytes) -> None:
    try:
        message = decode(data)
    except WireError as e:
        assert e.code in {
            "size", "magic", "version", "syntax", "kind", "field", "value", "range", "count", "record", "minute",
            "checksum", "chunk",
        }
        answer = wire.refusal(data, e)
        if answer is not None:
            # the refusal is itself a valid, small message
            encoded = encode(answer)
            assert decode(encoded) == answer
            assert len(encoded) <= 1024
    else:
        assert encode(message) == data


@BOUNDED
@given(st.data())
def test_a_mutated_frame_is_refused_or_is_canonical(data):
    frame = encode(data.draw(messages, "message"))
    mutated = data.draw(mutations(frame), "mutated")
    canonical_or_refused(mutated)


@FEWER
@given(st.data())
def test_several_mutations_are_refused_or_canonical(data):
    frame = encode(data.draw(messages, "message"))
    for _ in range(data.draw(st.integers(2, 5), "edits")):
        frame = data.draw(mutations(frame) if frame else st.binary(max_size=20), "mutated")
    canonical_or_refused(frame)


@BOUNDED
@given(st.binary(max_size=200))
@example(b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=busy why=")
@example(b"meter/1 BATCHACK id=0123456789abcdef st=ok new=0 dup=0 why=")
@example(b"meter/1 BATCH id=0123456789abcdef n=1 sum=3834a88a r=1,192.168.1.2,999-05-06T07:08,1,2")
def test_any_bytes_are_refused_or_canonical(data):
    canonical_or_refused(data)


@BOUNDED
@given(st.data())
def test_a_mutated_sealed_datagram_never_unseals(data):
    sealed = seal(encode(data.draw(messages, "message")), KEY)
    mutated = data.draw(mutations(sealed), "mutated")
    with pytest.raises(WireError) as raised:
        unseal(mutated, KEY)
    assert raised.value.code == "auth"
    # nor does it pass the gateway's own steps, split_tag then tag_ok
    try:
        body, tag = wire.split_tag(mutated)
    except WireError:
        return
    assert not wire.tag_ok(body, tag, KEY)


@BOUNDED
@given(st.data())
def test_a_resealed_mutation_unseals_and_is_refused_or_canonical(data):
    # What a device holding its key could send: the tag verifies, so only the
    # decoder stands between the bytes and the gateway.
    body = data.draw(mutations(encode(data.draw(day_chunks(), "chunk"))), "mutated")
    assert unseal(seal(body, KEY), KEY) == body
    canonical_or_refused(body)


# -- the bugs these properties found, pinned ------------------------------------


@pytest.mark.parametrize("value, text", [(0.00001, b"0.00001"), (-0.00005, b"-0.00005"), (0.000001, b"0.000001")])
def test_small_values_are_written_positionally(value, text):
    reading = Reading(1, "192.168.1.2", datetime.datetime(2026, 11, 21, 8, 0), value, 30.0)
    data = encode(DayChunk(1, "192.168.1.2", datetime.date(2026, 11, 21), "0123456789abcdef", 1, 1, 7, (reading,)))
    assert b"r=08:00," + text + b",30" in data
    assert decode(data).readings == (reading,)


def test_a_year_before_1000_has_four_digits_in_a_batch():
    reading = Reading(1, "192.168.1.2", datetime.datetime(999, 5, 6, 7, 8), 1.0, 2.0)
    data = encode(Batch("0123456789abcdef", (reading,)))
    assert b"r=1,192.168.1.2,0999-05-06T07:08,1,2" in data
    assert decode(data).readings == (reading,)


@pytest.mark.parametrize(
    "data",
    [
        b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=busy why=",
        b"meter/1 DAYACK xfer=0123456789abcdef part=1 st=ok why=",
        b"meter/1 BATCHACK id=0123456789abcdef st=ok new=0 dup=0 why=",
    ],
)
def test_an_empty_reason_is_not_canonical(data):
    with pytest.raises(WireError) as raised:
        decode(data)
    assert raised.value.code == "value"


def test_a_refusal_quoting_a_huge_value_stays_small():
    body = wire.encode(DayChunk(1, "192.168.1.2", datetime.date(2026, 11, 21), "0123456789abcdef", 1, 1, 7, ()))
    body = body.replace(b"n=0 r=", b"n=1 r=" + b"%" * 60000)
    with pytest.raises(WireError) as raised:
        decode(body, max_size=wire.MAX_DATAGRAM)
    answer = wire.refusal(body, raised.value)
    assert answer.status == "bad" and answer.reason.startswith("record: ")
    assert len(answer.reason) == wire.MAX_REASON and answer.reason.endswith("...")
    assert len(seal(encode(answer), KEY)) < 1200


# -- the DAY record decoder against the plain one it replaced -------------------

_REFERENCE_HHMM = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]\Z")


def _reference_day_records(text, count, device_id, device_ip, day):
    """
    The DAY record decoder as it was before its lookups and caches: one
    regex per time, a datetime and a validated Reading per record.
    """
    readings = []
    seen = set()
    for fields in wire_values.split_records(text, count):
        if len(fields) != 3:
            raise WireError("record", f"record {','.join(fields)!r} is not HH:MM,temperature,humidity")
        hhmm, temperature, humidity = fields
        if _REFERENCE_HHMM.match(hhmm) is None:
            raise WireError("value", f"time {hhmm!r} is not HH:MM")
        if hhmm in seen:
            raise WireError("minute", f"time {hhmm} twice in one message")
        seen.add(hhmm)
        taken_at = datetime.datetime(day.year, day.month, day.day, int(hhmm[:2]), int(hhmm[3:]))
        readings.append(
            Reading(
                device_id,
                device_ip,
                taken_at,
                wire_values.check_number(temperature, check_temperature, "temperature"),
                wire_values.check_number(humidity, check_humidity, "humidity"),
            )
        )
    return tuple(readings)


_record_parts = st.one_of(
    st.sampled_from(["00:00", "23:59", "08:15", "24:00", "8:15", "08:60", "08:15 ", "0815", "", "12:3", "١٢:٣٠", "08:15\n"]),
    st.from_regex(r"[0-9]{1,2}:[0-9]{1,2}", fullmatch=True),
)
_number_parts = st.one_of(
    st.sampled_from(["0", "-0", "20", "20.0", "20.5", "-40", "-40.5", "85", "85.1", "100", "100.5", "1e3", "07", ".5", "nan", "", "3.1234567"]),
    st.from_regex(r"-?[0-9]{1,3}(\.[0-9]{1,7})?", fullmatch=True),
)


@st.composite
def record_texts(draw):
    records = draw(
        st.lists(
            st.one_of(
                st.tuples(_record_parts, _number_parts, _number_parts).map(",".join),
                st.text(alphabet="0123456789:,.;-", max_size=20),
            ),
            max_size=8,
        )
    )
    text = ";".join(records)
    count = draw(st.one_of(st.just(len(records)), st.integers(0, 10)))
    return text, count


def _outcome(decoder, text, count, day):
    try:
        return ("ok", decoder(text, count, 5, "10.0.0.5", day))
    except WireError as e:
        return ("error", e.code, e.detail)


@BOUNDED
@given(record_texts(), st.sampled_from([datetime.date(2026, 11, 21), datetime.date(1, 1, 1), datetime.date(9999, 12, 31)]))
def test_day_records_decode_as_the_reference_decoder_does(case, day):
    text, count = case
    # twice: the second time through the caches the first one filled
    for _ in range(2):
        assert _outcome(wire_day.decode_day_records, text, count, day) == _outcome(_reference_day_records, text, count, day)


# -- the fast record checks against the field-by-field decoders --------------------


def _verdict(check, *args):
    """
    C{ok} or the error a check raises: what the fast path and the field
    checks must agree on.
    """
    try:
        check(*args)
    except WireError as e:
        return ("error", e.code, e.detail)
    return ("ok",)


@BOUNDED
@given(record_texts(), st.sampled_from([datetime.date(2026, 11, 21), datetime.date(1, 1, 1), datetime.date(9999, 12, 31)]))
@example(("00:00,-0,-0", 1), datetime.date(2026, 11, 21))
@example(("00:00,1,2;00:00,1,2", 2), datetime.date(2026, 11, 21))
@example(("00:00,-40,100;23:59,85,0", 2), datetime.date(2026, 11, 21))
@example(("00:00,-40.5,100;23:59,85.000001,0", 2), datetime.date(2026, 11, 21))
def test_the_fast_day_record_check_agrees_with_the_field_checks(case, day):
    text, count = case
    assert _verdict(wire_day.check_day_records, text, count, 5, "10.0.0.5", day) == _verdict(
        wire_day.decode_day_records, text, count, 5, "10.0.0.5", day
    )


_batch_parts = st.tuples(
    st.one_of(st.sampled_from(["1", "0", "01", "2147483647", "2147483648", "999999999", "1000000000", "-1", ""]),
              st.from_regex(r"[0-9]{1,11}", fullmatch=True)),
    st.sampled_from(["10.0.0.5", "192.168.1.4", "fd00::5", "FD00::5", "10.0.0.05", "::ffff:1.2.3.4", "1.2.3", "a,b", ""]),
    st.one_of(
        st.sampled_from(["2026-11-21T02:00", "2026-02-29T02:00", "2024-02-29T23:59", "2026-13-01T00:00", "2026-11-21T24:00",
                         "2026-11-21 02:00", "0001-01-01T00:00", "2026-11-21T02:00:00"]),
        st.from_regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}", fullmatch=True),
    ),
    _number_parts,
    _number_parts,
)


@st.composite
def batch_texts(draw):
    records = draw(
        st.lists(
            st.one_of(
                _batch_parts.map(",".join),
                st.text(alphabet="0123456789:,.;-Tf", max_size=30),
            ),
            max_size=6,
        )
    )
    if records and draw(st.booleans()):
        records.append(records[0])  # a device and minute twice
    text = ";".join(records)
    count = draw(st.one_of(st.just(len(records)), st.integers(0, 8)))
    return text, count


def _batch_verdict(text, count):
    verdict = _verdict(wire_batch.batch_columns, text, count)
    if verdict == ("ok",):
        # the fields split are the records' own
        columns = wire_batch.batch_columns(text, count)
        records = [tuple(r.split(",")) for r in text.split(";")] if text else []
        assert list(zip(*columns.fields())) == records
        assert columns.checked
    return verdict


@BOUNDED
@given(batch_texts())
@example(("1,10.0.0.5,2026-11-21T02:00,17,35;1,10.0.0.5,2026-11-21T02:00,18,35", 2))
@example(("1,10.0.0.5,2026-11-21T02:00,17,35;2,10.0.0.6,2026-11-21T02:00,17,35;1,10.0.0.5,2026-11-21T02:00,18,35", 3))
@example(("1,10.0.0.5,2026-11-21T02:00,17,35;2,10.0.0.6,2026-11-21T02:00,17,35;1,10.0.0.5,2026-11-21T02:15,18,35", 3))
@example(("2147483647,10.0.0.5,2026-11-21T02:00,-0,-0", 1))
@example(("3,FD00::5,2026-11-21T02:00,17,35", 1))
@example(("3,10.0.0.5,2026-02-30T02:00,17,35", 1))
def test_the_fast_batch_record_check_agrees_with_the_field_checks(case):
    text, count = case
    for _ in range(2):  # the second time through the caches
        assert _batch_verdict(text, count) == _verdict(wire_batch.decode_batch_records, text, count)


def _general_verdict(data: bytes):
    """
    What L{decode} says of C{data} when its C{DAY} layout shortcut is left
    out (every message then goes through the token-by-token parsing).
    """
    saved = wire_codec._DAY_MESSAGE
    wire_codec._DAY_MESSAGE = re.compile(rb"(?!)")
    try:
        return _verdict_of_decode(data)
    finally:
        wire_codec._DAY_MESSAGE = saved


def _verdict_of_decode(data: bytes):
    try:
        return ("ok", decode(data))
    except WireError as e:
        return ("error", e.code, e.detail)


@BOUNDED
@given(st.data())
def test_the_day_layout_shortcut_decodes_as_the_token_parser_does(data):
    frame = encode(data.draw(day_chunks(), "chunk"))
    for _ in range(data.draw(st.integers(0, 3), "edits")):
        frame = data.draw(mutations(frame) if frame else st.binary(max_size=20), "mutated")
    assert _verdict_of_decode(frame) == _general_verdict(frame)


_GOOD_DAY = b"meter/1 DAY dev=1 ip=10.0.0.5 day=2026-11-21 xfer=0123456789abcdef part=1/1 ts=5 n=1 r=00:00,1,2"


@pytest.mark.parametrize(
    "frame",
    [
        _GOOD_DAY,
        _GOOD_DAY.replace(b" ts=5 n=1", b" n=1 ts=5"),
        _GOOD_DAY.replace(b"dev=1", b"dev=1=1"),
        _GOOD_DAY.replace(b"dev=1", b"dev=01"),
        _GOOD_DAY.replace(b"part=1/1", b"part=2/1"),
        _GOOD_DAY.replace(b" ts=5", b"  ts=5"),
        _GOOD_DAY.replace(b"r=00:00,1,2", b"r="),
        _GOOD_DAY.replace(b"r=00:00,1,2", b"r=00:00,1,2 x=1"),
        _GOOD_DAY.replace(b"ip=10.0.0.5", b"ip=10.0.0.5\x7f"),
        _GOOD_DAY + b"\n",
    ],
)
def test_the_day_layout_shortcut_agrees_on_near_misses(frame):
    assert _verdict_of_decode(frame) == _general_verdict(frame)


# -- device addresses in RFC 5952's text ----------------------------------------------

_GROUP = re.compile(r"[0-9a-f]{1,4}\Z")


def _rfc5952_ok(text: str, address: ipaddress.IPv6Address) -> None:
    """
    Assert C{text} is RFC 5952 section 4's text of C{address}, by the
    properties of the text alone (no str(ipaddress), which differs between
    Python versions).
    """
    assert ":" in text and "." not in text and "%" not in text
    assert text.count("::") <= 1 and ":::" not in text
    head, compressed, tail = text.partition("::")
    left = head.split(":") if head else []
    right = tail.split(":") if tail else []
    # 4.1: no leading zeros; 4.3: lowercase
    for group in left + right:
        assert _GROUP.match(group) and (group == "0" or not group.startswith("0")), text
    groups = [int(g, 16) for g in left] + ([0] * (8 - len(left) - len(right)) if compressed else []) + [int(g, 16) for g in right]
    assert len(groups) == 8
    assert bytes(b for g in groups for b in g.to_bytes(2, "big")) == address.packed
    # 4.2: "::" stands for the first longest run of two or more zero groups,
    # and only for a whole run
    runs = [(start, end - start) for start in range(8) for end in range(start + 1, 9)
            if all(g == 0 for g in groups[start:end]) and (start == 0 or groups[start - 1]) and (end == 8 or groups[end])]
    longest = max((length for _, length in runs), default=0)
    if longest >= 2:
        first = min(start for start, length in runs if length == longest)
        assert compressed and len(left) == first and 8 - len(right) == first + longest, text
    else:
        assert not compressed, text


ipv6_addresses = st.one_of(
    st.ip_addresses(v=6),
    # few distinct groups, so runs of zeros of every length and ties are common
    st.lists(st.sampled_from([0, 0, 0, 1, 0xFFFF, 0xABC]), min_size=8, max_size=8).map(
        lambda groups: ipaddress.IPv6Address(b"".join(g.to_bytes(2, "big") for g in groups))
    ),
)


@BOUNDED
@given(ipv6_addresses)
@example(ipaddress.IPv6Address("2001:db8:0:0:1:0:0:1"))
@example(ipaddress.IPv6Address("2001:db8:0:1:1:1:1:1"))
@example(ipaddress.IPv6Address("::"))
@example(ipaddress.IPv6Address("::ffff:0:102:304"))
def test_device_addresses_are_written_as_rfc_5952_says(address):
    for written in {address.exploded, address.exploded.upper(), str(address)}:
        if address.ipv4_mapped is not None:
            with pytest.raises(ValueError, match="IPv4-mapped"):
                wire.device_address(written)
            continue
        text = wire.device_address(written)
        _rfc5952_ok(text, address)
        # the decoder takes this text and refuses every other
        assert wire_values.address(text) == text
        if written != text:
            with pytest.raises(WireError):
                wire_values.address(written)


@BOUNDED
@given(st.ip_addresses(v=4))
def test_ipv4_device_addresses_are_dotted_decimal_without_leading_zeros(address):
    text = wire.device_address(address.exploded)
    assert [int(part) for part in text.split(".")] == list(address.packed)
    assert all(part == "0" or not part.startswith("0") for part in text.split("."))
    with pytest.raises(ValueError, match="IPv4-mapped"):
        wire.device_address("::ffff:" + text)
    with pytest.raises(ValueError, match="zone"):
        wire.device_address("fe80::1%" + text)
