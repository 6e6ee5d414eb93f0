"""fal's queue protocol over HTTP, so fal's own clients (Python `fal-client`, JS `@fal-ai/client`)
work unchanged against this service: ../shared/spec/fal-queue-protocol.md §6.

A thin layer over GenerationService's core (the same validation, store, keys, quotas and
errors as gRPC), on the gateway's HTTP port:

* the queue at the root (`FAL_QUEUE_RUN_HOST=host:port`): `POST /{ns?}/{owner}/{alias}[/sub]`
  submits, `…/requests/{id}/status[/stream]`, `…/requests/{id}` and `PUT …/requests/{id}/cancel`;
* the synchronous run under `/run/` (`FAL_RUN_HOST=host:port/run`);
* a request carrying `x-fal-target-url` (the JS client's `proxyUrl`) is routed by that URL's
  host and path whatever path it came to: queue.fal.run → the queue, fal.run → the run,
  rest.fal.ai / v3.fal.media → the storage routes mounted beside these;
* the OpenAPI 3.1 document of all of these at `/openapi.json` (gateway/openapi.py);
* CORS for the browser origins `cors_allowed_origins` names, and none for any other.

A web page the gateway's user opens can send requests to it too, so: no CORS headers for an origin
the operator did not name (the page cannot read the answers), a write (anything but GET/HEAD) from
any such origin refused 403 (browsers send `Origin` with those; fal's clients outside a browser do
not), JSON bodies only as `application/json` (gateway/http_json.py), and, when keys are off (loopback),
only requests whose Host is a loopback name or `public_url`'s host answered (421 otherwise), so a
DNS-rebinding name that points at 127.0.0.1 reaches nothing (`insecure_no_auth` beyond loopback: no check). Every refusal, and anything unexpected,
leaves as fal's JSON `detail`.

What fal's clients need of the wire, and why it is so here: status 202 while waiting and 200
once COMPLETED (fal.apps reads 200 as finished); only IN_QUEUE / IN_PROGRESS / COMPLETED, a
failed or cancelled request being COMPLETED with `error` / `error_type` (other values make the
clients raise or poll forever); trailing slashes accepted and never a redirect (httpx does not
follow them); URLs returned without the submit's sub-path (the clients rebuild them so);
`X-Fal-Request-Id` on every reply about a request (JS reads the id from it, and its presence
stops Python retrying our 5xx); never a status the clients retry (408, 409, 429, 5xx) once a
request is accepted, 429 with Retry-After before; `application/json` on every JSON reply.

`X-Fal-Runner-Hint` is accepted and not used: fal uses it to pick a runner that has the
request's weights loaded, which the dispatcher already does by itself (hot base model first).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from gateway.auth import auth_required
from gateway.errors import HttpRefused, InvalidArgument, ServiceError, to_http
from gateway.fal_output import output_json, status_json
from gateway.generation_service import GenerationService
from gateway.http_json import read_json
from gateway.openapi import openapi_document
from gateway.store import RequestRecord, State
from loraserve.request import flux
from loraserve.request.fal_json import APP_ID, ENDPOINTS, endpoint_for, parse_input
from loraserve.request.violations import FieldViolation
from loraserve.v1 import generation_pb2

log = logging.getLogger(__name__)

# SSE keep-alive: fal's clients and the proxies between want a sign of life at least this often.
PING_SECONDS = 10.0
# How often a /run waiting for its request looks whether its caller is still connected.
RUN_CALLER_CHECK_SECONDS = 1.0
NAMESPACES = ("workflows", "comfy")
TRUE_VALUES = frozenset({"1", "true", "yes", "on"})
# x-fal-target-url hosts → where this gateway serves that role ("" the root, "/run" the run).
TARGET_HOSTS = {
    "queue.fal.run": "",
    "queue.falrun.com": "",
    "fal.run": "/run",
    "falrun.com": "/run",
    "rest.fal.ai": "",
    "rest.alpha.fal.ai": "",
    "v3.fal.media": "",
}
CORS_ALLOW_HEADERS = (
    "authorization, content-type, accept, x-fal-target-url, x-fal-queue-priority, x-fal-runner-hint,"
    " x-fal-request-timeout, x-fal-object-lifecycle-preference, x-fal-object-lifecycle, x-fal-file-name,"
    " x-fal-store-io, x-fal-disable-fallbacks"
)
CORS_EXPOSE_HEADERS = "x-fal-request-id, x-fal-error-type, x-fal-request-timeout-type, retry-after"
CORS_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
# Methods a page may send from an origin that is not allowed (it gets no CORS headers, so reads nothing).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Answered whatever the Host: probes and scrapers call by the pod's address, and these hold no one's data.
ANY_HOST_PATHS = frozenset({"/healthz", "/metrics"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ByIdHandler = Callable[[web.Request, "AppPath", str], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class AppPath:
    """A path below an app: `[ns/]owner/alias` and what follows it."""

    app: str
    rest: tuple[str, ...]


def split_app_path(path: str) -> AppPath | None:
    """`/fal-ai/lora/requests/x/status/` → ("fal-ai/lora", ("requests", "x", "status")); None when it
    names no app. Empty segments (trailing or doubled slashes) are dropped, never redirected."""
    parts = [part for part in path.split("/") if part]
    size = 3 if parts and parts[0] in NAMESPACES else 2
    if len(parts) < size:
        return None
    return AppPath("/".join(parts[:size]), tuple(parts[size:]))


def json_response(status: int, body: Any, request_id: str = "", headers: dict[str, str] | None = None) -> web.Response:
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    # An id from the path is echoed only if it can be a header (no id this service made holds a control character).
    if request_id and request_id.isascii() and request_id.isprintable():
        all_headers["X-Fal-Request-Id"] = request_id
    return web.Response(status=status, body=json.dumps(body, allow_nan=False).encode(), headers=all_headers)


def error_response(exc: BaseException, request_id: str = "") -> web.Response:
    answer = to_http(exc)
    return json_response(answer.status, answer.body, request_id, answer.headers)


def flag(value: str | None) -> bool:
    """fal's `logs` query: Python sends true/false, JS 1/0, Java nothing when off."""
    return (value or "").strip().lower() in TRUE_VALUES


def trusted_networks(spec: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """`trusted_proxies` ("127.0.0.0/8, ::1, 10.0.0.0/8") as networks; a bad entry is refused by name at start."""
    networks = []
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"setting `trusted_proxies`: {entry!r} is not an IP address or network") from None
    return tuple(networks)


def allowed_origins(spec: str) -> frozenset[str]:
    """`cors_allowed_origins` ("https://app.example, http://localhost:3000") as origins; a bad entry is refused
    by name at start."""
    origins = set()
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            continue
        parts = urlsplit(entry)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/") or parts.query:
            raise ValueError(f"setting `cors_allowed_origins`: {entry!r} is not an origin (scheme://host[:port])")
        origins.add(f"{parts.scheme}://{parts.netloc}".lower())
    return frozenset(origins)


def keyless_hosts(public_url: str) -> frozenset[str]:
    """Host names a keyless loopback gateway answers to besides loopback addresses."""
    return frozenset({"localhost", (urlsplit(public_url).hostname or "").lower()} - {""})


def host_is_answered(host: str, names: frozenset[str]) -> bool:
    """`host` (a Host header, port and all) names loopback or one of `names`."""
    try:
        hostname = (urlsplit(f"//{host}").hostname or "").lower()
    except ValueError:
        return False
    if hostname in names:
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


class FalHttp:
    """The queue and run routes; mount last on the HTTP app (their paths are catch-alls)."""

    def __init__(
        self, generation: GenerationService, trusted_proxies: str = "127.0.0.0/8,::1", *, keys_required: bool = False
    ) -> None:
        self._generation = generation
        self._trusted = trusted_networks(trusted_proxies)
        settings = generation.settings
        self._origins = allowed_origins(settings.cors_allowed_origins)
        # With keys, a request proves who sent it whatever Host it names; keyless on loopback, the Host is all
        # there is. Keyless beyond loopback (insecure_no_auth) the operator trusts the whole network, by any name.
        loopback = not auth_required(settings.http_host, insecure_no_auth=False)
        self._hosts = keyless_hosts(settings.public_url) if loopback and not keys_required else None
        self._document = openapi_document()

    def mount(self, app: web.Application) -> None:
        app.middlewares.append(_as_fal_errors)
        app.middlewares.append(self._check_host)
        app.middlewares.append(self._cors)
        app.middlewares.append(self._proxy_target)
        app.router.add_get("/openapi.json", self._openapi)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)

    async def _openapi(self, _: web.Request) -> web.Response:
        return json_response(200, self._document)

    # --- middlewares -----------------------------------------------------------------------

    @web.middleware
    async def _check_host(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._hosts is None or request.path in ANY_HOST_PATHS or host_is_answered(request.host, self._hosts):
            return await handler(request)
        detail = (
            f"this gateway runs without API keys and answers only to loopback names and public_url's host,"
            f" not {request.host!r}; set public_url to the name callers use"
        )
        return error_response(HttpRefused(421, detail))

    @web.middleware
    async def _cors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Browsers calling from an origin in `cors_allowed_origins`: preflights answered here, fal's headers
        exposed on every reply. Any other origin gets no CORS headers, and its writes are refused."""
        origin = request.headers.get("Origin")
        allowed = origin is not None and origin.lower() in self._origins
        if origin is not None and not allowed and (
            request.method not in SAFE_METHODS or "Access-Control-Request-Method" in request.headers
        ):
            detail = f"requests from web pages at {origin!r} are refused: that origin is not in cors_allowed_origins"
            return error_response(HttpRefused(403, detail))
        if not allowed:
            return await handler(request)
        assert origin is not None
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            asked = request.headers.get("Access-Control-Request-Headers", "")
            response: web.StreamResponse = web.Response(status=204)
            response.headers.update(
                {
                    "Access-Control-Allow-Methods": CORS_METHODS,
                    "Access-Control-Allow-Headers": ", ".join(h for h in (CORS_ALLOW_HEADERS, asked) if h),
                    "Access-Control-Max-Age": "600",
                }
            )
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                _allow_origin(exc.headers, origin)
                raise
        _allow_origin(response.headers, origin)
        return response

    @web.middleware
    async def _proxy_target(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """JS `proxyUrl` mode: the request names its real destination in `x-fal-target-url`; it is routed
        as if it had been sent there (host → role, then the target's path and query)."""
        target = request.headers.get("x-fal-target-url")
        if not target:
            return await handler(request)
        refusal = {"detail": f"x-fal-target-url {target!r} is not a fal queue, run or REST URL", "error_type": "bad_request"}
        try:
            parts = urlsplit(target)
            prefix = TARGET_HOSTS.get((parts.hostname or "").lower())
            if prefix is None:
                return json_response(400, refusal)
            path = prefix + (parts.path or "/")
            rerouted = request.clone(rel_url=path + (f"?{parts.query}" if parts.query else ""))
        except ValueError:
            # Not a URL at all: an unclosed IPv6 bracket, a port that is no number, a path aiohttp cannot take.
            return json_response(400, refusal)
        match = await request.app.router.resolve(rerouted)
        match.add_app(request.app)
        match.freeze()
        # aiohttp resolves a request's route once, before the middlewares; the clone is resolved here.
        rerouted._match_info = match
        return await match.handler(rerouted)

    # --- routing ---------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["tail"]
        run = path == "run" or path.startswith("run/")
        where = split_app_path(path[3:] if run else path)
        if where is None or where.app not in (APP_ID, flux.APP_ID):
            detail = f"no application at /{path}; this service runs {APP_ID} and {flux.APP_ID}"
            return json_response(404, {"detail": detail})
        if run or not where.rest or where.rest[0] != "requests":
            if request.method != "POST":
                return json_response(405, {"detail": f"{request.method} is not allowed here; submit with POST"})
            return await (self._run if run else self._submit)(request, where)
        if len(where.rest) < 2:
            return json_response(404, {"detail": "Request not found"})
        request_id, tail = where.rest[1], where.rest[2:]
        routes: dict[tuple[str, tuple[str, ...]], ByIdHandler] = {
            ("GET", ()): self._result,
            ("GET", ("status",)): self._status,
            ("GET", ("status", "stream")): self._stream,
            ("PUT", ("cancel",)): self._cancel,
        }
        route = routes.get((request.method, tail))
        if route is None:
            known = {t for _, t in routes}
            if tail in known:
                return json_response(405, {"detail": f"{request.method} is not allowed here"}, request_id)
            return json_response(404, {"detail": f"no route /{path}"}, request_id)
        try:
            return await route(request, where, request_id)
        except Exception as exc:  # noqa: BLE001 - every error leaves as fal's JSON (gateway/errors.py)
            return error_response(exc, request_id)

    async def _tenant(self, request: web.Request) -> str:
        return await self._generation.tenant_of_header(request.headers.get("Authorization"))

    def _urls(self, request: web.Request, app: str, request_id: str) -> dict[str, str]:
        base = f"{self.public_base(request)}/{app}/requests/{request_id}"
        return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}

    def public_base(self, request: web.Request) -> str:
        """scheme://host the caller used: from X-Forwarded-Proto / X-Forwarded-Host or Forwarded when the
        peer is a trusted proxy (a TLS-terminating ingress or sidecar), else this connection's own."""
        scheme, host = request.scheme, request.host
        peer = request.remote or ""
        try:
            trusted = any(ipaddress.ip_address(peer) in network for network in self._trusted)
        except ValueError:
            trusted = False
        if trusted:
            forwarded = request.forwarded[0] if request.headers.get("Forwarded") and request.forwarded else {}
            scheme = _first(request.headers.get("X-Forwarded-Proto")) or forwarded.get("proto") or scheme
            host = _first(request.headers.get("X-Forwarded-Host")) or forwarded.get("host") or host
        return f"{scheme}://{host}"

    # --- submit and run --------------------------------------------------------------------

    async def _accept(self, request: web.Request, where: AppPath, tenant: str | None = None) -> RequestRecord:
        """Everything before the request is accepted: auth (unless `tenant` is known), the body, fal's headers,
        validation, quotas."""
        if tenant is None:
            tenant = await self._tenant(request)
        sub_path = "/".join(where.rest)
        endpoint = flux.endpoint_for(sub_path) if where.app == flux.APP_ID else endpoint_for(sub_path)
        if endpoint is None:
            raise _NoEndpoint(where.app, sub_path)
        body = await read_json(request)
        inp = flux.parse_flux_input(body, endpoint) if where.app == flux.APP_ID else parse_input(body, endpoint)
        return await self._generation.submit(
            inp,
            tenant=tenant,
            start_timeout=_start_timeout(request.headers.get("X-Fal-Request-Timeout")),
            priority=request.headers.get("X-Fal-Queue-Priority", "").strip().lower(),
            webhook_url=request.query.get("fal_webhook", ""),
        )

    async def _submit(self, request: web.Request, where: AppPath) -> web.StreamResponse:
        try:
            record = await self._accept(request, where)
        except Exception as exc:  # noqa: BLE001
            return _refused(exc)
        # Accepted: from here on the answer is 200 whatever happens (a client would retry anything else
        # and queue the request twice); the queue position is the only thing still read.
        try:
            position = (await self._generation.status(record)).queue_position
        except Exception:  # noqa: BLE001
            log.warning("queue position unavailable for a submit reply", exc_info=True, extra={"request_id": record.id})
            position = 0
        body = {
            "status": "IN_QUEUE",
            "request_id": record.id,
            **self._urls(request, where.app, record.id),
            "queue_position": position,
            "gateway_request_id": record.id,
        }
        return json_response(200, body, record.id)

    async def _run(self, request: web.Request, where: AppPath) -> web.StreamResponse:
        """fal.run: submit, wait, answer the output (or the failure) in one call. A caller that hangs up
        frees its stream slot at once; its request goes on (its result stays in the queue)."""
        try:
            tenant = await self._tenant(request)
            with self._generation.open_stream(tenant):
                record = await self._accept(request, where, tenant)
                try:
                    waited = _with_pings(self._generation.updates(record, logs=False), RUN_CALLER_CHECK_SECONDS)
                    async with contextlib.aclosing(waited) as statuses:
                        async for _ in statuses:
                            if _caller_gone(request):
                                log.info("a run's caller hung up; its request goes on", extra={"request_id": record.id})
                                return web.Response(status=499, reason="Client Closed Request")
                    record = await self._generation.get(record.id, record.tenant)
                except Exception as exc:  # noqa: BLE001
                    # Accepted and still going: no retryable status, or a retry would run it twice.
                    log.warning("a run lost track of its request", extra={"request_id": record.id, "error": str(exc)})
                    detail = (
                        f"the gateway stopped waiting for request {record.id}; it goes on: fetch its result from the queue"
                    )
                    return json_response(500, {"detail": detail, "error_type": "internal_error"}, record.id)
        except Exception as exc:  # noqa: BLE001
            return _refused(exc)
        return self._result_response(record, request)

    # --- by id -----------------------------------------------------------------------------

    async def _status(self, request: web.Request, where: AppPath, request_id: str) -> web.StreamResponse:
        logs = flag(request.query.get("logs"))
        record = await self._generation.get(request_id, await self._tenant(request))
        status = await self._generation.status(record, logs)
        body = status_json(status, self._urls(request, where.app, record.id), list(status.logs) if logs else None)
        return json_response(200 if body["status"] == "COMPLETED" else 202, body, record.id)

    async def _stream(self, request: web.Request, where: AppPath, request_id: str) -> web.StreamResponse:
        """SSE: one status per event, each with only the log lines new since the last, COMPLETED last,
        then the stream ends; `: ping` comments while nothing changes."""
        logs = flag(request.query.get("logs"))
        record = await self._generation.get(request_id, await self._tenant(request))
        urls = self._urls(request, where.app, record.id)
        with self._generation.open_stream(record.tenant):
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",
                    "X-Fal-Request-Id": record.id,
                }
            )
            await response.prepare(request)
            last: dict[str, Any] | None = None
            try:
                async for status in _with_pings(self._generation.updates(record, logs), PING_SECONDS):
                    if status is None:
                        await response.write(b": ping\n\n")
                        continue
                    body = status_json(status, urls, list(status.logs) if logs else None)
                    # A change fal's body does not show (a denoising step) with no new log lines: nothing to send.
                    if body == last and not status.logs:
                        continue
                    last = body
                    await response.write(b"data: " + json.dumps(body).encode() + b"\n\n")
            except (ConnectionResetError, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001
                # Headers are sent: all that is left is ending the stream (the gateway is stopping).
                log.warning("status stream ended early", extra={"request_id": record.id, "error": str(exc)})
            await response.write_eof()
        return response

    async def _result(self, request: web.Request, where: AppPath, request_id: str) -> web.StreamResponse:
        record = await self._generation.get(request_id, await self._tenant(request))
        return self._result_response(record, request)

    def _result_response(self, record: RequestRecord, request: web.Request) -> web.Response:
        try:
            result = self._generation.result(record)
        except Exception as exc:  # noqa: BLE001
            return error_response(exc, record.id)
        body = flux.output_json(result.flux_output) if result.HasField("flux_output") else output_json(result.output)
        settings = self._generation.settings
        if not settings.public_url:
            # The local store's file URLs were made for http_host:http_port; behind a proxy the caller
            # reaches them where it reached this reply. A set public_url is the operator's word.
            body = _rebased(body, settings.files_base_url + "/files/", self.public_base(request) + "/files/")
        return json_response(200, body, record.id)

    async def _cancel(self, request: web.Request, where: AppPath, request_id: str) -> web.StreamResponse:
        record = await self._generation.get(request_id, await self._tenant(request))
        if not record.finished:
            record = await self._generation.cancel(record)
            if record.state == State.CANCELLED:
                return json_response(202, {"status": "CANCELLATION_REQUESTED"}, record.id)
        return json_response(400, {"status": "ALREADY_COMPLETED"}, record.id)


class _NoEndpoint(ServiceError):
    """A path below fal-ai/lora or fal-ai/flux-lora that is not one of its family."""

    def __init__(self, app: str, sub_path: str) -> None:
        names = flux.ENDPOINTS if app == flux.APP_ID else ENDPOINTS
        family = ", ".join(f"{app}/{name}".rstrip("/") for name in names)
        super().__init__(f"{app}/{sub_path} is not an endpoint here; use {family}")


def _refused(exc: BaseException) -> web.Response:
    if isinstance(exc, _NoEndpoint):
        return json_response(404, {"detail": exc.message})
    return error_response(exc)


@web.middleware
async def _as_fal_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (a file not found, a bad signature) and anything unexpected as fal's JSON
    `detail` (gateway/errors.py), never a text page."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {name: value for name, value in exc.headers.items() if name.lower() != "content-type"}
        return json_response(exc.status, {"detail": exc.text or exc.reason}, headers=headers)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as exc:  # noqa: BLE001 - answered as gateway/errors.py answers it, and logged there
        return error_response(exc)


def _allow_origin(headers: Any, origin: str) -> None:
    headers["Access-Control-Allow-Origin"] = origin
    headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
    headers.add("Vary", "Origin")


def _start_timeout(value: str | None) -> float:
    """fal's X-Fal-Request-Timeout: seconds as a float ("30.0" from Python, "30" from JS); absent → none."""
    if value is None or not value.strip():
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise InvalidArgument([FieldViolation("start_timeout", f"must be a number of seconds, got {value!r}")])
    return seconds


def _rebased(value: Any, old: str, new: str) -> Any:
    """`value` with every `url` that starts with `old` starting with `new` instead."""
    if isinstance(value, dict):
        return {
            key: new + item[len(old) :] if key == "url" and isinstance(item, str) and item.startswith(old)
            else _rebased(item, old, new)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_rebased(item, old, new) for item in value]
    return value


def _first(value: str | None) -> str:
    """The first hop of a comma-separated forwarded header (the one the client reached)."""
    return (value or "").split(",")[0].strip()


def _caller_gone(request: web.Request) -> bool:
    """The caller's connection is closed (aiohttp does not cancel a handler when its caller hangs up)."""
    return request.transport is None or request.transport.is_closing()


async def _with_pings(
    updates: AsyncIterator[generation_pb2.RequestStatus], every: float
) -> AsyncGenerator[generation_pb2.RequestStatus | None, None]:
    """The updates, with a None whenever `every` seconds pass without one. The pending read is kept across
    pings (cancelling it would end the generator)."""
    pending: asyncio.Future[generation_pb2.RequestStatus] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(updates))
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield None
                continue
            try:
                status = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield status
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        await updates.aclose()  # type: ignore[attr-defined]
