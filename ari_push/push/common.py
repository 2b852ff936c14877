"""Small helpers every provider shares: TLS contexts, Retry-After, the call fields of a push.

Nothing here keeps state; each provider owns its own HTTP client.
"""

from __future__ import annotations

import contextlib
import email.utils
import importlib
import ssl
from collections.abc import Callable

import httpx

from ari_push.model import Binding, PushMessage, PushOutcome, PushResult, mask_token

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
    token = mask_token(binding.push.provider, binding.push.token)
    return f"{binding.push.provider}/{binding.push.param or '-'} token={token}"


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


#: What a push service's answer may weigh (FCM, APNs, OAuth, webhook): their answers are a few
#: hundred bytes; anything near this is not a push service.
MAX_RESPONSE_BYTES = 65536


class ResponseTooLarge(Exception):
    """The answer is larger than the cap: the request counts as FAILED, the rest is not read."""


async def read_capped(response: httpx.Response, cap: int = MAX_RESPONSE_BYTES) -> bytes:
    """Read a streamed response's body (decoded) up to ``cap`` bytes; ResponseTooLarge beyond.
    A declared Content-Length over the cap is refused before reading anything."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise ResponseTooLarge(f"response larger than {cap} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > cap:
            raise ResponseTooLarge(f"response larger than {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def send_capped(client: httpx.AsyncClient, request: httpx.Request, cap: int = MAX_RESPONSE_BYTES
                      ) -> httpx.Response:
    """Send ``request`` and read at most ``cap`` bytes of the answer: the response returned is
    complete (``.json()``, ``.text`` work); ResponseTooLarge when the body is larger."""
    response = await client.send(request, stream=True)
    try:
        body = await read_capped(response, cap)
    finally:
        await response.aclose()
    headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in ("content-encoding",
                                                                                      "content-length",
                                                                                      "transfer-encoding")]
    return httpx.Response(response.status_code, headers=headers, content=body, request=request,
                          extensions={"http_version": response.extensions.get("http_version", b"HTTP/1.1")})


def closed_result() -> PushResult:
    return PushResult(PushOutcome.FAILED, "provider closed")


def preload_http() -> None:
    """Import now what httpx and httpcore import on the first request (h11, httpcore's pools,
    anyio's asyncio backend): ~60-200 ms of module loading that would otherwise stall the event
    loop during the first call's pushes. Called by the providers' ``warm()``."""
    for name in ("h11", "h2.connection", "httpcore", "anyio", "anyio._backends._asyncio", "anyio.streams.tls"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


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
        verify: ssl.SSLContext | None = None,
    ) -> None:
        self.http2 = http2
        self.ca_file = ca_file
        self.timeout = timeout
        self.limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        self.transport = transport
        self.verify = verify  # a context shared by several clients (loading the CAs costs ~50 ms)
        self._client: httpx.AsyncClient | None = None
        self.closed = False

    def get(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                http2=self.http2,
                verify=self.verify or tls_context(self.ca_file),
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
