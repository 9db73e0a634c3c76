"""
The monitoring endpoint of a daemon: C{/metrics} (the Prometheus text
format), C{/healthz} and C{/readyz}, served by twisted.web on the
endpoint of C{[gateway] metrics} or C{[cloud] metrics} (option
C{--metrics}).

C{/metrics} is rendered on the reactor thread, in the request's own turn:
the collectors read the role's counters, which only the reactor thread
writes, so every scrape sees one consistent moment.
(C{prometheus_client.twisted.MetricsResource} collects in a thread pool,
where the counters would be read while the reactor changes them.)
"""

from __future__ import annotations

from typing import Callable

from prometheus_client.exposition import choose_encoder
from twisted.logger import Logger
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Site

from meter.listening import SiteService

log = Logger()

#: Why a daemon is not ready, or None when it is.
Readiness = Callable[[], "str | None"]

_TEXT = b"text/plain; charset=utf-8"


class MetricsPage(Resource):
    """
    C{GET /metrics}: every family of C{registry}, collected now, in the
    format the scraper's C{Accept} header asks for.
    """

    isLeaf = True

    def __init__(self, registry):
        Resource.__init__(self)
        self._registry = registry

    def render_GET(self, request) -> bytes:
        # The text format, or OpenMetrics for a scraper that asks for it.
        encode, content_type = choose_encoder((request.getHeader(b"accept") or b"").decode("latin-1"))
        try:
            body = encode(self._registry)
        except Exception:
            # A collector's fault: the scrape fails (Prometheus marks the
            # target down) and the daemon goes on.
            log.failure("collecting the metrics failed")
            request.setResponseCode(500)
            request.setHeader(b"content-type", _TEXT)
            return b"collecting the metrics failed: see the daemon's log\n"
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return body


class HealthPage(Resource):
    """
    C{GET /healthz}: 200 whenever the reactor answers, which is all it says.
    """

    isLeaf = True

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", _TEXT)
        return b"ok\n"


class ReadyPage(Resource):
    """
    C{GET /readyz}: 200 when C{ready()} finds nothing wrong, else 503 with
    what it found.
    """

    isLeaf = True

    def __init__(self, ready: Readiness):
        Resource.__init__(self)
        self._ready = ready

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", _TEXT)
        why = self._ready()
        if why is None:
            return b"ready\n"
        request.setResponseCode(503)
        return why.encode("utf-8") + b"\n"


class Pages(Resource):
    """
    The three pages, and a plain 404 for any other path.
    """

    def getChild(self, path, request):
        return notFound()


class MonitoringSite(Site):
    """
    The three pages.  Quiet: Prometheus scrapes every few seconds, and a
    log line each would drown what the daemon has to say.
    """

    noisy = False

    def __init__(self, registry, ready: Readiness):
        root = Pages()
        root.putChild(b"metrics", MetricsPage(registry))
        root.putChild(b"healthz", HealthPage())
        root.putChild(b"readyz", ReadyPage(ready))
        Site.__init__(self, root)

    def log(self, request) -> None:
        pass

    def logPrefix(self) -> str:
        return "monitoring"


def serve(description: str, registry, ready: Readiness, reactor, role: str) -> SiteService | None:
    """
    The monitoring service of a daemon of C{role} on the endpoint
    C{description}, or None when C{description} is empty (turned off).
    """
    if not description:
        return None
    return SiteService(
        description, MonitoringSite(registry, ready), reactor, f"meter-{role}", "metrics",
        f"--metrics or [{role}] metrics", "metrics", "/metrics",
    )
