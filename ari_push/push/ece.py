"""Web Push message encryption: RFC 8291 keys on RFC 8188 ``aes128gcm``, and VAPID (RFC 8292).

Sans-IO and small on purpose: ``cryptography`` (already a dependency through pyjwt[crypto])
does ECDH, HKDF-SHA-256 and AES-128-GCM; pyjwt signs the ES256 VAPID token. ``decrypt`` is
what a user agent does: the tests' local push service uses it to check our bodies.

Body layout (RFC 8188 section 2.1, one record): ``salt(16) | rs(4, big endian) | idlen(1) |
keyid(idlen) | ciphertext``, where keyid is the sender's ephemeral public key (65 bytes) and the
plaintext is the message, a ``0x02`` delimiter (last record) and optional zero padding.
"""

from __future__ import annotations

import base64
import os
import struct
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ari_push.settings import SettingsError

RECORD_SIZE = 4096
HEADER_SIZE = 16 + 4 + 1 + 65
TAG_SIZE = 16
#: Largest message that fits one 4096-byte record: rs - tag - delimiter.
MAX_PLAINTEXT = RECORD_SIZE - TAG_SIZE - 1


class EceError(ValueError):
    """A body that cannot be encrypted or decrypted (bad key, too long, corrupt)."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    bare = text.rstrip("=")
    try:
        return base64.urlsafe_b64decode(bare + "=" * (-len(bare) % 4))
    except (ValueError, TypeError):
        raise EceError("not base64url") from None


def _hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def _public_bytes(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def load_public(raw: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    except ValueError:
        raise EceError("p256dh is not a point on P-256") from None


def _keys(ecdh_secret: bytes, auth: bytes, ua_public: bytes, as_public: bytes, salt: bytes) -> tuple[bytes, bytes]:
    """RFC 8291 section 3.4: (content-encryption key, nonce) for one message."""
    key_info = b"WebPush: info\x00" + ua_public + as_public
    ikm = _hkdf(auth, ecdh_secret, key_info, 32)
    cek = _hkdf(salt, ikm, b"Content-Encoding: aes128gcm\x00", 16)
    nonce = _hkdf(salt, ikm, b"Content-Encoding: nonce\x00", 12)
    return cek, nonce


def encrypt(message: bytes, p256dh: str, auth: str, *, pad_to: int = 0,
            sender: ec.EllipticCurvePrivateKey | None = None, salt: bytes | None = None) -> bytes:
    """The ``aes128gcm`` body for a subscription's keys (base64url). A fresh ephemeral key and
    salt per message unless given (tests). ``pad_to`` pads the plaintext to that many bytes."""
    if len(message) > MAX_PLAINTEXT:
        raise EceError(f"message is {len(message)} bytes, at most {MAX_PLAINTEXT} fit one record")
    ua_public = b64url_decode(p256dh)
    secret = b64url_decode(auth)
    if len(ua_public) != 65 or len(secret) != 16:
        raise EceError("p256dh must be 65 bytes and auth 16 bytes")
    ua_key = load_public(ua_public)
    sender = sender or ec.generate_private_key(ec.SECP256R1())
    as_public = _public_bytes(sender.public_key())
    salt = salt or os.urandom(16)
    cek, nonce = _keys(sender.exchange(ec.ECDH(), ua_key), secret, ua_public, as_public, salt)
    padding = max(0, min(pad_to, MAX_PLAINTEXT) - len(message))
    ciphertext = AESGCM(cek).encrypt(nonce, message + b"\x02" + b"\x00" * padding, None)
    return salt + struct.pack("!IB", RECORD_SIZE, len(as_public)) + as_public + ciphertext


def decrypt(body: bytes, ua_private: ec.EllipticCurvePrivateKey, auth: bytes) -> bytes:
    """What the user agent does with an ``aes128gcm`` body (one record). Raises EceError."""
    if len(body) < HEADER_SIZE + TAG_SIZE + 1:
        raise EceError("body shorter than the aes128gcm header")
    salt = body[:16]
    rs, idlen = struct.unpack("!IB", body[16:21])
    if idlen != 65 or rs < 18:
        raise EceError(f"keyid must be the 65-byte sender key (got {idlen}), rs >= 18 (got {rs})")
    as_public = body[21:21 + idlen]
    ciphertext = body[21 + idlen:]
    if len(ciphertext) > rs:
        raise EceError("more than one record")
    ua_public = _public_bytes(ua_private.public_key())
    cek, nonce = _keys(ua_private.exchange(ec.ECDH(), load_public(as_public)), auth, ua_public, as_public, salt)
    try:
        plain = AESGCM(cek).decrypt(nonce, ciphertext, None)
    except Exception:
        raise EceError("authentication tag does not verify (wrong keys or corrupt body)") from None
    stripped = plain.rstrip(b"\x00")
    if not stripped.endswith(b"\x02"):
        raise EceError("last record lacks the 0x02 delimiter")
    return stripped[:-1]


# ---------------------------------------------------------------- VAPID (RFC 8292)


def load_vapid_key(text: str, where: str = "webpush.vapid_key") -> ec.EllipticCurvePrivateKey:
    """A PEM P-256 private key, or the raw 32-byte private scalar base64url (the form
    web-push tools print). Errors never show the key."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(text.encode(), password=None)
        except (ValueError, TypeError):
            raise SettingsError(where, "is not a PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise SettingsError(where, "is not a P-256 key (VAPID signs with ES256)")
        return key
    try:
        raw = b64url_decode(text)
    except EceError:
        raise SettingsError(where, "is neither PEM nor base64url") from None
    if len(raw) != 32:
        raise SettingsError(where, "a base64url VAPID key is the 32-byte private scalar")
    try:
        return ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
    except ValueError:
        raise SettingsError(where, "is not a valid P-256 private scalar") from None


def origin(endpoint: str) -> str:
    """The ``aud`` of a VAPID token: scheme://host[:port] of the push resource."""
    parts = urlsplit(endpoint)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


@dataclass
class Vapid:
    """Signs VAPID tokens, one per push-service origin, reused until ``refresh`` seconds before
    their ``exp`` (signing costs ~0.1 ms, but a stable token lets services cache it)."""

    key: ec.EllipticCurvePrivateKey = field(repr=False)
    subject: str
    lifetime: float = 43200.0
    _cache: dict[str, tuple[str, float]] = field(default_factory=dict, repr=False)

    @property
    def public_key(self) -> str:
        """``k``: the uncompressed public key, base64url (what the subscription was made with)."""
        return b64url(_public_bytes(self.key.public_key()))

    def token(self, endpoint: str, now: float) -> str:
        aud = origin(endpoint)
        cached = self._cache.get(aud)
        if cached is not None and now < cached[1] - min(3600.0, self.lifetime / 4):
            return cached[0]
        exp = int(now + self.lifetime)
        token = jwt.encode({"aud": aud, "exp": exp, "sub": self.subject}, self.key, algorithm="ES256",
                           headers={"typ": "JWT"})
        if len(self._cache) > 1000:
            self._cache.clear()
        self._cache[aud] = (token, float(exp))
        return token

    def header(self, endpoint: str, now: float) -> str:
        """The ``Authorization`` value (RFC 8292 section 3: the ``vapid`` scheme, ``t`` and ``k``)."""
        return f"vapid t={self.token(endpoint, now)}, k={self.public_key}"
