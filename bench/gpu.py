"""`python -m bench.gpu [--json PATH]`: what hot LoRAs cost on a real GPU, with a full-size SDXL.

`python -m bench` measures the whole service on tiny CPU models, where only ratios mean
anything. The figures that decide how a GPU replica is sized (seconds per 1024² image, the
LoRA tax of unfused adapters, switch and load times, GPU memory per resident adapter and
whether an evicted pipeline gives its memory back) need full-size weights on the GPU. There is
no model hub on the GPU machines, so the script builds SDXL base's architecture with random
weights, saves it and loads it back through `serving.pipelines.load_pipeline`: the measured
pipeline is the one users run. Timings do not depend on the weights' values.

Progress lines go to stdout as they happen and the JSON file is rewritten after every
section, so a run killed at a time limit still leaves what it measured. `--tiny --device cpu`
runs every section on the tiny SDXL from serving/tiny.py in well under a minute.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from bench.inprocess import plain_call, quiet
from bench.plan import GUIDANCE_SCALE, PROMPT, SEED
from bench.stats import check, format_checks
from bench.targets import TARGETS
from serving import compiled
from serving.lora_cache import HostLoraCache, adapter_name
from serving.memory import memory_figures
from serving.pipelines import GenerationParams, LoadedPipeline, generate_result, load_pipeline, lora_file
from serving.tiny import SCHEDULE, _build_pipeline, _build_tokenizer, _save_random_lora, _unet_lora_template

MIB = 1024 * 1024
# What published SDXL LoRAs commonly use: rank 32, alpha 32, the U-Net's attention projections.
LORA_RANK = 32
# Both LoRA matrices ~ N(0, 0.01²): ΔW = B·A is a few per cent of the random base weights, as a
# trained LoRA's is, so float16 activations stay finite (the tiny model's 0.3 would blow them up).
LORA_STD = 0.01
# Round-robin passes over the resident adapters when timing switches between them.
SWITCH_ROUNDS = 5
# The replica's host-RAM LoRA tier, as big as core.config's default (max_host_lora_bytes).
HOST_LORA_BYTES = 8 * 1024**3
# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json, less most keys equal to diffusers' defaults.
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    # six size/crop ids × 256 plus the 1280-wide pooled embedding of the second text encoder
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
# vae/config.json of the same repo: 8× downsampling, upcast to float32 for decoding as the base model does.
SDXL_VAE: dict[str, Any] = {
    "sample_size": 1024,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
# text_encoder (CLIP ViT-L/14) and text_encoder_2 (OpenCLIP ViT-bigG/14) of the same repo.
CLIP_L: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
CLIP_G: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
CLIP_VOCAB_SIZE = 49408
SECTIONS = {
    "setup": "build, save and load the model",
    "a_overhead": "(a) serving overhead, no LoRA",
    "b_lora_tax": "(b) one LoRA: served, plain diffusers, naive per request",
    "c_switch": "(c) switching LoRAs, loading a new one",
    "d_adapter_memory": "(d) GPU memory per resident adapter",
    "e_release": "(e) pipeline release on eviction",
    "f_peak": "(f) peak memory of one generation",
    "g_interleaved": "(g) plain, unfused LoRA, served, served + LoRA, LoRA round-robin, in turn",
    # bench/gpu_flux.py's rows, on FLUX.1 [dev]'s structure.
    "h_flux": "(h) FLUX.1 [dev]: served + LoRA vs plain diffusers, LoRA switch, peak memory",
}


if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    class _BenchConfig(DataclassInstance, Protocol):
        """A bench's config (`Config`, bench.gpu_flux's `FluxConfig`), as `run_report` reads it."""

        @property
        def device(self) -> torch.device: ...

        @property
        def dtype(self) -> torch.dtype: ...


BenchConfig = TypeVar("BenchConfig", bound="_BenchConfig")


@dataclass(frozen=True)
class Config:
    """What one run measures; --tiny changes the model and the defaults of size and steps."""

    device: torch.device
    dtype: torch.dtype
    tiny: bool
    size: int
    steps: int
    repeats: int
    num_loras: int
    # Which sections run after setup (all by default; `--sections` picks some, e.g. on a short lease).
    sections: tuple[str, ...] = ()
    # The service pipeline's `compile` mode (serving/compiled.py), warmed at `size`; the diffusers arms stay eager.
    compile_mode: str = compiled.OFF


@dataclass(frozen=True)
class Metric:
    """One row of the table; `value` is None where the device has no such figure (CUDA memory on the CPU)."""

    section: str
    name: str
    value: float | None
    unit: str
    detail: str = ""

    @property
    def text(self) -> str:
        if self.value is None:
            return "n/a"
        if self.unit == "yes/no":
            return "yes" if self.value else "NO"
        if self.unit == "count":
            return f"{self.value:.0f}"
        return f"{self.value:,.{1 if self.unit in {'ms', 'MiB', '%'} else 2}f} {self.unit}"


@dataclass
class Report:
    """Every figure as a table row, raw samples per section; the JSON is rewritten after each section."""

    json_path: Path | None
    meta: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)
    metrics: list[Metric] = field(default_factory=list)
    raw: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    # Every verdict against bench/targets.py, computed from the figures (stats.check's dicts).
    checks: list[dict[str, Any]] = field(default_factory=list)

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - self.started:6.1f}s] {message}", flush=True)

    def add(self, section: str, name: str, value: float | None, unit: str, detail: str = "") -> None:
        metric = Metric(section, name, value, unit, detail)
        self.metrics.append(metric)
        self.log(f"  {name}: {metric.text}{f'  ({detail})' if detail else ''}")

    def verdict(self, name: str, value: float, target: str) -> None:
        self.checks.append({**check(name, value, TARGETS[target]), "target_key": target})
        self.log(f"  check {name}: {value:.4g} {self.checks[-1]['op']} {self.checks[-1]['target']:g}: {self.checks[-1]['status']}")

    def keep(self, section: str, key: str, value: Any) -> None:
        self.raw.setdefault(section, {})[key] = value

    def section(self, section: str, run: Callable[[], None]) -> None:
        """A failing section is logged and recorded, and the next ones still run: a device run is one shot."""
        self.log(f"== {SECTIONS[section]}")
        try:
            run()
        except Exception:  # noqa: BLE001 - recorded in the report; the remaining sections still run
            self.errors[section] = traceback.format_exc()
            self.log(f"section {section} FAILED:\n{self.errors[section]}")
        self.flush()

    def flush(self) -> None:
        if self.json_path is None:
            return
        document = {
            "meta": self.meta,
            "metrics": [asdict(m) for m in self.metrics],
            "raw": self.raw,
            "errors": self.errors,
            "checks": self.checks,
            "elapsed_s": round(time.perf_counter() - self.started, 1),
        }
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")

    def table(self) -> str:
        order = list(SECTIONS)
        rows = [("section", "metric", "value", "detail")] + [
            (m.section, m.name, m.text, m.detail) for m in sorted(self.metrics, key=lambda m: order.index(m.section))
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{widths[0]}} | {r[1]:<{widths[1]}} | {r[2]:>{widths[2]}} | {r[3]}".rstrip() for r in rows]
        lines.insert(1, "-+-".join("-" * w for w in widths) + "-+-" + "-" * 6)
        return "\n".join(lines)


@dataclass(frozen=True)
class Snapshot:
    """Memory at one moment: CUDA allocator figures (None on the CPU) and the process's resident set."""

    allocated: int | None
    reserved: int | None
    rss: int


class Device:
    """Synchronised timing and allocator figures; on the CPU the CUDA figures are None."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def clock(self) -> float:
        """perf_counter once the GPU has finished what was queued, so differences include GPU work."""
        self.sync()
        return time.perf_counter()

    def timed(self, work: Callable[[], object]) -> float:
        started = self.clock()
        work()
        return self.clock() - started

    def allocated(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def reserved(self) -> int | None:
        return torch.cuda.memory_reserved(self.device) if self.cuda else None

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def peak_reserved(self) -> int | None:
        return torch.cuda.max_memory_reserved(self.device) if self.cuda else None

    def snapshot(self) -> Snapshot:
        return Snapshot(self.allocated(), self.reserved(), memory_figures().rss_bytes)

    def collect(self) -> None:
        """What the service does after dropping a pipeline: collect cycles, hand cached blocks back."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def warm_kernels(self, dtype: torch.dtype) -> None:
        """cuBLAS keeps a workspace allocated for good after its first matmul; have it before the baseline."""
        x = torch.ones((64, 64), device=self.device, dtype=dtype)
        (x @ x).sum().item()


def mib(value: int | None) -> float | None:
    return None if value is None else value / MIB


def ms(seconds: Sequence[float]) -> float:
    return statistics.median(seconds) * 1000.0


def percent(value: float, base: float) -> float:
    return (value / base - 1.0) * 100.0


# --- the model ------------------------------------------------------------------------------


def build_sdxl(config: Config) -> StableDiffusionXLPipeline:
    """SDXL base's architecture with random weights, initialised on the device (on a CPU that takes minutes).

    The tiny tokenizer's ids fit CLIP's vocabulary; every prompt is padded to 77 tokens either
    way, so the text encoders do the same work as with the real tokenizer.
    """
    torch.manual_seed(0)
    if config.tiny:
        pipe: StableDiffusionXLPipeline = _build_pipeline("sdxl")
        return pipe.to(config.device, config.dtype)
    tokenizer = _build_tokenizer()
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "vocab_size": CLIP_VOCAB_SIZE,
        "max_position_embeddings": tokenizer.model_max_length,
    }
    # Only the modules are created on the device: the scheduler keeps its sigmas on the CPU.
    with config.device:
        modules = {
            "vae": AutoencoderKL(**SDXL_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**special, **CLIP_L)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**special, **CLIP_G)),
            "unet": UNet2DConditionModel(**SDXL_UNET),
        }
    pipe = StableDiffusionXLPipeline(
        **modules,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler(**SCHEDULE, timestep_spacing="leading"),
    )
    return pipe.to(config.device, config.dtype)


def make_model(config: Config, device: Device, workdir: Path, report: Report) -> tuple[Path, list[Path]]:
    """Build and save the pipeline and LoRA files, then free the built copy: later sections load from disk."""
    started = device.clock()
    pipe = build_sdxl(config)
    seconds = device.clock() - started
    params = sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    report.add("setup", "build on device", seconds, "s", f"{params / 1e6:,.0f} M parameters, {config.dtype}")
    pipeline_dir = workdir / "pipeline"
    started = device.clock()
    pipe.save_pretrained(pipeline_dir, safe_serialization=True)
    report.add("setup", "save_pretrained", device.clock() - started, "s", "safetensors")
    files = sum(f.stat().st_size for f in pipeline_dir.rglob("*.safetensors"))
    report.add("setup", "model files", files / MIB, "MiB")
    template = _unet_lora_template(pipe.unet, rank=LORA_RANK)
    paths = [workdir / "loras" / f"lora_{i}.safetensors" for i in range(config.num_loras)]
    started = time.perf_counter()
    for seed, path in enumerate(paths, start=1):
        _save_random_lora(StableDiffusionXLPipeline, template, path, seed, std=LORA_STD)
    report.add(
        "setup",
        f"write {len(paths)} LoRA files",
        time.perf_counter() - started,
        "s",
        f"rank {LORA_RANK}, alpha {LORA_RANK}, {len(template) // 2} U-Net layers",
    )
    report.add("setup", "LoRA file", paths[0].stat().st_size / MIB, "MiB", f"{next(iter(template.values())).dtype}")
    del pipe, template
    device.collect()
    return pipeline_dir, paths


# --- generating -----------------------------------------------------------------------------


def request(config: Config, loras: Sequence[Path] = ()) -> GenerationParams:
    return GenerationParams(
        prompt=PROMPT,
        width=config.size,
        height=config.size,
        num_inference_steps=config.steps,
        guidance_scale=GUIDANCE_SCALE,
        num_images=1,
        seed=SEED,
        loras=[(str(path), 1.0) for path in loras],
    )


def plain(pipe: Any, config: Config, output_type: str = "pil") -> Any:
    return plain_call(pipe, config.size, config.steps, output_type)


def finite(pipe: Any, config: Config) -> float:
    """1.0 when a whole generation stays finite: random weights could overflow float16, unlike a real model's."""
    return float(np.isfinite(plain(pipe, config, output_type="np")).all())


def served(loaded: LoadedPipeline, config: Config, loras: Sequence[Path] = ()) -> None:
    generate_result(loaded, request(config, loras))


def image_difference(a: Any, b: Any) -> Any:
    """|a − b| per pixel and channel of two PIL images, in levels of 0-255."""
    return np.abs(np.asarray(a.convert("RGB"), np.int16) - np.asarray(b.convert("RGB"), np.int16))


def served_image(loaded: LoadedPipeline, config: Config, loras: Sequence[Path] = ()) -> Any:
    return generate_result(loaded, request(config, loras)).images[0]


def repeat(device: Device, config: Config, work: Callable[[], object]) -> list[float]:
    return [device.timed(work) for _ in range(config.repeats)]


# --- sections -------------------------------------------------------------------------------


@dataclass
class Bench:
    config: Config
    device: Device
    report: Report
    loaded: LoadedPipeline | None
    loras: list[Path]
    # The replica-wide host-RAM tier the pipeline was loaded with, as serving/app.py does.
    host: HostLoraCache
    # Memory before load_pipeline and right after it, for (e).
    baseline: Snapshot
    loaded_at: Snapshot
    pipeline_dir: Path
    # Figures later sections compare against.
    plain_ms: float | None = None
    served_ms: float | None = None

    @property
    def pipe(self) -> Any:
        assert self.loaded is not None
        return self.loaded.pipe

    @property
    def live(self) -> LoadedPipeline:
        assert self.loaded is not None
        return self.loaded

    def overhead(self) -> None:
        """(a) + (f): the same pipeline object called directly vs through generate_result, interleaved."""
        config, device, report = self.config, self.device, self.report
        report.add("a_overhead", "plain output finite", finite(self.pipe, config), "yes/no", "warm-up, output_type=np")
        served(self.live, config)
        plain_s: list[float] = []
        served_s: list[float] = []
        peak = 0
        for _ in range(config.repeats):
            plain_s.append(device.timed(lambda: plain(self.pipe, config)))
            device.reset_peak()
            served_s.append(device.timed(lambda: served(self.live, config)))
            peak = max(peak, device.peak() or 0)
        self.plain_ms, self.served_ms = ms(plain_s), ms(served_s)
        report.keep("a_overhead", "plain_s", plain_s)
        report.keep("a_overhead", "served_s", served_s)
        detail = f"{config.size}², {config.steps} steps, median of {config.repeats}"
        report.add("a_overhead", "plain diffusers", self.plain_ms, "ms", detail)
        report.add("a_overhead", "generate_result", self.served_ms, "ms", detail)
        report.add("a_overhead", "serving overhead", self.served_ms - self.plain_ms, "ms")
        report.add("a_overhead", "serving overhead", percent(self.served_ms, self.plain_ms), "%")
        resident = device.allocated()
        report.add("f_peak", "peak allocated, no LoRA", mib(peak if device.cuda else None), "MiB")
        report.add(
            "f_peak",
            "peak above the loaded pipeline",
            mib(peak - resident if resident is not None else None),
            "MiB",
            "activations, VAE decode",
        )

    def diffusers_lora(self) -> None:
        """(b) what a user writes, on the same pipeline before the service has loaded any adapter.

        Both end with unload_lora_weights, which takes the PEFT wrappers out again, so the later
        sections start from the plain modules. fuse/unfuse in float16 moves the base weights by
        rounding; that changes no timing.
        """
        config, device, report, pipe, lora = self.config, self.device, self.report, self.pipe, self.loras[0]

        def load() -> None:
            pipe.load_lora_weights(str(lora), adapter_name="user")
            pipe.set_adapters(["user"], adapter_weights=[1.0])

        # Warmed like the service's figures: one untimed load first (PEFT's first injection, kernels),
        # then the median of `repeats` loads of the same file (from the page cache), each after an unload.
        loads: list[float] = []
        for index in range(config.repeats + 1):
            seconds = device.timed(load)
            pipe.unload_lora_weights()
            if index:
                loads.append(seconds)
        report.keep("b_lora_tax", "diffusers_load_s", loads)
        try:
            load()
            report.add("b_lora_tax", "diffusers load_lora_weights + set_adapters", ms(loads), "ms", f"median of {len(loads)}")
            report.add("b_lora_tax", "LoRA output finite", finite(pipe, config), "yes/no", "warm-up, output_type=np")
            samples = repeat(device, config, lambda: plain(pipe, config))
        finally:
            pipe.unload_lora_weights()
        report.keep("b_lora_tax", "diffusers_lora_s", samples)
        report.add("b_lora_tax", "plain diffusers + LoRA (set_adapters)", ms(samples), "ms")
        if self.plain_ms is not None:
            report.add("b_lora_tax", "LoRA tax, plain diffusers", percent(ms(samples), self.plain_ms), "%")

        def naive() -> None:
            pipe.load_lora_weights(str(lora))
            pipe.fuse_lora()
            plain(pipe, config)
            pipe.unfuse_lora()
            pipe.unload_lora_weights()

        naive()
        samples = repeat(device, config, naive)
        report.keep("b_lora_tax", "naive_s", samples)
        report.add("b_lora_tax", "naive load→fuse→generate→unfuse→unload", ms(samples), "ms", "one request")

    def adapters(self) -> None:
        """(c) + (d): make every LoRA resident (misses), then switch between them and repeat one.

        Every other file is first parsed into the host-RAM tier (what Prefetch does while a request
        waits in the queue), so a miss from disk and one from host RAM alternate; the difference is
        the parse. The files were just written, so "disk" reads come from the page cache. A miss
        makes the LoRA resident as low-rank tensors (serving/lora_tier.py); a switch merges a set
        that differs from the previous one; a repeat installs the previous set's merged copies.
        """
        device, report, loaded = self.device, self.report, self.live
        tier = loaded.lora_tier

        def miss(path: Path) -> float:
            file = lora_file(str(path))
            return device.timed(lambda: tier.ensure_resident(file, adapter_name(file)))

        def activate(path: Path) -> float:
            return device.timed(lambda: loaded.activate_loras([(str(path), 1.0)]))

        def prefetch(path: Path) -> float:
            return device.timed(lambda: self.host.get(lora_file(str(path))))

        parse = [prefetch(path) for path in self.loras[1::2]]
        device.collect()
        before = device.allocated()
        loads = [miss(path) for path in self.loras]
        from_disk, from_host = loads[0::2], loads[1::2]
        device.collect()
        after = device.allocated()
        for key, samples in (("from_disk_s", from_disk), ("host_parse_s", parse), ("from_host_s", from_host)):
            report.keep("c_switch", key, samples)
        report.add("c_switch", "LoRA miss, from file", ms(from_disk), "ms", f"median of {len(from_disk)}")
        report.add("c_switch", "parse file into host RAM", ms(parse), "ms", f"Prefetch; median of {len(parse)}")
        report.add("c_switch", "LoRA miss, from host RAM", ms(from_host), "ms", f"median of {len(from_host)}; target ≤ 30")
        resident = len(loaded.resident_loras)
        file_bytes = statistics.mean(path.stat().st_size for path in self.loras)
        per_adapter = (after - before) / resident if after is not None and before is not None else None
        report.add("d_adapter_memory", "resident adapters", resident, "count")
        report.add(
            "d_adapter_memory", "allocated per adapter", mib(None if per_adapter is None else int(per_adapter)), "MiB"
        )
        report.add("d_adapter_memory", "file per adapter", file_bytes / MIB, "MiB")
        report.add(
            "d_adapter_memory", "LoRA tensors per adapter", loaded.resident_lora_bytes / resident / MIB, "MiB"
        )
        if per_adapter is not None:
            report.add("d_adapter_memory", "allocated ÷ tensors", per_adapter * resident / loaded.resident_lora_bytes, "x")
        dtypes = sorted(str(dtype) for dtype in tier.dtypes)
        report.keep("d_adapter_memory", "adapter_dtypes", dtypes)
        report.log(f"  adapter tensor dtypes: {', '.join(dtypes)}")
        activate(self.loras[0])
        loaded.deactivate_loras()
        switches: list[float] = []
        repeats: list[float] = []
        repeat_merges = 0
        for _ in range(SWITCH_ROUNDS):
            for path in self.loras:
                switches.append(activate(path))
                loaded.deactivate_loras()
                merges = loaded.lora_merges
                repeats.append(activate(path))
                loaded.deactivate_loras()
                repeat_merges += loaded.lora_merges - merges
        report.keep("c_switch", "switch_s", switches)
        report.keep("c_switch", "repeat_s", repeats)
        detail = f"median of {len(switches)}; target ≤ 10"
        report.add("c_switch", "switch between resident LoRAs", ms(switches), "ms", detail)
        report.add("c_switch", "switch, p90", float(np.percentile(switches, 90)) * 1000, "ms")
        report.add("c_switch", "repeat of the previous set", ms(repeats), "ms", "no merge")
        report.add("c_switch", "merged copies of one set", tier.merged_bytes / MIB, "MiB")
        report.verdict("LoRA miss from host RAM ms", ms(from_host), "gpu lora miss from host ms")
        report.verdict("switch between resident LoRAs ms", ms(switches), "gpu lora switch ms")
        report.verdict("merges during repeats", repeat_merges, "lora repeat merges")
        if per_adapter is not None:
            report.verdict(
                "GPU memory per adapter ÷ its tensors", per_adapter * resident / loaded.resident_lora_bytes,
                "gpu allocated ÷ tensors",
            )

    def served_lora(self) -> None:
        """(b) + (f) one resident LoRA through generate_result, and no LoRA with all of them resident."""
        config, device, report, loaded = self.config, self.device, self.report, self.live
        served(loaded, config, self.loras[:1])
        samples: list[float] = []
        peak = 0
        for _ in range(config.repeats):
            device.reset_peak()
            samples.append(device.timed(lambda: served(loaded, config, self.loras[:1])))
            peak = max(peak, device.peak() or 0)
        report.keep("b_lora_tax", "served_lora_s", samples)
        report.add("b_lora_tax", "generate_result + LoRA (resident)", ms(samples), "ms")
        if self.plain_ms is not None:
            report.add("b_lora_tax", "LoRA tax, served vs plain diffusers", percent(ms(samples), self.plain_ms), "%")
        report.add("f_peak", "peak allocated, one LoRA", mib(peak if device.cuda else None), "MiB")
        samples = repeat(device, config, lambda: served(loaded, config))
        report.keep("b_lora_tax", "served_no_lora_resident_s", samples)
        detail = f"{len(loaded.resident_loras)} adapters resident, none active"
        report.add("b_lora_tax", "generate_result, no LoRA", ms(samples), "ms", detail)
        if self.served_ms is not None:
            report.add(
                "b_lora_tax", "resident-adapter tax on no-LoRA requests", percent(ms(samples), self.served_ms), "%"
            )

    def interleaved(self) -> None:
        """(g) the headline ratios with the arms taken in turn, round after round.

        Sections run one after another drifted by up to 10% on the same machine (clocks, a shared
        host CPU), more than the differences measured; here drift hits every arm alike. Arms:
        plain diffusers on its own copy of the model, the same with one LoRA through diffusers'
        load_lora_weights + set_adapters (unfused: what users write), and the service's pipeline
        with no LoRA and with that LoRA (resident, merged per request).
        """
        config, device, report, lora = self.config, self.device, self.report, self.loras[0]
        plain_pipe = StableDiffusionXLPipeline.from_pretrained(
            self.pipeline_dir, torch_dtype=config.dtype, use_safetensors=True
        ).to(config.device)
        user_pipe = StableDiffusionXLPipeline.from_pretrained(
            self.pipeline_dir, torch_dtype=config.dtype, use_safetensors=True
        ).to(config.device)
        for pipe in (plain_pipe, user_pipe):
            pipe.set_progress_bar_config(disable=True)
        # Every LoRA in turn, as many users with more LoRAs than a count bound would have held.
        rotation = itertools.cycle(self.loras)
        user_pipe.load_lora_weights(str(lora), adapter_name="user")
        user_pipe.set_adapters(["user"], adapter_weights=[1.0])
        arms: dict[str, Callable[[], object]] = {
            "plain diffusers, no LoRA": lambda: plain(plain_pipe, config),
            "plain diffusers + LoRA (set_adapters)": lambda: plain(user_pipe, config),
            "served, no LoRA": lambda: served(self.live, config),
            "served + LoRA (merged)": lambda: served(self.live, config, [lora]),
            f"served, {len(self.loras)}-LoRA round-robin": lambda: served(self.live, config, [next(rotation)]),
        }
        # Every LoRA resident first, as on a replica that has served them: the round-robin arm then
        # times switches (a merge per request), not misses.
        for path in self.loras:
            self.live.activate_loras([(str(path), 1.0)])
            self.live.deactivate_loras()
        for work in arms.values():
            work()
        # The same work: the service's images are diffusers' own for the same request, with and without the LoRA.
        pairs = {
            "served vs plain diffusers, no LoRA": (served_image(self.live, config), plain(plain_pipe, config)[0]),
            "served + LoRA vs diffusers set_adapters": (
                served_image(self.live, config, [lora]),
                plain(user_pipe, config)[0],
            ),
        }
        for name, (ours, theirs) in pairs.items():
            diff = image_difference(ours, theirs)
            report.verdict(f"{name}: mean |Δ| of 255", float(diff.mean()), "same image mean")
            report.verdict(f"{name}: max |Δ| of 255", float(diff.max()), "same image max")
        # Agreeing with diffusers means something only if the LoRA changes the image at all.
        effect = image_difference(pairs["served + LoRA vs diffusers set_adapters"][0], pairs["served vs plain diffusers, no LoRA"][0])
        report.verdict("served + LoRA vs served no LoRA: max |Δ| of 255", float(effect.max()), "gpu LoRA effect")
        samples: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(config.repeats):
            for name, work in arms.items():
                samples[name].append(device.timed(work))
        base = ms(samples["plain diffusers, no LoRA"])
        one_lora = ms(samples["served + LoRA (merged)"])
        report.verdict("served + one LoRA ÷ plain diffusers eager", one_lora / base, "gpu served one LoRA ÷ plain eager")
        report.verdict(
            f"{len(self.loras)}-LoRA round-robin ÷ one LoRA repeated",
            ms(samples[f"served, {len(self.loras)}-LoRA round-robin"]) / one_lora,
            "gpu round-robin ÷ one LoRA",
        )
        resident = len(self.live.resident_loras)
        for name, values in samples.items():
            report.keep("g_interleaved", name, values)
            report.add("g_interleaved", name, ms(values), "ms", f"median of {config.repeats} rounds")
        for name in list(arms)[1:]:
            report.add("g_interleaved", f"{name} ÷ plain", ms(samples[name]) / base, "x", f"{resident} resident")
        del plain_pipe, user_pipe
        device.collect()

    def release(self) -> None:
        """(e) eviction as the service does it, then what the allocator holds compared with before loading.

        Ray Serve's multiplexer calls the `__del__` of the worker's EvictablePipeline, which calls
        `release()`, and drops its reference; here `release()` is called directly.
        """
        device, report = self.device, self.report
        unet = weakref.ref(self.pipe.unet)
        self.live.release()
        self.loaded = None
        device.collect()
        after = device.snapshot()
        for label, snap in (("before load", self.baseline), ("loaded", self.loaded_at), ("released", after)):
            report.add("e_release", f"allocated, {label}", mib(snap.allocated), "MiB")
            report.add("e_release", f"reserved, {label}", mib(snap.reserved), "MiB")
            detail = "includes the host-RAM LoRA tier, which outlives the pipeline" if label == "released" else ""
            report.add("e_release", f"host RSS, {label}", mib(snap.rss), "MiB", detail)
        if after.allocated is not None and self.baseline.allocated is not None and self.loaded_at.allocated is not None:
            left = after.allocated - self.baseline.allocated
            report.add("e_release", "still allocated after release", mib(left), "MiB")
            returned = 1.0 - left / (self.loaded_at.allocated - self.baseline.allocated)
            report.add("e_release", "pipeline memory returned", returned * 100, "%")
        report.add(
            "e_release",
            "U-Net object collected",
            float(unet() is None),
            "yes/no",
            "weakref; release() frees it either way",
        )


def run(config: Config, report: Report, workdir: Path) -> None:
    device = Device(config.device)
    benches: list[Bench] = []

    def setup() -> None:
        pipeline_dir, loras = make_model(config, device, workdir, report)
        device.warm_kernels(config.dtype)
        device.collect()
        baseline = device.snapshot()
        host = HostLoraCache(HOST_LORA_BYTES)
        started = device.clock()
        loaded = load_pipeline(
            str(pipeline_dir),
            device=str(config.device),
            torch_dtype=config.dtype,
            host_loras=host,
            compile_mode=config.compile_mode,
            compile_sizes=[(config.size, config.size)],
        )
        report.add(
            "setup",
            "load_pipeline",
            device.clock() - started,
            "s",
            f"from the saved folder, to the device; compile {config.compile_mode}"
            + ("" if config.compile_mode == compiled.OFF else f", compiled and warmed at {config.size}²"),
        )
        benches.append(Bench(config, device, report, loaded, loras, host, baseline, device.snapshot(), pipeline_dir))

    report.section("setup", setup)
    if not benches:
        return
    # From here on `bench` holds the only reference to the pipeline, so (e) can drop it as the service does.
    bench = benches.pop()
    steps = {
        "overhead": ("a_overhead", bench.overhead),
        "diffusers_lora": ("b_lora_tax", bench.diffusers_lora),
        "adapters": ("c_switch", bench.adapters),
        "served_lora": ("b_lora_tax", bench.served_lora),
        "interleaved": ("g_interleaved", bench.interleaved),
        "release": ("e_release", bench.release),
    }
    if config.compile_mode != compiled.OFF:
        # load_lora_weights on the service's compiled U-Net would put PEFT layers into its graphs; diffusers'
        # LoRA arm runs in (g) on an eager copy of its own.
        del steps["diffusers_lora"]
        report.log("(b) diffusers' LoRA on the service's pipeline skipped: it is compiled")
    for name, (section, work) in steps.items():
        if not config.sections or name in config.sections:
            report.section(section, work)
    if config.compile_mode != compiled.OFF:
        report.verdict("compiles after warm-up (LoRA switches, misses, sizes)", compiled.EVENTS.recompiles, "gpu recompiles")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "peft", "transformers", "accelerate", "huggingface_hub", "safetensors", "protobuf"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu",
        description="GPU figures of the serving path on a full-size random-weight SDXL (see the module docstring).",
    )
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--tiny", action="store_true", help="the tiny SDXL of serving/tiny.py (a CPU smoke run)")
    parser.add_argument("--size", type=int, help="image side in pixels (default 1024; 64 with --tiny)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 30; 2 with --tiny)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per arm after one warm-up (default 3)")
    parser.add_argument("--loras", type=int, default=50, help="LoRA files made resident (default 50, at least 4)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every figure and raw sample here")
    parser.add_argument(
        "--sections",
        default="",
        help="comma-separated subset of overhead,diffusers_lora,adapters,served_lora,interleaved,release (default all)",
    )
    parser.add_argument("--workdir", type=Path, help="where the model and LoRAs are written (default: a temp dir)")
    parser.add_argument(
        "--compile",
        default=compiled.OFF,
        choices=compiled.MODES,
        help="compile the service's pipeline (the `compile` setting; default off: eager, as plain diffusers)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1 or args.loras < 4:
        # (c) needs two files loaded from disk and two from host RAM.
        raise SystemExit("--repeats must be at least 1 and --loras at least 4")
    device = bench_device(args.device)
    config = Config(
        device=device,
        # float16 kernels are the GPU path; the CPU has no fast (or complete) float16 support.
        dtype=torch.float16 if device.type == "cuda" else torch.float32,
        tiny=args.tiny,
        size=args.size or (64 if args.tiny else 1024),
        steps=args.steps or (2 if args.tiny else 30),
        repeats=args.repeats,
        num_loras=args.loras,
        sections=tuple(name for name in args.sections.split(",") if name),
        compile_mode=args.compile,
    )
    return run_report("gpu", config, run, args, argv)


def bench_device(name: str) -> torch.device:
    """The --device a GPU bench was given, refused where it names CUDA and torch sees none."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device; use --device cpu --tiny for a smoke run")
    return device


def run_report(
    name: str,
    config: BenchConfig,
    run: Callable[[BenchConfig, Report, Path], None],
    args: argparse.Namespace,
    argv: Sequence[str] | None,
) -> int:
    """A GPU bench's run (`python -m bench.<name>`) in a temp folder, then its table and checks; the exit
    status is 1 when a section failed. `config` is a dataclass with `device` and `dtype`."""
    device = config.device
    meta: dict[str, Any] = {
        "config": {**asdict(config), "device": str(device), "dtype": str(config.dtype)},
        "versions": versions(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    quiet()
    report = Report(args.json, meta)
    report.log(f"bench.{name} {json.dumps(meta)}")
    with tempfile.TemporaryDirectory(prefix=f"bench-{name.replace('_', '-')}-", dir=args.workdir) as tmp:
        run(config, report, Path(tmp))
    print("\n" + report.table(), flush=True)
    print("\n" + format_checks(report.checks), flush=True)
    if report.errors:
        report.log(f"sections with errors: {', '.join(report.errors)}")
    report.log(f"done; JSON: {args.json or '-'}")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
