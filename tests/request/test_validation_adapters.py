"""loraserve.request.validation for unet_name, variant and embeddings, now implemented rather than refused."""

from __future__ import annotations

from typing import Any

import pytest

from loraserve.request.validation import MAX_EMBEDDINGS
from loraserve.request import schema
from loraserve.inputs import to_input
from loraserve.v1 import types_pb2
from serving.params import params_from_input
from tests.request.validation_testkit import MINIMAL, violations


@pytest.mark.parametrize(
    "overrides",
    [
        {"unet_name": "latent-consistency/lcm-sdxl"},
        {"unet_name": "https://example.com/sdxl_lightning_4step_unet.safetensors", "variant": "fp16"},
        {"variant": "fp16"},
        {"variant": "bf16"},
        {"embeddings": [{"path": "https://example.com/emb.safetensors"}]},
        {"embeddings": [{"path": "emb.safetensors", "tokens": ["<s0>", "<s1>"]}]},
        {"embeddings": [{"path": "a.safetensors", "tokens": ["<a>"]}, {"path": "b.safetensors", "tokens": ["<b>"]}]},
        {"embeddings": []},
    ],
    ids=repr,
)
def test_valid_values_pass(overrides: dict[str, Any]) -> None:
    assert violations(**overrides) == {}


BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"unet_name": "   "}, "input.unet_name", "must not be blank"),
    ({"unet_name": "u" * 4097}, "input.unet_name", "longer than 4096"),
    ({"variant": "../fp16"}, "input.variant", "weights variant name"),
    ({"variant": "fp16.safetensors"}, "input.variant", "weights variant name"),
    ({"variant": "v" * 33}, "input.variant", "at most 32"),
    ({"embeddings": [{"path": ""}]}, "input.embeddings[0].path", "is required"),
    ({"embeddings": [{"path": "e", "tokens": ["<s0>", ""]}]}, "input.embeddings[0].tokens", "1 to 64 characters"),
    ({"embeddings": [{"path": "e", "tokens": ["my token"]}]}, "input.embeddings[0].tokens", "without spaces"),
    ({"embeddings": [{"path": "e", "tokens": ["t" * 65]}]}, "input.embeddings[0].tokens", "1 to 64"),
    ({"embeddings": [{"path": "e", "tokens": ["<a>", "<a>"]}]}, "input.embeddings[0].tokens", "given twice"),
    (
        {"embeddings": [{"path": "a"}, {"path": "b"}]},
        "input.embeddings[1].tokens",
        "'<s0>' is already used by embeddings[0]",
    ),
    (
        {"embeddings": [{"path": f"e{i}", "tokens": [f"<e{i}>"]} for i in range(MAX_EMBEDDINGS + 1)]},
        "input.embeddings",
        f"at most {MAX_EMBEDDINGS} embeddings",
    ),
]


@pytest.mark.parametrize(("overrides", "field", "text"), BAD, ids=[field + ":" + text for _, field, text in BAD])
def test_bad_values_name_the_field(overrides: dict[str, Any], field: str, text: str) -> None:
    found = violations(**overrides)
    assert field in found, found
    assert any(text in why for why in found[field]), found[field]


def test_params_carry_embeddings_with_fal_default_tokens() -> None:
    inp = to_input(
        {
            **MINIMAL,
            "embeddings": [{"path": "a.safetensors"}, {"path": "b.safetensors", "tokens": ["<b>"]}],
            "unet_name": "org/unet",
            "variant": "fp16",
        }
    )
    params = params_from_input(inp, seed=1)
    assert params.embeddings == [("a.safetensors", ["<s0>", "<s1>"]), ("b.safetensors", ["<b>"])]
    assert schema.embedding_tokens(types_pb2.Embedding(path="x")) == list(schema.DEFAULT_EMBEDDING_TOKENS)
