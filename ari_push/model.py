"""The domain objects every part shares: push parameters, device bindings, push messages.

All are frozen dataclasses built at the edge (contact parsing, settings) and passed around
unchanged. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum


class Dialect(StrEnum):
    """Which registration convention the push parameters came in."""

    RFC8599 = "rfc8599"
    LINPHONE = "linphone"
    ZOIPER = "zoiper"


@dataclass(frozen=True, slots=True)
class PushParams:
    """Push address read from one contact URI, normalised to the RFC 8599 model.

    provider: ``apns``, ``fcm``, ``webpush``, ``vendor`` (a Zoiper-style URL) or a configured
    custom provider name. ``token`` is the token used for calls (for Apple's dual form, the VoIP
    token); ``extra_tokens`` keeps the others by type (e.g. ``(("remote", "..."),)``).
    ``param`` is the APNs topic, the FCM project id, or empty. ``options`` keeps Linphone's
    presentation hints (``pn-call-str``, ``pn-silent``, ...), lower-cased names.
    """

    provider: str
    token: str
    param: str = ""
    sandbox: bool = False
    dialect: Dialect = Dialect.RFC8599
    purr: str = ""
    extra_tokens: tuple[tuple[str, str], ...] = ()
    options: tuple[tuple[str, str], ...] = ()

    @property
    def device_id(self) -> str:
        """Stable identity of the device: Asterisk drops +sip.instance, so the token is it."""
        # APNs tokens are hex: the same device may be sent in either case.
        token = self.token.lower() if self.provider == "apns" else self.token
        digest = hashlib.sha256(f"{self.provider}\x00{token}".encode()).hexdigest()
        return digest[:20]


@dataclass(frozen=True, slots=True)
class Binding:
    """One device's push address, kept beyond its SIP registration (see docs/capture.md)."""

    aor: str
    endpoint: str
    push: PushParams
    contact_uri: str
    user_agent: str = ""
    first_seen: float = 0.0
    last_seen: float = 0.0

    @property
    def device_id(self) -> str:
        return self.push.device_id


class PushKind(StrEnum):
    """Why a push is sent. Calls wake the phone; the others end what a call push started."""

    CALL = "call"
    CANCEL = "cancel"
    ANSWERED_ELSEWHERE = "answered-elsewhere"
    MISSED_CALL = "missed-call"


@dataclass(frozen=True, slots=True)
class PushMessage:
    """What one push says. ``deadline`` is a Unix time: the push is useless after it."""

    kind: PushKind
    call_id: str
    caller_number: str
    caller_name: str
    callee: str
    deadline: float
    extra: tuple[tuple[str, str], ...] = field(default=())


class PushOutcome(StrEnum):
    DELIVERED = "delivered"
    TOKEN_DEAD = "token-dead"
    RETRY = "retry"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class PushResult:
    """A provider's typed answer. ``dead_since`` is the provider's timestamp (Unix seconds) of
    when the token stopped being valid, when it says so (APNs 410)."""

    outcome: PushOutcome
    reason: str = ""
    status: int | None = None
    retry_after: float | None = None
    dead_since: float | None = None


#: Shorter than this, a secret or token shows nothing but its length.
MASK_SHORT = 24
#: Leading characters a long token shows (enough to tell two apart in a log, not to use one).
MASK_KEEP = 4


def mask(secret: str, keep: int = MASK_KEEP) -> str:
    """The one masking rule (docs/security.md): ``""`` stays ``""``; a value shorter than
    MASK_SHORT shows only its length (``…(10)``); a longer one at most ``keep`` (<= 4) leading
    characters and its length (``00fc…(64)``). Never the tail: a token's two ends together
    are too much of it, and a short password's are most of it."""
    if not secret:
        return ""
    keep = max(0, min(keep, MASK_KEEP))
    if len(secret) < MASK_SHORT:
        return f"…({len(secret)})"
    return f"{secret[:keep]}…({len(secret)})"


def mask_url(url: str) -> str:
    """A push URL (Zoiper X-PUSH-URI, Web Push endpoint) as it may be shown: scheme, host and port
    only; the path and query (the device's secret) become their length."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return mask(url)
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    authority = authority.rpartition("@")[2]  # user-info is a credential too
    if not all(c.isalnum() or c in ".-:[]" for c in authority) or len(authority) > 260:
        return mask(url)
    return f"{scheme[:10]}://{authority}/…({len(tail)})" if tail else f"{scheme[:10]}://{authority}"


def mask_token(provider: str, token: str) -> str:
    """A binding's token masked the way its kind needs: URLs keep their host, others ``mask``."""
    if "://" in token[:16]:
        return mask_url(token)
    return mask(token)
