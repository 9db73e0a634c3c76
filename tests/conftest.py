"""
Fixtures shared by the tests.  Never import the reactor here: pytest-
twisted installs it (setup.cfg passes --reactor=default).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from meter.tools import pgcluster
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


@pytest.fixture(scope="session")
def postgres_cluster():
    """
    A throwaway PostgreSQL cluster for the test session
    (L{meter.tools.pgcluster.Cluster}), on a Unix socket of its own; the
    test skips where none can be started (no server binaries).  Always
    torn down.  A test that stops or restarts it starts it again.
    """
    reason = pgcluster.unavailable()
    if reason is not None:
        pytest.skip(reason)
    cluster = pgcluster.Cluster.create()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def postgres_database(postgres_cluster, request):
    """
    The URI of a new empty database on the session's cluster, for this
    test alone (the server started again if a test before left it stopped).
    """
    if not postgres_cluster.running():
        postgres_cluster.start()
    postgres_database.count += 1
    return postgres_cluster.create_database(f"test_{postgres_database.count}")


postgres_database.count = 0
