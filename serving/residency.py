"""Which base pipelines one replica keeps on its device together once one of them is FLUX.1.

Serve's multiplexer keeps up to `max_pipelines_per_replica` bases by count, which suits SD and
SDXL (2-7 GB each) but not FLUX.1: its plan (serving/flux_memory.py) takes its weights (31.4 GiB),
its LoRA budget and a reserve for activations, which with the default budget is the whole of an
80 GB GPU. So while a FLUX pipeline is resident or loading, a base stays only if the device holds
every resident base's claim together, evicting least recently used first, as the multiplexer does:

- a FLUX pipeline claims its weights + its LoRA budget + `flux_memory.ACTIVATION_RESERVE`;
- any other base claims its weights + its LoRA budget.

The check runs twice per load: before the new pipeline moves to the device (its weights are then
known, its budget not yet), so the move itself fits, and once it is loaded, with its budget. Bases
without FLUX among them are left to the count, as before.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from diffusers import DiffusionPipeline

from serving import flux_memory
from serving.loaded import LoadedPipeline
from serving.model_cache import tensor_bytes

FLUX = "flux"


def weight_bytes(pipe: DiffusionPipeline) -> int:
    """Bytes of the pipeline's model weights (with a LoRA set installed, the set's merged weights stand in for
    the base weights they replace: the same bytes)."""
    return sum(tensor_bytes(c) for c in pipe.components.values() if isinstance(c, torch.nn.Module))


def claim(family: str, weights: int, lora_budget: int) -> int:
    """Device bytes a base is planned to take between and during its requests."""
    return weights + lora_budget + (flux_memory.ACTIVATION_RESERVE if family == FLUX else 0)


def device_total(device: str) -> int:
    """The device's memory for `Residency` when the operator gave no figure: a GPU's total, 0 (no plan) elsewhere."""
    if device.startswith("cuda") and torch.cuda.is_available():
        _free, total = torch.cuda.mem_get_info(torch.device(device))
        return int(total)
    return 0


class Residency:
    """The replica's resident bases, least recently used first, and the evictions the FLUX plan needs.

    `device_bytes` 0 turns the plan off (a CPU replica, unless the operator gives a figure).
    Evicting is `LoadedPipeline.release`: its memory is freed once no running request uses it.
    """

    def __init__(self, device_bytes: int) -> None:
        self.device_bytes = device_bytes
        self._resident: OrderedDict[str, LoadedPipeline] = OrderedDict()
        self._claims: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def keys(self) -> list[str]:
        """Resident bases, least recently used first (those released meanwhile left out)."""
        with self._lock:
            self._forget_released()
            return list(self._resident)

    def touch(self, key: str) -> None:
        """A request is using this base: it becomes the most recently used."""
        with self._lock:
            if key in self._resident:
                self._resident.move_to_end(key)

    def make_room(self, family: str, weights: int) -> list[str]:
        """Before a base's weights move to the device: evicts what they would not fit beside. Returns the keys."""
        with self._lock:
            return self._evict(family, claim(family, weights, 0))

    def admit(self, key: str, loaded: LoadedPipeline) -> list[str]:
        """A base loaded now, with its LoRA budget: evicts what it does not fit beside, then keeps it. Returns the
        evicted keys."""
        needed = claim(loaded.family, weight_bytes(loaded.pipe), loaded.max_lora_bytes)
        with self._lock:
            self._resident.pop(key, None)
            self._claims.pop(key, None)
            evicted = self._evict(loaded.family, needed)
            self._resident[key] = loaded
            self._claims[key] = needed
            return evicted

    def _evict(self, family: str, needed: int) -> list[str]:
        self._forget_released()
        evicted: list[str] = []
        while self._resident and self.device_bytes and self._over(family, needed):
            key, oldest = self._resident.popitem(last=False)
            del self._claims[key]
            oldest.release()
            evicted.append(key)
        return evicted

    def _over(self, family: str, needed: int) -> bool:
        flux = family == FLUX or any(p.family == FLUX for p in self._resident.values())
        return flux and sum(self._claims.values()) + needed > self.device_bytes

    def _forget_released(self) -> None:
        """Bases Serve's multiplexer evicted by count are no longer resident."""
        for key in [k for k, p in self._resident.items() if p.released]:
            del self._resident[key]
            del self._claims[key]
