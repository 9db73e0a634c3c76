"""
Nothing lost, nothing doubled, with the cloud on PostgreSQL: the real
cloud and gateway (twistd plugins) and a real server (the session's
throwaway cluster, tests/conftest.py), the server restarted in the middle
of forwarding and not up when the cloud starts.  Each test then compares
the database's rows EXACTLY with the devices' days: every acknowledged
reading stored once; and no daemon restarted to get there.
"""

from __future__ import annotations

import sqlite3
import time
import urllib.error
import urllib.request

import pytest

from meter.device import previous_day
from meter.postgres import PostgresLocation
from meter.tools.processes import CONSOLE_LINE, monitoring_url
from meter.tools.suite import loadgen_summary

pytestmark = pytest.mark.e2e

#: Yesterday, as a device sends (see tests/test_faults.py).
DAY = previous_day(time.time())


def expected_console(rows) -> list[str]:
    return sorted(
        f"{address} - {at[-5:]} - {temperature:g} - {humidity:g}%" for _, address, at, temperature, humidity in rows
    )


def stop_drained(suite, gateway) -> None:
    """
    Stop the gateway once its spool is empty: every batch acknowledged.
    """
    while True:
        gateway.wait_for(r"readings delivered; 0 left in the spool", 30)
        with sqlite3.connect(suite.spool) as spool:
            (held,) = spool.execute("SELECT count(*) FROM chunks").fetchone()
        if not held:
            break
    gateway.stop()


def readyz(cloud) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(monitoring_url(cloud) + "/readyz", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def printed(cloud) -> list[str]:
    """
    The console lines of a stopped cloud.
    """
    return [m.group(0) for m in cloud.all_matching(CONSOLE_LINE)]


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgresql_restarted_in_the_middle_of_forwarding(make_suite, postgres_cluster, postgres_database, mode):
    """
    The server restarted (C{pg_ctl restart -m fast}: sessions ended; C{-m
    immediate}: the server killed, recovering at start) while the gateway
    forwards a day in many batches: the batches in flight are refused, the
    cloud reconnects by itself, and the gateway sends them again.
    """
    # A device's day is one chunk, and a batch holds whole chunks: a batch
    # a device, a hundred batches.
    # With a password (the test cluster trusts any), which no line repeats.
    uri = postgres_database.replace("postgres@", "postgres:s3cret-word@")
    suite = make_suite(100, 48, batch_readings=48, stats_interval=1.0, postgres=uri)
    cloud = suite.start_cloud()
    cloud.wait_for("connected to the database at")
    gateway = suite.start_gateway(connected=True)
    summary = loadgen_summary(suite.start_fleet(DAY, "1-100"))
    assert summary["delivered"] == 100, summary
    cloud.collect(r"readings committed", 5, timeout=30)
    postgres_cluster.restart(mode)
    cloud.wait_for(r"lost the connection to the database at \S+: .*; retrying in", 20)
    cloud.wait_for("connected to the database at .* again after", 30)
    suite.wait_stored(100 * 48, cloud)
    assert suite.stored() == suite.expected_rows(DAY)
    stop_drained(suite, gateway)
    cloud.stop()
    # A batch committed just as the server went down may be refused, sent
    # again and found stored: printed at most once, never twice.
    lines = printed(cloud)
    assert len(lines) == len(set(lines)) and set(lines) <= set(expected_console(suite.expected_rows(DAY)))
    assert len(cloud.all_matching(r"Traceback")) == 0
    assert not cloud.all_matching("s3cret-word") and not gateway.all_matching("s3cret-word")


def test_postgresql_down_when_the_cloud_starts(make_suite, postgres_cluster, postgres_database):
    """
    The database cannot be reached when the cloud starts: the cloud starts
    anyway, says why in its log once and in /readyz, refuses the batches
    with a store: refusal (the gateway keeps them), and stores them all once
    the server is up, with nothing restarted.
    """
    postgres_cluster.stop()
    suite = make_suite(10, 48, batch_readings=48, postgres=postgres_database)
    cloud = suite.start_cloud()
    cause = cloud.wait_for(r"cannot reach the database at (\S+): (.*); retrying in [\d.]+ s", 20)
    assert cause.group(1) == PostgresLocation(postgres_database).where
    status, why = readyz(cloud)
    assert status == 503 and why.startswith("store unreachable: "), (status, why)
    gateway = suite.start_gateway(connected=True)
    summary = loadgen_summary(suite.start_fleet(DAY, "1-10"))
    assert summary["delivered"] == 10, summary
    gateway.wait_for(r"store: not stored: cannot reach the database", 30)
    postgres_cluster.start()
    cloud.wait_for("connected to the database at .* again after", 30)
    suite.wait_stored(10 * 48, cloud)
    assert suite.stored() == suite.expected_rows(DAY)
    assert readyz(cloud)[0] == 200
    stop_drained(suite, gateway)
    cloud.stop()
    # Every reading was new when stored, and printed once.
    assert sorted(printed(cloud)) == expected_console(suite.expected_rows(DAY))
    # The cause said once, not once an attempt.
    assert len(cloud.all_matching(r"ConnectionRunner.* cannot reach the database at \S+: .*; retrying in")) == 1
    assert len(cloud.all_matching(r"Traceback")) == 0
