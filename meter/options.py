"""
Command-line options shared by the three twistd plugins: --config, and the
overrides each role maps onto keys of its configuration section.
"""

from __future__ import annotations

from pathlib import Path

from twisted.logger import Logger
from twisted.python import usage

from meter import config, logs, loopback, secrets


class MeterOptions(usage.Options):
    """
    Options of one role.  C{overrides} maps an option to its configuration
    key in the role's section; the option wins over the file.
    """

    role = ""
    log = Logger()
    #: option -> key of the role's section, or "section.key" of another.
    overrides: dict[str, str] = {}
    optParameters = [
        ["config", "c", None, "configuration file (default: etc/meter.toml if it exists, else the embedded defaults)"],
        ["secrets", None, None, "folder of the CA, certificates and device keys (config: [security] dir)"],
        ["log-format", None, "text", "text, or json: one JSON object a line, for journald and Loki (meter/logs.py)"],
    ]

    def postOptions(self):
        given: dict[str, dict] = {}
        for option, key in {**self.overrides, "secrets": "security.dir"}.items():
            section, _, name = key.rpartition(".")
            given.setdefault(section or self.role, {})[name] = self[option]
        try:
            logs.log_format(self["log-format"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        path = Path(self["config"]) if self["config"] is not None else None
        #: What the command line overrides, kept for reading the file again
        #: (the gateway's fleet on SIGHUP).
        self.given = given
        # A value refused (in the file or an option), a secret missing or
        # unsafe: one line naming the file, key or option, and a non-zero
        # exit.  Not a UsageError, which twistd prints after its whole usage
        # text, burying the one line that matters.
        try:
            self.config = config.load(path, given)
        except config.ConfigError as e:
            raise SystemExit(f"meter-{self.role}: {e}") from None
        # Before any secret is made: settings meant for loopback only.
        refused = loopback.refusal(self.role, self.config)
        if refused is not None:
            raise SystemExit(f"meter-{self.role}: {refused}")
        security = self.config.security
        try:
            if security["generate"]:
                for created in secrets.generate(security["dir"], self.config.fleet):
                    self.log.info("created secret {path}", path=str(created.absolute()))
            self._check()
        except (secrets.SecretError, usage.UsageError) as e:
            raise SystemExit(f"meter-{self.role}: {e}") from None
        except OSError as e:
            raise SystemExit(f"meter-{self.role}: cannot create secrets in {security['dir']}: {e} (none kept)") from None
        self._no_shared_pidfile()
        try:
            logs.configure(getattr(self, "parent", None), self["log-format"], self.logfile_name())
        except ValueError as e:
            raise SystemExit(f"meter-{self.role}: {e}") from None

    def _check(self) -> None:
        """
        Role-specific checks of the loaded configuration; raise UsageError
        (or SecretError for what the secrets folder lacks) naming the key or
        option: the start ends with its message alone.
        """

    def pidfile_name(self) -> str:
        return f"meter-{self.role}.pid"

    def logfile_name(self) -> str:
        """
        The log file of this daemon when it runs detached (see L{logs}).
        """
        return self.pidfile_name().removesuffix(".pid") + ".log"

    def _no_shared_pidfile(self) -> None:
        # twistd writes twistd.pid in the current folder by default, so a
        # second daemon started from the same folder would refuse to run.
        # In the foreground no pidfile is needed; a daemon gets its own.
        parent = getattr(self, "parent", None)
        if parent is None or parent.get("pidfile") != "twistd.pid":
            return
        parent["pidfile"] = "" if parent.get("nodaemon") else self.pidfile_name()
