"""The HTTP side as an OpenAPI 3.1 document, served at `/openapi.json`: fal's queue and run routes for the
fal-ai/lora and fal-ai/flux-lora families, the storage upload routes and the stored files.

The request body of a generation is `fal_json.input_schema()`, walked over the same descriptors the
parser fills, so the document describes what the parser takes and cannot drift from it; the storage
routes' small JSON bodies are described beside their parsers' rules (gateway/fal_storage.py). Property-
based tests generate requests from this document against a live gateway (tests/integration/test_http_fuzz.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.fal_storage import MAX_PARTS
from loraserve.request import flux
from loraserve.request.fal_json import APP_ID, ENDPOINTS, input_schema

KEY_SCHEME = "key"
JSON = "application/json"
STRING = {"type": "string"}

# Every refusal is fal's JSON with a `detail`.
_REFUSED = {
    "description": "refused; `detail` says why (a list of {loc, msg, type} for bad fields)",
    "content": {JSON: {"schema": {"type": "object", "required": ["detail"]}}},
}
EVENTS = {"text/event-stream": {"schema": STRING}}
FILE = {"*/*": {"schema": {"type": "string", "format": "binary"}}}
_UPLOAD_BODY = {"required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
# gateway/fal_storage.py `_initiate_body`: both optional strings; `_listed_parts`: numbers ascending, once each.
_INITIATE_BODY = {
    "type": "object",
    "properties": {"file_name": STRING, "content_type": STRING},
}
_COMPLETE_BODY = {
    "type": "object",
    "required": ["parts"],
    "properties": {
        "parts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["partNumber"],
                "properties": {"partNumber": {"type": "integer"}, "etag": STRING},
            },
        }
    },
}


def _param(where: str, name: str, schema: dict[str, Any] | None = None, description: str = "") -> dict[str, Any]:
    return {
        "in": where,
        "name": name,
        "required": where == "path",
        "schema": schema or STRING,
        **({"description": description} if description else {}),
    }


def _json_body(schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {JSON: {"schema": schema}}}


def _operation(
    summary: str,
    *,
    parameters: Sequence[dict[str, Any]] = (),
    body: dict[str, Any] | None = None,
    keyed: bool = True,
    answer: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`answer`: the 200's content when it is not a JSON object (the status stream's events, a stored file)."""
    done = {"description": "done", "content": answer or {JSON: {"schema": {"type": "object"}}}}
    operation: dict[str, Any] = {
        "summary": summary,
        "parameters": list(parameters),
        "responses": {"200": done, "4XX": _REFUSED},
    }
    if body is not None:
        operation["requestBody"] = body
    if not keyed:
        # The URL itself is the capability (signed, or an unguessable upload id), like an S3 presigned URL.
        operation["security"] = []
    return operation


def _flux_schema_name(sub_path: str) -> str:
    """FluxLoraInput, FluxLoraImageToImageInput, FluxLoraInpaintingInput: fal's own schema names."""
    return "FluxLora" + "".join(part.capitalize() for part in sub_path.split("-")) + "Input"


def openapi_document() -> dict[str, Any]:
    submit_headers = [
        _param("header", "X-Fal-Request-Timeout", description="seconds the request may wait for a worker"),
        _param("header", "X-Fal-Queue-Priority", description="normal or low"),
        _param("query", "fal_webhook", description="URL the result is POSTed to once the request ends"),
    ]
    generation = _json_body({"$ref": "#/components/schemas/GenerateInput"})
    paths: dict[str, Any] = {}
    for sub_path in ENDPOINTS:
        path = f"/{APP_ID}/{sub_path}".rstrip("/")
        name = f"{APP_ID}/{sub_path}".rstrip("/")
        paths[path] = {"post": _operation(f"queue a {name} request", parameters=submit_headers, body=generation)}
        paths[f"/run{path}"] = {"post": _operation(f"run a {name} request and answer its output", parameters=submit_headers, body=generation)}
    # fal-ai/flux-lora's family: its own inputs; its requests are read at /fal-ai/flux-lora/requests/… by the
    # same routes as below.
    for sub_path, endpoint in flux.ENDPOINTS.items():
        path = f"/{flux.APP_ID}/{sub_path}".rstrip("/")
        name = path.lstrip("/")
        body = _json_body({"$ref": f"#/components/schemas/{_flux_schema_name(sub_path)}"})
        paths[path] = {"post": _operation(f"queue a {name} request", parameters=submit_headers, body=body)}
        paths[f"/run{path}"] = {
            "post": _operation(f"run a {name} request and answer its output", parameters=submit_headers, body=body)
        }
    by_id = f"/{APP_ID}/requests/{{request_id}}"
    request_id = _param("path", "request_id")
    logs = _param("query", "logs", description="true/1 to include the log lines")
    paths[by_id] = {"get": _operation("the output (or the failure) of a finished request", parameters=[request_id])}
    paths[f"{by_id}/status"] = {"get": _operation("where the request is: IN_QUEUE, IN_PROGRESS or COMPLETED", parameters=[request_id, logs])}
    paths[f"{by_id}/status/stream"] = {
        "get": _operation("the status as server-sent events until COMPLETED", parameters=[request_id, logs], answer=EVENTS)
    }
    paths[f"{by_id}/cancel"] = {"put": _operation("cancel a request that has not finished", parameters=[request_id])}

    file_name = _param("header", "X-Fal-File-Name")
    key, upload_id = _param("path", "key"), _param("path", "upload_id")
    part = _param("path", "part", {"type": "integer", "minimum": 1, "maximum": MAX_PARTS})
    expires = _param("query", "expires", {"type": "integer", "minimum": 0}, "epoch seconds the URL works until")
    signed = [expires, _param("query", "signature")]
    paths["/storage/auth/token"] = {"post": _operation("a short-lived upload token for the CDN routes")}
    paths["/files/upload"] = {"post": _operation("store a file (fal's v3 CDN)", parameters=[file_name], body=_UPLOAD_BODY)}
    paths["/files/upload/multipart"] = {"post": _operation("start a multipart upload (fal's v3 CDN)", parameters=[file_name])}
    paths["/files/{key}/multipart/{upload_id}/{part}"] = {
        "put": _operation("one part of a CDN multipart upload", parameters=[key, upload_id, part], body=_UPLOAD_BODY, keyed=False)
    }
    paths["/files/{key}/multipart/{upload_id}/complete"] = {
        "post": _operation(
            "finish a CDN multipart upload", parameters=[key, upload_id], body=_json_body(_COMPLETE_BODY), keyed=False
        )
    }
    paths["/storage/upload/initiate"] = {
        "post": _operation("an upload URL to PUT a file to", body=_json_body(_INITIATE_BODY, required=False))
    }
    paths["/storage/upload/put/{key}"] = {
        "put": _operation(
            "the file of an upload URL",
            parameters=[key, *signed, _param("query", "kid"), _param("query", "content_type")],
            body=_UPLOAD_BODY,
            keyed=False,
        )
    }
    paths["/storage/upload/initiate-multipart"] = {
        "post": _operation("start a multipart upload", body=_json_body(_INITIATE_BODY, required=False))
    }
    paths["/storage/upload/multipart/{upload_id}/{part}"] = {
        "put": _operation("one part of a multipart upload", parameters=[upload_id, part], body=_UPLOAD_BODY, keyed=False)
    }
    paths["/storage/upload/multipart/{upload_id}/complete"] = {
        "post": _operation(
            "finish a multipart upload", parameters=[upload_id], body=_json_body(_COMPLETE_BODY), keyed=False
        )
    }
    paths["/files/{key}"] = {
        "get": _operation(
            "a stored file, by the signed URL the service handed out", parameters=[key, *signed], keyed=False, answer=FILE
        )
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "loraserve: fal's queue protocol for fal-ai/lora and fal-ai/flux-lora", "version": "1"},
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "paths": paths,
        "components": {
            "schemas": {
                "GenerateInput": input_schema(),
                **{_flux_schema_name(sub_path): flux.input_schema(endpoint) for sub_path, endpoint in flux.ENDPOINTS.items()},
            },
            "securitySchemes": {
                KEY_SCHEME: {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": (
                        "`Key <id>:<secret>` (the CDN routes under /files take `Bearer <token>` from "
                        "/storage/auth/token too); required when the gateway listens beyond loopback"
                    ),
                }
            },
        },
        "security": [{KEY_SCHEME: []}],
    }
