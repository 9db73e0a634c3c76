"""
The systemd units of etc/systemd/: what each must say, and
`systemd-analyze verify` finding nothing wrong in them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "etc" / "systemd"
INSTALLED_TWISTD = "/opt/meter/bin/twistd"
PLUGINS = {
    "meter-cloud.service": "meter-cloud",
    "meter-gateway.service": "meter-gateway",
    "meter-device@.service": "meter-device",
}
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "CapabilityBoundingSet": "",
    "RestrictSUIDSGID": "yes",
    "SystemCallArchitectures": "native",
}


def settings(path: Path) -> dict[str, list[str]]:
    """
    Every C{Key=value} of a unit file, each key's values in order.
    """
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_unit_runs_its_plugin_as_a_notify_service_hardened(name):
    unit = settings(UNITS / name)
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["User"] == ["meter"]
    assert unit["StateDirectory"] == ["meter"]
    assert unit["ConfigurationDirectory"] == ["meter"]
    (command,) = unit["ExecStart"]
    words = command.split()
    assert words[:2] == [INSTALLED_TWISTD, "--nodaemon"]
    assert PLUGINS[name] in words and words[words.index("--config") + 1] == "/etc/meter/meter.toml"
    for key, value in HARDENING.items():
        assert unit[key] == [value], key
    assert "@system-service" in unit["SystemCallFilter"]
    if name == "meter-gateway.service":
        assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    if name == "meter-device@.service":
        assert words[-2:] == ["--id", "%i"]


def verify(*units: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_units(tmp_path):
    """
    The units, with ExecStart pointing at this virtualenv's twistd (verify
    checks that the program exists), and the template once as itself and
    once as device 3's instance: nothing said, exit 0.  A unit with a
    mistake in it, checked the same way, is reported.
    """
    twistd = Path(sys.executable).parent / "twistd"
    assert twistd.exists()
    for unit in UNITS.iterdir():
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED_TWISTD, str(twistd)))
    shutil.copy(tmp_path / "meter-device@.service", tmp_path / "meter-device@3.service")
    units = sorted(tmp_path.iterdir())
    assert [unit.name for unit in units] == [
        "meter-cloud.service", "meter-device@.service", "meter-device@3.service", "meter-gateway.service",
    ]
    checked = verify(*units)
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")

    broken = tmp_path / "broken" / "meter-cloud.service"
    broken.parent.mkdir()
    broken.write_text((tmp_path / "meter-cloud.service").read_text().replace("Type=notify", "Type=notifyy"))
    assert "Failed to parse service type" in verify(broken).stderr
