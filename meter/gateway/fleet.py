"""
The gateway's fleet taken again from the configuration file on SIGHUP: the
devices it expects and their keys, swapped in between two datagrams, while
open rounds go on.  A file that cannot be taken (TOML errors, a value
refused, a key file missing or unsafe) is refused with one line naming the
file and the cause, and the fleet in use is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from meter import config, secrets

#: How many runs of ids a line names before it counts the rest.
NAMED_RUNS = 10


def id_runs(device_ids) -> str:
    """
    C{device_ids} as runs, for a line: C{"5, 7-5006, 9000"}, the first
    L{NAMED_RUNS} runs and then how many ids more.
    """
    runs: list[list[int]] = []
    for device_id in sorted(device_ids):
        if runs and runs[-1][1] + 1 == device_id:
            runs[-1][1] = device_id
        else:
            runs.append([device_id, device_id])
    named = [str(low) if low == high else f"{low}-{high}" for low, high in runs[:NAMED_RUNS]]
    rest = sum(high - low + 1 for low, high in runs[NAMED_RUNS:])
    return ", ".join(named) + (f" and {rest} more" if rest else "")


@attrs.frozen
class FleetChange:
    """
    What a reload changed: the devices added and removed, those whose
    address changed and those whose key changed.
    """

    added: frozenset[int]
    removed: frozenset[int]
    readdressed: frozenset[int]
    rekeyed: frozenset[int]

    @classmethod
    def between(
        cls, fleet: dict[int, str], keys: dict[int, bytes], new_fleet: dict[int, str], new_keys: dict[int, bytes]
    ) -> FleetChange:
        kept = fleet.keys() & new_fleet.keys()
        return cls(
            frozenset(new_fleet.keys() - fleet.keys()),
            frozenset(fleet.keys() - new_fleet.keys()),
            frozenset(d for d in kept if fleet[d] != new_fleet[d]),
            frozenset(d for d in kept if keys.get(d) != new_keys.get(d)),
        )

    def summary(self) -> str:
        def count(ids: frozenset[int], what: str) -> str:
            return f"{len(ids)} {what}" + (f" ({id_runs(ids)})" if ids else "")

        text = ", ".join(
            (count(self.added, "added"), count(self.removed, "removed"), count(self.readdressed, "changed address"))
        )
        if self.rekeyed:
            text += f"; keys changed: {id_runs(self.rekeyed)}"
        return text


def file_loader(path: Path | None, overrides: dict, folder: Path) -> Callable[[], tuple[dict[int, str], dict[int, bytes]]]:
    """
    What a reload reads: the fleet of the configuration file C{path} (as
    the gateway started with it: C{overrides} from its command line; None:
    the embedded defaults) and the key of each of its devices in C{folder}.
    """

    def load() -> tuple[dict[int, str], dict[int, bytes]]:
        fleet = config.load(path, overrides).fleet
        return fleet, secrets.read_fleet_keys(folder, fleet)

    return load


class FleetReload:
    """
    Takes the fleet again when asked (L{reload}, on the reactor thread: the
    gateway's SIGHUP), hands it to C{apply} and logs what changed.

    @param load: reads the new fleet and its keys; raises
        L{config.ConfigError} or L{secrets.SecretError} naming the file.
    @param apply: swaps a fleet and its keys in; returns False when it
        could not (the gateway stopped while the files were read).
    @param fleet: the fleet in use.
    @param keys: its devices' keys.
    @param source: the file it is read from, for the lines.
    @param run: runs C{load}, the Deferred of its result: the daemon's runs
        it in a thread, as reading thousands of key files takes a few
        hundred milliseconds the datagrams must not wait for; by default
        it runs at once.
    """

    log = Logger()

    def __init__(
        self,
        load: Callable[[], tuple[dict[int, str], dict[int, bytes]]],
        apply: Callable[[dict[int, str], dict[int, bytes]], bool | None],
        fleet: dict[int, str],
        keys: dict[int, bytes],
        source: str,
        log: Logger | None = None,
        run: Callable[[Callable], Deferred] = maybeDeferred,
    ):
        self._load = load
        self._run = run
        #: The reload under way, and whether another was asked for meanwhile.
        self._loading: Deferred | None = None
        self._again = False
        self._apply = apply
        self.fleet = fleet
        self.keys = keys
        self._source = source
        if log is not None:
            self.log = log

    def reload(self) -> Deferred:
        """
        Read the fleet and its keys and swap them in: a Deferred firing with
        what changed, or None if the file was refused (the fleet in use
        kept).  Asked again while reading, it reads once more afterwards,
        so the last change to the file is the one taken.
        """
        if self._loading is not None:
            self._again = True
            return self._loading
        self._loading = d = self._run(self._load)
        d.addCallback(self._loaded)
        d.addErrback(self._refused)
        d.addBoth(self._done)
        return d

    def _done(self, result):
        self._loading = None
        if self._again:
            self._again = False
            self.reload()
        return result

    def _refused(self, failure) -> None:
        if failure.check(config.ConfigError, secrets.SecretError):
            self.log.error("fleet not reloaded, the fleet in use is kept: {error}", error=failure.getErrorMessage())
        elif failure.check(OSError):
            self.log.error(
                "fleet not reloaded, the fleet in use is kept: {source}: {error}",
                source=self._source, error=failure.getErrorMessage(),
            )
        else:
            # Not a file the operator can fix: a fault of the gateway's own.
            self.log.failure("fleet reload from {source} failed", failure, source=self._source)
        return None

    def _loaded(self, loaded: tuple[dict[int, str], dict[int, bytes]]) -> FleetChange:
        # On the reactor thread, between two datagrams.
        fleet, keys = loaded
        change = FleetChange.between(self.fleet, self.keys, fleet, keys)
        if self._apply(fleet, keys) is False:
            self.log.info("fleet read from {source} after the gateway stopped: not applied", source=self._source)
            return None
        self.fleet, self.keys = fleet, keys
        self.log.info(
            "fleet reloaded from {source}: {summary}; {n} devices expected",
            source=self._source,
            summary=change.summary(),
            n=len(fleet),
        )
        return change
