"""JSON request bodies on the HTTP side (fal's submit and run, the storage routes' JSON calls): declared
`application/json` (415 otherwise: a web page can send any other type across origins without asking, JSON
it cannot), at most the app's `client_max_size` (413), then parsed by `fal_json.loads_body` (422 naming
`body` for what is not JSON, nested too deep or not Unicode text). An empty body is `{}` whatever its type.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.errors import HttpRefused
from loraserve.request.fal_json import loads_body

JSON_TYPE = "application/json"


async def read_json(request: web.Request) -> Any:
    if request.body_exists and request.content_type != JSON_TYPE:
        declared = request.headers.get("Content-Type", "none")
        raise HttpRefused(415, f"the body must be sent as Content-Type: {JSON_TYPE}, not {declared}")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise HttpRefused(413, f"the body is larger than {request.client_max_size} bytes") from None
    return loads_body(raw)
