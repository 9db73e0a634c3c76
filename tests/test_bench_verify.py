"""
bench/run.py's check of a fleet run's database: every device-day stored
exactly once, told device-day by device-day; its reading of the machine's speed.
"""

from __future__ import annotations

import datetime
import importlib.util
import re
import sqlite3
from pathlib import Path

import pytest

from meter import config
from meter.cloud.sqlite import SCHEMA
from meter.tools.loadgen import synthetic_day

DAY = datetime.date(2026, 3, 1)
FLEET = {device_id: f"10.0.0.{device_id}" for device_id in range(1, 13)}


def _bench_module(name: str):
    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _bench_module("run")


def _database(path: Path, schema: str = SCHEMA, readings: int = 96) -> sqlite3.Connection:
    connection = sqlite3.connect(path)
    connection.executescript(schema)
    rows = [(r.device_id, r.device_ip, r.taken_at.isoformat(timespec="minutes"), r.temperature_c, r.humidity_pct, 0.0)
            for device_id, ip in FLEET.items() for r in synthetic_day(device_id, ip, DAY, readings, seed=3)]
    connection.executemany("INSERT INTO readings (device_id, device_ip, taken_at, temperature_c, humidity_pct, stored_at) "
                           "VALUES (?, ?, ?, ?, ?, ?)", rows)
    connection.commit()
    return connection


@pytest.mark.parametrize("readings", [96, 1440])
def test_every_day_stored_once_is_exact(bench, tmp_path, readings):
    _database(tmp_path / "cloud.sqlite", readings=readings).close()
    check = bench.verify_cloud(tmp_path / "cloud.sqlite", FLEET, list(FLEET), DAY, readings, 3)
    assert check["exact"] and check["lost"] == check["wrong_values"] == check["unexpected"] == 0
    assert check["device_days"]["exactly_once"] == len(FLEET)


def test_lost_wrong_unexpected_and_missing_days_are_told_by_device(bench, tmp_path):
    connection = _database(tmp_path / "cloud.sqlite")
    connection.execute("DELETE FROM readings WHERE device_id = 2 AND taken_at LIKE '%T01:%'")
    connection.execute("UPDATE readings SET temperature_c = temperature_c + 0.1 WHERE device_id = 4 AND taken_at LIKE '%T02:00'")
    # The same sum of temperatures, two wrong values: the fingerprint still tells.
    connection.execute("UPDATE readings SET humidity_pct = humidity_pct + 0.1 WHERE device_id = 5 AND taken_at LIKE '%T03:00'")
    connection.execute("UPDATE readings SET humidity_pct = humidity_pct - 0.1 WHERE device_id = 5 AND taken_at LIKE '%T04:00'")
    connection.execute("UPDATE readings SET device_ip = '10.9.9.9' WHERE device_id = 6 AND taken_at LIKE '%T05:00'")
    connection.execute("DELETE FROM readings WHERE device_id = 7")
    connection.execute("INSERT INTO readings VALUES (8, '10.0.0.8', '2026-03-02T00:00', 1.0, 2.0, 0)")
    connection.execute("INSERT INTO readings VALUES (99, '10.0.0.99', '2026-03-01T00:00', 1.0, 2.0, 0)")
    connection.commit()
    connection.close()
    check = bench.verify_cloud(tmp_path / "cloud.sqlite", FLEET, list(FLEET), DAY, 96, 3)
    assert not check["exact"]
    assert check["lost"] == 4 + 96 and check["wrong_values"] == 1 + 2 + 1 and check["unexpected"] == 2
    days = check["device_days"]
    assert days["first"] == {"lost": [2], "wrong": [4, 5, 6], "missing": [7], "unexpected": [8, 99]}
    assert days["exactly_once"] == len(FLEET) - 6


def test_a_doubled_day_is_told(bench, tmp_path):
    # The cloud's key makes a doubled row impossible; a table without it
    # shows the check would see one.
    schema = re.sub(r",(\s*--[^\n]*)?\n\s*PRIMARY KEY \(device_id, taken_at\)\n\) WITHOUT ROWID", "\n)", SCHEMA)
    assert "PRIMARY KEY" not in schema.split("CREATE INDEX")[0]
    connection = _database(tmp_path / "cloud.sqlite", schema)
    connection.execute("INSERT INTO readings SELECT * FROM readings WHERE device_id = 3 AND taken_at LIKE '%T06:%'")
    connection.commit()
    connection.close()
    check = bench.verify_cloud(tmp_path / "cloud.sqlite", FLEET, list(FLEET), DAY, 96, 3)
    assert check["doubled_rows"] == 4 and check["device_days"]["first"] == {"doubled": [3]}
    assert check["device_days"]["exactly_once"] == len(FLEET) - 1 and not check["exact"]


def test_the_machine_speed_is_a_best_and_a_median_of_cpu_time_a_step(bench):
    speed = bench.python_speed(runs=3, steps=2000)
    assert 0 < speed["best_ns"] <= speed["median_ns"]


def test_a_round_forwarding_fleet_has_spool_room_for_its_whole_day(bench):
    def gateway(settings):
        return config.from_raw({"gateway": settings}, "test").gateway

    default = config.SCHEMA["gateway"]["spool_limit"][1]
    # Round forwarding holds the whole day until its round closes.
    assert gateway(bench.fleet_gateway_settings("round", 9_600_000)) == {
        **gateway({}), "forward": "round", "spool_limit": 12_000_000}
    # A small fleet keeps the default limit; device forwarding keeps it whatever the fleet.
    assert gateway(bench.fleet_gateway_settings("round", 96_000))["spool_limit"] == default
    assert gateway(bench.fleet_gateway_settings("device", 9_600_000))["spool_limit"] == default


@pytest.mark.parametrize("order", ["arrival", "round", "device"])
def test_the_cloud_store_bench_stores_each_devices_day_whole_on_the_day_asked(order):
    cloud_store = _bench_module("cloud_store")
    day = datetime.date(2026, 12, 3)
    batches = cloud_store.day_batches(60, 500, 1, order, day)
    pairs = [(device, stamp) for columns in batches for device, stamp in zip(columns.devices, columns.stamps)]
    assert len(pairs) == len(set(pairs)) == 60 * cloud_store.READINGS
    assert {device for device, _ in pairs} == {str(device) for device in range(1, 61)}
    assert {stamp[:10] for _, stamp in pairs} == {"2026-12-03"}
    # Whole chunks of 48 to a batch, so no device-day is cut mid-chunk.
    assert all(len(columns) % (cloud_store.READINGS // 2) == 0 for columns in batches)
    if order == "device":
        assert [int(device) for device, _ in pairs] == sorted(int(device) for device, _ in pairs)


def test_the_cloud_store_bench_gives_a_figure_a_day_into_one_database(capsys):
    cloud_store = _bench_module("cloud_store")
    assert cloud_store.main(["--devices", "40", "--batch", "480", "--days", "2", "--order", "device"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "cloud store, schema version 3, in device order, day 1 (2026-12-01)",
        "cloud store, schema version 3, in device order, day 2 (2026-12-02)",
    ]
    assert all("3,840 readings in 8 batches" in line for line in lines)
    # The second day went into the first's database, not a fresh one.
    first, second = (float(re.search(r"file and log ([\d.]+) MB", line).group(1)) for line in lines)
    assert second > first
