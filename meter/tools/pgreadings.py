"""
`meter readings` of a PostgreSQL database: one read-only connection, the
query, closed.  A command line blocks as it reads, so no reactor and no
thread: the queries of L{meter.cloud.pgqueries} run on the connection
directly.
"""

from __future__ import annotations

from meter.cloud import pgqueries

#: Seconds to wait for the server before saying it cannot be reached.
CONNECT_TIMEOUT = 10


def postgres_readings(location, query: dict, limit: int | None) -> tuple[list, bool]:
    """
    The readings C{query} (keywords of
    L{meter.cloud.interfaces.IReadingStore.readings}) selects in the
    database at C{location}, at most C{limit}, and whether more follow.
    L{ValueError} says why they cannot be read (never with the password).
    """
    import psycopg

    try:
        with psycopg.connect(location.uri, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as connection:
            pgqueries.read_only(connection)
            if pgqueries.schema_version(connection) is None:
                raise ValueError(f"{location} holds no meter cloud database (no meter_schema table)")
            found = pgqueries.readings(connection, **query, limit=None if limit is None else limit + 1)
    except psycopg.Error as e:
        # The driver's first line says what failed (a refused connection, a
        # wrong password); it names the host, never the password.
        cause = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"cannot read {location}: {cause}") from None
    more = limit is not None and len(found) > limit
    return found[:limit], more
