"""
Provisioning cannot silently split the trust (docs/security.md,
"Provisioning keys"):

- no file of the secrets folder is ever replaced, by a daemon or by
  `meter certs`;
- `[security] generate = true` creates the whole set only in a folder that
  holds none of it, logs each file it creates, and leaves nothing behind if
  it fails part way;
- hosts provisioned as the document says (no ca.key on them) keep their one
  CA with the default `generate = true`, and the suite delivers;
- a daemon missing a file, holding a key open to group or others, a device
  key shorter than 32 bytes, or a certificate of another CA than its ca.crt
  refuses to start with one line naming the file, and a non-zero exit.

The start-up refusals run the real twistd plugins (meter.tools.suite.Suite); the
rest runs the secrets module on real files.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from meter import secrets
from meter.tools.suite import Suite

FLEET = {1: "192.168.1.2", 2: "192.168.1.3"}


def snapshot(folder: Path) -> dict[str, bytes]:
    """
    Every file under C{folder} (the lock file aside), by relative path.
    """
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != ".lock"
    }


# -- the secrets module on real files ---------------------------------------


def test_a_new_secret_never_replaces_a_file(tmp_path):
    path = tmp_path / "gateway.key"
    path.write_bytes(b"the provisioned key\n")
    with pytest.raises(secrets.SecretError, match=f"{path} exists: not replaced"):
        secrets._write_new(path, b"another key\n")
    assert path.read_bytes() == b"the provisioned key\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gateway.key"]  # no temporary left


def test_meter_certs_never_replaces_a_ca_certificate_without_its_key(tmp_path):
    # The gateway's host as provisioned, whose gateway.* were then lost:
    # signing new ones needs ca.key, which only the provisioning host holds.
    folder = tmp_path / "secrets"
    secrets.create(folder, FLEET)
    (folder / "ca.key").unlink()
    for name in ("gateway.crt", "gateway.key"):
        (folder / name).unlink()
    before = snapshot(folder)
    with pytest.raises(secrets.SecretError) as refused:
        secrets.create(folder, FLEET)
    assert str(refused.value) == (
        f"cannot make {folder}/gateway.crt: {folder}/ca.key is missing ({folder}/ca.crt is kept; "
        f"run meter certs where ca.key is kept)"
    )
    assert snapshot(folder) == before


@pytest.mark.parametrize("kept, lost", [("cloud.crt", "cloud.key"), ("gateway.key", "gateway.crt"), ("ca.key", "ca.crt")])
def test_meter_certs_never_replaces_half_a_pair(tmp_path, kept, lost):
    folder = tmp_path / "secrets"
    secrets.create(folder, FLEET)
    (folder / lost).unlink()
    before = snapshot(folder)
    with pytest.raises(secrets.SecretError) as refused:
        secrets.create(folder, FLEET)
    assert str(refused.value).startswith(f"{folder / kept} exists without {folder / lost}: not replaced")
    assert snapshot(folder) == before


def test_meter_certs_adds_a_new_devices_key_and_keeps_the_rest(tmp_path):
    folder = tmp_path / "secrets"
    secrets.create(folder, FLEET)
    before = snapshot(folder)
    assert secrets.create(folder, {**FLEET, 3: "192.168.1.4"}) == [folder / "devices" / "device3.key"]
    after = snapshot(folder)
    assert after.pop("devices/device3.key")
    assert after == before


def test_generate_makes_the_whole_set_in_an_empty_folder_only(tmp_path):
    folder = tmp_path / "secrets"
    created = secrets.generate(folder, FLEET)
    names = ["ca.crt", "ca.key", "cloud.crt", "cloud.key", "devices/device1.key", "devices/device2.key",
             "gateway.crt", "gateway.key"]
    assert sorted(str(path.relative_to(folder)) for path in created) == names
    assert sorted(snapshot(folder)) == names
    # Any file of the set makes the folder provisioned: nothing is added.
    for name in names:
        if name != "devices/device1.key":
            (folder / name).unlink()
    assert secrets.generate(folder, {**FLEET, 3: "192.168.1.4"}) == []
    assert sorted(snapshot(folder)) == ["devices/device1.key"]


def test_generate_leaves_nothing_when_it_fails_part_way(tmp_path):
    # A filesystem with room for a few files only: the device keys and the
    # CA fit, the cloud's certificate does not.
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=10", "tmpfs", str(mount)], check=True)
    try:
        with pytest.raises(OSError) as failed:
            secrets.generate(mount / "secrets", FLEET)
        assert failed.value.strerror == "No space left on device"
        assert secrets.present(mount / "secrets") == []
        assert [path.name for path in (mount / "secrets").rglob("*") if path.is_file()] == [".lock"]
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_device_key_open_to_others_is_refused(tmp_path):
    secrets.create(tmp_path, FLEET)
    path = secrets.device_key_path(tmp_path, 1)
    path.chmod(0o640)
    with pytest.raises(secrets.SecretError) as refused:
        secrets.read_device_key(tmp_path, 1)
    assert str(refused.value) == f"{path}: mode 0640 lets group or others at this key: chmod 600 {path}"


def test_a_device_key_shorter_than_32_bytes_is_refused(tmp_path):
    secrets.create(tmp_path, FLEET)
    path = secrets.device_key_path(tmp_path, 1)
    path.write_text(os.urandom(31).hex() + "\n")
    with pytest.raises(secrets.SecretError) as refused:
        secrets.read_device_key(tmp_path, 1)
    assert str(refused.value) == f"{path}: key of 31 bytes, at least 32 needed"
    path.write_text(os.urandom(32).hex() + "\n")
    assert len(secrets.read_device_key(tmp_path, 1)) == 32


def test_a_certificate_of_another_ca_than_the_folders_is_refused(tmp_path):
    own, other = tmp_path / "own", tmp_path / "other"
    secrets.create(own, FLEET)
    secrets.create(other, FLEET)
    shutil.copy(other / "ca.crt", own / "ca.crt")
    for make, role in ((secrets.server_tls, "cloud"), (secrets.client_tls, "gateway")):
        with pytest.raises(secrets.SecretError) as refused:
            make(own)
        assert str(refused.value) == (
            f"{own}/{role}.crt is not signed by {own}/ca.crt: the folder mixes two CAs, "
            f"and the peer would refuse the handshake"
        )


def test_a_key_of_another_certificate_is_refused(tmp_path):
    own, other = tmp_path / "own", tmp_path / "other"
    secrets.create(own, FLEET)
    secrets.create(other, FLEET)
    shutil.copy(other / "cloud.key", own / "cloud.key")
    with pytest.raises(secrets.SecretError, match=f"^{own}/cloud.key is not the key of {own}/cloud.crt$"):
        secrets.server_tls(own)


# -- the real daemons ---------------------------------------------------------


@pytest.fixture
def suite(make_suite):
    return make_suite(2)


#: What each host holds, per docs/security.md (no ca.key anywhere).
HOSTS = {
    "cloud": ["ca.crt", "cloud.crt", "cloud.key"],
    "gateway": ["ca.crt", "gateway.crt", "gateway.key", "devices/device1.key", "devices/device2.key"],
    "device1": ["devices/device1.key"],
    "device2": ["devices/device2.key"],
}


def provision(suite: Suite, made: Path) -> dict[str, Path]:
    """
    A secrets folder for each host, copied (with their modes) from the
    folder `meter certs` made.
    """
    folders = {}
    for host, names in HOSTS.items():
        folder = suite.root / f"host-{host}"
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(made / name, folder / name)
        folders[host] = folder
    return folders


def refusal(suite: Suite, plugin: str, *args: str) -> list[str]:
    """
    The output of C{plugin} refusing to start: it exits 1 by itself.
    """
    daemon = suite.start(plugin, plugin, *args)
    assert daemon.wait(30) == 1, daemon.tail()
    return daemon.lines


@pytest.mark.e2e
def test_hosts_provisioned_without_ca_key_keep_their_one_ca_and_deliver(suite):
    made = suite.root / "made"
    secrets.create(made, suite.fleet)
    folders = provision(suite, made)
    before = {host: snapshot(folder) for host, folder in folders.items()}
    # The configuration keeps the default [security] generate = true.
    cloud = suite.start("cloud", "meter-cloud", "--secrets", str(folders["cloud"]))
    cloud.wait_for(r"Factory \(TLS\) starting on")
    gateway = suite.start("gateway", "meter-gateway", "--secrets", str(folders["gateway"]))
    gateway.wait_for("GatewayProtocol starting on")
    for device_id in suite.fleet:
        device = suite.start(
            f"device {device_id}", "meter-device", "--id", str(device_id), "--once",
            "--secrets", str(folders[f"device{device_id}"]),
        )
        assert device.wait(30) == 0, device.tail()
    suite.wait_stored(2 * 4, cloud)
    yesterday = datetime.date.fromtimestamp(time.time()) - datetime.timedelta(days=1)
    assert suite.stored() == suite.expected_rows(yesterday)
    assert {host: snapshot(folder) for host, folder in folders.items()} == before
    for daemon in suite.daemons:
        assert not daemon.all_matching("created secret"), daemon.name


@pytest.mark.e2e
def test_a_fresh_folder_is_generated_once_and_each_file_logged(suite):
    cloud = suite.start_cloud()
    folder = suite.root / "var" / "secrets"
    created = sorted(m.group(1) for m in cloud.all_matching(r"created secret (\S+)$"))
    assert created == sorted(str(folder / name) for name in snapshot(folder))
    assert len(created) == 8
    gateway = suite.start_gateway()
    assert not gateway.all_matching("created secret")


@pytest.mark.e2e
def test_a_gateway_missing_a_device_key_refuses_to_start_and_invents_none(suite):
    made = suite.root / "made"
    secrets.create(made, suite.fleet)
    folder = provision(suite, made)["gateway"]
    (folder / "devices" / "device2.key").unlink()
    (folder / "gateway.key").unlink()
    before = snapshot(folder)
    lines = refusal(suite, "meter-gateway", "--secrets", str(folder))
    assert lines == [
        f"meter-gateway: missing {folder}/gateway.key, {folder}/devices/device2.key: provision them from the host "
        f"where `meter certs` made the suite's secrets ([security] generate creates secrets only in a folder "
        f"that holds none of them)"
    ]
    assert snapshot(folder) == before


@pytest.mark.e2e
def test_a_cloud_holding_only_ca_crt_refuses_to_start_and_keeps_it(suite):
    made = suite.root / "made"
    secrets.create(made, suite.fleet)
    folder = suite.root / "host-cloud"
    folder.mkdir()
    shutil.copy2(made / "ca.crt", folder / "ca.crt")
    lines = refusal(suite, "meter-cloud", "--secrets", str(folder))
    assert lines == [
        f"meter-cloud: missing {folder}/cloud.crt, {folder}/cloud.key: provision them from the host "
        f"where `meter certs` made the suite's secrets ([security] generate creates secrets only in a folder "
        f"that holds none of them)"
    ]
    assert snapshot(folder) == {"ca.crt": (made / "ca.crt").read_bytes()}


@pytest.mark.e2e
@pytest.mark.parametrize(
    "plugin, args, name",
    [
        ("meter-cloud", [], "cloud.key"),
        ("meter-gateway", [], "gateway.key"),
        ("meter-gateway", [], "devices/device2.key"),
        ("meter-device", ["--id", "1", "--once"], "devices/device1.key"),
    ],
)
def test_a_key_open_to_group_or_others_is_refused_at_start(suite, plugin, args, name):
    made = suite.root / "made"
    secrets.create(made, suite.fleet)
    (made / name).chmod(0o644)
    lines = refusal(suite, plugin, "--secrets", str(made), *args)
    assert lines == [f"{plugin}: {made / name}: mode 0644 lets group or others at this key: chmod 600 {made / name}"]


@pytest.mark.e2e
@pytest.mark.parametrize("plugin, args", [("meter-gateway", []), ("meter-device", ["--id", "2", "--once"])])
def test_a_short_device_key_is_refused_at_start(suite, plugin, args):
    made = suite.root / "made"
    secrets.create(made, suite.fleet)
    path = made / "devices" / "device2.key"
    path.write_text(os.urandom(16).hex() + "\n")
    lines = refusal(suite, plugin, "--secrets", str(made), *args)
    assert lines == [f"{plugin}: {path}: key of 16 bytes, at least 32 needed"]


@pytest.mark.e2e
def test_a_gateway_whose_ca_crt_is_another_cas_refuses_to_start(suite):
    # The split the old generate made: a ca.crt replaced under a kept
    # certificate.  The gateway says so at start instead of looping on
    # "certificate verify failed" while its devices are acknowledged.
    made, other = suite.root / "made", suite.root / "other"
    secrets.create(made, suite.fleet)
    secrets.create(other, suite.fleet)
    shutil.copy2(other / "ca.crt", made / "ca.crt")
    lines = refusal(suite, "meter-gateway", "--secrets", str(made))
    assert lines == [
        f"meter-gateway: {made}/gateway.crt is not signed by {made}/ca.crt: the folder mixes two CAs, "
        f"and the peer would refuse the handshake"
    ]


def test_a_refusal_names_ten_missing_files_and_counts_the_rest(tmp_path):
    paths = [secrets.device_key_path(tmp_path, device_id) for device_id in range(1, 5001)]
    with pytest.raises(secrets.SecretError) as refused:
        secrets.require(tmp_path, paths)
    message = str(refused.value)
    assert f"{paths[9]} and 4990 more files: provision them" in message
    assert str(paths[10]) not in message
