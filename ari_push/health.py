"""/healthz, /readyz and /metrics over HTTP for systemd, Kubernetes and Prometheus."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ari_push.links import LinkState
from ari_push.metrics import Metrics

log = logging.getLogger("ari_push.health")


class HealthServer:
    def __init__(self, listen: str, links: Sequence[LinkState], metrics: Metrics) -> None:
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.links = links
        self.metrics = metrics
        self.draining = False
        self._runner: web.AppRunner | None = None
        #: more (method, path, handler) routes, added before start() (issue 11: /messages/{aor})
        self.routes: list[tuple[str, str, Any]] = []

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        for method, path, handler in self.routes:
            app.router.add_route(method, path, handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0 and self._runner.addresses:
            self.port = int(self._runner.addresses[0][1])
        log.info("health and metrics on http://%s:%d/", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def status(self) -> dict[str, object]:
        return {
            "ready": all(link.up for link in self.links) and not self.draining,
            "draining": self.draining,
            "links": {link.name: {"state": link.state.value, "reason": link.reason} for link in self.links},
        }

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        status = self.status()
        return web.json_response(status, status=200 if status["ready"] else 503, dumps=json.dumps)

    async def _metrics(self, _: web.Request) -> web.Response:
        for link in self.links:
            self.metrics.link_up.labels(link.name).set(1 if link.up else 0)
        body = await asyncio.to_thread(generate_latest, self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
