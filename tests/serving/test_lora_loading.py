"""Making a LoRA resident sets the resident adapters aside (serving/pipelines.py `load_parsed_lora`).

PEFT's injection walks every module of the model, so with the resident adapters' wrappers in the
tree each load grew with their number. The loaders now run on the base layers and the new
adapter's entries move into the resident wrappers afterwards; these tests check that leaves the
models exactly as loading into the wrapped models does (diffusers' loaders called directly).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DiffusionPipeline
from peft.tuners.lora.layer import LoraLayer

from serving.lora_cache import ParsedLora, parse_lora_file
from serving.pipelines import _call_lora_loaders, load_parsed_lora
from serving.tiny import _build_pipeline, make_tiny_lora

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
PER_ADAPTER = ("r", "lora_alpha", "scaling", "use_dora", "use_rslora", "lora_bias", "lora_variant")


def fresh_pipe(family: str) -> DiffusionPipeline:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _build_pipeline(family)  # type: ignore[arg-type]


def lora_files(tmp_path: Path, family: str) -> list[Path]:
    """Different coverage, so later loads both join resident wrappers and wrap layers of their own."""
    text = ["text_encoder"] if family == "sd15" else ["text_encoder", "text_encoder_2"]
    specs: list[dict[str, Any]] = [
        {"components": ["unet"]},
        {"lora_format": "kohya", "alpha": 2},
        {"components": text[-1:], "alpha": 1},
        {"components": ["unet", *text], "alpha": 2},
        {"lora_format": "kohya", "components": ["unet"]},
    ]
    return [
        make_tiny_lora(tmp_path / f"lora_{i}.safetensors", family, seed=i + 1, **spec)  # type: ignore[arg-type]
        for i, spec in enumerate(specs)
    ]


def parsed_loras(tmp_path: Path, family: str) -> list[ParsedLora]:
    """The files, plus one that adapts only some of the layers the others do."""
    parsed = [parse_lora_file(path) for path in lora_files(tmp_path, family)]
    first = parsed[0]
    modules = sorted({key.split(".lora_")[0] for key in first.state_dict})[::2]
    partial = {key: t for key, t in first.state_dict.items() if key.split(".lora_")[0] in modules}
    return [*parsed, dataclasses.replace(first, name="lora_partial", state_dict=partial)]


def snapshot(pipe: DiffusionPipeline) -> dict[str, Any]:
    """Everything about the adapters a later request or eviction can see, per component."""
    state: dict[str, Any] = {}
    for attr in COMPONENTS:
        model = getattr(pipe, attr, None)
        if model is None:
            continue
        state[f"{attr}.modules"] = [(name, type(module).__name__) for name, module in model.named_modules()]
        state[f"{attr}.params"] = [
            (name, p.dtype, p.device, p.requires_grad, p.detach().clone())
            for name, p in model.state_dict(keep_vars=True).items()
        ]
        state[f"{attr}.peft_config"] = {
            name: config.to_dict() for name, config in getattr(model, "peft_config", {}).items()
        }
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                for field in PER_ADAPTER:
                    state[f"{attr}.{name}.{field}"] = {k: repr(v) for k, v in getattr(module, field).items()}
                state[f"{attr}.{name}.active"] = (module.active_adapters, module.disable_adapters)
    state["list_adapters"] = pipe.get_list_adapters()
    return state


def assert_same(expected: dict[str, Any], actual: dict[str, Any]) -> None:
    assert expected.keys() == actual.keys()
    for key, want in expected.items():
        got = actual[key]
        if key.endswith(".params"):
            assert [entry[:4] for entry in got] == [entry[:4] for entry in want], key
            for (name, *_, a), (_, *_, b) in zip(got, want):
                assert torch.equal(a, b), f"{key}: {name}"
        else:
            assert got == want, key


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_loading_beside_resident_adapters_equals_loading_into_the_wrapped_model(
    tmp_path: Path, family: str
) -> None:
    sdxl = family == "sdxl"
    reference, fast = fresh_pipe(family), fresh_pipe(family)
    for parsed in parsed_loras(tmp_path, family):
        _call_lora_loaders(reference, parsed, sdxl=sdxl)
        slots = load_parsed_lora(fast, parsed, sdxl=sdxl)
        assert_same(snapshot(reference), snapshot(fast))
        # The returned slots are every wrapper, each in its place.
        wrappers = [
            module
            for attr in COMPONENTS
            if getattr(fast, attr, None) is not None
            for module in getattr(fast, attr).modules()
            if isinstance(module, LoraLayer)
        ]
        assert sorted(map(id, (slot.layer for slot in slots))) == sorted(map(id, wrappers))
        assert all(slot.parent._modules[slot.attr] is slot.layer for slot in slots)
    # Evicting works on the moved entries as on PEFT's own.
    name = parse_lora_file(lora_files(tmp_path, family)[3]).name
    reference.delete_adapters(name)
    fast.delete_adapters(name)
    assert_same(snapshot(reference), snapshot(fast))


def test_a_failed_load_puts_the_resident_wrappers_back(tmp_path: Path) -> None:
    """A LoRA whose matrices do not fit the layers they name: PEFT raises after wrapping them."""
    pipe = fresh_pipe("sd15")
    load_parsed_lora(pipe, parse_lora_file(make_tiny_lora(tmp_path / "ok.safetensors", "sd15")), sdxl=False)
    before = [(name, module) for name, module in pipe.unet.named_modules() if isinstance(module, LoraLayer)]
    good = parse_lora_file(make_tiny_lora(tmp_path / "other.safetensors", "sd15", seed=7, components=["unet"]))
    wrong = {key: t.T.contiguous() if ".lora_A." in key else t for key, t in good.state_dict.items()}
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_parsed_lora(pipe, dataclasses.replace(good, state_dict=wrong), sdxl=False)
    after = {name: module for name, module in pipe.unet.named_modules() if isinstance(module, LoraLayer)}
    assert all(after.get(name) is module for name, module in before)
