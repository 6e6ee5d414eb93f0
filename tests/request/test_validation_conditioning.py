"""Validation of controlnets, ip_adapter and IC-Light: accepted when runnable, else refused by field."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from tests.request.validation_testkit import violations

CN: dict[str, Any] = {"path": "org/controlnet-canny", "image_url": "https://example.com/canny.png"}
IPA: dict[str, Any] = {
    "path": "h94/IP-Adapter",
    "model_subfolder": "models",
    "weight_name": "ip-adapter_sd15.safetensors",
    "ip_adapter_image_url": ["https://example.com/ref.png"],
}



@pytest.mark.parametrize(
    "overrides",
    [
        {"controlnets": [CN]},
        {"controlnets": [{"path": "cn", "control_image_url": "data:image/png;base64,AAAA"}]},
        {"controlnets": [{**CN, "image_url": "u", "control_image_url": "u"}]},
        {
            "controlnets": [
                {**CN, "mask_url": "m", "mask_threshold": 0.3, "conditioning_scale": -0.5, "variant": "fp16"},
                {**CN, "start_percentage": 0.2, "end_percentage": 0.8, "config_url": "https://e.com/config.json"},
            ],
            "controlnet_guess_mode": True,
        },
        {"controlnets": [{**CN, "mask_threshold": 0.5}]},  # the default, as fal clients send it
        {"ip_adapter": [IPA]},
        {
            "ip_adapter": [
                {
                    **IPA,
                    "ip_adapter_image_url": ["a", "b"],
                    "ip_adapter_mask_url": "m",
                    "scale": 0.6,
                    "scale_json": json.dumps({"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}),
                    "unconditional_noising_factor": 0.5,
                    "image_projection_shortcut": True,
                }
            ],
            "image_encoder_path": "h94/IP-Adapter",
            "image_encoder_subfolder": "models/image_encoder",
            "image_encoder_weight_name": "model.safetensors",
        },
        {"ip_adapter": [{**IPA, "scale_json": "0.5"}]},
        {"image_encoder_weight_name": "pytorch_model.bin"},  # the fal default, sent without an adapter
        {
            "ic_light_model_url": "https://e.com/iclight_sd15_fc.safetensors",
            "ic_light_image_url": "https://e.com/fg.png",
        },
        {
            "ic_light_model_url": "https://e.com/iclight_sd15_fbc.safetensors",
            "ic_light_image_url": "https://e.com/fg.png",
            "ic_light_model_background_image_url": "https://e.com/bg.png",
        },
    ],
    ids=[
        "controlnet",
        "control-image-url-spelling",
        "both-spellings-equal",
        "two-controlnets-all-options",
        "default-threshold-without-mask",
        "ip-adapter",
        "ip-adapter-all-options",
        "scale-json-number",
        "default-encoder-weight-name",
        "ic-light-fc",
        "ic-light-fbc",
    ],
)
def test_runnable_conditioning_passes(overrides: dict[str, Any]) -> None:
    assert violations(**overrides) == {}


BAD: list[tuple[str, dict[str, Any], str, str]] = [
    ("cn-no-path", {"controlnets": [{"image_url": "u"}]}, "input.controlnets[0].path", "is required"),
    ("cn-no-image", {"controlnets": [{"path": "cn"}]}, "input.controlnets[0].image_url", "is required"),
    (
        "cn-spellings-differ",
        {"controlnets": [{**CN, "control_image_url": "other"}]},
        "input.controlnets[0].control_image_url",
        "give one",
    ),
    (
        "cn-mask-spellings-differ",
        {"controlnets": [{**CN, "mask_url": "a", "mask_image_url": "b"}]},
        "input.controlnets[0].mask_image_url",
        "give one",
    ),
    (
        "cn-start-after-end",
        {"controlnets": [{**CN, "start_percentage": 0.6, "end_percentage": 0.4}]},
        "input.controlnets[0].start_percentage",
        "below end_percentage",
    ),
    (
        "cn-start-equals-end",
        {"controlnets": [{**CN, "start_percentage": 1.0}]},
        "input.controlnets[0].start_percentage",
        "below end_percentage",
    ),
    (
        "cn-end-above-one",
        {"controlnets": [{**CN, "end_percentage": 1.5}]},
        "input.controlnets[0].end_percentage",
        "between 0 and 1",
    ),
    (
        "cn-start-negative",
        {"controlnets": [{**CN, "start_percentage": -0.1}]},
        "input.controlnets[0].start_percentage",
        "between 0 and 1",
    ),
    (
        "cn-scale-nan",
        {"controlnets": [{**CN, "conditioning_scale": math.nan}]},
        "input.controlnets[0].conditioning_scale",
        "finite",
    ),
    (
        "cn-threshold-without-mask",
        {"controlnets": [{**CN, "mask_threshold": 0.2}]},
        "input.controlnets[0].mask_threshold",
        "only applies together with mask_url",
    ),
    (
        "cn-threshold-range",
        {"controlnets": [{**CN, "mask_url": "m", "mask_threshold": 2}]},
        "input.controlnets[0].mask_threshold",
        "between 0 and 1",
    ),
    ("cn-variant", {"controlnets": [{**CN, "variant": "../x"}]}, "input.controlnets[0].variant", "variant name"),
    (
        "cn-instantid",
        {"controlnets": [{**CN, "ip_adapter_index": 0}]},
        "input.controlnets[0].ip_adapter_index",
        "insightface",
    ),
    ("cn-too-many", {"controlnets": [CN] * 9}, "input.controlnets", "at most 8"),
    ("guess-mode-alone", {"controlnet_guess_mode": True}, "input.controlnet_guess_mode", "only applies together"),
    ("ipa-no-path", {"ip_adapter": [{**IPA, "path": ""}]}, "input.ip_adapter[0].path", "is required"),
    (
        "ipa-no-image",
        {"ip_adapter": [{**IPA, "ip_adapter_image_url": []}]},
        "input.ip_adapter[0].ip_adapter_image_url",
        "at least one",
    ),
    (
        "ipa-empty-image",
        {"ip_adapter": [{**IPA, "ip_adapter_image_url": [" "]}]},
        "input.ip_adapter[0].ip_adapter_image_url[0]",
        "must not be empty",
    ),
    ("ipa-scale-inf", {"ip_adapter": [{**IPA, "scale": math.inf}]}, "input.ip_adapter[0].scale", "finite"),
    (
        "ipa-scale-json-not-json",
        {"ip_adapter": [{**IPA, "scale_json": "{up: 1"}]},
        "input.ip_adapter[0].scale_json",
        "not valid JSON",
    ),
    (
        "ipa-scale-json-unknown-key",
        {"ip_adapter": [{**IPA, "scale_json": json.dumps({"left": 1})}]},
        "input.ip_adapter[0].scale_json",
        "unknown key 'left'",
    ),
    (
        "ipa-scale-json-bad-block",
        {"ip_adapter": [{**IPA, "scale_json": json.dumps({"up": {"b0": 1}})}]},
        "input.ip_adapter[0].scale_json",
        "unknown block 'b0'",
    ),
    (
        "ipa-scale-json-not-number",
        {"ip_adapter": [{**IPA, "scale_json": json.dumps({"up": {"block_0": ["x"]}})}]},
        "input.ip_adapter[0].scale_json",
        "list of numbers",
    ),
    (
        "ipa-noising-negative",
        {"ip_adapter": [{**IPA, "unconditional_noising_factor": -1}]},
        "input.ip_adapter[0].unconditional_noising_factor",
        "between 0 and",
    ),
    (
        "ipa-faceid",
        {"ip_adapter": [{**IPA, "insight_face_model_path": "buffalo_l"}]},
        "input.ip_adapter[0].insight_face_model_path",
        "insightface",
    ),
    (
        "ipa-shortcut-false",
        {"ip_adapter": [{**IPA, "image_projection_shortcut": False}]},
        "input.ip_adapter[0].image_projection_shortcut",
        "FaceID",
    ),
    (
        "ipa-weight-name-path",
        {"ip_adapter": [{**IPA, "weight_name": "models/x.safetensors"}]},
        "input.ip_adapter[0].weight_name",
        "file name",
    ),
    ("encoder-without-adapter", {"image_encoder_path": "org/enc"}, "input.image_encoder_path", "only applies"),
    ("encoder-subfolder-alone", {"image_encoder_subfolder": "enc"}, "input.image_encoder_subfolder", "only applies"),
    (
        "encoder-weight-name-alone",
        {"image_encoder_weight_name": "model.safetensors"},
        "input.image_encoder_weight_name",
        "only applies",
    ),
    ("ic-light-no-image", {"ic_light_model_url": "m"}, "input.ic_light_image_url", "is required"),
    ("ic-light-image-alone", {"ic_light_image_url": "fg"}, "input.ic_light_image_url", "only applies"),
    (
        "ic-light-background-alone",
        {"ic_light_model_background_image_url": "bg"},
        "input.ic_light_model_background_image_url",
        "only applies",
    ),
]


@pytest.mark.parametrize(("overrides", "field", "text"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_conditioning_is_refused_by_field(overrides: dict[str, Any], field: str, text: str) -> None:
    found = violations(**overrides)
    assert field in found, found
    assert any(text in why for why in found[field]), found[field]
