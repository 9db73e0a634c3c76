"""
The web API of the real meter-cloud plugin over PostgreSQL: readings the
real gateway delivered, read back over HTTP from the database the cloud
stores into, and, with [cloud] read_db, from another database (as from a
read replica): the API reads there, ingest stays on db.
"""

from __future__ import annotations

import datetime
import json
import time
import urllib.error
import urllib.request

import psycopg
import pytest

from meter.cloud import postgres
from meter.device.schedule import previous_day
from meter.tools.processes import web_url
from meter.tools.suite import Suite, loadgen_summary

pytestmark = pytest.mark.e2e

DEVICES = 2
READINGS = 96


def get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_the_api_reads_the_postgresql_database_the_cloud_stores_into(tmp_path, postgres_database):
    suite = Suite(tmp_path / "suite", DEVICES, READINGS, deadline=1.0, postgres=postgres_database)
    try:
        cloud = suite.start_cloud()
        gateway = suite.start_gateway()
        gateway.wait_for("connected to the cloud")
        yesterday = previous_day(time.time())
        assert loadgen_summary(suite.start_fleet(yesterday, f"1-{DEVICES}"))["delivered"] == DEVICES
        suite.wait_stored(DEVICES * READINGS, cloud)
        url = web_url(cloud)
        status, _, body = get(f"{url}/api/v1/devices")
        assert status == 200, body
        devices = json.loads(body)["devices"]
        assert [(d["device_id"], d["readings"]) for d in devices] == [(1, READINGS), (2, READINGS)]
        # Device 2's day: the readings as stored, in order.
        status, _, body = get(f"{url}/api/v1/readings?device=2&from={yesterday.isoformat()}&format=csv")
        assert status == 200, body
        lines = body.decode().splitlines()
        stored = [row for row in suite.stored() if row[0] == 2]
        assert len(lines) == 1 + READINGS
        assert [line.split(",")[2] for line in lines[1:]] == [row[2] for row in stored]
        status, _, body = get(f"{url}/api/v1/series?device=1&from={yesterday.isoformat()}&points=10")
        assert status == 200, body
        series = json.loads(body)
        assert series["readings"] == READINGS and series["bucket_seconds"] is not None
        assert sum(series["count"]) == READINGS and len(series["count"]) <= 10
        # Pages by the cursor: the whole fleet's readings 50 at a time.
        seen, link, pages = [], "/api/v1/readings?limit=50&format=csv", 0
        while link and pages < 10:
            status, headers, body = get(url + link)
            assert status == 200, body
            seen.extend(body.decode().splitlines()[1:])
            link = headers.get("Link", "").partition("<")[2].partition(">")[0]
            pages += 1
        assert [tuple(line.split(",")[:3]) for line in seen] == [(str(r[0]), r[1], r[2]) for r in suite.stored()]
    finally:
        suite.stop()


def test_the_api_reads_read_db_and_ingest_writes_db(tmp_path, postgres_database, postgres_cluster):
    # The "replica": another database, holding one reading of device 9
    # that db never receives.
    postgres_database_count = postgres_database.rsplit("/", 1)[1].split("?")[0]
    replica = postgres_cluster.create_database(f"{postgres_database_count}_replica")
    with psycopg.connect(replica, autocommit=True) as connection:
        postgres.upgrade(connection)
        postgres.ensure_partitions(connection, [datetime.date(2026, 3, 1)], set())
        connection.execute("INSERT INTO readings VALUES (9, '10.9.9.9', '2026-03-01T08:00', 20.5, 40, 1.0)")
        connection.execute("INSERT INTO devices VALUES (9, '10.9.9.9', '2026-03-01T08:00', '2026-03-01T08:00', 1)")
        connection.execute("INSERT INTO device_addresses VALUES ('10.9.9.9', 9)")
    suite = Suite(tmp_path / "suite", 1, READINGS, deadline=1.0, postgres=postgres_database, cloud={"read_db": replica})
    try:
        cloud = suite.start_cloud()
        gateway = suite.start_gateway()
        gateway.wait_for("connected to the cloud")
        assert loadgen_summary(suite.start_fleet(previous_day(time.time()), "1"))["delivered"] == 1
        suite.wait_stored(READINGS, cloud)
        url = web_url(cloud)
        status, _, body = get(f"{url}/api/v1/devices")
        assert status == 200, body
        assert [(d["device_id"], d["readings"]) for d in json.loads(body)["devices"]] == [(9, 1)]
        status, _, body = get(f"{url}/api/v1/readings?device=9&from=2026-03-01&to=2026-03-02&format=csv")
        assert body.decode().splitlines()[1].startswith("9,10.9.9.9,2026-03-01T08:00,20.5,40")
        assert cloud.all_matching("the web API reads postgresql")
    finally:
        suite.stop()
