"""`python -m bench.lora [--device cpu|cuda] [--options] [--json PATH]`: a LoRA miss, a switch and a repeat at SDXL size.

What an adapter costs the device tier (serving/lora_tier.py) on SDXL base's U-Net architecture
(bench/gpu.py's SDXL_UNET, 560 attention layers adapted by a rank-32 LoRA), against what
diffusers' own `load_lora_weights` costs for the same file, arms taken in turn so that drift on a
shared machine hits both alike:

- miss from host RAM: the file already parsed in the replica's host tier (what Prefetch does),
  made resident as low-rank tensors on the device; vs `load_lora_weights(path)` (PEFT injection);
- switch: a request whose set differs from the previous one (merge into weight copies, swap in);
- repeat: a request with the previous set again (no merge; the counter of merges proves it).

`--options` then compares, in rounds of their own, the service's way of applying a LoRA with
diffusers' hotswap (issue 15 asked for both to be measured): `enable_lora_hotswap(target_rank=32)`,
one `load_lora_weights(adapter_name=SLOT)` to preallocate PEFT layers, then each LoRA hotswapped
into that slot (`hotswap=True`) from its state dict already on the device (the best case for
hotswap: no file read, no transfer). Per round, in alternating order: hotswap of the next LoRA and
the service's switch to it (merge + swap), then pairs of U-Net forwards (batch 2, as
classifier-free guidance runs it) with that LoRA applied either way: hotswap leaves PEFT's unmerged
layers in every step, the merged copies cost what a plain forward costs. The two outputs are compared (max
abs difference, beside how much the LoRA changes the output). One U-Net serves both: the PEFT
layers are taken out of the module tree while the service's arm runs, and put back for hotswap's.

Only the U-Net is built (no text encoders, no VAE): the figures concern its layers. Weights are
zeros on the device (timings do not depend on values), so the CPU run fits in RAM in float16
(5 GiB); `--options` draws random weights instead, so that outputs can be compared. A CPU has no
fast float16 forward (3 minutes per SDXL U-Net forward at a 32² latent here): run `--options` in
bfloat16 there. Issue targets, ratios in one run: miss ÷ load_lora_weights ≤ 0.1 on the CPU; on
the GPU miss ≤ 30 ms and switch ≤ 10 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from peft.tuners.tuners_utils import BaseTunerLayer

from bench.gpu import LORA_RANK, LORA_STD, SDXL_UNET
from bench.inprocess import quiet
from serving.lora_cache import HostLoraCache, adapter_name
from serving.pipelines import LoadedPipeline, lora_file
from serving.tiny import SCHEDULE, _save_random_lora, _unet_lora_template

# The adapter name of diffusers' hotswap slot.
SLOT = "slot"
# A 1024² image's latent side (SDXL's VAE downsamples 8×): what a GPU forward is measured at.
FULL_LATENT = 128
# The CPU's default: an SDXL U-Net forward at 32² takes a few seconds in bfloat16 on 2 cores.
CPU_LATENT = 32
# Classifier-free guidance runs the U-Net on the unconditional and the conditional input at once.
CFG_BATCH = 2
# Forwards per arm and round in --options, taken in pairs (one of each arm, order alternating).
FORWARD_PAIRS = 2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work: Callable[[], object]) -> float:
    sync(device)
    started = time.perf_counter()
    work()
    sync(device)
    return time.perf_counter() - started


def build_pipe(device: torch.device, dtype: torch.dtype, *, random: bool = False) -> StableDiffusionXLPipeline:
    """SDXL's U-Net, allocated on the device and zeroed (no module init: minutes on a CPU), in a pipeline shell.

    `random`: weights ~ N(0, 1/fan_in), norms' scales 1 and biases 0 instead (half a minute on a
    CPU), so that activations keep their size through the layers and outputs can be compared.
    """
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    unet = unet.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for tensor in unet.buffers():
            tensor.zero_()
        for name, parameter in unet.named_parameters():
            if not random:
                parameter.zero_()
            elif parameter.dim() >= 2:
                parameter.normal_(0.0, parameter[0].numel() ** -0.5)
            else:
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
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


def run(
    device: torch.device,
    dtype: torch.dtype,
    rounds: int,
    workdir: Path,
    say: Callable[[str], None],
    *,
    options: bool = False,
    latent: int = CPU_LATENT,
) -> dict[str, Any]:
    started = time.perf_counter()
    pipe = build_pipe(device, dtype, random=options)
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
    result: dict[str, Any] = {"figures": figures, "raw": raw, "rounds": rounds}
    if options:
        option_figures, option_raw = compare_options(pipe, loaded, host, paths, latent=latent, say=say)
        figures.update(option_figures)
        result["options_raw"] = option_raw
    return result


def break_even(saved_ms: float, overhead_ms: float) -> float:
    """Steps after which hotswap's slower steps have cost what its switch saved: 0 if it saves nothing, inf if its steps are not slower."""
    if saved_ms <= 0:
        return 0.0
    return saved_ms / overhead_ms if overhead_ms > 0 else float("inf")


class HotswapSlot:
    """diffusers' hotswap into preallocated PEFT layers, and a way to run the same U-Net without them.

    `enable_lora_hotswap` must come before the first `load_lora_weights` (diffusers raises
    otherwise); with `target_rank` PEFT pads the slot to that rank and keeps scalings as tensors,
    so that LoRAs of lower rank or other alphas fit the same slot without new modules. Only the
    U-Net's (or a transformer's) adapters can be hotswapped, and every LoRA must target a subset of
    the first one's layers.
    """

    def __init__(self, pipe: DiffusionPipeline, first: dict[str, torch.Tensor], *, target_rank: int) -> None:
        self._pipe = pipe
        pipe.enable_lora_hotswap(target_rank=target_rank)
        pipe.load_lora_weights(first, adapter_name=SLOT)
        unet = pipe.unet
        # (parent, attribute, PEFT layer) for every wrapped layer, to take them out and put them back.
        self._wrapped = [
            (unet.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], module)
            for name, module in unet.named_modules()
            if isinstance(module, BaseTunerLayer)
        ]
        if not self._wrapped:
            raise RuntimeError("load_lora_weights wrapped no layer of the U-Net")

    @property
    def layers(self) -> int:
        return len(self._wrapped)

    def hotswap(self, state_dict: dict[str, torch.Tensor]) -> None:
        self._pipe.load_lora_weights(state_dict, adapter_name=SLOT, hotswap=True)

    @contextmanager
    def plain(self) -> Iterator[None]:
        """The U-Net with its own layers where the PEFT layers were (what the service's tier adapts)."""
        for parent, attribute, wrapper in self._wrapped:
            setattr(parent, attribute, wrapper.get_base_layer())
        try:
            yield
        finally:
            for parent, attribute, wrapper in self._wrapped:
                setattr(parent, attribute, wrapper)


def unet_inputs(unet: UNet2DConditionModel, latent: int, batch: int = CFG_BATCH) -> dict[str, Any]:
    """Seeded U-Net inputs of the shapes an SDXL pipeline passes (text_time conditioning when the U-Net has it)."""
    config = unet.config
    generator = torch.Generator().manual_seed(0)
    device, dtype = unet.device, unet.dtype

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device, dtype)

    inputs: dict[str, Any] = {
        "sample": randn(batch, config.in_channels, latent, latent),
        "timestep": torch.tensor(500.0, device=device),
        "encoder_hidden_states": randn(batch, 77, config.cross_attention_dim),
    }
    if config.addition_embed_type == "text_time":
        side = latent * 8
        text_embeds = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        time_ids = torch.tensor([[side, side, 0, 0, side, side]] * batch, device=device, dtype=dtype)
        inputs["added_cond_kwargs"] = {"text_embeds": randn(batch, text_embeds), "time_ids": time_ids}
    return inputs


def compare_options(
    pipe: DiffusionPipeline,
    loaded: LoadedPipeline,
    host: HostLoraCache,
    paths: Sequence[Path],
    *,
    latent: int,
    say: Callable[[str], None],
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Hotswap vs the service's merged copies, one round per LoRA after the first (the slot's warm-up)."""
    unet = pipe.unet
    device = unet.device
    tier = loaded._loras
    inputs = unet_inputs(unet, latent)
    raw: dict[str, list[float]] = {
        "hotswap": [],
        "switch": [],
        "forward_hotswap": [],
        "forward_merged": [],
        "max_abs_diff": [],
        "lora_effect": [],
    }

    def on_device(path: Path) -> dict[str, torch.Tensor]:
        """The file's tensors on the device, with the service's copy made resident too (neither is timed)."""
        file = lora_file(str(path))
        parsed = host.get(file)
        tier.ensure_resident(file, adapter_name(file))
        return {key: tensor.to(device) for key, tensor in parsed.state_dict.items()}

    def forward() -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            sync(device)
            started = time.perf_counter()
            out = unet(**inputs).sample
            sync(device)
        return time.perf_counter() - started, out.float()

    loaded.deactivate_loras()
    with torch.no_grad():
        first = on_device(paths[0])
        slot = HotswapSlot(pipe, first, target_rank=LORA_RANK)
        say(f"hotswap slot: {slot.layers} PEFT layers, rank {LORA_RANK}; forwards at batch {CFG_BATCH}, {latent}² latent")
        # Warm-up: a hotswap, one forward each way (the first forward at a shape is slow), the plain output.
        slot.hotswap(first)
        forward()
        with slot.plain():
            _, plain = forward()
            loaded.activate_loras([(str(paths[0]), 1.0)])
            forward()
            loaded.deactivate_loras()

    outputs: dict[str, torch.Tensor] = {}
    one: list[tuple[str, float]] = []

    def hotswap_switch(source: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            raw["hotswap"].append(timed(device, lambda: slot.hotswap(source)))

    def merged_switch() -> None:
        with slot.plain():
            raw["switch"].append(timed(device, lambda: loaded.activate_loras(one)))
            loaded.deactivate_loras()

    def hotswapped_forward() -> None:
        seconds, outputs["hotswap"] = forward()
        raw["forward_hotswap"].append(seconds)

    def merged_forward() -> None:
        with slot.plain():
            loaded.activate_loras(one)  # the copies just merged, kept for a repeat (merged again if over budget)
            try:
                seconds, outputs["merged"] = forward()
            finally:
                loaded.deactivate_loras()
        raw["forward_merged"].append(seconds)

    for index, path in enumerate(paths[1:], start=1):
        with slot.plain():
            source = on_device(path)
        one[:] = [(str(path), 1.0)]
        # Alternate which arm goes first, in the switches and in each pair of forwards.
        switches = [lambda: hotswap_switch(source), merged_switch]
        forwards = [hotswapped_forward, merged_forward]
        for arm in switches if index % 2 else switches[::-1]:
            arm()
        for pair in range(FORWARD_PAIRS):
            for arm in forwards if (index + pair) % 2 else forwards[::-1]:
                arm()
        raw["max_abs_diff"].append((outputs["hotswap"] - outputs["merged"]).abs().max().item())
        raw["lora_effect"].append((outputs["merged"] - plain).abs().max().item())
        last = slice(-FORWARD_PAIRS, None)
        say(
            f"options round {index}/{len(paths) - 1}: hotswap {raw['hotswap'][-1] * 1000:.0f} ms, "
            f"switch {raw['switch'][-1] * 1000:.0f} ms; forwards with hotswapped PEFT layers "
            f"{', '.join(f'{t * 1000:.0f}' for t in raw['forward_hotswap'][last])} ms, with merged copies "
            f"{', '.join(f'{t * 1000:.0f}' for t in raw['forward_merged'][last])} ms; "
            f"max |hotswap - merged| {raw['max_abs_diff'][-1]:.2e} (LoRA's effect {raw['lora_effect'][-1]:.2e})"
        )
    pairs = list(zip(raw["forward_hotswap"], raw["forward_merged"], strict=True))
    # Per pair, so that a slow spell of the machine during one pair moves one sample, not a median.
    overhead = ms([h - m for h, m in pairs])
    saved = ms(raw["switch"]) - ms(raw["hotswap"])
    shape = f"{CFG_BATCH}×{latent}²"
    figures = {
        "hotswap (diffusers, from device) ms": ms(raw["hotswap"]),
        "switch, same rounds ms": ms(raw["switch"]),
        "hotswap ÷ switch": ms(raw["hotswap"]) / ms(raw["switch"]),
        f"forward {shape}, hotswapped ms": ms(raw["forward_hotswap"]),
        f"forward {shape}, merged ms": ms(raw["forward_merged"]),
        "hotswapped ÷ merged forward": statistics.median(h / m for h, m in pairs),
        "hotswap per-step overhead ms": overhead,
        "break-even steps": break_even(saved, overhead),
        "max |hotswap − merged| output": max(raw["max_abs_diff"]),
        "max |merged − plain| (LoRA effect)": min(raw["lora_effect"]),
        "plain output max |x|": plain.abs().max().item(),
    }
    return figures, raw


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up (default 5)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write figures and raw samples here")
    parser.add_argument("--workdir", type=Path, help="where the LoRA files are written (default: a temp dir)")
    parser.add_argument(
        "--options", action="store_true", help="also compare diffusers' hotswap with the merged copies (random weights)"
    )
    parser.add_argument(
        "--latent",
        type=int,
        help=f"latent side of the --options forwards (default {FULL_LATENT} on a GPU, i.e. 1024², {CPU_LATENT} on a CPU)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    latent = args.latent or (FULL_LATENT if device.type == "cuda" else CPU_LATENT)
    quiet()

    def say(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-lora-", dir=args.workdir) as tmp:
        result = run(device, getattr(torch, args.dtype), args.rounds, Path(tmp), say, options=args.options, latent=latent)
    result["meta"] = {"device": str(device), "dtype": args.dtype, "torch_threads": torch.get_num_threads()}
    if args.options:
        result["meta"]["latent"] = latent
    if device.type == "cuda":
        result["meta"]["gpu"] = torch.cuda.get_device_name(device)
    for name, value in result["figures"].items():
        print(f"{name:<38} {value:>12,.3f}" if value == 0 or abs(value) >= 0.01 else f"{name:<38} {value:>12.2e}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
