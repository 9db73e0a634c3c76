"""
The web API end to end: the real meter-cloud plugin holding real readings
(delivered by the real gateway from `meter loadgen`'s devices), asked over
HTTP on a free loopback port; schemathesis against its OpenAPI document; the
token beyond loopback.
"""

from __future__ import annotations

import base64
import datetime
import json
import socket
import time
import urllib.error
import urllib.request

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from meter.device.schedule import previous_day
from meter.tools.processes import WEB_ON, web_url
from meter.tools.suite import Suite, loadgen_summary

pytestmark = pytest.mark.e2e

DEVICES = 3
READINGS = 96


def get(url: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """
    A cloud holding yesterday's readings of devices 1 and 2, and device 3's
    of the day before (stale); its web URL, the suite and the days.
    """
    suite = Suite(tmp_path_factory.mktemp("api") / "suite", DEVICES, READINGS, deadline=1.0)
    try:
        cloud = suite.start_cloud()
        gateway = suite.start_gateway()
        gateway.wait_for("connected to the cloud")
        yesterday = previous_day(time.time())
        # The oldest day the gateway takes from a device sending now.
        old = yesterday - datetime.timedelta(days=1)
        assert loadgen_summary(suite.start_fleet(yesterday, "1-2"))["delivered"] == 2
        assert loadgen_summary(suite.start_fleet(old, "3"))["delivered"] == 1
        suite.wait_stored(DEVICES * READINGS, cloud)
        yield {"url": web_url(cloud), "suite": suite, "yesterday": yesterday, "old": old, "cloud": cloud}
    finally:
        suite.stop()


def test_the_fleet_over_http(fleet):
    status, headers, body = get(fleet["url"] + "/api/v1/devices")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Content-Security-Policy"].startswith("default-src 'self'")
    answer = json.loads(body)
    devices = {d["device_id"]: d for d in answer["devices"]}
    assert sorted(devices) == [1, 2, 3]
    assert devices[1]["readings"] == READINGS
    assert devices[1]["device_ip"] == fleet["suite"].fleet[1]
    assert devices[1]["first_reading"].startswith(fleet["yesterday"].isoformat())
    assert (devices[1]["stale"], devices[2]["stale"], devices[3]["stale"]) == (False, False, True)


def test_a_device_day_as_json_is_what_the_database_holds(fleet):
    suite, day = fleet["suite"], fleet["yesterday"]
    status, headers, body = get(f"{fleet['url']}/api/v1/readings?device=1&from={day}&to={day}")
    assert status == 200
    rows = [tuple(r.values()) for r in json.loads(body)["readings"]]
    assert rows == [row for row in suite.expected_rows(day, [1])]


def test_csv_and_senml_and_head_over_http(fleet):
    day = fleet["old"]
    status, headers, body = get(f"{fleet['url']}/api/v1/readings?device=3&format=csv")
    assert status == 200 and headers["Content-Type"] == "text/csv; charset=utf-8"
    lines = body.decode().splitlines()
    assert lines[0] == "device_id,device_ip,taken_at,temperature_c,humidity_pct"
    assert len(lines) == 1 + READINGS and lines[1].startswith(f"3,{fleet['suite'].fleet[3]},{day}T00:00,")
    status, headers, body = get(f"{fleet['url']}/api/v1/readings?device=3&format=senml&limit=1")
    assert status == 200
    assert json.loads(body)[0]["bn"] == f"urn:dev:ip:{fleet['suite'].fleet[3]}:"
    assert headers["Link"].endswith('; rel="next"')
    status, headers, body = get(f"{fleet['url']}/api/v1/devices", method="HEAD")
    assert status == 200 and body == b""


def test_a_series_and_refusals_over_http(fleet):
    status, _, body = get(f"{fleet['url']}/api/v1/series?device=2&points=12")
    assert status == 200
    series = json.loads(body)
    assert series["readings"] == READINGS and sum(series["count"]) == READINGS and len(series["t"]) <= 12
    status, _, body = get(f"{fleet['url']}/api/v1/readings?limit=-1")
    assert (status, json.loads(body)["parameter"]) == (400, "limit")
    status, _, body = get(f"{fleet['url']}/api/v1/readings?device=77")
    assert status == 404 and b"Traceback" not in body
    status, headers, _ = get(f"{fleet['url']}/api/v1/devices", method="DELETE")
    assert status == 405


# -- schemathesis: the API against its own OpenAPI document -----------------------


POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
#: Invalid requests only of the operations that take parameters.
OPERATIONS = [
    ("/api/v1/devices", POSITIVE), ("/api/v1/openapi.json", POSITIVE), ("/api/v1/readings", POSITIVE),
    ("/api/v1/readings", NEGATIVE), ("/api/v1/series", POSITIVE), ("/api/v1/series", NEGATIVE),
]


@pytest.mark.parametrize("path, mode", OPERATIONS, ids=[f"{path.rsplit('/', 1)[1]}-{mode.value}" for path, mode in OPERATIONS])
def test_the_api_keeps_to_its_openapi_document(fleet, path, mode):
    # Requests made from the document (valid ones, and invalid ones), each
    # answer checked by schemathesis: no 5xx, a status, content type,
    # headers and body the document describes, invalid data refused.  Not
    # that every request the document allows is accepted: a pattern cannot
    # say that 2026-02-30 is no date or that from must not be after to,
    # which are refused with 400, as the document says.
    schema = schemathesis.openapi.from_url(fleet["url"] + "/api/v1/openapi.json")
    operation = schema[path]["GET"]
    calls = []

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def keeps_to_it(case):
        calls.append(case.call_and_validate(base_url=fleet["url"], excluded_checks=[positive_data_acceptance]).status_code)

    keeps_to_it()
    # Every example was sent (an operation without parameters has one).
    assert len(calls) == (50 if "parameters" in schema.raw_schema["paths"][path]["get"] else 1)
    assert not [status for status in calls if status >= 500]


# -- the token beyond loopback -------------------------------------------------------


def test_the_web_beyond_loopback_without_a_token_refuses_to_start(make_suite):
    suite = make_suite(1)
    cloud = suite.start("cloud", "meter-cloud", "--web", "tcp:0:interface=0.0.0.0")
    assert cloud.wait(30) != 0
    refusals = cloud.all_matching(r"^meter-cloud: \[cloud\] web tcp:0:interface=0\.0\.0\.0 listens on every address, "
                                  r"beyond loopback, without a token")
    assert len(refusals) == 1, cloud.tail()
    assert "Traceback" not in "\n".join(cloud.lines)


def test_the_web_beyond_loopback_asks_for_the_token(make_suite, tmp_path):
    token = "correct-horse-battery-staple"
    path = tmp_path / "web-token"
    path.write_text(token + "\n")
    suite = make_suite(1, cloud={"web": "tcp:0:interface=0.0.0.0", "web_token_file": str(path)})
    cloud = suite.start_cloud()
    url = web_url(cloud).replace("0.0.0.0", "127.0.0.1")
    assert get(url + "/api/v1/devices")[0] == 401
    assert get(url + "/api/v1/devices", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert get(url + "/api/v1/devices", headers={"Authorization": f"Bearer {token}"})[0] == 200
    basic = base64.b64encode(f"me:{token}".encode()).decode()
    assert get(url + "/api/v1/devices", headers={"Authorization": f"Basic {basic}"})[0] == 200


def test_a_web_port_in_use_ends_the_start_in_one_line(make_suite):
    suite = make_suite(1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cloud = suite.start("cloud", "meter-cloud", "--web", f"tcp:{port}:interface=127.0.0.1")
        assert cloud.wait(30) != 0
    lines = cloud.all_matching(rf"meter-cloud: cannot serve the web API on 127\.0\.0\.1:{port}: .*--web or \[cloud\] web")
    assert len(lines) == 1, cloud.tail()
    assert "Traceback" not in "\n".join(cloud.lines)


def test_an_empty_web_endpoint_serves_nothing(make_suite):
    suite = make_suite(1)
    cloud = suite.start_cloud("--web", "")
    assert cloud.all_matching(r"metrics on http://")
    assert not cloud.all_matching(WEB_ON)
    assert not cloud.all_matching(r"meter-web-queries|Traceback")
