"""The one place where settings come from: flags over `LORASERVE_*` env vars over a `--config` file over defaults.

Each setting is declared once, with who reads it, whether it is a secret, a description and its unit
(`setting`); each command's `--help` (core.settings_cli), the workers' Serve config
(serving/serve_config.py), the chart's copies (tests/chart/sync_chart.py) and the docs' reference
(core.settings_reference) are made from that. Nothing here is read at import time; `Settings.from_env()` /
`add_arguments` + `from_args` build one frozen object per process and everything else takes it as an
argument. Units are in the names.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import ipaddress
import os
import tempfile
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from loraserve.request.limits import RequestLimits

ENV_PREFIX = "LORASERVE_"


class Reader(enum.StrEnum):
    """Who reads a setting. It decides which commands take it as a flag, what a replica's Serve config
    carries (serving/serve_config.py), which pods the chart gives a secret to, and the docs' reference."""

    # `loraserve gateway`, and the gateway inside `loraserve serve`.
    GATEWAY = "gateway"
    # A Serve replica: its Serve config's `args` (secrets from the pod's env).
    WORKER = "worker"
    # Whatever writes the workers' Serve config (`loraserve serve`, `serve-config`, the chart): the
    # deployment's resources and autoscaling, the app name, Serve's proxy ports.
    DEPLOYMENT = "deployment"
    # The process that starts or joins Ray (`loraserve serve`); KubeRay does it in a cluster.
    RAY = "ray"
    # `loraserve keys`, beside a running gateway.
    ADMIN = "admin"


GATEWAY, WORKER, DEPLOYMENT, RAY, ADMIN = Reader.GATEWAY, Reader.WORKER, Reader.DEPLOYMENT, Reader.RAY, Reader.ADMIN


@dataclass(frozen=True)
class SettingInfo:
    """What is declared about a setting beside its type and default."""

    group: str
    readers: frozenset[Reader]
    # One sentence or two: `--help`, the docs' reference.
    description: str
    unit: str = ""
    # Never a flag nor in a config file or a Serve config: from the env, or from a file named by `<name>_file`.
    secret: bool = False


# Sections of `--help` and of the settings reference.
STORE = "Data and the request store"
NETWORK = "Gateway network, TLS and auth"
QUOTAS = "Quotas and request limits"
UPLOADS = "Uploads"
DISPATCH = "Dispatch, retries and shutdown"
WEBHOOKS = "Webhooks"
RAY_SERVE = "Ray and Serve"
REPLICAS = "Worker replicas and autoscaling"
CACHES = "Worker caches"
MODELS = "Models, device and compile"
OBJECTS = "Object store"
INPUTS = "Inputs and downloads"
LOGS = "Logs, metrics and tracing"
# The order of `--help`'s sections and of the settings reference.
GROUPS = (
    STORE, NETWORK, QUOTAS, UPLOADS, DISPATCH, WEBHOOKS, RAY_SERVE, REPLICAS, CACHES, MODELS, OBJECTS, INPUTS, LOGS
)

_INFO = "loraserve"
_T = TypeVar("_T")


def setting(
    default: _T, group: str, readers: Iterable[Reader], description: str, *, unit: str = "", secret: bool = False
) -> _T:
    """A Settings field with its metadata: the one declaration every list of settings is made from."""
    info = SettingInfo(group, frozenset(readers), description, unit, secret)
    return field(default=default, metadata={_INFO: info})  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Settings:
    """Every setting, each declared once with `setting(default, group, readers, description)`."""

    data_dir: Path = setting(
        Path("./loraserve-data"), STORE, (GATEWAY, WORKER, ADMIN),
        "Where the request store, the local object store, the weights downloads and the logs live.",
    )
    store_url: str = setting(
        "", STORE, (GATEWAY, ADMIN),
        "The request store: empty keeps SQLite in data_dir (one gateway); a `postgresql://` URL lets any number "
        "of gateways share one queue.",
        secret=True,
    )
    lease_seconds: float = setting(
        30.0, STORE, (GATEWAY,),
        "A running request's lease: its gateway renews it every third of this; when the gateway dies, another (or "
        "the same one restarted) takes the request back once it has run out.",
        unit="seconds",
    )
    tenant_max_waiting: int = setting(
        0, QUOTAS, (GATEWAY,),
        "Requests one tenant may have waiting (0: no cap); `tenant_limits` overrides it per tenant.",
        unit="requests",
    )
    tenant_max_running: int = setting(
        0, QUOTAS, (GATEWAY,),
        "Requests of one tenant running at once, checked at dispatch (0: no cap); `tenant_limits` overrides it "
        "per tenant.",
        unit="requests",
    )
    tenant_submits_per_second: float = setting(
        0.0, QUOTAS, (GATEWAY,),
        "Submits one tenant may make per second on one gateway (0: no cap); `tenant_limits` overrides it per "
        "tenant.",
        unit="per second",
    )
    tenant_max_open_streams: int = setting(
        2000, QUOTAS, (GATEWAY,),
        "Status streams (SSE, /run, StreamStatus, Subscribe) one tenant may hold open on a gateway (0: none but "
        'max_open_streams), so one tenant cannot take them all; `tenant_limits` key: "max_open_streams".',
        unit="streams",
    )
    tenant_limits: str = setting(
        "", QUOTAS, (GATEWAY,),
        'Per-tenant overrides and scheduling weights, as JSON: {"team-a": {"weight": 2, "max_waiting": 500, '
        '"max_running": 4, "submits_per_second": 20}}.',
        unit="JSON",
    )
    max_queue_size: int = setting(
        100_000, QUOTAS, (GATEWAY,),
        "Requests waiting in the gateway's queue, all tenants together (0: no cap).",
        unit="requests",
    )
    max_open_streams: int = setting(
        10_000, QUOTAS, (GATEWAY,),
        "Status streams open on one gateway, all tenants together (0: no cap).",
        unit="streams",
    )
    insecure_no_auth: bool = setting(
        False, NETWORK, (GATEWAY,),
        "Turns off API keys, which are required on any address but loopback (only for a network you trust "
        "entirely).",
    )
    grpc_host: str = setting("127.0.0.1", NETWORK, (GATEWAY,), "Address of the gateway's public gRPC API.")
    grpc_port: int = setting(50051, NETWORK, (GATEWAY,), "Port of the gateway's public gRPC API.", unit="port")
    tls_cert_file: str = setting(
        "", NETWORK, (GATEWAY,),
        "PEM certificate for TLS on the gRPC and HTTP ports (fal's Python client speaks https only).",
        unit="path",
    )
    tls_key_file: str = setting("", NETWORK, (GATEWAY,), "PEM private key of tls_cert_file.", unit="path")
    tls_client_ca_file: str = setting(
        "", NETWORK, (GATEWAY,),
        "PEM CA whose signed certificate gRPC callers must present (the HTTP port asks for none).",
        unit="path",
    )
    http_host: str = setting(
        "127.0.0.1", NETWORK, (GATEWAY,),
        "Address of the gateway's HTTP side: fal's queue protocol, stored files (local store), health, metrics.",
    )
    http_port: int = setting(8080, NETWORK, (GATEWAY,), "Port of the gateway's HTTP side.", unit="port")
    public_url: str = setting(
        "", NETWORK, (GATEWAY, WORKER),
        "Base of the URLs handed out for stored files; derived from http_host/http_port when empty.",
        unit="URL",
    )
    trusted_proxies: str = setting(
        "127.0.0.0/8,::1", NETWORK, (GATEWAY,),
        "Peers (IP addresses or networks, comma-separated) whose X-Forwarded-Proto / X-Forwarded-Host / Forwarded "
        "headers are believed when the HTTP side builds the URLs it returns (a TLS-terminating ingress or "
        "sidecar).",
        unit="CIDRs",
    )
    cors_allowed_origins: str = setting(
        "", NETWORK, (GATEWAY,),
        "Browser origins (scheme://host[:port], comma-separated) whose pages may call the HTTP side and read its "
        "answers (CORS); a request from any other page gets no CORS headers and its writes are refused.",
        unit="origins",
    )
    ray_address: str = setting(
        "", RAY_SERVE, (RAY,),
        "Ray cluster to join; empty starts a local one (the embedded default).",
    )
    ray_num_cpus: int = setting(
        0, RAY_SERVE, (RAY,),
        "CPUs of the local Ray cluster `loraserve serve` starts (0: Ray's own count).",
        unit="CPUs",
    )
    ray_start_attempts: int = setting(
        3, RAY_SERVE, (RAY,),
        "Tries at starting (or joining) Ray before giving up; a failed try is cleaned up first.",
        unit="attempts",
    )
    serve_grpc_host: str = setting(
        "127.0.0.1", RAY_SERVE, (GATEWAY,),
        "Host of Ray Serve's gRPC ingress, which the gateway's dispatcher calls.",
    )
    serve_grpc_port: int = setting(
        9000, RAY_SERVE, (GATEWAY, DEPLOYMENT),
        "Port of Ray Serve's gRPC ingress, which the gateway's dispatcher calls.",
        unit="port",
    )
    serve_http_port: int = setting(
        8000, RAY_SERVE, (DEPLOYMENT,),
        "Port of Ray Serve's HTTP proxy (health only).",
        unit="port",
    )
    serve_app_name: str = setting(
        "loraserve", RAY_SERVE, (GATEWAY, DEPLOYMENT),
        "Name (and route prefix) of the workers' Serve application, which the gateway's calls name.",
    )
    worker_shared_secret: str = setting(
        "", RAY_SERVE, (GATEWAY, WORKER),
        "Sent by the gateway on every call to the workers, which refuse calls without it (Serve's gRPC ingress "
        "listens on every interface). Empty: the workers check nothing; `loraserve serve` then makes one per run.",
        secret=True,
    )
    replica_num_gpus: float = setting(0.0, REPLICAS, (DEPLOYMENT,), "GPUs of one worker replica.", unit="GPUs")
    replica_num_cpus: float = setting(1.0, REPLICAS, (DEPLOYMENT,), "CPUs of one worker replica.", unit="CPUs")
    min_replicas: int = setting(
        1, REPLICAS, (DEPLOYMENT,),
        "Fewest worker replicas autoscaling keeps.",
        unit="replicas",
    )
    max_replicas: int = setting(
        1, REPLICAS, (GATEWAY, DEPLOYMENT),
        "Most worker replicas autoscaling starts (equal to min_replicas: a fixed count).",
        unit="replicas",
    )
    initial_replicas: int = setting(
        1, REPLICAS, (DEPLOYMENT,),
        "Worker replicas started at deployment.",
        unit="replicas",
    )
    target_ongoing_requests: float = setting(
        1.0, REPLICAS, (DEPLOYMENT,),
        "Requests per replica that autoscaling aims at.",
        unit="requests",
    )
    max_ongoing_requests_per_replica: int = setting(
        1, REPLICAS, (GATEWAY, DEPLOYMENT),
        "Generations one replica runs at once (the gateway dispatches at most max_replicas times this).",
        unit="requests",
    )
    upscale_delay_seconds: float = setting(
        30.0, REPLICAS, (DEPLOYMENT,),
        "How long load must stay high before autoscaling adds a replica.",
        unit="seconds",
    )
    downscale_delay_seconds: float = setting(
        600.0, REPLICAS, (DEPLOYMENT,),
        "How long load must stay low before autoscaling removes a replica.",
        unit="seconds",
    )
    max_pipelines_per_replica: int = setting(
        2, CACHES, (GATEWAY, WORKER),
        "Base pipelines one replica keeps loaded (least recently used one evicted).",
        unit="pipelines",
    )
    device_memory_bytes: int = setting(
        0, CACHES, (WORKER,),
        "Device memory a replica plans its base pipelines in while one of them is FLUX: another base stays "
        "beside a FLUX pipeline only if its weights and LoRA budget fit beside FLUX's weights, LoRA budget and "
        "24 GiB activation reserve, else the least recently used base is evicted (0: the GPU's total memory; "
        "on a CPU, no such plan). SD and SDXL bases alone are kept by max_pipelines_per_replica only.",
        unit="bytes",
    )
    max_loras_per_pipeline: int = setting(
        0, CACHES, (WORKER,),
        "LoRAs (and merged copies of the last set, kept for a repeat) on one pipeline's device between requests, "
        "by count (0: no cap but max_lora_bytes_per_pipeline).",
        unit="LoRAs",
    )
    max_lora_bytes_per_pipeline: int = setting(
        0, CACHES, (WORKER,),
        "LoRA tensors on one pipeline's device between requests, by bytes (0: a quarter of the device memory free "
        "once the pipeline is loaded, the host's available RAM on a CPU, split among max_pipelines_per_replica; "
        "a FLUX pipeline on a GPU: the free memory less 24 GiB for its activations, not split, as one merged "
        "FLUX LoRA set alone may take 22 GiB).",
        unit="bytes",
    )
    max_host_lora_bytes: int = setting(
        8 * 1024**3, CACHES, (WORKER,),
        "Parsed LoRA and embedding files kept in one replica's host RAM (shared by its pipelines and fed by "
        "prefetching for waiting requests), least recently used out first; 0: unbounded.",
        unit="bytes",
    )
    max_conditioning_models_per_replica: int = setting(
        4, CACHES, (WORKER,),
        "ControlNets, IP-Adapter weights, image encoders and IC-Light offsets one replica keeps loaded.",
        unit="models",
    )
    max_conditioning_bytes_per_replica: int = setting(
        8 * 1024**3, CACHES, (WORKER,),
        "Bytes of the conditioning models' weights one replica keeps loaded (0: count only).",
        unit="bytes",
    )
    safety_checker_path: str = setting(
        "", MODELS, (WORKER,),
        "Safety checker (StableDiffusionSafetyChecker + CLIP image processor: HF ID or folder) for "
        "`enable_safety_checker`; empty: such requests fail with a clear error.",
    )
    flux_model: str = setting(
        "black-forest-labs/FLUX.1-dev", MODELS, (GATEWAY, WORKER),
        "Base model of the fal-ai/flux-lora endpoints: any diffusers FLUX.1 checkpoint (Hugging Face ID, URL or "
        "path; [schnell] too), loaded through the same weights cache and replicas as SD models, in bfloat16 on "
        "cuda when torch_dtype is auto.",
    )
    flux_single_file_config: str = setting(
        "", MODELS, (WORKER,),
        "Diffusers FLUX.1 checkpoint (Hugging Face ID or path) giving a single-file FLUX base (one .safetensors "
        "in BFL's or diffusers' names, or an all-in-one file) its transformer config and the parts the file lacks "
        "(VAE, text encoders, tokenizers, scheduler); empty: FLUX.1 [dev] or [schnell] from the Hugging Face Hub, "
        "as the file's weights say.",
    )
    worker_metrics_port: int = setting(0, LOGS, (WORKER,), "A worker replica's Prometheus port (0: none).", unit="port")
    device: str = setting(
        "auto", MODELS, (WORKER,),
        'Torch device of the workers; "auto" picks cuda when there is one.',
    )
    torch_dtype: str = setting("auto", MODELS, (WORKER,), '"auto": float16 on cuda, float32 on cpu.')
    compile: str = setting(
        "auto", MODELS, (WORKER,),
        'torch.compile of the U-Net (FLUX: the transformer) and VAE decoder: off | default | max-autotune; "auto": '
        "max-autotune (with CUDA graphs) on cuda, off on a CPU (minutes of compiling per size for a small gain). "
        'FLUX requests run compiled only with acceleration "regular".',
    )
    compile_warmup_sizes: str = setting(
        "", MODELS, (WORKER,),
        "Sizes compiled and warmed when a pipeline loads, WIDTHxHEIGHT comma-separated (empty: the family's "
        "native 512x512 / 1024x1024); other sizes run eagerly, with no compile.",
        unit="WxH list",
    )
    compile_regional: str = setting(
        "auto", MODELS, (WORKER,),
        "Compile only the denoiser's repeated transformer blocks (the rest eager, CUDA graphs covering only the "
        'blocks): on | off | "auto": on for FLUX, whose transformer is 57 blocks of two shapes (compiled whole it '
        "takes about 7x as long, for the same speed), off for SD U-Nets, compiled whole as diffusers' SDXL recipe "
        "does.",
    )
    preview_interval_seconds: float = setting(
        1.0, MODELS, (WORKER,),
        "Live previews: a small JPEG of the latents at a request's last step and at most once per this many "
        "seconds before it (0: none).",
        unit="seconds",
    )
    preview_max_side: int = setting(256, MODELS, (WORKER,), "Longer side of a live preview.", unit="pixels")
    max_sync_mode_pixels: int = setting(
        2 * 1024 * 1024, QUOTAS, (GATEWAY, WORKER),
        "sync_mode puts the images in the result itself (data URIs), which the request store keeps: at most this "
        "many pixels over all of a request's images.",
        unit="pixels",
    )
    max_in_flight: int = setting(
        0, DISPATCH, (GATEWAY,),
        "Requests handed to workers at once; 0 means max_replicas × max_ongoing_requests_per_replica.",
        unit="requests",
    )
    max_queue_skips: int = setting(
        4, DISPATCH, (GATEWAY,),
        "A request whose base model is hot may overtake older ones whose model is cold, but none is overtaken "
        "more than this many times (0: strict FIFO).",
        unit="skips",
    )
    max_attempts: int = setting(
        10, DISPATCH, (GATEWAY,),
        "Worker attempts per request before it fails with WORKER_FAILED; a call that never reached a worker is no "
        "attempt.",
        unit="attempts",
    )
    worker_call_timeout_seconds: float = setting(
        1800.0, DISPATCH, (GATEWAY,),
        "Deadline of one worker call, from dispatch to result: a hung replica gives the request back then.",
        unit="seconds",
    )
    worker_keepalive_seconds: float = setting(
        300.0, DISPATCH, (GATEWAY,),
        "Keepalive pings on the channel to the workers (0: none); Serve's gRPC proxy cuts off clients that ping "
        "more often than every 300 s while it sends nothing.",
        unit="seconds",
    )
    worker_keepalive_timeout_seconds: float = setting(
        20.0, DISPATCH, (GATEWAY,),
        "How long a keepalive ping may go unanswered before the connection to the workers counts as dead.",
        unit="seconds",
    )
    retry_backoff_seconds: float = setting(
        1.0, DISPATCH, (GATEWAY,),
        "First backoff (jittered, doubling) between a request's attempts, probes of unreachable workers and "
        "restarts of the dispatcher.",
        unit="seconds",
    )
    retry_backoff_max_seconds: float = setting(60.0, DISPATCH, (GATEWAY,), "Cap of that backoff.", unit="seconds")
    worker_unreachable_threshold: int = setting(
        3, DISPATCH, (GATEWAY,),
        "Worker calls in a row that cannot reach a worker before dispatching pauses (health reports NOT_SERVING) "
        "until the workers can be reached again; waiting requests keep their places.",
        unit="calls",
    )
    retention_seconds: float = setting(
        7 * 24 * 3600.0, STORE, (GATEWAY,),
        "Finished requests, their logs and output files are deleted this long after they finished (like fal's "
        "media expiry); 0 keeps them forever.",
        unit="seconds",
    )
    webhook_signing_key: str = setting(
        "", WEBHOOKS, (GATEWAY,),
        "Ed25519 key webhooks are signed with, as PEM text (in a cluster from a Secret, the same for every "
        "gateway); neither it nor webhook_signing_key_file: one is made in data_dir on first start.",
        unit="PEM", secret=True,
    )
    webhook_signing_key_file: str = setting(
        "", WEBHOOKS, (GATEWAY,),
        "PEM file holding webhook_signing_key.",
        unit="path",
    )
    webhook_timeout_seconds: float = setting(
        15.0, WEBHOOKS, (GATEWAY,),
        "Timeout of one webhook delivery attempt.",
        unit="seconds",
    )
    webhook_retries: int = setting(
        10, WEBHOOKS, (GATEWAY,),
        "Retries after a failed first delivery attempt (by default ~2 hours in all); the target URL passes the "
        "same guard as inputs (allow_private_networks, fetch_allowed_hosts).",
        unit="retries",
    )
    webhook_backoff_seconds: float = setting(
        30.0, WEBHOOKS, (GATEWAY,),
        "First backoff (jittered, doubling) between webhook delivery attempts.",
        unit="seconds",
    )
    webhook_backoff_max_seconds: float = setting(
        1800.0, WEBHOOKS, (GATEWAY,),
        "Cap of the webhook backoff.",
        unit="seconds",
    )
    webhook_tenant_max_concurrent: int = setting(
        4, WEBHOOKS, (GATEWAY,),
        "Deliveries one gateway attempts at once for one tenant (0: no cap but the gateway's 32), so a tenant "
        "whose receiver never answers holds that many and others' deliveries go on.",
        unit="deliveries",
    )
    shutdown_grace_seconds: float = setting(
        30.0, DISPATCH, (GATEWAY,),
        "On shutdown, how long running requests may take to finish before they go back to the queue.",
        unit="seconds",
    )
    max_prompt_chars: int = setting(10_000, QUOTAS, (GATEWAY, WORKER), "Largest accepted prompt.", unit="characters")
    max_loras_per_request: int = setting(
        16, QUOTAS, (GATEWAY, WORKER),
        "Most LoRAs one request may name.",
        unit="LoRAs",
    )
    max_upload_bytes: int = setting(100 * 1024 * 1024, UPLOADS, (GATEWAY,), "Largest accepted upload.", unit="bytes")
    upload_min_part_bytes: int = setting(
        5 * 1024 * 1024, UPLOADS, (GATEWAY,),
        "Every part of a multipart upload but the last has at least this many bytes (S3's minimum; fal's clients "
        "send 10 MiB parts), so a flood of tiny parts is refused as it comes.",
        unit="bytes",
    )
    max_upload_spools: int = setting(
        256, UPLOADS, (GATEWAY,),
        "Uploads (and multipart parts) one gateway receives at once (0: no cap); past it: RESOURCE_EXHAUSTED / "
        "HTTP 429.",
        unit="uploads",
    )
    tenant_max_upload_spools: int = setting(
        32, UPLOADS, (GATEWAY,),
        "Uploads (and multipart parts) one gateway receives at once for one tenant (0: no cap).",
        unit="uploads",
    )
    tenant_max_upload_bytes: int = setting(
        10 * 1024**3, UPLOADS, (GATEWAY,),
        "Bytes of uploads one tenant may have stored or arriving (0: no cap); uploads are deleted "
        "retention_seconds after they were stored.",
        unit="bytes",
    )
    log_level: str = setting(
        "INFO", LOGS, (GATEWAY, WORKER),
        "Level of the console and log file: DEBUG, INFO, WARNING, ERROR.",
    )
    tracing_enabled: bool = setting(
        False, LOGS, (GATEWAY, WORKER),
        "OpenTelemetry traces of each request (core/tracing.py), one trace from submit through the queue and "
        "dispatch into the worker's input fetches, denoising and output writes, sent over OTLP/gRPC; log lines "
        "written inside a span carry its trace_id.",
    )
    tracing_otlp_endpoint: str = setting(
        "", LOGS, (GATEWAY, WORKER),
        "Where traces go, e.g. http://otel-collector:4317 (empty: OpenTelemetry's own OTEL_EXPORTER_OTLP_* "
        "variables, else localhost:4317).",
        unit="URL",
    )
    tracing_service_name: str = setting(
        "loraserve", LOGS, (GATEWAY, WORKER),
        "Traces name their service `<this>-gateway` or `<this>-worker`.",
    )
    tracing_sample_ratio: float = setting(
        1.0, LOGS, (GATEWAY, WORKER),
        "Share of new traces kept (0 to 1); the worker keeps what the gateway kept, so a trace is whole or absent.",
        unit="ratio",
    )
    object_store: str = setting(
        "local", OBJECTS, (GATEWAY, WORKER),
        'Object store for outputs and uploads: "local" (data_dir/files, served by the gateway) or "s3".',
    )
    s3_endpoint: str = setting(
        "", OBJECTS, (GATEWAY, WORKER),
        "S3 / MinIO endpoint, without a scheme.",
        unit="host[:port]",
    )
    s3_access_key: str = setting("", OBJECTS, (GATEWAY, WORKER), "S3 access key (write credentials).", secret=True)
    s3_secret_key: str = setting("", OBJECTS, (GATEWAY, WORKER), "S3 secret key (write credentials).", secret=True)
    s3_bucket: str = setting("loraserve", OBJECTS, (GATEWAY, WORKER), "S3 bucket; created when missing.")
    s3_region: str = setting("us-east-1", OBJECTS, (GATEWAY, WORKER), "S3 region.")
    s3_secure: bool = setting(True, OBJECTS, (GATEWAY, WORKER), "HTTPS to the S3 endpoint.")
    s3_key_prefix: str = setting("", OBJECTS, (GATEWAY, WORKER), "Prefix of every object key in the bucket.")
    s3_presign_expiry_seconds: int = setting(
        3600, OBJECTS, (GATEWAY, WORKER),
        "Lifetime of presigned result URLs (at most 7 days).",
        unit="seconds",
    )
    s3_public_base_url: str = setting(
        "", OBJECTS, (GATEWAY, WORKER),
        "Plain `{base}/{key}` URLs instead of presigned ones (a public or proxied bucket).",
        unit="URL",
    )
    s3_presign_endpoint: str = setting(
        "", OBJECTS, (GATEWAY, WORKER),
        "Where callers reach S3 when it differs from the in-cluster endpoint (presigned URLs name one host).",
        unit="URL",
    )
    s3_presign_access_key: str = setting(
        "", OBJECTS, (GATEWAY, WORKER),
        "Read-only access key used to presign; the write credentials when empty.",
        secret=True,
    )
    s3_presign_secret_key: str = setting(
        "", OBJECTS, (GATEWAY, WORKER),
        "Secret key of s3_presign_access_key.",
        secret=True,
    )
    s3_timeout_seconds: float = setting(60.0, OBJECTS, (GATEWAY, WORKER), "Timeout of one S3 call.", unit="seconds")
    output_write_attempts: int = setting(
        5, OBJECTS, (WORKER,),
        "Attempts at storing a finished generation's outputs before the worker attempt fails, so one S3 hiccup "
        "loses no GPU work.",
        unit="attempts",
    )
    output_write_backoff_seconds: float = setting(
        0.5, OBJECTS, (WORKER,),
        "Base of the backoff between those attempts (random up to base × 2^retry).",
        unit="seconds",
    )
    output_write_max_backoff_seconds: float = setting(
        8.0, OBJECTS, (WORKER,),
        "Cap of the backoff between output write attempts.",
        unit="seconds",
    )
    max_input_bytes: int = setting(
        50 * 1024 * 1024, INPUTS, (GATEWAY, WORKER),
        "Largest file input fetched from a URL.",
        unit="bytes",
    )
    max_data_uri_bytes: int = setting(
        20 * 1024 * 1024, INPUTS, (GATEWAY, WORKER),
        "Largest data URI input.",
        unit="bytes",
    )
    fetch_timeout_seconds: float = setting(
        30.0, INPUTS, (GATEWAY, WORKER),
        "Timeout of connecting to and reading from an input URL.",
        unit="seconds",
    )
    fetch_total_timeout_seconds: float = setting(
        300.0, INPUTS, (GATEWAY, WORKER),
        "Whole-transfer timeout of one input URL.",
        unit="seconds",
    )
    input_resolution_timeout_seconds: float = setting(
        600.0, INPUTS, (WORKER,),
        "All downloads of one request's inputs (LoRAs, embeddings, images, adapter weights) end by then (0: "
        "none).",
        unit="seconds",
    )
    allow_private_networks: bool = setting(
        False, INPUTS, (GATEWAY, WORKER),
        "Private, loopback and link-local fetch targets allowed (never cloud metadata addresses).",
    )
    fetch_allowed_hosts: str = setting(
        "", INPUTS, (GATEWAY, WORKER),
        "Comma-separated host names / IP literals (as written in URLs) exempt from the address check.",
        unit="hosts",
    )
    max_redirects: int = setting(
        5, INPUTS, (GATEWAY, WORKER),
        "Redirects followed when fetching an input.",
        unit="redirects",
    )
    max_image_pixels: int = setting(4096 * 4096, INPUTS, (GATEWAY, WORKER), "Largest input image.", unit="pixels")
    max_weights_bytes: int = setting(
        16 * 1024**3, INPUTS, (WORKER,),
        "Largest weights download (URL, Hugging Face).",
        unit="bytes",
    )
    weights_total_timeout_seconds: float = setting(
        3600.0, INPUTS, (WORKER,),
        "Whole-transfer timeout of one weights download.",
        unit="seconds",
    )
    max_weights_cache_bytes: int = setting(
        100 * 1024**3, INPUTS, (WORKER,),
        "Disk budget of the node's weights cache for URL / upload / data-URI files (LRU; 0: unbounded).",
        unit="bytes",
    )
    allow_pickle_weights: bool = setting(
        False, INPUTS, (WORKER,),
        "Pickle weights (.ckpt, .bin, .pt) run code when loaded: refused unless the operator opts in.",
    )
    allowed_local_roots: str = setting(
        "", INPUTS, (WORKER,),
        "Comma-separated folders whose files callers may name as local paths (model_name, LoRAs, adapters), "
        "checked after symlinks and `..` are resolved. Empty: none, except that `loraserve serve` listening on "
        "loopback only allows the system temp folder.",
        unit="paths",
    )
    files_url_expiry_seconds: int = setting(
        3600, OBJECTS, (GATEWAY, WORKER),
        "Lifetime of the local store's signed file URLs.",
        unit="seconds",
    )
    files_url_secret: str = setting(
        "", OBJECTS, (GATEWAY, WORKER),
        "HMAC secret that signs the local store's file URLs (empty: one is generated into data_dir on first use "
        "and shared by the gateway and the workers on this machine).",
        secret=True,
    )
    upload_allowed_content_types: str = setting(
        "image/png,image/jpeg,image/webp,image/gif,application/x-safetensors,application/json", UPLOADS, (GATEWAY,),
        "Comma-separated content types an upload may have (detected from its bytes).",
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

    @property
    def request_limits(self) -> RequestLimits:
        """What the request model checks, the same for the gateway's validation and the worker's."""
        return RequestLimits(
            max_prompt_chars=self.max_prompt_chars,
            max_loras_per_request=self.max_loras_per_request,
            max_data_uri_bytes=self.max_data_uri_bytes,
            max_sync_mode_pixels=self.max_sync_mode_pixels,
        )

    def with_embedded_local_roots(self) -> Settings:
        """The loopback default: callers are on this machine, and the demo, bench and tests name tiny models
        they built in temp folders. Anything reachable from elsewhere gets no local paths unless listed."""
        if self.allowed_local_roots or not (_is_loopback(self.grpc_host) and _is_loopback(self.http_host)):
            return self
        return self.replace(allowed_local_roots=tempfile.gettempdir())

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, config: Mapping[str, Any] | None = None, **overrides: Any
    ) -> Settings:
        """`overrides` (typed; None: not given) over `LORASERVE_*` env over `config` (a config file's typed
        values, core.settings_cli.read_config_file) over the defaults."""
        values: dict[str, Any] = dict(config or {})
        values.update(env_values(os.environ if env is None else env))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, readers: Iterable[Reader] = tuple(Reader)) -> None:
        """The flags of the settings `readers` read, grouped, with `--config`: core.settings_cli."""
        from core.settings_cli import add_settings_arguments

        add_settings_arguments(parser, readers)

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
        """Flags over env over `--config`'s file over the defaults."""
        from core.settings_cli import settings_from_args

        return settings_from_args(args, env)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


_UNDECLARED = SettingInfo("Undeclared", frozenset(Reader), "")


@functools.cache
def setting_infos() -> Mapping[str, SettingInfo]:
    """Every setting's metadata in declaration order; a field declared without `setting` reads as read by
    everyone, with no description (tests/unit/test_unit_settings.py refuses it)."""
    return types.MappingProxyType({f.name: f.metadata.get(_INFO, _UNDECLARED) for f in fields(Settings)})


def read_by(readers: Iterable[Reader]) -> list[str]:
    """The settings any of `readers` reads, in declaration order."""
    wanted = frozenset(readers)
    return [name for name, info in setting_infos().items() if info.readers & wanted]


def secret_file_setting(name: str) -> str:
    """`<name>_file`: where a secret may come from besides its env var (a Settings field of its own, as
    webhook_signing_key_file, or else the file's text becomes the secret when the settings are read)."""
    return f"{name}_file"


def reads_secret_file(name: str) -> bool:
    """Whether `<name>_file` is read here (no field of its own takes it)."""
    return setting_infos()[name].secret and secret_file_setting(name) not in setting_infos()


def read_secret_file(name: str, path: str | os.PathLike[str]) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"setting `{secret_file_setting(name)}`: cannot read {str(path)!r}: {exc.strerror}") from exc


def env_values(env: Mapping[str, str]) -> dict[str, Any]:
    """The settings `env` gives (empty counts as unset), parsed; a secret's `LORASERVE_<NAME>_FILE` read."""
    values: dict[str, Any] = {}
    for f in fields(Settings):
        raw = env.get(ENV_PREFIX + f.name.upper())
        file_var = ENV_PREFIX + secret_file_setting(f.name).upper()
        if reads_secret_file(f.name) and env.get(file_var):
            if raw:
                raise ValueError(f"set one of {ENV_PREFIX}{f.name.upper()} and {file_var}, not both")
            values[f.name] = read_secret_file(f.name, env[file_var])
        elif raw is not None and raw != "":
            values[f.name] = parse_value(f, raw)
    return values

def parse_value(f: dataclasses.Field[Any], raw: str) -> Any:
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
