"""sync_mode's size cap: in validation where the size is known, at the worker for what it made."""

from __future__ import annotations

import pytest

from loraserve.request.sync_mode import check_inline_size, sync_mode_violations
from loraserve.request.violations import InvalidInput
from loraserve.v1 import types_pb2

CAP = 2 * 1024 * 1024


def text_to_image(**fields: object) -> types_pb2.GenerateInput:
    inp = types_pb2.GenerateInput(model_name="m", prompt="p", sync_mode=True, **fields)  # type: ignore[arg-type]
    inp.image_size.custom.width, inp.image_size.custom.height = 1024, 1024
    return inp


def test_the_cap_counts_every_image() -> None:
    assert list(sync_mode_violations(text_to_image(num_images=2), CAP)) == []
    [(field, why)] = sync_mode_violations(text_to_image(num_images=3), CAP)
    assert field == "sync_mode" and "3145728 pixels" in why and "max_sync_mode_pixels" in why
    plain = text_to_image(num_images=8)
    plain.sync_mode = False
    assert list(sync_mode_violations(plain, CAP)) == []


def test_image_to_image_is_checked_by_the_worker_once_the_size_is_known() -> None:
    inp = text_to_image(num_images=8, endpoint=types_pb2.ENDPOINT_IMAGE_TO_IMAGE)
    assert list(sync_mode_violations(inp, CAP)) == []
    check_inline_size([(1024, 1024)] * 2, CAP, per_pass_latents=False)
    with pytest.raises(InvalidInput) as refused:
        check_inline_size([(1024, 1024)] * 3, CAP, per_pass_latents=True)
    assert [v.field for v in refused.value.violations] == ["input.debug_per_pass_latents", "input.sync_mode"]


def test_every_steps_latents_are_refused_inline() -> None:
    [(field, _why)] = sync_mode_violations(text_to_image(debug_per_pass_latents=True), CAP)
    assert field == "debug_per_pass_latents"
