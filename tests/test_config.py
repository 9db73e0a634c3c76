"""
meter.config and the twistd Options built on it: the shipped file equals the
embedded defaults, and every refusal names its key and source.
"""

from __future__ import annotations

import datetime
import tomllib
from pathlib import Path

import attrs
import pytest

from meter import config
from meter.config import ConfigError


def refused(raw, overrides=None) -> str:
    with pytest.raises(ConfigError) as raised:
        config.from_raw(raw, "f.toml", overrides)
    return str(raised.value)


# -- the shipped file -------------------------------------------------------


def test_shipped_file_equals_embedded_defaults(repo_root):
    shipped = config.load(Path("etc/meter.toml"))
    embedded = config.from_raw({}, "x")
    for field in attrs.fields(config.Config):
        if field.name == "source":
            continue
        assert getattr(shipped, field.name) == getattr(embedded, field.name), field.name
    assert shipped.source == "etc/meter.toml"
    assert embedded.source == "x"


def test_shipped_file_repeats_every_key(repo_root):
    with open("etc/meter.toml", "rb") as f:
        raw = tomllib.load(f)
    assert set(raw) == {*config.SCHEMA, "fleet"}
    for section, keys in config.SCHEMA.items():
        # A device's id is given per device, never in the shared file.
        expected = {key for key, (_, default, _) in keys.items() if default is not None}
        assert set(raw[section]) == expected, section


def test_embedded_defaults():
    defaults = config.from_raw({}, "x")
    assert defaults.gateway["listen"] == ("127.0.0.1", 10005)
    assert defaults.gateway["cloud"] == (("127.0.0.1", 8001),)
    assert defaults.gateway["deadline"] == 60.0
    assert defaults.gateway["spool"] == Path("var/gateway-spool.sqlite")
    assert defaults.gateway["batch_readings"] == 5000
    assert defaults.cloud["listen"] == "tcp:8001:interface=127.0.0.1"
    assert defaults.cloud["idle_timeout"] == 120.0
    assert defaults.device["id"] is None
    assert defaults.device["send_at"] == datetime.time(0, 5)
    assert defaults.device["chunk_bytes"] == 1200
    assert (defaults.device["ack_timeout"], defaults.device["ack_random_factor"], defaults.device["max_retransmit"]) == (
        2.0,
        1.5,
        4,
    )
    assert defaults.fleet == {1: "192.168.1.2", 2: "192.168.1.3", 3: "192.168.1.4", 4: "192.168.1.5"}


def test_load_without_a_path_reads_etc_meter_toml_if_present(repo_root, tmp_path, monkeypatch):
    assert config.load().source == "etc/meter.toml"
    monkeypatch.chdir(tmp_path)
    assert config.load().source == "embedded defaults"


def test_load_of_a_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as raised:
        config.load(missing)
    assert str(raised.value) == f"{missing}: cannot read: No such file or directory"


def test_load_of_invalid_toml_names_it(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[gateway\ndeadline = 5\n")
    with pytest.raises(ConfigError) as raised:
        config.load(path)
    assert str(raised.value).startswith(f"{path}: not valid TOML:")


def test_load_names_the_file_and_key_of_a_bad_value(tmp_path):
    path = tmp_path / "meter.toml"
    path.write_text("[gateway]\ndeadline = -5\n")
    with pytest.raises(ConfigError) as raised:
        config.load(path)
    assert str(raised.value) == f"{path} [gateway] deadline: expected a number above 0, got -5"


# -- refusals ---------------------------------------------------------------


def test_unknown_section_is_refused_naming_it():
    message = refused({"gatway": {"deadline": 5}})
    assert message.startswith("f.toml: unknown section [gatway] (known: ")
    assert "gateway" in message


def test_unknown_key_is_refused_naming_it():
    message = refused({"gateway": {"deadlin": 5}})
    assert message.startswith("f.toml [gateway] deadlin: unknown key (known: listen, cloud, deadline")


def test_section_that_is_not_a_table_is_refused():
    assert refused({"gateway": 5}) == "f.toml: [gateway] must be a table"


@pytest.mark.parametrize(
    "section, key, value, detail",
    [
        ("gateway", "deadline", -1, "expected a number above 0, got -1"),
        ("gateway", "deadline", 0, "expected a number above 0, got 0"),
        ("gateway", "deadline", "soon", "expected a number, got 'soon'"),
        ("gateway", "deadline", True, "expected a number, got True"),
        ("gateway", "deadline", float("nan"), "expected a finite number, got nan"),
        ("gateway", "deadline", float("inf"), "expected a finite number, got inf"),
        ("gateway", "deadline", [60], "expected a number, got [60]"),
        ("gateway", "batch_readings", 0, "expected a whole number from 1 to 5000, got 0"),
        ("gateway", "batch_readings", 5001, "expected a whole number from 1 to 5000, got 5001"),
        ("gateway", "batch_readings", 1.5, "expected a whole number, got 1.5"),
        ("gateway", "batch_readings", False, "expected a whole number, got False"),
        ("gateway", "listen", "localhost:10005", "expected an IP address before the port, got 'localhost' in 'localhost:10005'"),
        ("gateway", "listen", "127.0.0.1", "expected HOST:PORT, got '127.0.0.1'"),
        ("gateway", "listen", "127.0.0.1:0", "expected a whole number from 1 to 65535, got 0"),
        ("gateway", "listen", "127.0.0.1:65536", "expected a whole number from 1 to 65535, got 65536"),
        ("gateway", "listen", "127.0.0.1:http", "expected a whole number, got 'http'"),
        ("gateway", "listen", 10005, "expected a non-empty string, got 10005"),
        ("gateway", "spool", "", "expected a non-empty string, got ''"),
        ("gateway", "cloud", [], "expected at least one HOST:PORT, got an empty list"),
        ("gateway", "cloud", ["127.0.0.1:8001", "127.0.0.1:8001"], "'127.0.0.1:8001' is listed twice in ['127.0.0.1:8001', '127.0.0.1:8001']"),
        ("gateway", "cloud", ["127.0.0.1:8001", "cloud-b:8001"], "expected an IP address before the port, got 'cloud-b' in 'cloud-b:8001'"),
        ("gateway", "cloud", "127.0.0.1:8001,", "expected a non-empty string, got ''"),
        ("gateway", "cloud", 8001, "expected HOST:PORT or a list of them, got 8001"),
        ("gateway", "commit_interval", -0.001, "expected a number of 0 or more, got -0.001"),
        ("gateway", "commit_interval", 0.5, "expected a number from 0 to 0.1, got 0.5"),
        ("gateway", "receive_buffer_mb", 0, "expected a number above 0, got 0"),
        ("gateway", "receive_buffer_mb", 1024, "expected a number above 0 and at most 1000, got 1024"),
        ("cloud", "idle_timeout", -3, "expected a number above 0, got -3"),
        ("device", "id", 0, "expected a whole number from 1 to 2147483647, got 0"),
        ("device", "send_at", "25:00", "expected a time of day HH:MM, got '25:00'"),
        ("device", "spread", -1, "expected a number of 0 or more, got -1"),
        ("device", "chunk_bytes", 299, "expected a whole number from 300 to 65507, got 299"),
        ("device", "chunk_bytes", 65508, "expected a whole number from 300 to 65507, got 65508"),
        ("device", "max_retransmit", 21, "expected a whole number from 0 to 20, got 21"),
        ("device", "ack_random_factor", "x", "expected a number, got 'x'"),
    ],
)
def test_bad_value_is_refused_naming_section_key_and_file(section, key, value, detail):
    assert refused({section: {key: value}}) == f"f.toml [{section}] {key}: {detail}"


def test_bad_endpoint_is_refused_naming_the_key():
    message = refused({"cloud": {"listen": "tcp:notaport"}})
    assert message.startswith("f.toml [cloud] listen: expected a Twisted endpoint such as tcp:8001:interface=127.0.0.1, got 'tcp:notaport'")


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("gateway", "listen", "[::1]:10005", ("::1", 10005)),
        ("gateway", "listen", "[0:0::1]:7", ("::1", 7)),
        ("gateway", "cloud", "10.0.0.5:8001", (("10.0.0.5", 8001),)),
        ("gateway", "deadline", "12.5", 12.5),
        ("gateway", "deadline", 30, 30.0),
        ("gateway", "batch_readings", "17", 17),
        ("gateway", "commit_interval", 0, 0.0),
        ("gateway", "commit_interval", 0.005, 0.005),
        ("device", "send_at", "07:30", datetime.time(7, 30)),
        ("device", "spread", 0, 0.0),
        ("device", "id", 3, 3),
        ("cloud", "db", "elsewhere/cloud.sqlite", Path("elsewhere/cloud.sqlite")),
    ],
)
def test_good_values_are_parsed(section, key, value, expected):
    assert getattr(config.from_raw({section: {key: value}}, "f.toml"), section)[key] == expected


# -- overrides --------------------------------------------------------------


def test_overrides_win_over_the_file():
    loaded = config.from_raw({"gateway": {"deadline": 30}}, "f.toml", {"gateway": {"deadline": "5"}})
    assert loaded.gateway["deadline"] == 5.0


def test_a_missing_override_keeps_the_file_value():
    loaded = config.from_raw({"gateway": {"deadline": 30}}, "f.toml", {"gateway": {"deadline": None, "listen": None}})
    assert loaded.gateway["deadline"] == 30.0
    assert loaded.gateway["listen"] == ("127.0.0.1", 10005)


def test_bad_override_names_the_option():
    assert refused({}, {"gateway": {"deadline": "x"}}) == "--deadline: expected a number, got 'x'"
    assert refused({}, {"gateway": {"batch_readings": "0"}}) == "--batch-readings: expected a whole number from 1 to 5000, got 0"


# -- the fleet --------------------------------------------------------------


def test_fleet_is_parsed_and_sorted():
    loaded = config.from_raw({"fleet": {"10": "10.0.0.10", "2": "10.0.0.2", "3": "2001:0db8::3"}}, "f.toml")
    assert loaded.fleet == {2: "10.0.0.2", 3: "2001:db8::3", 10: "10.0.0.10"}
    assert list(loaded.fleet) == [2, 3, 10]


def test_duplicate_fleet_address_is_refused():
    message = refused({"fleet": {"1": "10.0.0.1", "2": "10.0.0.1"}})
    assert message == "f.toml [fleet] 2: address 10.0.0.1 already belongs to device 1"


def test_duplicate_fleet_address_in_another_spelling_is_refused():
    message = refused({"fleet": {"1": "::1", "2": "0:0::1"}})
    assert message == "f.toml [fleet] 2: address ::1 already belongs to device 1"


def test_duplicate_fleet_id_in_another_spelling_is_refused():
    # "1" and "01" are two TOML keys but one device: the second must not
    # silently replace the first's address.
    message = refused({"fleet": {"1": "10.0.0.1", "01": "10.0.0.2"}})
    assert message == "f.toml [fleet] 01: device 1 is already listed"


@pytest.mark.parametrize(
    "fleet, detail",
    [
        ({"x": "10.0.0.1"}, "[fleet] x: expected a whole number, got 'x'"),
        ({"0": "10.0.0.1"}, "[fleet] 0: expected a whole number from 1 to 2147483647, got 0"),
        ({"1": "10.0.0.300"}, "[fleet] 1: device address '10.0.0.300' is not an IP address"),
        ({"1": "meter-1"}, "[fleet] 1: device address 'meter-1' is not an IP address"),
        # what no device could send as its ip field (docs/protocol.md)
        ({"1": "::ffff:10.0.0.1"}, "[fleet] 1: device address '::ffff:10.0.0.1' is IPv4-mapped: write it as 10.0.0.1"),
        ({"1": "fe80::1%eth0"}, "[fleet] 1: device address 'fe80::1%eth0' has a zone (scoped addresses are not device addresses)"),
        ({"1": 5}, "[fleet] 1: expected a non-empty string, got 5"),
        ({}, "[fleet]: expected a table of device id = \"address\", got {}"),
        ("10.0.0.1", "[fleet]: expected a table of device id = \"address\", got '10.0.0.1'"),
    ],
)
def test_bad_fleet_is_refused(fleet, detail):
    assert refused({"fleet": fleet}) == f"f.toml {detail}"


# -- render -----------------------------------------------------------------


def test_render_writes_a_file_that_loads_back(tmp_path):
    path = tmp_path / "meter.toml"
    path.write_text(
        config.render(
            {"gateway": {"deadline": 5.0, "listen": "127.0.0.1:20005", "batch_readings": 10}, "device": {"send_at": "01:00"}},
            {7: "10.0.0.7", 8: "10.0.0.8"},
        )
    )
    loaded = config.load(path)
    assert loaded.gateway["deadline"] == 5.0
    assert loaded.gateway["listen"] == ("127.0.0.1", 20005)
    assert loaded.gateway["batch_readings"] == 10
    assert loaded.device["send_at"] == datetime.time(1, 0)
    assert loaded.fleet == {7: "10.0.0.7", 8: "10.0.0.8"}


def test_render_quotes_strings():
    text = config.render({"cloud": {"db": 'a "quoted" \\ path'}}, {1: "10.0.0.1"})
    assert tomllib.loads(text)["cloud"]["db"] == 'a "quoted" \\ path'


# -- the twistd Options -----------------------------------------------------


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory) -> str:
    # Options create missing secrets where they are told: keep them out of
    # the repository's var/.
    return str(tmp_path_factory.mktemp("secrets"))


def refusal(options, args) -> str:
    """
    The message the options end the start with, after the role's name: a
    SystemExit, which twistd lets through alone, not a UsageError, which it
    prints after its usage text.
    """
    with pytest.raises(SystemExit) as raised:
        options.parseOptions(args)
    prefix = f"meter-{options.role}: "
    assert str(raised.value.code).startswith(prefix)
    return str(raised.value.code)[len(prefix):]


def test_gateway_option_with_a_bad_deadline_is_refused_naming_it(repo_root, secrets_dir):
    from meter.gateway import tap as gateway_tap

    assert refusal(gateway_tap.Options(), ["--deadline", "x", "--secrets", secrets_dir]) == (
        "--deadline: expected a number, got 'x'"
    )
    assert refusal(gateway_tap.Options(), ["--deadline", "0", "--secrets", secrets_dir]) == (
        "--deadline: expected a number above 0, got '0'"
    )
    assert refusal(gateway_tap.Options(), ["--listen", "somewhere:1", "--secrets", secrets_dir]).startswith(
        "--listen: expected an IP address before the port"
    )


def test_the_cloud_is_one_address_or_a_list_of_nodes_in_their_order():
    assert config.from_raw({"gateway": {"cloud": "10.0.0.9:8001"}}, "f.toml").gateway["cloud"] == (("10.0.0.9", 8001),)
    nodes = config.from_raw({"gateway": {"cloud": ["10.0.0.9:8001", "[::1]:8002", "10.0.0.8:8001"]}}, "f.toml")
    assert nodes.gateway["cloud"] == (("10.0.0.9", 8001), ("::1", 8002), ("10.0.0.8", 8001))
    # --cloud A,B: the same list, and what config.render writes reads back
    given = config.from_raw({}, "x", {"gateway": {"cloud": "10.0.0.9:8001, [::1]:8002"}})
    assert given.gateway["cloud"] == (("10.0.0.9", 8001), ("::1", 8002))
    text = config.render({"gateway": {"cloud": ["10.0.0.9:8001", "[::1]:8002"]}}, {1: "192.168.1.2"})
    assert tomllib.loads(text)["gateway"]["cloud"] == ["10.0.0.9:8001", "[::1]:8002"]


def test_gateway_options_override_the_file(repo_root, secrets_dir):
    from meter.gateway import tap as gateway_tap

    options = gateway_tap.Options()
    options.parseOptions(["--deadline", "12.5", "--listen", "127.0.0.1:20005", "--secrets", secrets_dir])
    assert options.config.gateway["deadline"] == 12.5
    assert options.config.gateway["listen"] == ("127.0.0.1", 20005)
    assert options.config.gateway["cloud"] == (("127.0.0.1", 8001),)  # from the file
    assert options.config.source == "etc/meter.toml"


def test_device_options_need_an_id(repo_root, secrets_dir):
    from meter.device import tap as device_tap

    message = refusal(device_tap.Options(), ["--secrets", secrets_dir])
    assert message == "--id is required (or [device] id in the configuration)"


def test_device_options_refuse_an_id_outside_the_fleet(repo_root, secrets_dir):
    from meter.device import tap as device_tap

    message = refusal(device_tap.Options(), ["--id", "9", "--secrets", secrets_dir])
    assert message == "--id 9: not a device of [fleet] in etc/meter.toml (devices: 1, 2, 3, 4)"
    message = refusal(device_tap.Options(), ["--id", "two", "--secrets", secrets_dir])
    assert message == "--id: expected a whole number, got 'two'"


def test_device_options_take_a_fleet_id(repo_root, secrets_dir):
    from meter.device import tap as device_tap

    options = device_tap.Options()
    options.parseOptions(["--id", "2", "--secrets", secrets_dir])
    assert options.config.device["id"] == 2
    assert options.config.fleet[2] == "192.168.1.3"


def test_cloud_options_refuse_a_bad_endpoint(repo_root, secrets_dir):
    from meter.cloud import tap as cloud_tap

    message = refusal(cloud_tap.Options(), ["--listen", "tcp:notaport", "--secrets", secrets_dir])
    assert message.startswith("--listen: expected a Twisted endpoint")


def test_options_with_a_missing_config_file_are_refused(tmp_path, secrets_dir):
    from meter.gateway import tap as gateway_tap

    missing = tmp_path / "missing.toml"
    message = refusal(gateway_tap.Options(), ["--config", str(missing), "--secrets", secrets_dir])
    assert message == f"{missing}: cannot read: No such file or directory"


@pytest.mark.parametrize("nodaemon, expected", [(True, ""), (False, "meter-gateway.pid")])
def test_each_daemon_gets_its_own_pidfile(repo_root, secrets_dir, nodaemon, expected):
    from meter.gateway import tap as gateway_tap

    options = gateway_tap.Options()
    options.parent = {"pidfile": "twistd.pid", "nodaemon": nodaemon}
    options.parseOptions(["--secrets", secrets_dir])
    assert options.parent["pidfile"] == expected


def test_a_chosen_pidfile_is_kept(repo_root, secrets_dir):
    from meter.device import tap as device_tap

    options = device_tap.Options()
    options.parent = {"pidfile": "mine.pid", "nodaemon": False}
    options.parseOptions(["--id", "3", "--secrets", secrets_dir])
    assert options.parent["pidfile"] == "mine.pid"
    assert options.pidfile_name() == "meter-device-3.pid"
