"""`python -m bench.compile [--quick] [--json PATH]`: compiled denoising on the CPU, side by side with eager.

Four parts, each printed as it ends and together in one table:

- service: two in-process Workers (the replica's own gRPC servicer, as Serve drives it), one
  eager and one with `compile=default` (64x64 warmed), on tiny SDXL with 50 LoRAs: a round
  robin over the LoRAs with a no-LoRA request every fifth, arms alternating request by request.
  Recompiles after warm-up (`loraserve_compile_recompiles_total`), eager fallbacks of the
  compiled gates, compiled ÷ eager request time, and how far the two arms' images are apart.
- unet: bench.lora's SDXL-structured U-Net (zero weights, bfloat16, rank-32 attention LoRAs),
  compiled regionally (a whole SDXL U-Net takes far longer to compile on a CPU): a LoRA switch
  (merge + copies into the weights) and a U-Net step at a 32² latent (batch 2) with the
  compiled forward installed and with the eager one, the arms alternating round by round.
- start: replica start (a tiny SDXL pipeline loaded and, compiled, warmed) in fresh processes:
  eager, compiled with an empty compile cache, compiled again with the cache the cold start left.
- shapes: static size buckets against dynamic height/width on the tiny SDXL U-Net, in fresh
  processes: the first compile's seconds, a step at the warmed size and at a size never warmed.
- flux: a transformer with FLUX.1's 19 double and 38 single blocks at tiny widths, compiled whole
  and regionally in fresh processes with empty caches: the first compile's seconds (what
  `compile_regional: auto` decides for FLUX) and a step compiled ÷ eager.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.lora import CFG_BATCH, CPU_LATENT, build_pipe, timed, unet_inputs, write_loras
from bench.stats import verdict
from bench.targets import TARGETS

SIZE = 64
# FLUX.1 [dev]'s transformer blocks.
FLUX_DOUBLE_BLOCKS, FLUX_SINGLE_BLOCKS = 19, 38
# Every this many requests of the round robin, one without a LoRA.
PLAIN_EVERY = 5


def say(message: str) -> None:
    print(f"[bench.compile] {message}", file=sys.stderr, flush=True)


def service(workdir: Path, loras: int, requests: int, regional: bool) -> dict[str, float]:
    from core.config import Settings
    from loraserve.inputs import to_input
    from loraserve.v1 import worker_pb2
    from bench.worker_in_process import in_process
    from serving import compiled
    from serving.app import Worker
    from serving.tiny import make_tiny_model

    model = make_tiny_model(workdir / "tiny-sdxl", "sdxl", num_loras=loras)
    arms: dict[str, Any] = {}
    starts: dict[str, float] = {}
    for mode in (compiled.OFF, "default"):
        arms[mode] = in_process(Worker(
            Settings(
                data_dir=workdir / f"data-{mode}",
                device="cpu",
                compile=mode,
                compile_regional="on" if regional else "off",
                compile_warmup_sizes=f"{SIZE}x{SIZE}",
                allowed_local_roots=str(workdir),
            )
        ))

    async def run(worker: Any, loras_field: list[dict[str, Any]], index: int) -> tuple[float, np.ndarray]:
        inp = to_input(
            {"model_name": str(model.pipeline_dir), "prompt": "a photo of a cat", "num_inference_steps": 4,
             "seed": index, "sync_mode": True, "image_format": "png", "loras": loras_field,
             "image_size": {"width": SIZE, "height": SIZE}}
        )
        started = time.perf_counter()
        events = [e async for e in worker.Generate(worker_pb2.GenerateRequest(request_id=f"b{index}", input=inp, seed=index))]
        seconds = time.perf_counter() - started
        result = events[-1]
        assert result.WhichOneof("event") == "result", result
        from PIL import Image

        image = Image.open(io.BytesIO(result.result.output.images[0].file_data))
        return seconds, np.asarray(image).astype(np.int16)

    async def main() -> dict[str, float]:
        for mode, worker in arms.items():
            starts[mode], _ = await run(worker, [], -1)
            say(f"service: {mode} worker's first request (load{' + compile' if mode != 'off' else ''}) {starts[mode]:.1f} s")
        fast = arms["default"]
        gates = [g for loaded in fast._hot.values() if loaded.compiled for g in loaded.compiled.gates]
        eager_calls = sum(g.eager_calls for g in gates)
        recompiles_before = compiled.EVENTS.recompiles
        seconds: dict[str, list[float]] = {mode: [] for mode in arms}
        worst_mean = worst_max = 0.0
        for index in range(requests):
            loras_field = [] if index % PLAIN_EVERY == PLAIN_EVERY - 1 else [
                {"path": str(model.lora_paths[index % loras]), "scale": 1.0}
            ]
            order = list(arms) if index % 2 else list(arms)[::-1]
            images = {}
            for mode in order:
                took, images[mode] = await run(arms[mode], loras_field, index)
                seconds[mode].append(took)
            difference = np.abs(images["off"] - images["default"])
            worst_mean, worst_max = max(worst_mean, float(difference.mean())), max(worst_max, float(difference.max()))
            if index % 25 == 24:
                say(f"service: {index + 1}/{requests} requests")
        metric = fast._metrics.registry.get_sample_value("loraserve_compile_recompiles_total") or 0.0
        return {
            "requests per arm": float(requests),
            "LoRAs in the round robin": float(loras),
            "recompiles after warm-up (metric)": metric,
            "recompiles after warm-up (process)": float(compiled.EVENTS.recompiles - recompiles_before),
            "eager fallbacks of the compiled gates": float(sum(g.eager_calls for g in gates) - eager_calls),
            "eager request ms (median)": statistics.median(seconds["off"]) * 1000,
            "compiled request ms (median)": statistics.median(seconds["default"]) * 1000,
            "compiled ÷ eager request": statistics.median(seconds["default"]) / statistics.median(seconds["off"]),
            "eager first request s": starts["off"],
            "compiled first request s (compile + warm-up)": starts["default"],
            "compiled vs eager image, worst mean |Δ|": worst_mean,
            "compiled vs eager image, worst max |Δ|": worst_max,
        }

    return asyncio.run(main())


def unet(workdir: Path, rounds: int, regional: bool) -> dict[str, float]:
    from serving import compiled
    from serving.lora_cache import HostLoraCache
    from serving.pipelines import LoadedPipeline

    device, dtype = torch.device("cpu"), torch.bfloat16
    pipe = build_pipe(device, dtype)
    paths = write_loras(workdir / "sdxl-loras", 2)
    loaded = LoadedPipeline(pipe, family="sdxl", model_name="sdxl-unet", host_loras=HostLoraCache(0))
    inputs = unet_inputs(pipe.unet, CPU_LATENT)

    def switch(index: int) -> float:
        one = [(str(paths[index % 2]), 1.0)]
        took = timed(device, lambda: loaded.activate_loras(one))
        loaded.deactivate_loras()
        return took

    switch(1)  # a miss of the other LoRA, then every activation below is a switch
    before = [switch(index) for index in range(rounds)]
    say(f"unet: switch before compiling: {statistics.median(before) * 1000:.0f} ms")
    started = time.perf_counter()
    modules = compiled.compile_modules(pipe.unet, None, "default", regional=regional)
    with torch.no_grad():
        pipe.unet(**inputs)
    modules.warmed()
    compile_seconds = time.perf_counter() - started
    say(f"unet: compiled ({'regional' if regional else 'whole'}) and warmed in {compile_seconds:.0f} s")
    gate = modules.gates[0]
    # After compiling, the arms alternate on the same U-Net: its compiled forward installed (what a
    # replica with compile on runs), or its eager one (compile off); each switch followed by a step of
    # its arm, so that a switch that invalidated the compiled graphs would show as a recompile.
    samples: dict[str, list[float]] = {"on": [], "off": []}
    steps: dict[str, list[float]] = {"on": [], "off": []}
    recompiles = compiled.EVENTS.recompiles
    with torch.no_grad():
        for index in range(rounds):
            for arm in ("on", "off") if index % 2 else ("off", "on"):
                pipe.unet.forward = gate if arm == "on" else gate.eager
                samples[arm].append(switch(index))
                loaded.activate_loras([(str(paths[index % 2]), 1.0)])  # a repeat: no merge
                try:
                    steps[arm].append(timed(device, lambda: pipe.unet(**inputs)))
                finally:
                    loaded.deactivate_loras()
    pipe.unet.forward = gate
    modules.close()
    on, off = statistics.median(samples["on"]), statistics.median(samples["off"])
    step_on, step_off = statistics.median(steps["on"]), statistics.median(steps["off"])
    return {
        "switch ms, before compiling": statistics.median(before) * 1000,
        "switch ms, compile off (interleaved)": off * 1000,
        "switch ms, compile on (interleaved)": on * 1000,
        "switch compile on ÷ off": on / off,
        f"U-Net step ms {CFG_BATCH}×{CPU_LATENT}², eager": step_off * 1000,
        f"U-Net step ms {CFG_BATCH}×{CPU_LATENT}², compiled": step_on * 1000,
        "U-Net step compiled ÷ eager": step_on / step_off,
        "U-Net compile + warm-up s": compile_seconds,
        "U-Net recompiles while measuring": float(compiled.EVENTS.recompiles - recompiles),
    }


def _child(args: list[str]) -> dict[str, float]:
    """A part that needs a fresh process (dynamo's in-memory caches empty), its figures as JSON on stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "bench.compile", "--child", *args], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode:
        raise RuntimeError(f"bench.compile --child {' '.join(args)} failed: {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def start_child(model_dir: str, mode: str, cache: str) -> dict[str, float]:
    from serving import compiled
    from serving.pipelines import load_pipeline

    compiled.use_cache_dir(Path(cache))
    started = time.perf_counter()
    load_pipeline(model_dir, compile_mode=mode, compile_sizes=[(SIZE, SIZE)])
    return {"seconds": time.perf_counter() - started}


def shape_child(model_dir: str, dynamic: bool, cache: str) -> dict[str, float]:
    """The tiny SDXL U-Net compiled for 64² (static) or with height and width dynamic; a step at 64² and at 48x64."""
    from diffusers import UNet2DConditionModel

    from serving import compiled

    compiled.use_cache_dir(Path(cache))
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").to(memory_format=torch.channels_last)
    base = unet_inputs(unet, SIZE // 8)
    other = {**base, "sample": base["sample"][..., : 48 // 8].contiguous()}
    if dynamic:
        forward = torch.compile(unet.forward, dynamic=None)
        torch._dynamo.mark_dynamic(base["sample"], 2)
        torch._dynamo.mark_dynamic(base["sample"], 3)
    else:
        forward = torch.compile(unet.forward, dynamic=False)
    with torch.no_grad():
        started = time.perf_counter()
        forward(**base)
        first = time.perf_counter() - started
        started = time.perf_counter()
        forward(**other) if dynamic else unet.forward(**other)
        new_size = time.perf_counter() - started

        # Rounds of the four calls in turn (order reversed every other round), so that the other
        # processes of a shared machine slow every arm alike: ratios to eager mean more than times.
        arms: dict[str, Callable[[], object]] = {
            "warmed": lambda: forward(**base),
            "warmed eager": lambda: unet.forward(**base),
            "new size": (lambda: forward(**other)) if dynamic else (lambda: unet.forward(**other)),
            "new size eager": lambda: unet.forward(**other),
        }
        samples: dict[str, list[float]] = {name: [] for name in arms}
        for index in range(9):
            for name, work in arms.items() if index % 2 else reversed(arms.items()):
                started = time.perf_counter()
                work()
                samples[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {"first compile s": first, "first call at a new size s": new_size,
            "step ms warmed": medians["warmed"] * 1000, "step ms new size": medians["new size"] * 1000,
            "step ÷ eager, warmed size": medians["warmed"] / medians["warmed eager"],
            "step ÷ eager, new size": medians["new size"] / medians["new size eager"]}


def flux_child(regional: bool, cache: str) -> dict[str, float]:
    """FLUX.1's block count at tiny widths: compile time grows with the graph's blocks, not their width."""
    from serving import compiled, tiny_flux

    compiled.use_cache_dir(Path(cache))
    transformer = tiny_flux.build_flux_transformer(num_layers=FLUX_DOUBLE_BLOCKS, num_single_layers=FLUX_SINGLE_BLOCKS)
    eager = transformer.forward
    modules = compiled.compile_modules(transformer, None, "default", regional=regional)
    tokens, text_tokens = (SIZE // 16) ** 2, 8
    inputs = {
        "hidden_states": torch.randn(1, tokens, tiny_flux.PACKED_CHANNELS),
        "encoder_hidden_states": torch.randn(1, text_tokens, transformer.config.joint_attention_dim),
        "pooled_projections": torch.randn(1, transformer.config.pooled_projection_dim),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.zeros(tokens, 3),
        "txt_ids": torch.zeros(text_tokens, 3),
        "return_dict": False,
    }
    with torch.no_grad():
        started = time.perf_counter()
        transformer(**inputs)
        first = time.perf_counter() - started
        modules.warmed()
        samples: dict[str, list[float]] = {"compiled": [], "eager": []}
        for index in range(9):
            for arm in ("compiled", "eager") if index % 2 else ("eager", "compiled"):
                forward = modules.gates[0] if arm == "compiled" else eager
                samples[arm].append(timed(torch.device("cpu"), lambda: forward(**inputs)))
    modules.close()
    compiled_step, eager_step = (statistics.median(samples[arm]) for arm in ("compiled", "eager"))
    return {"first compile s": first, "step ÷ eager": compiled_step / eager_step}


def parts(args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, float]]:
    from serving.tiny import make_tiny_model

    figures: dict[str, dict[str, float]] = {}
    if "service" in args.only:
        figures["service"] = service(workdir, args.loras, args.requests, args.regional)
        say(json.dumps(figures["service"]))
    if "unet" in args.only:
        figures["unet"] = unet(workdir, args.rounds, regional=True)
        say(json.dumps(figures["unet"]))
    model = str(make_tiny_model(workdir / "tiny-start", "sdxl", num_loras=0).pipeline_dir)
    if "start" in args.only:
        cache = str(workdir / "start-cache")
        figures["start"] = {
            "eager start s": _child(["start", model, "off", cache])["seconds"],
            "compiled start, cold cache s": _child(["start", model, "default", cache])["seconds"],
            "compiled start, warm cache s": _child(["start", model, "default", cache])["seconds"],
        }
        start = figures["start"]
        start["warm ÷ eager start"] = start["compiled start, warm cache s"] / start["eager start s"]
        say(json.dumps(start))
    if "shapes" in args.only:
        figures["shapes"] = {}
        for kind in ("static", "dynamic"):
            for key, value in _child(["shape", model, kind, str(workdir / f"{kind}-cache")]).items():
                figures["shapes"][f"{kind}: {key}"] = value
        say(json.dumps(figures["shapes"]))
    if "flux" in args.only:
        figures["flux"] = {}
        for kind in ("whole", "regional"):
            for key, value in _child(["flux", "-", kind, str(workdir / f"flux-{kind}-cache")]).items():
                figures["flux"][f"{kind}: {key}"] = value
        flux = figures["flux"]
        flux["first compile whole ÷ regional"] = flux["whole: first compile s"] / flux["regional: first compile s"]
        say(json.dumps(flux))
    return figures


def checks(figures: dict[str, dict[str, float]]) -> list[tuple[str, float, str, str]]:
    rows = []

    def against(name: str, value: float, target: str) -> None:
        op, bound = TARGETS[target]
        rows.append((name, value, f"{op} {bound:g}", verdict(value, op, bound)))

    if "service" in figures:
        against("recompiles after warm-up, 50-LoRA round robin",
                figures["service"]["recompiles after warm-up (metric)"], "cpu compile recompiles")
    if "unet" in figures:
        against("LoRA switch compile on ÷ off (SDXL U-Net)", figures["unet"]["switch compile on ÷ off"],
                "cpu compile LoRA switch on ÷ off")
        rows.append(("U-Net step compiled ÷ eager", figures["unet"]["U-Net step compiled ÷ eager"], "-", "INFO"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and rounds")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--only", default="service,unet,start,shapes,flux", help="comma-separated parts")
    parser.add_argument("--loras", type=int, default=50)
    parser.add_argument("--requests", type=int, default=0, help="per arm (default: two rounds of the LoRAs)")
    parser.add_argument("--rounds", type=int, default=0, help="U-Net switches and steps per arm")
    parser.add_argument("--regional", action="store_true", help="the service's compiled worker compiles regionally")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, model, option, cache = args.child
        if kind == "start":
            result = start_child(model, option, cache)
        elif kind == "flux":
            result = flux_child(option == "regional", cache)
        else:
            result = shape_child(model, option == "dynamic", cache)
        print(json.dumps(result))
        return 0
    args.only = set(args.only.split(","))
    args.requests = args.requests or (args.loras + 10 if args.quick else 2 * args.loras + 20)
    args.rounds = args.rounds or (3 if args.quick else 8)
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as folder:
        figures = parts(args, Path(folder))
    print(f"bench.compile on {os.cpu_count()} CPU(s), torch {torch.__version__}")
    for part, values in figures.items():
        for name, value in values.items():
            print(f"  {part:8} {name:55} {value:12.3f}")
    rows = checks(figures)
    for name, value, target, verdict in rows:
        print(f"  {verdict:5} {name:55} {value:10.3f}  target {target}")
    if args.json:
        args.json.write_text(json.dumps({"figures": figures, "checks": rows}, indent=2))
    return 0 if all(row[3] != "MISS" for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
