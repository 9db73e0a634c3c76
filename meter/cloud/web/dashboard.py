"""
The dashboard's files (L{meter.cloud.web.STATIC}): the page's own, in git,
and uPlot's, which the build copies from the npm registry's package
(`make vendor`: npm ci with package-lock.json) and which a checkout without
that build lacks.
"""

from __future__ import annotations

from pathlib import Path

#: The page's own files.
PAGE = ("index.html", "app.js", "app.css")
#: uPlot's, copied by the build.
VENDOR = ("vendor/uPlot.iife.min.js", "vendor/uPlot.min.css")


def missing(static: Path) -> str | None:
    """
    What the dashboard served from C{static} lacks, said for the cloud's
    log, or None when every file is there.
    """
    absent = [name for name in (*PAGE, *VENDOR) if not (static / name).is_file()]
    if not absent:
        return None
    how = " (make vendor copies uPlot there from node_modules, after npm ci)" if set(absent) & set(VENDOR) else ""
    return f"the dashboard cannot draw its charts: {', '.join(absent)} missing from {static}{how}"
