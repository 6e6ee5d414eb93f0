"""Hugging Face downloads: list first, fetch only what the pipeline loads, cap before downloading.

There is no network here: huggingface_hub's own client (model API, tree API, resolve, its cache)
talks to a local server answering as the Hub does (storage_testkit.HubMirror).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants
from storage_testkit import FileServer, HubMirror, safetensors_bytes
from test_storage_weights import _seed_hub_cache

from storage.fetch import FetchPolicy, InputFetchError
from storage.weights import HubFile, WeightsCache, list_hub_files, select_hub_files

MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.30.0",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "feature_extractor": [None, None],
}
GB = 1024**3
# What stabilityai/stable-diffusion-xl-base-1.0 looks like, trimmed: a 6.9 GB root checkpoint,
# precisions, ONNX/Flax/OpenVINO exports and pickles beside the diffusers folders.
SDXL_LISTING = [
    HubFile("model_index.json", 600),
    HubFile("README.md", 9_000),
    HubFile("sd_xl_base_1.0.safetensors", int(6.9 * GB)),
    HubFile("sd_xl_base_1.0_0.9vae.safetensors", int(6.9 * GB)),
    HubFile("unet/config.json", 1_700),
    HubFile("unet/diffusion_pytorch_model.safetensors", int(10.3 * GB)),
    HubFile("unet/diffusion_pytorch_model.fp16.safetensors", int(5.1 * GB)),
    HubFile("unet/diffusion_pytorch_model.onnx", 7_000_000),
    HubFile("unet/openvino_model.xml", 1_000),
    HubFile("unet/diffusion_flax_model.msgpack", int(10.3 * GB)),
    HubFile("vae/config.json", 700),
    HubFile("vae/diffusion_pytorch_model.safetensors", 335_000_000),
    HubFile("vae/diffusion_pytorch_model.fp16.safetensors", 167_000_000),
    HubFile("vae_1_0/diffusion_pytorch_model.safetensors", 335_000_000),
    HubFile("text_encoder/config.json", 560),
    HubFile("text_encoder/model.safetensors", 492_000_000),
    HubFile("text_encoder/model.fp16.safetensors", 246_000_000),
    HubFile("text_encoder/pytorch_model.bin", 492_000_000),
    HubFile("tokenizer/merges.txt", 525_000),
    HubFile("tokenizer/special_tokens_map.json", 460),
    HubFile("tokenizer/tokenizer_config.json", 740),
    HubFile("tokenizer/vocab.json", 1_060_000),
    HubFile("scheduler/scheduler_config.json", 480),
]
CONFIGS = {
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "scheduler/scheduler_config.json",
}


def _paths(files: list[HubFile]) -> set[str]:
    return {f.path for f in files}


def test_a_pipeline_is_its_index_its_components_configs_and_one_precision_of_weights() -> None:
    plain = select_hub_files(SDXL_LISTING, model_index=MODEL_INDEX)
    assert _paths(plain) == {"model_index.json"} | CONFIGS | {
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    }
    fp16 = select_hub_files(SDXL_LISTING, model_index=MODEL_INDEX, variant="fp16")
    assert _paths(fp16) == {"model_index.json"} | CONFIGS | {
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors",
    }
    assert sum(f.size for f in fp16) < 6 * GB < sum(f.size for f in SDXL_LISTING)


def test_variants_fall_back_per_folder_and_shards_and_dotted_names_are_read_right() -> None:
    listing = [
        HubFile("unet/diffusion_pytorch_model-00001-of-00002.safetensors", 1),
        HubFile("unet/diffusion_pytorch_model-00002-of-00002.safetensors", 1),
        HubFile("unet/diffusion_pytorch_model.safetensors.index.json", 1),
        HubFile("unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors", 1),
        HubFile("unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors", 1),
        HubFile("vae/diffusion_pytorch_model.safetensors", 1),
        HubFile("lora/pixel-art-xl.v1.1.safetensors", 1),
    ]
    plain = _paths(select_hub_files(listing))
    assert plain == {
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "vae/diffusion_pytorch_model.safetensors",
        "lora/pixel-art-xl.v1.1.safetensors",  # a dot in a name is no variant without its plain twin
    }
    fp16 = _paths(select_hub_files(listing, variant="fp16"))
    assert "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors" in fp16
    assert "unet/diffusion_pytorch_model-00001-of-00002.safetensors" not in fp16
    assert "vae/diffusion_pytorch_model.safetensors" in fp16  # no fp16 there: diffusers loads the plain one
    assert _paths(select_hub_files(listing, subfolder="vae")) == {"vae/diffusion_pytorch_model.safetensors"}
    assert _paths(select_hub_files(listing, subfolder="lora", file_name="pixel-art-xl.v1.1.safetensors")) == {
        "lora/pixel-art-xl.v1.1.safetensors"
    }


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test environment sets HF_HUB_OFFLINE; these tests are about what happens online."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def sdxl_mirror(file_server: FileServer) -> HubMirror:
    """SDXL's listing with its real sizes; the bytes behind it are tiny (real safetensors for the weights)."""
    # Distinct bytes per file: huggingface_hub stores equal content once.
    files = {
        f.path: safetensors_bytes(seed=i) if f.path.endswith(".safetensors") else json.dumps({"file": f.path}).encode()
        for i, f in enumerate(SDXL_LISTING)
    }
    files["model_index.json"] = json.dumps(MODEL_INDEX).encode()
    return HubMirror(file_server, "stabilityai/sdxl", files, {f.path: f.size for f in SDXL_LISTING})


@pytest.mark.usefixtures("online")
def test_a_repo_past_the_cap_is_refused_before_any_weights_are_downloaded(
    tmp_path: Path, sdxl_mirror: HubMirror
) -> None:
    cache = WeightsCache(tmp_path / "weights", FetchPolicy(max_bytes=5 * GB), hub_endpoint=sdxl_mirror.endpoint)
    with pytest.raises(InputFetchError, match=r"more than the limit of 5368709120") as info:
        cache.resolve("stabilityai/sdxl", "input.model_name")
    assert info.value.field == "input.model_name"
    assert sdxl_mirror.downloads == ["model_index.json"]  # the index says which folders count; no weights came
    with pytest.raises(InputFetchError, match="more than the limit"):
        cache.resolve("stabilityai/sdxl", "input.loras[0].path", weight_name="sd_xl_base_1.0.safetensors")
    assert sdxl_mirror.downloads == ["model_index.json"]


@pytest.mark.usefixtures("online")
def test_only_the_files_the_pipeline_loads_are_downloaded(tmp_path: Path, sdxl_mirror: HubMirror) -> None:
    cache = WeightsCache(tmp_path / "weights", FetchPolicy(max_bytes=6 * GB), hub_endpoint=sdxl_mirror.endpoint)
    folder = cache.resolve("stabilityai/sdxl", "input.model_name", variant="fp16")
    fp16_weights = {
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors",
    }
    assert set(sdxl_mirror.downloads) == {"model_index.json"} | CONFIGS | fp16_weights
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == sorted(
        {"model_index.json"} | CONFIGS | fp16_weights
    )


@pytest.mark.usefixtures("online")
def test_a_pickle_only_repo_is_refused_from_its_listing(tmp_path: Path, file_server: FileServer) -> None:
    mirror = HubMirror(file_server, "org/old-style", {"config.json": b"{}", "pytorch_model.bin": b"PK"}, {})
    cache = WeightsCache(tmp_path / "weights", FetchPolicy(), hub_endpoint=mirror.endpoint)
    with pytest.raises(InputFetchError, match="no .safetensors weights"):
        cache.resolve("org/old-style", "input.controlnets[0].path")
    assert mirror.downloads == []


@pytest.mark.usefixtures("online")
def test_an_unreachable_hub_means_reading_only_the_local_cache(tmp_path: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{unused.getsockname()[1]}"  # nothing listens there
    lora = safetensors_bytes(seed=5)
    _seed_hub_cache(tmp_path / "weights" / "hf", "org/cached", {"unet/diffusion_pytorch_model.safetensors": lora})
    cache = WeightsCache(tmp_path / "weights", FetchPolicy(), hub_endpoint=endpoint)
    folder = cache.resolve("org/cached", "input.unet_name", subfolder="unet")
    assert (folder / "diffusion_pytorch_model.safetensors").read_bytes() == lora
    with pytest.raises(InputFetchError, match="could not reach Hugging Face and it is not in the local cache"):
        cache.resolve("org/elsewhere", "input.unet_name")


@pytest.mark.usefixtures("online")
def test_the_listing_reads_sizes_from_the_hubs_model_api(file_server: FileServer) -> None:
    data = safetensors_bytes(seed=6)
    mirror = HubMirror(
        file_server,
        "org/sdxl",
        {"model_index.json": b"{}", "unet/diffusion_pytorch_model.safetensors": data},
        {"unet/diffusion_pytorch_model.safetensors": 10_270_077_736},
    )
    assert list_hub_files("org/sdxl", endpoint=mirror.endpoint) == [
        HubFile("model_index.json", 2),
        HubFile("unet/diffusion_pytorch_model.safetensors", 10_270_077_736),
    ]
