"""A hot pipeline and what is kept on it between requests: LoRAs, and the bookkeeping that frees it.

`LoadedPipeline` is what the worker holds per base model: the diffusers pipeline, its device tier
of LoRAs (serving/lora_tier.py) backed by the replica's host-RAM tier (serving/lora_cache.py), the
textual inversions of the running request (serving/embeddings.py), and the count of running
requests that decides when an evicted pipeline's memory is freed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from serving import embeddings as textual_inversion
from serving import lora_tier
from serving.compiled import CompiledModules
from serving.errors import AdapterLoadError, PipelineReleased
from serving.lora_cache import HostLoraCache, LoraFileError, ParsedLora, parse_embedding_file, parse_lora_file
from serving.lora_tensors import denoiser
from serving.memory import return_freed_memory
from serving.metrics import WorkerMetrics

LORA_FOLDER_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class LoadedPipeline:
    """A hot pipeline plus the LoRAs kept resident on it as low-rank tensors (serving/lora_tier.py)."""

    def __init__(
        self,
        pipe: DiffusionPipeline,
        *,
        family: str,
        model_name: str,
        max_loras: int = 0,
        max_lora_bytes: int = 0,
        metrics: WorkerMetrics | None = None,
        host_loras: HostLoraCache | None = None,
        pipelines_per_replica: int = 1,
        compiled: CompiledModules | None = None,
    ) -> None:
        if max_loras < 0 or max_lora_bytes < 0:
            raise ValueError(f"max_loras and max_lora_bytes must not be negative, got {max_loras}, {max_lora_bytes}")
        self.pipe = pipe
        self.family = family
        self.model_name = model_name
        self._metrics = metrics
        # The replica's host-RAM tier of LoRAs and embeddings, shared by its pipelines; None: files
        # are parsed on every load.
        self._host_loras = host_loras
        # Bytes of LoRA tensors and kept merged copies on this pipeline's device; 0: a share of the
        # free device memory split among the replica's pipelines on a GPU, a fixed amount on a CPU
        # (lora_tier.default_budget). max_loras 0: no count bound.
        self._loras = lora_tier.DeviceLoraTier(
            pipe,
            sdxl=family == "sdxl",
            describe=f"model {model_name!r} ({family})",
            max_bytes=max_lora_bytes or lora_tier.default_budget(denoiser(pipe).device, pipelines_per_replica, family),
            max_count=max_loras,
            metrics=metrics,
            parse=self._parsed,
        )
        self._embeddings = textual_inversion.LoadedEmbeddings()
        # The compiled forwards of the U-Net and VAE decoder (serving/compiled.py); None: eager.
        self.compiled = compiled
        # Requests running on this pipeline; an eviction while one runs frees the memory when it ends.
        self._users = 0
        self._released = False
        self._freed = False
        self._state_lock = threading.Lock()

    @property
    def released(self) -> bool:
        """Evicted: its memory is freed, or will be when its last running request ends."""
        return self._released

    @property
    def max_loras(self) -> int:
        return self._loras.max_count

    @property
    def max_lora_bytes(self) -> int:
        return self._loras.max_bytes

    @property
    def resident_loras(self) -> list[Path]:
        """Least recently used first; exposed so callers can report cache contents (and tests can check eviction)."""
        return self._loras.paths

    @property
    def resident_lora_bytes(self) -> int:
        return self._loras.nbytes

    @property
    def lora_tier(self) -> lora_tier.DeviceLoraTier:
        """The pipeline's device tier of LoRAs, for benchmarks and reports."""
        return self._loras

    @property
    def lora_merges(self) -> int:
        """How many LoRA sets were merged; a request repeating the previous set adds none."""
        return self._loras.merges

    def activate_loras(self, loras: Sequence[tuple[str, float]]) -> None:
        """Make exactly these LoRAs (at these scales) active; an empty list gives the plain model.

        The models run with the LoRAs merged into the weights they touch (serving/lora_merge.py) until
        a request activates another set; an empty list puts the base weights back.
        """
        self._loras.activate([(lora_file(path), scale) for path, scale in loras])

    def prefetch_loras(self, paths: Sequence[str]) -> None:
        """A waiting request's LoRAs made resident while another request runs (the worker's Prefetch).

        A pipeline released meanwhile is skipped: the request will load it again anyway.
        """
        if self._released:
            return
        try:
            with self.in_use():
                self._loras.prefetch([lora_file(path) for path in paths])
        except PipelineReleased:
            return

    def weights_ready(self) -> None:
        """The request's stream waits for the LoRA merge; the U-Net's own first call waits by itself."""
        self._loras.wait_for_merge()

    def deactivate_loras(self) -> None:
        """The request's end: its set stays installed for a repeat (within the LoRA budget); the next
        `activate_loras` with another set, or none, puts the base weights back first."""
        self._loras.deactivate()

    def load_embeddings(self, embeddings: Sequence[tuple[str, Sequence[str]]]) -> None:
        """Add this request's textual-inversion tokens; `unload_embeddings` takes them out again."""
        self.unload_embeddings()
        try:
            self._embeddings = textual_inversion.load(
                self.pipe, embeddings, model_label=self.model_name, read=self._embedding_tensors
            )
        except textual_inversion.EmbeddingLoadError as exc:
            raise AdapterLoadError(str(exc)) from exc

    def _embedding_tensors(self, path: Path) -> dict[str, torch.Tensor]:
        """From the host-RAM tier when there is one, as for LoRAs: a file is read once, not per request."""
        parsed = self._host_loras.get_embedding(path) if self._host_loras is not None else parse_embedding_file(path)
        return parsed.tensors

    def unload_embeddings(self) -> None:
        textual_inversion.unload(self.pipe, self._embeddings)

    @contextmanager
    def in_use(self) -> Iterator[None]:
        """Held by each request for its whole run, so that an eviction never frees weights under it."""
        with self._state_lock:
            if self._freed:
                raise PipelineReleased(f"model {self.model_name!r} was unloaded from this replica")
            self._users += 1
        try:
            yield
        finally:
            with self._state_lock:
                self._users -= 1
                free_now = self._released and not self._users
            if free_now:
                self._free()

    def release(self) -> None:
        """Gives the pipeline's memory back now, or when its last running request ends.

        Dropping references is not enough: request views, the conditioning cache and reference
        cycles inside diffusers can keep modules alive, so the weights themselves are replaced by
        storage-less meta tensors, and the allocator is asked to hand the freed memory back.
        """
        with self._state_lock:
            if self._released:
                return
            self._released = True
            free_now = not self._users
        if free_now:
            self._free()

    def _free(self) -> None:
        with self._state_lock:
            if self._freed:
                return
            self._freed = True
        self._loras.clear()
        if self.compiled is not None:
            self.compiled.close()
        for component in self.pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.to("meta")
        return_freed_memory()


    def _parsed(self, path: Path) -> ParsedLora:
        """From the host-RAM tier when there is one; the file is read at most once per replica."""
        try:
            return self._host_loras.get(path) if self._host_loras is not None else parse_lora_file(path)
        except LoraFileError as exc:
            raise AdapterLoadError(f"LoRA {str(path)!r}: {exc}") from exc


def lora_file(path: str) -> Path:
    """A LoRA is a .safetensors file, or a folder holding diffusers' standard weight file."""
    candidate = Path(path).expanduser()
    if candidate.is_dir():
        candidate = candidate / LORA_FOLDER_WEIGHT_NAME
        if not candidate.is_file():
            raise AdapterLoadError(f"LoRA {path!r}: folder has no {LORA_FOLDER_WEIGHT_NAME}")
    if not candidate.is_file():
        raise AdapterLoadError(f"LoRA {path!r}: file does not exist")
    if candidate.suffix.lower() != ".safetensors":
        raise AdapterLoadError(f"LoRA {path!r}: only .safetensors LoRAs are accepted (pickle files are refused)")
    return candidate.resolve()
