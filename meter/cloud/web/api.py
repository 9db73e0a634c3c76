"""
The cloud's HTTP API under /api/v1 (docs/api.md): the fleet, its readings
(streamed page by page), chart-ready series, the OpenAPI document.

Every answer is JSON (or the CSV and SenML of readings); every refusal is
JSON too: 400 naming the parameter, 404 for an unknown device or path, 503
when a query failed (its cause logged once).  A query runs through an
L{IReadingQueries}, off the reactor thread for the SQLite one.
"""

from __future__ import annotations

import datetime
import json
from importlib import resources
from typing import Callable
from urllib.parse import urlencode

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from meter.cloud.interfaces import Cursor, FleetDevice, IReadingQueries, ReadingsQuery, Series
from meter.cloud.web import params
from meter.cloud.web.formats import FORMATTERS, minutes, wall_seconds
from meter.cloud.web.params import BadParameter

log = Logger()

#: Readings read and written at a time: what one stream holds in memory.
PAGE_READINGS = 1000

API_CACHE = b"no-store"


def json_bytes(value) -> bytes:
    return (json.dumps(value, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")


def send_json(request, code: int, value) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", API_CACHE)
    return json_bytes(value)


def error_body(request, code: int, message: str, parameter: str | None = None) -> bytes:
    """
    A refusal's body, C{{"error": ..., "parameter": ...}}, its code set.
    """
    body: dict = {"error": message}
    if parameter is not None:
        body["parameter"] = parameter
    return send_json(request, code, body)


class NotFound(Exception):
    """
    What the request names does not exist (404), e.g. a device without
    readings.
    """


class JsonError(Resource):
    """
    A fixed JSON refusal for any method and any path below: an unknown
    path under /api, a method other than GET and HEAD, a request without
    the token.
    """

    isLeaf = True

    def __init__(self, code: int, message: str, headers: dict[bytes, bytes] | None = None):
        Resource.__init__(self)
        self._code = code
        self._message = message
        self._headers = headers or {}

    def render(self, request) -> bytes:
        for name, value in self._headers.items():
            request.setHeader(name, value)
        return error_body(request, self._code, self._message)


def _answer(request, work: Callable[[], defer.Deferred]) -> object:
    """
    Render asynchronously: run C{work} (a coroutine function writing the
    answer itself, returning bytes to write and finish with, or None if
    it finished the request itself), answering its refusals as JSON.
    """
    if request.postpath:
        # Below a leaf: /api/v1/devices/3 is no path of the API.
        request.write(error_body(request, 404, "no such path in the API; see /api/v1/openapi.json"))
        request.finish()
        return NOT_DONE_YET
    gone: list = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def done(body):
        if body is not None and not gone:
            request.write(body)
            request.finish()

    def failed(failure):
        if gone:
            return
        if failure.check(BadParameter):
            body = error_body(request, 400, failure.value.message, failure.value.parameter)
        elif failure.check(NotFound):
            body = error_body(request, 404, str(failure.value), "device")
        else:
            log.failure("a query of {path} failed", failure, path=request.uri.decode("latin-1"))
            body = error_body(request, 503, f"the query failed ({failure.type.__name__}); see the cloud's log")
        request.write(body)
        request.finish()

    defer.ensureDeferred(work()).addCallbacks(done, failed).addErrback(
        lambda failure: log.failure("answering {path} failed", failure, path=request.uri.decode("latin-1"))
    )
    return NOT_DONE_YET


def _today(clock, zone: datetime.tzinfo | None) -> datetime.date:
    return datetime.datetime.fromtimestamp(clock.seconds(), zone).date()


def last_complete_day(clock, zone: datetime.tzinfo | None) -> datetime.date:
    """
    The last whole day before the cloud's today, today taken from C{clock}
    in C{zone} (None: the cloud's local zone).  The readings carry their
    devices' local time without a zone, so the fleet is taken to share the
    cloud's: a device with no reading on that day or later is stale.
    """
    return _today(clock, zone) - datetime.timedelta(days=1)


def device_json(device: FleetDevice, last_day: datetime.date) -> dict:
    return {
        "device_id": device.device_id,
        "device_ip": device.device_ip,
        "first_reading": minutes(device.first),
        "last_reading": minutes(device.last),
        "readings": device.count,
        "stale": device.last.date() < last_day,
    }


class DevicesPage(Resource):
    """
    C{GET /api/v1/devices}: the fleet, from the summary kept at insert.
    """

    isLeaf = True

    def __init__(self, queries: IReadingQueries, clock, zone):
        Resource.__init__(self)
        self._queries = queries
        self._clock = clock
        self._zone = zone

    def render_GET(self, request):
        async def work():
            params.arguments(request.args, ())
            last_day = last_complete_day(self._clock, self._zone)
            # The devices' array is the database's text, put in place as it is.
            fleet = await self._queries.fleet_json(last_day)
            request.setResponseCode(200)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", API_CACHE)
            return b'{"last_complete_day":"%s","devices":%s}\n' % (last_day.isoformat().encode(), fleet.encode("utf-8"))

        return _answer(request, work)


async def _subject(queries: IReadingQueries, device: params.Device) -> tuple[datetime.datetime, datetime.datetime]:
    """
    When the first and the last reading of C{device} were taken; L{NotFound}
    when it has none.
    """
    if device.device_id is not None:
        found = await queries.device(device.device_id)
        if found is None:
            raise NotFound(f"no readings of device {device.device_id}")
        return found.first, found.last
    span = await queries.address_range(device.device_ip)
    if span is None:
        raise NotFound(f"no readings taken at address {device.device_ip}")
    return span


@implementer(IPushProducer)
class ReadingsStream:
    """
    Writes the readings of a query to C{request} page by page, each page
    read only once the one before is written and the client keeps up: a
    push producer on the request, paused while the transport's buffer is
    full, so memory holds a page at most whatever the answer's length.
    """

    def __init__(self, request, queries: IReadingQueries, query: ReadingsQuery, limit: int, formatter,
                 next_cursor: str | None, page: int = PAGE_READINGS):
        self._request = request
        self._queries = queries
        self._query = query
        self._left = limit
        self._format = formatter
        self._next = next_cursor
        self._page = page
        self._paused = False
        self._waiting = False
        self._stopped = False
        #: Pages written, for the tests.
        self.pages = 0

    def start(self) -> None:
        # The client gone: no further page is read.
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._request.registerProducer(self, True)
        self._request.write(self._format.head())
        self._fetch()

    def _fetch(self) -> None:
        if self._stopped:
            return
        size = min(self._page, self._left)
        if size <= 0:
            self._end()
            return
        self._queries.page(self._query, size).addCallbacks(self._got, self._failed, callbackArgs=(size,))

    def _got(self, readings, size: int) -> None:
        if self._stopped:
            return
        self.pages += 1
        self._left -= len(readings)
        chunk = self._format.rows(readings)
        if len(readings) < size or self._left <= 0:
            if chunk:
                self._request.write(chunk)
            self._end()
            return
        last = readings[-1]
        self._query = ReadingsQuery(
            self._query.device_id, self._query.device_ip, self._query.since, self._query.until,
            Cursor(last.device_id, last.taken_at),
        )
        # May pause this producer at once, when the transport's buffer fills.
        self._request.write(chunk)
        if self._paused:
            self._waiting = True
        else:
            self._fetch()

    def _failed(self, failure) -> None:
        if self._stopped:
            return
        # The status line is sent: the client can only be told by a
        # connection closed before the end of the answer.
        log.failure("a query of a readings stream failed; its connection is closed", failure)
        self._stopped = True
        self._request.unregisterProducer()
        self._request.loseConnection()

    def _end(self) -> None:
        self._stopped = True
        self._request.write(self._format.tail(self._next))
        self._request.unregisterProducer()
        self._request.finish()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._waiting:
            self._waiting = False
            self._fetch()

    def stopProducing(self) -> None:
        self._stopped = True


class ReadingsPage(Resource):
    """
    C{GET /api/v1/readings}: the readings, streamed.
    """

    isLeaf = True
    ALLOWED = ("device", "from", "to", "limit", "after", "format")

    def __init__(self, queries: IReadingQueries, page: int = PAGE_READINGS):
        Resource.__init__(self)
        self._queries = queries
        self._page = page

    def render_GET(self, request):
        gone: list = []
        request.notifyFinish().addErrback(gone.append)

        async def work():
            args = params.arguments(request.args, self.ALLOWED)
            device = params.device(args["device"]) if "device" in args else params.Device(None, None)
            since, until = params.time_range(args)
            limit = (
                params.whole("limit", args["limit"], 1, params.MOST_READINGS)
                if "limit" in args else params.DEFAULT_READINGS
            )
            after = params.cursor(args["after"]) if "after" in args else None
            kind = args.get("format", "json")
            if kind not in FORMATTERS:
                raise BadParameter("format", f"unknown format {kind!r}; one of {', '.join(FORMATTERS)}")
            if device.device_id is not None or device.device_ip is not None:
                await _subject(self._queries, device)
            query = ReadingsQuery(device.device_id, device.device_ip, since, until, after)
            following = await self._queries.next_cursor(query, limit)
            next_text = None if following is None else params.cursor_text(following)
            if gone:
                return None
            formatter = FORMATTERS[kind]()
            request.setResponseCode(200)
            request.setHeader(b"content-type", formatter.content_type)
            request.setHeader(b"cache-control", API_CACHE)
            if next_text is not None:
                link = urlencode({**args, "after": next_text})
                request.setHeader(b"link", f'</api/v1/readings?{link}>; rel="next"'.encode("utf-8"))
            ReadingsStream(request, self._queries, query, limit, formatter, next_text, self._page).start()
            return None

        return _answer(request, work)


def series_json(series: Series, device: params.Device, since, until, points: int) -> dict:
    buckets = series.buckets
    return {
        "device_id": device.device_id,
        "device_ip": device.device_ip,
        "from": minutes(since),
        "to": minutes(until),
        "points": points,
        "readings": series.readings,
        "bucket_seconds": series.width,
        "time": [minutes(b.start) for b in buckets],
        "t": [wall_seconds(b.start) for b in buckets],
        "count": [b.count for b in buckets],
        "temperature_c": {
            "min": [b.temperature[0] for b in buckets],
            "mean": [round(b.temperature[1], 4) for b in buckets],
            "max": [b.temperature[2] for b in buckets],
        },
        "humidity_pct": {
            "min": [b.humidity[0] for b in buckets],
            "mean": [round(b.humidity[1], 4) for b in buckets],
            "max": [b.humidity[2] for b in buckets],
        },
    }


class SeriesPage(Resource):
    """
    C{GET /api/v1/series}: one device's readings over a range, downsampled
    by the store when the range holds more than C{points}.
    """

    isLeaf = True
    ALLOWED = ("device", "from", "to", "points")

    def __init__(self, queries: IReadingQueries):
        Resource.__init__(self)
        self._queries = queries

    def render_GET(self, request):
        async def work():
            args = params.arguments(request.args, self.ALLOWED)
            if "device" not in args:
                raise BadParameter("device", "device is required: a device id (3) or address (192.168.1.4)")
            device = params.device(args["device"])
            since, until = params.time_range(args)
            points = (
                params.whole("points", args["points"], 1, params.MOST_POINTS)
                if "points" in args else params.DEFAULT_POINTS
            )
            first, last = await _subject(self._queries, device)
            # Not given: from the device's first reading to just after its last.
            if since is None:
                since = min(first, until) if until is not None else first
            if until is None:
                until = max(since, last + datetime.timedelta(minutes=1))
            series = await self._queries.series(device.device_id, device.device_ip, since, until, points)
            return send_json(request, 200, series_json(series, device, since, until, points))

        return _answer(request, work)


class OpenApiPage(Resource):
    """
    C{GET /api/v1/openapi.json}: the hand-written document in the package,
    as it is.
    """

    isLeaf = True

    def __init__(self):
        Resource.__init__(self)
        self._body = resources.files("meter.cloud.web").joinpath("openapi.json").read_bytes()

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-cache")
        return self._body


class Version1(Resource):
    def __init__(self, queries: IReadingQueries, clock, zone, page: int = PAGE_READINGS):
        Resource.__init__(self)
        self.putChild(b"devices", DevicesPage(queries, clock, zone))
        self.putChild(b"readings", ReadingsPage(queries, page))
        self.putChild(b"series", SeriesPage(queries))
        self.putChild(b"openapi.json", OpenApiPage())

    def getChild(self, path, request):
        return JsonError(404, "no such path in the API; see /api/v1/openapi.json")

    def render(self, request):
        return error_body(request, 404, "no such path in the API; see /api/v1/openapi.json")


class Api(Resource):
    def __init__(self, queries: IReadingQueries, clock, zone, page: int = PAGE_READINGS):
        Resource.__init__(self)
        self.putChild(b"v1", Version1(queries, clock, zone, page))

    def getChild(self, path, request):
        return JsonError(404, "no such path in the API; see /api/v1/openapi.json")

    def render(self, request):
        return error_body(request, 404, "no such path in the API; see /api/v1/openapi.json")
