"""Local paths as inputs: only under the operator's roots, one answer for every refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
from storage_testkit import safetensors_bytes

from storage.fetch import FetchPolicy, InputFetchError
from storage.weights import LOCAL_PATH_REFUSED, WeightsCache


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "pipeline" / "unet").mkdir(parents=True)
    (allowed / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(safetensors_bytes())
    (allowed / "lora.safetensors").write_bytes(safetensors_bytes(seed=1))
    (outside / "empty-folder").mkdir(parents=True)
    (outside / "secret.safetensors").write_bytes(safetensors_bytes(seed=2))
    (outside / "notes.safetensors").write_bytes(b"not safetensors at all")
    (allowed / "escape.safetensors").symlink_to(outside / "secret.safetensors")
    (allowed / "inside-link.safetensors").symlink_to(allowed / "lora.safetensors")
    return {"allowed": allowed, "outside": outside}


def _reason(cache: WeightsCache, ref: str, **kwargs: str) -> str:
    with pytest.raises(InputFetchError) as info:
        cache.resolve(ref, "input.loras[0].path", **kwargs)
    return info.value.reason


def test_paths_outside_the_roots_get_one_answer_whatever_exists(tmp_path: Path, layout: dict[str, Path]) -> None:
    cache = WeightsCache(tmp_path / "weights", FetchPolicy(), local_roots=[layout["allowed"]])
    allowed, outside = layout["allowed"], layout["outside"]
    refused = [
        str(outside / "secret.safetensors"),  # a real safetensors file
        str(outside / "missing.safetensors"),  # nothing there
        str(outside / "notes.safetensors"),  # a file that is not safetensors
        str(outside / "empty-folder"),  # a folder without weights
        str(outside / "no-such-folder/x"),
        str(allowed / "escape.safetensors"),  # a symlink inside the root pointing out of it
        f"{allowed}/../outside/secret.safetensors",  # `..` out of the root
        "/etc/passwd",
        "~/.ssh/id_rsa",
        "./relative/to/the/worker.safetensors",
    ]
    assert {_reason(cache, ref) for ref in refused} == {LOCAL_PATH_REFUSED}
    # subfolder and weight_name come from callers as well.
    assert _reason(cache, str(allowed / "pipeline"), subfolder="../../outside") == LOCAL_PATH_REFUSED
    assert _reason(cache, str(allowed / "pipeline"), weight_name="/etc/hostname") == LOCAL_PATH_REFUSED


def test_no_roots_means_no_local_paths_at_all(tmp_path: Path, layout: dict[str, Path]) -> None:
    cache = WeightsCache(tmp_path / "weights", FetchPolicy())
    assert _reason(cache, str(layout["allowed"] / "lora.safetensors")) == LOCAL_PATH_REFUSED
    assert _reason(cache, str(layout["allowed"] / "missing.safetensors")) == LOCAL_PATH_REFUSED


def test_paths_under_a_root_load_after_resolving_links(tmp_path: Path, layout: dict[str, Path]) -> None:
    allowed = layout["allowed"]
    cache = WeightsCache(tmp_path / "weights", FetchPolicy(), local_roots=[allowed])
    assert cache.resolve(str(allowed / "lora.safetensors"), "f") == allowed / "lora.safetensors"
    assert cache.resolve(str(allowed / "inside-link.safetensors"), "f") == allowed / "lora.safetensors"
    assert cache.resolve(str(allowed / "pipeline"), "f", subfolder="unet") == allowed / "pipeline" / "unet"
    # Inside a root, the caller may learn what is missing: the operator chose to expose that folder.
    assert "no such local file" in _reason(cache, str(allowed / "missing.safetensors"))


def test_repo_ids_are_never_read_as_local_paths(
    tmp_path: Path, layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`org/name` is a Hugging Face id even when such a folder exists here: spelling decides, not the disk."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(layout["allowed"])
    cache = WeightsCache(tmp_path / "weights", FetchPolicy(), local_roots=[layout["allowed"]])
    existing, missing = _reason(cache, "pipeline/unet"), _reason(cache, "pipeline/absent")
    assert "Hugging Face" in existing and existing == missing


def test_check_local_path_refuses_before_anything_looks_at_the_disk(tmp_path: Path, layout: dict[str, Path]) -> None:
    cache = WeightsCache(tmp_path / "weights", FetchPolicy(), local_roots=[layout["allowed"]])
    for ref in (str(layout["outside"] / "secret.safetensors"), str(layout["outside"] / "missing")):
        with pytest.raises(InputFetchError) as info:
            cache.check_local_path(ref, "input.ip_adapter[0].path")
        assert info.value.reason == LOCAL_PATH_REFUSED
    cache.check_local_path(str(layout["allowed"] / "lora.safetensors"), "f")
    cache.check_local_path("https://example.com/x.safetensors", "f")
    cache.check_local_path("org/repo", "f")


def test_an_ip_adapter_path_outside_the_roots_is_refused_before_its_kind_is_looked_at(
    tmp_path: Path, layout: dict[str, Path]
) -> None:
    """Without weight_name, a folder and a file used to get different errors: the existence oracle again."""
    from serving.conditioning import Conditioning, IPAdapterSpec, resolve_conditioning

    cache = WeightsCache(tmp_path / "weights", FetchPolicy(), local_roots=[layout["allowed"]])
    outside = layout["outside"]
    reasons = set()
    for path in (outside / "secret.safetensors", outside / "empty-folder", outside / "missing"):
        spec = Conditioning(ip_adapters=[IPAdapterSpec(path=str(path), image_urls=["data:,x"])])
        with pytest.raises(InputFetchError) as info:
            resolve_conditioning(spec, weights=cache, image_policy=FetchPolicy())
        assert info.value.field == "input.ip_adapter[0].path"
        reasons.add(info.value.reason)
    assert reasons == {LOCAL_PATH_REFUSED}
