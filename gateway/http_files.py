"""The gateway's HTTP side: stored files (so result URLs open in a browser) and health."""

from __future__ import annotations

from aiohttp import web

from storage.object_store import InvalidKey, LocalObjectStore


def make_http_app(files: LocalObjectStore | None) -> web.Application:
    app = web.Application()

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
    if files is not None:
        app.router.add_get("/files/{key:.+}", get_file)
    return app
