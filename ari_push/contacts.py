"""Contact URI -> push address, for every registration dialect (see docs/contacts.md).

Sans-IO and pure: strings in, frozen values out, no logging. A mobile app's Contact URI is
attacker-controlled, so everything here validates before it normalises: a value is accepted only
when it has the shape its provider documents, and every rejection is a :class:`ContactRejected`
whose message never carries a whole token or URL (the caller logs it as is).

Dialects:

* RFC 8599: ``pn-provider``, ``pn-prid``, ``pn-param``, ``pn-purr``; Apple's dual form
  ``pn-prid=VOIP:voip&REMOTE:remote`` with ``pn-param=TEAM.bundle.voip&remote``, read the way
  Flexisip reads it (``src/pushnotification/rfc8599-push-params.cc``).
* Linphone legacy: ``pn-type``, ``pn-tok``, ``app-id`` (+ presentation options), mapped to the
  RFC model the way Flexisip's ``setFromLegacyParams`` does.
* Zoiper: ``X-PUSH-URI=<http(s) URL>``, accepted only for allow-listed hosts.

Also :func:`parse_chan_sip_registry` for the value chan_sip (Asterisk <= 20) stores in astdb
under ``SIP/Registry/<peer>``.
"""

from __future__ import annotations

import base64
import contextvars
import functools
import ipaddress
import re
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from ari_push.model import Dialect, PushParams, mask, mask_url
from ari_push.netaddr import HostRule, parse_host_rule, rule_allows
from ari_push.settings import CaptureSettings

__all__ = [
    "APNS_TOKEN_MIN",
    "DEFAULT_MAX_TOKEN_LENGTH",
    "DEFAULT_WEBPUSH_HOSTS",
    "FCM_TOKEN_MIN",
    "OPTION_NAMES",
    "REASONS",
    "ChanSipRegistration",
    "ContactParts",
    "ContactPolicy",
    "ContactRejected",
    "contact_parts",
    "mask_contact_uri",
    "parse_chan_sip_registry",
    "parse_contact",
]

# ---------------------------------------------------------------- limits and names

#: Longest token accepted per provider ("*" = configured extra providers). Why these numbers:
#: apns 64: a device token is 32 bytes, sent as 64 hex digits (Flexisip checks exactly that);
#: raise it only if Apple ever ships longer tokens (the check then takes even-length hex).
#: fcm 400: registration tokens are ~150-165 characters today and Google documents no cap;
#: 400 leaves room and stays under the 511-character URI limit with the rest of the contact.
#: webpush/vendor 480: push-service URLs (Mozilla's are ~300 characters) and Zoiper URLs.
#: "*" 256: opaque tokens of providers we do not know, handed to the admin's webhook.
DEFAULT_MAX_TOKEN_LENGTH: tuple[tuple[str, int], ...] = (
    ("apns", 64),
    ("fcm", 400),
    ("webpush", 480),
    ("vendor", 480),
    ("hms", 256),
    ("hmos", 256),
    ("*", 256),
)

#: Push services a webpush subscription URL may point at (RFC 8599 section 12: pn-prid is the
#: subscription URL). Any other host would let a phone make the daemon POST anywhere (SSRF).
DEFAULT_WEBPUSH_HOSTS: tuple[str, ...] = (
    "fcm.googleapis.com",
    "updates.push.services.mozilla.com",
    "*.push.apple.com",
    "*.notify.windows.com",
)

#: Linphone presentation hints kept in PushParams.options (the seven Linphone sends, plus the
#: three Flexisip also reads in push-info.cc).
OPTION_NAMES: frozenset[str] = frozenset({
    "pn-msg-str", "pn-call-str", "pn-call-snd", "pn-timeout", "pn-silent", "pn-groupchat-str",
    "pn-msg-snd", "pn-missing-call-str", "pn-call-accepted-elsewhere-str",
    "pn-call-declined-elsewhere-str",
})

#: Every ContactRejected.reason this module raises.
REASONS: frozenset[str] = frozenset({
    "bad-uri", "bad-escape", "too-long", "duplicate-param", "conflicting-params",
    "unknown-provider", "missing-provider", "missing-token", "missing-param", "param-not-allowed",
    "service-mismatch", "token-alphabet", "param-alphabet", "option-alphabet",
    "vendor-disabled", "vendor-scheme", "vendor-userinfo", "vendor-url", "vendor-host-not-allowed",
    "webpush-disabled", "webpush-scheme", "webpush-userinfo", "webpush-url",
    "webpush-host-not-allowed", "webpush-keys", "bad-registry", "internal-error",
})

_BUILTIN_PROVIDERS = ("apns", "fcm", "webpush", "hms", "hmos")
_RFC_NAMES = frozenset({"pn-provider", "pn-prid", "pn-param"})
#: Web Push subscription keys (RFC 8291), named as in a PushSubscription's ``keys`` object.
_WEBPUSH_KEY_NAMES = ("pn-p256dh", "pn-auth")
_LEGACY_NAMES = frozenset({"pn-type", "pn-tok", "app-id"})
_VENDOR_NAME = "x-push-uri"
_PUSH_NAMES = _RFC_NAMES | _LEGACY_NAMES | OPTION_NAMES | {"pn-purr", _VENDOR_NAME, *_WEBPUSH_KEY_NAMES}
_LEGACY_TYPES = {"apple": "apns", "google": "fcm", "firebase": "fcm", "android": "fcm"}
_APNS_SERVICES = ("voip", "remote")

APNS_TOKEN_MIN = 64
FCM_TOKEN_MIN = 20
_BUNDLE_MAX = 155  # Apple's limit for a bundle identifier
_PARAM_MAX = 128
_PURR_MAX = 128
_PROVIDER_MAX = 32
_CHAN_SIP_MAX = 511  # chan_sip builds the value in a SIPBUFSIZE (512) buffer

# Every pattern is anchored with fullmatch and has no nested ambiguity (linear time).
_HEX = re.compile(r"[0-9A-Fa-f]+", re.ASCII)
_FCM_TOKEN = re.compile(r"[A-Za-z0-9_-]+(?::[A-Za-z0-9_-]+)?", re.ASCII)
_GENERIC_TOKEN = re.compile(r"[A-Za-z0-9._~:+/=-]+", re.ASCII)
_TEAM_ID = re.compile(r"[A-Za-z0-9]{1,32}", re.ASCII)
_BUNDLE = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*", re.ASCII)
_PROJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*", re.ASCII)
_PURR = re.compile(r"[A-Za-z0-9._~-]+", re.ASCII)
_OPTION_VALUE = re.compile(r"[A-Za-z0-9 ._-]*", re.ASCII)
_PROVIDER_NAME = re.compile(r"[a-z0-9][a-z0-9.-]*", re.ASCII)
_URI_HOST = re.compile(r"[A-Za-z0-9._-]+", re.ASCII)
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?", re.ASCII)
_URL = re.compile(r"[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]+", re.ASCII)
_DIGITS = re.compile(r"[0-9]{1,10}", re.ASCII)
#: Huawei push tokens (HMS Core and HarmonyOS): base64/base64url text, 32-256 characters.
_HUAWEI_TOKEN = re.compile(r"[A-Za-z0-9_.+/=-]{32,256}", re.ASCII)
#: Huawei app ids (HMS Core) and project ids (HarmonyOS) are decimal numbers.
_HUAWEI_ID = re.compile(r"[0-9]{1,24}", re.ASCII)
_B64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}", re.ASCII)
HUAWEI_TOKEN_MIN = 32
_HEXDIGITS = frozenset("0123456789abcdefABCDEF")
# Printable ASCII except the characters that cannot appear in a SIP URI unescaped.
_URI_FORBIDDEN = frozenset('<>"{}|\\^`')


# ---------------------------------------------------------------- errors and policy


class ContactRejected(ValueError):
    """The contact carries push parameters we refuse. ``reason`` is a short machine code (see
    REASONS), ``field`` the parameter at fault (``pn-prid``, ``x-push-uri``, ``uri``, ...). The
    message shows at most a masked form of the offending value."""

    def __init__(self, reason: str, field: str = "", detail: str = "") -> None:
        message = f"{reason} ({field})" if field else reason
        if detail:
            message = f"{message}: {detail}"
        super().__init__(message)
        self.reason = reason
        self.field = field


def _shown(value: str) -> str:
    """A value as it may appear in a message: masked, and only printable characters."""
    return "".join(c if c.isprintable() else "?" for c in mask(value))


def _name_shown(value: str) -> str:
    """A short, non-secret name (a provider) as sent, unless it could carry anything odd."""
    if len(value) <= _PROVIDER_MAX and _PROVIDER_NAME.fullmatch(value):
        return repr(value)
    return _shown(value)


def _normalise_host_entry(entry: str) -> str:
    try:
        return str(parse_host_rule(entry))
    except ValueError as exc:
        raise ValueError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class ContactPolicy:
    """What parse_contact accepts beyond the fixed provider rules.

    ``vendor_allowed_hosts``/``webpush_allowed_hosts``: exact host names or ``*.domain``
    (any depth of subdomain, never the bare domain), case-insensitive; an empty vendor list
    disables Zoiper URLs. ``extra_providers``: pn-provider / pn-type names accepted beyond
    apns, fcm and webpush. ``max_token_length``: per provider, see DEFAULT_MAX_TOKEN_LENGTH.
    """

    vendor_allowed_hosts: tuple[str, ...] = ()
    extra_providers: tuple[str, ...] = ()
    max_uri_length: int = 511
    max_token_length: tuple[tuple[str, int], ...] = DEFAULT_MAX_TOKEN_LENGTH
    webpush_allowed_hosts: tuple[str, ...] = DEFAULT_WEBPUSH_HOSTS
    max_option_length: int = 64
    #: Not a parsing rule: the capture keeps at most this many devices per AOR (the least
    #: recently seen goes; ``[capture] max_devices_per_aor``). Carried here so that every part
    #: built from the capture settings sees the same number.
    max_devices_per_aor: int = 10

    def __post_init__(self) -> None:
        # Normalised here so every comparison below can be a plain ==.
        object.__setattr__(
            self, "vendor_allowed_hosts", tuple(_normalise_host_entry(h) for h in self.vendor_allowed_hosts)
        )
        object.__setattr__(
            self, "webpush_allowed_hosts", tuple(_normalise_host_entry(h) for h in self.webpush_allowed_hosts)
        )
        object.__setattr__(self, "extra_providers", tuple(p.strip().lower() for p in self.extra_providers))
        if self.max_uri_length <= 0 or self.max_option_length <= 0:
            raise ValueError("length limits must be positive")
        if any(limit <= 0 for _, limit in self.max_token_length):
            raise ValueError("token length limits must be positive")

    @classmethod
    def from_settings(cls, capture: CaptureSettings) -> ContactPolicy:
        webpush = capture.webpush_allowed_hosts
        return cls(vendor_allowed_hosts=capture.vendor_allowed_hosts, extra_providers=capture.extra_providers,
                   webpush_allowed_hosts=DEFAULT_WEBPUSH_HOSTS if webpush is None else webpush,
                   max_devices_per_aor=capture.max_devices_per_aor)

    def token_limit(self, provider: str) -> int:
        limits = dict(self.max_token_length)
        return limits.get(provider, limits.get("*", 256))


def _host_allowed(host: str, allowed: tuple[str, ...], port: int | None = None, scheme: str = "https") -> bool:
    """``host`` (and ``port``; None: the scheme's default) is on the allow-list (netaddr rules:
    an entry without a port allows the default port only; a wildcard never an IP literal)."""
    return rule_allows(_rules(allowed), host, port, scheme)[0]


@functools.lru_cache(maxsize=64)
def _rules(allowed: tuple[str, ...]) -> tuple[HostRule, ...]:
    return tuple(parse_host_rule(entry) for entry in allowed)


# ---------------------------------------------------------------- URI structure


@dataclass(frozen=True, slots=True)
class ContactParts:
    """A SIP contact URI taken apart. ``host`` is lower-case (IPv6 without brackets); ``params``
    keeps the URI parameters in order, names lower-cased, values percent-decoded once, ``None``
    for a valueless parameter (``;ob``)."""

    scheme: str
    user: str
    host: str
    port: int | None
    params: tuple[tuple[str, str | None], ...]

    def param(self, name: str) -> str | None:
        """The first value of ``name`` ("" for a valueless one), None when absent."""
        name = name.lower()
        for key, value in self.params:
            if key == name:
                return "" if value is None else value
        return None


@dataclass(frozen=True, slots=True)
class _RawUri:
    scheme: str
    user: str
    host: str
    port: int | None
    params: tuple[tuple[str, str | None], ...]  # as written: not decoded, names not folded


def _decode(raw: str, field: str) -> str:
    """Percent-decode exactly once (Asterisk already decoded the safe escapes and lower-cased
    the others: ``%3A`` arrives as ``:``, ``%3F`` as ``%3f``; both read the same here)."""
    if "%" not in raw:
        return raw
    out = bytearray()
    i = 0
    while i < len(raw):
        char = raw[i]
        if char == "%":
            pair = raw[i + 1 : i + 3]
            if len(pair) != 2 or not set(pair) <= _HEXDIGITS:
                raise ContactRejected("bad-escape", field, "malformed percent escape")
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(ord(char))  # ASCII: checked by _split
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise ContactRejected("bad-escape", field, "escapes do not decode as UTF-8") from None


def _port(text: str) -> int:
    if not _DIGITS.fullmatch(text) or len(text) > 5 or not 0 < int(text) < 65536:
        raise ContactRejected("bad-uri", "uri", "bad port")
    return int(text)


def _split(uri: str, max_length: int) -> _RawUri:
    if not isinstance(uri, str):
        raise ContactRejected("bad-uri", "uri", "not a string")
    text = uri.strip()
    if "<" in text:  # a Contact header value: <uri> with a display name or header params around
        start = text.index("<")
        end = text.find(">", start)
        if end < 0:
            raise ContactRejected("bad-uri", "uri", "unclosed <")
        text = text[start + 1 : end].strip()
    if len(text) > max_length:
        raise ContactRejected("too-long", "uri", f"{len(text)} characters, limit {max_length}")
    if not text:
        raise ContactRejected("bad-uri", "uri", "empty")
    if any(not "\x21" <= c <= "\x7e" or c in _URI_FORBIDDEN for c in text):
        raise ContactRejected("bad-uri", "uri", "whitespace, control, non-ASCII or forbidden character")
    scheme, colon, rest = text.partition(":")
    scheme = scheme.lower()
    if not colon or scheme not in ("sip", "sips"):
        raise ContactRejected("bad-uri", "uri", "not a sip: or sips: URI")
    user = ""
    at = rest.find("@")
    if at >= 0:  # '@' cannot appear unescaped after the userinfo (Asterisk escapes it as %40)
        user, rest = rest[:at], rest[at + 1 :]
        if not user:
            raise ContactRejected("bad-uri", "uri", "empty user part")
    cut = min((i for i in (rest.find(";"), rest.find("?")) if i >= 0), default=len(rest))
    hostport, tail = rest[:cut], rest[cut:]
    headers = tail.find("?")
    params_text = tail if headers < 0 else tail[:headers]
    host, port = _split_hostport(hostport)
    params: list[tuple[str, str | None]] = []
    for segment in params_text.split(";"):
        if not segment:
            continue  # ";;" is sloppy but harmless
        name, eq, value = segment.partition("=")
        if not name:
            raise ContactRejected("bad-uri", "uri", "parameter without a name")
        params.append((name, value if eq else None))
    return _RawUri(scheme, user, host, port, tuple(params))


def _split_hostport(hostport: str) -> tuple[str, int | None]:
    if hostport.startswith("["):
        close = hostport.find("]")
        if close < 0:
            raise ContactRejected("bad-uri", "uri", "unclosed [")
        host, after = hostport[1:close], hostport[close + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ContactRejected("bad-uri", "uri", "bad IPv6 host") from None
        if not after:
            return host.lower(), None
        if not after.startswith(":"):
            raise ContactRejected("bad-uri", "uri", "junk after IPv6 host")
        return host.lower(), _port(after[1:])
    host, colon, port = hostport.partition(":")
    if not host or len(host) > 253 or not _URI_HOST.fullmatch(host):
        raise ContactRejected("bad-uri", "uri", "bad host")
    return host.lower(), (_port(port) if colon else None)


def contact_parts(uri: str, max_length: int = 511) -> ContactParts:
    """Take a contact URI (or a ``<uri>`` Contact header value) apart; every parameter value is
    decoded. Raises ContactRejected (bad-uri, bad-escape, too-long) and nothing else."""
    try:
        raw = _split(uri, max_length)
        return ContactParts(
            scheme=raw.scheme,
            user=_decode(raw.user, "user"),
            host=raw.host,
            port=raw.port,
            params=tuple(
                (_decode(name, "uri").lower(), None if value is None else _decode(value, name.lower()))
                for name, value in raw.params
            ),
        )
    except ContactRejected:
        raise
    except Exception as exc:  # fail closed on attacker input: never crash the caller
        raise ContactRejected("internal-error", "uri", type(exc).__name__) from None


# ---------------------------------------------------------------- value checks


def _apns_token(token: str, field: str, policy: ContactPolicy) -> str:
    limit = max(policy.token_limit("apns"), APNS_TOKEN_MIN)
    if len(token) > limit:
        raise ContactRejected("too-long", field, f"{_shown(token)} exceeds {limit}")
    if len(token) < APNS_TOKEN_MIN or len(token) % 2 or not _HEX.fullmatch(token):
        raise ContactRejected("token-alphabet", field, f"{_shown(token)} is not {APNS_TOKEN_MIN} hex digits")
    return token  # kept as sent: APNs takes either case


def _fcm_token(token: str, field: str, policy: ContactPolicy) -> str:
    limit = policy.token_limit("fcm")
    if len(token) > limit:
        raise ContactRejected("too-long", field, f"{_shown(token)} exceeds {limit}")
    if len(token) < FCM_TOKEN_MIN or not _FCM_TOKEN.fullmatch(token):
        raise ContactRejected("token-alphabet", field, f"{_shown(token)} is not an FCM registration token")
    return token


def _huawei_token(token: str, field: str, provider: str, policy: ContactPolicy) -> str:
    limit = policy.token_limit(provider)
    if len(token) > limit:
        raise ContactRejected("too-long", field, f"{_shown(token)} exceeds {limit}")
    if len(token) < HUAWEI_TOKEN_MIN or not _HUAWEI_TOKEN.fullmatch(token):
        raise ContactRejected("token-alphabet", field, f"{_shown(token)} is not a Huawei push token")
    return token


def b64url_decode(value: str) -> bytes:
    """base64url with or without padding (callers check the alphabet first)."""
    bare = value.rstrip("=")
    return base64.urlsafe_b64decode(bare + "=" * (-len(bare) % 4))


def _webpush_keys(found: dict[str, str | None]) -> tuple[tuple[str, str], ...]:
    """``pn-p256dh`` (the subscription's P-256 public key, 65 bytes uncompressed) and ``pn-auth``
    (its 16-byte auth secret), base64url: both or neither. Checked for shape here; the key is
    checked to be on the curve by the provider."""
    p256dh, auth = (_value(found, name) for name in _WEBPUSH_KEY_NAMES)
    if p256dh is None and auth is None:
        return ()
    if not p256dh or not auth:
        raise ContactRejected("webpush-keys", "pn-p256dh" if not p256dh else "pn-auth",
                              "pn-p256dh and pn-auth come together")
    for name, value, size in (("pn-p256dh", p256dh, 65), ("pn-auth", auth, 16)):
        if len(value) > 100 or not _B64URL.fullmatch(value):
            raise ContactRejected("webpush-keys", name, f"{_shown(value)} is not base64url")
        if len(b64url_decode(value)) != size:
            raise ContactRejected("webpush-keys", name, f"does not decode to {size} bytes")
    if b64url_decode(p256dh)[0] != 4:
        raise ContactRejected("webpush-keys", "pn-p256dh", "is not an uncompressed P-256 point")
    return (("p256dh", p256dh.rstrip("=")), ("auth", auth.rstrip("=")))


def _generic_token(token: str, field: str, provider: str, policy: ContactPolicy) -> str:
    limit = policy.token_limit(provider)
    if len(token) > limit:
        raise ContactRejected("too-long", field, f"{_shown(token)} exceeds {limit}")
    if not _GENERIC_TOKEN.fullmatch(token):
        raise ContactRejected("token-alphabet", field, f"{_shown(token)} has characters outside [A-Za-z0-9._~:+/=-]")
    return token


def _project(value: str, field: str) -> str:
    if len(value) > _PARAM_MAX:
        raise ContactRejected("too-long", field, f"{_shown(value)} exceeds {_PARAM_MAX}")
    if not _PROJECT.fullmatch(value):
        raise ContactRejected("param-alphabet", field, f"{_shown(value)} is not a project id")
    return value


def _bundle(value: str, field: str) -> str:
    if len(value) > _BUNDLE_MAX:
        raise ContactRejected("too-long", field, f"{_shown(value)} exceeds {_BUNDLE_MAX}")
    if not _BUNDLE.fullmatch(value):
        raise ContactRejected("param-alphabet", field, f"{_shown(value)} is not a bundle id")
    return value


def _host_ok(host: str) -> bool:
    name = host.removesuffix(".")
    if not name or len(name) > 253:
        return False
    return all(len(label) <= 63 and _DNS_LABEL.fullmatch(label) for label in name.split("."))


def _push_url(url: str, *, kind: str, field: str, schemes: tuple[str, ...], allowed: tuple[str, ...],
              limit: int, ip_literals: bool) -> str:
    """Validate an attacker-supplied URL the daemon will POST to. Returns it unchanged."""
    if not allowed:
        raise ContactRejected(f"{kind}-disabled", field, "no allowed hosts configured")
    if len(url) > limit:
        raise ContactRejected("too-long", field, f"{_shown(url)} exceeds {limit}")
    if not _URL.fullmatch(url):
        raise ContactRejected(f"{kind}-url", field, f"{_shown(url)} has whitespace, control or non-URL characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ContactRejected(f"{kind}-url", field, f"{_shown(url)} is not a valid URL") from None
    if parts.scheme not in schemes:
        raise ContactRejected(f"{kind}-scheme", field, f"scheme {parts.scheme[:10]!r} not in {'/'.join(schemes)}")
    if not parts.netloc:
        raise ContactRejected(f"{kind}-url", field, f"{_shown(url)} has no host")
    if "@" in parts.netloc:
        raise ContactRejected(f"{kind}-userinfo", field, "user information in the URL is refused")
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
        is_ip = True
    except ValueError:
        is_ip = False
    if port == 0 or not (is_ip or _host_ok(host)):
        raise ContactRejected(f"{kind}-url", field, f"{_shown(url)} has a bad host or port")
    if (is_ip and not ip_literals) or not _host_allowed(host, allowed, port, parts.scheme):
        # The host is no secret (the token is in the path) and is checked above: show it whole,
        # it is what the operator needs to decide whether to allow it.
        on_port = "" if port is None else f" on port {port}"
        raise ContactRejected(f"{kind}-host-not-allowed", field, f"host {host!r}{on_port} is not allow-listed")
    return url


# ---------------------------------------------------------------- dialects


def _value(found: dict[str, str | None], name: str) -> str | None:
    """The decoded value of a push parameter; None when absent or valueless."""
    raw = found.get(name)
    return None if raw is None else _decode(raw, name)


def _required_token(found: dict[str, str | None], name: str) -> str:
    token = _value(found, name)
    if not token:
        raise ContactRejected("missing-token", name, "no token")
    return token


def _provider_name(text: str, field: str, policy: ContactPolicy) -> str:
    name = text.lower()
    if name in _BUILTIN_PROVIDERS or (
        name in policy.extra_providers and len(name) <= _PROVIDER_MAX and _PROVIDER_NAME.fullmatch(name)
    ):
        return name
    raise ContactRejected("unknown-provider", field, f"{_name_shown(text)} is not a configured provider")


def _split_apns_param(param: str) -> tuple[str, list[str]]:
    """``TEAM.bundle.id.voip&remote`` -> (``bundle.id``, [voip, remote]). As Flexisip: the text
    before the first dot is the team id, after the last dot the services; no service list means
    a ``remote`` (alert) topic."""
    first = param.find(".")
    last = param.rfind(".")
    if first <= 0:
        raise ContactRejected("param-alphabet", "pn-param", f"{_shown(param)} is not TEAMID.bundle.id")
    if not _TEAM_ID.fullmatch(param[:first]):
        raise ContactRejected("param-alphabet", "pn-param", f"{_shown(param)} has a bad team id")
    services = param[last + 1 :].split("&")
    if last > first and all(s in _APNS_SERVICES for s in services):
        if len(set(services)) != len(services):
            raise ContactRejected("service-mismatch", "pn-param", "a service is listed twice")
        return _bundle(param[first + 1 : last], "pn-param"), services
    return _bundle(param[first + 1 :], "pn-param"), ["remote"]


def _split_apns_prid(prid: str, services: list[str]) -> dict[str, str]:
    """``TOKEN`` or ``TOKEN:voip&TOKEN:remote`` -> {service: token}, matched against pn-param."""
    parts = prid.split("&")
    if len(parts) != len(services):
        raise ContactRejected(
            "service-mismatch", "pn-prid", f"{len(parts)} token(s) for {len(services)} service(s) in pn-param"
        )
    tokens: dict[str, str] = {}
    for part in parts:
        token, colon, service = part.partition(":")
        if not colon:
            if len(parts) != 1:
                raise ContactRejected("service-mismatch", "pn-prid", "each token needs :voip or :remote")
            service = services[0]
        if service not in services or service in tokens:
            raise ContactRejected("service-mismatch", "pn-prid", "token services do not match pn-param")
        if not token:
            raise ContactRejected("missing-token", "pn-prid", f"empty {service} token")
        tokens[service] = token
    return tokens


_NOTES: contextvars.ContextVar[list[ContactRejected] | None] = contextvars.ContextVar("contact_notes", default=None)


def _rfc8599(found: dict[str, str | None], policy: ContactPolicy) -> PushParams:
    provider_text = _value(found, "pn-provider")
    if not provider_text:
        raise ContactRejected("missing-provider", "pn-provider", "pn-prid/pn-param without pn-provider")
    sandbox = provider_text.lower() == "apns.dev"
    provider = "apns" if sandbox else _provider_name(provider_text, "pn-provider", policy)
    prid = _required_token(found, "pn-prid")
    param = _value(found, "pn-param")
    if provider == "apns":
        if not param:
            raise ContactRejected("missing-param", "pn-param", "APNs needs TEAMID.bundle.id[.voip]")
        bundle, services = _split_apns_param(param)
        tokens: dict[str, str] = {}
        refused: list[ContactRejected] = []
        for service, raw_token in _split_apns_prid(prid, services).items():
            try:
                tokens[service] = _apns_token(raw_token, "pn-prid", policy)
            except ContactRejected as exc:
                refused.append(exc)
        if not tokens:
            raise refused[0]
        if refused:  # one half of a dual token is bad: keep the good half, report the other
            sink = _NOTES.get()
            if sink is not None:
                sink.extend(refused)
        main = "voip" if "voip" in tokens else "remote"
        return PushParams(
            provider="apns",
            token=tokens[main],
            # The APNs topic: the bundle id, plus ".voip" for PushKit (Flexisip builds pn-param
            # per service the same way, then drops the team id to get apns-topic).
            param=bundle + ".voip" if main == "voip" else bundle,
            sandbox=sandbox,
            extra_tokens=tuple((s, tokens[s]) for s in _APNS_SERVICES if s != main and s in tokens),
        )
    if provider == "fcm":
        if not param:
            raise ContactRejected("missing-param", "pn-param", "FCM needs the Firebase project id")
        return PushParams(provider="fcm", token=_fcm_token(prid, "pn-prid", policy), param=_project(param, "pn-param"))
    if provider == "webpush":
        if "pn-param" in found:  # RFC 8599 section 12: pn-param MUST NOT be used with webpush
            raise ContactRejected("param-not-allowed", "pn-param", "webpush takes no pn-param")
        url = _push_url(prid, kind="webpush", field="pn-prid", schemes=("https",),
                        allowed=policy.webpush_allowed_hosts, limit=policy.token_limit("webpush"),
                        ip_literals=False)
        return PushParams(provider="webpush", token=url, extra_tokens=_webpush_keys(found))
    if provider in ("hms", "hmos"):
        what = "the HMS Core app id" if provider == "hms" else "the HarmonyOS project id"
        if not param:
            raise ContactRejected("missing-param", "pn-param", f"{provider} needs {what}")
        if not _HUAWEI_ID.fullmatch(param):
            raise ContactRejected("param-alphabet", "pn-param", f"{_shown(param)} is not {what} (digits)")
        return PushParams(provider=provider, token=_huawei_token(prid, "pn-prid", provider, policy), param=param)
    return PushParams(
        provider=provider,
        token=_generic_token(prid, "pn-prid", provider, policy),
        param=_project(param, "pn-param") if param else "",
    )


def _legacy_provider(text: str, policy: ContactPolicy) -> str:
    name = text.lower()
    if name in _LEGACY_TYPES:
        return _LEGACY_TYPES[name]
    if name in policy.extra_providers:
        return _provider_name(name, "pn-type", policy)
    raise ContactRejected("unknown-provider", "pn-type", f"{_name_shown(text)} is not a known pn-type")


def _apple_app_id(app_id: str) -> tuple[str, bool | None]:
    """Flexisip's setFromLegacyParams: ``.dev`` = sandbox, ``.prod`` = production, the suffix
    is dropped; what is left is the topic, with no ``.voip`` added (Linphone's VoIP app-id
    already ends in ``.voip``, e.g. ``org.linphone.phone.voip.prod``)."""
    lowered = app_id.lower()
    if lowered.endswith(".dev"):
        return app_id[:-4], True
    if lowered.endswith(".prod"):
        return app_id[:-5], False
    return app_id, None


def _linphone(found: dict[str, str | None], policy: ContactPolicy) -> PushParams:
    type_text = _value(found, "pn-type")
    if not type_text:
        raise ContactRejected("missing-provider", "pn-type", "pn-tok/app-id without pn-type")
    provider = _legacy_provider(type_text, policy)
    token = _required_token(found, "pn-tok")
    app_id = _value(found, "app-id")
    if provider == "apns":
        if not app_id:
            raise ContactRejected("missing-param", "app-id", "pn-type=apple needs app-id")
        topic, sandbox = _apple_app_id(app_id)
        return PushParams(
            provider="apns", token=_apns_token(token, "pn-tok", policy), param=_bundle(topic, "app-id"),
            sandbox=bool(sandbox), dialect=Dialect.LINPHONE,
        )
    if provider == "fcm":
        if not app_id:
            raise ContactRejected("missing-param", "app-id", "an FCM pn-type needs app-id")
        return PushParams(
            provider="fcm", token=_fcm_token(token, "pn-tok", policy), param=_project(app_id, "app-id"),
            dialect=Dialect.LINPHONE,
        )
    return PushParams(
        provider=provider, token=_generic_token(token, "pn-tok", provider, policy),
        param=_project(app_id, "app-id") if app_id else "", dialect=Dialect.LINPHONE,
    )


def _check_legacy_agrees(push: PushParams, found: dict[str, str | None]) -> None:
    """RFC 8599 params win (as in Flexisip); legacy ones beside them must say the same thing."""

    def conflict(field: str) -> ContactRejected:
        return ContactRejected("conflicting-params", field, "legacy and RFC 8599 push parameters disagree")

    if "pn-type" in found:
        type_text = _value(found, "pn-type") or ""
        if _LEGACY_TYPES.get(type_text.lower(), type_text.lower()) != push.provider:
            raise conflict("pn-type")
    if "pn-tok" in found:
        tok = _value(found, "pn-tok") or ""
        tokens = {push.token, *(t for _, t in push.extra_tokens)}
        if push.provider == "apns":
            tok, tokens = tok.lower(), {t.lower() for t in tokens}
        if tok not in tokens:
            raise conflict("pn-tok")
    if "app-id" in found:
        app_id = _value(found, "app-id") or ""
        if push.provider == "apns":
            topic, sandbox = _apple_app_id(app_id)
            topics = {push.param, push.param.removesuffix(".voip")}
            if topic not in topics or (sandbox is not None and sandbox != push.sandbox):
                raise conflict("app-id")
        elif app_id != push.param:
            raise conflict("app-id")


def _vendor(found: dict[str, str | None], policy: ContactPolicy) -> PushParams:
    url = _value(found, _VENDOR_NAME)
    if not url:
        raise ContactRejected("missing-token", _VENDOR_NAME, "empty X-PUSH-URI")
    _push_url(url, kind="vendor", field=_VENDOR_NAME, schemes=("http", "https"),
              allowed=policy.vendor_allowed_hosts, limit=policy.token_limit("vendor"), ip_literals=True)
    return PushParams(provider="vendor", token=url, dialect=Dialect.ZOIPER)


def _options(found: dict[str, str | None], policy: ContactPolicy) -> tuple[tuple[str, str], ...]:
    options: list[tuple[str, str]] = []
    for name in sorted(OPTION_NAMES & found.keys()):
        value = _value(found, name) or ""  # valueless (";pn-silent") reads as ""
        if len(value) > policy.max_option_length:
            raise ContactRejected("too-long", name, f"{_shown(value)} exceeds {policy.max_option_length}")
        if not _OPTION_VALUE.fullmatch(value):
            raise ContactRejected("option-alphabet", name, f"{_shown(value)} has characters outside [A-Za-z0-9 ._-]")
        options.append((name, value))
    return tuple(options)


def _purr(found: dict[str, str | None]) -> str:
    if "pn-purr" not in found:
        return ""
    purr = _value(found, "pn-purr") or ""
    if len(purr) > _PURR_MAX:
        raise ContactRejected("too-long", "pn-purr", f"{_shown(purr)} exceeds {_PURR_MAX}")
    if not _PURR.fullmatch(purr):
        raise ContactRejected("param-alphabet", "pn-purr", f"{_shown(purr)} is not a pn-purr token")
    return purr


def _push_params_found(raw: _RawUri) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for raw_name, raw_value in raw.params:
        try:
            name = _decode(raw_name, "uri").lower()
        except ContactRejected:
            continue  # a name with a broken escape is no push parameter; leave it alone
        if name not in _PUSH_NAMES:
            continue
        if name in found:
            raise ContactRejected("duplicate-param", name, "push parameter given twice")
        found[name] = raw_value  # still encoded: decoded (once) where it is used, naming the field
    return found


def _parse(uri: str, policy: ContactPolicy) -> PushParams | None:
    found = _push_params_found(_split(uri, policy.max_uri_length))
    if not found:
        return None
    has_vendor = _VENDOR_NAME in found
    has_rfc = bool(_RFC_NAMES & found.keys())
    has_legacy = bool(_LEGACY_NAMES & found.keys())
    if has_vendor and (has_rfc or has_legacy):
        raise ContactRejected("conflicting-params", _VENDOR_NAME, "X-PUSH-URI beside pn-* push parameters")
    if has_vendor:
        push = _vendor(found, policy)
    elif has_rfc:
        push = _rfc8599(found, policy)
        if has_legacy:
            _check_legacy_agrees(push, found)
    elif has_legacy:
        push = _linphone(found, policy)
    else:
        field = "pn-purr" if "pn-purr" in found else min(found)
        raise ContactRejected("missing-provider", field, "push options without pn-provider, pn-type or X-PUSH-URI")
    if push.provider != "webpush":
        for name in _WEBPUSH_KEY_NAMES:
            if name in found:
                raise ContactRejected("param-not-allowed", name, "only webpush contacts carry subscription keys")
    return replace(push, purr=_purr(found), options=_options(found, policy))


def parse_contact(uri: str, policy: ContactPolicy,
                  notes: list[ContactRejected] | None = None) -> PushParams | None:
    """The push address in a contact URI as Asterisk reports it (AMI ``URI:``/``Uri:``, ARI
    ``contact_info.uri``), or a ``<uri>`` Contact header value.

    None when the URI has no push parameter at all (a desk phone); PushParams when they are
    valid; ContactRejected otherwise. Never raises anything else, whatever the input.
    ``notes`` collects what was refused in a contact that is still accepted (the bad half of
    an Apple dual token: the good half is kept).
    """
    reset = _NOTES.set(notes)
    try:
        return _parse(uri, policy)
    except ContactRejected:
        raise
    except Exception as exc:  # fail closed on attacker input: never crash the caller
        raise ContactRejected("internal-error", "uri", type(exc).__name__) from None
    finally:
        _NOTES.reset(reset)


# ---------------------------------------------------------------- masking

#: URI parameters whose value is (or holds) a device secret: masked wherever a contact is shown.
SECRET_PARAMS: frozenset[str] = frozenset({"pn-prid", "pn-tok", _VENDOR_NAME, "pn-purr", "pn-auth"})


def _mask_param_value(name: str, value: str) -> str:
    if name == _VENDOR_NAME or "://" in value[:16] or "%3a%2f%2f" in value[:24].lower():
        return mask_url(value.replace("%3A", ":").replace("%3a", ":").replace("%2F", "/").replace("%2f", "/"))
    # Apple's dual form: every half is masked, each keeping its service name (":voip", ":remote")
    halves = []
    for half in value.split("&"):
        token, colon, service = half.rpartition(":")
        if colon and service.lower() in _APNS_SERVICES and token:
            halves.append(f"{mask(token)}:{service}")
        else:
            halves.append(mask(half))
    return "&".join(halves)


def mask_contact_uri(uri: str) -> str:
    """A contact URI as logs and the CLI show it: every push-secret parameter value masked
    (both halves of a dual APNs token, a Zoiper URL down to its host), any case of the name;
    non-printable characters escaped. Never raises."""
    out = []
    for i, segment in enumerate(str(uri).split(";")):
        name, eq, value = segment.partition("=")
        if i and eq and name.strip().lower() in SECRET_PARAMS:
            cut = value.find(">")  # a <uri>;params Contact header value: keep what follows
            inner, rest = (value, "") if cut < 0 else (value[:cut], value[cut:])
            segment = f"{name}={_mask_param_value(name.strip().lower(), inner)}{rest}"
        out.append(segment)
    return printable(";".join(out))


def printable(text: str) -> str:
    """``text`` with every non-printable character (controls, escapes, C1, line breaks, tabs,
    bidi overrides) written as a Python escape, so that it cannot act on a terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


# ---------------------------------------------------------------- chan_sip (Asterisk <= 20)


@dataclass(frozen=True, slots=True)
class ChanSipRegistration:
    """One chan_sip peer registration as stored in astdb ``SIP/Registry/<peer>``.

    ``address`` is the IP the peer is reached at (IPv6 without brackets), ``expiry`` the
    seconds granted at REGISTER time (relative, not a timestamp), ``contact`` the Contact URI
    without angle brackets (feed it to parse_contact).
    """

    address: str
    port: int
    expiry: int
    username: str
    contact: str


def _bad_registry(field: str, why: str) -> ContactRejected:
    return ContactRejected("bad-registry", field, why)


def parse_chan_sip_registry(value: str) -> ChanSipRegistration:
    """Parse ``<addr>:<port>:<expiry>:<username>:<contact>`` as written by chan_sip's
    parse_register_contact(): ``snprintf(data, SIPBUFSIZE, "%s:%d:%s:%s",
    ast_sockaddr_stringify(&peer->addr), expire, peer->username, peer->fullcontact)``.
    ast_sockaddr_stringify gives ``a.b.c.d:port`` or ``[v6]:port``; the username may be empty;
    the contact keeps its own colons. Raises ContactRejected(reason="bad-registry") only.
    """
    try:
        return _parse_registry(value)
    except ContactRejected:
        raise
    except Exception as exc:  # same contract as parse_contact
        raise _bad_registry("value", type(exc).__name__) from None


def _parse_registry(value: str) -> ChanSipRegistration:
    if not isinstance(value, str):
        raise _bad_registry("value", "not a string")
    text = value.strip()
    if not text or len(text) > _CHAN_SIP_MAX:
        raise _bad_registry("value", f"{len(text)} characters, expected 1-{_CHAN_SIP_MAX}")
    if any(not c.isprintable() or c.isspace() for c in text):
        raise _bad_registry("value", "whitespace or control characters")
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise _bad_registry("address", "unclosed IPv6 address")
        host, rest = text[1:close], text[close + 2 :]
        version = 6
    else:
        host, colon, rest = text.partition(":")
        if not colon:
            raise _bad_registry("address", "no port")
        version = 4
    try:
        address = str(ipaddress.IPv6Address(host) if version == 6 else ipaddress.IPv4Address(host))
    except ValueError:
        raise _bad_registry("address", "not a numeric IP address") from None
    port_text, colon, rest = rest.partition(":")
    if not colon or not _DIGITS.fullmatch(port_text) or len(port_text) > 5 or not 0 < int(port_text) < 65536:
        raise _bad_registry("port", "not a port number")
    expiry_text, colon, rest = rest.partition(":")
    if not colon or not _DIGITS.fullmatch(expiry_text):
        raise _bad_registry("expiry", "not a number of seconds")
    # username ":" contact. The username is normally colon-free (chan_sip's own reader,
    # reg_source_db, splits at the first colon), but a "user:password" userinfo is possible:
    # prefer the colon that starts the sip:/sips: contact.
    lowered = rest.lower()
    starts = [i for i in (lowered.find(":sip:"), lowered.find(":sips:")) if i >= 0]
    if starts:
        cut = min(starts)
        username, contact = rest[:cut], rest[cut + 1 :]
    else:
        username, colon, contact = rest.partition(":")
        if not colon:
            raise _bad_registry("contact", "no contact")
    if not contact:
        raise _bad_registry("contact", "empty contact")
    return ChanSipRegistration(
        address=address, port=int(port_text), expiry=int(expiry_text), username=username, contact=contact
    )
