"""
Fixtures shared by the unit tests.  Never import the reactor here: pytest-
twisted installs it (setup.cfg passes --reactor=default).
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_root(monkeypatch) -> Path:
    """
    Run the test from the repository root, where etc/meter.toml lives.
    """
    monkeypatch.chdir(REPO_ROOT)
    return REPO_ROOT
