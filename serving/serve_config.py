"""The one source of the worker application's Serve config, for the embedded mode and for KubeRay.

`loraserve serve` starts Serve with `serve_start_options` and runs `build_app(settings)`; the Helm
chart's RayService carries `serve_config(settings)` as its `serveConfigV2`, whose import path
(`serving.application:build_application`) rebuilds the same Settings from its `args` (plus the
pod's `LORASERVE_*` env for secrets) and calls the same `build_app`. The deployment options in the config's
`deployments` entry come from `deployment_options`, which `build_app` uses too, so a change in
either mode's resources, multiplexing or autoscaling is a change in both.

The config is split the way Serve applies updates: settings that only shape the deployment
(replicas, autoscaling, resources) sit in `deployments` and are light in-place updates;
everything a replica reads is in `args` (a change restarts the replicas); settings read only
by the gateway or by the process that starts Ray stay out, so changing them restarts no GPU
worker; secrets never appear (anyone who can read the RayService could read them).

Nothing heavy is imported here: `loraserve serve-config` prints the config without Ray or torch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.config import ENV_PREFIX, Reader, Settings, setting_infos

# serving/application.py, which imports the worker (torch, Ray) that this module must not.
IMPORT_PATH = "serving.application:build_application"
DEPLOYMENT_NAME = "Worker"
SERVICER_FUNCTIONS = ["loraserve.v1.worker_pb2_grpc.add_WorkerServiceServicer_to_server"]

_INFO = setting_infos()
# Never written into a Serve config: the chart gives them to pods from Secrets as env vars.
SECRET_SETTINGS = frozenset(name for name, info in _INFO.items() if info.secret)
# The secrets no replica reads (the queue's DSN, the key webhooks are signed with): the chart gives them
# to the gateway pods and never to a Ray pod, however they are given.
GATEWAY_SECRETS = frozenset(name for name in SECRET_SETTINGS if Reader.WORKER not in _INFO[name].readers)
# What `deployment_options` is made of.
DEPLOYMENT_SETTINGS = frozenset(
    {
        "replica_num_gpus",
        "replica_num_cpus",
        "min_replicas",
        "max_replicas",
        "initial_replicas",
        "target_ongoing_requests",
        "max_ongoing_requests_per_replica",
        "upscale_delay_seconds",
        "downscale_delay_seconds",
    }
)
# Read only by the gateway, by the process that starts Ray, by `loraserve keys`, or part of the config's own
# structure (app name, proxy ports): a replica never reads them (core.config declares who does).
NOT_FOR_REPLICAS = frozenset(
    name
    for name, info in _INFO.items()
    if Reader.WORKER not in info.readers and name not in SECRET_SETTINGS | DEPLOYMENT_SETTINGS
)


def replica_setting_names() -> list[str]:
    """The settings a replica reads, in declaration order: what `args` may carry."""
    excluded = SECRET_SETTINGS | DEPLOYMENT_SETTINGS | NOT_FOR_REPLICAS
    return [f.name for f in dataclasses.fields(Settings) if f.name not in excluded]


def deployment_options(settings: Settings) -> dict[str, Any]:
    """The worker deployment's options as plain JSON (what `serve.deployment` and a config's `deployments` take)."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": settings.replica_num_cpus, "num_gpus": settings.replica_num_gpus},
        # One slot more than generations: a Prefetch never waits behind a running generation
        # (generations are serialised by the replica's lock anyway).
        "max_ongoing_requests": settings.max_ongoing_requests_per_replica + 1,
    }
    if settings.min_replicas == settings.max_replicas:
        options["num_replicas"] = settings.max_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": settings.min_replicas,
            "max_replicas": settings.max_replicas,
            "initial_replicas": settings.initial_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests,
            "upscale_delay_s": settings.upscale_delay_seconds,
            "downscale_delay_s": settings.downscale_delay_seconds,
        }
    return options


def replica_args(settings: Settings) -> dict[str, Any]:
    """The replica settings that differ from their defaults, as JSON values."""
    defaults = Settings()
    return {
        name: _json_value(getattr(settings, name))
        for name in replica_setting_names()
        if getattr(settings, name) != getattr(defaults, name)
    }


def application_config(settings: Settings) -> dict[str, Any]:
    """One entry of `applications`: name and route prefix (the gRPC proxy finds no app without one)."""
    return {
        "name": settings.serve_app_name,
        "route_prefix": f"/{settings.serve_app_name}",
        "import_path": IMPORT_PATH,
        "args": replica_args(settings),
        "deployments": [{"name": DEPLOYMENT_NAME, **deployment_options(settings)}],
    }


def serve_start_options(settings: Settings, *, http_host: str) -> dict[str, Any]:
    """Serve's proxies: gRPC with the worker servicer (the gateway's way in), HTTP for health only."""
    return {
        "http_options": {"host": http_host, "port": settings.serve_http_port},
        "grpc_options": {"port": settings.serve_grpc_port, "grpc_servicer_functions": list(SERVICER_FUNCTIONS)},
    }


def serve_config(settings: Settings, *, http_host: str = "0.0.0.0") -> dict[str, Any]:
    """The whole Serve config (Ray's ServeDeploySchema): what a RayService's `serveConfigV2` holds."""
    return {
        "proxy_location": "EveryNode",
        **serve_start_options(settings, http_host=http_host),
        "applications": [application_config(settings)],
    }


def settings_from_args(args: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Settings:
    """Settings from a config's `args` over `LORASERVE_*` env (the pod's secrets), parsed like env vars."""
    known = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"serve config args name no setting: {', '.join(unknown)}")
    secret = sorted(set(args) & SECRET_SETTINGS)
    if secret:
        raise ValueError(f"serve config args must not carry secrets ({', '.join(secret)}); set them as env vars")
    merged = dict(os.environ if env is None else env)
    merged.update({ENV_PREFIX + name.upper(): _env_text(value) for name, value in args.items()})
    return Settings.from_env(merged)


def _json_value(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def _env_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def chart_settings() -> dict[str, Any]:
    """What the Helm chart needs to render `serve_config` itself (helm/loraserve/files/serve-settings.json):
    the settings that stay out of `args`, the defaults of those that make the deployment options, and
    the names the config refers to. tests/chart checks the file against this and the two renders."""
    defaults = Settings()
    return {
        "not_args": sorted(SECRET_SETTINGS | DEPLOYMENT_SETTINGS | NOT_FOR_REPLICAS),
        "gateway_secrets": sorted(GATEWAY_SECRETS),
        "defaults": {name: getattr(defaults, name) for name in sorted(DEPLOYMENT_SETTINGS | {"serve_app_name"})},
        "import_path": IMPORT_PATH,
        "deployment_name": DEPLOYMENT_NAME,
        "servicer_functions": list(SERVICER_FUNCTIONS),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(chart_settings(), indent=2))
