"""Starts the real service on this machine and measures P1–P4 side by side in one run.

The service is what `loraserve serve` runs (EmbeddedService: local Ray, Serve workers with
their gRPC ingress, the gateway on loopback) with its own temporary data directory and free
ports. Callers use `loraserve.client.AsyncClient`. Arms of a comparison run in interleaved
blocks (order reversed every other round), so drift on a shared machine hits all arms alike.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import platform
import random
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import stats
from bench.plan import GUIDANCE_SCALE, PHASES, PROMPT, SEED, Plan
from bench.stats import Row, median, ms, percentile, row
from bench.targets import TARGETS

_STARTED = time.perf_counter()


def say(message: str) -> None:
    print(f"[bench {time.perf_counter() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree_cpu_seconds() -> float | None:
    """CPU time (user + system) of this process and all its children: the gateway, Ray and the replica."""
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def machine_cpu_seconds() -> tuple[float, float] | None:
    """Busy CPU seconds of the whole machine so far (every process, the kernel included) and steal time.

    Minus `tree_cpu_seconds` this is what processes outside the run took while it measured: on
    a shared 2-core machine another job slows the replica (and the gateway, the proxy) more than
    the single in-process thread, so every ratio against an in-process reference is inflated.
    """
    try:
        import psutil
    except ImportError:
        return None
    times = psutil.cpu_times()
    # Interrupt time is left out: with IRQ time accounting the kernel charges it to no process, so
    # the loopback traffic of the run's own gRPC calls would otherwise count as someone else's.
    busy = times.user + times.nice + times.system
    return busy, getattr(times, "steal", 0.0)


@dataclass
class Load:
    """CPU seconds other processes (and the hypervisor, as steal) took while arms were measured."""

    other_cpu_s: float = 0.0
    steal_s: float = 0.0
    wall_s: float = 0.0

    def cores(self) -> tuple[float, float]:
        """Average cores busy with other processes, and stolen, over the measured time."""
        if self.wall_s <= 0:
            return 0.0, 0.0
        return self.other_cpu_s / self.wall_s, self.steal_s / self.wall_s


@dataclass
class Arm:
    """One side of a comparison: an async call that returns the seconds it measured."""

    name: str
    call: Callable[[], Awaitable[float]]
    seconds: list[float] = field(default_factory=list)
    # `paired_rounds`: an untimed call made right before each timed one.
    lead_in: Callable[[], Awaitable[float]] | None = None
    # CPU seconds per call of every process of the run, one figure per block.
    cpu_per_call: list[float] = field(default_factory=list)
    # CPU seconds per call of the machine's other processes, one figure per block.
    other_cpu_per_call: list[float] = field(default_factory=list)

    def p(self, q: float) -> float:
        return percentile(ms(self.seconds), q)

    def cpu_ms(self) -> float | None:
        return median(ms(self.cpu_per_call)) if self.cpu_per_call else None

    def other_cpu_ms(self) -> float | None:
        return median(ms(self.other_cpu_per_call)) if self.other_cpu_per_call else None


async def interleave(
    phase: str, arms: Sequence[Arm], *, rounds: int, block: int, warmup: int, load: Load | None = None
) -> None:
    """Warm every arm, then `rounds` × (`block` calls of each arm); every other round runs the arms backwards.

    `load` adds up what other processes took meanwhile.
    """
    for arm in arms:
        for _ in range(warmup):
            await arm.call()
    say(f"{phase}: warmed up ({warmup} call(s) per arm), measuring {rounds}×{block} per arm")
    total = rounds * block * len(arms)
    done = 0
    for index in range(rounds):
        order = arms if index % 2 == 0 else list(reversed(arms))
        for arm in order:
            machine_before, cpu_before = machine_cpu_seconds(), tree_cpu_seconds()
            wall_before = time.perf_counter()
            for _ in range(block):
                arm.seconds.append(await arm.call())
                done += 1
            wall = time.perf_counter() - wall_before
            cpu_after, machine_after = tree_cpu_seconds(), machine_cpu_seconds()
            if cpu_before is not None and cpu_after is not None:
                arm.cpu_per_call.append((cpu_after - cpu_before) / block)
                if machine_before is not None and machine_after is not None:
                    other = max(0.0, (machine_after[0] - machine_before[0]) - (cpu_after - cpu_before))
                    arm.other_cpu_per_call.append(other / block)
                    if load is not None:
                        load.other_cpu_s += other
                        load.steal_s += machine_after[1] - machine_before[1]
                        load.wall_s += wall
        say(f"{phase}: {done}/{total} timed calls (round {index + 1}/{rounds})")



async def paired_rounds(
    phase: str, arms: Sequence[Arm], *, rounds: int, warmup: int, seed: int = SEED, load: Load | None = None
) -> None:
    """Warm every arm, then `rounds` × one timed call of each arm, in an order drawn afresh each round.

    One timed call per arm per round keeps the arms' calls seconds apart, so a burst of other work
    on a shared machine hits a round's calls alike (see `drift_adjusted`); a random order, unlike a
    fixed or reversed one, puts every arm after every other equally often. An arm's `lead_in`, an
    untimed call of its own kind, runs right before its timed call, so every timed call follows
    the same kind of call as the other arms' do.
    """
    for arm in arms:
        for _ in range(warmup):
            await arm.call()
    say(f"{phase}: warmed up ({warmup} call(s) per arm), measuring {rounds} rounds of one call per arm")
    order = random.Random(seed)
    for index in range(rounds):
        machine_before, cpu_before = machine_cpu_seconds(), tree_cpu_seconds()
        wall_before = time.perf_counter()
        for arm in order.sample(list(arms), len(arms)):
            if arm.lead_in is not None:
                await arm.lead_in()
            arm.seconds.append(await arm.call())
        wall = time.perf_counter() - wall_before
        cpu_after, machine_after = tree_cpu_seconds(), machine_cpu_seconds()
        if load is not None and None not in (cpu_before, cpu_after, machine_before, machine_after):
            assert cpu_before is not None and cpu_after is not None
            assert machine_before is not None and machine_after is not None
            load.other_cpu_s += max(0.0, (machine_after[0] - machine_before[0]) - (cpu_after - cpu_before))
            load.steal_s += machine_after[1] - machine_before[1]
            load.wall_s += wall
        if (index + 1) % 10 == 0 or index + 1 == rounds:
            say(f"{phase}: {index + 1}/{rounds} rounds")


def drift_adjusted_samples(samples: Sequence[Sequence[float]]) -> list[list[float]]:
    """`drift_adjusted` on samples in ms, one list per arm, one value per round."""
    per_round = list(zip(*samples))
    means = [sum(calls) / len(calls) for calls in per_round]
    typical = median(means)
    return [[calls[i] * typical / mean for calls, mean in zip(per_round, means)] for i in range(len(samples))]


def ratio_interval(
    arms: Sequence[Arm], *, numerator: int, denominator: int, resamples: int = 1000, seed: int = SEED
) -> tuple[float, float]:
    """5th and 95th percentiles of the drift-adjusted p50 ratio over rounds resampled with replacement.

    How far the figure could move in a rerun under the same load: when the interval straddles a
    target, the run cannot decide it, whatever its verdict says.
    """
    samples = [ms(arm.seconds) for arm in arms]
    rounds = len(samples[0])
    draw = random.Random(seed)
    ratios: list[float] = []
    for _ in range(resamples):
        picked = [draw.randrange(rounds) for _ in range(rounds)]
        adjusted = drift_adjusted_samples([[arm[i] for i in picked] for arm in samples])
        ratios.append(median(adjusted[numerator]) / median(adjusted[denominator]))
    return percentile(ratios, 5), percentile(ratios, 95)


def drift_adjusted(arms: Sequence[Arm]) -> list[list[float]]:
    """Each arm's calls in ms with each round's common slowdown taken out (`paired_rounds`' samples).

    A round's calls are scaled by (median round mean ÷ that round's mean): a round slowed by 20%
    as a whole counts like any other, while what differs between the arms within a round stays.
    """
    return drift_adjusted_samples([ms(arm.seconds) for arm in arms])


def request_input(model_dir: Path, size: int, steps: int, loras: Sequence[Path] = ()) -> Any:
    from loraserve.inputs import to_input

    return to_input(
        {
            "model_name": str(model_dir),
            "prompt": PROMPT,
            "image_size": {"width": size, "height": size},
            "num_inference_steps": steps,
            "guidance_scale": GUIDANCE_SCALE,
            "seed": SEED,
            "loras": [{"path": str(path), "scale": 1.0} for path in loras],
        }
    )


@dataclass
class Served:
    """What the service said about the requests of one arm, beyond the caller's clock."""

    inference_s: list[float] = field(default_factory=list)
    queue_wait_s: list[float] = field(default_factory=list)
    model_loads: int = 0


def image_mismatch(a: Any, b: Any, what: str) -> str:
    """`stats.same_image` of two int16 RGB arrays: "" when they agree, else why not."""
    if a.shape != b.shape:
        return f"{what}: shapes {a.shape} and {b.shape}"
    diff = abs(a - b)
    return stats.same_image(float(diff.mean()), float(diff.max()), what)


def lora_changed_nothing(with_lora: Any, without: Any, what: str) -> str:
    """A LoRA request whose image agrees with the no-LoRA one did not apply its LoRA (the tiny LoRAs change every image)."""
    return "" if image_mismatch(with_lora, without, what) else f"{what}: the LoRA changed nothing"


class Bench:
    def __init__(self, plan: Plan, client: Any, workdir: Path, files_dir: Path) -> None:
        self.plan = plan
        self.client = client
        self.workdir = workdir
        # Where the gateway stores result images (the checks read them back: the default format is PNG).
        self.files_dir = files_dir
        self.rows: list[Row] = []
        self.arms: dict[str, dict[str, Any]] = {}
        self.load = Load()

    async def subscribe(self, inp: Any, served: Served | None = None, logs: bool = False) -> float:
        """End-to-end Subscribe (submit, every status update, the result), timed by the caller."""
        from loraserve.v1 import generation_pb2

        last: list[Any] = []
        load_lines = 0

        def on_update(status: Any) -> None:
            nonlocal load_lines
            last[:] = [status]
            load_lines += sum(entry.message.startswith("loaded base model") for entry in status.logs)

        started = time.perf_counter()
        result = await self.client.subscribe(inp, on_queue_update=on_update, logs=logs)
        elapsed = time.perf_counter() - started
        if not result.data.images:
            raise RuntimeError(f"request {result.request_id} returned no image")
        if served is not None and last and last[0].state == generation_pb2.REQUEST_STATE_COMPLETED:
            served.inference_s.append(last[0].metrics.inference_seconds)
            served.queue_wait_s.append(last[0].metrics.queue_wait_seconds)
            served.model_loads += load_lines
        return elapsed

    async def served_pixels(self, inp: Any) -> Any:
        """The service's image for `inp` as an int16 RGB array (untimed), read back from the gateway's files."""
        import numpy as np
        from PIL import Image

        result = await self.client.subscribe(inp)
        key = urlsplit(result.data.images[0].url).path.split("/files/", 1)[1]
        with Image.open(self.files_dir / key) as image:
            return np.asarray(image.convert("RGB"), dtype=np.int16)

    def record(self, phase: str, arms: Sequence[Arm]) -> None:
        for arm in arms:
            self.arms[f"{phase}: {arm.name}"] = {
                "n": len(arm.seconds),
                "p50_ms": round(arm.p(50), 3),
                "p95_ms": round(arm.p(95), 3),
                "p99_ms": round(arm.p(99), 3),
                "cpu_ms_per_call_all_processes": None if (cpu := arm.cpu_ms()) is None else round(cpu, 1),
                "cpu_ms_per_call_other_processes": None if (other := arm.other_cpu_ms()) is None else round(other, 1),
                "samples_ms": [round(v, 3) for v in ms(arm.seconds)],
            }

    # P1 ------------------------------------------------------------------------------------
    async def p1(self, model_dir: Path, plain: Any) -> None:
        from bench import inprocess

        plan = self.plan
        inp = request_input(model_dir, plan.p1_size, plan.p1_steps)
        served = Served()
        warm = [True] * plan.warmup

        async def service_call() -> float:
            # Warm-up calls (the first one loads the model in the replica) stay out of the replica figures.
            return await self.subscribe(inp, None if warm and warm.pop() else served)

        arms = [
            Arm("service Subscribe", service_call),
            Arm(
                "in-process diffusers",
                lambda: asyncio.to_thread(inprocess.generate, plain, plan.p1_size, plan.p1_steps),
            ),
        ]
        say(f"P1 serving overhead: {plan.p1_size}x{plan.p1_size}, {plan.p1_steps} steps")
        await interleave("P1", arms, rounds=plan.p1_rounds, block=plan.p1_block, warmup=plan.warmup, load=self.load)
        self.record("P1", arms)
        service, local = arms
        mismatch = image_mismatch(
            await self.served_pixels(inp),
            await asyncio.to_thread(inprocess.pixels, plain, plan.p1_size, plan.p1_steps),
            "service vs in-process image",
        )
        n = {"service": len(service.seconds), "in-process": len(local.seconds)}
        inference = median(ms(served.inference_s))
        detail = (
            f"replica inference p50 {inference:.1f} ms ({inference - local.p(50):+.1f} vs in-process), "
            f"queue wait p50 {median(ms(served.queue_wait_s)):.1f} ms, rest {service.p(50) - inference:.1f} ms; "
            f"{plan.p1_size}px {plan.p1_steps} steps"
        )
        cpu_service, cpu_local = service.cpu_ms(), local.cpu_ms()
        cpu_detail = f"overhead p95 {service.p(95) - local.p(95):+.1f} ms"
        if cpu_service is not None and cpu_local is not None:
            cpu_detail += f"; CPU per request, all processes: {cpu_service:.0f} vs {cpu_local:.0f} ms"
        other_service, other_local = service.other_cpu_ms(), local.other_cpu_ms()
        if other_service is not None and other_local is not None:
            cpu_detail += f"; other processes' CPU per request: {other_service:.0f} vs {other_local:.0f} ms"
        for q in (50, 95):
            self.rows.append(
                row(
                    f"P1 serving overhead p{q}",
                    (f"Subscribe p{q}", service.p(q)),
                    (f"in-process p{q}", local.p(q)),
                    *TARGETS["P1 serving overhead"],
                    detail if q == 50 else cpu_detail,
                    n,
                    mismatch,
                )
            )

    # P2 ------------------------------------------------------------------------------------
    async def p2(self, model_dir: Path, loras: Sequence[Path], plain: Any, pristine_dir: Path) -> None:
        """The guard (tax, churn) in rounds on the replica's one pipeline (`paired_rounds`); the references after.

        What moved the guard's ratios by ±10% between runs was the shared machine, the order of the
        calls and a Prefetch call that a third of the LoRA requests made (now only a request that
        waits gets one), not the LoRAs (in-process a switch costs 2.5 ms of CPU in a 350 ms request,
        and the denoising that follows costs what it costs without one). In blocks of 4 in a fixed order,
        "no LoRA" always followed a request of the same pipeline and "pristine" an in-process one
        every other round; a request timed right after one identical to it ran about 6% faster
        than after another; and p50s of whole arms let a burst of other work
        land on one arm more than another.
        """
        from bench import inprocess

        plan = self.plan
        size, steps = plan.small_size, plan.small_steps
        say(f"P2 LoRA tax and churn: warming {len(loras)} LoRAs into the replica (1-step requests)")
        cold: list[float] = []
        for index, lora in enumerate(loras):
            cold.append(await self.subscribe(request_input(model_dir, size, 1, [lora])))
            if (index + 1) % 10 == 0 or index + 1 == len(loras):
                say(f"P2: {index + 1}/{len(loras)} LoRAs resident")
        none_input = request_input(model_dir, size, steps)
        # The same architecture with different random weights, never given a LoRA.
        pristine_input = request_input(pristine_dir, size, steps)
        one_input = request_input(model_dir, size, steps, [loras[0]])
        rr_inputs = [request_input(model_dir, size, steps, [lora]) for lora in loras]
        rr_next = itertools.cycle(rr_inputs)
        naive_next = itertools.cycle(loras)
        naive_pipe = await asyncio.to_thread(inprocess.load, model_dir)
        served = {name: Served() for name in ("none", "rr", "one", "pristine")}

        # Each timed call follows an untimed one of its own arm (`paired_rounds`); for "one LoRA
        # repeated" that is what makes it a repeat, as the pipeline keeps the last set's merge only.
        none = Arm(
            "service no LoRA",
            lambda: self.subscribe(none_input, served["none"]),
            lead_in=lambda: self.subscribe(none_input),
        )
        rr = Arm(
            f"service {len(loras)}-LoRA round-robin",
            lambda: self.subscribe(next(rr_next), served["rr"]),
            lead_in=lambda: self.subscribe(next(rr_next)),
        )
        one = Arm(
            "service one LoRA repeated",
            lambda: self.subscribe(one_input, served["one"]),
            lead_in=lambda: self.subscribe(one_input),
        )
        guard = [none, rr, one]
        say(f"P2: {size}x{size}, {steps} steps; guard: {plan.p2_rounds} rounds")
        await paired_rounds("P2", guard, rounds=plan.p2_rounds, warmup=plan.warmup, load=self.load)
        self.record("P2", guard)
        # The same work: each arm's image is the one in-process diffusers gives for its request (the LoRA
        # fused as the naive server does), and a LoRA request's image is not the no-LoRA one.
        images = {
            "none": await self.served_pixels(none_input),
            "one": await self.served_pixels(one_input),
            "rr": await self.served_pixels(request_input(model_dir, size, steps, [loras[-1]])),
        }
        local_none = await asyncio.to_thread(inprocess.pixels, plain, size, steps)
        none_same = image_mismatch(images["none"], local_none, "no LoRA vs in-process")
        one_same = "; ".join(
            filter(
                None,
                [
                    image_mismatch(
                        images["one"], await asyncio.to_thread(inprocess.pixels, naive_pipe, size, steps, loras[0]),
                        "one LoRA vs in-process fused",
                    ),
                    lora_changed_nothing(images["one"], local_none, "one LoRA"),
                ],
            )
        )
        rr_same = "; ".join(
            filter(
                None,
                [
                    image_mismatch(
                        images["rr"], await asyncio.to_thread(inprocess.pixels, naive_pipe, size, steps, loras[-1]),
                        "round-robin LoRA vs in-process fused",
                    ),
                    lora_changed_nothing(images["rr"], local_none, "round-robin LoRA"),
                ],
            )
        )
        adjusted = drift_adjusted(guard)
        spread = {
            "tax": ratio_interval(guard, numerator=1, denominator=0),
            "churn": ratio_interval(guard, numerator=2, denominator=1),
        }
        replica = {name: median(ms(s.inference_s)) for name, s in served.items() if s.inference_s}
        raw = f"raw p50 {rr.p(50):.1f} / {none.p(50):.1f} ms = {rr.p(50) / none.p(50):.3f}"
        self.rows.append(
            row(
                "P2 LoRA tax",
                (f"{len(loras)}-LoRA round-robin p50*", median(adjusted[1])),
                ("no LoRA p50*", median(adjusted[0])),
                *TARGETS["P2 LoRA tax"],
                f"*each round's drift removed, 90% of resampled rounds {spread['tax'][0]:.3f}-{spread['tax'][1]:.3f}; "
                f"{raw}; replica inference {replica['rr']:.1f} / {replica['none']:.1f} ms "
                f"= {replica['rr'] / replica['none']:.3f}; tiny {plan.p2_family} {size}px {steps} steps",
                {"rr": len(rr.seconds), "none": len(none.seconds)},
                "; ".join(filter(None, [rr_same, none_same])),
            )
        )
        self.rows.append(
            row(
                "P2 LoRA churn",
                ("one LoRA repeated p50*", median(adjusted[2])),
                (f"{len(loras)}-LoRA round-robin p50*", median(adjusted[1])),
                *TARGETS["P2 LoRA churn"],
                f"*each round's drift removed, 90% of resampled rounds {spread['churn'][0]:.3f}-{spread['churn'][1]:.3f}; "
                f"raw p50 {one.p(50):.1f} / {rr.p(50):.1f} ms = "
                f"{one.p(50) / rr.p(50):.3f}; replica inference {replica['one']:.1f} / {replica['rr']:.1f} ms",
                {"one": len(one.seconds), "rr": len(rr.seconds)},
                "; ".join(filter(None, [one_same, rr_same])),
            )
        )

        # The references, informational: another model, plain diffusers and the naive server in-process.
        ref_none = Arm("service no LoRA (references)", lambda: self.subscribe(none_input))
        ref_rr = Arm(f"service {len(loras)}-LoRA round-robin (references)", lambda: self.subscribe(next(rr_next)))
        pristine = Arm(
            "service no LoRA, model never given one", lambda: self.subscribe(pristine_input, served["pristine"])
        )
        local = Arm("in-process no LoRA", lambda: asyncio.to_thread(inprocess.generate, plain, size, steps))
        naive = Arm(
            "in-process naive load/fuse/unfuse/unload",
            lambda: asyncio.to_thread(inprocess.naive_lora, naive_pipe, next(naive_next), size, steps),
        )
        references = [ref_none, ref_rr, pristine, local, naive]
        await interleave(
            "P2 references",
            references,
            rounds=plan.p2_reference_rounds,
            block=plan.p2_block,
            warmup=plan.warmup,
            load=self.load,
        )
        self.record("P2", references)
        self.rows.append(
            row(
                "P2 LoRA tax vs pristine (info)",
                (f"{len(loras)}-LoRA round-robin p50", ref_rr.p(50)),
                ("no LoRA, no adapters p50", pristine.p(50)),
                detail=(
                    f"no LoRA with {len(loras)} resident ÷ no adapters: {ref_none.p(50) / pristine.p(50):.3f} "
                    f"(replica inference of the model never given one {median(ms(served['pristine'].inference_s)):.1f} ms)"
                ),
                samples={"rr": len(ref_rr.seconds), "pristine": len(pristine.seconds)},
            )
        )
        tenth = max(1, len(cold) // 5)
        self.rows.append(
            row(
                "P2 cold LoRA load (info)",
                (f"LoRA #{len(cold) - tenth + 1}-{len(cold)} p50", median(ms(cold[-tenth:]))),
                (f"LoRA #1-{tenth} p50", median(ms(cold[:tenth]))),
                detail=f"first request of each LoRA (1 step) while {len(cold)} become resident, in order",
                samples={"late": tenth, "early": tenth},
            )
        )
        self.rows.append(
            row(
                "P2 naive server (info)",
                ("naive in-process p50", naive.p(50)),
                ("in-process no LoRA p50", local.p(50)),
                detail=(f"reference 2.0-2.4; service round-robin ÷ naive {ref_rr.p(50) / naive.p(50):.3f}"),
                samples={"naive": len(naive.seconds), "in-process": len(local.seconds)},
            )
        )

    # P3 ------------------------------------------------------------------------------------
    async def p3(self, model_b: Path, model_c: Path) -> None:
        from bench import inprocess

        plan = self.plan
        size, steps = plan.small_size, plan.small_steps
        inputs = {model_b: request_input(model_b, size, steps), model_c: request_input(model_c, size, steps)}
        other = {model_b: model_c, model_c: model_b}
        last = [model_b]
        reload_next = itertools.cycle([model_b, model_c])
        served = {name: Served() for name in ("one", "alternating")}

        async def one() -> float:
            last[0] = model_b
            return await self.subscribe(inputs[model_b], served["one"], logs=True)

        async def alternating() -> float:
            # Always the model the previous service request did not use: every call is a switch.
            last[0] = other[last[0]]
            return await self.subscribe(inputs[last[0]], served["alternating"], logs=True)

        say(f"P3 base-model churn: loading two base models into the replica ({size}x{size}, {steps} steps)")
        await self.subscribe(inputs[model_b])
        await self.subscribe(inputs[model_c])
        arms = [
            Arm("service one base model", one),
            Arm("service two base models alternating", alternating),
            Arm(
                "in-process reload per switch",
                lambda: asyncio.to_thread(inprocess.reload_and_generate, next(reload_next), size, steps),
            ),
        ]
        await interleave("P3", arms, rounds=plan.p3_rounds, block=plan.p3_block, warmup=plan.warmup, load=self.load)
        self.record("P3", arms)
        single, alt, reload = arms
        reloads = served["alternating"].model_loads + served["one"].model_loads
        # Keeping two models resident means no reload while measuring; and the service's image of the
        # second model is the one that reloading it in-process gives.
        kept = stats.verdict(reloads, *TARGETS["P3 replica reloads"]) == stats.PASS
        mismatch = "; ".join(
            filter(
                None,
                [
                    "" if kept else f"{reloads} replica reloads while measuring (none allowed)",
                    image_mismatch(
                        await self.served_pixels(inputs[model_c]),
                        await asyncio.to_thread(inprocess.pixels, await asyncio.to_thread(inprocess.load, model_c), size, steps),
                        "second model vs in-process",
                    ),
                ],
            )
        )
        self.rows.append(
            row(
                "P3 base-model churn",
                ("one model p50", single.p(50)),
                ("two alternating p50", alt.p(50)),
                *TARGETS["P3 base-model churn"],
                f"replica reloads while measuring: {reloads}; replica inference "
                f"{median(ms(served['one'].inference_s)):.1f} / {median(ms(served['alternating'].inference_s)):.1f} ms",
                {"one": len(single.seconds), "alternating": len(alt.seconds)},
                mismatch,
            )
        )
        self.rows.append(
            row(
                "P3 vs reload per switch (info)",
                ("two alternating p50", alt.p(50)),
                ("reload per switch p50", reload.p(50)),
                detail="reload = in-process from_pretrained + generate; tiny model, so loading is cheap here",
                samples={"alternating": len(alt.seconds), "reload": len(reload.seconds)},
            )
        )

    # P4 ------------------------------------------------------------------------------------
    async def p4(self, model_dir: Path, client: Any, engine: str, gateway: Any) -> dict[str, Arm]:
        """Submit and GetStatus at 10, 10,000 and 100,000 waiting, in interleaved rounds, on `gateway`, whose
        store is `engine` (SQLite or PostgreSQL); returns the arms for comparisons across engines.

        The queue is filled to the large depth and cancelled back down between rounds (order
        small, large | large, small | ...), so a noisy minute on this shared machine lands on
        both depths instead of on whichever was measured last: the p99 of sub-millisecond calls
        swung 1.2-3.5x between identical runs that measured the depths one after the other.
        """
        from bench.bulk_queue import add_waiting, remove_waiting
        from loraserve.v1 import generation_pb2

        plan = self.plan
        hold_input = request_input(model_dir, plan.p4_hold_size, plan.p4_hold_steps)
        small_input = request_input(model_dir, plan.small_size, 1)
        say(f"P4 queue scale ({engine}): occupying the replica with a {plan.p4_hold_steps}-step {plan.p4_hold_size}px job")
        hold_id = await client.submit(hold_input)
        deadline = time.monotonic() + 120
        while (await client.status(hold_id)).state != generation_pb2.REQUEST_STATE_IN_PROGRESS:
            if time.monotonic() > deadline:
                raise RuntimeError("the P4 hold job did not start within 120 s")
            await asyncio.sleep(0.05)
        waiting: list[str] = []
        rng = random.Random(0)

        async def fill(depth: int) -> None:
            """Submit until `depth` requests wait, `p4_concurrency` in flight over the one channel."""
            next_report = [len(waiting) + 2500]

            async def worker() -> None:
                while len(waiting) < depth:
                    waiting.append("")  # reserve the slot before awaiting
                    slot = len(waiting) - 1
                    waiting[slot] = await client.submit(small_input)
                    if len(waiting) >= next_report[0]:
                        next_report[0] += 2500
                        say(f"P4: {len(waiting)}/{depth} requests waiting")

            await asyncio.gather(*(worker() for _ in range(min(plan.p4_concurrency, depth - len(waiting)))))

        async def drain(depth: int) -> None:
            """Cancel the newest waiting requests until `depth` are left."""
            newest = waiting[depth:]
            del waiting[depth:]
            await self._cancel_all(client, newest)

        copies: list[str] = []
        # Depths the store reported that differ from the one measured (none expected).
        wrong_depth: list[str] = []

        async def reach(depth: int) -> None:
            """`depth` requests waiting: Submitted or cancelled up to the large depth, copied in the store past it."""
            settings = gateway.settings
            if depth > large_depth:
                if not copies:
                    await reach(large_depth)
                    copies.extend(
                        await add_waiting(
                            gateway.store, settings.store_url, settings.store_path, waiting[-1], depth - large_depth
                        )
                    )
                    position = (await client.status(copies[-1])).queue_position
                    say(f"P4: {len(waiting) + len(copies)} waiting, {len(copies)} of them copied (last at position {position})")
                return
            if copies:
                await remove_waiting(gateway.store, settings.store_url, settings.store_path)
                copies.clear()
            if len(waiting) < depth:
                await fill(depth)
                position = (await client.status(waiting[-1])).queue_position
                say(f"P4: {len(waiting)} waiting (last at position {position})")
            elif len(waiting) > depth:
                await drain(depth)

        async def measure(submit: Arm, status: Arm, samples: int, warmup: int) -> None:
            probes = waiting + copies
            depth = await gateway.store.waiting_count()
            if depth != len(probes):
                wrong_depth.append(f"{depth} waiting where {len(probes)} were meant to")
            for index in range(samples + warmup):
                started = time.perf_counter()
                request_id = await client.submit(small_input)
                submitted = time.perf_counter() - started
                await client.cancel(request_id)  # untimed: keeps the queue at its depth
                probe = probes[rng.randrange(len(probes))]
                started = time.perf_counter()
                reply = await client.status(probe)
                looked_up = time.perf_counter() - started
                if reply.state != generation_pb2.REQUEST_STATE_IN_QUEUE:
                    raise RuntimeError(f"P4: a waiting request left the queue ({reply.state}); the replica is free")
                if index >= warmup:
                    submit.seconds.append(submitted)
                    status.seconds.append(looked_up)

        small_depth, large_depth, huge_depth = plan.p4_small_waiting, plan.p4_large_waiting, plan.p4_huge_waiting
        depths = (small_depth, large_depth, huge_depth)
        arms = {
            depth: (Arm(f"{engine} Submit @{depth}", _never), Arm(f"{engine} GetStatus @{depth}", _never))
            for depth in depths
        }
        per_round = math.ceil(plan.p4_samples / plan.p4_rounds)
        await fill(small_depth)
        for index in range(plan.p4_rounds):
            for depth in depths if index % 2 == 0 else depths[::-1]:
                await reach(depth)
                await measure(*arms[depth], per_round, plan.warmup * 10)
            say(f"P4: round {index + 1}/{plan.p4_rounds}, {per_round} Submit + GetStatus calls per depth")
        hold = await client.status(hold_id)
        say(f"P4: cancelling {len(waiting)} waiting requests and the hold job (at step {hold.progress.step})")
        if copies:
            await remove_waiting(gateway.store, gateway.settings.store_url, gateway.settings.store_path)
        await self._cancel_all(client, waiting)
        await client.cancel(hold_id)
        if hold.state != generation_pb2.REQUEST_STATE_IN_PROGRESS:
            raise RuntimeError("P4: the hold job ended while measuring; the queue was not held")
        small = arms[small_depth]
        self.record("P4", [arm for depth in depths for arm in arms[depth]])
        for depth in (large_depth, huge_depth):
            deep = arms[depth]
            at = "" if depth == large_depth else f" @{depth}"
            for name, at_small, at_deep in (("Submit", small[0], deep[0]), ("GetStatus", small[1], deep[1])):
                for q in (99, 50):
                    self.rows.append(
                        row(
                            f"P4 {name} p{q} ({engine}){at}",
                            (f"p{q} @{depth} waiting", at_deep.p(q)),
                            (f"p{q} @{small_depth} waiting", at_small.p(q)),
                            *TARGETS["P4 queue scale"],
                            f"sequential calls, one in flight, {plan.p4_rounds} interleaved rounds"
                            + ("" if depth == large_depth else f"; {depth - large_depth} waiting copied into the store"),
                            {"large": len(at_deep.seconds), "small": len(at_small.seconds)},
                            "; ".join(wrong_depth),
                        )
                    )
        return {"submit": small[0], "status": small[1]}

    def p4_engines(self, sqlite: dict[str, Arm], postgres: dict[str, Arm]) -> None:
        """What a Submit costs on the shared store, next to the embedded one (PostgreSQL's synchronous commit
        against SQLite's fsync'd WAL commit, plus a round trip over loopback)."""
        for name, key in (("Submit", "submit"), ("GetStatus", "status")):
            self.rows.append(
                row(
                    f"P4 {name} p50 PostgreSQL ÷ SQLite",
                    (f"PostgreSQL p50 @{self.plan.p4_small_waiting}", postgres[key].p(50)),
                    (f"SQLite p50 @{self.plan.p4_small_waiting}", sqlite[key].p(50)),
                    detail="no target: what several gateways cost per call",
                    samples={"postgres": len(postgres[key].seconds), "sqlite": len(sqlite[key].seconds)},
                )
            )

    async def _cancel_all(self, client: Any, request_ids: Sequence[str]) -> None:
        pending = iter(request_ids)
        done = [0]

        async def worker() -> None:
            for request_id in pending:
                await client.cancel(request_id)
                done[0] += 1
                if done[0] % 2500 == 0:
                    say(f"P4: cancelled {done[0]}/{len(request_ids)}")

        await asyncio.gather(*(worker() for _ in range(self.plan.p4_concurrency)))


async def _p4_on_postgres(bench: Bench, model_dir: Path, settings: Any, workdir: Path) -> dict[str, Arm] | None:
    """P4 again on a second gateway whose store is a throwaway PostgreSQL server, in front of the same workers."""
    from gateway.server import Gateway
    from loraserve.client import AsyncClient
    from tests.postgres_server import PostgresServer, find_bin_dir

    bin_dir = find_bin_dir()
    if bin_dir is None:
        say("P4 on PostgreSQL skipped: no PostgreSQL server installed (Debian's `postgresql` package)")
        return None
    with PostgresServer(bin_dir) as server:
        gateway = Gateway(
            settings.replace(
                data_dir=workdir / "data-pg",
                grpc_port=free_port(),
                http_port=free_port(),
                store_url=server.fresh_database(),
            )
        )
        await gateway.start()
        try:
            async with AsyncClient(f"127.0.0.1:{gateway.grpc_port}") as client:
                return await bench.p4(model_dir, client, "PostgreSQL", gateway)
        finally:
            await gateway.stop(grace_seconds=0)


async def _never() -> float:
    raise AssertionError("P4 arms are timed by hand")


def ray_worker_torch_threads(num_cpus: float) -> int:
    """torch's thread count in a Ray worker given `num_cpus`, as the replica gets it (same OMP_NUM_THREADS rule)."""
    import ray

    @ray.remote(num_cpus=num_cpus)
    def threads() -> int:
        import torch

        return int(torch.get_num_threads())

    return int(ray.get(threads.remote()))


def _versions() -> dict[str, str]:
    import diffusers
    import peft
    import ray
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "ray": ray.__version__,
    }


async def run(
    plan: Plan,
    *,
    phases: Sequence[str] = PHASES,
    replica_cpus: int = 1,
    verbose: bool = False,
    keep_workdir: bool = False,
) -> tuple[list[Row], dict[str, Any]]:
    """Builds the tiny models, starts the service, runs the phases (P1–P4), stops it; returns rows and metadata."""
    workdir = Path(tempfile.mkdtemp(prefix="loraserve-bench-"))
    try:
        rows, meta = await _run(plan, workdir, set(phases), replica_cpus, verbose)
    finally:
        if not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    meta["workdir"] = str(workdir) if keep_workdir else None
    return rows, meta


async def _run(
    plan: Plan, workdir: Path, phases: set[str], replica_cpus: int, verbose: bool
) -> tuple[list[Row], dict[str, Any]]:
    import ray

    from bench import inprocess
    from loraserve.client import AsyncClient
    from core.config import Settings
    from entrypoints.embedded import EmbeddedService
    from serving.tiny import make_tiny_model

    wall_started = time.time()
    threads = max(1, math.floor(replica_cpus))
    inprocess.use_threads(threads)
    # Ray gives a worker OMP_NUM_THREADS = its CPUs only when the driver's environment has none; a
    # caller's own value (scripts/test.sh exports 1) would reach the replica unchanged and its torch
    # would run a different number of threads than the in-process references. Same count on both sides.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    inprocess.quiet()
    load_before = os.getloadavg()
    say(f"building tiny SDXL models in {workdir} (three plain)")
    model_a = await asyncio.to_thread(make_tiny_model, workdir / "model-a", "sdxl", 0, 0)
    model_b = await asyncio.to_thread(make_tiny_model, workdir / "model-b", "sdxl", 0, 1)
    model_c = await asyncio.to_thread(make_tiny_model, workdir / "model-c", "sdxl", 0, 2)
    plain = await asyncio.to_thread(inprocess.load, model_a.pipeline_dir)
    if "P2" in phases:
        say(f"building P2's tiny {plan.p2_family} models (one with {plan.num_loras} LoRAs, one never given one)")
        p2_model = await asyncio.to_thread(
            make_tiny_model, workdir / "p2-model", plan.p2_family, plan.num_loras, 3
        )
        p2_pristine = await asyncio.to_thread(make_tiny_model, workdir / "p2-pristine", plan.p2_family, 0, 4)
        p2_plain = await asyncio.to_thread(inprocess.load, p2_model.pipeline_dir)

    ray_cpus = max(2, threads + 1)
    settings = Settings(
        data_dir=workdir / "data",
        grpc_port=free_port(),
        http_port=free_port(),
        ray_num_cpus=ray_cpus,
        serve_grpc_port=free_port(),
        serve_http_port=free_port(),
        replica_num_cpus=float(replica_cpus),
        device="cpu",
        max_pipelines_per_replica=2,
        shutdown_grace_seconds=5,
        log_level="WARNING",
        # P4 Submits with p4_huge_waiting requests waiting; the default (100,000) would refuse them.
        max_queue_size=2 * plan.p4_huge_waiting,
    )
    # Same local Ray start_workers() would begin, minus forwarding every replica log line to this terminal.
    ray.init(num_cpus=ray_cpus, include_dashboard=False, log_to_driver=verbose, logging_level="WARNING")
    worker_threads = await asyncio.to_thread(ray_worker_torch_threads, replica_cpus)
    if worker_threads != threads:
        ray.shutdown()
        raise RuntimeError(
            f"a Ray worker with {replica_cpus} CPU(s) runs torch on {worker_threads} thread(s), the in-process "
            f"references on {threads}: P1 and the naive-server row would compare different thread counts"
        )
    say(f"starting the service (local Ray with {ray_cpus} CPUs, one replica with {replica_cpus} CPU)")
    bench: Bench | None = None
    async with EmbeddedService(settings) as service:
        target = f"127.0.0.1:{service.gateway.grpc_port}"
        say(f"service ready on {target}")
        async with AsyncClient(target) as client:
            bench = Bench(plan, client, workdir, settings.files_dir)
            if "P1" in phases:
                await bench.p1(model_a.pipeline_dir, plain)
            if "P2" in phases:
                await bench.p2(p2_model.pipeline_dir, p2_model.lora_paths, p2_plain, p2_pristine.pipeline_dir)
            if "P3" in phases:
                await bench.p3(model_b.pipeline_dir, model_c.pipeline_dir)
            if "P4" in phases:
                sqlite = await bench.p4(model_b.pipeline_dir, client, "SQLite", service.gateway)
                postgres = await _p4_on_postgres(bench, model_b.pipeline_dir, service.settings, workdir)
                if postgres is not None:
                    bench.p4_engines(sqlite, postgres)
        say("stopping the service")
    meta = {
        "command": " ".join(sys.argv),
        "quick": plan.quick,
        "phases": sorted(phases),
        "plan": plan.to_dict(),
        "cpu_count": os.cpu_count(),
        "torch_threads_in_process": threads,
        "torch_threads_ray_worker": worker_threads,
        "replica_num_cpus": replica_cpus,
        "versions": _versions(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall_started)),
        "wall_seconds": round(time.time() - wall_started, 1),
        "loadavg_1_5_15_before": [round(v, 2) for v in load_before],
        "loadavg_1_5_15_after": [round(v, 2) for v in os.getloadavg()],
        "other_processes_cores_while_measuring": round(bench.load.cores()[0], 3),
        "steal_cores_while_measuring": round(bench.load.cores()[1], 3),
        "arms": bench.arms,
    }
    return bench.rows, meta


def report(rows: Sequence[Row], meta: dict[str, Any], json_path: Path | None) -> None:
    print(stats.format_table(rows))
    passed = sum(r.status == stats.PASS for r in rows)
    missed = sum(r.status == stats.MISS for r in rows)
    print(
        f"\n{passed} PASS, {missed} MISS; {meta['cpu_count']} CPU cores, torch {meta['torch_threads_in_process']} "
        f"thread(s) in the replica and in-process; {'quick' if meta['quick'] else 'full'} run"
        f"{'' if len(meta['phases']) == len(PHASES) else ' of ' + ', '.join(meta['phases'])}, "
        f"{meta['wall_seconds']:.0f} s; load average before {meta['loadavg_1_5_15_before'][0]:.2f}, "
        f"after {meta['loadavg_1_5_15_after'][0]:.2f}"
    )
    note = stats.contention_note(meta["other_processes_cores_while_measuring"], meta["steal_cores_while_measuring"])
    if note:
        print(note)
    if json_path is not None:
        stats.write_json(json_path, rows, meta)
        say(f"wrote {json_path}")
