"""Fixtures every in-process serving test module shares; each module builds its own tiny models
(`pipelines`: family → LoadedPipeline) because each needs different fixtures in them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from serving.pipelines import LoadedPipeline

FAMILIES = ("sd15", "sdxl")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Two intra-op threads on a shared 2-core box slow these tiny models down tens of times."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def loaded(pipelines: dict[str, LoadedPipeline], family: str) -> LoadedPipeline:
    return pipelines[family]
