"""ControlNets, IP-Adapters and IC-Light on tiny SD 1.5 / SDXL pipelines, without Ray.

Every option is compared with the same request without it (or with another value), so a test
fails when an option is accepted and has no effect; every request is followed by a check that
the resident pipeline gives the same bytes as before (nothing leaks into the next request).
Weights come from serving/tiny_adapters.py, in the layouts real ones are published in.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from loraserve.inputs import to_input
from serving import conditioning as cond_mod
from serving.conditioning import (
    Conditioning,
    ControlNetSpec,
    ICLightSpec,
    ImageEncoderSpec,
    IPAdapterSpec,
    ModelCache,
    resolve_conditioning,
)
from serving.params import params_from_input
from serving.pipelines import (
    AdapterLoadError,
    GenerationParams,
    LoadedPipeline,
    OptionUnavailableError,
    generate_result,
    load_pipeline,
)
import serving_testkit as testkit
from serving_testkit import half_mask, picture
from serving.tiny import Family, TinyModel, make_tiny_model
from serving.tiny_adapters import TinyAdapters, make_tiny_adapters
from storage.fetch import FetchPolicy, InputFetchError
from storage.weights import WeightsCache

FAMILIES: list[Family] = ["sd15", "sdxl"]
SIZE = 64



@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    root = tmp_path_factory.mktemp("tiny-conditioning")
    return {family: make_tiny_model(root / family, family=family, num_loras=1) for family in FAMILIES}


@pytest.fixture(scope="module")
def adapters(models: dict[str, TinyModel], tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyAdapters]:
    root = tmp_path_factory.mktemp("tiny-conditioning-adapters")
    return {f: make_tiny_adapters(root / f, models[f].pipeline_dir, f) for f in FAMILIES}


@pytest.fixture(scope="module")
def pipelines(models: dict[str, TinyModel]) -> dict[str, LoadedPipeline]:
    return {family: load_pipeline(str(model.pipeline_dir)) for family, model in models.items()}




@pytest.fixture
def kit(adapters: dict[str, TinyAdapters], family: str) -> TinyAdapters:
    return adapters[family]


def params(**overrides: Any) -> GenerationParams:
    return testkit.params(**{"num_inference_steps": 3, **overrides})


def pixels(loaded: LoadedPipeline, conditioning: Conditioning | None = None, **overrides: Any) -> np.ndarray:
    result = generate_result(loaded, params(conditioning=conditioning, **overrides))
    return np.stack([np.asarray(image) for image in result.images]).astype(np.int16)


def differs(first: np.ndarray, second: np.ndarray) -> bool:
    return first.shape != second.shape or float(np.abs(first - second).mean()) > 0.5


def controlnet(kit: TinyAdapters, **overrides: Any) -> ControlNetSpec:
    fields: dict[str, Any] = {"path": "cn", "image_url": "img", "weights": kit.controlnet.folder, "image": picture(1)}
    return ControlNetSpec(**{**fields, **overrides})


def ip_adapter(kit: TinyAdapters, **overrides: Any) -> IPAdapterSpec:
    ipa = kit.ip_adapter
    fields: dict[str, Any] = {
        "path": str(ipa.repo),
        "image_urls": ["img"],
        "weights": ipa.repo / ipa.model_subfolder / ipa.weight_name,
        "images": [picture(2)],
    }
    return IPAdapterSpec(**{**fields, **overrides})


def encoder(kit: TinyAdapters, **overrides: Any) -> ImageEncoderSpec:
    fields: dict[str, Any] = {"folder": kit.ip_adapter.repo / kit.ip_adapter.image_encoder_subfolder}
    return ImageEncoderSpec(**{**fields, **overrides})


def with_ip(kit: TinyAdapters, *specs: IPAdapterSpec, **encoder_overrides: Any) -> Conditioning:
    return Conditioning(ip_adapters=list(specs) or [ip_adapter(kit)], image_encoder=encoder(kit, **encoder_overrides))


def unet_fingerprint(loaded: LoadedPipeline) -> str:
    """The U-Net's own weights, processors and IP-Adapter flag; resident LoRA layers are by design and left out."""
    digest = hashlib.sha256()
    for name, tensor in sorted(loaded.pipe.unet.state_dict().items()):
        if "lora_" in name:
            continue
        digest.update(name.replace(".base_layer.", ".").encode())
        digest.update(tensor.detach().float().numpy().tobytes())
    processors = sorted((name, type(p).__name__) for name, p in loaded.pipe.unet.attn_processors.items())
    digest.update(repr(processors).encode())
    digest.update(repr(loaded.pipe.unet.config.encoder_hid_dim_type).encode())
    return digest.hexdigest()


_PLAIN: dict[int, tuple[str, np.ndarray]] = {}


@pytest.fixture
def plain(loaded: LoadedPipeline) -> Iterator[np.ndarray]:
    """The plain image before the test, and afterwards the check that nothing leaked into the pipeline."""
    components = dict(loaded.pipe.components)
    if id(loaded) not in _PLAIN:
        _PLAIN[id(loaded)] = (unet_fingerprint(loaded), pixels(loaded))
    fingerprint, before = _PLAIN[id(loaded)]
    yield before
    assert dict(loaded.pipe.components) == components, "a request replaced a resident component"
    # First a request without LoRAs: a LoRA set stays installed until one.
    assert np.array_equal(pixels(loaded), before), "a request's conditioning leaked into the next one"
    assert unet_fingerprint(loaded) == fingerprint, "a request left the resident U-Net changed"


# ---------------------------------------------------------------- ControlNet

CONTROLNET_OPTIONS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # option: (spec fields of the reference request, spec fields of the request that must differ)
    "conditioning_scale": ({}, {"conditioning_scale": 0.4}),
    "start_end_percentage": ({}, {"start_percentage": 0.34, "end_percentage": 0.67}),
    "control_image": ({}, {"image": picture(9)}),
    "mask": ({}, {"mask": half_mask()}),
    "mask_threshold": ({"mask": half_mask(value=150)}, {"mask": half_mask(value=150), "mask_threshold": 0.7}),
    "variant": ({}, {"variant": "fp16"}),
}


def test_controlnet_changes_the_image_and_scale_zero_is_the_plain_image(
    loaded: LoadedPipeline, kit: TinyAdapters, plain: np.ndarray
) -> None:
    controlled = pixels(loaded, Conditioning(controlnets=[controlnet(kit)]))
    assert differs(controlled, plain)
    # The composed ControlNet pipeline runs the resident modules unchanged: no control, same bytes.
    off = pixels(loaded, Conditioning(controlnets=[controlnet(kit, conditioning_scale=0.0)]))
    assert np.array_equal(off, plain)


@pytest.mark.parametrize("option", sorted(CONTROLNET_OPTIONS))
def test_each_controlnet_option_changes_the_image(
    loaded: LoadedPipeline, kit: TinyAdapters, plain: np.ndarray, option: str
) -> None:
    reference, changed = CONTROLNET_OPTIONS[option]
    first = pixels(loaded, Conditioning(controlnets=[controlnet(kit, **reference)]))
    second = pixels(loaded, Conditioning(controlnets=[controlnet(kit, **changed)]))
    assert differs(first, second), f"{option} had no effect"


def test_guess_mode_and_several_controlnets_change_the_image(
    loaded: LoadedPipeline, kit: TinyAdapters, plain: np.ndarray
) -> None:
    one = pixels(loaded, Conditioning(controlnets=[controlnet(kit)]))
    guess = pixels(loaded, Conditioning(controlnets=[controlnet(kit)], guess_mode=True))
    two = Conditioning(controlnets=[controlnet(kit), controlnet(kit, variant="fp16", image=picture(5))])
    assert differs(one, guess), "controlnet_guess_mode had no effect"
    assert differs(one, pixels(loaded, two)), "a second ControlNet had no effect"


def test_single_file_controlnet_with_derived_or_given_config_matches_the_folder(
    loaded: LoadedPipeline, kit: TinyAdapters
) -> None:
    folder = pixels(loaded, Conditioning(controlnets=[controlnet(kit)]))
    derived = pixels(loaded, Conditioning(controlnets=[controlnet(kit, weights=kit.controlnet.single_file)]))
    config = json.loads(kit.controlnet.config_file.read_text())
    given = pixels(
        loaded, Conditioning(controlnets=[controlnet(kit, weights=kit.controlnet.single_file, config=config)])
    )
    assert np.array_equal(derived, folder) and np.array_equal(given, folder)


def test_config_url_is_what_builds_the_model(loaded: LoadedPipeline, kit: TinyAdapters, plain: np.ndarray) -> None:
    config = json.loads(kit.controlnet.config_file.read_text())
    config["layers_per_block"] = 1
    spec = controlnet(kit, weights=kit.controlnet.single_file, config=config)
    with pytest.raises(AdapterLoadError, match="does not match its config.*config_url"):
        pixels(loaded, Conditioning(controlnets=[spec]))


def test_missing_variant_and_wrong_family_are_clear_errors(
    loaded: LoadedPipeline, adapters: dict[str, TinyAdapters], family: str, plain: np.ndarray
) -> None:
    kit = adapters[family]
    with pytest.raises(AdapterLoadError, match="variant 'bf16'"):
        pixels(loaded, Conditioning(controlnets=[controlnet(kit, variant="bf16")]))
    other = adapters["sdxl" if family == "sd15" else "sd15"]
    with pytest.raises(AdapterLoadError, match="does not fit model .*another model family"):
        pixels(loaded, Conditioning(controlnets=[controlnet(other)]))


@pytest.mark.parametrize(
    ("mask", "message"),
    [(half_mask((32, 32)), "must be the same size"), (None, "divisible by 32")],
    ids=["other-size", "not-divisible"],
)
def test_bad_controlnet_mask_is_refused(loaded: LoadedPipeline, kit: TinyAdapters, mask: Any, message: str) -> None:
    spec = controlnet(kit, mask=mask or half_mask((40, 40)), image=picture(1, (40, 40)) if mask is None else picture(1))
    with pytest.raises(OptionUnavailableError, match=message) as info:
        pixels(loaded, Conditioning(controlnets=[spec]))
    assert info.value.field_name == "controlnets[0].mask_url"


def test_controlnet_is_refused_with_tiling_and_zero_snr(loaded: LoadedPipeline, kit: TinyAdapters) -> None:
    tiled = {"width": 128, "tile_width": 64, "tile_height": 64, "tile_stride_width": 32, "tile_stride_height": 32}
    with pytest.raises(OptionUnavailableError, match="tiled generation"):
        pixels(loaded, Conditioning(controlnets=[controlnet(kit)]), **tiled)
    with pytest.raises(OptionUnavailableError, match="guidance rescale"):
        pixels(loaded, Conditioning(controlnets=[controlnet(kit)]), rescale_betas_snr_zero=True, scheduler="Euler")


def test_loaded_controlnets_stay_in_a_count_bounded_lru(loaded: LoadedPipeline, kit: TinyAdapters) -> None:
    cache = cond_mod.MODELS
    cache.clear()
    pixels(loaded, Conditioning(controlnets=[controlnet(kit)]))
    loads = cache.loads
    pixels(loaded, Conditioning(controlnets=[controlnet(kit, conditioning_scale=0.5)]))
    assert cache.loads == loads, "the same ControlNet was loaded again"
    small = ModelCache(capacity=1)
    small.get(("a",), lambda: 1)
    small.get(("b",), lambda: 2)
    assert small.keys() == [("b",)] and small.get(("b",), lambda: 3) == 2


def test_conditioning_models_are_bounded_by_bytes_and_counted() -> None:
    from serving.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    one_kib = torch.zeros(256)  # float32: 1024 bytes
    cache = ModelCache(capacity=10, max_bytes=2048, observer=metrics.tier_observer("conditioning"))
    for key in ("a", "b", "a", "c"):  # b is the least recently used when c arrives
        cache.get((key,), lambda: {"weight": one_kib.clone()})
    assert cache.keys() == [("a",), ("c",)] and cache.nbytes == 2048
    # A real model's bytes are its tensors'; one bigger than the budget is still kept alone.
    cache.get(("controlnet",), lambda: torch.nn.Linear(64, 64))
    assert cache.keys() == [("controlnet",)] and cache.nbytes == (64 * 64 + 64) * 4

    def value(name: str) -> float:
        return metrics.registry.get_sample_value(name, {"tier": "conditioning"}) or 0.0

    assert value("loraserve_cache_hits_total") == 1
    assert value("loraserve_cache_misses_total") == 4
    assert value("loraserve_cache_evictions_total") == 3
    assert value("loraserve_cache_bytes") == cache.nbytes


# ---------------------------------------------------------------- IP-Adapter

IP_OPTIONS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "scale": ({}, {"scale": 0.4}),
    "scale_json": ({}, {"scale_json": json.dumps({"up": {"block_0": [0.0, 1.0, 0.0]}, "down": 1.0})}),
    "image": ({}, {"images": [picture(7)]}),
    "several_images": ({}, {"images": [picture(2), picture(7)], "image_urls": ["a", "b"]}),
    "mask": ({}, {"mask": half_mask()}),
    "unconditional_noising_factor": ({}, {"unconditional_noising_factor": 0.8}),
}


def test_ip_adapter_changes_the_image(loaded: LoadedPipeline, kit: TinyAdapters, plain: np.ndarray) -> None:
    assert differs(pixels(loaded, with_ip(kit)), plain)


@pytest.mark.parametrize("option", sorted(IP_OPTIONS))
def test_each_ip_adapter_option_changes_the_image(
    loaded: LoadedPipeline, kit: TinyAdapters, plain: np.ndarray, option: str
) -> None:
    reference, changed = IP_OPTIONS[option]
    first = pixels(loaded, with_ip(kit, ip_adapter(kit, **reference)))
    second = pixels(loaded, with_ip(kit, ip_adapter(kit, **changed)))
    assert differs(first, second), f"{option} had no effect"


def test_two_ip_adapters_and_other_image_encoder_change_the_image(
    loaded: LoadedPipeline, kit: TinyAdapters, plain: np.ndarray
) -> None:
    one = pixels(loaded, with_ip(kit))
    two = pixels(loaded, with_ip(kit, ip_adapter(kit), ip_adapter(kit, images=[picture(7)], scale=0.5)))
    ipa = kit.ip_adapter
    alt = pixels(
        loaded, with_ip(kit, folder=ipa.repo / ipa.alt_encoder_subfolder, weight_name=ipa.alt_encoder_weight_name)
    )
    assert differs(one, two), "a second IP-Adapter had no effect"
    assert differs(one, alt), "image_encoder_path / image_encoder_weight_name had no effect"


def test_default_encoder_weight_name_reads_model_safetensors_and_pickle_names_are_refused(
    loaded: LoadedPipeline, kit: TinyAdapters, plain: np.ndarray
) -> None:
    unset = pixels(loaded, with_ip(kit))
    fal_default = pixels(loaded, with_ip(kit, weight_name="pytorch_model.bin"))
    assert np.array_equal(unset, fal_default)
    ipa = kit.ip_adapter
    with pytest.raises(InputFetchError, match="pickle file") as info:
        pixels(loaded, with_ip(kit, folder=ipa.repo / ipa.alt_encoder_subfolder, weight_name="pytorch_model.bin"))
    assert info.value.field == "input.image_encoder_weight_name"


def test_scale_json_naming_a_block_without_attention_is_refused(loaded: LoadedPipeline, kit: TinyAdapters) -> None:
    spec = ip_adapter(kit, scale_json=json.dumps({"down": {"block_0": 1.0}}))
    with pytest.raises(OptionUnavailableError, match="down.block_0 has no attention layers") as info:
        pixels(loaded, with_ip(kit, spec))
    assert info.value.field_name == "ip_adapter[0].scale_json"


def test_ip_adapter_mask_of_another_size_is_refused(loaded: LoadedPipeline, kit: TinyAdapters) -> None:
    with pytest.raises(OptionUnavailableError, match="same size"):
        pixels(loaded, with_ip(kit, ip_adapter(kit, mask=half_mask((32, 32)))))


def test_face_id_and_wrong_family_ip_adapters_are_refused(
    loaded: LoadedPipeline, adapters: dict[str, TinyAdapters], family: str, tmp_path: Path, plain: np.ndarray
) -> None:
    kit = adapters[family]
    face_id = tmp_path / "faceid.safetensors"
    safetensors.torch.save_file(
        {
            "image_proj.norm.weight": torch.ones(4),
            "image_proj.proj.0.weight": torch.ones(8, 4),
            "ip_adapter.1.to_k_ip.weight": torch.ones(2, 2),
        },
        str(face_id),
    )
    with pytest.raises(OptionUnavailableError, match="insightface"):
        pixels(loaded, with_ip(kit, ip_adapter(kit, weights=face_id)))
    with pytest.raises(OptionUnavailableError, match="insightface"):
        pixels(loaded, with_ip(kit, ip_adapter(kit, insight_face_model_path="buffalo_l")))
    other = adapters["sdxl" if family == "sd15" else "sd15"].ip_adapter
    spec = ip_adapter(kit, weights=other.repo / other.model_subfolder / other.weight_name)
    with pytest.raises(AdapterLoadError, match="does not fit model"):
        pixels(loaded, with_ip(kit, spec))


# ---------------------------------------------------------------- IC-Light (SD 1.5)


@pytest.fixture
def sd15(pipelines: dict[str, LoadedPipeline]) -> LoadedPipeline:
    return pipelines["sd15"]


def ic_light(adapters: dict[str, TinyAdapters], fbc: bool = False, **overrides: Any) -> Conditioning:
    kit = adapters["sd15"]
    weights = kit.ic_light_background if fbc else kit.ic_light
    fields: dict[str, Any] = {"model_url": "ic", "image_url": "fg", "weights": weights, "image": picture(3)}
    if fbc:
        fields["background"] = picture(4)
    return Conditioning(ic_light=ICLightSpec(**{**fields, **overrides}))


def test_ic_light_foreground_and_background_change_the_image(
    pipelines: dict[str, LoadedPipeline], adapters: dict[str, TinyAdapters]
) -> None:
    loaded = pipelines["sd15"]
    fingerprint = unet_fingerprint(loaded)
    before = pixels(loaded)
    fc = pixels(loaded, ic_light(adapters))
    assert differs(fc, before)
    assert differs(fc, pixels(loaded, ic_light(adapters, image=picture(8)))), "ic_light_image_url had no effect"
    fbc = pixels(loaded, ic_light(adapters, fbc=True))
    other_background = pixels(loaded, ic_light(adapters, fbc=True, background=picture(6)))
    assert differs(fbc, other_background), "ic_light_model_background_image_url had no effect"
    assert unet_fingerprint(loaded) == fingerprint and np.array_equal(pixels(loaded), before)


def test_ic_light_works_with_tiling_and_refuses_mismatches(
    pipelines: dict[str, LoadedPipeline], adapters: dict[str, TinyAdapters]
) -> None:
    loaded = pipelines["sd15"]
    tiled = {"width": 96, "tile_width": 64, "tile_height": 64, "tile_stride_width": 32, "tile_stride_height": 32}
    assert differs(pixels(loaded, ic_light(adapters), **tiled), pixels(loaded, **tiled))
    with pytest.raises(OptionUnavailableError, match="needs a background image"):
        pixels(loaded, ic_light(adapters, weights=adapters["sd15"].ic_light_background))
    with pytest.raises(OptionUnavailableError, match="cannot use a background image"):
        pixels(loaded, ic_light(adapters, background=picture(4)))
    with pytest.raises(OptionUnavailableError, match="SD 1.5 family only"):
        pixels(pipelines["sdxl"], ic_light(adapters))


# ---------------------------------------------------------------- everything, and from the request


def test_everything_on_then_plain_gives_the_plain_bytes(
    loaded: LoadedPipeline, kit: TinyAdapters, models: dict[str, TinyModel], family: str, plain: np.ndarray
) -> None:
    everything = with_ip(kit, ip_adapter(kit, mask=half_mask(), scale_json=json.dumps({"up": 0.5})))
    everything.controlnets = [controlnet(kit, mask=half_mask()), controlnet(kit, variant="fp16")]
    everything.guess_mode = True
    if family == "sd15":
        everything.ic_light = ICLightSpec(model_url="ic", image_url="fg", weights=kit.ic_light, image=picture(3))
    lora = [(str(models[family].lora_paths[0]), 0.8)]
    assert differs(pixels(loaded, everything, loras=lora, num_images=2, scheduler="Euler A"), plain)


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_request_fields_resolve_through_the_weights_cache_and_fetcher(
    loaded: LoadedPipeline, kit: TinyAdapters, tmp_path: Path, plain: np.ndarray
) -> None:
    """params_from_input keeps the URLs; resolve_conditioning turns them into files and images."""
    ipa = kit.ip_adapter
    inp = to_input(
        {
            "model_name": "m",
            "prompt": "a photo of a cat",
            "controlnets": [
                {
                    "path": str(kit.controlnet.single_file),
                    "control_image_url": data_uri(picture(1)),
                    "mask_image_url": data_uri(half_mask()),
                    "config_url": "data:application/json;base64,"
                    + base64.b64encode(kit.controlnet.config_file.read_bytes()).decode(),
                    "conditioning_scale": 0.8,
                }
            ],
            "ip_adapter": [
                {
                    "path": str(ipa.repo),
                    "model_subfolder": ipa.model_subfolder,
                    "weight_name": ipa.weight_name,
                    "ip_adapter_image_url": [data_uri(picture(2))],
                }
            ],
        }
    )
    request = params_from_input(inp, seed=1)
    assert request.conditioning is not None
    assert request.conditioning.controlnets[0].image_field == "control_image_url"
    weights = WeightsCache(tmp_path / "weights", FetchPolicy(), local_roots=[tmp_path.parent])
    resolve_conditioning(request.conditioning, weights=weights, image_policy=FetchPolicy())
    cond = request.conditioning
    # No image_encoder_path: the image_encoder folder beside the adapter, as diffusers lays them out.
    assert cond.image_encoder.folder is not None
    assert cond.image_encoder.folder.resolve() == (ipa.repo / ipa.image_encoder_subfolder).resolve()
    by_request = generate_result(
        loaded, dataclasses.replace(request, width=SIZE, height=SIZE, num_inference_steps=3, guidance_scale=5.0)
    )
    direct = Conditioning(
        controlnets=[controlnet(kit, mask=half_mask(), conditioning_scale=0.8)],
        ip_adapters=[ip_adapter(kit)],
        image_encoder=encoder(kit),
    )
    expected = pixels(loaded, direct)
    got = np.stack([np.asarray(image) for image in by_request.images]).astype(np.int16)
    assert np.array_equal(got, expected)


def test_resolution_failures_name_the_field(kit: TinyAdapters, tmp_path: Path) -> None:
    weights = WeightsCache(tmp_path / "weights", FetchPolicy(), local_roots=[tmp_path.parent])
    bad_image = Conditioning(
        controlnets=[
            ControlNetSpec(
                path=str(kit.controlnet.folder), image_url="data:image/png;base64,AAAA", image_field="control_image_url"
            )
        ]
    )
    with pytest.raises(InputFetchError) as info:
        resolve_conditioning(bad_image, weights=weights, image_policy=FetchPolicy())
    assert info.value.field == "input.controlnets[0].control_image_url"
    no_weight_name = Conditioning(ip_adapters=[IPAdapterSpec(path=str(kit.ip_adapter.repo), image_urls=["x"])])
    with pytest.raises(InputFetchError) as info:
        resolve_conditioning(no_weight_name, weights=weights, image_policy=FetchPolicy())
    assert info.value.field == "input.ip_adapter[0].weight_name"
    private = Conditioning(
        ic_light=ICLightSpec(model_url=str(kit.controlnet.single_file), image_url="http://10.0.0.1/fg.png")
    )
    with pytest.raises(InputFetchError, match="private address") as info:
        resolve_conditioning(private, weights=weights, image_policy=FetchPolicy())
    assert info.value.field == "input.ic_light_image_url"
