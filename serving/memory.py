"""Handing freed memory back, and reading how much the process holds.

Freed tensors go back to PyTorch's caching allocator on CUDA and to glibc's heap on the CPU;
neither returns it to the system (or another model) by itself. After evicting a pipeline the
replica asks both to, so the next model to load has the room the evicted one took.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from dataclasses import dataclass
from functools import cache

import torch


@dataclass(frozen=True)
class MemoryFigures:
    """Resident set of the process and, with CUDA, what PyTorch's allocator has handed out / holds."""

    rss_bytes: int
    cuda_allocated_bytes: int
    cuda_reserved_bytes: int


def return_freed_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def memory_figures() -> MemoryFigures:
    cuda = torch.cuda.is_available()
    return MemoryFigures(
        rss_bytes=_rss_bytes(),
        cuda_allocated_bytes=torch.cuda.memory_allocated() if cuda else 0,
        cuda_reserved_bytes=torch.cuda.memory_reserved() if cuda else 0,
    )


def _rss_bytes() -> int:
    """From /proc (Linux, where replicas run); 0 elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
    except OSError:
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


@cache
def _malloc_trim() -> ctypes._FuncPointer | None:
    """glibc's malloc_trim, which releases free heap pages to the system; None on other C libraries."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None
