"""Small helpers every provider shares: TLS contexts, Retry-After, the call fields of a push.

Nothing here keeps state; each provider owns its own HTTP client.
"""

from __future__ import annotations

import email.utils
import ssl
from collections.abc import Callable

import httpx

from ari_push.model import Binding, PushMessage, PushOutcome, PushResult, mask

Clock = Callable[[], float]

USER_AGENT = "ari-push/0.1"


def tls_context(ca_file: str = "", cert_file: str = "") -> ssl.SSLContext:
    """The public CAs (certifi, as httpx uses), plus ``ca_file`` when given, plus a client
    certificate (PEM holding cert and key) when ``cert_file`` is given."""
    ctx = httpx.create_ssl_context()
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    if cert_file:
        ctx.load_cert_chain(cert_file)
    return ctx


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now)


def call_fields(message: PushMessage) -> dict[str, str]:
    """The fields every push carries, as strings (the FCM data map, the webhook body, the
    vendor template). ``deadline`` is whole Unix seconds."""
    return {
        "type": str(message.kind),
        "call_id": message.call_id,
        "caller_number": message.caller_number,
        "caller_name": message.caller_name,
        "callee": message.callee,
        "deadline": str(int(message.deadline)),
    }


def describe(binding: Binding) -> str:
    """How a binding appears in a log line: provider/param and the masked token."""
    return f"{binding.push.provider}/{binding.push.param or '-'} token={mask(binding.push.token)}"


def network_result(exc: Exception) -> PushResult:
    """A network error or timeout talking to a push service: worth another try, except a
    certificate that does not verify (a configuration problem, or not the right server)."""
    cause: BaseException | None = exc
    for _hop in range(8):  # httpx -> httpcore -> ssl; bounded in case of a cycle
        if cause is None:
            break
        if isinstance(cause, ssl.SSLCertVerificationError):
            return PushResult(PushOutcome.FAILED, f"TLS certificate not verified ({cause.verify_message})")
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.TimeoutException):
        return PushResult(PushOutcome.RETRY, f"timeout ({type(exc).__name__})")
    return PushResult(PushOutcome.RETRY, f"network error ({type(exc).__name__})")


def closed_result() -> PushResult:
    return PushResult(PushOutcome.FAILED, "provider closed")


class LazyClient:
    """One long-lived httpx client per provider: made on first use (inside the running loop),
    closed once. Never follows redirects and never uses an environment proxy, so the checks a
    provider makes on a URL hold for the request that goes out."""

    def __init__(
        self,
        *,
        http2: bool,
        ca_file: str,
        timeout: float,
        limits: httpx.Limits | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.http2 = http2
        self.ca_file = ca_file
        self.timeout = timeout
        self.limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        self.transport = transport
        self._client: httpx.AsyncClient | None = None
        self.closed = False

    def get(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                http2=self.http2,
                verify=tls_context(self.ca_file),
                timeout=httpx.Timeout(self.timeout),
                limits=self.limits,
                follow_redirects=False,
                trust_env=False,
                headers={"user-agent": USER_AGENT},
                transport=self.transport,
            )
        return self._client

    async def aclose(self) -> None:
        self.closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
