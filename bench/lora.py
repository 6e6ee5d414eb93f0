"""`python -m bench.lora [--device cpu|cuda] [--options] [--json PATH]`: applying a LoRA at SDXL size, service vs diffusers.

What applying a new LoRA costs on SDXL base's U-Net architecture (bench/gpu.py's SDXL_UNET, 560
attention layers adapted by a rank-32 LoRA), the service's way (serving/lora_tier.py: resident as
low-rank tensors, merged into copies of the weights, installed into the modules' own tensors) and
diffusers' own `load_lora_weights` (PEFT layers), like with like, arms taken in turn and each round
on LoRAs neither side has seen:

- file → ready to denoise: `load_lora_weights(path)` vs the service's `activate_loras` of the same
  file (read, parse, resident, merge, install);
- parsed state dict → ready: `load_lora_weights(state_dict)` vs the service's miss from its host
  tier (the file parsed beforehand, as Prefetch does for a waiting request) plus the merge;
- what each leaves in every denoising step: a U-Net forward (batch 2, as classifier-free guidance
  runs it) with the LoRA applied either way, less a plain forward of the same round;
- switch (another resident LoRA: merge and install) and repeat (the set the previous request left
  installed: no merge and no copy; the tier's counters of merges and weight writes prove it).

The service leaves a request's set installed until a request needs another (serving/lora_tier.py);
before each of diffusers' arms and each plain forward it is given a request without LoRAs (not
timed), as diffusers' arms unload theirs, so both sides start each arm from the plain U-Net.

Both sides do the same work, checked in code: they adapt the same number of layers, and their
outputs agree within half precision's roundings (max |Δ| as a fraction of the LoRA's own effect;
against diffusers' `fuse_lora` once after the rounds). Every verdict is computed against
bench/targets.py: file → ready ≤ 0.5× `load_lora_weights` on the CPU, miss ≤ 30 ms and switch
≤ 10 ms on a GPU, no merge on a repeat.

`--options` then compares, in rounds of their own, the service's way of applying a LoRA with
diffusers' hotswap: `enable_lora_hotswap(target_rank=32)`, one
`load_lora_weights(adapter_name=SLOT)` to preallocate PEFT layers, then each LoRA hotswapped into
that slot (`hotswap=True`) from its state dict already on the device (the best case for hotswap:
no file read, no transfer). Per round, in alternating order: hotswap of the next LoRA and the
service's switch to it, then pairs of U-Net forwards with that LoRA applied either way. One U-Net
serves both: the PEFT layers are taken out of the module tree while the service's arm runs.

Only the U-Net is built (no text encoders, no VAE): the figures concern its layers. Weights are
random, N(0, 1/fan_in), so that outputs can be compared. A CPU has no fast float16 forward (3
minutes per SDXL U-Net forward at a 32² latent here): the CPU default is bfloat16, a GPU's float16.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import safetensors.torch
import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from peft.tuners.tuners_utils import BaseTunerLayer

from bench.gpu import LORA_RANK, LORA_STD, SDXL_UNET
from bench.inprocess import quiet
from bench.stats import check as target_check
from bench.stats import format_checks
from bench.targets import TARGETS
from serving.lora_cache import HostLoraCache, adapter_name
from serving.pipelines import LoadedPipeline, lora_file
from serving.tiny import SCHEDULE, _save_random_lora, _unet_lora_template

ModelT = TypeVar("ModelT", bound=torch.nn.Module)
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
# The main rounds' samples, in seconds (the output differences in the output's units, the fused one a ratio).
RAW_SAMPLES = (
    "diffusers_file",
    "service_file",
    "diffusers_parsed",
    "service_parsed",
    "miss_from_host",
    "merge_after_miss",
    "switch",
    "repeat",
    "installed_switch",
    "installed_switch_writes",
    "forward_plain",
    "forward_diffusers",
    "forward_service",
    "forward_fused",
    "max_abs_diff",
    "lora_effect",
    "fused_diff",
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work: Callable[[], object]) -> float:
    sync(device)
    started = time.perf_counter()
    work()
    sync(device)
    return time.perf_counter() - started


def build_pipe(
    device: torch.device, dtype: torch.dtype, *, random: bool = False, unet_config: dict[str, Any] = SDXL_UNET
) -> StableDiffusionXLPipeline:
    """SDXL's U-Net, allocated on the device and zeroed (no module init: minutes on a CPU), in a pipeline shell."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    unet = materialise(unet, device, dtype, random=random)
    return StableDiffusionXLPipeline(
        vae=None,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULE),
    )


def materialise(model: ModelT, device: torch.device, dtype: torch.dtype, *, random: bool = False) -> ModelT:
    """A model built on the meta device, allocated on `device` and zeroed, or with `random` weights.

    `random`: weights ~ N(0, 1/fan_in), norms' scales 1 and biases 0 instead (half a minute on a
    CPU for SDXL's U-Net), so that activations keep their size through the layers and outputs can
    be compared.
    """
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for tensor in model.buffers():
            tensor.zero_()
        for name, parameter in model.named_parameters():
            if not random:
                parameter.zero_()
            elif parameter.dim() >= 2:
                parameter.normal_(0.0, parameter[0].numel() ** -0.5)
            else:
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
    return model


def write_loras(folder: Path, count: int, unet_config: dict[str, Any] = SDXL_UNET) -> list[Path]:
    """Rank-32 attention LoRAs in float16, as published SDXL LoRAs mostly are; the template comes from a meta U-Net."""
    with torch.device("meta"):
        template_unet = UNet2DConditionModel(**unet_config).to(torch.float16)
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
    unet_config: dict[str, Any] = SDXL_UNET,
) -> dict[str, Any]:
    """The rounds on SDXL's U-Net (`unet_config`: another architecture of the same kind, for a smoke test)."""
    started = time.perf_counter()
    pipe = build_pipe(device, dtype, random=True, unet_config=unet_config)
    say(f"U-Net on {device} ({dtype}) in {time.perf_counter() - started:.1f}s")
    # Per round (and the warm-up) one file for the file arms and another for the parsed arms, so
    # that each arm starts from a LoRA that neither side has seen.
    paths = write_loras(workdir / "loras", 2 * (rounds + 1), unet_config)
    say(f"{len(paths)} LoRA files of {paths[0].stat().st_size / 2**20:.1f} MiB; forwards at batch {CFG_BATCH}, {latent}²")
    host = HostLoraCache(0)
    loaded = LoadedPipeline(pipe, family="sdxl", model_name="sdxl-unet", host_loras=host)
    tier = loaded._loras
    unet = pipe.unet
    inputs = unet_inputs(unet, latent)
    raw: dict[str, list[float]] = {name: [] for name in RAW_SAMPLES}
    repeat_merges = 0
    repeat_writes = 0
    adapted: dict[str, set[int]] = {"diffusers": set(), "service": set()}
    outputs: dict[str, torch.Tensor] = {}

    def forward(arm: str) -> None:
        with torch.no_grad():
            seconds = timed(device, lambda: outputs.__setitem__(arm, unet(**inputs).sample.float()))
        raw[f"forward_{arm}"].append(seconds)

    def diffusers_file(path: Path) -> None:
        try:
            raw["diffusers_file"].append(timed(device, lambda: pipe.load_lora_weights(str(path), adapter_name="user")))
            adapted["diffusers"].add(peft_layers(unet))
            forward("diffusers")
        finally:
            pipe.unload_lora_weights()

    def plain() -> None:
        """A request without LoRAs: the base weights back (not timed), as diffusers' arms unload their LoRA."""
        loaded.activate_loras([])
        loaded.deactivate_loras()

    def service_file(path: Path) -> None:
        one = [(str(path), 1.0)]
        try:
            raw["service_file"].append(timed(device, lambda: loaded.activate_loras(one)))
            file = lora_file(str(path))
            adapted["service"].add(tier.ensure_resident(file, adapter_name(file)).layer_count)
            forward("service")
        finally:
            loaded.deactivate_loras()
            plain()

    def diffusers_parsed(state_dict: dict[str, torch.Tensor]) -> None:
        try:
            raw["diffusers_parsed"].append(timed(device, lambda: pipe.load_lora_weights(state_dict, adapter_name="user")))
            adapted["diffusers"].add(peft_layers(unet))
        finally:
            pipe.unload_lora_weights()

    def service_parsed(path: Path) -> None:
        try:
            parsed_miss(device, loaded, host, path, raw)
        finally:
            plain()
        raw["service_parsed"].append(raw["miss_from_host"][-1] + raw["merge_after_miss"][-1])

    for index in range(rounds + 1):
        file_path, parsed_path = paths[2 * index], paths[2 * index + 1]
        state_dict = safetensors.torch.load_file(str(parsed_path))
        forward("plain")
        pairs = [
            [lambda: diffusers_file(file_path), lambda: service_file(file_path)],
            [lambda: diffusers_parsed(state_dict), lambda: service_parsed(parsed_path)],
        ]
        compare_arms(index, pairs, outputs, raw)
        merged, written = switch_and_repeat(device, loaded, file_path, parsed_path, raw)
        plain()
        if index == 0:
            # The warm-up round (first PEFT import paths, allocator arenas, first merge, first forward
            # of each arm) is left out, for both sides alike.
            for samples in raw.values():
                samples.clear()
            continue
        repeat_merges += merged
        repeat_writes += written
        say(
            f"round {index}/{rounds}: file → ready: load_lora_weights {raw['diffusers_file'][-1] * 1000:.0f} ms, "
            f"service {raw['service_file'][-1] * 1000:.0f} ms; parsed → ready: load_lora_weights "
            f"{raw['diffusers_parsed'][-1] * 1000:.0f} ms, service {raw['service_parsed'][-1] * 1000:.0f} ms "
            f"(miss {raw['miss_from_host'][-1] * 1000:.1f} + merge {raw['merge_after_miss'][-1] * 1000:.0f}); "
            f"forward plain {raw['forward_plain'][-1] * 1000:.0f} ms, with PEFT layers "
            f"{raw['forward_diffusers'][-1] * 1000:.0f} ms, merged {raw['forward_service'][-1] * 1000:.0f} ms; switch {raw['switch'][-1] * 1000:.0f} ms, "
            f"repeat {raw['repeat'][-1] * 1000:.2f} ms; max |diffusers − service| {raw['max_abs_diff'][-1]:.2e} "
            f"(LoRA's effect {raw['lora_effect'][-1]:.2e})"
        )
    # After the timed rounds, as diffusers' fuse_lora / unfuse_lora leave the base weights rounded in half precision.
    raw["fused_diff"].append(fused_difference(pipe, file_path, forward, outputs))
    per_round = list(zip(raw["forward_plain"], raw["forward_diffusers"], raw["forward_service"], strict=True))
    figures = {
        "file → ready: load_lora_weights ms": ms(raw["diffusers_file"]),
        "file → ready: service ms": ms(raw["service_file"]),
        "file → ready: service ÷ diffusers": ms(raw["service_file"]) / ms(raw["diffusers_file"]),
        "parsed → ready: load_lora_weights ms": ms(raw["diffusers_parsed"]),
        "parsed → ready: service ms": ms(raw["service_parsed"]),
        "parsed → ready: service ÷ diffusers": ms(raw["service_parsed"]) / ms(raw["diffusers_parsed"]),
        "miss from host RAM ms": ms(raw["miss_from_host"]),
        "merge after the miss ms": ms(raw["merge_after_miss"]),
        "switch (merge + swap) ms": ms(raw["switch"]),
        "repeat ms": ms(raw["repeat"]),
        "switch from an installed set ms": ms(raw["installed_switch"]),
        "weight writes, switch from an installed set": statistics.median(raw["installed_switch_writes"]),
        "merges during repeats": float(repeat_merges),
        "weight writes during repeats": float(repeat_writes),
        f"forward {CFG_BATCH}×{latent}², no LoRA ms": ms(raw["forward_plain"]),
        f"forward {CFG_BATCH}×{latent}², diffusers (PEFT layers) ms": ms(raw["forward_diffusers"]),
        f"forward {CFG_BATCH}×{latent}², service (merged) ms": ms(raw["forward_service"]),
        # What each leaves behind in every denoising step, per round against that round's plain forward.
        "per-step cost, diffusers ms": ms([d - p for p, d, _ in per_round]),
        "per-step cost, service ms": ms([s - p for p, _, s in per_round]),
        "max |diffusers − service| ÷ LoRA effect": max(raw["max_abs_diff"]) / min(raw["lora_effect"]),
        "max |fused − service| ÷ LoRA effect": raw["fused_diff"][0],
        "adapted layers, diffusers": float(max(adapted["diffusers"])),
        "adapted layers, service": float(max(adapted["service"])),
        "resident bytes per adapter MiB": tier.nbytes / max(1, len(loaded.resident_loras)) / 2**20,
        "file bytes per adapter MiB": paths[0].stat().st_size / 2**20,
        "merged copies MiB": tier.merged_bytes / 2**20,
        "shape groups": float(len(next(iter(tier._resident.values()))[1].groups)),
    }
    result: dict[str, Any] = {"figures": figures, "raw": raw, "rounds": rounds}
    result["checks"] = checks(figures, device, dtype, adapted)
    if options:
        option_figures, option_raw = compare_options(pipe, loaded, host, paths[::2], latent=latent, say=say)
        figures.update(option_figures)
        result["options_raw"] = option_raw
    return result


def parsed_miss(
    device: torch.device, loaded: LoadedPipeline, host: HostLoraCache, path: Path, raw: dict[str, list[float]]
) -> None:
    """The service's parsed arm: `path` parsed in host RAM beforehand (as Prefetch does for a waiting
    request), then its miss into the device tier and its merge timed apart; the plain weights back after."""
    file = lora_file(str(path))
    host.get(file)
    raw["miss_from_host"].append(timed(device, lambda: loaded.lora_tier.ensure_resident(file, adapter_name(file))))
    try:
        raw["merge_after_miss"].append(timed(device, lambda: loaded.activate_loras([(str(path), 1.0)])))
    finally:
        loaded.deactivate_loras()


def compare_arms(
    index: int,
    pairs: Sequence[Sequence[Callable[[], None]]],
    outputs: dict[str, torch.Tensor],
    raw: dict[str, list[float]],
) -> None:
    """One round's pairs of arms, then how far the service's output is from diffusers' and from the plain
    model's. The order alternates by round, so neither arm always follows the other's memory traffic."""
    for pair in pairs:
        for arm in pair if index % 2 else pair[::-1]:
            arm()
    raw["max_abs_diff"].append((outputs["diffusers"] - outputs["service"]).abs().max().item())
    raw["lora_effect"].append((outputs["service"] - outputs["plain"]).abs().max().item())


def switch_and_repeat(
    device: torch.device, loaded: LoadedPipeline, path: Path, other: Path, raw: dict[str, list[float]]
) -> tuple[int, int]:
    """The switch back to `path`'s LoRA (resident, while the parsed one's copies are kept) timed, then a
    repeat of it; (merges, weight writes) the repeat did, none where a repeat costs nothing. Then a switch
    straight from that installed set to `other`'s (resident), as a request after a request with LoRAs
    makes it, timed with the weight tensors it writes (not in the returned counts)."""
    one = [(str(path), 1.0)]
    raw["switch"].append(timed(device, lambda: loaded.activate_loras(one)))
    loaded.deactivate_loras()
    merges, writes = loaded.lora_merges, loaded.lora_tier.weight_writes
    raw["repeat"].append(timed(device, lambda: loaded.activate_loras(one)))
    loaded.deactivate_loras()
    repeat = loaded.lora_merges - merges, loaded.lora_tier.weight_writes - writes
    writes = loaded.lora_tier.weight_writes
    raw["installed_switch"].append(timed(device, lambda: loaded.activate_loras([(str(other), 1.0)])))
    loaded.deactivate_loras()
    raw["installed_switch_writes"].append(float(loaded.lora_tier.weight_writes - writes))
    return repeat


def peft_layers(unet: torch.nn.Module) -> int:
    return sum(isinstance(module, BaseTunerLayer) for module in unet.modules())


def fused_difference(
    pipe: DiffusionPipeline, path: Path, forward: Callable[[str], None], outputs: dict[str, torch.Tensor]
) -> float:
    """max |diffusers' load + fuse_lora output − the service's| ÷ the LoRA's effect, for one file (not timed)."""
    try:
        pipe.load_lora_weights(str(path), adapter_name="user")
        pipe.fuse_lora(components=["unet"])
        forward("fused")
    finally:
        pipe.unfuse_lora(components=["unet"])
        pipe.unload_lora_weights()
    effect = (outputs["service"] - outputs["plain"]).abs().max().item()
    return (outputs["fused"] - outputs["service"]).abs().max().item() / effect


def checks(
    figures: dict[str, float], device: torch.device, dtype: torch.dtype, adapted: dict[str, set[int]]
) -> list[dict[str, Any]]:
    """Every verdict of the run, computed from its figures against bench/targets.py."""
    exact = dtype == torch.float32
    wanted: list[tuple[str, float, str]] = [
        ("merges during repeats", figures["merges during repeats"], "lora repeat merges"),
        (
            "max |fused − service| ÷ LoRA effect",
            figures["max |fused − service| ÷ LoRA effect"],
            "lora fused agreement float32" if exact else "lora fused agreement half",
        ),
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
    if device.type == "cuda":
        wanted += [
            ("miss from host RAM ms", figures["miss from host RAM ms"], "gpu lora miss from host ms"),
            ("switch (merge + swap) ms", figures["switch (merge + swap) ms"], "gpu lora switch ms"),
        ]
    else:
        wanted.append(
            ("file → ready: service ÷ diffusers", figures["file → ready: service ÷ diffusers"], "lora file to ready cpu")
        )
    return [target_check(name, value, TARGETS[target]) for name, value, target in wanted]


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
            loaded.activate_loras([])  # the base weights back under the PEFT layers (the set stays installed otherwise)

    outputs: dict[str, torch.Tensor] = {}
    one: list[tuple[str, float]] = []

    def hotswap_switch(source: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            raw["hotswap"].append(timed(device, lambda: slot.hotswap(source)))

    def merged_switch() -> None:
        with slot.plain():
            raw["switch"].append(timed(device, lambda: loaded.activate_loras(one)))
            loaded.deactivate_loras()
            loaded.activate_loras([])

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
                loaded.activate_loras([])
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
    parser.add_argument(
        "--dtype",
        choices=["float16", "float32", "bfloat16"],
        help="weights' dtype (default float16 on a GPU, bfloat16 on a CPU: no fast float16 forward there)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up (default 5)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write figures and raw samples here")
    parser.add_argument("--workdir", type=Path, help="where the LoRA files are written (default: a temp dir)")
    parser.add_argument(
        "--options", action="store_true", help="also compare diffusers' hotswap with the merged copies (random weights)"
    )
    parser.add_argument(
        "--latent",
        type=int,
        help=f"latent side of the forwards (default {FULL_LATENT} on a GPU, i.e. 1024², {CPU_LATENT} on a CPU)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    latent = args.latent or (FULL_LATENT if device.type == "cuda" else CPU_LATENT)
    dtype_name = args.dtype or ("float16" if device.type == "cuda" else "bfloat16")
    quiet()

    def say(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-lora-", dir=args.workdir) as tmp:
        result = run(device, getattr(torch, dtype_name), args.rounds, Path(tmp), say, options=args.options, latent=latent)
    result["meta"] = {
        "device": str(device),
        "dtype": dtype_name,
        "torch_threads": torch.get_num_threads(),
        "latent": latent,
        "load_average": os.getloadavg(),
    }
    if device.type == "cuda":
        result["meta"]["gpu"] = torch.cuda.get_device_name(device)
    report(result, args.json)
    return 0


def report(result: dict[str, Any], json_path: Path | None) -> None:
    """The figures and verdicts on stdout (the load average beside them), and the whole result as JSON if asked."""
    for name, value in result["figures"].items():
        print(f"{name:<42} {value:>12,.3f}" if value == 0 or abs(value) >= 0.01 else f"{name:<42} {value:>12.2e}")
    print(f"\nload average {', '.join(f'{v:.1f}' for v in result['meta']['load_average'])}\n{format_checks(result['checks'])}")
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
