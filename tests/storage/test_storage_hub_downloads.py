"""Hugging Face downloads (issue 12, item 8): list first, fetch only what the pipeline loads, cap before downloading.

There is no network here. The repo listing comes from a stand-in for the Hub's model API (the
`hub_listing` hook takes what `HfApi.model_info(files_metadata=True)` would give), and
huggingface_hub's two download calls are replaced by stand-ins that lay files out the way its
cache does and record what they were asked for. Everything between them is the real code.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import constants as hf_constants
from storage_testkit import FileServer, Route, safetensors_bytes

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


class FakeHub:
    """Stands in for the network only: the Hub's listing, and huggingface_hub's downloads into its cache layout."""

    def __init__(self, cache: Path, listing: list[HubFile], files: dict[str, bytes]) -> None:
        self.cache, self.listing, self.files = cache, listing, files
        self.listed: list[str] = []
        self.downloaded: list[str] = []

    def list_files(self, repo_id: str) -> list[HubFile]:
        self.listed.append(repo_id)
        return self.listing

    def hf_hub_download(self, repo_id: str, filename: str, *, subfolder: str | None = None, **_: Any) -> str:
        path = f"{subfolder}/{filename}" if subfolder else filename
        return str(self._fetch(repo_id, [path]) / path)

    def snapshot_download(self, repo_id: str, *, allow_patterns: list[str], **_: Any) -> str:
        wanted = [p for p in self.files if any(fnmatch.fnmatch(p, pattern) for pattern in allow_patterns)]
        return str(self._fetch(repo_id, wanted))

    def _fetch(self, repo_id: str, paths: list[str]) -> Path:
        self.downloaded.extend(paths)
        repo = self.cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / ("0" * 40)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text("0" * 40)
        for path in paths:
            (snapshot / path).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / path).write_bytes(self.files[path])
        return snapshot


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test environment sets HF_HUB_OFFLINE; these tests are about what happens online."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)


def _hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    weights = safetensors_bytes(seed=4)
    files = {f.path: weights for f in SDXL_LISTING if f.path.endswith(".safetensors")}
    files.update({f.path: b"{}" for f in SDXL_LISTING if not f.path.endswith(".safetensors")})
    files["model_index.json"] = json.dumps(MODEL_INDEX).encode()
    hub = FakeHub(tmp_path / "weights" / "hf", SDXL_LISTING, files)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", hub.hf_hub_download)
    monkeypatch.setattr("huggingface_hub.snapshot_download", hub.snapshot_download)
    return hub


@pytest.mark.usefixtures("online")
def test_a_repo_past_the_cap_is_refused_before_any_weights_are_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = _hub(tmp_path, monkeypatch)
    cache = WeightsCache(tmp_path / "weights", FetchPolicy(max_bytes=5 * GB), hub_listing=hub.list_files)
    with pytest.raises(InputFetchError, match=r"more than the limit of 5368709120") as info:
        cache.resolve("stabilityai/sdxl", "input.model_name")
    assert info.value.field == "input.model_name"
    assert hub.listed == ["stabilityai/sdxl"]
    assert hub.downloaded == ["model_index.json"]  # the index says which folders count; no weights came
    with pytest.raises(InputFetchError, match="more than the limit"):
        cache.resolve("stabilityai/sdxl", "input.loras[0].path", weight_name="sd_xl_base_1.0.safetensors")
    assert hub.downloaded == ["model_index.json"]


@pytest.mark.usefixtures("online")
def test_only_the_files_the_pipeline_loads_are_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = _hub(tmp_path, monkeypatch)
    cache = WeightsCache(tmp_path / "weights", FetchPolicy(max_bytes=6 * GB), hub_listing=hub.list_files)
    folder = cache.resolve("stabilityai/sdxl", "input.model_name", variant="fp16")
    assert set(hub.downloaded) == {"model_index.json"} | CONFIGS | {
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors",
    }
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()


@pytest.mark.usefixtures("online")
def test_a_pickle_only_repo_is_refused_from_its_listing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = _hub(tmp_path, monkeypatch)
    hub.listing = [HubFile("config.json", 10), HubFile("pytorch_model.bin", 1000)]
    cache = WeightsCache(tmp_path / "weights", FetchPolicy(), hub_listing=hub.list_files)
    with pytest.raises(InputFetchError, match="no .safetensors weights"):
        cache.resolve("org/old-style", "input.controlnets[0].path")
    assert hub.downloaded == []


@pytest.mark.usefixtures("online")
def test_an_unreachable_hub_means_reading_only_the_local_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = _hub(tmp_path, monkeypatch)
    asked: list[bool] = []

    def unreachable(repo_id: str) -> list[HubFile]:
        raise ConnectionError("no route to huggingface.co")

    def cache_only(repo_id: str, *, local_files_only: bool, **kwargs: Any) -> str:
        asked.append(local_files_only)
        return hub.snapshot_download(repo_id, **kwargs)

    monkeypatch.setattr("huggingface_hub.snapshot_download", cache_only)
    cache = WeightsCache(tmp_path / "weights", FetchPolicy(), hub_listing=unreachable)
    folder = cache.resolve("org/lora", "input.loras[0].path", subfolder="unet")
    assert asked == [True]
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.usefixtures("online")
def test_the_listing_reads_sizes_from_the_hubs_model_api(file_server: FileServer) -> None:
    """huggingface_hub's real HfApi against a local server answering as the Hub's model API does."""
    listing = {
        "id": "org/sdxl",
        "sha": "a" * 40,
        "siblings": [
            {"rfilename": "model_index.json", "size": 609, "blobId": "b" * 40},
            {
                "rfilename": "unet/diffusion_pytorch_model.safetensors",
                "size": 10_270_077_736,
                "blobId": "c" * 40,
                "lfs": {"sha256": "d" * 64, "size": 10_270_077_736, "pointerSize": 135},
            },
        ],
    }
    file_server.routes["/api/models/org/sdxl"] = Route(
        json.dumps(listing).encode(), headers={"Content-Type": "application/json"}
    )
    files = list_hub_files("org/sdxl", endpoint=file_server.url("").rstrip("/"))
    assert files == [HubFile("model_index.json", 609), HubFile("unet/diffusion_pytorch_model.safetensors", 10_270_077_736)]
    assert file_server.hits["/api/models/org/sdxl"] == 1
