"""The server's guards, each a small ASGI middleware in front of every route (the page included).

    app = BodyLimit(app, 50 << 20)                  # innermost
    app = SameOrigin(app, cors_origins)
    app = BasicAuth(app, {"user": "secret"})
    app = HostCheck(app, loopback_names)            # outermost (CORS, when asked for, goes around them)

- `BasicAuth`: HTTP Basic on EVERY path, compared in constant time (both names and passwords are hashed
  first, so not even their lengths leak, and every credential is compared). A1111 attaches its check
  route by route and misses extension routes (/sdapi/v1/loras); a middleware cannot miss one.
- `SameOrigin`: a browser page from another site must not start jobs on a server at 127.0.0.1. Browsers
  send `Origin` with every cross-origin POST, and a form post (`text/plain`) needs no CORS preflight,
  so a state-changing request whose Origin is not this server's own (Host) nor one of the CORS origins
  is refused, as ComfyUI does. Clients that are not browsers send no Origin and pass.
- `HostCheck`: against DNS rebinding (a hostile name that resolves to 127.0.0.1 makes its page "same
  origin"): a server bound to loopback answers only requests addressed to a loopback name.
- `BodyLimit`: the body is read (up to the limit) before the app sees it; more is a 413, whether the
  client declared its length or streamed it chunked. Starlette and uvicorn have no limit of their own.
"""

import base64
import binascii
import hashlib
import ipaddress
import secrets
from collections.abc import Callable, Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1, localhost and *.localhost (browsers resolve those to loopback themselves)."""
    host = host.strip().strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The name of a Host header: "127.0.0.1:7861" -> "127.0.0.1", "[::1]:7861" -> "::1"."""
    host = host_header.strip()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HostCheck:
    def __init__(self, app: ASGIApp, allowed: Callable[[str], bool]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] == "http":
            host = _header(scope, b"host")
            if host is not None and not self.allowed(host_name(host)):
                response = error_response(403, "Forbidden", f"requests addressed to {host_name(host)!r} are not "
                                          "served here (start the server with --allowed-hosts to add a name)")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class BasicAuth:
    REALM = 'Basic realm="sd15", charset="UTF-8"'

    def __init__(self, app: ASGIApp, credentials: dict[str, str]):
        if not credentials:
            raise ValueError("BasicAuth needs at least one user:password")
        self.app = app
        self._credentials = [(_digest(u), _digest(p)) for u, p in credentials.items()]

    def check(self, header: str | None) -> bool:
        if not header or not header[:6].lower() == "basic ":
            return False
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        if not sep:
            return False
        u, p = _digest(user), _digest(password)
        ok = False
        for known_user, known_password in self._credentials:      # all of them: the time says nothing
            ok |= secrets.compare_digest(u, known_user) & secrets.compare_digest(p, known_password)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] == "http" and not self.check(_header(scope, b"authorization")):
            response = error_response(401, "HTTPException", "Incorrect username or password",
                                      {"WWW-Authenticate": self.REALM})
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class SameOrigin:
    def __init__(self, app: ASGIApp, allowed_origins: Iterable[str] = ()):
        self.app = app
        self.allowed = {o.rstrip("/") for o in allowed_origins}

    def refused(self, scope: Scope) -> str | None:
        """Why this request is refused, or None."""
        if scope["method"] in SAFE_METHODS:
            return None
        origin = _header(scope, b"origin")
        if origin is None:
            if (_header(scope, b"sec-fetch-site") or "").lower() == "cross-site":
                return "a cross-site request without Origin"
            return None
        origin = origin.strip().rstrip("/")
        if "*" in self.allowed or origin in self.allowed:
            return None
        host = _header(scope, b"host") or ""
        scheme_host = origin.split("://", 1)
        if len(scheme_host) == 2 and scheme_host[0] in ("http", "https") and scheme_host[1].lower() == host.lower():
            return None
        return f"a request from the web page at {origin} (not this server, {host})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] == "http" and (why := self.refused(scope)):
            response = error_response(403, "Forbidden", f"cross-origin request refused: {why}. To let a page at "
                                      "another origin use this API, start the server with --cors-allow-origins")
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self):
        mb = self.max_bytes / (1 << 20)
        return error_response(413, "HTTPException", f"request body too large (at most {mb:g} MB)",
                              {"Connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            return await self._too_large()(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large()(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()          # after the body: http.disconnect when the client goes

        await self.app(scope, replay, send)


class SecurityHeaders:
    """Headers on every answer: the page's Content-Security-Policy (it loads only its own files), no MIME
    sniffing, no referrer."""

    def __init__(self, app: ASGIApp, headers: dict[str, str]):
        self.app = app
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {k for k, _ in message.get("headers", ())}
                message = {**message, "headers": [*message.get("headers", ()),
                                                  *((k, v) for k, v in self.headers if k not in present)]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
