"""
The SQL the cloud's two databases share: which readings a query selects,
written once for SQLite and PostgreSQL, which differ only in how a
parameter is marked, how a time is passed and how the readings of an
address are found.
"""

from __future__ import annotations

import datetime
from typing import Any, Callable

import attrs

from meter.cloud.interfaces import ReadingsQuery

SELECT_READINGS = "SELECT device_id, device_ip, taken_at, temperature_c, humidity_pct FROM readings"


@attrs.frozen
class Dialect:
    """
    @ivar placeholder: how a parameter is marked in a statement.
    @ivar moment: a time as the database compares it with C{taken_at}.
    """

    placeholder: str
    moment: Callable[[datetime.datetime], Any]

    def address_condition(self, device_ip: str) -> tuple[str, list]:
        """
        The condition selecting the readings stored with C{device_ip}
        (L{BY_ADDRESS}) and its parameters.
        """
        condition = BY_ADDRESS.format(mark=self.placeholder)
        return condition, [device_ip] * condition.count(self.placeholder)


#: The readings have no index by address (its upkeep was a third of
#: PostgreSQL's CPU a reading, two fifths of SQLite's insert): the devices
#: that ever had the address (C{device_addresses}, a row a pair) are read
#: by the key, and of theirs the readings stored with it.
BY_ADDRESS = "device_id IN (SELECT device_id FROM device_addresses WHERE device_ip = {mark}) AND device_ip = {mark}"
#: Times stored as ISO text to the minute, which sorts as the times do.
SQLITE = Dialect("?", lambda moment: moment.isoformat(timespec="minutes"))
#: Times stored as timestamps.
POSTGRESQL = Dialect("%s", lambda moment: moment)


def minute_bound(moment: datetime.datetime) -> datetime.datetime:
    """
    The first whole minute at or after C{moment}.  Readings are taken on
    whole minutes, so a reading is at or after C{moment} exactly when it is
    at or after this minute.
    """
    if moment.second or moment.microsecond:
        return moment.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
    return moment


def where(dialect: Dialect, query: ReadingsQuery) -> tuple[str, list]:
    """
    The C{WHERE} clause selecting C{query}'s readings (empty for all of
    them) and its parameters.
    """
    mark = dialect.placeholder
    conditions: list[str] = []
    args: list = []
    if query.device_id is not None:
        conditions.append(f"device_id = {mark}")
        args.append(query.device_id)
    if query.device_ip is not None:
        condition, values = dialect.address_condition(query.device_ip)
        conditions.append(condition)
        args.extend(values)
    for condition, value in (
        (f"taken_at >= {mark}", None if query.since is None else dialect.moment(minute_bound(query.since))),
        (f"taken_at < {mark}", None if query.until is None else dialect.moment(minute_bound(query.until))),
    ):
        if value is not None:
            conditions.append(condition)
            args.append(value)
    if query.after is not None:
        # A row value: the primary key's index (each partition's, in
        # PostgreSQL) starts its scan right after the cursor.
        conditions.append(f"(device_id, taken_at) > ({mark}, {mark})")
        args.extend([query.after.device_id, dialect.moment(query.after.taken_at)])
    return (" WHERE " + " AND ".join(conditions)) if conditions else "", args


def readings_by_time(dialect: Dialect, query: ReadingsQuery, limit: int | None) -> tuple[str, list]:
    """
    The statement of L{meter.cloud.interfaces.IReadingStore.readings}:
    C{query}'s readings by time taken, then device id, at most C{limit}.
    """
    clause, args = where(dialect, query)
    sql = SELECT_READINGS + clause + " ORDER BY taken_at, device_id"
    if limit is not None:
        sql += f" LIMIT {dialect.placeholder}"
        args.append(limit)
    return sql, args
