"""
The cloud's web API in-process: the resource tree of meter.cloud.web over the
in-memory store of meter.testing (proven equal to the SQLite queries by
tests/contracts/test_reading_queries.py), requests made with twisted.web's
DummyRequest and rendered through the real WebSite's rules.
"""

from __future__ import annotations

import base64
import csv
import datetime
import io
import json
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
from twisted.internet import defer, task
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from meter import wire
from meter.cloud.web import STATIC, WebSite, authorized, read_token, resource_tree
from meter.cloud.web.api import last_complete_day
from meter.cloud.web.site import CONTENT_SECURITY_POLICY, TokenError
from meter.testing import MemoryReadingStore

UTC = datetime.timezone.utc
#: The cloud's now in these tests: 2026-03-03 10:00 UTC.
NOW = datetime.datetime(2026, 3, 3, 10, 0, tzinfo=UTC).timestamp()


class Request(DummyRequest):
    """
    A DummyRequest that keeps the producer registered on it (DummyRequest
    drives only pull producers) and can play a client that stops reading:
    with C{full} set, each write pauses the producer, as a transport whose
    buffer filled does.
    """

    def __init__(self, path: str, args: dict, method: bytes = b"GET", headers: dict | None = None):
        DummyRequest.__init__(self, [segment.encode() for segment in path.split("/")[1:]])
        self.uri = path.encode()
        self.path = path.encode()
        self.method = method
        self.args = {name.encode(): [value.encode()] for name, value in args.items()}
        for name, value in (headers or {}).items():
            self.requestHeaders.setRawHeaders(name.encode(), [value.encode()])
        # As a real request starts.
        self.responseCode = 200
        self.producer = None
        self.streaming = None
        self.full = False
        self.lost = False
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        DummyRequest.write(self, data)
        self.writes.append(data)
        if self.full and self.producer is not None:
            self.producer.pauseProducing()

    def registerProducer(self, producer, streaming):
        self.producer, self.streaming = producer, streaming

    def unregisterProducer(self):
        self.producer = None

    def loseConnection(self):
        self.lost = True

    @property
    def body(self) -> bytes:
        return b"".join(self.written)

    def json(self):
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        value = self.responseHeaders.getRawHeaders(name.encode())
        return None if value is None else value[0].decode()


def columns(*records: str) -> wire.BatchColumns:
    return wire.BatchColumns.of(";".join(records))


def day_of(device_id: int, ip: str, date: str, every: int = 15) -> list[str]:
    return [
        f"{device_id},{ip},{date}T{m // 60:02d}:{m % 60:02d},{10 + m / 100:g},{50 + m % 7}"
        for m in range(0, 1440, every)
    ]


class Cloud:
    """
    The site over a memory store, its clock at L{NOW}, in UTC.
    """

    def __init__(self, static: Path = STATIC, token: bytes | None = None, queries=None, page: int = 1000):
        self.store = MemoryReadingStore()
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.site = WebSite(resource_tree(queries or self.store, static, self.clock, UTC, page), token)

    def add(self, *records: str) -> None:
        self.store.add(columns(*records), 1.0)

    def get(self, path: str, method: bytes = b"GET", headers: dict | None = None, request: Request | None = None,
            **args: str) -> Request:
        request = request or Request(path, args, method, headers)
        resource = self.site.getResourceFor(request)
        body = resource.render(request)
        if body is not NOT_DONE_YET:
            request.write(body)
            request.finish()
        return request


@pytest.fixture
def cloud() -> Cloud:
    cloud = Cloud()
    cloud.add(*day_of(1, "192.168.1.2", "2026-03-02"), *day_of(2, "192.168.1.3", "2026-03-01"))
    cloud.add("3,fd00::5,2026-02-27T12:00,-3.5,0")
    return cloud


# -- /api/v1/devices --------------------------------------------------------


def test_devices_lists_the_fleet_with_counts_and_stale_ones_marked(cloud):
    request = cloud.get("/api/v1/devices")
    assert request.responseCode == 200
    assert request.header("content-type") == "application/json"
    assert request.json() == {
        "last_complete_day": "2026-03-02",
        "devices": [
            {"device_id": 1, "device_ip": "192.168.1.2", "first_reading": "2026-03-02T00:00",
             "last_reading": "2026-03-02T23:45", "readings": 96, "stale": False},
            {"device_id": 2, "device_ip": "192.168.1.3", "first_reading": "2026-03-01T00:00",
             "last_reading": "2026-03-01T23:45", "readings": 96, "stale": True},
            {"device_id": 3, "device_ip": "fd00::5", "first_reading": "2026-02-27T12:00",
             "last_reading": "2026-02-27T12:00", "readings": 1, "stale": True},
        ],
    }


def test_the_last_complete_day_is_yesterday_in_the_clouds_zone():
    clock = task.Clock()
    # 2026-03-03 01:00 UTC is still 2026-03-02 in New York (UTC-5).
    clock.advance(datetime.datetime(2026, 3, 3, 1, 0, tzinfo=UTC).timestamp())
    assert last_complete_day(clock, UTC) == datetime.date(2026, 3, 2)
    assert last_complete_day(clock, datetime.timezone(datetime.timedelta(hours=-5))) == datetime.date(2026, 3, 1)
    clock.advance(23 * 3600)  # the next day in UTC
    assert last_complete_day(clock, UTC) == datetime.date(2026, 3, 3)


def test_a_device_turns_stale_as_the_clock_passes_a_day(cloud):
    stale = {d["device_id"]: d["stale"] for d in cloud.get("/api/v1/devices").json()["devices"]}
    assert stale[1] is False
    cloud.clock.advance(86400)
    stale = {d["device_id"]: d["stale"] for d in cloud.get("/api/v1/devices").json()["devices"]}
    assert stale[1] is True


def test_devices_of_an_empty_store():
    assert Cloud().get("/api/v1/devices").json() == {"last_complete_day": "2026-03-02", "devices": []}


# -- /api/v1/readings -------------------------------------------------------


def test_readings_of_a_device_day_as_json(cloud):
    request = cloud.get("/api/v1/readings", device="1", **{"from": "2026-03-02", "to": "2026-03-02"})
    assert request.responseCode == 200
    answer = request.json()
    assert answer["next"] is None
    assert len(answer["readings"]) == 96
    assert answer["readings"][1] == {
        "device_id": 1, "device_ip": "192.168.1.2", "taken_at": "2026-03-02T00:15", "temperature_c": 10.15,
        "humidity_pct": 51,
    }
    assert request.header("link") is None
    assert request.header("cache-control") == "no-store"


def test_readings_by_address_and_a_time_range(cloud):
    answer = cloud.get("/api/v1/readings", device="192.168.1.3", **{"from": "2026-03-01T06:00", "to": "2026-03-01T07:00"}).json()
    assert [r["taken_at"] for r in answer["readings"]] == ["2026-03-01T06:00", "2026-03-01T06:15", "2026-03-01T06:30", "2026-03-01T06:45"]
    assert cloud.get("/api/v1/readings", device="fd00:0::5").json()["readings"][0]["temperature_c"] == -3.5


def test_readings_as_csv_are_the_columns_of_meter_readings(cloud):
    request = cloud.get("/api/v1/readings", device="3", format="csv")
    assert request.header("content-type") == "text/csv; charset=utf-8"
    assert list(csv.reader(io.StringIO(request.body.decode()))) == [
        ["device_id", "device_ip", "taken_at", "temperature_c", "humidity_pct"],
        ["3", "fd00::5", "2026-02-27T12:00", "-3.5", "0"],
    ]


def test_readings_as_senml(cloud):
    request = cloud.get("/api/v1/readings", format="senml", after="2_2026-03-01T23:30")
    assert request.header("content-type") == "application/senml+json"
    records = request.json()
    # Device 2's last reading, then device 3's one.
    t2 = int((datetime.datetime(2026, 3, 1, 23, 45) - datetime.datetime(1970, 1, 1)).total_seconds())
    t3 = int((datetime.datetime(2026, 2, 27, 12, 0) - datetime.datetime(1970, 1, 1)).total_seconds())
    assert records == [
        {"bn": "urn:dev:ip:192.168.1.3:", "n": "temperature", "u": "Cel", "v": 24.25, "t": t2},
        {"n": "humidity", "u": "%RH", "v": 54, "t": t2},
        {"bn": "urn:dev:ip:fd00::5:", "n": "temperature", "u": "Cel", "v": -3.5, "t": t3},
        {"n": "humidity", "u": "%RH", "v": 0, "t": t3},
    ]


@pytest.mark.parametrize("format", ["json", "csv", "senml"])
def test_following_the_next_link_gives_every_reading_once(cloud, format):
    every = cloud.get("/api/v1/readings", limit="1000").json()["readings"]
    assert len(every) == 193
    seen: list = []
    args = {"limit": "50", "format": format}
    for _ in range(10):
        request = cloud.get("/api/v1/readings", **args)
        seen.append(request.body)
        link = request.header("link")
        if link is None:
            break
        target, rel = link.split(";")
        assert rel.strip() == 'rel="next"'
        url = urlsplit(target.strip()[1:-1])
        assert url.path == "/api/v1/readings"
        args = dict(parse_qsl(url.query))
        assert args["limit"] == "50" and args["format"] == format
    assert len(seen) == 4
    if format == "json":
        pages = [json.loads(body) for body in seen]
        assert [row for page in pages for row in page["readings"]] == every
        assert [page["next"] for page in pages[:-1]] == [
            dict(parse_qsl(urlsplit(cloud.get("/api/v1/readings", limit=str(n)).header("link").split(";")[0][1:-1]).query))["after"]
            for n in (50, 100, 150)
        ]
        assert pages[-1]["next"] is None
    elif format == "csv":
        rows = [line for body in seen for line in body.decode().splitlines() if not line.startswith("device_id")]
        assert len(rows) == 193 and len(set(rows)) == 193


def test_the_cursor_names_the_last_reading_of_the_page(cloud):
    request = cloud.get("/api/v1/readings", limit="2")
    assert request.json()["next"] == "1_2026-03-02T00:15"


def test_a_cursor_for_another_query_just_positions(cloud):
    answer = cloud.get("/api/v1/readings", device="1", after="1_2026-03-02T23:30").json()
    assert [r["taken_at"] for r in answer["readings"]] == ["2026-03-02T23:45"]


def test_an_empty_answer_is_well_formed_in_every_format(cloud):
    args = {"device": "1", "from": "2030-01-01"}
    assert cloud.get("/api/v1/readings", **args).json() == {"readings": [], "next": None}
    assert cloud.get("/api/v1/readings", format="senml", **args).json() == []
    assert cloud.get("/api/v1/readings", format="csv", **args).body == b"device_id,device_ip,taken_at,temperature_c,humidity_pct\n"


# -- every bad form of every parameter ----------------------------------------

BAD = [
    ("/api/v1/readings", {"from": "yesterday"}, "from"),
    ("/api/v1/readings", {"from": "2026-13-01"}, "from"),
    ("/api/v1/readings", {"from": "2026-03-01T25:00"}, "from"),
    ("/api/v1/readings", {"from": "2026-03-01T08:00Z"}, "from"),
    ("/api/v1/readings", {"from": "2026-03-01T08:00+01:00"}, "from"),
    ("/api/v1/readings", {"from": ""}, "from"),
    ("/api/v1/readings", {"to": "03/01/2026"}, "to"),
    ("/api/v1/readings", {"to": "9999-12-31"}, "to"),
    ("/api/v1/readings", {"from": "2026-03-02", "to": "2026-03-01"}, "from"),
    ("/api/v1/readings", {"from": "2026-03-01T08:01", "to": "2026-03-01T08:00"}, "from"),
    ("/api/v1/readings", {"limit": "-1"}, "limit"),
    ("/api/v1/readings", {"limit": "0"}, "limit"),
    ("/api/v1/readings", {"limit": "1000001"}, "limit"),
    ("/api/v1/readings", {"limit": "99999999999999999999"}, "limit"),
    ("/api/v1/readings", {"limit": "ten"}, "limit"),
    ("/api/v1/readings", {"limit": "1.5"}, "limit"),
    ("/api/v1/readings", {"limit": "١٠"}, "limit"),
    ("/api/v1/readings", {"limit": ""}, "limit"),
    ("/api/v1/readings", {"after": "garbage"}, "after"),
    ("/api/v1/readings", {"after": "0_2026-03-01T08:00"}, "after"),
    ("/api/v1/readings", {"after": "1_2026-02-30T08:00"}, "after"),
    ("/api/v1/readings", {"after": "99999999999_2026-03-01T08:00"}, "after"),
    ("/api/v1/readings", {"after": "2026-03-01T08:00"}, "after"),
    ("/api/v1/readings", {"after": "2026-03-01T08:00_1"}, "after"),
    ("/api/v1/readings", {"format": "xml"}, "format"),
    ("/api/v1/readings", {"format": "JSON"}, "format"),
    ("/api/v1/readings", {"device": "0"}, "device"),
    ("/api/v1/readings", {"device": "99999999999"}, "device"),
    ("/api/v1/readings", {"device": "192.168.1.300"}, "device"),
    ("/api/v1/readings", {"device": "fe80::1%eth0"}, "device"),
    ("/api/v1/readings", {"device": "<script>"}, "device"),
    ("/api/v1/readings", {"form": "csv"}, "form"),
    ("/api/v1/devices", {"stale": "true"}, "stale"),
    ("/api/v1/series", {}, "device"),
    ("/api/v1/series", {"device": "x"}, "device"),
    ("/api/v1/series", {"device": "1", "points": "0"}, "points"),
    ("/api/v1/series", {"device": "1", "points": "5001"}, "points"),
    ("/api/v1/series", {"device": "1", "points": "-5"}, "points"),
    ("/api/v1/series", {"device": "1", "points": "many"}, "points"),
    ("/api/v1/series", {"device": "1", "from": "2026-03-02", "to": "2026-03-01"}, "from"),
    ("/api/v1/series", {"device": "1", "from": "noon"}, "from"),
    ("/api/v1/series", {"device": "1", "limit": "5"}, "limit"),
]


@pytest.mark.parametrize("path, args, parameter", BAD, ids=[f"{p.rsplit('/', 1)[1]}-{a}" for p, a, _ in BAD])
def test_a_bad_parameter_is_400_naming_it(cloud, path, args, parameter):
    request = cloud.get(path, **args)
    assert request.responseCode == 400
    body = request.json()
    assert body["parameter"] == parameter
    assert isinstance(body["error"], str) and body["error"]
    assert request.header("content-type") == "application/json"


def test_a_parameter_given_twice_is_400(cloud):
    request = Request("/api/v1/readings", {})
    request.args = {b"limit": [b"1", b"2"]}
    assert cloud.get("/api/v1/readings", request=request).json()["parameter"] == "limit"


def test_a_parameter_name_not_utf8_is_400(cloud):
    request = Request("/api/v1/readings", {})
    request.args = {b"\xff": [b"1"]}
    answer = cloud.get("/api/v1/readings", request=request)
    assert answer.responseCode == 400 and "error" in answer.json()


@pytest.mark.parametrize("path, device", [
    ("/api/v1/readings", "9"), ("/api/v1/readings", "10.9.9.9"), ("/api/v1/series", "9"), ("/api/v1/series", "fd00::9"),
])
def test_an_unknown_device_is_404(cloud, path, device):
    request = cloud.get(path, device=device)
    assert request.responseCode == 404
    assert request.json()["parameter"] == "device"


@pytest.mark.parametrize("path", ["/api", "/api/", "/api/v2/devices", "/api/v1", "/api/v1/", "/api/v1/nothing",
                                  "/api/v1/devices/1", "/api/v1/readings/x/y"])
def test_an_unknown_path_under_api_is_404_json(cloud, path):
    request = cloud.get(path)
    assert request.responseCode == 404
    assert "error" in request.json()


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"TRACE"])
def test_only_get_and_head_are_served(cloud, method):
    request = cloud.get("/api/v1/devices", method=method)
    assert request.responseCode == 405
    assert request.header("allow") == "GET, HEAD"
    assert "error" in request.json()


# -- failures -----------------------------------------------------------------


class FailingQueries:
    """
    The memory store's queries, every one failing after C{good} pages.
    """

    def __init__(self, store: MemoryReadingStore, good: int = 0):
        self._store = store
        self._good = good

    def __getattr__(self, name):
        method = getattr(self._store, name)

        def failing(*args):
            if name == "page" and self._good:
                self._good -= 1
                return method(*args)
            return defer.fail(OSError("disk I/O error"))

        return failing


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest.mark.parametrize("path, args", [
    ("/api/v1/devices", {}), ("/api/v1/readings", {}), ("/api/v1/readings", {"device": "1"}),
    ("/api/v1/series", {"device": "1"}),
])
def test_a_failed_query_is_503_json_logged_once(path, args, logged):
    cloud = Cloud()
    cloud.site = WebSite(resource_tree(FailingQueries(cloud.store), STATIC, cloud.clock, UTC))
    request = cloud.get(path, **args)
    assert request.responseCode == 503
    assert "OSError" in request.json()["error"]
    assert b"Traceback" not in request.body
    failures = [e for e in logged if e.get("log_level") == LogLevel.critical and "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["log_failure"].getErrorMessage() == "disk I/O error"


def test_a_query_failing_mid_stream_closes_the_connection_before_the_end(logged):
    cloud = Cloud(page=10)
    cloud.add(*day_of(1, "192.168.1.2", "2026-03-02"))
    # Only the pages fail, after two.
    failing = FailingQueries(cloud.store, good=2)
    failing.next_cursor = cloud.store.next_cursor
    failing.device = cloud.store.device
    cloud.site = WebSite(resource_tree(failing, STATIC, cloud.clock, UTC, 10))
    request = cloud.get("/api/v1/readings", device="1")
    assert request.responseCode == 200
    assert request.lost
    assert not request.finished
    assert request.body.count(b"taken_at") == 20
    assert not request.body.endswith(b"}\n")
    assert len([e for e in logged if "log_failure" in e]) == 1


# -- streaming ------------------------------------------------------------------


def test_a_long_answer_is_written_page_by_page_as_a_push_producer():
    cloud = Cloud(page=10)
    cloud.add(*day_of(1, "192.168.1.2", "2026-03-02"))
    request = cloud.get("/api/v1/readings")
    assert request.streaming is True
    assert request.finished
    assert request.producer is None  # unregistered at the end
    # The head, ten pages of at most ten readings each, the tail.
    row_writes = [w for w in request.writes if b"taken_at" in w]
    assert len(row_writes) == 10
    assert max(w.count(b"taken_at") for w in row_writes) == 10
    assert len(request.json()["readings"]) == 96


def test_a_paused_stream_reads_no_further_page_until_resumed():
    cloud = Cloud(page=10)
    cloud.add(*day_of(1, "192.168.1.2", "2026-03-02"))
    request = Request("/api/v1/readings", {})
    request.full = True
    cloud.get("/api/v1/readings", request=request)
    stream = request.producer
    # The head and one page, then the client's buffer was full.
    assert request.body.count(b"taken_at") == 10
    assert stream.pages == 1
    for expected in range(2, 11):
        stream.resumeProducing()
        assert stream.pages == expected
        assert request.body.count(b"taken_at") == min(96, expected * 10)
    assert request.finished
    assert len(request.json()["readings"]) == 96


def test_a_client_gone_stops_the_stream():
    cloud = Cloud(page=10)
    cloud.add(*day_of(1, "192.168.1.2", "2026-03-02"))
    request = Request("/api/v1/readings", {})
    request.full = True
    cloud.get("/api/v1/readings", request=request)
    stream = request.producer
    stream.stopProducing()
    stream.resumeProducing()
    assert stream.pages == 1
    assert not request.finished


# -- /api/v1/series ---------------------------------------------------------------


def test_a_series_of_a_day_is_one_point_a_reading(cloud):
    answer = cloud.get("/api/v1/series", device="1").json()
    assert answer["from"] == "2026-03-02T00:00" and answer["to"] == "2026-03-02T23:46"
    assert answer["readings"] == 96 and answer["bucket_seconds"] is None
    assert len(answer["time"]) == len(answer["t"]) == len(answer["count"]) == 96
    assert answer["time"][1] == "2026-03-02T00:15"
    assert answer["t"][1] - answer["t"][0] == 900
    assert answer["temperature_c"]["min"][1] == answer["temperature_c"]["max"][1] == 10.15


def test_a_series_beyond_its_points_is_downsampled(cloud):
    answer = cloud.get("/api/v1/series", device="1", points="24", **{"from": "2026-03-02", "to": "2026-03-02"}).json()
    assert answer["bucket_seconds"] == 3600
    assert answer["count"] == [4] * 24
    assert answer["time"][:2] == ["2026-03-02T00:00", "2026-03-02T01:00"]
    assert answer["temperature_c"]["min"][1] == 10.6
    assert answer["temperature_c"]["max"][1] == 11.05
    assert answer["temperature_c"]["mean"][1] == pytest.approx((10.6 + 10.75 + 10.9 + 11.05) / 4)
    assert answer["device_id"] == 1 and answer["device_ip"] is None


def test_a_series_by_address(cloud):
    answer = cloud.get("/api/v1/series", device="192.168.1.3", points="2").json()
    assert answer["device_ip"] == "192.168.1.3" and answer["device_id"] is None
    assert sum(answer["count"]) == 96


# -- the OpenAPI document ---------------------------------------------------------


def test_the_openapi_document_is_served_as_it_is(cloud):
    request = cloud.get("/api/v1/openapi.json")
    assert request.responseCode == 200
    document = request.json()
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {"/api/v1/devices", "/api/v1/readings", "/api/v1/series", "/api/v1/openapi.json"}
    assert request.body == (Path(STATIC).parent / "openapi.json").read_bytes()


# -- the site's rules: headers, token, static files ----------------------------------


@pytest.mark.parametrize("path, args, method", [
    ("/api/v1/devices", {}, b"GET"), ("/api/v1/readings", {"limit": "x"}, b"GET"), ("/api/nothing", {}, b"GET"),
    ("/api/v1/devices", {}, b"POST"), ("/", {}, b"GET"), ("/static/nothing.js", {}, b"GET"), ("/elsewhere", {}, b"GET"),
])
def test_every_answer_carries_the_security_headers(cloud, path, args, method):
    request = cloud.get(path, method=method, **args)
    assert request.header("content-security-policy") == CONTENT_SECURITY_POLICY.decode()
    assert request.header("x-content-type-options") == "nosniff"
    assert request.header("referrer-policy") == "no-referrer"


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


TOKEN = "s3cret-token-of-24-chars"


@pytest.mark.parametrize("headers, code", [
    ({}, 401),
    (bearer("wrong-token-of-24-chars!"), 401),
    (bearer(TOKEN[:-1]), 401),
    (bearer(TOKEN), 200),
    ({"Authorization": f"bearer {TOKEN}"}, 200),
    (basic("anyone", TOKEN), 200),
    (basic(TOKEN, "nothing"), 401),
    ({"Authorization": "Basic !!!"}, 401),
    ({"Authorization": f"Token {TOKEN}"}, 401),
])
def test_a_token_when_configured_is_required_of_every_request(headers, code):
    cloud = Cloud(token=TOKEN.encode())
    for path in ("/api/v1/devices", "/api/v1/nothing", "/"):
        request = cloud.get(path, headers=headers)
        if code == 401:
            assert request.responseCode == 401, path
            assert "Bearer" in request.header("www-authenticate") and "Basic" in request.header("www-authenticate")
            assert "error" in request.json()
        else:
            assert request.responseCode != 401, path


def test_authorized_compares_the_token_only():
    assert authorized(b"Bearer abc", b"abc")
    assert not authorized(None, b"abc")
    assert not authorized(b"", b"abc")
    assert not authorized(b"Basic " + base64.b64encode(b"abc"), b"abc")  # no colon: no password


def test_a_token_file_too_short_or_missing_is_refused(tmp_path):
    short = tmp_path / "token"
    short.write_text("short\n")
    with pytest.raises(TokenError, match="under 16 characters"):
        read_token(short)
    with pytest.raises(TokenError, match="cannot read the web token file"):
        read_token(tmp_path / "missing")
    short.write_text(TOKEN + "\n")
    assert read_token(short) == TOKEN.encode()


@pytest.fixture
def static(tmp_path) -> Path:
    folder = tmp_path / "static"
    (folder / "vendor").mkdir(parents=True)
    (folder / "index.html").write_text("<!doctype html><title>meter</title>")
    (folder / "app.js").write_text("'use strict';")
    (folder / "vendor" / "uPlot.min.js").write_text("/* uPlot */")
    return folder


def test_the_root_serves_the_dashboard_page_and_static_its_files(static):
    cloud = Cloud(static)
    # static.File renders through the real request machinery: compare the
    # resources found.
    request = Request("/", {})
    resource = cloud.site.getResourceFor(request)
    assert Path(resource.path) == static / "index.html"
    request = Request("/static/vendor/uPlot.min.js", {})
    assert Path(cloud.site.getResourceFor(request).path) == static / "vendor" / "uPlot.min.js"


def test_a_static_folder_is_never_listed(static):
    cloud = Cloud(static)
    request = cloud.get("/static/vendor/")
    assert request.responseCode == 404
    assert b"uPlot" not in request.body


def test_no_static_path_leaves_the_folder(static):
    cloud = Cloud(static)
    (static.parent / "secret.txt").write_text("secret")
    request = Request("/static/../secret.txt", {})
    resource = cloud.site.getResourceFor(request)
    assert not str(getattr(resource, "path", "")).endswith("secret.txt")


def test_a_client_gone_while_its_query_runs_gets_no_stream():
    cloud = Cloud()
    cloud.add(*day_of(1, "192.168.1.2", "2026-03-02"))
    waiting = defer.Deferred()
    store = cloud.store

    class SlowQueries:
        def __getattr__(self, name):
            return getattr(store, name)

        def next_cursor(self, query, limit):
            return waiting

    cloud.site = WebSite(resource_tree(SlowQueries(), STATIC, cloud.clock, UTC))
    request = cloud.get("/api/v1/readings")
    request.processingFailed(Exception("connection lost"))
    waiting.callback(None)
    assert request.producer is None
    assert request.writes == []


def test_a_client_gone_mid_stream_stops_it():
    cloud = Cloud(page=10)
    cloud.add(*day_of(1, "192.168.1.2", "2026-03-02"))
    request = Request("/api/v1/readings", {})
    request.full = True
    cloud.get("/api/v1/readings", request=request)
    stream = request.producer
    request.processingFailed(Exception("connection lost"))
    stream.resumeProducing()
    assert stream.pages == 1


# -- over twisted.web's real request and channel --------------------------------------


def over_http(site: WebSite, raw: bytes) -> bytes:
    """
    C{raw} request bytes through a real HTTPChannel of C{site} on a
    StringTransport; what it answered.
    """
    from twisted.internet.testing import StringTransport

    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    return transport.value()


def test_a_fault_of_the_code_is_a_json_500_without_a_traceback(logged):
    from twisted.web.resource import Resource

    class Broken(Resource):
        isLeaf = True

        def render_GET(self, request):
            raise ZeroDivisionError("a bug")

    root = Resource()
    root.putChild(b"broken", Broken())
    answer = over_http(WebSite(root), b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 ")
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body) == {"error": "internal error; see the cloud's log"}
    assert b"ZeroDivisionError" not in answer and b"Traceback" not in answer
    assert len([e for e in logged if "log_failure" in e]) == 1


def test_head_and_a_stream_over_the_real_channel(cloud):
    answer = over_http(cloud.site, b"HEAD /api/v1/readings?device=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body == b""
    answer = over_http(cloud.site, b"GET /api/v1/readings?device=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert body.endswith(b"0\r\n\r\n")
    assert body.count(b'"taken_at"') == 96
