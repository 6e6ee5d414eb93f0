"""Real diffusers runs on tiny random-weight models, loaded by path like user models are."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import safetensors.torch
import torch
from prometheus_client import generate_latest

from serving.pipelines import (
    AdapterLoadError,
    GenerationCancelled,
    GenerationParams,
    LoadedPipeline,
    ModelLoadError,
    generate,
    load_pipeline,
)
from serving_testkit import params, pixels
from serving.tiny import TinyModel, make_tiny_model

FAMILIES = ["sd15", "sdxl"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: make_tiny_model(root / family, family=family) for family in FAMILIES}


@pytest.fixture(scope="module")
def pipelines(tiny_models: dict[str, TinyModel]) -> dict[str, LoadedPipeline]:
    return {family: load_pipeline(str(model.pipeline_dir)) for family, model in tiny_models.items()}




@pytest.fixture
def loras(tiny_models: dict[str, TinyModel], family: str) -> list[str]:
    return [str(path) for path in tiny_models[family].lora_paths]


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def file_digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_tiny_model_is_deterministic(tmp_path: Path) -> None:
    first = make_tiny_model(tmp_path / "a", family="sd15", num_loras=2, seed=7)
    make_tiny_model(tmp_path / "b", family="sd15", num_loras=2, seed=7)
    assert [path.name for path in first.lora_paths] == ["lora_0.safetensors", "lora_1.safetensors"]
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "b")


def test_family_detected_from_pipeline(loaded: LoadedPipeline, family: str) -> None:
    assert loaded.family == family


def test_same_seed_same_png_different_seed_differs(loaded: LoadedPipeline) -> None:
    first = generate(loaded, params(seed=3, num_images=2))
    again = generate(loaded, params(seed=3, num_images=2))
    other = generate(loaded, params(seed=4, num_images=2))
    assert len(first) == 2 and first[0].size == (64, 64)
    assert [png_bytes(image) for image in first] == [png_bytes(image) for image in again]
    assert png_bytes(first[0]) != png_bytes(other[0])


def test_prompt_changes_image(loaded: LoadedPipeline) -> None:
    assert not np.array_equal(pixels(loaded), pixels(loaded, prompt="a red house"))


def test_lora_scales_combinations_and_no_leakage(loaded: LoadedPipeline, loras: list[str]) -> None:
    plain_before = pixels(loaded)
    first = pixels(loaded, loras=[(loras[0], 1.0)])
    second = pixels(loaded, loras=[(loras[1], 1.0)])
    both = pixels(loaded, loras=[(loras[0], 1.0), (loras[1], 1.0)])
    at_zero = pixels(loaded, loras=[(loras[0], 0.0)])
    plain_after = pixels(loaded)

    assert np.abs(first.astype(int) - plain_before).mean() > 1.0
    assert not np.array_equal(first, second)
    assert not np.array_equal(both, first) and not np.array_equal(both, second)
    assert np.array_equal(at_zero, plain_before)
    assert np.array_equal(plain_after, plain_before)
    assert np.array_equal(pixels(loaded, loras=[(loras[0], 1.0)]), first)


def test_a_repeated_lora_set_is_not_merged_again(loaded: LoadedPipeline, loras: list[str]) -> None:
    """The merged copies of the last set stay (uninstalled) through a request without LoRAs."""
    wanted = [(loras[0], 0.7), (loras[1], 0.4)]
    first = pixels(loaded, loras=wanted)
    merges = loaded.lora_merges
    plain = pixels(loaded)
    again = pixels(loaded, loras=wanted)
    assert loaded.lora_merges == merges
    assert np.array_equal(again, first) and not np.array_equal(again, plain)
    pixels(loaded, loras=[(loras[0], 0.7)])
    assert loaded.lora_merges == merges + 1


def test_lora_folder_with_standard_weight_name(loaded: LoadedPipeline, loras: list[str], tmp_path: Path) -> None:
    folder = tmp_path / "my-lora"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(Path(loras[0]).read_bytes())
    assert np.array_equal(pixels(loaded, loras=[(str(folder), 1.0)]), pixels(loaded, loras=[(loras[0], 1.0)]))


def test_on_step_reports_every_step(loaded: LoadedPipeline) -> None:
    steps: list[tuple[int, int]] = []
    generate(loaded, params(num_inference_steps=3), on_step=lambda step, total: steps.append((step, total)))
    assert steps == [(1, 3), (2, 3), (3, 3)]


def test_should_stop_cancels_and_pipeline_still_works(loaded: LoadedPipeline, loras: list[str]) -> None:
    plain = pixels(loaded)
    steps: list[int] = []
    with pytest.raises(GenerationCancelled):
        generate(
            loaded,
            params(num_inference_steps=4, loras=[(loras[0], 1.0)]),
            on_step=lambda step, _total: steps.append(step),
            should_stop=lambda: len(steps) >= 1,
        )
    assert steps == [1]
    assert np.array_equal(pixels(loaded), plain)


def test_missing_model_path() -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline("/nonexistent/models/sdxl")


def test_folder_that_is_not_a_pipeline(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_pipeline(str(tmp_path))


def test_pickle_file_refused(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"pickle would run code here")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_pipeline(str(checkpoint))


def test_urls_are_left_to_the_weights_cache() -> None:
    with pytest.raises(ModelLoadError, match="weights cache"):
        load_pipeline("https://example.invalid/models/model.safetensors")


def test_missing_lora_file(loaded: LoadedPipeline, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(AdapterLoadError, match="does not exist"):
        generate(loaded, params(loras=[(missing, 1.0)]))


def test_file_that_is_not_a_lora(loaded: LoadedPipeline, tmp_path: Path) -> None:
    not_lora = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"some.weight": torch.zeros(2, 2)}, str(not_lora))
    with pytest.raises(AdapterLoadError, match="weights.safetensors"):
        generate(loaded, params(loras=[(str(not_lora), 1.0)]))


def test_lora_for_other_family_fails_cleanly(
    pipelines: dict[str, LoadedPipeline], tiny_models: dict[str, TinyModel]
) -> None:
    sdxl = pipelines["sdxl"]
    plain = pixels(sdxl)
    sd15_lora = str(tiny_models["sd15"].lora_paths[0])
    with pytest.raises(AdapterLoadError, match="lora_0.safetensors"):
        generate(sdxl, params(loras=[(sd15_lora, 1.0)]))
    assert Path(sd15_lora).resolve() not in sdxl.resident_loras
    assert np.array_equal(pixels(sdxl), plain)
    sdxl_lora = str(tiny_models["sdxl"].lora_paths[0])
    assert not np.array_equal(pixels(sdxl, loras=[(sdxl_lora, 1.0)]), plain)


@pytest.fixture
def small_cache(tiny_models: dict[str, TinyModel]) -> LoadedPipeline:
    return load_pipeline(str(tiny_models["sd15"].pipeline_dir), max_loras=2)


def test_eviction_keeps_results_identical(small_cache: LoadedPipeline, tiny_models: dict[str, TinyModel]) -> None:
    loras = [str(path) for path in tiny_models["sd15"].lora_paths]
    first_round = [pixels(small_cache, loras=[(lora, 1.0)]) for lora in loras]
    assert len(small_cache.resident_loras) == 2
    second_round = [pixels(small_cache, loras=[(lora, 1.0)]) for lora in loras]
    for first, second in zip(first_round, second_round):
        assert np.array_equal(first, second)
    assert small_cache.resident_loras == [Path(lora).resolve() for lora in loras[1:]]


def test_request_needing_more_loras_than_cache_holds(
    small_cache: LoadedPipeline, tiny_models: dict[str, TinyModel]
) -> None:
    loras = [(str(path), 0.5) for path in tiny_models["sd15"].lora_paths]
    all_three = pixels(small_cache, loras=loras)
    assert np.array_equal(pixels(small_cache, loras=loras), all_three)
    assert not np.array_equal(all_three, pixels(small_cache, loras=loras[:2]))


def test_loading_one_lora_never_evicts_another_the_request_needs(
    small_cache: LoadedPipeline, tiny_models: dict[str, TinyModel]
) -> None:
    lora_0, lora_1, lora_2 = (str(path) for path in tiny_models["sd15"].lora_paths)
    pixels(small_cache, loras=[(lora_0, 1.0)])
    pixels(small_cache, loras=[(lora_1, 1.0)])
    pixels(small_cache, loras=[(lora_2, 1.0), (lora_0, 1.0)])
    assert set(small_cache.resident_loras) == {Path(lora_0).resolve(), Path(lora_2).resolve()}


def test_same_lora_twice_adds_scales(small_cache: LoadedPipeline, tiny_models: dict[str, TinyModel]) -> None:
    lora = str(tiny_models["sd15"].lora_paths[0])
    twice_half = pixels(small_cache, loras=[(lora, 0.5), (lora, 0.5)])
    assert np.array_equal(twice_half, pixels(small_cache, loras=[(lora, 1.0)]))


def test_byte_budget_evicts_least_recently_used_and_counts(tiny_models: dict[str, TinyModel]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from serving.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    probe = load_pipeline(str(tiny_models["sd15"].pipeline_dir))
    lora_0, lora_1, lora_2 = (str(path) for path in tiny_models["sd15"].lora_paths[:3])
    probe.activate_loras([(lora_0, 1.0)])
    one = probe.resident_lora_bytes
    assert one > 0
    # Room for two adapters beside the merged copies kept for a repeat, which the budget counts too.
    budget = 2 * one + probe.lora_tier.merged_bytes
    cache = load_pipeline(str(tiny_models["sd15"].pipeline_dir), max_loras=10, max_lora_bytes=budget, metrics=metrics)
    for lora in (lora_0, lora_1, lora_0, lora_2):  # lora_1 is the least recently used when lora_2 arrives
        cache.activate_loras([(lora, 1.0)])
        assert cache.resident_lora_bytes <= budget
    assert [p.name for p in cache.resident_loras] == [Path(lora_0).name, Path(lora_2).name]
    # One request needing more than the budget still gets all of its LoRAs; its merged copies,
    # which do not fit beside them, are not kept after it (the second eviction).
    cache.activate_loras([(lora_0, 1.0), (lora_1, 1.0), (lora_2, 1.0)])
    assert len(cache.resident_loras) == 3
    cache.deactivate_loras()
    assert cache.lora_tier.merged_bytes == 0
    values = {
        (s.name, s.labels.get("tier")): s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
    }
    assert values[("loraserve_cache_hits_total", "gpu")] == 3
    assert values[("loraserve_cache_misses_total", "gpu")] == 4
    assert values[("loraserve_cache_evictions_total", "gpu")] == 2
    assert values[("loraserve_cache_bytes", "gpu")] == cache.resident_lora_bytes
    assert values[("loraserve_adapter_load_seconds_count", None)] == 4


def test_interleaved_loras_give_the_bytes_of_each_alone(
    tiny_models: dict[str, TinyModel], pipelines: dict[str, LoadedPipeline]
) -> None:
    lora_a, lora_b = (str(path) for path in tiny_models["sdxl"].lora_paths[:2])
    fresh = str(tiny_models["sdxl"].pipeline_dir)
    alone_a = png_bytes(generate(load_pipeline(fresh), params(loras=[(lora_a, 1.0)]))[0])
    alone_b = png_bytes(generate(load_pipeline(fresh), params(loras=[(lora_b, 0.6)]))[0])
    shared = pipelines["sdxl"]
    for _ in range(2):
        assert png_bytes(generate(shared, params(loras=[(lora_a, 1.0)]))[0]) == alone_a
        assert png_bytes(generate(shared, params(loras=[(lora_b, 0.6)]))[0]) == alone_b
