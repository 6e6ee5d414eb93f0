"""The gateway's HTTP side: stored files (so result URLs open in a browser), health, metrics."""

from __future__ import annotations

from aiohttp import web

from gateway.metrics import CONTENT_TYPE, GatewayMetrics
from storage.object_store import InvalidKey, LocalObjectStore


def make_http_app(files: LocalObjectStore | None, metrics: GatewayMetrics) -> web.Application:
    app = web.Application()

    async def serve_metrics(_: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def get_file(request: web.Request) -> web.StreamResponse:
        assert files is not None
        try:
            path = files.path(request.match_info["key"])
        except InvalidKey:
            raise web.HTTPNotFound() from None
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", serve_metrics)
    if files is not None:
        app.router.add_get("/files/{key:.+}", get_file)
    return app
