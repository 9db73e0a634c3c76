"""
In-memory implementations of meter's storage interfaces, for tests of the
code that uses them and for anyone embedding meter: each behaves as the real
SQLite implementation does, which the contract tests in tests/contracts/
prove by running one test body over both.
"""

from __future__ import annotations

# -- the gateway's spool (meter.gateway.interfaces.ISpool) ---------------------


# -- the cloud's reading store (meter.cloud.interfaces.IReadingStore) ----------

# The cloud section's imports, here so that each section stays one block.
import datetime

from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from meter.cloud.interfaces import DeviceSummary, IReadingStore
from meter.reading import Reading
from meter.wire import BatchColumns


@implementer(IReadingStore)
class MemoryReadingStore:
    """
    Readings in a dict, as L{meter.cloud.sqlite.SQLiteReadingStore} keeps
    them in SQLite: unique by (device id, time taken), numbers as the
    decoder checked their text.  Every Deferred has fired when returned.
    """

    def __init__(self) -> None:
        #: (device id, ISO minute taken) -> (address, temperature, humidity,
        #: Unix seconds stored)
        self.rows: dict[tuple[int, str], tuple[str, float, float, float]] = {}

    def add(self, columns: BatchColumns, stored_at: float) -> Deferred:
        return defer.execute(self._add, columns, stored_at)

    def _add(self, columns: BatchColumns, stored_at: float) -> list[int] | None:
        rows = self.rows
        fresh: dict[tuple[int, str], tuple[str, float, float, float]] = {}
        new: list[int] = []
        records = zip(columns.devices, columns.ips, columns.stamps, columns.temperatures, columns.humidities)
        for index, (device, ip, stamp, temperature, humidity) in enumerate(records):
            key = (int(device), stamp)
            if key not in rows and key not in fresh:
                fresh[key] = (ip, float(temperature), float(humidity), stored_at)
                new.append(index)
        # Only once every record is read: all of them or none.
        rows.update(fresh)
        return None if len(new) == len(columns) else new

    def readings(
        self,
        device_id: int | None = None,
        device_ip: str | None = None,
        since: datetime.datetime | None = None,
        until: datetime.datetime | None = None,
    ) -> Deferred:
        parse = datetime.datetime.fromisoformat
        found = []
        for (number, stamp), (ip, temperature, humidity, _) in self.rows.items():
            taken_at = parse(stamp)
            if (
                (device_id is None or number == device_id)
                and (device_ip is None or ip == device_ip)
                and (since is None or taken_at >= since)
                and (until is None or taken_at < until)
            ):
                found.append(Reading.checked(number, ip, taken_at, temperature, humidity))
        found.sort(key=lambda reading: (reading.taken_at, reading.device_id))
        return succeed(found)

    def devices(self) -> Deferred:
        stamps: dict[int, list[str]] = {}
        for number, stamp in self.rows:
            stamps.setdefault(number, []).append(stamp)
        parse = datetime.datetime.fromisoformat
        return succeed(
            [DeviceSummary(number, parse(min(own)), parse(max(own)), len(own)) for number, own in sorted(stamps.items())]
        )
