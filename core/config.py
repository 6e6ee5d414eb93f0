"""The one place where settings come from: `LORASERVE_*` env vars, with CLI flags over them.

Nothing here is read at import time; `Settings.from_env()` / `add_arguments` +
`from_args` build one frozen object per process and everything else takes it as an
argument. Units are in the names.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "LORASERVE_"


@dataclass(frozen=True)
class Settings:
    # Where the request store, local object store and weights downloads live.
    data_dir: Path = Path("./loraserve-data")
    # The request store: empty keeps SQLite in data_dir (one gateway); a `postgresql://` URL lets any
    # number of gateways share one queue.
    store_url: str = ""
    # A running request's lease: its gateway renews it every third of this; when the gateway dies,
    # another (or the same one restarted) takes the request back once it has run out.
    lease_seconds: float = 30.0
    # Quotas per tenant (0: none): requests waiting, requests running (at dispatch), submits per second
    # (per gateway); `tenant_limits` overrides them per tenant and sets weights, as JSON:
    # {"team-a": {"weight": 2, "max_waiting": 500, "max_running": 4, "submits_per_second": 20}}.
    tenant_max_waiting: int = 0
    tenant_max_running: int = 0
    tenant_submits_per_second: float = 0.0
    # Status streams one tenant may hold open on a gateway (SSE, /run, StreamStatus, Subscribe; 0: none but
    # `max_open_streams`), so one tenant cannot take them all; `tenant_limits` key: "max_open_streams".
    tenant_max_open_streams: int = 2000
    tenant_limits: str = ""
    # The gateway's own bounds (0: none): requests waiting in the queue, open status streams.
    max_queue_size: int = 100_000
    max_open_streams: int = 10_000
    # API keys are required on any address but loopback; this turns that off (a network you trust entirely).
    insecure_no_auth: bool = False
    # Public gRPC API of the gateway.
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    # TLS on the gRPC port and the HTTP port (PEM files; fal's Python client speaks https only); with a
    # client CA, gRPC callers must present a certificate it signed (the HTTP port asks for none).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # Gateway HTTP: fal's queue protocol (gateway/fal_http.py), stored files (local store), health, metrics.
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # Base of the URLs handed out for stored files; derived from http_host/port when empty.
    public_url: str = ""
    # Peers (IP addresses or networks, comma-separated) whose X-Forwarded-Proto / X-Forwarded-Host /
    # Forwarded headers are believed when the HTTP side builds the URLs it returns: a TLS-terminating
    # ingress or sidecar in front of the gateway.
    trusted_proxies: str = "127.0.0.0/8,::1"
    # Browser origins (scheme://host[:port], comma-separated) whose pages may call the HTTP side and read its
    # answers (CORS); a request from any other page gets no CORS headers and its writes are refused.
    cors_allowed_origins: str = ""
    # Ray cluster to join; empty starts a local one (the embedded default).
    ray_address: str = ""
    ray_num_cpus: int = 0
    # Tries at starting (or joining) Ray before giving up; a failed try is cleaned up first.
    ray_start_attempts: int = 3
    # Ray Serve's gRPC ingress, which the gateway's dispatcher calls.
    serve_grpc_host: str = "127.0.0.1"
    serve_grpc_port: int = 9000
    serve_http_port: int = 8000
    serve_app_name: str = "loraserve"
    # Sent by the gateway on every call to the workers, which refuse calls without it (Serve's gRPC ingress
    # listens on every interface). Empty: the workers check nothing; `loraserve serve` then makes one per run.
    worker_shared_secret: str = ""
    # One replica's resources and the autoscaling bounds of the worker deployment.
    replica_num_gpus: float = 0.0
    replica_num_cpus: float = 1.0
    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int = 1
    target_ongoing_requests: float = 1.0
    max_ongoing_requests_per_replica: int = 1
    upscale_delay_seconds: float = 30.0
    downscale_delay_seconds: float = 600.0
    # Base pipelines one replica keeps loaded (least recently used one evicted).
    max_pipelines_per_replica: int = 2
    # LoRA tensors, and the merged copies of the last set kept for a repeat, on one pipeline's device
    # between requests, by bytes (0: a quarter of the device memory free once the pipeline is loaded,
    # the host's available RAM on a CPU, split among max_pipelines_per_replica) and optionally by count
    # (0: none).
    max_loras_per_pipeline: int = 0
    max_lora_bytes_per_pipeline: int = 0
    # Parsed LoRA and embedding files kept in one replica's host RAM (shared by its pipelines and fed by
    # prefetching for waiting requests), least recently used out first; 0: unbounded.
    max_host_lora_bytes: int = 8 * 1024**3
    # ControlNets, IP-Adapter weights, image encoders and IC-Light offsets one replica keeps loaded.
    max_conditioning_models_per_replica: int = 4
    # ... and by the bytes of their weights (0: count only).
    max_conditioning_bytes_per_replica: int = 8 * 1024**3
    # Safety checker (StableDiffusionSafetyChecker + CLIP image processor: HF ID or folder) for
    # `enable_safety_checker`; empty: such requests fail with a clear error.
    safety_checker_path: str = ""
    # A worker replica's Prometheus port (0: none).
    worker_metrics_port: int = 0
    # "auto" picks cuda when there is one.
    device: str = "auto"
    # "auto": float16 on cuda, float32 on cpu.
    torch_dtype: str = "auto"
    # torch.compile of the U-Net and VAE decoder (serving/compiled.py): off | default | max-autotune;
    # "auto": max-autotune (with CUDA graphs) on cuda, off on a CPU (minutes of compiling per size
    # for a small gain).
    compile: str = "auto"
    # Sizes compiled and warmed when a pipeline loads, WIDTHxHEIGHT comma-separated (empty: the
    # family's native 512x512 / 1024x1024); other sizes run eagerly, with no compile.
    compile_warmup_sizes: str = ""
    # Compile only the U-Net's repeated transformer blocks: a shorter compile (tiny SDXL with its VAE
    # decoder on a shared 2-core CPU: 4 min against 6), the rest of the U-Net eager and CUDA graphs
    # covering only the blocks.
    compile_regional: bool = False
    # Live previews (serving/previews.py): a small JPEG of the latents at a request's last step and at
    # most once per this many seconds before it (0: none); its longer side at most preview_max_side px.
    preview_interval_seconds: float = 1.0
    preview_max_side: int = 256
    # sync_mode puts the images in the result itself (data URIs), which the request store keeps: at
    # most this many pixels over all of a request's images (a 1024² PNG is 1.5-3 MB, twice in a result).
    max_sync_mode_pixels: int = 2 * 1024 * 1024
    # Requests handed to workers at once; 0 means max_replicas × max_ongoing_requests_per_replica.
    max_in_flight: int = 0
    # A request whose base model is hot may overtake older ones whose model is cold, but no
    # request is overtaken more than this many times (0: strict FIFO).
    max_queue_skips: int = 4
    # Worker attempts per request before it fails with WORKER_FAILED (a replica died, hung past the
    # deadline, or could not write the output). A call that never reached a worker is no attempt.
    max_attempts: int = 10
    # Deadline of one worker call, from dispatch to result: a hung replica gives the request back then.
    worker_call_timeout_seconds: float = 1800.0
    # Keepalive pings on the channel to the workers (0: none), and how long one may go unanswered
    # before the connection counts as dead. Serve's gRPC proxy cuts off clients that ping more often
    # than every 300 s while it sends nothing.
    worker_keepalive_seconds: float = 300.0
    worker_keepalive_timeout_seconds: float = 20.0
    # Backoff (jittered, doubling) between the attempts of a request, between probes of unreachable
    # workers, and between restarts of the dispatcher after an error.
    retry_backoff_seconds: float = 1.0
    retry_backoff_max_seconds: float = 60.0
    # Worker calls in a row that cannot reach a worker before dispatching pauses (health reports the
    # GenerationService NOT_SERVING) until the workers can be reached again; waiting requests keep their places.
    worker_unreachable_threshold: int = 3
    # Finished requests, their logs and their output files are deleted this long after they finished
    # (like fal's media expiry); the request then answers that its result expired. 0 keeps them forever.
    retention_seconds: float = 7 * 24 * 3600.0
    # Webhooks (fal's `fal_webhook`): the Ed25519 key they are signed with, as PEM text (in a cluster from a
    # Secret, the same for every gateway) or a PEM file (neither: one is made in data_dir on first start),
    # the timeout of one attempt, the retries after a failed first attempt and the backoff between them
    # (jittered, doubling: by default ~2 hours in all). The target URL passes the same guard as inputs
    # (allow_private_networks, fetch_allowed_hosts).
    webhook_signing_key: str = ""
    webhook_signing_key_file: str = ""
    webhook_timeout_seconds: float = 15.0
    webhook_retries: int = 10
    webhook_backoff_seconds: float = 30.0
    webhook_backoff_max_seconds: float = 1800.0
    # Deliveries one gateway attempts at once for one tenant (0: no cap but the gateway's 32), so a tenant
    # whose receiver never answers holds that many attempts and others' deliveries go on.
    webhook_tenant_max_concurrent: int = 4
    # On shutdown, how long running requests may take to finish.
    shutdown_grace_seconds: float = 30.0
    # Largest accepted prompt, in characters.
    max_prompt_chars: int = 10_000
    max_loras_per_request: int = 16
    max_upload_bytes: int = 100 * 1024 * 1024
    # Every part of a multipart upload but the last has at least this many bytes (S3's minimum; fal's
    # clients send 10 MiB parts), so a flood of tiny parts is refused as it comes.
    upload_min_part_bytes: int = 5 * 1024 * 1024
    # Uploads (and multipart parts) one gateway receives at once, in all and per tenant (0: no cap): each
    # holds an open file while its bytes arrive. Past a cap: RESOURCE_EXHAUSTED / HTTP 429.
    max_upload_spools: int = 256
    tenant_max_upload_spools: int = 32
    # Bytes of uploads one tenant may have stored or arriving (0: no cap); uploads are deleted
    # retention_seconds after they were stored. Past it: RESOURCE_EXHAUSTED / HTTP 429.
    tenant_max_upload_bytes: int = 10 * 1024**3
    log_level: str = "INFO"
    # Object store for outputs and uploads: "local" (data_dir/files, served by the gateway) or "s3".
    object_store: str = "local"
    # S3 / MinIO: endpoint is host[:port] without a scheme; the bucket is created when missing.
    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_bucket: str = "loraserve"
    s3_region: str = "us-east-1"
    s3_secure: bool = True
    s3_key_prefix: str = ""
    # Lifetime of presigned result URLs (at most 7 days).
    s3_presign_expiry_seconds: int = 3600
    # Plain `{base}/{key}` URLs instead of presigned ones (a public or proxied bucket).
    s3_public_base_url: str = ""
    # Where callers reach S3 when it differs from the in-cluster endpoint (presigned URLs name one host).
    s3_presign_endpoint: str = ""
    # Read-only credentials used to presign; the write credentials when empty.
    s3_presign_access_key: str = ""
    s3_presign_secret_key: str = ""
    s3_timeout_seconds: float = 60.0
    # Storing a finished generation's outputs: attempts before the worker attempt fails, and the
    # backoff between them (random up to base × 2^retry, capped), so one S3 hiccup loses no GPU work.
    output_write_attempts: int = 5
    output_write_backoff_seconds: float = 0.5
    output_write_max_backoff_seconds: float = 8.0
    # File inputs fetched from URLs: caps, timeouts and the SSRF guard.
    max_input_bytes: int = 50 * 1024 * 1024
    max_data_uri_bytes: int = 20 * 1024 * 1024
    fetch_timeout_seconds: float = 30.0
    fetch_total_timeout_seconds: float = 300.0
    # All downloads of one request's inputs (LoRAs, embeddings, images, adapter weights) end by then (0: none).
    input_resolution_timeout_seconds: float = 600.0
    # Private, loopback and link-local targets (never cloud metadata addresses) allowed.
    allow_private_networks: bool = False
    # Comma-separated host names / IP literals (as written in URLs) exempt from the address check.
    fetch_allowed_hosts: str = ""
    max_redirects: int = 5
    max_image_pixels: int = 4096 * 4096
    # Weights downloads (URLs, Hugging Face): size cap and whole-transfer timeout.
    max_weights_bytes: int = 16 * 1024**3
    weights_total_timeout_seconds: float = 3600.0
    # Disk budget of the node's weights cache for URL / upload / data-URI files (LRU; 0: unbounded).
    max_weights_cache_bytes: int = 100 * 1024**3
    # Pickle weights (.ckpt, .bin, .pt) run code when loaded: refused unless the operator opts in.
    allow_pickle_weights: bool = False
    # Comma-separated folders whose files callers may name as local paths (model_name, LoRAs, adapters),
    # checked after symlinks and `..` are resolved. Empty: none, except that `loraserve serve` listening
    # on loopback only allows the system temp folder (where the demo, bench and tests build tiny models).
    allowed_local_roots: str = ""
    # Lifetime of the local store's signed file URLs, and the HMAC secret that signs them (empty: one is
    # generated into data_dir on first use and shared by the gateway and the workers on this machine).
    files_url_expiry_seconds: int = 3600
    files_url_secret: str = ""
    # Comma-separated content types an upload may have (detected from its bytes).
    upload_allowed_content_types: str = (
        "image/png,image/jpeg,image/webp,image/gif,application/x-safetensors,application/json"
    )

    @property
    def files_base_url(self) -> str:
        scheme = "https" if self.tls_cert_file else "http"
        return self.public_url.rstrip("/") or f"{scheme}://{self.http_host}:{self.http_port}"

    @property
    def dispatch_capacity(self) -> int:
        return self.max_in_flight or self.max_replicas * self.max_ongoing_requests_per_replica

    @property
    def store_path(self) -> Path:
        return self.data_dir / "requests.sqlite3"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def weights_dir(self) -> Path:
        return self.data_dir / "weights"

    @property
    def local_roots(self) -> tuple[Path, ...]:
        return tuple(Path(part.strip()) for part in self.allowed_local_roots.split(",") if part.strip())

    def with_embedded_local_roots(self) -> Settings:
        """The loopback default: callers are on this machine, and the demo, bench and tests name tiny models
        they built in temp folders. Anything reachable from elsewhere gets no local paths unless listed."""
        if self.allowed_local_roots or not (_is_loopback(self.grpc_host) and _is_loopback(self.http_host)):
            return self
        return self.replace(allowed_local_roots=tempfile.gettempdir())

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Adds one `--flag` per setting; flags left out fall back to env, then default."""
        group = parser.add_argument_group("settings (each also LORASERVE_<NAME>)")
        for f in fields(cls):
            group.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f"setting_{f.name}",
                default=None,
                metavar=f.name.upper(),
                help=f"default: {f.default}",
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
        flags = {
            f.name: _parse(f, value)
            for f in fields(cls)
            if (value := getattr(args, f"setting_{f.name}", None)) is not None
        }
        return cls.from_env(env, **flags)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    kind: type[Any] = type(f.default)
    try:
        if kind is bool:
            if raw.lower() not in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
                raise ValueError(raw)
            return raw.lower() in {"1", "true", "yes", "on"}
        return kind(raw)
    except ValueError as exc:
        raise ValueError(
            f"setting `{f.name}` ({ENV_PREFIX}{f.name.upper()} / --{f.name.replace('_', '-')}) "
            f"must be a {kind.__name__}, got {raw!r}"
        ) from exc


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
