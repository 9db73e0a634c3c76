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


# -- the read side: what the web API asks --------------------------------------


@attrs.frozen
class FleetDevice:
    """
    One device as the API lists it: what the cloud's C{devices} table keeps,
    updated in the transaction that stores its readings.

    @ivar device_id: the device's number in the fleet.
    @ivar device_ip: the address of its latest stored reading.
    @ivar first: when its earliest stored reading was taken (the device's
        local time, naive).
    @ivar last: when its latest stored reading was taken.
    @ivar count: how many of its readings are stored.
    """

    device_id: int
    device_ip: str
    first: datetime.datetime
    last: datetime.datetime
    count: int


@attrs.frozen
class Cursor:
    """
    Where a page of readings ended: the key of its last reading.  The next
    page holds the readings after it in the order (device id, time taken).
    """

    device_id: int
    taken_at: datetime.datetime


@attrs.frozen
class ReadingsQuery:
    """
    Which readings: those of a device (by id, or taken at an address), taken
    at or after C{since} and before C{until} (naive, the devices' local
    time), after C{after}; each given or None.
    """

    device_id: int | None = None
    device_ip: str | None = None
    since: datetime.datetime | None = None
    until: datetime.datetime | None = None
    after: Cursor | None = None


@attrs.frozen
class Bucket:
    """
    The readings of one device taken in [start, start + width): how many,
    and the least, mean and greatest of each value.  A bucket of one
    reading has the reading's time as C{start} and its values thrice.
    """

    start: datetime.datetime
    count: int
    temperature: tuple[float, float, float]
    humidity: tuple[float, float, float]


@attrs.frozen
class Series:
    """
    A device's readings over a range, ready for a chart: one L{Bucket} a
    reading when the range holds at most the points asked for (C{width}
    None), else buckets of C{width} seconds (empty ones left out).
    """

    readings: int
    width: int | None
    buckets: tuple[Bucket, ...]


class IReadingQueries(Interface):
    """
    The read side of the cloud's readings, for the web API: queries that
    never hold up ingest (the SQLite one runs them on read connections of
    its own, off the reactor thread).  Every method returns a L{Deferred}.
    """

    def fleet():
        """
        A L{FleetDevice} for each device with a stored reading, by id.
        """

    def fleet_json(stale_before):
        """
        The fleet as C{/api/v1/devices} lists it, as the text of a JSON
        array: for each device with a stored reading, by id, an object of
        its C{device_id}, C{device_ip}, C{first_reading} and C{last_reading}
        (in whole minutes, C{YYYY-MM-DDTHH:MM}), C{readings} and C{stale}
        (its last reading taken before the date C{stale_before}).  Made by
        the database, off the reactor thread: a fleet of 100,000 devices is
        14 MB of JSON, which Python objects a device took ~0.5 s of CPU to
        make, on the reactor thread, at every refresh of a dashboard.
        """

    def device(device_id):
        """
        The L{FleetDevice} of device C{device_id}, or None if none of its
        readings is stored.
        """

    def address_range(device_ip):
        """
        When the first and the last stored reading taken at address
        C{device_ip} were taken (a pair), or None if there is none.
        """

    def page(query, limit):
        """
        The first C{limit} (at least 1) readings C{query} selects, as
        L{meter.reading.Reading}s by device id, then time taken (the order
        of the table's key, so that each page starts where the one before
        ended whatever the size of the table, and a device's readings come
        together, as a chart or an export wants them): a page, so
        that a caller streams a long result page after page, each page's
        last reading the L{Cursor} of the next query.
        """

    def next_cursor(query, limit):
        """
        The L{Cursor} of the C{limit}-th reading C{query} selects if more
        follow it, else None: where the next request for C{limit} more
        starts.
        """

    def series(device_id, device_ip, since, until, points):
        """
        The L{Series} of the readings of a device (by id or address) taken
        in [since, until): one bucket a reading when there are at most
        C{points}, else at most C{points} buckets of equal width, each with
        the least, mean and greatest value computed by the store.
        """
