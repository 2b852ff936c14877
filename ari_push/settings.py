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
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from ari_push.model import mask
from ari_push.netaddr import parse_host_rule

ENV_PREFIX = "ARI_PUSH_"
KNOWN_PROVIDERS = ("apns", "fcm", "vendor", "webpush")
#: Keys whose values are secrets: an error about them never shows the value, and an environment
#: override of them is always taken as text (``ARI_PUSH_ARI__PASSWORD=12345678`` is a string).
SECRET_KEYS = frozenset({"password", "secret", "sentinel_password", "key", "service_account"})


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


@dataclass(frozen=True)
class AmiSettings:
    host: str = "127.0.0.1"
    port: int = 5038
    username: str = "ari-push"
    secret: Secret = Secret("")
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
    vendor: VendorSettings = field(default_factory=VendorSettings)
    webhook: WebhookSettings = field(default_factory=WebhookSettings)
    node_id: str = ""
    shutdown_timeout: float = 10.0


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
    )
    s.done()
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


def _build(raw: Mapping[str, Any], base: Path | None) -> Settings:
    top = _Section(raw, "", base)
    ari_s = _Section(top.table("ari"), "ari", base)
    # Credentials in the URL are moved out of it (the URL is logged on "ari link up").
    ari_url, url_user, url_password = _split_userinfo(ari_s.url("url", AriSettings.url, userinfo=True))
    ari_user = ari_s.text("username", "")
    if url_user and ari_user and url_user != ari_user:
        raise SettingsError("ari.username", "the url names another user")
    if url_password and (ari_s.data.get("password") or ari_s.data.get("password_file")):
        raise SettingsError("ari.password", "the url has a password too; give it once")
    ari_password = ari_s.secret("password", required=not url_password)
    ari = AriSettings(
        url=ari_url,
        username=ari_user or url_user or AriSettings.username,
        password=ari_password or Secret(url_password),
        app=ari_s.text("app", AriSettings.app),
        request_timeout=ari_s.positive("request_timeout", AriSettings.request_timeout),
        heartbeat=ari_s.positive("heartbeat", AriSettings.heartbeat),
    )
    ari_s.done()
    if not ari.app or any(c in ari.app for c in ", |/"):
        raise SettingsError("ari.app", f"must be a plain Stasis application name, got {ari.app!r}")

    ami_s = _Section(top.table("ami"), "ami", base)
    ami = AmiSettings(
        host=ami_s.text("host", AmiSettings.host),
        port=ami_s.port("port", AmiSettings.port),
        username=ami_s.text("username", AmiSettings.username),
        secret=ami_s.secret("secret", required=True),
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
                        max_connections=http_s.count("max_connections", HttpSettings.max_connections, 1, 10000))
    http_s.done()

    log_s = _Section(top.table("log"), "log", base)
    log = LogSettings(
        level=log_s.choice("level", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
        format=log_s.choice("format", "human", ("human", "json")),
    )
    log_s.done()

    top.used.update({"apns", "fcm"})
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
    if cluster.mode == "broadcast" and not ari.app.startswith(cluster.app_family + "-"):
        raise SettingsError("ari.app", f"in broadcast mode each daemon needs its own app named "
                                       f"'{cluster.app_family}-<name>', got {ari.app!r}")
    if cluster.node_ttl <= cluster.heartbeat:
        raise SettingsError("cluster.node_ttl", "must be longer than cluster.heartbeat")

    settings = Settings(
        ari=ari, ami=ami, redis=red, capture=cap, calls=calls, push=push, cluster=cluster, http=http, log=log,
        apns=apns, fcm=fcm, vendor=vendor, webhook=hook,
        node_id=top.text("node_id"),
        shutdown_timeout=top.positive("shutdown_timeout", Settings.shutdown_timeout),
    )
    top.done()
    return settings


# ---------------------------------------------------------------- environment overrides


def _coerce_env(text: str) -> Any:
    """Env values are TOML values where they parse as one (numbers, booleans, lists), else strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """``ARI_PUSH_ARI__PASSWORD=x`` sets ``[ari] password``; ``__`` separates levels."""
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in ("ARI_PUSH_CONFIG", "ARI_PUSH_CACHE"):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if any(not p for p in path) or len(path) > 2:
            raise SettingsError(name, "environment overrides look like ARI_PUSH_SECTION__KEY")
        if path[0].startswith(("debian", "rig_")):
            continue  # rig variables (ARI_PUSH_DEBIAN_MIRROR, ARI_PUSH_RIG_SLOT), not settings
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
    return obj
