"""
Sealing device datagrams: an HMAC-SHA256 tag under the device's key, and the
one reader of a sealed C{DAY} message's header, which the gateway (and the
tools that drive or measure it) use before the message is verified or
decoded.
"""

from __future__ import annotations

import hmac
import re

from meter.wire.messages import VERSION
from meter.wire.values import WireError

#: A sealed datagram ends with this and 64 hex digits of HMAC-SHA256.
_TAG = b" mac="
TAG_LENGTH = len(_TAG) + 64


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


#: The header of a C{DAY} message, sealed or not: the version and the
#: device it claims, then its transfer id, part=N/M and start time.
#: Prefixes of it are matched: the records and the tag after it are not read.
_CLAIM = rb"meter/(%s) DAY dev=([1-9][0-9]{0,9}) "
_ID = rb"ip=\S+ day=\S+ xfer=([0-9a-f]{16}) part=([1-9][0-9]{0,3})/[1-9][0-9]{0,3} ts=(0|[1-9][0-9]{0,9}) "
#: The claim alone, of any version: read before the tag is checked.
_DAY_CLAIM = re.compile(_CLAIM % rb"[0-9]{1,9}")
#: The whole header, of this version.
_DAY_HEADER = re.compile(_CLAIM % str(VERSION).encode("ascii") + _ID)


def claimed_device(body: bytes) -> int | None:
    """
    The device id a C{DAY} message claims, read before anything else is
    parsed so its key can verify the tag; C{None} if there is none.

    Of any version: a device speaking another version is then answered, under
    its key, C{bad} with the decoder's C{version} error, rather than
    dropped like a stranger's datagram.
    """
    match = _DAY_CLAIM.match(body)
    return int(match.group(2)) if match is not None else None


def peek_day_id(body: bytes) -> tuple[str, int, int] | None:
    """
    The transfer id, part number and start time of a C{DAY} message of this
    version, read from its header without decoding its records: enough to
    recognise a retransmission of a chunk already stored.  C{None} if the
    header is not a well-formed C{DAY} header (the full decoder then says
    why).
    """
    match = _DAY_HEADER.match(body)
    if match is None:
        return None
    return match.group(3).decode("ascii"), int(match.group(4)), int(match.group(5))


#: The head of a C{DAYACK}: its transfer id, part and status.
_DAYACK_HEADER = re.compile(rb"meter/%d DAYACK xfer=([0-9a-f]{16}) part=(0|[1-9][0-9]{0,3}) st=([a-z]+)" % VERSION)


def peek_ack_id(body: bytes) -> tuple[str, int, str] | None:
    """
    The transfer id, part and status of a C{DAYACK}, sealed or not, read
    without checking its tag or decoding it: what a driver of many devices
    on one socket routes an answer by.  C{None} if it is not a C{DAYACK}'s
    head.
    """
    match = _DAYACK_HEADER.match(body)
    if match is None:
        return None
    return match.group(1).decode("ascii"), int(match.group(2)), match.group(3).decode("ascii")
