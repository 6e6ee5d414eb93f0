"""loraserve.inputs.to_input (fal-style dicts → GenerateInput) and core.model_key.BaseModelRef."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from loraserve.inputs import to_input
from core.model_key import BaseModelRef
from loraserve.v1 import types_pb2


@pytest.mark.parametrize("preset", ["square_hd", "square", "portrait_16_9", "not_a_preset"])
def test_image_size_preset_string(preset: str) -> None:
    inp = to_input({"model_name": "m", "prompt": "p", "image_size": preset})
    assert inp.image_size.WhichOneof("size") == "preset"
    assert inp.image_size.preset == preset


@pytest.mark.parametrize(
    ("size", "expected"),
    [({"width": 512, "height": 768}, (512, 768)), ({"width": "64", "height": 128.0}, (64, 128))],
)
def test_image_size_custom_dict(size: dict[str, Any], expected: tuple[int, int]) -> None:
    inp = to_input({"image_size": size})
    assert inp.image_size.WhichOneof("size") == "custom"
    assert (inp.image_size.custom.width, inp.image_size.custom.height) == expected


def test_no_image_size_leaves_it_unset() -> None:
    assert to_input({"prompt": "p"}).image_size.WhichOneof("size") is None
    assert to_input({"prompt": "p", "image_size": None}).image_size.WhichOneof("size") is None


@pytest.mark.parametrize("size", [512, 1.5, True, ["square"], ("512", "512")], ids=repr)
def test_bad_image_size_raises_value_error(size: Any) -> None:
    with pytest.raises(ValueError, match="image_size"):
        to_input({"image_size": size})


@pytest.mark.parametrize("size", [{"width": 512}, {"height": 512}, {}], ids=["no-height", "no-width", "empty"])
def test_image_size_dict_missing_a_side_raises_value_error(size: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="image_size"):
        to_input({"image_size": size})


def test_nan_and_inf_floats_become_proto_values() -> None:
    inp = to_input(
        {
            "guidance_scale": math.nan,
            "eta": -math.inf,
            "loras": [{"path": "a", "scale": math.inf}, {"path": "b", "scale": 0.25}],
            "sigmas": {"method": "array", "array": [math.inf, 1.0, math.nan]},
        }
    )
    assert inp.HasField("guidance_scale") and math.isnan(inp.guidance_scale)
    assert inp.eta == -math.inf
    assert inp.loras[0].scale == math.inf
    assert inp.loras[1].scale == 0.25
    assert inp.sigmas.array[0] == math.inf and inp.sigmas.array[1] == 1.0 and math.isnan(inp.sigmas.array[2])


def test_fields_map_one_to_one() -> None:
    inp = to_input(
        {
            "model_name": "org/model",
            "prompt": "p",
            "seed": 2**40,
            "num_images": 2,
            "num_inference_steps": 0,
            "image_format": "jpeg",
            "loras": [{"path": "l.safetensors"}],
        }
    )
    assert (inp.model_name, inp.prompt, inp.seed, inp.num_images, inp.image_format) == (
        "org/model",
        "p",
        2**40,
        2,
        "jpeg",
    )
    # Explicit zero is kept as set (validation then names it), absence stays absent.
    assert inp.HasField("num_inference_steps") and inp.num_inference_steps == 0
    assert not inp.HasField("guidance_scale")
    assert not inp.loras[0].HasField("scale")


def test_message_passes_through_and_dict_is_not_mutated() -> None:
    message = types_pb2.GenerateInput(prompt="p")
    assert to_input(message) is message
    data: dict[str, Any] = {"prompt": "p", "image_size": "square", "guidance_scale": math.nan}
    to_input(data)
    assert set(data) == {"prompt", "image_size", "guidance_scale"}
    assert math.isnan(data["guidance_scale"])


# --- BaseModelRef --------------------------------------------------------------------------

REFS = [
    BaseModelRef("stabilityai/stable-diffusion-xl-base-1.0"),
    BaseModelRef("https://huggingface.co/org/model/resolve/main/model.safetensors", "org/unet", "fp16"),
    BaseModelRef("/models/my model with spaces/", "", ""),
    BaseModelRef("モデル/ü-ñ 😀", "ユーネット", "fp16"),
    BaseModelRef('quote"back\\slash%percent,comma[]', "new\nline\ttab", "v"),
    BaseModelRef(""),
]


def is_metadata_safe(value: str) -> bool:
    """gRPC ASCII metadata values: printable ASCII (0x20-0x7E)."""
    return all(0x20 <= ord(c) <= 0x7E for c in value)


@pytest.mark.parametrize("ref", REFS, ids=range(len(REFS)))
def test_key_is_printable_ascii_and_a_digest(ref: BaseModelRef) -> None:
    key = ref.key
    assert is_metadata_safe(key)
    assert re.fullmatch(r"m-[0-9a-f]{64}", key)


def test_key_shows_nothing_of_a_url_with_a_token() -> None:
    """Serve logs and routes by the key: a signed URL's token must not be readable from it."""
    key = BaseModelRef.normalised("https://host.example/m.safetensors?X-Amz-Signature=deadbeef42&token=t0k3n").key
    assert "deadbeef42" not in key and "t0k3n" not in key and "host" not in key


def test_different_refs_give_different_keys() -> None:
    keys = {ref.key for ref in REFS}
    keys |= {BaseModelRef("a", "b").key, BaseModelRef("a,b").key, BaseModelRef("a", "", "b").key}
    assert len(keys) == len(REFS) + 3


@pytest.mark.parametrize(
    "variants",
    [
        ["org/model", "org/model/", " org/model ", "org/model//", "\torg/model/\n"],
        ["/models/sdxl", "/models/sdxl/", "  /models/sdxl/  "],
        ["https://host/m", "https://host/m/"],
    ],
    ids=["hf-id", "path", "url"],
)
def test_normalised_makes_spelling_variants_equal(variants: list[str]) -> None:
    refs = {BaseModelRef.normalised(v) for v in variants}
    assert len(refs) == 1
    assert len({r.key for r in refs}) == 1


def test_normalised_parts() -> None:
    ref = BaseModelRef.normalised(" org/model/ ", " org/unet/ ", " FP16 ")
    assert ref == BaseModelRef("org/model", "org/unet", "fp16")
    assert BaseModelRef.normalised("org/model", variant="fp16").key == BaseModelRef.normalised("org/model/", variant="FP16").key
    # The root path stays a path; different models stay different.
    assert BaseModelRef.normalised("/").model_name == "/"
    assert BaseModelRef.normalised("org/model").key != BaseModelRef.normalised("org/model2").key
    assert BaseModelRef.normalised("org/model").key != BaseModelRef.normalised("org/model", variant="fp16").key
