"""The gateway's HTTP side: stored files (so result URLs open in a browser), health, metrics, and
whatever else is mounted on the port (fal's queue protocol, storage uploads, the webhook JWKS).

Stored files come from callers, so they are served so a browser never runs them: only a URL
the store signed and that has not expired opens a file (a missing or bad signature is 403
whether the file exists or not); the type is the one stored with the file (proved by its bytes
at upload), never guessed from its name, with `nosniff`; anything but a raster image is an
attachment, and a sandboxing CSP covers the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from aiohttp import web

from gateway.metrics import CONTENT_TYPE, GatewayMetrics
from storage.object_store import InvalidKey, LocalObjectStore
from storage.sniff import SNIFF_BYTES, sniff_content_type

# Shown in the browser; everything else is downloaded.
INLINE_CONTENT_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif"})
OCTET_STREAM = "application/octet-stream"


# Adds routes (and middlewares) to the HTTP app.
Mount = Callable[[web.Application], None]


def make_http_app(
    files: LocalObjectStore | None, metrics: GatewayMetrics, mounts: Sequence[Mount] = ()
) -> web.Application:
    """`mounts` are applied in order after the fixed routes; aiohttp matches routes in the order they
    were added, so catch-alls (fal's queue routes at the root) go last."""
    app = web.Application(client_max_size=32 * 1024 * 1024)

    async def serve_metrics(_: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def get_file(request: web.Request) -> web.StreamResponse:
        assert files is not None
        key = request.match_info["key"]
        expires, signature = request.query.get("expires", ""), request.query.get("signature", "")
        if not files.signature_valid(key, expires, signature):
            raise web.HTTPForbidden(text="the file URL is not signed by this service or has expired")
        try:
            path = files.path(key)
        except InvalidKey:
            raise web.HTTPNotFound() from None
        if not path.is_file():
            raise web.HTTPNotFound()
        content_type = files.content_type(key) or _sniffed(path)
        headers = {
            "Content-Type": content_type,
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
            "Cache-Control": f"private, max-age={max(0, int(expires) - int(files.clock()))}",
        }
        if content_type not in INLINE_CONTENT_TYPES:
            headers["Content-Disposition"] = f'attachment; filename="{path.name}"'
        return web.FileResponse(path, headers=headers)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", serve_metrics)
    if files is not None:
        app.router.add_get("/files/{key:.+}", get_file)
    for mount in mounts:
        mount(app)
    return app


def _sniffed(path: Path) -> str:
    """Objects stored before types were kept: what their bytes prove, else a plain download."""
    with path.open("rb") as handle:
        return sniff_content_type(handle.read(SNIFF_BYTES)) or OCTET_STREAM
