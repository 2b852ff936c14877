"""Who may read the console and who may press its buttons (docs/operations.md, "Console").

Pure functions over a request's method, path and headers; no sockets, so every rule is a unit test.

* **Authentication** (optional): a bearer token (``[http] auth_token_file``: scrapers, scripts)
  and/or basic auth (``[http] basic_auth_file``, ``user:password``: browsers), each compared in
  constant time. When one is configured, /metrics, /console and /api/ need it; /healthz and
  /readyz (probes) and the dialplan's routes never do.
* **Host check** (DNS rebinding): a page on some web site whose name an attacker points at
  127.0.0.1 reaches the console with that name as Host. When the server is bound to one address,
  the console and the API answer only a Host naming that address, or loopback.
* **CSRF** for the actions (forget, test-push): a POST must carry the per-daemon random token
  the console page embeds, in the ``X-CSRF-Token`` header (a cross-site form cannot set a
  header, and a cross-site script cannot read the page to learn it), a JSON content type (a form
  cannot send one), and, when the browser sends them, an Origin equal to the Host and a
  Sec-Fetch-Site of same-origin.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ari_push.health import HttpRequest, HttpResponse, is_loopback

CSRF_HEADER = "x-csrf-token"


def _refusal(status: int, error: str, headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
    return HttpResponse(status, json.dumps({"error": error}), "application/json",
                        headers=(("X-Content-Type-Options", "nosniff"), *headers))


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "surrogateescape"), b.encode("utf-8", "surrogateescape"))


def host_name(host_header: str) -> str:
    """``[::1]:9387`` -> ``::1``; ``localhost:9387`` -> ``localhost``; lower-cased."""
    value = host_header.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        return value.partition(":")[0]
    return value


@dataclass(frozen=True)
class Access:
    bearer_token: str = field(default="", repr=False)
    basic_auth: str = field(default="", repr=False)  # user:password
    bound_host: str = "127.0.0.1"  # the address the server listens on ("" or 0.0.0.0: every address)
    csrf_token: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)

    @property
    def authenticated(self) -> bool:
        return bool(self.bearer_token or self.basic_auth)

    # ---------------------------------------------------------------- reading

    def check(self, request: HttpRequest) -> HttpResponse | None:
        """The server's guard: None lets the request through, else the refusal to send."""
        if self.authenticated and not self.credentials_ok(request.headers.get("authorization", "")):
            challenge = (("WWW-Authenticate", 'Basic realm="ari-push", charset="UTF-8"'),) if self.basic_auth else (
                ("WWW-Authenticate", 'Bearer realm="ari-push"'),)
            return _refusal(401, "authentication required", challenge)
        if request.path != "/metrics" and not self.host_ok(request.headers.get("host", "")):
            return _refusal(403, "this Host is not the console's address")
        return None

    def credentials_ok(self, authorization: str) -> bool:
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and self.bearer_token:
            return _same(value, self.bearer_token)
        if scheme.lower() == "basic" and self.basic_auth:
            try:
                decoded = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return False
            return _same(decoded, self.basic_auth)
        return False

    def host_ok(self, host_header: str) -> bool:
        if not host_header:
            return False  # HTTP/1.1 requires Host; browsers always send it
        name = host_name(host_header)
        if self.bound_host in ("", "0.0.0.0", "::"):  # every address: no single name to check
            return True
        return is_loopback(name) or name == self.bound_host.lower()

    # ---------------------------------------------------------------- acting

    def action_refusal(self, request: HttpRequest) -> HttpResponse | None:
        """None when a POST action may run; else why not (403 / 415)."""
        ctype = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if ctype != "application/json":
            return _refusal(415, "actions take application/json")
        if not _same(request.headers.get(CSRF_HEADER, ""), self.csrf_token):
            return _refusal(403, "missing or wrong CSRF token (reload the console page)")
        origin = request.headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin)
            if parts.netloc.lower() != request.headers.get("host", "").strip().lower():
                return _refusal(403, "cross-origin request refused")
        fetch_site = request.headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site not in ("same-origin", "none"):
            return _refusal(403, "cross-site request refused")
        return None
