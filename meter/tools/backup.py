"""
`meter backup SOURCE DEST` and `meter restore BACKUP DEST`: a copy of a
gateway's spool or a cloud's database, taken while its daemon runs, and
put back in place of a file no daemon holds.

The copy is SQLite's online backup (C{sqlite3.Connection.backup}) in one
step: one read transaction, so the copy is the database as of one commit,
whatever the daemon commits meanwhile.  In write-ahead-log mode a reader
never blocks the daemon's writers, and the daemon never waits for a lock
(L{meter.database.connect}): the backup costs it nothing but the pages it
cannot checkpoint until the copy ends.  The daemon's C{flock} on its file
(L{meter.database.hold}) is not touched: the backup takes none, so it is
neither blocked by a running daemon nor in its way.

A copy is written under a temporary name beside its destination, checked
(its C{application_id} and schema version those of the source,
C{PRAGMA quick_check} clean), made a single file (rollback-journal mode,
no C{-wal} beside it), synced, and only then given its name: a
destination holds a whole, checked copy or nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import os
import sqlite3
import sys
from pathlib import Path

import attrs

from meter.files import sync_folder
from meter import database
from meter.cloud import VERSIONS as CLOUD_VERSIONS
from meter.gateway.spool import VERSIONS as SPOOL_VERSIONS

SCHEMAS = {schema.application_id: schema for schema in (SPOOL_VERSIONS, CLOUD_VERSIONS)}
#: What each kind of file holds, for the summary line.
COUNTS = {
    database.GATEWAY_SPOOL: ("SELECT coalesce(sum(n), 0) FROM chunks", "readings not yet acknowledged by the cloud"),
    database.CLOUD_DATABASE: ("SELECT count(*) FROM readings", "readings"),
}
#: How long the backup's read may wait for a lock: only a checkpoint's
#: brief hold of the write-ahead log's index makes it wait.
READ_WAIT = 5.0


class BackupError(Exception):
    """
    A backup or restore refused or failed; the message names the file.
    """


@attrs.frozen
class Copy:
    """
    What a backup or restore wrote: the file, its kind and schema version,
    and how many readings it holds.
    """

    path: Path
    kind: str
    version: int
    readings: int
    description: str

    def summary(self) -> str:
        return f"{self.path}: {self.kind}, schema version {self.version}, {self.readings} {self.description}"


def _identity(connection: sqlite3.Connection, path: Path) -> tuple[database.Schema, int]:
    """
    The schema of the meter file open on C{connection}, and its version;
    refuses a file of no meter kind or of a version newer than this
    meter's.
    """
    try:
        (application_id,) = connection.execute("PRAGMA application_id").fetchone()
        schema = SCHEMAS.get(application_id)
        if schema is None:
            raise BackupError(f"{path}: not a gateway spool or a cloud database (application_id {application_id:#x})")
        return schema, database._version(connection, schema)
    except database.Unusable as e:
        raise BackupError(f"{path}: {e}") from None
    except sqlite3.Error as e:
        raise BackupError(f"{path}: {database._cause(e, path)}") from None


def _checked(connection: sqlite3.Connection, path: Path, schema: database.Schema, version: int) -> Copy:
    """
    The copy open on C{connection}, checked to be a sound file of C{schema}
    at C{version}.
    """
    copied, copied_version = _identity(connection, path)
    if copied is not schema or copied_version != version:
        raise BackupError(f"{path}: the copy is a {copied.kind} at version {copied_version}, not what was copied")
    problems = [" ".join(problem.split()) for (problem,) in connection.execute("PRAGMA quick_check(3)")]
    if problems != ["ok"]:
        raise BackupError(f"{path}: the copy is corrupt: PRAGMA quick_check says {'; '.join(problems)}")
    query, description = COUNTS[schema.application_id]
    (readings,) = connection.execute(query).fetchone()
    return Copy(path, schema.kind, version, readings, description)


def _copy(source: Path, target: Path) -> Copy:
    """
    Copy the meter file C{source} to a temporary file beside C{target},
    check the copy, and return it (the temporary file, not yet named
    C{target}).
    """
    if not source.is_file():
        raise BackupError(f"{source}: no such file")
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_of(target)
    temporary.unlink(missing_ok=True)
    reader = writer = None
    try:
        # Read-only: nothing is written to the file a daemon works with.
        reader = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=READ_WAIT)
        schema, version = _identity(reader, source)
        writer = sqlite3.connect(str(temporary), isolation_level=None)
        try:
            # pages=-1: every page in one step, under one read transaction.
            reader.backup(writer, pages=-1)
        except sqlite3.Error as e:
            raise BackupError(f"cannot copy {source}: {database._cause(e, source)}") from None
        # One self-contained file: no write-ahead log beside it to lose.
        writer.execute("PRAGMA journal_mode=DELETE")
        copy = _checked(writer, temporary, schema, version)
        writer.close()
        writer = None
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        return attrs.evolve(copy, path=target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        for connection in (reader, writer):
            if connection is not None:
                connection.close()


def _temporary_of(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


def backup(source: Path, destination: Path) -> Copy:
    """
    Copy the gateway spool or cloud database C{source} (its daemon may be
    running) to C{destination}, which must not exist.
    """
    if os.path.lexists(destination):
        raise BackupError(f"{destination} exists: not replaced (name a new file)")
    copy = _copy(source, destination)
    temporary = _temporary_of(destination)
    try:
        # link(2), not rename: fails if the name appeared meanwhile.
        os.link(temporary, destination)
    except FileExistsError:
        raise BackupError(f"{destination} exists: not replaced (name a new file)") from None
    finally:
        temporary.unlink(missing_ok=True)
    sync_folder(destination.absolute().parent)
    return copy


@contextlib.contextmanager
def _held(path: Path):
    """
    Hold C{path}'s C{flock} as a daemon does (L{meter.database.hold}):
    refused if a daemon holds it, and no daemon can start on it meanwhile.
    """
    descriptor = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(f"{path} is in use by a running meter daemon: stop it first") from None
        yield
    finally:
        os.close(descriptor)


COMPANIONS = ("", "-wal", "-shm", "-journal")


def restore(
    backup_file: Path, destination: Path, replace: bool = False, now: datetime.datetime | None = None
) -> tuple[Copy, Path | None]:
    """
    Put a copy of C{backup_file} at C{destination}, for a daemon to start
    on.  A destination a running daemon holds is refused; an existing one
    is replaced only with C{replace}, and then kept beside, renamed
    C{<destination>.before-restore-<time>} with its C{-wal} and C{-shm}
    (its write-ahead log may hold commits its main file lacks).  The copy
    made, and where the replaced file went.
    """
    with contextlib.ExitStack() as stack:
        aside = None
        if os.path.lexists(destination):
            if not destination.is_file():
                raise BackupError(f"{destination}: not a regular file")
            stack.enter_context(_held(destination))
            if not replace:
                raise BackupError(
                    f"{destination} exists: pass --replace to put the backup in its place (it is kept aside)"
                )
        copy = _copy(backup_file, destination)
        temporary = _temporary_of(destination)
        try:
            # Held before it takes its name: a daemon started meanwhile on
            # the new file is refused until the restore is done.
            stack.enter_context(_held(temporary))
            if os.path.lexists(destination):
                stamp = (now or datetime.datetime.now()).strftime("%Y%m%dT%H%M%S")
                aside = destination.with_name(f"{destination.name}.before-restore-{stamp}")
                for suffix in COMPANIONS:
                    if os.path.lexists(Path(f"{aside}{suffix}")):
                        raise BackupError(f"{aside}{suffix} exists: not replaced")
                for suffix in COMPANIONS:
                    companion = Path(f"{destination}{suffix}")
                    if os.path.lexists(companion):
                        os.rename(companion, f"{aside}{suffix}")
            os.rename(temporary, destination)
        finally:
            temporary.unlink(missing_ok=True)
        sync_folder(destination.absolute().parent)
    return copy, aside


def run_backup(args: argparse.Namespace) -> int:
    try:
        copy = backup(Path(args.source), Path(args.dest))
    except (BackupError, OSError) as e:
        print(f"meter backup: {e}", file=sys.stderr)
        return 1
    print(f"backed up {args.source} to {copy.summary()}")
    return 0


def run_restore(args: argparse.Namespace) -> int:
    try:
        copy, aside = restore(Path(args.backup), Path(args.dest), replace=args.replace)
    except (BackupError, OSError) as e:
        print(f"meter restore: {e}", file=sys.stderr)
        return 1
    if aside is not None:
        print(f"kept the replaced {args.dest} as {aside}")
    print(f"restored {args.backup} to {copy.summary()}")
    return 0


def register(commands) -> None:
    """
    The C{backup} and C{restore} commands, on the C{meter} command's
    subparsers C{commands}.
    """
    p = commands.add_parser(
        "backup",
        help="copy a gateway spool or a cloud database, safely while its daemon runs",
        description="Copy SOURCE (a gateway spool or a cloud database) to the new file DEST with SQLite's online "
        "backup: a consistent copy as of one commit, taken while the daemon runs, checked before it is named.",
    )
    p.add_argument("source", help="the spool or database (its daemon may be running)")
    p.add_argument("dest", help="the backup file to create (must not exist)")
    p.set_defaults(run=run_backup)

    p = commands.add_parser(
        "restore",
        help="put a backup in place of a spool or database no daemon is running on",
        description="Copy BACKUP to DEST for a daemon to start on.  Refused while a daemon holds DEST; an existing "
        "DEST is replaced only with --replace, and kept beside it as DEST.before-restore-<time>.",
    )
    p.add_argument("backup", help="a file `meter backup` made")
    p.add_argument("dest", help="where the daemon's configuration expects its spool or database")
    p.add_argument("--replace", action="store_true", help="replace an existing DEST (kept aside, not deleted)")
    p.set_defaults(run=run_restore)
