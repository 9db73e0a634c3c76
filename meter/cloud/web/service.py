"""
The web site served on C{[cloud] web} from the cloud's start to its stop.
"""

from __future__ import annotations

from meter.listening import SiteService


def serve(description: str, site, reactor) -> SiteService | None:
    """
    The web service on C{description}, or None when it is empty (off): once
    bound it logs C{web on http://HOST:PORT/}, and a port that cannot be
    bound ends the start in one line naming C{--web or [cloud] web}.
    """
    if not description:
        return None
    return SiteService(
        description, site, reactor, "meter-cloud", "the web API", "--web or [cloud] web", "web", "/"
    )
