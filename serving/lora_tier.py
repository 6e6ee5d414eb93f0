"""The device tier of the adapter cache: one pipeline's LoRAs as low-rank tensors, bounded by bytes.

Below it sit the replica's host-RAM tier of parsed files (serving/lora_cache.py) and the node's
weights cache on disk. A miss here turns a parsed file into stacked `up` / `down` matrices on the
pipeline's device (serving/lora_tensors.py): no module is built, so it costs the key conversion
and one transfer per shape group, and the device holds exactly the LoRA's tensors. A request's
set is merged into the modules' own weight tensors beside copies of the base weights they held
(serving/lora_merge.py; never a new parameter: a compiled U-Net reads the same storage). The set
stays installed after its request: a request repeating it merges and copies nothing (on SDXL's
U-Net a swap each way was 0.4 s of a 2-core CPU). A request for none puts the base weights back,
and the copies of the last set stay (then holding the merged weights) so that a later repeat merges
nothing. One for another set puts back the layers it does not adapt and merges into the others from
their base copies, so a merge only ever reads base weights (DoRA's, which read the weights
themselves, after all are put back).

One byte budget covers both: the adapters and the merged copies kept for a repeat (on SDXL fp16
1.9 GB per set, as much as twenty rank-32 LoRAs). Over it, the least recently used adapters not
in use go first; merged copies that still do not fit are put back (they hold the base weights
while installed) and dropped when their request ends, and a repeat then merges again.

On a GPU the U-Net's share of the merge runs on a side stream while the prompt is encoded (the
text encoders' share runs first, on the main stream, as they need it); a pre-forward hook makes
the U-Net's first call wait for it, and the request's end does too (`wait_for_merge`: a request
may fail before its U-Net runs). A waiting request's LoRAs are made resident by `prefetch`
(the worker's Prefetch, in another thread) while the current request denoises; on a GPU their
transfer runs on a copy stream of its own. On a CPU everything runs in order.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
import torch
from diffusers import DiffusionPipeline

from serving import flux_memory, lora_merge
from serving.errors import AdapterLoadError, reason
from serving.lora_cache import ParsedLora, adapter_name
from serving.lora_tensors import DENOISERS, LoraFitError, LoraTensors, ShapeGroup, lora_tensors
from serving.metrics import WorkerMetrics

# The adapter-cache tier of LoRAs resident in a pipeline (on its device), as metrics name it.
GPU_TIER = "gpu"
# The default byte budget of adapters and kept merged copies: this share of the memory free once the
# pipeline is loaded (the GPU's, or the host's available RAM on a CPU), split among the pipelines a
# replica may hold (the rest is for their weights and activations, and on a CPU the host tier).
DEVICE_BUDGET_FRACTION = 0.25


def default_budget(device: torch.device, pipelines: int = 1, family: str = "") -> int:
    """On an 80 GB GPU with SDXL loaded and 2 pipelines per replica: ~9 GB, one merged set and ~80 rank-32 LoRAs.

    FLUX on a GPU: what is free less a reserve for its activations (serving/flux_memory.py), as its
    merged set alone may be 22 GiB.

    A fraction of what is free rather than a fixed size, so that the same default neither starves a
    large machine into merging again on every repeat nor takes more than a small one has.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        if family == "flux":
            return flux_memory.default_budget(free)
    else:
        free = psutil.virtual_memory().available
    return int(free * DEVICE_BUDGET_FRACTION / max(1, pipelines))


def _is_unet(group: ShapeGroup) -> bool:
    """The denoiser's layers (the U-Net's, or FLUX's transformer's): merged on the side stream."""
    return group.component in DENOISERS


class DeviceLoraTier:
    """LoRAs resident on one pipeline (least recently used out first) and the merged weights of the last set.

    `max_bytes` bounds both together (0: unbounded). Between requests the last set may still be
    installed: the modules then run it, not the base weights, until `activate` of another set (or
    none) or `clear`.
    """

    def __init__(
        self,
        pipe: DiffusionPipeline,
        *,
        sdxl: bool,
        describe: str,
        max_bytes: int,
        max_count: int = 0,
        metrics: WorkerMetrics | None = None,
        parse: Callable[[Path], ParsedLora],
    ) -> None:
        self._pipe = pipe
        self._sdxl = sdxl
        # "model 'x' (sdxl)": how errors name the pipeline.
        self._describe = describe
        self.max_bytes = max_bytes
        # 0: only bytes bound the tier.
        self.max_count = max_count
        self._metrics = metrics
        self._parse = parse
        self._resident: OrderedDict[str, tuple[Path, LoraTensors]] = OrderedDict()
        self._merged: lora_merge.MergedWeights | None = None
        # What `_merged` holds, counted in the budget (its storages, read once).
        self._merged_bytes = 0
        # The pairs installed in the modules (their partners hold the base weights meanwhile); only
        # `_restore` and `_restore_by_copy` empty it.
        self._installed: list[tuple[torch.nn.Module, torch.nn.Parameter]] = []
        # The key of `_merged` while all of its copies are installed; None while nothing is, or only
        # part of a set whose merge failed.
        self._installed_key: lora_merge.MergeKey | None = None
        self._wait_hook: torch.utils.hooks.RemovableHandle | None = None
        self._stream: torch.cuda.Stream | None = None
        self._copy_stream: torch.cuda.Stream | None = None
        # While a side-stream merge may run: the request's stream, the side stream, and the LoRAs the
        # merge reads, kept alive until the request ends (an eviction meanwhile must not hand their
        # memory to another allocation under the merge). None on a CPU and between requests.
        self._merging: tuple[torch.cuda.Stream, torch.cuda.Stream, list[LoraTensors]] | None = None
        # Guards the resident set: Prefetch calls add to it from other threads.
        self._lock = threading.Lock()
        # The running request's LoRAs, which a prefetch never evicts.
        self._active: set[str] = set()
        # Merges computed so far; a repeated set adds none (for tests and bench/lora.py).
        self.merges = 0
        # Writes of a whole weight tensor of the modules so far (a merge into it, a swap, a copy
        # back); a repeat of the installed set adds none (for tests and bench/lora.py).
        self.weight_writes = 0

    @property
    def paths(self) -> list[Path]:
        with self._lock:
            return [path for path, _ in self._resident.values()]

    @property
    def nbytes(self) -> int:
        """The resident adapters' tensors (the merged copies are `merged_bytes`)."""
        with self._lock:
            return self._nbytes()

    def _nbytes(self) -> int:
        return sum(tensors.nbytes for _, tensors in self._resident.values())

    def _over_budget(self) -> bool:
        return bool(self.max_bytes) and self._nbytes() + self._merged_bytes > self.max_bytes

    @property
    def dtypes(self) -> set[torch.dtype]:
        """The dtypes the resident adapters' matrices are kept in (the files')."""
        return {t.dtype for _, tensors in self._resident.values() for g in tensors.groups for t in g.ups}

    @property
    def merged_bytes(self) -> int:
        """The merged copies of the last set, kept for a repeat (part of the budget)."""
        return self._merged_bytes

    def activate(self, loras: Sequence[tuple[Path, float]]) -> None:
        """Exactly these LoRAs at these scales until `deactivate`; an empty list gives the plain weights.

        The set installed by the last request is kept if it is this one (no merge, no copy); otherwise its
        layers this set does not adapt are put back, and the merge writes the others from their base copies.
        """
        self.deactivate()
        names = [adapter_name(path) for path, _ in loras]
        self._active = set(names)
        scales: dict[str, float] = {}
        for name, (_, scale) in zip(names, loras):
            # The same LoRA twice adds up: a LoRA's effect is linear in its scale.
            scales[name] = scales.get(name, 0.0) + scale
        key: lora_merge.MergeKey = tuple((name, scale) for name, scale in scales.items() if scale != 0.0)
        spares: dict[torch.nn.Module, torch.Tensor] = {}
        spares_hold_weights = False
        if not key:
            # The copies stay, holding the merged weights again, for a later repeat.
            self._restore()
        elif self._merged is not None and self._merged.key != key:
            # Out of the budget before the next set's adapters come in; the next set's base weights go
            # into its buffers (`lora_merge.apply`), so that a switch allocates nothing. Put back below.
            spares_hold_weights = self._installed_key is not None
            spares = self._drop_merged(spare=True)
        active: list[tuple[LoraTensors, float]] | None = None
        try:
            resident = {name: self.ensure_resident(path, name) for (path, _), name in zip(loras, names)}
            active = [(resident[name], scale) for name, scale in key]
        finally:
            if spares_hold_weights:
                # The replaced set's layers that this one adapts too keep their merged weights: this
                # merge writes them from their base copies (`spares`), one pass rather than two. All are
                # put back if the LoRAs did not load, or if the merge reads the weights (DoRA).
                self._restore_by_copy(keep=_rewritten(active or []))
        if not key or self._installed_key == key:
            return
        if self._merged is not None:
            self._install(self._merged.parameters)
            self._installed_key = key
            return
        assert not self._installed and active is not None, "a merge must read the base weights"
        self.merges += 1
        first = lora_merge.apply(
            active, which=lambda group: not _is_unet(group), spares=spares, spares_hold_weights=spares_hold_weights
        )
        self._installed += first
        self.weight_writes += len(first)
        rest = self._merge_unet(active, spares, spares_hold_weights)
        spares.clear()
        merged = lora_merge.MergedWeights(key, first + rest)
        with self._lock:
            self._merged, self._merged_bytes = merged, merged.nbytes
            self._track_bytes(self._merged_bytes)
            self._evict_over_budget()
        self._installed_key = key

    def _install(self, pairs: Sequence[tuple[torch.nn.Module, torch.nn.Parameter]]) -> None:
        """Swapped in all or not at all (`lora_merge.install`), so `_installed` is always what the modules hold."""
        self._installed += lora_merge.install(pairs)
        self.weight_writes += len(pairs)

    def _restore(self) -> None:
        """The base weights back in every module the last set was installed into."""
        if not self._installed:
            return
        lora_merge.restore(self._installed)
        self.weight_writes += len(self._installed)
        self._installed = []
        self._installed_key = None

    def _restore_by_copy(self, keep: frozenset[torch.nn.Module] = frozenset()) -> None:
        """The base weights copied back (one copy each, not a swap's three): the merged ones are not kept.

        `keep`: modules left as they are, for the next merge to write from their base copies (its spares).
        """
        back = [(module, partner) for module, partner in self._installed if module not in keep]
        lora_merge.restore(back, keep_merged=False)
        self.weight_writes += len(back)
        self._installed = []
        self._installed_key = None

    def _drop_merged(self, *, spare: bool = False) -> dict[torch.nn.Module, torch.Tensor]:
        """Restored first if installed: while installed the copies hold the only base weights.

        `spare`: returns the copies' buffers by module (holding the base weights if they were
        installed) for the next merge to keep its base weights in; their bytes leave the budget now.
        The caller then puts an installed set back itself (`_restore_by_copy`) before anything else.
        """
        if not spare and self._installed_key is not None:
            self._restore_by_copy()
        with self._lock:
            spares = {} if self._merged is None or not spare else {m: p.detach() for m, p in self._merged.parameters}
            self._track_bytes(-self._merged_bytes)
            self._merged, self._merged_bytes = None, 0
        return spares

    def _unet_device(self) -> tuple[torch.nn.Module | None, torch.device]:
        """From a parameter: diffusers' `ModelMixin.device` walks every module (8 ms per call on a tiny SDXL)."""
        models = (getattr(self._pipe, attr, None) for attr in DENOISERS)
        unet = next((model for model in models if isinstance(model, torch.nn.Module)), None)
        if unet is None:
            return None, torch.device("cpu")
        return unet, next(unet.parameters()).device

    def _merge_unet(
        self,
        active: Sequence[tuple[LoraTensors, float]],
        spares: dict[torch.nn.Module, torch.Tensor],
        spares_hold_weights: bool,
    ) -> list[tuple[torch.nn.Module, torch.nn.Parameter]]:
        """The U-Net's share merged into its weights: on a GPU on the side stream, after the main stream's work so far
        (the last request's U-Net), and the U-Net's first call waits for it."""
        unet, device = self._unet_device()
        side: torch.cuda.Stream | None = None
        if device.type == "cuda" and unet is not None:
            main = torch.cuda.current_stream(device)
            if self._stream is None:
                self._stream = torch.cuda.Stream(device)
            side = self._stream
            side.wait_stream(main)
            # Before any kernel is queued: a merge that raises half-way is waited for by `deactivate` too.
            self._merging = (main, side, [tensors for tensors, _ in active])
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            merged = lora_merge.apply(active, which=_is_unet, spares=spares, spares_hold_weights=spares_hold_weights)
        self._installed += merged
        self.weight_writes += len(merged)
        if side is None or unet is None:
            return merged
        for _, parameter in merged:
            # The base copies: allocated (or, spares, last written) on the side stream, read on the main one.
            parameter.record_stream(main)
        done = side.record_event()

        def wait(_module: torch.nn.Module, _args: object) -> None:
            torch.cuda.current_stream(device).wait_event(done)

        self._wait_hook = unet.register_forward_pre_hook(wait)
        return merged

    def wait_for_merge(self) -> None:
        """The request's stream waits for the U-Net merge on the side stream; nothing to wait for on a CPU.

        The U-Net's pre-forward hook does this for the U-Net itself. Code that reads the U-Net's
        weights before its first call (IC-Light's offsets, through `LoadedPipeline.weights_ready`)
        must call it first, and `deactivate` does:
        a request that failed before its U-Net ran never waited, and the LoRAs the merge reads may be
        freed (their memory reused by the request's stream) and its merged copies installed by a
        repeat only once the merge is done (the allocator's rule: uses on another stream are synced
        back to the creation stream before a tensor is freed). A device-side wait: the host goes on.
        """
        if self._merging is not None:
            main, side, _ = self._merging
            main.wait_stream(side)

    def deactivate(self) -> None:
        """The request's end: its set stays installed for a repeat if its merged copies fit the budget.

        Copies over the budget are put back and dropped; part of a set whose merge failed is swapped out.
        """
        self._end_request()
        if self._installed_key is None:
            self._restore()
        with self._lock:
            # Adapters not in use went first (`_evict_over_budget`); what is still over is the copies.
            over = self._merged is not None and self._over_budget()
        if over:
            self._count("cache_evictions")
            self._drop_merged()

    def _end_request(self) -> None:
        """No hook left on the U-Net, the side-stream merge waited for, and no LoRA in use."""
        if self._wait_hook is not None:
            self._wait_hook.remove()
            self._wait_hook = None
        self.wait_for_merge()
        self._merging = None
        self._active = set()

    def clear(self) -> None:
        """The base weights back, and every adapter and merged copy dropped (the pipeline is being freed)."""
        self._end_request()
        self._restore()
        with self._lock:
            self._track_bytes(-self._nbytes())
            self._resident.clear()
        self._drop_merged()

    def ensure_resident(self, path: Path, name: str) -> LoraTensors:
        """The LoRA's tensors, made resident on a miss; the running request's LoRAs are never evicted for it."""
        with self._lock:
            entry = self._resident.get(name)
            if entry is not None:
                self._resident.move_to_end(name)
                self._count("cache_hits")
                return entry[1]
            self._count("cache_misses")
            started = time.perf_counter()
            tensors = self._tensors(path, side_stream=False)
            self._keep(name, path, tensors, started)
            return tensors

    def prefetch(self, paths: Sequence[Path]) -> None:
        """Makes a waiting request's LoRAs resident, converting outside the lock so a running request never waits."""
        for path in paths:
            name = adapter_name(path)
            with self._lock:
                if name in self._resident:
                    continue
            started = time.perf_counter()
            tensors = self._tensors(path, side_stream=True)
            with self._lock:
                if name not in self._resident:
                    self._count("cache_misses")
                    self._keep(name, path, tensors, started)

    def _keep(self, name: str, path: Path, tensors: LoraTensors, started: float) -> None:
        self._resident[name] = (path, tensors)
        self._track_bytes(tensors.nbytes)
        if self._metrics is not None:
            self._metrics.adapter_load_seconds.observe(time.perf_counter() - started)
        self._evict_over_budget()

    def _tensors(self, path: Path, *, side_stream: bool) -> LoraTensors:
        _, device = self._unet_device()
        if not side_stream or device.type != "cuda":
            return self._converted(path)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device)
        with torch.cuda.stream(self._copy_stream):
            tensors = self._converted(path)
        self._copy_stream.synchronize()
        main = torch.cuda.default_stream(device)
        for group in tensors.groups:
            # Allocated on the copy stream, read by merges on the main one: the allocator must know.
            for tensor in (*group.ups, *group.downs, group.scalings, *(group.magnitudes or ())):
                tensor.record_stream(main)
        return tensors

    def _converted(self, path: Path) -> LoraTensors:
        parsed = self._parse(path)
        try:
            return lora_tensors(self._pipe, parsed, sdxl=self._sdxl)
        except LoraFitError as exc:
            why = str(exc)
        except Exception as exc:  # noqa: BLE001 - diffusers' converters raise anything on a malformed file
            why = reason(exc)
        raise AdapterLoadError(
            f"LoRA {str(path)!r} does not fit {self._describe}: {why}; is it a LoRA for another model family?"
        )

    def _evict_over_budget(self) -> None:
        """Bytes (adapters and kept merged copies; and a count, if set) bound the tier.

        The running request's LoRAs are never evicted; the merged copies are left to `deactivate`.
        """
        for victim in [name for name in self._resident if name not in self._active]:
            over_count = self.max_count and len(self._resident) > self.max_count
            if not (self._over_budget() or over_count):
                return
            _, tensors = self._resident.pop(victim)
            self._track_bytes(-tensors.nbytes)
            self._count("cache_evictions")

    def _count(self, counter: str) -> None:
        if self._metrics is not None:
            getattr(self._metrics, counter).labels(tier=GPU_TIER).inc()

    def _track_bytes(self, delta: int) -> None:
        if self._metrics is not None:
            self._metrics.cache_bytes.labels(tier=GPU_TIER).inc(delta)


def _rewritten(active: Sequence[tuple[LoraTensors, float]]) -> frozenset[torch.nn.Module]:
    """The modules a merge of `active` writes without reading their weights: all it adapts, none with DoRA."""
    groups = [group for tensors, _ in active for group in tensors.groups]
    if any(group.magnitudes is not None for group in groups):
        return frozenset()
    return frozenset(module for group in groups for module in group.modules)
