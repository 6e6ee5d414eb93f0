"""Property-based fuzzing of both front doors of a live gateway (keys on, a tenant's key).

* schemathesis generates requests from the gateway's own `/openapi.json` (every route; valid and invalid
  bodies, headers, query and path values, with and without the key; path values random and of a live
  request and a live multipart upload; a valid body with the rest generated): none is answered 5xx.
* hypothesis posts JSON no schema describes to every route that reads JSON (lone surrogates in values and
  keys, integers past any float, NaN, any nesting): none is answered 5xx either. schemathesis cannot
  send these (its strings are always encodable).
* hypothesis builds SubmitRequests over every GenerateInput field (extreme integers, NaN, unknown enum
  values), alone and as one field off a valid input: none is INTERNAL or UNKNOWN over gRPC.

The workers are the test's own and finish at once (test_fal_http.py's ImageWorker), so nothing waits
behind what the fuzzing submits. Example counts are fixed and the runs derandomized: the same cases
every run, under a minute in all.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import grpc
import pytest
import requests
import schemathesis
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode
from yarl import URL

from gateway.auth import header_value, new_key
from gateway.server import Gateway
from loraserve.request import flux
from loraserve.request.fal_json import input_schema
from loraserve.v1 import flux_pb2, generation_pb2, generation_pb2_grpc
from tests.conftest import gateway_for
from tests.integration.test_fal_http import BODY, on_worker, worker  # noqa: F401
from tests.unit.worker_testkit import WorkerServer

pytestmark = pytest.mark.integration

HTTP_EXAMPLES_PER_ROUTE = 20
HOSTILE_EXAMPLES = 100
HEADER_EXAMPLES = 400
GRPC_EXAMPLES = 200
# Every route of fal_http, fal_storage and the files (the document's operations).
ROUTES = 27
FUZZ_SETTINGS = settings(
    deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck), print_blob=True
)
# A 1×1 PNG: the start image and mask the image-to-image and inpaint routes require.
PNG_BYTES = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c63f8ffff3f0005fe02fea7d6a4b00000000049454e44ae426082"
)
PNG = "data:image/png;base64," + base64.b64encode(PNG_BYTES).decode()
VALID_BODIES = {
    "": BODY,
    "image-to-image": {**BODY, "image_url": PNG},
    "inpaint": {**BODY, "image_url": PNG, "mask_url": PNG},
    "fal-ai/flux-lora": {"prompt": "a red house", "seed": 2**40},
    "fal-ai/flux-lora/image-to-image": {"prompt": "a red house", "image_url": PNG},
    "fal-ai/flux-lora/inpainting": {"prompt": "a red house", "image_url": PNG, "mask_url": PNG},
}
# Strings the gateway gives meaning to, so that cases get past the first checks.
WORDS = [
    "",
    "org/model",
    "stabilityai/stable-diffusion-xl-base-1.0",
    "https://127.0.0.1:9/a.png",
    PNG,
    "square_hd",
    "DPM++ 2M Karras",
    "array",
    "default",
    "low",
    "jpeg",
    "v_prediction",
    '{"up": {"block_0": [0.0, 1.0, 0.0]}}',
    "\x00",
    "../../etc/passwd",
]
JSON_HEADERS = {"Content-Type": "application/json"}


@pytest.fixture
async def keyed(tmp_path: Path, worker: WorkerServer) -> AsyncIterator[tuple[Gateway, dict[str, str]]]:  # noqa: F811
    """A gateway that requires keys (its gRPC port listens beyond loopback), and one tenant's key."""
    async with gateway_for(on_worker(tmp_path, worker.port, grpc_host="0.0.0.0")) as gateway:
        key, secret = new_key("fuzz")
        await gateway.store.add_key(key)
        yield gateway, {"Authorization": header_value(key.id, secret)}


def base_url(gateway: Gateway) -> str:
    return f"http://127.0.0.1:{gateway.settings.http_port}"


# --- the OpenAPI document --------------------------------------------------------------------------


async def test_no_request_the_openapi_document_allows_or_refuses_is_a_server_error(
    keyed: tuple[Gateway, dict[str, str]],
) -> None:
    gateway, auth = keyed
    statuses = await asyncio.to_thread(fuzz_http, base_url(gateway), auth)
    assert len(statuses) == ROUTES, sorted(statuses)
    # The cases reach past the key check and the parser: accepted submits, a stored file, a live upload's parts.
    assert 200 in statuses["POST /fal-ai/lora"] and 200 in statuses["POST /run/fal-ai/lora/inpaint"], statuses
    assert 200 in statuses["POST /fal-ai/flux-lora"] and 200 in statuses["POST /run/fal-ai/flux-lora/inpainting"], statuses
    assert 200 in statuses["GET /fal-ai/lora/requests/{request_id}/status"], statuses
    assert 200 in statuses["POST /files/upload"] and 200 in statuses["PUT /storage/upload/multipart/{upload_id}/{part}"], statuses


def fuzz_http(base: str, auth: dict[str, str]) -> dict[str, set[int]]:
    """The statuses each operation answered. Runs off the event loop the gateway serves from: schemathesis'
    calls are blocking `requests`."""
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    live = live_values(base, auth)
    statuses: dict[str, set[int]] = {}
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the document itself holds together
        operation = result.ok()
        answered = statuses.setdefault(operation.label, set())

        # One strategy of all (where schemathesis can make no invalid case of an operation, the others still run).
        @settings(FUZZ_SETTINGS, max_examples=HTTP_EXAMPLES_PER_ROUTE)
        @given(st.one_of(*strategies(operation, live)))
        def no_server_error(case: schemathesis.Case) -> None:
            response = case.call_and_validate(headers=auth, checks=[not_a_server_error], timeout=30)
            answered.add(response.status_code)

        no_server_error()
    return statuses


def strategies(operation: Any, live: dict[str, dict[str, str]]) -> Iterator[Any]:
    """Random cases, invalid cases, cases on live ids where the path takes them, and, on a generation
    route, a valid body with everything else generated."""
    yield operation.as_strategy(GenerationMode.POSITIVE)
    yield operation.as_strategy(GenerationMode.NEGATIVE)
    here = live.get(operation.path.split("/")[1], {})
    known = {name: here[name] for name in re.findall(r"{(\w+)}", operation.path) if name in here}
    if known:
        yield operation.as_strategy(GenerationMode.POSITIVE, path_parameters=known)
    sub_path = operation.path.removeprefix("/run").strip("/")
    sub_path = sub_path.removeprefix("fal-ai/lora").strip("/") if sub_path.startswith("fal-ai/lora") else sub_path
    if operation.method.upper() == "POST" and sub_path in VALID_BODIES:
        yield operation.as_strategy(GenerationMode.POSITIVE, body=VALID_BODIES[sub_path], media_type="application/json")


def live_values(base: str, auth: dict[str, str]) -> dict[str, dict[str, str]]:
    """Path values of things that exist, by the first segment of the paths that take them: a finished
    request, an open CDN multipart upload and an open storage multipart upload (a complete, even a refused
    one, ends an upload, so each family of routes has its own)."""
    submitted = requests.post(f"{base}/fal-ai/lora", json=BODY, headers=auth, timeout=30)
    assert submitted.status_code == 200, submitted.text
    request_id = submitted.json()["request_id"]
    # The status stream ends once the request has (the worker finishes at once).
    streamed = requests.get(f"{base}/fal-ai/lora/requests/{request_id}/status/stream", headers=auth, timeout=30)
    assert '"COMPLETED"' in streamed.text, streamed.text
    started = requests.post(f"{base}/files/upload/multipart", headers=auth, timeout=30)
    assert started.status_code == 200, started.text
    key = urlsplit(started.json()["access_url"]).path.removeprefix("/files/")
    initiated = requests.post(f"{base}/storage/upload/initiate-multipart", json={}, headers=auth, timeout=30)
    assert initiated.status_code == 200, initiated.text
    return {
        "fal-ai": {"request_id": request_id},
        "files": {"key": key, "upload_id": started.json()["uploadId"]},
        "storage": {"upload_id": initiated.json()["upload_url"].rsplit("/", 1)[1]},
    }


async def test_what_the_fuzzing_found_is_refused_or_stored_never_a_500(keyed: tuple[Gateway, dict[str, str]]) -> None:
    """Each was a 500: a file name whose plain form starts with `-` (the store refused the key it made), a
    signature or upload token that is not ASCII (compare_digest raised TypeError); and a request id with a
    carriage return got no answer at all."""
    gateway, auth = keyed
    png = {**auth, "Content-Type": "image/png"}
    async with aiohttp.ClientSession(base_url(gateway)) as http:
        async with http.post("/files/upload", data=PNG_BYTES, headers={**png, "X-Fal-File-Name": "-rf.png"}) as response:
            assert response.status == 200, await response.text()
            stored = urlsplit((await response.json())["access_url"])
        assert stored.path.endswith("/rf.png"), stored
        signed = dict(parse_qsl(stored.query))
        async with http.get(stored.path, params={**signed, "signature": "\u00e9"}) as response:
            assert response.status == 403, await response.text()
        async with http.post("/storage/upload/initiate", json={"file_name": "-a.png"}, headers=auth) as response:
            upload_url = urlsplit((await response.json())["upload_url"])
        assert "/-" not in upload_url.path, upload_url
        query = {**dict(parse_qsl(upload_url.query)), "signature": "\u00e9"}
        async with http.put(upload_url.path, params=query, data=PNG_BYTES, headers=png) as response:
            assert response.status == 403, await response.text()
        async with http.post("/files/upload", data=PNG_BYTES, headers={**png, "Authorization": "Bearer \u00e9.\u00e9"}) as response:
            assert response.status == 401, await response.text()
        # A request id no header can carry: echoed in X-Fal-Request-Id, aiohttp dropped the connection.
        async with http.get(URL("/fal-ai/lora/requests/a%0Db/status", encoded=True), headers=auth) as response:
            assert response.status == 404, await response.text()
            assert "X-Fal-Request-Id" not in response.headers


# --- JSON no schema describes ----------------------------------------------------------------------


def hostile_text() -> st.SearchStrategy[str]:
    """Any characters, lone surrogates too (JSON's `"\\ud800"`, which no UTF-8 encoder takes)."""
    surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
    return st.text(st.one_of(st.characters(codec=None), surrogates), max_size=6) | st.sampled_from(WORDS)


def hostile_json() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(-(10**400), 10**400),  # past any float, past int64
        st.floats(),  # NaN and ±Infinity, which Python's JSON reads
        hostile_text(),
    )
    return st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text(), inner, max_size=3), max_leaves=8
    )


def hostile_bodies() -> st.SearchStrategy[Any]:
    """Bodies whose keys are mostly a generation's own fields (so values reach each field's parser)."""
    names = {*input_schema(endpoint_in_path=False)["properties"], *flux.KEYS[flux_pb2.FLUX_ENDPOINT_INPAINTING]}
    fields = {name: hostile_json() for name in names}
    known = st.fixed_dictionaries({}, optional=fields)
    return st.one_of(known, st.builds(lambda a, b: {**a, **b}, known, st.dictionaries(hostile_text(), hostile_json(), max_size=2)), hostile_json())


def json_routes(live: dict[str, dict[str, str]]) -> list[str]:
    cdn, storage = live["files"], live["storage"]
    return [
        "/fal-ai/lora",
        "/fal-ai/lora/image-to-image",
        "/run/fal-ai/lora/inpaint",
        "/fal-ai/flux-lora",
        "/run/fal-ai/flux-lora/inpainting",
        "/storage/upload/initiate",
        "/storage/upload/initiate-multipart",
        f"/storage/upload/multipart/{storage['upload_id']}/complete",
        f"/files/{cdn['key']}/multipart/{cdn['upload_id']}/complete",
    ]


async def test_no_json_body_is_a_server_error(keyed: tuple[Gateway, dict[str, str]]) -> None:
    gateway, auth = keyed
    statuses = await asyncio.to_thread(fuzz_json, base_url(gateway), auth)
    assert {200, 422} <= statuses, statuses


def fuzz_json(base: str, auth: dict[str, str]) -> set[int]:
    statuses: set[int] = set()
    routes = json_routes(live_values(base, auth))

    @settings(FUZZ_SETTINGS, max_examples=HOSTILE_EXAMPLES)
    @given(st.sampled_from(routes), hostile_bodies())
    @example("/fal-ai/lora", {**BODY, "guidance_scale": 10**400, "prompt": "\ud800", "\udfff": 1})
    @example("/storage/upload/initiate", {"file_name": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]})
    @example("/fal-ai/lora", {**BODY, "seed": float("nan"), "num_images": float("inf"), "image_size": {"width": 10**30, "height": -1}})
    @example("/fal-ai/flux-lora", {"prompt": "p", "image_size": "\ud800", "guidance_scale": float("nan"), "seed": 10**30})
    def no_server_error(path: str, body: Any) -> None:
        raw = json.dumps(body, ensure_ascii=True).encode()
        response = requests.post(f"{base}{path}", data=raw, headers={**auth, **JSON_HEADERS}, timeout=30)
        assert response.status_code < 500, (path, raw[:300], response.status_code, response.text[:300])
        assert response.headers["Content-Type"].startswith("application/json"), response.text[:300]
        if response.status_code >= 400:
            assert response.json()["detail"], response.text[:300]
        statuses.add(response.status_code)

    no_server_error()
    return statuses


# --- header bytes ----------------------------------------------------------------------------------

# The headers the HTTP side reads, and what their values start with where a prefix picks the reading.
READ_HEADERS = [
    ("Authorization", b"Key "),
    ("Authorization", b"Bearer "),
    ("X-Fal-File-Name", b""),
    ("X-Fal-Request-Timeout", b""),
    ("X-Fal-Queue-Priority", b""),
    ("x-fal-target-url", b"https://queue.fal.run/fal-ai/lora"),
    ("Origin", b"http://"),
    ("X-Forwarded-Host", b""),
    ("X-Forwarded-Proto", b""),
    ("Forwarded", b"host="),
    ("Content-Type", b"application/json"),
]
RAW_ROUTES = [
    ("POST", "/fal-ai/lora", json.dumps(BODY).encode(), "application/json"),
    ("POST", "/files/upload", PNG_BYTES, "image/png"),
    ("POST", "/storage/upload/initiate", b"{}", "application/json"),
    ("GET", "/fal-ai/lora/requests/x/status", b"", "application/json"),
]


async def test_no_header_bytes_are_a_server_error(keyed: tuple[Gateway, dict[str, str]]) -> None:
    """Any bytes in a header the HTTP side reads (aiohttp hands undecodable ones on as surrogates), sent raw:
    an HTTP client library refuses most of them."""
    gateway, auth = keyed
    statuses = await asyncio.to_thread(fuzz_headers, gateway.settings.http_port, auth["Authorization"])
    assert {200, 401} <= statuses, statuses


def fuzz_headers(port: int, key: str) -> set[int]:
    statuses: set[int] = set()
    # Any bytes but a line's end, and values built of the separators the parsers split on and of bytes that
    # are no UTF-8 (0xff, an encoded surrogate) or are (é).
    pieces = [b":", b".", b"=", b";", b",", b"/", b" ", b"a", b"lsk_", b"\xff", b"\xed\xa0\x80", b"\xc3\xa9", b"\x7f"]
    value_bytes = st.one_of(
        st.binary(max_size=24).map(lambda raw: raw.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")),
        st.lists(st.sampled_from(pieces), max_size=8).map(b"".join),
    )

    @settings(FUZZ_SETTINGS, max_examples=HEADER_EXAMPLES)
    @given(st.sampled_from(RAW_ROUTES), st.sampled_from(READ_HEADERS), value_bytes)
    @example(RAW_ROUTES[0], READ_HEADERS[0], b"\xff:\xff")
    def no_server_error(route: tuple[str, str, bytes, str], header: tuple[str, bytes], value: bytes) -> None:
        method, path, body, content_type = route
        headers = {"Host": b"127.0.0.1", "Authorization": key.encode(), "Content-Type": content_type.encode()}
        headers[header[0]] = header[1] + value
        status = raw_status(port, method, path, headers, body)
        assert status is not None and status < 500, (method, path, header[0], headers[header[0]], status)
        statuses.add(status)

    no_server_error()
    return statuses


def raw_status(port: int, method: str, path: str, headers: dict[str, bytes], body: bytes) -> int | None:
    """The status of one HTTP/1.1 request written byte for byte; None if the connection closed unanswered."""
    lines = [f"{method} {path} HTTP/1.1".encode()]
    lines += [name.encode() + b": " + value for name, value in headers.items()]
    lines += [f"Content-Length: {len(body)}".encode(), b"Connection: close", b"", body]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"\r\n".join(lines))
        answer = b""
        while b"\r\n" not in answer and (chunk := sock.recv(4096)):
            answer += chunk
    first = answer.split(b"\r\n", 1)[0].split()
    return int(first[1]) if len(first) > 1 and first[1].isdigit() else None


# --- gRPC Submit -----------------------------------------------------------------------------------


async def test_no_submit_over_grpc_is_internal_or_unknown(keyed: tuple[Gateway, dict[str, str]]) -> None:
    gateway, auth = keyed
    codes = await asyncio.to_thread(fuzz_grpc, f"127.0.0.1:{gateway.grpc_port}", auth["Authorization"])
    assert codes == {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK}, codes


async def test_a_refusal_quoting_long_values_reaches_a_grpc_caller(keyed: tuple[Gateway, dict[str, str]]) -> None:
    """Found by the fuzzing above: the refusal quotes each bad value, and its trailers passed gRPC's 8 KiB, so the
    caller got RESOURCE_EXHAUSTED "Stream removed" instead of INVALID_ARGUMENT naming the fields."""
    gateway, auth = keyed
    long = "\u00e9" * 3000
    fields = {"model_name": "org/model", "prompt": "p", "scheduler": long, "image_format": long, "prediction_type": long}
    target = f"127.0.0.1:{gateway.grpc_port}"
    code, named = await asyncio.to_thread(submit, target, auth["Authorization"], {"input": fields})
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert named[:3] == ["input.scheduler", "input.image_format", "input.prediction_type"], named


def submit(target: str, key: str, fields: dict[str, Any]) -> tuple[grpc.StatusCode, list[str]]:
    """A Submit's code and the fields its BadRequest names."""
    with grpc.insecure_channel(target) as channel:
        return submit_on(generation_pb2_grpc.GenerationServiceStub(channel), key, fields)


def submit_on(stub: generation_pb2_grpc.GenerationServiceStub, key: str, fields: dict[str, Any]) -> tuple[grpc.StatusCode, list[str]]:
    try:
        stub.Submit(generation_pb2.SubmitRequest(**fields), metadata=[("authorization", key)], timeout=30)
    except grpc.RpcError as exc:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
        assert status is not None, (exc.code(), exc.details())  # type: ignore[attr-defined]
        named = []
        for detail in status.details:
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(bad):
                named += [violation.field for violation in bad.field_violations]
        return exc.code(), named  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, []


def fuzz_grpc(target: str, key: str) -> set[grpc.StatusCode]:
    """The codes the Submits got: OK, or INVALID_ARGUMENT with a BadRequest naming a field (the tenant has no
    quota to run out of)."""
    codes: set[grpc.StatusCode] = set()
    valid = {"model_name": "org/model", "prompt": "a red house"}
    with grpc.insecure_channel(target) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)

        @settings(FUZZ_SETTINGS, max_examples=GRPC_EXAMPLES)
        @given(st.one_of(message_fields(generation_pb2.SubmitRequest.DESCRIPTOR), one_field_off(valid)))
        @example({"input": valid})
        def never_internal(fields: dict[str, Any]) -> None:
            code, named = submit_on(stub, key, fields)
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, fields)
            assert code == grpc.StatusCode.OK or named, fields
            codes.add(code)

        never_internal()
    return codes


def one_field_off(valid: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid input with one field set to anything its type holds: each field's own checks, past the rest."""
    descriptor = generation_pb2.SubmitRequest.DESCRIPTOR.fields_by_name["input"].message_type
    return st.sampled_from(list(descriptor.fields)).flatmap(
        lambda field: field_values(field).map(lambda value: {"input": {**valid, field.name: value}})
    )


def message_fields(descriptor: Descriptor) -> st.SearchStrategy[dict[str, Any]]:
    """Keyword arguments of a message: any subset of its fields, each any value its type holds."""
    return st.fixed_dictionaries({}, optional={field.name: field_values(field) for field in descriptor.fields})


def field_values(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    single = single_values(field)
    return st.lists(single, max_size=3) if field.is_repeated else single


def single_values(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return st.deferred(lambda: message_fields(field.message_type))
    if kind == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from(WORDS), st.text(max_size=40))
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_ENUM:
        # proto3 enums are open: a number no value names arrives as itself.
        return st.one_of(st.sampled_from(list(field.enum_type.values_by_number)), st.integers(-3, 1000))
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)
    bits = 64 if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64) else 32
    signed = kind in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return st.one_of(st.integers(low, high), st.sampled_from([0, 1, -1 if signed else 2, low, high]), st.integers(0, 200))
