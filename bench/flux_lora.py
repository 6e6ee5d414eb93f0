"""`python -m bench.flux_lora [--layout peft|kohya] [--rounds N] [--json PATH]`: FLUX LoRAs, service vs diffusers.

What making a FLUX LoRA resident and applying it costs on a FLUX.1-structured transformer at FLUX.1's
widths (3072 inner, 4096 text, 24 heads of 128) with fewer blocks (default one double and one single
block, what a 2-core CPU holds; FLUX.1 has 19 and 38), with rank-32 LoRAs on every block Linear as
ai-toolkit and fal's trainers write them (`--layout kohya`: sd-scripts' names, fused q/k/v and the
single blocks' q/k/v/MLP split by diffusers' converter on the miss). bench/lora.py's rounds, on the
transformer: each round takes two files neither side has seen, arms in alternating order:

- miss from host RAM: the service's tier makes a LoRA resident from its host tier (parsed before,
  as Prefetch does for a waiting request) ÷ diffusers' `load_lora_weights` of the same LoRA's state
  dict from host RAM (both start from tensors in RAM; the miss ends resident, PEFT's ends injected);
- parsed → ready: the miss plus the merge ÷ the same `load_lora_weights`; file → ready: the
  service's `activate_loras` of a file ÷ `load_lora_weights(path)`;
- switch (another resident LoRA: merge and install) and repeat (the previous set: no merge; the
  counter of merges proves it).

Both sides adapt the same number of layers, and the transformer's output with either side's LoRA
agrees within the dtype's roundings (bench/targets.py's agreement rows). Verdicts: miss ÷
`load_lora_weights` ≤ 0.1 and no merge on a repeat.

`--memory` instead prints serving/flux_memory.py's figures from FLUX.1 [dev]'s full structure (a few
minutes on 2 cores, no weights computed): bytes counted on the meta device, and each stage's peak of
activations at 1024² measured under FakeTensorMode by PyTorch's MemTracker (every allocation's size;
the CPU's kernel choices, e.g. its flash attention, stand in for CUDA's).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from bench.gpu import LORA_RANK, LORA_STD
from bench.inprocess import quiet
from bench.lora import compare_arms, materialise, ms, parsed_miss, peft_layers, report, switch_and_repeat, timed
from bench.stats import check as target_check
from bench.targets import TARGETS
from serving import flux_memory
from serving.flux_memory import CUDA_OVERHEAD, GIB, H100_BYTES
from serving.lora_cache import HostLoraCache, adapter_name
from serving.pipelines import LoadedPipeline, lora_file
from serving.tiny_flux import (
    FLUX1_DEV_TRANSFORMER,
    SCHEDULER,
    FluxLoraFormat,
    build_flux_transformer,
    flux1_dev_models,
    make_tiny_flux_lora,
)

# One double and one single block at FLUX.1's widths: ~0.5 B parameters, 1 GB in bfloat16.
BENCH_TRANSFORMER = {**FLUX1_DEV_TRANSFORMER, "num_layers": 1, "num_single_layers": 1}
# FLUX.1 at 1024²: 64² packed latent tokens and T5's 512; the VAE decodes 16 × 128² latents.
FULL_IMAGE_TOKENS = 4096
FULL_TEXT_TOKENS = 512
FULL_LATENT = 128
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp")
# Tokens of the forwards that compare the two sides' outputs: a 64² image's 16 and a short prompt's 8.
IMAGE_TOKENS = 16
TEXT_TOKENS = 8
RAW_SAMPLES = (
    "diffusers_file",
    "service_file",
    "diffusers_parsed",
    "miss_from_host",
    "merge_after_miss",
    "switch",
    "repeat",
    "installed_switch",
    "installed_switch_writes",
    "max_abs_diff",
    "lora_effect",
)


def build_pipe(device: torch.device, dtype: torch.dtype, config: dict[str, Any]) -> FluxPipeline:
    """The transformer with random weights (bench/lora.py's `materialise`) in a pipeline shell without encoders."""
    with torch.device("meta"):
        transformer = build_flux_transformer(**config)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=materialise(transformer, device, dtype, random=True),
    )


def transformer_inputs(transformer: FluxTransformer2DModel) -> dict[str, Any]:
    """Seeded inputs of the shapes FluxPipeline passes (packed latents, T5 and pooled CLIP embeddings, guidance)."""
    config = transformer.config
    generator = torch.Generator().manual_seed(0)
    device, dtype = transformer.device, transformer.dtype

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device, dtype)

    return {
        "hidden_states": randn(1, IMAGE_TOKENS, config.in_channels),
        "encoder_hidden_states": randn(1, TEXT_TOKENS, config.joint_attention_dim),
        "pooled_projections": randn(1, config.pooled_projection_dim),
        "timestep": torch.tensor([0.5], device=device, dtype=dtype),
        "guidance": torch.tensor([3.5], device=device, dtype=dtype),
        "img_ids": torch.zeros(IMAGE_TOKENS, 3, device=device, dtype=dtype),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3, device=device, dtype=dtype),
    }


def run(
    device: torch.device,
    dtype: torch.dtype,
    rounds: int,
    workdir: Path,
    say: Callable[[str], None],
    *,
    layout: FluxLoraFormat = "peft",
    config: dict[str, Any] = BENCH_TRANSFORMER,
    rank: int = LORA_RANK,
) -> dict[str, Any]:
    started = time.perf_counter()
    pipe = build_pipe(device, dtype, config)
    transformer = pipe.transformer
    say(f"transformer on {device} ({dtype}) in {time.perf_counter() - started:.1f}s")
    paths = [
        make_tiny_flux_lora(
            workdir / f"lora_{i}.safetensors",
            seed=i + 1,
            lora_format=layout,
            transformer=transformer,
            std=LORA_STD,
            rank=rank,
            alpha=None if layout == "xlabs" else float(rank),
        )
        for i in range(2 * (rounds + 1))
    ]
    say(f"{len(paths)} {layout} LoRA files of {paths[0].stat().st_size / 2**20:.1f} MiB (rank {rank})")
    host = HostLoraCache(0)
    loaded = LoadedPipeline(pipe, family="flux", model_name="flux-transformer", host_loras=host)
    tier = loaded.lora_tier
    inputs = transformer_inputs(transformer)
    raw: dict[str, list[float]] = {name: [] for name in RAW_SAMPLES}
    adapted: dict[str, set[int]] = {"diffusers": set(), "service": set()}
    outputs: dict[str, torch.Tensor] = {}
    repeat_merges = 0

    def forward(arm: str) -> None:
        with torch.no_grad():
            outputs[arm] = transformer(**inputs).sample.float()

    def plain() -> None:
        """A request without LoRAs (not timed): the tier may leave a set installed, diffusers' arms need the base."""
        loaded.activate_loras([])
        loaded.deactivate_loras()

    def diffusers_file(path: Path) -> None:
        plain()
        try:
            raw["diffusers_file"].append(timed(device, lambda: pipe.load_lora_weights(str(path), adapter_name="user")))
            adapted["diffusers"].add(peft_layers(transformer))
            forward("diffusers")
        finally:
            pipe.unload_lora_weights()

    def service_file(path: Path) -> None:
        try:
            raw["service_file"].append(timed(device, lambda: loaded.activate_loras([(str(path), 1.0)])))
            file = lora_file(str(path))
            adapted["service"].add(tier.ensure_resident(file, adapter_name(file)).layer_count)
            forward("service")
        finally:
            loaded.deactivate_loras()

    def diffusers_parsed(state_dict: dict[str, torch.Tensor]) -> None:
        plain()
        try:
            raw["diffusers_parsed"].append(timed(device, lambda: pipe.load_lora_weights(state_dict, adapter_name="user")))
        finally:
            pipe.unload_lora_weights()

    for index in range(rounds + 1):
        file_path, parsed_path = paths[2 * index], paths[2 * index + 1]
        state_dict = safetensors.torch.load_file(str(parsed_path))
        plain()
        forward("plain")
        pairs = [
            [lambda: diffusers_file(file_path), lambda: service_file(file_path)],
            [lambda: diffusers_parsed(state_dict), lambda: parsed_miss(device, loaded, host, parsed_path, raw)],
        ]
        compare_arms(index, pairs, outputs, raw)
        merged, _ = switch_and_repeat(device, loaded, file_path, parsed_path, raw)
        if index == 0:
            # The warm-up round (first imports, allocator arenas, first merge) is left out for both sides.
            for samples in raw.values():
                samples.clear()
            continue
        repeat_merges += merged
        say(
            f"round {index}/{rounds}: miss from host {raw['miss_from_host'][-1] * 1000:.1f} ms + merge "
            f"{raw['merge_after_miss'][-1] * 1000:.0f} ms; load_lora_weights(state dict) "
            f"{raw['diffusers_parsed'][-1] * 1000:.0f} ms; file → ready: service {raw['service_file'][-1] * 1000:.0f} ms, "
            f"load_lora_weights {raw['diffusers_file'][-1] * 1000:.0f} ms; switch {raw['switch'][-1] * 1000:.0f} ms, "
            f"repeat {raw['repeat'][-1] * 1000:.2f} ms"
        )
    parsed_to_ready = [miss + merge for miss, merge in zip(raw["miss_from_host"], raw["merge_after_miss"], strict=True)]
    figures = {
        "miss from host RAM ms": ms(raw["miss_from_host"]),
        "load_lora_weights(state dict) ms": ms(raw["diffusers_parsed"]),
        "miss ÷ load_lora_weights": ms(raw["miss_from_host"]) / ms(raw["diffusers_parsed"]),
        "merge after the miss ms": ms(raw["merge_after_miss"]),
        "parsed → ready: service ÷ diffusers": ms(parsed_to_ready) / ms(raw["diffusers_parsed"]),
        "file → ready: service ms": ms(raw["service_file"]),
        "file → ready: load_lora_weights ms": ms(raw["diffusers_file"]),
        "file → ready: service ÷ diffusers": ms(raw["service_file"]) / ms(raw["diffusers_file"]),
        "switch (merge + swap) ms": ms(raw["switch"]),
        "repeat ms": ms(raw["repeat"]),
        "switch from an installed set ms": ms(raw["installed_switch"]),
        "weight writes, switch from an installed set": statistics.median(raw["installed_switch_writes"]),
        "merges during repeats": float(repeat_merges),
        "max |diffusers − service| ÷ LoRA effect": max(raw["max_abs_diff"]) / min(raw["lora_effect"]),
        "adapted layers, diffusers": float(max(adapted["diffusers"])),
        "adapted layers, service": float(max(adapted["service"])),
        "file bytes per adapter MiB": paths[0].stat().st_size / 2**20,
        "merged copies MiB": tier.merged_bytes / 2**20,
    }
    return {"figures": figures, "raw": raw, "rounds": rounds, "checks": checks(figures, dtype, adapted)}


def memory_figures(say: Callable[[str], None]) -> dict[str, float]:
    """FLUX.1 [dev]'s memory in GiB (bfloat16): weights, merged sets and adapters, activations, an H100's budget."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with torch.device("meta"):
        transformer, t5, clip, vae = flux1_dev_models()
    parts = {"transformer": transformer, "T5-XXL encoder": t5, "CLIP-L": clip, "VAE": vae}
    figures = {f"weights: {name} GiB": sum(p.numel() for p in m.parameters()) * 2 / GIB for name, m in parts.items()}
    weights = sum(figures.values())
    figures["weights GiB"] = weights
    linears = {n: m for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(BLOCKS)}
    single_out = [n for n in linears if n.startswith(BLOCKS[1]) and n.endswith("proj_out")]
    sets = {
        "every block Linear": list(linears),
        "attention + MLP": [n for n in linears if n.endswith(ATTENTION + MLP)] + single_out,
        "attention": [n for n in linears if n.endswith(ATTENTION)],
    }
    for label, names in sets.items():
        figures[f"merged set, {label} ({len(names)} layers) GiB"] = sum(linears[n].weight.numel() for n in names) * 2 / GIB
    for rank in (16, 32):
        size = sum(rank * (m.in_features + m.out_features) for m in linears.values()) * 2
        figures[f"adapter, every block Linear, rank {rank} GiB"] = size / GIB

    def peak(model: torch.nn.Module, run: Callable[[], object]) -> float:
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker, torch.no_grad():
            run()
        by_device = next(iter(tracker.get_tracker_snapshot("peak").values()))
        kinds = {getattr(kind, "value", str(kind)): size for kind, size in by_device.items()}
        return (kinds.get("Activation", 0) + kinds.get("Temp", 0)) / GIB

    default = torch.get_default_dtype()
    with FakeTensorMode():
        torch.set_default_dtype(torch.bfloat16)
        try:
            transformer, t5, clip, vae = flux1_dev_models()
            for batch in (1, 4):
                say(f"activations at 1024², batch {batch}")
                inputs = {
                    "hidden_states": torch.randn(batch, FULL_IMAGE_TOKENS, transformer.config.in_channels),
                    "encoder_hidden_states": torch.randn(batch, FULL_TEXT_TOKENS, transformer.config.joint_attention_dim),
                    "pooled_projections": torch.randn(batch, transformer.config.pooled_projection_dim),
                    "timestep": torch.ones(batch),
                    "guidance": torch.ones(batch),
                    "img_ids": torch.zeros(FULL_IMAGE_TOKENS, 3),
                    "txt_ids": torch.zeros(FULL_TEXT_TOKENS, 3),
                }
                figures[f"activations: transformer, {batch} × 1024² GiB"] = peak(transformer, lambda: transformer(**inputs))
                latents = torch.randn(batch, vae.config.latent_channels, FULL_LATENT, FULL_LATENT)
                figures[f"activations: VAE decode, {batch} × 1024² GiB"] = peak(vae, lambda: vae.decode(latents))
                ids = torch.zeros(batch, FULL_TEXT_TOKENS, dtype=torch.long)
                figures[f"activations: T5-XXL, {batch} × {FULL_TEXT_TOKENS} tokens GiB"] = peak(t5, lambda: t5(ids))
        finally:
            torch.set_default_dtype(default)
    free = H100_BYTES - CUDA_OVERHEAD - weights * GIB
    budget = flux_memory.default_budget(int(free))
    figures["H100 80 GB: free once loaded GiB"] = free / GIB
    figures["H100 80 GB: default LoRA budget GiB"] = budget / GIB
    figures["H100 80 GB: weights + budget + activation reserve GiB"] = (
        weights + (CUDA_OVERHEAD + budget + flux_memory.ACTIVATION_RESERVE) / GIB
    )
    return figures


def checks(figures: dict[str, float], dtype: torch.dtype, adapted: dict[str, set[int]]) -> list[dict[str, Any]]:
    """Every verdict of the run, computed from its figures against bench/targets.py."""
    exact = dtype == torch.float32
    wanted: list[tuple[str, float, str]] = [
        ("miss ÷ load_lora_weights", figures["miss ÷ load_lora_weights"], "flux lora miss from host"),
        ("merges during repeats", figures["merges during repeats"], "lora repeat merges"),
        (
            "max |diffusers − service| ÷ LoRA effect",
            figures["max |diffusers − service| ÷ LoRA effect"],
            "lora unfused agreement float32" if exact else "lora unfused agreement half",
        ),
        (
            "adapted layers, |diffusers − service|",
            float(max(abs(a - b) for a in adapted["diffusers"] for b in adapted["service"])),
            "lora same layers",
        ),
    ]
    return [target_check(name, value, TARGETS[target]) for name, value, target in wanted]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flux_lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layout", choices=["peft", "kohya"], default="peft")
    parser.add_argument("--memory", action="store_true", help="print FLUX.1 [dev]'s memory figures instead (minutes)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: bfloat16")
    parser.add_argument("--json", type=Path, metavar="PATH")
    parser.add_argument("--workdir", type=Path, help="where the LoRA files go (default: a temporary folder)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype_name = args.dtype or "bfloat16"
    quiet()

    def say(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    if args.memory:
        result: dict[str, Any] = {"figures": memory_figures(say), "checks": []}
    else:
        with tempfile.TemporaryDirectory(prefix="bench-flux-lora-", dir=args.workdir) as tmp:
            result = run(device, getattr(torch, dtype_name), args.rounds, Path(tmp), say, layout=args.layout)
    result["meta"] = {
        "device": str(device),
        "dtype": dtype_name,
        "layout": args.layout,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
