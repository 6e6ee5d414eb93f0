"""`python -m bench.gpu_flux [--json PATH]`: the FLUX.1 rows of the GPU check, on FLUX.1 [dev]'s structure.

FLUX.1 [dev]'s transformer, T5-XXL, CLIP-L and VAE (serving/tiny_flux.flux1_dev_models, the configs
serving/flux_memory.py counts) are built with random weights straight on the device in bfloat16:
no hub, and no save and reload of 33 GB, which alone would take a lent GPU's minutes. The pipeline
is wrapped as serving/loading.py wraps a loaded one (compiled by `compiled.compile_pipeline`
when `--compile` is set, then a `LoadedPipeline` with the replica's host tier), and requests go
through serving/flux_generation.generate_flux, the worker's own code. Rows, with bench/gpu.py's
Report and Device:

- served + one LoRA (rank 32 on all 494 block Linears, as ai-toolkit writes) ÷ plain diffusers
  eager (the same modules called directly, under `compiled.eager()` so a compiled pipeline's gates
  step aside); with `--compile` also served with `acceleration: "regular"` ÷ the same plain call.
- switch between two resident LoRAs (`activate_loras` of the other set, synchronised), median, and the
  allocator's peak reserved over the switches (a second merged set held beside the first shows there).
- peak GPU memory (torch.cuda.max_memory_allocated) of a request with the other LoRA set active
  (compiled with `--compile`, so its graphs are checked to survive the switches: no compile after
  warm-up), and what the loaded pipeline holds before it.

A lent GPU gives the whole check ~10 minutes, so a request is not timed at 28 steps: every arm
runs at `--short` and `--long` steps (default 2 and 8), in turn, and the per-step time is the
difference ÷ the steps between; a 28-step request is then estimated as the short call plus
(28 − short) × per-step, and the targets are checked on those estimates. Text encoding and VAE
decode are in the short call, so they count once, as in a real request. `--tiny --device cpu`
runs every row on the tiny FLUX of serving/tiny_flux.py in seconds (scripts/gpu_check.sh --dry-run).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from bench.gpu import (
    HOST_LORA_BYTES,
    LORA_RANK,
    LORA_STD,
    MIB,
    SWITCH_ROUNDS,
    Device,
    Report,
    bench_device,
    mib,
    ms,
    run_report,
)
from bench.inprocess import plain_call
from bench.plan import GUIDANCE_SCALE, PROMPT, SEED
from loraserve.v1 import flux_pb2
from serving import compiled
from serving.flux_generation import REGULAR, FluxParams, generate_flux
from serving.lora_cache import HostLoraCache
from serving.pipelines import LoadedPipeline
from serving.tiny import LORA_INIT_STD, _build_tokenizer
from serving.tiny import LORA_RANK as TINY_LORA_RANK
from serving.tiny_flux import (
    SCHEDULER,
    _build_t5_tokenizer,
    build_tiny_flux_pipeline,
    flux1_dev_models,
    make_tiny_flux_lora,
)

# FLUX.1 [dev]'s default request (fal's `num_inference_steps`), what the estimates are for.
REQUEST_STEPS = 28
SECTION = "h_flux"
# What the check's table shows of this benchmark besides its verdicts (bench/gpu_check.py).
PEAK = "FLUX peak allocated, with a LoRA set"
LOADED = "FLUX allocated, loaded"
# The allocator's peak over the switches: a set's freed copies are read by the main stream until its copy back
# ends, so a merge that cannot reuse them yet holds a second set beside them (or frees the cache to fit).
SWITCH_RESERVED = "FLUX peak reserved, switching LoRAs"
REPORTED = (LOADED, SWITCH_RESERVED, PEAK)


@dataclass(frozen=True)
class FluxConfig:
    device: torch.device
    dtype: torch.dtype
    tiny: bool
    size: int
    short: int
    long: int
    repeats: int
    compile_mode: str = compiled.OFF


def build_flux(config: FluxConfig) -> FluxPipeline:
    """FLUX.1 [dev]'s structure with random weights, created on the device in its dtype (or the tiny FLUX).

    The tiny tokenizers' ids fit T5's and CLIP's vocabularies; T5 pads every prompt to 512 tokens
    and CLIP to 77 either way, so the encoders do a real prompt's work.
    """
    torch.manual_seed(0)
    if config.tiny:
        return build_tiny_flux_pipeline().to(config.device, config.dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(config.dtype)
    try:
        with config.device:
            transformer, t5, clip, vae = flux1_dev_models()
    finally:
        torch.set_default_dtype(default)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae,
        text_encoder=clip,
        tokenizer=_build_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=_build_t5_tokenizer(),
        transformer=transformer,
    ).to(config.device, config.dtype)


def flux_request(config: FluxConfig, steps: int, loras: Sequence[Path], acceleration: str) -> FluxParams:
    """The plain call's request, as the worker resolves a fal-ai/flux-lora body."""
    return FluxParams(
        endpoint=flux_pb2.FLUX_ENDPOINT_UNSPECIFIED,
        prompt=PROMPT,
        width=config.size,
        height=config.size,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE_SCALE,
        num_images=1,
        seed=SEED,
        enable_safety_checker=False,
        output_format="png",
        acceleration=acceleration,
        strength=1.0,
        loras=[(str(path), 1.0) for path in loras],
    )


def estimate(short_s: float, long_s: float, config: FluxConfig) -> tuple[float, float]:
    """(seconds per step, seconds of a REQUEST_STEPS request) from one arm's short and long medians."""
    per_step = (long_s - short_s) / (config.long - config.short)
    return per_step, short_s + (REQUEST_STEPS - config.short) * per_step


def run(config: FluxConfig, report: Report, workdir: Path) -> None:
    device = Device(config.device)
    state: dict[str, Any] = {}

    def setup() -> None:
        started = device.clock()
        pipe = build_flux(config)
        pipe.set_progress_bar_config(disable=True)
        params = sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
        report.add(SECTION, "FLUX build on device", device.clock() - started, "s", f"{params / 1e9:.2f} B parameters, {config.dtype}")
        # bench/gpu.py's rank and spread at FLUX.1's widths; the tiny model's own defaults on it.
        rank, std = (TINY_LORA_RANK, LORA_INIT_STD) if config.tiny else (LORA_RANK, LORA_STD)
        state["loras"] = [
            make_tiny_flux_lora(
                workdir / f"flux_lora_{seed}.safetensors", seed=seed, transformer=pipe.transformer, rank=rank, std=std
            )
            for seed in (1, 2)
        ]
        report.add(SECTION, "FLUX LoRA file", state["loras"][0].stat().st_size / MIB, "MiB", "every block Linear")
        device.warm_kernels(config.dtype)
        device.collect()
        started = device.clock()
        modules = compiled.compile_pipeline(
            pipe, family="flux", mode=config.compile_mode, sizes=[(config.size, config.size)], regional=True
        )
        if modules is not None:
            report.add(SECTION, "FLUX compile + warm-up", device.clock() - started, "s", f"{config.compile_mode}, regional")
        state["loaded"] = LoadedPipeline(
            pipe, family="flux", model_name="FLUX.1 [dev] structure", host_loras=HostLoraCache(HOST_LORA_BYTES),
            compiled=modules,
        )
        report.add(SECTION, LOADED, mib(device.allocated()), "MiB", "weights")

    report.section(SECTION, setup)
    if "loaded" not in state:
        return
    report.section(SECTION, lambda: measure(config, device, report, state["loaded"], state["loras"]))
    state["loaded"].release()
    device.collect()


def measure(config: FluxConfig, device: Device, report: Report, loaded: LoadedPipeline, loras: list[Path]) -> None:
    pipe, one = loaded.pipe, loras[:1]

    def plain(steps: int) -> Callable[[], object]:
        def call() -> None:
            with compiled.eager():
                plain_call(pipe, config.size, steps)

        return call

    def served(steps: int, acceleration: str = "none") -> Callable[[], object]:
        return lambda: generate_flux(loaded, flux_request(config, steps, one, acceleration))

    arms: dict[str, Callable[[int], Callable[[], object]]] = {
        "plain diffusers eager": plain,
        "served + LoRA": served,
    }
    if loaded.compiled is not None:
        arms["served + LoRA, regular (compiled)"] = lambda steps: served(steps, REGULAR)
    for make in arms.values():
        make(config.short)()
    samples: dict[str, dict[int, list[float]]] = {name: {config.short: [], config.long: []} for name in arms}
    for _ in range(config.repeats):
        for steps in (config.short, config.long):
            for name, make in arms.items():
                samples[name][steps].append(device.timed(make(steps)))
    estimates: dict[str, float] = {}
    for name, by_steps in samples.items():
        report.keep(SECTION, name, {str(steps): values for steps, values in by_steps.items()})
        per_step, whole = estimate(ms(by_steps[config.short]), ms(by_steps[config.long]), config)
        estimates[name] = whole
        detail = f"{config.size}², medians of {config.repeats} at {config.short} and {config.long} steps"
        report.add(SECTION, f"{name}, per step", per_step, "ms", detail)
        report.add(SECTION, f"{name}, {REQUEST_STEPS} steps (estimated)", whole, "ms")
    base = estimates["plain diffusers eager"]
    report.verdict("FLUX served + one LoRA ÷ plain diffusers eager", estimates["served + LoRA"] / base, "gpu flux served ÷ plain eager")
    if loaded.compiled is not None:
        report.verdict(
            "FLUX served + one LoRA, regular ÷ plain diffusers eager",
            estimates["served + LoRA, regular (compiled)"] / base,
            "gpu flux compiled ÷ plain eager",
        )
    # Both sets resident, then alternate: each activation puts the base weights back and merges the other set.
    for path in loras:
        loaded.activate_loras([(str(path), 1.0)])
        loaded.deactivate_loras()
    device.reset_peak()
    switches = []
    for _ in range(SWITCH_ROUNDS):
        for path in loras:
            switches.append(device.timed(lambda: loaded.activate_loras([(str(path), 1.0)])))
            loaded.deactivate_loras()
    report.keep(SECTION, "switch_s", switches)
    report.add(SECTION, "FLUX switch between resident LoRAs", ms(switches), "ms", f"median of {len(switches)}")
    detail = "weights, adapters, the allocator's cache, and one merged set (two if the freed copies were not reused)"
    report.add(SECTION, SWITCH_RESERVED, mib(device.peak_reserved()), "MiB", detail)
    report.verdict("FLUX switch between resident LoRAs ms", ms(switches), "gpu flux lora switch ms")
    device.collect()
    device.reset_peak()
    # The other set than the timed arms', compiled where the pipeline is: its graphs must survive the switch.
    acceleration = "none" if loaded.compiled is None else REGULAR
    generate_flux(loaded, flux_request(config, config.short, loras[1:], acceleration))
    detail = f"one {config.size}² image, {len(loaded.resident_loras)} LoRAs resident, one set merged, {acceleration}"
    report.add(SECTION, PEAK, mib(device.peak()), "MiB", detail)
    if loaded.compiled is not None:
        report.verdict("FLUX compiles after warm-up (LoRA switches)", compiled.EVENTS.recompiles, "gpu recompiles")



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_flux", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--tiny", action="store_true", help="the tiny FLUX of serving/tiny_flux.py (a CPU smoke run)")
    parser.add_argument("--size", type=int, help="image side in pixels (default 1024; 32 with --tiny)")
    parser.add_argument("--short", type=int, default=2, help="steps of the short timed call (default 2)")
    parser.add_argument("--long", type=int, default=8, help="steps of the long timed call (default 8)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds after one warm-up (default 2)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every figure and raw sample here")
    parser.add_argument("--workdir", type=Path, help="where the LoRA files are written (default: a temp dir)")
    parser.add_argument("--compile", default=compiled.OFF, choices=compiled.MODES, help="the `compile` setting (default off)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1 or not 0 < args.short < args.long:
        raise SystemExit("--repeats must be at least 1 and 0 < --short < --long")
    device = bench_device(args.device)
    config = FluxConfig(
        device=device,
        # FLUX.1 is published and served in bfloat16 on a GPU (serving/app.py); the CPU runs float32.
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        tiny=args.tiny,
        size=args.size or (32 if args.tiny else 1024),
        short=args.short,
        long=args.long,
        repeats=args.repeats,
        compile_mode=args.compile,
    )
    return run_report("gpu_flux", config, run, args, argv)


if __name__ == "__main__":
    sys.exit(main())
