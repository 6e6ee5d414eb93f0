"""`sync_mode`: a request's outputs come back inside its result instead of in the object store.

fal returns them as data URIs: `url` is `data:<type>;base64,...` and `file_data` holds the same
bytes (storage/result_urls.py writes them). Nothing is written to the object store, so nothing is
signed when the result is read and the retention sweep has no files to delete.

The request store keeps the result, so the size is capped: `max_sync_mode_pixels` over all of a
request's images. Validation refuses a text-to-image request over it; the size of an image-to-image
result is known only once its start image is read, so the worker checks the request again then,
before it generates anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from loraserve.request import schema
from loraserve.request.violations import FieldViolation, InvalidInput
from loraserve.v1 import types_pb2

# Every step's latents (up to 150 steps × 8 images) are too large for a result row; debug_latents,
# the final latents only, come back inline like the images.
PER_PASS_REFUSED = "cannot be returned inline (sync_mode): every step's latents are too large; leave sync_mode off"


def sync_mode_violations(inp: types_pb2.GenerateInput, max_pixels: int) -> Iterator[tuple[str, str]]:
    """For validation: a text-to-image request whose images would exceed the cap."""
    if not inp.sync_mode:
        return
    if inp.debug_per_pass_latents:
        yield "debug_per_pass_latents", PER_PASS_REFUSED
    if schema.starts_from_image(inp):
        return
    try:
        width, height = schema.image_size(inp)
    except KeyError:
        return  # an unknown preset, reported by the size check
    pixels = schema.num_images(inp) * width * height
    if pixels > max_pixels:
        yield "sync_mode", _too_large(pixels, max_pixels)


def check_inline_size(sizes: Iterable[tuple[int, int]], max_pixels: int, *, per_pass_latents: bool) -> None:
    """For the worker: the images a request will make (width, height) must fit the cap."""
    violations = []
    if per_pass_latents:
        violations.append(FieldViolation("input.debug_per_pass_latents", PER_PASS_REFUSED))
    pixels = sum(width * height for width, height in sizes)
    if pixels > max_pixels:
        violations.append(FieldViolation("input.sync_mode", _too_large(pixels, max_pixels)))
    if violations:
        raise InvalidInput(violations)


def _too_large(pixels: int, max_pixels: int) -> str:
    return (
        f"the images would be {pixels} pixels in all, over this server's limit for inline results"
        f" ({max_pixels}, max_sync_mode_pixels); leave sync_mode off to get URLs instead"
    )
