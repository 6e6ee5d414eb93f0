"""The host-RAM tier of parsed LoRAs and embeddings, loading from it, and giving an evicted pipeline's memory back."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from serving import lora_merge, lora_tier
from serving.errors import AdapterLoadError
from serving.lora_cache import HostLoraCache, parse_embedding_file, parse_lora_file, pinned_reservation
from serving.memory import memory_figures
from serving.metrics import WorkerMetrics
from serving.pipelines import (
    GenerationParams,
    LoadedPipeline,
    PipelineReleased,
    generate,
    load_pipeline,
)
from serving_testkit import params, pixels
from serving.tiny import TinyModel, make_tiny_embedding, make_tiny_lora, make_tiny_model

FAMILIES = ["sd15", "sdxl"]
# The tests that are not about a device run on the GPU where there is one (the device check runs them there).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: make_tiny_model(root / family, family=family, num_loras=3) for family in FAMILIES}


@pytest.fixture(scope="module")
def pipelines(tiny_models: dict[str, TinyModel]) -> dict[str, LoadedPipeline]:
    return {family: load_pipeline(str(model.pipeline_dir)) for family, model in tiny_models.items()}


def samples(metrics: WorkerMetrics, tier: str) -> dict[str, float]:
    return {
        name: metrics.registry.get_sample_value(f"loraserve_cache_{name}", {"tier": tier}) or 0.0
        for name in ("hits_total", "misses_total", "evictions_total", "bytes")
    }


# --- the host-RAM tier ----------------------------------------------------------------------


def test_host_tier_parses_once_and_counts(tiny_models: dict[str, TinyModel]) -> None:
    metrics = WorkerMetrics()
    cache = HostLoraCache(0, observer=metrics.tier_observer("host"))
    path = tiny_models["sd15"].lora_paths[0].resolve()
    first = cache.get(path)
    assert cache.get(path) is first
    assert samples(metrics, "host") == {
        "hits_total": 1,
        "misses_total": 1,
        "evictions_total": 0,
        "bytes": first.nbytes,
    }


def test_a_pinned_reservation_is_the_power_of_two_the_host_allocator_rounds_to() -> None:
    # PyTorch's caching host allocator rounds pinned allocations up to a power of two.
    assert [pinned_reservation(n) for n in (0, 1, 4096, 4097, 93_061_120)] == [0, 1, 4096, 8192, 134_217_728]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the tensors are pinned (the cuda test below)")
def test_without_cuda_the_host_tier_counts_the_tensors_bytes(tiny_models: dict[str, TinyModel]) -> None:
    parsed = parse_lora_file(tiny_models["sd15"].lora_paths[0])
    assert parsed.flat is None
    assert parsed.nbytes == sum(t.numel() * t.element_size() for t in parsed.state_dict.values())


@pytest.mark.cuda
def test_on_cuda_the_host_tier_counts_what_a_pinned_buffer_really_holds(tiny_models: dict[str, TinyModel]) -> None:
    parsed = parse_lora_file(tiny_models["sd15"].lora_paths[0])
    tensor_bytes = sum(t.numel() * t.element_size() for t in parsed.state_dict.values())
    assert parsed.flat is not None and parsed.flat.is_pinned()
    assert all(t.is_pinned() for t in parsed.state_dict.values())
    assert parsed.nbytes == pinned_reservation(parsed.flat.numel()) >= tensor_bytes


def test_host_tier_evicts_least_recently_used_within_its_budget(tiny_models: dict[str, TinyModel]) -> None:
    paths = [p.resolve() for p in tiny_models["sd15"].lora_paths]
    one = parse_lora_file(paths[0]).nbytes
    metrics = WorkerMetrics()
    cache = HostLoraCache(2 * one, observer=metrics.tier_observer("host"))
    a, b, c = (parse_lora_file(p).name for p in paths)
    for path in (paths[0], paths[1], paths[0], paths[2]):  # b is the least recently used when c arrives
        cache.get(path)
        assert cache.nbytes <= 2 * one
    assert cache.names() == [a, c]
    assert samples(metrics, "host") == {"hits_total": 1, "misses_total": 3, "evictions_total": 1, "bytes": 2 * one}


def test_an_entry_bigger_than_the_budget_is_returned_but_not_kept(tiny_models: dict[str, TinyModel]) -> None:
    path = tiny_models["sd15"].lora_paths[0].resolve()
    cache = HostLoraCache(1)
    assert cache.get(path).nbytes > 1
    assert cache.names() == []


def test_a_rewritten_file_is_parsed_afresh(tiny_models: dict[str, TinyModel], tmp_path: Path) -> None:
    path = make_tiny_lora(tmp_path / "lora.safetensors", "sd15", seed=1)
    cache = HostLoraCache(0)
    before = cache.get(path)
    make_tiny_lora(path, "sd15", seed=2)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    after = cache.get(path)
    assert after.name != before.name
    key = next(iter(before.state_dict))
    assert not torch.equal(after.state_dict[key], before.state_dict[key])


def test_threads_asking_for_the_same_file_at_once_parse_it_once(tiny_models: dict[str, TinyModel]) -> None:
    metrics = WorkerMetrics()
    cache = HostLoraCache(0, observer=metrics.tier_observer("host"))
    path = tiny_models["sd15"].lora_paths[0].resolve()
    start = threading.Barrier(4)
    got: list[object] = []

    def ask() -> None:
        start.wait()
        got.append(cache.get(path))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 4 and all(entry is got[0] for entry in got)
    assert samples(metrics, "host")["misses_total"] == 1
    assert samples(metrics, "host")["hits_total"] == 3


def test_adapter_evicted_from_the_pipeline_comes_back_from_host_ram_with_the_same_bytes(
    tiny_models: dict[str, TinyModel], pipelines: dict[str, LoadedPipeline]
) -> None:
    metrics = WorkerMetrics()
    host = HostLoraCache(0, observer=metrics.tier_observer("host"))
    model = tiny_models["sdxl"]
    small = load_pipeline(str(model.pipeline_dir), max_loras=1, host_loras=host, metrics=metrics)
    lora_a, lora_b = (str(p) for p in model.lora_paths[:2])
    first = pixels(small, loras=[(lora_a, 1.0)])
    pixels(small, loras=[(lora_b, 1.0)])  # evicts lora_a from the pipeline, not from host RAM
    again = pixels(small, loras=[(lora_a, 1.0)])
    assert np.array_equal(first, again)
    assert np.array_equal(first, pixels(pipelines["sdxl"], loras=[(lora_a, 1.0)]))
    assert samples(metrics, "gpu")["evictions_total"] == 2
    assert samples(metrics, "host") == {
        "hits_total": 1,
        "misses_total": 2,
        "evictions_total": 0,
        "bytes": host.nbytes,
    }


def test_the_device_budget_counts_the_merged_copies_kept_for_a_repeat(tiny_models: dict[str, TinyModel]) -> None:
    model = tiny_models["sd15"]
    lora_0, lora_1, lora_2 = (str(path) for path in model.lora_paths[:3])
    probe = load_pipeline(str(model.pipeline_dir))
    probe.activate_loras([(lora_0, 1.0)])
    probe.deactivate_loras()
    adapter, merged = probe.resident_lora_bytes, probe.lora_tier.merged_bytes
    # Copies bigger than an adapter: three adapters fit the budget below only if the copies are left out.
    assert merged > adapter > 0
    budget = merged + 2 * adapter
    metrics = WorkerMetrics()
    loaded = load_pipeline(str(model.pipeline_dir), max_lora_bytes=budget, metrics=metrics)
    for lora in (lora_0, lora_1, lora_2):
        pixels(loaded, loras=[(lora, 1.0)])
        assert loaded.resident_lora_bytes + loaded.lora_tier.merged_bytes <= budget
    assert loaded.resident_loras == [Path(lora_1).resolve(), Path(lora_2).resolve()]
    assert loaded.lora_tier.merged_bytes == merged
    assert samples(metrics, "gpu")["bytes"] == 2 * adapter + merged
    assert samples(metrics, "gpu")["evictions_total"] == 1

    # Copies that do not fit beside the request's own adapters are not kept: a repeat merges again.
    tight = load_pipeline(str(model.pipeline_dir), max_lora_bytes=adapter + merged - 1, metrics=WorkerMetrics())
    first = pixels(tight, loras=[(lora_0, 1.0)])
    assert tight.lora_tier.merged_bytes == 0 and tight.resident_loras == [Path(lora_0).resolve()]
    merges = tight.lora_merges
    assert np.array_equal(pixels(tight, loras=[(lora_0, 1.0)]), first)
    assert tight.lora_merges == merges + 1
    assert np.array_equal(first, pixels(probe, loras=[(lora_0, 1.0)]))


def test_the_default_device_budget_on_a_cpu_is_a_share_of_the_available_ram(
    tiny_models: dict[str, TinyModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fixed size starved a large machine (SDXL fp32 copies alone are 3.6 GB) and overcommitted a small one.
    available = 64 * 1024**3
    monkeypatch.setattr(lora_tier.psutil, "virtual_memory", lambda: SimpleNamespace(available=available))
    assert lora_tier.default_budget(torch.device("cpu"), pipelines=2) == available // 8
    loaded = load_pipeline(str(tiny_models["sd15"].pipeline_dir), pipelines_per_replica=4)
    assert loaded.lora_tier.max_bytes == available // 16


def test_pipelines_of_one_replica_share_the_host_tier(tiny_models: dict[str, TinyModel]) -> None:
    metrics = WorkerMetrics()
    host = HostLoraCache(0, observer=metrics.tier_observer("host"))
    model = tiny_models["sd15"]
    lora = str(model.lora_paths[0])
    for _ in range(2):
        pipeline = load_pipeline(str(model.pipeline_dir), host_loras=host)
        pipeline.activate_loras([(lora, 1.0)])
        pipeline.release()
    assert samples(metrics, "host")["misses_total"] == 1
    assert samples(metrics, "host")["hits_total"] == 1


def test_prefetch_makes_a_waiting_requests_lora_resident_so_the_request_hits(
    tiny_models: dict[str, TinyModel], pipelines: dict[str, LoadedPipeline]
) -> None:
    metrics = WorkerMetrics()
    model = tiny_models["sd15"]
    loaded = load_pipeline(str(model.pipeline_dir), metrics=metrics)
    lora = str(model.lora_paths[0])
    loaded.prefetch_loras([lora])
    assert loaded.resident_loras == [Path(lora).resolve()]
    assert samples(metrics, "gpu")["misses_total"] == 1
    image = pixels(loaded, loras=[(lora, 1.0)])
    assert samples(metrics, "gpu")["hits_total"] == 1 and samples(metrics, "gpu")["misses_total"] == 1
    assert np.array_equal(image, pixels(pipelines["sd15"], loras=[(lora, 1.0)]))


def test_prefetch_during_a_request_never_evicts_its_loras(
    tiny_models: dict[str, TinyModel], pipelines: dict[str, LoadedPipeline]
) -> None:
    model = tiny_models["sd15"]
    running, waiting = (str(path) for path in model.lora_paths[:2])
    one = pipelines["sd15"].lora_tier.ensure_resident(Path(running).resolve(), parse_lora_file(Path(running)).name).nbytes
    loaded = load_pipeline(str(model.pipeline_dir), max_lora_bytes=one)
    seen: list[list[Path]] = []

    def prefetch_mid_request(_step: int, _total: int) -> None:
        if not seen:
            loaded.prefetch_loras([waiting])
            seen.append(loaded.resident_loras)

    image = generate(loaded, params(loras=[(running, 1.0)]), on_step=prefetch_mid_request)[0]
    assert seen == [[Path(running).resolve()]], "the waiting LoRA did not fit beside the running one"
    assert np.array_equal(np.asarray(image)[None], pixels(pipelines["sd15"], loras=[(running, 1.0)]))
    loaded.prefetch_loras([waiting])  # between requests the budget goes to the waiting one
    assert loaded.resident_loras == [Path(waiting).resolve()]


@pytest.mark.cuda
def test_on_cuda_a_lora_prefetched_from_another_thread_mid_request_gives_the_image_of_one_loaded_in_line(
    tiny_models: dict[str, TinyModel],
) -> None:
    """The worker's Prefetch runs in another thread while a request denoises: there the transfer runs on the
    tier's copy stream, beside the request's kernels, and the request that then uses the LoRA must see it whole."""
    model = tiny_models["sd15"]
    running, waiting = (str(path) for path in model.lora_paths[:2])
    expected = pixels(load_pipeline(str(model.pipeline_dir), device="cuda"), loras=[(waiting, 1.0)])
    metrics = WorkerMetrics()
    loaded = load_pipeline(str(model.pipeline_dir), device="cuda", metrics=metrics)
    prefetches: list[threading.Thread] = []

    def prefetch_mid_request(_step: int, _total: int) -> None:
        if not prefetches:
            prefetches.append(threading.Thread(target=loaded.prefetch_loras, args=([waiting],)))
            prefetches[0].start()
            prefetches[0].join()

    generate(loaded, params(loras=[(running, 1.0)]), on_step=prefetch_mid_request)
    assert loaded.lora_tier._copy_stream is not None, "the prefetch did not run on the copy stream"
    hits = samples(metrics, "gpu")["hits_total"]
    assert np.array_equal(pixels(loaded, loras=[(waiting, 1.0)]), expected)
    assert samples(metrics, "gpu")["hits_total"] == hits + 1, "the request did not use the prefetched tensors"


def test_prefetch_on_a_released_pipeline_does_nothing(tiny_models: dict[str, TinyModel]) -> None:
    model = tiny_models["sd15"]
    loaded = load_pipeline(str(model.pipeline_dir))
    loaded.release()
    loaded.prefetch_loras([str(model.lora_paths[0])])
    assert loaded.resident_loras == []


# --- the last set kept installed between requests --------------------------------------------


class WeightWrites(TorchDispatchMode):
    """Counts tensors written in place that share storage with the pipeline's weights: what installing
    or restoring a LoRA set writes (three copies per weight), and nothing else a request does."""

    def __init__(self, loaded: LoadedPipeline) -> None:
        super().__init__()
        self._storages = {
            parameter.untyped_storage().data_ptr()
            for component in loaded.pipe.components.values()
            if isinstance(component, torch.nn.Module)
            for parameter in component.parameters()
        }
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        values = [*zip(func._schema.arguments, args)]
        # Keyword arguments too: `out=` of addmm is how a merge writes a weight.
        values += [(argument, (kwargs or {})[argument.name]) for argument in func._schema.arguments
                   if argument.name in (kwargs or {})]
        for argument, value in values:
            if argument.alias_info is not None and argument.alias_info.is_write:
                written = value if isinstance(value, (list, tuple)) else [value]
                self.count += sum(
                    isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self._storages for t in written
                )
        return func(*args, **(kwargs or {}))


def live_weights(loaded: LoadedPipeline) -> dict[str, torch.Tensor]:
    """A copy of what every module runs with now."""
    return {
        f"{name}.{key}": tensor.detach().clone()
        for name, component in loaded.pipe.components.items()
        if isinstance(component, torch.nn.Module)
        for key, tensor in component.state_dict().items()
    }


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_a_repeat_of_the_installed_set_writes_no_weight_and_gives_a_fresh_installs_bytes(
    tiny_models: dict[str, TinyModel],
) -> None:
    model = tiny_models["sdxl"]
    lora = [(str(model.lora_paths[0]), 1.0)]
    loaded = load_pipeline(str(model.pipeline_dir))
    tier = loaded.lora_tier
    first = pixels(loaded, loras=lora)
    merges = tier.merges
    with WeightWrites(loaded) as writes:
        again = pixels(loaded, loras=lora)
    assert writes.count == 0, f"the repeat wrote {writes.count} weight tensors"
    assert tier.merges == merges
    fresh = pixels(load_pipeline(str(model.pipeline_dir)), loras=lora)
    assert np.array_equal(again, first) and np.array_equal(again, fresh)
    # After a request without LoRAs the copies are installed again (copies, no merge), to the same bytes;
    # the tier's counter counts what was written.
    pixels(loaded)
    swapped = tier.weight_writes
    with WeightWrites(loaded) as writes:
        reinstalled = pixels(loaded, loras=lora)
    assert writes.count == tier.weight_writes - swapped > 0 and tier.merges == merges
    assert np.array_equal(reinstalled, fresh)
    swapped = tier.weight_writes
    with WeightWrites(loaded) as writes:
        pixels(loaded, loras=lora)
    assert writes.count == 0 and tier.weight_writes == swapped


def test_switching_sets_puts_the_base_weights_back_before_anything_else_runs_or_merges(
    tiny_models: dict[str, TinyModel], pipelines: dict[str, LoadedPipeline]
) -> None:
    model, reference = tiny_models["sd15"], pipelines["sd15"]
    lora_a, lora_b = ([(str(path), 1.0)] for path in model.lora_paths[:2])
    expected_plain = pixels(reference)
    base = live_weights(reference)
    expected_b = pixels(reference, loras=lora_b)
    expected_a = pixels(load_pipeline(str(model.pipeline_dir)), loras=lora_a)

    loaded = load_pipeline(str(model.pipeline_dir))
    assert np.array_equal(pixels(loaded, loras=lora_a), expected_a)
    assert not same_weights(live_weights(loaded), base), "the set was not kept installed after its request"
    assert np.array_equal(pixels(loaded), expected_plain)
    assert same_weights(live_weights(loaded), base)
    assert np.array_equal(pixels(loaded, loras=lora_b), expected_b)
    # Straight from B to A: A's merge reads the base weights, not B's merged ones. The two adapt the same
    # layers, so each is written once, from its base copy, rather than put back first and merged after.
    tier = loaded.lora_tier
    written = tier.weight_writes
    with WeightWrites(loaded) as writes:
        assert np.array_equal(pixels(loaded, loras=lora_a), expected_a)
    assert writes.count == tier.weight_writes - written == len(tier._installed) > 0
    assert np.array_equal(pixels(loaded), expected_plain)
    assert same_weights(live_weights(loaded), base)


def test_copies_evicted_while_installed_give_the_base_weights_back(
    tiny_models: dict[str, TinyModel], pipelines: dict[str, LoadedPipeline]
) -> None:
    evict_installed_copies(tiny_models["sd15"], pipelines["sd15"], "cpu")


@pytest.mark.cuda
def test_on_cuda_copies_evicted_while_installed_give_the_base_weights_back(tiny_models: dict[str, TinyModel]) -> None:
    """The same switches on a GPU: copies merged on the side stream, put back by copy and freed from the main
    stream, a set merged again into memory they held, and a waiting LoRA made resident on the copy stream."""
    model = tiny_models["sd15"]
    loaded = evict_installed_copies(model, load_pipeline(str(model.pipeline_dir), device="cuda"), "cuda")
    assert loaded.lora_tier._stream is not None and loaded.lora_tier._copy_stream is not None


def evict_installed_copies(model: TinyModel, reference: LoadedPipeline, device: str) -> LoadedPipeline:
    """A set kept, a waiting LoRA prefetched beside it, then two sets that do not fit: images and weights as
    `reference` (on `device`) gives them."""
    lora_a, lora_b = (str(path) for path in model.lora_paths[:2])
    expected = {"plain": pixels(reference)}
    base = live_weights(reference)
    expected["a"] = pixels(reference, loras=[(lora_a, 1.0)])
    expected["ab"] = pixels(reference, loras=[(lora_a, 1.0), (lora_b, 1.0)])
    adapter = reference.lora_tier.ensure_resident(Path(lora_a).resolve(), parse_lora_file(Path(lora_a)).name).nbytes
    merged = reference.lora_tier.merged_bytes
    metrics = WorkerMetrics()
    # Room for one adapter and one set's copies.
    loaded = load_pipeline(str(model.pipeline_dir), device=device, max_lora_bytes=adapter + merged, metrics=metrics)
    assert np.array_equal(pixels(loaded, loras=[(lora_a, 1.0)]), expected["a"])
    # A waiting request's LoRA takes the installed set's adapter out, never its copies.
    loaded.prefetch_loras([lora_b])
    assert loaded.resident_loras == [Path(lora_b).resolve()] and loaded.lora_tier.merged_bytes == merged
    merges = loaded.lora_merges
    assert np.array_equal(pixels(loaded, loras=[(lora_a, 1.0)]), expected["a"])
    assert loaded.lora_merges == merges
    # Two adapters and their copies do not fit: the copies are swapped out and dropped when the request ends.
    evictions = samples(metrics, "gpu")["evictions_total"]
    assert np.array_equal(pixels(loaded, loras=[(lora_a, 1.0), (lora_b, 1.0)]), expected["ab"])
    assert loaded.lora_tier.merged_bytes == 0
    assert samples(metrics, "gpu")["evictions_total"] == evictions + 1
    assert same_weights(live_weights(loaded), base)
    assert np.array_equal(pixels(loaded), expected["plain"])
    assert np.array_equal(pixels(loaded, loras=[(lora_a, 1.0)]), expected["a"])
    return loaded


def test_a_merge_or_an_install_failing_half_way_leaves_the_base_weights(
    tiny_models: dict[str, TinyModel], pipelines: dict[str, LoadedPipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A merge into the weights or a swap of kept copies that fails part-way (memory for a base copy or a
    scratch buffer not allocated) puts back what it wrote: no module runs half-merged."""
    model, reference = tiny_models["sd15"], pipelines["sd15"]
    lora = [(str(model.lora_paths[0]), 1.0)]
    expected_plain = pixels(reference)
    base, expected = live_weights(reference), pixels(reference, loras=lora)
    loaded = load_pipeline(str(model.pipeline_dir))
    fast_cpu_matmul, swap_chunk = lora_merge._fast_cpu_matmul, lora_merge._swap_chunk
    groups: list[torch.dtype] = []
    chunks: list[int] = []

    def out_of_memory_on_the_second_group(dtype: torch.dtype) -> bool:
        groups.append(dtype)
        if len(groups) == 2:
            raise torch.OutOfMemoryError("no memory for a base copy")
        return fast_cpu_matmul(dtype)

    def out_of_memory_on_the_third_chunk(chunk: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        chunks.append(len(chunk))
        if len(chunks) == 3:
            raise torch.OutOfMemoryError("no scratch buffer")
        swap_chunk(chunk)

    with monkeypatch.context() as patched:
        patched.setattr(lora_merge, "_fast_cpu_matmul", out_of_memory_on_the_second_group)
        with pytest.raises(torch.OutOfMemoryError):
            pixels(loaded, loras=lora)
    assert len(groups) == 2 and same_weights(live_weights(loaded), base)
    assert np.array_equal(pixels(loaded, loras=lora), expected)
    assert np.array_equal(pixels(loaded), expected_plain)  # the copies are kept, swapped out
    with monkeypatch.context() as patched:
        patched.setattr(lora_merge, "SWAP_CHUNK_BYTES", 1)
        patched.setattr(lora_merge, "_swap_chunk", out_of_memory_on_the_third_chunk)
        with pytest.raises(torch.OutOfMemoryError):
            pixels(loaded, loras=lora)
    assert same_weights(live_weights(loaded), base)
    assert len(chunks) > 3, "the failed swap did not undo its first chunks"
    assert np.array_equal(pixels(loaded, loras=lora), expected)


def test_a_switch_failing_half_way_leaves_the_base_weights(
    tiny_models: dict[str, TinyModel], pipelines: dict[str, LoadedPipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A switch writes the layers both sets adapt from their base copies without putting them back first: one
    that fails half-way (no memory for the merge) puts back the layers it had not reached as well."""
    model, reference = tiny_models["sd15"], pipelines["sd15"]
    lora_a, lora_b = ([(str(path), 1.0)] for path in model.lora_paths[:2])
    expected_plain = pixels(reference)  # the shared reference may still hold another test's set until now
    base, expected_b = live_weights(reference), pixels(reference, loras=lora_b)
    loaded = load_pipeline(str(model.pipeline_dir))
    pixels(loaded, loras=lora_a)
    fast_cpu_matmul = lora_merge._fast_cpu_matmul
    groups: list[torch.dtype] = []

    def out_of_memory_on_the_second_group(dtype: torch.dtype) -> bool:
        groups.append(dtype)
        if len(groups) == 2:
            raise torch.OutOfMemoryError("no memory for the merge")
        return fast_cpu_matmul(dtype)

    with monkeypatch.context() as patched:
        patched.setattr(lora_merge, "_fast_cpu_matmul", out_of_memory_on_the_second_group)
        with pytest.raises(torch.OutOfMemoryError):
            pixels(loaded, loras=lora_b)
    assert len(groups) == 2 and same_weights(live_weights(loaded), base)
    assert np.array_equal(pixels(loaded), expected_plain)
    assert np.array_equal(pixels(loaded, loras=lora_b), expected_b)
    # A switch to a LoRA that does not load (an SDXL LoRA on SD 1.5) leaves the base weights too.
    with pytest.raises(AdapterLoadError):
        pixels(loaded, loras=[(str(tiny_models["sdxl"].lora_paths[0]), 1.0)])
    assert same_weights(live_weights(loaded), base)


# --- embeddings in the same tier -------------------------------------------------------------

EMBEDDING_TOKENS = ["<s0>", "<s1>"]
EMBEDDING_PROMPT = "a photo of <s0> <s1> cat"


def rewrite_in_place(path: Path, source: Path) -> None:
    """New content, same size: only the bumped mtime tells the two files apart."""
    stat = path.stat()
    path.write_bytes(source.read_bytes())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_second_request_with_the_same_embedding_takes_it_from_host_ram(
    tiny_models: dict[str, TinyModel], pipelines: dict[str, LoadedPipeline], tmp_path: Path, family: str
) -> None:
    metrics = WorkerMetrics()
    host = HostLoraCache(0, observer=metrics.tier_observer("host"))
    loaded = load_pipeline(str(tiny_models[family].pipeline_dir), host_loras=host)
    embedding = [(str(make_tiny_embedding(tmp_path, family)), EMBEDDING_TOKENS)]
    first = pixels(loaded, prompt=EMBEDDING_PROMPT, embeddings=embedding)
    assert samples(metrics, "host")["misses_total"] == 1
    second = pixels(loaded, prompt=EMBEDDING_PROMPT, embeddings=embedding)
    assert np.array_equal(first, second)
    # The tier's tensors give what a pipeline reading the file itself gives.
    assert np.array_equal(first, pixels(pipelines[family], prompt=EMBEDDING_PROMPT, embeddings=embedding))
    assert samples(metrics, "host") == {
        "hits_total": 1,
        "misses_total": 1,
        "evictions_total": 0,
        "bytes": parse_embedding_file(Path(embedding[0][0])).nbytes,
    }


def test_embeddings_share_the_budget_and_the_lru_order_with_loras(
    tiny_models: dict[str, TinyModel], tmp_path: Path
) -> None:
    lora, lora_2 = (p.resolve() for p in tiny_models["sd15"].lora_paths[:2])
    emb, emb_2 = (make_tiny_embedding(tmp_path, "sd15", seed=seed) for seed in (1, 2))
    budget = parse_lora_file(lora).nbytes + parse_embedding_file(emb).nbytes
    metrics = WorkerMetrics()
    cache = HostLoraCache(budget, observer=metrics.tier_observer("host"))
    cache.get(lora)
    first = cache.get_embedding(emb)
    cache.get(lora)  # now the embedding is the least recently used
    cache.get_embedding(emb_2)  # a LoRA and an embedding fit, not a third entry
    assert cache.names() == [parse_lora_file(lora).name, parse_embedding_file(emb_2).name]
    cache.get(lora_2)
    assert cache.names() == [parse_embedding_file(emb_2).name, parse_lora_file(lora_2).name]
    again = cache.get_embedding(emb)
    assert again is not first and again.tensors.keys() == first.tensors.keys()
    assert all(torch.equal(again.tensors[key], tensor) for key, tensor in first.tensors.items())
    assert cache.names() == [parse_lora_file(lora_2).name, first.name]
    assert samples(metrics, "host") == {"hits_total": 1, "misses_total": 5, "evictions_total": 3, "bytes": budget}


def test_one_file_as_a_lora_and_as_an_embedding_is_two_entries(tiny_models: dict[str, TinyModel]) -> None:
    path = tiny_models["sd15"].lora_paths[0].resolve()
    metrics = WorkerMetrics()
    cache = HostLoraCache(0, observer=metrics.tier_observer("host"))
    lora, embedding = cache.get(path), cache.get_embedding(path)
    assert cache.get(path) is lora and cache.get_embedding(path) is embedding
    assert len(cache.names()) == 2
    assert samples(metrics, "host")["hits_total"] == 2


def test_an_embedding_rewritten_in_place_is_read_afresh(
    tiny_models: dict[str, TinyModel], pipelines: dict[str, LoadedPipeline], tmp_path: Path
) -> None:
    metrics = WorkerMetrics()
    host = HostLoraCache(0, observer=metrics.tier_observer("host"))
    loaded = load_pipeline(str(tiny_models["sdxl"].pipeline_dir), host_loras=host)
    path = make_tiny_embedding(tmp_path / "a", "sdxl", seed=1)
    embedding = [(str(path), EMBEDDING_TOKENS)]
    before = pixels(loaded, prompt=EMBEDDING_PROMPT, embeddings=embedding)
    rewrite_in_place(path, make_tiny_embedding(tmp_path / "b", "sdxl", seed=2))
    after = pixels(loaded, prompt=EMBEDDING_PROMPT, embeddings=embedding)
    assert np.abs(after - before).mean() > 1.0
    assert np.array_equal(after, pixels(pipelines["sdxl"], prompt=EMBEDDING_PROMPT, embeddings=embedding))
    assert samples(metrics, "host")["misses_total"] == 2


# --- an evicted pipeline's memory goes back ------------------------------------------------


def weight_bytes(loaded: LoadedPipeline) -> int:
    return sum(
        t.numel() * t.element_size()
        for component in loaded.pipe.components.values()
        if isinstance(component, torch.nn.Module)
        for t in component.state_dict().values()
    )


def released_bytes(model: TinyModel, device: str, figure: str) -> tuple[int, int, int]:
    """(weight bytes, growth while loaded, bytes given back on release) of one pipeline, as `figure` reads them."""
    path = str(model.pipeline_dir)
    warm = load_pipeline(path, device=device)  # imports, kernels and allocator arenas reach their steady state first
    pixels(warm)
    warm.release()
    del warm
    before = memory_figures()
    loaded = load_pipeline(path, device=device)
    pixels(loaded)
    weights = weight_bytes(loaded)
    held = memory_figures()
    loaded.release()
    after = memory_figures()
    return weights, getattr(held, figure) - getattr(before, figure), getattr(held, figure) - getattr(after, figure)


def test_released_pipeline_gives_its_memory_back_to_the_process(tiny_models: dict[str, TinyModel]) -> None:
    """Read from the process's resident set."""
    weights, grown, freed = released_bytes(tiny_models["sdxl"], "cpu", "rss_bytes")
    assert grown >= weights
    assert freed >= 0.9 * weights, f"{freed} of {weights} weight bytes came back (grew by {grown})"


@pytest.mark.cuda
def test_released_pipeline_gives_its_memory_back_to_cuda(tiny_models: dict[str, TinyModel]) -> None:
    """Read from torch.cuda.memory_allocated."""
    weights, grown, freed = released_bytes(tiny_models["sdxl"], "cuda", "cuda_allocated_bytes")
    assert grown >= weights
    assert freed >= 0.9 * weights, f"{freed} of {weights} weight bytes came back (grew by {grown})"


def test_release_while_a_request_runs_frees_after_it_ends(tiny_models: dict[str, TinyModel]) -> None:
    model = tiny_models["sd15"]
    loaded = load_pipeline(str(model.pipeline_dir), device=DEVICE)
    lora = str(model.lora_paths[0])
    expected = pixels(load_pipeline(str(model.pipeline_dir), device=DEVICE), loras=[(lora, 1.0)])
    released_at: list[int] = []

    def evict_mid_request(step: int, _total: int) -> None:
        if not released_at:
            loaded.release()
            released_at.append(step)

    image = generate(loaded, params(loras=[(lora, 1.0)]), on_step=evict_mid_request)[0]
    assert released_at == [1]
    assert np.array_equal(np.asarray(image)[None], expected)
    assert loaded.pipe.unet.device.type == "meta"
    with pytest.raises(PipelineReleased):
        generate(loaded, params())


def fail_before_the_unet_runs(model: TinyModel, device: str, tmp_path: Path) -> LoadedPipeline:
    """A request that fails after its LoRAs were merged, before its U-Net ran, then a repeat and a plain request."""
    loaded = load_pipeline(str(model.pipeline_dir), device=device)
    lora = [(str(model.lora_paths[0]), 1.0)]
    expected = pixels(load_pipeline(str(model.pipeline_dir), device=device), loras=lora)
    plain = pixels(loaded)
    unreadable = [(str(tmp_path / "missing.safetensors"), EMBEDDING_TOKENS)]
    with pytest.raises(AdapterLoadError, match="embedding 'missing.safetensors'"):
        pixels(loaded, prompt=EMBEDDING_PROMPT, loras=lora, embeddings=unreadable)
    assert not loaded.pipe.unet._forward_pre_hooks
    merges = loaded.lora_merges
    assert np.array_equal(pixels(loaded, loras=lora), expected)
    assert loaded.lora_merges == merges, "the repeat merged again instead of installing the failed request's copies"
    assert np.array_equal(pixels(loaded), plain)
    return loaded


def test_a_request_failing_before_its_unet_runs_leaves_the_plain_model_and_its_copies_for_a_repeat(
    tiny_models: dict[str, TinyModel], tmp_path: Path
) -> None:
    loaded = fail_before_the_unet_runs(tiny_models["sd15"], "cpu", tmp_path)
    assert loaded.lora_tier._stream is None, "a CPU merge runs in line"


@pytest.mark.cuda
def test_on_cuda_a_request_failing_before_its_unet_runs_waits_for_the_side_stream_merge(
    tiny_models: dict[str, TinyModel], tmp_path: Path
) -> None:
    """The U-Net's share of the merge runs on a side stream that the U-Net's first call waits for; a request
    that fails before that call must still leave no hook, and the copies it merged, installed by a repeat,
    must be the finished ones."""
    loaded = fail_before_the_unet_runs(tiny_models["sd15"], "cuda", tmp_path)
    assert loaded.lora_tier._stream is not None, "the U-Net's merge did not run on the side stream"
    assert loaded.lora_tier._merging is None and loaded.lora_tier._wait_hook is None
