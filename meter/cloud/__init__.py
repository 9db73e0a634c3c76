"""
The cloud: a long-running TCP server that stores every reading gateways
forward, prints each on its console the first time it is stored, and
acknowledges a batch only once it is committed.

L{store.CloudStore} decides and stores through an L{interfaces.IReadingStore}
(L{sqlite.SQLiteReadingStore} in the daemon); L{protocol.CloudProtocol} only
translates lines to calls on it and answers to lines; L{console} prints; the
tap (L{meter.cloud.tap}) wires them.
"""

from meter.cloud.console import DayHeaders, console_text, day_header, write_console
from meter.cloud.interfaces import DeviceSummary, IReadingStore
from meter.cloud.metrics import CloudMetrics
from meter.cloud.protocol import (
    MAX_UNAUTHENTICATED,
    RESERVED_DESCRIPTORS,
    Admission,
    CloudFactory,
    CloudProtocol,
    connection_limits,
)
from meter.cloud.sqlite import SCHEMA, VERSIONS, SQLiteReadingStore, open_database
from meter.cloud.store import CloudStore

__all__ = [
    "Admission",
    "CloudFactory",
    "CloudMetrics",
    "CloudProtocol",
    "CloudStore",
    "DayHeaders",
    "DeviceSummary",
    "IReadingStore",
    "MAX_UNAUTHENTICATED",
    "RESERVED_DESCRIPTORS",
    "SCHEMA",
    "SQLiteReadingStore",
    "VERSIONS",
    "connection_limits",
    "console_text",
    "day_header",
    "open_database",
    "write_console",
]
