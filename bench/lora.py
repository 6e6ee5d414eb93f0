"""`python -m bench.lora [--device cpu|cuda] [--json PATH]`: a LoRA miss, a switch and a repeat at SDXL size.

What an adapter costs the device tier (serving/lora_tier.py) on SDXL base's U-Net architecture
(bench/gpu.py's SDXL_UNET, 560 attention layers adapted by a rank-32 LoRA), against what
diffusers' own `load_lora_weights` costs for the same file, arms taken in turn so that drift on a
shared machine hits both alike:

- miss from host RAM: the file already parsed in the replica's host tier (what Prefetch does),
  made resident as low-rank tensors on the device; vs `load_lora_weights(path)` (PEFT injection);
- switch: a request whose set differs from the previous one (merge into weight copies, swap in);
- repeat: a request with the previous set again (no merge; the counter of merges proves it).

Only the U-Net is built (no text encoders, no VAE): the figures concern its layers. Weights are
zeros on the device (timings do not depend on values), so the CPU run fits in RAM in float16
(5 GiB). Issue targets, ratios in one run: miss ÷ load_lora_weights ≤ 0.1 on the CPU; on the GPU
miss ≤ 30 ms and switch ≤ 10 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

from bench.gpu import LORA_RANK, LORA_STD, SDXL_UNET
from bench.inprocess import quiet
from serving.lora_cache import HostLoraCache, adapter_name
from serving.pipelines import LoadedPipeline, lora_file
from serving.tiny import SCHEDULE, _save_random_lora, _unet_lora_template


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work: Callable[[], object]) -> float:
    sync(device)
    started = time.perf_counter()
    work()
    sync(device)
    return time.perf_counter() - started


def build_pipe(device: torch.device, dtype: torch.dtype) -> StableDiffusionXLPipeline:
    """SDXL's U-Net, allocated on the device and zeroed (no random init: minutes on a CPU), in a pipeline shell."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    unet = unet.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for tensor in [*unet.parameters(), *unet.buffers()]:
            tensor.zero_()
    return StableDiffusionXLPipeline(
        vae=None,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULE),
    )


def write_loras(folder: Path, count: int) -> list[Path]:
    """Rank-32 attention LoRAs in float16, as published SDXL LoRAs mostly are; the template comes from a meta U-Net."""
    with torch.device("meta"):
        template_unet = UNet2DConditionModel(**SDXL_UNET).to(torch.float16)
    template = _unet_lora_template(template_unet, rank=LORA_RANK)
    folder.mkdir(parents=True, exist_ok=True)
    return [
        _save_random_lora(StableDiffusionXLPipeline, template, folder / f"lora_{i}.safetensors", i + 1, std=LORA_STD)
        for i in range(count)
    ]


def ms(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1000.0


def run(device: torch.device, dtype: torch.dtype, rounds: int, workdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    started = time.perf_counter()
    pipe = build_pipe(device, dtype)
    say(f"U-Net on {device} ({dtype}) in {time.perf_counter() - started:.1f}s")
    paths = write_loras(workdir / "loras", rounds + 1)
    say(f"{len(paths)} LoRA files of {paths[0].stat().st_size / 2**20:.1f} MiB")
    host = HostLoraCache(0)
    loaded = LoadedPipeline(pipe, family="sdxl", model_name="sdxl-unet", host_loras=host)
    tier = loaded._loras
    raw: dict[str, list[float]] = {"diffusers_load": [], "miss_from_host": [], "switch": [], "repeat": []}
    repeat_merges = 0

    def diffusers_load(path: Path) -> None:
        try:
            raw["diffusers_load"].append(timed(device, lambda: pipe.load_lora_weights(str(path), adapter_name="user")))
        finally:
            pipe.unload_lora_weights()

    def miss(path: Path) -> None:
        file = lora_file(str(path))
        host.get(file)  # parsed beforehand, as Prefetch does for a waiting request
        raw["miss_from_host"].append(timed(device, lambda: tier.ensure_resident(file, adapter_name(file))))

    # Warm-up: one of each (first PEFT import paths, allocator arenas, first merge).
    diffusers_load(paths[0])
    miss(paths[0])
    loaded.activate_loras([(str(paths[0]), 1.0)])
    loaded.deactivate_loras()
    for index, path in enumerate(paths[1:], start=1):
        # Alternate which arm goes first, so neither always follows the other's memory traffic.
        arms = [lambda: diffusers_load(path), lambda: miss(path)]
        for arm in arms if index % 2 else arms[::-1]:
            arm()
        one = [(str(path), 1.0)]
        raw["switch"].append(timed(device, lambda: loaded.activate_loras(one)))
        loaded.deactivate_loras()
        before = loaded.lora_merges
        raw["repeat"].append(timed(device, lambda: loaded.activate_loras(one)))
        loaded.deactivate_loras()
        repeat_merges += loaded.lora_merges - before
        say(
            f"round {index}/{rounds}: load_lora_weights {raw['diffusers_load'][-1] * 1000:.0f} ms, "
            f"miss from host {raw['miss_from_host'][-1] * 1000:.1f} ms, switch {raw['switch'][-1] * 1000:.0f} ms, "
            f"repeat {raw['repeat'][-1] * 1000:.2f} ms"
        )
    resident = tier.nbytes / max(1, len(loaded.resident_loras))
    figures = {
        "diffusers load_lora_weights ms": ms(raw["diffusers_load"][1:]),
        "miss from host RAM ms": ms(raw["miss_from_host"][1:]),
        "miss ÷ load_lora_weights": ms(raw["miss_from_host"][1:]) / ms(raw["diffusers_load"][1:]),
        "switch (merge + swap) ms": ms(raw["switch"]),
        "repeat ms": ms(raw["repeat"]),
        "merges during repeats": float(repeat_merges),
        "resident bytes per adapter MiB": resident / 2**20,
        "file bytes per adapter MiB": paths[0].stat().st_size / 2**20,
        "merged copies MiB": tier.merged_bytes / 2**20,
        "adapted layers": float(next(iter(tier._resident.values()))[1].layer_count),
        "shape groups": float(len(next(iter(tier._resident.values()))[1].groups)),
    }
    return {"figures": figures, "raw": raw, "rounds": rounds}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up (default 5)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write figures and raw samples here")
    parser.add_argument("--workdir", type=Path, help="where the LoRA files are written (default: a temp dir)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    quiet()

    def say(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-lora-", dir=args.workdir) as tmp:
        result = run(device, getattr(torch, args.dtype), args.rounds, Path(tmp), say)
    result["meta"] = {"device": str(device), "dtype": args.dtype, "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        result["meta"]["gpu"] = torch.cuda.get_device_name(device)
    for name, value in result["figures"].items():
        print(f"{name:<34} {value:>12,.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
