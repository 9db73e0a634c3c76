"""
Throwaway PostgreSQL clusters of Debian's server binaries, for the tests,
the bench and `meter demo`-like tools: made with C{initdb} in a temporary
folder, listening on a Unix socket in it only (no port, nothing shared with
another test session), stopped and removed at the end.

C{initdb} refuses to run as root, so as root the server runs as the
C{postgres} user (C{runuser -u postgres --}) in a folder that user owns.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import attrs

#: Where Debian puts each major version's server binaries.
DEBIAN_BINARIES = Path("/usr/lib/postgresql")


def server_binaries() -> Path | None:
    """
    The folder of the newest PostgreSQL server binaries installed
    (C{initdb}, C{pg_ctl}, C{postgres}), or None.
    """
    found = []
    if DEBIAN_BINARIES.is_dir():
        for version in DEBIAN_BINARIES.iterdir():
            if (version / "bin" / "initdb").exists() and version.name.isdigit():
                found.append((int(version.name), version / "bin"))
    if found:
        return max(found)[1]
    initdb = shutil.which("initdb")
    return None if initdb is None else Path(initdb).parent


def unavailable() -> str | None:
    """
    Why no cluster can be started here (a reason to skip a test), or None.
    """
    if server_binaries() is None:
        return "no PostgreSQL server binaries (Debian: apt-get install postgresql, or make postgres as root)"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and no postgres user to run the server as"
    return None


class ClusterError(Exception):
    """
    A cluster command failed; the message holds its output.
    """


@attrs.define
class Cluster:
    """
    One throwaway cluster in C{folder} (its data in C{folder}/data, its
    socket and log beside it), started by L{start}, removed by L{destroy}.

    @ivar durable: run with C{fsync} on (the bench's server); tests leave
        it off: a crash of the server process, which is what they cause,
        loses nothing the kernel holds.
    """

    folder: Path
    binaries: Path
    durable: bool = False

    @classmethod
    def create(cls, durable: bool = False, prefix: str = "meter-pg-") -> "Cluster":
        """
        A new cluster in a new temporary folder (short: a socket's path must
        fit 107 bytes), initialised but not started.
        """
        binaries = server_binaries()
        if binaries is None:
            raise ClusterError(unavailable())
        folder = Path(tempfile.mkdtemp(prefix=prefix))
        cluster = cls(folder, binaries, durable)
        try:
            if os.geteuid() == 0:
                shutil.chown(folder, "postgres", "postgres")
            folder.chmod(0o755)
            cluster._run("initdb", "-D", str(cluster.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8",
                         "--locale=C")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return cluster

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def socket_dir(self) -> Path:
        return self.folder

    @property
    def log_file(self) -> Path:
        return self.folder / "server.log"

    def uri(self, database: str = "postgres") -> str:
        """
        The connection URI of C{database} on this cluster, over its socket.
        """
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"

    def _command(self, program: str, *arguments: str) -> list[str]:
        command = [str(self.binaries / program), *arguments]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return command

    def _run(self, program: str, *arguments: str, timeout: float = 60.0) -> str:
        result = subprocess.run(
            self._command(program, *arguments), cwd=self.folder, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise ClusterError(f"{program} {' '.join(arguments)} failed ({result.returncode}): {result.stdout}{result.stderr}")
        return result.stdout

    def _options(self) -> str:
        options = f"-k {self.socket_dir} -c listen_addresses='' -c max_connections=200"
        if not self.durable:
            options += " -c fsync=off -c full_page_writes=off"
        return options

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_file), "-o", self._options(), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """
        Stop the server: C{fast} (sessions ended, a checkpoint) or
        C{immediate} (the processes killed; recovery at the next start).
        """
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_file), "-o", self._options(), "-m", mode, "-w",
                  "-t", "60", "restart")

    def running(self) -> bool:
        result = subprocess.run(self._command("pg_ctl", "-D", str(self.data), "status"), capture_output=True)
        return result.returncode == 0

    def sql(self, statement: str, database: str = "postgres") -> None:
        """
        Run C{statement} (autocommit) as the superuser.
        """
        import psycopg

        with psycopg.connect(self.uri(database), autocommit=True) as connection:
            connection.execute(statement)

    def create_database(self, name: str) -> str:
        """
        A new empty database C{name}; its URI.  A copy of C{template0}'s
        files: a few milliseconds.
        """
        self.sql(f'CREATE DATABASE "{name}" TEMPLATE template0 STRATEGY file_copy')
        return self.uri(name)

    def destroy(self) -> None:
        """
        Stop the server at once if it runs, and remove the folder.
        """
        try:
            if self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
