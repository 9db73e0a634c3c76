"""
PostgreSQL for the daemons: where a database is (L{location}), and a
connection whose blocking calls run on a thread of its own, reconnected
with backoff when lost (L{runner}).  Shared by the cloud's store and its
read side; nothing here knows a table.
"""

from meter.postgres.location import PostgresLocation, is_postgres_uri
from meter.postgres.runner import ConnectionRunner, Unreachable, Unusable

__all__ = ["ConnectionRunner", "PostgresLocation", "Unreachable", "Unusable", "is_postgres_uri"]
