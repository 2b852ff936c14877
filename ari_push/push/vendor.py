"""Zoiper-style URL pushes: the phone registered an HTTP(S) URL (X-PUSH-URI); we POST to it.

The URL is attacker-controlled input (anyone who can REGISTER can set it), so every send
re-checks it, and the request goes to the address we checked (no second DNS look-up):

* scheme http or https, no user-info, no odd characters (parser-differential tricks);
* the host is on ``capture.vendor_allowed_hosts`` (exact name, or ``*.domain`` suffix);
* an IP-literal host that is not a public address must be listed exactly;
* a host matched by a ``*.domain`` rule must resolve to public addresses only (an exact
  entry trusts whatever its name resolves to: the admin named it);
* no redirects (a 3xx is FAILED), short timeouts, response body read up to a cap.

See docs/providers.md for the rules and how to allow Zoiper's push hosts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import httpx

from ari_push.model import Binding, PushMessage, PushOutcome, PushResult
from ari_push.push.common import (
    LazyClient,
    call_fields,
    closed_result,
    network_result,
    retry_after,
)
from ari_push.settings import VendorSettings

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Characters allowed in a push URL; anything else (space, backslash, quotes, controls,
#: non-ASCII) is refused outright rather than left to two parsers to disagree about.
URL_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
PLACEHOLDER = re.compile(r"\{(kind|call_id|caller_number|caller_name|callee|deadline)\}")


class UrlRefused(ValueError):
    """The push URL breaks a rule. The message names the rule and the host, never the path."""


@dataclass(frozen=True, slots=True)
class Target:
    """A checked push URL: where to connect (``address``) and what to call it (``host``)."""

    scheme: str
    host: str
    port: int
    address: str
    path: str  # path and query, as given

    @property
    def url(self) -> str:
        """The URL we actually request: the checked address, not the name."""
        netloc = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.scheme}://{netloc}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if self.port == default else f"{name}:{self.port}"


async def system_resolver(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def host_allowed(host: str, allowed: Sequence[str]) -> tuple[bool, bool]:
    """(allowed, exactly listed). ``*.example.com`` matches names under example.com, not
    example.com itself and never an IP literal."""
    host = host.lower().rstrip(".")
    is_ip = _ip(host) is not None
    for rule in allowed:
        rule = rule.lower().rstrip(".")
        if rule == host:
            return True, True
        if rule.startswith("*.") and not is_ip and host.endswith(rule[1:]) and len(host) > len(rule) - 1:
            return True, False
    return False, False


def _ip(text: str) -> IpAddress | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _public(ip: IpAddress) -> bool:
    return ip.is_global and not ip.is_multicast


def _host_for_log(url: str) -> str:
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


async def check_url(url: str, allowed: Sequence[str], resolve: Resolver = system_resolver) -> Target:
    """Apply every rule to ``url``; raise UrlRefused naming the broken one."""
    if not url or len(url) > 2048 or not URL_CHARS.fullmatch(url):
        raise UrlRefused("URL is empty, too long or has characters outside RFC 3986")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UrlRefused("URL does not parse") from None
    if parts.scheme not in ("http", "https"):
        raise UrlRefused(f"scheme {parts.scheme!r} is not http or https")
    if "@" in parts.netloc or parts.username is not None or parts.password is not None:
        raise UrlRefused("URL carries user-info")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UrlRefused("URL has no host")
    port = port or (443 if parts.scheme == "https" else 80)
    # The same URL as httpx reads it must name the same host: no parser differential.
    try:
        if httpx.URL(url).host.rstrip(".") != host:
            raise UrlRefused(f"host {host!r} is read differently by another parser")
    except httpx.InvalidURL:
        raise UrlRefused("URL does not parse") from None
    ok, exact = host_allowed(host, allowed)
    if not ok:
        raise UrlRefused(f"host {host!r} is not in capture.vendor_allowed_hosts")
    literal = _ip(host)
    if literal is not None:
        if not _public(literal) and not exact:
            raise UrlRefused(f"host {host!r} is a non-public address")
        address = str(literal)
    else:
        try:
            addresses = await resolve(host, port)
        except OSError:
            raise UrlRefused(f"host {host!r} does not resolve") from None
        ips = [ip for ip in (_ip(a) for a in addresses) if ip is not None]
        if not ips:
            raise UrlRefused(f"host {host!r} does not resolve")
        if not exact:
            private = [ip for ip in ips if not _public(ip)]
            if private:
                raise UrlRefused(f"host {host!r} resolves to a non-public address ({private[0]})")
        address = str(ips[0])
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return Target(parts.scheme, host, port, address, path)


def render_body(template: str, message: PushMessage, content_type: str) -> bytes:
    """Fill the fixed placeholders in one pass (a value that looks like a placeholder stays
    text). Values are JSON-escaped for JSON bodies, percent-encoded for form bodies."""
    fields = call_fields(message)
    fields["kind"] = fields.pop("type")
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype == "application/json" or ctype.endswith("+json"):
        def escape(value: str) -> str:
            return json.dumps(value)[1:-1]
    elif ctype == "application/x-www-form-urlencoded":
        def escape(value: str) -> str:
            return quote(value, safe="")
    else:
        def escape(value: str) -> str:
            return value
    return PLACEHOLDER.sub(lambda m: escape(fields[m.group(1)]), template).encode()


class VendorProvider:
    """POSTs to the URL a Zoiper-style app registered (binding.push.token)."""

    name = "vendor"

    def __init__(
        self,
        settings: VendorSettings,
        allowed_hosts: Sequence[str],
        *,
        resolve: Resolver = system_resolver,
    ) -> None:
        self.settings = settings
        self.allowed_hosts = tuple(h.lower() for h in allowed_hosts)
        self._resolve = resolve
        self._http = LazyClient(http2=False, ca_file=settings.ca_file, timeout=settings.timeout,
                                limits=httpx.Limits(max_connections=50, max_keepalive_connections=10,
                                                    keepalive_expiry=30))

    def serves(self, binding: Binding) -> bool:
        return binding.push.provider == "vendor"

    async def warm(self) -> None:
        self._http.get()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, binding: Binding, message: PushMessage) -> PushResult:
        if self._http.closed:
            return closed_result()
        url = binding.push.token
        try:
            async with asyncio.timeout(self.settings.timeout):
                return await self._send(url, message)
        except UrlRefused as exc:
            log.warning("vendor push to %s refused: %s", _host_for_log(url), exc)
            return PushResult(PushOutcome.FAILED, f"URL refused: {exc}")
        except TimeoutError:
            return PushResult(PushOutcome.RETRY, f"timeout after {self.settings.timeout:g}s")
        except httpx.HTTPError as exc:
            return network_result(exc)

    async def _send(self, url: str, message: PushMessage) -> PushResult:
        target = await check_url(url, self.allowed_hosts, self._resolve)
        body = render_body(self.settings.body_template, message, self.settings.content_type)
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        request = self._http.get().build_request(
            "POST",
            target.url,
            content=body,
            headers={"host": target.host_header, "content-type": self.settings.content_type},
            extensions=extensions,
        )
        response = await self._http.get().send(request, stream=True)
        try:
            status = response.status_code
            if 300 <= status < 400:
                return PushResult(PushOutcome.FAILED, "redirect refused", status)
            declared = response.headers.get("content-length", "")
            cap = self.settings.max_response_bytes
            if declared.isdigit() and int(declared) > cap:
                return PushResult(PushOutcome.FAILED, f"response larger than {cap} bytes", status)
            size = 0
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > cap:
                    return PushResult(PushOutcome.FAILED, f"response larger than {cap} bytes", status)
        finally:
            await response.aclose()
        if 200 <= status < 300:
            return PushResult(PushOutcome.DELIVERED, status=status)
        if status in (404, 410):
            return PushResult(PushOutcome.TOKEN_DEAD, f"HTTP {status}", status)
        if status == 429 or status >= 500:
            wait = retry_after(response.headers.get("retry-after"), time.time())
            return PushResult(PushOutcome.RETRY, f"HTTP {status}", status, retry_after=wait)
        return PushResult(PushOutcome.FAILED, f"HTTP {status}", status)
