"""
The wire format of both hops, device -> gateway over UDP and gateway -> cloud
over TCP.  The code lives in the modules below; this package names what the
roles use, so C{wire.encode(...)} reads as one codec:

  - L{meter.wire.values}: the value grammar (numbers, addresses, days,
    times, ids, reasons) and the caches of values already checked;
  - L{meter.wire.day}, L{meter.wire.batch}: the records of C{DAY} and
    C{BATCH} messages, and the rewrite of the one into the other;
  - L{meter.wire.messages}: the messages as frozen values, their limits,
    their ids;
  - L{meter.wire.codec}: one description per kind of message, driving
    L{encode}, L{decode} and L{refusal};
  - L{meter.wire.sealing}: the tags of device datagrams and the one reader of
    a sealed C{DAY} header;
  - L{meter.wire.split}: a day cut into chunks;
  - L{meter.wire.lines}: the TCP hop's line framing.
"""

from meter.wire.batch import BatchColumns, batch_records_of_day
from meter.wire.codec import MAX_REASON, decode, encode, refusal
from meter.wire.lines import LineProtocol, without_nagle
from meter.wire.messages import (
    DEFAULT_CHUNK_BYTES,
    MAGIC,
    MAX_BATCH_READINGS,
    MAX_DATAGRAM,
    MAX_LINE,
    MAX_READINGS,
    STATUSES,
    VERSION,
    Batch,
    BatchAck,
    DayAck,
    DayChunk,
    Message,
    Ping,
    Pong,
    new_id,
)
from meter.wire.sealing import TAG_LENGTH, claimed_device, peek_ack_id, peek_day_id, seal, split_tag, tag_ok, unseal
from meter.wire.split import chunk_room, day_chunks, day_chunk_records, pack_records, split_day
from meter.wire.values import MAX_DEVICE_ID, WireError, device_address, record_count

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MAGIC",
    "MAX_BATCH_READINGS",
    "MAX_DATAGRAM",
    "MAX_DEVICE_ID",
    "MAX_LINE",
    "MAX_READINGS",
    "MAX_REASON",
    "STATUSES",
    "TAG_LENGTH",
    "VERSION",
    "Batch",
    "BatchAck",
    "BatchColumns",
    "DayAck",
    "DayChunk",
    "LineProtocol",
    "Message",
    "Ping",
    "Pong",
    "WireError",
    "batch_records_of_day",
    "claimed_device",
    "chunk_room",
    "day_chunks",
    "day_chunk_records",
    "decode",
    "device_address",
    "encode",
    "new_id",
    "pack_records",
    "peek_ack_id",
    "peek_day_id",
    "record_count",
    "refusal",
    "seal",
    "split_day",
    "split_tag",
    "tag_ok",
    "unseal",
    "without_nagle",
]
