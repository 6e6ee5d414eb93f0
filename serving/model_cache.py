"""The per-replica cache of conditioning models (ControlNets, IP-Adapters, image encoders, IC-Light offsets).

Least recently used out first, by count and by bytes of weights; shared by the conditioning
modules, which key their entries with `file_key` so that a rewritten file is read afresh.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from serving.metrics import TierObserver

T = TypeVar("T")
DEFAULT_CACHE_CAPACITY = 4
# The adapter-cache tier of loaded conditioning models, as metrics name it.
CONDITIONING_TIER = "conditioning"


class ModelCache:
    """An LRU of loaded models (ControlNets, IP-Adapter weights, image encoders, IC-Light offsets).

    One per replica process: models load once and serve every base pipeline of their family.
    Bounded by count and by the bytes of their tensors (0: count only); a model evicted while a
    request still uses it stays alive in that request until it ends. Entries are immutable for
    requests (IP-Adapter and IC-Light weights are copied into the U-Net per request), so sharing
    them never leaks state between requests.
    """

    def __init__(
        self, capacity: int = DEFAULT_CACHE_CAPACITY, max_bytes: int = 0, observer: TierObserver | None = None
    ) -> None:
        self.capacity = max(1, capacity)
        self.max_bytes = max_bytes
        self.observer = observer
        self._entries: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._sizes: dict[tuple[Any, ...], int] = {}
        self._lock = threading.Lock()
        self.loads = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def get(self, key: tuple[Any, ...], load: Callable[[], T]) -> T:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                if self.observer is not None:
                    self.observer.on_hit()
                return self._entries[key]
        if self.observer is not None:
            self.observer.on_miss()
        value = load()
        with self._lock:
            self.loads += 1
            if key in self._entries:
                self._drop(key)
            self._entries[key] = value
            self._sizes[key] = tensor_bytes(value)
            while len(self._entries) > 1 and (
                len(self._entries) > self.capacity or (self.max_bytes and sum(self._sizes.values()) > self.max_bytes)
            ):
                size = self._drop(next(iter(self._entries)))
                if self.observer is not None:
                    self.observer.on_evict(size)
            self._report_bytes()
        return value

    def _drop(self, key: tuple[Any, ...]) -> int:
        del self._entries[key]
        return self._sizes.pop(key)

    def _report_bytes(self) -> None:
        if self.observer is not None:
            self.observer.on_bytes(sum(self._sizes.values()))

    def keys(self) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            for key in list(self._entries):
                self._drop(key)
            self._report_bytes()


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a cached value: a module, a tensor, or containers of them."""
    if isinstance(value, torch.nn.Module):
        return sum(t.numel() * t.element_size() for t in value.state_dict().values())
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


# Per process is per replica: each Ray Serve replica is its own process.
MODELS = ModelCache()


def configure_cache(capacity: int, max_bytes: int, observer: TierObserver | None) -> None:
    """The replica's budgets and metrics, from its settings."""
    MODELS.capacity = max(1, capacity)
    MODELS.max_bytes = max_bytes
    MODELS.observer = observer


def file_key(path: Path) -> tuple[str, int, int]:
    """Stable while the file is unchanged; blobs in the weights cache are content-addressed anyway."""
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


# ----------------------------------------------------------------------------- from the request
