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
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import httpx

from ari_push.model import Binding, PushMessage, PushOutcome, PushResult
from ari_push.netaddr import ip_of, is_public, parse_rules, rule_allows
from ari_push.push.common import (
    LazyClient,
    ResponseTooLarge,
    call_fields,
    closed_result,
    network_result,
    preload_http,
    read_capped,
    retry_after,
    tls_context,
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


def host_allowed(host: str, allowed: Sequence[str], port: int | None = None,
                 scheme: str = "https") -> tuple[bool, bool]:
    """(allowed, exactly listed). ``*.example.com`` matches names under example.com, not
    example.com itself and never an IP literal. An entry without a port allows only the scheme's
    default port (``port`` None means that port); ``host:8443`` that port; ``host:*`` any."""
    return rule_allows(parse_rules(tuple(allowed)), host, port, scheme)


def _ip(text: str) -> IpAddress | None:
    return ip_of(text)


def _public(ip: IpAddress) -> bool:
    return is_public(ip)


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
    explicit_port = port
    port = port or (443 if parts.scheme == "https" else 80)
    # The same URL as httpx reads it must name the same host: no parser differential.
    try:
        if httpx.URL(url).host.rstrip(".") != host:
            raise UrlRefused(f"host {host!r} is read differently by another parser")
    except httpx.InvalidURL:
        raise UrlRefused("URL does not parse") from None
    ok, exact = host_allowed(host, allowed, explicit_port, parts.scheme)
    if not ok:
        on_port = "" if explicit_port is None else f" (port {explicit_port})"
        raise UrlRefused(f"host {host!r}{on_port} is not in capture.vendor_allowed_hosts")
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


#: Vendor hosts with a pool of their own at once; the least recently used idle one is closed.
MAX_POOLS = 256


@dataclass(slots=True)
class _Pool:
    client: LazyClient
    busy: int = 0


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
        # One pool per (scheme, server name, address, port): a connection (and its TLS session,
        # verified for one name) is never reused for another name on the same address, and one
        # slow host cannot take the connections another host needs.
        self._pools: OrderedDict[tuple[str, str, str, int], _Pool] = OrderedDict()
        self._tls: ssl.SSLContext | None = None  # one for every pool: made once (warm), not per host
        self.closed = False

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = tls_context(self.settings.ca_file)
        return self._tls

    def _pool(self, target: Target) -> _Pool:
        key = (target.scheme, target.host, target.address, target.port)
        pool = self._pools.get(key)
        if pool is None:
            limit = self.settings.max_connections_per_host
            pool = _Pool(LazyClient(http2=False, ca_file=self.settings.ca_file, timeout=self.settings.timeout,
                                    limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit,
                                                        keepalive_expiry=30),
                                    verify=self._tls_context()))
            self._pools[key] = pool
        self._pools.move_to_end(key)
        return pool

    async def _trim(self) -> None:
        """Close the least recently used idle pools beyond MAX_POOLS."""
        while len(self._pools) > MAX_POOLS:
            idle = next((k for k, p in self._pools.items() if p.busy == 0), None)
            if idle is None:
                return
            await self._pools.pop(idle).client.aclose()

    def serves(self, binding: Binding) -> bool:
        return binding.push.provider == "vendor"

    async def warm(self) -> None:
        self._tls_context()  # pools are made per host, on first use; the TLS context now
        preload_http()

    async def aclose(self) -> None:
        self.closed = True
        pools, self._pools = list(self._pools.values()), OrderedDict()
        for pool in pools:
            await pool.client.aclose()

    async def send(self, binding: Binding, message: PushMessage) -> PushResult:
        if self.closed:
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
        pool = self._pool(target)
        pool.busy += 1
        try:
            client = pool.client.get()
            request = client.build_request(
                "POST",
                target.url,
                content=body,
                headers={"host": target.host_header, "content-type": self.settings.content_type},
                extensions=extensions,
            )
            response = await client.send(request, stream=True)
            try:
                status = response.status_code
                if 300 <= status < 400:
                    return PushResult(PushOutcome.FAILED, "redirect refused", status)
                await read_capped(response, self.settings.max_response_bytes)
            except ResponseTooLarge as exc:
                return PushResult(PushOutcome.FAILED, str(exc), status)
            finally:
                await response.aclose()
        finally:
            pool.busy -= 1
        if len(self._pools) > MAX_POOLS:
            await self._trim()
        if 200 <= status < 300:
            return PushResult(PushOutcome.DELIVERED, status=status)
        if status in (404, 410):
            return PushResult(PushOutcome.TOKEN_DEAD, f"HTTP {status}", status)
        if status == 429 or status >= 500:
            wait = retry_after(response.headers.get("retry-after"), time.time())
            return PushResult(PushOutcome.RETRY, f"HTTP {status}", status, retry_after=wait)
        return PushResult(PushOutcome.FAILED, f"HTTP {status}", status)
