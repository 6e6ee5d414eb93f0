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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import PIL.Image
import safetensors
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from loraserve import schema
from serving import embeddings as textual_inversion
from serving import latents as debug_files
from serving import lora_tier, prompts, schedulers, tiling, unets
from serving.errors import (
    AdapterLoadError,
    GenerationCancelled,
    ModelLoadError,
    OptionUnavailableError,
    PipelineReleased,
)
from serving.latents import OutputFile
from serving.lora_cache import HostLoraCache, LoraFileError, ParsedLora, parse_embedding_file, parse_lora_file
from serving.lora_tier import GPU_TIER
from serving.memory import return_freed_memory
from serving.metrics import WorkerMetrics

if TYPE_CHECKING:
    from serving.conditioning import Conditioning
    from serving.safety import SafetyChecker

PICKLE_SUFFIXES = frozenset({".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle"})
LORA_FOLDER_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Keys only an SDXL original-layout checkpoint has (its second, OpenCLIP text encoder).
SDXL_SINGLE_FILE_KEY_PREFIX = "conditioner.embedders.1"
MAX_REASON_CHARS = 400


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
    """A hot pipeline plus the LoRAs kept resident on it as low-rank tensors (serving/lora_tier.py)."""

    def __init__(
        self,
        pipe: DiffusionPipeline,
        *,
        family: str,
        model_name: str,
        max_loras: int = 0,
        max_lora_bytes: int = 0,
        metrics: WorkerMetrics | None = None,
        host_loras: HostLoraCache | None = None,
        pipelines_per_replica: int = 1,
    ) -> None:
        if max_loras < 0 or max_lora_bytes < 0:
            raise ValueError(f"max_loras and max_lora_bytes must not be negative, got {max_loras}, {max_lora_bytes}")
        self.pipe = pipe
        self.family = family
        self.model_name = model_name
        self._metrics = metrics
        # The replica's host-RAM tier of LoRAs and embeddings, shared by its pipelines; None: files
        # are parsed on every load.
        self._host_loras = host_loras
        # Bytes of LoRA tensors kept on this pipeline's device; 0: a share of the free device memory
        # split among the replica's pipelines on a GPU, a fixed amount on a CPU
        # (lora_tier.default_budget). max_loras 0: no count bound.
        self._loras = lora_tier.DeviceLoraTier(
            pipe,
            sdxl=family == "sdxl",
            describe=f"model {model_name!r} ({family})",
            max_bytes=max_lora_bytes or lora_tier.default_budget(pipe.unet.device, pipelines_per_replica),
            max_count=max_loras,
            metrics=metrics,
            parse=self._parsed,
        )
        self._embeddings = textual_inversion.LoadedEmbeddings()
        # Requests running on this pipeline; an eviction while one runs frees the memory when it ends.
        self._users = 0
        self._released = False
        self._freed = False
        self._state_lock = threading.Lock()

    @property
    def max_loras(self) -> int:
        return self._loras.max_count

    @property
    def max_lora_bytes(self) -> int:
        return self._loras.max_bytes

    @property
    def resident_loras(self) -> list[Path]:
        """Least recently used first; exposed so callers can report cache contents (and tests can check eviction)."""
        return self._loras.paths

    @property
    def resident_lora_bytes(self) -> int:
        return self._loras.nbytes

    @property
    def lora_tier(self) -> lora_tier.DeviceLoraTier:
        """The pipeline's device tier of LoRAs, for benchmarks and reports."""
        return self._loras

    @property
    def lora_merges(self) -> int:
        """How many LoRA sets were merged; a request repeating the previous set adds none."""
        return self._loras.merges

    def activate_loras(self, loras: Sequence[tuple[str, float]]) -> None:
        """Make exactly these LoRAs (at these scales) active; an empty list gives the plain model.

        Until `deactivate_loras`, the models run with the LoRAs merged into copies of the weights
        they touch (serving/lora_merge.py).
        """
        self._loras.activate([(lora_file(path), scale) for path, scale in loras])

    def deactivate_loras(self) -> None:
        """The resident weights back in every module: output equals the plain model."""
        self._loras.deactivate()

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
        self._loras.clear()
        for component in self.pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.to("meta")
        return_freed_memory()


    def _parsed(self, path: Path) -> ParsedLora:
        """From the host-RAM tier when there is one; the file is read at most once per replica."""
        try:
            return self._host_loras.get(path) if self._host_loras is not None else parse_lora_file(path)
        except LoraFileError as exc:
            raise AdapterLoadError(f"LoRA {str(path)!r}: {exc}") from exc


def load_pipeline(
    model_name: str,
    *,
    device: str = "cpu",
    torch_dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
    max_loras: int = 0,
    max_lora_bytes: int = 0,
    metrics: WorkerMetrics | None = None,
    host_loras: HostLoraCache | None = None,
    pipelines_per_replica: int = 1,
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
        pipelines_per_replica=pipelines_per_replica,
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


def _reason(exc: BaseException) -> str:
    """One short line a caller can act on; torch's shape errors put the useful part on line two."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join([f"{type(exc).__name__}:", *lines[:2]])
    if len(text) > MAX_REASON_CHARS:
        text = text[: MAX_REASON_CHARS - 1] + "…"
    return text + (f" (+{len(lines) - 2} more lines)" if len(lines) > 2 else "")
