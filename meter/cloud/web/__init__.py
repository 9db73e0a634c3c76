"""
The cloud's web service (C{[cloud] web}): the dashboard at C{/}, its files
under C{/static/}, and the read-only API under C{/api/v1} (docs/api.md).

L{resource_tree} builds the resources given the read-side queries (an
L{meter.cloud.interfaces.IReadingQueries}) and the dashboard's folder
(L{STATIC}); L{WebSite} applies the rules every request meets; L{serve}
makes the service the tap starts.
"""

from pathlib import Path

from meter.cloud.web.service import serve
from meter.cloud.web.site import TokenError, WebSite, authorized, read_token, resource_tree

#: The dashboard's files, served under /static/ (its index.html at /).
STATIC = Path(__file__).resolve().parent / "static"

__all__ = ["STATIC", "TokenError", "WebSite", "authorized", "read_token", "resource_tree", "serve"]
