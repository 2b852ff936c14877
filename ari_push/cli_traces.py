"""``ari-push trace`` and ``ari-push test-push`` (docs/operations.md, "Call traces").

``trace`` reads the traces where the daemon keeps them: in Redis when ``[redis]`` is set (every
daemon's calls), else it asks the running daemon over its HTTP server (``GET /api/traces``):
the embedded store lives in the daemon's memory. ``test-push`` reads the AOR's devices from
Redis and pushes them through providers built from the same settings as the daemon's.

Exit codes: 0 found / every push delivered; 1 nothing found, the store or daemon unreachable,
or an unknown AOR or device; 2 bad input (or a configuration error); 4 some test push was not
delivered (refused, failed, token dead).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

import redis.asyncio as aioredis

from ari_push.calls import TARGET_RE
from ari_push.contacts import printable
from ari_push.settings import Settings
from ari_push.trace_view import TraceQueryError, check_query, format_trace, lookup
from ari_push.traces import CallTrace, TraceFormatError

EXIT_NOT_FOUND = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_DELIVERED = 4
HTTP_TIMEOUT = 10.0

Load = Callable[..., Settings]


def _err(text: str) -> None:
    print(f"ari-push: {text}", file=sys.stderr)


def _daemon_url(settings: Settings) -> str:
    host, _, port = settings.http.listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"  # bound everywhere: loopback reaches it
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def _ask_daemon(settings: Settings, q: str, last: int) -> list[CallTrace] | None:
    """The traces from the running daemon (embedded store), or None after printing why not."""
    if not settings.http.enabled:
        _err("no [redis] configured: the traces live inside the running daemon, and its HTTP server is off "
             "([http] enabled = false), so they cannot be read from here")
        return None
    base = _daemon_url(settings)
    url = f"{base}/api/traces?" + urllib.parse.urlencode({"q": q, "last": last})
    request = urllib.request.Request(url)  # noqa: S310 (http://, the daemon's own address)
    if settings.http.auth_token:  # the CLI reads the same secret file as the daemon
        request.add_header("Authorization", f"Bearer {settings.http.auth_token}")
    elif settings.http.basic_auth:
        basic = base64.b64encode(str(settings.http.basic_auth).encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:  # noqa: S310 (the daemon's own URL)
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            _err(f"the daemon at {base} refused this CLI's credentials for /api/traces (check [http] "
                 "auth_token_file / basic_auth_file: the CLI sends what they hold)")
        else:
            _err(f"the daemon at {base} answered {exc.code} to /api/traces")
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        _err(f"no [redis] configured: the traces live inside the running daemon, which does not answer at {base} "
             f"({type(exc).__name__}: {getattr(exc, 'reason', exc)})")
        return None
    try:
        return [CallTrace.from_json(c) for c in body["calls"]]
    except (KeyError, TypeError, TraceFormatError) as exc:
        _err(f"the daemon at {base} sent traces this CLI cannot read: {exc}")
        return None


async def _from_redis(settings: Settings, q: str, last: int) -> list[CallTrace] | None:
    from ari_push.service import make_redis
    from ari_push.trace_store import RedisTraceStore

    client = make_redis(settings.redis)
    try:
        return await lookup(RedisTraceStore(client, settings.redis.key_prefix), q, last)
    except (aioredis.RedisError, OSError) as exc:
        _err(f"trace store unavailable: {type(exc).__name__}: {exc}")
        return None
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()


def cmd_trace(args: argparse.Namespace, load: Load) -> int:
    settings = load(args)
    try:
        check_query(args.query, args.last)
    except TraceQueryError as exc:
        _err(str(exc))
        return EXIT_BAD_INPUT
    if not settings.traces.enabled:
        _err("call traces are off ([traces] enabled = false)")
        return EXIT_NOT_FOUND
    if settings.redis.embedded:
        traces = _ask_daemon(settings, args.query, args.last)
    else:
        traces = asyncio.run(_from_redis(settings, args.query, args.last))
    if traces is None:
        return EXIT_NOT_FOUND
    if not traces:
        _err(f"no trace for call id, AOR or caller {printable(args.query)!r} "
             f"(traces are kept {settings.traces.keep:.0f} s, at most {settings.traces.max_calls} calls)")
        return EXIT_NOT_FOUND
    if args.json:
        print(json.dumps({"calls": [t.to_json() for t in traces]}, indent=2, ensure_ascii=False))
    else:
        print("\n\n".join(format_trace(t) for t in traces))
    return 0


async def _test_push(settings: Settings, aor: str, device: str | None) -> int:
    from ari_push.bindings import RedisStore, StoreUnavailable
    from ari_push.model import Binding, PushResult
    from ari_push.push.dispatch import PushDispatcher
    from ari_push.push.factory import build_providers
    from ari_push.redis_keys import Keys
    from ari_push.service import make_redis
    from ari_push.test_push import TestPushError, send_test_push

    client = make_redis(settings.redis)
    store = RedisStore(client, Keys(settings.redis.key_prefix), settings.capture.retention_days * 86400)

    async def token_dead(binding: Binding, result: PushResult) -> None:  # as the daemon does
        with contextlib.suppress(StoreUnavailable):
            await store.forget_if_stale(binding.aor, binding.device_id,
                                         result.dead_since if result.dead_since is not None else time.time())

    dispatcher = PushDispatcher(build_providers(settings), on_token_dead=token_dead)
    try:
        results = await send_test_push(store, dispatcher, aor, device)
    except TestPushError as exc:
        _err(str(exc))
        return EXIT_NOT_FOUND
    finally:
        await dispatcher.aclose()
        with contextlib.suppress(Exception):
            await client.aclose()
    for r in results:
        latency = "-" if r.latency_ms is None else f"{r.latency_ms:.1f} ms"
        line = f"{r.device_id}  {printable(r.provider)}  {r.kind}  {r.outcome}  {latency}"
        if r.detail.get("status") is not None:
            line += f"  HTTP {r.detail['status']}"
        if r.detail.get("token"):
            line += f"  token {r.detail['token']}"
        if r.detail.get("reason") and r.outcome != "delivered":
            line += f"  ({printable(str(r.detail['reason']))})"
        print(line)
    return 0 if all(r.outcome == "delivered" for r in results) else EXIT_NOT_DELIVERED


def cmd_test_push(args: argparse.Namespace, load: Load) -> int:
    settings = load(args, providers=True)
    if not TARGET_RE.fullmatch(args.aor):
        _err(f"bad AOR {printable(args.aor[:64])!r}: letters, digits and _ . + - only, at most 64")
        return EXIT_BAD_INPUT
    if args.device is not None and not (0 < len(args.device) <= 64 and args.device.isalnum()):
        _err(f"bad device id {printable(args.device[:64])!r} (see `ari-push tokens list`)")
        return EXIT_BAD_INPUT
    if settings.redis.embedded:
        _err("no [redis] configured: the devices live inside the running daemon and cannot be read from here; "
             "use the web console's test push")
        return EXIT_NOT_FOUND
    return asyncio.run(_test_push(settings, args.aor, args.device))


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], load: Load) -> None:
    tr = sub.add_parser("trace", help="print the push timeline of a call, or of the last calls to an AOR or "
                                      "from a caller")
    tr.add_argument("query", help="a call id (the caller channel's id), an AOR or a caller number")
    tr.add_argument("--last", type=int, default=10, help="how many calls for an AOR or caller (default 10)")
    tr.add_argument("--json", action="store_true", help="the traces as JSON")
    tr.set_defaults(func=lambda args: cmd_trace(args, load))
    tp = sub.add_parser("test-push", help="send a harmless, silent test push to an AOR's devices")
    tp.add_argument("aor")
    tp.add_argument("device", nargs="?", help="one device id (from tokens list); every device when left out")
    tp.set_defaults(func=lambda args: cmd_test_push(args, load))
