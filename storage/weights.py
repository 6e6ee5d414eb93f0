"""One local weights cache per node, keyed by content, for every way a request can name weights.

Replicas on a node share the folder. Downloads land in `tmp/`, are hashed while they
stream, checked, and renamed to `blobs/<sha256><suffix>`; an index file maps each URL to
its blob. A per-URL `flock` makes concurrent requests (threads or processes) for the same
uncached URL wait for one download instead of starting their own. Hugging Face repos go
through `huggingface_hub` (its own cache under `hf/`, its offline mode): the repo is listed
first and only the files the pipeline loads are fetched, once their total fits the size cap.
Pickle files can run code when loaded, so they are refused unless the operator opts in, and
a file that claims to be safetensors must be one.

Local paths name files on the worker's node, so they are refused unless they lie under a
folder the operator allows; the refusal is the same whatever exists there, and whether a
reference is a path or a repo id is decided by its spelling, never by the disk.

Blobs and Hugging Face repo folders share one disk budget, least recently used first. The
cache reports hits, misses, evictions and its size to an optional `CacheObserver`, so the
serving side can export them without storage knowing about metrics.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import unquote, urlsplit

import huggingface_hub
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name

from core.redaction import redact_url
from storage.fetch import FetchPolicy, InputFetchError, StoredFiles, decode_data_uri, fetch_to
from storage.sniff import looks_like_safetensors

ProgressLines = Callable[[str], None]

LOCAL_PATH_REFUSED = (
    "local paths are refused: only files under the folders the operator lists in allowed_local_roots may be named"
)
PICKLE_SUFFIXES = frozenset({".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle"})
SAFETENSORS_SUFFIX = ".safetensors"
HUB_CONFIG_PATTERNS = ("*.json", "*.txt")
HUB_CONFIG_SUFFIXES = (".json", ".txt")
MODEL_INDEX = "model_index.json"
PROGRESS_STEP_FRACTION = 0.1
PROGRESS_STEP_BYTES_UNKNOWN_TOTAL = 10_000_000
_TRUE = {"1", "on", "yes", "true"}


class CacheObserver(Protocol):
    """Whoever wants the disk tier's numbers (the worker's metrics) implements this; storage stays unaware of them.

    A hit is a URL, data URI or repo already on disk; a miss is one that had to be fetched or
    written (counted even when the fetch then fails). Local paths are neither.
    """

    def on_hit(self) -> None: ...

    def on_miss(self) -> None: ...

    def on_evict(self, size_bytes: int) -> None: ...

    def on_bytes(self, total_bytes: int) -> None:
        """The whole node's count, read from the disk: the replicas of a node share the folder."""


class _Unobserved:
    def on_hit(self) -> None:
        pass

    def on_miss(self) -> None:
        pass

    def on_evict(self, size_bytes: int) -> None:
        pass

    def on_bytes(self, total_bytes: int) -> None:
        pass


class WeightsCache:
    """Turns a weights reference (path, URL, data URI, Hugging Face id) into a checked local path."""

    def __init__(
        self,
        root: Path,
        policy: FetchPolicy,
        *,
        allow_pickle: bool = False,
        store: StoredFiles | None = None,
        max_blob_bytes: int = 0,
        min_blob_age_seconds: float = 300.0,
        observer: CacheObserver | None = None,
        local_roots: Sequence[Path] = (),
        hub_endpoint: str | None = None,
    ) -> None:
        self.root = root.resolve()
        # Folders whose files callers may name by path; none: local paths are refused.
        self.local_roots = tuple(Path(folder).expanduser().resolve() for folder in local_roots)
        # A Hub mirror; None: huggingface_hub's own endpoint (which HF_ENDPOINT sets).
        self.hub_endpoint = hub_endpoint
        self.policy = policy
        self.allow_pickle = allow_pickle
        self.store = store
        # The disk tier's budget (0: unbounded), blobs and Hugging Face repos together. Entries
        # used within `min_blob_age_seconds` are never evicted: a request on this node may have
        # the path in hand and not opened it yet.
        self.max_blob_bytes = max_blob_bytes
        self.min_blob_age_seconds = min_blob_age_seconds
        self._observer: CacheObserver = observer or _Unobserved()
        for folder in ("blobs", "index", "locks", "tmp", "hf"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self._observer.on_bytes(sum(size for _, size, _ in self._entries()))

    def resolve(
        self,
        ref: str,
        field: str,
        *,
        subfolder: str | None = None,
        weight_name: str | None = None,
        variant: str | None = None,
        on_progress: ProgressLines | None = None,
    ) -> Path:
        """`subfolder`/`weight_name`/`variant` apply to local folders and repo ids; a URL names one file."""
        report = on_progress or (lambda _line: None)
        if ref[:5].lower() == "data:":
            return self._from_data_uri(ref, field)
        if re.match(r"https?://", ref, re.IGNORECASE):
            return self._from_url(ref, field, report)
        if "://" in ref:
            raise InputFetchError(field, ref, "only http and https URLs are accepted")
        # Decided by spelling alone: what exists on this node must not change how a reference is read.
        if _looks_like_path(ref):
            return self._checked_local(self._allowed_local(ref, field), ref, field, subfolder, weight_name)
        return self._from_hub(ref, field, subfolder, _with_variant(weight_name, variant), variant, report)

    def _from_url(self, url: str, field: str, report: ProgressLines) -> Path:
        name = _file_name(url)
        self._refuse_pickle_name(name, field, url)
        stored_key = self.store.key_for_url(url) if self.store is not None else None
        index_key = f"store:{stored_key}" if stored_key is not None else url
        digest = hashlib.sha256(index_key.encode()).hexdigest()
        index_file = self.root / "index" / f"{digest}.json"
        if (cached := self._lookup(index_file)) is not None:
            self._observer.on_hit()
            return cached
        lock_file = self.root / "locks" / f"{digest}.lock"
        with _exclusive(lock_file, lambda: report(f"waiting for {name}: another request is downloading it")):
            if (cached := self._lookup(index_file)) is not None:
                self._observer.on_hit()
                return cached
            self._observer.on_miss()
            blob = self._download(url, field, name, report)
            _write_atomically(index_file, json.dumps({"url": redact_url(url), "blob": blob.name}).encode())
            return blob

    def _download(self, url: str, field: str, name: str, report: ProgressLines) -> Path:
        fd, tmp_name = tempfile.mkstemp(dir=self.root / "tmp", prefix="download-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                sink = _HashingSink(handle)
                fetch_to(url, field, self.policy, sink, store=self.store, on_progress=_ProgressReporter(name, report))
            return self._commit(tmp, sink.sha256.hexdigest(), self._content_suffix(tmp, name, field, url))[0]
        finally:
            tmp.unlink(missing_ok=True)

    def _from_data_uri(self, uri: str, field: str) -> Path:
        data = decode_data_uri(uri, field, self.policy.max_data_uri_bytes)
        fd, tmp_name = tempfile.mkstemp(dir=self.root / "tmp", prefix="data-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            blob, new = self._commit(tmp, hashlib.sha256(data).hexdigest(), self._content_suffix(tmp, "", field, uri))
        finally:
            tmp.unlink(missing_ok=True)
        if new:
            self._observer.on_miss()
        else:
            self._observer.on_hit()
        return blob

    def _commit(self, tmp: Path, sha256: str, suffix: str) -> tuple[Path, bool]:
        """Same content, same blob: a second copy is dropped (False), and the rename is atomic for readers."""
        blob = self.root / "blobs" / f"{sha256}{suffix}"
        new = not blob.exists()
        if new:
            os.replace(tmp, blob)
        else:
            _mark_used(blob)
        self._evict(keep=blob)
        return blob, new

    def _evict(self, keep: Path) -> None:
        """Least recently used entries go until the budget holds; the size left is reported either way.

        An evicted blob's index entries point at nothing and are downloaded again on next use; so
        is an evicted Hugging Face repo. Replicas may evict at once: the same order makes them
        pick the same victims, and only the one that removes an entry counts it.
        """
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        budget = self.max_blob_bytes or math.inf
        now = time.time()
        for last_use, size, path in sorted(entries):
            if total <= budget:
                break
            if path == keep or now - last_use < self.min_blob_age_seconds:
                continue
            if _remove(path, self.root / "tmp"):
                self._observer.on_evict(size)
            total -= size
        self._observer.on_bytes(total)

    def _entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, path) of what the budget counts: each blob, and each Hugging Face repo as a whole.

        A repo's snapshots link into its own `blobs/` and its `refs/` name the snapshots, so
        removing anything less than the whole folder could leave huggingface_hub a broken repo.
        Its dot folders (`.locks`) hold no weights and may be in use by a download.
        """
        entries = []
        for path in (self.root / "blobs").iterdir():
            try:
                blob = path.stat()
            except FileNotFoundError:
                continue
            entries.append((max(blob.st_atime, blob.st_mtime), blob.st_size, path))
        for repo in (self.root / "hf").iterdir():
            if repo.is_dir() and not repo.name.startswith("."):
                last_use, size = _folder_usage(repo)
                entries.append((last_use, size, repo))
        return entries

    def _lookup(self, index_file: Path) -> Path | None:
        try:
            blob = self.root / "blobs" / json.loads(index_file.read_bytes())["blob"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        try:
            _mark_used(blob)
        except FileNotFoundError:
            return None
        return blob

    def _content_suffix(self, path: Path, name: str, field: str, ref: str) -> str:
        """The suffix the blob gets, decided by its bytes: a renamed pickle is still refused."""
        with path.open("rb") as handle:
            head = handle.read(9)
        if looks_like_safetensors(head, path.stat().st_size):
            return SAFETENSORS_SUFFIX
        suffix = Path(name).suffix.lower()
        if suffix == SAFETENSORS_SUFFIX:
            raise InputFetchError(field, ref, "the file is named .safetensors but is not a safetensors file")
        if self.allow_pickle:
            return suffix if suffix in PICKLE_SUFFIXES else ".bin"
        raise InputFetchError(
            field, ref, "not a safetensors file; pickle-based weights can run code when loaded and are refused"
        )

    def _refuse_pickle_name(self, name: str, field: str, ref: str) -> None:
        suffix = Path(name).suffix.lower()
        if suffix in PICKLE_SUFFIXES and not self.allow_pickle:
            raise InputFetchError(
                field, ref, f"{suffix} files are pickle and can run code when loaded; refused (use .safetensors)"
            )

    def check_local_path(self, ref: str, field: str) -> None:
        """The refusal `resolve` would raise for a local path outside the allowed roots, before anything
        looks at that path on disk; nothing for URLs, data URIs and repo ids."""
        if ref[:5].lower() != "data:" and "://" not in ref and _looks_like_path(ref):
            self._allowed_local(ref, field)

    def _allowed_local(self, ref: str, field: str, *inside: str) -> Path:
        """The path with symlinks and `..` resolved, if it lies under an allowed root.

        Every refusal is the same error, whatever is on the disk: a caller learns nothing about
        files outside the roots, not even whether they exist.
        """
        try:
            path = Path(ref).expanduser().joinpath(*inside).resolve()
        except (OSError, RuntimeError):  # a symlink loop, an unreadable folder on the way
            raise InputFetchError(field, ref, LOCAL_PATH_REFUSED) from None
        if not any(path.is_relative_to(root) for root in self.local_roots):
            raise InputFetchError(field, ref, LOCAL_PATH_REFUSED)
        return path

    def _checked_local(self, path: Path, ref: str, field: str, subfolder: str | None, weight_name: str | None) -> Path:
        if path.is_dir() and (subfolder or weight_name):
            # Both come from the caller too, so the joined path is checked against the roots again.
            path = self._allowed_local(ref, field, subfolder or "", weight_name or "")
        if not path.exists():
            raise InputFetchError(field, ref, "no such local file or folder")
        if path.is_file():
            self._refuse_pickle_name(path.name, field, ref)
            self._content_suffix(path, path.name, field, ref)
        return path

    def _from_hub(
        self,
        repo_id: str,
        field: str,
        subfolder: str | None,
        file_name: str | None,
        variant: str | None,
        report: ProgressLines,
    ) -> Path:
        """Only safetensors and configs are ever requested, and no repo code is run (no trust_remote_code)."""
        offline = _hub_offline()
        what = f"{repo_id}/{subfolder}" if subfolder else repo_id
        if file_name is not None:
            self._refuse_pickle_name(file_name, field, repo_id)
        report(f"fetching {what}{'/' + file_name if file_name else ''} from Hugging Face")
        repo = self.root / "hf" / repo_folder_name(repo_id=repo_id, repo_type="model")
        with suppress(FileNotFoundError):
            os.utime(repo)  # last use, before the hub call: a cached repo must not be evicted under it
        _, bytes_before = _folder_usage(repo)
        try:
            patterns = _hub_patterns(subfolder, variant)
            cache_only = offline
            if not offline:
                plan = self._hub_plan(repo_id, field, subfolder, file_name, variant)
                # Unreachable: nothing unlisted may be downloaded, but what is cached may still serve.
                cache_only = plan is None
                patterns = plan or patterns
            if file_name is not None:
                path = huggingface_hub.hf_hub_download(
                    repo_id,
                    file_name,
                    subfolder=subfolder,
                    cache_dir=self.root / "hf",
                    local_files_only=cache_only,
                    endpoint=self.hub_endpoint,
                )
            else:
                path = huggingface_hub.snapshot_download(
                    repo_id,
                    allow_patterns=patterns,
                    cache_dir=self.root / "hf",
                    local_files_only=cache_only,
                    endpoint=self.hub_endpoint,
                )
        except HFValidationError as exc:  # not a repo id at all, so no cache lookup
            raise InputFetchError(field, repo_id, _hub_reason(exc, offline)) from None
        except (EntryNotFoundError, OSError) as exc:
            self._observer.on_miss()
            raise InputFetchError(field, repo_id, _hub_reason(exc, offline)) from None
        if _folder_usage(repo)[1] > bytes_before:
            self._observer.on_miss()
            self._evict(keep=repo)
        else:
            self._observer.on_hit()
        if file_name is not None:
            self._content_suffix(Path(path), file_name, field, repo_id)
            return Path(path)
        folder = Path(path) / subfolder if subfolder else Path(path)
        weights = sorted(folder.rglob(f"*{SAFETENSORS_SUFFIX}"))
        if not weights:
            raise InputFetchError(field, repo_id, f"{what} has no .safetensors weights (pickle-only repos are refused)")
        for weight in weights:
            self._content_suffix(weight, weight.name, field, repo_id)
        return folder

    def _hub_plan(
        self, repo_id: str, field: str, subfolder: str | None, file_name: str | None, variant: str | None
    ) -> list[str] | None:
        """The repo's files are listed first, so only what the pipeline loads is fetched, and a repo past
        the size cap is refused before a byte of weights is downloaded. Returns exact allow-patterns, or
        None when the Hub cannot be reached."""
        try:
            listing = list_hub_files(repo_id, self.hub_endpoint)
        except (HfHubHTTPError, HFValidationError):  # the Hub answered: no such repo, gated, ...
            raise
        except Exception:  # noqa: BLE001 - connection and timeout errors of whichever HTTP client the hub uses
            return None
        model_index = None
        if file_name is None and not subfolder and any(f.path == MODEL_INDEX for f in listing):
            index_file = huggingface_hub.hf_hub_download(
                repo_id, MODEL_INDEX, cache_dir=self.root / "hf", endpoint=self.hub_endpoint
            )
            try:
                model_index = json.loads(Path(index_file).read_bytes())
            except ValueError:
                raise InputFetchError(field, repo_id, f"{MODEL_INDEX} is not valid JSON") from None
        chosen = select_hub_files(listing, subfolder=subfolder, file_name=file_name, variant=variant, model_index=model_index)
        what = "/".join(part.strip("/") for part in (repo_id, subfolder or "", file_name or "") if part)
        if file_name is None and not any(f.path.endswith(SAFETENSORS_SUFFIX) for f in chosen):
            raise InputFetchError(field, repo_id, f"{what} has no .safetensors weights (pickle-only repos are refused)")
        total = sum(f.size for f in chosen)
        if total > self.policy.max_bytes:
            raise InputFetchError(
                field,
                repo_id,
                f"the files to download from {what} are {total} bytes, more than the limit of {self.policy.max_bytes}",
            )
        return [glob.escape(f.path) for f in chosen]


@dataclass(frozen=True)
class HubFile:
    """One file of a Hugging Face repo as its listing gives it."""

    path: str
    size: int


def list_hub_files(repo_id: str, endpoint: str | None = None) -> list[HubFile]:
    """The repo's files with their sizes (LFS files by their real size), from the Hub's model API
    (`endpoint`: a mirror; by default huggingface_hub's, which HF_ENDPOINT sets)."""
    info = huggingface_hub.HfApi(endpoint=endpoint).model_info(repo_id, files_metadata=True)
    return [
        HubFile(s.rfilename, s.size if s.size is not None else (s.lfs.size if s.lfs is not None else 0))
        for s in info.siblings or []
    ]


def select_hub_files(
    listing: Sequence[HubFile],
    *,
    subfolder: str | None = None,
    file_name: str | None = None,
    variant: str | None = None,
    model_index: dict[str, Any] | None = None,
) -> list[HubFile]:
    """What the pipeline loads from a repo, as diffusers would pick it.

    One named file is just that file. A diffusers pipeline (a `model_index.json`, no subfolder)
    is its index plus, in each component folder it names, the configs, tokenizer files and the
    safetensors weights: the requested variant's where the folder has them (diffusers falls back
    to the plain ones), else the plain ones; root-level single-file checkpoints, other precisions,
    ONNX/Flax/OpenVINO exports and pickles stay on the Hub. Anything else (a subfolder, a LoRA or
    ControlNet repo) is every config and safetensors file under it, by the same variant rule.
    """
    if file_name is not None:
        path = f"{subfolder.strip('/')}/{file_name}" if subfolder else file_name
        return [f for f in listing if f.path == path]
    if subfolder is None and model_index is not None:
        components = {
            name
            for name, spec in model_index.items()
            if not name.startswith("_") and isinstance(spec, list) and len(spec) == 2 and None not in spec
        }
        chosen = [f for f in listing if f.path == MODEL_INDEX]
        in_components = [f for f in listing if f.path.count("/") == 1 and f.path.split("/", 1)[0] in components]
        return chosen + _configs_and_weights(in_components, variant)
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    return _configs_and_weights([f for f in listing if f.path.startswith(prefix)], variant)


def _configs_and_weights(files: Sequence[HubFile], variant: str | None) -> list[HubFile]:
    configs = [f for f in files if f.path.endswith(HUB_CONFIG_SUFFIXES) and not f.path.endswith(SAFETENSORS_SUFFIX)]
    by_folder: dict[str, list[HubFile]] = {}
    for f in files:
        if f.path.endswith(SAFETENSORS_SUFFIX):
            by_folder.setdefault(f.path.rpartition("/")[0], []).append(f)
    weights: list[HubFile] = []
    for group in by_folder.values():
        stems = {f.path.rpartition("/")[2][: -len(SAFETENSORS_SUFFIX)] for f in group}
        plain = [f for f in group if not _is_variant_of_another(_stem(f), stems)]
        wanted = [f for f in group if variant and _has_variant(_stem(f), variant)]
        weights.extend(wanted or plain)
    return configs + weights


def _stem(f: HubFile) -> str:
    return f.path.rpartition("/")[2][: -len(SAFETENSORS_SUFFIX)]


def _has_variant(stem: str, variant: str) -> bool:
    """`model.fp16` and the shards `model.fp16-00001-of-00002`."""
    return stem.endswith(f".{variant}") or f".{variant}-" in stem


def _is_variant_of_another(stem: str, stems: set[str]) -> bool:
    """`model.fp16` beside `model` (or its shards beside `model-0000N-of-0000M`): a variant, not the plain weights.

    A dot alone proves nothing (`sd_xl_base_1.0`); the plain file it would vary must be there too.
    """
    base, dot, tail = stem.rpartition(".")
    if not dot:
        return False
    shard = re.fullmatch(r"[^-]+(-\d+-of-\d+)", tail)
    return (base + shard.group(1) if shard else base) in stems


class _HashingSink:
    """Hashes while writing, so a multi-GB download is read once."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.sha256.update(data)
        self._handle.write(data)


class _ProgressReporter:
    """Turns byte counts into a few human lines: about one per tenth, or per 10 MB without a total."""

    def __init__(self, name: str, report: ProgressLines) -> None:
        self._name = name
        self._report = report
        self._next = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        if total:
            if done / total >= self._next:
                self._report(f"downloading {self._name}: {done / 1e6:.1f}/{total / 1e6:.1f} MB")
                self._next = (int(done / total / PROGRESS_STEP_FRACTION) + 1) * PROGRESS_STEP_FRACTION
        elif done >= self._next:
            self._report(f"downloading {self._name}: {done / 1e6:.1f} MB")
            self._next = done + PROGRESS_STEP_BYTES_UNKNOWN_TOTAL


@contextmanager
def _exclusive(lock_file: Path, on_wait: Callable[[], None]) -> Iterator[None]:
    """flock conflicts between separate opens, so it serialises threads of one process and processes alike."""
    with lock_file.open("a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _folder_usage(folder: Path) -> tuple[float, int]:
    """Newest mtime of anything inside (the folder itself included, touched on every use) and bytes of its files.

    lstat, so a snapshot's symlinks are not counted again as the blobs they point at. A
    missing folder (never fetched, or just evicted by another replica) is (0, 0).
    """
    last_use, size = 0.0, 0
    for dirpath, _dirs, names in os.walk(folder):
        for path in (dirpath, *(os.path.join(dirpath, name) for name in names)):
            try:
                entry = os.lstat(path)
            except FileNotFoundError:
                continue
            last_use = max(last_use, entry.st_mtime)
            if stat.S_ISREG(entry.st_mode):
                size += entry.st_size
    return last_use, size


def _remove(path: Path, trash: Path) -> bool:
    """False when another replica removed it first.

    A repo folder is first renamed out of `hf/` in one step, so huggingface_hub never finds it half deleted.
    """
    if not path.is_dir():
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True
    bin_folder = Path(tempfile.mkdtemp(dir=trash, prefix="evict-"))
    try:
        os.rename(path, bin_folder / path.name)
    except FileNotFoundError:
        return False
    finally:
        shutil.rmtree(bin_folder, ignore_errors=True)
    return True


def _mark_used(blob: Path) -> None:
    """Last use, for the disk tier's LRU, goes in the access time: the modification time must stay.

    Workers key what they keep of a file (resident adapters, parsed LoRAs) on path + mtime + size
    so that a rewritten file is read afresh; bumping the mtime on every use made every request
    for a cached URL load its LoRA again.
    """
    os.utime(blob, ns=(time.time_ns(), blob.stat().st_mtime_ns))


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _file_name(url: str) -> str:
    return unquote(urlsplit(url).path.rstrip("/").rpartition("/")[2]) or "weights"


def _looks_like_path(ref: str) -> bool:
    """Repo ids are `name` or `org/name`; anything else is meant as a local path."""
    suffix = Path(ref).suffix.lower()
    has_weights_suffix = suffix in PICKLE_SUFFIXES | {SAFETENSORS_SUFFIX}
    return ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1 or has_weights_suffix


def _with_variant(weight_name: str | None, variant: str | None) -> str | None:
    """diffusers' naming: `model.safetensors` with variant fp16 is `model.fp16.safetensors`."""
    if weight_name is None or not variant:
        return weight_name
    stem, dot, suffix = weight_name.rpartition(".")
    return f"{stem}.{variant}.{suffix}" if dot else f"{weight_name}.{variant}"


def _hub_patterns(subfolder: str | None, variant: str | None) -> list[str]:
    """With a variant only its weight files are fetched, not every precision the repo holds.

    huggingface_hub matches with fnmatch, whose `*` also crosses `/`, so these reach nested folders.
    """
    weights = f"*.{variant}{SAFETENSORS_SUFFIX}" if variant else f"*{SAFETENSORS_SUFFIX}"
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    return [prefix + pattern for pattern in (weights, *HUB_CONFIG_PATTERNS)]


def _hub_offline() -> bool:
    """huggingface_hub reads HF_HUB_OFFLINE once at import; the env is read again so a later change counts."""
    return hf_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _hub_reason(exc: Exception, offline: bool) -> str:
    """huggingface_hub's own messages are long and mention its internals; callers get the gist."""
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        if offline:
            return "not in the local Hugging Face cache, and the service is offline (HF_HUB_OFFLINE is set)"
        return f"could not reach Hugging Face and it is not in the local cache ({exc})"
    if isinstance(exc, GatedRepoError):
        return "the Hugging Face repo is gated: accept its terms and give the service a token (HF_TOKEN)"
    if isinstance(exc, RepositoryNotFoundError):
        return "no such Hugging Face repo, or it is private (the service needs a token for private repos)"
    if isinstance(exc, RevisionNotFoundError):
        return "no such revision in the Hugging Face repo"
    if isinstance(exc, (EntryNotFoundError, RemoteEntryNotFoundError)):
        return "no such file in the Hugging Face repo"
    if isinstance(exc, HFValidationError):
        return "not a local path, an http(s) URL, a data URI or a Hugging Face repo id"
    return f"download from Hugging Face failed: {type(exc).__name__}: {exc}"
