"""Fields that can name a file, checked by validation whichever field it is: a data URI over `max_data_uri_bytes`
is refused naming its field (at submit, before it is queued, held and prefetched), and an http(s) URL with
non-ASCII characters is sent in its ASCII form, or refused naming its field when it has none."""

from __future__ import annotations

import base64

import pytest

from core.config import Settings
from loraserve.request.validation import validate_input
from loraserve.request.violations import InvalidInput
from loraserve.v1 import types_pb2

LIMIT = 1000
SETTINGS = Settings(max_data_uri_bytes=LIMIT)


def data_uri(size: int) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(b"\0" * size).decode()


def every_file_field(value: str) -> types_pb2.GenerateInput:
    """An image-to-image input with `value` in each field that names a file (a model too)."""
    return types_pb2.GenerateInput(
        endpoint=types_pb2.ENDPOINT_IMAGE_TO_IMAGE,
        model_name=value,
        prompt="a red house",
        image_url=value,
        loras=[types_pb2.LoraWeight(path=value)],
        embeddings=[types_pb2.Embedding(path=value)],
        controlnets=[types_pb2.ControlNet(path="org/controlnet", image_url=value)],
        ip_adapter=[types_pb2.IPAdapter(path="org/ip", ip_adapter_image_url=["https://ok.example/a.png", value])],
        ic_light_image_url=value,
    )


FIELDS = [
    "input.model_name",
    "input.image_url",
    "input.loras[0].path",
    "input.embeddings[0].path",
    "input.controlnets[0].image_url",
    "input.ip_adapter[0].ip_adapter_image_url[1]",
    "input.ic_light_image_url",
]


def violations(inp: types_pb2.GenerateInput) -> dict[str, str]:
    with pytest.raises(InvalidInput) as refused:
        validate_input(inp, SETTINGS.request_limits)
    return {v.field: v.description for v in refused.value.violations}


def test_a_data_uri_over_the_limit_is_refused_in_every_field_that_can_carry_one() -> None:
    found = violations(every_file_field(data_uri(LIMIT + 3)))
    for field in FIELDS:
        assert "max_data_uri_bytes" in found.get(field, ""), (field, found)
    within = every_file_field(data_uri(LIMIT))
    assert not [f for f, why in violations(within).items() if "max_data_uri_bytes" in why]


def test_non_ascii_urls_are_sent_in_their_ascii_form_in_every_field() -> None:
    inp = every_file_field("https://bücher.example/lora.safetensors?x=é")
    assert not [f for f, why in violations(inp).items() if "host name" in why]
    ascii_form = "https://xn--bcher-kva.example/lora.safetensors?x=%C3%A9"
    assert inp.loras[0].path == ascii_form and inp.image_url == ascii_form
    assert inp.ip_adapter[0].ip_adapter_image_url[1] == ascii_form and inp.ic_light_image_url == ascii_form
    assert inp.prompt == "a red house"


def test_a_url_whose_host_has_no_ascii_form_is_refused_naming_its_field() -> None:
    inp = types_pb2.GenerateInput(
        model_name="org/model", prompt="https://é.example is text here", loras=[types_pb2.LoraWeight(path="https://é..x/a")]
    )
    found = violations(inp)
    assert "not a valid internationalised domain name" in found["input.loras[0].path"]
    assert "input.prompt" not in found and inp.prompt == "https://é.example is text here"
