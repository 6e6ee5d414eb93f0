"""The Ray Serve worker deployment, reached through Serve's gRPC ingress.

One replica keeps up to `max_pipelines_per_replica` base pipelines loaded (Serve model
multiplexing, keyed by the base-model key the gateway puts in `multiplexed_model_id`)
and runs one generation at a time per replica: a pipeline is not safe to call from two
requests at once. Outputs go straight to the object store; only file records return.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import threading
import time
import traceback
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from loraserve.request import schema
from core import tracing
from core.config import Settings
from loraserve.errors import ErrorType
from loraserve.request.sync_mode import check_inline_size
from loraserve.request.flux import validate_flux_input
from loraserve.request.validation import validate_input
from loraserve.request.violations import InvalidInput
from core.logs import redact_log_records
from core.model_key import BaseModelRef
from core.redaction import redact_text, redact_url
from loraserve.v1 import flux_pb2, types_pb2, worker_pb2
from core.worker_auth import caller_secret, secret_matches
from serving import compiled, conditioning, flux_generation, image_to_image
from serving.embeddings import EmbeddingLoadError
from serving.lora_cache import HOST_TIER, HostLoraCache, LoraFileError
from serving.metrics import WorkerMetrics
from serving.params import params_from_input
from serving.previews import Previews
from serving.residency import Residency, device_total
from serving.pipelines import (
    AdapterLoadError,
    GenerationCancelled,
    GenerationParams,
    GenerationResult,
    LoadedPipeline,
    ModelLoadError,
    OptionUnavailableError,
    PipelineReleased,
    generate_result,
    load_pipeline,
    lora_file,
)
from serving.safety import SafetyChecker, load_safety_checker
from serving.serve_config import DEPLOYMENT_NAME, deployment_options
from storage import from_settings
from storage.fetch import InputFetchError, input_deadline
from storage.object_store import output_name, output_prefix
from storage.result_urls import data_uri
from storage.retry import StorageUnavailable, put_retrying
from storage.tenant_files import check_stored_inputs

log = logging.getLogger(__name__)

# A request streams its first and last denoising step and, between them, at most one step per
# this many seconds: every progress event wakes the replica's event loop, Serve's streaming, the
# proxy and the gateway (~3.5 ms of CPU among them), and on a CPU replica the generation thread
# loses that time (python -m bench: 16 events per 1 s job cost the replica 2-4% of its speed).
PROGRESS_INTERVAL_SECONDS = 0.25

_FAILURES: dict[type[BaseException], ErrorType] = {
    ModelLoadError: ErrorType.MODEL_LOAD_FAILED,
    AdapterLoadError: ErrorType.ADAPTER_LOAD_FAILED,
    GenerationCancelled: ErrorType.CANCELLED,
    torch.OutOfMemoryError: ErrorType.OUT_OF_MEMORY,
    InputFetchError: ErrorType.INVALID_INPUT,
    OptionUnavailableError: ErrorType.INVALID_INPUT,
    # The request model's validation, again: a call that did not come through the gateway's checks.
    InvalidInput: ErrorType.INVALID_INPUT,
    # The outputs could not be stored: a failed worker attempt, which the gateway may run again.
    StorageUnavailable: ErrorType.WORKER_FAILED,
}

# Lookups of a request's pipeline; another request's load can evict it between lookup and use.
PIPELINE_ATTEMPTS = 3
T = TypeVar("T")
Emit = Callable[[worker_pb2.GenerateResponse | None], None]


@dataclasses.dataclass
class _Job:
    """A request made ready by its model's handler, for the shared rest of `Worker._serve`."""

    params: GenerationParams | flux_generation.FluxParams
    run: Callable[[Emit, threading.Event], GenerationResult]
    image_format: str
    inline: bool
    load_seconds: float


Prepare = Callable[
    [worker_pb2.GenerateRequest, contextlib.ExitStack, list[_Job]], AsyncIterator[worker_pb2.GenerateResponse]
]
ThreadWork = Callable[[Emit, threading.Event], T]


def resolve_device(setting: str) -> str:
    if setting != "auto":
        return setting
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(setting: str, device: str) -> torch.dtype:
    if setting == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, setting)


class EvictablePipeline:
    """What Serve's multiplexer holds for a base model: its `__del__` is Serve's eviction hook.

    Serve calls it explicitly when it evicts the least recently used model; the pipeline then
    frees its weights once no request is running on it (LoadedPipeline.release). The FLUX plan
    (serving/residency.py) may release `loaded` while Serve still holds this: the next request for
    the model then loads it again into the same holder.
    """

    def __init__(self, loaded: LoadedPipeline) -> None:
        self.loaded = loaded

    def __del__(self) -> None:
        self.loaded.release()


class Worker:
    def __init__(self, settings: Settings) -> None:
        redact_log_records()
        tracing.setup(settings, "worker")
        self._settings = settings
        if not settings.worker_shared_secret:
            log.warning("worker_shared_secret is not set: any caller that reaches Serve's gRPC ingress is served")
        self._device = resolve_device(settings.device)
        self._dtype = resolve_dtype(settings.torch_dtype, self._device)
        # FLUX.1 is trained and published in bfloat16, and overflows in float16: "auto" on cuda means bfloat16 for it.
        self._flux_ref = BaseModelRef.normalised(settings.flux_model, "", "")
        auto_cuda = settings.torch_dtype == "auto" and self._device.startswith("cuda")
        self._flux_dtype = torch.bfloat16 if auto_cuda else self._dtype
        self._compile_mode = compiled.resolve_mode(settings.compile, self._device)
        self._compile_sizes = compiled.parse_sizes(settings.compile_warmup_sizes)
        self._compile_regional = compiled.resolve_regional(settings.compile_regional)
        self._store = from_settings.object_store(settings)
        self._metrics = WorkerMetrics()
        if settings.worker_metrics_port:
            self._metrics.serve(settings.worker_metrics_port)
        self._weights = from_settings.weights_cache(settings, self._store, self._metrics.tier_observer("disk"))
        if self._compile_mode != compiled.OFF:
            # On the weights volume: a restarted replica reads its compiled kernels back.
            compiled.use_cache_dir(settings.weights_dir / compiled.CACHE_FOLDER)
            compiled.EVENTS.add_listener(lambda _reason: self._metrics.compile_recompiles.inc())
        self._image_policy = from_settings.image_fetch_policy(settings)
        self._host_loras = HostLoraCache(
            settings.max_host_lora_bytes, observer=self._metrics.tier_observer(HOST_TIER)
        )
        conditioning.configure_cache(
            settings.max_conditioning_models_per_replica,
            settings.max_conditioning_bytes_per_replica,
            self._metrics.tier_observer(conditioning.CONDITIONING_TIER),
        )
        self._generation_lock = asyncio.Lock()
        # The stop event of each request's latest call here: a newer call of the same request stops an older one.
        self._calls: dict[str, threading.Event] = {}
        self._pipeline_loads = 0
        self._checker: SafetyChecker | None = None
        # Base-model key → where the request waiting for that load wants its progress lines.
        self._load_listeners: dict[str, Callable[[str], None]] = {}
        # Base-model key → its pipeline while Serve's multiplexer holds it, so that Prefetch can
        # make a waiting request's LoRAs resident on it.
        self._hot: weakref.WeakValueDictionary[str, LoadedPipeline] = weakref.WeakValueDictionary()
        # Base-model key → the reference a request is about to load it from (the key is only a digest).
        self._refs: dict[str, BaseModelRef] = {}
        # Which bases stay on the device beside a FLUX pipeline; Serve's count bounds the rest.
        self._residency = Residency(settings.device_memory_bytes or device_total(self._device))
        # Loads one at a time: Serve's own (under its lock) and the reloads of bases the FLUX plan evicted.
        self._load_lock = asyncio.Lock()

        async def load(key: str) -> EvictablePipeline:
            async with self._load_lock:
                return EvictablePipeline(await asyncio.to_thread(self._load, key))

        self._pipelines = serve.multiplexed(max_num_models_per_replica=settings.max_pipelines_per_replica)(load)

    def _load(self, key: str) -> LoadedPipeline:
        ref = self._refs.pop(key)
        self._pipeline_loads += 1
        with self._metrics.pipeline_load_seconds.time():
            def report(line: str) -> None:
                self._load_listeners.get(key, _log_line)(line)

            variant = ref.variant or None
            try:
                source = self._weights.resolve(ref.model_name, "input.model_name", variant=variant, on_progress=report)
                unet = (
                    self._weights.resolve(ref.unet_name, "input.unet_name", variant=variant, on_progress=report)
                    if ref.unet_name
                    else None
                )
            except InputFetchError as exc:
                raise ModelLoadError(str(exc)) from exc
            loaded = load_pipeline(
                str(source),
                device=self._device,
                torch_dtype=self._flux_dtype if ref == self._flux_ref else self._dtype,
                cache_dir=self._settings.weights_dir,
                max_loras=self._settings.max_loras_per_pipeline,
                max_lora_bytes=self._settings.max_lora_bytes_per_pipeline,
                metrics=self._metrics,
                host_loras=self._host_loras,
                pipelines_per_replica=self._settings.max_pipelines_per_replica,
                label=redact_url(ref.model_name),
                unet=str(unet) if unet is not None else None,
                unet_label=redact_url(ref.unet_name) or None,
                variant=variant,
                compile_mode=self._compile_mode,
                compile_sizes=self._compile_sizes,
                compile_regional=self._compile_regional,
                make_room=lambda family, weights: self._evicted(self._residency.make_room(family, weights)),
                flux_single_file_config=self._settings.flux_single_file_config,
            )
            self._evicted(self._residency.admit(key, loaded))
            self._hot[key] = loaded
            return loaded

    def _evicted(self, keys: list[str]) -> None:
        for key in keys:
            log.info("base model unloaded to keep the FLUX memory plan", extra={"model_key": key})

    async def Generate(
        self, request: worker_pb2.GenerateRequest, grpc_context: RayServegRPCContext | None = None
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """`_generate` in a span that continues the gateway's (the trace context is in the call's metadata)."""
        with tracing.span(
            "worker.generate",
            parent=tracing.incoming_context(None if grpc_context is None else grpc_context.invocation_metadata()),
            kind=tracing.SpanKind.SERVER,
            attributes={"loraserve.request_id": request.request_id},
        ):
            async for event in self._generate(request, grpc_context):
                yield event

    async def _generate(
        self, request: worker_pb2.GenerateRequest, grpc_context: RayServegRPCContext | None
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        self._admit(grpc_context)
        prepare = self._prepare_flux if request.HasField("flux_input") else self._prepare_sd
        async for event in self._serve(request, prepare):
            yield event

    async def _serve(
        self, request: worker_pb2.GenerateRequest, prepare: Prepare
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """What every request shares once `prepare` has checked it and held its pipeline: generation under
        the lock (stopped when a newer call supersedes it), its outputs stored, the outcome counted."""
        holding = contextlib.ExitStack()
        stop = self._supersede(request.request_id)
        try:
            jobs: list[_Job] = []
            async for event in prepare(request, holding, jobs):
                yield event
            job = jobs[-1]
            params = job.params
            yield _log(
                f"generating {params.num_images} image(s) {params.width}x{params.height},"
                f" {params.num_inference_steps} steps, seed {params.seed}, {len(params.loras)} LoRA(s)"
            )
            gen_started = time.perf_counter()
            generated: list[GenerationResult] = []
            async with self._generation_lock:
                _stop_if_superseded(stop)
                try:
                    async for event in self._in_thread(job.run, generated, stop):
                        yield event
                except GenerationCancelled:
                    _stop_if_superseded(stop)
                    raise
            _stop_if_superseded(stop)
            result = generated[0]
            inference_seconds = time.perf_counter() - gen_started
            self._metrics.generation_seconds.observe(inference_seconds)
            output = await asyncio.to_thread(
                self._store_outputs,
                request.request_id,
                result,
                job.image_format,
                inline=job.inline,
                tenant=request.tenant,
            )
            # Counted once the outputs are stored: a failed write is counted as a failure only.
            self._metrics.requests.labels(outcome="completed").inc()
            output.seed = request.seed
            yield _log(f"done: {len(result.images)} image(s) in {inference_seconds:.2f}s")
            yield worker_pb2.GenerateResponse(
                result=worker_pb2.WorkerResult(
                    output=output, inference_seconds=inference_seconds, model_load_seconds=job.load_seconds
                )
            )
        except asyncio.CancelledError:
            self._metrics.requests.labels(outcome="cancelled").inc()
            log.info("request cancelled by the gateway", extra={"request_id": request.request_id})
            raise
        except Exception as exc:
            failure = _failure(exc, request.request_id)
            self._metrics.requests.labels(outcome=failure.failure.type.lower()).inc()
            yield failure
        finally:
            holding.close()
            if self._calls.get(request.request_id) is stop:
                del self._calls[request.request_id]

    async def _prepare_sd(
        self, request: worker_pb2.GenerateRequest, holding: contextlib.ExitStack, out: list[_Job]
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """A Stable Diffusion request (fal-ai/lora): checked, its pipeline held, its inputs fetched."""
        started = time.perf_counter()
        inp = request.input
        await self._check_input(inp, request.tenant)
        # The pipeline is the one the request's own input names: the routing key is not trusted for that.
        ref = BaseModelRef.normalised(inp.model_name, inp.unet_name, inp.variant)
        held: list[tuple[LoadedPipeline, float]] = []
        async for event in self._hold_base(ref, holding, started, held):
            yield event
        loaded, load_seconds = held[-1]
        params = params_from_input(inp, request.seed)
        resolved: list[None] = []
        async for event in self._in_thread(lambda emit, _stop: self._resolve_inputs(inp, params, emit), resolved):
            yield event
        if inp.sync_mode:
            # Before any work: an image-to-image output's size is known only now, from its start image.
            check_inline_size(
                [(params.width, params.height)] * params.num_images,
                self._settings.max_sync_mode_pixels,
                per_pass_latents=params.debug_per_pass_latents,
            )
        safety_checker = await self._safety_checker() if params.enable_safety_checker else None
        previews = Previews(
            loaded.pipe.vae,
            loaded.family,
            interval_seconds=self._settings.preview_interval_seconds,
            max_side=self._settings.preview_max_side,
        )
        run = lambda emit, stop: generate_result(  # noqa: E731
            loaded,
            params,
            on_step=throttled(lambda i, n: emit(_progress(i, n, previews.take(i, n)))),
            should_stop=stop.is_set,
            safety_checker=safety_checker,
            on_latents=previews.offer,
        )
        out.append(_Job(params, run, schema.image_format(inp), inp.sync_mode, load_seconds))

    async def _prepare_flux(
        self, request: worker_pb2.GenerateRequest, holding: contextlib.ExitStack, out: list[_Job]
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """A fal-ai/flux-lora request: on the operator's FLUX base (setting `flux_model`), with the same
        loading, weights cache, LoRA tiers, outputs and failures as an SD request (serving/flux_generation.py)."""
        started = time.perf_counter()
        inp = request.flux_input
        validate_flux_input(inp, self._settings.request_limits)
        await asyncio.to_thread(check_stored_inputs, inp, request.tenant, self._store, "flux_input")
        held: list[tuple[LoadedPipeline, float]] = []
        async for event in self._hold_base(self._flux_ref, holding, started, held):
            yield event
        loaded, load_seconds = held[-1]
        params = flux_generation.flux_params(inp, request.seed)

        def resolve(emit: Emit, _stop: threading.Event) -> None:
            with input_deadline(self._settings.input_resolution_timeout_seconds):
                params.loras = self._resolve_loras(inp, emit, "flux_input")
                flux_generation.resolve_start_image(params, image_policy=self._image_policy, store=self._store)

        resolved: list[None] = []
        async for event in self._in_thread(resolve, resolved):
            yield event
        assert params.width is not None and params.height is not None
        if inp.sync_mode:
            sizes = [(params.width, params.height)] * params.num_images
            check_inline_size(sizes, self._settings.max_sync_mode_pixels, per_pass_latents=False)
        safety_checker = await self._safety_checker() if params.enable_safety_checker else None
        run = lambda emit, stop: flux_generation.generate_flux(  # noqa: E731
            loaded,
            params,
            on_step=throttled(lambda i, n: emit(_progress(i, n))),
            should_stop=stop.is_set,
            safety_checker=safety_checker,
        )
        out.append(_Job(params, run, params.output_format, inp.sync_mode, load_seconds))

    async def _hold_base(
        self,
        ref: BaseModelRef,
        holding: contextlib.ExitStack,
        started: float,
        out: list[tuple[LoadedPipeline, float]],
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """The request's base model held (`_hold`), counted as a pipeline cache hit or miss and logged;
        `out` gets the pipeline and the seconds since the request `started`."""
        loads_before = self._pipeline_loads
        pipelines: list[EvictablePipeline] = []
        async for event in self._hold(ref, holding, pipelines):
            yield event
        loaded = pipelines[-1].loaded
        load_seconds = time.perf_counter() - started
        hot = self._pipeline_loads == loads_before
        (self._metrics.cache_hits if hot else self._metrics.cache_misses).labels(tier="pipeline").inc()
        if not hot:
            yield _log(f"loaded base model {redact_url(ref.model_name)} ({loaded.family}) in {load_seconds:.2f}s")
        else:
            yield _log(f"base model {redact_url(ref.model_name)} already loaded on this replica")
        out.append((loaded, load_seconds))

    async def _hold(
        self, ref: BaseModelRef, holding: contextlib.ExitStack, out: list[EvictablePipeline]
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """The base model's pipeline (hot, or loaded now with its progress relayed) into `out`, held in
        `holding` for the request."""
        for _ in range(PIPELINE_ATTEMPTS):
            self._refs[ref.key] = ref
            async for event in self._loading(ref.key, out):
                yield event
            try:
                # Taken on the event loop right after the lookup: an eviction from now on
                # waits for this request to end before it frees the weights.
                holding.enter_context(out[-1].loaded.in_use())
                return
            except PipelineReleased:
                yield _log("base model was unloaded from this replica just now; loading it again")
        raise ModelLoadError(f"model {redact_url(ref.model_name)!r} kept being unloaded from this replica; retry later")

    def _supersede(self, request_id: str) -> threading.Event:
        """A new call of a request stops the call of it still running here, at its next denoising step.

        The gateway calls a request once at a time, so an older call still running has lost its caller:
        its Serve proxy died, and Serve does not cancel a replica's call when the proxy is gone (it does
        when a live proxy's client hangs up). Left running it would hold the replica and write the
        outputs a second time.
        """
        older = self._calls.get(request_id)
        if older is not None:
            # Worth an operator's eye: it follows a Serve proxy's death (the older call ran on unobserved till now).
            log.warning(
                "a newer call of the request stops the one whose caller is gone", extra={"request_id": request_id}
            )
            older.set()
        stop = threading.Event()
        self._calls[request_id] = stop
        return stop

    async def _check_input(self, inp: types_pb2.GenerateInput, tenant: str) -> None:
        """Before anything loads: the request model's validation, as the gateway ran it (a call may not have come
        through it), and stored files only of the request's tenant (another tenant's file fails as a missing one
        does)."""
        validate_input(inp, self._settings.request_limits)
        await asyncio.to_thread(check_stored_inputs, inp, tenant, self._store)

    def _admit(self, grpc_context: RayServegRPCContext | None) -> None:
        """Refuses a call through Serve's gRPC ingress without the gateway's secret (PERMISSION_DENIED).

        Serve passes `grpc_context` to calls that came through its gRPC proxy only; a call
        without one came from inside the Ray cluster, which is trusted.
        """
        if grpc_context is None:
            return
        if not secret_matches(self._settings.worker_shared_secret, caller_secret(grpc_context.invocation_metadata())):
            message = "calls to the workers must come from the loraserve gateway (worker secret missing or wrong)"
            grpc_context.set_code(grpc.StatusCode.PERMISSION_DENIED)
            grpc_context.set_details(message)
            raise PermissionError(message)

    async def _safety_checker(self) -> SafetyChecker | None:
        """Loaded once per replica on first use; None when the operator configured none."""
        if self._settings.safety_checker_path and self._checker is None:
            self._checker = await asyncio.to_thread(
                load_safety_checker, self._settings.safety_checker_path, device=self._device, torch_dtype=self._dtype
            )
        return self._checker

    async def _loading(self, key: str, out: list[EvictablePipeline]) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """Gets the pipeline (hot or loaded now), relaying download progress to the request."""
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str] = asyncio.Queue()

        def listen(line: str) -> None:
            loop.call_soon_threadsafe(lines.put_nowait, line)

        self._load_listeners[key] = listen
        task = asyncio.ensure_future(self._pipeline(key))
        try:
            while not task.done():
                next_line = asyncio.ensure_future(lines.get())
                await asyncio.wait({task, next_line}, return_when=asyncio.FIRST_COMPLETED)
                if next_line.done():
                    yield _log(next_line.result())
                else:
                    next_line.cancel()
            while not lines.empty():
                yield _log(lines.get_nowait())
            out.append(task.result())
        finally:
            self._load_listeners.pop(key, None)

    async def _pipeline(self, key: str) -> EvictablePipeline:
        """Serve's holder of the base; loaded again when the FLUX plan evicted it while Serve kept the holder."""
        holder: EvictablePipeline = await self._pipelines(key)
        if holder.loaded.released:
            async with self._load_lock:
                if holder.loaded.released:
                    holder.loaded = await asyncio.to_thread(self._load, key)
        self._residency.touch(key)
        return holder

    @tracing.traced("worker.resolve_inputs")
    def _resolve_inputs(self, inp: types_pb2.GenerateInput, params: GenerationParams, emit: Emit) -> None:
        """Every file the request names becomes a checked local file or image before the pipeline is touched,
        all within one deadline."""
        with input_deadline(self._settings.input_resolution_timeout_seconds):
            params.loras = self._resolve_loras(inp, emit)
            params.embeddings = self._resolve_embeddings(inp, emit)
            if params.conditioning is not None:
                self._resolve_conditioning(params.conditioning, emit)
            # image-to-image / inpaint: the start image (and mask) sets the request's width and height.
            image_to_image.resolve_start_image(params, image_policy=self._image_policy, store=self._store)

    def _resolve_conditioning(self, cond: conditioning.Conditioning, emit: Emit) -> None:
        """ControlNet / IP-Adapter / IC-Light weights through the weights cache, their images through the fetcher."""
        conditioning.resolve_conditioning(
            cond,
            weights=self._weights,
            image_policy=self._image_policy,
            store=self._store,
            on_progress=lambda m: emit(_log(m)),
        )

    async def Prefetch(
        self, request: worker_pb2.PrefetchRequest, grpc_context: RayServegRPCContext | None = None
    ) -> worker_pb2.PrefetchResponse:
        """While a request waits in the gateway's queue, its LoRAs and embeddings are downloaded and parsed.

        Into host RAM, and, when its base model is hot on this replica, its LoRAs onto the device as
        well (while the running request denoises; within the device tier's byte budget). Failures
        are left for the request itself to report.
        """
        self._admit(grpc_context)
        inp = request.input
        key = BaseModelRef.normalised(inp.model_name, inp.unet_name, inp.variant).key
        try:
            if request.HasField("flux_input"):
                flux_input = request.flux_input
                validate_flux_input(flux_input, self._settings.request_limits)
                await asyncio.to_thread(check_stored_inputs, flux_input, request.tenant, self._store, "flux_input")
                resolved = await asyncio.to_thread(self._prefetch_flux_loras, flux_input)
                return worker_pb2.PrefetchResponse(adapters_ready=resolved)
            await self._check_input(inp, request.tenant)
            resolved = await asyncio.to_thread(self._prefetch_adapters, request.input, key)
        except (InvalidInput, InputFetchError, AdapterLoadError, LoraFileError, EmbeddingLoadError) as exc:
            log.info("prefetch skipped", extra={"request_id": request.request_id, "reason": str(exc)})
            return worker_pb2.PrefetchResponse()
        return worker_pb2.PrefetchResponse(adapters_ready=resolved)

    def _prefetch_adapters(self, inp: types_pb2.GenerateInput, key: str) -> int:
        """Into the node's weights cache on disk, parsed into this replica's host-RAM tier, then resident.

        Paths are resolved and spelled as Generate spells them, so the request finds the entries.
        """
        loras = self._resolve_loras(inp, lambda _event: None)
        embeddings = self._resolve_embeddings(inp, lambda _event: None)
        for path, _scale in loras:
            self._host_loras.get(lora_file(path))
        for path, _tokens in embeddings:
            self._host_loras.get_embedding(Path(path))
        hot = self._hot.get(key)
        if hot is not None and loras:
            hot.prefetch_loras([path for path, _scale in loras])
        return len(loras) + len(embeddings)

    def _prefetch_flux_loras(self, inp: flux_pb2.FluxInput) -> int:
        """A FLUX request's LoRAs, as `_prefetch_adapters` does an SD request's (FLUX takes no embeddings)."""
        loras = self._resolve_loras(inp, lambda _event: None, "flux_input")
        for path, _scale in loras:
            self._host_loras.get(lora_file(path))
        hot = self._hot.get(self._flux_ref.key)
        if hot is not None and loras:
            hot.prefetch_loras([path for path, _scale in loras])
        return len(loras)

    def _resolve_loras(
        self, inp: types_pb2.GenerateInput | flux_pb2.FluxInput, emit: Emit, prefix: str = "input"
    ) -> list[tuple[str, float]]:
        """URLs, data URIs and stored files become checked local files in the node's weights cache."""
        return [
            (
                str(
                    self._weights.resolve(lora.path, f"{prefix}.loras[{i}].path", on_progress=lambda m: emit(_log(m)))
                ),
                schema.lora_scale(lora),
            )
            for i, lora in enumerate(inp.loras)
        ]

    def _resolve_embeddings(self, inp: types_pb2.GenerateInput, emit: Emit) -> list[tuple[str, list[str]]]:
        """Like LoRAs: textual-inversion files become checked local files; tokens get fal's default."""
        return [
            (
                str(
                    self._weights.resolve(
                        embedding.path, f"input.embeddings[{i}].path", on_progress=lambda m: emit(_log(m))
                    )
                ),
                schema.embedding_tokens(embedding),
            )
            for i, embedding in enumerate(inp.embeddings)
        ]

    async def _in_thread(
        self, work: ThreadWork[T], out: list[T], stop: threading.Event | None = None
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """Runs blocking work in a thread, relaying the events it emits; its result lands in `out`.

        If the call is cancelled, or `stop` is set from outside, the work is told to stop (generation
        stops at its next step); a cancelled call waits for it, so the pipeline is never used by two
        requests at once.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[worker_pb2.GenerateResponse | None] = asyncio.Queue()
        stop = stop if stop is not None else threading.Event()

        def emit(event: worker_pb2.GenerateResponse | None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def run() -> T:
            try:
                return work(emit, stop)
            finally:
                emit(None)

        task = asyncio.ensure_future(asyncio.to_thread(run))
        try:
            while (event := await events.get()) is not None:
                yield event
            out.append(await task)
        except (asyncio.CancelledError, GeneratorExit):
            stop.set()
            await asyncio.shield(_settle(task))
            raise

    @tracing.traced("worker.write_outputs")
    def _store_outputs(
        self,
        request_id: str,
        result: GenerationResult,
        image_format: str,
        *,
        inline: bool = False,
        tenant: str = "",
    ) -> types_pb2.GenerateOutput:
        """Into the request's folder under its tenant's; each write is retried on store failures: the
        images exist nowhere else yet.

        `inline` (sync_mode) writes nothing: every file comes back as a data URI with its bytes
        (loraserve/request/sync_mode.py).
        """
        content_type = schema.IMAGE_FORMATS[image_format]
        suffix = ".png" if image_format == "png" else ".jpg"
        policy = from_settings.output_write_policy(self._settings)
        prefix = output_prefix(tenant, request_id)

        def place(data: bytes, file_content_type: str, name: str) -> tuple[str, bytes]:
            """(url, file_data): inline, a data URI and the bytes; else the stored object's URL."""
            if inline:
                return data_uri(data, file_content_type), data
            return put_retrying(self._store, prefix + name, data, file_content_type, policy).url, b""

        output = types_pb2.GenerateOutput()
        for index, image in enumerate(result.images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG" if image_format == "png" else "JPEG", quality=95)
            name = output_name(request_id, f"image-{index}", suffix)
            data = buffer.getvalue()
            url, file_data = place(data, content_type, name)
            output.images.add(
                url=url,
                content_type=content_type,
                file_name=name,
                file_size=len(data),
                width=image.width,
                height=image.height,
                file_data=file_data,
            )
        flags = result.has_nsfw_concepts or [False] * len(result.images)
        output.has_nsfw_concepts.extend(flags)
        for field, debug in (
            ("debug_latents", result.debug_latents),
            ("debug_per_pass_latents", result.debug_per_pass_latents),
        ):
            if debug is not None:
                url, file_data = place(debug.data, debug.content_type, output_name(request_id, field, ".safetensors"))
                getattr(output, field).CopyFrom(
                    types_pb2.File(
                        url=url,
                        content_type=debug.content_type,
                        file_name=debug.file_name,
                        file_size=len(debug.data),
                        file_data=file_data,
                    )
                )
        return output


def _stop_if_superseded(stop: threading.Event) -> None:
    """Fails the call, saying why, once a newer call of its request has stopped it."""
    if stop.is_set():
        raise GenerationCancelled("a newer call of this request started on this replica; this one's caller is gone")


async def _settle(task: asyncio.Future[Any]) -> None:
    try:
        await task
    except BaseException:  # noqa: BLE001 - the cancellation is what the caller asked for
        pass


def _log_line(line: str) -> None:
    log.info(line)


def throttled(
    report: Callable[[int, int], None],
    interval: float = PROGRESS_INTERVAL_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[int, int], None]:
    """`report` for the first step, the last step, and at most once per `interval` seconds between them."""
    last = -float("inf")

    def on_step(step: int, total: int) -> None:
        nonlocal last
        now = clock()
        if step >= total or now - last >= interval:
            last = now
            report(step, total)

    return on_step


def _progress(step: int, total: int, preview_jpeg: bytes = b"") -> worker_pb2.GenerateResponse:
    return worker_pb2.GenerateResponse(
        progress=types_pb2.StepProgress(step=step, total=total, preview_jpeg=preview_jpeg)
    )


def _log(message: str, level: types_pb2.LogLevel = types_pb2.LOG_LEVEL_INFO) -> worker_pb2.GenerateResponse:
    return worker_pb2.GenerateResponse(
        log=types_pb2.LogEntry(message=message, level=level, source="worker", timestamp=time.time())
    )


def _failure(exc: Exception, request_id: str) -> worker_pb2.GenerateResponse:
    error_type = next((t for cls, t in _FAILURES.items() if isinstance(exc, cls)), ErrorType.INTERNAL)
    if error_type == ErrorType.INTERNAL:
        log.error("generation failed", extra={"request_id": request_id, "trace": traceback.format_exc()})
        message = f"internal error in the worker: {type(exc).__name__}: {exc}"
    else:
        message = str(exc)
    message = redact_text(message)
    tracing.failed(message)
    if error_type == ErrorType.OUT_OF_MEMORY and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return worker_pb2.GenerateResponse(
        failure=types_pb2.RequestError(type=error_type, message=message, field=_refused_field(exc))
    )


def _refused_field(exc: Exception) -> str:
    """The input a refusal is about, named as the gateway's BadRequest names fields (`input.loras[0].path`),
    so a caller gets the same field violation (and fal's 422 `loc`) as for a refusal at submit."""
    if isinstance(exc, InputFetchError):
        field = exc.field
    elif isinstance(exc, OptionUnavailableError):
        field = exc.field_name
    elif isinstance(exc, InvalidInput) and exc.violations:
        field = exc.violations[0].field
    else:
        return ""
    return field if field.startswith("input.") else f"input.{field}"


def build_app(settings: Settings) -> Any:
    """The Serve application; its options come from serving.serve_config, which the chart's config shares."""
    deployment: Callable[..., Any] = serve.deployment(name=DEPLOYMENT_NAME, **deployment_options(settings))(Worker)
    return deployment.bind(settings)  # type: ignore[attr-defined]
