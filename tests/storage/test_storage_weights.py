"""The weights cache: content-keyed, downloaded once across threads and processes, safetensors only."""

from __future__ import annotations

import base64
import hashlib
import multiprocessing
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from storage_testkit import FileServer, Route, safetensors_bytes

from storage.fetch import FetchPolicy, InputFetchError
from storage.object_store import LocalObjectStore
from storage.weights import WeightsCache

FAKE_PICKLE = b"PK\x03\x04" + b"\0" * 200


_child_reports: multiprocessing.Queue[str] | None = None


def _start_child(reports: multiprocessing.Queue[str]) -> None:
    global _child_reports
    _child_reports = reports


def _resolve_in_child(root: str, url: str) -> str:
    """Runs in a spawned process: a separate interpreter sharing only the cache folder; its progress goes to the test."""
    assert _child_reports is not None
    policy = FetchPolicy(timeout_seconds=60.0, allowed_hosts=frozenset({"127.0.0.1"}))
    return str(WeightsCache(Path(root), policy).resolve(url, "loras[0].path", on_progress=_child_reports.put))


def test_concurrent_threads_download_an_uncached_url_once(
    tmp_path: Path, file_server: FileServer, loopback_policy: FetchPolicy
) -> None:
    data = safetensors_bytes()
    file_server.routes["/lora.safetensors"] = Route(data, delay_seconds=0.3)
    cache = WeightsCache(tmp_path / "weights", loopback_policy)
    results: list[Path] = []
    logs: list[str] = []
    barrier = threading.Barrier(6)

    def resolve() -> None:
        barrier.wait()
        results.append(cache.resolve(file_server.url("/lora.safetensors"), "loras[0].path", on_progress=logs.append))

    threads = [threading.Thread(target=resolve) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert file_server.hits["/lora.safetensors"] == 1
    assert len(results) == 6 and len(set(results)) == 1
    assert results[0] == tmp_path / "weights" / "blobs" / f"{hashlib.sha256(data).hexdigest()}.safetensors"
    assert results[0].read_bytes() == data
    assert any(line.startswith("waiting for lora.safetensors") for line in logs)
    assert list((tmp_path / "weights" / "tmp").iterdir()) == []


def test_concurrent_processes_download_an_uncached_url_once(tmp_path: Path, file_server: FileServer) -> None:
    """The server holds its answer until the other two processes report waiting for the first one's download."""
    release = threading.Event()
    file_server.routes["/shared.safetensors"] = Route(safetensors_bytes(seed=1), hold=release)
    args = [(str(tmp_path / "weights"), file_server.url("/shared.safetensors"))] * 3
    context = multiprocessing.get_context("spawn")
    reports: multiprocessing.Queue[str] = context.Queue()
    waiting: list[str] = []
    with context.Pool(3, initializer=_start_child, initargs=(reports,)) as pool:
        pending = pool.starmap_async(_resolve_in_child, args)
        deadline = time.monotonic() + 120
        try:
            while len(waiting) < 2:
                assert file_server.hits["/shared.safetensors"] <= 1, "a second process downloaded it too"
                assert time.monotonic() < deadline, f"two processes never waited for the download: {waiting}"
                try:
                    line = reports.get(timeout=0.1)
                except queue.Empty:
                    continue
                if line.startswith("waiting for shared.safetensors"):
                    waiting.append(line)
        finally:
            release.set()
        paths = pending.get(timeout=120)
    assert file_server.hits["/shared.safetensors"] == 1
    assert len(set(paths)) == 1
    assert Path(paths[0]).read_bytes() == safetensors_bytes(seed=1)


def test_progress_lines_come_about_every_tenth(
    tmp_path: Path, file_server: FileServer, loopback_policy: FetchPolicy
) -> None:
    data = safetensors_bytes(values=200_000)
    file_server.routes["/big.safetensors"] = Route(data)
    logs: list[str] = []
    WeightsCache(tmp_path, loopback_policy).resolve(
        file_server.url("/big.safetensors"), "model_name", on_progress=logs.append
    )
    assert 5 <= len(logs) <= 11
    assert all(re.fullmatch(r"downloading big\.safetensors: \d+\.\d/0\.8 MB", line) for line in logs)
    assert logs[-1] == "downloading big.safetensors: 0.8/0.8 MB"


def test_a_cached_url_is_not_downloaded_again(
    tmp_path: Path, file_server: FileServer, loopback_policy: FetchPolicy
) -> None:
    file_server.routes["/a.safetensors"] = Route(safetensors_bytes())
    first = WeightsCache(tmp_path, loopback_policy).resolve(file_server.url("/a.safetensors"), "loras[0].path")
    second = WeightsCache(tmp_path, loopback_policy).resolve(file_server.url("/a.safetensors"), "loras[0].path")
    assert first == second
    assert file_server.hits["/a.safetensors"] == 1


def test_using_a_cached_file_keeps_its_modification_time(
    tmp_path: Path, file_server: FileServer, loopback_policy: FetchPolicy
) -> None:
    """Workers key resident adapters on path + mtime + size: a use must not look like a rewrite."""
    file_server.routes["/a.safetensors"] = Route(safetensors_bytes())
    cache = WeightsCache(tmp_path, loopback_policy)
    blob = cache.resolve(file_server.url("/a.safetensors"), "loras[0].path")
    stamped = blob.stat().st_mtime_ns - 10_000_000_000
    os.utime(blob, ns=(stamped, stamped))
    assert cache.resolve(file_server.url("/a.safetensors"), "loras[0].path") == blob
    assert blob.stat().st_mtime_ns == stamped
    assert blob.stat().st_atime_ns > stamped, "the use is recorded, in the access time"


def test_url_data_uri_and_upload_of_the_same_bytes_share_one_blob(
    tmp_path: Path, file_server: FileServer, loopback_policy: FetchPolicy
) -> None:
    data = safetensors_bytes(seed=2)
    file_server.routes["/api/download/42"] = Route(data)
    store = LocalObjectStore(tmp_path / "files", "http://files.invalid:1")
    uploaded = store.put("uploads/u1/style.safetensors", data, "application/x-safetensors")
    cache = WeightsCache(tmp_path / "weights", loopback_policy, store=store)
    by_url = cache.resolve(file_server.url("/api/download/42"), "loras[0].path")
    by_data_uri = cache.resolve(
        f"data:application/octet-stream;base64,{base64.b64encode(data).decode()}", "loras[1].path"
    )
    by_upload = cache.resolve(uploaded.url, "loras[2].path")
    assert by_url == by_data_uri == by_upload
    assert by_url.suffix == ".safetensors"
    assert len(list((tmp_path / "weights" / "blobs").iterdir())) == 1


def test_pickle_is_refused_before_downloading_unless_allowed(
    tmp_path: Path, file_server: FileServer, loopback_policy: FetchPolicy
) -> None:
    file_server.routes["/model.ckpt"] = Route(FAKE_PICKLE)
    url = file_server.url("/model.ckpt")
    with pytest.raises(InputFetchError, match=r"\.ckpt files are pickle and can run code when loaded; refused"):
        WeightsCache(tmp_path, loopback_policy).resolve(url, "model_name")
    assert file_server.hits["/model.ckpt"] == 0
    allowed = WeightsCache(tmp_path, loopback_policy, allow_pickle=True).resolve(url, "model_name")
    assert allowed.suffix == ".ckpt" and allowed.read_bytes() == FAKE_PICKLE


def test_a_fake_safetensors_file_is_refused_and_not_cached(
    tmp_path: Path, file_server: FileServer, loopback_policy: FetchPolicy
) -> None:
    file_server.routes["/fake.safetensors"] = Route(FAKE_PICKLE)
    cache = WeightsCache(tmp_path, loopback_policy, allow_pickle=True)
    for _attempt in range(2):
        with pytest.raises(InputFetchError, match="named .safetensors but is not a safetensors file"):
            cache.resolve(file_server.url("/fake.safetensors"), "loras[0].path")
    assert file_server.hits["/fake.safetensors"] == 2
    assert [list((tmp_path / folder).iterdir()) for folder in ("blobs", "index", "tmp")] == [[], [], []]
    file_server.routes["/no-suffix"] = Route(FAKE_PICKLE)
    with pytest.raises(InputFetchError, match="not a safetensors file; pickle-based weights"):
        WeightsCache(tmp_path, loopback_policy).resolve(file_server.url("/no-suffix"), "loras[0].path")


def test_local_paths_under_an_allowed_root_are_returned_after_the_same_checks(
    tmp_path: Path, loopback_policy: FetchPolicy
) -> None:
    cache = WeightsCache(tmp_path / "weights", loopback_policy, local_roots=[tmp_path])
    good = tmp_path / "lora.safetensors"
    good.write_bytes(safetensors_bytes())
    assert cache.resolve(str(good), "loras[0].path") == good
    folder = tmp_path / "pipeline"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(safetensors_bytes())
    assert cache.resolve(str(folder), "model_name") == folder
    assert cache.resolve(str(folder), "model_name", subfolder="unet") == folder / "unet"
    (tmp_path / "old.bin").write_bytes(FAKE_PICKLE)
    with pytest.raises(InputFetchError, match=r"\.bin files are pickle"):
        cache.resolve(str(tmp_path / "old.bin"), "loras[0].path")
    (tmp_path / "fake.safetensors").write_bytes(FAKE_PICKLE)
    with pytest.raises(InputFetchError, match="not a safetensors file"):
        cache.resolve(str(tmp_path / "fake.safetensors"), "loras[0].path")
    with pytest.raises(InputFetchError, match="no such local file or folder"):
        cache.resolve(str(tmp_path / "missing.safetensors"), "loras[0].path")
    with pytest.raises(InputFetchError, match="only http and https"):
        cache.resolve("s3://bucket/lora.safetensors", "loras[0].path")


def test_hugging_face_id_in_offline_mode_gives_a_clear_error(
    tmp_path: Path, loopback_policy: FetchPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = WeightsCache(tmp_path, loopback_policy)
    logs: list[str] = []
    with pytest.raises(InputFetchError) as caught:
        cache.resolve("some-org/some-lora", "loras[0].path", on_progress=logs.append)
    assert str(caught.value) == (
        "loras[0].path: cannot use some-org/some-lora: not in the local Hugging Face cache, "
        "and the service is offline (HF_HUB_OFFLINE is set)"
    )
    assert logs == ["fetching some-org/some-lora from Hugging Face"]
    with pytest.raises(InputFetchError, match="fp16.safetensors|HF_HUB_OFFLINE"):
        cache.resolve("some-org/sdxl", "model_name", subfolder="unet", weight_name="model.safetensors", variant="fp16")
    with pytest.raises(InputFetchError, match=r"\.bin files are pickle"):
        cache.resolve("some-org/some-lora", "loras[0].path", weight_name="adapter_model.bin")


def _seed_hub_cache(hf_cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Lays files out the way huggingface_hub's cache does (snapshot links into blobs/), so offline mode finds them."""
    repo = hf_cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(os.path.relpath(blob, path.parent))
    return repo


def test_hugging_face_files_from_the_cache_are_checked_too(
    tmp_path: Path, loopback_policy: FetchPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = WeightsCache(tmp_path, loopback_policy)
    lora = safetensors_bytes(seed=3)
    _seed_hub_cache(tmp_path / "hf", "org/style-lora", {"pytorch_lora_weights.safetensors": lora})
    path = cache.resolve("org/style-lora", "loras[0].path", weight_name="pytorch_lora_weights.safetensors")
    assert path.read_bytes() == lora
    _seed_hub_cache(
        tmp_path / "hf",
        "org/tiny-sdxl",
        {
            "model_index.json": b"{}",
            "unet/config.json": b"{}",
            "unet/diffusion_pytorch_model.fp16.safetensors": lora,
        },
    )
    unet = cache.resolve("org/tiny-sdxl", "model_name", subfolder="unet", variant="fp16")
    assert unet.name == "unet" and (unet / "diffusion_pytorch_model.fp16.safetensors").is_file()
    _seed_hub_cache(tmp_path / "hf", "org/evil", {"model.safetensors": FAKE_PICKLE})
    with pytest.raises(InputFetchError, match="named .safetensors but is not a safetensors file"):
        cache.resolve("org/evil", "model_name")


def test_disk_budget_evicts_the_least_recently_used_blob(
    tmp_path: Path, file_server: FileServer, loopback_policy: FetchPolicy
) -> None:
    files = {f"/w{i}.safetensors": safetensors_bytes(values=1000, seed=i) for i in range(3)}
    for path, data in files.items():
        file_server.routes[path] = Route(data)
    one = len(files["/w0.safetensors"])
    cache = WeightsCache(tmp_path / "weights", loopback_policy, max_blob_bytes=2 * one, min_blob_age_seconds=0)
    url = file_server.url
    first = cache.resolve(url("/w0.safetensors"), "f")
    cache.resolve(url("/w1.safetensors"), "f")
    cache.resolve(url("/w0.safetensors"), "f")  # w0 used again: w1 is now the least recently used
    cache.resolve(url("/w2.safetensors"), "f")
    blobs = sorted((tmp_path / "weights" / "blobs").iterdir())
    assert sum(p.stat().st_size for p in blobs) <= 2 * one
    assert first in blobs and len(blobs) == 2
    assert file_server.hits["/w0.safetensors"] == 1
    cache.resolve(url("/w1.safetensors"), "f")  # evicted: fetched again, and still correct
    assert file_server.hits["/w1.safetensors"] == 2


def test_recently_used_blobs_survive_the_budget(
    tmp_path: Path, file_server: FileServer, loopback_policy: FetchPolicy
) -> None:
    file_server.routes["/a.safetensors"] = Route(safetensors_bytes(seed=1))
    file_server.routes["/b.safetensors"] = Route(safetensors_bytes(seed=2))
    cache = WeightsCache(tmp_path / "weights", loopback_policy, max_blob_bytes=1)
    a = cache.resolve(file_server.url("/a.safetensors"), "f")
    b = cache.resolve(file_server.url("/b.safetensors"), "f")
    # Over budget, but both were used moments ago and may be about to be opened.
    assert a.is_file() and b.is_file()


@dataclass
class RecordingObserver:
    hits: int = 0
    misses: int = 0
    evicted: list[int] = field(default_factory=list)
    total_bytes: int | None = None

    def on_hit(self) -> None:
        self.hits += 1

    def on_miss(self) -> None:
        self.misses += 1

    def on_evict(self, size_bytes: int) -> None:
        self.evicted.append(size_bytes)

    def on_bytes(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes


def _age(folder: Path, seconds: float) -> None:
    then = time.time() - seconds
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (then, then), follow_symlinks=False)


def _data_uri(data: bytes) -> str:
    return f"data:application/octet-stream;base64,{base64.b64encode(data).decode()}"


def test_observer_counts_downloads_as_misses_and_cached_references_as_hits(
    tmp_path: Path, file_server: FileServer, loopback_policy: FetchPolicy
) -> None:
    url_data, uri_data = safetensors_bytes(seed=1), safetensors_bytes(values=500, seed=2)
    file_server.routes["/a.safetensors"] = Route(url_data)
    seen = RecordingObserver()
    cache = WeightsCache(tmp_path / "weights", loopback_policy, observer=seen, local_roots=[tmp_path])
    assert seen.total_bytes == 0
    cache.resolve(file_server.url("/a.safetensors"), "f")
    cache.resolve(file_server.url("/a.safetensors"), "f")
    assert (seen.hits, seen.misses) == (1, 1)
    cache.resolve(_data_uri(uri_data), "f")
    cache.resolve(_data_uri(uri_data), "f")
    assert (seen.hits, seen.misses) == (2, 2)
    local = tmp_path / "local.safetensors"
    local.write_bytes(url_data)
    cache.resolve(str(local), "f")
    assert (seen.hits, seen.misses, seen.evicted) == (2, 2, [])
    assert seen.total_bytes == len(url_data) + len(uri_data)
    file_server.routes["/broken.safetensors"] = Route(b"gone", status=404)
    with pytest.raises(InputFetchError):
        cache.resolve(file_server.url("/broken.safetensors"), "f")
    assert seen.misses == 3
    # Another replica starting on the node reports what is already there.
    again = RecordingObserver()
    WeightsCache(tmp_path / "weights", loopback_policy, observer=again)
    assert again.total_bytes == len(url_data) + len(uri_data)


def test_observer_sees_each_eviction_with_the_bytes_it_freed(
    tmp_path: Path, file_server: FileServer, loopback_policy: FetchPolicy
) -> None:
    files = {f"/w{i}.safetensors": safetensors_bytes(values=1000 + 100 * i, seed=i) for i in range(3)}
    for path, data in files.items():
        file_server.routes[path] = Route(data)
    s0, s1, s2 = (len(data) for data in files.values())
    seen = RecordingObserver()
    cache = WeightsCache(
        tmp_path / "weights", loopback_policy, max_blob_bytes=s1 + s2, min_blob_age_seconds=0, observer=seen
    )
    for path in files:
        cache.resolve(file_server.url(path), "f")
    assert seen.evicted == [s0]
    assert seen.total_bytes == s1 + s2
    cache.resolve(file_server.url("/w0.safetensors"), "f")  # w1 is now the least recently used
    assert seen.evicted == [s0, s1]
    assert seen.total_bytes == s0 + s2
    assert (seen.hits, seen.misses) == (0, 4)


def test_hugging_face_repos_count_toward_the_budget_and_go_whole_when_old(
    tmp_path: Path, file_server: FileServer, loopback_policy: FetchPolicy
) -> None:
    root = tmp_path / "weights"
    old_files = {"model_index.json": b"{}", "unet/diffusion_pytorch_model.safetensors": safetensors_bytes(2000, 1)}
    old = _seed_hub_cache(root / "hf", "org/old", old_files)
    recent = _seed_hub_cache(root / "hf", "org/recent", {"lora.safetensors": safetensors_bytes(700, 2)})
    (root / "hf" / ".locks" / old.name).mkdir(parents=True)
    (root / "hf" / ".locks" / old.name / "x.lock").write_bytes(b"held by a download")
    _age(old, 3600)
    old_bytes = sum(len(data) for data in old_files.values()) + len("0" * 40)
    recent_bytes = len(safetensors_bytes(700, 2)) + len("0" * 40)
    url_data = safetensors_bytes(seed=3)
    file_server.routes["/new.safetensors"] = Route(url_data)
    seen = RecordingObserver()
    # The budget is below what the recent repo and the new blob need: only the old repo may go.
    cache = WeightsCache(root, loopback_policy, max_blob_bytes=len(url_data), min_blob_age_seconds=60, observer=seen)
    assert seen.total_bytes == old_bytes + recent_bytes  # the snapshots' links are not counted twice
    blob = cache.resolve(file_server.url("/new.safetensors"), "f")
    assert seen.evicted == [old_bytes]
    assert seen.total_bytes == recent_bytes + len(url_data)
    assert not old.exists() and recent.is_dir() and blob.is_file()
    assert (root / "hf" / ".locks" / old.name / "x.lock").is_file()
    assert list((root / "tmp").iterdir()) == []


def test_hugging_face_repos_read_from_disk_are_hits_and_kept_while_in_use(
    tmp_path: Path, loopback_policy: FetchPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path / "weights"
    lora = safetensors_bytes(seed=4)
    repo = _seed_hub_cache(root / "hf", "org/style-lora", {"lora.safetensors": lora})
    _age(repo, 3600)
    seen = RecordingObserver()
    cache = WeightsCache(root, loopback_policy, max_blob_bytes=1, min_blob_age_seconds=60, observer=seen)
    cache.resolve("org/style-lora", "f", weight_name="lora.safetensors")
    assert (seen.hits, seen.misses) == (1, 0)
    with pytest.raises(InputFetchError, match="HF_HUB_OFFLINE"):
        cache.resolve("org/absent", "f")
    assert (seen.hits, seen.misses) == (1, 1)
    cache.resolve(_data_uri(safetensors_bytes(values=10, seed=5)), "f")  # over budget: evicts what it can
    assert seen.evicted == [] and repo.is_dir()  # used a moment ago
    _age(repo, 3600)
    cache.resolve(_data_uri(safetensors_bytes(values=10, seed=6)), "f")
    assert seen.evicted == [len(lora) + len("0" * 40)] and not repo.exists()
    with pytest.raises(InputFetchError, match="HF_HUB_OFFLINE"):
        cache.resolve("org/style-lora", "f", weight_name="lora.safetensors")


def test_a_hugging_face_download_is_a_miss_and_enforces_the_budget(
    tmp_path: Path, loopback_policy: FetchPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "weights"
    lora = safetensors_bytes(seed=7)
    old_blob = WeightsCache(root, loopback_policy).resolve(_data_uri(safetensors_bytes(values=50, seed=8)), "f")
    os.utime(old_blob, (time.time() - 3600,) * 2)
    old_blob_bytes = old_blob.stat().st_size

    def download(repo_id: str, filename: str, **_kwargs: object) -> str:
        """Stands in for the network: writes what huggingface_hub would, where it would."""
        repo = root / "hf" / f"models--{repo_id.replace('/', '--')}"
        if not repo.exists():
            _seed_hub_cache(root / "hf", repo_id, {filename: lora})
        return str(repo / "snapshots" / ("0" * 40) / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    seen = RecordingObserver()
    cache = WeightsCache(root, loopback_policy, max_blob_bytes=1, min_blob_age_seconds=60, observer=seen)
    path = cache.resolve("org/new-lora", "f", weight_name="lora.safetensors")
    assert (seen.hits, seen.misses) == (0, 1)
    assert seen.evicted == [old_blob_bytes]
    assert not old_blob.exists() and path.read_bytes() == lora
    assert seen.total_bytes == len(lora) + len("0" * 40)
    cache.resolve("org/new-lora", "f", weight_name="lora.safetensors")
    assert (seen.hits, seen.misses) == (1, 1)
