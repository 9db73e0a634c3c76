"""
A PostgreSQL database named by a connection URI
(C{postgresql://user:password@host:port/dbname}, or a Unix socket's folder
as C{?host=/path}), checked at start and told in logs without its password.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import attrs

SCHEMES = ("postgresql://", "postgres://")


def is_postgres_uri(value: str) -> bool:
    return value.startswith(SCHEMES)


@attrs.frozen
class PostgresLocation:
    """
    Where a PostgreSQL database is.  C{str()} and C{repr()} never show the
    password: both are what logs and messages print.

    @ivar uri: the connection URI as given, for the driver only.
    """

    uri: str = attrs.field(repr=False)

    @classmethod
    def parse(cls, value: str) -> "PostgresLocation":
        """
        The location C{value} names, or L{ValueError} saying what is wrong
        (without the password).
        """
        if not is_postgres_uri(value):
            raise ValueError("expected a postgresql:// URI")
        from psycopg.conninfo import conninfo_to_dict

        try:
            conninfo_to_dict(value)
        except Exception as e:
            # The driver's message may quote the URI: say only that it is bad.
            raise ValueError(f"not a valid PostgreSQL connection URI ({type(e).__name__})") from None
        return cls(value)

    @property
    def where(self) -> str:
        """
        C{host/dbname} (the socket's folder for a Unix socket, C{:port} if
        given): what an operator needs to find the database.
        """
        parts = urlsplit(self.uri)
        query = parse_qs(parts.query)
        host = query.get("host", [parts.hostname or ""])[0] or "localhost"
        port = query.get("port", [None])[0]
        try:
            port = port or parts.port
        except ValueError:
            port = None
        database = query.get("dbname", [parts.path.lstrip("/")])[0] or (parts.username or "")
        return f"{host}{'' if port is None else f':{port}'}/{database}"

    def __str__(self) -> str:
        return f"postgresql {self.where}"

    def __repr__(self) -> str:
        return f"PostgresLocation({self.where!r})"
