"""
In-memory implementations of meter's storage interfaces, for tests of the
code that uses them and for anyone embedding meter: each behaves as the real
SQLite implementation does, which the contract tests in tests/contracts/
prove by running one test body over both.
"""

from __future__ import annotations

# -- the gateway's spool (meter.gateway.interfaces.ISpool) ---------------------


# -- the cloud's reading store (meter.cloud.interfaces.IReadingStore) ----------
