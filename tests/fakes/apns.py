"""A strict local APNs: raw ``h2`` over TLS (ALPN h2 only), answering like Apple does.

On 200 it sends headers only (``:status``, ``apns-id``), no DATA frame at all; on an error
a JSON body ``{"reason": ...}`` (plus ``timestamp`` in ms for 410). It checks what Apple
checks: method, path and token, the ES256 provider JWT (known kid, team, signature, age,
not re-signed more often than every 20 minutes), or a client certificate; push type, topic
(``.voip`` for voip, allowed for the team), priority, expiration (both required on VoIP
pushes: ari-push always sends them, and a push without an expiration is stored by Apple and
delivered long after the call), apns-id, collapse-id, payload size. A device token belongs to
one environment: each fake is production or sandbox, and a token bound to the other one
gets 400 BadDeviceToken, as from Apple. It counts TLS handshakes so tests can assert
connection reuse.

Usage (pytest or a plain script)::

    fake = FakeApns(pki)                  # tests.fakes.keys.make_pki(dir)
    await fake.start()
    p8_pem = fake.add_key("TEAM123456", "KEY1234567", ["com.example.phone.voip"])
    fake.script(token, ApnsAnswer(410, "Unregistered", timestamp_ms=...))
    sandbox = FakeApns(pki, environment="sandbox", device_tokens=fake.device_tokens)
    fake.bind_token(token2, "sandbox")    # a development build's token: production refuses it
    ...
    await fake.stop()
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from tests.fakes.h2server import H2Request, H2Response, H2Server
from tests.fakes.keys import Pki, ec_key, private_pem

PATH_RE = re.compile(r"^/3/device/([^/?]+)$")
TOKEN_RE = re.compile(r"^[0-9a-fA-F]{64}$")
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
PUSH_TYPES = {"alert", "background", "location", "voip", "complication", "fileprovider", "mdm",
              "liveactivity", "pushtotalk", "widgets", "controls"}
MAX_PAYLOAD = {"voip": 5120}
DEFAULT_MAX_PAYLOAD = 4096
MIN_REFRESH = 1200.0  # Apple: refresh provider tokens no more than once every 20 minutes


@dataclass
class ApnsAnswer:
    """A canned answer for one push. ``stall`` never answers."""

    status: int = 200
    reason: str = ""
    timestamp_ms: int | None = None
    retry_after: str | None = None
    stall: bool = False


@dataclass
class ApnsRequest:
    token: str
    headers: dict[str, str]
    payload: dict[str, Any]
    connection: int
    answer: int = 0


@dataclass
class _Key:
    team_id: str
    key_id: str
    public: ec.EllipticCurvePublicKey
    topics: set[str]
    current: str = ""
    current_since: float = -1e18
    known: set[str] = field(default_factory=set)
    newest_iat: int = -(10**12)
    expired_through: int = -(10**12)  # tokens issued at or before this second are expired


class FakeApns:
    """The fake server. ``clock`` is Apple's clock for the JWT checks."""

    def __init__(self, pki: Pki, *, clock: Callable[[], float] = time.time, max_token_age: float = 3600.0,
                 cert_topics: dict[str, set[str]] | None = None, environment: str = "production",
                 device_tokens: dict[str, str] | None = None) -> None:
        assert environment in ("production", "sandbox")
        self.pki = pki
        self.environment = environment
        #: device token (lower case) -> "production" | "sandbox"; unlisted tokens are production
        #: tokens. Share one dict between a production and a sandbox fake.
        self.device_tokens: dict[str, str] = {} if device_tokens is None else device_tokens
        self.clock = clock
        self.max_token_age = max_token_age
        #: client-certificate common name -> topics it may push to (certificate auth)
        self.cert_topics = cert_topics or {}
        self.requests: list[ApnsRequest] = []
        self.answers: list[tuple[int, str]] = []
        self._keys: dict[str, _Key] = {}
        self._scripts: dict[str, deque[ApnsAnswer]] = {}
        self._h2 = H2Server(pki, self._handle, client_ca=pki.ca_file)
        #: token -> (voip | remote, bundle id), from register_device
        self.device_kinds: dict[str, tuple[str, str]] = {}
        #: told about every accepted push (token, headers, payload): a device model takes it here
        self.on_push: Callable[[str, dict[str, str], dict[str, Any]], None] | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def host(self) -> str:
        return self._h2.host

    @property
    def port(self) -> int:
        return self._h2.port

    @property
    def handshakes(self) -> int:
        return self._h2.handshakes

    @property
    def refused_connections(self) -> int:
        return self._h2.refused_connections

    @property
    def open_connections(self) -> int:
        return self._h2.open_connections

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeApns:
        await self._h2.start(host, port)
        return self

    async def stop(self) -> None:
        await self._h2.stop()

    async def _handle(self, request: H2Request) -> H2Response | None:
        apns_id, answer = self.evaluate(request.header_list, request.body, request.peer_cn, request.connection)
        if answer.stall:
            return None
        headers = [("apns-id", apns_id)]
        if answer.retry_after:
            headers.append(("retry-after", answer.retry_after))
        if answer.status == 200:
            return H2Response(200, b"", headers)  # no DATA frame, like Apple
        body: dict[str, Any] = {"reason": answer.reason}
        if answer.timestamp_ms is not None:
            body["timestamp"] = answer.timestamp_ms
        return H2Response(answer.status, json.dumps(body).encode(),
                          [*headers, ("content-type", "application/json; charset=utf-8")])

    async def __aenter__(self) -> FakeApns:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------ control

    def add_key(self, team_id: str, key_id: str, topics: list[str] | set[str],
                key: ec.EllipticCurvePrivateKey | None = None) -> str:
        """Register a signing key for a team and its topics; returns the .p8 PEM text."""
        key = key or ec_key()
        self._keys[key_id] = _Key(team_id, key_id, key.public_key(), set(topics))
        return private_pem(key)

    def script(self, token: str, *answers: ApnsAnswer) -> None:
        self._scripts.setdefault(token.lower(), deque()).extend(answers)

    def bind_token(self, token: str, environment: str) -> None:
        """``token`` was issued to an app build for ``environment`` ("production"/"sandbox")."""
        assert environment in ("production", "sandbox")
        self.device_tokens[token.lower()] = environment

    def expire_provider_tokens(self) -> None:
        """Apple now calls every provider token issued at or before the newest ``iat`` seen
        expired (Apple judges a token by its issue time, so a token re-signed within that same
        second is just as expired: a client must sign with a later ``iat``)."""
        for key in self._keys.values():
            key.expired_through = max(key.expired_through, key.newest_iat)

    def newest_iat(self, key_id: str) -> int:
        return self._keys[key_id].newest_iat

    def provider_tokens_seen(self, key_id: str) -> int:
        return len(self._keys[key_id].known)

    def drop_connections(self) -> None:
        self._h2.drop_connections()

    # ------------------------------------------------------------ the checks

    def evaluate(self, header_list: list[tuple[str, str]], body: bytes, peer_cn: str | None,
                 connection: int) -> tuple[str, ApnsAnswer]:
        headers: dict[str, str] = {}
        duplicate = False
        for name, value in header_list:
            duplicate |= name in headers
            headers[name] = value
        apns_id = headers.get("apns-id") or str(uuid.uuid4()).upper()
        answer = self._check(headers, body, peer_cn, duplicate)
        if answer is None:
            token = PATH_RE.match(headers[":path"]).group(1).lower()  # type: ignore[union-attr]
            self.requests.append(ApnsRequest(token, headers, json.loads(body), connection))
            if self.on_push is not None:
                self.on_push(token, headers, self.requests[-1].payload)
            queue = self._scripts.get(token)
            answer = queue.popleft() if queue else ApnsAnswer()
        self.answers.append((answer.status, answer.reason))
        return apns_id, answer

    def _check(self, h: dict[str, str], body: bytes, peer_cn: str | None, duplicate: bool) -> ApnsAnswer | None:
        def bad(status: int, reason: str) -> ApnsAnswer:
            return ApnsAnswer(status, reason)

        if duplicate:
            return bad(400, "DuplicateHeaders")
        if h.get(":method") != "POST":
            return bad(405, "MethodNotAllowed")
        match = PATH_RE.match(h.get(":path", ""))
        if match is None:
            return bad(404, "BadPath")
        if not TOKEN_RE.match(match.group(1)):
            return bad(400, "BadDeviceToken")
        if self.device_tokens.get(match.group(1).lower(), "production") != self.environment:
            return bad(400, "BadDeviceToken")  # a token of the other environment
        topic = h.get("apns-topic")
        # authentication: provider token, or else a client certificate
        auth = h.get("authorization")
        if auth is not None:
            allowed, problem = self._check_jwt(auth)
            if problem is not None:
                return problem
        elif peer_cn is not None and peer_cn in self.cert_topics:
            allowed = self.cert_topics[peer_cn]
        else:
            return bad(403, "MissingProviderToken")
        push_type = h.get("apns-push-type")
        if push_type is None or push_type not in PUSH_TYPES:
            return bad(400, "InvalidPushType")
        if not topic:
            return bad(400, "MissingTopic")
        if push_type == "voip" and not topic.endswith(".voip"):
            return bad(400, "BadTopic")
        if topic not in allowed:
            return bad(400, "TopicDisallowed")
        if push_type == "voip" and ("apns-priority" not in h or "apns-expiration" not in h):
            return bad(400, "BadPriority" if "apns-priority" not in h else "BadExpirationDate")
        if "apns-priority" in h and h["apns-priority"] not in ("1", "5", "10"):
            return bad(400, "BadPriority")
        if push_type == "voip" and h["apns-priority"] != "10":
            return bad(400, "BadPriority")  # a VoIP push is for an incoming call: immediate delivery
        if "apns-expiration" in h and not h["apns-expiration"].isdigit():
            return bad(400, "BadExpirationDate")
        if "apns-id" in h and not UUID_RE.match(h["apns-id"]):
            return bad(400, "BadMessageId")
        if "apns-collapse-id" in h and len(h["apns-collapse-id"].encode()) > 64:
            return bad(400, "BadCollapseId")
        if not body:
            return bad(400, "PayloadEmpty")
        if len(body) > MAX_PAYLOAD.get(push_type, DEFAULT_MAX_PAYLOAD):
            return bad(413, "PayloadTooLarge")
        try:
            payload = json.loads(body)
        except ValueError:
            return bad(400, "BadPayload")
        if not isinstance(payload, dict):
            return bad(400, "BadPayload")
        return self._check_kind(match.group(1).lower(), push_type, topic, h.get("apns-priority", "10"), payload)

    def _check_kind(self, token: str, push_type: str, topic: str, priority: str,
                    payload: dict[str, Any]) -> ApnsAnswer | None:
        """Apple's rules per push type and token: a VoIP token takes VoIP pushes only (topic
        ``<bundle>.voip``), a remote token alert/background pushes only (topic ``<bundle>``); a
        background push is priority 5 with ``content-available`` and no alert; an alert push
        has ``aps.alert``. Tokens not registered with ``register_device`` are not checked."""
        aps = payload.get("aps")
        if push_type == "background":
            if priority == "10":
                return ApnsAnswer(400, "BadPriority")  # Apple: an error for content-available only
            if not isinstance(aps, dict) or aps.get("content-available") != 1 or "alert" in aps:
                return ApnsAnswer(400, "BadPayload")
        if push_type == "alert" and not (isinstance(aps, dict) and aps.get("alert")):
            return ApnsAnswer(400, "PayloadEmpty")  # nothing to show: iOS would drop it
        known = self.device_kinds.get(token)
        if known is not None:
            kind, bundle = known
            if kind == "voip" and (push_type != "voip" or topic != bundle + ".voip"):
                return ApnsAnswer(400, "DeviceTokenNotForTopic")
            if kind == "remote" and (push_type == "voip" or topic != bundle):
                return ApnsAnswer(400, "DeviceTokenNotForTopic")
        return None

    def register_device(self, bundle: str, voip: str = "", remote: str = "") -> None:
        """Tokens an app on a device got from iOS: its PushKit (VoIP) token and its remote
        notification token, both for ``bundle``."""
        if voip:
            self.device_kinds[voip.lower()] = ("voip", bundle)
        if remote:
            self.device_kinds[remote.lower()] = ("remote", bundle)

    @staticmethod
    def _iat_of(token: str) -> int:
        return int(jwt.decode(token, options={"verify_signature": False})["iat"])

    def _check_jwt(self, auth: str) -> tuple[set[str], ApnsAnswer | None]:
        def bad(status: int, reason: str) -> tuple[set[str], ApnsAnswer]:
            return set(), ApnsAnswer(status, reason)

        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return bad(403, "MissingProviderToken")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return bad(403, "InvalidProviderToken")
        key = self._keys.get(str(header.get("kid")))
        if header.get("alg") != "ES256" or key is None:
            return bad(403, "InvalidProviderToken")
        try:
            claims = jwt.decode(token, key.public, algorithms=["ES256"],
                                options={"require": ["iss", "iat"], "verify_iat": False, "verify_exp": False})
        except jwt.PyJWTError:
            return bad(403, "InvalidProviderToken")
        iat = claims.get("iat")
        if claims.get("iss") != key.team_id or not isinstance(iat, int):
            return bad(403, "InvalidProviderToken")
        now = self.clock()
        if iat > now + 60:
            return bad(403, "InvalidProviderToken")
        if now - iat > self.max_token_age or iat <= key.expired_through:
            return bad(403, "ExpiredProviderToken")
        if token not in key.known:
            current_valid = bool(key.current) and self._iat_of(key.current) > key.expired_through
            if current_valid and now - key.current_since < MIN_REFRESH:
                return bad(429, "TooManyProviderTokenUpdates")
            key.known.add(token)
            key.current, key.current_since = token, now
            key.newest_iat = max(key.newest_iat, iat)
        return key.topics, None
