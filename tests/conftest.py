"""
Fixtures shared by the tests.  Never import the reactor here: pytest-
twisted installs it (setup.cfg passes --reactor=default).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from meter.tools.suite import Suite

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_root(monkeypatch) -> Path:
    """
    Run the test from the repository root, where etc/meter.toml lives.
    """
    monkeypatch.chdir(REPO_ROOT)
    return REPO_ROOT


@pytest.fixture
def make_suite(tmp_path):
    """
    Make loopback suites (L{meter.tools.suite.Suite}), each in a folder of
    its own under the test's C{tmp_path}, with the Suite's arguments; their
    daemons are stopped at the end of the test.
    """
    suites: list[Suite] = []

    def make(devices: int = 2, readings: int | None = 4, **settings) -> Suite:
        suite = Suite(tmp_path / f"suite{len(suites)}", devices, readings, **settings)
        suites.append(suite)
        return suite

    yield make
    for suite in suites:
        suite.stop()
