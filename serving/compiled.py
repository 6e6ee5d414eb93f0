"""torch.compile of what dominates a request: the denoiser's forward and the VAE decoder's, warmed per size.

Modes (the `compile` setting): `off`; `default` (inductor, no CUDA graphs); `max-autotune`
(inductor with autotuned kernels and CUDA graphs). `auto` is `max-autotune` on CUDA, where an
SDXL step is hundreds of kernels and CUDA graphs take their launch cost away, and `off` on a
CPU, where compiling a full-size U-Net takes many minutes of the few cores a replica has and the
gain is small.

The denoiser is SD's U-Net or FLUX.1's transformer (whose double and single blocks are its
repeated blocks for `compile_regional`). FLUX requests choose per request: `acceleration:
"regular"` runs the compiled forwards, `none` (fal's default) the same modules eagerly (`eager()`).

Both modules are compiled where they are (their `forward` replaced, the module objects and their
parameters kept), in channels_last, with the static shapes of `compile_warmup_sizes` (default the
family's native size), warmed when the pipeline loads. A call whose inputs match no warmed call
(another size, another batch, a ControlNet's residuals, IP-Adapter embeddings, an IC-Light
U-Net's extra channels) runs the same module eagerly, so a new size costs eager speed and never a
compile that would stall the replica's other requests. Static buckets rather than dynamic
height/width: inductor specialises kernels and CUDA graphs record per shape anyway, and a dynamic
graph's first compile is slower (bench/compile.py measures both).

Compiled calls of a pipeline run on a thread of its own (`Runner`): inductor's CUDA graph trees
are per thread, and requests run on whichever thread of asyncio's pool is free, so each of those
would record its own graphs (and hold its own memory pool); a thread per pipeline also keeps one
pipeline's warm-up from holding another's compiled calls.

Weights change only by copies into the same tensors (LoRAs: serving/lora_merge.py), so no LoRA
switch recompiles; every compile or CUDA graph recording after warm-up is counted
(`loraserve_compile_recompiles_total`) and logged with dynamo's guard failure. Inductor's caches
live under the weights cache (`compile_cache_dir`), so a restarted replica reads its kernels
instead of compiling them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from diffusers import FluxTransformer2DModel
from torch.utils import _pytree

from serving import image_to_image

log = logging.getLogger(__name__)

OFF = "off"
AUTO = "auto"
CUDA_GRAPHS = "max-autotune"
MODES = (OFF, "default", CUDA_GRAPHS)
# The size a family's checkpoints were trained at: what `compile_warmup_sizes` warms by default.
NATIVE_SIZES = {"sd15": (512, 512), "sdxl": (1024, 1024), "flux": (1024, 1024)}
# Steps of a warm-up request: the compiled graphs do not depend on the step count.
WARMUP_STEPS = 2
# Classifier-free guidance (batch 2), as a request with guidance_scale > 1 runs the U-Net.
WARMUP_GUIDANCE = 5.0
# Dynamo's logger for guard failures that cause a recompile (TORCH_LOGS=recompiles).
RECOMPILES_LOGGER = "torch._dynamo.guards.__recompiles"
MAX_REASON_CHARS = 600
# Inductor's caches, under the weights cache's folder.
CACHE_FOLDER = "torch-compile"
# Families whose denoiser `compile_regional: auto` compiles block by block: FLUX.1's transformer is
# 19 double and 38 single blocks of two shapes; compiled whole it took 2.8x as long on a CPU (bench.compile's
# flux part) and 7x on an H100 by PyTorch's own figures, for the same speed-up.
REGIONAL_FAMILIES = frozenset({"flux"})
REGIONAL_SETTINGS = {AUTO: None, "on": True, "off": False}
# Graphs per compiled function and warmed size: a regional compile has one per block shape (SD 1.5: 3).
GRAPHS_PER_SIZE = 4


def resolve_mode(setting: str, device: str) -> str:
    if setting == AUTO:
        return CUDA_GRAPHS if device.startswith("cuda") else OFF
    if setting not in MODES:
        raise ValueError(f"compile must be one of {', '.join((AUTO, *MODES))}, got {setting!r}")
    return setting


def resolve_regional(setting: str) -> bool | None:
    """`compile_regional`: None (auto) leaves it to the family (`REGIONAL_FAMILIES`)."""
    if setting not in REGIONAL_SETTINGS:
        raise ValueError(f"compile_regional must be one of {', '.join(REGIONAL_SETTINGS)}, got {setting!r}")
    return REGIONAL_SETTINGS[setting]


def parse_sizes(setting: str) -> list[tuple[int, int]]:
    """`1024x1024,832x1216` as (width, height) pairs; empty: the family's native size."""
    sizes = []
    for item in filter(None, (part.strip() for part in setting.split(","))):
        width, sep, height = item.lower().partition("x")
        if not sep or not width.isdigit() or not height.isdigit() or int(width) % 8 or int(height) % 8:
            raise ValueError(f"compile_warmup_sizes: {item!r} is not WIDTHxHEIGHT in multiples of 8")
        sizes.append((int(width), int(height)))
    return sizes


class CompileEvents:
    """Dynamo's compiles and CUDA graph recordings, process-wide: those after a warm-up are counted and logged.

    Dynamo's callbacks and logs are global, so one instance listens for every pipeline of the
    process. Compiles run in the thread that calls the compiled code (a pipeline's Runner), so
    whether they are expected (a warm-up in progress) and dynamo's reason are kept per thread.
    """

    def __init__(self) -> None:
        self.recompiles = 0
        self._thread = threading.local()
        self._listeners: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._installed = False

    def install(self) -> None:
        with self._lock:
            if self._installed:
                return
            self._installed = True
        torch._logging.set_logs(recompiles=True)
        logging.getLogger(RECOMPILES_LOGGER).addHandler(_ReasonHandler(self))
        torch._dynamo.callback.on_compile_end(self._compiled)

    def add_listener(self, listener: Callable[[str], None]) -> None:
        """`listener(reason)` on every recompile after warm-up (a worker's metrics counter)."""
        with self._lock:
            self._listeners.append(listener)

    @contextlib.contextmanager
    def warming(self) -> Iterator[None]:
        """Compiles in this thread are expected until the block ends."""
        self._thread.warming = getattr(self._thread, "warming", 0) + 1
        try:
            yield
        finally:
            self._thread.warming -= 1

    def _reason(self, message: str) -> None:
        self._thread.reason = message

    def _compiled(self, args: Any) -> None:
        reason = getattr(self._thread, "reason", "") or f"a new graph ({args.callback_trigger.name.lower()})"
        self._thread.reason = ""
        if getattr(self._thread, "warming", 0):
            return
        with self._lock:
            self.recompiles += 1
            count = self.recompiles
            listeners = list(self._listeners)
        log.warning("torch.compile compiled after warm-up (%d so far): %s", count, reason[:MAX_REASON_CHARS])
        for listener in listeners:
            listener(reason)


class _ReasonHandler(logging.Handler):
    def __init__(self, events: CompileEvents) -> None:
        super().__init__(logging.DEBUG)
        self._events = events

    def emit(self, record: logging.LogRecord) -> None:
        self._events._reason(record.getMessage())


EVENTS = CompileEvents()


def use_cache_dir(path: Path) -> None:
    """Inductor's FX-graph, AOT-autograd, autotune and Triton caches under `path` (the weights volume)."""
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ.setdefault("TRITON_CACHE_DIR", str(path / "triton"))
    torch._inductor.config.fx_graph_cache = True
    torch._inductor.config.autotune_local_cache = True


# Set on a Runner's thread: the only thread where compiled code runs (regional blocks check it).
_ON_RUNNER = threading.local()
# Set in a request's thread while it runs with no acceleration asked for (`eager()`).
_EAGER = threading.local()


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Gated forwards called in this thread run eagerly, warmed or not: a FLUX request with `acceleration: none`."""
    _EAGER.active = getattr(_EAGER, "active", 0) + 1
    try:
        yield
    finally:
        _EAGER.active -= 1


class Runner:
    """The thread a pipeline's compiled calls run on, in the caller's grad mode."""

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="compiled", initializer=_mark_runner
        )

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        grad = torch.is_grad_enabled()

        def run() -> Any:
            with torch.set_grad_enabled(grad):
                return function(*args, **kwargs)

        return self._executor.submit(run).result()

    def close(self) -> None:
        self._executor.shutdown(wait=False)


def _mark_runner() -> None:
    _ON_RUNNER.active = True


class ShapeGate:
    """A module's forward: compiled, on the pipeline's Runner, for the calls seen while warming; eager for any other."""

    def __init__(
        self, forward: Callable[..., Any], compiled: Callable[..., Any], runner: Runner, *, clone_outputs: bool
    ) -> None:
        self.eager = forward
        self.compiled = compiled
        # The module's class, as logs name it.
        self.what = type(getattr(forward, "__self__", forward)).__name__
        self._runner = runner
        # CUDA graph outputs live in the graph's memory and are overwritten by its next replay.
        self._clone_outputs = clone_outputs
        self.signatures: set[Any] = set()
        # Calls that ran eagerly, each logged once.
        self._eager_signatures: set[Any] = set()
        self.warming = True
        self.compiled_calls = 0
        self.eager_calls = 0
        functools.update_wrapper(self, forward)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.warming and getattr(_EAGER, "active", 0) > 0:
            return self.eager(*args, **kwargs)
        key = _signature((args, kwargs))
        if self.warming:
            self.signatures.add(key)
            return self._own(self._runner.call(self._warm, *args, **kwargs))
        if key not in self.signatures:
            self.eager_calls += 1
            if key not in self._eager_signatures:
                self._eager_signatures.add(key)
                log.info("%s: a call no warm-up made runs eagerly: %s", self.what, _describe((args, kwargs)))
            return self.eager(*args, **kwargs)
        self.compiled_calls += 1
        return self._own(self._runner.call(self.compiled, *args, **kwargs))

    def _own(self, output: Any) -> Any:
        if self._clone_outputs:
            return _pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, output)
        return output

    def _warm(self, *args: Any, **kwargs: Any) -> Any:
        with EVENTS.warming():
            if self._clone_outputs:
                # CUDA graph trees run a new shape once, then record it on its second call: a decoder
                # called once per warm-up request would otherwise record during the first real one.
                self.compiled(*args, **kwargs)
            return self.compiled(*args, **kwargs)


def _signature(value: Any) -> Any:
    """What dynamo would guard on: tensors by shape, strides, dtype and device; other values as they are."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype, value.device.type)
    if isinstance(value, dict):
        return ("dict", tuple((key, _signature(item)) for key, item in sorted(value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_signature(item) for item in value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__qualname__


def _describe(value: Any) -> str:
    """Tensors as their shapes and dtypes: what an operator needs to see why a call was not warmed."""
    described = _pytree.tree_map_only(torch.Tensor, lambda t: f"{tuple(t.shape)}:{str(t.dtype).removeprefix('torch.')}", value)
    return str(described)[:MAX_REASON_CHARS]


class CompiledUNetForward(ShapeGate):
    """The U-Net's gate; a 0-d timestep is made float32 first, as the U-Net does with it before use.

    Schedulers give int64, float32 or float64 timesteps; without this, each would be another graph.
    """

    def __call__(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(timestep, torch.Tensor) and timestep.ndim == 0:
            timestep = timestep.to(torch.float32)
        elif isinstance(timestep, (int, float)):
            timestep = torch.tensor(float(timestep), dtype=torch.float32, device=sample.device)
        return super().__call__(sample, timestep, *args, **kwargs)


class _Region:
    """A repeated block's forward (regional compilation): compiled on a Runner's thread, eager elsewhere.

    A call no warm-up saw runs the U-Net in the request's own thread, so its blocks run eagerly
    and compile nothing.
    """

    def __init__(self, forward: Callable[..., Any], mode: str) -> None:
        self._eager = forward
        self._compiled = torch.compile(forward, mode=mode, dynamic=False)
        functools.update_wrapper(self, forward)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(_ON_RUNNER, "active", False):
            return self._compiled(*args, **kwargs)
        return self._eager(*args, **kwargs)


class CompiledModules:
    """A pipeline's compiled forwards (U-Net first, then the VAE decoder's if compiled) and their Runner."""

    def __init__(
        self, gates: Sequence[tuple[torch.nn.Module, ShapeGate]], runner: Runner, *, regional: bool = False
    ) -> None:
        self.regional = regional
        self._installed = list(gates)
        self.gates = [gate for _, gate in gates]
        self._runner = runner

    def warmed(self) -> None:
        """Warm-up over: calls no warm-up made run eagerly from now on."""
        for gate in self.gates:
            gate.warming = False

    def uninstall(self) -> None:
        """The eager forwards back (a warm-up failed)."""
        for module, gate in self._installed:
            module.forward = gate.eager
        self.close()

    def close(self) -> None:
        self._runner.close()


def compile_modules(unet: Any, vae: Any, mode: str, *, regional: bool) -> CompiledModules:
    """The denoiser's forward (or, `regional`, its repeated blocks') and the VAE decoder's compiled in place, not yet warmed.

    Both in channels_last. The decoder is left eager where diffusers upcasts an fp16 VAE per
    decode (its dtype, and storages, change every request: no graph would stay valid; use an
    fp16-safe VAE to compile it).
    """
    EVENTS.install()
    if mode == CUDA_GRAPHS:
        # diffusers' SDXL recipe: 1x1 convolutions as matmuls, tuned pointwise kernels.
        torch._inductor.config.conv_1x1_as_mm = True
        torch._inductor.config.coordinate_descent_tuning = True
    runner = Runner()
    clone = mode == CUDA_GRAPHS
    unet.to(memory_format=torch.channels_last)
    if regional:
        blocks = set(getattr(unet, "_repeated_blocks", ()))
        for block in unet.modules():
            if type(block).__name__ in blocks:
                block.forward = _Region(block.forward, mode)
        unet_compiled = unet.forward
    else:
        unet_compiled = torch.compile(unet.forward, mode=mode, dynamic=False)
    # FLUX's transformer takes a 1-d timestep by keyword: nothing to normalise.
    gate_class = ShapeGate if isinstance(unet, FluxTransformer2DModel) else CompiledUNetForward
    gates: list[tuple[torch.nn.Module, ShapeGate]] = [
        (unet, gate_class(unet.forward, unet_compiled, runner, clone_outputs=clone))
    ]
    if vae is not None and not (vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))):
        vae.to(memory_format=torch.channels_last)
        decoder = vae.decoder
        compiled_decoder = torch.compile(decoder.forward, mode=mode, dynamic=False)
        gates.append((decoder, ShapeGate(decoder.forward, compiled_decoder, runner, clone_outputs=clone)))
    for module, gate in gates:
        module.forward = gate
    return CompiledModules(gates, runner, regional=regional)


def compile_pipeline(
    pipe: Any, *, family: str, mode: str, sizes: Sequence[tuple[int, int]], regional: bool | None = None
) -> CompiledModules | None:
    """Compiles the denoiser and the VAE decoder (`compile_modules`), then warms each size; None when `mode` is off.

    `regional` compiles only the denoiser's repeated transformer blocks (as diffusers'
    compile_repeated_blocks does): one compile serves every block of a shape, the rest of the
    denoiser runs eagerly; None: regional for the families in `REGIONAL_FAMILIES`. A warm-up that
    fails puts the eager forwards back and re-raises: a replica must not serve from a
    half-compiled model.
    """
    if mode == OFF:
        return None
    sizes = list(sizes) or [NATIVE_SIZES[family]]
    limit = GRAPHS_PER_SIZE * len(sizes)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    denoiser = pipe.transformer if family == "flux" else pipe.unet
    if regional is None:
        regional = family in REGIONAL_FAMILIES
    modules = compile_modules(denoiser, pipe.vae, mode, regional=regional)
    started = time.perf_counter()
    try:
        with torch.no_grad():
            for width, height in sizes:
                warm_up(pipe, width, height)
    except BaseException:
        modules.uninstall()
        raise
    modules.warmed()
    how = f"{mode}, {'its repeated blocks' if modules.regional else 'whole'}"
    log.info("compiled (%s) and warmed %s in %.1f s", how, sizes, time.perf_counter() - started)
    return modules


def warm_up(pipe: Any, width: int, height: int) -> None:
    """One request's U-Net and decoder calls at this size; a dedicated inpainting model's through its inpaint pipeline."""
    kwargs: dict[str, Any] = {
        "prompt": "",
        "width": width,
        "height": height,
        "num_inference_steps": WARMUP_STEPS,
        "guidance_scale": WARMUP_GUIDANCE,
        "output_type": "pil",
    }
    if getattr(pipe, "unet", None) is not None and image_to_image.is_inpainting_model(pipe):
        pipe = image_to_image.pipeline_class(pipe, inpaint=True).from_pipe(pipe)
        pipe.set_progress_bar_config(disable=True)
        kwargs["image"] = PIL.Image.new("RGB", (width, height))
        kwargs["mask_image"] = PIL.Image.new("L", (width, height), 255)
        kwargs["strength"] = 1.0
    pipe(**kwargs)
