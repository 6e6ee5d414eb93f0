"""`python -m bench.previews [--device cuda --full] [--json PATH]`: what live previews cost a generation.

Previews must not slow a generation by more than 2%. The same request runs on the same
pipeline with previews on (the worker's default, `preview_interval_seconds` 1.0) and off (0),
the arms taken in turn so that drift on a shared machine hits both alike; the figure is the
median of each round's on ÷ off. Both arms go through what serving/app.py runs: the throttled
progress callback and `Previews.offer`/`take` on every step, so the only difference is the
previews themselves (a projection, a copy to the host, a JPEG). One preview's own cost is
timed apart as well.

The default model is the tiny SDXL of serving/tiny.py at 128×128 (a projection fitted to its
VAE, as any unreleased VAE gets); `--full` builds SDXL base's architecture with random weights
on the device (bench/gpu.py), whose VAE takes the published SDXL factors: the GPU figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.gpu import Config as GpuConfig
from bench.gpu import build_sdxl
from bench.inprocess import quiet
from bench.plan import GUIDANCE_SCALE, PROMPT, SEED
from core.config import Settings
from serving.app import throttled
from serving.pipelines import GenerationParams, LoadedPipeline, generate_result, load_pipeline
from serving.previews import Previews
from serving.tiny import make_tiny_model

GOAL = 1.02


def build(args: argparse.Namespace, workdir: Path) -> LoadedPipeline:
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if not args.full:
        model = make_tiny_model(workdir / "tiny-sdxl", "sdxl", num_loras=0)
        return load_pipeline(str(model.pipeline_dir), device=args.device, torch_dtype=dtype)
    config = GpuConfig(
        device=device, dtype=dtype, tiny=False, size=args.size, steps=args.steps, repeats=1, num_loras=0, sections=()
    )
    pipe = build_sdxl(config)
    pipe.set_progress_bar_config(disable=True)
    return LoadedPipeline(pipe, family="sdxl", model_name="random-weight SDXL base")


def params(args: argparse.Namespace) -> GenerationParams:
    return GenerationParams(
        prompt=PROMPT,
        width=args.size,
        height=args.size,
        num_inference_steps=args.steps,
        guidance_scale=GUIDANCE_SCALE,
        num_images=1,
        seed=SEED,
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Run:
    seconds: float
    previews: int
    # Spent making previews inside the denoising callback (on a GPU this includes waiting for the
    # queued steps at the copy to the host, which the end-to-end time may not lose).
    preview_seconds: float


def one_run(loaded: LoadedPipeline, args: argparse.Namespace, interval: float) -> Run:
    """One generation as the worker runs it."""
    previews = Previews(loaded.pipe.vae, loaded.family, interval_seconds=interval, max_side=args.max_side)
    made: list[bytes] = []
    inside = [0.0]

    def progress(step: int, total: int) -> None:
        started = time.perf_counter()
        preview = previews.take(step, total)
        inside[0] += time.perf_counter() - started
        if preview:
            made.append(preview)

    sync(args.device)
    started = time.perf_counter()
    generate_result(loaded, params(args), on_step=throttled(progress), on_latents=previews.offer)
    sync(args.device)
    return Run(time.perf_counter() - started, len(made), inside[0])


def preview_cost(loaded: LoadedPipeline, args: argparse.Namespace, repeats: int = 50) -> tuple[float, int]:
    """Milliseconds per preview (projection, copy, JPEG) of latents of the run's size, and the JPEG's bytes."""
    side = args.size // loaded.pipe.vae_scale_factor
    parameter = next(loaded.pipe.unet.parameters())
    latents = torch.randn(1, 4, side, side, device=parameter.device, dtype=parameter.dtype)
    previews = Previews(loaded.pipe.vae, loaded.family, interval_seconds=1.0, max_side=args.max_side)
    samples = []
    size = 0
    for _ in range(repeats):
        previews.offer(1, 1, latents)
        sync(args.device)
        started = time.perf_counter()
        size = len(previews.take(1, 1))
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000, size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.previews", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--full", action="store_true", help="SDXL base's architecture, random weights (a GPU run)")
    parser.add_argument("--size", type=int, help="image side (default 128; 1024 with --full)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 20; 30 with --full)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of off, on (after one warm-up each; default 8)")
    parser.add_argument(
        "--interval", type=float, default=Settings.preview_interval_seconds, help="preview_interval_seconds (on arm)"
    )
    parser.add_argument("--max-side", type=int, default=Settings.preview_max_side, help="preview_max_side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (a replica's CPUs; default 1)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures and samples here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.size = args.size or (1024 if args.full else 128)
    args.steps = args.steps or (30 if args.full else 20)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    quiet()
    with tempfile.TemporaryDirectory(prefix="bench-previews-") as tmp:
        loaded = build(args, Path(tmp))
        # Warm-up: kernels, allocator, the fitted projection of an unreleased VAE.
        one_run(loaded, args, 0.0)
        one_run(loaded, args, args.interval)
        off: list[Run] = []
        on: list[Run] = []
        for round_index in range(args.rounds):
            # Alternate which arm goes first, so a trend within a round favours neither.
            arms = [(0.0, off), (args.interval, on)]
            for interval, runs in arms if round_index % 2 == 0 else reversed(arms):
                runs.append(one_run(loaded, args, interval))
            print(
                f"round {round_index + 1}: off {off[-1].seconds:.3f} s, on {on[-1].seconds:.3f} s"
                f" ({on[-1].previews} previews, {on[-1].preview_seconds * 1000:.1f} ms making them)",
                file=sys.stderr,
            )
        per_preview_ms, jpeg_bytes = preview_cost(loaded, args)
    ratios = [a.seconds / b.seconds for a, b in zip(on, off, strict=True)]
    shares = [run.preview_seconds / run.seconds for run in on]
    figures: dict[str, Any] = {
        "model": "random-weight SDXL base" if args.full else "tiny SDXL (serving/tiny.py)",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "size": args.size,
        "steps": args.steps,
        "interval_seconds": args.interval,
        "off_median_s": statistics.median(run.seconds for run in off),
        "on_median_s": statistics.median(run.seconds for run in on),
        "on_over_off_median_of_rounds": statistics.median(ratios),
        "preview_share_of_on_runs": statistics.median(shares),
        "previews_per_run": statistics.median(run.previews for run in on),
        "ms_per_preview": per_preview_ms,
        "preview_jpeg_bytes": jpeg_bytes,
        "goal": GOAL,
        "samples": {"off": [asdict(run) for run in off], "on": [asdict(run) for run in on], "ratios": ratios},
    }
    ratio = figures["on_over_off_median_of_rounds"]
    print(
        f"{figures['model']} {args.size}x{args.size}, {args.steps} steps on {figures['device']}:"
        f" off {figures['off_median_s']:.3f} s, on {figures['on_median_s']:.3f} s"
        f" ({figures['previews_per_run']:g} previews per run, {per_preview_ms:.2f} ms and {jpeg_bytes} bytes each,"
        f" {figures['preview_share_of_on_runs']:.2%} of a run); on ÷ off {ratio:.3f}"
        f" (goal ≤ {GOAL}: {'PASS' if ratio <= GOAL else 'MISS'})"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
