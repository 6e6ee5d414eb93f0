"""The host-RAM tier of the adapter cache: LoRA and embedding files read and parsed once per replica.

Between the node's weights cache on disk (storage/weights.py) and the adapters resident on the GPU
(serving/lora_tier.py) sits this tier: a LoRA's tensors and its diffusers metadata (`lora_alpha`,
rank patterns), and a textual-inversion embedding's vectors, in host memory, least recently used
out first within one byte budget that both kinds share. A LoRA that was evicted from a pipeline,
or that another base model on the same replica uses, or whose request is still waiting in the
gateway's queue (Prefetch), is made resident from here without touching the disk; an embedding,
which is added to the tokenizers for one request only (serving/embeddings.py), is taken from here
by every request that names it.

Entries are keyed like resident adapters (path + mtime + size), so a file rewritten in place is
read afresh; the key starts with its kind, so one file asked for as a LoRA and as an embedding is
two entries, each parsed its own way. The cache is shared by the replica's pipelines and by its
Prefetch calls, which run in other threads, hence the lock; a file being parsed by one thread is
waited for, not read twice.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import safetensors.torch
import torch
from diffusers.utils.state_dict_utils import _load_sft_state_dict_metadata

from serving.embeddings import EmbeddingLoadError
from serving.metrics import TierObserver

# The adapter-cache tier of parsed LoRAs and embeddings in a replica's RAM, as metrics name it.
HOST_TIER = "host"
SAFETENSORS_SUFFIX = ".safetensors"
# Alignment of each tensor in a pinned buffer: enough for any dtype's views.
PINNED_ALIGNMENT = 16
# The down-projection ("A") of one adapted layer: PEFT, kohya / A1111, older diffusers formats.
LORA_DOWN_SUFFIXES = (
    ".lora_A.weight",
    ".lora_down.weight",
    ".lora.down.weight",
    "_lora.down.weight",
    ".lora_linear_layer.down.weight",
)


class LoraFileError(Exception):
    """The file is not a readable safetensors LoRA; the message says why."""


@dataclass(frozen=True)
class ParsedLora:
    """What diffusers would read from the file: its tensors (on the CPU) and its LoRA metadata."""

    name: str
    path: Path
    state_dict: dict[str, torch.Tensor]
    # diffusers' `lora_adapter_metadata` header entry (None when the file has none, e.g. kohya).
    metadata: dict[str, Any] | None
    nbytes: int
    # Layers the file adapts (one down/A matrix each, in any of the formats).
    layer_count: int
    # On a machine with CUDA: one pinned buffer that every tensor of `state_dict` is a view of, so
    # that making the LoRA resident on the GPU is one transfer (serving/lora_tensors.py).
    flat: torch.Tensor | None = None


@dataclass(frozen=True)
class ParsedEmbedding:
    """A textual-inversion file's tensors (on the CPU), not yet checked against any model."""

    name: str
    path: Path
    tensors: dict[str, torch.Tensor]
    nbytes: int


Parsed = TypeVar("Parsed", ParsedLora, ParsedEmbedding)


def adapter_name(path: Path) -> str:
    """Stable while the file is unchanged; a rewritten file gets a new name and is loaded afresh."""
    return "lora_" + _file_digest(path)


def embedding_name(path: Path) -> str:
    """Like `adapter_name`, with a prefix of its own so an embedding never takes a LoRA's entry."""
    return "embedding_" + _file_digest(path)


def _file_digest(path: Path) -> str:
    stat = path.stat()
    key = f"{path}\0{stat.st_mtime_ns}\0{stat.st_size}"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def parse_lora_file(path: Path) -> ParsedLora:
    """Reads the whole file once; only safetensors is ever deserialised (no pickle).

    The metadata is parsed by diffusers' own reader, as when it loads the file by path.
    """
    try:
        state_dict = safetensors.torch.load_file(str(path), device="cpu")
        metadata = _load_sft_state_dict_metadata(str(path))
    except Exception as exc:
        raise LoraFileError(f"not a readable safetensors LoRA file: {type(exc).__name__}: {exc}") from exc
    flat = None
    if torch.cuda.is_available():
        flat, state_dict = _in_one_pinned_buffer(state_dict)
    return ParsedLora(
        name=adapter_name(path),
        path=path,
        state_dict=state_dict,
        metadata=metadata,
        nbytes=_nbytes(state_dict) if flat is None else pinned_reservation(flat.numel()),
        layer_count=sum(1 for key in state_dict if key.endswith(LORA_DOWN_SUFFIXES)),
        flat=flat,
    )


def pinned_reservation(nbytes: int) -> int:
    """What a pinned buffer of `nbytes` holds of host RAM: PyTorch's caching host allocator rounds each
    allocation up to a power of two (and keeps freed blocks for reuse), so an 89 MiB LoRA pins 128 MiB.
    The host tier counts that, or its budget would let pinned memory reach twice its size."""
    return 0 if nbytes <= 0 else 1 << (nbytes - 1).bit_length()


def _in_one_pinned_buffer(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The tensors copied into one page-locked buffer (each at a 16-byte boundary), and views of them."""
    offsets: list[int] = []
    total = 0
    for tensor in tensors.values():
        offsets.append(total)
        total += -(-tensor.numel() * tensor.element_size() // PINNED_ALIGNMENT) * PINNED_ALIGNMENT
    flat = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    views: dict[str, torch.Tensor] = {}
    for (key, tensor), offset in zip(tensors.items(), offsets):
        size = tensor.numel() * tensor.element_size()
        view = flat[offset : offset + size].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor)
        views[key] = view
    return flat, views


def parse_embedding_file(path: Path) -> ParsedEmbedding:
    """Safetensors only, never pickle; errors name the file, as every embedding error does."""
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise EmbeddingLoadError(f"embedding {path.name!r}: only .safetensors embeddings are accepted")
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as exc:
        raise EmbeddingLoadError(f"embedding {path.name!r} is not a readable safetensors file: {exc}") from exc
    return ParsedEmbedding(name=embedding_name(path), path=path, tensors=tensors, nbytes=_nbytes(tensors))


class HostLoraCache:
    """Parsed LoRAs and embeddings in host RAM, least recently used out first over `max_bytes` (0: unbounded).

    One cache for both kinds, so they share the budget, the LRU order and the "host" tier metrics.
    An entry larger than the whole budget is still returned to its caller, just not kept.
    """

    def __init__(self, max_bytes: int, *, observer: TierObserver | None = None) -> None:
        self.max_bytes = max_bytes
        self._observer = observer
        self._entries: OrderedDict[str, ParsedLora | ParsedEmbedding] = OrderedDict()
        self._lock = threading.Lock()
        # Names being parsed right now → set when done, so a second caller waits instead of reading.
        self._parsing: dict[str, threading.Event] = {}

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(entry.nbytes for entry in self._entries.values())

    def names(self) -> list[str]:
        """Least recently used first; for reports and tests."""
        with self._lock:
            return list(self._entries)

    def get(self, path: Path) -> ParsedLora:
        return self._get(adapter_name(path), ParsedLora, lambda: parse_lora_file(path))

    def get_embedding(self, path: Path) -> ParsedEmbedding:
        return self._get(embedding_name(path), ParsedEmbedding, lambda: parse_embedding_file(path))

    def _get(self, name: str, kind: type[Parsed], parse: Callable[[], Parsed]) -> Parsed:
        while True:
            with self._lock:
                entry = self._entries.get(name)
                if isinstance(entry, kind):
                    self._entries.move_to_end(name)
                    if self._observer is not None:
                        self._observer.on_hit()
                    return entry
                waiting = self._parsing.get(name)
                if waiting is None:
                    done = self._parsing[name] = threading.Event()
                    break
            waiting.wait()
        if self._observer is not None:
            self._observer.on_miss()
        try:
            parsed = parse()
            with self._lock:
                self._keep(parsed)
            return parsed
        finally:
            with self._lock:
                del self._parsing[name]
            done.set()

    def _keep(self, entry: ParsedLora | ParsedEmbedding) -> None:
        if self.max_bytes and entry.nbytes > self.max_bytes:
            return
        self._entries[entry.name] = entry
        total = sum(e.nbytes for e in self._entries.values())
        while self.max_bytes and total > self.max_bytes:
            _, victim = self._entries.popitem(last=False)
            total -= victim.nbytes
            if self._observer is not None:
                self._observer.on_evict(victim.nbytes)
        if self._observer is not None:
            self._observer.on_bytes(total)
