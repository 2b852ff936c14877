"""The operator's console: its pages, its JSON API and its live event stream.

Routes on the daemon's HTTP server (health.py), all behind its guard (access.py):

* ``GET /console`` the page (one HTML file, its script and style from static/, no build step);
* ``GET /api/overview`` links, calls waiting, pushes per provider and outcome in the last hour,
  error rates; ``GET /api/devices?aor=`` an AOR's bindings, tokens masked by the CLI's own
  function; ``GET /api/calls?aor=&caller=&status=&provider=&limit=`` newest first;
  ``GET /api/calls/{call_id}`` one call's trace; ``GET /api/events`` server-sent events;
* ``POST /api/devices/forget`` and ``POST /api/test-push``: JSON bodies, CSRF token required.

Nothing here is on a call's path: it reads the stores and the metrics registry when asked,
and one owned task (``run``) samples the counters once a minute and fans the trace store's
update feed out to the open event streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from importlib import resources
from typing import Any

from ari_push.bindings import BindingStore, StoreUnavailable
from ari_push.console.access import Access
from ari_push.console.history import CounterHistory, gauge_value
from ari_push.contacts import printable
from ari_push.health import HttpRequest, HttpResponse, RouteHandler
from ari_push.links import LinkState
from ari_push.metrics import Metrics
from ari_push.model import Binding
from ari_push.test_push import TestPushError
from ari_push.traces import IN_FLIGHT, CallTrace, TraceStore

log = logging.getLogger("ari_push.console")

MAX_LIMIT = 500
STATIC = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
_SECURITY = (("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer"),
             ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                         "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                                         "form-action 'none'"))
STATUSES = (IN_FLIGHT, "ANSWERED", "TIMEOUT", "NO_DEVICES", "PUSH_FAILED", "DECLINED", "CANCELLED", "SHUTDOWN")


#: aor, device id (None: every device of the AOR) -> one result per device pushed
TestPush = Callable[[str, str | None], Awaitable[Sequence[Any]]]


def _json(value: object, status: int = 200) -> HttpResponse:
    return HttpResponse(status, body=json.dumps(value, ensure_ascii=False).encode(),
                        content_type="application/json", headers=_SECURITY[:1])


def _error(status: int, error: str) -> HttpResponse:
    return _json({"error": error}, status)


def _plain(value: object) -> object:
    """A test-push result (dataclass, object with to_json, or mapping) as JSON data."""
    to_json = getattr(value, "to_json", None)
    if callable(to_json):
        return to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: (str(v) if not isinstance(v, (int, float, bool, str, type(None), dict, list)) else v)
                for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, Mapping):
        return dict(value)
    return str(value)


def call_summary(trace: CallTrace) -> dict[str, object]:
    """One row of the calls list: no events, only what the list shows."""
    ended = trace.ended_at
    return {"call_id": trace.call_id, "aor": printable(trace.aor), "caller": printable(trace.caller),
            "started_at": trace.started_at, "ended_at": ended, "status": trace.status,
            "in_flight": trace.in_flight, "node": trace.node, "providers": sorted(trace.providers()),
            "duration_ms": None if ended is None else round(1000 * (ended - trace.started_at), 1),
            "pushes": sum(1 for e in trace.events if e.kind == "push")}


class Console:
    def __init__(self, *, store: BindingStore, metrics: Metrics, links: Sequence[LinkState], access: Access,
                 node_id: str, traces: TraceStore | None = None, test_push: TestPush | None = None,
                 heartbeat: float = 15.0, max_subscriber_backlog: int = 256) -> None:
        self.store = store
        self.metrics = metrics
        self.links = links
        self.access = access
        self.node_id = node_id
        self.traces = traces
        self.test_push = test_push
        self.heartbeat = heartbeat
        self.history = CounterHistory(metrics.registry, ("ari_push_pushes", "ari_push_calls"))
        self.history.sample(time.time())
        self._subscribers: set[asyncio.Queue[str]] = set()
        self._backlog = max_subscriber_backlog
        self._page = (resources.files("ari_push.console") / "static" / "console.html").read_text("utf-8")
        self._static = {name: (resources.files("ari_push.console") / "static" / name).read_bytes() for name in STATIC}

    def routes(self) -> list[tuple[str, str, RouteHandler]]:
        return [
            ("GET", "/console", self.page), ("GET", "/console/static/{name}", self.static),
            ("GET", "/api/overview", self.overview), ("GET", "/api/devices", self.devices),
            ("GET", "/api/calls", self.calls), ("GET", "/api/calls/{call_id}", self.call),
            ("GET", "/api/events", self.events),
            ("POST", "/api/devices/forget", self.forget), ("POST", "/api/test-push", self.push_test),
        ]

    # ---------------------------------------------------------------- the owned task

    async def run(self, stop: asyncio.Event) -> None:
        """Sample the counters every minute; fan trace updates out to the event streams."""
        feed = asyncio.ensure_future(self._fan_out()) if self.traces is not None else None
        try:
            while not stop.is_set():
                self.history.sample(time.time())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.history.interval):
                        await stop.wait()
        finally:
            if feed is not None:
                feed.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await feed

    async def _fan_out(self) -> None:
        assert self.traces is not None
        while True:
            try:
                async for call_id in self.traces.updates():
                    for queue in list(self._subscribers):
                        if queue.qsize() < self._backlog:
                            queue.put_nowait(call_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the feed broke (Redis blink): streams keep their heartbeat
                log.debug("trace update feed: %s", exc)
            await asyncio.sleep(1.0)

    # ---------------------------------------------------------------- pages

    async def page(self, _: HttpRequest) -> HttpResponse:
        html = self._page.replace("{{csrf}}", self.access.csrf_token).replace("{{node}}", printable(self.node_id))
        return HttpResponse(200, body=html.encode(), content_type="text/html; charset=utf-8", headers=_SECURITY)

    async def static(self, request: HttpRequest) -> HttpResponse:
        name = request.params["name"]
        if name not in self._static:
            return _error(404, "no such file")
        return HttpResponse(200, body=self._static[name], content_type=STATIC[name], headers=_SECURITY[:1])

    # ---------------------------------------------------------------- reading

    async def overview(self, _: HttpRequest) -> HttpResponse:
        now = time.time()
        self.history.sample(now)
        covered, delta = self.history.window_delta(now)
        pushes: list[dict[str, object]] = []
        per_provider: dict[str, dict[str, float]] = {}
        calls: dict[str, float] = {}
        for (name, labels), n in sorted(delta.items()):
            tags = dict(labels)
            if name == "ari_push_pushes":
                pushes.append({"provider": tags.get("provider", ""), "kind": tags.get("kind", ""),
                               "outcome": tags.get("result", ""), "count": int(n)})
                row = per_provider.setdefault(tags.get("provider", ""), {})
                row[tags.get("result", "")] = row.get(tags.get("result", ""), 0) + n
            elif name == "ari_push_calls":
                calls[tags.get("status", "")] = calls.get(tags.get("status", ""), 0) + n
        rates = {}
        for provider, outcomes in sorted(per_provider.items()):
            sent = sum(v for k, v in outcomes.items() if k != "skipped")
            errors = sum(v for k, v in outcomes.items() if k not in ("delivered", "skipped"))
            rates[provider] = {"sent": int(sent), "errors": int(errors), "dead": int(outcomes.get("token-dead", 0)),
                               "error_rate": round(errors / sent, 4) if sent else 0.0}
        in_flight = None
        stored = None
        if self.traces is not None:
            with contextlib.suppress(Exception):
                in_flight = len(await self.traces.in_flight())
                stored = await self.traces.count()
        return _json({
            "node": self.node_id, "now": now, "window_seconds": round(covered),
            "links": [{"name": link.name, "state": link.state.value, "reason": link.reason, "since": link.since}
                      for link in self.links],
            "calls_waiting": int(gauge_value(self.metrics.registry, "ari_push_calls_waiting")),
            "calls_in_flight": in_flight, "traces_stored": stored,
            "pushes": pushes, "error_rates": rates, "calls": {k: int(v) for k, v in sorted(calls.items())},
        })

    async def devices(self, request: HttpRequest) -> HttpResponse:
        from ari_push.cli import binding_view  # the CLI's own masking: the console shows exactly what it shows

        aor = request.query.get("aor", "").strip()
        try:
            if not aor:
                aors = sorted(await self.store.aors())
                return _json({"aor": "", "aors": [printable(a) for a in aors[:200]], "total_aors": len(aors),
                              "devices": []})
            bindings = await self.store.bindings_for(aor)
        except StoreUnavailable as exc:
            return _error(503, f"binding store unavailable: {exc}")
        last = await self._last_pushes(aor, bindings)
        devices = []
        for b in sorted(bindings, key=lambda b: -b.last_seen):
            view = binding_view(b, reveal=False)
            push = view["push"]
            assert isinstance(push, dict)
            devices.append({"device_id": b.device_id, "provider": push["provider"], "token": push["token"],
                            "param": push["param"], "dialect": str(b.push.dialect), "sandbox": b.push.sandbox,
                            "user_agent": view["user_agent"], "contact_uri": view["contact_uri"],
                            "first_seen": b.first_seen, "last_seen": b.last_seen,
                            "last_push": last.get(b.device_id)})
        return _json({"aor": printable(aor), "devices": devices, "test_push": self.test_push is not None})

    async def _last_pushes(self, aor: str, bindings: Sequence[Binding]) -> dict[str, dict[str, object]]:
        """Each device's newest push, read from the AOR's recent call traces."""
        if self.traces is None or not bindings:
            return {}
        wanted = {b.device_id for b in bindings}
        found: dict[str, dict[str, object]] = {}
        try:
            traces = await self.traces.find(aor=aor, limit=50)
        except Exception as exc:
            log.debug("traces of %s unreadable: %s", aor, exc)
            return {}
        for trace in traces:  # newest first
            for event in reversed(trace.events):
                if event.kind != "push" or event.device not in wanted or event.device in found:
                    continue
                d = event.detail
                found[event.device] = {"call_id": trace.call_id, "at": trace.started_at + event.t_ms / 1000,
                                       "kind": d.get("kind"), "outcome": d.get("outcome"),
                                       "latency_ms": d.get("latency_ms")}
            if len(found) == len(wanted):
                break
        return found

    async def calls(self, request: HttpRequest) -> HttpResponse:
        if self.traces is None:
            return _error(503, "call traces are not kept by this daemon")
        q = request.query
        try:
            limit = int(q.get("limit", "50"))
        except ValueError:
            return _error(400, "limit must be a whole number")
        if not 1 <= limit <= MAX_LIMIT:
            return _error(400, f"limit must be between 1 and {MAX_LIMIT}")
        status = q.get("status") or None
        if status is not None and status not in STATUSES:
            return _error(400, f"status must be one of {', '.join(STATUSES)}")
        started = time.perf_counter()
        try:
            found = await self.traces.find(aor=q.get("aor") or None, caller=q.get("caller") or None,
                                           status=status, provider=q.get("provider") or None, limit=limit)
        except Exception as exc:
            return _error(503, f"trace store unavailable: {exc}")
        return _json({"calls": [call_summary(t) for t in found],
                      "query_ms": round(1000 * (time.perf_counter() - started), 2)})

    async def call(self, request: HttpRequest) -> HttpResponse:
        if self.traces is None:
            return _error(503, "call traces are not kept by this daemon")
        try:
            trace = await self.traces.get(request.params["call_id"])
        except Exception as exc:
            return _error(503, f"trace store unavailable: {exc}")
        if trace is None:
            return _error(404, "no trace of this call (unknown, or older than the retention)")
        data = trace.to_json()
        data["summary"] = call_summary(trace)
        return _json(data)

    async def events(self, _: HttpRequest) -> HttpResponse:
        return HttpResponse(200, content_type="text/event-stream; charset=utf-8", stream=self._event_stream)

    async def _event_stream(self) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            yield b"retry: 2000\n: hello\n\n"
            while True:
                try:
                    async with asyncio.timeout(self.heartbeat):
                        call_id = await queue.get()
                except TimeoutError:
                    yield b": heartbeat\n\n"
                    continue
                yield await self._call_event(call_id)
        finally:
            self._subscribers.discard(queue)

    async def _call_event(self, call_id: str) -> bytes:
        summary: object = {"call_id": call_id}
        if self.traces is not None:
            with contextlib.suppress(Exception):
                trace = await self.traces.get(call_id)
                if trace is not None:
                    summary = call_summary(trace)
        return f"event: call\ndata: {json.dumps(summary, ensure_ascii=False)}\n\n".encode()

    # ---------------------------------------------------------------- acting

    def _action_body(self, request: HttpRequest) -> dict[str, Any] | HttpResponse:
        refused = self.access.action_refusal(request)
        if refused is not None:
            return refused
        try:
            body = json.loads(request.body)
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("aor"), str) or not body["aor"].strip():
            return _error(400, 'the body must be an object with "aor" (and optionally "device")')
        device = body.get("device")
        if device is not None and (not isinstance(device, str) or not device):
            return _error(400, '"device" must be a device id (a string)')
        return body

    async def forget(self, request: HttpRequest) -> HttpResponse:
        body = self._action_body(request)
        if isinstance(body, HttpResponse):
            return body
        try:
            n = await self.store.forget(body["aor"], body.get("device"))
        except StoreUnavailable as exc:
            return _error(503, f"binding store unavailable: {exc}")
        log.info("console: forgot %d device(s) of %s", n, printable(body["aor"]))
        return _json({"forgotten": n})

    async def push_test(self, request: HttpRequest) -> HttpResponse:
        body = self._action_body(request)
        if isinstance(body, HttpResponse):
            return body
        if self.test_push is None:
            return _error(503, "test pushes are not available in this daemon")
        try:
            results = await self.test_push(body["aor"], body.get("device"))
        except StoreUnavailable as exc:
            return _error(503, f"binding store unavailable: {exc}")
        except TestPushError as exc:  # no such AOR or device, or the store unreadable: nothing sent
            return _error(404, str(exc))
        return _json({"results": [_plain(r) for r in results]})
