"""
The cloud's web site: the dashboard's files and the API behind one set of
rules applied to every request before any page sees it: read-only (GET and
HEAD), the token when one is configured, the security headers, and no
traceback page ever.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from pathlib import Path

from twisted.logger import Logger
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.static import File

from meter.cloud.web.api import Api, JsonError, PAGE_READINGS

log = Logger()

#: Only the page's own files: no inline script or style, no other origin,
#: no framing, no form posting anywhere.
CONTENT_SECURITY_POLICY = (
    b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
    b"frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
HEADERS = {
    b"content-security-policy": CONTENT_SECURITY_POLICY,
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
}
READ_METHODS = (b"GET", b"HEAD")


def authorized(header: bytes | None, token: bytes) -> bool:
    """
    Whether an C{Authorization} header carries C{token}: as a bearer token
    or as the password of basic authentication (any user name), compared
    in constant time.
    """
    if not header:
        return False
    scheme, _, credentials = header.strip().partition(b" ")
    credentials = credentials.strip()
    scheme = scheme.lower()
    if scheme == b"bearer":
        return hmac.compare_digest(credentials, token)
    if scheme == b"basic":
        try:
            decoded = base64.b64decode(credentials, validate=True)
        except (binascii.Error, ValueError):
            return False
        _, colon, password = decoded.partition(b":")
        return bool(colon) and hmac.compare_digest(password, token)
    return False


class StaticFiles(File):
    """
    The dashboard's files: a folder's listing is never shown.
    """

    childNotFound = notFound()
    forbidden = notFound()

    def directoryListing(self):
        return notFound()


class Root(Resource):
    """
    C{/}: the dashboard's index.html; C{/static/}: its files; C{/api/}.
    """

    def __init__(self, api: Resource, static: Path):
        Resource.__init__(self)
        self.putChild(b"api", api)
        self.putChild(b"static", StaticFiles(str(static)))
        index = static / "index.html"
        self.putChild(b"", File(str(index)) if index.is_file() else notFound())

    def getChild(self, path, request):
        return notFound()


class WebRequest(Request):
    """
    A request whose unforeseen failure (a fault of the code, not of the
    request) is logged once and answered with a JSON 500, never with
    twisted.web's HTML page.
    """

    def processingFailed(self, reason):
        log.failure("answering {method} {uri} failed", reason, method=self.method.decode("latin-1"),
                    uri=self.uri.decode("latin-1"))
        if self.finished or self._disconnected:
            return reason
        if self.startedWriting:
            # The status line is gone: only a cut connection tells the client.
            self.loseConnection()
            return reason
        body = b'{"error":"internal error; see the cloud\'s log"}\n'
        self.setResponseCode(500)
        self.setHeader(b"content-type", b"application/json")
        self.setHeader(b"content-length", b"%d" % len(body))
        self.write(body)
        self.finish()
        return reason


class WebSite(Site):
    """
    The site, with the rules of the module applied to every request.

    @param token: what a request must carry (L{authorized}), or None when
        the site is on loopback only.
    """

    displayTracebacks = False
    noisy = False
    requestFactory = WebRequest

    def __init__(self, root: Resource, token: bytes | None = None):
        Site.__init__(self, root)
        self._token = token

    def getResourceFor(self, request):
        for name, value in HEADERS.items():
            request.setHeader(name, value)
        if request.method not in READ_METHODS:
            return JsonError(405, "read-only: only GET and HEAD", {b"allow": b"GET, HEAD"})
        if self._token is not None and not authorized(request.getHeader(b"authorization"), self._token):
            return JsonError(
                401, "a token is required: Authorization: Bearer <token>, or basic authentication with the token as "
                "the password", {b"www-authenticate": b'Bearer realm="meter", Basic realm="meter"'},
            )
        return Site.getResourceFor(self, request)

    def log(self, request) -> None:
        # No access log: the dashboard polls, and a line a request would
        # drown what the cloud has to say.
        pass

    def logPrefix(self) -> str:
        return "web"


def resource_tree(queries, static: Path, clock, zone=None, page: int = PAGE_READINGS) -> Resource:
    """
    The site's resources: the dashboard's files from C{static} (its
    index.html at C{/}) and the API over C{queries} (an
    L{meter.cloud.interfaces.IReadingQueries}); C{clock} and C{zone} (None:
    the cloud's local zone) tell which day is the last complete one.
    """
    return Root(Api(queries, clock, zone, page), static)


class TokenError(ValueError):
    """
    The token file cannot be used; the message names it and says why.
    """


def read_token(path: Path) -> bytes:
    """
    The token held in the file at C{path} (surrounding whitespace and a
    final newline dropped): at least 16 characters, else refused.
    """
    try:
        token = path.read_bytes().strip()
    except OSError as e:
        raise TokenError(f"cannot read the web token file {path}: {e.strerror} ([cloud] web_token_file)") from None
    if len(token) < 16:
        raise TokenError(
            f"the web token file {path} holds {'no token' if not token else 'a token under 16 characters'} "
            f"([cloud] web_token_file; make one with: head -c 24 /dev/urandom | base64 > {path})"
        )
    return token
