"""Address rules shared by the contact parser (capture time) and the URL providers (send time).

* Allow-list entries (``[capture] vendor_allowed_hosts``, ``webpush_allowed_hosts``): ``host``,
  ``host:port``, ``*.domain``, ``*.domain:port``, an IPv4 literal with an optional port, or an
  IPv6 literal in brackets (``[2001:db8::1]:8443``). An entry without a port allows the URL
  scheme's default port only (80 for http, 443 for https): allowing ``127.0.0.1`` does not
  allow ``http://127.0.0.1:8088/ari/...``. ``host:*`` allows every port of the host (an
  explicit choice, for test rigs whose push servers take free ports). A wildcard never matches an IP literal, never the
  bare domain, and must name at least two labels (``*.com`` is refused).
* Public addresses: an address counts as public only when Python calls it global, it is not
  multicast, and any IPv4 address it embeds (IPv4-mapped ``::ffff:0:0/96``, IPv4-compatible
  ``::/96``, NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/48``, 6to4 ``2002::/16``, Teredo
  ``2001::/32``) is public too.

Pure functions, no I/O.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PORTS = {"http": 80, "https": 443}
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9_-]*[a-z0-9])?", re.ASCII)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_COMPAT = ipaddress.IPv6Network("::/96")


@dataclass(frozen=True, slots=True)
class HostRule:
    """One allow-list entry. ``port`` None: the scheme's default port only; 0: any port."""

    host: str  # lower-case; "*.example.com" for a wildcard; an IPv6 literal without brackets
    port: int | None = None

    @property
    def wildcard(self) -> bool:
        return self.host.startswith("*.")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port is None:
            return host
        return f"{host}:{self.port or '*'}"


@functools.lru_cache(maxsize=64)
def parse_rules(entries: tuple[str, ...]) -> tuple[HostRule, ...]:
    """The entries that are rules; one that is not (refused at load time anyway) allows nothing.
    Cached: the same allow-list is checked on every capture and every send."""
    rules = []
    for entry in entries:
        try:
            rules.append(parse_host_rule(entry))
        except ValueError:
            continue
    return tuple(rules)


def parse_host_rule(entry: str) -> HostRule:
    """Read one allow-list entry; ValueError (with the reason) when it is not one."""
    text = str(entry).strip().lower()
    port: int | None = None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"{entry!r}: unclosed [")
        host, after = text[1:close], text[close + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{entry!r}: not an IPv6 address in brackets") from None
        if after:
            if not after.startswith(":"):
                raise ValueError(f"{entry!r}: junk after the address")
            port = _port(after[1:], entry)
        return HostRule(host, port)
    host, colon, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if colon:
        if ":" in host:
            raise ValueError(f"{entry!r}: write an IPv6 address in brackets, e.g. [2001:db8::1]:443")
        port = _port(port_text, entry)
    host = host.removesuffix(".")
    if not host or "/" in host or "@" in host:
        raise ValueError(f"{entry!r} is not a host name, *.domain or IP address")
    if host.startswith("*."):
        labels = host[2:].split(".")
        if len(labels) < 2:
            raise ValueError(f"{entry!r} would allow every name under a top-level domain; name the domain "
                             "(e.g. *.push.example.com)")
    else:
        labels = host.split(".")
    if "*" in host.removeprefix("*.") or not all(len(x) <= 63 and _LABEL.fullmatch(x) for x in labels):
        raise ValueError(f"{entry!r} is not a host name, *.domain or IP address")
    if host.startswith("*.") and (ip_of(host[2:]) is not None or labels[-1].isdigit()):
        raise ValueError(f"{entry!r}: a wildcard cannot cover IP addresses")
    return HostRule(host, port)


def _port(text: str, entry: str) -> int:
    if text == "*":
        return 0
    if not text.isdigit() or len(text) > 5 or not 0 < int(text) < 65536:
        raise ValueError(f"{entry!r}: bad port")
    return int(text)


def rule_allows(rules: tuple[HostRule, ...], host: str, port: int | None, scheme: str) -> tuple[bool, bool]:
    """(allowed, exactly listed) for a URL's host and port (None: the scheme's default)."""
    host = host.lower().removesuffix(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    effective = port if port is not None else DEFAULT_PORTS.get(scheme)
    is_ip = ip_of(host) is not None or host.rsplit(".", 1)[-1].isdigit()
    for rule in rules:
        wanted = rule.port if rule.port is not None else DEFAULT_PORTS.get(scheme)
        if rule.port != 0 and (effective is None or wanted != effective):
            continue
        if rule.wildcard:
            suffix = rule.host[1:]  # ".example.com"
            if not is_ip and host.endswith(suffix) and len(host) > len(suffix):
                return True, False
        elif _same_host(rule.host, host):
            return True, True
    return False, False


def _same_host(a: str, b: str) -> bool:
    # Spelled the same, nothing looser: "::ffff:127.0.0.1" is not "127.0.0.1" unless listed so.
    return a == b


def ip_of(text: str) -> IpAddress | None:
    """The IP address a host string is, else None (IPv4-mapped IPv6 reads as its IPv4)."""
    try:
        ip = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def embedded_ipv4(ip: IpAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 transition address carries, or None."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64 or ip in _COMPAT:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64_LOCAL:  # RFC 8215: local-use prefix, any RFC 6052 length; /96 is the common one
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def is_public(ip: IpAddress) -> bool:
    """True only for a global unicast address whose embedded IPv4 address (if any) is too."""
    if not ip.is_global or ip.is_multicast:
        return False
    inner = embedded_ipv4(ip)
    if inner is not None and (not inner.is_global or inner.is_multicast):
        return False
    # local-use NAT64 and the deprecated compatible form reach nothing public by design
    return not (isinstance(ip, ipaddress.IPv6Address) and (ip in _NAT64_LOCAL or ip in _COMPAT))
