"""
Fleet changes without a restart: `meter fleet add` (the configuration file
edited in place, the keys created), and the gateway's reload of its fleet
and keys (L{meter.gateway.fleet}) swapped into the intake and the protocol
mid-round, on Twisted's fakes.
"""

from __future__ import annotations

import datetime
import functools
import os
import tomllib
from pathlib import Path

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.testing import FakeDatagramTransport
from twisted.logger import Logger, formatEvent

from meter import config, gateway, secrets, testing, wire
from meter.gateway import Intake
from meter.gateway.fleet import FleetChange, FleetReload, file_loader, id_runs
from meter.testing import MemorySpool, device_key, device_keys
from meter.tools import cli, fleet

DAY = datetime.date(2026, 3, 1)
NOW = 1772400000.0
FLEET = {1: "192.168.1.2", 2: "192.168.1.3", 3: "192.168.1.4", 4: "192.168.1.5"}
WITH_5 = {**FLEET, 5: "192.168.1.6"}
REPO_CONFIG = Path(__file__).resolve().parent.parent / "etc" / "meter.toml"

day_chunk = functools.partial(testing.day_chunk, day=DAY, sent_at=NOW)


def result_of(d: Deferred):
    out: list = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


# -- `meter fleet add` --------------------------------------------------------


def fleet_add(tmp_path: Path, *args: str) -> int:
    return cli.main(["fleet", "add", *args, "--config", str(tmp_path / "meter.toml"), "--secrets", str(tmp_path / "secrets")])


@pytest.fixture
def configured(tmp_path) -> Path:
    """
    A copy of the repository's etc/meter.toml in C{tmp_path}.
    """
    path = tmp_path / "meter.toml"
    path.write_text(REPO_CONFIG.read_text())
    return path


def test_add_one_device_keeps_the_files_comments_and_layout_and_creates_its_key(tmp_path, configured, capsys):
    before = configured.read_text()
    assert fleet_add(tmp_path, "5", "192.168.1.6") == 0
    after = configured.read_text()
    # One line more, right after the last entry of [fleet]; nothing else moved.
    assert after == before.replace('4 = "192.168.1.5"\n', '4 = "192.168.1.5"\n5 = "192.168.1.6"\n')
    assert config.load(configured).fleet == WITH_5
    assert secrets.read_device_key(tmp_path / "secrets", 5)
    assert os.stat(secrets.device_key_path(tmp_path / "secrets", 5)).st_mode & 0o777 == 0o600
    out = capsys.readouterr().out
    assert f"added device 5 (192.168.1.6) to [fleet] of {configured}" in out
    assert "created 1 key in" in out and "device5.key" in out


def test_a_fleet_table_followed_by_comments_and_another_table_gets_the_lines_after_its_last_entry(tmp_path):
    path = tmp_path / "meter.toml"
    path.write_text(
        '# top\n[fleet]  # the devices\n1 = "10.0.0.1"\n# a note\n2 = "10.0.0.2"\n\n# about the next table\n'
        '[security]\ndir = "s"\ngenerate = false\n'
    )
    assert fleet_add(tmp_path, "3", "10.0.0.3") == 0
    assert path.read_text() == (
        '# top\n[fleet]  # the devices\n1 = "10.0.0.1"\n# a note\n2 = "10.0.0.2"\n3 = "10.0.0.3"\n\n'
        '# about the next table\n[security]\ndir = "s"\ngenerate = false\n'
    )


def test_a_file_without_a_fleet_table_gets_one_holding_the_fleet_it_had(tmp_path):
    path = tmp_path / "meter.toml"
    path.write_text('[gateway]\ndeadline = 5.0')  # no line feed at the end
    assert fleet_add(tmp_path, "5", "192.168.1.6") == 0
    assert config.load(path).fleet == {**config.DEFAULT_FLEET, 5: "192.168.1.6"}
    assert path.read_text().startswith('[gateway]\ndeadline = 5.0\n\n')


@pytest.mark.parametrize(
    "args, refusal",
    [
        (("4", "192.168.1.9"), "nothing added: device 4 is in [fleet] already (as 192.168.1.5)"),
        (("5", "192.168.1.5"), "nothing added: address 192.168.1.5 belongs to device 4 already"),
        (("3-4", "--first-address", "192.168.1.4"),
         "nothing added: device 3 is in [fleet] already (as 192.168.1.4); device 4 is in [fleet] already "
         "(as 192.168.1.5); address 192.168.1.4 belongs to device 3 already; address 192.168.1.5 belongs to "
         "device 4 already"),
        (("5-5004", "--first-address", "192.168.1.6"),
         "5000 addresses from 192.168.1.6 run past 192.168.1.254, the last host of 192.168.1.0/24 (room for 249): "
         "give a wider subnet, e.g. --first-address 192.168.1.6/16"),
        (("5-6", "--first-address", "192.168.1.254"),
         "2 addresses from 192.168.1.254 run past 192.168.1.254, the last host of 192.168.1.0/24 (room for 1)"),
        (("5-6", "--first-address", "192.168.1.0"), "--first-address '192.168.1.0': 192.168.1.0 is not a host address of 192.168.1.0/24"),
        (("5-6", "192.168.1.6"), "2 devices need --first-address ADDRESS[/PREFIX]"),
        (("5",), "give the address"),
        (("6-5", "192.168.1.6"), "device ids '6-5': the range ends before it starts"),
        (("1-200000", "--first-address", "10.0.0.1/8"), "device ids '1-200000': 200000 devices, at most 100000 in one add"),
        (("5", "192.168.1.300"), "device address '192.168.1.300' is not an IP address"),
    ],
    ids=["id taken", "address taken", "range collides", "range past the subnet", "past the last host",
         "network address", "range with one address", "no address", "backwards", "too many", "bad address"],
)
def test_a_refused_add_names_why_and_changes_nothing(tmp_path, configured, capsys, args, refusal):
    before = configured.read_text()
    assert fleet_add(tmp_path, *args) == 2
    assert capsys.readouterr().err.startswith(f"meter fleet add: {refusal}")
    assert configured.read_text() == before
    assert not (tmp_path / "secrets").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["meter.toml"]  # no temporary file left


def test_a_range_adds_thousands_in_one_write_with_consecutive_addresses(tmp_path, configured, capsys):
    assert fleet_add(tmp_path, "5-5004", "--first-address", "192.168.1.6/16") == 0
    loaded = config.load(configured).fleet
    assert len(loaded) == 5004
    assert (loaded[5], loaded[255], loaded[5004]) == ("192.168.1.6", "192.168.2.0", "192.168.20.141")
    assert len(list((tmp_path / "secrets" / "devices").iterdir())) == 5000
    assert "added 5000 devices 5..5004 (192.168.1.6..192.168.20.141)" in capsys.readouterr().out


def test_an_add_stopped_after_the_keys_is_done_again_keeping_them(tmp_path, configured, capsys):
    # The keys exist (an add stopped before the file was replaced): kept.
    created, kept = secrets.create_device_keys(tmp_path / "secrets", [5])
    key = secrets.read_device_key(tmp_path / "secrets", 5)
    assert fleet_add(tmp_path, "5-6", "--first-address", "192.168.1.6") == 0
    assert secrets.read_device_key(tmp_path / "secrets", 5) == key
    out = capsys.readouterr().out
    assert "created 1 key in" in out and "kept 1 key found in" in out
    assert config.load(configured).fleet == {**WITH_5, 6: "192.168.1.7"}


def test_an_edited_file_the_loader_refuses_is_not_put_in_place(tmp_path, configured):
    before = configured.read_text()
    with pytest.raises(fleet.FleetError, match=rf"^{configured} not changed: the edited file is refused: {configured}: not valid TOML"):
        fleet.replace_config(configured, before + "[fleet\n", WITH_5)
    with pytest.raises(fleet.FleetError, match="does not hold the fleet intended"):
        fleet.replace_config(configured, before, WITH_5)
    assert configured.read_text() == before
    assert [p.name for p in configured.parent.iterdir()] == ["meter.toml"]


def test_no_configuration_file_is_named(tmp_path, capsys):
    assert fleet_add(tmp_path, "5", "192.168.1.6") == 2
    assert capsys.readouterr().err == f"meter fleet add: no configuration file at {tmp_path / 'meter.toml'}\n"


def test_fleet_list_names_each_device_and_its_key(tmp_path, configured, capsys):
    fleet_add(tmp_path, "5", "192.168.1.6")
    capsys.readouterr()
    assert cli.main(["fleet", "list", "--config", str(configured), "--secrets", str(tmp_path / "secrets")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[4] == f"5\t192.168.1.6\t{secrets.device_key_path(tmp_path / 'secrets', 5)}"
    assert lines[0].startswith("1\t192.168.1.2\tno key: ")
    assert lines[-1] == f"(5 devices in [fleet] of {configured}; 4 without a key in {tmp_path / 'secrets'})"


# -- the reload: what it reads, what it says ---------------------------------


def test_a_reload_says_what_changed():
    change = FleetChange.between(FLEET, device_keys(FLEET), {**WITH_5, 2: "192.168.1.9"}, {
        **device_keys(WITH_5), 3: bytes(32)})
    assert change.summary() == "1 added (5), 0 removed, 1 changed address (2); keys changed: 3"
    assert FleetChange.between(FLEET, {}, {1: "192.168.1.2"}, {}).summary() == "0 added, 3 removed (2-4), 0 changed address"
    assert id_runs(list(range(1, 30, 2))) == "1, 3, 5, 7, 9, 11, 13, 15, 17, 19 and 5 more"


class ReloadHarness:
    def __init__(self, load):
        self.events: list[dict] = []
        self.applied: list = []
        self.reload = FleetReload(
            load, lambda f, k: self.applied.append((f, k)), FLEET, device_keys(FLEET), "meter.toml",
            log=Logger(observer=self.events.append),
        )

    def logged(self) -> list[str]:
        return [formatEvent(event) for event in self.events]


def test_a_reload_applies_and_logs_the_new_fleet():
    h = ReloadHarness(lambda: (WITH_5, device_keys(WITH_5)))
    assert result_of(h.reload.reload()) == FleetChange(frozenset({5}), frozenset(), frozenset(), frozenset())
    assert h.applied == [(WITH_5, device_keys(WITH_5))]
    assert h.logged() == ["fleet reloaded from meter.toml: 1 added (5), 0 removed, 0 changed address; 5 devices expected"]
    # The next reload compares with what was applied.
    assert result_of(h.reload.reload()).summary() == "0 added, 0 removed, 0 changed address"


def test_a_fleet_read_after_the_gateway_stopped_is_not_said_to_be_reloaded():
    h = ReloadHarness(lambda: (WITH_5, device_keys(WITH_5)))
    h.reload._apply = lambda fleet, keys: False  # the gateway stopped while the files were read
    assert result_of(h.reload.reload()) is None
    assert h.logged() == ["fleet read from meter.toml after the gateway stopped: not applied"]
    assert h.reload.fleet == FLEET


def test_a_reload_asked_for_while_reading_reads_again_afterwards():
    fleets = [FLEET, WITH_5]
    h = ReloadHarness(lambda: (fleets[0], device_keys(fleets[0])))
    reading: list[Deferred] = []

    def run(load):
        reading.append(Deferred())
        return reading[-1].addCallback(lambda _: load())

    h.reload._run = run
    h.reload.reload()
    h.reload.reload()  # a second SIGHUP while the first reads
    h.reload.reload()
    assert len(reading) == 1
    reading[0].callback(None)
    assert len(reading) == 2  # once more, for the SIGHUPs that came while reading
    fleets.pop(0)  # the file changed after the first read
    reading[1].callback(None)
    assert len(reading) == 2
    assert [fleet for fleet, _ in h.applied] == [FLEET, WITH_5]


def test_an_unexpected_error_while_reading_is_logged_and_the_fleet_kept():
    h = ReloadHarness(lambda: 1 / 0)
    assert result_of(h.reload.reload()) is None
    assert h.applied == []
    assert h.logged()[0].startswith("fleet reload from meter.toml failed")
    assert h.events[0]["log_failure"].check(ZeroDivisionError)


@pytest.mark.parametrize(
    "error",
    [config.ConfigError("etc/meter.toml: not valid TOML: ..."), secrets.SecretError("missing s/devices/device5.key: ...")],
)
def test_a_refused_reload_keeps_the_fleet_in_use(error):
    def load():
        raise error

    h = ReloadHarness(load)
    assert result_of(h.reload.reload()) is None
    assert h.applied == []
    assert h.logged() == [f"fleet not reloaded, the fleet in use is kept: {error}"]
    assert h.reload.fleet == FLEET


def write_keys(folder: Path, device_ids) -> None:
    for device_id in device_ids:
        path = secrets.device_key_path(folder, device_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(device_key(device_id).hex() + "\n")
        path.chmod(0o600)


def test_the_file_loader_reads_the_fleet_and_its_keys_and_refuses_naming_the_file(tmp_path):
    path = tmp_path / "meter.toml"
    folder = tmp_path / "secrets"
    path.write_text(config.render({}, WITH_5))
    write_keys(folder, FLEET)
    load = file_loader(path, {}, folder)
    key5 = secrets.device_key_path(folder, 5)
    with pytest.raises(secrets.SecretError, match=f"^missing {key5}: provision it"):
        load()
    write_keys(folder, [5])
    assert load() == (WITH_5, device_keys(WITH_5))
    key5.chmod(0o644)
    with pytest.raises(secrets.SecretError, match=rf"^{key5}: mode 0644 lets group or others at this key"):
        load()
    key5.chmod(0o600)
    path.write_text(config.render({}, WITH_5) + "[fleet\n")
    with pytest.raises(config.ConfigError, match=rf"^{path}: not valid TOML"):
        load()
    path.write_text(config.render({}, WITH_5).replace('"192.168.1.6"', '"192.168.1.5"'))
    with pytest.raises(config.ConfigError, match=rf"^{path} \[fleet\] 5: address 192.168.1.5 already belongs to device 4"):
        load()


# -- the reload swapped into the intake and the protocol, mid-round ----------


class GatewayHarness:
    """
    An intake on the memory spool and the protocol in front of it, and the
    swap the gateway's SIGHUP makes.
    """

    def __init__(self, deadline: float = 60.0):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.spool = MemorySpool(self.clock)
        self.events: list[dict] = []
        self.intake = Intake(FLEET, self.spool, self.clock, deadline, lambda: None, log=Logger(observer=self.events.append))
        self.protocol = gateway.GatewayProtocol(self.intake, device_keys(FLEET), self.clock)
        self.protocol.log = Logger(observer=self.events.append)
        self.transport = FakeDatagramTransport()
        self.protocol.makeConnection(self.transport)

    def swap(self, fleet_: dict[int, str]) -> None:
        self.intake.set_fleet(fleet_)
        self.protocol.set_keys(device_keys(fleet_))
        self.clock.advance(0)  # the spool's commit of a round it closed

    def send(self, device_id: int, ip: str | None = None, key: bytes | None = None):
        """
        Device C{device_id}'s day as a datagram, and the commit: its
        answer, unsealed with C{key} (default: its own), or None.
        """
        key = key or device_key(device_id)
        chunk = day_chunk(device_id, ip=ip or WITH_5.get(device_id, "10.9.9.9"))
        before = len(self.transport.written)
        self.protocol.datagramReceived(wire.seal(wire.encode(chunk), key), ("127.0.0.1", 5000 + device_id))
        self.clock.advance(0)
        written = self.transport.written[before:]
        return wire.decode(wire.unseal(written[-1][0], key)) if written else None

    def closed(self) -> list[float]:
        return [r.closed_at for r in [self.spool.round(DAY)] if r is not None and r.closed_at is not None]

    def logged(self) -> list[str]:
        return [formatEvent(event) for event in self.events]


def test_a_device_added_mid_round_is_expected_and_its_day_taken():
    h = GatewayHarness()
    assert h.send(1).status == "ok"
    assert h.send(2).status == "ok"
    assert h.send(5) is None  # no key yet: dropped unanswered
    assert h.intake.metrics.dropped_unknown_device == 1
    h.clock.advance(20)
    h.swap(WITH_5)
    assert h.send(5).status == "ok"
    assert "device 5 (127.0.0.1:5005) reported 2026-03-01 in 1 chunks: 3 of 5 devices" in h.logged()
    assert h.send(3).status == "ok"
    assert h.send(4).status == "ok"
    # Complete with device 5, before the deadline the round kept.
    assert h.closed() == [NOW + 20]
    assert "round 2026-03-01 complete: every expected device reported" in h.logged()
    assert h.spool.depth == 5


def test_a_device_added_mid_round_is_missing_if_it_does_not_report():
    h = GatewayHarness()
    h.send(1)
    h.swap(WITH_5)
    h.send(2), h.send(3), h.send(4)
    assert h.closed() == []
    h.clock.advance(60)  # the deadline of the round's first report
    assert h.closed() == [NOW + 60]
    assert any("devices that did not report: 5 (192.168.1.6)" in line for line in h.logged())


def test_a_round_waiting_only_for_a_removed_device_closes_complete():
    h = GatewayHarness()
    h.send(1), h.send(2), h.send(3)
    h.clock.advance(5)
    h.swap({1: "192.168.1.2", 2: "192.168.1.3", 3: "192.168.1.4"})
    assert h.closed() == [NOW + 5]
    assert "round 2026-03-01 complete: every expected device reported (the fleet was reloaded)" in h.logged()
    # The removed device is a stranger now: dropped unanswered.
    assert h.send(4) is None
    assert h.intake.metrics.dropped_unknown_device == 1


def test_a_round_still_waiting_for_others_keeps_its_deadline_after_a_removal():
    h = GatewayHarness()
    h.send(1), h.send(2)
    h.swap({1: "192.168.1.2", 2: "192.168.1.3", 3: "192.168.1.4"})
    assert h.closed() == []
    h.clock.advance(60)
    assert h.closed() == [NOW + 60]
    assert any("devices that did not report: 3 (192.168.1.4)" in line for line in h.logged())


def test_a_changed_address_is_taken_from_the_next_chunk_on():
    h = GatewayHarness()
    h.swap({**FLEET, 1: "192.168.1.99"})
    assert h.send(1).status == "bad"
    assert h.send(1, ip="192.168.1.99").status == "ok"


def test_a_chunk_being_committed_when_its_device_is_removed_is_answered_under_its_key():
    h = GatewayHarness()
    h.spool.hold()
    chunk = day_chunk(1, ip="192.168.1.2")
    h.protocol.datagramReceived(wire.seal(wire.encode(chunk), device_key(1)), ("127.0.0.1", 5001))
    h.swap({2: "192.168.1.3"})
    h.spool.release()  # the commit
    ((data, addr),) = h.transport.written
    assert wire.decode(wire.unseal(data, device_key(1))) == wire.DayAck(chunk.xfer, 1, "ok")


def test_a_changed_key_authenticates_from_the_next_datagram_on():
    h = GatewayHarness()
    h.intake.set_fleet(FLEET)
    h.protocol.set_keys({**device_keys(FLEET), 1: bytes(32)})
    assert h.send(1) is None
    assert h.intake.metrics.dropped_bad_tag == 1
    assert h.send(1, key=bytes(32)).status == "ok"


def test_the_repository_configuration_parses_as_toml():
    # The fleet command edits this file's text: it must stay plain TOML.
    assert "fleet" in tomllib.loads(REPO_CONFIG.read_text())


# -- end to end: the real gateway and cloud, SIGHUP mid-round -----------------


@pytest.mark.e2e
def test_sighup_adds_a_device_mid_round_and_a_bad_file_keeps_the_fleet(make_suite):
    import signal
    import subprocess
    import sys
    import time

    from meter.device import previous_day
    from meter.tools.suite import survey_text

    suite = make_suite(4, deadline=300.0)
    day = previous_day(time.time())
    cloud = suite.start_cloud()
    gateway = suite.start_gateway(connected=True)
    for device_id in (1, 2, 3):
        device = suite.start_device(device_id)
        assert device.wait(30) == 0, device.tail()
    gateway.wait_for(rf"reported {day} in 1 chunks: 3 of 4 devices")

    # `meter fleet add` from the suite's folder, where its secrets are.
    (suite.surveys / "device5.txt").write_text(survey_text(5, 4))
    added = subprocess.run(
        [sys.executable, "-m", "meter.tools.cli", "fleet", "add", "5", "192.168.1.6", "--config", str(suite.config)],
        cwd=suite.root, capture_output=True, text=True, timeout=60,
    )
    assert added.returncode == 0, added.stderr
    suite.fleet[5] = "192.168.1.6"
    os.kill(gateway.pid, signal.SIGHUP)
    gateway.wait_for(r"fleet reloaded from \S+: 1 added \(5\), 0 removed, 0 changed address; 5 devices expected")

    device = suite.start_device(5)
    assert device.wait(30) == 0, device.tail()
    gateway.wait_for(rf"device 5 \(127\.0\.0\.1:\d+\) reported {day} in 1 chunks: 4 of 5 devices")
    device = suite.start_device(4)
    assert device.wait(30) == 0, device.tail()
    gateway.wait_for(rf"round {day} complete: every expected device reported")
    suite.wait_stored(5 * 4, cloud)
    assert suite.stored() == suite.expected_rows(day)
    assert len(cloud.all_matching(r"^192\.168\.1\.6 - ")) == 4  # on the console

    # A file the gateway cannot take: refused in one line, the fleet kept.
    good = suite.root / "good.toml"
    good.write_text(suite.config.read_text())
    suite.config.write_text(good.read_text() + "[fleet\n")
    os.kill(gateway.pid, signal.SIGHUP)
    refusal = gateway.wait_for(r"fleet not reloaded, the fleet in use is kept: (.*)")
    assert refusal.group(1).startswith(f"{suite.config}: not valid TOML")
    # Device 1 (with the good file) is answered: its day again, acknowledged.
    device = suite.start_device(1, "--config", str(good))
    assert device.wait(30) == 0, device.tail()
    assert gateway.process.poll() is None


def test_the_edited_file_keeps_its_owner_and_mode(tmp_path, configured):
    # The tests run as root: the service user's file must stay theirs.
    os.chown(configured, 4321, 4321)
    configured.chmod(0o640)
    assert fleet_add(tmp_path, "5", "192.168.1.6") == 0
    after = os.stat(configured)
    assert (after.st_uid, after.st_gid, after.st_mode & 0o7777) == (4321, 4321, 0o640)


def test_keys_added_as_root_belong_to_the_owner_of_the_keys_there(tmp_path, configured):
    # The tests run as root, as an operator's `sudo meter fleet add` does:
    # the gateway's user must be able to read the new keys (mode 0600), on
    # SIGHUP and at its next start.
    folder = tmp_path / "secrets"
    secrets.create_device_keys(folder, [1])
    os.chown(secrets.device_key_path(folder, 1), 4321, 4322)
    assert fleet_add(tmp_path, "5-6", "--first-address", "192.168.1.6") == 0
    for device_id in (5, 6):
        status = os.stat(secrets.device_key_path(folder, device_id))
        assert (status.st_uid, status.st_gid, status.st_mode & 0o777) == (4321, 4322, 0o600)
