"""Loading diffusers pipelines and generating images with resident LoRAs.

This is the torch/diffusers core that the Ray Serve replicas wrap. It knows nothing about Ray
or gRPC so it can be tested and reasoned about on its own. Weights are untrusted input: only
safetensors are ever deserialised, and every failure surfaces as one of the typed errors below
with a message a caller can act on, never as a stack trace.

Per-request options never touch the resident pipeline: each request runs on a shallow copy
(`_prepare`) that shares the modules but has its own scheduler (serving/schedulers.py) and, for
images larger than a tile, tiling wrappers around the U-Net and VAE (serving/tiling.py); prompt
weighting and clip_skip are computed into embeddings (serving/prompts.py). ControlNets compose a
ControlNet pipeline on the same modules; IP-Adapters and IC-Light change the shared U-Net for the
request only (serving/conditioning.py); textual-inversion tokens are added to the shared
tokenizers and text encoders for the request only (serving/embeddings.py). Every change to shared
modules (LoRA activation included) is undone in a `finally`.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import PIL.Image
import safetensors
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA
from peft.tuners.lora.layer import LoraLayer

from loraserve import schema
from serving import embeddings as textual_inversion
from serving import latents as debug_files
from serving import lora_merge, prompts, schedulers, tiling, unets
from serving.latents import OutputFile
from serving.lora_cache import (
    HostLoraCache,
    LoraFileError,
    ParsedLora,
    adapter_name,
    parse_embedding_file,
    parse_lora_file,
)
from serving.memory import return_freed_memory
from serving.metrics import WorkerMetrics

if TYPE_CHECKING:
    from serving.conditioning import Conditioning
    from serving.safety import SafetyChecker

# The adapter-cache tier of LoRAs loaded in a pipeline (on its device), as metrics name it.
GPU_TIER = "gpu"
PICKLE_SUFFIXES = frozenset({".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle"})
LORA_FOLDER_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Keys only an SDXL original-layout checkpoint has (its second, OpenCLIP text encoder).
SDXL_SINGLE_FILE_KEY_PREFIX = "conditioner.embedders.1"
MAX_REASON_CHARS = 400


class ModelLoadError(Exception):
    """A base model could not be loaded; the message names the model and the reason."""


class AdapterLoadError(Exception):
    """A LoRA could not be loaded; the message names the file and the reason."""


class PipelineReleased(ModelLoadError):
    """The pipeline was evicted and its memory freed before this request could use it; load it again."""


class GenerationCancelled(Exception):
    """The caller asked to stop mid-denoise; no partial images are returned."""


class OptionUnavailableError(Exception):
    """A request option this worker or this model cannot honour; `field_name` names the input field.

    Raised before any denoising, e.g. `enable_safety_checker` with no checker configured, or
    custom `timesteps` / `eta` that the model's own scheduler would reject or ignore.
    """

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field_name = field_name


@dataclass(kw_only=True)
class GenerationParams:
    """One text-to-image request, already validated by the caller; keyword-only so fields can't swap.

    Every option after `loras` defaults to "off" / the fal default, so older callers keep working.
    """

    prompt: str
    negative_prompt: str = ""
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    num_images: int
    seed: int
    loras: list[tuple[str, float]] = field(default_factory=list)
    # Textual inversions: (local .safetensors path, tokens naming its vectors); see serving/embeddings.py.
    embeddings: list[tuple[str, list[str]]] = field(default_factory=list)
    # One of loraserve.schema.SCHEDULERS; None keeps the model's own scheduler class.
    scheduler: str | None = None
    # Custom schedules (method "array"); at most one. They override num_inference_steps.
    timesteps: list[int] | None = None
    sigmas: list[float] | None = None
    # "epsilon" / "v_prediction"; None keeps the model's scheduler config.
    prediction_type: str | None = None
    rescale_betas_snr_zero: bool = False
    eta: float = 0.0
    # fal's N (skip the last N CLIP layers) is diffusers' clip_skip=N; 0 means none.
    clip_skip: int = 0
    prompt_weighting: bool = False
    # Pixels; images larger than a tile are denoised in overlapping tiles. A stride wider than the
    # tile is clamped to it; params_from_input defaults an unset stride to half the tile.
    tile_width: int = schema.DEFAULT_TILE_SIZE
    tile_height: int = schema.DEFAULT_TILE_SIZE
    tile_stride_width: int = schema.DEFAULT_TILE_STRIDE
    tile_stride_height: int = schema.DEFAULT_TILE_STRIDE
    enable_safety_checker: bool = False
    debug_latents: bool = False
    debug_per_pass_latents: bool = False
    # ControlNets, IP-Adapters, IC-Light (serving/conditioning.py); None: none of them.
    conditioning: Conditioning | None = None


@dataclass
class GenerationResult:
    images: list[PIL.Image.Image]
    # One flag per image when the safety checker ran; None when the request did not ask for it.
    has_nsfw_concepts: list[bool] | None = None
    debug_latents: OutputFile | None = None
    debug_per_pass_latents: OutputFile | None = None


class LoadedPipeline:
    """A hot pipeline plus the LoRAs kept resident on it, so switching LoRAs costs next to nothing."""

    def __init__(
        self,
        pipe: DiffusionPipeline,
        *,
        family: str,
        model_name: str,
        max_loras: int = 16,
        max_lora_bytes: int = 0,
        metrics: WorkerMetrics | None = None,
        host_loras: HostLoraCache | None = None,
    ) -> None:
        if max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {max_loras}")
        self.pipe = pipe
        self.family = family
        self.model_name = model_name
        self.max_loras = max_loras
        # Bytes of LoRA weights kept resident on this pipeline's device; 0: only the count bounds it.
        self.max_lora_bytes = max_lora_bytes
        self._metrics = metrics
        # The replica's host-RAM tier of LoRAs and embeddings, shared by its pipelines; None: files
        # are parsed on every load.
        self._host_loras = host_loras
        # adapter name → source path, least recently used first
        self._resident: OrderedDict[str, Path] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._slots: list[lora_merge.LoraSlot] | None = None
        # Whether merged copies / base layers stand in for the wrappers (between activate and deactivate).
        self._merged = False
        self._embeddings = textual_inversion.LoadedEmbeddings()
        # Requests running on this pipeline; an eviction while one runs frees the memory when it ends.
        self._users = 0
        self._released = False
        self._freed = False
        self._state_lock = threading.Lock()

    @property
    def resident_loras(self) -> list[Path]:
        """Exposed so callers can report cache contents (and tests can check eviction)."""
        return list(self._resident.values())

    def activate_loras(self, loras: Sequence[tuple[str, float]]) -> None:
        """Make exactly these LoRAs (at these scales) active; an empty list gives the plain model.

        Until `deactivate_loras`, the models run with the LoRAs merged into copies of the weights
        they touch and with no PEFT wrapper in the forward pass (serving/lora_merge.py).
        """
        self.deactivate_loras()
        if not loras:
            lora_merge.swap_in_merged(self._lora_slots(), {})
            self._merged = True
            return
        files = [lora_file(path) for path, _ in loras]
        names = [adapter_name(file) for file in files]
        for file, name in zip(files, names):
            self._ensure_resident(file, name, protected=set(names))
        scales: dict[str, float] = {}
        for name, (_, scale) in zip(names, loras):
            # The same LoRA twice adds up: a LoRA's effect is linear in its scale.
            scales[name] = scales.get(name, 0.0) + scale
        active = list(scales)
        for layer in self._lora_layers():
            # What diffusers' enable_lora + set_adapters do, minus PEFT's requires_grad sweep over
            # every resident adapter's parameters: that sweep made each switch cost grow with the
            # number of resident adapters (47 ms with 20 on a tiny model), for nothing at inference.
            layer._disable_adapters = False
            layer._active_adapter = active
            for name, scale in scales.items():
                layer.set_scale(name, scale)
        lora_merge.swap_in_merged(self._lora_slots(), scales)
        self._merged = True

    def deactivate_loras(self) -> None:
        """Back to the wrapped layers PEFT manages, adapters resident but off: output equals the plain model.

        Loading and evicting adapters only ever happen in this state.
        """
        if self._merged:
            lora_merge.restore_wrappers(self._lora_slots())
            self._merged = False
        for layer in self._lora_layers():
            layer._disable_adapters = True

    def _lora_slots(self) -> list[lora_merge.LoraSlot]:
        """Every LoRA-wrapped layer of the U-Net and text encoders; recomputed after loads and evictions."""
        if self._slots is None:
            self._slots = [slot for model in _lora_models(self.pipe) for slot in lora_merge.lora_slots(model)]
        return self._slots

    def _lora_layers(self) -> list[LoraLayer]:
        return [slot.layer for slot in self._lora_slots()]

    def load_embeddings(self, embeddings: Sequence[tuple[str, Sequence[str]]]) -> None:
        """Add this request's textual-inversion tokens; `unload_embeddings` takes them out again."""
        self.unload_embeddings()
        try:
            self._embeddings = textual_inversion.load(
                self.pipe, embeddings, model_label=self.model_name, read=self._embedding_tensors
            )
        except textual_inversion.EmbeddingLoadError as exc:
            raise AdapterLoadError(str(exc)) from exc

    def _embedding_tensors(self, path: Path) -> dict[str, torch.Tensor]:
        """From the host-RAM tier when there is one, as for LoRAs: a file is read once, not per request."""
        parsed = self._host_loras.get_embedding(path) if self._host_loras is not None else parse_embedding_file(path)
        return parsed.tensors

    def unload_embeddings(self) -> None:
        textual_inversion.unload(self.pipe, self._embeddings)

    @property
    def resident_lora_bytes(self) -> int:
        return sum(self._sizes.values())

    def _ensure_resident(self, path: Path, name: str, protected: set[str]) -> None:
        if name in self._resident:
            self._resident.move_to_end(name)
            self._count("cache_hits")
            return
        self._count("cache_misses")
        self._evict_for_one_more(protected)
        self._slots = None
        started = time.perf_counter()
        self._load_adapter(path, name)
        self._resident[name] = path
        self._sizes[name] = self._adapter_bytes(name)
        self._track_bytes(self._sizes[name])
        if self._metrics is not None:
            self._metrics.adapter_load_seconds.observe(time.perf_counter() - started)
        self._evict_over_budget(protected)

    def _adapter_bytes(self, name: str) -> int:
        return sum(
            p.numel() * p.element_size()
            for layer in self._lora_layers()
            for weights in (layer.lora_A, layer.lora_B)
            if name in weights
            for p in weights[name].parameters()
        )

    def _evict_over_budget(self, protected: set[str]) -> None:
        """The byte budget; like the count, it never evicts an adapter the current request uses."""
        if not self.max_lora_bytes:
            return
        for victim in [name for name in self._resident if name not in protected]:
            if self.resident_lora_bytes <= self.max_lora_bytes:
                return
            self._evict(victim)

    def _evict(self, name: str) -> None:
        self.pipe.delete_adapters(name)
        del self._resident[name]
        self._track_bytes(-self._sizes.pop(name, 0))
        self._slots = None
        self._count("cache_evictions")

    def _count(self, counter: str) -> None:
        if self._metrics is not None:
            getattr(self._metrics, counter).labels(tier=GPU_TIER).inc()

    def _track_bytes(self, delta: int) -> None:
        if self._metrics is not None:
            self._metrics.cache_bytes.labels(tier=GPU_TIER).inc(delta)

    @contextmanager
    def in_use(self) -> Iterator[None]:
        """Held by each request for its whole run, so that an eviction never frees weights under it."""
        with self._state_lock:
            if self._freed:
                raise PipelineReleased(f"model {self.model_name!r} was unloaded from this replica")
            self._users += 1
        try:
            yield
        finally:
            with self._state_lock:
                self._users -= 1
                free_now = self._released and not self._users
            if free_now:
                self._free()

    def release(self) -> None:
        """Gives the pipeline's memory back now, or when its last running request ends.

        Dropping references is not enough: request views, the conditioning cache and reference
        cycles inside diffusers can keep modules alive, so the weights themselves are replaced by
        storage-less meta tensors, and the allocator is asked to hand the freed memory back.
        """
        with self._state_lock:
            if self._released:
                return
            self._released = True
            free_now = not self._users
        if free_now:
            self._free()

    def _free(self) -> None:
        with self._state_lock:
            if self._freed:
                return
            self._freed = True
        self._track_bytes(-self.resident_lora_bytes)
        self._resident.clear()
        self._sizes.clear()
        self._slots = None
        for component in self.pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.to("meta")
        return_freed_memory()


    def _evict_for_one_more(self, protected: set[str]) -> None:
        """Free one slot if full; adapters the current request uses are never evicted."""
        evictable = [name for name in self._resident if name not in protected]
        while len(self._resident) >= self.max_loras and evictable:
            self._evict(evictable.pop(0))

    def _parsed(self, path: Path) -> ParsedLora:
        """From the host-RAM tier when there is one; the file is read at most once per replica."""
        try:
            return self._host_loras.get(path) if self._host_loras is not None else parse_lora_file(path)
        except LoraFileError as exc:
            raise AdapterLoadError(f"LoRA {str(path)!r}: {exc}") from exc

    def _load_adapter(self, path: Path, name: str) -> None:
        """diffusers/PEFT and kohya/A1111 files alike; a LoRA only part of which fits is refused whole."""
        parsed = self._parsed(path)
        file_layers = parsed.layer_count
        try:
            # The wrappers after the load, found without walking every resident adapter's modules.
            self._slots = load_parsed_lora(self.pipe, parsed, sdxl=self.family == "sdxl")
        except Exception as exc:
            self._slots = None
            self._discard_partial_adapter(name)
            raise AdapterLoadError(
                f"LoRA {str(path)!r} does not fit model {self.model_name!r} ({self.family}); is it a LoRA for "
                f"another model family? {_reason(exc)}"
            ) from exc
        if not self._adapter_present(name):
            raise AdapterLoadError(
                f"LoRA {str(path)!r} has no weights for any part of model {self.model_name!r} "
                f"({self.family}); is it a LoRA for another model family?"
            )
        loaded_layers = self._adapter_layer_count(name)
        if loaded_layers < file_layers:
            # e.g. an SDXL LoRA on SD 1.5: its first text encoder fits, the rest is skipped silently.
            self._discard_partial_adapter(name)
            raise AdapterLoadError(
                f"LoRA {str(path)!r} does not fit model {self.model_name!r} ({self.family}): only {loaded_layers} "
                f"of its {file_layers} layers match a layer of the model; is it a LoRA for another model family?"
            )

    def _adapter_layer_count(self, name: str) -> int:
        """Layers of the U-Net and text encoders that hold adapter `name`."""
        return sum(1 for layer in self._lora_layers() if name in layer.lora_A)

    def _discard_partial_adapter(self, name: str) -> None:
        """A failed load can leave the adapter in some components; remove it so later requests work."""
        if self._adapter_present(name):
            self.pipe.delete_adapters(name)
            self._slots = None

    def _adapter_present(self, name: str) -> bool:
        return any(name in names for names in self.pipe.get_list_adapters().values())


def load_pipeline(
    model_name: str,
    *,
    device: str = "cpu",
    torch_dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
    max_loras: int = 16,
    max_lora_bytes: int = 0,
    metrics: WorkerMetrics | None = None,
    host_loras: HostLoraCache | None = None,
    label: str | None = None,
    unet: str | None = None,
    unet_label: str | None = None,
    variant: str | None = None,
) -> LoadedPipeline:
    """Load a base model from a folder, a .safetensors file, or a Hugging Face repo id.

    URLs and uploads are turned into local files by `storage.weights.WeightsCache` first;
    `label` is what the caller asked for (e.g. that URL), named in errors instead of the file.
    `unet` (a local U-Net folder or .safetensors file, `unet_label` in errors) replaces the
    model's U-Net (serving/unets.py); `variant` (e.g. "fp16") picks `*.{variant}.safetensors`
    files in diffusers folders.
    """
    label = label or model_name
    variant = variant or None
    pipe = _load_diffusers_pipeline(model_name, label, torch_dtype, cache_dir, variant)
    family = _detect_family(pipe, label)
    if unet:
        try:
            custom = unets.load_unet(
                Path(unet),
                unet_label or unet,
                base=pipe.unet,
                model_label=label,
                variant=variant,
                torch_dtype=torch_dtype,
            )
        except unets.UNetLoadError as exc:
            raise ModelLoadError(str(exc)) from exc
        pipe.register_modules(unet=custom)
    try:
        pipe.to(device)
    except Exception as exc:
        raise ModelLoadError(f"could not move model {label!r} to device {device!r}: {_reason(exc)}") from exc
    pipe.set_progress_bar_config(disable=True)
    return LoadedPipeline(
        pipe,
        family=family,
        model_name=label,
        max_loras=max_loras,
        max_lora_bytes=max_lora_bytes,
        metrics=metrics,
        host_loras=host_loras,
    )


def generate(
    loaded: LoadedPipeline,
    params: GenerationParams,
    *,
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    safety_checker: SafetyChecker | None = None,
) -> list[PIL.Image.Image]:
    """Run one request and return only its images (see generate_result for the other outputs)."""
    return generate_result(
        loaded, params, on_step=on_step, should_stop=should_stop, safety_checker=safety_checker
    ).images


def generate_result(
    loaded: LoadedPipeline,
    params: GenerationParams,
    *,
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    safety_checker: SafetyChecker | None = None,
) -> GenerationResult:
    """Run one request; the pipeline is left with no LoRA active and no embedding loaded whatever happens.

    Scheduler, tiling wrappers and prompt embeddings live in a per-request view of the pipeline,
    so nothing but the LoRA activation touches the resident pipeline.
    """
    if params.enable_safety_checker and safety_checker is None:
        raise OptionUnavailableError(
            "enable_safety_checker",
            "enable_safety_checker: this server has no safety checker model configured, so images cannot be "
            "checked; leave enable_safety_checker off or ask the operator to configure one",
        )
    with loaded.in_use():
        view, call_kwargs = _prepare(loaded.pipe, params)
        try:
            loaded.activate_loras(params.loras)
            loaded.load_embeddings(params.embeddings)
            # Imported here: serving.conditioning imports this module's errors.
            from serving.conditioning import applied

            with applied(loaded, view, params, call_kwargs) as (view, call_kwargs):
                result = _denoise(view, params, call_kwargs, on_step, should_stop)
        finally:
            loaded.unload_embeddings()
            loaded.deactivate_loras()
    if params.enable_safety_checker:
        assert safety_checker is not None
        result.images, result.has_nsfw_concepts = safety_checker.censor(result.images)
    return result


def _prepare(pipe: DiffusionPipeline, params: GenerationParams) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """A shallow per-request copy of the pipeline (same modules, own scheduler) and the call options."""
    try:
        scheduler = schedulers.build_scheduler(
            pipe.scheduler,
            params.scheduler,
            prediction_type=params.prediction_type,
            rescale_betas_snr_zero=params.rescale_betas_snr_zero,
            num_inference_steps=params.num_inference_steps,
        )
        schedulers.check_request_options(
            scheduler,
            timesteps=params.timesteps,
            sigmas=params.sigmas,
            eta=params.eta,
            rescale_betas_snr_zero=params.rescale_betas_snr_zero,
        )
    except schedulers.SchedulerOptionError as exc:
        raise OptionUnavailableError(exc.field_name, str(exc)) from exc
    view = copy.copy(pipe)
    # Assign through __dict__: DiffusionPipeline.__setattr__ would rewrite the shared config.
    view.__dict__["scheduler"] = scheduler
    if tiling.needs_tiling(params.width, params.height, params.tile_width, params.tile_height):
        view.__dict__.update(
            tiling.tiled_components(
                pipe.unet,
                pipe.vae,
                vae_scale_factor=pipe.vae_scale_factor,
                tile_width=params.tile_width,
                tile_height=params.tile_height,
                stride_width=params.tile_stride_width,
                stride_height=params.tile_stride_height,
            )
        )
    kwargs: dict[str, Any] = {
        "eta": params.eta,
        "guidance_rescale": schedulers.ZERO_SNR_GUIDANCE_RESCALE if params.rescale_betas_snr_zero else 0.0,
    }
    if params.timesteps is not None:
        kwargs["timesteps"] = list(params.timesteps)
    elif params.sigmas is not None:
        kwargs["sigmas"] = list(params.sigmas)
    elif (trailing := schedulers.trailing_timesteps_if_ignored(scheduler, params.num_inference_steps)) is not None:
        kwargs["timesteps"] = trailing
    else:
        kwargs["num_inference_steps"] = params.num_inference_steps
    return view, kwargs


def _denoise(
    pipe: DiffusionPipeline,
    params: GenerationParams,
    call_kwargs: dict[str, Any],
    on_step: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
) -> GenerationResult:
    cancelled = False
    per_step: list[torch.Tensor] = []
    final: list[torch.Tensor] = []

    def on_step_end(pipeline: DiffusionPipeline, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        nonlocal cancelled
        if params.debug_per_pass_latents:
            per_step.append(tensors["latents"].detach().to("cpu", copy=True))
        if params.debug_latents and step + 1 == pipeline.num_timesteps:
            final.append(tensors["latents"].detach().to("cpu", copy=True))
        if on_step is not None:
            on_step(step + 1, pipeline.num_timesteps)
        if should_stop is not None and should_stop():
            cancelled = True
            pipeline._interrupt = True
        return tensors

    if params.prompt_weighting or params.clip_skip:
        embeddings = prompts.encode_prompts(
            pipe,
            params.prompt,
            params.negative_prompt,
            weighting=params.prompt_weighting,
            clip_skip=params.clip_skip or None,
        )
        prompt_kwargs: dict[str, Any] = embeddings.as_kwargs()
    else:
        # None (not "") lets SDXL use zero negative embeddings, as its config asks for.
        prompt_kwargs = {"prompt": params.prompt, "negative_prompt": params.negative_prompt or None}
    output = pipe(
        **prompt_kwargs,
        **call_kwargs,
        width=params.width,
        height=params.height,
        guidance_scale=params.guidance_scale,
        num_images_per_prompt=params.num_images,
        generator=torch.Generator("cpu").manual_seed(params.seed),
        output_type="pil",
        callback_on_step_end=on_step_end,
    )
    if cancelled:
        raise GenerationCancelled("generation was cancelled before it finished")
    result = GenerationResult(images=list(output.images))
    metadata = debug_files.metadata_for(pipe, params)
    if params.debug_latents and final:
        result.debug_latents = debug_files.final_latents_file(final[0], metadata)
    if params.debug_per_pass_latents and per_step:
        result.debug_per_pass_latents = debug_files.per_pass_latents_file(per_step, metadata)
    return result


def _load_diffusers_pipeline(
    source: str, label: str, torch_dtype: torch.dtype, cache_dir: Path | None, variant: str | None = None
) -> DiffusionPipeline:
    if "://" in source:
        # Fetching is storage.weights' job: it guards URLs (SSRF, sizes) and caches by content.
        raise ModelLoadError(f"model {label!r}: resolve URLs through the weights cache before loading")
    local = Path(source).expanduser()
    if local.exists() or _looks_like_path(source):
        return _load_local(local, label, torch_dtype, variant)
    return _from_pretrained(source, label, torch_dtype, cache_dir, variant)


def _looks_like_path(model_name: str) -> bool:
    """Repo ids are `name` or `org/name`; anything else is meant as a local path that is missing."""
    return (
        model_name.startswith(("/", "./", "../", "~"))
        or model_name.count("/") > 1
        or Path(model_name).suffix.lower() in PICKLE_SUFFIXES | {".safetensors"}
    )


def _load_local(path: Path, model_name: str, torch_dtype: torch.dtype, variant: str | None = None) -> DiffusionPipeline:
    if not path.exists():
        raise ModelLoadError(f"model {model_name!r}: local path does not exist")
    if path.is_file():
        if variant:
            raise ModelLoadError(
                f"model {model_name!r} is a single .safetensors file; variant {variant!r} only applies to "
                "diffusers folders and Hugging Face repos — leave variant unset"
            )
        return _load_single_file(path, model_name, torch_dtype)
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"model {model_name!r}: folder is not a diffusers pipeline (no model_index.json)")
    if variant and not any(path.glob(f"*/*.{variant}.safetensors")):
        raise ModelLoadError(f"model {model_name!r} has no {variant!r} variant: no *.{variant}.safetensors weights")
    return _from_pretrained(str(path), model_name, torch_dtype, cache_dir=None, variant=variant)


def _from_pretrained(
    source: str, model_name: str, torch_dtype: torch.dtype, cache_dir: Path | None, variant: str | None = None
) -> DiffusionPipeline:
    """use_safetensors=True makes diffusers fail rather than unpickle a .bin component.

    With a variant, components that lack that variant's files fall back to their plain
    weights (diffusers' behaviour; _load_local refuses a variant that no component has).
    """
    try:
        return DiffusionPipeline.from_pretrained(
            source,
            use_safetensors=True,
            dtype=torch_dtype,
            cache_dir=cache_dir,
            trust_remote_code=False,
            variant=variant,
        )
    except Exception as exc:
        raise ModelLoadError(f"could not load model {model_name!r}: {_reason(exc)}") from exc


def _load_single_file(path: Path, model_name: str, torch_dtype: torch.dtype) -> DiffusionPipeline:
    _refuse_pickle(path.name, model_name)
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"model {model_name!r}: a single-file model must be a .safetensors file")
    try:
        pipeline_class = _single_file_pipeline_class(path)
        return pipeline_class.from_single_file(str(path), dtype=torch_dtype)
    except Exception as exc:
        raise ModelLoadError(f"could not load single-file model {model_name!r}: {_reason(exc)}") from exc


def _single_file_pipeline_class(path: Path) -> type[DiffusionPipeline]:
    with safetensors.safe_open(str(path), framework="pt") as checkpoint:
        is_sdxl = any(key.startswith(SDXL_SINGLE_FILE_KEY_PREFIX) for key in checkpoint.keys())
    return StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline


def _refuse_pickle(file_name: str, what: str) -> None:
    if Path(file_name).suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"model {what!r}: {Path(file_name).suffix} files are pickle and can run code when loaded; "
            "refused — use a .safetensors file"
        )


def _detect_family(pipe: DiffusionPipeline, model_name: str) -> str:
    """Trust the loaded components, not the name: checkpoints are often named arbitrarily."""
    if isinstance(pipe, StableDiffusionXLPipeline) or getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    if isinstance(pipe, StableDiffusionPipeline):
        return "sd15"
    raise ModelLoadError(
        f"model {model_name!r} is a {type(pipe).__name__}; only Stable Diffusion 1.x/2.x and SDXL are supported"
    )


def lora_file(path: str) -> Path:
    """A LoRA is a .safetensors file, or a folder holding diffusers' standard weight file."""
    candidate = Path(path).expanduser()
    if candidate.is_dir():
        candidate = candidate / LORA_FOLDER_WEIGHT_NAME
        if not candidate.is_file():
            raise AdapterLoadError(f"LoRA {path!r}: folder has no {LORA_FOLDER_WEIGHT_NAME}")
    if not candidate.is_file():
        raise AdapterLoadError(f"LoRA {path!r}: file does not exist")
    if candidate.suffix.lower() != ".safetensors":
        raise AdapterLoadError(f"LoRA {path!r}: only .safetensors LoRAs are accepted (pickle files are refused)")
    return candidate.resolve()


def load_parsed_lora(pipe: DiffusionPipeline, parsed: ParsedLora, *, sdxl: bool) -> list[lora_merge.LoraSlot]:
    """What `load_lora_weights(path)` does, from a state dict already in memory plus its metadata.

    diffusers drops the file's LoRA metadata (`lora_alpha`, rank / alpha patterns) when handed a
    state dict, and the LoRA would then run at the wrong strength (alpha = rank); its per-component
    loaders take the metadata, so this calls them the way `load_lora_weights` does. A contract
    test checks both give the same adapter weights and scales, for PEFT and kohya files.

    The loaders run with the adapters already resident set aside: PEFT walks every module of the
    model several times per load (matching each against every existing wrapper's name, saving
    and loading the whole state dict, sweeping requires_grad), so with the resident adapters'
    layers in the tree a load grew with their number (tiny SDXL, 20 resident: 0.2 s → 0.8 s).
    Each LoRA wrapper is swapped for its base layer, PEFT wraps the base layers afresh for the
    new adapter, and then the new adapter's per-adapter entries (weights, dropout, r, alpha,
    scaling, variant: everything PEFT keys by adapter name, the state its `delete_adapter`
    removes) move into the resident wrapper, which goes back in its place. A wrapper PEFT made
    for a layer no resident adapter touched stays. tests/serving/test_lora_loading.py checks the
    result equals loading into the wrapped model. Returns every LoRA wrapper of the models now.
    """
    components = _lora_models(pipe)
    resident = [lora_merge.lora_slots(component) for component in components]
    for slot in (slot for aside in resident for slot in aside):
        slot.parent._modules[slot.attr] = slot.layer.base_layer
    try:
        _call_lora_loaders(pipe, parsed, sdxl=sdxl)
    finally:
        # Also after a failed load; what PEFT loaded stays out of the resident wrappers then, and
        # the caller deletes the adapter by name from the wrappers PEFT made for other layers.
        loaded = [lora_merge.lora_slots(component) for component in components]
        for slot in (slot for aside in resident for slot in aside):
            slot.parent._modules[slot.attr] = slot.layer
    slots: list[lora_merge.LoraSlot] = []
    for aside, fresh in zip(resident, loaded):
        places = {(id(slot.parent), slot.attr): slot for slot in aside}
        for slot in fresh:
            kept = places.get((id(slot.parent), slot.attr))
            if kept is None:
                slots.append(slot)
            else:
                _move_adapter(slot.layer, kept.layer, parsed.name)
        if fresh:
            for slot in aside:
                # What PEFT's model-wide set_adapter after an injection leaves on every wrapper.
                slot.layer._active_adapter = copy.copy(fresh[0].layer._active_adapter)
        slots.extend(aside)
    return slots


def _lora_models(pipe: DiffusionPipeline) -> list[torch.nn.Module]:
    """The models diffusers loads LoRAs into: the U-Net and the text encoders the pipeline has."""
    models = (getattr(pipe, attr, None) for attr in ("unet", "text_encoder", "text_encoder_2"))
    return [model for model in models if isinstance(model, torch.nn.Module)]


def _move_adapter(source: LoraLayer, target: LoraLayer, name: str) -> None:
    """Adapter `name`'s entries, from a wrapper PEFT just made into the resident one of the same layer."""
    if type(source) is not type(target) or source.base_layer is not target.base_layer:
        raise RuntimeError(f"PEFT wrapped a layer as {type(source).__name__}, its resident wrapper is {type(target).__name__}")
    entries = {**vars(source), **source._modules, **source._parameters}
    for attr, value in entries.items():
        if isinstance(value, (dict, torch.nn.ModuleDict, torch.nn.ParameterDict)) and name in value:
            getattr(target, attr)[name] = value[name]


def _call_lora_loaders(pipe: DiffusionPipeline, parsed: ParsedLora, *, sdxl: bool) -> None:
    state_dict, network_alphas = pipe.lora_state_dict(
        dict(parsed.state_dict), **({"unet_config": pipe.unet.config} if sdxl else {})
    )
    if not all("lora" in key for key in state_dict):
        raise ValueError("Invalid LoRA checkpoint: every parameter name must contain 'lora'")
    common: dict[str, Any] = {
        "network_alphas": network_alphas,
        "adapter_name": parsed.name,
        "metadata": parsed.metadata,
        "_pipeline": pipe,
        "low_cpu_mem_usage": _LOW_CPU_MEM_USAGE_DEFAULT_LORA,
    }
    pipe.load_lora_into_unet(state_dict, unet=pipe.unet, **common)
    for attr in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, attr, None)
        if encoder is not None:
            pipe.load_lora_into_text_encoder(
                state_dict, text_encoder=encoder, prefix=attr, lora_scale=pipe.lora_scale, **common
            )


def _reason(exc: BaseException) -> str:
    """One short line a caller can act on; torch's shape errors put the useful part on line two."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join([f"{type(exc).__name__}:", *lines[:2]])
    if len(text) > MAX_REASON_CHARS:
        text = text[: MAX_REASON_CHARS - 1] + "…"
    return text + (f" (+{len(lines) - 2} more lines)" if len(lines) > 2 else "")
