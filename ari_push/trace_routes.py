"""``GET /api/traces?q=<call id | AOR | caller>&last=N`` on the daemon's HTTP server.

A plain JSON route for ``ari-push trace`` when the traces live in the daemon's own memory (the
embedded store): ``{"calls": [CallTrace.to_json(), ...]}``, newest first; 400 with
``{"error": ...}`` on a bad query. The web console has its own routes (/api/calls...).
"""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from ari_push.health import HttpRequest, HttpResponse, RouteHandler
from ari_push.trace_view import TraceQueryError, lookup
from ari_push.traces import TraceStore

JSON = "application/json"


class TraceRoutes:
    def __init__(self, store: TraceStore) -> None:
        self.store = store

    def routes(self) -> list[tuple[str, str, RouteHandler]]:
        return [("GET", "/api/traces", self.get)]

    async def get(self, request: HttpRequest) -> HttpResponse:
        q = request.query.get("q", "")
        last_text = request.query.get("last", "10")
        if not last_text.isdigit():
            return HttpResponse(400, json.dumps({"error": "last must be a whole number"}), JSON)
        try:
            traces = await lookup(self.store, q, int(last_text))
        except TraceQueryError as exc:
            return HttpResponse(400, json.dumps({"error": str(exc)}), JSON)
        except (aioredis.RedisError, OSError) as exc:
            return HttpResponse(503, json.dumps({"error": f"trace store unavailable: {type(exc).__name__}"}), JSON)
        return HttpResponse(200, json.dumps({"calls": [t.to_json() for t in traces]}, ensure_ascii=False), JSON)
