"""Loading a base model: a diffusers folder, a single .safetensors checkpoint or a Hugging Face repo id.

Weights are untrusted input: only safetensors are ever deserialised (pickle files are refused by
name, and diffusers is told `use_safetensors=True`), and every failure is a `ModelLoadError` whose
message names the model and the reason, never a stack trace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import accelerate
import safetensors
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_DEFAULT_PIPELINE_PATHS,
    LDM_VAE_KEYS,
    infer_diffusers_model_type,
)

from serving import compiled, flux_checkpoint, image_to_image, unets
from serving.errors import ModelLoadError, reason
from serving.lora_cache import HostLoraCache
from serving.loaded import LoadedPipeline
from serving.metrics import WorkerMetrics
from serving.residency import weight_bytes

PICKLE_SUFFIXES = frozenset({".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle"})
# diffusers' single-file model types (`infer_diffusers_model_type`) served, by pipeline: the SDXL ones
# are the files with SDXL's second, OpenCLIP text encoder.
SD_SINGLE_FILE_TYPES: dict[str, type[DiffusionPipeline]] = {
    **dict.fromkeys(("v1", "v2", "inpainting", "inpainting_v2"), StableDiffusionPipeline),
    **dict.fromkeys(("xl_base", "xl_inpaint", "playground-v2-5"), StableDiffusionXLPipeline),
}
FLUX_SINGLE_FILE_TYPES = frozenset({"flux-dev", "flux-schnell"})


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
    compile_mode: str = compiled.OFF,
    compile_sizes: Sequence[tuple[int, int]] = (),
    compile_regional: bool | None = None,
    make_room: Callable[[str, int], object] | None = None,
    flux_single_file_config: str = "",
) -> LoadedPipeline:
    """Load a base model from a folder, a .safetensors file, or a Hugging Face repo id.

    URLs and uploads are turned into local files by `storage.weights.WeightsCache` first;
    `label` is what the caller asked for (e.g. that URL), named in errors instead of the file.
    `unet` (a local U-Net folder or .safetensors file, `unet_label` in errors) replaces the
    model's U-Net (serving/unets.py); `variant` (e.g. "fp16") picks `*.{variant}.safetensors`
    files in diffusers folders. `compile_mode` other than off compiles the denoiser and VAE decoder and
    warms `compile_sizes` (serving/compiled.py) before the LoRA budget is read from the free memory.
    `make_room(family, weight bytes)` runs before the weights move to `device`, so that the replica can
    evict what they would not fit beside (serving/residency.py). A single-file FLUX.1 checkpoint takes
    the parts it lacks, and its transformer's config, from the diffusers FLUX.1 checkpoint
    `flux_single_file_config` names (empty: FLUX.1 [dev] or [schnell] from the Hub, as its keys say).
    """
    label = label or model_name
    variant = variant or None
    pipe = image_to_image.resident_pipeline(
        _load_diffusers_pipeline(model_name, label, torch_dtype, cache_dir, variant, flux_single_file_config), label
    )
    family = _detect_family(pipe, label)
    if unet and family == "flux":
        raise ModelLoadError(f"model {label!r} is a FLUX model; a custom U-Net only replaces a Stable Diffusion one")
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
    if make_room is not None:
        make_room(family, weight_bytes(pipe))
    try:
        pipe.to(device)
    except Exception as exc:
        raise ModelLoadError(f"could not move model {label!r} to device {device!r}: {reason(exc)}") from exc
    pipe.set_progress_bar_config(disable=True)
    compiled_modules = compiled.compile_pipeline(
        pipe, family=family, mode=compile_mode, sizes=compile_sizes, regional=compile_regional
    )
    return LoadedPipeline(
        pipe,
        family=family,
        model_name=label,
        max_loras=max_loras,
        max_lora_bytes=max_lora_bytes,
        metrics=metrics,
        host_loras=host_loras,
        pipelines_per_replica=pipelines_per_replica,
        compiled=compiled_modules,
    )


def _load_diffusers_pipeline(
    source: str,
    label: str,
    torch_dtype: torch.dtype,
    cache_dir: Path | None,
    variant: str | None = None,
    flux_config: str = "",
) -> DiffusionPipeline:
    if "://" in source:
        # Fetching is storage.weights' job: it guards URLs (SSRF, sizes) and caches by content.
        raise ModelLoadError(f"model {label!r}: resolve URLs through the weights cache before loading")
    local = Path(source).expanduser()
    if local.exists() or _looks_like_path(source):
        return _load_local(local, label, torch_dtype, variant, cache_dir, flux_config)
    return _from_pretrained(source, label, torch_dtype, cache_dir, variant)


def _looks_like_path(model_name: str) -> bool:
    """Repo ids are `name` or `org/name`; anything else is meant as a local path that is missing."""
    return (
        model_name.startswith(("/", "./", "../", "~"))
        or model_name.count("/") > 1
        or Path(model_name).suffix.lower() in PICKLE_SUFFIXES | {".safetensors"}
    )


def _load_local(
    path: Path,
    model_name: str,
    torch_dtype: torch.dtype,
    variant: str | None = None,
    cache_dir: Path | None = None,
    flux_config: str = "",
) -> DiffusionPipeline:
    if not path.exists():
        raise ModelLoadError(f"model {model_name!r}: local path does not exist")
    if path.is_file():
        if variant:
            raise ModelLoadError(
                f"model {model_name!r} is a single .safetensors file; variant {variant!r} only applies to "
                "diffusers folders and Hugging Face repos — leave variant unset"
            )
        return _load_single_file(path, model_name, torch_dtype, cache_dir, flux_config)
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
        raise ModelLoadError(f"could not load model {model_name!r}: {reason(exc)}") from exc


def _load_single_file(
    path: Path, model_name: str, torch_dtype: torch.dtype, cache_dir: Path | None, flux_config: str
) -> DiffusionPipeline:
    _refuse_pickle(path.name, model_name)
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"model {model_name!r}: a single-file model must be a .safetensors file")
    model_type = _single_file_model_type(path, model_name)
    if model_type in FLUX_SINGLE_FILE_TYPES:
        return _load_flux_single_file(path, model_name, model_type, torch_dtype, cache_dir, flux_config)
    pipeline_class = SD_SINGLE_FILE_TYPES.get(model_type)
    if pipeline_class is None:
        raise ModelLoadError(
            f"model {model_name!r} is a single-file {model_type} checkpoint (by its tensor names); only Stable "
            "Diffusion 1.x/2.x, SDXL and FLUX.1 [dev] / [schnell] single files are supported"
        )
    try:
        return pipeline_class.from_single_file(str(path), dtype=torch_dtype)
    except Exception as exc:
        raise ModelLoadError(f"could not load single-file model {model_name!r}: {reason(exc)}") from exc


class _TensorShapes(Mapping[str, torch.Tensor]):
    """A safetensors file's tensors as diffusers' family inference reads them: names and shapes (meta
    tensors), without reading the weights; `names` (shown name → name in the file) renames them."""

    def __init__(self, checkpoint: Any, names: dict[str, str] | None = None) -> None:
        self._checkpoint = checkpoint
        self._names = names if names is not None else {key: key for key in checkpoint.keys()}

    def __contains__(self, key: object) -> bool:
        return key in self._names

    def __getitem__(self, key: str) -> torch.Tensor:
        return torch.empty(self._checkpoint.get_slice(self._names[key]).get_shape(), device="meta")

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _single_file_model_type(path: Path, model_name: str) -> str:
    """diffusers' own inference from the tensor names and shapes ("v1" when nothing else fits). It knows
    FLUX.1 by BFL's names only: a transformer in diffusers' names is shown it under those."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as checkpoint:
            tensors = _TensorShapes(checkpoint)
            if flux_checkpoint.is_diffusers_layout(tensors):
                tensors = _TensorShapes(checkpoint, flux_checkpoint.bfl_names(tensors))
            return str(infer_diffusers_model_type(tensors))
    except Exception as exc:
        raise ModelLoadError(f"could not read single-file model {model_name!r}: {reason(exc)}") from exc


def _load_flux_single_file(
    path: Path, model_name: str, model_type: str, torch_dtype: torch.dtype, cache_dir: Path | None, config: str
) -> DiffusionPipeline:
    """The file's transformer (BFL's layout, serving/flux_checkpoint.py, or diffusers' own) in the `config`
    checkpoint's transformer, with that checkpoint's VAE, text encoders, tokenizers and scheduler, or those
    the file carries (an all-in-one file) loaded by diffusers' `FluxPipeline.from_single_file`."""
    source = config or DIFFUSERS_DEFAULT_PIPELINE_PATHS[model_type]["pretrained_model_name_or_path"]
    try:
        with safetensors.safe_open(str(path), framework="pt") as checkpoint:
            names = set(checkpoint.keys())
            diffusers_layout = flux_checkpoint.is_diffusers_layout(names)
            keys = {name: name for name in names} if diffusers_layout else flux_checkpoint.transformer_keys(names)
            # Cast as read: a float32 file never sits in host memory whole beside its bfloat16 copy.
            weights = {name: checkpoint.get_tensor(key).to(torch_dtype) for name, key in keys.items()}
            if not diffusers_layout:
                weights = flux_checkpoint.to_diffusers(weights)
    except flux_checkpoint.LayoutError as exc:
        raise ModelLoadError(f"single-file model {model_name!r} is not a FLUX.1 transformer: {exc}") from exc
    except Exception as exc:
        raise ModelLoadError(f"could not read single-file model {model_name!r}: {reason(exc)}") from exc
    transformer_config = _flux_transformer_config(source, model_name, cache_dir)
    try:
        with accelerate.init_empty_weights():
            transformer = FluxTransformer2DModel.from_config(transformer_config)
        transformer.load_state_dict(weights, strict=True, assign=True)
    except Exception as exc:
        raise ModelLoadError(
            f"single-file model {model_name!r} does not fit the FLUX.1 transformer of {source!r} "
            f"(setting flux_single_file_config): {reason(exc)}"
        ) from exc
    transformer.eval()
    try:
        if names == set(keys.values()):
            return FluxPipeline.from_pretrained(
                source,
                transformer=transformer,
                use_safetensors=True,
                dtype=torch_dtype,
                cache_dir=cache_dir,
                trust_remote_code=False,
            )
        parts: dict[str, Any] = {"transformer": transformer}
        if not any(name.startswith(tuple(LDM_VAE_KEYS)) for name in names):
            parts["vae"] = AutoencoderKL.from_pretrained(
                source, subfolder="vae", use_safetensors=True, dtype=torch_dtype, cache_dir=cache_dir
            )
        pipe = FluxPipeline.from_single_file(str(path), config=source, dtype=torch_dtype, cache_dir=cache_dir, **parts)
    except Exception as exc:
        raise ModelLoadError(
            f"could not load single-file model {model_name!r} with the rest of {source!r}: {reason(exc)}"
        ) from exc
    # diffusers builds a T5 found in the file in training mode: its dropout would make every image random.
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def _flux_transformer_config(source: str, model_name: str, cache_dir: Path | None) -> dict[str, Any]:
    """The transformer config of the checkpoint a single file takes its other parts from: when that is not a
    diffusers FLUX.1 checkpoint, the fault is the setting's, not the file's."""
    where = (
        f"single-file model {model_name!r} takes its transformer config from {source!r} "
        "(setting flux_single_file_config)"
    )
    if _looks_like_path(source) and not Path(source).expanduser().exists():
        raise ModelLoadError(f"{where}: local path does not exist")
    try:
        config = dict(FluxTransformer2DModel.load_config(source, subfolder="transformer", cache_dir=cache_dir))
    except Exception as exc:
        raise ModelLoadError(f"{where}: it has none that can be read: {reason(exc)}") from exc
    if config.get("_class_name") != FluxTransformer2DModel.__name__:
        raise ModelLoadError(f"{where}: its transformer is a {config.get('_class_name')}, not FLUX.1's")
    return config


def _refuse_pickle(file_name: str, what: str) -> None:
    if Path(file_name).suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"model {what!r}: {Path(file_name).suffix} files are pickle and can run code when loaded; "
            "refused — use a .safetensors file"
        )


def _detect_family(pipe: DiffusionPipeline, model_name: str) -> str:
    """Trust the loaded components, not the name: checkpoints are often named arbitrarily."""
    if isinstance(pipe, FluxPipeline):
        return "flux"
    if isinstance(pipe, StableDiffusionXLPipeline) or getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    if isinstance(pipe, StableDiffusionPipeline):
        return "sd15"
    raise ModelLoadError(
        f"model {model_name!r} is a {type(pipe).__name__}; only Stable Diffusion 1.x/2.x, SDXL and FLUX.1 are supported"
    )
