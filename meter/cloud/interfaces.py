"""
The cloud's seam between its policy (L{meter.cloud.store.CloudStore}: what a
batch costs, what is printed, what is answered) and where readings live.

Implementations: L{meter.cloud.sqlite.SQLiteReadingStore} (the daemon's) and
L{meter.testing.MemoryReadingStore}; tests/contracts/test_reading_store.py
runs one test body over each to prove they behave alike.
"""

from __future__ import annotations

import datetime

import attrs
from zope.interface import Interface


@attrs.frozen
class DeviceSummary:
    """
    What a store holds of one device.

    @ivar device_id: the device's number in the fleet.
    @ivar first: when its earliest stored reading was taken.
    @ivar last: when its latest stored reading was taken.
    @ivar count: how many of its readings are stored.
    """

    device_id: int
    first: datetime.datetime
    last: datetime.datetime
    count: int


class IReadingStore(Interface):
    """
    Readings kept once each: a reading is unique by (device id, time taken),
    and a second reading of the same key is a duplicate, never stored over
    the first.

    Every method returns a L{Deferred}: a store may commit or query through
    a reactor (SQLite's group commit, a database server).
    """

    def add(columns, stored_at):
        """
        Store the records C{columns} (a batch's records split, see
        L{meter.wire.Batch.columns}; fields as checked by the decoder) all
        together or none of them, skipping each whose key is stored already,
        including by an earlier record of the same C{columns}.

        @param stored_at: Unix seconds to record as the time of storing.
        @return: a L{Deferred} firing, once they are durable, with C{None}
            if every record was new (the common case, which costs nothing a
            record), else the list of the positions in C{columns} of the new
            ones, in order.  It fails, with nothing stored, if the store
            could not take them.
        """

    def readings(device_id=None, device_ip=None, since=None, until=None, limit=None):
        """
        The stored readings, as L{meter.reading.Reading}s, by time taken and
        then device id.

        @param device_id: only this device's, if given.
        @param device_ip: only those taken at this address, if given (with
            C{device_id} too: both must match).
        @param since: only those taken at or after this naive
            L{datetime.datetime} (inclusive), if given.
        @param until: only those taken before this naive
            L{datetime.datetime} (exclusive), if given: consecutive ranges
            (C{since=a, until=b}, then C{since=b, until=c}) hold each reading
            exactly once.
        @param limit: at most this many, the first in that order, if given.
        @return: a L{Deferred} firing with a list.
        """

    def devices():
        """
        A L{DeviceSummary} for each device with a stored reading, by device
        id.

        @return: a L{Deferred} firing with a list.
        """
