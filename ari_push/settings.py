"""Typed, frozen settings: one TOML file plus ``ARI_PUSH_*`` environment overrides.

Every key is documented in docs/configuration.md. Validation happens once, at start-up,
and every error names the key and says why it is wrong. Secrets may be given inline or
as ``*_file`` paths; they are read here and masked whenever settings are shown.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from ari_push.model import mask
from ari_push.netaddr import parse_host_rule

ENV_PREFIX = "ARI_PUSH_"
KNOWN_PROVIDERS = ("apns", "fcm", "vendor", "webpush", "hms", "hmos")
#: Keys whose values are secrets: an error about them never shows the value, and an environment
#: override of them is always taken as text (``ARI_PUSH_ARI__PASSWORD=12345678`` is a string).
SECRET_KEYS = frozenset({"password", "secret", "sentinel_password", "key", "service_account", "client_secret",
                         "vapid_key"})


class SettingsError(ValueError):
    """Invalid configuration. ``key`` is the dotted key at fault."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: {why}")
        self.key = key
        self.why = why


class Secret(str):
    """A string that never shows itself in repr (logs, tracebacks, check-config)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Secret({mask(str(self))!r})"


# ---------------------------------------------------------------- sections


@dataclass(frozen=True)
class AriSettings:
    url: str = "http://127.0.0.1:8088"
    username: str = "ari-push"
    password: Secret = Secret("")
    app: str = "ari-push"
    request_timeout: float = 5.0
    heartbeat: float = 10.0
    # "inbound": ari-push connects to Asterisk's /ari/events; "outbound": Asterisk connects to
    # ari-push (websocket_client.conf + ari.conf outbound_websocket, docs/operations.md).
    connection: str = "inbound"
    outbound_listen: str = "127.0.0.1:8765"
    outbound_path: str = "/ari"
    outbound_username: str = "ari-push"
    outbound_password: Secret = Secret("")


@dataclass(frozen=True)
class AmiSettings:
    host: str = "127.0.0.1"
    port: int = 5038
    username: str = "ari-push"
    secret: Secret = Secret("")
    request_timeout: float = 5.0
    heartbeat: float = 10.0


@dataclass(frozen=True)
class FreeswitchSettings:
    """The FreeSWITCH event socket (inbound ESL), the alternative to [ari]/[ami] (docs/freeswitch.md)."""

    host: str = "127.0.0.1"
    port: int = 8021
    password: Secret = Secret("")
    profile: str = "internal"  # the sofia profile the phones register on
    request_timeout: float = 5.0
    heartbeat: float = 10.0


@dataclass(frozen=True)
class RedisSettings:
    """``url`` empty and no ``sentinels`` means the embedded single-node store (no Redis at all).

    Credentials never stay in ``url``: a ``redis://user:pw@host`` URL is split at load time into
    ``username`` and ``password`` so that logs and check-config show the URL safely."""

    url: str = ""
    username: str = ""
    password: Secret = Secret("")
    key_prefix: str = "ari-push:"
    socket_timeout: float = 2.0
    sentinels: tuple[str, ...] = ()
    sentinel_service: str = "mymaster"
    sentinel_password: Secret = Secret("")
    tls: bool = False  # rediss:// implies it; with sentinels, TLS to the sentinels and the master
    tls_ca_file: str = ""
    tls_cert_file: str = ""  # client certificate (tls-auth-clients yes), PEM
    tls_key_file: str = ""
    wait_replicas: int = 0  # > 0: WAIT for that many replicas after each binding write
    wait_timeout: float = 0.1
    cache_max_age: float = 900.0  # how old a cached binding may be to push a call while Redis is down

    @property
    def embedded(self) -> bool:
        return not self.url and not self.sentinels


@dataclass(frozen=True)
class CaptureSettings:
    retention_days: float = 30.0
    vendor_allowed_hosts: tuple[str, ...] = ()
    extra_providers: tuple[str, ...] = ()
    webpush_allowed_hosts: tuple[str, ...] | None = None  # None: the public push services
    max_devices_per_aor: int = 10  # beyond it, the least recently seen device of the AOR is dropped


@dataclass(frozen=True)
class CallSettings:
    default_timeout: float = 30.0
    max_timeout: float = 120.0
    moh_class: str = ""
    on_decline: str = "busy"  # busy | keep-waiting
    missed_call_push: bool = True
    continue_context: str = ""
    dial_timeout: float = 60.0
    max_duration: float = 14400.0  # a bridged call is ended after this (a safety net for lost hang-ups)
    # The registered UDP contact of a pushed device is rung this long after the push unless the
    # device re-registered meanwhile (an INVITE to a sleeping UDP phone retransmits for 32 s);
    # TCP/TLS contacts, and devices known to answer on their old contact, are rung at once.
    stale_ring_delay: float = 2.0
    # A pushed device whose end-of-call push could not be delivered (an iOS app with a VoIP token
    # only) gets an INVITE + CANCEL with the right Reason if it re-registers within this window.
    end_notice_window: float = 30.0


@dataclass(frozen=True)
class ClusterSettings:
    """Several daemons (docs/clustering.md). ``single``: one daemon per Asterisk. ``broadcast``:
    every daemon has its own ``[ari] app`` (``<app_family>-<name>``) and claims calls sent with
    StasisBroadcast() (Asterisk 20.17+/22.7+). ``lease``: daemons share one app name and only
    the holder of a Redis lease connects (older Asterisk)."""

    mode: str = "single"  # single | broadcast | lease
    app_family: str = "ari-push"
    heartbeat: float = 1.0
    node_ttl: float = 3.0
    lease_ttl: float = 5.0


@dataclass(frozen=True)
class PushSettings:
    """Per-device push rate limit (push/ratelimit.py): ``burst`` call pushes at once, then
    ``rate_per_minute``; 0 turns the limit off. Shared through Redis when Redis is configured."""

    rate_per_minute: float = 10.0
    burst: int = 5
    max_in_flight_per_call: int = 16  # pushes of one call on the wire at once (push/fanout.py)
    max_in_flight_per_host: int = 100  # pushes to one provider host at once, across calls
    allow_plain_http: bool = False  # tests only: provider URLs may be http:// (a warning at start)


@dataclass(frozen=True)
class HttpSettings:
    listen: str = "127.0.0.1:9387"  # 8089 is Asterisk's HTTPS port (http.conf tlsbindport)
    enabled: bool = True
    header_timeout: float = 5.0  # a request must arrive whole within this
    max_connections: int = 64  # more at once are closed unanswered
    # the operator's console and its access (docs/operations.md, "Console")
    console: bool = True  # /console and /api/ on this server
    auth_token: Secret = Secret("")  # auth_token_file: a bearer token for /metrics, /console, /api/
    basic_auth: Secret = Secret("")  # basic_auth_file: "user:password" (browsers)
    max_streams: int = 8  # live-update (server-sent events) streams at once


@dataclass(frozen=True)
class LogSettings:
    level: str = "INFO"
    format: str = "human"  # human | json


@dataclass(frozen=True)
class ApnsApp:
    """One iOS app's APNs credentials. ``topics`` are the VoIP topics it serves."""

    name: str
    topics: tuple[str, ...]
    team_id: str = ""
    key_id: str = ""
    key: Secret = Secret("")  # the .p8 private key (PEM)
    cert_file: str = ""  # certificate auth alternative: PEM with cert + key
    production_url: str = "https://api.push.apple.com"
    sandbox_url: str = "https://api.sandbox.push.apple.com"
    ca_file: str = ""  # extra CA to trust (tests, private relays)
    jwt_lifetime: float = 3000.0
    timeout: float = 5.0


@dataclass(frozen=True)
class FcmProject:
    """One Firebase project's credentials (a service-account JSON key)."""

    project_id: str
    service_account: Secret = Secret("")  # JSON text of the key file
    api_url: str = "https://fcm.googleapis.com"
    ca_file: str = ""
    timeout: float = 5.0
    sender_id: str = ""  # the project number: legacy Linphone contacts send it as app-id


@dataclass(frozen=True)
class HmsApp:
    """One HMS Core (Android) app: Push Kit v1 with an OAuth 2.0 client-credentials token.
    ``client_id`` is the app's OAuth client id (AppGallery Connect shows it beside the app id;
    for most apps they are the same number)."""

    app_id: str
    client_id: str = ""
    client_secret: Secret = Secret("")
    token_url: str = "https://oauth-login.cloud.huawei.com/oauth2/v3/token"
    api_url: str = "https://push-api.cloud.huawei.com"
    ca_file: str = ""
    timeout: float = 5.0


@dataclass(frozen=True)
class HmosProject:
    """One HarmonyOS (Push Kit v3) project: a service-account key signs the JWT every request
    carries. ``call_push_type`` 10 is Huawei's in-app call message (needs Huawei's approval);
    6 (background) is the fallback for apps without it."""

    project_id: str
    service_account: Secret = Secret("")  # JSON text of the service-account key file
    api_url: str = "https://push-api.cloud.huawei.com"
    ca_file: str = ""
    timeout: float = 5.0
    call_push_type: int = 10
    jwt_lifetime: float = 3600.0


@dataclass(frozen=True)
class WebPushSettings:
    """Web Push (RFC 8030) with VAPID (RFC 8292): ``vapid_key`` is the application server's
    P-256 private key (PEM, or the 32-byte scalar base64url as web-push tools print it)."""

    vapid_key: Secret = Secret("")
    subject: str = ""  # mailto: or https: contact for the push service operator
    jwt_lifetime: float = 43200.0  # 12 h; RFC 8292 allows at most 24 h
    timeout: float = 5.0
    ca_file: str = ""
    max_payload: int = 4096  # bytes on the wire, encrypted; RFC 8030 services accept at least this


@dataclass(frozen=True)
class PluginConfig:
    """One ``[[plugin]]`` table after its plug-in validated it (docs/providers.md, plug-ins)."""

    name: str
    provider_names: tuple[str, ...]
    config: Any = field(repr=False, compare=False)


@dataclass(frozen=True)
class VendorSettings:
    """Zoiper-style push URLs captured from contacts (X-PUSH-URI)."""

    body_template: str = '{"type":"{kind}","call_id":"{call_id}","caller":"{caller_number}"}'
    content_type: str = "application/json"
    timeout: float = 3.0
    max_response_bytes: int = 65536
    ca_file: str = ""
    max_connections_per_host: int = 8


@dataclass(frozen=True)
class WebhookSettings:
    """The admin's own push relay: every push becomes a signed JSON POST."""

    url: str = ""
    secret: Secret = Secret("")
    timeout: float = 3.0  # the whole request, answer included
    providers: tuple[str, ...] = ()
    ca_file: str = ""
    max_response_bytes: int = 65536


@dataclass(frozen=True)
class RefreshSettings:
    """Registration-refresh pushes (docs/reachability.md): a silent push once ``at_fraction`` of
    a contact's lifetime has passed, at most once per ``min_interval`` s per device."""

    enabled: bool = True
    at_fraction: float = 0.8
    min_interval: float = 600.0
    # A Zoiper-style push URL is a "wake up for a call" hook of the app's vendor: what it does
    # with any other push is unknown, so vendor URLs get none unless the admin says so.
    disabled_providers: tuple[str, ...] = ("vendor",)
    grace: float = 5.0  # after the expiry, before the contact is judged refreshed or expired
    sync_interval: float = 300.0  # full re-read of the registered contacts (PJSIPShowContacts)
    tick: float = 1.0  # how often the shared schedule is polled for due contacts
    lease: float = 60.0  # a claimed contact returns to the schedule if its daemon dies


@dataclass(frozen=True)
class MwiSettings:
    """Voicemail pushes from AMI MessageWaiting (docs/reachability.md). ``mailboxes`` maps a
    mailbox (``box@context``) to AORs, ahead of the endpoints' own ``mailboxes`` option.
    Off by default: MessageWaiting is in AMI's ``call`` class, so turning it on subscribes the
    daemon to every channel event of the PBX (measured: with 1000 calls at once that flood
    slowed wake-ups tenfold; docs/reachability.md)."""

    enabled: bool = False
    min_interval: float = 30.0  # per mailbox; changes inside it are coalesced into one push
    disabled_providers: tuple[str, ...] = ("vendor",)  # as [refresh]
    push_ttl: float = 86400.0
    map_ttl: float = 300.0  # how long the mailbox -> AOR map read from Asterisk is kept
    mailboxes: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class MessageSettings:
    """SIP MESSAGE to sleeping phones (docs/reachability.md): kept ``ttl`` s; the push shows the
    text only with ``preview`` and only when it has at most ``preview_chars`` characters."""

    enabled: bool = True
    ttl: float = 3600.0
    poll: float = 1.0  # how often contacts of AORs with waiting messages are looked at
    preview: bool = False
    preview_chars: int = 100
    max_bytes: int = 65536


@dataclass(frozen=True)
class TraceSettings:
    """Call traces (docs/operations.md, "Call traces"): each call's timeline, kept ``keep`` s
    after its last event, at most ``max_calls`` calls and ``max_events`` events per call."""

    enabled: bool = True
    keep: float = 86400.0
    max_calls: int = 10_000
    max_events: int = 200


@dataclass(frozen=True)
class Settings:
    ari: AriSettings = field(default_factory=AriSettings)
    ami: AmiSettings = field(default_factory=AmiSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    capture: CaptureSettings = field(default_factory=CaptureSettings)
    calls: CallSettings = field(default_factory=CallSettings)
    push: PushSettings = field(default_factory=PushSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    log: LogSettings = field(default_factory=LogSettings)
    apns: tuple[ApnsApp, ...] = ()
    fcm: tuple[FcmProject, ...] = ()
    hms: tuple[HmsApp, ...] = ()
    hmos: tuple[HmosProject, ...] = ()
    webpush: WebPushSettings = field(default_factory=lambda: WebPushSettings())
    plugins: tuple[PluginConfig, ...] = ()
    vendor: VendorSettings = field(default_factory=VendorSettings)
    webhook: WebhookSettings = field(default_factory=WebhookSettings)
    node_id: str = ""
    shutdown_timeout: float = 10.0
    refresh: RefreshSettings = field(default_factory=RefreshSettings)
    mwi: MwiSettings = field(default_factory=MwiSettings)
    messages: MessageSettings = field(default_factory=MessageSettings)
    traces: TraceSettings = field(default_factory=TraceSettings)
    freeswitch: FreeswitchSettings | None = None  # set: FreeSWITCH instead of Asterisk ([ari]/[ami])


# ---------------------------------------------------------------- parsing helpers

T = TypeVar("T")


class _Section:
    """Reads typed values out of one TOML table and refuses keys it does not know."""

    def __init__(self, data: Mapping[str, Any], where: str, base: Path | None) -> None:
        if not isinstance(data, Mapping):
            raise SettingsError(where, f"must be a table, not {type(data).__name__}")
        self.data = dict(data)
        self.where = where
        self.base = base
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def _get(self, name: str, check: Callable[[Any], bool], kind: str, default: T) -> T:
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        if not check(value):
            raise SettingsError(self.key(name), f"must be {kind}, got {_shown_value(name, value)}")
        return value  # type: ignore[no-any-return]

    def text(self, name: str, default: str = "") -> str:
        return self._get(name, lambda v: isinstance(v, str), "a string", default)

    def flag(self, name: str, default: bool) -> bool:
        return self._get(name, lambda v: isinstance(v, bool), "true or false", default)

    def positive(self, name: str, default: float) -> float:
        value = self._get(
            name, lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number", default
        )
        if not value > 0 or not math.isfinite(value):
            raise SettingsError(self.key(name), f"must be a positive number (finite), got {value!r}")
        return float(value)

    def count(self, name: str, default: int, low: int, high: int) -> int:
        """A whole number from ``low`` to ``high`` (finite by construction)."""
        value = self._get(name, lambda v: isinstance(v, int) and not isinstance(v, bool),
                          f"a whole number from {low} to {high}", default)
        if not low <= value <= high:
            raise SettingsError(self.key(name), f"must be a whole number from {low} to {high}, got {value}")
        return value

    def port(self, name: str, default: int) -> int:
        value = self._get(name, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer", default)
        if not 0 < value < 65536:
            raise SettingsError(self.key(name), f"must be a TCP port (1-65535), got {value}")
        return value

    def strings(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self._get(
            name,
            lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
            "a list of strings",
            list(default),
        )
        return tuple(value)

    def choice(self, name: str, default: str, options: tuple[str, ...]) -> str:
        value = self.text(name, default)
        if value not in options:
            raise SettingsError(self.key(name), f"must be one of {', '.join(options)}; got {value!r}")
        return value

    def url(self, name: str, default: str, schemes: tuple[str, ...] = ("http", "https"),
            *, userinfo: bool = False) -> str:
        """A URL with a host. Credentials in it (``user:pw@``) are refused unless ``userinfo``
        (the caller then takes them out); errors show the URL without them."""
        value = self.text(name, default)
        if value:
            shown = repr(_without_userinfo(value))
            try:
                parts = urlsplit(value)
                host, _port = parts.hostname, parts.port
            except ValueError:
                raise SettingsError(self.key(name), f"is not a valid URL: {shown}") from None
            if parts.scheme not in schemes or not host:
                raise SettingsError(self.key(name), f"must be a {'/'.join(schemes)} URL with a host, got {shown}")
            if (parts.username is not None or "@" in parts.netloc) and not userinfo:
                raise SettingsError(self.key(name), f"must not carry credentials (user:password@); got {shown}")
        return value

    def secret(self, name: str, *, required: bool = False) -> Secret:
        """``name`` inline, or ``name_file`` pointing at a file that holds it (trailing newline cut)."""
        inline = self._get(name, lambda v: isinstance(v, str), "a string (quote it in TOML)", "")
        path = self.text(f"{name}_file")
        if inline and path:
            raise SettingsError(self.key(name), f"give either {name} or {name}_file, not both")
        if path:
            file = self.path(path)
            try:
                inline = file.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise SettingsError(self.key(f"{name}_file"), f"cannot read {file}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise SettingsError(self.key(f"{name}_file"), f"{file} is not UTF-8 text") from None
            if not inline:
                raise SettingsError(self.key(f"{name}_file"), f"{file} is empty")
        if required and not inline:
            raise SettingsError(self.key(name), f"is required (set {name} or {name}_file)")
        return Secret(inline)

    def file(self, name: str) -> str:
        value = self.text(name)
        if value and not self.path(value).is_file():
            raise SettingsError(self.key(name), f"no such file: {self.path(value)}")
        return str(self.path(value)) if value else ""

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() or self.base is None else self.base / p

    def table(self, name: str) -> Mapping[str, Any]:
        self.used.add(name)
        return self.data.get(name, {})  # type: ignore[no-any-return]

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise SettingsError(self.key(unknown[0]), "unknown key (see docs/configuration.md)")


def _shown_value(name: str, value: Any) -> str:
    """A bad value as an error may show it: never a secret's, never more than 60 characters."""
    if name in SECRET_KEYS or name.endswith(("password", "secret")):
        kind = {"int": "an integer", "float": "a number", "bool": "a boolean", "list": "a list",
                "dict": "a table"}.get(type(value).__name__, "another type")
        return f"{kind} (value not shown: it is a secret)"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _host_port(sec: _Section, name: str, default: str) -> str:
    value = sec.text(name, default)
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise SettingsError(sec.key(name), f"must be HOST:PORT (port 0 = any free port), got {value!r}")
    return value


def _redis(s: _Section) -> RedisSettings:
    url = s.text("url")
    username = s.text("username")
    password = s.secret("password")
    if url:
        try:
            parts = urlsplit(url)
            _ = parts.hostname, parts.port
        except ValueError:
            raise SettingsError(s.key("url"), f"is not a valid URL: {_without_userinfo(url)!r}") from None
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise SettingsError(s.key("url"), f"must be a redis/rediss/unix URL, got {_without_userinfo(url)!r}")
        if parts.scheme == "unix" and not parts.path:
            raise SettingsError(s.key("url"), "a unix:// URL needs the socket path, e.g. unix:///run/redis/redis.sock")
        if parts.scheme != "unix" and not parts.hostname:
            raise SettingsError(s.key("url"), f"must be a redis/rediss URL with a host, got {_without_userinfo(url)!r}")
        if parts.password is not None or parts.username:
            # move credentials out of the URL: the URL is logged and shown, they must not be
            if parts.password is not None and password:
                raise SettingsError(s.key("password"), "the url has a password too; give it once")
            if parts.username and username and unquote(parts.username) != username:
                raise SettingsError(s.key("username"), "the url names another user")
            username = username or unquote(parts.username or "")
            password = password or Secret(unquote(parts.password or ""))
            url = _without_userinfo(url)
    sentinels = s.strings("sentinels")
    for entry in sentinels:
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SettingsError(s.key("sentinels"), f"each sentinel is HOST:PORT, got {entry!r}")
    if url and sentinels:
        raise SettingsError(s.key("sentinels"), "give url (one server) or sentinels, not both")
    red = RedisSettings(
        url=url,
        username=username,
        password=password,
        key_prefix=s.text("key_prefix", RedisSettings.key_prefix),
        socket_timeout=s.positive("socket_timeout", RedisSettings.socket_timeout),
        sentinels=sentinels,
        sentinel_service=s.text("sentinel_service", RedisSettings.sentinel_service),
        sentinel_password=s.secret("sentinel_password"),
        tls=s.flag("tls", url.startswith("rediss://")),
        tls_ca_file=s.file("tls_ca_file"),
        tls_cert_file=s.file("tls_cert_file"),
        tls_key_file=s.file("tls_key_file"),
        wait_replicas=s._get("wait_replicas", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 16,
                             "an integer from 0 to 16", 0),
        wait_timeout=s.positive("wait_timeout", RedisSettings.wait_timeout),
        cache_max_age=s.positive("cache_max_age", RedisSettings.cache_max_age),
    )
    s.done()
    if red.wait_timeout > 1.0:
        raise SettingsError(s.key("wait_timeout"), "keep it short (at most 1 s): every binding write waits for it")
    if red.tls and url and not url.startswith("rediss://"):
        raise SettingsError(s.key("tls"), "TLS to one server: use a rediss:// url")
    if not red.tls and url.startswith("rediss://"):
        raise SettingsError(s.key("tls"), "a rediss:// url always uses TLS")
    if (red.tls_ca_file or red.tls_cert_file) and not red.tls:
        raise SettingsError(s.key("tls_ca_file" if red.tls_ca_file else "tls_cert_file"),
                            "only used with TLS (a rediss:// url, or tls = true with sentinels)")
    if red.tls_key_file and not red.tls_cert_file:
        raise SettingsError(s.key("tls_key_file"), "a key without a client certificate (tls_cert_file)")
    if red.tls_cert_file and not red.tls_key_file and not _pem_has_key(red.tls_cert_file):
        raise SettingsError(s.key("tls_key_file"), "the client certificate needs its key (tls_key_file)")
    return red


def _push(s: _Section) -> PushSettings:
    push = _push_limits(s)
    s.done()
    return push


def _push_limits(s: _Section) -> PushSettings:
    rate = s._get("rate_per_minute", lambda v: isinstance(v, int | float) and not isinstance(v, bool),
                  "a number", PushSettings.rate_per_minute)
    if not rate >= 0:
        raise SettingsError(s.key("rate_per_minute"), f"must be 0 (no limit) or more, got {rate!r}")
    burst = s._get("burst", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer",
                   PushSettings.burst)
    if burst < 1:
        raise SettingsError(s.key("burst"), f"must be at least 1, got {burst}")
    if not math.isfinite(rate):
        raise SettingsError(s.key("rate_per_minute"), f"must be a finite number, got {rate!r}")
    return PushSettings(
        rate_per_minute=float(rate), burst=burst,
        max_in_flight_per_call=s.count("max_in_flight_per_call", PushSettings.max_in_flight_per_call, 1, 1000),
        max_in_flight_per_host=s.count("max_in_flight_per_host", PushSettings.max_in_flight_per_host, 1, 1000),
        allow_plain_http=s.flag("allow_plain_http", False),
    )


def _without_userinfo(url: str) -> str:
    """``url`` with any ``user:password@`` cut out; never raises (a URL that does not parse
    loses everything up to its last '@' after the scheme)."""
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        return parts._replace(netloc=host).geturl()
    except ValueError:
        scheme, sep, rest = url.partition("://")
        cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
        return f"{scheme}{sep}{rest[:cut].rpartition('@')[2]}{rest[cut:]}"


def _split_userinfo(url: str) -> tuple[str, str, str]:
    """(url without credentials, user, password), both unquoted; '' where absent."""
    parts = urlsplit(url)
    if parts.username is None and "@" not in parts.netloc:
        return url, "", ""
    return _without_userinfo(url), unquote(parts.username or ""), unquote(parts.password or "")


def _provider_url(s: _Section, name: str, default: str, plain_http: bool) -> str:
    """A push service URL: https only (tokens and bearer tokens go in it), unless the test
    setting ``[push] allow_plain_http`` is on."""
    value = s.url(name, default)
    if value and urlsplit(value).scheme != "https" and not plain_http:
        raise SettingsError(s.key(name), f"must be an https:// URL (plain http sends tokens in clear; "
                                         f"[push] allow_plain_http is for test rigs only), got {value!r}")
    return value


def _pem_has_key(path: str) -> bool:
    try:
        return bool(path) and "PRIVATE KEY-----" in Path(path).read_text(errors="replace")
    except OSError:
        return False


def _apns(data: Mapping[str, Any], where: str, base: Path | None, plain_http: bool = False) -> ApnsApp:
    s = _Section(data, where, base)
    topics = s.strings("topics")
    if not topics:
        raise SettingsError(s.key("topics"), "list at least one VoIP topic, e.g. ['com.example.app.voip']")
    app = ApnsApp(
        name=s.text("name", topics[0]),
        topics=topics,
        team_id=s.text("team_id"),
        key_id=s.text("key_id"),
        key=s.secret("key"),
        cert_file=s.file("cert_file"),
        production_url=_provider_url(s, "production_url", ApnsApp.production_url, plain_http),
        sandbox_url=_provider_url(s, "sandbox_url", ApnsApp.sandbox_url, plain_http),
        ca_file=s.file("ca_file"),
        jwt_lifetime=s.positive("jwt_lifetime", ApnsApp.jwt_lifetime),
        timeout=s.positive("timeout", ApnsApp.timeout),
    )
    s.done()
    if app.key and not (app.team_id and app.key_id):
        raise SettingsError(s.key("team_id"), "token auth needs team_id and key_id with the .p8 key")
    if not app.key and not app.cert_file:
        raise SettingsError(s.key("key_file"), "give a .p8 key (key_file, team_id, key_id) or cert_file")
    if app.jwt_lifetime > 3500:
        raise SettingsError(s.key("jwt_lifetime"), "APNs refuses provider tokens older than one hour")
    return app


def _fcm(data: Mapping[str, Any], where: str, base: Path | None, plain_http: bool = False) -> FcmProject:
    s = _Section(data, where, base)
    project = s.text("project_id")
    if not project:
        raise SettingsError(s.key("project_id"), "is required")
    proj = FcmProject(
        project_id=project,
        service_account=s.secret("service_account", required=True),
        api_url=_provider_url(s, "api_url", FcmProject.api_url, plain_http),
        ca_file=s.file("ca_file"),
        timeout=s.positive("timeout", FcmProject.timeout),
        sender_id=s.text("sender_id"),
    )
    s.done()
    if proj.sender_id and not (proj.sender_id.isascii() and proj.sender_id.isdigit() and len(proj.sender_id) <= 20):
        raise SettingsError(s.key("sender_id"), f"is the project number (digits), got {proj.sender_id!r}")
    return proj


def _host_rules(s: _Section, name: str) -> tuple[str, ...]:
    """An allow-list, each entry checked and normalised (netaddr.parse_host_rule)."""
    out = []
    for entry in s.strings(name):
        try:
            out.append(str(parse_host_rule(entry)))
        except ValueError as exc:
            raise SettingsError(s.key(name), str(exc)) from None
    return tuple(out)


def _digits(s: _Section, name: str, what: str) -> str:
    value = s._get(name, lambda v: isinstance(v, str | int) and not isinstance(v, bool), "a string of digits", "")
    value = str(value)
    if not value:
        raise SettingsError(s.key(name), f"is required ({what})")
    if not (value.isascii() and value.isdigit() and len(value) <= 24):
        raise SettingsError(s.key(name), f"must be {what}: digits only, got {value!r}")
    return value


def _hms(data: Mapping[str, Any], where: str, base: Path | None, plain_http: bool = False) -> HmsApp:
    s = _Section(data, where, base)
    app_id = _digits(s, "app_id", "the app id from AppGallery Connect")
    app = HmsApp(
        app_id=app_id,
        client_id=str(s._get("client_id", lambda v: isinstance(v, str | int) and not isinstance(v, bool),
                              "a string", app_id)),
        client_secret=s.secret("client_secret", required=True),
        token_url=_provider_url(s, "token_url", HmsApp.token_url, plain_http),
        api_url=_provider_url(s, "api_url", HmsApp.api_url, plain_http),
        ca_file=s.file("ca_file"),
        timeout=s.positive("timeout", HmsApp.timeout),
    )
    s.done()
    return app


def _hmos(data: Mapping[str, Any], where: str, base: Path | None, plain_http: bool = False) -> HmosProject:
    s = _Section(data, where, base)
    project_id = _digits(s, "project_id", "the project id from AppGallery Connect")
    proj = HmosProject(
        project_id=project_id,
        service_account=s.secret("service_account", required=True),
        api_url=_provider_url(s, "api_url", HmosProject.api_url, plain_http),
        ca_file=s.file("ca_file"),
        timeout=s.positive("timeout", HmosProject.timeout),
        call_push_type=s._get("call_push_type", lambda v: v in (6, 10) and not isinstance(v, bool),
                              "10 (in-app call) or 6 (background)", HmosProject.call_push_type),
        jwt_lifetime=s.positive("jwt_lifetime", HmosProject.jwt_lifetime),
    )
    s.done()
    if proj.jwt_lifetime > 3600:
        raise SettingsError(s.key("jwt_lifetime"), "Huawei takes service-account JWTs valid for at most 3600 s")
    return proj


def _webpush(s: _Section) -> WebPushSettings:
    wp = WebPushSettings(
        vapid_key=s.secret("vapid_key"),
        subject=s.text("subject"),
        jwt_lifetime=s.positive("jwt_lifetime", WebPushSettings.jwt_lifetime),
        timeout=s.positive("timeout", WebPushSettings.timeout),
        ca_file=s.file("ca_file"),
        max_payload=int(s.positive("max_payload", WebPushSettings.max_payload)),
    )
    s.done()
    if wp.vapid_key and not wp.subject.startswith(("mailto:", "https://")):
        raise SettingsError(s.key("subject"), "VAPID needs a contact: a mailto: or https: URI (RFC 8292 section 2.1)")
    if wp.subject and not wp.vapid_key:
        raise SettingsError(s.key("vapid_key"), "is required with subject (or vapid_key_file)")
    if wp.jwt_lifetime > 86400:
        raise SettingsError(s.key("jwt_lifetime"), "RFC 8292 caps the VAPID JWT at 24 hours (86400 s)")
    if not 128 <= wp.max_payload <= 4096:
        raise SettingsError(s.key("max_payload"), "must be 128-4096 bytes (RFC 8030 guarantees 4096)")
    return wp


def _plugins(raw: Any, base: Path | None) -> tuple[PluginConfig, ...]:
    """Each ``[[plugin]]`` names an installed plug-in (entry point group ``ari_push.providers``)
    that validates the rest of its table."""
    if not isinstance(raw, list):
        raise SettingsError("plugin", "must be an array of tables ([[plugin]])")
    from ari_push.push.plugins import load_plugin  # plug-ins import settings: load them late

    out: list[PluginConfig] = []
    for i, table in enumerate(raw):
        where = f"plugin[{i}]"
        if not isinstance(table, Mapping):
            raise SettingsError(where, "must be a table")
        name = table.get("name")
        if not isinstance(name, str) or not name:
            raise SettingsError(f"{where}.name", "is required: the plug-in's entry-point name")
        plugin = load_plugin(name, f"{where}.name")
        rest = {k: v for k, v in table.items() if k != "name"}
        config = plugin.configure(rest, where, base)
        out.append(PluginConfig(name=name, provider_names=tuple(plugin.provider_names), config=config))
    return tuple(out)


def _build(raw: Mapping[str, Any], base: Path | None) -> Settings:
    top = _Section(raw, "", base)
    freeswitch = _freeswitch(_Section(top.table("freeswitch"), "freeswitch", base)) if "freeswitch" in raw else None
    ari_s = _Section(top.table("ari"), "ari", base)
    # Credentials in the URL are moved out of it (the URL is logged on "ari link up").
    ari_url, url_user, url_password = _split_userinfo(ari_s.url("url", AriSettings.url, userinfo=True))
    ari_user = ari_s.text("username", "")
    if url_user and ari_user and url_user != ari_user:
        raise SettingsError("ari.username", "the url names another user")
    if url_password and (ari_s.data.get("password") or ari_s.data.get("password_file")):
        raise SettingsError("ari.password", "the url has a password too; give it once")
    ari_password = ari_s.secret("password", required=not url_password and freeswitch is None)
    ari = AriSettings(
        url=ari_url,
        username=ari_user or url_user or AriSettings.username,
        password=ari_password or Secret(url_password),
        app=ari_s.text("app", AriSettings.app),
        request_timeout=ari_s.positive("request_timeout", AriSettings.request_timeout),
        heartbeat=ari_s.positive("heartbeat", AriSettings.heartbeat),
        connection=ari_s.choice("connection", AriSettings.connection, ("inbound", "outbound")),
        outbound_listen=_host_port(ari_s, "outbound_listen", AriSettings.outbound_listen),
        outbound_path=ari_s.text("outbound_path", AriSettings.outbound_path),
        outbound_username=ari_s.text("outbound_username", AriSettings.outbound_username),
        outbound_password=ari_s.secret("outbound_password"),
    )
    ari_s.done()
    if ari.connection == "outbound" and not str(ari.outbound_password):
        raise SettingsError("ari.outbound_password", "is required with connection = \"outbound\" (the password "
                            "of websocket_client.conf, checked on every connection from Asterisk)")
    if not ari.outbound_path.startswith("/"):
        raise SettingsError("ari.outbound_path", f"must start with /, got {ari.outbound_path!r}")
    if not ari.app or any(c in ari.app for c in ", |/"):
        raise SettingsError("ari.app", f"must be a plain Stasis application name, got {ari.app!r}")

    ami_s = _Section(top.table("ami"), "ami", base)
    ami = AmiSettings(
        host=ami_s.text("host", AmiSettings.host),
        port=ami_s.port("port", AmiSettings.port),
        username=ami_s.text("username", AmiSettings.username),
        secret=ami_s.secret("secret", required=freeswitch is None),
        request_timeout=ami_s.positive("request_timeout", AmiSettings.request_timeout),
        heartbeat=ami_s.positive("heartbeat", AmiSettings.heartbeat),
    )
    ami_s.done()

    red = _redis(_Section(top.table("redis"), "redis", base))

    cap_s = _Section(top.table("capture"), "capture", base)
    cap = CaptureSettings(
        retention_days=cap_s.positive("retention_days", CaptureSettings.retention_days),
        vendor_allowed_hosts=_host_rules(cap_s, "vendor_allowed_hosts"),
        extra_providers=tuple(p.lower() for p in cap_s.strings("extra_providers")),
        webpush_allowed_hosts=(_host_rules(cap_s, "webpush_allowed_hosts")
                               if "webpush_allowed_hosts" in cap_s.data else None),
        max_devices_per_aor=cap_s.count("max_devices_per_aor", CaptureSettings.max_devices_per_aor, 1, 1000),
    )
    cap_s.done()
    for name in cap.extra_providers:
        if name in KNOWN_PROVIDERS or not name.replace("-", "").replace(".", "").isalnum():
            raise SettingsError("capture.extra_providers", f"{name!r} is built in or not a plain name")

    call_s = _Section(top.table("calls"), "calls", base)
    calls = CallSettings(
        default_timeout=call_s.positive("default_timeout", CallSettings.default_timeout),
        max_timeout=call_s.positive("max_timeout", CallSettings.max_timeout),
        moh_class=call_s.text("moh_class"),
        on_decline=call_s.choice("on_decline", CallSettings.on_decline, ("busy", "keep-waiting")),
        missed_call_push=call_s.flag("missed_call_push", CallSettings.missed_call_push),
        continue_context=call_s.text("continue_context"),
        dial_timeout=call_s.positive("dial_timeout", CallSettings.dial_timeout),
        max_duration=call_s.positive("max_duration", CallSettings.max_duration),
        stale_ring_delay=call_s.positive("stale_ring_delay", CallSettings.stale_ring_delay),
        end_notice_window=call_s.positive("end_notice_window", CallSettings.end_notice_window),
    )
    call_s.done()
    if calls.default_timeout > calls.max_timeout:
        raise SettingsError("calls.default_timeout", f"exceeds calls.max_timeout ({calls.max_timeout})")

    push = _push(_Section(top.table("push"), "push", base))

    http_s = _Section(top.table("http"), "http", base)
    http = HttpSettings(listen=_host_port(http_s, "listen", HttpSettings.listen),
                        enabled=http_s.flag("enabled", True),
                        header_timeout=http_s.positive("header_timeout", HttpSettings.header_timeout),
                        max_connections=http_s.count("max_connections", HttpSettings.max_connections, 1, 10000),
                        console=http_s.flag("console", True),
                        auth_token=http_s.secret("auth_token"), basic_auth=http_s.secret("basic_auth"),
                        max_streams=http_s.count("max_streams", HttpSettings.max_streams, 1, 256))
    if http.auth_token and (len(http.auth_token) < 16 or any(c.isspace() for c in http.auth_token)):
        raise SettingsError("http.auth_token_file", "the bearer token must be at least 16 characters, no spaces "
                                                    "(e.g. `openssl rand -hex 24`)")
    if http.basic_auth and (not http.basic_auth.partition(":")[0] or not http.basic_auth.partition(":")[2]):
        raise SettingsError("http.basic_auth_file", "must hold user:password (neither empty)")
    if http.max_streams >= http.max_connections:
        raise SettingsError("http.max_streams", "must be below http.max_connections (streams hold a connection)")
    http_s.done()

    log_s = _Section(top.table("log"), "log", base)
    log = LogSettings(
        level=log_s.choice("level", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
        format=log_s.choice("format", "human", ("human", "json")),
    )
    log_s.done()

    top.used.update({"apns", "fcm", "hms", "hmos", "plugin"})
    apns_raw = raw.get("apns", [])
    fcm_raw = raw.get("fcm", [])
    if not isinstance(apns_raw, list):
        raise SettingsError("apns", "must be an array of tables ([[apns]])")
    if not isinstance(fcm_raw, list):
        raise SettingsError("fcm", "must be an array of tables ([[fcm]])")
    apns = tuple(_apns(a, f"apns[{i}]", base, push.allow_plain_http) for i, a in enumerate(apns_raw))
    fcm = tuple(_fcm(f, f"fcm[{i}]", base, push.allow_plain_http) for i, f in enumerate(fcm_raw))
    seen: set[str] = set()
    for i, app in enumerate(apns):
        for topic in app.topics:
            if topic in seen:
                raise SettingsError(f"apns[{i}].topics", f"topic {topic!r} is served by two apps")
            seen.add(topic)
    projects = [p.project_id for p in fcm]
    if len(set(projects)) != len(projects):
        raise SettingsError("fcm", "the same project_id is configured twice")
    senders = [p.sender_id for p in fcm if p.sender_id]
    if len(set(senders)) != len(senders):
        raise SettingsError("fcm", "the same sender_id is configured twice")
    hms_raw, hmos_raw = raw.get("hms", []), raw.get("hmos", [])
    if not isinstance(hms_raw, list):
        raise SettingsError("hms", "must be an array of tables ([[hms]])")
    if not isinstance(hmos_raw, list):
        raise SettingsError("hmos", "must be an array of tables ([[hmos]])")
    hms = tuple(_hms(h, f"hms[{i}]", base, push.allow_plain_http) for i, h in enumerate(hms_raw))
    hmos = tuple(_hmos(h, f"hmos[{i}]", base, push.allow_plain_http) for i, h in enumerate(hmos_raw))
    if len({a.app_id for a in hms}) != len(hms):
        raise SettingsError("hms", "the same app_id is configured twice")
    if len({p.project_id for p in hmos}) != len(hmos):
        raise SettingsError("hmos", "the same project_id is configured twice")
    webpush = _webpush(_Section(top.table("webpush"), "webpush", base))
    plugins = _plugins(raw.get("plugin", []), base)
    plugin_names = [n for p in plugins for n in p.provider_names]
    for name in plugin_names:
        if name in KNOWN_PROVIDERS or plugin_names.count(name) > 1:
            raise SettingsError("plugin", f"provider name {name!r} is built in or served by two plug-ins")
    if plugin_names:  # the contact parser accepts what a plug-in serves
        cap = replace(cap, extra_providers=tuple(dict.fromkeys((*cap.extra_providers, *plugin_names))))

    ven_s = _Section(top.table("vendor"), "vendor", base)
    vendor = VendorSettings(
        body_template=ven_s.text("body_template", VendorSettings.body_template),
        content_type=ven_s.text("content_type", VendorSettings.content_type),
        timeout=ven_s.positive("timeout", VendorSettings.timeout),
        max_response_bytes=ven_s.count("max_response_bytes", VendorSettings.max_response_bytes, 1, 1 << 24),
        ca_file=ven_s.file("ca_file"),
        max_connections_per_host=ven_s.count("max_connections_per_host", VendorSettings.max_connections_per_host,
                                             1, 100),
    )
    ven_s.done()

    hook_s = _Section(top.table("webhook"), "webhook", base)
    hook = WebhookSettings(
        url=_provider_url(hook_s, "url", "", push.allow_plain_http),
        secret=hook_s.secret("secret"),
        timeout=hook_s.positive("timeout", WebhookSettings.timeout),
        providers=tuple(p.lower() for p in hook_s.strings("providers")),
        ca_file=hook_s.file("ca_file"),
        max_response_bytes=hook_s.count("max_response_bytes", WebhookSettings.max_response_bytes, 1, 1 << 24),
    )
    hook_s.done()
    if hook.url and not hook.secret:
        raise SettingsError("webhook.secret", "a webhook needs a secret (or secret_file) to sign with")
    for name in hook.providers:
        if name not in KNOWN_PROVIDERS and name not in cap.extra_providers:
            raise SettingsError("webhook.providers", f"unknown provider {name!r}")

    clu_s = _Section(top.table("cluster"), "cluster", base)
    cluster = ClusterSettings(
        mode=clu_s.choice("mode", "single", ("single", "broadcast", "lease")),
        app_family=clu_s.text("app_family", ClusterSettings.app_family),
        heartbeat=clu_s.positive("heartbeat", ClusterSettings.heartbeat),
        node_ttl=clu_s.positive("node_ttl", ClusterSettings.node_ttl),
        lease_ttl=clu_s.positive("lease_ttl", ClusterSettings.lease_ttl),
    )
    clu_s.done()
    if cluster.mode != "single" and red.embedded:
        raise SettingsError("cluster.mode", f"{cluster.mode!r} needs [redis] (daemons share state through it)")
    if cluster.mode == "lease" and freeswitch is not None:
        raise SettingsError("cluster.mode", "\"lease\" is for Asterisk without StasisBroadcast; on FreeSWITCH every "
                                            "daemon sees each parked call: use \"broadcast\" (Redis claims)")
    if cluster.mode == "broadcast" and freeswitch is None and not ari.app.startswith(cluster.app_family + "-"):
        raise SettingsError("ari.app", f"in broadcast mode each daemon needs its own app named "
                                       f"'{cluster.app_family}-<name>', got {ari.app!r}")
    if cluster.node_ttl <= cluster.heartbeat:
        raise SettingsError("cluster.node_ttl", "must be longer than cluster.heartbeat")
    if ari.connection == "outbound" and cluster.mode != "single":
        raise SettingsError("ari.connection", f"\"outbound\" serves one Asterisk connection; cluster.mode "
                                              f"{cluster.mode!r} needs connection = \"inbound\"")

    refresh = _refresh(_Section(top.table("refresh"), "refresh", base), cap)
    mwi = _mwi(_Section(top.table("mwi"), "mwi", base), cap)
    messages = _messages(_Section(top.table("messages"), "messages", base))
    tr_s = _Section(top.table("traces"), "traces", base)
    traces = TraceSettings(
        enabled=tr_s.flag("enabled", TraceSettings.enabled),
        keep=tr_s.positive("keep", TraceSettings.keep),
        max_calls=tr_s.count("max_calls", TraceSettings.max_calls, 1, 10_000_000),
        max_events=tr_s.count("max_events", TraceSettings.max_events, 16, 100_000),
    )
    tr_s.done()
    settings = Settings(
        ari=ari, ami=ami, redis=red, capture=cap, calls=calls, push=push, cluster=cluster, http=http, log=log,
        apns=apns, fcm=fcm, hms=hms, hmos=hmos, webpush=webpush, plugins=plugins, vendor=vendor, webhook=hook,
        node_id=top.text("node_id"),
        shutdown_timeout=top.positive("shutdown_timeout", Settings.shutdown_timeout),
        refresh=refresh, mwi=mwi, messages=messages, traces=traces,
        freeswitch=freeswitch,
    )
    top.done()
    if freeswitch is not None:
        for name in ("ari", "ami"):
            if name in raw:
                raise SettingsError(name, "[freeswitch] replaces [ari] and [ami]: give one PBX, not both")
    return settings


# ---------------------------------------------------------------- reachability


def _refresh(s: _Section, cap: CaptureSettings) -> RefreshSettings:
    r = RefreshSettings(
        enabled=s.flag("enabled", RefreshSettings.enabled),
        at_fraction=s.positive("at_fraction", RefreshSettings.at_fraction),
        min_interval=s.positive("min_interval", RefreshSettings.min_interval),
        disabled_providers=tuple(p.lower() for p in s.strings("disabled_providers",
                                                             RefreshSettings.disabled_providers)),
        grace=s.positive("grace", RefreshSettings.grace),
        sync_interval=s.positive("sync_interval", RefreshSettings.sync_interval),
        tick=s.positive("tick", RefreshSettings.tick),
        lease=s.positive("lease", RefreshSettings.lease),
    )
    s.done()
    if not 0.1 <= r.at_fraction < 1.0:
        raise SettingsError(s.key("at_fraction"), f"must be from 0.1 to below 1 (0.8 = at 80 %), got {r.at_fraction}")
    for name in r.disabled_providers:
        if name not in KNOWN_PROVIDERS and name not in cap.extra_providers:
            raise SettingsError(s.key("disabled_providers"), f"unknown provider {name!r}")
    if r.tick > 10:
        raise SettingsError(s.key("tick"), "at most 10 s: refreshes would come late")
    return r


def _mwi(s: _Section, cap: CaptureSettings) -> MwiSettings:
    raw = s.table("mailboxes")
    if not isinstance(raw, Mapping):
        raise SettingsError(s.key("mailboxes"), 'must be a table: "box@context" = ["aor", ...]')
    boxes: list[tuple[str, tuple[str, ...]]] = []
    for box, aors in raw.items():
        if "@" not in box or box.startswith("@") or box.endswith("@"):
            raise SettingsError(f"{s.key('mailboxes')}.{box}", "a mailbox is written box@context")
        if not isinstance(aors, list) or not aors or not all(isinstance(a, str) and a for a in aors):
            raise SettingsError(f"{s.key('mailboxes')}.{box}", "must be a non-empty list of AOR names")
        boxes.append((box, tuple(aors)))
    m = MwiSettings(
        enabled=s.flag("enabled", MwiSettings.enabled),
        min_interval=s.positive("min_interval", MwiSettings.min_interval),
        disabled_providers=tuple(p.lower() for p in s.strings("disabled_providers", MwiSettings.disabled_providers)),
        push_ttl=s.positive("push_ttl", MwiSettings.push_ttl),
        map_ttl=s.positive("map_ttl", MwiSettings.map_ttl),
        mailboxes=tuple(sorted(boxes)),
    )
    s.done()
    for name in m.disabled_providers:
        if name not in KNOWN_PROVIDERS and name not in cap.extra_providers:
            raise SettingsError(s.key("disabled_providers"), f"unknown provider {name!r}")
    return m


def _messages(s: _Section) -> MessageSettings:
    m = MessageSettings(
        enabled=s.flag("enabled", MessageSettings.enabled),
        ttl=s.positive("ttl", MessageSettings.ttl),
        poll=s.positive("poll", MessageSettings.poll),
        preview=s.flag("preview", MessageSettings.preview),
        preview_chars=int(s.positive("preview_chars", MessageSettings.preview_chars)),
        max_bytes=int(s.positive("max_bytes", MessageSettings.max_bytes)),
    )
    s.done()
    if m.poll > 10:
        raise SettingsError(s.key("poll"), "at most 10 s: a woken phone would wait for its messages")
    return m


def _freeswitch(s: _Section) -> FreeswitchSettings:
    fs = FreeswitchSettings(
        host=s.text("host", FreeswitchSettings.host),
        port=s.port("port", FreeswitchSettings.port),
        password=s.secret("password", required=True),
        profile=s.text("profile", FreeswitchSettings.profile),
        request_timeout=s.positive("request_timeout", FreeswitchSettings.request_timeout),
        heartbeat=s.positive("heartbeat", FreeswitchSettings.heartbeat),
    )
    s.done()
    if not fs.host or any(c.isspace() for c in fs.host) or "/" in fs.host:
        raise SettingsError(s.key("host"), f"must be a host name or address, got {fs.host!r}")
    if any(c.isspace() for c in fs.password):
        raise SettingsError(s.key("password"), "the event socket cannot take a password with spaces or line breaks")
    if not fs.profile or not all(c.isalnum() or c in "-_." for c in fs.profile):
        raise SettingsError(s.key("profile"), f"must be a sofia profile name (letters, digits, - _ .), got "
                                              f"{fs.profile!r}")
    return fs


# ---------------------------------------------------------------- environment overrides


def _coerce_env(text: str) -> Any:
    """Env values are TOML values where they parse as one (numbers, booleans, lists), else strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


# ARI_PUSH_RIG_SLOT (test port blocks) and the FreeSWITCH provisioning switches (rig/provision.py)
RIG_VARIABLES = frozenset({"rig_slot", "freeswitch_sources", "freeswitch_build"})


def apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """``ARI_PUSH_ARI__PASSWORD=x`` sets ``[ari] password``; ``__`` separates levels."""
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in ("ARI_PUSH_CONFIG", "ARI_PUSH_CACHE", "ARI_PUSH_RIG_SLOT"):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if any(not p for p in path) or len(path) > 2:
            raise SettingsError(name, "environment overrides look like ARI_PUSH_SECTION__KEY")
        if path[0].startswith(("debian", "rig_")) or path[0] in RIG_VARIABLES:
            continue  # rig variables (ARI_PUSH_DEBIAN_MIRROR, ARI_PUSH_RIG_SLOT, FreeSWITCH's), not settings
        target = merged
        if len(path) == 2:
            existing = target.get(path[0], {})
            if not isinstance(existing, dict):
                raise SettingsError(name, f"[{path[0]}] is not a table")
            target = target.setdefault(path[0], existing)
        # A secret is text whatever it looks like: "12345678" must not become a number.
        target[path[-1]] = value if path[-1] in SECRET_KEYS else _coerce_env(value)
    return merged


def load(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, merge and validate. Raises SettingsError naming the first bad key."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    base: Path | None = None
    if path is not None:
        file = Path(path)
        base = file.parent.resolve()
        try:
            raw = tomllib.loads(file.read_text())
        except FileNotFoundError:
            raise SettingsError("config", f"no such file: {file}") from None
        except OSError as exc:
            raise SettingsError("config", f"cannot read {file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError("config", f"{file} is not valid TOML: {exc}") from None
    return _build(apply_env(raw, environ), base)


def to_display(obj: Any) -> Any:
    """Settings as plain data with every secret masked: what check-config prints."""
    if isinstance(obj, Secret):
        return mask(str(obj)) if obj else ""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_display(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [to_display(x) for x in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_display(v) for k, v in obj.items()}
    return obj
